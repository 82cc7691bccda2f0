"""Nothing at the repository root shadows an installed distribution when Python runs from there.

``python -m ...`` from the root (the README's commands, ``scripts/gpu_check.sh``) puts the root first on
``sys.path``. A folder there with an ``__init__.py`` is a regular package and wins over any installed package of
the same name: the repo's ``kernels/`` once hid Hugging Face's ``kernels``, which transformers imports whenever a
model class loads. The root's folders are plain folders (namespace portions), which a regular package later on
``sys.path`` beats; ``kernels/`` is still installed as ``proxytune.kernels`` (pyproject's ``package-dir``, and the
``proxytune/kernels`` link for a source checkout).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = {"proxytune"}  # the package itself: the root is where it lives in a checkout
BUILD_SCRIPT = {"setup"}  # setup.py: the build backend's entry point, which must sit at the root


def _importable_names() -> list[str]:
    """Top-level names an ``import`` from the root could find there: folders and ``*.py`` files (tracked or not,
    hidden and ignored ones aside)."""
    names = []
    for entry in sorted(ROOT.iterdir()):
        name = entry.stem if entry.suffix == ".py" else entry.name
        if (entry.is_dir() or entry.suffix == ".py") and name.isidentifier() and not name.startswith(("_", ".")):
            if name not in OWN | BUILD_SCRIPT:
                names.append(name)
    return names


def test_the_root_holds_the_folders_the_layout_names():
    names = _importable_names()
    for expected in ("kernels", "benchmarks", "tests", "csrc", "scripts", "docs"):
        assert expected in names


@pytest.mark.parametrize("name", _importable_names())
def test_an_installed_package_wins_over_a_root_folder_of_its_name(tmp_path, name):
    """An installed regular package ``name`` (made here, on ``PYTHONPATH``, which comes after the working
    directory) is what ``import name`` finds from the root, not the repository's folder."""
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("INSTALLED = True\n")
    code = f"import {name}; print(getattr({name}, 'INSTALLED', False), getattr({name}, '__file__', None))"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True "), f"the repository's {name}/ shadows an installed {name}: {out.stdout}"


def test_hugging_face_kernels_and_proxytune_kernels_both_import_from_the_root():
    """The case that broke a fresh machine: transformers >= 5.25 imports Hugging Face's ``kernels`` whenever a
    model class loads. From the root, the installed ``kernels`` (where there is one), a Llama class and the Triton
    kernels (``proxytune.kernels``) all import, each from where it should."""
    code = textwrap.dedent(
        """
        import importlib.metadata, pathlib
        root = pathlib.Path.cwd().resolve()
        import proxytune.kernels.launch as launch
        assert pathlib.Path(launch.__file__).resolve().parent == root / "kernels", launch.__file__
        try:
            importlib.metadata.distribution("kernels")
        except importlib.metadata.PackageNotFoundError:
            print("no kernels distribution")
        else:
            import kernels
            assert kernels.__file__ and pathlib.Path(kernels.__file__).resolve().parent != root / "kernels", kernels.__file__
        from transformers import LlamaForCausalLM  # imports kernels in transformers >= 5.25
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
