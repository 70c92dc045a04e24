#!/bin/sh
# Build and run the Fortran examples the way an HPC user would: plain
# gfortran + pkg-config (and CMake, if installed), no Python.
#
#   examples/fortran/run.sh [MODEL]
#
# 1. Unpacks Fashion-MNIST (Fortran cannot read gzip) into the work dir.
# 2. Uses an installed pykd if `pkg-config pykd` finds one; otherwise builds
#    the Fortran-only library from this checkout and installs it into the
#    work dir (meson -Dpython=false).
# 3. Builds distill and classify with gfortran, runs distill (writes
#    student.pykd, student_int8.pykd and student_int8_static.pykd), then
#    classify on each and on MODEL
#    (e.g. a model saved by `pykd distill` in Python), if given.
# 4. Builds classify again with CMake (pkg_check_modules) and runs it.
#
# Environment: PYKD_EXAMPLES_DIR (work dir, default build/examples-fortran),
# FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist), EPOCHS
# ("TEACHER STUDENT", default "2 3"), FC (default gfortran), MESON.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=${PYKD_EXAMPLES_DIR:-$repo/build/examples-fortran}
data_src=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
FC=${FC:-gfortran}
mkdir -p "$work/data"
work=$(cd "$work" && pwd)
# libgomp's idle threads must sleep between the kernels' OpenMP loops, or
# they steal the cores from OpenBLAS's threads (training got 2-5x slower).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"

# 1. Data: copy the .gz files and unpack them with gunzip -k.
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
  if [ ! -f "$work/data/$f" ]; then
    [ -f "$data_src/$f.gz" ] || { echo "run.sh: $data_src/$f.gz not found (apt-get install dataset-fashion-mnist)" >&2; exit 1; }
    cp "$data_src/$f.gz" "$work/data/"
    gunzip -kf "$work/data/$f.gz"
  fi
done

# 2. The library.
if ! pkg-config --exists pykd 2>/dev/null; then
  MESON=${MESON:-$(command -v meson || echo "$repo/.venv/bin/meson")}
  if [ ! -f "$work/prefix/lib/pkgconfig/pykd.pc" ]; then
    echo "run.sh: building the pykd Fortran library into $work/prefix"
    "$MESON" setup "$work/lib" "$repo" -Dpython=false --prefix="$work/prefix" --libdir=lib >/dev/null
    "$MESON" install -C "$work/lib" >/dev/null
  fi
  PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  export PKG_CONFIG_PATH
fi
echo "pykd $(pkg-config --modversion pykd): $(pkg-config --cflags --libs pykd)"

# 3. gfortran + pkg-config. -J keeps the example's own .mod out of the sources;
#    the rpath lets the programs find libpykd.so without LD_LIBRARY_PATH.
mkdir -p "$work/bin"
for prog in distill classify; do
  # shellcheck disable=SC2046
  "$FC" -O2 -fopenmp -J "$work/bin" $(pkg-config --cflags pykd) \
    "$here/fmnist_idx.f90" "$here/$prog.f90" -o "$work/bin/$prog" \
    $(pkg-config --libs pykd) -Wl,-rpath,"$(pkg-config --variable=libdir pykd)"
done
# shellcheck disable=SC2086
"$work/bin/distill" "$work/data" "$work/student" ${EPOCHS:-2 3}
"$work/bin/classify" "$work/student.pykd" "$work/data"
"$work/bin/classify" "$work/student_int8.pykd" "$work/data"
"$work/bin/classify" "$work/student_int8_static.pykd" "$work/data"
if [ $# -ge 1 ]; then
  "$work/bin/classify" "$1" "$work/data"
fi

# 4. CMake, finding pykd through pkg-config.
if command -v cmake >/dev/null; then
  cmake -S "$here" -B "$work/cmake" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$work/cmake" >/dev/null
  echo "CMake build:"
  "$work/cmake/classify" "$work/student.pykd" "$work/data" | tail -n 3
fi
