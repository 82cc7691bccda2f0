// The simd functions compiled once per target (AVX-512, AVX2, baseline on x86-64; the compiler's target
// elsewhere) and the table picked at load time; the plain functions below dispatch through it.
#pragma once

#include "combine.h"
#include "draw.h"
#include "filters.h"

namespace proxytune_cpu {
namespace {

// One entry point per hot function and target, and the table of one target's entry points. On x86-64 with
// GCC the installed build compiles AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and baseline entry points and picks
// one table at load time, as target_clones would (the plain loops elsewhere are target_clones, PT_HOT);
// elsewhere, and with -DPROXYTUNE_NO_CLONES, one table for the target the compiler was given.
struct HotOps {
  const char* target;  // what the entry points were compiled for
  void (*combine_block)(const Inputs& in, int64_t r, int64_t b0, int64_t n, float* d, float* bm);
  void (*combine_chunk)(const Inputs& in, int64_t r, int64_t lo, int64_t hi, float* s, float* bm, float* cmax,
                        int64_t* cidx);
  void (*scale_chunk)(const float* s, const float* bm, int64_t lo, int64_t hi, float M, float t, bool with_ladder,
                      double* S, double* ladder);
  Best (*draw_chunk)(const float* s, const float* bm, int64_t lo, int64_t hi, int64_t seed_idx, float m, float t,
                     Noise nz);
  void (*collect)(const float* s, const float* bm, int64_t V, float m, float t, float c_lo, std::vector<Cand>& C);
};

#define PT_ENTRY_POINTS(name, label, target, NV)                                                                 \
  namespace name {                                                                                                 \
  target void combine_block(const Inputs& in, int64_t r, int64_t b0, int64_t n, float* d, float* bm) {             \
    simd::combine_block<NV>(in, r, b0, n, d, bm);                                                                   \
  }                                                                                                                \
  target void combine_chunk(const Inputs& in, int64_t r, int64_t lo, int64_t hi, float* s, float* bm, float* cmax, \
                            int64_t* cidx) {                                                                       \
    simd::combine_chunk<NV>(in, r, lo, hi, s, bm, cmax, cidx);                                                      \
  }                                                                                                                \
  target PT_CONTRACT void scale_chunk(const float* s, const float* bm, int64_t lo, int64_t hi, float M, float t,   \
                                      bool with_ladder, double* S, double* ladder) {                               \
    simd::scale_chunk<NV>(s, bm, lo, hi, M, t, with_ladder, S, ladder);                                             \
  }                                                                                                                \
  target Best draw_chunk(const float* s, const float* bm, int64_t lo, int64_t hi, int64_t seed_idx, float m,       \
                         float t, Noise nz) {                                                                      \
    return simd::draw_chunk<NV>(s, bm, lo, hi, seed_idx, m, t, nz);                                                 \
  }                                                                                                                \
  target void collect(const float* s, const float* bm, int64_t V, float m, float t, float c_lo,                    \
                      std::vector<Cand>& C) {                                                                      \
    simd::collect<NV>(s, bm, V, m, t, c_lo, C);                                                                     \
  }                                                                                                                \
  constexpr HotOps ops = {label, combine_block, combine_chunk, scale_chunk, draw_chunk, collect};                  \
  }

#if PT_MULTI_TARGET
PT_ENTRY_POINTS(avx512, "x86-64-v4", __attribute__((target("arch=x86-64-v4"))), 1)
PT_ENTRY_POINTS(avx2, "x86-64-v3", __attribute__((target("arch=x86-64-v3"))), 2)
PT_ENTRY_POINTS(baseline, "x86-64", , 4)
const HotOps& pick_hot() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return avx512::ops;
  if (__builtin_cpu_supports("x86-64-v3")) return avx2::ops;
  return baseline::ops;
}
#else
#if defined(__AVX512F__)
PT_ENTRY_POINTS(native, "compiler target, 16-lane registers (AVX-512)", , 1)
#elif defined(__AVX2__)
PT_ENTRY_POINTS(native, "compiler target, 8-lane registers (AVX2)", , 2)
#else
PT_ENTRY_POINTS(native, "compiler target, 4-lane registers (SSE, NEON)", , 4)
#endif
const HotOps& pick_hot() { return native::ops; }
#endif
#undef PT_ENTRY_POINTS

const HotOps& hot() {
  static const HotOps& ops = pick_hot();
  return ops;
}

void combine_block(const Inputs& in, int64_t r, int64_t b0, int64_t n, float* d, float* bm) {
  hot().combine_block(in, r, b0, n, d, bm);
}
void combine_chunk(const Inputs& in, int64_t r, int64_t lo, int64_t hi, float* s, float* bm, float* cmax,
                   int64_t* cidx) {
  hot().combine_chunk(in, r, lo, hi, s, bm, cmax, cidx);
}
void scale_chunk(const float* s, const float* bm, int64_t lo, int64_t hi, float M, float t, bool with_ladder,
                 double* S, double* ladder) {
  hot().scale_chunk(s, bm, lo, hi, M, t, with_ladder, S, ladder);
}
Best draw_chunk(const float* s, const float* bm, int64_t lo, int64_t hi, int64_t seed_idx, float m, float t,
                Noise nz) {
  return hot().draw_chunk(s, bm, lo, hi, seed_idx, m, t, nz);
}
void collect(const float* s, const float* bm, int64_t V, float m, float t, float c_lo, std::vector<Cand>& C) {
  hot().collect(s, bm, V, m, t, c_lo, C);
}

}  // namespace
}  // namespace proxytune_cpu
