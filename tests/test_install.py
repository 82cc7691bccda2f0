"""A plain ``pip install .`` (build isolation, no extras) into a fresh venv gives a working package.

The isolated build has no torch, so the wheel carries the C++ sources instead of the extension; the cpu
backend must then build itself on first use (one line on stderr), cache the build, register
``torch.ops.proxytune.*`` at the next import, and draw the reference's tokens. Slow (a venv with torch, the
package's dependencies from the registry, one C++ build of about a minute): ``pytest -m slow``; ``.ci/run``
runs it after the default suite.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

FIRST_USE = textwrap.dedent(
    """
    import sys, torch, proxytune
    assert "proxytune._C" not in sys.modules, "the wheel must not carry a prebuilt extension"
    g = torch.Generator().manual_seed(0)
    base, ex, an = (torch.randn(3, 1000, generator=g) for _ in range(3))
    kw = dict(temperature=0.8, top_p=0.9, top_k=50, seed=torch.arange(3), step=5)
    cpu = proxytune.sample(base, [ex], [an], backend="cpu", **kw)
    ref = proxytune.sample(base, [ex], [an], backend="reference", **kw)
    assert torch.equal(cpu, ref), (cpu, ref)
    print("TOKENS", cpu.tolist())
    """
)

LATER_IMPORT = textwrap.dedent(
    """
    import sys, torch, proxytune
    assert "proxytune._C" in sys.modules  # loaded from the cache at import, nothing built
    op = torch.ops.proxytune.sample
    x = torch.randn(2, 50)
    ids, lp = op(x, [], [], torch.empty(0, 2), torch.ones(2), torch.zeros(2, dtype=torch.long), torch.ones(2),
                 torch.zeros(2), torch.arange(2), torch.zeros(2, dtype=torch.long), 50)
    assert ids.shape == (2,) and 0 <= int(ids.min()) and int(ids.max()) < 50
    print("OPS OK")
    """
)


def _run(python: Path, code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, timeout=900, cwd="/")


def test_plain_pip_install_builds_the_cpu_op_on_first_use(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    torch_version = torch.__version__.split("+")[0]
    subprocess.run([*pip, f"torch=={torch_version}"], check=True, timeout=1800)  # the CPU wheel on this disk
    subprocess.run([*pip, str(ROOT)], check=True, timeout=1800)  # build isolation, no extras: no triton

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PROXYTUNE"))}
    env.update(PROXYTUNE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    listed = subprocess.run([str(python), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    assert "triton" not in listed.lower()  # the 1 GB GPU compiler is an extra now

    first = _run(python, FIRST_USE, env)
    assert first.returncode == 0, first.stderr[-3000:]
    building = [line for line in first.stderr.splitlines() if "building the C++ CPU op" in line]
    assert len(building) == 1, first.stderr[-3000:]
    assert "TOKENS" in first.stdout

    later = _run(python, LATER_IMPORT, env)
    assert later.returncode == 0, later.stderr[-3000:]
    assert "building" not in later.stderr and "OPS OK" in later.stdout

    # No compiler and no cache: a clear reason, the reference fallback for auto, a clear error for "cpu".
    env_none = {**env, "PROXYTUNE_CACHE": str(tmp_path / "empty-cache"), "CXX": "", "PATH": str(env_dir / "bin")}
    probe = _run(python, textwrap.dedent(
        """
        import warnings, torch, proxytune
        from proxytune._cpu_backend import why_unavailable
        print("REASON", why_unavailable())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            proxytune.sample(torch.randn(1, 10), seed=0)
        print("WARNED", [str(x.message) for x in w])
        try:
            proxytune.sample(torch.randn(1, 10), seed=0, backend="cpu")
        except proxytune.BackendUnavailableError as e:
            print("RAISED", e)
        """
    ), env_none)  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert "no C++ compiler found" in probe.stdout and "apt install g++" in probe.stdout
    warned = next(line for line in probe.stdout.splitlines() if line.startswith("WARNED"))
    assert "backend 'cpu' unavailable" in warned and "no C++ compiler found" in warned
    assert "RAISED" in probe.stdout
