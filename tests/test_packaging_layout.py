"""What `pip install .` ships: every subpackage of the source tree, kernels/ as proxytune.kernels."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"proxytune." + ".".join(p.parent.relative_to(ROOT / "proxytune").parts) for p in (ROOT / "proxytune").glob("*/**/__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert "proxytune.kernels" in listed and config["package-dir"]["proxytune.kernels"] == "kernels"


def test_the_wheel_ships_every_csrc_file_for_the_build_on_first_use(tmp_path):
    """build_py lays out what a wheel holds: csrc/ as proxytune/_csrc, its .cpp and the headers they include."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROXYTUNE_NO_EXT": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    shipped = {p.name for p in (tmp_path / "proxytune" / "_csrc").iterdir() if p.suffix in (".cpp", ".h")}
    expected = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h")}
    assert expected and shipped == expected, f"missing from the wheel: {sorted(expected - shipped)}"


def test_the_sdist_carries_every_csrc_file(tmp_path):
    """A wheel built from the source distribution must find the headers too."""
    import os
    import subprocess
    import sys
    import tarfile

    env = {**os.environ, "PROXYTUNE_NO_EXT": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {Path(m.name).name for m in tar.getmembers() if Path(m.name).parent.name == "csrc"}
    expected = {p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h")}
    assert expected <= shipped, f"missing from the sdist: {sorted(expected - shipped)}"
