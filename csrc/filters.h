// What the filters stand on: S and the ladder of masses (simd::scale_chunk, or the exact scalar loop for
// extreme temperatures), the candidate scan (simd::collect) and the exact top-p cut (nucleus_cut).
#pragma once

#include "vectors.h"

namespace proxytune_cpu {
namespace {

// S and the ladder with the exact z = (s - M) / T, one token at a time, for the temperatures whose product
// form fails (unvalidated input or extreme values, never a hot path): T = +inf, where c = 0 would give
// NaN = -inf * 0 for masked tokens (every live z is 0 there; an overflowed s - M gives NaN, masked), and
// T < 4.2e-39, where log2(e) / T overflows and clamping it would collapse the spread of z in a row on the
// scale of T (subnormal logits).
void scale_chunk_exact(const float* s, int64_t lo, int64_t hi, float M, float t, bool with_ladder, double* S,
                       double* ladder) {
  double sum = 0.0, lad[kLadder] = {0};
  for (int64_t j = lo; j < hi; ++j) {
    const float z = z_of(s[j], M, t);
    if (!(z > kNegInf)) continue;
    const double e = std::exp(double(z));
    sum += e;
    for (int i = 0; i < kLadder; ++i) lad[i] += z >= kLadderZ[i] ? e : 0.0;
  }
  *S += sum;
  if (with_ladder)
    for (int i = 0; i < kLadder; ++i) ladder[i] += lad[i];
}

namespace simd {  // vector code for NV registers per vector; compiled once per target in targets.h

// 2^x for x <= ~0.5, within 2.2e-7 relative; at or below -125 (and for -inf) 2^-125 instead of ~0, which
// no sum here can notice (every S includes its maximum's 1). n = round(x) rides in the low mantissa bits of
// x + 1.5 * 2^23, and shifting them into the exponent field scales the polynomial by 2^n (a normal number:
// n >= -125).
template <int NV>
PT_INLINE PT_CONTRACT Vec<NV> exp2_neg(Vec<NV> x) {
  using f = typename Vec<NV>::f;
  using u = typename Vec<NV>::u;
  PT_EACH {
    const f lo = f{} - 125.0f;
    const f xc = lo > x.p[i_] ? lo : x.p[i_];  // this operand order compiles to one max instruction
    const f shifted = xc + 12582912.0f;
    const f r = xc - (shifted - 12582912.0f);  // [-0.5, 0.5]
    f p = f{} + 1.3276445e-3f;  // 2^r, degree 5, near-minimax for relative error (2.2e-7 in fp32 with FMA)
    p = p * r + 9.6755372e-3f;
    p = p * r + 5.5507135e-2f;
    p = p * r + 2.4022120e-1f;
    p = p * r + 6.9314694e-1f;
    p = p * r + 1.0000001f;
    x.p[i_] = (f)((u)p + ((u)shifted << 23));
  }
  return x;
}

// S = sum exp(zc) and the ladder masses (mass with zc >= rung) over [lo, hi), where zc = (s - M) / T is
// taken relative to the row maximum M (and multiplied by 1/T: these sums only steer the search, the exact
// z = (s - m) / T is computed wherever a decision depends on it). Reads s (whole sub-blocks: the padding is
// -inf), writes nothing. A rung above a sub-block's maximum gets nothing from it and is skipped. Vector
// accumulators flush into doubles every 32 sub-blocks. Temperatures where c = log2(e) / T is 0 or overflows
// go to scale_chunk_exact.
template <int NV>
PT_INLINE PT_CONTRACT void scale_chunk(const float* __restrict s, const float* __restrict bm, int64_t lo, int64_t hi,
                                    float M, float t, bool with_ladder, double* S, double* ladder) {
  static_assert(kSub == 4 * kW, "one sub-block is four vectors");
  const float c = kLog2e / t;
  if (!(c > 0.0f && c <= FLT_MAX)) return scale_chunk_exact(s, lo, hi, M, t, with_ladder, S, ladder);
  float rung[kLadder];
  for (int i = 0; i < kLadder; ++i) rung[i] = kLadderZ[i] * kLog2e;
  Vec<NV> acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  Vec<NV> la[kLadder] = {};
  double sum = 0.0, lad[kLadder] = {0};
  int pending = 0;
  auto flush = [&]() {
    sum += double(hsum(acc0)) + double(hsum(acc1)) + double(hsum(acc2)) + double(hsum(acc3));
    acc0 = acc1 = acc2 = acc3 = Vec<NV>{};
    for (int i = 0; i < kLadder; ++i) {
      lad[i] += double(hsum(la[i]));
      la[i] = Vec<NV>{};
    }
    pending = 0;
  };
  for (int64_t sb = lo; sb < hi; sb += kSub) {
    const float bmax = bm[sb / kSub];
    if (!(bmax > kNegInf)) continue;  // fully masked sub-block
    const float* __restrict xs = s + sb;
    const Vec<NV> x0 = (vload<NV>(xs) - M) * c, x1 = (vload<NV>(xs + kW) - M) * c;
    const Vec<NV> x2 = (vload<NV>(xs + 2 * kW) - M) * c, x3 = (vload<NV>(xs + 3 * kW) - M) * c;
    const Vec<NV> e0 = exp2_neg(x0), e1 = exp2_neg(x1), e2 = exp2_neg(x2), e3 = exp2_neg(x3);
    acc0 += e0;
    acc1 += e1;
    acc2 += e2;
    acc3 += e3;
    if (with_ladder) {
      const float xmax = (bmax - M) * c;
      for (int i = kLadder - 1; i >= 0 && rung[i] <= xmax; --i) {
        const Vec<NV> r = splat<NV>(rung[i]);
        la[i] += (where_at_least(x0, r, e0) + where_at_least(x1, r, e1)) +
                 (where_at_least(x2, r, e2) + where_at_least(x3, r, e3));
      }
    }
    if (++pending == 32) flush();
  }
  flush();
  *S += sum;
  if (with_ladder)
    for (int i = 0; i < kLadder; ++i) ladder[i] += lad[i];
}

}  // namespace simd

// q[i] = exp(D[i].z) / SK rounded to fp32 (the probability the nucleus cut accumulates), for n candidates.
PT_HOT void probs(const Cand* __restrict D, int64_t n, double SK, float* __restrict ex, float* __restrict q) {
  for (int64_t i = 0; i < n; ++i) ex[i] = D[i].z;
  for (int64_t i = 0; i < n; ++i) ex[i] = exp_approx(ex[i]);  // vectorised
  const double inv = 1.0 / SK;
  for (int64_t i = 0; i < n; ++i) q[i] = float(double(ex[i]) * inv);
}

// The top-p cut over D (the top-k survivors, or a value-prefix of them): returns true and the cut value
// (keep z >= cut) when the exclusive cumulative mass reaches p inside D; false when it never does.
bool nucleus_cut(std::vector<Cand>& D, double SK, float p, float* cut, Scratch& sc) {
  std::vector<int32_t>& bucket_of = sc.bucket_of;
  std::vector<Cand>& tmp = sc.tmp;
  const int64_t n = int64_t(D.size());
  const double inv = 1.0 / SK;  // q = exp(z) / SK in fp32, as probs() computes it
  auto q_of = [inv](float z) { return double(float(double(exp_approx(z)) * inv)); };
  if (n <= 512) {
    std::sort(D.begin(), D.end(), by_z_desc);
    double cum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (!(float(cum) < p)) {
        *cut = D[std::max<int64_t>(i, 1) - 1].z;
        return true;
      }
      cum += q_of(D[i].z);
    }
    if (n > 0 && !(float(cum) < p)) {  // the first token after D is where the mass reaches p
      *cut = D[n - 1].z;
      return true;
    }
    return false;
  }
  // Bucket by z (monotone, so ties share a bucket), find the bucket where the mass crosses p, sort it.
  const int kBuckets = int(std::min<int64_t>(4096, std::max<int64_t>(256, n)));  // ~1 candidate per bucket
  sc.q.resize(2 * n);
  probs(D.data(), n, SK, sc.q.data() + n, sc.q.data());
  float zlo = 0.0f;
  for (const Cand& c : D) zlo = std::min(zlo, c.z);
  zlo = std::max(zlo, -1000.0f);
  const float inv_w = zlo < 0.0f ? float(kBuckets) / -zlo : 0.0f;
  std::vector<double>& mass = sc.mass;
  std::vector<float>& minz = sc.minz;
  std::vector<int64_t>& count = sc.count;
  mass.assign(kBuckets, 0.0);
  minz.assign(kBuckets, std::numeric_limits<float>::infinity());
  count.assign(kBuckets, 0);
  bucket_of.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const float f = -D[i].z * inv_w;
    const int b = f < float(kBuckets - 1) ? int(f) : kBuckets - 1;
    bucket_of[i] = b;
    mass[b] += double(sc.q[i]);
    minz[b] = std::min(minz[b], D[i].z);
    count[b]++;
  }
  double cum = 0.0;
  float prev_z = 0.0f;  // the smallest z above the current bucket
  bool have_prev = false;
  for (int b = 0; b < kBuckets; ++b) {
    if (!count[b]) continue;
    if (float(cum + mass[b]) < p) {  // the whole bucket lies inside the nucleus
      cum += mass[b];
      prev_z = minz[b];
      have_prev = true;
      continue;
    }
    tmp.clear();
    for (int64_t i = 0; i < n; ++i)
      if (bucket_of[i] == b) tmp.push_back(D[i]);
    std::sort(tmp.begin(), tmp.end(), by_z_desc);
    for (const Cand& c : tmp) {
      if (!(float(cum) < p)) {
        *cut = have_prev ? prev_z : c.z;
        return true;
      }
      cum += q_of(c.z);
      prev_z = c.z;
      have_prev = true;
    }
  }
  if (have_prev && !(float(cum) < p)) {
    *cut = prev_z;
    return true;
  }
  return false;
}

namespace simd {  // vector code for NV registers per vector; compiled once per target in targets.h

// Collects C = {j : z_j >= c_lo} (every finite token when c_lo = -inf), skipping sub-blocks below c_lo.
template <int NV>
PT_INLINE void collect(const float* s, const float* bm, int64_t V, float m, float t, float c_lo, std::vector<Cand>& C) {
  C.clear();
  const int64_t nsub = (V + kSub - 1) / kSub;
  const float inv_t = std::min(1.0f / t, FLT_MAX);
  // Flag by the cheap (s - m) * inv_t >= c_lo - margin (a superset: the margin is far above the few ulps
  // between the product and the division), then keep by the exact z >= c_lo.
  const float lim = c_lo > kNegInf ? c_lo - (1e-3f + 1e-5f * std::fabs(c_lo)) : kNegInf;
  for_each_sub_at_least<NV>(bm, 0, nsub, m, inv_t, [lim]() { return lim; }, [&](int64_t b) {
    const int64_t j0 = b * kSub;
    for (uint64_t bits = hits_at_least<NV>(s + j0, m, inv_t, lim); bits; bits &= bits - 1) {
      const int64_t j = j0 + __builtin_ctzll(bits);
      const float z = z_of(s[j], m, t);
      if (z > kNegInf && z >= c_lo) C.push_back(Cand{z, int32_t(j)});
    }
  });
}

}  // namespace simd

}  // namespace
}  // namespace proxytune_cpu
