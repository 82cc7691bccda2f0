"""Everything a lent GPU must verify, in one call: ``scripts/gpu_check.sh`` runs this.

Sections, in order, each in a subprocess with its own time limit (the whole check is planned for at most
8 minutes on an H100 / H200, Triton compilation included):

* ``env``: device name, capability, SMs, memory; torch, CUDA, triton, transformers, Python; the commit.
* ``tests``: ``pytest -m cuda tests/`` and the Triton kernel's whole default file (which runs the compiled
  kernel on the GPU at the interpreter's small sizes: every constexpr variant the launcher can choose).
* ``sampler``: ``proxytune.sample`` at B in {1, 64}, V = 128256, bf16, one pair, temperature 0.7, top-p 0.9:
  the naive pipeline, ``reference`` and ``triton`` (CUDA-event medians), with the memory floor
  ``3 * B * V * 2`` bytes over the copy bandwidth measured in the same run.
* ``decode``: ``benchmarks/test_decode_graph.py`` with ``PROXYTUNE_BENCH_QUICK=1`` (small Llama shapes,
  B in {1, 8}): naive vs eager vs graph (one stream) vs graph + streams.

One results file, ``benchmarks/results/<YYYYMMDD>_<gpu>.txt`` (``--out`` overrides), written as each
section ends (a killed run keeps what it finished) and copied to ``$OUT`` when that is set (the device
tool brings ``$OUT`` back). Exit status: 0 when every section passed, 1 when one failed, 2 for bad arguments
or no GPU (``--allow-no-gpu`` records the GPU sections as skipped instead: how the default suite tests
this script on a CPU).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "tests", "sampler", "decode")
LIMITS_S = {"env": 60, "tests": 330, "sampler": 60, "decode": 150}  # 10 min at most; 8 planned (see note)


def slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"``: letters, digits and single dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", name.lower())).strip("-") or "unknown"


def results_path(day: datetime.date, gpu_name: str) -> Path:
    return ROOT / "benchmarks" / "results" / f"{day:%Y%m%d}_{slug(gpu_name)}.txt"


def _env_lines() -> list[str]:
    import torch

    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines += [f"device: {p.name}", f"capability: {p.major}.{p.minor}", f"sms: {p.multi_processor_count}",
                  f"memory_gib: {p.total_memory / 2**30:.1f}", f"cuda: {torch.version.cuda}"]  # fmt: skip
    else:
        lines += ["device: none (no CUDA device)"]
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "not installed"
    lines += [f"{k}: {v}" for k, v in versions.items()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    lines.append(f"commit: {commit.stdout.strip() or 'unknown (no git here)'}")
    return lines


def _gpu_name() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _section_commands(section: str) -> list[list[str]]:
    """The commands of a GPU section, run one after another within its time limit."""
    py, pytest = sys.executable, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    if section == "tests":
        # every cuda-marked test, then the Triton file's default tests, which on a GPU run the compiled kernel
        # (about 29 distinct compilations, counted on CPU from the launches' specialisations; 8-30 s each on
        # this project's 2-core CPU by kernels/aot.py): spread over processes where pytest-xdist is there
        workers = ["-n", "8"] if importlib.util.find_spec("xdist") is not None else []
        return [pytest + workers + ["-m", "cuda", "tests/"],
                pytest + workers + ["-m", "not slow and not cuda", "tests/test_triton_backend.py"]]  # fmt: skip
    if section == "sampler":
        return [[py, str(Path(__file__).resolve()), "--sampler-bench"]]
    if section == "decode":
        return [pytest + ["-s", "benchmarks/test_decode_graph.py"]]
    raise ValueError(section)


def sampler_bench() -> list[str]:
    """The short sampler benchmark (runs in the ``sampler`` section's subprocess)."""
    import torch
    import triton.testing

    sys.path.insert(0, str(ROOT / "benchmarks"))  # its modules import each other by name, as under pytest
    import proxytune
    from conftest import measure_copy_bandwidth
    from naive import naive_sample
    from proxytune.testing import proxy_inputs

    device = torch.device("cuda")
    bandwidth = measure_copy_bandwidth(device)["bytes_per_s"]
    vocab, lines = 128256, [f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)"]
    lines.append(f"{'B':>4} {'backend':<10} {'median us':>10} {'x naive':>8} {'x floor':>8}")
    for batch in (1, 64):
        base, experts, antis = proxy_inputs(batch, vocab, 1, torch.bfloat16, "cuda", seed=batch)
        floor = 3 * batch * vocab * 2 / bandwidth
        kw = dict(temperature=0.7, top_p=0.9, seed=1234, validate=False)
        calls = {
            "naive": lambda: naive_sample(base, experts, antis, 1.0, 0.7, 0.9),
            "reference": lambda: proxytune.sample(base, experts, antis, backend="reference", **kw),
            "triton": lambda: proxytune.sample(base, experts, antis, backend="triton", **kw),
        }
        times = {name: triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3
                 for name, fn in calls.items()}  # fmt: skip
        ids = calls["triton"]()
        assert ((ids >= 0) & (ids < vocab)).all(), "triton returned an invalid token id"
        for name, t in times.items():
            lines.append(f"{batch:>4} {name:<10} {t * 1e6:>10.1f} {times['naive'] / t:>7.1f}x {t / floor:>7.2f}x")
    return lines


def _run_section(section: str, gpu: Optional[str]) -> tuple[str, list[str]]:
    """``(status, lines)`` of one section: passed, failed (exit code), timed out, or skipped."""
    if section == "env":
        return "passed", _env_lines()
    if gpu is None:
        return "skipped (no CUDA device)", []
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", PROXYTUNE_BENCH_QUICK="1",
               TRITON_DEFAULT_FP_FUSION="1")  # fmt: skip
    start, lines, failures = time.monotonic(), [], []
    for command in _section_commands(section):
        left = LIMITS_S[section] - (time.monotonic() - start)
        lines.append("$ " + " ".join(command[1:] if command[0] == sys.executable else command))
        try:
            out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(left, 1))
        except subprocess.TimeoutExpired as e:
            text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return f"timed out after {LIMITS_S[section]} s", lines + text.splitlines()[-60:]
        lines += (out.stdout + ("\n" + out.stderr if out.returncode else "")).splitlines()[-80:]
        if out.returncode:
            failures.append(out.returncode)
    took = time.monotonic() - start
    status = f"failed (exit {failures[0]})" if failures else "passed"
    return f"{status} in {took:.0f} s", lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description="The prepared check for a lent GPU.")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/<date>_<gpu>.txt)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--allow-no-gpu", action="store_true", help="record the GPU sections as skipped without a GPU")
    parser.add_argument("--sampler-bench", action="store_true", help=argparse.SUPPRESS)  # the sampler subprocess
    args = parser.parse_args(argv)
    if args.sampler_bench:
        print("\n".join(sampler_bench()))
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f"--sections: unknown or empty {unknown or args.sections!r}; choose from {', '.join(SECTIONS)}")
    gpu = _gpu_name()
    if gpu is None and not args.allow_no_gpu:
        parser.error("no CUDA device here (pass --allow-no-gpu to record the GPU sections as skipped)")
    path = args.out or results_path(datetime.date.today(), gpu or "no-gpu")
    if path.exists() and path.is_dir():
        parser.error(f"--out {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    report = [f"# proxytune GPU check: {gpu or 'no CUDA device'}", f"command: scripts/gpu_check.sh {' '.join(argv or sys.argv[1:])}".rstrip()]
    failed = False
    for section in sections:
        status, lines = _run_section(section, gpu)
        failed |= not (status.startswith("passed") or status.startswith("skipped"))
        report += ["", f"## {section}: {status}", *lines]
        path.write_text("\n".join(report) + "\n")
        if os.environ.get("OUT"):
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
        print(f"gpu_check: {section}: {status}", flush=True)
    print(f"gpu_check: results in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
