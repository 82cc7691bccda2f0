"""Command line: ``proxytune demo`` and ``proxytune eval`` (the shipped tiny family) and ``proxytune generate``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    """Proxy-tuning at work on the shipped tiny family: a few held-out questions, then the accuracy table."""
    import time

    import torch

    import proxytune
    from proxytune.tinyworld import default_models_dir
    from proxytune.tinyworld.evaluation import answer, build_tuners, evaluate, format_table, world_of

    t0 = time.time()
    torch.manual_seed(0)
    models = args.models or default_models_dir()
    tuners = build_tuners(models)
    questions = world_of(models).eval_questions()
    shown = questions[:: max(1, len(questions) // args.examples)][: args.examples]
    print(f"proxytune {proxytune.__version__}: proxy-tuning a tiny model family (models in {models})\n")
    print("The large base knows more facts; the small tuned expert knows the answer format. Proxy-tuned =")
    print("large base + (small tuned - small base), token by token, greedy. Questions about held-out people,")
    print("whose facts appear only in pretraining prose, never in the instruction data:\n")
    cols = ["large base", "small tuned", "proxy-tuned large"]
    outs = {c: answer(tuners[c], [q.prompt for q in shown]) for c in cols}
    for i, q in enumerate(shown):
        print(q.prompt.replace("\n", " "), f" [expected:{q.answer}]")
        for c in cols:
            print(f"    {c:<18} ->{outs[c][i]!r}")
    result = evaluate(models, limit=args.limit, tuners=tuners)
    print()
    print(format_table(result.accuracy, len(result.questions), result.gap_closed, result.format_rate))
    print(f"\n(exact match, greedy; `proxytune eval` runs every held-out question and saves a plot; {time.time() - t0:.1f} s)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """Held-out exact match of the five systems; ``--save DIR`` writes tinyworld_eval.{json,txt,png} there."""
    import shlex

    import torch

    from proxytune.tinyworld.evaluation import build_tuners, evaluate, format_table, save_results

    torch.set_num_threads(args.threads) if args.threads else None
    tuners = build_tuners(args.models)
    result = evaluate(args.models, limit=args.limit, tuners=tuners, batch_size=args.batch_size)
    print(format_table(result.accuracy, len(result.questions), result.gap_closed, result.format_rate))
    if args.save:
        argv = args.argv if args.argv is not None else sys.argv[1:]
        for path in save_results(result, args.save, "proxytune " + " ".join(shlex.quote(a) for a in argv)):
            print(f"saved {path}")
    return 0


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt arguments, then --prompt-file (``-`` = stdin), else stdin when it is not a terminal.

    A file holds one prompt per line (empty lines skipped), or JSON lines with a "prompt" field when it ends
    in ``.jsonl``; stdin is read the same way, one prompt per line.
    """
    prompts = list(args.prompt or [])
    source = args.prompt_file
    if source is None and not prompts and not sys.stdin.isatty():
        source = "-"
    if source is not None:
        text = sys.stdin.read() if source == "-" else open(source, encoding="utf-8").read()
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if str(source).endswith(".jsonl"):
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{source}, line {n}: expected a JSON object with a \"prompt\" field") from None
            else:
                prompts.append(line)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT, --prompt-file FILE, or pipe prompts (one per line) into stdin")
    return prompts


def _generate(args: argparse.Namespace) -> int:
    from proxytune.engine import ModelSpec, ProxyTuner, SamplingParams

    experts, antis = args.expert or [], args.anti_expert or []
    if len(experts) != len(antis):
        raise ValueError(f"got {len(experts)} --expert but {len(antis)} --anti-expert; give them in pairs")
    alphas = args.alpha or [1.0]
    if len(alphas) not in (1, len(experts)):
        raise ValueError(f"give one --alpha for all pairs or one per pair ({len(experts)}), got {len(alphas)}")
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, seed=args.seed, stop=tuple(args.stop or ()),
    ).checked(len(experts), "parameters")  # fmt: skip  (before the slow loading)
    prompts = _read_prompts(args)
    progress = not args.quiet and sys.stderr.isatty()
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    small_device = args.expert_device or args.device
    tuner = ProxyTuner(
        ModelSpec(args.base, device=args.base_device or args.device),
        [ModelSpec(e, device=small_device, template=args.expert_template) for e in experts],
        [ModelSpec(a, device=small_device) for a in antis],
        weights=alphas * len(experts) if len(alphas) == 1 else alphas, tokenizer=args.tokenizer, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code, backend=args.backend, progress=progress,
        decode=args.decode, poll_every=args.poll_every,
    )  # fmt: skip
    if progress and tuner.decode_reason:
        print(f"proxytune: decode={tuner.decode} ({tuner.decode_reason})", file=sys.stderr)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        jsonl = args.format == "jsonl"
        if args.stream:
            # text: one prompt after the other, so the text reads in order; jsonl: one line per token
            batch_size = 1 if not jsonl else args.batch_size
            last = None
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
                    out.write(ev.text + ("\n" if ev.finish_reason is not None else ""))
                out.flush()
            return 0
        gens = tuner.generate(prompts, params, return_logprobs=args.logprobs, batch_size=args.batch_size)
        for i, g in enumerate(gens):
            if jsonl:
                record = {"index": i, "prompt": g.prompt, "text": g.text, "token_ids": g.token_ids,
                          "finish_reason": g.finish_reason, "seed": g.seed}  # fmt: skip
                if args.logprobs:
                    record["logprobs"] = g.logprobs
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                if len(gens) > 1:
                    out.write(f"==> prompt {i}: {g.prompt[:60]!r} <==\n")
                out.write(g.text + "\n")
        return 0
    finally:
        if out is not sys.stdout:
            out.close()


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser(
        "generate", help="proxy-tuned text generation with Hugging Face models",
        description="Generate text from base + alpha * (expert - anti_expert). Models are local directories or "
        "hub ids (from the local cache when offline); all must share one tokenizer.",
    )  # fmt: skip
    gen.add_argument("--base", required=True, help="the base model (directory or hub id)")
    gen.add_argument("--expert", action="append", help="a tuned small model; repeat for several pairs")
    gen.add_argument("--anti-expert", action="append", help="the expert's untuned counterpart; one per --expert")
    gen.add_argument("--alpha", type=float, action="append", help="weight of (expert - anti-expert): one for all pairs or one per pair (default 1.0)")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    gen.add_argument("--prompt-file", help="prompts, one per line (or JSON lines with a \"prompt\" field if .jsonl); - for stdin")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None, help="noise seed of every prompt (default: a fresh one each)")
    gen.add_argument("--stop", action="append", help="a stop string; repeatable")
    gen.add_argument("--expert-template", default=None,
                     help="how experts see the prompt: 'chat' (their tokenizer's chat template) or a text with {prompt}")  # fmt: skip
    gen.add_argument("--device", default=None, help="device of every model (default: cuda if available, else cpu)")
    gen.add_argument("--base-device", default=None, help="device of the base only")
    gen.add_argument("--expert-device", default=None, help="device of the experts and anti-experts")
    gen.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)")
    gen.add_argument("--tokenizer", default=None, help="the shared tokenizer (default: the base's)")
    gen.add_argument("--trust-remote-code", action="store_true", help="allow models' own Python code (off by default)")
    gen.add_argument("--backend", default="auto", help="sampler backend (auto, reference, cpu, triton)")
    gen.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: all)")
    gen.add_argument("--decode", choices=["auto", "eager", "static", "graph"], default="auto",
                     help="decode step: eager, static (static caches and buffers) or graph (CUDA graphs, not yet "
                          "verified on a GPU); auto is eager for now")
    gen.add_argument("--poll-every", type=int, default=8, help="static/graph decode: steps between host polls")
    gen.add_argument("--format", choices=["text", "jsonl"], default="text")
    gen.add_argument("--logprobs", action="store_true", help="with --format jsonl: each token's log-probability")
    gen.add_argument("--stream", action="store_true", help="write tokens as they are generated")
    gen.add_argument("--output", "-o", default=None, help="write here instead of stdout")
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    gen.set_defaults(run=_generate)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="proxytune", description="Fast decoding-time proxy-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="proxy-tuning a shipped tiny model family: answers side by side, accuracy table")
    demo.add_argument("--models", default=None, help="the family's directory (default: the shipped one)")
    demo.add_argument("--examples", type=int, default=4, help="held-out questions shown side by side")
    demo.add_argument("--limit", type=int, default=None, help="held-out questions in the table (default: all)")
    demo.set_defaults(run=_demo)
    ev = sub.add_parser("eval", help="held-out exact match of the tiny family and the proxy-tuned large model")
    ev.add_argument("--models", default=None, help="the family's directory (default: the shipped one)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N held-out questions")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ev.add_argument("--save", default=None, metavar="DIR", help="write tinyworld_eval.{json,txt,png} into DIR")
    ev.set_defaults(run=_eval)
    _add_generate_parser(sub)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else None
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"proxytune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
