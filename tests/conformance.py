"""What every backend must do, in one place: one filter table, one (dtype, atol, rtol) table, one comparison.

``tests/test_backend_conformance.py`` runs every registered backend over them against the reference; the
per-backend files keep only what is specific to a backend (tiles and fallbacks, threads, builds) and take
their filters from here too.

Tolerances: every backend computes the combined logits in fp32 exactly as the reference does (same order of
additions, no fused multiply-add), so tokens must be equal; a log-probability ``z - ln Z`` differs only by
the summation order of ``Z`` (and exp/log rounding): a few ulps of ``ln Z`` for the peaked rows of
:func:`proxytune.testing.proxy_inputs`, far inside ``atol = 2e-5`` (the order-independent bound on a sum of
n terms, ``gamma_n``, is what ``tests/test_reference.py`` uses where masses near a cut matter).
"""

from __future__ import annotations

import torch

import proxytune

# (temperature, top_k, top_p, min_p): greedy, every filter alone, in pairs, all together, and none
FILTERS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=1.3, top_p=0.99),
    dict(temperature=1.0, top_k=1),
    dict(temperature=0.8, top_k=50),
    dict(temperature=1.2, top_k=20),
    dict(temperature=0.7, top_k=50, top_p=0.9),
    dict(temperature=0.7, top_k=40, top_p=0.95),
    dict(temperature=1.5, top_k=2000, top_p=0.95),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=1.0, top_p=0.9, min_p=0.1),
    dict(temperature=1.0, top_k=40, min_p=0.2),
    dict(temperature=1.5, top_k=10, min_p=0.1),
    dict(temperature=1.0, top_k=30, top_p=0.8, min_p=0.02),
    dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.01),
    dict(temperature=0.0, top_k=5, top_p=0.5, min_p=0.1),  # greedy ignores the filters
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.7, top_k=50, top_p=0.95),
    dict(temperature=0.8, top_k=40, top_p=0.8, min_p=0.1),
    dict(temperature=1.0, top_k=5),
]

# (logits dtype, atol, rtol) for log-probabilities against the reference (see the module docstring)
DTYPES = [(torch.float32, 2e-5, 1e-5), (torch.bfloat16, 2e-5, 1e-5), (torch.float16, 2e-5, 1e-5)]


def filter_id(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def as_tuple(params: dict) -> tuple[float, int, float, float]:
    """``(temperature, top_k, top_p, min_p)`` with the op's defaults for the filters not named."""
    return (params["temperature"], params.get("top_k", 0), params.get("top_p", 1.0), params.get("min_p", 0.0))


def assert_matches_reference(backend: str, base, experts=(), antis=(), *, seeds=range(3), atol=2e-5, rtol=1e-5,
                             validate=True, **params) -> None:  # fmt: skip
    """``backend`` draws the reference's tokens for every seed, with log-probabilities within the tolerance."""
    for seed in seeds:
        kw = dict(seed=seed, return_logprobs=True, validate=validate, **params)
        ref_tokens, ref_lp = proxytune.sample(base, experts, antis, backend="reference", **kw)
        tokens, lp = proxytune.sample(base, experts, antis, backend=backend, **kw)
        assert tokens.dtype == torch.int64 and lp.dtype == torch.float32
        assert torch.equal(tokens, ref_tokens), f"seed {seed}: reference {ref_tokens.tolist()} vs {backend} {tokens.tolist()}"
        torch.testing.assert_close(lp, ref_lp, atol=atol, rtol=rtol, equal_nan=True)
