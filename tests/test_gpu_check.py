"""The CPU side of ``scripts/gpu_check.sh``: arguments, the sections' commands, the results file it writes.

The GPU sections themselves run only on a lent GPU (one device call); here they are recorded as skipped.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check runs for real (device call)")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, env=None):
    """The script under this test's interpreter (``PYTHON``): a venv need not be first on ``PATH``."""
    env = dict(os.environ if env is None else env, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


def test_without_a_gpu_it_writes_the_environment_and_skips_the_gpu_sections(tmp_path):
    out_dir = tmp_path / "OUT"
    out_dir.mkdir()
    target = tmp_path / "results" / "check.txt"
    result = _run("--allow-no-gpu", "--out", str(target), env=dict(os.environ, OUT=str(out_dir)))
    assert result.returncode == 0, result.stderr
    text = target.read_text()
    assert text.startswith("# proxytune GPU check: no CUDA device\n")
    assert f"torch: {torch.__version__}" in text and "device: none" in text and "commit: " in text
    for section in ("tests", "sampler", "decode"):
        assert f"## {section}: skipped (no CUDA device)" in text
    assert (out_dir / "check.txt").read_text() == text  # copied where the device tool collects files


def test_refuses_to_run_without_a_gpu_or_with_unknown_sections(tmp_path):
    no_gpu = _run("--out", str(tmp_path / "x.txt"))
    assert no_gpu.returncode == 2 and "no CUDA device" in no_gpu.stderr
    bad = _run("--allow-no-gpu", "--sections", "env,benchmarks", "--out", str(tmp_path / "x.txt"))
    assert bad.returncode == 2 and "benchmarks" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.txt").exists()


def test_results_file_name_and_section_commands():
    mod = _module()
    day = datetime.date(2026, 12, 1)
    assert mod.results_path(day, "NVIDIA H200") == ROOT / "benchmarks" / "results" / "20261201_nvidia-h200.txt"
    assert mod.results_path(day, "NVIDIA H100 80GB HBM3").name == "20261201_nvidia-h100-80gb-hbm3.txt"
    assert sum(mod.LIMITS_S.values()) <= 600  # one device call
    tests = mod._section_commands("tests")
    assert ["-m", "cuda", "tests/"] == tests[0][-3:]  # every cuda-marked test
    for command in tests + mod._section_commands("decode"):
        for arg in command:
            if arg.startswith(("tests/", "benchmarks/")):
                assert (ROOT / arg).exists(), arg
