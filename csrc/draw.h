// Philox-4x32-10 uniforms, Gumbel keys and the pruned argmax draw: over a list of kept tokens (draw_list)
// and, without filters, over every finite token of a chunk (simd::draw_chunk).
#pragma once

#include "vectors.h"

namespace proxytune_cpu {
namespace {

// u = ((x0 >> 9) + 0.5) * 2^-23 with x0 = Philox-4x32-10((j, 0, c2, c3), (k0, k1))[0], for n tokens.
// The 32-bit words live in 64-bit lanes so the 32x32->64 products vectorise without shuffles.
PT_HOT void uniforms(const uint32_t* __restrict tok, int n, Noise nz, float* __restrict u) {
  uint64_t key0[10], key1[10];
  uint32_t k0 = nz.k0, k1 = nz.k1;
  for (int round = 0; round < 10; ++round) {
    key0[round] = k0;
    key1[round] = k1;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int l = 0; l < n; ++l) {
    uint64_t c0 = tok[l], c1 = 0, c2 = nz.c2, c3 = nz.c3;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const uint64_t pa = uint64_t(uint32_t(c0)) * uint64_t(0xD2511F53u);
      const uint64_t pb = uint64_t(uint32_t(c2)) * uint64_t(0xCD9E8D57u);
      const uint64_t n0 = (pb >> 32) ^ c1 ^ key0[round];
      const uint64_t n2 = (pa >> 32) ^ c3 ^ key1[round];
      c1 = pb & 0xFFFFFFFFu;
      c3 = pa & 0xFFFFFFFFu;
      c0 = n0;
      c2 = n2;
    }
    u[l] = (float(uint32_t(c0) >> 9) + 0.5f) * 0x1.0p-23f;
  }
}

PT_HOT void exp_shifted(const float* __restrict z, int n, float ref, float* __restrict ex) {
  for (int l = 0; l < n; ++l) ex[l] = exp_approx((z[l] - ref) + kEps);
}

inline float gumbel_of(float u) { return -std::log(-std::log(u)); }

inline float exact_key(float z, uint32_t j, Noise nz) {
  float u;
  uniforms(&j, 1, nz, &u);
  return z + gumbel_of(u);
}

// Offers the tokens tok[0..n) with scaled logits z[0..n) (all kept) to `best`, pruning by the bounds above.

void draw_group(const uint32_t* tok, const float* z, int n, Noise nz, Best& best) {
  float u[kGroup], ex[kGroup];
  uniforms(tok, n, nz, u);
  const float ref = best.key;  // a lower bound of the final best; fixed for the group so this vectorises
  exp_shifted(z, n, ref, ex);
  for (int l = 0; l < n; ++l) {
    if (1.0f - u[l] > ex[l]) continue;  // g <= -log(1-u) < ref - z - eps: cannot reach ref
    best.offer(z[l] + gumbel_of(u[l]), tok[l]);
  }
}

// Draws from a list of kept tokens; the first maximum (always kept) seeds the bound. Returns the index.
int64_t draw_list(const std::vector<Cand>& kept, int64_t seed_pos, Noise nz) {
  Best best;
  best.offer(exact_key(kept[seed_pos].z, uint32_t(kept[seed_pos].idx), nz), kept[seed_pos].idx);
  uint32_t tok[kSub];
  float z[kSub];
  const int64_t n = int64_t(kept.size());
  for (int64_t g0 = 0; g0 < n; g0 += kSub) {
    const float lim = best.key - kGumbelMax - kEps;
    int cnt = 0;
    const int64_t g1 = std::min(n, g0 + kSub);
    for (int64_t i = g0; i < g1; ++i) {
      tok[cnt] = uint32_t(kept[i].idx);
      z[cnt] = kept[i].z;
      cnt += kept[i].z >= lim;
    }
    if (cnt) draw_group(tok, z, cnt, nz, best);
  }
  return best.idx;
}

// Exact z = (s - m) / T for n tokens (vectorised division).
PT_HOT void z_block(const float* __restrict x, int64_t n, float m, float t, float* __restrict z) {
  for (int64_t j = 0; j < n; ++j) z[j] = z_of(x[j], m, t);
}

namespace simd {  // vector code for NV registers per vector; compiled once per target in targets.h

// Best key over every finite token in [lo, hi) (the no-filter case), seeded with the key of token seed_idx
// (the row's first maximum, wherever it lies: the bound it gives holds for every chunk of the row).
template <int NV>
PT_INLINE Best draw_chunk(const float* s, const float* bm, int64_t lo, int64_t hi, int64_t seed_idx, float m,
                       float t, Noise nz) {
  Best best;
  const float zseed = z_of(s[seed_idx], m, t);
  if (!(zseed > kNegInf)) return best;
  best.offer(exact_key(zseed, uint32_t(seed_idx), nz), seed_idx);
  const float inv_t = std::min(1.0f / t, FLT_MAX);
  uint32_t tok[kGroup];
  float sv[kGroup], zz[kGroup];
  int cnt = 0;
  float lim = best.key - kGumbelMax - kEps;
  // The scan compares an approximate z (a multiplication instead of the division) against lim lowered by
  // a margin far above its rounding error (|z| < 20 near lim); the survivors get the exact z.
  auto flush = [&]() {
    z_block(sv, cnt, m, t, zz);
    draw_group(tok, zz, cnt, nz, best);
    cnt = 0;
    lim = best.key - kGumbelMax - kEps;
  };
  auto lim_c = [&]() { return lim - 1e-3f; };
  for_each_sub_at_least<NV>(bm, lo / kSub, padded(hi) / kSub, m, inv_t, lim_c, [&](int64_t b) {
    const int64_t sb = b * kSub;
    for (uint64_t bits = hits_at_least<NV>(s + sb, m, inv_t, lim_c()); bits; bits &= bits - 1) {
      const int64_t j = sb + __builtin_ctzll(bits);
      tok[cnt] = uint32_t(j);
      sv[cnt++] = s[j];
    }
    if (cnt > kGroup - kSub) flush();
  });
  if (cnt) flush();
  return best;
}

}  // namespace simd

}  // namespace
}  // namespace proxytune_cpu
