// The op's driver: per row (or per chunk of a long row) the combination, the sums, the filters and the
// draw, in parallel over rows or chunks; the argument checks; combine_cpu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <tuple>

#include "targets.h"

namespace proxytune_cpu {
namespace {

// Everything after pass 2 for a sampled row whose kept set is bounded by a filter. Returns false when no
// filter bounds it (top_k, top_p, min_p all off): the caller then draws over the whole row.
bool finish_filtered(const float* s, const float* bm, int64_t V, float m, const RowParams& rp, double S_all,
                     const double* ladder, Scratch& sc, int64_t* token, float* logprob) {
  const int64_t nsub = (V + kSub - 1) / kSub;
  if (!has_filter(rp, V)) return false;
  const bool k_on = rp.k > 0 && rp.k < V;
  const bool p_on = !(rp.p >= 1.0f);
  const bool mp_on = !(rp.min_p <= 0.0f);

  float c_lo = kNegInf;
  if (k_on) {
    if (rp.k <= nsub) {  // the k-th largest sub-block maximum is <= the k-th largest z
      sc.bmz.resize(nsub);
      for (int64_t b = 0; b < nsub; ++b) sc.bmz[b] = z_of(bm[b], m, rp.t);
      std::nth_element(sc.bmz.begin(), sc.bmz.begin() + (rp.k - 1), sc.bmz.end(), std::greater<float>());
      c_lo = sc.bmz[rp.k - 1];
    }
  } else if (p_on) {
    if (!(rp.p > 0.0f)) {
      c_lo = 0.0f;
    } else {
      const double target = double(rp.p) * S_all * (1.0 + 1e-4);
      for (int i = 0; i < kLadder; ++i)
        if (ladder[i] >= target) {
          c_lo = kLadderZ[i];
          break;
        }
    }
  }
  if (mp_on && !(k_on && p_on)) {  // with top-k and top-p both on, S over the top-k set needs all of it
    const float cm = (rp.min_p >= 1.0f || rp.min_p != rp.min_p) ? 0.0f : float(std::log(double(rp.min_p)) - 1e-3);
    c_lo = std::max(c_lo, cm);
  }

  for (int attempt = 0; attempt < 2; ++attempt) {
    if (attempt == 1) {
      if (!(c_lo > kNegInf)) break;  // already exhaustive
      c_lo = kNegInf;
    }
    collect(s, bm, V, m, rp.t, c_lo, sc.C);
    const bool exhaustive = !(c_lo > kNegInf);
    std::vector<Cand>& C = sc.C;
    if (C.empty()) break;  // cannot happen for a row with a finite maximum
    float thr = kNegInf;
    double SK = S_all;
    bool k_inside = false;  // the whole top-k set K lies in C
    if (k_on) {
      if (int64_t(C.size()) >= rp.k) {
        std::nth_element(C.begin(), C.begin() + (rp.k - 1), C.end(), by_z_desc);
        thr = C[rp.k - 1].z;
        k_inside = true;
      } else {
        k_inside = exhaustive;  // C is every finite token: fewer than k of them, K = all
        if (!exhaustive && p_on) continue;
      }
      if (p_on && thr > kNegInf) {
        double acc = 0.0;
        for (const Cand& c : C)
          if (c.z >= thr) acc += exp_approx(c.z);
        SK = acc;
      }
    }
    if (p_on) {
      float cut;
      if (!(rp.p > 0.0f)) {
        cut = std::numeric_limits<float>::infinity();  // p <= 0 or NaN: only the first maximum survives
      } else {
        sc.D.clear();
        for (const Cand& c : C)
          if (c.z >= thr) sc.D.push_back(c);
        if (!nucleus_cut(sc.D, SK, rp.p, &cut, sc)) {
          if (!(k_inside || exhaustive)) continue;  // the cut lies below C: widen
          cut = kNegInf;
        }
      }
      thr = std::max(thr, cut);
    }
    // The kept set, and the first maximum (lowest index with z == 0), which is always kept.
    sc.kept.clear();
    int64_t first_max = -1, first_pos = -1;
    for (const Cand& c : C) {
      if (c.z >= 0.0f && (first_max < 0 || c.idx < first_max)) first_max = c.idx;
      if (c.z >= thr && (!mp_on || std::exp(c.z) >= rp.min_p)) sc.kept.push_back(c);
    }
    for (size_t i = 0; i < sc.kept.size(); ++i)
      if (sc.kept[i].idx == first_max) first_pos = int64_t(i);
    if (first_pos < 0) {
      sc.kept.push_back(Cand{z_of(s[first_max], m, rp.t), int32_t(first_max)});
      first_pos = int64_t(sc.kept.size()) - 1;
    }
    const int64_t tok = draw_list(sc.kept, first_pos, rp.nz);
    *token = tok;
    *logprob = 0.0f;
    if (!rp.logprobs) return true;
    double sum = 0.0;
    float ztok = 0.0f;
    for (const Cand& c : sc.kept) {
      sum += exp_approx(c.z);
      if (c.idx == tok) ztok = c.z;
    }
    *logprob = ztok - float(std::log(sum));
    return true;
  }
  // Unreachable in practice; keep the contract anyway.
  *token = 0;
  *logprob = std::numeric_limits<float>::quiet_NaN();
  return true;
}

struct RowState {
  float m = kNegInf;
  int64_t first = 0;
  bool greedy = false, done = false;
  double S = 0.0;
  double ladder[kLadder] = {0};
  RowParams rp;
};

// Each thread's buffers, reused across rows and calls: the row scratch s (padded to whole sub-blocks), the
// sub-block maxima (kSub floats longer: see for_each_sub_at_least) and the filter stage's scratch. A
// worker's hold one row at a time; the calling thread's hold every row when long rows are split in chunks.
struct ThreadBuffers {
  std::vector<float> s, sub_max;
  Scratch filter;
  void reserve(int64_t n_s, int64_t n_sub) {
    if (int64_t(s.size()) < n_s) s.resize(n_s);
    if (int64_t(sub_max.size()) < n_sub + kSub) sub_max.resize(n_sub + kSub);
  }
};
ThreadBuffers& thread_buffers() {
  thread_local ThreadBuffers buffers;
  return buffers;
}

// The tail of every row, whichever path computed its s, S and ladder. A row with no finite s -> token 0 and
// a NaN log-probability; a greedy row -> its first maximum, log-probability 0. Returns false for a row to
// sample. (Without log-probabilities a sampled row writes 0 too: the NaN still marks a fully masked row.)
inline bool finish_unsampled(const RowState& R, int64_t* token, float* logprob) {
  if (!(R.m > kNegInf)) {
    *token = 0;
    *logprob = std::numeric_limits<float>::quiet_NaN();
    return true;
  }
  if (R.greedy) {
    *token = R.first;
    *logprob = 0.0f;
    return true;
  }
  return false;
}

// A sampled row: the filters and the draw over their kept set, or, without filters, the draw over every
// finite token (draw_all() returns its best key) and log p = z - log S.
template <typename DrawAll>
void finish_sampled(const float* s, const float* bm, int64_t V, const RowState& R, Scratch& sc, DrawAll&& draw_all,
                    int64_t* token, float* logprob) {
  if (finish_filtered(s, bm, V, R.m, R.rp, R.S, R.ladder, sc, token, logprob)) return;
  const Best best = draw_all();
  const int64_t tok = best.idx >= 0 ? best.idx : R.first;  // the first maximum always has a key
  *token = tok;
  *logprob = R.rp.logprobs ? z_of(s[tok], R.m, R.rp.t) - float(std::log(R.S)) : 0.0f;
}

int dtype_code(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return kF32;
}

at::Tensor unit_stride(const at::Tensor& x, const char* name, int64_t batch, int64_t V) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == batch && x.size(1) >= V, name, " must be [", batch, ", >=", V,
              "], got ", x.sizes());
  return x.stride(1) == 1 ? x : x.contiguous();
}

struct Prepared {
  Inputs in;
  std::vector<at::Tensor> keep_alive;
};

Prepared prepare(const at::Tensor& base, at::TensorList experts, at::TensorList anti_experts,
                 const at::Tensor& weights, int64_t V) {
  TORCH_CHECK(base.dim() == 2, "base must be [B, V]");
  TORCH_CHECK(experts.size() == anti_experts.size(), "experts and anti_experts must pair up");
  TORCH_CHECK(V >= 1, "vocab_size must be >= 1");
  TORCH_CHECK(V < (int64_t(1) << 31), "vocab_size must be < 2^31");
  Prepared pr;
  Inputs& in = pr.in;
  in.batch = base.size(0);
  in.vocab = V;
  in.n_pairs = int64_t(experts.size());
  at::Tensor b = unit_stride(base, "base", in.batch, V);
  pr.keep_alive.push_back(b);
  in.base = b.data_ptr();
  in.base_stride = b.stride(0);
  in.base_dt = dtype_code(b, "base");
  for (size_t i = 0; i < experts.size(); ++i) {
    at::Tensor e = unit_stride(experts[i], "experts[i]", in.batch, V);
    at::Tensor a = unit_stride(anti_experts[i], "anti_experts[i]", in.batch, V);
    pr.keep_alive.push_back(e);
    pr.keep_alive.push_back(a);
    in.ex.push_back(e.data_ptr());
    in.an.push_back(a.data_ptr());
    in.ex_stride.push_back(e.stride(0));
    in.an_stride.push_back(a.stride(0));
    in.ex_dt.push_back(dtype_code(e, "experts[i]"));
    in.an_dt.push_back(dtype_code(a, "anti_experts[i]"));
  }
  TORCH_CHECK(weights.device().is_cpu(), "weights must be a CPU tensor");
  at::Tensor w = weights.scalar_type() == at::kFloat && weights.is_contiguous() ? weights
                                                                                 : weights.to(at::kFloat).contiguous();
  TORCH_CHECK(w.numel() == in.n_pairs * in.batch, "weights must be [P, B]");
  pr.keep_alive.push_back(w);
  in.weights = w.data_ptr<float>();
  return pr;
}

at::Tensor per_row(const at::Tensor& x, at::ScalarType dt, int64_t batch, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.numel() == batch, name, " must have B = ", batch, " entries");
  if (x.scalar_type() == dt && x.is_contiguous()) return x;  // the usual case, free
  return x.to(dt).contiguous();
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& base, at::TensorList experts,
                                              at::TensorList anti_experts, const at::Tensor& weights,
                                              const at::Tensor& temperature, const at::Tensor& top_k,
                                              const at::Tensor& top_p, const at::Tensor& min_p,
                                              const at::Tensor& seed, const at::Tensor& step, int64_t vocab_size,
                                              int64_t filters, bool want_logprobs) {
  Prepared pr = prepare(base, experts, anti_experts, weights, vocab_size);
  const Inputs& in = pr.in;
  const int64_t B = in.batch, V = in.vocab, nsub = (V + kSub - 1) / kSub, Vp = nsub * kSub;
  at::Tensor T = per_row(temperature, at::kFloat, B, "temperature");
  at::Tensor K = per_row(top_k, at::kLong, B, "top_k");
  at::Tensor P = per_row(top_p, at::kFloat, B, "top_p");
  at::Tensor MP = per_row(min_p, at::kFloat, B, "min_p");
  at::Tensor SD = per_row(seed, at::kLong, B, "seed");
  at::Tensor ST = per_row(step, at::kLong, B, "step");
  at::Tensor tokens = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, at::TensorOptions().dtype(at::kFloat));
  if (B == 0) return {tokens, logprobs};
  int64_t* tok_out = tokens.data_ptr<int64_t>();
  float* lp_out = logprobs.data_ptr<float>();

  std::vector<RowState> rows(B);
  for (int64_t r = 0; r < B; ++r) {
    RowParams& rp = rows[r].rp;
    rp.t = T.data_ptr<float>()[r];
    rp.p = P.data_ptr<float>()[r];
    rp.min_p = MP.data_ptr<float>()[r];
    rp.k = K.data_ptr<int64_t>()[r];
    if (!(filters & kTopKBit)) rp.k = 0;  // compiled out on the host's word: off in every row
    if (!(filters & kTopPBit)) rp.p = 1.0f;
    if (!(filters & kMinPBit)) rp.min_p = 0.0f;
    rp.logprobs = want_logprobs;
    const uint64_t sd = uint64_t(SD.data_ptr<int64_t>()[r]), st = uint64_t(ST.data_ptr<int64_t>()[r]);
    rp.nz = Noise{uint32_t(sd), uint32_t(sd >> 32), uint32_t(st), uint32_t(st >> 32)};
    rows[r].greedy = !(rp.t > 0.0f);
  }

  const int64_t threads = at::get_num_threads();
  int64_t chunks = 1;
  if (B < threads) chunks = std::max<int64_t>(1, std::min<int64_t>((threads + B - 1) / B, V / 16384));

  if (chunks == 1) {
    // One row per task: the row's scratch stays in this thread's cache.
    at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
      ThreadBuffers& buf = thread_buffers();
      buf.reserve(Vp, nsub);
      float* s = buf.s.data();
      float* bm = buf.sub_max.data();
      for (int64_t r = r0; r < r1; ++r) {
        RowState& R = rows[r];
        const RowParams& rp = R.rp;
        combine_chunk(in, r, 0, V, s, bm, &R.m, &R.first);
        if (finish_unsampled(R, &tok_out[r], &lp_out[r])) continue;
        if (needs_sum(rp)) scale_chunk(s, bm, 0, V, R.m, rp.t, has_ladder(rp, V), &R.S, R.ladder);
        finish_sampled(s, bm, V, R, buf.filter, [&]() { return draw_chunk(s, bm, 0, V, R.first, R.m, rp.t, rp.nz); },
                       &tok_out[r], &lp_out[r]);
      }
    });
    return {tokens, logprobs};
  }

  // Few long rows: split each row into `chunks` pieces for the streaming passes and the draw.
  ThreadBuffers& buf = thread_buffers();
  buf.reserve(B * Vp, B * nsub);
  float* const s_all = buf.s.data();
  float* const bm_all = buf.sub_max.data();
  const int64_t per = ((V + chunks - 1) / chunks + kSub - 1) / kSub * kSub;
  const int64_t items = B * chunks;
  std::vector<float> cmax(items);
  std::vector<int64_t> cidx(items);
  std::vector<double> cS(items), cL(items * kLadder);
  std::vector<Best> cbest(items);
  auto range = [&](int64_t c, int64_t* lo, int64_t* hi) {
    *lo = std::min(V, c * per);
    *hi = std::min(V, *lo + per);
  };
  // Phase A, per chunk: s and the chunk maximum.
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r = it / chunks;
      int64_t lo, hi;
      range(it % chunks, &lo, &hi);
      cmax[it] = kNegInf;
      cidx[it] = lo;
      if (lo < hi) combine_chunk(in, r, lo, hi, s_all + r * Vp, bm_all + r * nsub, &cmax[it], &cidx[it]);
    }
  });
  // The row maxima (the first index of the first maximum), greedy and fully masked rows.
  for (int64_t r = 0; r < B; ++r) {
    RowState& R = rows[r];
    for (int64_t c = 0; c < chunks; ++c)
      if (cmax[r * chunks + c] > R.m) {
        R.m = cmax[r * chunks + c];
        R.first = cidx[r * chunks + c];
      }
    R.done = finish_unsampled(R, &tok_out[r], &lp_out[r]);
  }
  // Phase B, per chunk: S and the ladder relative to the row maximum (so the ladder is exact, as for a
  // whole row), and for a row without filters its draw (seeded with the row maximum's key).
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r = it / chunks;
      const RowState& R = rows[r];
      cS[it] = 0.0;
      for (int i = 0; i < kLadder; ++i) cL[it * kLadder + i] = 0.0;
      cbest[it] = Best();
      int64_t lo, hi;
      range(it % chunks, &lo, &hi);
      if (R.done || lo >= hi || !(cmax[it] > kNegInf)) continue;
      const float* s = s_all + r * Vp;
      const float* bm = bm_all + r * nsub;
      if (needs_sum(R.rp)) scale_chunk(s, bm, lo, hi, R.m, R.rp.t, has_ladder(R.rp, V), &cS[it], &cL[it * kLadder]);
      if (!has_filter(R.rp, V)) cbest[it] = draw_chunk(s, bm, lo, hi, R.first, R.m, R.rp.t, R.rp.nz);
    }
  });
  for (int64_t r = 0; r < B; ++r) {  // B < threads here: the filters run on the calling thread
    RowState& R = rows[r];
    if (R.done) continue;
    for (int64_t c = 0; c < chunks; ++c) {
      R.S += cS[r * chunks + c];
      for (int i = 0; i < kLadder; ++i) R.ladder[i] += cL[(r * chunks + c) * kLadder + i];
    }
    auto best_of_chunks = [&]() {
      Best best;
      for (int64_t c = 0; c < chunks; ++c)
        if (cbest[r * chunks + c].idx >= 0) best.offer(cbest[r * chunks + c].key, cbest[r * chunks + c].idx);
      return best;
    };
    finish_sampled(s_all + r * Vp, bm_all + r * nsub, V, R, buf.filter, best_of_chunks, &tok_out[r], &lp_out[r]);
  }
  return {tokens, logprobs};
}

at::Tensor combine_cpu(const at::Tensor& base, at::TensorList experts, at::TensorList anti_experts,
                       const at::Tensor& weights, int64_t vocab_size) {
  Prepared pr = prepare(base, experts, anti_experts, weights, vocab_size);
  const Inputs& in = pr.in;
  const int64_t B = in.batch, V = in.vocab;
  at::Tensor out = at::empty({B, V}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t nblk = (V + kBlock - 1) / kBlock;
  at::parallel_for(0, B * nblk, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r = it / nblk, b0 = (it % nblk) * kBlock, n = std::min(kBlock, V - b0);
      float bm[kBlock / kSub];  // the block maxima the sampler keeps; unused here
      combine_block(in, r, b0, n, o + r * V + b0, bm);
    }
  });
  return out;
}

}  // namespace
}  // namespace proxytune_cpu
