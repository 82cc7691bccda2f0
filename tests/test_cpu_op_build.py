"""How the C++ op gets loaded and built (``proxytune/_cpu_build.py``), without building it here: the slow
end-to-end check of a plain ``pip install .`` is tests/test_install.py."""

import subprocess
import sys

import pytest

from proxytune import _cpu_backend, _cpu_build


@pytest.mark.skipif(_cpu_backend.why_unavailable() is not None, reason="the cpu backend is not built")
def test_import_registers_the_torch_ops_without_a_call():
    code = (
        "import sys, torch, proxytune; "
        "assert 'proxytune._C' in sys.modules; "
        "print(torch.ops.proxytune.sample, torch.ops.proxytune.combine)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "proxytune.sample" in out.stdout


def test_the_sources_are_found_and_the_flags_shared_with_setup():
    assert [p.name for p in _cpu_build.sources()] == ["proxytune_cpu.cpp"]  # it includes the headers
    setup = (_cpu_build.sources()[0].parents[1] / "setup.py").read_text()
    assert "_cpu_build.CXX_FLAGS" in setup and "-ffp-contract=off" in _cpu_build.CXX_FLAGS


def test_without_a_compiler_the_message_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu_build, "_compiler", lambda: None)
    with pytest.raises(_cpu_build.BuildError, match=r"no C\+\+ compiler found .* `apt install g\+\+`"):
        _cpu_build.build()
    assert _cpu_build.cached_library() is None


def test_a_failed_compile_names_its_log(monkeypatch, tmp_path):
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpu_build, "_compiler", lambda: "/bin/false")
    lines = []
    with pytest.raises(_cpu_build.BuildError, match="compiling the C\\+\\+ CPU op failed .* see .*build.log"):
        _cpu_build.build(log=lines.append)
    assert len(lines) == 1 and "building the C++ CPU op" in lines[0]
    assert list(tmp_path.glob("*/build.log")) and not list(tmp_path.glob("*/*.so"))  # no half-written library


def test_the_cache_is_keyed_by_the_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path))
    src = tmp_path / "a.cpp"
    src.write_text("int x;")
    first = _cpu_build._library_path([src], "/usr/bin/c++")
    src.write_text("int y;")
    assert _cpu_build._library_path([src], "/usr/bin/c++") != first
    assert first.is_relative_to(tmp_path)


def test_the_cache_is_keyed_by_the_headers_and_the_extra_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("PROXYTUNE_CACHE", str(tmp_path))
    src, header = tmp_path / "a.cpp", tmp_path / "a.h"
    src.write_text('#include "a.h"')
    header.write_text("int x;")
    first = _cpu_build._library_path([src], "/usr/bin/c++")
    header.write_text("int y;")
    second = _cpu_build._library_path([src], "/usr/bin/c++")
    assert second != first
    assert _cpu_build._library_path([src], "/usr/bin/c++", ("-march=x86-64-v3",)) != second


def test_a_named_build_is_a_known_name_or_a_library_path(tmp_path):
    assert _cpu_build.NAMED_BUILDS["x86-64-v3"] == ("-DPROXYTUNE_NO_CLONES", "-march=x86-64-v3")
    library = tmp_path / "_C.so"
    library.write_bytes(b"")
    assert _cpu_build.named_build(str(library)) == library
    with pytest.raises(_cpu_build.BuildError, match="unknown C\\+\\+ op build 'avx9'"):
        _cpu_build.named_build("avx9")
