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
