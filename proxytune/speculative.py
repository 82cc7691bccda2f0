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

The target ``p`` is :func:`~proxytune.reference.filtered_logprobs_reference` (here ``filtered_logprobs``): the
reference's own definition of the op's final distribution, so the verifier and the op cannot disagree. It
syncs nothing; the caller says on the host whether any row filters (``filtered=False`` skips the sorts).
"""

from __future__ import annotations

from typing import Optional

import torch

from proxytune.noise import uniform
from proxytune.ops import sample as proxy_sample
from proxytune.reference import filtered_logprobs_reference

__all__ = ["DRAFT_STREAM", "ACCEPT_STREAM", "RESIDUAL_STREAM", "filtered_logprobs", "draft_tokens", "accept_drafts",
           "accept_greedy", "accepted_counts", "residual_logits"]  # fmt: skip

DRAFT_STREAM, ACCEPT_STREAM, RESIDUAL_STREAM = 1, 2, 3  # noise streams (stream 0: the op's own draws)


filtered_logprobs = filtered_logprobs_reference  # the op's final distribution, defined once (proxytune.reference)


def draft_tokens(
    logits: torch.Tensor, *, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor, draft_seed: torch.Tensor, step: torch.Tensor, vocab_size: int, backend: str,
    filters_used: Optional[frozenset] = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Draw one draft token per row from the draft model's own filtered distribution ``q`` (its ``[B, W]``
    logits with the request's temperature and filters), by the op with the draft stream's seed
    ``draft_seed = stream_seed(seed, DRAFT_STREAM)``. Returns ``(tokens int64 [B], log q(token) fp32 [B])``;
    0 for greedy rows. ``filters_used``: the op's host-known promise of the filters any row turns on. No host
    sync."""
    return proxy_sample(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=draft_seed,
        step=step, vocab_size=vocab_size, return_logprobs=True, backend=backend, validate=False,
        filters_used=filters_used,
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
