"""Throughput of proxy-tuning inside vLLM (the plugin) against ``ProxyTuner`` (eager and static decoding, one
batch) and against vLLM serving the base alone: 64 prompts of mixed lengths, on this machine's CPU.

    scripts/vllm_venv.sh
    .venv-vllm/bin/python -P -m pytest benchmarks/test_vllm.py -s                  # the table
    .venv-vllm/bin/python -P -m pytest benchmarks/test_vllm.py -s --save-results   # also benchmarks/results/

Models: random-weight Llamas built from configs (no downloads), fp32: a base of 8 layers of width 512 (8 heads
of 64) and two small models of 4 layers of width 256 (4 heads of 64), vocabulary 32000 (a word-level tokenizer
of 32000 ids, so the common vocabulary is the whole width). Prompts: 64 rows of random ids, lengths 8..96
(seeded); every method generates exactly ``NEW`` tokens per row (EOS ignored) at temperature 0.7, top-p 0.9,
weight 1, one seed per row. Each method runs in a fresh process (vLLM's CPU worker binds its process's
threads to cores), once on 8 prompts to warm up, then ``ROUNDS`` times on all 64; the table gives the median. vLLM runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), eager (``enforce_eager``), up to 64
sequences and 4096 batched tokens per step; ``ProxyTuner`` gets all 64 prompts as one batch (left-padded).

tokens/s = generated tokens / wall time of one ``generate`` call (prefill included).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None and __name__ != "__main__":
    pytest.skip("vLLM is not installed (build its venv with scripts/vllm_venv.sh)", allow_module_level=True)

for _k, _v in dict(HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="2",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0").items():  # fmt: skip
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

N_PROMPTS, NEW, ROUNDS = 64, 32, 2
VOCAB = 32000
TEMPERATURE, TOP_P, ALPHA = 0.7, 0.9, 1.0
BASE = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8)
SMALL = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=704, num_attention_heads=4, num_key_value_heads=4)
VLLM_ARGS = dict(distributed_executor_backend="uni", enforce_eager=True, max_model_len=256, max_num_seqs=64,
                 max_num_batched_tokens=4096, dtype="float32", seed=0)  # fmt: skip
COMMAND = ".venv-vllm/bin/python -P -m pytest benchmarks/test_vllm.py -s --save-results"


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip


def _save(path: Path, shape: dict, seed: int, tok) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False, initializer_range=0.05, **shape)  # fmt: skip
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def _worker(method: str, model_dirs: dict, prompts: list) -> dict:
    """One method in this (fresh) process: a small warm-up call, then ``ROUNDS`` timed calls."""
    if method.startswith("ProxyTuner"):
        from proxytune import ProxyTuner
        from proxytune.engine import SamplingParams

        tuner = ProxyTuner(model_dirs["base"], [model_dirs["expert"]], [model_dirs["anti"]], weights=ALPHA,
                           dtype="float32", device="cpu", eos_token_ids=[], decode=method.split()[1])  # fmt: skip

        def run(ps, new):
            params = [SamplingParams(max_new_tokens=new, temperature=TEMPERATURE, top_p=TOP_P, seed=i) for i in range(len(ps))]
            return sum(len(g.token_ids) for g in tuner.generate(ps, params))
    else:
        from vllm import LLM
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model_dirs["proxy" if method == "vLLM + plugin" else "base"], **VLLM_ARGS)

        def run(ps, new):
            params = [VllmParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=new, ignore_eos=True, seed=i)
                      for i in range(len(ps))]  # fmt: skip
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], params, use_tqdm=False)
            return sum(len(o.outputs[0].token_ids) for o in outs)

    run(prompts[:8], 4)
    times, counts = [], []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        counts.append(run(prompts, NEW))
        times.append(time.perf_counter() - t0)
    return {"times_s": times, "tokens": counts, "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}


def test_vllm_plugin_throughput(tmp_path, pytestconfig):
    from proxytune.cli import main

    tok = _word_tokenizer()
    dirs = {name: _save(tmp_path / name, shape, seed, tok)
            for name, shape, seed in (("base", BASE, 0), ("expert", SMALL, 1), ("anti", SMALL, 2))}  # fmt: skip
    dirs["proxy"] = str(tmp_path / "proxy")
    assert main(["vllm-config", "--base", dirs["base"], "--expert", dirs["expert"], "--anti-expert", dirs["anti"],
                 "--alpha", str(ALPHA), "-o", dirs["proxy"]]) == 0  # fmt: skip
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(4, VOCAB) for _ in range(rng.randint(7, 95))] for _ in range(N_PROMPTS)]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"dirs": dirs, "prompts": prompts}))
    records = []
    # each method in a fresh process: vLLM's CPU worker binds its process's threads to cores when it starts
    for method in ("vLLM base alone", "vLLM + plugin", "ProxyTuner eager", "ProxyTuner static"):
        out = tmp_path / "result.json"
        proc = subprocess.run([sys.executable, "-P", __file__, method, str(job), str(out)], capture_output=True,
                              text=True, timeout=1800)  # fmt: skip
        assert proc.returncode == 0, f"{method}:\n{proc.stderr[-4000:]}"
        r = json.loads(out.read_text())
        assert all(c == N_PROMPTS * NEW for c in r["tokens"]), (method, r["tokens"])
        med = statistics.median(r["times_s"])
        records.append({"method": method, "median_s": med, "tokens_per_s": N_PROMPTS * NEW / med, **r})

    import transformers
    import vllm

    plugin = next(r for r in records if r["method"] == "vLLM + plugin")
    lines = [
        f"{_cpu_name()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, "
        f"vllm {vllm.__version__}, transformers {transformers.__version__}; fp32",
        f"{N_PROMPTS} prompts of 8..96 tokens, {NEW} new tokens each (EOS ignored), T={TEMPERATURE}, top-p={TOP_P}, "
        f"alpha={ALPHA}; base 8 x 512, small 4 x 256, V={VOCAB}; median of {ROUNDS} after a warm-up; each method in a "
        "fresh process",
        "",
        f"{'method':<18} {'median':>9} {'tok/s':>8} {'vs plugin':>10} {'threads':>8} {'load':>5}",
    ]  # fmt: skip
    for r in records:
        lines.append(f"{r['method']:<18} {r['median_s']:>8.2f}s {r['tokens_per_s']:>8.1f} "
                     f"{r['tokens_per_s'] / plugin['tokens_per_s']:>9.2f}x {r['threads']:>8} {r['load_average']:>5.1f}")  # fmt: skip
    print("\n" + "\n".join(lines))
    from conftest import saving, write_results  # here: the worker processes (python -P) cannot import it

    if saving(pytestconfig):
        meta = {
            "vllm": vllm.__version__, "prompts": N_PROMPTS, "new_tokens": NEW, "vocab": VOCAB, "base": BASE,
            "small": SMALL, "vllm_args": VLLM_ARGS, "temperature": TEMPERATURE, "top_p": TOP_P, "alpha": ALPHA,
            "rounds": ROUNDS,
        }  # fmt: skip
        paths = write_results("vllm", _cpu_name(), meta, records, command=COMMAND, lines=lines)
        print(f"saved {paths[0]} and .txt")
    assert plugin["tokens_per_s"] > 0


if __name__ == "__main__":  # the worker: python -P benchmarks/test_vllm.py METHOD JOB.json OUT.json
    _method, _job, _out = sys.argv[1:4]
    _spec = json.loads(Path(_job).read_text())
    Path(_out).write_text(json.dumps(_worker(_method, _spec["dirs"], _spec["prompts"])))
