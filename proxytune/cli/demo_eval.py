"""``proxytune demo`` and ``proxytune eval``: the shipped tiny model family (``proxytune.tinyworld``).

``eval --alpha`` hands off to :func:`proxytune.tinyworld.dial.main` (the weight dial)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

from proxytune.cli.args import POSITIVE, CliError, Once, integer, nonempty, parsed

__all__ = ["add_demo_parser", "add_eval_parser"]


def _family_dir(models: Optional[str]) -> Path:
    """The tiny family's directory (--models, else $PROXYTUNE_TINYWORLD_MODELS, else the shipped one), checked."""
    from proxytune.tinyworld import MODEL_NAMES, default_models_dir

    env = "PROXYTUNE_TINYWORLD_MODELS"
    where = "--models" if models is not None else env if env in os.environ else "the shipped family"
    path = Path(models) if models is not None else default_models_dir()
    if not path.exists():
        raise CliError(f"{where}: no such directory: {path}")
    if not path.is_dir():
        raise CliError(f"{where}: {path} is not a directory")
    needed = [f"{d}/{f}" for d in MODEL_NAMES.values() for f in ("config.json", "model.safetensors")]
    needed.append(f"{MODEL_NAMES['small_base']}/training_info.json")
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CliError(f"{where}: {path} does not hold the tiny model family (no {missing[0]}{more})")
    return path


def _check_save_dir(directory: str) -> None:
    """--save DIR may exist as a directory or not exist yet (it is created); anything else fails now."""
    path = Path(directory)
    if path.exists():
        if not path.is_dir():
            raise CliError(f"--save: {directory} exists and is not a directory")
        for name in ("tinyworld_eval.json", "tinyworld_eval.txt", "tinyworld_eval.png"):  # save_results' files
            if (path / name).is_dir():
                raise CliError(f"--save: {path / name} is a directory")
        writable = path
    else:
        writable = path.absolute().parent
        while not writable.exists():
            writable = writable.parent
        if not writable.is_dir():
            raise CliError(f"--save: {writable} is not a directory")
    if not os.access(writable, os.W_OK | os.X_OK):
        raise CliError(f"--save: cannot write in {writable}")


def _command_line(args: argparse.Namespace) -> str:
    argv = args.argv if args.argv is not None else sys.argv[1:]
    return "proxytune " + " ".join(shlex.quote(a) for a in argv)


def _demo(args: argparse.Namespace) -> int:
    """Proxy-tuning at work on the shipped tiny family: a few held-out questions, then the accuracy table."""
    import time

    import torch

    import proxytune
    from proxytune.tinyworld.evaluation import answer, build_tuners, evaluate, format_table, world_of

    t0 = time.time()
    models = _family_dir(args.models)
    torch.manual_seed(0)
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
    """Held-out exact match of the five systems; ``--save DIR`` writes tinyworld_eval.{json,txt,png} there.
    With ``--alpha``: the proxy at each weight, the weight chosen on validation (``tinyworld.dial``)."""
    import torch

    from proxytune.tinyworld.evaluation import build_tuners, evaluate, format_table, save_results

    models = _family_dir(args.models)
    if args.save is not None:
        _check_save_dir(args.save)
    torch.set_num_threads(args.threads) if args.threads else None
    if args.alpha is not None:
        from proxytune.tinyworld.dial import main as dial_main

        return dial_main(models, args, _command_line(args))
    tuners = build_tuners(models)
    result = evaluate(models, limit=args.limit, tuners=tuners, batch_size=args.batch_size, split=args.split, progress=None)
    print(format_table(result.accuracy, len(result.questions), result.gap_closed, result.format_rate, result.intervals()))
    if args.save is not None:
        for path in save_results(result, args.save, _command_line(args)):
            print(f"saved {path}")
    return 0


def _add_models_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=None, type=nonempty("a directory"), action=Once,
                   help="the family's directory (default: the shipped one)")  # fmt: skip


def add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="proxy-tuning a shipped tiny model family: answers side by side, accuracy table")
    _add_models_flag(demo)
    demo.add_argument("--examples", type=POSITIVE, default=4, help="held-out questions shown side by side")
    demo.add_argument("--limit", type=POSITIVE, default=None, help="held-out questions in the table (default: all)")
    demo.set_defaults(run=_demo)


def add_eval_parser(sub) -> None:
    from proxytune.tinyworld.dial import SPLITS, parse_weights

    ev = sub.add_parser("eval", help="held-out exact match of the tiny family and the proxy-tuned large model")
    _add_models_flag(ev)
    ev.add_argument("--limit", type=POSITIVE, default=None, help="only the first N held-out questions")
    ev.add_argument("--batch-size", type=POSITIVE, default=256)
    ev.add_argument("--threads", type=integer(1, 1024), default=None, help="torch CPU threads (default: torch's)")
    ev.add_argument("--save", default=None, metavar="DIR", type=nonempty("a directory"), action=Once,
                    help="write tinyworld_eval.{json,txt,png} into DIR (checked before evaluating)")  # fmt: skip
    ev.add_argument("--alpha", default=None, metavar="A[,A...]", type=parsed("list", parse_weights, "one or "
                    "more distinct numbers separated by commas, each finite with |w| <= 1e6", bool), help="the proxy's weights: each is reported, one is "
                    "chosen on the validation half; --save writes tinyworld_dial.{json,txt,png} and _tokens.png")  # fmt: skip
    ev.add_argument("--split", default="all", choices=SPLITS,
                    help="held-out questions: the validation half, the test half, or all (default)")  # fmt: skip
    ev.set_defaults(run=_eval)
