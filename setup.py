"""Builds the optional C++ CPU extension ``proxytune._C`` from csrc/ when there is something to build.

The extension needs torch importable at build time (install with ``--no-build-isolation``; scripts/setup.sh
does). Without torch, without sources, or with ``PROXYTUNE_NO_EXT=1`` the package installs without it and
``backend="auto"`` falls back to the reference implementation.
"""

import glob
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("PROXYTUNE_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("proxytune: torch is not importable at build time; skipping the C++ extension", file=sys.stderr)
    else:
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        ext_modules = [
            CppExtension(
                "proxytune._C",
                sources,
                # -ffp-contract=off: round like the reference (no fused multiply-add); -fno-trapping-math lets
                # the compiler vectorise float selects (it changes no result). tests/test_cpu_builds.py builds
                # with the same flags.
                extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", "-fno-trapping-math", *openmp],
                extra_link_args=openmp,
            )
        ]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
