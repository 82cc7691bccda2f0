"""Every instruction-set build of the C++ op draws the same tokens.

The installed extension runs the vector code its CPU picks (AVX-512, AVX2 or baseline on x86-64). The
16-lane vectors in csrc/ are held in registers of a different width for each, so this builds the sources
again for one target each (``proxytune._cpu_build.NAMED_BUILDS``: ``baseline``, and where the CPU has the
instructions ``x86-64-v3`` and ``x86-64-v4``), with the flags setup.py uses, loads each in a fresh process
(every build registers the same op names) and compares tokens and log-probabilities with the installed
build on a fixed set of cases: they must be equal, bit for bit. Slow (a build takes about a minute):
``pytest -m slow``.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from proxytune import _cpu_build
from proxytune._cpu_backend import why_unavailable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# Cases: widths with and without a partial last sub-block, every dtype, 0-2 pairs, masked and tied entries,
# every filter. argv: the output file, then "installed" or the path of a built library and the path of
# proxytune/_cpu_build.py (the library is loaded into this fresh process before proxytune: every build
# registers the same op names), then optionally a cases file: read when it exists, else written (torch.randn
# differs between torch versions and architectures, so builds for another machine are given the very
# inputs). It saves [(tokens, logprobs)] to the output file.
RUN_CASES = textwrap.dedent(
    """
    import os, random, sys, torch
    if sys.argv[2] == "installed":
        import proxytune._C
    else:
        import importlib.util, pathlib
        spec = importlib.util.spec_from_file_location("cpu_build", sys.argv[3])
        cpu_build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cpu_build)
        cpu_build.load(pathlib.Path(sys.argv[2]))
    op = torch.ops.proxytune.sample
    rng, cases = random.Random(7), []
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for case in range(120):
        B, V = rng.choice([1, 2, 5]), rng.choice([3, 64, 100, 4097, 32000, 50001, 128256])
        dt, P = rng.choice(dtypes), rng.choice([0, 1, 1, 2])
        g = torch.Generator().manual_seed(case)

        def logits(width, dtype):
            x = torch.randn(B, width, generator=g) * rng.choice([1, 3, 8])
            if rng.random() < 0.3:
                x[:, torch.randint(0, width, (max(1, width // 10),), generator=g)] = float("-inf")
            if rng.random() < 0.1:
                x = x.round()
            return x.to(dtype)

        base = logits(V, dt)
        ex = [logits(V + rng.choice([0, 7]), rng.choice(dtypes)) for _ in range(P)]
        an = [logits(V, dt) for _ in range(P)]
        w = torch.tensor([[rng.uniform(-2, 2) for _ in range(B)] for _ in range(P)]).reshape(P, B)
        row = lambda values, dtype=torch.float32: torch.tensor([rng.choice(values) for _ in range(B)], dtype=dtype)
        T, K = row([0.0, 0.3, 0.7, 1.0, 2.0]), row([0, 0, 1, 5, 50], torch.int64)
        top_p, min_p = row([1.0, 1.0, 0.9, 0.5, 0.99]), row([0.0, 0.0, 0.05])
        seed = torch.tensor([rng.randrange(-2**62, 2**62) for _ in range(B)])
        step = torch.tensor([rng.randrange(0, 1000) for _ in range(B)])
        cases.append((base, ex, an, w, T, K, top_p, min_p, seed, step, V))
    cases_file = sys.argv[4] if len(sys.argv) > 4 else None
    if cases_file and os.path.exists(cases_file):
        cases = torch.load(cases_file)
    elif cases_file:
        torch.save(cases, cases_file)
    out = []
    for args in cases:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(op(*args))
    torch.save(out, sys.argv[1])
    """
)


def _variants() -> list:
    params = [pytest.param("baseline", id="baseline")]
    if platform.machine() in ("x86_64", "AMD64"):
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        has_avx2 = " avx2 " in flags and " fma " in flags and " bmi2 " in flags
        has_avx512 = all(f" {f} " in flags for f in ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"))
        params.append(pytest.param(
            "x86-64-v3", id="x86-64-v3", marks=pytest.mark.skipif(not has_avx2, reason="the CPU has no AVX2"),
        ))  # fmt: skip
        params.append(pytest.param(
            "x86-64-v4", id="x86-64-v4", marks=pytest.mark.skipif(not has_avx512, reason="the CPU has no AVX-512"),
        ))  # fmt: skip
    return params


def _run(tmp_path: Path, name: str, *how: str) -> list:
    script, out = tmp_path / "cases.py", tmp_path / f"{name}.pt"
    script.write_text(RUN_CASES)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(script), str(out), *how], check=True, env=env, timeout=900)
    return torch.load(out)


@pytest.fixture(scope="module")
def build_cache(tmp_path_factory) -> Path:
    """One cache for the builds of this module (the benchmark test reuses the x86-64-v3 build)."""
    return tmp_path_factory.mktemp("cpu-builds")


@pytest.mark.skipif(why_unavailable() is not None, reason="the cpu backend is not built")
@pytest.mark.parametrize("name", _variants())
def test_instruction_set_builds_agree(name, tmp_path, monkeypatch, build_cache):
    monkeypatch.setenv("PROXYTUNE_CACHE", str(build_cache))
    library = _cpu_build.named_build(name)
    installed = _run(tmp_path, "installed", "installed")
    variant = _run(tmp_path, "variant", str(library), str(Path(_cpu_build.__file__)))
    assert len(installed) == len(variant) == 240
    for i, ((t0, l0), (t1, l1)) in enumerate(zip(installed, variant)):
        assert torch.equal(t0, t1), f"case {i // 2}: tokens {t0.tolist()} vs {t1.tolist()}"
        # Bit for bit: the vector widths compute the same lanes in the same order, and the only contracted
        # sums (S) contract the same way on every FMA target; the baseline has no FMA, so its S may differ
        # from an FMA build's in the last ulp: log S then differs by at most ~2 ulp of 1.
        same = torch.equal(torch.nan_to_num(l0, nan=7.0), torch.nan_to_num(l1, nan=7.0))
        if name != "baseline":
            assert same, f"case {i // 2}: log-probabilities {l0.tolist()} vs {l1.tolist()}"
        torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6, equal_nan=True)


@pytest.mark.skipif(why_unavailable() is not None, reason="the cpu backend is not built")
@pytest.mark.parametrize("name", [p for p in _variants() if p.id == "x86-64-v3"])
def test_the_benchmark_times_a_chosen_build(name, build_cache):
    """PROXYTUNE_CPU_BUILD makes benchmarks/ load that build in place of the installed one, and say so."""
    env = {**os.environ, "PROXYTUNE_CACHE": str(build_cache), "PROXYTUNE_CPU_BUILD": name, "PROXYTUNE_BENCH_TIME": "0.05"}
    env.pop("PROXYTUNE_BENCH_SAVE", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_sampler.py", "-q", "-p", "no:cacheprovider",
         "-k", "cpu-fp32-B1-V32000-p0.9-cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"cpu backend: build {name} (-DPROXYTUNE_NO_CLONES -march={name})" in done.stdout
    assert "vector code: compiler target, 8-lane registers (AVX2)" in done.stdout
