// The combination s = base + sum_i w_i (e_i - a_i) in fp32, masked (not finite -> -inf): the scalar
// loads and pair updates for any dtype mix, and the vector sweep per 64-token sub-block that also keeps
// each sub-block's maximum (simd::combine_chunk).
#pragma once

#include "vectors.h"

namespace proxytune_cpu {
namespace {

template <int D>
__attribute__((always_inline)) inline void load_block(const void* src, float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = load<D>(src, j);
}

// dst = dst + w * (e - a), three roundings, in this order (the reference's order).
template <int DE, int DA>
__attribute__((always_inline)) inline void add_pair_block(const void* e, const void* a, float w,
                                                          float* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float diff = load<DE>(e, j) - load<DA>(a, j);
    const float term = w * diff;
    dst[j] = dst[j] + term;
  }
}

// The dtype dispatch happens inside the (cloned) callers, so every instantiation is compiled per target.
__attribute__((always_inline)) inline void load_any(int dt, const void* src, float* __restrict dst, int64_t n) {
  switch (dt) {
    case kF32: return load_block<kF32>(src, dst, n);
    case kBF16: return load_block<kBF16>(src, dst, n);
    default: return load_block<kF16>(src, dst, n);
  }
}

template <int DE>
__attribute__((always_inline)) inline void add_pair_e(int da, const void* e, const void* a, float w,
                                                      float* __restrict dst, int64_t n) {
  switch (da) {
    case kF32: return add_pair_block<DE, kF32>(e, a, w, dst, n);
    case kBF16: return add_pair_block<DE, kBF16>(e, a, w, dst, n);
    default: return add_pair_block<DE, kF16>(e, a, w, dst, n);
  }
}

__attribute__((always_inline)) inline void add_pair_any(int de, int da, const void* e, const void* a, float w,
                                                        float* __restrict dst, int64_t n) {
  switch (de) {
    case kF32: return add_pair_e<kF32>(da, e, a, w, dst, n);
    case kBF16: return add_pair_e<kBF16>(da, e, a, w, dst, n);
    default: return add_pair_e<kF16>(da, e, a, w, dst, n);
  }
}

// s for n tokens from column b0 of row r into d; not-finite (NaN, inf) -> -inf (masked).
__attribute__((always_inline)) inline void combine_values(const Inputs& in, int64_t r, int64_t b0, int64_t n,
                                                          float* __restrict d) {
  load_any(in.base_dt, offset(in.base, in.base_dt, r * in.base_stride + b0), d, n);
  for (int64_t i = 0; i < in.n_pairs; ++i)
    add_pair_any(in.ex_dt[i], in.an_dt[i], offset(in.ex[i], in.ex_dt[i], r * in.ex_stride[i] + b0),
                 offset(in.an[i], in.an_dt[i], r * in.an_stride[i] + b0), in.weights[i * in.batch + r], d, n);
  for (int64_t j = 0; j < n; ++j) d[j] = std::fabs(d[j]) <= FLT_MAX ? d[j] : kNegInf;
}

namespace simd {  // vector code for NV registers per vector; compiled once per target in targets.h

template <int NV>
PT_INLINE float max_sub(const float* __restrict x) {  // max of kSub floats (no NaN)
  static_assert(kSub == 4 * kW, "one sub-block is four vectors");
  return hmax(vmax(vmax(vload<NV>(x), vload<NV>(x + kW)), vmax(vload<NV>(x + 2 * kW), vload<NV>(x + 3 * kW))));
}

// One sub-block (kSub tokens from column j) of s into d in one sweep: loads, combination, masking, store
// and maximum (returned). The base alone, or one pair with every input of dtype D: the common cases.
template <int D, bool kPair, int NV>
PT_INLINE float combine_sub(const void* b, const void* e, const void* a, float w, int64_t j,
                            float* __restrict d) {
  Vec<NV> mx = splat<NV>(kNegInf);
  for (int q = 0; q < kSub; q += kW) {
    Vec<NV> v = vload_as<D, NV>(b, j + q);
    if constexpr (kPair) v = v + w * (vload_as<D, NV>(e, j + q) - vload_as<D, NV>(a, j + q));
    v = masked_if_not_finite(v);
    vstore(d + q, v);
    mx = vmax(mx, v);
  }
  return hmax(mx);
}

template <int D, bool kPair, int NV>
PT_INLINE void combine_subs(const Inputs& in, int64_t r, int64_t b0, int64_t nsubs, float* __restrict d,
                            float* __restrict bm) {
  const void* b = offset(in.base, D, r * in.base_stride + b0);
  const void* e = kPair ? offset(in.ex[0], D, r * in.ex_stride[0] + b0) : nullptr;
  const void* a = kPair ? offset(in.an[0], D, r * in.an_stride[0] + b0) : nullptr;
  const float w = kPair ? in.weights[r] : 0.0f;
  for (int64_t i = 0; i < nsubs; ++i) bm[i] = combine_sub<D, kPair, NV>(b, e, a, w, i * kSub, d + i * kSub);
}

// One block of s (n <= kBlock tokens from column b0 of row r) into d; sub-block maxima into bm.
template <int NV>
PT_INLINE void combine_block(const Inputs& in, int64_t r, int64_t b0, int64_t n, float* __restrict d,
                          float* __restrict bm) {
  const int dt = in.base_dt;
  const bool fused = in.n_pairs == 0 || (in.n_pairs == 1 && in.ex_dt[0] == dt && in.an_dt[0] == dt);
  int64_t done = 0;
  if (fused) {
    const int64_t nsubs = n / kSub;
    switch (dt * 2 + int(in.n_pairs)) {
      case kF32 * 2: combine_subs<kF32, false, NV>(in, r, b0, nsubs, d, bm); break;
      case kF32 * 2 + 1: combine_subs<kF32, true, NV>(in, r, b0, nsubs, d, bm); break;
      case kBF16 * 2: combine_subs<kBF16, false, NV>(in, r, b0, nsubs, d, bm); break;
      case kBF16 * 2 + 1: combine_subs<kBF16, true, NV>(in, r, b0, nsubs, d, bm); break;
      case kF16 * 2: combine_subs<kF16, false, NV>(in, r, b0, nsubs, d, bm); break;
      default: combine_subs<kF16, true, NV>(in, r, b0, nsubs, d, bm); break;
    }
    done = nsubs * kSub;
  }
  if (done == n) return;
  // Mixed dtypes, several pairs, or the row's last partial sub-block: stage by stage through d.
  combine_values(in, r, b0 + done, n - done, d + done);
  int64_t sb = done;
  for (; sb + kSub <= n; sb += kSub) bm[sb / kSub] = max_sub<NV>(d + sb);
  if (sb < n) {
    float mx = kNegInf;
    for (int64_t j = sb; j < n; ++j) mx = d[j] > mx ? d[j] : mx;
    bm[sb / kSub] = mx;
  }
}

// s[lo, hi) of row r into s (the row's buffer); returns the chunk max and its first index and writes each
// sub-block maximum into bm (indexed by global sub-block). lo is a multiple of kSub. The row's last
// sub-block is padded with -inf up to a multiple of kSub (the buffer holds padded(V) floats), so the
// later passes read whole sub-blocks only.
template <int NV>
PT_INLINE void combine_chunk(const Inputs& in, int64_t r, int64_t lo, int64_t hi, float* s, float* bm, float* cmax,
                   int64_t* cidx) {
  for (int64_t j = hi; j < padded(hi); ++j) s[j] = kNegInf;
  float cm = kNegInf;
  int64_t csub = -1;
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t n = std::min(kBlock, hi - b0);
    combine_block<NV>(in, r, b0, n, s + b0, bm + b0 / kSub);
    for (int64_t sb = 0; sb < n; sb += kSub)
      if (bm[(b0 + sb) / kSub] > cm) {
        cm = bm[(b0 + sb) / kSub];
        csub = b0 + sb;
      }
  }
  int64_t ci = lo;
  if (csub >= 0)
    for (int64_t j = csub;; ++j)
      if (s[j] == cm) {
        ci = j;
        break;
      }
  *cmax = cm;
  *cidx = ci;
}

}  // namespace simd

}  // namespace
}  // namespace proxytune_cpu
