"""The aarch64 build of the C++ op draws the same tokens as the installed build.

scripts/cpu_aarch64.sh cross-compiles csrc/ for aarch64 (Debian's g++-aarch64-linux-gnu, against torch's
aarch64 CPU wheel) and runs an arm64 Debian Python under qemu-user. This test builds the op that way, runs
the cases of tests/test_cpu_builds.py with it under emulation, and compares tokens and log-probabilities
with the installed build on this machine. On aarch64 the 16-lane vectors are held in four NEON registers
and the sums S contract into FMAs as on the x86-64 FMA targets, so the results are the same bits.

Correctness only: emulated time says nothing about speed on Arm. Slow (the cross build takes about a minute,
the cases several minutes under qemu): ``pytest -m slow``. It skips when the tools are missing or nothing is
prepared: ``scripts/cpu_aarch64.sh prepare`` downloads the Python and torch once (tests download nothing).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proxytune import _cpu_build
from proxytune._cpu_backend import why_unavailable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cpu_aarch64.sh"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cpu_builds import RUN_CASES  # the same cases as the x86-64 builds


def _why_not() -> str | None:
    if platform.machine() == "aarch64":
        return "this machine is aarch64: the default suite tests the native build"
    if shutil.which("bash") is None:
        return "no bash to run scripts/cpu_aarch64.sh"
    missing = subprocess.run(["bash", str(SCRIPT), "missing-tools"], capture_output=True, text=True, check=False)
    missing = missing.stdout.strip()
    if missing:
        return f"missing {missing}: `bash scripts/cpu_aarch64.sh tools` (apt-get) installs them"
    if subprocess.run(["bash", str(SCRIPT), "prepared"], check=False).returncode != 0:
        return "no aarch64 Python and torch yet: `bash scripts/cpu_aarch64.sh prepare` downloads them once"
    if why_unavailable() is not None:
        return "the installed cpu backend is not built"
    return None


_WHY_NOT = _why_not()


@pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))
def test_aarch64_build_agrees_with_installed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    built = subprocess.run(["bash", str(SCRIPT), "build"], capture_output=True, text=True, timeout=1200, check=False)
    assert built.returncode == 0, built.stderr
    library = built.stdout.strip().splitlines()[-1]
    script = tmp_path / "cases.py"
    script.write_text(RUN_CASES)
    arm_out, x86_out, cases = tmp_path / "aarch64.pt", tmp_path / "installed.pt", tmp_path / "cases-in.pt"
    # The inputs are made here and handed over: torch.randn gives other values under another torch and arch.
    subprocess.run([sys.executable, str(script), str(x86_out), "installed", "-", str(cases)], check=True, env=env,
                   timeout=900)  # fmt: skip
    ran = subprocess.run(
        ["bash", str(SCRIPT), "python", str(script), str(arm_out), library, str(Path(_cpu_build.__file__)), str(cases)],
        capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-4000:]
    arm, x86 = torch.load(arm_out), torch.load(x86_out)
    assert len(arm) == len(x86) == 240
    for i, ((t0, l0), (t1, l1)) in enumerate(zip(x86, arm)):
        assert torch.equal(t0, t1), f"case {i // 2}: tokens {t0.tolist()} (x86-64) vs {t1.tolist()} (aarch64)"
        # Same bits (see the module docstring): same inputs, same lane-wise IEEE arithmetic, same order.
        same = torch.equal(torch.nan_to_num(l0, nan=7.0), torch.nan_to_num(l1, nan=7.0))
        assert same, f"case {i // 2}: log-probabilities {l0.tolist()} (x86-64) vs {l1.tolist()} (aarch64)"
