# pykd: `make demo` runs the main job, `make test` the tests, `make bench`
# the benchmarks. Each target installs what is missing first (tools/setup.sh).
PY := .venv/bin/python
# meson may come from the system's site-packages (the venv sees them), so run
# it through the venv's Python; its tools (ninja) are found on this PATH.
MESON := $(PY) -m mesonbuild.mesonmain
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup demo test test-fortran test-python fuzz bench bench-quick clean

setup:
	@bash tools/setup.sh

demo: setup
	.venv/bin/pykd demo

test: setup test-fortran test-python

# The Fortran library on its own (no Python), and its test program.
test-fortran:
	@[ -f build/fortran/build.ninja ] || $(MESON) setup build/fortran -Dpython=false >/dev/null
	$(MESON) compile -C build/fortran >/dev/null
	$(MESON) test -C build/fortran --print-errorlogs

test-python:
	cd tests && ../$(PY) -m pytest -q -p no:cacheprovider .

# Long fuzz runs of every file reader (model files in Python and Fortran,
# checkpoints, logits, datasets): PYKD_FUZZ_SCALE times the suite's random
# cases (20 by default; `make fuzz PYKD_FUZZ_SCALE=100` for more).
PYKD_FUZZ_SCALE ?= 20
fuzz: setup test-fortran
	cd tests && PYKD_FUZZ_SCALE=$(PYKD_FUZZ_SCALE) ../$(PY) -m pytest -q -p no:cacheprovider \
		test_fuzz_models.py test_fuzz_files.py test_fortran_fuzz.py

# Benchmarks (never fail on timing). matplotlib draws the plots; onnx and
# onnxruntime are the inference benchmark's peers.
bench: setup
	$(PY) -m pip install -q --disable-pip-version-check matplotlib onnx onnxruntime
	$(PY) benchmarks/run_all.py

bench-quick: setup
	$(PY) -m pip install -q --disable-pip-version-check matplotlib onnx onnxruntime
	$(PY) benchmarks/run_all.py --quick --out build/bench-quick

clean:
	rm -rf build .venv
