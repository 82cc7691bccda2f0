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


def test_auto_backend_on_cpu_tensors_is_the_cpu_op_where_it_is_built():
    from proxytune._cpu_backend import why_unavailable

    assert backends.names() == ["triton", "cpu", "reference"]
    expected = "cpu" if why_unavailable() is None else "reference"
    assert backends.resolve("auto", torch.device("cpu")).name == expected


def _imports() -> dict[str, set[str]]:
    """Module -> the proxytune modules it imports (at module level or inside functions), from the sources.
    ``from proxytune import x`` names the submodule x where one exists, else the package itself."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {}
    for path in (root / "proxytune").rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (root / "kernels").glob("*.py"):
        name = "proxytune.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        files[name] = path
    graph = {}
    for name, path in files.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        edges = set()
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                       for stmt in block.body for n in ast.walk(stmt)}  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: not imported at run time
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("proxytune")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                if not base.startswith("proxytune"):
                    continue
                for a in node.names:
                    edges.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state and node != "proxytune":  # the package __init__ re-exports the layers below it
            visit(node, [node])
    assert "proxytune.backends" in graph and not graph["proxytune.backends"] - {"proxytune._args"}  # a leaf


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
