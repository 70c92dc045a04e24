"""The dense layer's batch product (fortran/kernels/pykd_dense_gemm.c): from
16 samples on a thread, each output is summed in input order with one fused
multiply-add per term, acc = fma(w, x, acc), then + b and the activation.
Every CPU path (avx512, avx2, portable fmaf) gives the same bits, whatever
the batch size, the slice of samples or the thread count; the reference
here is libm's fmaf, which is correctly rounded."""
import ctypes
import ctypes.util
import os
import sys

import numpy as np
import pytest

from pykd.layers import Dense, LowRank
from pykd.models import Model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kinds_helpers import run_on_path  # noqa: E402

F32 = np.float32
PATHS = ("portable", "avx2", "avx512")
_USER_TILE = os.environ.get("PYKD_DENSE_TILE")  # before the fixture below sets it
# (n_in, n_out, batches): panels of 96 outputs and their tails, sample
# tiles of 4 and their tails, one output, tiny and wide layers
SHAPES = [(784, 200, (16, 17, 256, 300)), (200, 10, (16, 19, 64)), (13, 97, (16, 33)),
          (300, 203, (18, 128)), (5, 1, (16, 21)), (1, 193, (16,)), (1200, 96, (23,))]


def _cases():
    """(name, model, X), deterministic, rebuilt in each process."""
    rng = np.random.default_rng(21)
    out = []
    for k, (n_in, n_out, batches) in enumerate(SHAPES):
        act = ("identity", "relu", "tanh")[k % 3]
        W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(F32)
        model = Model([Dense(W, rng.standard_normal(n_out).astype(F32), act)])
        for n in batches:
            X = rng.standard_normal((n, n_in)).astype(F32)
            out.append((f"{n_in}x{n_out}-{act}-{n}", model, X))
    # NaN and inf inputs, -0.0 and 0 through relu
    W = (rng.standard_normal((40, 35)) / 7).astype(F32)
    model = Model([Dense(W, np.zeros(35, F32), "relu")])
    X = rng.standard_normal((20, 40)).astype(F32)
    X[3, 5] = np.nan
    X[7, 0] = np.inf
    X[9] = 0.0
    X[10] = -0.0
    out.append(("nonfinite-relu", model, X))
    # low rank: both factors' products are this kernel's (rank 70 of 784 x 200,
    # and a rank whose panel has a tail)
    for n_in, r, n_out, n in ((784, 70, 200, 256), (50, 13, 37, 19)):
        U = (rng.standard_normal((n_in, r)) / np.sqrt(n_in)).astype(F32)
        V = (rng.standard_normal((r, n_out)) / np.sqrt(r)).astype(F32)
        model = Model([LowRank(U, V, rng.standard_normal(n_out).astype(F32), "relu")])
        out.append((f"low_rank-{n_in}x{r}x{n_out}-{n}", model,
                    rng.standard_normal((n, n_in)).astype(F32)))
    return out


def _child(outdir):
    import pykd._fkernels as fk
    arrays = {name: model.forward(X) for name, model, X in _cases()}
    # a slice of a batch and the whole batch (both >= 16 samples)
    name, model, X = _cases()[3]
    arrays["slice"] = model.forward(X[100:140])
    arrays["whole"] = model.forward(X)[100:140]
    np.savez(os.path.join(outdir, "out.npz"), path=fk.dense_path().decode().strip(),
             tile=fk.dense_tile().decode().strip(), **arrays)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, monkeypatch_module):
    """Every path the CPU has at 1 and 2 threads; avx512 with each of its
    tiles (4x6, the AMD default; 8x3, the Intel one)."""
    tmp = tmp_path_factory.mktemp("gemm")
    got = {}
    for p in PATHS:
        for tile in (("4x6", "8x3") if p == "avx512" else ("",)):
            monkeypatch_module.setenv("PYKD_DENSE_TILE", tile)
            for threads in (1, 2):
                (tmp / (tile or "default")).mkdir(exist_ok=True)
                r = run_on_path(__file__, "PYKD_DENSE_PATH", p, tmp / (tile or "default"), threads)
                if str(r["path"]) == p:
                    assert p != "avx512" or str(r["tile"]) == tile
                    got[p + (f"-{tile}" if tile else ""), threads] = r
    return got


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_the_tile_follows_the_vendor():
    """Without PYKD_DENSE_TILE: 8x3 on Intel, 4x6 elsewhere."""
    import pykd._fkernels as fk
    if _USER_TILE:
        pytest.skip("PYKD_DENSE_TILE is set")
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
        intel = "GenuineIntel" in fh.read()
    assert fk.dense_tile().decode().strip() == ("8x3" if intel else "4x6")


def _fmaf():
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.fmaf.restype = ctypes.c_float
    libm.fmaf.argtypes = [ctypes.c_float] * 3
    return libm.fmaf


def test_every_path_and_thread_count_gives_the_same_bits(runs):
    assert ("portable", 1) in runs and len(runs) >= 4
    ref = runs["portable", 1]
    for key, r in runs.items():
        for name, _, _ in _cases():
            same = r[name].view(np.uint32) == ref[name].view(np.uint32)
            assert same.all(), f"{key} {name}: {np.count_nonzero(~same)} values differ"
    print("dense batch paths tested:", sorted(runs))


def test_a_slice_of_a_batch_has_the_bits_of_the_batch(runs):
    for key, r in runs.items():
        assert np.array_equal(r["slice"].view(np.uint32), r["whole"].view(np.uint32)), key


def test_each_output_is_an_fmaf_chain_in_input_order():
    fmaf = _fmaf()
    rng = np.random.default_rng(4)
    n_in, n_out, n = 37, 21, 16
    W = rng.standard_normal((n_in, n_out)).astype(F32)
    b = rng.standard_normal(n_out).astype(F32)
    X = rng.standard_normal((n, n_in)).astype(F32)
    got = Model([Dense(W, b, "relu")]).forward(X)
    ref = np.empty((n, n_out), F32)
    for s in range(n):
        for j in range(n_out):
            acc = F32(0)
            for i in range(n_in):
                acc = F32(fmaf(float(W[i, j]), float(X[s, i]), float(acc)))
            z = F32(acc + b[j])
            ref[s, j] = F32(0) if z < 0 else z
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_low_rank_is_two_fmaf_chains():
    """From 2 samples a low-rank layer is t = U x as an fmaf chain (no bias),
    then act(V t + b) as another: the dense batch kernel twice, no BLAS."""
    fmaf = _fmaf()
    rng = np.random.default_rng(5)
    n_in, r, n_out, n = 23, 5, 11, 9
    U = rng.standard_normal((n_in, r)).astype(F32)
    V = rng.standard_normal((r, n_out)).astype(F32)
    b = rng.standard_normal(n_out).astype(F32)
    X = rng.standard_normal((n, n_in)).astype(F32)
    got = Model([LowRank(U, V, b, "relu")]).forward(X)

    def chain(A, x):
        acc = F32(0)
        for a, v in zip(A, x):
            acc = F32(fmaf(float(a), float(v), float(acc)))
        return acc

    ref = np.empty((n, n_out), F32)
    for s in range(n):
        t = [chain(U[:, k], X[s]) for k in range(r)]
        for j in range(n_out):
            z = F32(chain(V[:, j], t) + b[j])
            ref[s, j] = F32(0) if z < 0 else z
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_close_to_float64_and_nonfinite_rows(runs):
    r = runs["portable", 1]
    for name, model, X in _cases():
        layer = model.layers[0]
        x64, a64 = X.astype(np.float64), np.abs(X).astype(np.float64)
        if isinstance(layer, LowRank):
            U, V = layer.U.astype(np.float64), layer.V.astype(np.float64)
            z = (x64 @ U) @ V + layer.b
            scale = (a64 @ np.abs(U)) @ np.abs(V) + 1
            terms = X.shape[1] + U.shape[1]
        else:
            z = x64 @ layer.W.astype(np.float64) + layer.b
            scale = a64 @ np.abs(layer.W).astype(np.float64) + 1
            terms = X.shape[1]
        want = {"identity": z, "relu": np.maximum(z, 0), "tanh": np.tanh(z)}[layer.activation]
        got = r[name].astype(np.float64)
        if name == "nonfinite-relu":
            assert np.isnan(got[3]).all() and np.isfinite(got[[0, 1, 2, 4, 5, 6]]).all()
            assert np.array_equal(got[9], np.maximum(layer.b, 0))
            continue
        assert (np.abs(got - want) <= 4e-7 * scale * np.sqrt(terms) + 1e-6).all(), name


if __name__ == "__main__":
    _child(sys.argv[1])
