"""The package as a user meets it: import, CLI demo, installed layout."""

import subprocess
import sys

import torch

import proxytune
from proxytune import backends
from proxytune.cli import main


def test_import_touches_no_gpu_and_no_triton():
    code = (
        "import sys, torch, proxytune; "
        "assert not torch.cuda.is_initialized(); "
        "assert 'triton' not in sys.modules and 'proxytune.kernels' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_are_installed_as_a_subpackage():
    import proxytune.kernels

    assert proxytune.kernels.__name__ == "proxytune.kernels"


def test_auto_backend_serves_cpu_tensors():
    assert "reference" in backends.names()
    assert backends.resolve("auto", torch.device("cpu")).serves(torch.device("cpu"))


def test_cli_reports_a_missing_model_directory_cleanly(tmp_path, capsys):
    assert main(["demo", "--models", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err == f"proxytune: error: --models: no such directory: {tmp_path / 'nowhere'}\n"


def test_python_dash_m_entry_point():
    # cheap: the demo itself runs in-process in tests/test_tinyworld.py::test_demo_runs_end_to_end
    out = subprocess.run([sys.executable, "-m", "proxytune", "--version"], check=True, capture_output=True, text=True)
    assert out.stdout == f"proxytune {proxytune.__version__}\n"


def test_the_kernel_layer_imports_nothing_from_the_layers_above():
    from pathlib import Path

    import re

    upward = re.compile(r"^\s*(from\s+proxytune(?!\.kernels)\S*\s+import|import\s+proxytune)", re.M)
    for source in (Path(__file__).resolve().parents[1] / "kernels").glob("*.py"):
        assert not upward.search(source.read_text()), f"{source.name} imports from the layers above kernels/"
