# pykd: `make demo` runs the main job, `make test` the tests, `make bench`
# the benchmarks, `make wheel` a self-contained wheel in dist/. Each target
# installs what is missing first (tools/setup.sh).
#
# Two builds: .venv holds the release build users run (`make demo`, `make
# bench`); the tests run a build of their own (copy_report=true: f2py reports
# any array copy), installed in build/py-test/site and run by the Python of
# build/venv-test, which sees that build first and then .venv's packages.
PY := .venv/bin/python
TEST_PY := build/venv-test/bin/python
# PYKD_TEST_BUILD tells tests/test_packaging.py which build must be imported.
TEST_ENV := PYKD_TEST_BUILD=$(CURDIR)/build/py-test/site
# meson may come from the system's site-packages (the venv sees them), so run
# it through the venv's Python; its tools (ninja) are found on this PATH.
MESON := $(PY) -m mesonbuild.mesonmain
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup setup-test demo test test-fortran test-python fuzz bench-deps bench bench-quick wheel test-wheel docs clean

setup:
	@bash tools/setup.sh release

setup-test:
	@bash tools/setup.sh test

demo: setup
	.venv/bin/pykd demo

test: setup-test test-fortran test-python

# The Fortran library on its own (no Python), and its test program; then the
# MPI build (-Dmpi=true) and its tests (1-3 ranks under mpirun, the
# examples/mpi_train run on 2).
test-fortran:
	@[ -f build/fortran/build.ninja ] || $(MESON) setup build/fortran -Dpython=false >/dev/null
	$(MESON) compile -C build/fortran >/dev/null
	$(MESON) test -C build/fortran --print-errorlogs
	@[ -f build/fortran-mpi/build.ninja ] || $(MESON) setup build/fortran-mpi -Dpython=false -Dmpi=true >/dev/null
	$(MESON) compile -C build/fortran-mpi test_mpi mpi_train >/dev/null
	$(MESON) test -C build/fortran-mpi --no-rebuild --print-errorlogs --suite mpi

test-python:
	cd tests && $(TEST_ENV) ../$(TEST_PY) -m pytest -q -p no:cacheprovider .

# Long fuzz runs of every file reader (model files in Python and Fortran,
# checkpoints, logits, datasets): PYKD_FUZZ_SCALE times the suite's random
# cases (20 by default; `make fuzz PYKD_FUZZ_SCALE=100` for more).
PYKD_FUZZ_SCALE ?= 20
fuzz: setup-test test-fortran
	cd tests && $(TEST_ENV) PYKD_FUZZ_SCALE=$(PYKD_FUZZ_SCALE) ../$(TEST_PY) -m pytest -q -p no:cacheprovider \
		test_fuzz_models.py test_fuzz_files.py test_fortran_fuzz.py

# Benchmarks (never fail on timing). matplotlib draws the plots; onnx,
# onnxruntime and PyTorch are the inference benchmark's peers. PyTorch: its
# CPU build only (torch==$(TORCH_CPU), a local wheel here), never the
# multi-GB CUDA build a bare `pip install torch` would pull; without it the
# benchmark reports PyTorch as absent.
TORCH_CPU := 2.13.0+cpu
bench-deps: setup
	$(PY) -m pip install -q --disable-pip-version-check matplotlib onnx onnxruntime
	@$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check \
		"torch==$(TORCH_CPU)" || echo "torch $(TORCH_CPU) not installable here: PyTorch left out"

bench: bench-deps
	$(PY) benchmarks/run_all.py

bench-quick: bench-deps
	$(PY) benchmarks/run_all.py --quick --out build/bench-quick

# A repaired wheel: built for any x86-64 (simd=baseline), OpenBLAS (its
# OpenMP build when installed), libgfortran, libgomp and libquadmath copied
# into it by auditwheel, which gives it the most compatible manylinux tag its
# glibc symbols allow. Then dist/ holds exactly one pykd_distill wheel.
wheel:
	@bash tools/setup.sh deps
	rm -rf build/wheel-raw dist/pykd_distill-*.whl
	$(PY) -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
		-Csetup-args=-Dsimd=baseline -Cbuild-dir=build/py-wheel -w build/wheel-raw .
	$(PY) -m auditwheel repair -w dist build/wheel-raw/pykd_distill-*.whl
	@ls -l dist/pykd_distill-*.whl

# The wheel in a clean venv (no system site-packages) with the system's
# OpenBLAS, libgfortran and libgomp hidden (a mount namespace, as root).
test-wheel: wheel
	cd tests && PYKD_WHEEL="$$(ls $(CURDIR)/dist/pykd_distill-*.whl)" ../$(PY) -m pytest -q \
		-p no:cacheprovider --noconftest test_wheel.py

# The API reference in build/docs/html (api/index.html: Python, from the release
# build's docstrings; fortran/index.html: the Fortran modules, by FORD).
# Warnings fail the build.
docs: setup
	$(PY) -m pip install -q --disable-pip-version-check sphinx ford
	rm -rf build/docs
	$(PY) -m sphinx -b html -q -W --keep-going docs build/docs/html
	$(PY) -m ford -o build/docs/html/fortran docs/api/fortran.md >build/docs/ford.log 2>&1 \
		|| { cat build/docs/ford.log; exit 1; }
	@if grep -i warning build/docs/ford.log; then exit 1; fi
	@echo "API reference: build/docs/html/api/index.html (Fortran: build/docs/html/fortran/index.html)"

clean:
	rm -rf build .venv dist
