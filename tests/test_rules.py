"""One rule, one answer: pair weights, batch sizes and boolean flags give the same error at every entry point
(the op, ProxyTuner and its requests, score, the Hugging Face processor, lm-eval, vllm-config, the CLI)."""

import math

import pytest
import torch

import proxytune
from proxytune import ProxyTuner
from proxytune._rules import MAX_WEIGHT, WEIGHT_RULE, check_weights, parse_bool
from tiny_models import PROMPTS, tiny_trio

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BAD_WEIGHTS = [(True, TypeError), ("1", TypeError), (math.nan, ValueError), (math.inf, ValueError),
               (-math.inf, ValueError), (3e38, ValueError), (-1.5e6, ValueError), (1e39, ValueError)]  # fmt: skip


@pytest.fixture(scope="module")
def trio():
    return tiny_trio("llama")


@pytest.fixture(scope="module")
def tuner(trio, tok):
    base, expert, anti = trio
    return ProxyTuner(base, expert, anti, tokenizer=tok)


def entry_points(trio, tok, tuner):
    """Each entry point as a function of one weight value."""
    from proxytune.integrations.hf import ProxyTuningLogitsProcessor

    base, expert, anti = trio
    x = torch.randn(2, 20, generator=torch.Generator().manual_seed(0))
    points = {
        "op combine": lambda w: proxytune.combine(x, [x], [x], weights=w),
        "op sample": lambda w: proxytune.sample(x, [x], [x], weights=[w], seed=0),
        "ProxyTuner": lambda w: ProxyTuner(base, expert, anti, tokenizer=tok, weights=w),
        "generate": lambda w: tuner.generate(PROMPTS[0], max_new_tokens=1, weights=w),
        "score": lambda w: tuner.score(PROMPTS[0], " x", weights=w),
        "hf processor": lambda w: ProxyTuningLogitsProcessor(expert, anti, weights=w),
    }
    try:
        from proxytune.integrations.lm_eval import ProxyTuneLM

        points["lm-eval"] = lambda w: ProxyTuneLM(base="/nowhere", expert="/e", anti_expert="/a", weights=w)
    except ImportError:
        pass
    from proxytune.integrations.vllm.config import write_model_dir

    points["vllm-config"] = lambda w: write_model_dir("/nowhere/out", "/nowhere/b", ["/e"], ["/a"], [w])
    return points


@pytest.mark.parametrize("value, error", BAD_WEIGHTS)
def test_a_bad_weight_gets_one_answer_everywhere(value, error, trio, tok, tuner):
    for where, call in entry_points(trio, tok, tuner).items():
        if where == "lm-eval" and isinstance(value, str):
            continue  # model args arrive as text there: "1" is the weight 1.0
        with pytest.raises(error) as info:
            call(value)
        assert WEIGHT_RULE in str(info.value) and "weights" in str(info.value), (where, info.value)


def test_weights_at_the_bound_run_and_past_it_are_refused(tuner):
    x = torch.randn(3, 30, generator=torch.Generator().manual_seed(1))
    e = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    s = proxytune.combine(x, [e], [x], weights=-MAX_WEIGHT)  # defined and finite at the bound
    assert torch.isfinite(s).all()
    assert tuner.generate(PROMPTS[0], max_new_tokens=2, weights=MAX_WEIGHT, temperature=0).token_ids
    # the case: 3e38 made the expert's favourite token (and every other it preferred) -inf
    with pytest.raises(ValueError, match="weights must be a finite number with"):
        proxytune.combine(torch.zeros(1, 5), [torch.tensor([[0.0, 2, 3, 0, 0]])], [torch.zeros(1, 5)], weights=3e38)
    # per-row weight tensors are held to the same bound when validated (validate=False: the semantics' rule)
    with pytest.raises(ValueError, match=r"weights must be finite and \|w\| <= 1e6; row 1"):
        proxytune.combine(x, [e], [x], weights=torch.tensor([1.0, 2e6, 0.0]))
    proxytune.combine(x, [e], [x], weights=torch.tensor([1.0, 2e6, 0.0]), validate=False)


def test_one_weight_or_one_per_pair():
    assert check_weights(0.5, 2) == [0.5, 0.5] == check_weights([0.5], 2)
    assert check_weights((1, -2.0), 2) == [1.0, -2.0]
    with pytest.raises(ValueError, match="weights must be one number for every pair or one per pair \\(2\\), got 3"):
        check_weights([1.0, 2.0, 3.0], 2)


def test_a_weight_with_nothing_to_weigh_is_refused(trio, tok):
    base = trio[0]
    alone = ProxyTuner(base, tokenizer=tok)
    for call in (lambda: alone.score(PROMPTS[0], " x", weights=0.5),
                 lambda: alone.generate(PROMPTS[0], max_new_tokens=1, weights=0.5),
                 lambda: ProxyTuner(base, tokenizer=tok, weights=0.5)):  # fmt: skip
        with pytest.raises(ValueError, match="no \\(expert, anti-expert\\) pair to weigh"):
            call()
    assert alone.score(PROMPTS[0], " x").token_ids  # no weight: fine


@pytest.mark.parametrize("value", [True, False, 0, -1, 2.0, "2"])
def test_a_bad_batch_size_gets_one_answer(value, tuner):
    for call in (lambda: tuner.generate(PROMPTS[:2], max_new_tokens=1, batch_size=value),
                 lambda: tuner.score(PROMPTS[:2], [" x", " y"], batch_size=value)):  # fmt: skip
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            call()


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("1", True), ("0", False), (True, True), (0, False)])
def test_booleans_parse_strictly(text, value):
    assert parse_bool(text, "flag") is value


@pytest.mark.parametrize("text", ["no", "off", "yes", "on", "", "2", 2, None, 0.0])
def test_booleans_refuse_everything_else(text):
    with pytest.raises(ValueError, match="flag must be true or false"):
        parse_bool(text, "flag")


def test_python_flags_must_be_bools(trio, tok):
    base = trio[0]
    with pytest.raises(TypeError, match="trust_remote_code must be True or False, got 'no'"):
        ProxyTuner(base, tokenizer=tok, trust_remote_code="no")


def test_dtype_and_device_are_checked_up_front(trio, tok):
    base = trio[0]
    for dtype in (torch.float64, "float64", torch.int8):
        with pytest.raises(ValueError, match="dtype must be one of"):
            ProxyTuner(base, tokenizer=tok, dtype=dtype)
    with pytest.raises(ValueError, match="device meta .* no data"):
        ProxyTuner(base, tokenizer=tok, device="meta")
    with pytest.raises(ValueError, match="device meta .* no data"):
        ProxyTuner(proxytune.ModelSpec(base, device="meta"), tokenizer=tok)
    with pytest.raises(ValueError, match="backend"):
        ProxyTuner(base, tokenizer=tok, backend="bogus")
