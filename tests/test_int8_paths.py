"""The int8 layer's CPU paths (fortran/kernels/pykd_int8_simd.c) give the
same bits: every path this CPU runs, plus the forced portable one, each in
its own process (PYKD_INT8_PATH is read once per process), against each
other and against the NumPy twin (pykd/_reference.py dense_int8).

Run: cd tests && python -m pytest -q -p no:cacheprovider test_int8_paths.py
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import pykd
from pykd.layers import DenseInt8
from pykd.models import Model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kinds_helpers import run_on_path  # noqa: E402

PATHS = ("portable", "avx2", "avxvnni", "avx512vnni")

# (n_in, n_out, batches): n_in and n_out off every multiple of 2/4/16/32/64,
# and the tile edges of the kernels (16 outputs, 4 samples, 32-input tails).
SHAPES = [
    (1, 1, (1, 2, 7)),
    (3, 5, (1, 3, 9)),
    (17, 15, (1, 4, 5)),
    (33, 16, (2, 8, 13)),
    (63, 17, (1, 7, 256)),
    (65, 31, (1, 6, 11)),
    (127, 65, (1, 7, 256)),
    (784, 200, (1, 7, 256)),
    (200, 10, (1, 5, 256)),
    (129, 130, (3, 17)),
]

N_MAX = 131071   # the longest int8 dot product whose int32 sum cannot overflow


def _cases():
    """(name, model, X) for every check; deterministic, rebuilt in each process."""
    rng = np.random.default_rng(11)
    out = []
    for n_in, n_out, batches in SHAPES:
        for mode in ("dynamic", "static"):
            q = rng.integers(-127, 128, (n_in, n_out)).astype(np.int8)
            scale = (rng.random(n_out, dtype=np.float32) * np.float32(0.02)).astype(np.float32)
            b = rng.standard_normal(n_out).astype(np.float32)
            xs = np.float32(0.01) if mode == "static" else None
            model = Model([DenseInt8(q, scale, b, "relu" if n_out % 2 else "identity",
                                     x_scale=xs)])
            for n in batches:
                X = rng.standard_normal((n, n_in)).astype(np.float32)
                out.append((f"{n_in}x{n_out}-{mode}-batch{n}", model, X))
    # Extremes: |q| = |qx| = 127 everywhere, mixed and uniform signs.
    for n_in, n_out in ((64, 16), (131, 33), (1000, 17)):
        for sign in (1, -1):
            q = np.full((n_in, n_out), 127 * sign, np.int8)
            q[::3] = -q[::3]
            model = Model([DenseInt8(q, np.full(n_out, 1e-6, np.float32),
                                     np.zeros(n_out, np.float32))])
            X = np.where(rng.random((9, n_in)) < 0.5, -5.0, 5.0).astype(np.float32)
            out.append((f"extreme-{n_in}x{n_out}-{sign}", model, X))
    # As close to overflow as allowed: -127 x -127 over 131071 inputs.
    q = np.full((N_MAX, 3), -127, np.int8)
    model = Model([DenseInt8(q, np.ones(3, np.float32), np.zeros(3, np.float32))])
    out.append(("overflow-edge-dynamic", model, np.full((2, N_MAX), -1.0, np.float32)))
    model = Model([DenseInt8(q, np.ones(3, np.float32), np.zeros(3, np.float32),
                             x_scale=np.float32(1.0))])
    out.append(("overflow-edge-static", model, np.full((5, N_MAX), -300.0, np.float32)))
    # A whole 784-200-200-10 int8 student.
    mlp = pykd.MLP([784, 200, 200, 10], ["relu", "relu", "identity"], seed=3)
    X = rng.random((256, 784), dtype=np.float32)
    out.append(("student-dynamic-256", pykd.quantize_model(mlp, activations="dynamic"), X))
    out.append(("student-dynamic-1", pykd.quantize_model(mlp, activations="dynamic"), X[:1]))
    out.append(("student-static-7", pykd.quantize_model(mlp, activations="static",
                                                        calibration=X), X[:7]))
    # (Drawn last: the student's calibration above depends on the rng stream,
    # and its float32 forward may differ in the last bit between thread counts.)
    # Quantization edges (the zmm path clamps above in float, then narrows
    # with saturating packs and a byte max): exact ties at +-0.5, +-126.5,
    # +-127.5, values past the int32 range, on rows of 143 inputs (two
    # 64-value steps, a 15-value tail, one byte of padding) and 11 samples
    # (a block of 8 and 3).
    edges = np.array([0.5, 1.5, 2.5, 126.5, 127.4999, 127.5, 128.0, 1e9, 3e9, 1e30, 3e38],
                     np.float32)
    edges = np.concatenate([edges, -edges])
    X = rng.choice(edges, (11, 143)).astype(np.float32)
    X[:, :16] = np.arange(16, dtype=np.float32) - 7.5
    q = rng.integers(-127, 128, (143, 21)).astype(np.int8)
    # (dynamic-tiny: max|x| = 1e-38, so max|x| / 127 is below FLT_MIN.)
    for mode, xs, scaled in (("static", np.float32(1.0), X), ("dynamic", None, X),
                             ("dynamic-tiny", None, X / np.float32(3e38) * np.float32(1e-38))):
        model = Model([DenseInt8(q, np.full(21, 1e-3, np.float32), np.zeros(21, np.float32),
                                 x_scale=xs)])
        out.append((f"quant-edges-{mode}", model, scaled))
    return out


def _child(outdir):
    """Run every case on this process's path; save the outputs and the path."""
    import pykd._fkernels as fk

    arrays = {name: model.forward(X) for name, model, X in _cases()}
    bad = Model([DenseInt8(np.ones((5, 3), np.int8), np.ones(3, np.float32),
                           np.zeros(3, np.float32))])
    x = np.ones((4, 5), np.float32)
    x[2, 3] = np.nan
    try:
        bad.forward(x)
        nan_error = ""
    except ValueError as e:
        nan_error = str(e)
    np.savez(os.path.join(outdir, "out.npz"), path=fk.int8_path().decode().strip(),
             nan_error=nan_error, **arrays)


def _run(path, tmp_path, threads=None):
    return run_on_path(__file__, "PYKD_INT8_PATH", path, tmp_path, threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{path: outputs} for each path this CPU runs (the forced path is
    honoured only when the CPU has it; the process reports what ran)."""
    tmp = tmp_path_factory.mktemp("int8paths")
    got = {}
    for p in PATHS:
        r = _run(p, tmp)
        if str(r["path"]) == p:
            got[p] = r
    return got


def test_portable_and_the_best_path_run(runs):
    import pykd._fkernels as fk

    assert "portable" in runs
    assert fk.int8_path().decode().strip() in runs   # the automatic choice is one of them
    print("int8 paths tested:", sorted(runs))


def test_an_unknown_path_falls_back_to_the_automatic_one(tmp_path):
    import pykd._fkernels as fk

    env = dict(os.environ, PYKD_INT8_PATH="no-such-path")
    out = subprocess.run([sys.executable, "-c",
                          "import pykd._fkernels as f; print(f.int8_path().decode().strip())"],
                         env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert out == fk.int8_path().decode().strip()


def test_every_path_gives_the_same_bits_as_the_twin(runs):
    cases = _cases()
    for name, model, X in cases:
        ref = model.forward(X, backend="numpy")
        for p, r in runs.items():
            y = r[name]
            assert y.dtype == np.float32 and y.shape == ref.shape, (p, name)
            same = y.view(np.uint32) == ref.view(np.uint32)
            assert same.all(), f"{p} {name}: {np.count_nonzero(~same)} values differ from the twin"


def test_thread_count_does_not_change_the_bits(runs, tmp_path):
    best = max(runs, key=PATHS.index)
    for threads in (1, 2):
        r = _run(best, tmp_path, threads)
        for name, _, _ in _cases():
            assert (r[name].view(np.uint32) == runs[best][name].view(np.uint32)).all(), \
                (best, threads, name)


def test_overflow_edge_is_exact(runs):
    for p, r in runs.items():
        # -127 * -127 * 131071 = 2114044159 < 2**31 - 1: no wrap to negative.
        acc = np.float32(127 * 127 * N_MAX)
        sx = np.float32(1) / np.float32(127)          # dynamic: max|x| / 127 for x = -1
        assert (r["overflow-edge-dynamic"] == acc * sx).all(), p
        assert (r["overflow-edge-static"] == acc).all(), p   # x_scale 1, x clamps to -127


def test_nan_input_is_the_nonfinite_error_on_every_path(runs):
    for p, r in runs.items():
        msg = str(r["nan_error"])
        assert "NaN or inf" in msg and "dense_int8" in msg, (p, msg)


if __name__ == "__main__":
    _child(sys.argv[1])
