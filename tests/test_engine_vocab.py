"""The shared vocabulary (mismatched tokenizers, padded embeddings), prompt templates, loading from directories."""

import pytest
import torch

from proxytune import ModelSpec, ProxyTuner
from proxytune.engine import ModelLoadError, PromptTemplate, VocabularyMismatchError
from proxytune.testing import ForwardInputs
from tiny_models import PROMPTS, save_tiny, tiny_model, tiny_tokenizer, tiny_trio

N_NEW = 6


@pytest.fixture(scope="module")
def trio(trios):
    return trios["llama"]


def test_mismatched_tokenizers_name_the_first_differing_tokens(trio, tok):
    base, expert, anti = trio
    other = tiny_tokenizer(corpus=["completely different words make other merges", "zebra yak xylophone"])
    with pytest.raises(VocabularyMismatchError, match=r"expert 0 disagree on \d+ of the \d+ common ids \(first: id \d+: '.*' vs '.*'"):
        ProxyTuner(base, ModelSpec(expert, tokenizer=other), anti, tokenizer=tok)
    # the same tokenizer object, or an equal copy, is fine
    ProxyTuner(base, ModelSpec(expert, tokenizer=tiny_tokenizer()), anti, tokenizer=tok)


def test_padded_embeddings_sample_only_the_common_vocabulary(trio, tok):
    base = trio[0]
    padded_expert, padded_anti = tiny_model("llama", vocab_size=384, seed=1), tiny_model("llama", vocab_size=384, seed=2)
    tuner = ProxyTuner(base, padded_expert, padded_anti, tokenizer=tok)
    assert tuner.vocab_size == 320
    # weight 0: exactly the base, whatever the experts' extra columns say
    zero = ProxyTuner(base, padded_expert, padded_anti, tokenizer=tok, weights=0.0)
    plain = ProxyTuner(base, tokenizer=tok)
    kw = dict(temperature=0, max_new_tokens=N_NEW)
    assert [g.token_ids for g in zero.generate(PROMPTS, **kw)] == [g.token_ids for g in plain.generate(PROMPTS, **kw)]
    # a padded base: columns 320..383 are not tokens of the tokenizer and must never be drawn. At temperature
    # 10 the draw is near uniform over 384 columns, so 64 of them would be hit about once in six draws.
    padded_base = tiny_model("llama", vocab_size=384, seed=3)
    hot = ProxyTuner(padded_base, padded_expert, padded_anti, tokenizer=tok)
    assert hot.vocab_size == 320
    gens = hot.generate(PROMPTS, temperature=10.0, max_new_tokens=16, seed=0)
    drawn = [t for g in gens for t in g.token_ids]
    assert len(drawn) > 40 and max(drawn) < 320


def test_a_model_narrower_than_the_tokenizer(trio, tok):
    base = trio[0]
    narrow_expert, narrow_anti = tiny_model("llama", vocab_size=300, seed=1), tiny_model("llama", vocab_size=300, seed=2)
    tuner = ProxyTuner(base, narrow_expert, narrow_anti, tokenizer=tok)
    assert tuner.vocab_size == 300
    gens = tuner.generate([[1, 40, 50, 60], [1, 70]], temperature=5.0, max_new_tokens=8, seed=1)  # prompts as ids
    assert max(t for g in gens for t in g.token_ids) < 300
    high = next(i for i in tok("hello world").input_ids if i >= 300)  # a merged token past the narrow models
    with pytest.raises(ValueError, match=f"token id {high}, outside expert 0's embedding \\(300 ids\\)"):
        tuner.generate("hello world", max_new_tokens=1)


def test_chat_template_for_the_expert_splices_token_ids(trio, tok):
    base, expert, anti = trio
    tuner = ProxyTuner(base, ModelSpec(expert, template="chat"), anti, tokenizer=tok)
    seen = {name: ForwardInputs(m) for name, m in [("base", base), ("expert", expert), ("anti", anti)]}
    try:
        tuner.generate([PROMPTS[0]], temperature=0, max_new_tokens=3)
    finally:
        for s in seen.values():
            s.handle.remove()
    bare = tok(PROMPTS[0], add_special_tokens=False).input_ids
    prefix = tok("<|user|>", add_special_tokens=False).input_ids
    suffix = tok("\n<|assistant|>", add_special_tokens=False).input_ids
    assert seen["expert"].seen[0][0].tolist() == prefix + bare + suffix
    assert seen["base"].seen[0][0].tolist() == tok(PROMPTS[0]).input_ids == seen["anti"].seen[0][0].tolist()
    # then every model gets the same generated token each step
    steps = [[s.seen[k][0].tolist() for s in seen.values()] for k in (1, 2)]
    assert all(len(set(map(tuple, step))) == 1 for step in steps)
    # the template changes the expert's logits, hence the output, and a prefix template works too
    wrapped = ProxyTuner(base, ModelSpec(expert, template="Q: {prompt}\nA:"), anti, tokenizer=tok)
    assert wrapped.ensemble.template_ids[1] == (tok("Q: ", add_special_tokens=False).input_ids, tok("\nA:", add_special_tokens=False).input_ids)
    assert PromptTemplate.parse("chat") == PromptTemplate(chat=True) and PromptTemplate.parse(None) is None


def test_loading_from_directories(tmp_path, tok, monkeypatch):
    paths = [save_tiny(tmp_path / name, kind, seed=seed) for name, kind, seed in
             [("base", "qwen2", 0), ("expert", "llama", 1), ("anti", "llama", 2)]]  # fmt: skip
    tuner = ProxyTuner(*paths, device="cpu", dtype="float32")
    assert tuner.base.module.dtype == torch.float32 and tuner.base.tokenizer is not None
    again = ProxyTuner(*paths, device="cpu", dtype="bfloat16")
    assert again.base.module.dtype == torch.bfloat16
    gens = again.generate(PROMPTS[:2], temperature=0.7, max_new_tokens=4, seed=0)
    assert all(len(g.token_ids) <= 4 for g in gens)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ProxyTuner(*paths, dtype="int7")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        ProxyTuner(str(tmp_path / "empty"), tokenizer=tok)
    with pytest.raises(ModelLoadError, match="no such directory"):
        ProxyTuner(paths[0], str(tmp_path / "nope"), paths[2])
    monkeypatch.chdir(tmp_path)  # "base/typo" looks like a hub id, but base/ is a local folder: a path, no network
    with pytest.raises(ModelLoadError, match="anti-expert 0: no such directory: base/typo"):
        ProxyTuner("base", "expert", "base/typo")


@pytest.mark.cuda
def test_base_on_gpu_small_models_on_cpu(trio, tok):
    base, expert, anti = tiny_trio("llama")
    split = ProxyTuner(ModelSpec(base, device="cuda"), ModelSpec(expert, device="cpu"), ModelSpec(anti, device="cpu"), tokenizer=tok)
    assert split.device.type == "cuda"
    gens = split.generate(PROMPTS, temperature=0.8, max_new_tokens=N_NEW, seed=3)
    assert all(0 < len(g.token_ids) <= N_NEW for g in gens)
