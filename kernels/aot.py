"""Compile the fused sampler ahead of time for a GPU target, on any machine (no GPU needed), and report it.

    python -m proxytune.kernels.aot --arch 90 --dtype bfloat16 --batch 64 --vocab 128256 --json
    python -m proxytune.kernels.aot --arch 80 90 --dtype bfloat16 float16 float32 --batch 1 64 256 --json

For every configuration it builds the launch :func:`~proxytune.kernels.launch.proxy_sample` would make on
that target (the same :func:`~proxytune.kernels.launch.launch_settings` and
:func:`~proxytune.kernels.launch.kernel_arguments`, with meta tensors standing in for contiguous,
16-byte-aligned logits), lets triton's own argument binder specialise it as a real launch would, compiles it
with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` (triton's bundled ptxas) and reads ptxas' report.
One JSON object per configuration: ``arch dtype batch vocab pairs filters num_warps block cap split
registers spill_stores spill_loads spill_bytes stack_bytes shared_bytes compile_s`` (and ``ptx_file``).

Identical compilations (the same specialisation: e.g. two vocabularies with the same divisibility) are
compiled once per process. A developer tool: nothing else in proxytune imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import time
from typing import Optional, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Streaming multiprocessors of the usual part of each target (the split over programs depends on it).
DEFAULT_SMS = {80: 108, 86: 84, 89: 128, 90: 132}

__all__ = ["compile_report", "main", "DTYPES", "DEFAULT_SMS"]

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_compiled: dict[str, dict] = {}


def compile_report(
    arch: int, dtype: str, batch: int, vocab: int, *, pairs: int = 1, num_warps: Optional[int] = None,
    sms: Optional[int] = None, filters: tuple[bool, bool, bool] = (True, True, True),
    write_logprobs: bool = True, ptx_out: Optional[str] = None,
) -> dict:  # fmt: skip
    """Compile one configuration for ``sm_<arch>`` and return its report (see the module docstring).

    ``filters`` are the kernel's ``HAS_TOPK / HAS_TOPP / HAS_MINP`` flags, ``num_warps`` None means the
    launcher's default, ``sms`` None the :data:`DEFAULT_SMS` of the target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from triton.runtime.jit import JITFunction

    from . import sample_kernel
    from .launch import Scratch, kernel_arguments, launch_settings

    kernel = sample_kernel.proxy_sample_kernel
    if not isinstance(kernel, JITFunction):
        # triton's interpreter was on when the kernels were imported here (TRITON_INTERPRET=1): they are numpy
        # functions, and the interpreter patches triton.language for good. Compile in a fresh process.
        return _compile_in_subprocess(arch, dtype, batch, vocab, pairs, num_warps, sms, filters, write_logprobs, ptx_out)

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if batch < 1 or vocab < 2 or pairs < 0:
        raise ValueError(f"batch >= 1, vocab >= 2 and pairs >= 0 are needed, got {batch}, {vocab}, {pairs}")
    sms = sms or DEFAULT_SMS.get(arch, 132)
    settings = launch_settings(batch, vocab, sms, num_warps=num_warps)
    meta = lambda *shape, dt=torch.float32: torch.empty(*shape, dtype=dt, device="meta")  # noqa: E731
    logits = lambda: meta(batch, vocab, dt=DTYPES[dtype])  # noqa: E731
    f32, i64 = (meta(batch) for _ in range(3)), (meta(batch, dt=torch.int64) for _ in range(3))
    (temperature, top_p, min_p), (top_k, seed, step) = f32, i64
    scratch = Scratch.allocate(torch.device("meta"), batch, settings.split, settings.cap)
    grid, args, constants = kernel_arguments(
        logits(), [logits() for _ in range(pairs)], [logits() for _ in range(pairs)], meta(pairs, batch),
        temperature, top_k, top_p, min_p, seed, step, vocab, meta(batch, dt=torch.int64), meta(batch), scratch,
        settings, filters=filters, write_logprobs=write_logprobs,
    )  # fmt: skip

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **constants)
    options, signature, constexprs, attrs = kernel._pack_args(backend, constants, bound, specialization, options)
    key = repr((arch, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()), options))
    if key not in _compiled:
        log = io.StringIO()
        start = time.perf_counter()
        knobs = triton.knobs
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed by triton
            knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)  # fmt: skip
        _compiled[key] = _parse_ptxas(log.getvalue(), compiled, time.perf_counter() - start)
    report = dict(
        arch=arch, dtype=dtype, batch=batch, vocab=vocab, pairs=pairs, filters=list(filters),
        write_logprobs=write_logprobs, num_warps=options.num_warps, block=settings.block, cap=settings.cap,
        split=settings.split, **{k: v for k, v in _compiled[key].items() if k != "ptx"},
    )  # fmt: skip
    if ptx_out:
        with open(ptx_out, "w") as f:
            f.write(_compiled[key]["ptx"])
        report["ptx_file"] = ptx_out
    return report


def _compile_in_subprocess(arch, dtype, batch, vocab, pairs, num_warps, sms, filters, write_logprobs, ptx_out) -> dict:
    import os
    import subprocess

    argv = [sys.executable, "-m", "proxytune.kernels.aot", "--arch", str(arch), "--dtype", dtype, "--batch", str(batch),
            "--vocab", str(vocab), "--pairs", str(pairs), "--filters", ",".join(str(int(f)) for f in filters), "--json"]  # fmt: skip
    argv += ["--num-warps", str(num_warps)] if num_warps else []
    argv += ["--sms", str(sms)] if sms else []
    argv += [] if write_logprobs else ["--no-logprobs"]
    argv += ["--ptx-out", ptx_out] if ptx_out else []
    out = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, TRITON_INTERPRET="0"))
    if out.returncode:
        raise RuntimeError(f"AOT compilation failed ({' '.join(argv[1:])}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _filter_flags(text: str) -> tuple[bool, bool, bool]:
    parts = text.split(",")
    if len(parts) != 3 or any(p not in ("0", "1") for p in parts):
        raise argparse.ArgumentTypeError(f"must be three 0/1 flags (top-k, top-p, min-p), e.g. 1,1,0; got {text!r}")
    return tuple(p == "1" for p in parts)


def _parse_ptxas(log: str, compiled, seconds: float) -> dict:
    used, frame = _PTXAS_USED.findall(log), _PTXAS_FRAME.findall(log)
    if len(used) != 1 or len(frame) != 1:  # one kernel, one function: anything else is a format change
        raise RuntimeError(f"unexpected ptxas report (expected one kernel):\n{log}")
    stack, stores, loads = (int(x) for x in frame[0])
    return dict(
        registers=int(used[0]), spill_stores=stores, spill_loads=loads, spill_bytes=stores + loads,
        stack_bytes=stack, shared_bytes=int(compiled.metadata.shared), compile_s=round(seconds, 2),
        ptx=compiled.asm["ptx"],
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m proxytune.kernels.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 90 (default 90)")
    p.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=sorted(DTYPES), help="logits dtype")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes B")
    p.add_argument("--vocab", type=int, nargs="+", default=[128256], help="vocabulary sizes V")
    p.add_argument("--pairs", type=int, default=1, help="(expert, anti-expert) pairs (default 1)")
    p.add_argument("--num-warps", type=int, default=None, help="override the launcher's warps per program")
    p.add_argument("--sms", type=int, default=None, help="SM count (default: the usual part of the target)")
    p.add_argument("--filters", type=_filter_flags, default=(True, True, True),
                   help="HAS_TOPK,HAS_TOPP,HAS_MINP as three 0/1 flags (default 1,1,1)")  # fmt: skip
    p.add_argument("--no-filters", action="store_true", help="compile with top-k, top-p and min-p compiled out")
    p.add_argument("--no-logprobs", action="store_true", help="compile without the log-probability store")
    p.add_argument("--ptx-out", default=None, help="write the PTX here (one configuration only)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (default: a table)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    configs = [(arch, dt, b, v) for arch in a.arch for dt in a.dtype for b in a.batch for v in a.vocab]
    if a.ptx_out and len(configs) != 1:
        parser.error("--ptx-out needs exactly one configuration")
    if a.num_warps is not None and (a.num_warps < 1 or a.num_warps & (a.num_warps - 1)):
        parser.error(f"--num-warps must be a power of two, got {a.num_warps}")
    for name, values in (("--batch", a.batch), ("--vocab", a.vocab), ("--arch", a.arch)):
        if any(v < 1 for v in values):
            parser.error(f"{name} values must be positive")
    if a.pairs < 0:
        parser.error("--pairs must be >= 0")
    filters = (False, False, False) if a.no_filters else a.filters
    columns = ["arch", "dtype", "batch", "vocab", "num_warps", "registers", "spill_bytes", "stack_bytes",
               "shared_bytes", "compile_s"]  # fmt: skip
    if not a.json:
        print(" ".join(f"{c:>12}" for c in columns))
    for arch, dt, b, v in configs:
        r = compile_report(arch, dt, b, v, pairs=a.pairs, num_warps=a.num_warps, sms=a.sms, filters=filters,
                           write_logprobs=not a.no_logprobs, ptx_out=a.ptx_out)  # fmt: skip
        print(json.dumps(r) if a.json else " ".join(f"{str(r[c]):>12}" for c in columns), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
