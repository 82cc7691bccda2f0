"""LoRA experts (proxytune.engine.adapters): reading and checking adapters, and the stacked forward.

The references: an expert made by ``merge_and_unload()`` on a copy of the small base, and the untouched base
as anti-expert, each run as its own model through the engine's ModelRunner. Adapters are made by PEFT in the
test with ``init_lora_weights=False`` (random, non-zero B: the adapter changes the logits).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")

from proxytune.engine.adapters import AdapterError, check_adapter, read_adapter, weight_fingerprint  # noqa: E402
from proxytune.engine.stacked_adapters import StackedAdapterRunner, stack_adapters  # noqa: E402
from proxytune.engine.members import LocalModel  # noqa: E402
from proxytune.engine.runner import ModelRunner  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 2e-5  # fp32: merged (W + s BA) x against W x + s B(A x), a few ulps of logits of size ~1


def tiny_llama(seed: int = 0, vocab: int = 96, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 8,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def make_adapter(base, directory, seed: int, r: int = 4, targets=("q_proj", "v_proj", "down_proj"),
                 recorded_base: str | None = None, **extra) -> str:  # fmt: skip
    """A LoRA adapter on a copy of ``base`` with random non-zero A and B, saved to ``directory``."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0,
                             init_lora_weights=False, task_type="CAUSAL_LM", **extra)  # fmt: skip
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # large enough that the adapter moves the logits well past ATOL
            elif "modules_to_save" in name:  # a whole trained module (a copy of the base's): moved too
                p.add_(torch.randn_like(p), alpha=0.2)
    if recorded_base is not None:
        model.peft_config["default"].base_model_name_or_path = recorded_base
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def merged(base, directory):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).merge_and_unload().eval()


def runner_of(module):
    return ModelRunner(LocalModel.adopt(module, "reference"))


def left_padded(seed: int, lengths, vocab: int = 96):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = torch.randint(2, vocab, (n,), generator=g)
        mask[r, width - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def base():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def adapter_dirs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base_dir = root / "base"
    base.save_pretrained(base_dir, safe_serialization=True)
    a = make_adapter(base, root / "a", seed=1, recorded_base=str(base_dir))
    b = make_adapter(base, root / "b", seed=2, r=8, targets=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"),
                     recorded_base=str(base_dir))  # fmt: skip
    return {"base": str(base_dir), "a": a, "b": b, "root": root}


def stacked_runner(base, dirs, mixed="auto"):
    adapters = [read_adapter(d) for d in dirs]
    model, names = stack_adapters(copy.deepcopy(base), adapters)
    return StackedAdapterRunner(model, names, mixed=mixed)


MIXED = pytest.mark.parametrize("mixed", ["slices", "peft"])  # the adapters on row groups: our hooks, PEFT's own


@MIXED
@pytest.mark.parametrize("which", [["a"], ["a", "b"]], ids=["one adapter", "two adapters"])
def test_stacked_forward_equals_merged_experts_and_base(base, adapter_dirs, which, mixed):
    """Prefill of a left-padded batch, decode steps with the cache, rows dropped mid-way: every expert's rows
    equal its merged model's, the base rows the untouched base's, within fp32 rounding."""
    dirs = [adapter_dirs[k] for k in which]
    stacked = stacked_runner(base, dirs, mixed)
    assert stacked.mixed == mixed
    refs = [runner_of(merged(base, d)) for d in dirs] + [runner_of(copy.deepcopy(base))]
    ids, mask = left_padded(3, [7, 3, 5, 1])
    got = stacked.prefill(ids, mask)
    want = [r.prefill(ids, mask) for r in refs]
    assert got.stacked.shape == (len(dirs) + 1, 4, 96)
    for g, w in zip(got.experts + [got.anti], want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    moved = (got.experts[0] - got.anti).abs().max()
    assert moved > 100 * ATOL, "the adapter must change the logits for this test to mean anything"
    g = torch.Generator().manual_seed(4)
    for step in range(6):
        if step == 2:  # rows 1 and 3 finish; the rest go on, in a new order
            keep = torch.tensor([2, 0])
            stacked.select(keep)
            for r in refs:
                r.select(keep)
        tokens = torch.randint(2, 96, (stacked.batch,), generator=g)
        got = stacked.step(tokens)
        want = [r.step(tokens) for r in refs]
        for gg, w in zip(got.experts + [got.anti], want):
            torch.testing.assert_close(gg, w, atol=ATOL, rtol=0)


@MIXED
def test_extend_and_rollback_equal_merged(base, adapter_dirs, mixed):
    """Speculation's calls: extend by k tokens, roll back per row, step on; same as the merged models'."""
    dirs = [adapter_dirs["a"], adapter_dirs["b"]]
    stacked = stacked_runner(base, dirs, mixed)
    refs = [runner_of(merged(base, d)) for d in dirs] + [runner_of(copy.deepcopy(base))]
    ids, mask = left_padded(5, [4, 6, 2])
    stacked.prefill(ids, mask)
    for r in refs:
        r.prefill(ids, mask)
    drafts = torch.randint(2, 96, (3, 4), generator=torch.Generator().manual_seed(6))
    got = stacked.extend(drafts)
    want = [r.extend(drafts) for r in refs]
    assert got.stacked.shape == (3, 3, 4, 96)
    for g, w in zip(got.experts + [got.anti], want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
    kept = torch.tensor([1, 3, 0])
    stacked.rollback(4, kept)
    for r in refs:
        r.rollback(4, kept)
    tokens = torch.tensor([5, 6, 7])
    got = stacked.step(tokens)
    for g, w in zip(got.experts + [got.anti], [r.step(tokens) for r in refs]):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


@MIXED
def test_score_logits_equal_merged(base, adapter_dirs, mixed):
    dirs = [adapter_dirs["a"], adapter_dirs["b"]]
    stacked = stacked_runner(base, dirs, mixed)
    ids, mask = left_padded(8, [5, 9, 3])
    got = stacked.score_logits(ids, mask, keep=3)
    models = [merged(base, d) for d in dirs] + [copy.deepcopy(base)]
    for g, m in zip(got.experts + [got.anti], models):
        torch.testing.assert_close(g, LocalModel.adopt(m, "ref").score_logits(ids, mask, 3), atol=ATOL, rtol=0)


@MIXED
def test_greedy_proxy_tokens_equal_the_two_model_path(base, adapter_dirs, mixed):
    """Per-row weights, greedy: base + sum_i w_i (expert_i - anti) from the stacked runner picks the same
    tokens as from merged experts run as separate models (the combination itself is the engine's)."""
    dirs = [adapter_dirs["a"], adapter_dirs["b"]]
    big = tiny_llama(9, hidden=48)
    stacked = stacked_runner(base, dirs, mixed)
    refs = [runner_of(merged(base, d)) for d in dirs] + [runner_of(copy.deepcopy(base))]
    big_a, big_b = runner_of(big), runner_of(copy.deepcopy(big))
    ids, mask = left_padded(10, [6, 2, 4])
    w = torch.tensor([[1.0, 0.5], [0.25, 2.0], [1.5, 0.0]])  # [B, pairs]

    def combine(b, experts, anti):
        return b + sum(w[:, i, None] * (e - anti) for i, e in enumerate(experts))

    s = stacked.prefill(ids, mask)
    x = combine(big_a.prefill(ids, mask), s.experts, s.anti)
    r = [ref.prefill(ids, mask) for ref in refs]
    y = combine(big_b.prefill(ids, mask), r[:-1], r[-1])
    got, want = [], []
    for _ in range(8):
        tx, ty = x.argmax(-1), y.argmax(-1)
        got.append(tx)
        want.append(ty)
        s = stacked.step(tx)
        x = combine(big_a.step(tx), s.experts, s.anti)
        r = [ref.step(ty) for ref in refs]
        y = combine(big_b.step(ty), r[:-1], r[-1])
    assert torch.equal(torch.stack(got), torch.stack(want))


def test_a_loaded_peft_model_with_two_adapters_stacks_in_place(base, adapter_dirs):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter_dirs["a"], adapter_name="a")
    model.load_adapter(adapter_dirs["b"], adapter_name="b")
    adapters = [read_adapter(model, adapter_name="a"), read_adapter(model, adapter_name="b")]
    stacked_model, names = stack_adapters(None, adapters, names=["a", "b"])
    assert stacked_model is model
    runner = StackedAdapterRunner(stacked_model, names)
    assert runner.mixed == "slices"
    ids, mask = left_padded(11, [3, 5])
    got = runner.prefill(ids, mask)
    for g, m in zip(got.experts + [got.anti], [merged(base, adapter_dirs["a"]), merged(base, adapter_dirs["b"]), base]):
        torch.testing.assert_close(g, runner_of(m).prefill(ids, mask), atol=ATOL, rtol=0)
    check_adapter(adapters[0], copy.deepcopy(base), "some/copy")  # the same weights: accepted
    with pytest.raises(AdapterError, match="anti_expert .* is not the base of"):
        check_adapter(adapters[0], tiny_llama(1), "other")


# ----------------------------------------------------------------------------------------------- bad input


def test_the_recorded_base_by_path_and_by_weights(base, adapter_dirs, tmp_path):
    a = read_adapter(adapter_dirs["a"])
    assert a.recorded_base == adapter_dirs["base"]
    check_adapter(a, base, adapter_dirs["base"])  # the same path
    copy_dir = tmp_path / "copy"
    copy.deepcopy(base).to(torch.float16).save_pretrained(copy_dir)  # another path, the same weights in fp16...
    with pytest.raises(AdapterError, match="different weights"):  # ...are not the same weights once rounded
        check_adapter(a, base.__class__.from_pretrained(copy_dir, dtype=torch.float32), str(copy_dir))
    base.save_pretrained(tmp_path / "exact")
    check_adapter(a, base.__class__.from_pretrained(tmp_path / "exact", dtype=torch.float32), str(tmp_path / "exact"))
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    with pytest.raises(AdapterError, match=r"anti_expert tuned-copy is not the base of expert_adapter .*different weights"):
        check_adapter(a, tuned, "tuned-copy")
    assert weight_fingerprint(adapter_dirs["base"]) == weight_fingerprint(base) != weight_fingerprint(tuned)


def test_a_recorded_base_not_on_this_machine_is_refused(base, tmp_path):
    d = make_adapter(base, tmp_path / "hub", seed=3, recorded_base="someone/never-downloaded-model")
    with pytest.raises(AdapterError, match="records 'someone/never-downloaded-model', which is not on this machine"):
        check_adapter(read_adapter(d), base, "local/base")
    check_adapter(read_adapter(d), base, "someone/never-downloaded-model")  # named as recorded: accepted


def test_a_relative_recorded_base_is_read_from_the_adapter_directory(base, tmp_path):
    base.save_pretrained(tmp_path / "small-base")
    d = make_adapter(base, tmp_path / "small-lora", seed=4, recorded_base="../small-base")
    check_adapter(read_adapter(d), base, str(tmp_path / "small-base"))


def test_missing_files_are_clear_errors(base, adapter_dirs, tmp_path):
    with pytest.raises(AdapterError, match="expert_adapter: no such adapter directory"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        read_adapter(tmp_path / "empty")
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "adapter_config.json").write_text((adapter_dirs["root"] / "a" / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        read_adapter(d, argument="--expert-adapter")
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickled weights"):
        read_adapter(d)
    with pytest.raises(AdapterError, match="is a file"):
        read_adapter(d / "adapter_config.json")
    (d / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError, match="cannot read"):
        read_adapter(d)


def test_a_non_lora_adapter_is_refused(adapter_dirs, tmp_path):
    d = tmp_path / "ia3"
    d.mkdir()
    cfg = json.loads((adapter_dirs["root"] / "a" / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    os.link(adapter_dirs["root"] / "a" / "adapter_model.safetensors", d / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="IA3 adapter; only LoRA"):
        read_adapter(d)


def test_an_adapter_for_another_architecture_is_refused(base, tmp_path):
    wide = tiny_llama(5, hidden=64)
    d = make_adapter(wide, tmp_path / "wide", seed=6)
    wrong_width = r"expert_adapter .* is for another architecture: model\.layers\.0\.\S+ takes \d+ inputs in the adapter"
    with pytest.raises(AdapterError, match=wrong_width):
        check_adapter(read_adapter(d), base)
    deep = tiny_llama(5, layers=3)
    d = make_adapter(deep, tmp_path / "deep", seed=6)
    with pytest.raises(AdapterError, match="another architecture: it adapts model.layers.2"):
        check_adapter(read_adapter(d), base)
    with pytest.raises(AdapterError, match="another architecture"):  # stacking checks too
        stack_adapters(copy.deepcopy(base), [read_adapter(d)])


def test_an_adapter_for_another_vocabulary_is_refused(base, tmp_path):
    other = tiny_llama(0, vocab=128)
    d = make_adapter(other, tmp_path / "head", seed=7, targets=("q_proj", "lm_head"))
    with pytest.raises(AdapterError, match=r"another vocabulary: lm_head.*128"):
        check_adapter(read_adapter(d), base)
    d = make_adapter(other, tmp_path / "emb", seed=7, targets=("q_proj", "embed_tokens"))
    with pytest.raises(AdapterError, match="another vocabulary"):
        check_adapter(read_adapter(d), base)
    other.save_pretrained(tmp_path / "other-base")  # only attention adapted, but the recorded base says it
    d = make_adapter(other, tmp_path / "recorded", seed=7, targets=("q_proj",), recorded_base=str(tmp_path / "other-base"))
    with pytest.raises(AdapterError, match="another vocabulary: its base has 128 tokens, anti_expert 96"):
        check_adapter(read_adapter(d), base)


def test_the_shipped_tinyworld_adapter_is_checked_against_its_sibling_base():
    """models/small-lora records ../small-base: accepted with the small base, refused with the small tuned
    model (the same config, other weights); its stacked rows equal the merged expert's."""
    from transformers import AutoModelForCausalLM

    from proxytune.tinyworld import default_models_dir, model_path

    lora_dir = default_models_dir() / "small-lora"
    if not (lora_dir / "adapter_config.json").exists():
        pytest.skip("no shipped adapter in this models directory")
    small = model_path("small_base")
    base = AutoModelForCausalLM.from_pretrained(small, dtype=torch.float32).eval()
    adapter = read_adapter(lora_dir)
    check_adapter(adapter, base, small)
    tuned = AutoModelForCausalLM.from_pretrained(model_path("small_tuned"), dtype=torch.float32).eval()
    with pytest.raises(AdapterError, match="not the base of .*the same config, but different weights"):
        check_adapter(adapter, tuned, model_path("small_tuned"))
    runner = StackedAdapterRunner(*stack_adapters(copy.deepcopy(base), [adapter]))
    ids, mask = left_padded(12, [9, 4], vocab=1000)
    got = runner.prefill(ids, mask)
    torch.testing.assert_close(got.experts[0], runner_of(merged(base, str(lora_dir))).prefill(ids, mask), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.anti, runner_of(base).prefill(ids, mask), atol=1e-4, rtol=0)


def test_slices_leave_the_model_as_peft_left_it(base, adapter_dirs):
    """Outside the runner's calls the hooks do nothing: PEFT's own active-adapter forward and mixed batch give
    what they gave before the hooks were installed; an embedding LoRA runs PEFT's way, "slices" refuses it."""
    model, names = stack_adapters(copy.deepcopy(base), [read_adapter(adapter_dirs["a"])])
    ids, mask = left_padded(13, [4, 4])
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).logits
        runner = StackedAdapterRunner(model, names, mixed="slices")
        runner.prefill(ids, mask)
        after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_an_embedding_lora_runs_peft_mixed_batches(base, tmp_path):
    d = make_adapter(base, tmp_path / "emb", seed=14, targets=("q_proj", "embed_tokens"))
    model, names = stack_adapters(copy.deepcopy(base), [read_adapter(d)])
    assert StackedAdapterRunner(model, names).mixed == "peft"
    with pytest.raises(AdapterError, match="mixed='slices' needs plain LoRA"):
        StackedAdapterRunner(model, names, mixed="slices")
    runner = StackedAdapterRunner(model, names)
    ids, mask = left_padded(15, [3, 6])
    got = runner.prefill(ids, mask)
    torch.testing.assert_close(got.experts[0], runner_of(merged(base, d)).prefill(ids, mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(got.anti, runner_of(base).prefill(ids, mask), atol=ATOL, rtol=0)


def test_an_adapter_with_a_whole_trained_module_runs_peft_mixed_batches(base, tmp_path):
    """``modules_to_save`` (here the head): PEFT's wrapper picks the trained copy by the active adapter, not by
    row, so "slices" would run it on the base rows too: auto picks PEFT's mixed batch, "slices" refuses; the
    base rows get the base's own head."""
    d = make_adapter(base, tmp_path / "head", seed=16, targets=("q_proj",), modules_to_save=["lm_head"])
    model, names = stack_adapters(copy.deepcopy(base), [read_adapter(d)])
    with pytest.raises(AdapterError, match="mixed='slices' needs plain LoRA .*no modules_to_save"):
        StackedAdapterRunner(model, names, mixed="slices")
    runner = StackedAdapterRunner(model, names)
    assert runner.mixed == "peft"
    ids, mask = left_padded(17, [4, 2])
    got = runner.prefill(ids, mask)
    base_rows = runner_of(base).prefill(ids, mask)
    torch.testing.assert_close(got.experts[0], runner_of(merged(base, d)).prefill(ids, mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(got.anti, base_rows, atol=ATOL, rtol=0)
    assert (got.experts[0] - base_rows).abs().max() > 100 * ATOL


def test_peft_is_imported_only_when_an_adapter_is_used():
    import subprocess
    import sys

    code = ("import sys, proxytune, proxytune.engine, proxytune.engine.adapters, proxytune.engine.adapter_experts, "
            "proxytune.engine.adapter_members, proxytune.cli.models; from proxytune.cli import _parser; "
            "from proxytune.engine.adapter_experts import is_adapter, pair_anti_experts; _parser(); "
            "assert not is_adapter('some/model') and pair_anti_experts([False], ['a']) == ['a']; "
            "print('peft' in sys.modules)")  # Ensemble.load asks is_adapter of every expert
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kind,targets", [("qwen2", ("q_proj", "v_proj", "up_proj")), ("gpt2", ("c_attn", "c_fc"))])
@MIXED
def test_other_architectures_stack_too(kind, targets, mixed, tmp_path):
    """Qwen2 (biased attention projections) and GPT-2 (Conv1D layers, fan_in_fan_out) as the small base."""
    from tiny_models import tiny_model

    small = tiny_model(kind, seed=3)
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    d = make_adapter(small, tmp_path / kind, seed=4, targets=targets, **extra)
    runner = stacked_runner(small, [d], mixed)
    ref_e, ref_a = runner_of(merged(small, d)), runner_of(copy.deepcopy(small))
    ids, mask = left_padded(16, [5, 2, 7], vocab=320)
    got = runner.prefill(ids, mask)
    torch.testing.assert_close(got.experts[0], ref_e.prefill(ids, mask), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.anti, ref_a.prefill(ids, mask), atol=1e-4, rtol=0)
    tokens = torch.tensor([5, 9, 11])
    got = runner.step(tokens)
    torch.testing.assert_close(got.experts[0], ref_e.step(tokens), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.anti, ref_a.step(tokens), atol=1e-4, rtol=0)


def test_a_peft_model_with_a_merged_adapter_is_refused(base, adapter_dirs):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter_dirs["a"])
    model.merge_adapter()
    with pytest.raises(AdapterError, match="merged into its base weights"):
        stack_adapters(None, [read_adapter(model)], names=["default"])
