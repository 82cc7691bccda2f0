"""``proxytune vllm-config``: the directory it writes and its refusals (vocabularies that differ, KV layouts vLLM
cannot unify, bad pairs and output directories). Needs no vLLM: runs in the main suite and in the vLLM venv."""

import json

import pytest
import torch
from safetensors.torch import load_file

from proxytune.cli import main
from proxytune.integrations.vllm.config import ARCHITECTURE, WEIGHTS_FILE, WEIGHTS_TENSOR, kv_page_units
from tiny_models import save_tiny, tiny_config, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vc_models")
    tok = tiny_tokenizer()
    spec = {
        "base": dict(seed=0, hidden=128, heads=4),  # 2 KV heads x 32 = 64 per token and layer
        "e": dict(seed=1, hidden=64, heads=2),  # 1 x 32 = 32
        "a": dict(seed=2, hidden=64, heads=2),
        "odd": dict(seed=3, hidden=192, heads=6),  # 3 x 32 = 96: no multiple of 64, nor 64 of it
        "pad": dict(seed=4, hidden=64, heads=2, vocab_size=384),
    }
    paths = {n: save_tiny(root / n, "llama", tokenizer=tok, **kw) for n, kw in spec.items()}
    other = tiny_tokenizer(corpus=["completely different words make another vocabulary", "zebra quartz jungle"])
    paths["foreign"] = save_tiny(root / "foreign", "llama", seed=5, hidden=64, heads=2, tokenizer=other)
    return paths


def run(capsys, *argv):
    rc = main(["vllm-config", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_writes_config_tokenizer_and_weights(models, tmp_path, capsys):
    out = tmp_path / "pt"
    rc, err = run(capsys, "--base", models["base"], "--expert", models["e"], "--anti-expert", models["a"],
                  "--expert", models["pad"], "--anti-expert", models["a"], "--alpha", "0.25", "--alpha", "-1.5",
                  "-o", str(out))  # fmt: skip
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads(open(models["base"] + "/config.json").read())
    assert cfg["architectures"] == [ARCHITECTURE]
    assert cfg["hidden_size"] == base_cfg["hidden_size"] and cfg["model_type"] == "llama"
    block = cfg["proxytune"]
    assert block["base"] == models["base"] and block["vocab_size"] == 320 == cfg["vocab_size"]
    assert block["pairs"] == [
        {"expert": models["e"], "anti_expert": models["a"], "weight": 0.25},
        {"expert": models["pad"], "anti_expert": models["a"], "weight": -1.5},
    ]
    assert torch.equal(load_file(str(out / WEIGHTS_FILE))[WEIGHTS_TENSOR], torch.tensor([0.25, -1.5]))
    assert (out / "tokenizer.json").exists() and not (out / "model.safetensors").exists()
    assert cfg["max_position_embeddings"] == 512  # every tiny model's
    # a directory this command wrote may be written again (here with one --alpha for both pairs)
    rc, err = run(capsys, "--base", models["base"], "--expert", models["e"], "--anti-expert", models["a"],
                  "--expert", models["e"], "--anti-expert", models["a"], "--alpha", "2", "-o", str(out))  # fmt: skip
    assert rc == 0, err
    assert [p["weight"] for p in json.loads((out / "config.json").read_text())["proxytune"]["pairs"]] == [2.0, 2.0]


def test_max_positions_are_the_smallest_models(models, tmp_path, capsys):
    short = tmp_path / "short"
    from tiny_models import tiny_model

    m = tiny_model("llama", seed=7, hidden=64, heads=2)
    m.config.max_position_embeddings = 128
    m.save_pretrained(short)
    rc, err = run(capsys, "--base", models["base"], "--expert", str(short), "--anti-expert", models["a"],
                  "-o", str(tmp_path / "pt"))  # fmt: skip
    assert rc == 0, err
    assert json.loads((tmp_path / "pt" / "config.json").read_text())["max_position_embeddings"] == 128


def test_kv_layouts_vllm_cannot_unify_are_refused(models, tmp_path, capsys):
    out = tmp_path / "pt"
    rc, err = run(capsys, "--base", models["base"], "--expert", models["odd"], "--anti-expert", models["a"], "-o", str(out))
    assert rc == 2 and err.count("\n") == 0
    assert err.startswith("proxytune: error: vLLM cannot unify the KV cache layouts")
    assert "expert 1" in err and "3 KV heads x head_dim 32 = 96" in err and "base" in err and "= 64" in err
    assert not out.exists()


def test_kv_page_units_of_real_configs():
    """The arithmetic behind docs/vllm.md's table of pairs, on the published shapes."""
    from transformers import LlamaConfig

    def llama(hidden, heads, kv, head_dim=None):
        return LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)

    l31_8b, l31_70b, l32_1b = llama(4096, 32, 8), llama(8192, 64, 8), llama(2048, 32, 8, 64)
    l2_7b, l2_13b, l2_70b = llama(4096, 32, 32), llama(5120, 40, 40), llama(8192, 64, 8)
    assert [kv_page_units(c)[2] for c in (l31_8b, l31_70b, l32_1b)] == [1024, 1024, 512]
    assert [kv_page_units(c)[2] for c in (l2_7b, l2_13b, l2_70b)] == [4096, 5120, 1024]
    assert kv_page_units(tiny_config("llama", hidden=128, heads=4))[2] == 64


def test_different_vocabularies_are_refused(models, tmp_path, capsys):
    rc, err = run(capsys, "--base", models["base"], "--expert", models["foreign"], "--anti-expert", models["a"],
                  "-o", str(tmp_path / "pt"))  # fmt: skip
    assert rc == 2 and err.count("\n") == 0
    assert "disagree" in err and "foreign" in err and "expert 1" in err
    assert not (tmp_path / "pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--expert", "E"], "got 1 --expert but 0 --anti-expert; they come in pairs"),
    ([], "needs at least one --expert and --anti-expert pair"),
    (["--expert", "E", "--expert", "E", "--anti-expert", "A"], "got 2 --expert but 1 --anti-expert"),
    (["--expert", "E", "--anti-expert", "A", "--alpha", "1", "--alpha", "2"], "--alpha: give one for all pairs or one per pair (1), got 2"),
    (["--expert", "E", "--anti-expert", "A", "--alpha", "nan"], "--alpha must be a finite number with |w| <= 1e6, got nan"),
])  # fmt: skip
def test_flags_are_checked_before_loading(argv, message, tmp_path, capsys):
    # E and A do not exist: the flags fail first
    rc, err = run(capsys, "--base", "B", *argv, "-o", str(tmp_path / "pt"))
    assert rc == 2 and message in err and err.count("\n") == 0, err


def test_output_is_required_and_checked(models, tmp_path, capsys):
    rc, err = run(capsys, "--base", models["base"], "--expert", models["e"], "--anti-expert", models["a"])
    assert rc == 2 and "--output" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    rc, err = run(capsys, "--base", models["base"], "--expert", models["e"], "--anti-expert", models["a"], "-o", str(busy))
    assert rc == 2 and "not empty and not a proxy-tuned model directory" in err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    rc, err = run(capsys, "--base", models["base"], "--expert", str(tmp_path / "nope"), "--anti-expert", models["a"],
                  "-o", str(tmp_path / "pt"))  # fmt: skip
    assert rc == 2 and "no such directory" in err and "nope" in err


# --- issue 23 ------------------------------------------------------------------------------------------------


def trio(models, *extra):
    return ["--base", models["base"], "--expert", models["e"], "--anti-expert", models["a"], *extra]


def test_a_proxy_tuned_directory_is_refused_as_an_input_without_vllm(models, tmp_path, capsys):
    pt = tmp_path / "pt"
    assert run(capsys, *trio(models, "-o", str(pt)))[0] == 0
    for flag in ("--base", "--expert"):
        argv = trio(models, "-o", str(tmp_path / "pt2"))
        argv[argv.index(flag) + 1] = str(pt)
        rc, err = run(capsys, *argv)
        assert rc == 2 and "is itself a proxy-tuned model directory" in err and err.count("\n") == 0, err
        assert not (tmp_path / "pt2").exists()


def test_an_output_that_is_an_input_is_refused(models, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(models["base"], base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for argv in (["--base", str(base), "--expert", models["e"], "--anti-expert", models["a"], "-o", str(base)],
                 trio(models, "-o", models["e"]),
                 ["--base", str(base), "--expert", models["e"], "--anti-expert", models["a"], "-o", str(base / "inside")],
                 ["--base", str(base / "."), "--expert", models["e"], "--anti-expert", models["a"], "-o", str(base)]):  # fmt: skip
        rc, err = run(capsys, *argv)
        assert rc == 2 and err.startswith("proxytune: error: --output: ") and "give another directory" in err, (argv, err)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before  # the base's own files untouched


def test_a_checkpoint_without_weights_is_refused(models, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(models["e"] + "/config.json", bare / "config.json")
    rc, err = run(capsys, "--base", models["base"], "--expert", str(bare), "--anti-expert", models["a"],
                  "-o", str(tmp_path / "pt"))  # fmt: skip
    assert rc == 2 and f"the expert 1 ({bare}) has no weights" in err and err.count("\n") == 0, err
    assert not (tmp_path / "pt").exists()


def test_an_unwritable_output_names_the_flag(models, capsys):
    for out in ("/proc/proxytune-test", "/sys/proxytune-test/x"):
        rc, err = run(capsys, *trio(models, "-o", out))
        assert rc == 2 and err.startswith("proxytune: error: --output: ") and err.count("\n") == 0, err


def test_a_base_without_a_tokenizer_uses_the_experts(models, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    base.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{models['base']}/{f}", base / f)
    rc, err = run(capsys, "--base", str(base), "--expert", models["e"], "--anti-expert", models["a"],
                  "-o", str(tmp_path / "pt"))  # fmt: skip
    assert rc == 0, err
    assert (tmp_path / "pt" / "tokenizer.json").read_text() == open(models["e"] + "/tokenizer.json").read()
    for d in ("e", "a"):  # no model has a tokenizer: say so
        bare = tmp_path / f"bare_{d}"
        bare.mkdir()
        for f in ("config.json", "model.safetensors"):
            shutil.copy(f"{models[d]}/{f}", bare / f)
    rc, err = run(capsys, "--base", str(base), "--expert", str(tmp_path / "bare_e"), "--anti-expert",
                  str(tmp_path / "bare_a"), "-o", str(tmp_path / "pt2"))  # fmt: skip
    assert rc == 2 and "no tokenizer" in err and "--tokenizer" in err, err


def test_an_uncached_hub_id_offline_names_its_role(models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = run(capsys, "--base", "nobody-here/no-such-model-xyz", "--expert", models["e"], "--anti-expert",
                  models["a"], "-o", str(tmp_path / "pt"))  # fmt: skip
    assert rc == 2 and err.startswith("proxytune: error: the base: cannot load a config from 'nobody-here/no-such-model-xyz'"), err
    assert "offline" in err and err.count("\n") == 0
