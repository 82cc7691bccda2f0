"""Argument types of the ``proxytune`` command: the parser, the ``type=`` functions, the once-only action.

A bad value raises ``argparse.ArgumentTypeError``, which :class:`Parser` reports as one line
``proxytune: error: --flag must be ...``. Sampling parameters are only converted here (a number, an integer):
their rules are :class:`proxytune.engine.SamplingParams`' (see :func:`proxytune.cli.generate.sampling_params`).
"""

from __future__ import annotations

import argparse
import re
from typing import Callable, Optional

__all__ = [
    "CliError", "Parser", "one_line", "parsed", "integer", "text", "nonempty", "dtype", "Once", "POSITIVE", "COUNT",
    "INT32", "NUMBER", "INTEGER", "TOKENS", "ALPHA",
]  # fmt: skip

INT32 = 2**31 - 1


class CliError(Exception):
    """Bad input: :func:`proxytune.cli.main` prints ``proxytune: error: <message>`` (one line) and returns 2."""


class Parser(argparse.ArgumentParser):
    """argparse's errors as one line ``proxytune: error: --flag ...`` (no usage block); exit status 2.
    Values such as ``-1e-3`` and ``-inf`` are read as negative numbers, not as flags."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.I)

    def _parse_optional(self, arg_string):
        # a negative number is a value even where a short flag is its prefix (score's -i: "-inf" is not "-i nf")
        if self._negative_number_matcher.match(arg_string):
            return None
        return super()._parse_optional(arg_string)

    def error(self, message: str):
        m = re.fullmatch(r"argument ([^:]+): (.*)", message, re.S)
        if m:  # "argument --top-p: must be ..." -> "--top-p must be ..."; "argument --output/-o: x" -> "--output: x"
            flag, rest = m.group(1).split("/")[0], m.group(2)
            message = f"{flag} {rest}" if rest.startswith("must ") else f"{flag}: {rest}"
        raise CliError(message)


def one_line(message: str) -> str:
    """A message on one line: C++ stack traces cut off, the remaining lines joined."""
    message = re.split(r"\n\s*(?:Exception raised from|frame #\d)", message, maxsplit=1)[0]
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def parsed(kind: str, convert: Callable[[str], object], rule: str, ok: Callable[[object], bool]) -> Callable[[str], object]:
    """An argparse ``type=``: ``convert(text)`` that must satisfy ``ok``, else "must be RULE, got ..."."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text if kind == 'number' else value}")
        return value

    parse.__name__ = kind  # argparse names it in "invalid <kind> value" messages
    return parse


def integer(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    rule = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return parsed("integer", int, rule, lambda v: v >= lo and (hi is None or v <= hi))


def text(value: str) -> str:
    """Text that is valid Unicode (argv's undecodable bytes arrive as lone surrogates)."""
    from proxytune.engine.prompts import check_text

    try:
        return check_text(value, "the text")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def nonempty(what: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if not value:
            raise argparse.ArgumentTypeError(f"must be {what}, got an empty string")
        return text(value)

    parse.__name__ = "name"
    return parse


def dtype(value: str) -> str:
    from proxytune.engine.loading import parse_dtype

    try:
        parse_dtype(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _weight_ok(a: float) -> bool:
    from proxytune._rules import check_weight

    try:
        check_weight(a)
    except (TypeError, ValueError):
        return False
    return True


class Once(argparse.Action):
    """A single-valued flag that may be given once: a repeat is an error, never a silent replacement (two
    --prompt-file flags would otherwise drop the first file's prompts)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, f"given twice ({getattr(namespace, self.dest)!r}, then {values!r}); give it once")
        setattr(namespace, self.dest, values)


POSITIVE = integer(1)
COUNT = integer(0)
# Sampling flags are only converted here; their ranges are SamplingParams' rules (proxytune.cli.generate).
NUMBER = parsed("number", float, "a number", lambda v: True)
INTEGER = parsed("integer", int, "an integer", lambda v: True)
TOKENS = parsed("integer", int, "an integer >= 0", lambda v: True)  # the rule's words, for a value that is no integer
ALPHA = parsed("number", float, "a finite number with |w| <= 1e6", _weight_ok)  # the one weight rule (_rules)
