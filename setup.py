"""Builds the optional C++ CPU extension ``proxytune._C`` from csrc/ when torch is importable at build time.

That is the case for an editable or ``--no-build-isolation`` install (scripts/setup.sh, ``make setup``). A
plain ``pip install .`` builds in an isolated environment without torch (on purpose: torch as a build
requirement would pull a multi-GB CUDA wheel); the package then ships the sources (``proxytune/_csrc``) and
builds them on first use against the torch installed at run time (``proxytune/_cpu_build.py``, which also
holds the compiler flags used here). ``PROXYTUNE_NO_EXT=1`` skips the build here too.
"""

import importlib.util
import os
import sys

from setuptools import setup

_spec = importlib.util.spec_from_file_location("_cpu_build", os.path.join("proxytune", "_cpu_build.py"))
_cpu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cpu_build)

ext_modules, cmdclass = [], {}
sources = [os.path.relpath(p) for p in _cpu_build.sources()]
if sources and os.environ.get("PROXYTUNE_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "proxytune: torch is not importable at build time; the C++ CPU op will be built on first use",
            file=sys.stderr,
        )
    else:
        ext_modules = [
            CppExtension(
                "proxytune._C",
                sources,
                extra_compile_args=[*_cpu_build.CXX_FLAGS, *_cpu_build.openmp_flags()],
                extra_link_args=_cpu_build.openmp_flags(),
            )
        ]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
