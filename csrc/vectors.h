// The 16-lane fp32 vectors of the hot loops, held as 1, 2 or 4 native registers (AVX-512, AVX2, SSE/NEON),
// and the flag scans built on them (hits_at_least, for_each_sub_at_least).
#pragma once

#include "common.h"

namespace proxytune_cpu {
namespace {

// ---- 16-lane vectors ----------------------------------------------------------------------------------
// The hot loops think in 16-lane fp32 vectors (a 64-token sub-block is four of them). A vector is held as
// NV native GCC/Clang vector-extension registers of 16 / NV lanes each: NV = 1 for AVX-512, 2 for AVX2,
// 4 for SSE and NEON. Every operation is lane-wise IEEE arithmetic, and the horizontal reductions keep
// one order (16 -> 8 -> 4 lanes, then pairs) whatever NV is, so every width computes the same bits; only
// the instructions differ. The width is not left to the compiler: GCC lowers a 16-lane comparison or
// select that the target cannot hold in one register lane by lane (about 2,000 lane extracts and
// inserts in an AVX2 build, ten times slower than AVX-512), while a comparison on a native register is
// one instruction. The functions that use these vectors (namespace simd) are compiled once per width,
// each under its own target, and picked at load time (targets.h).
#define PT_INLINE __attribute__((always_inline)) inline
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // wide vectors only ever live inside inlined helpers
#endif
constexpr int kW = 16;

template <int NV>
struct Vec {  // 16 fp32 lanes as NV native vectors of kN lanes (lane l of part i is logical lane i * kN + l)
  static_assert(NV == 1 || NV == 2 || NV == 4, "16 lanes in 1, 2 or 4 registers");
  static constexpr int kN = kW / NV;
  typedef float f __attribute__((vector_size(4 * kN)));
  typedef uint32_t u __attribute__((vector_size(4 * kN)));
  typedef int32_t i __attribute__((vector_size(4 * kN)));
  typedef uint16_t h __attribute__((vector_size(2 * kN)));
  f p[NV];
};
typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint32_t vu4 __attribute__((vector_size(16)));

#define PT_EACH for (int i_ = 0; i_ < NV; ++i_)
template <int NV>
PT_INLINE Vec<NV> splat(float x) {
  Vec<NV> v;
  PT_EACH v.p[i_] = typename Vec<NV>::f{} + x;
  return v;
}
template <int NV>
PT_INLINE Vec<NV> vload(const float* p) {
  Vec<NV> v;
  PT_EACH std::memcpy(&v.p[i_], p + i_ * Vec<NV>::kN, sizeof v.p[i_]);
  return v;
}
template <int NV>
PT_INLINE void vstore(float* p, const Vec<NV>& v) {
  PT_EACH std::memcpy(p + i_ * Vec<NV>::kN, &v.p[i_], sizeof v.p[i_]);
}
#define PT_VEC_OP(op)                                          \
  template <int NV>                                            \
  PT_INLINE Vec<NV> operator op(Vec<NV> a, const Vec<NV>& b) { \
    PT_EACH a.p[i_] = a.p[i_] op b.p[i_];                      \
    return a;                                                  \
  }                                                            \
  template <int NV>                                            \
  PT_INLINE Vec<NV> operator op(Vec<NV> a, float b) {          \
    PT_EACH a.p[i_] = a.p[i_] op b;                            \
    return a;                                                  \
  }                                                            \
  template <int NV>                                            \
  PT_INLINE Vec<NV> operator op(float a, Vec<NV> b) {          \
    PT_EACH b.p[i_] = a op b.p[i_];                            \
    return b;                                                  \
  }                                                            \
  template <int NV>                                            \
  PT_INLINE Vec<NV>& operator op##=(Vec<NV>& a, const Vec<NV>& b) { return a = a op b; }
PT_VEC_OP(+)
PT_VEC_OP(-)
PT_VEC_OP(*)
#undef PT_VEC_OP

template <int NV>
PT_INLINE Vec<NV> vmax(Vec<NV> a, const Vec<NV>& b) {
  PT_EACH a.p[i_] = a.p[i_] > b.p[i_] ? a.p[i_] : b.p[i_];
  return a;
}
// e where x >= r, else 0.
template <int NV>
PT_INLINE Vec<NV> where_at_least(const Vec<NV>& x, const Vec<NV>& r, Vec<NV> e) {
  PT_EACH e.p[i_] = x.p[i_] >= r.p[i_] ? e.p[i_] : typename Vec<NV>::f{};
  return e;
}

// The 16 lanes reduced to 8 by op(lanes 0-7, lanes 8-15), then to 4 the same way (every NV, same order).
struct MaxOp {
  template <typename T>
  PT_INLINE T operator()(T a, T b) const { return a > b ? a : b; }
};
struct AddOp {
  template <typename T>
  PT_INLINE T operator()(T a, T b) const { return a + b; }
};
template <int NV, typename Op>
PT_INLINE vf4 reduce_to_4(const Vec<NV>& v, Op op) {
  vf4 c, d;
  if constexpr (NV == 4) {
    c = op(v.p[0], v.p[2]);  // lanes 0-3 with 8-11, then 4-7 with 12-15
    d = op(v.p[1], v.p[3]);
  } else {
    vf8 a;
    if constexpr (NV == 1) {
      vf8 lo, hi;
      std::memcpy(&lo, &v.p[0], 32);
      std::memcpy(&hi, reinterpret_cast<const char*>(&v.p[0]) + 32, 32);
      a = op(lo, hi);
    } else {
      a = op(v.p[0], v.p[1]);
    }
    std::memcpy(&c, &a, 16);
    std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
  }
  return op(c, d);
}
template <int NV>
PT_INLINE float hmax(const Vec<NV>& v) {  // maximum of the 16 lanes (no NaN)
  const vf4 c = reduce_to_4(v, MaxOp());
  const float x = c[0] > c[1] ? c[0] : c[1], y = c[2] > c[3] ? c[2] : c[3];
  return x > y ? x : y;
}
template <int NV>
PT_INLINE float hsum(const Vec<NV>& v) {  // sum of the 16 lanes, pairwise
  const vf4 c = reduce_to_4(v, AddOp());
  return (c[0] + c[1]) + (c[2] + c[3]);
}

// Tokens [j, j + 16) of a row of dtype D as fp32 (exact: the scalar conversions of common.h, lane-wise).
template <int D, int NV>
PT_INLINE Vec<NV> vload_as(const void* p, int64_t j) {
  if constexpr (D == kF32) {
    return vload<NV>(static_cast<const float*>(p) + j);
  } else {
    using f = typename Vec<NV>::f;
    using u = typename Vec<NV>::u;
    Vec<NV> out;
    PT_EACH {
      typename Vec<NV>::h h;
      std::memcpy(&h, static_cast<const uint16_t*>(p) + j + i_ * Vec<NV>::kN, sizeof h);
      const u w = __builtin_convertvector(h, u) << 16;
      if constexpr (D == kBF16) {
        out.p[i_] = (f)w;
      } else {
        const u sign = w & 0x80000000u;
        const u two_w = w + w;
        const f normalized = (f)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
        const f denormalized = (f)((two_w >> 17) | (126u << 23)) - 0.5f;
        const u bits = two_w < (1u << 27) ? (u)denormalized : (u)normalized;
        out.p[i_] = (f)(sign | bits);
      }
    }
    return out;
  }
}

// Not finite (NaN, +-inf) -> -inf (masked).
template <int NV>
PT_INLINE Vec<NV> masked_if_not_finite(Vec<NV> v) {
  using f = typename Vec<NV>::f;
  using u = typename Vec<NV>::u;
  const f neg_inf = f{} - std::numeric_limits<float>::infinity();
  PT_EACH v.p[i_] = ((u)v.p[i_] & 0x7FFFFFFFu) <= 0x7F7FFFFFu ? v.p[i_] : neg_inf;
  return v;
}

namespace simd {  // vector code for NV registers per vector; compiled once per target in targets.h

// Bit j is set where (x[j] - m) * inv_t >= lim for the kSub tokens of a sub-block (the row is padded to
// whole sub-blocks; a masked -inf token is set only when lim = -inf). The product is a cheap stand-in for
// z = (s - m) / T: callers lower lim by a margin far above the few ulps between the two, then check the
// exact z of each hit. AVX-512 narrows each comparison to bytes (one instruction) and multiplies eight
// 0/1 bytes into eight bits; narrower targets, where GCC narrows lane by lane, OR a distinct bit per lane
// into two 32-bit words instead. Both give the same bits.
template <int NV>
PT_INLINE uint64_t hits_at_least(const float* __restrict x, float m, float inv_t, float lim) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "flag bytes are packed as little-endian words");
  const Vec<NV> l = splat<NV>(lim);
  if constexpr (NV == 1) {
    typedef int8_t vb __attribute__((vector_size(kW)));
    using vi = typename Vec<NV>::i;
    const vi one = vi{} + 1, zero = {};
    uint8_t flag[kSub];
    for (int q = 0; q < kSub; q += kW) {
      const vi h = ((vload<NV>(x + q) - m) * inv_t).p[0] >= l.p[0] ? one : zero;
      const vb b = __builtin_convertvector(h, vb);  // 1 or 0 per byte
      std::memcpy(flag + q, &b, kW);
    }
    uint64_t bits = 0;
    for (int w = 0; w < kSub / 8; ++w) {  // eight 0/1 bytes -> eight bits
      uint64_t f;
      std::memcpy(&f, flag + 8 * w, 8);
      bits |= ((f * 0x0102040810204080ull) >> 56) << (8 * w);
    }
    return bits;
  } else {
    using u = typename Vec<NV>::u;
    constexpr int kN = Vec<NV>::kN;
    u lane = {};  // 0, 1, ..., kN - 1
    for (int k = 0; k < kN; ++k) lane[k] = uint32_t(k);
    uint32_t word[2];
    for (int w = 0; w < 2; ++w) {  // tokens 32w .. 32w + 31 -> bits of word[w]
      u acc = {};
      for (int h = 0; h < 2; ++h) {
        const Vec<NV> y = (vload<NV>(x + (2 * w + h) * kW) - m) * inv_t;
        PT_EACH acc |= y.p[i_] >= l.p[i_] ? (u{} + 1u) << (lane + uint32_t(16 * h + kN * i_)) : u{};
      }
      vu4 c;
      if constexpr (kN == 8) {
        vu4 lo, hi;
        std::memcpy(&lo, &acc, 16);
        std::memcpy(&hi, reinterpret_cast<const char*>(&acc) + 16, 16);
        c = lo | hi;
      } else {
        c = acc;
      }
      word[w] = (c[0] | c[1]) | (c[2] | c[3]);
    }
    return uint64_t(word[0]) | (uint64_t(word[1]) << 32);
  }
}

// Calls f(b) for every sub-block b in [b0, b1) whose maximum passes (bm[b] - m) * inv_t >= lim(), in
// increasing order, deciding 64 sub-blocks per vector sweep (no branch per sub-block). lim() is read once
// per 64: a caller whose limit only rises sees a superset. Reads bm up to b1 + 63 (buffers hold kSub
// extra floats; what lies past b1 is masked off).
template <int NV, typename Lim, typename F>
PT_INLINE void for_each_sub_at_least(const float* bm, int64_t b0, int64_t b1, float m, float inv_t, Lim&& lim,
                                     F&& f) {
  for (int64_t g = b0; g < b1; g += kSub) {
    uint64_t bits = hits_at_least<NV>(bm + g, m, inv_t, lim());
    if (b1 - g < kSub) bits &= (uint64_t(1) << (b1 - g)) - 1;
    for (; bits; bits &= bits - 1) f(g + __builtin_ctzll(bits));
  }
}

}  // namespace simd

}  // namespace
}  // namespace proxytune_cpu
