#!/bin/sh
# The Lorenz-96 worked example (examples/lorenz96/README.md): the two-scale
# model in Fortran makes training data, Python trains a teacher, distills a
# student and compresses it, and the one-scale Fortran model runs every
# network through `use pykd` / pykd_predict in an OpenMP ensemble.
#
#   examples/lorenz96/run.sh            # full run: about 5-10 minutes on 2 cores
#   examples/lorenz96/run.sh --quick    # seconds (what tests/test_lorenz96.py runs)
#
# Steps: 1. the Fortran library (`pkg-config pykd` if it finds one, else a
# meson -Dpython=false build of this checkout installed into the work dir);
# 2. gfortran -fopenmp builds l96_truth and l96_forecast; 3. l96_truth;
# 4. train.py; 5. l96_forecast; 6. compare.py writes results.json and
# results.md and prints the tables.
#
# Environment: PYKD_L96_DIR (work dir; default build/lorenz96, or
# build/lorenz96-quick with --quick), PYTHON (default .venv/bin/python, else
# python3), FC (default gfortran), MESON (default: meson from $PYTHON),
# OMP_NUM_THREADS (ensemble threads; default: all cores).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac
if [ $quick = 1 ]; then
  work=${PYKD_L96_DIR:-$repo/build/lorenz96-quick}
else
  work=${PYKD_L96_DIR:-$repo/build/lorenz96}
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
FC=${FC:-gfortran}
mkdir -p "$work"
work=$(cd "$work" && pwd)
# One BLAS thread per ensemble thread; idle OpenMP threads sleep.
export OPENBLAS_NUM_THREADS=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
t_start=$(date +%s)

# 1. The library.
if ! pkg-config --exists pykd 2>/dev/null; then
  if [ ! -f "$work/prefix/lib/pkgconfig/pykd.pc" ]; then
    if [ -n "${MESON:-}" ]; then :
    elif "$PYTHON" -c "import mesonbuild" 2>/dev/null; then MESON="$PYTHON -m mesonbuild.mesonmain"
    else MESON=meson; fi
    echo "run.sh: building the pykd Fortran library into $work/prefix (meson -Dpython=false)"
    log="$work/lib-build.log"
    { $MESON setup "$work/lib" "$repo" -Dpython=false --prefix="$work/prefix" --libdir=lib &&
      $MESON install -C "$work/lib"; } >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
  fi
  PKG_CONFIG_PATH="$work/prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  export PKG_CONFIG_PATH
fi

# 2. The programs. -J keeps their .mod files in the work dir; the rpath
#    finds libpykd.so without LD_LIBRARY_PATH.
mkdir -p "$work/bin"
"$FC" -O2 -fopenmp -J "$work/bin" "$here/l96.f90" "$here/l96_truth.f90" -o "$work/bin/l96_truth"
# shellcheck disable=SC2046
"$FC" -O2 -fopenmp -J "$work/bin" $(pkg-config --cflags pykd) "$here/l96.f90" \
  "$here/l96_closure.f90" "$here/forecast.f90" -o "$work/bin/l96_forecast" \
  $(pkg-config --libs pykd) -Wl,-rpath,"$(pkg-config --variable=libdir pykd)"

# Sizes: the full run, or a few seconds' worth.
if [ $quick = 1 ]; then
  truth="spinup_mtu = 2, train_mtu = 40, test_mtu = 25"
  members="n_members = 40, member_stride = 100, lead_steps = 40, 100, 200"
  climate="climate_members = 2, climate_spinup_mtu = 1, climate_mtu = 10"
  timing="timing_mtu = 0.25, timing_repeats = 3"
else
  truth="spinup_mtu = 10, train_mtu = 400, test_mtu = 300"
  members="n_members = 500, member_stride = 100, lead_steps = 40, 100, 200, 400"
  climate="climate_members = 4, climate_spinup_mtu = 5, climate_mtu = 100"
  timing="timing_mtu = 2, timing_repeats = 5"
fi

# 3. The truth: K = 8, J = 32, F = 20, h = 1, b = c = 10, RK4 at dt = 0.001.
cat > "$work/truth.nml" <<EOF
&truth
  k = 8, j = 32, f = 20, h = 1, b = 10, c = 10, dt = 0.001
  $truth, train_every = 20, test_every = 5
  out_dir = '$work'
/
EOF
"$work/bin/l96_truth" "$work/truth.nml"

# 4. Teacher, student, compressed students, polynomial baseline.
quick_flag=""
[ $quick = 1 ] && quick_flag="--quick"
"$PYTHON" "$here/train.py" "$work" $quick_flag

# 5. The one-scale model (RK4, dt = 0.005) with each closure.
nets=""
for m in teacher student student_scratch student_int8 student_pruned; do
  [ -f "$work/$m.pykd" ] && nets="$nets, 'net:$work/$m.pykd'"
done
cat > "$work/forecast.nml" <<EOF
&forecast
  truth_dir = '$work', out_dir = '$work'
  k = 8, j = 32, f = 20, h = 1, b = 10, c = 10, dt = 0.005, test_interval = 0.005, dt_truth = 0.001
  closures = 'none', 'poly'$nets
  poly = $(cat "$work/poly.txt")
  $members
  $climate, climate_every = 10
  $timing
/
EOF
"$work/bin/l96_forecast" "$work/forecast.nml"

# 6. Tables.
"$PYTHON" "$here/compare.py" "$work" --seconds $(( $(date +%s) - t_start ))
