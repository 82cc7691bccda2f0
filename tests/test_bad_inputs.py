"""Bad and extreme inputs to the op and the engine get one clear error naming the argument, or a defined
result; never a RuntimeError from deep inside torch, an overflow, or an out-of-range token."""

import pytest
import torch

import proxytune
from proxytune import ProxyTuner
from tiny_models import PROMPTS, tiny_trio


def logits(batch=2, width=50, seed=0):
    return torch.randn(batch, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=1e39), "temperature must be .* at most 3.4e38"),
        (dict(temperature=3.5e38), "temperature must be .* at most 3.4e38"),
        (dict(weights=1e39), r"weights must be a finite number with \|w\| <= 1e6"),
        (dict(weights=[-4e38]), r"weights must be a finite number with \|w\| <= 1e6"),
        (dict(temperature=float("nan")), "temperature must be"),
    ],
)
def test_python_numbers_past_float32_are_named(kwargs, message):
    base = logits()
    with pytest.raises(ValueError, match=message):
        proxytune.sample(base, [base], [base], seed=0, **kwargs)


def test_numbers_that_underflow_float32_keep_their_meaning():
    base = logits(4, 300)
    s = proxytune.combine(base)
    # top_p below float32's smallest value keeps the top token (ties included), like any p <= 1/V
    assert torch.equal(proxytune.sample(base, top_p=1e-50, seed=torch.arange(4)), s.argmax(dim=1))
    # a positive temperature below float32's smallest value is still a draw, at the lowest temperature
    tied = torch.zeros(4, 300)
    tied[:, [5, 9]] = 1.0  # two tied maxima: a draw picks either, greedy always the first
    drawn = {int(t) for seed in range(40) for t in proxytune.sample(tied, temperature=1e-50, seed=seed, backend="reference")}
    assert drawn == {5, 9}
    # top_k past int64 means "keep everything", like any k >= V
    for k in (2**63, 2**70):
        assert torch.equal(proxytune.sample(base, top_k=k, seed=3), proxytune.sample(base, seed=3))


def test_meta_tensors_are_refused():
    with pytest.raises(ValueError, match="base is a meta tensor"):
        proxytune.sample(torch.empty(2, 10, device="meta"))
    with pytest.raises(ValueError, match="meta tensor"):
        proxytune.combine(torch.empty(2, 10, device="meta"), validate=False)


@pytest.fixture(scope="module")
def tuner(tok):
    base, expert, anti = tiny_trio("llama")
    return ProxyTuner(base, expert, anti, tokenizer=tok)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=1e39), r"request 0: temperature must be .* 3.4e38 \(float32\), got 1e\+39"),
        (dict(weights=1e39), r"request 0: weights must be a finite number with \|w\| <= 1e6"),
        (dict(top_p=0.0), r"request 0: top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "request 0: top_k must be >= 0"),
        (dict(top_k=1.5), "request 0: top_k must be an integer"),
        (dict(temperature="hot"), "request 0: temperature must be a number"),
        (dict(stop=[None]), "request 0: stop must be a string or a sequence of non-empty strings"),
        (dict(stop=5), "request 0: stop must be a string or a sequence"),
        (dict(max_new_tokens=True), "request 0: max_new_tokens must be an integer"),
    ],
)
def test_engine_requests_with_bad_parameters_name_them(tuner, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tuner.generate(PROMPTS[0], max_new_tokens=kwargs.pop("max_new_tokens", 2), **kwargs)


def test_engine_requests_with_extreme_but_valid_parameters_run(tuner):
    for kwargs in (dict(top_k=2**70), dict(top_p=1e-50), dict(temperature=1e-50), dict(stop=None), dict(stop="xyz")):
        g = tuner.generate(PROMPTS[0], max_new_tokens=3, seed=1, **kwargs)
        assert 1 <= len(g.token_ids) <= 3 and all(0 <= t < tuner.vocab_size for t in g.token_ids)
    # top_p 1e-50 keeps the top token: the greedy answer (the tiny models have no ties)
    assert tuner.generate(PROMPTS[0], max_new_tokens=4, top_p=1e-50, seed=2).token_ids == \
        tuner.generate(PROMPTS[0], max_new_tokens=4, temperature=0).token_ids  # fmt: skip


def test_bad_prompts_are_named(tuner, tok):
    with pytest.raises(ValueError, match=r"prompt 1 is not valid Unicode text: '\\udcff' at character 3"):
        tuner.generate(["fine", "abc\udcffdef"], max_new_tokens=2)
    with pytest.raises(TypeError, match="prompt 1 must be a string or a sequence of token ids, got float"):
        tuner.generate(["fine", 3.5], max_new_tokens=2)
    with pytest.raises(TypeError, match="prompt 0: token ids must be integers"):
        tuner.generate([[1, "x"]], max_new_tokens=2)
    base, expert, anti = tiny_trio("llama")
    templated = ProxyTuner(proxytune.ModelSpec(base), [proxytune.ModelSpec(expert, template="{prompt}")], [anti],
                           tokenizer=tok)  # fmt: skip
    with pytest.raises(ValueError, match="prompt 0 is empty for expert 0 and its template adds no text"):
        templated.generate("", max_new_tokens=2)


@pytest.mark.parametrize("eos", [[None], ["2"], [-1], [True], 2.5])
def test_bad_eos_token_ids_are_named(eos, tok):
    base, expert, anti = tiny_trio("llama")
    with pytest.raises(TypeError, match="eos_token_ids must be non-negative integer token ids"):
        ProxyTuner(base, expert, anti, tokenizer=tok, eos_token_ids=eos)
