"""Every instruction-set build of the C++ op draws the same tokens.

The installed extension runs the clone its CPU picks (AVX-512, AVX2 or baseline on x86-64). The explicit
16-lane vectors in csrc/ lower differently for each, so this builds the source again without clones
(``-DPROXYTUNE_NO_CLONES``: the baseline target) and, where the CPU has AVX2, for x86-64-v3, loads each in a
fresh process (both register the same op names) and compares tokens and log-probabilities with the
installed build on a fixed set of cases. Slow (a build takes about a minute): ``pytest -m slow``.
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

from proxytune._cpu_backend import why_unavailable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "proxytune_cpu.cpp"

# Cases: widths with and without a partial last sub-block, every dtype, 0-2 pairs, masked and tied entries,
# every filter. argv: the output file, then "installed" or a build directory, the source and the extra
# compiler flags (the build is loaded into this fresh process: both register the same op names). It saves
# [(tokens, logprobs)] to the output file.
RUN_CASES = textwrap.dedent(
    """
    import random, sys, torch
    if sys.argv[2] == "installed":
        import proxytune._C
    else:
        from torch.utils.cpp_extension import load
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        load(
            name="_C", sources=[sys.argv[3]], build_directory=sys.argv[2], is_python_module=False,
            # setup.py's flags (keep in step), plus the variant's
            extra_cflags=["-O3", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", *openmp, *sys.argv[4:]],
            extra_ldflags=openmp,
        )
    op = torch.ops.proxytune.sample
    rng, out = random.Random(7), []
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
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(op(base, ex, an, w, T, K, top_p, min_p, seed, step, V))
    torch.save(out, sys.argv[1])
    """
)


def _variants() -> list:
    params = [pytest.param(["-DPROXYTUNE_NO_CLONES"], id="baseline")]
    if platform.machine() in ("x86_64", "AMD64"):
        flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        has_avx2 = " avx2 " in flags and " fma " in flags and " bmi2 " in flags
        params.append(pytest.param(
            ["-DPROXYTUNE_NO_CLONES", "-march=x86-64-v3"], id="x86-64-v3",
            marks=pytest.mark.skipif(not has_avx2, reason="the CPU has no AVX2"),
        ))  # fmt: skip
    return params


def _run(tmp_path: Path, name: str, *how: str) -> list:
    script, out = tmp_path / "cases.py", tmp_path / f"{name}.pt"
    script.write_text(RUN_CASES)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(script), str(out), *how], check=True, env=env, timeout=900)
    return torch.load(out)


@pytest.mark.skipif(why_unavailable() is not None, reason="the cpu backend is not built")
@pytest.mark.parametrize("flags", _variants())
def test_instruction_set_builds_agree(flags, tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    installed = _run(tmp_path, "installed", "installed")
    variant = _run(tmp_path, "variant", str(build), str(SOURCE), *flags)
    assert len(installed) == len(variant) == 240
    for i, ((t0, l0), (t1, l1)) in enumerate(zip(installed, variant)):
        assert torch.equal(t0, t1), f"case {i // 2}: tokens {t0.tolist()} vs {t1.tolist()}"
        torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6, equal_nan=True)
