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


def test_demo_shows_the_tiny_family_and_its_table(capsys):
    assert main(["demo", "--limit", "32", "--examples", "2"]) == 0
    out = capsys.readouterr().out
    assert proxytune.__version__ in out and out.count("[expected:") == 2
    for label in ("large base", "small tuned", "proxy-tuned large"):
        assert f"    {label}" in out  # the side-by-side answers
    assert "gap closed by proxy-tuning" in out


def test_cli_reports_a_missing_model_directory_cleanly(tmp_path, capsys):
    assert main(["demo", "--models", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "proxytune", "demo", "--limit", "16", "--examples", "1"], check=True,
                         capture_output=True, text=True)  # fmt: skip
    assert "proxy-tuned large" in out.stdout
    assert proxytune.__version__ in out.stdout
