"""95% intervals for the evaluation's rates: a seeded bootstrap over questions.

Every rate of one evaluation (each system's exact match, its in-format rate, the gap closed) is a mean over
the same questions. One resample draws ``n`` questions with replacement (as counts: a multinomial draw of
``n`` over ``n`` equally likely questions, the same thing); every rate is recomputed on it, so the rates of
one resample are paired, and the gap's interval comes from the same resamples as the accuracies it is made
of. An interval is the 2.5th and 97.5th percentile of the resampled values (the percentile bootstrap). The
resample counts depend only on ``n``, the seed and the number of resamples, never on the rates: a rate has
the same interval whatever else is evaluated beside it.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["N_RESAMPLES", "SEED", "resample_counts", "bootstrap", "gap_samples", "interval"]

N_RESAMPLES = 10_000
SEED = 0
_CHUNK = 1_000  # resamples per block: bounds memory at 1,000 x n counts


def resample_counts(n: int, n_resamples: int = N_RESAMPLES, seed: int = SEED):
    """Blocks of ``[r, n]`` counts (how often each question is drawn; each row sums to ``n``), ``n_resamples``
    rows in all, reproducible from ``seed``."""
    if n < 1:
        raise ValueError(f"cannot resample {n} questions")
    rng = np.random.Generator(np.random.PCG64(seed))
    p = np.full(n, 1.0 / n)
    done = 0
    while done < n_resamples:
        r = min(_CHUNK, n_resamples - done)
        yield rng.multinomial(n, p, size=r).astype(np.float64)
        done += r


def bootstrap(per_question: Mapping[str, Sequence[float]], n_resamples: int = N_RESAMPLES,
              seed: int = SEED) -> dict:  # fmt: skip
    """``name -> [n_resamples]`` resampled means of each per-question score (0/1 lists of one length)."""
    names = list(per_question)
    if not names:
        return {}
    matrix = np.asarray([per_question[k] for k in names], dtype=np.float64)  # [metrics, n]
    if matrix.ndim != 2:
        raise ValueError("every per-question list must have the same length")
    n = matrix.shape[1]
    means = np.concatenate([counts @ matrix.T / n for counts in resample_counts(n, n_resamples, seed)])
    return {k: means[:, i] for i, k in enumerate(names)}


def gap_samples(proxy, large_base, large_tuned) -> np.ndarray:
    """The gap closed, ``(proxy - large base) / (large tuned - large base)``, per resample (arrays of one
    length); NaN where a resample has no gap (large tuned <= large base)."""
    proxy, large_base, large_tuned = (np.asarray(x, dtype=np.float64) for x in (proxy, large_base, large_tuned))
    gap = large_tuned - large_base
    out = np.full(gap.shape, np.nan)
    ok = gap > 0
    out[ok] = (proxy[ok] - large_base[ok]) / gap[ok]
    return out


def interval(samples, level: float = 0.95) -> Optional[tuple[float, float]]:
    """The central ``level`` percentile interval of ``samples`` (NaNs left out); None if all are NaN."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)
