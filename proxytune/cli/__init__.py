"""Command line: ``proxytune demo`` and ``proxytune eval`` (the shipped tiny family), ``proxytune generate``,
``proxytune score`` and ``proxytune vllm-config`` (a model directory for the vLLM plugin).

One module per job: ``args.py`` argument types and the parser, ``io.py`` prompt/output IO (the one JSON-lines
reader), ``models.py`` the model flags shared by the model commands, and one module per command
(``demo_eval.py``, ``generate.py``, ``score.py``, ``vllm_config.py``); :func:`main` assembles the parser.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from proxytune.cli.args import CliError, Parser, one_line

__all__ = ["main", "CliError"]


def _parser() -> Parser:
    from proxytune import __version__
    from proxytune.cli.demo_eval import add_demo_parser, add_eval_parser
    from proxytune.cli.generate import add_generate_parser
    from proxytune.cli.score import add_score_parser
    from proxytune.cli.vllm_config import add_vllm_config_parser

    parser = Parser(prog="proxytune", description="Fast decoding-time proxy-tuning.")
    parser.add_argument("--version", action="version", version=f"proxytune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_demo_parser, add_eval_parser, add_generate_parser, add_score_parser, add_vllm_config_parser):
        add(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # the commands by name when one is missing
    return parser


def _out_of_memory(e: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None)
    text = str(e).lower()
    return (oom is not None and isinstance(e, oom)) or "can't allocate memory" in text or "out of memory" in text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``proxytune`` command. Bad input: one line ``proxytune: error: ...`` on stderr and exit status 2."""
    from proxytune.backends import BackendUnavailableError
    from proxytune.remote.client import RemoteError  # a served base that failed or refused: its URL, one line

    try:
        args = _parser().parse_args(argv)
        args.argv = list(argv) if argv is not None else None
        return args.run(args)
    except KeyboardInterrupt:
        print("proxytune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`proxytune generate ... | head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        except (OSError, ValueError):
            pass
        return 1
    except (CliError, ValueError, TypeError, OSError, BackendUnavailableError, MemoryError, RemoteError) as e:
        message = str(e) or type(e).__name__
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
        message = f"out of memory: {e}"
    print(f"proxytune: error: {one_line(message)}", file=sys.stderr)
    return 2
