"""``proxytune generate``: proxy-tuned text generation with Hugging Face models (text or JSON lines out,
streamed or not). The sampling flags are validated once, by :class:`proxytune.engine.SamplingParams`."""

from __future__ import annotations

import argparse
import json
import re
import sys

from proxytune.cli.args import COUNT, INT32, INTEGER, NUMBER, POSITIVE, TOKENS, CliError, Once, integer, nonempty, text
from proxytune.cli.io import Output, read_prompts
from proxytune.cli.models import add_model_flags, check_base, check_devices_and_backend, load_tuner, pairs

__all__ = ["add_generate_parser", "sampling_params"]

# SamplingParams' field -> the flag that sets it
_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
          "min_p": "--min-p", "seed": "--seed", "stop": "--stop", "weights": "--alpha"}  # fmt: skip


def sampling_params(args: argparse.Namespace, n_pairs: int):
    """The flags' :class:`~proxytune.engine.SamplingParams`, checked by its own rules (the op's); a bad one is
    a :class:`CliError` naming the flag: ``--top-p must be in (0, 1], got 1.5``."""
    from proxytune.engine import SamplingParams

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, seed=args.seed, stop=tuple(args.stop or ()),
    )  # fmt: skip
    try:
        return params.checked(n_pairs, "flags")
    except (TypeError, ValueError) as e:
        m = re.fullmatch(r"flags: (\w+) (.*)", str(e), re.S)
        if m is None or m.group(1) not in _FLAGS:
            raise CliError(str(e)) from None
        raise CliError(f"{_FLAGS[m.group(1)]} {m.group(2)}") from None


def _generate(args: argparse.Namespace) -> int:
    check_base(args)
    experts, antis, weights = pairs(args)
    params = sampling_params(args, len(experts))
    jsonl = args.format == "jsonl"
    if args.logprobs and not jsonl:
        raise CliError("--logprobs needs --format jsonl")
    if args.speculative_tokens and not experts:
        raise CliError("--speculative-tokens needs --expert and --anti-expert (the first expert drafts)")
    if args.speculative_tokens and args.decode in ("static", "graph"):
        raise CliError(f"--speculative-tokens runs in the eager decoder, not with --decode {args.decode}")
    # everything is checked before the slow loading
    check_devices_and_backend(args)
    prompts = read_prompts(args)
    progress = not args.quiet and sys.stderr.isatty()

    def write(out) -> None:
        tuner = load_tuner(args, experts, antis, weights, progress, decode=args.decode, poll_every=args.poll_every,
                           speculative_tokens=args.speculative_tokens)  # fmt: skip
        if progress and tuner.decode_reason:
            print(f"proxytune: decode={tuner.decode} ({tuner.decode_reason})", file=sys.stderr)
        (_write_stream if args.stream else _write_all)(tuner, prompts, params, args, out)

    Output(args.output).run(write)
    return 0


def _write_stream(tuner, prompts: list[str], params, args: argparse.Namespace, out) -> None:
    """Text: one prompt after the other, so the text reads in order; JSON lines: one line per token."""
    jsonl = args.format == "jsonl"
    batch_size = 1 if not jsonl else args.batch_size
    last, ends_line = None, {}
    for ev in tuner.stream(prompts, params, return_logprobs=args.logprobs, batch_size=batch_size):
        if jsonl:
            record = {"index": ev.index, "token_id": ev.token_id, "text": ev.text, "finish_reason": ev.finish_reason}
            if args.logprobs:
                record["logprob"] = ev.logprob
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            if ev.index != last and len(prompts) > 1:
                out.write(f"==> prompt {ev.index}: {prompts[ev.index][:60]!r} <==\n")
            last = ev.index
            out.write(ev.text)
            if ev.text:
                ends_line[ev.index] = ev.text.endswith("\n")
            if ev.finish_reason is not None and not ends_line.get(ev.index, False):
                out.write("\n")
        out.flush()


def _write_all(tuner, prompts: list[str], params, args: argparse.Namespace, out) -> None:
    """Text (a newline after each text that lacks one) or JSON lines, one per prompt."""
    gens = tuner.generate(prompts, params, return_logprobs=args.logprobs, batch_size=args.batch_size)
    for i, g in enumerate(gens):
        if args.format == "jsonl":
            record = {"index": i, "prompt": g.prompt, "text": g.text, "token_ids": g.token_ids,
                      "finish_reason": g.finish_reason, "seed": g.seed}  # fmt: skip
            if args.logprobs:
                record["logprobs"] = g.logprobs
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            if len(gens) > 1:
                out.write(f"==> prompt {i}: {g.prompt[:60]!r} <==\n")
            out.write(g.text if g.text.endswith("\n") else g.text + "\n")


def add_generate_parser(sub) -> None:
    gen = sub.add_parser(
        "generate", help="proxy-tuned text generation with Hugging Face models",
        description="Generate text from base + alpha * (expert - anti_expert). Models are local directories or "
        "hub ids (from the local cache when offline); all must share one tokenizer.",
    )  # fmt: skip
    add_model_flags(gen)
    gen.add_argument("--prompt", action="append", type=text, help="a prompt; repeat for a batch")
    gen.add_argument("--prompt-file", type=nonempty("a file name or - for stdin"), action=Once,
                     help="prompts, one per line (or JSON lines with a \"prompt\" field if .jsonl); - for stdin")  # fmt: skip
    gen.add_argument("--max-new-tokens", type=TOKENS, default=64)
    gen.add_argument("--temperature", type=NUMBER, default=1.0, help="0 = greedy (default 1.0)")
    gen.add_argument("--top-p", type=NUMBER, default=1.0)
    gen.add_argument("--top-k", type=INTEGER, default=0)
    gen.add_argument("--min-p", type=NUMBER, default=0.0)
    gen.add_argument("--seed", type=INTEGER, default=None,
                     help="noise seed of every prompt (default: a fresh one each)")  # fmt: skip
    gen.add_argument("--stop", action="append", type=nonempty("a non-empty string"), help="a stop string; repeatable")
    gen.add_argument("--batch-size", type=POSITIVE, default=None, help="prompts per batch (default: all)")
    gen.add_argument("--decode", choices=["auto", "eager", "static", "graph"], default="auto",
                     help="decode step: eager, static (static caches and buffers) or graph (CUDA graphs, not yet "
                          "verified on a GPU); auto is eager for now")
    gen.add_argument("--poll-every", type=integer(1, INT32), default=8,
                     help="static/graph decode: steps between host polls")  # fmt: skip
    gen.add_argument("--speculative-tokens", type=COUNT, default=0, metavar="K",
                     help="speculative decoding: the first expert drafts up to K tokens per round, the base verifies "
                          "them in one forward; same distribution (greedy: same ids). 0 = off (default)")  # fmt: skip
    gen.add_argument("--format", choices=["text", "jsonl"], default="text")
    gen.add_argument("--logprobs", action="store_true", help="with --format jsonl: each token's log-probability")
    gen.add_argument("--stream", action="store_true", help="write tokens as they are generated")
    gen.add_argument("--output", "-o", default=None, type=nonempty("a file name"), action=Once,
                     help="write here instead of stdout (replaced only when the run succeeds)")  # fmt: skip
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    gen.set_defaults(run=_generate)
