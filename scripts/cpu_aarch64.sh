#!/usr/bin/env bash
# The C++ CPU op on aarch64, from an x86-64 machine: Debian's cross compiler builds csrc/ against an aarch64
# torch wheel, and qemu-user runs it in an aarch64 Python, so the token-equality cases of
# tests/test_cpu_builds.py can run on the Arm build (tests/test_cpu_aarch64.py compares its tokens and
# log-probabilities with the installed x86-64 build). This checks correctness only: emulated time says
# nothing about speed on Arm hardware.
#
#   scripts/cpu_aarch64.sh tools     install the cross compiler, qemu-user and debootstrap (apt-get; root)
#   scripts/cpu_aarch64.sh prepare   download once: an arm64 Debian Python 3.11 (debootstrap --foreign,
#                                    packages unpacked, nothing run) and torch's aarch64 CPU wheel (pip
#                                    --target, no dependencies but the pure-Python ones torch imports)
#   scripts/cpu_aarch64.sh build     cross-compile csrc/*.cpp with proxytune/_cpu_build.py's flags; prints
#                                    the library's path
#   scripts/cpu_aarch64.sh python ARGS...   run the aarch64 Python under qemu (PYTHONPATH: torch, the repo)
#   scripts/cpu_aarch64.sh check     prepare, build, then the slow test tests/test_cpu_aarch64.py
#
# Where: $PROXYTUNE_AARCH64_DIR, else ~/.cache/proxytune/aarch64 (about 900 MB). Torch version:
# $PROXYTUNE_AARCH64_TORCH (default 2.9.1: a cp311 manylinux_2_28_aarch64 CPU wheel on PyPI). Only Debian's
# archive and PyPI are reached, by `prepare` alone.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${PROXYTUNE_AARCH64_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/proxytune/aarch64}
TORCH_VERSION=${PROXYTUNE_AARCH64_TORCH:-2.9.1}
SUITE=bookworm  # its python3.11 matches the cp311 wheel
MIRROR=${PROXYTUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_PYTHON=${PYTHON:-python3}
SYSROOT=$WORK/sysroot
SITE=$WORK/site-torch-$TORCH_VERSION
OUT=$WORK/build-torch-$TORCH_VERSION
CXX=${AARCH64_CXX:-aarch64-linux-gnu-g++}

die() { echo "cpu_aarch64: $*" >&2; exit 1; }

missing_tools() {
  local tool missing=()
  for tool in "$CXX" qemu-aarch64 debootstrap dpkg-deb; do
    command -v "$tool" > /dev/null || missing+=("$tool")
  done
  echo "${missing[*]}"
}

need_tools() {
  local missing
  missing=$(missing_tools)
  [ -z "$missing" ] || die "missing: $missing (Debian/Ubuntu: $0 tools, or apt-get install -y g++-aarch64-linux-gnu qemu-user debootstrap)"
}

prepared() { [ -x "$SYSROOT/usr/bin/python3.11" ] && [ -f "$SITE/torch/__init__.py" ]; }

cmd_tools() {
  apt-get install -y g++-aarch64-linux-gnu qemu-user debootstrap
}

cmd_prepare() {
  need_tools
  mkdir -p "$WORK"
  if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
    echo "cpu_aarch64: arm64 Debian $SUITE Python into $SYSROOT" >&2
    rm -rf "$SYSROOT"
    # --foreign downloads and unpacks the base without running anything of the target; the packages
    # asked for are only downloaded, so unpack every one (the emulated Python needs files, not scripts).
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3.11,libpython3.11-dev,libgomp1 \
      "$SUITE" "$SYSROOT" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 || die "debootstrap failed: $WORK/debootstrap.log"
    for deb in "$SYSROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
  fi
  if [ ! -f "$SITE/torch/__init__.py" ]; then
    echo "cpu_aarch64: torch $TORCH_VERSION (manylinux aarch64, CPU) into $SITE" >&2
    # pip evaluates torch's dependency markers for the host (x86-64 CUDA wheels), so: no dependencies, and
    # the pure-Python ones that `import torch` needs named here.
    "$HOST_PYTHON" -m pip install -q --no-deps --target "$SITE" --platform manylinux_2_28_aarch64 \
      --python-version 3.11 --implementation cp --abi cp311 --only-binary=:all: \
      "torch==$TORCH_VERSION" typing_extensions filelock sympy mpmath networkx fsspec numpy
  fi
}

cmd_build() {
  need_tools
  prepared || die "not prepared: run $0 prepare first (downloads an arm64 Python and torch)"
  mkdir -p "$OUT"
  local lib=$OUT/_C.so flags sources
  # The flags setup.py uses (proxytune/_cpu_build.py, loaded by path: importing proxytune loads the op).
  flags=$("$HOST_PYTHON" - "$ROOT/proxytune/_cpu_build.py" << 'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("cpu_build", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(" ".join(module.CXX_FLAGS))
EOF
)
  sources=("$ROOT"/csrc/*.cpp)
  local inputs=("${sources[@]}" "$ROOT/proxytune/_cpu_build.py") stale=0 f
  for f in "$ROOT"/csrc/*.h; do [ -e "$f" ] && inputs+=("$f"); done
  [ -f "$lib" ] || stale=1
  for f in "${inputs[@]}"; do [ "$f" -nt "$lib" ] && stale=1; done
  if [ "$stale" = 1 ]; then
    echo "cpu_aarch64: cross-compiling ${#sources[@]} source(s) with $CXX $flags (about a minute)" >&2
    # -idirafter: only what the cross toolchain lacks (Debian's multiarch pyconfig.h) comes from the sysroot.
    # shellcheck disable=SC2086
    "$CXX" -shared -fPIC $flags -fopenmp -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
      -D_GLIBCXX_USE_CXX11_ABI=1 -I"$SITE/torch/include" -I"$SITE/torch/include/torch/csrc/api/include" \
      -I"$SYSROOT/usr/include/python3.11" -idirafter "$SYSROOT/usr/include" "${sources[@]}" \
      -L"$SITE/torch/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python \
      -Wl,-rpath-link,"$SITE/torch/lib:$SITE/torch.libs" -fopenmp -o "$lib.tmp" > "$OUT/build.log" 2>&1 \
      || die "compiling failed: $OUT/build.log"
    mv "$lib.tmp" "$lib"
  fi
  echo "$lib"
}

cmd_python() {
  need_tools
  prepared || die "not prepared: run $0 prepare first (downloads an arm64 Python and torch)"
  PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec qemu-aarch64 -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" "$@"
}

case "${1:-}" in
  tools) cmd_tools ;;
  prepare) cmd_prepare ;;
  build) cmd_build ;;
  python) shift; cmd_python "$@" ;;
  missing-tools) missing_tools ;;
  prepared) prepared ;;
  check)
    cmd_prepare
    cmd_build > /dev/null
    cd "$ROOT" && exec "$HOST_PYTHON" -m pytest -m slow -q tests/test_cpu_aarch64.py
    ;;
  *) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
