"""Speculative sampling for the proxy-tuned distribution: the math, apart from the models (``docs/speculative.md``).

A draft model (the first expert) proposes tokens from its own distribution ``q`` (the request's temperature
and filters applied to its logits alone); the target ``p`` is the op's final distribution over the combined
logits (:func:`filtered_logprobs`). Draft ``d`` at a position is accepted with probability
``min(1, p(d) / q(d))``; the first rejected position instead draws from the residual
``max(0, p - q) / sum(max(0, p - q))`` (:func:`residual_logits`); when every draft is accepted the next
position is drawn from ``p`` by the op itself (its own noise). Each token is then distributed exactly as the
op draws it (Leviathan et al. 2023, Chen et al. 2023), and greedy rows (point masses) give the op's argmax.

Randomness is counter-based, as the op's: for the token at generated index ``t`` of a row with seed ``s``

* the draft is ``proxytune.sample(draft logits, seed=stream_seed(s, DRAFT_STREAM), step=t, ...)``,
* the accept test uses ``u = uniform(stream_seed(s, ACCEPT_STREAM), t, 0)``,
* the residual draw is ``proxytune.sample(residual_logits, temperature=1, seed=stream_seed(s, RESIDUAL_STREAM), step=t)``,
* the bonus draw is ``proxytune.sample(combined logits, seed=s, step=t, ...)``: the op's own stream.

So a row's tokens depend only on its seed, its prompt and its own acceptance history (which sets its
draft length), never on the rows beside it.

Host syncs: :func:`filtered_logprobs` checks whether any row needs the sort-based filters (one sync).
"""

from __future__ import annotations

from typing import Optional

import torch

from proxytune.noise import uniform
from proxytune.ops import sample as proxy_sample
from proxytune.reference import keep_mask_reference

__all__ = ["DRAFT_STREAM", "ACCEPT_STREAM", "RESIDUAL_STREAM", "filtered_logprobs", "draft_tokens", "accept_drafts",
           "accept_greedy", "accepted_counts", "residual_logits"]  # fmt: skip

DRAFT_STREAM, ACCEPT_STREAM, RESIDUAL_STREAM = 1, 2, 3  # noise streams (stream 0: the op's own draws)


def filtered_logprobs(
    s: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """The log-probabilities of the op's final distribution (``docs/semantics.md``) over combined logits.

    Parameters
    ----------
    s : Tensor [N, V], fp32 (or fp64): combined logits, non-finite entries masked
    temperature, top_k, top_p, min_p : Tensor [N]: the op's parameters per row

    Returns
    -------
    Tensor [N, V], the dtype of ``s``: ``z_j - log sum_{i in K*} exp(z_i)`` on the kept set ``K*``
    (:func:`~proxytune.reference.keep_mask_reference`), -inf elsewhere; a greedy row (``T <= 0``) is the point
    mass on its first maximal ``s`` (0 there, -inf elsewhere); a fully masked row is all -inf. The sort-based
    filters run only for the rows that use top-k, top-p or min-p (one host sync to find them).
    """
    s = torch.where(torch.isfinite(s), s, float("-inf"))
    greedy = ~(temperature > 0)
    m = s.amax(dim=1, keepdim=True)
    t = torch.where(temperature > 0, temperature, 1.0).to(s.dtype)[:, None]
    z = torch.where(torch.isfinite(s), (s - m) / t, float("-inf"))  # the formula of keep_mask_reference
    keep = torch.isfinite(z)
    filtered = ((top_k > 0) | (top_p < 1) | (min_p > 0)) & ~greedy
    rows = filtered.nonzero()[:, 0]
    if rows.numel():
        _, kept = keep_mask_reference(s[rows], temperature[rows], top_k[rows], top_p[rows], min_p[rows])
        keep[rows] = kept
    kz = torch.where(keep, z, float("-inf"))
    lse = torch.logsumexp(kz, dim=1, keepdim=True)
    out = torch.where(keep, kz - torch.where(torch.isfinite(lse), lse, 0.0), float("-inf"))
    first_max = torch.arange(s.shape[1], device=s.device) == s.argmax(dim=1, keepdim=True)
    point = torch.where(first_max & torch.isfinite(s), 0.0, float("-inf")).to(s.dtype)
    return torch.where(greedy[:, None], point, out)


def draft_tokens(
    logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, draft_seed: torch.Tensor, step: torch.Tensor, vocab_size: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Draw one draft token per row from the draft model's own filtered distribution ``q`` (its ``[B, W]``
    logits with the request's temperature and filters), by the op with the draft stream's seed
    ``draft_seed = stream_seed(seed, DRAFT_STREAM)``. Returns ``(tokens int64 [B], log q(token) fp32 [B])``;
    0 for greedy rows. No host sync."""
    return proxy_sample(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=draft_seed,
        step=step, vocab_size=vocab_size, return_logprobs=True, backend=backend, validate=False,
    )  # fmt: skip


def accept_drafts(logp: torch.Tensor, logq: torch.Tensor, accept_seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Whether each draft passes the test ``u < p(d) / q(d)`` (in log space, fp64).

    ``logp``, ``logq``: ``[B, K]`` log-probabilities of the drafted tokens under the target and the draft;
    ``accept_seed`` ``[B]``: ``stream_seed(seed, ACCEPT_STREAM)``; ``step`` ``[B]`` the generated index of
    each row's first draft (draft ``i`` is at ``step + i``). ``u = uniform(accept_seed, step + i, 0)``.
    Returns bool ``[B, K]``. A draft the target forbids (``p = 0``) is always rejected; one with ``p >= q``
    always accepted (so greedy rows, whose ``p`` and ``q`` are point masses, need no noise: see
    :func:`accept_greedy`).
    """
    steps = step[:, None] + torch.arange(logp.shape[1], device=logp.device)
    u = uniform(accept_seed[:, None], steps, torch.zeros_like(steps))
    return torch.log(u.double()) < logp.double() - logq.double()


def accept_greedy(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """:func:`accept_drafts` for rows whose ``p`` and ``q`` are point masses (log-probabilities 0 or -inf):
    the test passes iff ``p(d) >= q(d)``, whatever ``u``. Bool ``[B, K]``, no noise."""
    return logp.double() - logq.double() >= 0


def accepted_counts(accepted: torch.Tensor, limit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The number of leading accepted drafts per row (``accepted`` bool ``[B, K]``), at most ``limit[r]``."""
    k = accepted.shape[1]
    if limit is not None:
        accepted = accepted & (torch.arange(k, device=accepted.device) < limit[:, None])
    return accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)


def residual_logits(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``log max(0, p - q)`` (fp64 differences, fp32 result, -inf where ``p <= q``) for ``[B, V]`` target and
    draft log-probabilities: sampling it at temperature 1 draws from the normalised residual. A row where
    nothing is left (``p <= q`` everywhere: a rejection never happens there in exact arithmetic) gets ``logp``."""
    r = (logp.double().exp() - logq.double().exp()).clamp(min=0.0)
    out = torch.where(r > 0, r.log(), float("-inf")).to(torch.float32)
    empty = ~(r > 0).any(dim=1, keepdim=True)
    return torch.where(empty, logp.to(torch.float32), out)
