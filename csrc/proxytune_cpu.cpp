// The proxy-tuning sampling op for CPU tensors: `proxytune::sample` and `proxytune::combine`.
//
// Computes exactly the function of proxytune/reference.py (docs/semantics.md): the same fp32 combination
// (built with -ffp-contract=off so no multiply-add is fused), the same Philox-4x32-10 uniforms, filters and
// tie rules, Gumbel-max over the kept set. Only exp/log may differ from torch's by an ulp, and sums are
// accumulated in a different order (see "Floating point across backends" in the semantics page).
//
// Per row (or per chunk of a long row):
//   stream  s = base + sum_i w_i (e_i - a_i) in fp32, in one sweep per 64-token sub-block (loads,
//           combination, masking, store, maximum), into a row scratch buffer padded with -inf to whole
//           sub-blocks; then S = sum exp(zc) and the mass above a ladder of thresholds, with
//           zc = (s - m) / T relative to the row maximum m. These sums use a 2^x polynomial that may
//           contract into FMAs (2.2e-7 relative); nothing else is contracted.
//   select  a value threshold c_lo that provably bounds the kept set (top-k: the k-th largest sub-block
//           maximum; top-p: the highest ladder rung holding mass >= p; min-p: ln(min_p)); the candidates
//           C = {z >= c_lo}, with the exact z = (s - m) / T (a cheap product flags a superset of the
//           sub-blocks, 64 per vector sweep, then of their tokens; only the flags are walked), are filtered
//           exactly: nth_element for top-k, a bucketed scan plus a sort of the boundary bucket for top-p.
//           When C turns out not to decide the row (rounding, flat rows) it becomes every finite token:
//           exact, only slower.
//   draw    argmax over kept j of z_j + g_j. Noise is computed only where it can matter: a token with
//           z_j < best - max(g) - eps cannot win, and one with 1 - u_j > exp(z_j - best + eps) cannot
//           either (g(u) <= -log(1 - u)); only the rest get the two logs. Exact, and with top_p = 1 it
//           touches a fraction of the vocabulary.
// Rows run in parallel (one row per task, scratch in that thread's cache); when the batch is smaller than
// the thread count, long rows are split into chunks: s and the chunk maxima in one parallel phase, then
// the sums relative to the row maximum and the no-filter draw (seeded with the row maximum's key, so every
// chunk prunes as tightly as the row allows) in a second; the filters run on the calling thread.
//
// Files (one translation unit; each header holds one part and includes what it stands on):
//   common.h   constants, dtypes, scalar exp and z, inputs, row parameters, keys, scratch, build macros
//   vectors.h  the 16-lane vectors (1, 2 or 4 registers) and the flag scans
//   combine.h  s = base + sum_i w_i (e_i - a_i) and the sub-block maxima
//   draw.h     Philox, Gumbel keys, the pruned argmax draw
//   filters.h  S and the ladder, the candidate scan, the top-p cut
//   targets.h  the vector code compiled per target, picked at load time
//   driver.h   sample_cpu / combine_cpu: rows, chunks, threads, checks
//   this file  the op registrations (CPU, Meta) and the Python bindings

#include <torch/extension.h>
#include <torch/library.h>

#include "driver.h"

TORCH_LIBRARY(proxytune, m) {
  m.def(
      "sample(Tensor base, Tensor[] experts, Tensor[] anti_experts, Tensor weights, Tensor temperature, "
      "Tensor top_k, Tensor top_p, Tensor min_p, Tensor seed, Tensor step, int vocab_size, int filters=7, "
      "bool logprobs=True) -> (Tensor, Tensor)");
  m.def("combine(Tensor base, Tensor[] experts, Tensor[] anti_experts, Tensor weights, int vocab_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(proxytune, CPU, m) {
  m.impl("sample", &proxytune_cpu::sample_cpu);
  m.impl("combine", &proxytune_cpu::combine_cpu);
}

// Shapes and dtypes only, on the meta device: what FakeTensor runs when torch.compile (or torch.export)
// traces through the ops, so a graph that calls them compiles without running them. The outputs are those
// of the CPU kernels: tokens int64 [B] and log-probabilities fp32 [B]; combine fp32 [B, vocab_size].
// `filters` (bits: 1 top-k, 2 top-p, 4 min-p) are the filters some row may use: a clear bit turns that filter
// off in every row. `logprobs=false` computes no log-probability: the second output is then NaN for a row
// with no finite combined logit and 0 for every other row.
namespace proxytune_cpu {
namespace {
std::tuple<at::Tensor, at::Tensor> sample_meta(const at::Tensor& base, at::TensorList experts,
                                               at::TensorList anti_experts, const at::Tensor& weights,
                                               const at::Tensor& temperature, const at::Tensor& top_k,
                                               const at::Tensor& top_p, const at::Tensor& min_p,
                                               const at::Tensor& seed, const at::Tensor& step, int64_t vocab_size,
                                               int64_t filters, bool logprobs) {
  TORCH_CHECK(base.dim() == 2, "base must be [B, V]");
  TORCH_CHECK(experts.size() == anti_experts.size(), "experts and anti_experts must pair up");
  TORCH_CHECK(vocab_size >= 1, "vocab_size must be >= 1");
  return {at::empty_symint({base.sym_size(0)}, base.options().dtype(at::kLong)),
          at::empty_symint({base.sym_size(0)}, base.options().dtype(at::kFloat))};
}
at::Tensor combine_meta(const at::Tensor& base, at::TensorList experts, at::TensorList anti_experts,
                        const at::Tensor& weights, int64_t vocab_size) {
  TORCH_CHECK(base.dim() == 2, "base must be [B, V]");
  TORCH_CHECK(experts.size() == anti_experts.size(), "experts and anti_experts must pair up");
  TORCH_CHECK(vocab_size >= 1, "vocab_size must be >= 1");
  return at::empty_symint({base.sym_size(0), c10::SymInt(vocab_size)}, base.options().dtype(at::kFloat));
}
}  // namespace
}  // namespace proxytune_cpu

TORCH_LIBRARY_IMPL(proxytune, Meta, m) {
  m.impl("sample", &proxytune_cpu::sample_meta);
  m.impl("combine", &proxytune_cpu::combine_meta);
}

// `import proxytune._C` loads this library, registering the ops above, and binds the same two functions for
// direct calls from Python: proxytune's own backend skips the dispatcher's boxing of eleven arguments
// (2.3 us of 4.7 per call measured at B=1, V=64). Both take CPU tensors and release the GIL.
PYBIND11_MODULE(_C, m) {
  m.doc() = "proxytune C++ CPU ops (also registered as torch.ops.proxytune.sample / combine)";
  m.def(
      "sample",
      [](const at::Tensor& base, const std::vector<at::Tensor>& experts, const std::vector<at::Tensor>& anti_experts,
         const at::Tensor& weights, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
         const at::Tensor& min_p, const at::Tensor& seed, const at::Tensor& step, int64_t vocab_size, int64_t filters,
         bool logprobs) {
        pybind11::gil_scoped_release no_gil;
        return proxytune_cpu::sample_cpu(base, experts, anti_experts, weights, temperature, top_k, top_p, min_p, seed,
                                         step, vocab_size, filters, logprobs);
      },
      pybind11::arg("base"), pybind11::arg("experts"), pybind11::arg("anti_experts"), pybind11::arg("weights"),
      pybind11::arg("temperature"), pybind11::arg("top_k"), pybind11::arg("top_p"), pybind11::arg("min_p"),
      pybind11::arg("seed"), pybind11::arg("step"), pybind11::arg("vocab_size"),
      pybind11::arg("filters") = proxytune_cpu::kAllFilters, pybind11::arg("logprobs") = true);
  m.def("target", []() { return std::string(proxytune_cpu::hot().target); },
        "what the vector code running here was compiled for (the installed build picks it at load time)");
  m.def("combine", [](const at::Tensor& base, const std::vector<at::Tensor>& experts,
                      const std::vector<at::Tensor>& anti_experts, const at::Tensor& weights, int64_t vocab_size) {
    pybind11::gil_scoped_release no_gil;
    return proxytune_cpu::combine_cpu(base, experts, anti_experts, weights, vocab_size);
  });
}
