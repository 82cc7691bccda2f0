"""``proxytune score``: the proxy-tuned log-likelihood of continuations (JSON lines in and out)."""

from __future__ import annotations

import argparse
import json
import sys

from proxytune.cli.args import POSITIVE, CliError, Once, nonempty
from proxytune.cli.io import Output, read_pairs
from proxytune.cli.models import add_model_flags, check_base, check_devices_and_backend, load_tuner, pairs

__all__ = ["add_score_parser"]


def _score(args: argparse.Namespace) -> int:
    check_base(args)
    experts, antis, weights = pairs(args)
    check_devices_and_backend(args)
    if args.input is None and sys.stdin.isatty():
        raise CliError("--input: give a JSON-lines file of {\"prompt\": ..., \"continuation\": ...} (or - for stdin)")
    prompts, conts = read_pairs(args.input or "-")
    progress = not args.quiet and sys.stderr.isatty()

    def write(out) -> None:
        tuner = load_tuner(args, experts, antis, weights, progress)
        scores = tuner.score(prompts, conts, batch_size=args.batch_size)
        for i, (p, c, sc) in enumerate(zip(prompts, conts, scores)):
            record = {"index": i, "prompt": p, "continuation": c, "logprob": sc.logprob, "is_greedy": sc.is_greedy,
                      "token_ids": sc.token_ids, "token_logprobs": sc.token_logprobs}  # fmt: skip
            out.write(json.dumps(record, ensure_ascii=False) + "\n")

    Output(args.output).run(write)
    return 0


def add_score_parser(sub) -> None:
    sc = sub.add_parser(
        "score", help="proxy-tuned log-likelihood of continuations (JSON lines in and out)",
        description="Score each continuation after its prompt under base + alpha * (expert - anti_expert) at "
        "temperature 1 (no filters): one JSON line per pair with the continuation's token ids, their log-probabilities, "
        "the sum and whether greedy decoding gives it. A text continuation is tokenised as lm-evaluation-harness "
        "does (see ProxyTuner.score).",
    )  # fmt: skip
    add_model_flags(sc)
    sc.add_argument("--input", "-i", default=None, type=nonempty("a file name or - for stdin"), action=Once,
                    help='JSON lines {"prompt": ..., "continuation": ...}, strings or arrays of token ids; - for stdin')  # fmt: skip
    sc.add_argument("--batch-size", type=POSITIVE, default=None, help="pairs per forward (default: all)")
    sc.add_argument("--output", "-o", default=None, type=nonempty("a file name"), action=Once,
                    help="write here instead of stdout (replaced only when the run succeeds)")  # fmt: skip
    sc.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sc.set_defaults(run=_score)
