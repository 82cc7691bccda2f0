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
from tiny_models import LORA_ADAPTERS, PROMPTS, save_lora_adapter, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-members")
    big = tiny_model("llama", seed=0, hidden=64)
    small = tiny_model("llama", seed=1)
    small.save_pretrained(root / "small")
    rec = str(root / "small")
    dirs = [save_lora_adapter(small, root / name, seed, r, targets, rec) for name, (seed, r, targets) in zip("ab", LORA_ADAPTERS)]
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


@pytest.mark.parametrize("decode", ["static", "graph"])
def test_static_and_graph_decoding_are_refused_naming_the_lora_pair(family, tok, decode):
    experts, antis = adapter_pairs(copy.deepcopy(family["small"]), family["dirs"][:1], anti_source=family["small_dir"])
    ensemble = Ensemble(LocalModel.adopt(family["big"], "base"), experts, antis, tokenizer=tok)
    with pytest.raises(ValueError, match=f"decode='{decode}' is not possible: expert 0 \\(.*/a\\) is one half of "
                                         "LoRA pair 0, which runs as one stacked forward .* in the eager decoders"):
        ProxyTuner(ensemble, decode=decode)
    auto = ProxyTuner(ensemble)  # auto picks the eager decoder, and says why
    assert auto.decode == "eager" and "LoRA pair 0" in auto.decode_reason


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
    with pytest.raises(AdapterError, match="anti_expert some/other-model is not the base of expert_adapter 0"):
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
    elsewhere = save_lora_adapter(family["small"], tmp_path / "elsewhere", 9, 4, ("q_proj",), "someone/not-here")
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


# ------------------------------------------------------------------ adapters as experts through Ensemble.load


def loaded_tuner(family, tok, experts, antis, **kwargs):
    """A ProxyTuner built by Ensemble.load over a copy of the large base (load_model moves a model in place)."""
    return ProxyTuner(copy.deepcopy(family["big"]), experts, antis, tokenizer=tok, dtype="float32", device="cpu", **kwargs)


@pytest.mark.parametrize("n", [1, 2], ids=["one adapter", "two adapters"])
def test_model_spec_adapters_equal_the_merged_two_model_path(family, tok, n):
    """``ModelSpec(adapter=D)`` experts with the anti-expert named, left out (None, or no list: the recorded
    base) or both: one group over one loaded base, the members in the model order, the merged two-model path's
    greedy tokens (left-padded batch, per-row weights)."""
    from proxytune.engine.adapter_members import AdapterMember
    from proxytune.engine.ensemble import role_names
    from proxytune.engine.loading import ModelSpec

    _, two = tuners(family, tok, n)
    weights = [[1.0], [0.5], [2.0], [1.5]] if n == 1 else [[1.0, 0.5], [0.25, 1.5], [2.0, 0.0], [0.75, 0.75]]
    params = [SamplingParams(temperature=0.0, max_new_tokens=8, weights=w) for w in weights]
    want = [g.token_ids for g in two.generate(PROMPTS, params)]
    experts = [ModelSpec(adapter=d) for d in family["dirs"][:n]]
    for antis in ([family["small_dir"]] * n, None, (), [None, family["small_dir"]][:n]):
        tuner = loaded_tuner(family, tok, experts, antis)
        pair_members = tuner.experts + tuner.anti_experts
        assert all(isinstance(m, AdapterMember) for m in pair_members) and len({id(m.group) for m in pair_members}) == 1
        assert [m.name for m in tuner.models] == role_names(n) and tuner.decode == "eager"
        assert [g.token_ids for g in tuner.generate(PROMPTS, params)] == want, antis


def test_adapter_and_model_experts_mix_and_groups_follow_the_anti_expert(family, tok, tmp_path):
    """An adapter expert beside an ordinary one (anti-experts one per pair, or one per ordinary expert); two
    adapters over two copies of their base (other directories, same weights) are two groups."""
    from proxytune.engine.loading import ModelSpec

    _, two = tuners(family, tok, 2)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, weights=[1.0, 0.5])
    want = [g.token_ids for g in two.generate(PROMPTS, params)]
    for antis in ([family["small_dir"], family["small"]], [family["small"]]):
        tuner = loaded_tuner(family, tok, [ModelSpec(adapter=family["dirs"][0]), family["merged"][1]], antis)
        assert type(tuner.experts[0]).__name__ == "AdapterMember" and isinstance(tuner.experts[1], LocalModel)
        assert [g.token_ids for g in tuner.generate(PROMPTS, params)] == want
    copy_dir = tmp_path / "small-copy"
    family["small"].save_pretrained(copy_dir)  # not the recorded base's directory: its weights are compared
    tuner = loaded_tuner(family, tok, [ModelSpec(adapter=d) for d in family["dirs"]], [family["small_dir"], copy_dir])
    assert tuner.experts[0].group is not tuner.experts[1].group
    assert [g.token_ids for g in tuner.generate(PROMPTS, params)] == want


def test_a_peft_model_as_an_expert_runs_over_its_own_base(family, tok):
    from proxytune.engine.adapters import AdapterError

    _, two = tuners(family, tok, 1)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    want = [g.token_ids for g in two.generate(PROMPTS, params)]
    model = peft.PeftModel.from_pretrained(copy.deepcopy(family["small"]), family["dirs"][0])
    tuner = loaded_tuner(family, tok, [model], None)
    assert tuner.experts[0].group.model is model
    assert [g.token_ids for g in tuner.generate(PROMPTS, params)] == want
    model = peft.PeftModel.from_pretrained(copy.deepcopy(family["small"]), family["dirs"][0])
    with pytest.raises(AdapterError, match="anti-expert 0 .* is not the base of expert 0 <PeftModel adapter 'default'>"):
        loaded_tuner(family, tok, [model], [tiny_model("llama", seed=7)])


def test_bad_adapter_experts_are_clear_errors(family, tok, tmp_path):
    """Each names the argument: before any model loads for the spec and pairing errors; an anti-expert that is
    not the adapter's base (same config, other weights) when it has loaded."""
    from proxytune.engine.loading import ModelSpec

    d0, d1, small = family["dirs"][0], family["dirs"][1], family["small_dir"]
    other = tmp_path / "other"
    tiny_model("llama", seed=7).save_pretrained(other)
    cases = [
        ([ModelSpec(small, adapter=d0)], [small], "expert 0: give model= or adapter=, not both"),
        ([ModelSpec(adapter=tmp_path / "nowhere")], None, "expert 0: no such adapter directory"),
        ([ModelSpec(adapter=d0, template="chat")], None, "expert 0: a LoRA adapter takes no template"),
        ([family["merged"][0]], None, "anti-experts: pair 0 has no anti-expert"),
        ([ModelSpec(adapter=d0), ModelSpec(adapter=d1)], [small] * 3,
         "got 0 experts and 2 adapter experts but 3 anti-experts; give one per pair, or one per ordinary expert"),
        ([ModelSpec(adapter=d0)], [ModelSpec(adapter=d1)], "anti-expert 0: an anti-expert is a model, not an adapter"),
        ([ModelSpec(adapter=d0)], [ModelSpec(small, template="chat")], "anti-expert 0: the base of a LoRA adapter .* no template"),
        ([ModelSpec(adapter=d0)], [str(other)], f"anti-expert 0 {other} is not the base of expert 0 {d0} .*different weights"),
    ]  # fmt: skip
    for experts, antis, message in cases:
        with pytest.raises(ValueError, match=message):
            loaded_tuner(family, tok, experts, antis)
    with pytest.raises(ValueError, match="base: adapter= is for experts only"):
        ProxyTuner(ModelSpec(adapter=d0), tokenizer=tok)


def test_a_model_object_an_adapter_runs_over_cannot_also_be_a_plain_member(family, tok):
    """PEFT wraps an adapter pair's base model in place: the same object as another role would run with the
    adapter on, so it is refused before anything loads, naming both roles (a directory, loaded twice, is fine)."""
    from proxytune.engine.loading import ModelLoadError, ModelSpec

    small = copy.deepcopy(family["small"])
    adapter = ModelSpec(adapter=family["dirs"][0])
    with pytest.raises(ModelLoadError, match="anti-expert 0: the same model object is also the anti-expert 1"):
        loaded_tuner(family, tok, [adapter, family["merged"][1]], [small, small])
    with pytest.raises(ModelLoadError, match="anti-expert 0: the same model object is also the base"):
        ProxyTuner(small, [adapter], [small], tokenizer=tok)
    peft_expert = peft.PeftModel.from_pretrained(copy.deepcopy(family["small"]), family["dirs"][0])
    with pytest.raises(ModelLoadError, match="anti-expert 0: the same model object is also the anti-expert 1"):
        loaded_tuner(family, tok, [peft_expert, family["merged"][1]], [None, peft_expert.get_base_model()])
    assert not any("lora" in n for n, _ in small.named_modules())  # refused before PEFT touched it
    tuner = loaded_tuner(family, tok, [adapter, family["merged"][1]], [family["small_dir"], family["small_dir"]])
    assert tuner.anti_experts[1].module is not tuner.anti_experts[0].group.model.get_base_model()
