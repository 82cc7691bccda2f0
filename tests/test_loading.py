"""Loading models and tokenizers: safetensors only, no unchecked vocabulary, hub ids that fail fast offline,
and no loading bars when progress is off."""

import shutil
import time

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.engine import loading
from proxytune.engine.loading import ModelLoadError
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("models")
    return {name: save_tiny(root / name, seed=i, tokenizer=tok) for i, name in enumerate(("base", "expert", "anti"))}


def test_a_corrupt_tokenizer_fails_clearly_instead_of_skipping_the_check(dirs, tmp_path):
    broken = tmp_path / "expert"
    shutil.copytree(dirs["expert"], broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')  # cut short
    with pytest.raises(ModelLoadError, match="expert 0's tokenizer: cannot load a tokenizer from"):
        ProxyTuner(dirs["base"], str(broken), dirs["anti"])


def test_a_model_without_tokenizer_files_is_checked_through_the_others(dirs, tmp_path):
    bare = tmp_path / "anti"
    shutil.copytree(dirs["anti"], bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            f.unlink()
    tuner = ProxyTuner(dirs["base"], dirs["expert"], str(bare))
    assert tuner.anti_experts[0].tokenizer is None and tuner.vocab_size == 320


def pickle_checkpoints(directory):
    """Replace every model.safetensors under ``directory`` by the same weights in a pytorch_model.bin."""
    from safetensors.torch import load_file

    for weights in directory.glob("**/model.safetensors"):
        torch.save(load_file(weights), weights.parent / "pytorch_model.bin")
        weights.unlink()


def test_pickled_checkpoints_are_not_loaded(dirs, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(dirs["base"], pickled)
    pickle_checkpoints(pickled)
    with pytest.raises(ModelLoadError, match="base: cannot load a causal LM"):
        ProxyTuner(str(pickled))


def test_the_tiny_family_loads_from_safetensors_only(tmp_path):
    from proxytune.tinyworld import default_models_dir
    from proxytune.tinyworld.evaluation import build_tuners

    family = tmp_path / "family"
    shutil.copytree(default_models_dir(), family)
    pickle_checkpoints(family)
    with pytest.raises(ValueError, match="cannot load the tiny family's .* model"):
        build_tuners(family)


@pytest.mark.parametrize("hub_id", ["gpt2", "openai-community/gpt2", "bert-base-uncased"])
def test_hub_ids_are_accepted_and_fail_fast_offline(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_reachable", {"https://huggingface.co": False})  # as on a machine offline
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="not a local directory and, offline or with the hub unreachable"):
        ProxyTuner(hub_id)
    assert time.monotonic() - start < 10  # transformers' retries took 24-31 s


@pytest.mark.parametrize("path", ["./nowhere", "/no/such/dir", "a/b/c", "~/no-such-model-dir", ""])
def test_paths_that_do_not_exist_are_not_hub_lookups(path):
    with pytest.raises(ModelLoadError, match="no such directory|is empty"):
        ProxyTuner(path)


def test_no_loading_bars_without_progress(dirs, capfd):
    ProxyTuner(dirs["base"], dirs["expert"], dirs["anti"], progress=False)
    err = capfd.readouterr().err
    assert "Loading" not in err and "%|" not in err, err


def test_weights_that_do_not_fit_the_config_are_a_load_error(dirs, tmp_path):
    import json

    wrong = tmp_path / "wrong"
    shutil.copytree(dirs["base"], wrong)
    config = json.loads((wrong / "config.json").read_text())
    config["hidden_size"] *= 2
    config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="base: cannot load a causal LM from"):
        ProxyTuner(str(wrong))
