"""Prompt and output IO of the ``proxytune`` command: sources (files, stdin) as strict UTF-8, the one JSON-lines
reader and its value checks, prompts for ``generate``, pairs for ``score``, and :class:`Output` (stdout, or a
file replaced only when the run succeeds)."""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import tempfile
from typing import Iterator, Optional

from proxytune.cli.args import CliError

__all__ = ["read_source", "read_jsonl", "read_prompts", "read_pairs", "Output"]

_JSON_TYPES = {int: "a number", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}


def read_source(source: str, flag: str) -> tuple[str, str]:
    """(name for messages, text) of ``flag`` SOURCE (``-``: stdin), decoded as strict UTF-8 (a leading
    byte-order mark is dropped)."""
    name = "stdin" if source == "-" else source
    if source == "-":
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:  # a text stream without bytes underneath (io.StringIO)
            return name, sys.stdin.read()
        raw = buffer.read()
    else:
        try:
            with open(source, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise CliError(f"{flag}: no such file: {source}") from None
        except IsADirectoryError:
            raise CliError(f"{flag}: {source} is a directory") from None
        except OSError as e:
            raise CliError(f"{flag}: cannot read {source}: {e.strerror or e}") from None
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return name, raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw.count(b"\n", 0, at) + 1
        where = f"byte 0x{raw[at]:02x} at byte offset {at} (line {line})"
        raise CliError(f"{name}: not UTF-8 text: {where}: {e.reason}") from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of the non-blank lines; lines end at "\\n" only, a "\\r" before it is dropped."""
    for n, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line
        if line.strip():
            yield n, line


def read_jsonl(name: str, text: str, fields: tuple[str, ...]) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` per non-blank line of JSON-lines ``text``: each an object holding ``fields``, else
    a :class:`CliError` naming the line (``where`` is "NAME, line N")."""
    named = " and ".join(f'"{f}"' for f in fields)
    expected = f"a JSON object with a {named} field" if len(fields) == 1 else f"a JSON object with {named} fields"
    for n, line in _lines(text):
        where = f"{name}, line {n}"
        try:
            record = json.loads(line)
        except ValueError:
            raise CliError(f"{where}: not JSON; expected {expected}") from None
        if not isinstance(record, dict) or any(f not in record for f in fields):
            raise CliError(f"{where}: expected {expected}")
        yield where, record


def json_text(value: object, field: str, where: str, ids: bool = False):
    """A record's ``field``: a string (valid Unicode), or with ``ids`` also a list of non-negative integer ids."""
    from proxytune.engine.prompts import check_text

    if isinstance(value, str):
        try:
            return check_text(value, f'{where}: "{field}"')
        except ValueError as e:
            raise CliError(str(e)) from None
    if ids and isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        return value
    got = "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)
    if ids and isinstance(value, list):
        got = "an array that is not all non-negative integers"
    rule = "a string or an array of token ids" if ids else "a string"
    raise CliError(f'{where}: "{field}" must be {rule}, got {got}')


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt arguments, then --prompt-file (``-`` = stdin), else stdin when it is not a terminal.

    A file holds one prompt per line (lines end at "\\n" only, a "\\r" before it is dropped; blank lines are
    skipped), or JSON lines with a "prompt" field when it ends in ``.jsonl``; stdin is read the same way,
    one prompt per line. Text must be UTF-8 (a leading byte-order mark is dropped).
    """
    prompts = list(args.prompt or [])
    source = args.prompt_file
    if source is None and not prompts and not sys.stdin.isatty():
        source = "-"
    if source is not None:
        name, text = read_source(source, "--prompt-file")
        if source != "-" and source.endswith(".jsonl"):
            prompts += [json_text(r["prompt"], "prompt", where) for where, r in read_jsonl(name, text, ("prompt",))]
        else:
            prompts += [line for _, line in _lines(text)]
    if not prompts and source is not None:
        raise CliError(f"no prompts: {name} holds none (blank lines are skipped)")
    if not prompts:
        raise CliError("no prompts: give --prompt TEXT, --prompt-file FILE, or pipe prompts (one per line) into stdin")
    return prompts


def read_pairs(source: str) -> tuple[list, list]:
    """--input FILE (``-``: stdin): JSON lines ``{"prompt": ..., "continuation": ...}`` (strings or arrays of
    token ids); blank lines are skipped. Empty continuations are refused here, before any model loads."""
    name, text = read_source(source, "--input")
    prompts, conts = [], []
    for where, record in read_jsonl(name, text, ("prompt", "continuation")):
        prompt = json_text(record["prompt"], "prompt", where, ids=True)
        cont = json_text(record["continuation"], "continuation", where, ids=True)
        if len(cont) == 0:
            raise CliError(f"{where}: \"continuation\" is empty: there is nothing to score")
        prompts.append(prompt)
        conts.append(cont)
    if not prompts:
        raise CliError(f"--input: {name} holds no prompt/continuation pairs (blank lines are skipped)")
    return prompts, conts


class Output:
    """Where a command writes: stdout, or --output FILE through a temporary file in FILE's directory that
    replaces FILE only when :meth:`commit` is called (a failed run leaves FILE as it was). A FILE that
    exists and is not a regular file (a device, a pipe) is written in place."""

    def __init__(self, path: Optional[str]):
        self.tmp = self.target = None
        if path is None:
            self.file = sys.stdout
            return
        target = os.path.realpath(path)  # a symlink stays a link to the new contents
        if os.path.isdir(target):
            raise CliError(f"--output: {path} is a directory")
        if os.path.exists(target) and not os.access(target, os.W_OK):
            raise CliError(f"--output: cannot write {path}: permission denied")
        if os.path.exists(target) and not os.path.isfile(target):
            self.file = self._open(path, lambda: open(target, "w", encoding="utf-8"))
            return
        directory = os.path.dirname(target)
        if not os.path.isdir(directory):
            shown = os.path.dirname(path) or "."
            if os.path.exists(directory):
                raise CliError(f"--output: {shown} is not a directory")
            raise CliError(f"--output: no such directory: {shown}")
        prefix = f".{os.path.basename(target)}."
        fd, self.tmp = self._open(path, lambda: tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp"))
        self.target = target
        try:
            if os.path.exists(target):
                mode = os.stat(target).st_mode & 0o7777
            else:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.fchmod(fd, mode)
            self.file = os.fdopen(fd, "w", encoding="utf-8")
        except BaseException:
            os.close(fd)
            os.unlink(self.tmp)
            raise

    @staticmethod
    def _open(path, opener):
        try:
            return opener()
        except OSError as e:
            raise CliError(f"--output: cannot write {path}: {e.strerror or e}") from None

    def commit(self) -> None:
        if self.file is sys.stdout:
            return
        self.file.close()
        if self.tmp is not None:
            os.replace(self.tmp, self.target)
            self.tmp = None

    def discard(self) -> None:
        if self.file is not sys.stdout:
            self.file.close()
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None

    def run(self, write) -> None:
        """``write(file)``, then :meth:`commit`; on any failure :meth:`discard` and re-raise."""
        try:
            write(self.file)
        except BaseException:
            self.discard()
            raise
        self.commit()
