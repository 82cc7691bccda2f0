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

from conformance import (  # noqa: E402
    DTYPES, FILTERS, FLAG_CASES, assert_flags_conform, assert_matches_reference, filter_id, flag_params,
)  # fmt: skip

import proxytune  # noqa: E402
from proxytune import _args, backends  # noqa: E402
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


# ---- the host-known batch flags: filters_used and return_logprobs=False, on every backend ----------------------
FLAG_SIZES = {"reference": [(3, 300)], "cpu": [(4, 4099), (1, 128256)], "triton": SIZES["triton"][:1]}


def _all_backends() -> list:
    return ["reference", *_backends()]


@pytest.mark.parametrize("params, used", FLAG_CASES, ids=lambda x: ",".join(sorted(x)) if isinstance(x, set) else None)
@pytest.mark.parametrize("backend", _all_backends())
def test_batch_flags_change_no_token(backend, params, used):
    for batch, width in FLAG_SIZES[backend]:
        base, experts, antis = proxy_inputs(batch, width, seed=batch + width, device=DEVICE)
        assert_flags_conform(backend, base, experts, antis, params, used)


@pytest.mark.parametrize("backend", _all_backends())
def test_without_logprobs_only_the_fully_masked_marker_comes_back(backend):
    # What a backend returns beside the tokens when nobody asked for log-probabilities: NaN for a row with no
    # finite combined logit (so validate=True still names it), 0 for every other row, greedy or sampled.
    batch, width = FLAG_SIZES[backend][0]
    base, experts, antis = proxy_inputs(batch, width, seed=9, device=DEVICE)
    base[1] = float("-inf")
    kw = dict(weights=1.0, top_k=0, top_p=0.9, min_p=0.0, seed=4, step=1, vocab_size=None)
    temperature = torch.tensor([0.0] + [0.9] * (batch - 1), device=DEVICE)
    args = _args.normalize(base, experts, antis, temperature=temperature, validate=False, logprobs=False, **kw)
    tokens, marker = backends.get(backend).sample(args)
    assert torch.isnan(marker[1]) and tokens[1] == 0
    assert marker[[0, *range(2, batch)]].tolist() == [0.0] * (batch - 1)
    with_lp = backends.get(backend).sample(args._replace(logprobs=True))[0]
    assert torch.equal(tokens, with_lp)
    with pytest.raises(ValueError, match="no finite combined logit"):
        proxytune.sample(base, experts, antis, backend=backend, temperature=temperature, seed=4)


@pytest.mark.parametrize("backend", _all_backends())
def test_a_row_outside_the_promise_is_a_clear_error_under_validate(backend):
    batch, width = FLAG_SIZES[backend][0]
    base, experts, antis = proxy_inputs(batch, width, seed=2, device=DEVICE)
    kw = flag_params(dict(temperature=[0.8, 0.0, 1.1], top_p=[0.9, 0.5, 1.0]), batch, DEVICE)
    with pytest.raises(ValueError, match=r"row 0 uses top_p=0\.9.*filters_used"):
        proxytune.sample(base, experts, antis, backend=backend, filters_used=frozenset({"top_k"}), **kw)
    with pytest.raises(ValueError, match="filters_used"):  # a Python number breaks the promise too
        proxytune.sample(base, experts, antis, backend=backend, top_k=5, filters_used=frozenset())


@pytest.mark.parametrize("backend", _all_backends())
def test_without_validate_the_promise_is_trusted_and_the_filter_is_off(backend):
    # validate=False: a filter left out of filters_used is off in every row, whatever its parameter says,
    # in every backend alike (the Triton kernel compiles it out, the C++ op and the reference ignore it).
    batch, width = FLAG_SIZES[backend][0]
    base, experts, antis = proxy_inputs(batch, width, seed=6, device=DEVICE)
    kw = flag_params(dict(temperature=[0.8, 0.0, 1.1], top_k=[3, 3, 2], top_p=[0.5, 0.5, 0.6]), batch, DEVICE)
    tokens = proxytune.sample(base, experts, antis, backend=backend, seed=8, filters_used=frozenset({"top_p"}),
                              validate=False, **kw)  # fmt: skip
    kw["top_k"] = torch.zeros_like(kw["top_k"])
    assert torch.equal(tokens, proxytune.sample(base, experts, antis, backend="reference", seed=8, **kw))
    assert ((tokens >= 0) & (tokens < width)).all()


def test_filters_used_is_checked():
    base = torch.randn(2, 50)
    with pytest.raises(ValueError, match="filters_used may hold only"):
        proxytune.sample(base, filters_used=frozenset({"top_q"}))
    with pytest.raises(TypeError, match="filters_used must be"):
        proxytune.sample(base, filters_used="top_k")
