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
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

_spec = importlib.util.spec_from_file_location("_cpu_build", os.path.join("proxytune", "_cpu_build.py"))
_cpu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cpu_build)

ext_modules, cmdclass = [], {}
sources = [os.path.relpath(p) for p in _cpu_build.sources()]
headers = [os.path.relpath(p) for p in _cpu_build.headers(_cpu_build.sources())]
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
                depends=headers,  # rebuild when a header changes
                extra_compile_args=[*_cpu_build.CXX_FLAGS, *_cpu_build.openmp_flags()],
                extra_link_args=_cpu_build.openmp_flags(),
            )
        ]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

class build_py_with_headers(build_py):
    """Ships csrc's headers in proxytune/_csrc beside the .cpp that pyproject's package-data lists, so the
    build on first use finds them (pyproject.toml lists only *.cpp; listing *.h there would do the same)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "proxytune", "_csrc")
        if os.path.isdir(target):
            for header in headers:
                self.copy_file(header, os.path.join(target, os.path.basename(header)))


class sdist_with_headers(sdist):
    """Puts csrc's headers in the source distribution too, so a wheel built from it ships them."""

    def make_distribution(self):
        self.filelist.extend(h for h in headers if h not in self.filelist.files)
        super().make_distribution()


cmdclass["build_py"] = build_py_with_headers
cmdclass["sdist"] = sdist_with_headers
setup(ext_modules=ext_modules, cmdclass=cmdclass)
