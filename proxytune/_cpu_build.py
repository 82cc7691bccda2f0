"""Building the C++ CPU op (``csrc/``) against the installed torch.

Two ways in, one set of flags (:data:`CXX_FLAGS`):

* ``setup.py`` builds the extension ``proxytune._C`` at install time when torch is importable there (an
  editable or ``--no-build-isolation`` install; ``make setup`` does this);
* a plain ``pip install .`` builds in an isolated environment without torch, so it installs the package
  without the extension. :func:`build` then compiles the shipped sources on first use, once, against the torch
  that is installed at run time, into a per-user cache (:func:`cache_dir`), printing one line while it works
  (about a minute on two cores). ``PROXYTUNE_NO_BUILD=1`` turns this off.

This module imports nothing from proxytune (``setup.py`` loads it by path) and imports torch only inside
functions. No ninja is needed: the compiler is called directly, the way ``torch.utils.cpp_extension`` would.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Optional

__all__ = [
    "CXX_FLAGS", "NAMED_BUILDS", "BuildError", "build", "cache_dir", "cached_library", "headers", "load",
    "named_build", "openmp_flags", "sources",
]  # fmt: skip

# -ffp-contract=off: round like the reference (no fused multiply-add); -fno-trapping-math lets the compiler
# vectorise float selects (it changes no result). tests/test_cpu_builds.py builds variants with these too.
CXX_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math")
MODULE = "proxytune._C"

# Builds other than the installed one, for tests and benchmarks (tests/test_cpu_builds.py,
# PROXYTUNE_CPU_BUILD in benchmarks/conftest.py): the extra compiler flags of each. The installed build
# compiles its vector code for x86-64-v4, x86-64-v3 and baseline and picks one at load time; these build one
# target only (-DPROXYTUNE_NO_CLONES), so a machine with AVX-512 can run and time the AVX2 code.
NAMED_BUILDS = {
    "baseline": ("-DPROXYTUNE_NO_CLONES",),
    "x86-64-v2": ("-DPROXYTUNE_NO_CLONES", "-march=x86-64-v2"),
    "x86-64-v3": ("-DPROXYTUNE_NO_CLONES", "-march=x86-64-v3"),
    "x86-64-v4": ("-DPROXYTUNE_NO_CLONES", "-march=x86-64-v4"),
}
_HERE = Path(__file__).resolve().parent


class BuildError(RuntimeError):
    """The C++ op could not be built here; the message says why and what to do."""


def openmp_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def sources() -> list[Path]:
    """The C++ sources: shipped in the package as ``proxytune/_csrc`` (a wheel), else ``csrc/`` of a checkout."""
    for folder in (_HERE / "_csrc", _HERE.parent / "csrc"):
        found = sorted(folder.glob("*.cpp"))
        if found:
            return found
    return []


def cache_dir() -> Path:
    """``$PROXYTUNE_CACHE``, else ``$XDG_CACHE_HOME/proxytune``, else ``~/.cache/proxytune``."""
    if os.environ.get("PROXYTUNE_CACHE"):
        return Path(os.environ["PROXYTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "proxytune"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def headers(srcs: list[Path]) -> list[Path]:
    """The headers beside the sources (the .cpp includes them; they change the build too)."""
    return sorted({h for src in srcs for h in src.parent.glob("*.h")})


def _command(compiler: str, srcs: list[Path], out: Path, extra_flags: tuple[str, ...] = ()) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    return [
        compiler, "-shared", "-fPIC", *CXX_FLAGS, *extra_flags, *openmp_flags(), "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in includes),
        *map(str, srcs), *(f"-L{p}" for p in cpp_extension.library_paths()),
        "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", *openmp_flags(), "-o", str(out),
    ]  # fmt: skip


def _library_path(srcs: list[Path], compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Where the build for these sources, this torch, this Python, this compiler and these flags lives."""
    import torch

    h = hashlib.sha256()
    for part in (torch.__version__, getattr(torch.version, "git_version", ""), sys.implementation.cache_tag,
                 platform.machine(), compiler, " ".join(CXX_FLAGS), " ".join(extra_flags)):  # fmt: skip
        h.update(str(part).encode() + b"\0")
    for src in [*srcs, *headers(srcs)]:
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    return cache_dir() / f"cpu-op-{h.hexdigest()[:20]}" / "_C.so"


def cached_library() -> Optional[Path]:
    """The cached build for the installed torch and the shipped sources, if one exists (nothing is built)."""
    srcs, compiler = sources(), _compiler()
    if not srcs or compiler is None:
        return None
    path = _library_path(srcs, compiler)
    return path if path.exists() else None


def build(log=None, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the sources into the cache (atomically: concurrent builds do not clash) and return the library.

    ``log`` gets one line before the build starts (default: standard error); ``extra_flags`` go to the
    compiler after :data:`CXX_FLAGS` (a different build, cached apart). Raises :class:`BuildError` with what
    to do when there are no sources, no compiler, or the compiler fails.
    """
    extra_flags = tuple(extra_flags)
    srcs = sources()
    if not srcs:
        raise BuildError("the C++ sources are not shipped with this installation; reinstall proxytune")
    compiler = _compiler()
    if compiler is None:
        raise BuildError(
            "no C++ compiler found (tried $CXX, c++, g++, clang++): install one (Debian/Ubuntu: "
            "`apt install g++`; macOS: `xcode-select --install`), or set CXX, and run again"
        )
    out = _library_path(srcs, compiler, extra_flags)
    if out.exists():
        return out
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    variant = f" with {' '.join(extra_flags)}" if extra_flags else ""
    (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
        f"proxytune: building the C++ CPU op for torch {torch.__version__}{variant} (once; about a minute) "
        f"into {out.parent}"
    )
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    start = time.monotonic()
    try:
        command = _command(compiler, srcs, Path(tmp), extra_flags)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            log_file = out.parent / "build.log"
            log_file.write_text(" ".join(command) + "\n\n" + done.stdout + done.stderr)
            raise BuildError(f"compiling the C++ CPU op failed ({compiler}, exit {done.returncode}); see {log_file}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    (out.parent / "build-seconds.txt").write_text(f"{time.monotonic() - start:.1f}\n")
    return out


def named_build(spec: str, log=None) -> Path:
    """The library for ``spec``: a name from :data:`NAMED_BUILDS` (built into the cache if needed) or the path
    of a built library. Raises :class:`BuildError` for anything else."""
    if spec in NAMED_BUILDS:
        return build(log=log, extra_flags=NAMED_BUILDS[spec])
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    raise BuildError(f"unknown C++ op build {spec!r}: name one of {', '.join(NAMED_BUILDS)}, or the path of a built _C*.so")


def load(path: Path):
    """Import the library at ``path`` as ``proxytune._C`` (it registers the ``torch.ops.proxytune`` ops)."""
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[MODULE] = module
    return module
