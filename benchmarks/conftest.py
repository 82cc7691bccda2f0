"""Shared machinery of ``pytest benchmarks``: the copy-bandwidth probe, the results collector and the table.

Each benchmark records its timings in a :class:`BenchRun` kept on the pytest config. At the end of the
session :func:`pytest_terminal_summary` prints, for every case and backend, the median time, the speed-up
over the naive pipeline measured in the same run, and the memory floor: the ``3 * B * V * bytes`` that the
three logits tensors take to read once, divided by the copy bandwidth measured in the same run.
With ``--save-results`` (or ``PROXYTUNE_BENCH_SAVE=1``) the raw numbers also go to ``benchmarks/results/``.

``PROXYTUNE_CPU_BUILD`` (or ``--cpu-build``) times another build of the C++ op in place of the installed
one: a name from ``proxytune._cpu_build.NAMED_BUILDS`` (``x86-64-v3``: the AVX2 code alone, so a machine with
AVX-512 measures what an AVX2 machine runs; ``baseline``, ``x86-64-v4``), built once into the cache, or the
path of a built ``_C*.so``. It is loaded before proxytune is imported; the table and the saved results say
which build ran and what its vector code was compiled for.
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
COPY_BYTES = 256 * 2**20  # per buffer: far larger than any cache, so the copy streams through DRAM / HBM
COPY_REPEATS = 10
_DEFAULT_COLUMNS = ["min", "max", "mean", "stddev", "median", "iqr", "outliers", "ops", "rounds", "iterations"]


@dataclass
class Record:
    """One benchmark: a backend on one case. Times in seconds, bytes in bytes."""

    device: str
    dtype: str
    batch: int
    vocab: int
    top_p: float
    backend: str
    median_s: float
    min_s: float
    mean_s: float
    stddev_s: float
    rounds: int
    floor_bytes: int  # 3 * B * V * bytes per element: base, expert and anti-expert read once
    times_s: list[float] = field(default_factory=list, repr=False)  # every round; JSON only, not the CSV


@dataclass
class BenchRun:
    records: list[Record] = field(default_factory=list)
    cpu_build: Optional[dict] = None  # the C++ op build loaded in place of the installed one, if any
    bandwidth: dict[str, dict] = field(default_factory=dict)  # device type -> probe result
    started: float = field(default_factory=time.time)
    load_at_start: Optional[float] = field(default_factory=lambda: _load_average())

    def copy_bandwidth(self, device: torch.device) -> float:
        """Bytes per second of ``dst.copy_(src)`` on ``device``, read + write counted; measured once per run."""
        if device.type not in self.bandwidth:
            self.bandwidth[device.type] = measure_copy_bandwidth(device)
        return self.bandwidth[device.type]["bytes_per_s"]

    def reprobe_bandwidth(self) -> None:
        """Probe again at the end and keep the better: a busy moment at the start must not lower the floor."""
        for dev, first in list(self.bandwidth.items()):
            again = measure_copy_bandwidth(torch.device(dev))
            best = again if again["bytes_per_s"] > first["bytes_per_s"] else first
            self.bandwidth[dev] = {**best, "probes_gb_per_s": [round(p["bytes_per_s"] / 1e9, 2) for p in (first, again)]}


_RUN_KEY = pytest.StashKey[BenchRun]()


def measure_copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> dict:
    """Time ``dst.copy_(src)`` of two ``nbytes`` fp32 buffers; the best of ``repeats`` gives the bandwidth.

    The suite probes at its start (before the first timing on the device) and again at its end, and keeps
    the better probe.

    A copy reads ``nbytes`` and writes ``nbytes``, so the bandwidth is ``2 * nbytes / time``. The best run,
    not the median, because the floor built from it is a lower bound on what any kernel can do.
    """
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):  # first-touch page faults, allocator, clocks
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    best, median = min(times), sorted(times)[len(times) // 2]
    return {
        "bytes_per_s": 2 * nbytes / best,
        "median_bytes_per_s": 2 * nbytes / median,
        "buffer_bytes": nbytes,
        "repeats": repeats,
        "method": "dst.copy_(src), fp32, best of repeats, read+write bytes counted",
    }


def _load_average() -> Optional[float]:
    """The 1-minute load average: other processes on the machine make every CPU timing slower."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------- pytest hooks


def pytest_addoption(parser):
    parser.addoption(
        "--save-results", action="store_true", default=False,
        help="proxytune benchmarks: write raw numbers to benchmarks/results/ (also PROXYTUNE_BENCH_SAVE=1)",
    )  # fmt: skip
    parser.addoption(
        "--cpu-build", default=os.environ.get("PROXYTUNE_CPU_BUILD", ""),
        help="proxytune benchmarks: time this build of the C++ op instead of the installed one: x86-64-v3, "
             "x86-64-v4, baseline (built once into the cache) or the path of a built _C*.so "
             "(also PROXYTUNE_CPU_BUILD)",
    )  # fmt: skip


def _cpu_build_module():
    """proxytune/_cpu_build.py loaded by path: importing the package would load the installed op first."""
    path = Path(__file__).resolve().parents[1] / "proxytune" / "_cpu_build.py"
    spec = importlib.util.spec_from_file_location("_proxytune_cpu_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_cpu_build(spec: str) -> dict:
    """Load the C++ op build ``spec`` as ``proxytune._C`` (before proxytune is imported) and describe it."""
    if "proxytune._C" in sys.modules or "proxytune" in sys.modules:
        raise pytest.UsageError(
            f"--cpu-build {spec}: proxytune was imported before the benchmarks' conftest ran, so the installed "
            "op is loaded already (both register the same op names); run pytest on benchmarks/ alone"
        )
    cpu_build = _cpu_build_module()
    try:
        path = cpu_build.named_build(spec)
    except cpu_build.BuildError as exc:
        raise pytest.UsageError(f"--cpu-build {spec}: {exc}") from exc
    ext = cpu_build.load(path)
    target = ext.target() if hasattr(ext, "target") else "?"
    return {"build": spec, "flags": list(cpu_build.NAMED_BUILDS.get(spec, ())), "path": str(path), "target": target}


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its display options
def pytest_configure(config):
    config.stash[_RUN_KEY] = BenchRun()
    spec = config.getoption("cpu_build", "")
    if spec and spec != "installed":
        config.stash[_RUN_KEY].cpu_build = load_cpu_build(spec)
    opt = config.option
    # pytest-benchmark's own table: compact and in parametrisation order, unless asked otherwise.
    if getattr(opt, "benchmark_columns", None) == _DEFAULT_COLUMNS:
        opt.benchmark_columns = ["min", "median", "iqr", "rounds"]
    if getattr(opt, "benchmark_sort", None) == "min":
        opt.benchmark_sort = "fullname"


@pytest.fixture(scope="session")
def bench_run(request) -> BenchRun:
    return request.config.stash[_RUN_KEY]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter, config):
    run = config.stash.get(_RUN_KEY, None)
    if run is None or not run.records:
        return
    run.reprobe_bandwidth()
    write = terminalreporter.write_line
    terminalreporter.section("proxytune: backends vs the naive pipeline (same run)")
    for line in summary_lines(run):
        write(line)
    if saving(config):
        paths = save_results(run, config)
        write("")
        for path in paths:
            write(f"saved {path}")


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def summary_lines(run: BenchRun) -> list[str]:
    threads, load, cores = torch.get_num_threads(), _load_average(), os.cpu_count()
    lines = [
        f"torch {torch.__version__}, {threads} torch CPU threads on {cores} cores; "
        f"load average {_fmt_load(run.load_at_start)} at start, {_fmt_load(load)} at end.",
        "median: of the rounds shown. x naive = naive median / backend median (> 1: faster than naive).",
        "floor = 3*B*V*bytes / copy bandwidth: the time to read base, expert and anti-expert once from memory;",
        "x floor = median / floor (1 = at the floor); GB/s = 3*B*V*bytes / median.",
    ]
    # This run itself adds up to `threads` to the load, so only a high load says that others were busy.
    if cores and ((run.load_at_start or 0) > cores / 2 or (load or 0) > cores + 0.5):
        lines.append("NOTE: the machine was busy (see the load average): other processes competed, CPU times are inflated.")
    lines.append(_cpu_build_line(run))
    for dev, bw in run.bandwidth.items():
        probes = ", ".join(f"{p:.1f}" for p in bw.get("probes_gb_per_s", []))
        lines.append(
            f"copy bandwidth {dev} ({device_name(dev)}): {bw['bytes_per_s'] / 1e9:.1f} GB/s (best of "
            f"{bw['repeats']} copies of {bw['buffer_bytes'] >> 20} MiB, read+write counted; median "
            f"{bw['median_bytes_per_s'] / 1e9:.1f} GB/s)"
        )
        if probes:
            lines.append(f"  probed at the start and the end of the run: {probes} GB/s; the floor uses the better")
    header = f"{'device':<6} {'dtype':<5} {'top_p':>5} {'B':>3} {'V':>7}  {'backend':<10} {'median':>10} " \
             f"{'rounds':>6} {'x naive':>8} {'floor':>9} {'x floor':>8} {'GB/s':>7}"  # fmt: skip
    lines += ["", header, "-" * len(header)]
    cases: dict[tuple, list[Record]] = {}
    for rec in run.records:
        cases.setdefault((rec.device, rec.dtype, rec.top_p, rec.batch, rec.vocab), []).append(rec)
    for key, recs in cases.items():
        dev, dtype, top_p, batch, vocab = key
        naive = next((r for r in recs if r.backend == "naive"), None)
        bw = run.bandwidth.get(dev, {}).get("bytes_per_s")
        for i, rec in enumerate(sorted(recs, key=lambda r: (r.backend != "naive", r.median_s))):
            case = f"{dev:<6} {dtype:<5} {top_p:>5g} {batch:>3} {vocab:>7}" if i == 0 else " " * 30
            speedup = f"{naive.median_s / rec.median_s:.2f}x" if naive else "-"
            floor = rec.floor_bytes / bw if bw else None
            floor_s = _fmt_time(floor) if floor else "-"
            ratio = _fmt_ratio(rec.median_s / floor) if floor else "-"
            lines.append(
                f"{case}  {rec.backend:<10} {_fmt_time(rec.median_s):>10} {rec.rounds:>6} {speedup:>8} "
                f"{floor_s:>9} {ratio:>8} {rec.floor_bytes / rec.median_s / 1e9:>7.2f}"
            )
    lines.append(f"\n{len(run.records)} benchmarks in {time.time() - run.started:.0f} s")
    return lines


def _cpu_build_line(run: BenchRun) -> str:
    """Which build of the C++ op the cpu backend ran, and the target of its vector code."""
    if run.cpu_build is not None:
        b = run.cpu_build
        flags = f" ({' '.join(b['flags'])})" if b["flags"] else ""
        return f"cpu backend: build {b['build']}{flags} in place of the installed one; vector code: {b['target']}; {b['path']}"
    ext = sys.modules.get("proxytune._C")
    target = ext.target() if ext is not None and hasattr(ext, "target") else "?"
    return f"cpu backend: the installed build; vector code picked at load time: {target}"


def _fmt_ratio(x: float) -> str:
    return f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def _fmt_load(load: Optional[float]) -> str:
    return "?" if load is None else f"{load:.1f}"


def _git_revision() -> Optional[str]:
    try:
        root = Path(__file__).parent.parent
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def saving(config) -> bool:
    """Whether this run writes its results: ``--save-results`` or ``PROXYTUNE_BENCH_SAVE=1``."""
    return bool(config.getoption("save_results", False)) or os.environ.get("PROXYTUNE_BENCH_SAVE", "") not in ("", "0")


def write_results(kind: str, device: str, meta: dict, records: list, *, command: Optional[str] = None,
                  lines: Optional[list[str]] = None, csv_rows: bool = False, **top) -> list[Path]:  # fmt: skip
    """The one writer of ``benchmarks/results/``: ``<date>_[<kind>_]<device slug>.json`` with the environment
    (date, command, versions, threads, load, git revision) updated by ``meta``, the ``records`` and any
    ``top``-level fields; ``.txt`` with ``$ command`` and ``lines`` when given; ``.csv`` of the records
    (``csv_rows``: dicts; ``times_s`` left out). Returns the paths written."""
    import proxytune

    now = datetime.datetime.now(datetime.timezone.utc)
    command = command or " ".join([
        *(f"{k}={shlex.quote(v)}" for k, v in os.environ.items() if k.startswith("PROXYTUNE_") or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")),
        "python -m pytest", shlex.join(sys.argv[1:]),
    ]).strip()  # fmt: skip
    info = {
        "date": now.isoformat(timespec="seconds"), "command": command, "device": device, "torch": torch.__version__,
        "transformers": _version("transformers"), "triton": _version("triton"), "proxytune": proxytune.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git": _git_revision(), **meta,
    }  # fmt: skip
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "device"
    stem = RESULTS_DIR / f"{now:%Y%m%d-%H%M%S}_{kind + '_' if kind else ''}{slug}"
    paths = [stem.with_suffix(".json")]
    paths[0].write_text(json.dumps({"meta": info, "records": records, **top}, indent=1, default=str) + "\n")
    if lines is not None:
        paths.append(stem.with_suffix(".txt"))
        paths[-1].write_text("\n".join([f"$ {command}", *lines]) + "\n")
    if csv_rows and records:
        paths.append(stem.with_suffix(".csv"))
        with paths[-1].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[k for k in records[0] if k != "times_s"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(records)
    return paths


def save_results(run: BenchRun, config) -> list[Path]:
    """The op benchmarks' results through :func:`write_results`: ``.json`` (environment + records), ``.csv``
    (records) and ``.txt`` (the printed summary, after the command)."""
    devices = sorted({r.device for r in run.records})
    main_dev = "cuda" if "cuda" in devices else devices[0]
    env = {k: v for k, v in os.environ.items() if k.startswith("PROXYTUNE_") or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), "python -m pytest",
                        shlex.join(config.invocation_params.args)]).strip()  # fmt: skip
    meta = {
        "devices": {dev: device_name(dev) for dev in devices},
        "cpu": device_name("cpu"),
        "cuda": torch.version.cuda,
        "load_average": {"start": run.load_at_start, "end": _load_average()},
        "copy_bandwidth": run.bandwidth,
        "cpu_build": run.cpu_build or {"build": "installed", "target": _cpu_build_line(run).rsplit(": ", 1)[-1]},
    }
    rows = []
    for rec in run.records:
        bw = run.bandwidth.get(rec.device, {}).get("bytes_per_s")
        naive = next((r for r in run.records if r.backend == "naive" and
                      (r.device, r.dtype, r.top_p, r.batch, r.vocab) == (rec.device, rec.dtype, rec.top_p, rec.batch, rec.vocab)), None)  # fmt: skip
        row = asdict(rec)
        row["floor_s"] = rec.floor_bytes / bw if bw else None
        row["speedup_vs_naive"] = naive.median_s / rec.median_s if naive else None
        rows.append(row)
    return write_results("", device_name(main_dev), meta, rows, command=command, lines=summary_lines(run), csv_rows=True)


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None
