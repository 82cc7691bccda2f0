"""LoRA pairs as ensemble members (proxytune.engine.adapter_members) through ProxyTuner: the same greedy tokens
and scores as the two-model path (each adapter merged into a copy of the small base, the untouched base as
anti-expert), for one and two adapters, left-padded batches, per-row weights and rows that end early."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")

from proxytune import Ensemble, ProxyTuner, SamplingParams  # noqa: E402
from proxytune.engine.adapter_members import adapter_pairs  # noqa: E402
from proxytune.engine.members import LocalModel  # noqa: E402
from tiny_models import PROMPTS, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_adapter(base, directory, seed: int, r: int, targets, recorded: str) -> str:
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=False, task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.peft_config["default"].base_model_name_or_path = recorded
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-members")
    big = tiny_model("llama", seed=0, hidden=64)
    small = tiny_model("llama", seed=1)
    small.save_pretrained(root / "small")
    rec = str(root / "small")
    dirs = [make_adapter(small, root / "a", 2, 4, ("q_proj", "v_proj", "down_proj"), rec),
            make_adapter(small, root / "b", 3, 8, ("k_proj", "o_proj", "gate_proj", "up_proj"), rec)]  # fmt: skip
    merged = [peft.PeftModel.from_pretrained(copy.deepcopy(small), d).merge_and_unload().eval() for d in dirs]
    return {"big": big, "small": small, "small_dir": str(root / "small"), "dirs": dirs, "merged": merged}


def tuners(family, tok, n: int, weights=None):
    """(stacked, two-model) tuners with the first ``n`` adapters."""
    experts, antis = adapter_pairs(copy.deepcopy(family["small"]), family["dirs"][:n], anti_source=family["small_dir"])
    big = LocalModel.adopt(family["big"], "base")
    stacked = ProxyTuner(Ensemble(big, experts, antis, tokenizer=tok, weights=weights))
    two = ProxyTuner(family["big"], family["merged"][:n], [family["small"]] * n, tokenizer=tok, decode="eager",
                     weights=weights)  # fmt: skip
    return stacked, two


@pytest.mark.parametrize("n", [1, 2], ids=["one adapter", "two adapters"])
def test_greedy_tokens_equal_the_merged_two_model_path(family, tok, n):
    stacked, two = tuners(family, tok, n)
    assert stacked.decode == "eager"
    weights = [[1.0], [0.5], [2.0], [1.5]] if n == 1 else [[1.0, 0.5], [0.25, 1.5], [2.0, 0.0], [0.75, 0.75]]
    params = [SamplingParams(temperature=0.0, max_new_tokens=10, weights=w) for w in weights]  # per-row weights
    want = two.generate(PROMPTS, params)
    got = stacked.generate(PROMPTS, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    # rows that end early: a token the two-model path emits mid-way becomes an EOS id of both tuners
    stop_id = want[0].token_ids[3]
    for t in (stacked, two):
        t.eos_token_ids = set(t.eos_token_ids) | {stop_id}
    want = two.generate(PROMPTS, params)
    got = stacked.generate(PROMPTS, params)
    assert [(g.token_ids, g.finish_reason) for g in got] == [(w.token_ids, w.finish_reason) for w in want]
    assert {w.finish_reason for w in want} == {"stop", "length"} or len({len(w.token_ids) for w in want}) > 1


def test_score_equals_the_merged_two_model_path(family, tok):
    stacked, two = tuners(family, tok, 2, weights=[1.0, 0.5])
    got = stacked.score(PROMPTS, [" the", " fox jumps", " a model", " over"])
    want = two.score(PROMPTS, [" the", " fox jumps", " a model", " over"])
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and g.is_greedy == w.is_greedy
        assert g.token_logprobs == pytest.approx(w.token_logprobs, abs=1e-4)


def test_static_decoding_is_refused_for_now(family, tok):
    experts, antis = adapter_pairs(copy.deepcopy(family["small"]), family["dirs"][:1], anti_source=family["small_dir"])
    ensemble = Ensemble(LocalModel.adopt(family["big"], "base"), experts, antis, tokenizer=tok)
    with pytest.raises(ValueError, match="decode='static' is not possible: expert 0 is not a local model"):
        ProxyTuner(ensemble, decode="static")


@pytest.mark.parametrize("n", [1, 2], ids=["one adapter", "two adapters"])
def test_speculative_decoding_with_an_adapter_expert_drafting(family, tok, n):
    """Greedy speculation gives the plain engine's ids; with an adapter pair drafting it gives the merged
    two-model path's. The drafts feed every stacked row: one small forward per draft for all pairs, and the
    anti-expert's verification costs one forward more per round (counted)."""
    stacked, two = tuners(family, tok, n)
    weights = [[1.0], [0.5], [2.0], [1.5]] if n == 1 else [[1.0, 0.5], [0.25, 1.5], [2.0, 0.0], [0.75, 0.75]]
    params = [SamplingParams(temperature=0.0, max_new_tokens=12, weights=w) for w in weights]
    want = [g.token_ids for g in two.generate(PROMPTS, params)]
    spec = ProxyTuner(stacked.ensemble, speculative_tokens=3)
    calls = []
    group = stacked.ensemble.experts[0].group
    handle = group.model.get_base_model().register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        got = [g.token_ids for g in spec.generate(PROMPTS, params)]
    finally:
        handle.remove()
    assert got == want
    plain = [g.token_ids for g in ProxyTuner(stacked.ensemble).generate(PROMPTS, params)]
    assert plain == want
    two_spec, small_calls = ProxyTuner(two.ensemble, speculative_tokens=3), []
    smalls = {id(m): m for m in [*family["merged"][:n], family["small"]]}.values()
    handles = [m.register_forward_hook(lambda m, a, o: small_calls.append(1)) for m in smalls]
    try:
        assert [g.token_ids for g in two_spec.generate(PROMPTS, params)] == want
    finally:
        for h in handles:
            h.remove()
    assert 0 < len(calls) < len(small_calls)  # one stacked forward where the two-model path runs two or more
    sampled = spec.generate(PROMPTS, SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=9, seed=5))
    assert all(len(g.token_ids) == 9 or g.finish_reason == "stop" for g in sampled)


def test_an_anti_expert_that_is_not_the_adapters_base_is_refused(family, tok):
    from proxytune.engine.adapters import AdapterError

    other = tiny_model("llama", seed=7)
    with pytest.raises(AdapterError, match="anti_expert .* is not the base of expert_adapter 0"):
        adapter_pairs(other, family["dirs"][:1], anti_source="some/other-model")


def test_the_shipped_tinyworld_adapter_through_the_member_answers_as_recorded():
    """The proof run's LoRA proxy (weight 1) was measured through a merged expert
    (benchmarks/results/tinyworld_lora.json); the adapter member gives the same answers to the first 200
    held-out questions (all 800 with -m slow would take about four times as long)."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxytune.tinyworld import default_models_dir, model_path
    from proxytune.tinyworld.evaluation import answer, world_of

    recorded = Path(__file__).parent.parent / "benchmarks" / "results" / "tinyworld_lora.json"
    lora_dir = default_models_dir() / "small-lora"
    if not recorded.exists() or not (lora_dir / "adapter_config.json").exists():
        pytest.skip("no recorded LoRA run or no shipped adapter here")
    want = json.loads(recorded.read_text())["outputs"]["proxy-tuned large (LoRA expert), weight 1"][:200]
    load = lambda role: AutoModelForCausalLM.from_pretrained(model_path(role), dtype=torch.float32).eval()  # noqa: E731
    experts, antis = adapter_pairs(load("small_base"), [lora_dir], anti_source=model_path("small_base"))
    tuner = ProxyTuner(Ensemble(LocalModel.adopt(load("large_base"), "base"), experts, antis,
                                tokenizer=AutoTokenizer.from_pretrained(model_path("small_base"))))  # fmt: skip
    prompts = [q.prompt for q in world_of().eval_questions()[:200]]
    assert answer(tuner, prompts, batch_size=100) == want


def test_load_adapter_pairs_loads_the_recorded_base(family, tok, tmp_path):
    """No anti-expert named: the adapters' recorded base is loaded (with its tokenizer); a recorded base that
    is not here, with none named, is a clear error; PEFT's own mixed batch gives the same tokens."""
    from proxytune.engine.adapter_members import load_adapter_pairs
    from proxytune.engine.adapters import AdapterError

    tok.save_pretrained(family["small_dir"])
    experts, antis = load_adapter_pairs(family["dirs"], dtype="float32", device="cpu")
    assert antis[0].source == family["small_dir"] and experts[0].tokenizer is not None
    params = SamplingParams(temperature=0.0, max_new_tokens=8, weights=[1.0, 0.5])
    got = ProxyTuner(Ensemble(LocalModel.adopt(family["big"], "base"), experts, antis)).generate(PROMPTS, params)
    _, two = tuners(family, tok, 2)
    want = two.generate(PROMPTS, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    experts, antis = load_adapter_pairs(family["dirs"], family["small_dir"], mixed="peft")
    peft_way = ProxyTuner(Ensemble(LocalModel.adopt(family["big"], "base"), experts, antis)).generate(PROMPTS, params)
    assert experts[0].group.mixed == "peft" and [g.token_ids for g in peft_way] == [w.token_ids for w in want]
    elsewhere = make_adapter(family["small"], tmp_path / "elsewhere", 9, 4, ("q_proj",), "someone/not-here")
    with pytest.raises(AdapterError, match="anti_expert: not given, and the adapters' recorded base 'someone/not-here'"):
        load_adapter_pairs([elsewhere])


def test_load_adapter_pairs_takes_a_peft_models_own_base(family, tok):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(family["small"]), family["dirs"][0], adapter_name="a")
    model.load_adapter(family["dirs"][1], adapter_name="b")
    from proxytune.engine.adapter_members import load_adapter_pairs
    from proxytune.engine.adapters import read_adapter

    experts, antis = load_adapter_pairs([read_adapter(model, adapter_name="a"), read_adapter(model, adapter_name="b")])
    params = SamplingParams(temperature=0.0, max_new_tokens=6, weights=[0.5, 1.0])
    got = ProxyTuner(Ensemble(LocalModel.adopt(family["big"], "base"), experts, antis, tokenizer=tok)).generate(PROMPTS, params)
    _, two = tuners(family, tok, 2)
    assert [g.token_ids for g in got] == [w.token_ids for w in two.generate(PROMPTS, params)]
