"""Every registered backend against the reference: one filter table x one dtype table (``tests/conformance.py``).

The ``cpu`` backend runs at real sizes; ``triton`` runs in triton's numpy interpreter on a CPU (small sizes:
the interpreter's cost grows with the row; on a GPU the same cases run the compiled kernel, plus the real
sizes of ``tests/test_triton_backend.py``). A backend that is registered but cannot run here is skipped with
its reason. Backend-specific behaviour (tiles, fallbacks, threads, builds) stays in the per-backend files.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

from conformance import DTYPES, FILTERS, assert_matches_reference, filter_id  # noqa: E402

from proxytune import backends  # noqa: E402
from proxytune.testing import proxy_inputs  # noqa: E402

# numpy evaluates both sides of tl.where in the interpreter: inf - inf in a discarded branch warns
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, width) per backend: rows with and without a partial last block, a batch, a long row
SIZES = {"cpu": [(1, 4099), (5, 32000), (1, 128256)], "triton": [(3, 200)] if DEVICE == "cpu" else [(5, 32000), (1, 128256)]}


INTERPRETED = DEVICE == "cpu"  # triton on a CPU runs in numpy: seconds per launch


def _backends() -> list:
    params = []
    for name in backends.names():
        if name == "reference":
            continue
        backend = backends.get(name)
        reason = backend.why_unavailable() if backend.serves(torch.device(DEVICE)) else f"does not serve {DEVICE} tensors here"
        params.append(pytest.param(name, marks=[pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []))
    return params


def _cases() -> list:
    """(backend, filters) pairs; the interpreted triton backend takes every fifth filter and one seed in the
    default suite (the interpreter's cost), the other filters with ``-m slow``."""
    cases = []
    for backend in _backends():
        name = backend.values[0]
        for i, params in enumerate(FILTERS):
            marks = list(backend.marks) + ([pytest.mark.slow] if name == "triton" and INTERPRETED and i % 5 else [])
            cases.append(pytest.param(name, params, marks=marks, id=f"{name}-{filter_id(params)}"))
    return cases


@pytest.mark.parametrize("backend, params", _cases())
def test_tokens_and_logprobs_match_the_reference(backend, params):
    seeds = range(1 if backend == "triton" and INTERPRETED else 3)
    for batch, width in SIZES[backend]:
        base, experts, antis = proxy_inputs(batch, width, seed=batch * 7 + width, device=DEVICE)
        assert_matches_reference(backend, base, experts, antis, seeds=seeds, **params)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype) else None)
@pytest.mark.parametrize("backend", _backends())
def test_every_logits_dtype_and_mixed_widths(backend, dtype, atol, rtol):
    batch, width = SIZES[backend][0]
    base, experts, antis = proxy_inputs(batch, width, 2, dtype, DEVICE, seed=3, expert_width=width + 7)
    antis[1] = antis[1].float()  # any mix of dtypes and widths
    weights = torch.tensor([[0.5] * batch, [1.5] * batch], device=DEVICE)
    interpreted = backend == "triton" and INTERPRETED
    for params in (FILTERS[17],) if interpreted else (FILTERS[3], FILTERS[9], FILTERS[17]):
        assert_matches_reference(backend, base, experts, antis, seeds=range(1 if interpreted else 3), weights=weights,
                                 atol=atol, rtol=rtol, **params)  # fmt: skip
