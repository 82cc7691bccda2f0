"""A served base's top-k log-probabilities as a dense row for the op (``docs/semantics.md``, section 8).

The server returns, per position, ``{token_id: logprob}`` for its top-k set ``K``. :func:`dense_rows` turns a
list of those into an fp32 ``[N, V]`` tensor: ``b_j`` on ``K``, and outside ``K`` the **tail rule**:

* ``drop``: ``-inf`` (cannot be drawn);
* ``floor``: the smallest returned log-prob of the position (an upper bound on every token outside ``K``);
* ``all``: every id below ``V`` must be present (the whole vocabulary); a missing one is an error.

Ids at or past ``V`` are ignored (the op never reads columns past the common vocabulary); negative ids,
non-integer ids and NaN / ``+inf`` log-probs are errors. Pure PyTorch; no host sync beyond building the
tensor from Python lists.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

__all__ = ["TAIL_RULES", "check_tail", "dense_rows"]

TAIL_RULES = ("drop", "floor", "all")


def check_tail(tail: str, name: str = "tail") -> str:
    """The tail rule as given, if it is one of :data:`TAIL_RULES`; else a ``ValueError`` naming ``name``."""
    if not isinstance(tail, str) or tail not in TAIL_RULES:
        raise ValueError(f"{name} must be one of {', '.join(TAIL_RULES)}, got {tail!r}")
    return tail


def dense_rows(
    topk: Sequence[Mapping[int, float]], vocab_size: int, tail: str = "drop", *, device=None
) -> torch.Tensor:
    """Dense fp32 rows ``[N, vocab_size]`` from ``N`` positions' top-k log-probs.

    Parameters
    ----------
    topk : sequence of N mappings ``{token_id (int >= 0): logprob (float, finite or -inf)}``: the set ``K``
        of each position (without the server's sampled token when it lies outside the top k: the client
        removes it)
    vocab_size : int, ``V >= 1``: the common vocabulary; ids ``>= V`` are ignored
    tail : ``"drop"`` | ``"floor"`` | ``"all"``

    Returns
    -------
    Tensor ``[N, V]`` float32 on ``device``: the returned log-probs on ``K``; outside ``K`` ``-inf``
    (``drop``), the position's smallest finite returned log-prob (``floor``; ``-inf`` if none is finite), or
    nothing (``all``: a position missing an id below ``V`` raises ``ValueError``).
    """
    check_tail(tail)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    n = len(topk)
    out = torch.full((n, vocab_size), float("-inf"), dtype=torch.float32)
    for r, entries in enumerate(topk):
        ids, vals = [], []
        for tid, lp in entries.items():
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise ValueError(f"position {r}: a token id must be an integer >= 0, got {tid!r}")
            lp = float(lp)
            if math.isnan(lp) or lp == math.inf:
                raise ValueError(f"position {r}: token {tid} has log-prob {lp} (must be finite or -inf)")
            if tid < vocab_size:
                ids.append(tid)
                vals.append(lp)
        if tail == "all" and len(set(ids)) < vocab_size:
            missing = sorted(set(range(vocab_size)) - set(ids))
            raise ValueError(
                f"position {r}: tail 'all' needs every id below {vocab_size}, but {len(missing)} are missing "
                f"(first: {missing[:5]}); ask the server for the whole vocabulary (logprobs=-1, --max-logprobs -1)"
            )
        if tail == "floor":
            finite = [v for v in vals if v > -math.inf]
            if finite:
                out[r] = min(finite)
        if ids:
            out[r, torch.tensor(ids, dtype=torch.int64)] = torch.tensor(vals, dtype=torch.float32)
    return out if device is None else out.to(device)
