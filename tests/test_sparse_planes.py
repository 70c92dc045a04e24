"""The planes of sparse_csr and sparse_codebook (docs/model.md, "sparse_csr's
planes"): the derived layout the one-sample kernel runs on
(fortran/kernels/pykd_sparse_simd.c); sparse_codebook's hold the decoded
values centroids[codes], and give the bits of its codes' kernels.

- The NumPy builder (pykd._reference.sparse_planes) against a naive one
  written from the docs, at odd shapes: n_out off 16, more than one group
  of 13 blocks, n_in off 32, empty rows, an output with all 32 inputs of a
  chunk (32 planes in one cell).
- One sample on the planes gives the bits of the sequential float32 sum
  (inputs ascending, one multiply and one add: the scatter's order) and of
  the panel kernel on the same rows in a batch, on every CPU path this
  machine runs plus the forced portable one, each in its own process.
- Chunks of zeros (skipped on avx512) and -0 inputs change nothing; a NaN
  input gives all-NaN outputs.
- The planes are never saved (the file does not change when they do) and
  are rebuilt on load; a damaged plane count is an error, damaged plane
  indices cannot read outside the chunk; repack() after changing values.

Run: cd tests && python -m pytest -q -p no:cacheprovider test_sparse_planes.py
"""
import os
import sys

import numpy as np
import pytest

import pykd
from pykd import _reference as ref
from pykd.layers import SparseCodebook, SparseCSR

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kinds_helpers import run_on_path  # noqa: E402

F32 = np.float32
PATHS = ("portable", "avx2", "avx512")
# (n_in, n_out, density): odd shapes; 784 x 200 is the student's first layer.
SHAPES = [(45, 37, 0.3), (784, 200, 0.1), (70, 210, 0.2), (64, 300, 0.15), (200, 200, 0.1),
          (33, 16, 0.5), (1000, 5, 0.1)]


def make_W(n_in, n_out, density, seed):
    rng = np.random.default_rng([n_in, n_out, seed])
    W = rng.standard_normal((n_in, n_out)).astype(F32)
    W[rng.random((n_in, n_out)) >= density] = 0
    W[min(3, n_in - 1)] = 0                       # an empty row
    if n_in >= 32 and n_out > 4:
        W[:32, 4] = 0.5                           # output 4: all of chunk 0, 32 planes
    return W


def layer_of(W, act="identity"):
    b = (np.arange(W.shape[1]) % 7 - 3).astype(F32) * F32(0.125)
    return SparseCSR.from_dense(W, b, act)


def book_of(W, act="identity", n_codes=32):
    """A sparse_codebook layer with W's pattern and random codes; returns
    (layer, its effective W)."""
    csr = layer_of(W, act)
    rng = np.random.default_rng([W.shape[0], W.shape[1], n_codes])
    centroids = (rng.standard_normal(n_codes) + np.where(np.arange(n_codes) % 2, 3, -3)).astype(F32)
    codes = rng.integers(0, n_codes, csr.nnz).astype(np.uint8)
    layer = SparseCodebook(csr.indptr, csr.indices, codes, centroids, csr.b, act)
    return layer, layer.to_dense()


def naive_planes(W):
    """The docs' layout, cell by cell and lane by lane."""
    n_in, n_out = W.shape
    nc, nb = -(-n_in // 32), -(-n_out // 16)
    counts, idx, val = [], [], []
    for g0 in range(0, nb, 13):
        for c in range(nc):
            for b in range(g0, min(g0 + 13, nb)):
                lanes = []
                for lane in range(16):
                    j = 16 * b + lane
                    rows = range(32 * c, min(32 * c + 32, n_in))
                    lanes.append([(i - 32 * c, W[i, j]) for i in rows if j < n_out and W[i, j] != 0])
                k = max(len(e) for e in lanes)
                counts.append(k)
                for t in range(k):
                    idx.append([e[t][0] if t < len(e) else 0 for e in lanes])
                    val.append([e[t][1] if t < len(e) else 0 for e in lanes])
    return (np.array(counts, np.uint8), np.array(idx, np.int8).reshape(-1, 16),
            np.array(val, F32).reshape(-1, 16))


def sequential(W, b, x):
    """y = b + sum over i ascending of x[i] * W[i] in float32, one multiply
    and one add per term (the scatter's order), then + b."""
    y = np.zeros(W.shape[1], F32)
    for i in range(W.shape[0]):
        if x[i] != 0:
            y = y + x[i] * W[i]
    return y + b


def inputs(n_in, seed):
    """Two samples: ReLU'd Gaussians with a chunk of zeros and a -0; and
    dense Gaussians (no zeros)."""
    rng = np.random.default_rng([n_in, seed])
    a = np.maximum(rng.standard_normal(n_in), 0).astype(F32)
    a[: min(n_in, 40)] = 0
    a[min(n_in - 1, 41)] = -0.0
    return np.stack([a, rng.standard_normal(n_in).astype(F32)])


@pytest.mark.parametrize("shape", SHAPES)
def test_planes_match_a_naive_builder(shape):
    W = make_W(*shape, seed=0)
    layer = layer_of(W)
    counts, idx, val = naive_planes(W)
    assert layer._n_planes == idx.shape[0] > 0
    assert layer.kind_params() == (layer.nnz, idx.shape[0], 0, 0)
    np.testing.assert_array_equal(layer._pcount.view(np.uint8), counts)
    np.testing.assert_array_equal(layer._pidx, idx)
    assert layer._pval.tobytes() == val.tobytes()
    if shape[0] >= 32 and shape[1] > 4:
        assert counts.max() == 32


@pytest.mark.parametrize("shape", SHAPES)
def test_codebook_planes_hold_the_decoded_values(shape):
    W = make_W(*shape, seed=0)
    layer, Wd = book_of(W)
    assert np.array_equal(Wd != 0, W != 0)              # no centroid is 0
    counts, idx, val = naive_planes(Wd)
    assert layer._n_planes == idx.shape[0] > 0
    assert layer.kind_params() == (layer.nnz, layer.n_codes, layer.bits, idx.shape[0])
    np.testing.assert_array_equal(layer._pcount.view(np.uint8), counts)
    np.testing.assert_array_equal(layer._pidx, idx)
    assert layer._pval.tobytes() == val.tobytes()
    # the planes are derived: not in nbytes, not in the record
    assert layer.nbytes == (layer.indptr.nbytes + layer.indices.nbytes + layer.codes.nbytes
                            + layer.centroids.nbytes + layer.b.nbytes)
    assert set(layer.to_record()) == {"kind", "activation", "indptr", "indices", "codes",
                                      "centroids", "b"}


def test_which_layers_keep_planes():
    """None below PLANE_MIN_NNZ entries or under 2 entries per plane (one
    full column: one entry per plane); p2 = 0 then, and one sample takes the
    scatter. A diagonal keeps them (16 entries per plane)."""
    col = np.zeros((300, 40), F32)
    col[:, 5] = np.linspace(-1, 1, 300, dtype=F32)
    eye = layer_of(np.eye(300, dtype=F32))
    assert eye._n_planes == 19 and (eye._pval != 0).sum() == 300
    for W in (col, make_W(10, 10, 0.9, 0)):
        layer = layer_of(W)
        assert layer._n_planes == 0 and layer._pval.size == 0 and layer._pcount.size == 0
        m = pykd.Model([layer])
        assert m.table[0, 11] == 0 and m.table[0, 7] == 0
        x = inputs(W.shape[0], 1)[1]
        assert m.forward(x[None])[0].tobytes() == sequential(W, layer.b, x).tobytes()


def outputs():
    """{name: array} of every shape, sparse_csr and sparse_codebook: one
    sample at a time, and the same samples as one batch of 3 (also on the
    planes); sparse_codebook also as a batch of 9 (> PLANE_MAX_BATCH: its
    panel kernel, which reads centroids[codes]) and without planes (a copy
    of the layer with p4 = 0: its scatter kernel, the one batch 1 ran
    before the planes)."""
    out = {}
    for k, shape in enumerate(SHAPES):
        W = make_W(*shape, seed=0)
        X = inputs(shape[0], k)
        X = np.concatenate([X, X[:1]])
        book, _ = book_of(W)
        for name, layer in (("csr", layer_of(W)), ("book", book)):
            m = pykd.Model([layer])
            out[f"{k}|{name}|one"] = np.concatenate([m.forward(X[i:i + 1]) for i in range(3)])
            out[f"{k}|{name}|batch"] = m.forward(X)
        m = pykd.Model([book])
        out[f"{k}|book|b9"] = m.forward(np.concatenate([X] * 3))
        m = pykd.Model([without_planes(book)])
        assert m.table[0, 13] == 0
        out[f"{k}|book|scatter"] = np.concatenate([m.forward(X[i:i + 1]) for i in range(3)])
        # b and relu are applied by the planes' kernel as it stores, the
        # other activations after it; NaN and inf inputs; a damaged count
        for act in ("relu", "tanh", "sigmoid"):
            m = pykd.Model([layer_of(W, act)])
            out[f"{k}|csr|{act}"] = np.concatenate([m.forward(X[i:i + 1]) for i in range(3)])
        m = pykd.Model([layer_of(W, "relu")])
        for bad in (np.nan, np.inf, -np.inf):
            xb = X[1:2].copy()
            xb[0, shape[0] - 1] = bad                 # in the last (maybe partial) chunk
            out[f"{k}|csr|bad{bad}"] = m.forward(xb)
        m.layers[0]._pcount[-1] += 1
        try:
            m.forward(X[:1])
            out[f"{k}|csr|count"] = np.array(0)
        except ValueError:
            out[f"{k}|csr|count"] = np.array(1)
    return out


def without_planes(layer):
    """A copy of a sparse_codebook layer that keeps no planes (p4 = 0), as
    before the planes: one sample runs its scatter over the codes."""
    c = layer.copy()
    c._n_planes = 0
    c._pcount = np.zeros(0, np.int8)
    c._pidx = np.zeros((0, 16), np.int8)
    c._pval = np.zeros((0, 16), F32)
    return c


def _child(outdir):
    from pykd import _fkernels as fk
    np.savez(os.path.join(outdir, "out.npz"), path=fk.sparse_path().decode().strip(), **outputs())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planes")
    got = {}
    for p in PATHS:
        r = run_on_path(__file__, "PYKD_SPARSE_PATH", p, tmp)
        if str(r.pop("path")) == p:
            got[p] = r
    assert "portable" in got
    return got


def test_every_path_gives_the_sequential_bits(runs):
    for k, shape in enumerate(SHAPES):
        W = make_W(*shape, seed=0)
        layer = layer_of(W)
        X = inputs(shape[0], k)
        want = np.stack([sequential(W, layer.b, x) for x in np.concatenate([X, X[:1]])])
        book, Wd = book_of(W)
        want_book = np.stack([sequential(Wd, book.b, x) for x in np.concatenate([X, X[:1]])])
        for p, r in runs.items():
            assert r[f"{k}|csr|one"].tobytes() == want.tobytes(), (p, shape)
            assert r[f"{k}|csr|batch"].tobytes() == want.tobytes(), (p, shape, "batch of 3")
            # sparse_codebook: the planes, its scatter without planes and its
            # panel kernel (batch 9; the density is below the dense decode's)
            assert r[f"{k}|book|one"].tobytes() == want_book.tobytes(), (p, shape, "book")
            assert r[f"{k}|book|batch"].tobytes() == want_book.tobytes(), (p, shape, "book 3")
            assert r[f"{k}|book|scatter"].tobytes() == want_book.tobytes(), (p, shape, "book scatter")
            if shape[2] < 0.45:
                assert r[f"{k}|book|b9"].tobytes() == np.concatenate([want_book] * 3).tobytes(), \
                    (p, shape, "book panel")
            for act in ("relu", "tanh", "sigmoid"):
                twin = layer_of(W, act).forward_numpy(np.concatenate([X, X[:1]]))
                np.testing.assert_allclose(r[f"{k}|csr|{act}"], twin, rtol=1e-4, atol=1e-4)
                assert r[f"{k}|csr|{act}"].tobytes() == runs["portable"][f"{k}|csr|{act}"].tobytes(), \
                    (p, shape, act)
            assert r[f"{k}|csr|relu"].tobytes() == np.maximum(want, 0).tobytes(), (p, shape)
            for bad in (np.nan, np.inf, -np.inf):
                assert np.isnan(r[f"{k}|csr|bad{bad}"]).all(), (p, shape, bad)
            assert int(r[f"{k}|csr|count"]) == 1, (p, shape, "damaged count")
        # and the float64 twin
        np.testing.assert_allclose(want, ref.sparse_csr(X[[0, 1, 0]].astype(np.float64), layer.indptr,
                                                        layer.indices, layer.values, layer.b,
                                                        layer.n_out, "identity"),
                                   rtol=1e-4, atol=1e-4)
    print("planes paths tested:", sorted(runs))


def test_nan_input_gives_nan_outputs():
    m = pykd.Model([layer_of(make_W(45, 37, 0.3, 0), "relu")])
    x = np.ones((1, 45), F32)
    x[0, 7] = np.nan
    assert np.isnan(m.forward(x)).all()


def test_planes_are_never_saved_and_rebuilt_on_load(tmp_path):
    layer = layer_of(make_W(784, 200, 0.1, 0), "relu")
    m = pykd.Model([layer])
    m.save(tmp_path / "a.pykd")
    m.layers[0]._pval[:] = 7          # the planes change, the file must not
    m.layers[0]._pidx[:] = 3
    m.save(tmp_path / "b.pykd")
    assert (tmp_path / "a.pykd").read_bytes() == (tmp_path / "b.pykd").read_bytes()
    back = pykd.load_model(tmp_path / "a.pykd").layers[0]
    assert back._n_planes == layer._n_planes
    assert back._pval.tobytes() == layer._pval.tobytes()
    assert back._pidx.tobytes() == layer._pidx.tobytes()
    assert back._pcount.tobytes() == layer._pcount.tobytes()


def test_damaged_planes_never_read_out_of_bounds():
    W = make_W(70, 210, 0.2, 0)
    m = pykd.Model([layer_of(W)])
    x = inputs(70, 0)[1:]
    good = m.forward(x)
    layer = m.layers[0]
    layer._pidx[:] = -1               # 255: the kernel takes it modulo 32
    assert np.isfinite(m.forward(x)).all()
    layer._pidx[:] = layer_of(W)._pidx
    np.testing.assert_array_equal(m.forward(x), good)
    layer._pcount[0] += 1             # the counts no longer add up to p2
    with pytest.raises(ValueError, match="layer 1"):
        m.forward(x)
    layer._pcount[0] -= 1
    np.testing.assert_array_equal(m.forward(x), good)


def test_codebook_repack_after_changing_centroids_in_place():
    """The planes hold centroids[codes]: changing a centroid (or a code) in
    place leaves them stale until repack; a code >= n_codes is refused; a
    damaged plane count is an error, as for sparse_csr."""
    W = make_W(200, 200, 0.1, 0)
    book, _ = book_of(W, "relu")
    m = pykd.Model([book])
    layer = m.layers[0]
    x = inputs(200, 0)[1]
    before = m.forward(x[None])
    layer.centroids *= 2
    assert m.forward(x[None]).tobytes() == before.tobytes()       # stale
    layer.repack()
    W2 = layer.to_dense()
    want = np.maximum(sequential(W2, layer.b, x), 0)
    assert m.forward(x[None])[0].tobytes() == want.tobytes()
    layer.codes[:5] = (layer.codes[:5] + 1) % layer.n_codes
    layer.repack()
    want = np.maximum(sequential(layer.to_dense(), layer.b, x), 0)
    assert m.forward(x[None])[0].tobytes() == want.tobytes()
    saved = layer.codes[0]
    layer.codes[0] = layer.n_codes
    with pytest.raises(ValueError, match="n_codes"):
        layer.repack()
    layer.codes[0] = saved
    layer._pcount[0] += 1
    with pytest.raises(ValueError, match="layer 1"):
        m.forward(x[None])
    layer._pcount[0] -= 1
    assert m.forward(x[None])[0].tobytes() == want.tobytes()


def test_codebook_planes_are_never_saved_and_rebuilt_on_load(tmp_path):
    book, _ = book_of(make_W(784, 200, 0.1, 0), "relu")
    m = pykd.Model([book])
    m.save(tmp_path / "a.pykd")
    m.layers[0]._pval[:] = 7
    m.save(tmp_path / "b.pykd")
    assert (tmp_path / "a.pykd").read_bytes() == (tmp_path / "b.pykd").read_bytes()
    back = pykd.load_model(tmp_path / "a.pykd")
    lb = back.layers[0]
    assert back.table[0, 13] == book._n_planes > 0
    for a in ("_pval", "_pidx", "_pcount"):
        assert getattr(lb, a).tobytes() == getattr(book, a).tobytes()
    x = inputs(784, 0)
    np.testing.assert_array_equal(back.forward(x[:1]), pykd.Model([book]).forward(x[:1]))


def test_repack_after_changing_values_in_place():
    W = make_W(200, 200, 0.1, 0)
    m = pykd.Model([layer_of(W)])
    layer = m.layers[0]
    x = inputs(200, 0)[1]
    layer.values *= 2                 # the planes are stale until repack
    layer.repack()
    W2 = layer.to_dense()
    assert m.forward(x[None])[0].tobytes() == sequential(W2, layer.b, x).tobytes()
    layer.indices[:] = layer.indices[::-1]          # breaks the pattern
    with pytest.raises(ValueError, match="increasing"):
        layer.repack()


if __name__ == "__main__":
    _child(sys.argv[1])
