"""Blocks drafted by a served base, verified by the local small models: the math (``docs/semantics.md`` §8).

The server draws ``d_1..d_n`` from the base's own distribution ``q`` (temperature 1, no filters) and returns
``log q`` on each position's top-k set ``K_i``; the experts and anti-experts score the block in one forward
each. Position ``i``'s target ``p_i`` is the op's final distribution (combination, temperature, top-k/top-p/
min-p, renormalised) on the ``drop`` row of ``K_i`` (:func:`target_logprobs`). :func:`verify_block` accepts
``d_i`` iff ``u_i < p_i(d_i) / q_i(d_i)`` up to the first rejection, where the row draws from
``max(0, p_i - q_i)`` normalised. Each token is then distributed exactly as the one-token-per-request target
(``p`` is zero outside ``K_i``, so ``q`` is needed on ``K_i`` only). Greedy rows accept while the draft is
the target's first argmax and take that argmax at the first mismatch.

Noise (counter-based, as :mod:`proxytune.speculative`'s, with stream ids of its own): for the token at
generated index ``t`` of a row with seed ``s``

* the accept test: ``u = uniform(stream_seed(s, ACCEPT_STREAM), t, 0)``,
* the residual draw: Gumbel-max at temperature 1 on ``log max(0, p - q)`` with ``seed=stream_seed(s,
  RESIDUAL_STREAM), step=t`` (the op's draw, ``proxytune.reference.sample_reference``),
* the server's draft seed for a request starting at ``t``: :func:`server_draft_seed` (stream ``DRAFT_STREAM``).

Pure PyTorch on any device; :func:`verify_block` syncs with the host once (the filters' row selection in
:func:`proxytune.speculative.filtered_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from proxytune.noise import philox4x32_10, stream_seed, uniform
from proxytune.reference import combine_reference, sample_reference
from proxytune.speculative import accepted_counts, filtered_logprobs, residual_logits

__all__ = ["ACCEPT_STREAM", "RESIDUAL_STREAM", "DRAFT_STREAM", "server_draft_seed", "target_logprobs",
           "BlockVerdict", "verify_block", "next_block_size"]  # fmt: skip

# Noise streams of the remote base's blocks; distinct from speculative.py's 1 (draft), 2 (accept), 3 (residual)
# and the op's own stream 0.
ACCEPT_STREAM, RESIDUAL_STREAM, DRAFT_STREAM = 4, 5, 6
_DRAFT_TAG = 0x52454D54  # "REMT": the second counter word of the server's draft seed
_MASK32 = 0xFFFFFFFF


def server_draft_seed(seed: int, step: int) -> int:
    """The seed sent to the server with the draft request of a row with seed ``seed`` whose block starts at
    generated index ``step``: ``x0 mod 2^31`` of ``Philox-4x32-10(counter=(DRAFT_STREAM, 0x52454D54, step mod
    2^32, step >> 32), key=(seed mod 2^32, seed >> 32))`` (64-bit two's-complement words). A fresh seed per
    request (a server seeds each request's generator once, so one seed at every request would reuse its
    noise); 31 bits, which every server's seed field takes."""
    s, t = int(seed) & (2**64 - 1), int(step) & (2**64 - 1)
    t64 = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    x0, _, _, _ = philox4x32_10(
        t64(DRAFT_STREAM), t64(_DRAFT_TAG), t64(t & _MASK32), t64(t >> 32), t64(s & _MASK32), t64(s >> 32)
    )
    return int(x0) & 0x7FFFFFFF


def _per_row(x, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=dtype, device=device)
    return t.expand(n).clone() if t.dim() == 0 else t


def target_logprobs(
    base_rows: torch.Tensor, experts: Sequence[torch.Tensor], anti_experts: Sequence[torch.Tensor],
    weights: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """``log p``: the op's final distribution over the proxy-tuned scores of ``N`` positions.

    ``base_rows`` ``[N, V]`` fp32 (the dense rows of :func:`proxytune.remote.rows.dense_rows`); each expert
    and anti-expert ``[N, Vx]`` (``Vx >= V``; columns past ``V`` ignored); ``weights`` ``[P, N]``; the
    parameters ``[N]``. Returns fp32 ``[N, V]``: log-probabilities on the kept set, ``-inf`` elsewhere; a
    greedy row (``T <= 0``) is the point mass on its first maximal score.
    """
    v = base_rows.shape[1]
    s = combine_reference(base_rows, list(experts), list(anti_experts), weights, v, torch.float32)
    return filtered_logprobs(s, temperature, top_k, top_p, min_p)


@dataclass
class BlockVerdict:
    """What a verified block gives each of ``B`` rows.

    ``accepted`` int64 ``[B]``: the number of leading drafts kept (``0 <= accepted <= lengths``).
    ``token`` int64 ``[B]``: the token after them (the residual's draw, or the target's argmax for a greedy
    row) where a draft was rejected; ``-1`` where all ``lengths[r]`` drafts were accepted (no extra token:
    the server gave no distribution after the block).
    ``logprobs`` fp32 ``[B, n]``: ``log p`` of the row's tokens under the target (the kept drafts, then
    ``token`` at index ``accepted``; 0 for greedy rows, NaN past the row's tokens).
    """

    accepted: torch.Tensor
    token: torch.Tensor
    logprobs: torch.Tensor

    def tokens(self, draft_ids: torch.Tensor) -> list[list[int]]:
        """Each row's new tokens as Python lists: the kept drafts, then ``token`` unless it is -1 (a host sync)."""
        out = []
        for r, (a, t) in enumerate(zip(self.accepted.tolist(), self.token.tolist())):
            out.append(draft_ids[r, :a].tolist() + ([t] if t >= 0 else []))
        return out


def verify_block(
    draft_ids: torch.Tensor, base_rows: torch.Tensor, experts: Sequence[torch.Tensor],
    anti_experts: Sequence[torch.Tensor], weights, *, temperature, top_k=0, top_p=1.0, min_p=0.0, seed=0,
    step=0, lengths=None,
) -> BlockVerdict:  # fmt: skip
    """Verify a block of ``n`` drafts per row by the proxy-tuned target.

    Parameters
    ----------
    draft_ids : int64 ``[B, n]``: the server's tokens. Sampled rows (``T > 0``) must come from the base at
        temperature 1 with no filters; greedy rows may come from a greedy draft.
    base_rows : fp32 ``[B, n, V]``: position ``i``'s ``drop`` row (``log q`` on ``K_i``, ``-inf`` outside; the
        ``all`` row is allowed too: ``K_i`` is then everything), the distribution ``d_i`` was drawn from.
    experts, anti_experts : ``P`` tensors ``[B, n, Vx]`` each (``Vx >= V``): the small models' logits at the
        same positions (position ``i`` predicts ``d_i``).
    weights : ``[P, B]`` tensor, or a sequence of ``P`` floats / ``[B]`` tensors.
    temperature, top_k, top_p, min_p, seed, step : scalars or ``[B]``; ``step`` is the generated index of
        each row's first draft.
    lengths : int64 ``[B]`` or None (all ``n``): how many drafts each row has (the server may stop early).

    Returns
    -------
    :class:`BlockVerdict`. A draft outside ``K_i`` (or ``>= V``) has ``p = 0`` and is always rejected.
    """
    b, n = draft_ids.shape
    if base_rows.dim() != 3 or base_rows.shape[:2] != (b, n):
        raise ValueError(f"base_rows must be [B, n, V] = [{b}, {n}, V], got {tuple(base_rows.shape)}")
    if len(experts) != len(anti_experts):
        raise ValueError(f"{len(experts)} experts but {len(anti_experts)} anti-experts")
    dev, v = base_rows.device, base_rows.shape[2]
    for x in list(experts) + list(anti_experts):
        if x.shape[:2] != (b, n) or x.shape[2] < v:
            raise ValueError(f"expert/anti-expert logits must be [{b}, {n}, >= {v}], got {tuple(x.shape)}")
    temperature = _per_row(temperature, b, torch.float32, dev)
    top_k, top_p = _per_row(top_k, b, torch.int64, dev), _per_row(top_p, b, torch.float32, dev)
    min_p, seed = _per_row(min_p, b, torch.float32, dev), _per_row(seed, b, torch.int64, dev)
    step = _per_row(step, b, torch.int64, dev)
    lengths = _per_row(n if lengths is None else lengths, b, torch.int64, dev)
    if isinstance(weights, torch.Tensor) and weights.dim() == 2:
        w = weights.to(torch.float32)
    else:
        w = torch.stack([_per_row(x, b, torch.float32, dev) for x in weights]) if len(experts) else torch.zeros(0, b)
    rep = lambda x: x.repeat_interleave(n, dim=-1)  # noqa: E731  [B] -> [B * n], row-major like the flattening

    flat = lambda x: x.reshape(b * n, x.shape[2])  # noqa: E731
    logp = target_logprobs(flat(base_rows), [flat(e) for e in experts], [flat(a) for a in anti_experts],
                           rep(w), rep(temperature), rep(top_k), rep(top_p), rep(min_p))  # fmt: skip
    logp = logp.reshape(b, n, v)
    logq = torch.where(torch.isfinite(base_rows), base_rows.double(), float("-inf"))  # log q on K, as returned
    inside = (draft_ids >= 0) & (draft_ids < v)
    d = draft_ids.clamp(0, v - 1)[:, :, None]
    lp_d = torch.where(inside, logp.gather(2, d)[:, :, 0].double(), float("-inf"))
    lq_d = torch.where(inside, logq.gather(2, d)[:, :, 0], float("-inf"))

    greedy = ~(temperature > 0)
    steps = step[:, None] + torch.arange(n, device=dev)
    u = uniform(stream_seed(seed, ACCEPT_STREAM)[:, None], steps, torch.zeros_like(steps))
    ok_sampled = (lp_d > float("-inf")) & (torch.log(u.double()) < lp_d - lq_d)
    ok_greedy = lp_d == 0  # the point mass: d is the target's first argmax
    ok = torch.where(greedy[:, None], ok_greedy, ok_sampled)
    accepted = accepted_counts(ok, lengths)

    # the token at the first rejection: residual draw (sampled rows) or the argmax (greedy rows)
    at = accepted.clamp(max=n - 1)
    pick = lambda x: x[torch.arange(b, device=dev), at]  # noqa: E731
    lp_at, lq_at = pick(logp), pick(logq)
    res = residual_logits(lp_at, lq_at)
    drawn, _ = sample_reference(
        res, [], [], torch.zeros(0, b), torch.ones(b), torch.zeros(b, dtype=torch.int64), torch.ones(b),
        torch.zeros(b), stream_seed(seed, RESIDUAL_STREAM), step + at, v, logprobs=False,
    )  # fmt: skip
    token = torch.where(greedy, lp_at.argmax(dim=1), drawn)
    rejected = accepted < lengths
    token = torch.where(rejected, token, -1)

    logprobs = torch.full((b, n), float("nan"), dtype=torch.float32, device=dev)
    idx = torch.arange(n, device=dev)[None, :]
    logprobs = torch.where(idx < accepted[:, None], lp_d.float(), logprobs)
    tok_lp = lp_at.gather(1, token.clamp(min=0)[:, None])[:, 0]
    logprobs = torch.where((idx == accepted[:, None]) & rejected[:, None], tok_lp[:, None], logprobs)
    return BlockVerdict(accepted=accepted, token=token, logprobs=logprobs)


def next_block_size(size: int, accepted: int, max_size: int, remaining: int) -> int:
    """The next block length of a row (``docs/semantics.md`` §8, "Draft length"): all ``size`` drafts
    accepted -> ``min(max_size, 2 size)``; ``accepted < size`` -> ``max(1, min(size, 2 (accepted + 1)))``;
    never more than ``remaining`` (the row's budget left; at least 1)."""
    if size < 1 or max_size < 1 or not 0 <= accepted <= size:
        raise ValueError(f"need size >= 1, max_size >= 1, 0 <= accepted <= size; got {size}, {max_size}, {accepted}")
    nxt = min(max_size, 2 * size) if accepted == size else max(1, min(size, 2 * (accepted + 1)))
    return max(1, min(nxt, remaining))
