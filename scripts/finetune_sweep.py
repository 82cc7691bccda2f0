#!/usr/bin/env python3
"""Choose the tiny family's instruction-tuning schedule from base-vs-tuned results only.

For each schedule length in ``--steps``, tunes copies of the shipped bases (``python -m proxytune.tinyworld.train
--finetune-from``) and measures, on the held-out questions, each tuned model's exact match and the share of its
answers in the strict format (right or wrong). It never runs the proxy-tuned system. The rule, fixed before
running: the shortest schedule at which both tuned models answer at least ``--format-target`` of the
held-out questions in format. Also reports each base's :func:`choice_accuracy` (can it reach the fact from
a question at all). Writes ``tinyworld_finetune_sweep.{json,txt}`` to ``--save``.

    python scripts/finetune_sweep.py --steps 40,80,150,300 --save benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

from proxytune.tinyworld import default_models_dir, model_path
from proxytune.tinyworld.evaluation import build_tuners, choice_accuracy, evaluate, world_of
from proxytune.tinyworld.train import main as train_main

LABELS = ["small tuned", "large tuned"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bases", default=str(default_models_dir()), help="family whose bases are tuned")
    p.add_argument("--steps", default="40,80,150,300")
    p.add_argument("--work", default="/tmp/proxytune_finetune_sweep", help="where the tuned copies go")
    p.add_argument("--format-target", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save", default=None, metavar="DIR")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    questions = world_of(args.bases).eval_questions()
    tokenizer = AutoTokenizer.from_pretrained(model_path("small_base", args.bases))
    choice = {}
    for role in ("small_base", "large_base"):
        model = AutoModelForCausalLM.from_pretrained(model_path(role, args.bases), dtype="float32").eval()
        choice[role.replace("_", " ")] = choice_accuracy(model, tokenizer, questions)
    print(json.dumps({"base choice accuracy": choice}), flush=True)

    rows = []
    for steps in [int(s) for s in args.steps.split(",")]:
        out = os.path.join(args.work, f"steps{steps}")
        t0 = time.time()
        train_main(["--finetune-from", args.bases, "--out", out, "--finetune-steps", str(steps),
                    "--threads", str(args.threads)])  # fmt: skip
        result = evaluate(out, tuners=build_tuners(out, LABELS))
        row = {"steps": steps, "accuracy": result.accuracy, "in_format": result.format_rate,
               "seconds": round(time.time() - t0, 1)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)

    ok = [r for r in rows if all(r["in_format"][label] >= args.format_target for label in LABELS)]
    chosen = min(ok, key=lambda r: r["steps"])["steps"] if ok else None
    lines = [f"$ python scripts/finetune_sweep.py {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}",
             f"rule: the shortest schedule with both tuned models >= {100 * args.format_target:.0f}% in format "
             "(held-out questions; proxy-tuned never evaluated here)",
             "bases, best-scoring value among all values of the attribute (knowledge without format): "
             + ", ".join(f"{k} {100 * v:.1f}%" for k, v in choice.items()),
             f"{'steps':>6} {'small tuned EM':>15} {'in format':>10} {'large tuned EM':>15} {'in format':>10}"]  # fmt: skip
    for r in rows:
        a, f = r["accuracy"], r["in_format"]
        lines.append(f"{r['steps']:>6} {100 * a['small tuned']:14.1f}% {100 * f['small tuned']:9.1f}% "
                     f"{100 * a['large tuned']:14.1f}% {100 * f['large tuned']:9.1f}%")  # fmt: skip
    lines.append(f"chosen: {chosen} steps" if chosen else "chosen: none reaches the format target")
    print("\n".join(lines))
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        with open(os.path.join(args.save, "tinyworld_finetune_sweep.json"), "w") as f:
            json.dump({"rule_format_target": args.format_target, "base_choice_accuracy": choice, "rows": rows,
                       "chosen_steps": chosen}, f, indent=1)  # fmt: skip
            f.write("\n")
        with open(os.path.join(args.save, "tinyworld_finetune_sweep.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
