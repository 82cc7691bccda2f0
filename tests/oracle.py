"""The float64 oracle of the tests that check proxy-tuning end to end: the models' next-token logits, their
naive combination ``base + sum_i w_i (expert_i - anti_i)`` and its log-softmax, all in float64, one unpadded
row at a time (full recompute, no cache). What the engine, the Hugging Face processor, ``score``, vLLM and
speculative decoding must agree with; written once here.

Models come in the op's order: ``(base, expert_1, ..., expert_n, anti_1, ..., anti_n)`` with ``n`` weights.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["next_logits64", "combine64", "combined64", "logprobs64", "chi2_pvalue"]


@torch.no_grad()
def next_logits64(model, ids: Sequence[int]) -> torch.Tensor:
    """Last-position logits ``[V]`` of one unpadded row ``ids``, as float64."""
    return model(input_ids=torch.tensor([list(ids)])).logits[0, -1].double()


def combine64(rows: Sequence[torch.Tensor], weights: Sequence[float], vocab: Optional[int] = None) -> torch.Tensor:
    """``base + sum_i w_i (expert_i - anti_i)`` in float64 over the first ``vocab`` ids (default: the narrowest)
    of ``rows`` = (base, experts..., antis...), each ``[..., V_m]``."""
    n = len(weights)
    if len(rows) != 1 + 2 * n:
        raise ValueError(f"{len(rows)} rows for {n} weights: expected base, {n} experts, {n} anti-experts")
    vocab = vocab or min(r.shape[-1] for r in rows)
    rows = [r[..., :vocab].double() for r in rows]
    return rows[0] + sum(w * (rows[1 + i] - rows[1 + n + i]) for i, w in enumerate(weights))


def combined64(models: Sequence, ids, weights: Sequence[float], vocab: Optional[int] = None) -> torch.Tensor:
    """:func:`combine64` of the models' next-token logits after ``ids`` (one sequence for every model, or one
    per model, e.g. an expert that sees a templated prompt)."""
    per_model = ids if ids and isinstance(ids[0], (list, tuple)) else [ids] * len(models)
    return combine64([next_logits64(m, x) for m, x in zip(models, per_model)], weights, vocab)


def logprobs64(models: Sequence, ids, weights: Sequence[float], vocab: Optional[int] = None) -> torch.Tensor:
    """The proxy-tuned next-token log-probabilities ``[V]`` (float64, temperature 1, no filter) after ``ids``."""
    return combined64(models, ids, weights, vocab).log_softmax(-1)


def chi2_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Chi-square p-value of ``counts`` against ``probs``, cells with expected count < 5 pooled into one (scipy:
    imported here, so the module loads where scipy is missing, as in the vLLM venv)."""
    from scipy.stats import chisquare

    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for cell, p in probs.items():
        if p * n >= 5:
            obs.append(counts.get(cell, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(cell, 0)
            pool_e += p * n
    if pool_e == 0 and pool_o > 0:
        return 0.0  # a cell of probability 0 was drawn
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    assert sum(counts.values()) == n and abs(sum(exp) - n) < 1e-6 * n
    return float(chisquare(obs, exp).pvalue)
