"""The codebook layer's CPU paths (fortran/kernels/pykd_codebook_simd.c).

Every path this CPU runs, plus the forced portable one, each in its own
process (PYKD_CODEBOOK_PATH is read once per process), at 1 and 2 threads:
the same bits everywhere, and against a float64 product of the weights
decoded bit by bit from the packed stream. One sum order on every path and
batch size, so a sample's outputs do not depend on the batch it came in.

Run: cd tests && python -m pytest -q -p no:cacheprovider test_codebook_kernels.py
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from pykd.layers import Codebook
from pykd.models import Model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kinds_helpers import act64, run_on_path  # noqa: E402

PATHS = ("portable", "avx2", "avx512")
F32 = np.float32

# (n_in, n_out, batches): odd sizes for the tails of every tile (8 and 64
# outputs in registers, 16 x 6 in the microkernel, 256-row panels, a row
# segment starting mid-byte), the student's shapes, and a 1100 x 1900 layer
# whose batch-1 product is split over threads.
SHAPES = [
    (1, 1, (1, 2, 7)),
    (3, 5, (1, 3, 6)),
    (17, 15, (1, 4, 5)),
    (33, 17, (2, 7, 13)),
    (65, 31, (1, 6, 11)),
    (127, 65, (1, 7, 64)),
    (129, 130, (3, 4, 17)),
    (784, 200, (1, 2, 7, 256)),
    (200, 10, (1, 5, 259)),
    (9, 1000, (1, 8)),
    (1100, 1900, (1, 3)),
]
# (bits, n_codes): full tables and tables with unused (NaN) entries.
CODES = [(1, 2), (2, 3), (2, 4), (4, 11), (4, 16), (8, 20), (8, 32), (8, 50), (8, 64), (8, 200), (8, 256)]
ACTS = ("relu", "identity", "tanh")


def _decode64(layer):
    """W in float64 from the packed stream, read as docs/format.md says (bit
    t of the stream is bit t mod 8 of byte t // 8; an index is `bits` bits,
    least significant first), independently of pykd's unpacking."""
    n, bits = layer.n_in * layer.n_out, layer.bits
    stream = np.unpackbits(layer.packed.view(np.uint8), bitorder="little")[:n * bits]
    idx = (stream.reshape(n, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)
    return layer.centroids.astype(np.float64)[idx].reshape(layer.n_in, layer.n_out)


def _layer(rng, n_in, n_out, n_codes, act):
    cents = (rng.standard_normal(n_codes) / np.sqrt(n_in)).astype(F32)
    codes = rng.integers(0, n_codes, (n_in, n_out)).astype(np.uint8)
    b = (rng.standard_normal(n_out) * 0.1).astype(F32)
    return Codebook(cents, codes, b, act)


def _cases():
    """(name, model, X) for every check; deterministic, rebuilt in each process."""
    rng = np.random.default_rng(17)
    out = []
    for k, (n_in, n_out, batches) in enumerate(SHAPES):
        for bits, n_codes in CODES:
            act = ACTS[(k + bits) % len(ACTS)]
            model = Model([_layer(rng, n_in, n_out, n_codes, act)])
            for n in batches:
                X = rng.standard_normal((n, n_in)).astype(F32)
                out.append((f"{n_in}x{n_out}-{bits}bit-{n_codes}-{act}-batch{n}", model, X))
    # NaN and inf rows: a whole NaN row, single NaN / +inf / -inf entries.
    for bits, n_codes in ((1, 2), (4, 11), (8, 256)):
        model = Model([_layer(rng, 70, 37, n_codes, "relu")])
        for n in (1, 3, 9):
            X = rng.standard_normal((n, 70)).astype(F32)
            X[0, 5] = np.inf
            if n > 1:
                X[1] = np.nan
                X[-1, 3], X[-1, 60] = -np.inf, np.nan
            out.append((f"nonfinite-{bits}bit-batch{n}", model, X))
    # A 784-200-200-10 student at 4 bits.
    student = Model([_layer(rng, 784, 200, 16, "relu"), _layer(rng, 200, 200, 16, "relu"),
                     _layer(rng, 200, 10, 16, "identity")])
    X = rng.random((300, 784), dtype=F32)
    for n in (1, 4, 300):
        out.append((f"student-4bit-batch{n}", student, X[:n]))
    return out


def _child(outdir):
    """Run every case on this process's path; save the outputs and the path."""
    import pykd._fkernels as fk

    arrays = {name: model.forward(X) for name, model, X in _cases()}
    np.savez(os.path.join(outdir, "out.npz"), path=fk.codebook_path().decode().strip(), **arrays)


def _run(path, tmp_path, threads):
    return run_on_path(__file__, "PYKD_CODEBOOK_PATH", path, tmp_path, threads, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(path, threads): outputs} for each path this CPU runs (a forced path
    is honoured only when the CPU has it; the process reports what ran)."""
    tmp = tmp_path_factory.mktemp("codebookpaths")
    got = {}
    for p in PATHS:
        for threads in (1, 2):
            r = _run(p, tmp, threads)
            if str(r["path"]) == p:
                got[p, threads] = r
    return got


def _same_bits(a, b, what):
    """Equal, NaN where the other is NaN, and the same bits elsewhere."""
    np.testing.assert_array_equal(a, b, err_msg=what)
    ok = ~np.isnan(a)
    assert (a[ok].view(np.uint32) == b[ok].view(np.uint32)).all(), what


def test_portable_and_the_best_path_run(runs):
    import pykd._fkernels as fk

    assert ("portable", 1) in runs and ("portable", 2) in runs
    assert (fk.codebook_path().decode().strip(), 1) in runs   # the automatic choice ran
    print("codebook paths tested:", sorted(runs))


def test_an_unknown_path_falls_back_to_the_automatic_one():
    import pykd._fkernels as fk

    env = dict(os.environ, PYKD_CODEBOOK_PATH="no-such-path")
    out = subprocess.run([sys.executable, "-c", "import pykd._fkernels as f; "
                          "print(f.codebook_path().decode().strip())"],
                         env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert out == fk.codebook_path().decode().strip()


def test_every_path_and_thread_count_gives_the_same_bits(runs):
    ref = runs["portable", 1]
    for key, r in runs.items():
        for name, _, _ in _cases():
            _same_bits(r[name], ref[name], f"{key} {name}")


def test_against_the_float64_product(runs):
    """A float64 reference: W decoded from the bit stream (_decode64)."""
    r = runs["portable", 1]
    for name, model, X in _cases():
        layers = model.layers
        y = X.astype(np.float64)
        for layer in layers:
            y = act64(y @ _decode64(layer) + layer.b.astype(np.float64), layer.activation)
        got = r[name].astype(np.float64)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(y), err_msg=name)
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(y), err_msg=name)
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(y), err_msg=name)
        ok = np.isfinite(y)
        scale = max(1.0, np.abs(y[ok]).max()) if ok.any() else 1.0
        err = np.abs(got[ok] - y[ok]).max() if ok.any() else 0.0
        assert err <= 2e-5 * scale, f"{name}: max error {err}, scale {scale}"


def test_against_the_numpy_twin(runs):
    """Model.forward(backend='numpy') (pykd/layers.py Codebook.forward_numpy)."""
    r = runs["portable", 1]
    for name, model, X in _cases():
        twin = model.forward(X, backend="numpy")
        np.testing.assert_array_equal(np.isnan(r[name]), np.isnan(twin), err_msg=name)
        ok = np.isfinite(twin)
        np.testing.assert_allclose(r[name][ok], twin[ok], rtol=1e-4, atol=2e-5, err_msg=name)


def test_a_sample_gets_the_same_bits_in_any_batch(runs):
    """One sum order for every batch size: forward(x[i:i+1]) == forward(x)[i]."""
    for key, r in runs.items():
        for full, single in (("784x200-4bit-16-relu-batch256", None),
                             ("student-4bit-batch300", "student-4bit-batch1"),
                             ("student-4bit-batch4", "student-4bit-batch1")):
            if single is not None:
                _same_bits(r[full][:1], r[single], f"{key} {full}")
    rng = np.random.default_rng(5)
    for bits, n_codes in CODES:
        model = Model([_layer(rng, 131, 77, n_codes, "identity")])
        X = rng.standard_normal((40, 131)).astype(F32)
        full = model.forward(X)
        for i in (0, 5, 13, 39):
            _same_bits(model.forward(X[i:i + 1]), full[i:i + 1], f"{bits} bits, sample {i}")
        _same_bits(model.forward(X[:7]), full[:7], f"{bits} bits, first 7")


def test_nan_rows_give_nan_and_only_those(runs):
    r = runs["portable", 1]
    y = r["nonfinite-4bit-batch9"]
    assert np.isnan(y[1]).all() and np.isnan(y[-1]).all()
    assert np.isfinite(y[2:-1]).all()


def test_a_corrupt_index_is_an_error_not_nan():
    """An index >= n_codes in the model's buffer (the table's NaN pad in the
    kernel) is the corrupt-data error; a NaN input with valid indices is NaN."""
    rng = np.random.default_rng(3)
    for bits, n_codes in ((2, 3), (4, 11), (8, 20), (8, 32), (8, 50), (8, 200)):
        model = Model([_layer(rng, 40, 24, n_codes, "relu")])
        X = rng.standard_normal((3, 40)).astype(F32)
        X[1, 7] = np.nan
        y = model.forward(X)
        assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()
        off = int(model.table[0, 6])
        # 255: every field of the byte = 2**bits - 1. At 8 bits also a byte
        # just past the codes, and bytes that the avx512 path's 32- and
        # 64-entry lookups (vpermt2ps) would wrap onto a valid centroid.
        bad = [255] if bits < 8 else [v for v in (255, n_codes, 32 + n_codes % 32,
                                               64 + n_codes % 64, 128) if v >= n_codes]
        for v in bad:
            for at in (17, model.layers[0].packed.size - 1):
                keep = model.i8[off + at]
                model.i8[off + at] = np.uint8(v).view(np.int8)
                for rows in (X[:1], X[:3], np.repeat(X[:1], 9, axis=0)):
                    with pytest.raises(ValueError, match="corrupt layer data"):
                        model.forward(rows)
                model.i8[off + at] = keep
        assert np.isfinite(model.forward(X[[0, 2]])).all()


if __name__ == "__main__":
    _child(sys.argv[1])
