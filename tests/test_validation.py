"""Bad input gets a clear error naming the argument; nothing crashes or returns an invalid token."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proxytune
from proxytune.backends import BackendUnavailableError

B, V = 3, 50


def logits(batch=B, width=V, dtype=torch.float32):
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(batch * width)).to(dtype)


CASES = [  # (kwargs for sample, exception type, words the message must contain)
    (dict(experts=[logits(2)], anti_experts=[logits()]), ValueError, "experts[0] has batch size 2"),
    (dict(experts=[logits()], anti_experts=[logits(4)]), ValueError, "anti_experts[0] has batch size 4"),
    (dict(experts=[logits(), logits()], anti_experts=[logits()]), ValueError, "2 experts but 1 anti_experts"),
    (dict(base=logits(width=0)), ValueError, "base has an empty vocabulary"),
    (dict(experts=[logits(width=0)], anti_experts=[logits()]), ValueError, "experts[0] has an empty vocabulary"),
    (dict(vocab_size=0), ValueError, "vocab_size must be in [1, 50]"),
    (dict(vocab_size=51), ValueError, "vocab_size must be in [1, 50]"),
    (dict(vocab_size=2.5), TypeError, "vocab_size must be an int"),
    (dict(temperature=-0.1), ValueError, "temperature must be finite and >= 0"),
    (dict(temperature=math.inf), ValueError, "temperature must be finite and >= 0"),
    (dict(temperature=torch.tensor([1.0, -1.0, 1.0])), ValueError, "temperature must be finite and >= 0; row 1"),
    (dict(top_p=0.0), ValueError, "top_p must be in (0, 1]"),
    (dict(top_p=1.5), ValueError, "top_p must be in (0, 1]"),
    (dict(top_p=torch.tensor([0.5, 0.9, math.nan])), ValueError, "top_p must be in (0, 1]; row 2"),
    (dict(min_p=1.0), ValueError, "min_p must be in [0, 1)"),
    (dict(min_p=-0.1), ValueError, "min_p must be in [0, 1)"),
    (dict(min_p=0.99999999999), ValueError, "min_p must be in [0, 1), also when rounded to float32"),  # 1 in fp32
    (dict(min_p=torch.tensor([0.0, 1.0, 0.0])), ValueError, "min_p must be in [0, 1); row 1"),
    (dict(top_k=-1), ValueError, "top_k must be >= 0"),
    (dict(top_k=torch.tensor([0, -3, 1])), ValueError, "top_k must be >= 0; row 1"),
    (dict(top_k=2.5), TypeError, "top_k must be an integer"),
    (dict(top_k=torch.tensor([1.0, 2.0, 3.0])), TypeError, "top_k must be an integer tensor"),
    (dict(seed=torch.tensor([1.0, 2.0, 3.0])), TypeError, "seed must be an integer tensor"),
    (dict(seed=2**64), ValueError, "seed=18446744073709551616 does not fit in 64 bits"),
    (dict(step="3"), TypeError, "step must be a number or a [B] tensor"),
    (dict(temperature=torch.ones(4)), ValueError, "temperature must be a scalar or a [B] = [3] tensor"),
    (dict(temperature=True), TypeError, "temperature must be a number"),
    (dict(experts=[logits()], anti_experts=[logits()], weights=math.nan), ValueError, "weights must be a finite number with |w| <= 1e6"),
    (dict(experts=[logits()], anti_experts=[logits()], weights=[1.0, 2.0]), ValueError, "weights has 2 entries but there are 1"),
    (dict(experts=[logits()], anti_experts=[logits()], weights=torch.ones(2, 3)), ValueError, "weights as a 2-D tensor must be [P, B] = [1, 3]"),
    (dict(experts=[logits()], anti_experts=[logits()], weights=torch.tensor([1.0, math.inf, 0.0])), ValueError, "weights must be finite and |w| <= 1e6; row 1"),
    (dict(base=logits(dtype=torch.float64)), TypeError, "base must be float32, bfloat16 or float16"),
    (dict(base=logits().to(torch.int64)), TypeError, "base must be float32, bfloat16 or float16"),
    (dict(experts=[logits(dtype=torch.float64)], anti_experts=[logits()]), TypeError, "experts[0] must be float32"),
    (dict(base=logits()[0]), ValueError, "base must be 2-D [B, V]"),
    (dict(base=[[1.0, 2.0]]), TypeError, "base must be a torch.Tensor"),
    (dict(experts=logits(), anti_experts=logits()), TypeError, "experts must be a sequence of [B, V] tensors, not a single tensor"),
    (dict(experts=[logits(), logits()], anti_experts=[logits(), logits().to("meta")]), ValueError, "anti_experts[1] is on meta"),
    (dict(backend="cuda-magic"), ValueError, "unknown backend 'cuda-magic'"),
]


def with_nan(name, value):
    x = logits()
    x[1, 7] = value
    kwargs = {"base": x} if name == "base" else {name: [x], ("anti_experts" if name == "experts" else "experts"): [logits()]}
    return kwargs


CASES += [
    (with_nan("base", math.nan), ValueError, "base has nan at row 1, token 7"),
    (with_nan("experts", math.inf), ValueError, "experts[0] has inf at row 1, token 7"),
    (with_nan("anti_experts", math.nan), ValueError, "anti_experts[0] has nan at row 1, token 7"),
    (dict(base=torch.full((B, V), -math.inf)), ValueError, "row 0 has no finite combined logit"),
]


@pytest.mark.parametrize("kwargs,error,message", CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input_raises_a_clear_error(kwargs, error, message):
    kwargs = dict(kwargs)
    base = kwargs.pop("base", logits())
    with pytest.raises(error) as info:
        proxytune.sample(base, **kwargs)
    assert message in str(info.value)


def test_combine_validates_too():
    with pytest.raises(ValueError, match="experts\\[0\\] has batch size 2"):
        proxytune.combine(logits(), [logits(2)], [logits()])
    with pytest.raises(ValueError, match="base has nan"):
        bad = logits()
        bad[0, 0] = math.nan
        proxytune.combine(bad)


def test_nan_past_the_common_vocabulary_is_ignored():
    wide = torch.cat([logits(), torch.full((B, 5), math.nan)], dim=1)
    assert proxytune.sample(wide, [logits()], [logits()], seed=0).max() < V


def test_unavailable_backend_on_explicit_request_raises():
    from proxytune import backends

    device = torch.device("meta")
    blocked = backends.Backend("blocked", ("cpu",), -1, None, None, lambda: "not built")
    backends.register(blocked)
    try:
        with pytest.raises(BackendUnavailableError, match="backend 'blocked' is unavailable: not built"):
            backends.resolve("blocked", torch.device("cpu"))
        with pytest.raises(BackendUnavailableError, match="runs on cpu tensors, but the logits are on meta"):
            backends.resolve("blocked", device)
    finally:
        backends._REGISTRY.pop("blocked")


def test_unvalidated_junk_still_gives_valid_tokens():
    junk = torch.tensor([[math.nan, math.inf, -math.inf, 1.0], [math.nan] * 4, [-math.inf] * 4, [math.inf] * 4])
    kwargs = dict(temperature=torch.tensor([-1.0, math.nan, 0.5, math.inf]), top_p=torch.tensor([0.0, math.nan, -1.0, 2.0]),
                  top_k=torch.tensor([-5, 0, 99, 1]), min_p=torch.tensor([math.nan, 2.0, -1.0, 0.5]))  # fmt: skip
    tokens, logprobs = proxytune.sample(junk, seed=1, validate=False, return_logprobs=True, **kwargs)
    assert tokens.dtype == torch.int64 and ((tokens >= 0) & (tokens < 4)).all()
    assert tokens[0] == 3  # the only finite logit; junk parameters make it greedy
    assert tokens[1:].tolist() == [0, 0, 0] and torch.isnan(logprobs[1:]).all()  # fully masked rows


def test_a_filter_that_would_keep_nothing_keeps_the_first_maximum():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    for params in [dict(top_p=torch.tensor([0.0])), dict(min_p=torch.tensor([1.5])), dict(top_p=torch.tensor([math.nan]))]:
        tokens, logprobs = proxytune.sample(x, seed=3, validate=False, return_logprobs=True, **params)
        assert tokens.item() in (1, 2) and logprobs.item() <= 0
        wide = {k: v.expand(200) for k, v in params.items()}
        assert proxytune.sample(x.expand(200, -1), seed=torch.arange(200), validate=False, **wide).unique().tolist() == [1]


DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
SPECIAL = st.sampled_from([0.0, -math.inf, 1e4, -1e4, 65000.0])


@st.composite
def op_inputs(draw, junk=False):
    batch = draw(st.integers(0, 5))
    n_pairs = draw(st.integers(0, 3))
    widths = [draw(st.integers(1, 40)) for _ in range(1 + 2 * n_pairs)]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    tensors = []
    for w in widths:
        x = torch.randn(batch, w, generator=g) * draw(st.sampled_from([0.01, 1.0, 30.0]))
        if batch and draw(st.booleans()):  # sprinkle special values
            n = draw(st.integers(1, max(1, batch * w // 2)))
            idx = torch.randint(0, batch * w, (n,), generator=g)
            x.view(-1)[idx] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e4]) if junk else SPECIAL)
        tensors.append(x.to(draw(DTYPES)))
    per_row = lambda lo, hi, dtype=torch.float32: st.one_of(  # noqa: E731
        st.floats(lo, hi), st.builds(lambda v: torch.full((batch,), v, dtype=dtype), st.floats(lo, hi))
    )
    kwargs = dict(
        temperature=draw(st.one_of(st.just(0.0), per_row(1e-6, 1e4))),
        top_k=draw(st.one_of(st.integers(0, 60), st.builds(lambda k: torch.full((batch,), k), st.integers(0, 60)))),
        top_p=draw(per_row(1e-7, 1.0)),
        min_p=draw(per_row(0.0, 0.999)),
        weights=draw(st.one_of(st.floats(-3, 3), st.lists(st.floats(-3, 3), min_size=n_pairs, max_size=n_pairs))),
        seed=draw(st.integers(-(2**63), 2**64 - 1)),
        step=draw(st.integers(0, 2**40)),
    )
    if junk:  # out-of-range per-row parameters, allowed only without validation
        kwargs["temperature"] = torch.full((batch,), draw(st.sampled_from([-1.0, math.nan, math.inf, 1e-30])))
        kwargs["top_p"] = torch.full((batch,), draw(st.sampled_from([0.0, -1.0, math.nan, 5.0])))
    return tensors[0], tensors[1 : 1 + n_pairs], tensors[1 + n_pairs :], kwargs


def check_tokens(base, experts, antis, tokens, logprobs):
    v = min(x.shape[1] for x in [base, *experts, *antis])
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert tokens.shape == logprobs.shape == (base.shape[0],)
    assert ((tokens >= 0) & (tokens < v)).all(), tokens
    assert not (logprobs > 1e-6).any(), logprobs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op_inputs())
def test_fuzz_valid_or_clear_error(inputs):
    base, experts, antis, kwargs = inputs
    try:
        tokens, logprobs = proxytune.sample(base, experts, antis, return_logprobs=True, **kwargs)
    except ValueError as e:  # only the documented refusals: masked rows, or NaN/+inf from overflowing fp16 casts
        assert "no finite combined logit" in str(e) or "logits must be finite or -inf" in str(e), e
        return
    check_tokens(base, experts, antis, tokens, logprobs)
    assert not torch.isnan(logprobs).any()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op_inputs(junk=True))
def test_fuzz_unvalidated_junk_never_gives_an_invalid_token(inputs):
    base, experts, antis, kwargs = inputs
    tokens, logprobs = proxytune.sample(base, experts, antis, return_logprobs=True, validate=False, **kwargs)
    check_tokens(base, experts, antis, tokens, logprobs)


def test_scalar_parameters_become_shared_tensors_with_the_right_values():
    from proxytune._args import normalize

    base = torch.randn(3, 50)
    kw = dict(weights=0.5, temperature=0.7, top_k=5, top_p=0.9, min_p=0.0, seed=2**64 - 1, step=2**62 + 1,
              vocab_size=None, validate=True)  # fmt: skip
    a, b = normalize(base, [], [], **kw), normalize(base, [], [], **kw)
    assert a.temperature is b.temperature and a.top_k is b.top_k  # cached: a decode loop builds nothing
    assert a.temperature.tolist() == pytest.approx([0.7] * 3) and a.temperature.dtype == torch.float32
    assert a.top_k.tolist() == [5] * 3 and a.top_k.dtype == torch.int64
    assert a.seed.tolist() == [-1] * 3 and a.step.tolist() == [2**62 + 1] * 3  # uint64 bits kept; big ints
    c = normalize(torch.randn(2, 50), [], [], **{**kw, "temperature": 1})  # int for a float parameter
    assert c.temperature.tolist() == [1.0, 1.0] and c.temperature.dtype == torch.float32
    assert normalize(base, [], [], **{**kw, "temperature": 0.8}).temperature.tolist() == pytest.approx([0.8] * 3)
    with pytest.raises(TypeError, match="top_k must be an integer"):
        normalize(base, [], [], **{**kw, "top_k": 5.0})
