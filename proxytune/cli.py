"""Command line: ``proxytune demo`` and ``proxytune eval`` (the shipped tiny family), ``proxytune generate``,
``proxytune score`` and ``proxytune vllm-config`` (a model directory for the vLLM plugin)."""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import re
import struct
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["main"]

FLOAT32_MAX = 3.4028234663852886e38


class CliError(Exception):
    """Bad input: :func:`main` prints ``proxytune: error: <message>`` (one line) and returns 2."""


class _Parser(argparse.ArgumentParser):
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


def _one_line(message: str) -> str:
    """A message on one line: C++ stack traces cut off, the remaining lines joined."""
    message = re.split(r"\n\s*(?:Exception raised from|frame #\d)", message, maxsplit=1)[0]
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


# argparse type= functions: a bad value raises ArgumentTypeError, which argparse reports as "argument --flag: ..."


def _parsed(kind: str, convert: Callable[[str], object], rule: str, ok: Callable[[object], bool]) -> Callable[[str], object]:
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


def _integer(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    rule = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return _parsed("integer", int, rule, lambda v: v >= lo and (hi is None or v <= hi))


def _f32(x: float) -> float:
    """``x`` rounded to float32 (the op's parameter type); inf past its range."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _real(rule: str, ok: Callable[[float], bool], rounded: bool = False) -> Callable[[str], float]:
    """A finite float within float32's range with ``ok(value)`` (``rounded``: also for its float32 rounding)."""

    def fits(v: float) -> bool:
        return math.isfinite(v) and abs(v) <= FLOAT32_MAX and ok(v) and (not rounded or ok(_f32(v)))

    return _parsed("number", float, rule, fits)


def _text(text: str) -> str:
    """Text that is valid Unicode (argv's undecodable bytes arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"the undecodable byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"a lone surrogate U+{c:04X}"
        raise argparse.ArgumentTypeError(f"must be UTF-8 text, but character {e.start} is {what}") from None
    return text


def _nonempty(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"must be {what}, got an empty string")
        return _text(text)

    parse.__name__ = "name"
    return parse


def _dtype(text: str) -> str:
    from proxytune.engine.loading import parse_dtype

    try:
        parse_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


_POSITIVE = _integer(1)
_COUNT = _integer(0)
_INT32 = 2**31 - 1


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
    import shlex

    import torch

    from proxytune.tinyworld.evaluation import build_tuners, evaluate, format_table, save_results

    models = _family_dir(args.models)
    if args.save is not None:
        _check_save_dir(args.save)
    torch.set_num_threads(args.threads) if args.threads else None
    if args.alpha is not None:
        from proxytune.tinyworld.dial import main as dial_main

        argv = args.argv if args.argv is not None else sys.argv[1:]
        return dial_main(models, args, "proxytune " + " ".join(shlex.quote(a) for a in argv))
    tuners = build_tuners(models)
    result = evaluate(models, limit=args.limit, tuners=tuners, batch_size=args.batch_size, split=args.split, progress=None)
    print(format_table(result.accuracy, len(result.questions), result.gap_closed, result.format_rate, result.intervals()))
    if args.save is not None:
        argv = args.argv if args.argv is not None else sys.argv[1:]
        for path in save_results(result, args.save, "proxytune " + " ".join(shlex.quote(a) for a in argv)):
            print(f"saved {path}")
    return 0


def _read_source(source: str, flag: str = "--prompt-file") -> tuple[str, str]:
    """(name for messages, text) of ``flag`` SOURCE (``-``: stdin), decoded as strict UTF-8."""
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


_JSON_TYPES = {int: "a number", float: "a number", bool: "a boolean", list: "an array", dict: "an object"}


def _read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt arguments, then --prompt-file (``-`` = stdin), else stdin when it is not a terminal.

    A file holds one prompt per line (lines end at "\n" only, a "\r" before it is dropped; blank lines are
    skipped), or JSON lines with a "prompt" field when it ends in ``.jsonl``; stdin is read the same way,
    one prompt per line. Text must be UTF-8 (a leading byte-order mark is dropped).
    """
    prompts = list(args.prompt or [])
    source = args.prompt_file
    if source is None and not prompts and not sys.stdin.isatty():
        source = "-"
    if source is not None:
        name, text = _read_source(source)
        jsonl = source != "-" and source.endswith(".jsonl")
        for n, line in enumerate(text.split("\n"), 1):
            line = line[:-1] if line.endswith("\r") else line
            if not line.strip():
                continue
            if not jsonl:
                prompts.append(line)
                continue
            try:
                record = json.loads(line)
                prompt = record["prompt"]
            except (ValueError, KeyError, TypeError):
                raise CliError(f"{name}, line {n}: expected a JSON object with a \"prompt\" field") from None
            if not isinstance(prompt, str):
                got = "null" if prompt is None else _JSON_TYPES.get(type(prompt), type(prompt).__name__)
                raise CliError(f"{name}, line {n}: \"prompt\" must be a string, got {got}")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = f"U+{ord(prompt[e.start]):04X}"
                raise CliError(f"{name}, line {n}: \"prompt\" holds a lone surrogate {bad}") from None
            prompts.append(prompt)
    if not prompts and source is not None:
        raise CliError(f"no prompts: {name} holds none (blank lines are skipped)")
    if not prompts:
        raise CliError("no prompts: give --prompt TEXT, --prompt-file FILE, or pipe prompts (one per line) into stdin")
    return prompts


def _check_device(flag: str, value: Optional[str]):
    """``torch.device(value)`` if this machine has it, else a CliError naming ``flag``; None stays None."""
    import torch

    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError) as e:
        raise CliError(f"{flag}: {_one_line(str(e))}") from None
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if not callable(available) or not available():
        raise CliError(f"{flag}: no {device.type} device to run models on here (got {value!r})")
    count = getattr(module, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        raise CliError(f"{flag}: {value} does not exist; this machine has {count()} {device.type} device(s)")
    return device


class _Output:
    """Where generate writes: stdout, or --output FILE through a temporary file in FILE's directory that
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


class _Once(argparse.Action):
    """A single-valued flag that may be given once: a repeat is an error, never a silent replacement (two
    --prompt-file flags would otherwise drop the first file's prompts)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, f"given twice ({getattr(namespace, self.dest)!r}, then {values!r}); give it once")
        setattr(namespace, self.dest, values)


def _add_model_flags(p, *, loading: bool = True) -> None:
    """The models' flags of generate, score and vllm-config (``loading``: also devices, dtype, templates and
    the backend, which only the commands that load the models take)."""
    model = _nonempty("a directory or hub id")
    p.add_argument("--base", required=True, type=model, action=_Once, help="the base model (directory or hub id)")
    p.add_argument("--expert", action="append", type=model, help="a tuned small model; repeat for several pairs")
    p.add_argument("--anti-expert", action="append", type=model, help="the expert's untuned counterpart; one per --expert")
    p.add_argument("--alpha", type=_ALPHA, action="append",
                   help="weight of (expert - anti-expert): one for all pairs or one per pair (default 1.0)")  # fmt: skip
    p.add_argument("--tokenizer", default=None, type=model, action=_Once, help="the shared tokenizer (default: the base's)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models' own Python code (off by default)")
    if not loading:
        return
    p.add_argument("--expert-template", default=None, type=_text,
                   help="how experts see the prompt: 'chat' (their tokenizer's chat template) or a text with {prompt}")  # fmt: skip
    p.add_argument("--device", default=None, help="device of every model (default: cuda if available, else cpu)")
    p.add_argument("--base-device", default=None, help="device of the base only")
    p.add_argument("--expert-device", default=None, help="device of the experts and anti-experts")
    p.add_argument("--dtype", default=None, type=_dtype,
                   help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)")  # fmt: skip
    p.add_argument("--backend", default="auto", help="op backend (auto, reference, cpu, triton)")


def _pairs(args: argparse.Namespace, *, required: bool = False) -> tuple[list[str], list[str], list[float]]:
    """``(experts, anti_experts, one weight per pair)`` from the flags, checked before anything loads."""
    experts, antis = args.expert or [], args.anti_expert or []
    if required and not experts:
        raise CliError(f"{args.command} needs at least one --expert and --anti-expert pair")
    if len(experts) != len(antis):
        raise CliError(f"got {len(experts)} --expert but {len(antis)} --anti-expert; give them in pairs")
    for flag, value in (("--alpha", args.alpha), ("--expert-template", getattr(args, "expert_template", None))):
        if value is not None and not experts:
            raise CliError(f"{flag} needs --expert and --anti-expert (it applies to the expert pairs)")
    alphas = args.alpha or [1.0]
    if len(alphas) not in (1, len(experts)):
        raise CliError(f"--alpha: give one for all pairs or one per pair ({len(experts)}), got {len(alphas)}")
    return experts, antis, alphas * len(experts) if len(alphas) == 1 else alphas


def _check_devices_and_backend(args: argparse.Namespace) -> None:
    """The device flags and the backend, checked (cheaply) before the models load."""
    import torch

    from proxytune import backends

    device = _check_device("--device", args.device)
    base_device = _check_device("--base-device", args.base_device) or device
    _check_device("--expert-device", args.expert_device)
    try:
        backends.resolve(args.backend, base_device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    except (ValueError, backends.BackendUnavailableError) as e:
        raise CliError(f"--backend: {e}") from None


def _load_tuner(args: argparse.Namespace, experts, antis, weights, progress: bool, **options):
    """The ProxyTuner of the model flags (transformers' own progress bars off unless ``progress``)."""
    from proxytune.engine import ModelSpec, ProxyTuner

    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own "Loading weights" bars
    small_device = args.expert_device or args.device
    return ProxyTuner(
        ModelSpec(args.base, device=args.base_device or args.device),
        [ModelSpec(e, device=small_device, template=args.expert_template) for e in experts],
        [ModelSpec(a, device=small_device) for a in antis],
        weights=weights, tokenizer=args.tokenizer, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
        backend=args.backend, progress=progress, **options,
    )  # fmt: skip


def _generate(args: argparse.Namespace) -> int:
    from proxytune.engine import SamplingParams

    experts, antis, weights = _pairs(args)
    jsonl = args.format == "jsonl"
    if args.logprobs and not jsonl:
        raise CliError("--logprobs needs --format jsonl")
    if args.speculative_tokens and not experts:
        raise CliError("--speculative-tokens needs --expert and --anti-expert (the first expert drafts)")
    if args.speculative_tokens and args.decode in ("static", "graph"):
        raise CliError(f"--speculative-tokens runs in the eager decoder, not with --decode {args.decode}")
    # everything is checked before the slow loading
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, seed=args.seed, stop=tuple(args.stop or ()),
    ).checked(len(experts), "parameters")  # fmt: skip  (the flags' types checked these already)
    _check_devices_and_backend(args)
    prompts = _read_prompts(args)
    progress = not args.quiet and sys.stderr.isatty()
    out = _Output(args.output)
    try:
        tuner = _load_tuner(args, experts, antis, weights, progress, decode=args.decode, poll_every=args.poll_every,
                            speculative_tokens=args.speculative_tokens)  # fmt: skip
        if progress and tuner.decode_reason:
            print(f"proxytune: decode={tuner.decode} ({tuner.decode_reason})", file=sys.stderr)
        _write(tuner, prompts, params, args, out.file)
    except BaseException:
        out.discard()
        raise
    out.commit()
    return 0


def _write(tuner, prompts: list[str], params, args: argparse.Namespace, out) -> None:
    """Generate and write: text (a newline after each text that lacks one) or JSON lines; streamed or not."""
    jsonl = args.format == "jsonl"
    if args.stream:
        # text: one prompt after the other, so the text reads in order; jsonl: one line per token
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
        return
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
            out.write(g.text if g.text.endswith("\n") else g.text + "\n")


def _json_text_or_ids(value, field: str, where: str):
    """A record's ``prompt`` / ``continuation``: a string (valid Unicode) or a list of non-negative integer ids."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise CliError(f"{where}: \"{field}\" holds a lone surrogate U+{ord(value[e.start]):04X}") from None
        return value
    if isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        return value
    got = "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)
    if isinstance(value, list):
        got = "an array that is not all non-negative integers"
    raise CliError(f"{where}: \"{field}\" must be a string or an array of token ids, got {got}")


def _read_pairs(source: str) -> tuple[list, list]:
    """--input FILE (``-``: stdin): JSON lines ``{"prompt": ..., "continuation": ...}`` (strings or arrays of
    token ids); blank lines are skipped. Empty continuations are refused here, before any model loads."""
    name, text = _read_source(source, "--input")
    prompts, conts = [], []
    for n, line in enumerate(text.split("\n"), 1):
        line = line[:-1] if line.endswith("\r") else line
        if not line.strip():
            continue
        where = f"{name}, line {n}"
        try:
            record = json.loads(line)
        except ValueError:
            raise CliError(f"{where}: not JSON; expected an object with \"prompt\" and \"continuation\"") from None
        if not isinstance(record, dict) or "prompt" not in record or "continuation" not in record:
            raise CliError(f"{where}: expected a JSON object with \"prompt\" and \"continuation\" fields")
        prompt = _json_text_or_ids(record["prompt"], "prompt", where)
        cont = _json_text_or_ids(record["continuation"], "continuation", where)
        if len(cont) == 0:
            raise CliError(f"{where}: \"continuation\" is empty: there is nothing to score")
        prompts.append(prompt)
        conts.append(cont)
    if not prompts:
        raise CliError(f"--input: {name} holds no prompt/continuation pairs (blank lines are skipped)")
    return prompts, conts


def _score(args: argparse.Namespace) -> int:
    experts, antis, weights = _pairs(args)
    _check_devices_and_backend(args)
    if args.input is None and sys.stdin.isatty():
        raise CliError("--input: give a JSON-lines file of {\"prompt\": ..., \"continuation\": ...} (or - for stdin)")
    prompts, conts = _read_pairs(args.input or "-")
    progress = not args.quiet and sys.stderr.isatty()
    out = _Output(args.output)
    try:
        tuner = _load_tuner(args, experts, antis, weights, progress)
        scores = tuner.score(prompts, conts, batch_size=args.batch_size)
        for i, (p, c, sc) in enumerate(zip(prompts, conts, scores)):
            record = {"index": i, "prompt": p, "continuation": c, "logprob": sc.logprob, "is_greedy": sc.is_greedy,
                      "token_ids": sc.token_ids, "token_logprobs": sc.token_logprobs}  # fmt: skip
            out.file.write(json.dumps(record, ensure_ascii=False) + "\n")
    except BaseException:
        out.discard()
        raise
    out.commit()
    return 0


def _add_score_parser(sub) -> None:
    sc = sub.add_parser(
        "score", help="proxy-tuned log-likelihood of continuations (JSON lines in and out)",
        description="Score each continuation after its prompt under base + alpha * (expert - anti_expert) at "
        "temperature 1 (no filters): one JSON line per pair with the continuation's token ids, their log-probabilities, "
        "the sum and whether greedy decoding gives it. A text continuation is tokenised as lm-evaluation-harness "
        "does (see ProxyTuner.score).",
    )  # fmt: skip
    _add_model_flags(sc)
    sc.add_argument("--input", "-i", default=None, type=_nonempty("a file name or - for stdin"), action=_Once,
                    help='JSON lines {"prompt": ..., "continuation": ...}, strings or arrays of token ids; - for stdin')  # fmt: skip
    sc.add_argument("--batch-size", type=_POSITIVE, default=None, help="pairs per forward (default: all)")
    sc.add_argument("--output", "-o", default=None, type=_nonempty("a file name"), action=_Once,
                    help="write here instead of stdout (replaced only when the run succeeds)")  # fmt: skip
    sc.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sc.set_defaults(run=_score)


_TEMPERATURE = _real("finite, >= 0 and at most 3.4e38 (float32; 0 = greedy)", lambda t: t >= 0)
_TOP_P = _real("in (0, 1]", lambda p: 0 < p <= 1)
_MIN_P = _real("in [0, 1), also when rounded to float32", lambda p: 0 <= p < 1, rounded=True)
def _weight_ok(a: float) -> bool:
    from proxytune._rules import check_weight

    try:
        check_weight(a)
    except (TypeError, ValueError):
        return False
    return True


_ALPHA = _parsed("number", float, "a finite number with |w| <= 1e6", _weight_ok)  # the one weight rule (_rules)


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser(
        "generate", help="proxy-tuned text generation with Hugging Face models",
        description="Generate text from base + alpha * (expert - anti_expert). Models are local directories or "
        "hub ids (from the local cache when offline); all must share one tokenizer.",
    )  # fmt: skip
    _add_model_flags(gen)
    gen.add_argument("--prompt", action="append", type=_text, help="a prompt; repeat for a batch")
    gen.add_argument("--prompt-file", type=_nonempty("a file name or - for stdin"), action=_Once,
                     help="prompts, one per line (or JSON lines with a \"prompt\" field if .jsonl); - for stdin")  # fmt: skip
    gen.add_argument("--max-new-tokens", type=_COUNT, default=64)
    gen.add_argument("--temperature", type=_TEMPERATURE, default=1.0, help="0 = greedy (default 1.0)")
    gen.add_argument("--top-p", type=_TOP_P, default=1.0)
    gen.add_argument("--top-k", type=_COUNT, default=0)
    gen.add_argument("--min-p", type=_MIN_P, default=0.0)
    gen.add_argument("--seed", type=_integer(-(2**63), 2**63 - 1), default=None,
                     help="noise seed of every prompt (default: a fresh one each)")  # fmt: skip
    gen.add_argument("--stop", action="append", type=_nonempty("a non-empty string"), help="a stop string; repeatable")
    gen.add_argument("--batch-size", type=_POSITIVE, default=None, help="prompts per batch (default: all)")
    gen.add_argument("--decode", choices=["auto", "eager", "static", "graph"], default="auto",
                     help="decode step: eager, static (static caches and buffers) or graph (CUDA graphs, not yet "
                          "verified on a GPU); auto is eager for now")
    gen.add_argument("--poll-every", type=_integer(1, _INT32), default=8,
                     help="static/graph decode: steps between host polls")  # fmt: skip
    gen.add_argument("--speculative-tokens", type=_COUNT, default=0, metavar="K",
                     help="speculative decoding: the first expert drafts up to K tokens per round, the base verifies "
                          "them in one forward; same distribution (greedy: same ids). 0 = off (default)")  # fmt: skip
    gen.add_argument("--format", choices=["text", "jsonl"], default="text")
    gen.add_argument("--logprobs", action="store_true", help="with --format jsonl: each token's log-probability")
    gen.add_argument("--stream", action="store_true", help="write tokens as they are generated")
    gen.add_argument("--output", "-o", default=None, type=_nonempty("a file name"), action=_Once,
                     help="write here instead of stdout (replaced only when the run succeeds)")  # fmt: skip
    gen.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    gen.set_defaults(run=_generate)


def _vllm_config(args: argparse.Namespace) -> int:
    """Write the proxy-tuned model directory that vLLM serves (proxytune.integrations.vllm.config)."""
    experts, antis, weights = _pairs(args, required=True)
    from proxytune.integrations.vllm.config import write_model_dir

    block = write_model_dir(  # its errors (VllmConfigError, vocabulary, loading) are ValueErrors: one line each
        args.output, args.base, experts, antis, weights,
        tokenizer=args.tokenizer, trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    pairs = ", ".join(f"{p['weight']:g} x ({p['expert']} - {p['anti_expert']})" for p in block["pairs"])
    print(f"{args.output}: {block['base']} + {pairs}, vocabulary {block['vocab_size']}")
    return 0


def _add_vllm_config_parser(sub) -> None:
    vc = sub.add_parser(
        "vllm-config", help="write a model directory that vLLM serves as base + alpha * (expert - anti_expert)",
        description="Check the checkpoints (one shared vocabulary, architectures vLLM has, KV cache layouts vLLM "
        "can unify) and write DIR: a config.json naming them and the weights, the shared tokenizer and a small "
        "weights file. vllm.LLM(model=DIR) and vLLM's OpenAI server load it through the proxytune plugin.",
    )  # fmt: skip
    _add_model_flags(vc, loading=False)
    vc.add_argument("--output", "-o", required=True, type=_nonempty("a directory"), action=_Once,
                    help="the directory to write (new, empty, or one this command wrote before)")  # fmt: skip
    vc.set_defaults(run=_vllm_config)


def _parser() -> argparse.ArgumentParser:
    from proxytune import __version__

    parser = _Parser(prog="proxytune", description="Fast decoding-time proxy-tuning.")
    parser.add_argument("--version", action="version", version=f"proxytune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    family = _nonempty("a directory")
    demo = sub.add_parser("demo", help="proxy-tuning a shipped tiny model family: answers side by side, accuracy table")
    demo.add_argument("--models", default=None, type=family, action=_Once, help="the family's directory (default: the shipped one)")
    demo.add_argument("--examples", type=_POSITIVE, default=4, help="held-out questions shown side by side")
    demo.add_argument("--limit", type=_POSITIVE, default=None, help="held-out questions in the table (default: all)")
    demo.set_defaults(run=_demo)
    ev = sub.add_parser("eval", help="held-out exact match of the tiny family and the proxy-tuned large model")
    ev.add_argument("--models", default=None, type=family, action=_Once, help="the family's directory (default: the shipped one)")
    ev.add_argument("--limit", type=_POSITIVE, default=None, help="only the first N held-out questions")
    ev.add_argument("--batch-size", type=_POSITIVE, default=256)
    ev.add_argument("--threads", type=_integer(1, 1024), default=None, help="torch CPU threads (default: torch's)")
    ev.add_argument("--save", default=None, metavar="DIR", type=family, action=_Once,
                    help="write tinyworld_eval.{json,txt,png} into DIR (checked before evaluating)")  # fmt: skip
    from proxytune.tinyworld.dial import SPLITS, parse_weights

    ev.add_argument("--alpha", default=None, metavar="A[,A...]", type=_parsed("list", parse_weights, "one or "
                    "more distinct numbers separated by commas, each finite with |w| <= 1e6", bool), help="the proxy's weights: each is reported, one is "
                    "chosen on the validation half; --save writes tinyworld_dial.{json,txt,png} and _tokens.png")  # fmt: skip
    ev.add_argument("--split", default="all", choices=SPLITS,
                    help="held-out questions: the validation half, the test half, or all (default)")  # fmt: skip
    ev.set_defaults(run=_eval)
    _add_generate_parser(sub)
    _add_score_parser(sub)
    _add_vllm_config_parser(sub)
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
    except (CliError, ValueError, TypeError, OSError, BackendUnavailableError, MemoryError) as e:
        message = str(e) or type(e).__name__
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
        message = f"out of memory: {e}"
    print(f"proxytune: error: {_one_line(message)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
