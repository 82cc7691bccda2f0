"""The reference implementation of the proxy-tuning sampling op: the specification every backend meets.

Short and obvious on purpose; ``docs/semantics.md`` states the same function in prose. Inputs here are
already normalised by :mod:`proxytune._args` (parameters are ``[B]`` tensors on the logits' device), so the
functions below only compute. Math is fp32 by default; ``compute_dtype=torch.float64`` is for tests.

Host syncs: :func:`sample_reference` calls ``nonzero`` (one sync) to draw noise only for kept tokens.
"""

from __future__ import annotations

from typing import Sequence

import torch

from proxytune.noise import gumbel

__all__ = ["combine_reference", "keep_mask_reference", "filtered_logprobs_reference", "sample_reference"]


def combine_reference(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    anti_experts: Sequence[torch.Tensor],
    weights: torch.Tensor,
    vocab_size: int,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``s = base + sum_i w_i * (expert_i - anti_i)`` over the first ``vocab_size`` columns.

    ``weights`` is ``[n_pairs, B]``. Terms are added left to right in ``compute_dtype``. Every entry that is
    not finite (a token some model masks with -inf, NaN, +inf, overflow) becomes -inf: masked.
    Returns ``[B, vocab_size]`` in ``compute_dtype``.
    """
    s = base[:, :vocab_size].to(compute_dtype)
    for i, (expert, anti) in enumerate(zip(experts, anti_experts)):
        diff = expert[:, :vocab_size].to(compute_dtype) - anti[:, :vocab_size].to(compute_dtype)
        s = s + weights[i].to(compute_dtype)[:, None] * diff
    return torch.where(torch.isfinite(s), s, float("-inf"))


def keep_mask_reference(
    s: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, then top-k, then top-p, then min-p (the Hugging Face order) on combined logits.

    Parameters are ``[B]`` tensors. Returns ``(z, keep)``: ``z = (s - max s) / T`` (``[B, V]``, max 0) and
    the bool keep-set ``[B, V]``. The first maximal token is always kept, so no row's set is empty unless
    the whole row is masked. Rows with ``T <= 0`` (greedy) get the plain keep-set; the sampler ignores it.
    """
    m = s.amax(dim=1, keepdim=True)
    t = torch.where(temperature > 0, temperature, 1.0).to(s.dtype)[:, None]
    z = torch.where(torch.isfinite(s), (s - m) / t, float("-inf"))  # never NaN; the maximum is exactly 0
    finite = torch.isfinite(z)  # a logit that underflows to -inf after scaling has probability 0
    vocab = s.shape[1]
    z_sorted, _ = z.sort(dim=1, descending=True)
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)

    # top-k: keep z_j >= the k-th largest value (ties at the boundary kept). k <= 0 disables.
    k = top_k.clamp(0, vocab)[:, None]
    kth = torch.where(k > 0, z_sorted.gather(1, (k - 1).clamp(min=0)), neg_inf)
    keep = finite & (z >= kth)

    # top-p over the top-k survivors: keep j iff the probability mass of tokens strictly above z_j is < p.
    # The kept set is a prefix of the sorted row closed under ties, cut at the last position whose
    # exclusive cumulative mass is < p. p >= 1 disables (the cumulative sum may round up to 1 early).
    q_sorted = torch.softmax(torch.where(z_sorted >= kth, z_sorted, neg_inf), dim=1)
    mass_above = torch.nn.functional.pad(torch.cumsum(q_sorted, dim=1)[:, :-1], (1, 0))
    n_nucleus = (mass_above < top_p.to(s.dtype)[:, None]).sum(dim=1, keepdim=True)  # 0 only if p <= 0 or NaN
    cut = torch.where(n_nucleus > 0, z_sorted.gather(1, (n_nucleus - 1).clamp(min=0)), float("inf"))
    keep &= (z >= cut) | (top_p >= 1)[:, None]

    # min-p: keep q_j >= min_p * max q, i.e. exp(z_j) >= min_p since max z = 0.
    keep &= torch.exp(z) >= min_p.to(s.dtype)[:, None]

    # Whatever the parameters (even unvalidated ones), the first maximal token stays.
    first_max = torch.arange(vocab, device=s.device) == z.argmax(dim=1, keepdim=True)
    keep |= finite & first_max
    return z, keep


def filtered_logprobs_reference(
    s: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    *, filtered: bool = True,
) -> torch.Tensor:  # fmt: skip
    """The log-probabilities of the op's final distribution over combined logits ``s`` ``[N, V]``: the
    distribution :func:`sample_reference` draws from (its log-probability of the drawn token is this one's at
    that token), whole, for speculative verification (``proxytune.speculative``).

    Returns ``[N, V]`` in the dtype of ``s``: ``z_j - log sum_{i in K*} exp(z_i)`` on the kept set ``K*`` of
    :func:`keep_mask_reference`, -inf elsewhere; a greedy row (``T <= 0``) is the point mass on its first maximal
    ``s`` (0 there, -inf elsewhere); a fully masked row is all -inf. ``filtered=False`` is the caller's promise,
    known on the host, that no sampled row turns a filter on: the sort-based filters are skipped (the kept set
    is then every finite ``z``, as :func:`keep_mask_reference` gives it for such rows). No host sync.
    """
    s = torch.where(torch.isfinite(s), s, float("-inf"))
    greedy = ~(temperature > 0)
    if filtered:
        z, keep = keep_mask_reference(s, temperature, top_k, top_p, min_p)
    else:
        m = s.amax(dim=1, keepdim=True)
        t = torch.where(temperature > 0, temperature, 1.0).to(s.dtype)[:, None]
        z = torch.where(torch.isfinite(s), (s - m) / t, float("-inf"))  # keep_mask_reference's z
        keep = torch.isfinite(z)
    kz = torch.where(keep, z, float("-inf"))
    lse = torch.logsumexp(kz, dim=1, keepdim=True)
    out = torch.where(keep, kz - torch.where(torch.isfinite(lse), lse, 0.0), float("-inf"))
    first_max = torch.arange(s.shape[1], device=s.device) == s.argmax(dim=1, keepdim=True)
    point = torch.where(first_max & torch.isfinite(s), 0.0, float("-inf")).to(s.dtype)
    return torch.where(greedy[:, None], point, out)


def sample_reference(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    anti_experts: Sequence[torch.Tensor],
    weights: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    vocab_size: int,
    compute_dtype: torch.dtype = torch.float32,
    logprobs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine, filter and draw by Gumbel-max with counter-based noise.

    Returns ``(token_ids, logprobs)``: int64 ``[B]`` in ``[0, vocab_size)`` and fp32 ``[B]``, the
    log-probability of each token under the filtered, renormalised distribution (0 for greedy rows,
    NaN for a fully masked row, which returns token 0). With ``logprobs=False`` none is computed: the
    second output is NaN for a fully masked row and 0 for every other.
    """
    s = combine_reference(base, experts, anti_experts, weights, vocab_size, compute_dtype)
    z, keep = keep_mask_reference(s, temperature, top_k, top_p, min_p)

    rows, cols = keep.nonzero(as_tuple=True)
    noise = gumbel(seed[rows], step[rows], cols, compute_dtype)
    key = torch.full_like(z, float("-inf"))
    key[rows, cols] = z[rows, cols] + noise
    greedy = ~(temperature > 0)
    tokens = torch.where(greedy, s.argmax(dim=1), key.argmax(dim=1))  # argmax: first index on ties

    if not logprobs:
        return tokens, torch.where(keep.any(dim=1), 0.0, float("nan")).to(torch.float32)
    kept_z = torch.where(keep, z, float("-inf"))
    logprobs = kept_z.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(kept_z, dim=1)
    logprobs = torch.where(greedy, 0.0, logprobs)
    logprobs = torch.where(keep.any(dim=1), logprobs, float("nan"))
    return tokens, logprobs.to(torch.float32)
