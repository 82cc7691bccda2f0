// Shared by every part of the CPU op: constants, dtype codes and exact conversions to fp32, the scalar exp
// and z, the row inputs and parameters, the draw's key and candidates, the filter stage's scratch, and the
// build macros (which targets the hot code is compiled for; where FMAs may be formed).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

// The hot loops use explicit 16-lane vectors (vectors.h) or plain loops the compiler vectorises. On x86-64
// with GCC both are also compiled for AVX2 and AVX-512 and picked at load time: the plain loops as
// target_clones (PT_HOT, an ifunc), the vector code as one set of entry points per target and register
// width (targets.h); the default build stays baseline x86-64. No FMA is formed outside the sums S and the
// ladder (-ffp-contract=off), so every target draws the same tokens (tests/test_cpu_builds.py builds and
// compares them).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    !defined(PROXYTUNE_NO_CLONES)
#define PT_MULTI_TARGET 1
#define PT_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PT_MULTI_TARGET 0
#define PT_HOT
#endif

namespace proxytune_cpu {
namespace {

constexpr int64_t kBlock = 2048;  // pass-1 block (fits L1 with the inputs)
constexpr int64_t kSub = 64;      // sub-block whose maximum is kept
constexpr int kLadder = 8;
constexpr float kLadderZ[kLadder] = {-1.0f, -2.0f, -3.0f, -4.5f, -6.0f, -8.0f, -11.0f, -16.0f};
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kGumbelMax = 16.64f;  // > -log(-log(1 - 2^-24)) = 16.6355
constexpr float kEps = 0.01f;         // slack of the draw's pruning bounds (rounding is ~1e-5 here)

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

inline float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
inline float bf16_to_f32(uint16_t h) { return from_bits(uint32_t(h) << 16); }
inline float f16_to_f32(uint16_t h) {  // exact, branch-free (the FP16 library's conversion)
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t bits = two_w < (1u << 27) ? to_bits(denormalized) : to_bits(normalized);
  return from_bits(sign | bits);
}

template <int D>
inline float load(const void* p, int64_t j) {
  if constexpr (D == kF32) return static_cast<const float*>(p)[j];
  else if constexpr (D == kBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[j]);
  else return f16_to_f32(static_cast<const uint16_t*>(p)[j]);
}

// exp for x <= ~88, vectorisable (Cephes expf polynomial, ~1 ulp); 0 below -87.3 and for -inf.
inline float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.33654f), 88.0f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float scale = from_bits(uint32_t(int32_t(n) + 127) << 23);
  const float y = p * scale;
  return x < -87.33654f ? 0.0f : y;
}

// z = (s - m) / T exactly as the reference computes it; masked (and NaN from inf/inf) -> -inf.
inline float z_of(float s, float m, float t) {
  const float z = (s - m) / t;
  return (s > kNegInf && z == z) ? z : kNegInf;
}

struct Noise {
  uint32_t k0, k1, c2, c3;
};

struct Best {
  float key = kNegInf;
  int64_t idx = -1;
  void offer(float key_j, int64_t j) {
    if (key_j > key || (key_j == key && (idx < 0 || j < idx))) {
      key = key_j;
      idx = j;
    }
  }
};

constexpr int kGroup = 4 * kSub;  // tokens per noise batch

struct Cand {
  float z;
  int32_t idx;
};
inline bool by_z_desc(const Cand& a, const Cand& b) { return a.z > b.z || (a.z == b.z && a.idx < b.idx); }

struct Inputs {
  int64_t batch, vocab, n_pairs;
  const void* base;
  int64_t base_stride;
  int base_dt;
  std::vector<const void*> ex, an;
  std::vector<int64_t> ex_stride, an_stride;
  std::vector<int> ex_dt, an_dt;
  const float* weights;  // [P, B] contiguous
};

inline int64_t padded(int64_t v) { return (v + kSub - 1) / kSub * kSub; }

inline size_t elem_size(int dt) { return dt == kF32 ? 4 : 2; }
inline const void* offset(const void* p, int dt, int64_t elems) {
  return static_cast<const char*>(p) + elems * int64_t(elem_size(dt));
}

struct RowParams {
  float t, p, min_p;
  int64_t k;
  Noise nz;
  bool logprobs;  // the caller reads the log-probability (else only the fully-masked marker is written)
};

// A row whose kept set some filter bounds (else the draw runs over every finite token).
inline bool has_filter(const RowParams& rp, int64_t V) {
  return (rp.k > 0 && rp.k < V) || !(rp.p >= 1.0f) || !(rp.min_p <= 0.0f);
}
// A row whose filter stage reads the ladder: top-p without top-k.
inline bool has_ladder(const RowParams& rp, int64_t V) { return !(rp.p >= 1.0f) && !(rp.k > 0 && rp.k < V); }
// A row that needs S (the sum of exp z over every finite token): top-p's target, or the log-probability.
inline bool needs_sum(const RowParams& rp) { return rp.logprobs || !(rp.p >= 1.0f); }

// The op's host-side batch flags (bits of its `filters` argument): a filter whose bit is clear is off in
// every row, whatever its parameter says (the caller's promise; `proxytune.sample(filters_used=...)`).
constexpr int64_t kTopKBit = 1, kTopPBit = 2, kMinPBit = 4, kAllFilters = 7;

struct Scratch {  // per-thread buffers of the filter stage, reused across rows and calls
  std::vector<Cand> C, D, kept, tmp;
  std::vector<float> bmz, minz, q;
  std::vector<double> mass;
  std::vector<int64_t> count;
  std::vector<int32_t> bucket_of;
};

// The sums S and the ladder (filters.h) only steer the search or carry fp32 error anyway, so their 2^x may
// contract into FMAs where the target has them: a clone-dependent last ulp of S, never of s or z.
#if defined(__GNUC__) && !defined(__clang__)
#define PT_CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define PT_CONTRACT
#endif

constexpr float kLog2e = 1.44269504088896341f;

}  // namespace
}  // namespace proxytune_cpu
