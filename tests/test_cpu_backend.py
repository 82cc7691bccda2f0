"""The C++ ``cpu`` backend against the reference: same tokens for the same seeds, same log-probabilities.

Skipped as a module when the extension ``proxytune._C`` is not built (``make setup`` builds it).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import proxytune
from proxytune import backends
from proxytune._cpu_backend import why_unavailable
from proxytune.testing import peaked_logits, proxy_inputs

if why_unavailable() is not None:
    pytest.skip(f"cpu backend not built: {why_unavailable()}", allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def both(base, experts=(), antis=(), *, seed=0, validate=True, **kw):
    ref = proxytune.sample(base, experts, antis, seed=seed, return_logprobs=True, backend="reference", validate=validate, **kw)
    cpu = proxytune.sample(base, experts, antis, seed=seed, return_logprobs=True, backend="cpu", validate=validate, **kw)
    return ref, cpu


def assert_same(base, experts=(), antis=(), *, seeds=range(6), **kw):
    for seed in seeds:
        (rt, rl), (ct, cl) = both(base, experts, antis, seed=seed, **kw)
        assert ct.dtype == torch.int64 and cl.dtype == torch.float32
        assert torch.equal(rt, ct), f"seed {seed}: reference {rt.tolist()} vs cpu {ct.tolist()}"
        torch.testing.assert_close(cl, rl, atol=2e-5, rtol=1e-5, equal_nan=True)


# Every filter against the reference at real sizes: tests/test_backend_conformance.py (one table for every
# backend). Here: what is specific to the C++ op.


@pytest.mark.parametrize("dtypes", [(torch.bfloat16,) * 3, (torch.float16,) * 3, (torch.float16, torch.bfloat16, torch.float32)])
def test_dtypes_and_width_mismatch(dtypes):
    g = torch.Generator().manual_seed(3)
    base = peaked_logits(3, 152064, generator=g).to(dtypes[0])
    anti = peaked_logits(3, 151936, generator=g)
    expert = (anti + peaked_logits(3, 151936, generator=g, scale=1.0)).to(dtypes[1])
    anti = anti.to(dtypes[2])
    for kw in (dict(temperature=0.7, top_p=0.9), dict(temperature=0.7), dict(temperature=0.0), dict(temperature=1.0, top_k=50)):
        assert_same(base, [expert], [anti], seeds=range(3), **kw)
    torch.testing.assert_close(
        proxytune.combine(base, [expert], [anti], backend="cpu"), proxytune.combine(base, [expert], [anti], backend="reference"), rtol=0, atol=0
    )


def test_several_pairs_and_per_row_parameters():
    base, experts, antis = proxy_inputs(6, 20000, n_pairs=3, seed=11)
    kw = dict(
        weights=torch.tensor([[1.0, 0.5, -0.3, 2.0, 0.0, 1.0], [0.2, 1.0, 1.0, -1.0, 0.7, 0.0], [1.5, 0.0, 0.1, 0.3, 1.0, 1.0]]),
        temperature=torch.tensor([0.0, 0.5, 1.0, 0.7, 1.3, 0.9]),
        top_k=torch.tensor([0, 5, 0, 50, 0, 1000]),
        top_p=torch.tensor([1.0, 0.9, 0.3, 1.0, 0.95, 0.8]),
        min_p=torch.tensor([0.0, 0.0, 0.1, 0.0, 0.02, 0.0]),
        step=torch.tensor([0, 1, 2, 3, 2**40, -5]),
    )
    assert_same(base, experts, antis, seeds=range(4), **kw)
    seeds = torch.tensor([1, -1, 2**62, 7, 0, 3])
    assert_same(base, experts, antis, seeds=[seeds], **kw)


def test_ties_and_masked_tokens():
    g = torch.Generator().manual_seed(5)
    base = torch.randint(-3, 4, (4, 5000), generator=g).float()  # many exact ties at every boundary
    base[0, ::3] = float("-inf")
    base[1, :4990] = float("-inf")  # 10 live tokens
    base[2, 1234] = 10.0
    for kw in (
        dict(temperature=1.0, top_k=3),
        dict(temperature=1.0, top_k=700),
        dict(temperature=1.0, top_p=0.3),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=0.5, top_k=100, top_p=0.5),
        dict(temperature=1.0, min_p=0.3),
        dict(temperature=0.0),
        dict(temperature=2.0),
    ):
        assert_same(base, seeds=range(4), **kw)


@pytest.mark.parametrize("kw", [dict(temperature=1.0, top_p=0.9), dict(temperature=1.0, top_p=0.999), dict(temperature=1.0, top_k=30000, top_p=0.5), dict(temperature=1.0), dict(temperature=1.0, min_p=1e-9)])
def test_flat_rows_use_the_exact_fallback(kw):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(3, 40000, generator=g) * 0.01  # almost uniform: candidate bounds are not conclusive
    base[1] = 0.5  # exactly uniform
    assert_same(base, seeds=range(3), **kw)


def test_batch_invariance():
    base, experts, antis = proxy_inputs(7, 50000, seed=2)
    kw = dict(temperature=0.8, top_p=0.9, seed=torch.arange(7) * 13, step=torch.arange(7))
    tokens = proxytune.sample(base, experts, antis, backend="cpu", **kw)
    for r in range(7):
        one = proxytune.sample(
            base[r : r + 1], [x[r : r + 1] for x in experts], [x[r : r + 1] for x in antis], backend="cpu",
            temperature=0.8, top_p=0.9, seed=r * 13, step=r,
        )  # fmt: skip
        assert int(one) == int(tokens[r])
    # one long row alone (split over threads) and inside a batch (one thread per row) agree too
    tok_all = proxytune.sample(base, experts, antis, backend="cpu", temperature=1.0, seed=4)
    tok_one = proxytune.sample(base[3:4], [experts[0][3:4]], [antis[0][3:4]], backend="cpu", temperature=1.0, seed=4)
    assert int(tok_all[3]) == int(tok_one)


def test_noncontiguous_inputs():
    base, experts, antis = proxy_inputs(4, 9000, seed=8)
    wide = torch.cat([base, base], dim=1)[:, ::2]  # column stride 2
    assert_same(wide, experts, antis, seeds=range(2), temperature=0.7, top_p=0.9)


def test_combine_is_bitwise_equal():
    base, experts, antis = proxy_inputs(3, 10007, n_pairs=2, dtype=torch.bfloat16, seed=4)
    experts[1][0, 5] = float("-inf")
    w = [0.7, -1.3]
    torch.testing.assert_close(
        proxytune.combine(base, experts, antis, weights=w, backend="cpu"),
        proxytune.combine(base, experts, antis, weights=w, backend="reference"),
        rtol=0, atol=0,
    )  # fmt: skip


def test_registered_ops_equal_the_direct_bindings():
    """Other stacks call torch.ops.proxytune.*; proxytune calls the module's direct bindings: one function."""
    import proxytune._C as ext

    base, experts, antis = proxy_inputs(3, 5000, n_pairs=2, dtype=torch.float16, seed=9)
    w = torch.tensor([[0.5, 1.0, 1.5], [-0.3, 0.2, 0.0]])
    rows = dict(
        temperature=torch.tensor([0.0, 0.7, 1.2]), top_k=torch.tensor([0, 40, 0]), top_p=torch.tensor([1.0, 0.9, 0.8]),
        min_p=torch.tensor([0.0, 0.0, 0.05]), seed=torch.tensor([1, 2, -3]), step=torch.tensor([0, 5, 9]),
    )  # fmt: skip
    params = list(rows.values())
    via_ops = torch.ops.proxytune.sample(base, experts, antis, w, *params, 4999)
    direct = ext.sample(base, experts, antis, w, *params, 4999)
    public = proxytune.sample(base, experts, antis, weights=w, vocab_size=4999, return_logprobs=True, backend="cpu", **rows)
    for a, b in zip(via_ops, direct):
        assert torch.equal(a, b)
    for a, b in zip(direct, public):
        assert torch.equal(a, b)
    assert torch.equal(torch.ops.proxytune.combine(base, experts, antis, w, 4999), ext.combine(base, experts, antis, w, 4999))
    with pytest.raises(RuntimeError, match="temperature must have B = 3"):
        ext.sample(base, experts, antis, w, torch.ones(2), *params[1:], 4999)


def test_validation_errors_through_the_public_api():
    base = torch.randn(2, 100)
    with pytest.raises(ValueError, match="temperature"):
        proxytune.sample(base, temperature=-1.0, backend="cpu")
    with pytest.raises(ValueError, match="top_p"):
        proxytune.sample(base, top_p=torch.tensor([0.5, 1.5]), backend="cpu")
    with pytest.raises(ValueError, match="batch size"):
        proxytune.sample(base, [torch.randn(3, 100)], [torch.randn(3, 100)], backend="cpu")
    bad = base.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="base"):
        proxytune.sample(bad, backend="cpu")
    masked = base.clone()
    masked[0] = float("-inf")
    with pytest.raises(ValueError, match="masked"):
        proxytune.sample(masked, backend="cpu")


def test_unvalidated_junk_gives_valid_ids_and_matches_reference():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 3000, generator=g) * 4
    base[0] = float("-inf")  # fully masked: token 0, NaN
    base[1, ::2] = float("nan")
    base[2, 7] = float("inf")
    base[3, :100] = float("nan")
    kw = dict(
        temperature=torch.tensor([1.0, float("nan"), -1.0, 0.7, 1.0, 1.0, 1.0, 1.0]),
        top_k=torch.tensor([0, 0, 0, -5, 10**9, 3, 0, 0]),
        top_p=torch.tensor([0.9, 1.0, 0.5, float("nan"), 0.0, -1.0, 2.0, 0.9]),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.0, float("nan"), 1.0, 2.0, -1.0]),
    )
    for seed in range(4):
        (rt, rl), (ct, cl) = both(base, seed=seed, validate=False, **kw)
        assert torch.equal(rt, ct)
        torch.testing.assert_close(cl, rl, atol=2e-5, rtol=1e-5, equal_nan=True)
    assert int(ct[0]) == 0 and math.isnan(float(cl[0]))


def test_auto_picks_cpu_and_falls_back_when_missing(monkeypatch):
    assert backends.resolve("auto", torch.device("cpu")).name == "cpu"
    missing = dataclasses.replace(backends._REGISTRY["cpu"], why_unavailable=lambda: "not built")
    monkeypatch.setitem(backends._REGISTRY, "cpu", missing)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.raises(proxytune.BackendUnavailableError, match="not built"):
        proxytune.sample(torch.randn(1, 10), backend="cpu")
    with pytest.warns(UserWarning, match="cpu"):
        assert backends.resolve("auto", torch.device("cpu")).name != "cpu"


_floats = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    width=st.integers(1, 300),
    n_pairs=st.integers(0, 2),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 5.0)),
    top_k=st.integers(0, 400),
    top_p=st.floats(0.01, 1.0),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 0.99)),
    seed=st.integers(-(2**63), 2**63 - 1),
    data_seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([0.01, 1.0, 30.0]),
)
def test_fuzz_matches_reference(batch, width, n_pairs, dtype, temperature, top_k, top_p, min_p, seed, data_seed, scale):
    g = torch.Generator().manual_seed(data_seed)
    mk = lambda: (torch.randn(batch, width, generator=g) * scale).round(decimals=1).to(dtype)  # noqa: E731  (ties)
    base, experts, antis = mk(), [mk() for _ in range(n_pairs)], [mk() for _ in range(n_pairs)]
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, weights=0.5)
    (rt, rl), (ct, cl) = both(base, experts, antis, seed=seed, **kw)
    assert ((ct >= 0) & (ct < width)).all()
    assert torch.equal(rt, ct)
    torch.testing.assert_close(cl, rl, atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 200),
    junk=st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf"), 3e38, -3e38]), max_size=40),
    temperature=st.sampled_from([float("nan"), -1.0, 0.0, 1e-30, 0.5, 1.0, 1e30]),
    top_k=st.integers(-3, 300),
    top_p=st.sampled_from([float("nan"), -1.0, 0.0, 1e-6, 0.5, 1.0, 7.0]),
    min_p=st.sampled_from([float("nan"), -1.0, 0.0, 0.5, 1.0, 2.0]),
    data_seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_unvalidated_never_gives_an_invalid_id(width, junk, temperature, top_k, top_p, min_p, data_seed):
    g = torch.Generator().manual_seed(data_seed)
    base = torch.randn(2, width, generator=g) * 5
    pos = torch.randint(0, 2 * width, (len(junk),), generator=g)
    base.view(-1)[pos] = torch.tensor(junk, dtype=torch.float32)
    per_row = lambda v, dt=torch.float32: torch.full((2,), v, dtype=dt)  # noqa: E731  (tensors skip the scalar checks)
    tokens, logprobs = proxytune.sample(
        base, temperature=per_row(temperature), top_k=per_row(top_k, torch.int64), top_p=per_row(top_p),
        min_p=per_row(min_p), seed=data_seed, backend="cpu", validate=False, return_logprobs=True,
    )  # fmt: skip
    assert ((tokens >= 0) & (tokens < width)).all()
    alive = torch.isfinite(base).any(dim=1)
    assert torch.isnan(logprobs[~alive]).all() and (tokens[~alive] == 0).all()


def _extreme_temperature_rows(temperature, batch, width, seed):
    """Peaked rows (z = (s - m) / T is 0 at the maximum, -inf or huge elsewhere for a tiny T) and rows on the
    scale of T itself (subnormal logits for T < 1e-38: an ordinary spread of z, so the division must be the
    reference's), some with masked tokens."""
    g = torch.Generator().manual_seed(seed)
    t32 = float(torch.tensor(temperature, dtype=torch.float32))
    unit = max(t32 / 10, 2.0**-149) if math.isfinite(t32) else 0.1
    levels = max(1, round(4 * t32 / unit)) if math.isfinite(t32) else 40
    peaked = peaked_logits(batch, width, generator=g)
    peaked[0, [3, width // 2, width - 1]] = peaked[0].max() + 1.0  # ties at the maximum: the noise decides
    tiny = (torch.randint(-levels, 1, (batch, width), generator=g).double() * unit).float()
    tiny[0, torch.rand(width, generator=g) < 0.3] = float("-inf")
    return torch.cat([peaked, tiny])


@pytest.mark.parametrize("temperature", [math.inf, 1e-39, 2.9e-39, 1e-45, 1e-30, math.nan])
@pytest.mark.parametrize("batch,width", [(2, 4099), (1, 40000)], ids=["rows", "split-row"])
def test_unvalidated_extreme_temperatures_match_reference(temperature, batch, width):
    """T = +inf gave logprob NaN (the fully-masked signal) on unmasked rows; 1/T overflowing must not matter."""
    base = _extreme_temperature_rows(temperature, batch, width, seed=width)
    rows = base.shape[0]
    for kw in (dict(), dict(top_p=0.9), dict(top_k=50), dict(min_p=0.05), dict(top_k=20, top_p=0.8, min_p=0.01)):
        per_row = {k: torch.full((rows,), v) for k, v in kw.items()}
        (rt, rl), (ct, cl) = both(base, seed=torch.arange(rows) + 5, validate=False,
                                  temperature=torch.full((rows,), temperature), **per_row)  # fmt: skip
        assert ((ct >= 0) & (ct < width)).all()
        assert torch.equal(rt, ct), (kw, rt.tolist(), ct.tolist())
        assert not torch.isnan(cl).any(), kw
        torch.testing.assert_close(cl, rl, atol=2e-5, rtol=1e-5)
        if temperature == math.inf and not kw:  # every unmasked token has z = 0: uniform over them
            n_live = torch.isfinite(base).sum(dim=1).double()
            torch.testing.assert_close(cl.double(), -torch.log(n_live), atol=2e-5, rtol=1e-5)
