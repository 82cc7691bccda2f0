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


def test_demo_runs_and_shows_the_nucleus(capsys):
    assert main(["demo", "--draws", "4000"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.splitlines() if line[:1].isupper()
            and len(line.split()) == 4 and line.split()[1][0].isdigit()}  # fmt: skip
    assert len(rows) == 8
    assert rows["No"][2] == 0.0 and rows["Certainly"][2] > 0.4  # outside the nucleus: never drawn
    assert abs(sum(r[1] for r in rows.values()) - 1) < 0.01 and abs(sum(r[2] for r in rows.values()) - 1) < 0.01


def test_cli_reports_bad_parameters_cleanly(capsys):
    assert main(["demo", "--top-p", "1.5"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "proxytune", "demo", "--draws", "100"], check=True, capture_output=True, text=True)
    assert "p(proxy)" in out.stdout
    assert proxytune.__version__ in out.stdout
