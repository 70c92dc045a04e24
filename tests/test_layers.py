"""The layer classes: validation, to_dense, counts, records and the NumPy twins
against float64 references written from docs/model.md."""
import numpy as np
import pytest
import scipy.sparse as sp

from pykd import _reference as ref
from pykd.layers import (Codebook, Dense, DenseInt8, KIND_CLASSES, LowRank, SparseCodebook,
                         SparseCSR, from_record, pack_bits, unpack_bits)

from kinds_helpers import (ACTIVATIONS, F32, KINDS, act64, assert_close, dense64,
                           int8_reference, make_layer)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_twin_matches_float64_definition(kind, act):
    rng = np.random.default_rng([KINDS.index(kind), ACTIVATIONS.index(act)])
    layer = make_layer(kind, 13, 9, act, rng)
    x = rng.standard_normal((5, 13)).astype(F32)
    y = layer.forward_numpy(x)
    assert y.dtype == F32 and y.shape == (5, 9)
    if kind == "dense_int8":
        want = act64(int8_reference(x, layer).astype(np.float64), act)
    else:
        want = act64(x.astype(np.float64) @ dense64(layer) + layer.b, act)
    assert_close(y, want)
    assert_close(layer.to_dense(), dense64(layer))


@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("static", [False, True])
def test_int8_twin_is_bit_exact(act, static):
    rng = np.random.default_rng(3)
    layer = make_layer("dense_int8", 40, 17, act, rng, static=static)
    x = (rng.standard_normal((9, 40)) * 2).astype(F32)
    x[2] = 0                                        # an all-zero sample: sx = 1
    want = int8_reference(x, layer)
    if act == "relu":
        want = np.maximum(want, 0)
    assert np.array_equal(layer.forward_numpy(x), want)


def test_int8_twin_rejects_nonfinite_input():
    layer = make_layer("dense_int8", 4, 3, "relu", np.random.default_rng(0))
    x = np.ones((2, 4), F32)
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.forward_numpy(x)


def test_activations_definitions_and_nan():
    z = np.array([-100, -3, -0.5, 0, 0.5, 3, 100, np.nan], F32)
    for act in ACTIVATIONS:
        got = ref._act(z.copy(), act)
        assert np.isnan(got[-1]), act                  # NaN propagates, relu included
        assert_close(got[:-1], act64(z[:-1].astype(np.float64), act), rel=1e-6)
    with pytest.raises(ValueError, match="activation"):
        ref._act(z.copy(), "swish")


@pytest.mark.parametrize("kind", KINDS)
def test_record_round_trip_and_counts(kind):
    rng = np.random.default_rng(7)
    layer = make_layer(kind, 12, 10, "tanh", rng)
    rec = layer.to_record()
    assert rec["kind"] == kind and rec["activation"] == "tanh"
    again = from_record(rec)
    assert type(again) is KIND_CLASSES[kind]
    assert np.array_equal(again.to_dense(), layer.to_dense())
    assert again.parameters == layer.parameters
    assert layer.nonzeros == np.count_nonzero(dense64(layer))
    assert (layer.n_in, layer.n_out) == (12, 10)


def test_parameter_counts():
    rng = np.random.default_rng(1)
    assert make_layer("dense", 12, 10, "relu", rng).parameters == 130
    assert make_layer("dense_int8", 12, 10, "relu", rng).parameters == 120 + 10 + 10
    assert make_layer("dense_int8", 12, 10, "relu", rng, static=True).parameters == 141
    lr = make_layer("low_rank", 12, 10, "relu", rng)
    assert lr.parameters == lr.rank * 22 + 10
    s = make_layer("sparse_csr", 12, 10, "relu", rng)
    assert s.parameters == s.nnz + 10
    assert make_layer("codebook", 12, 10, "relu", rng).parameters == 11 + 10


def test_sparse_csr_scipy_round_trip():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((8, 6)).astype(F32)
    W[rng.random((8, 6)) > 0.4] = 0
    b = np.zeros(6, F32)
    layer = SparseCSR.from_dense(W, b, "relu")
    assert layer.nnz == np.count_nonzero(W)
    c = layer.to_scipy()
    assert isinstance(c, sp.csr_array) and np.array_equal(c.toarray(), W)
    assert not np.shares_memory(c.data, layer.values)
    again = SparseCSR.from_scipy(sp.csr_matrix(W), b, "relu")
    assert np.array_equal(again.indptr, layer.indptr)
    assert np.array_equal(again.indices, layer.indices)
    assert np.array_equal(again.to_dense(), W)
    with pytest.raises(TypeError, match="float32"):
        SparseCSR.from_scipy(sp.csr_array(W.astype(np.float64)), b)
    with pytest.raises(TypeError, match="CSR"):
        SparseCSR.from_scipy(W, b)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("count", [1, 7, 8, 9, 33])
def test_pack_bits_lsb_first(bits, count):
    rng = np.random.default_rng(bits * 100 + count)
    codes = rng.integers(0, 2**bits, count).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
    stream = [(int(c) >> m) & 1 for c in codes for m in range(bits)]
    stream += [0] * (8 * packed.size - len(stream))
    want = [sum(stream[8 * i + m] << m for m in range(8)) for i in range(packed.size)]
    assert packed.tolist() == want
    assert np.array_equal(unpack_bits(packed, bits, count), codes)


def test_codebook_bits_and_packed_constructor():
    rng = np.random.default_rng(4)
    b = np.zeros(5, F32)
    for n_codes, bits in ((1, 1), (2, 1), (3, 2), (4, 2), (5, 4), (16, 4), (17, 8), (256, 8)):
        cents = np.linspace(-1, 1, n_codes).astype(F32)
        codes = rng.integers(0, n_codes, (3, 5)).astype(np.uint8)
        layer = Codebook(cents, codes, b)
        assert layer.bits == bits
        assert np.array_equal(layer.codes, codes)
        again = Codebook(cents, layer.packed.copy(), b, n_in=3)
        assert np.array_equal(again.to_dense(), cents[codes])
    s = SparseCodebook(np.array([0, 1, 1], np.int32), np.array([2], np.int32),
                       np.array([2], np.uint8), np.arange(3, dtype=F32), np.zeros(4, F32))
    assert s.bits == 2 and s.to_dense()[0].tolist() == [0, 0, 2, 0]


def test_bad_inputs_are_clear_errors():
    W = np.ones((3, 2), F32)
    b = np.zeros(2, F32)
    with pytest.raises(TypeError, match="W must have dtype float32"):
        Dense(W.astype(np.float64), b)
    with pytest.raises(ValueError, match=r"b must have shape \(2,\)"):
        Dense(W, np.zeros(3, F32))
    with pytest.raises(ValueError, match="NaN"):
        Dense(np.full((3, 2), np.nan, F32), b)
    with pytest.raises(ValueError, match="activation"):
        Dense(W, b, "softplus")
    q = np.ones((3, 2), np.int8)
    with pytest.raises(ValueError, match="-128"):
        DenseInt8(np.full((3, 2), -128, np.int8), np.ones(2, F32), b)
    with pytest.raises(ValueError, match="scale must be >= 0"):
        DenseInt8(q, np.array([1, -1], F32), b)
    with pytest.raises(ValueError, match="x_scale"):
        DenseInt8(q, np.ones(2, F32), b, x_scale=0.0)
    with pytest.raises(ValueError, match="smallest normal"):   # 1/x_scale would be inf
        DenseInt8(q, np.ones(2, F32), b, x_scale=1e-40)
    with pytest.raises(TypeError, match="q must have dtype int8"):
        DenseInt8(q.astype(np.int16), np.ones(2, F32), b)
    ip = np.array([0, 1, 1, 2], np.int32)
    with pytest.raises(ValueError, match="indices must be in"):
        SparseCSR(ip, np.array([0, 2], np.int32), np.ones(2, F32), b)
    with pytest.raises(ValueError, match="end at nnz"):
        SparseCSR(np.array([0, 1, 1, 3], np.int32), np.array([0, 1], np.int32), np.ones(2, F32), b)
    with pytest.raises(ValueError, match="non-decreasing"):
        SparseCSR(np.array([0, 2, 1, 2], np.int32), np.array([0, 1], np.int32), np.ones(2, F32), b)
    with pytest.raises(ValueError, match="strictly increasing"):
        SparseCSR(np.array([0, 2, 2, 2], np.int32), np.array([1, 1], np.int32), np.ones(2, F32), b)
    with pytest.raises(TypeError, match="indptr must have dtype int32"):
        SparseCSR(ip.astype(np.int64), np.array([0, 1], np.int32), np.ones(2, F32), b)
    with pytest.raises(ValueError, match="rank"):
        LowRank(np.ones((3, 2), F32), np.ones((3, 2), F32), b)
    with pytest.raises(ValueError, match="1 to 256 centroids"):
        Codebook(np.zeros(257, F32), np.zeros((3, 2), np.uint8), b)
    with pytest.raises(ValueError, match="codes must be < n_codes"):
        Codebook(np.zeros(3, F32), np.full((3, 2), 3, np.uint8), b)
    with pytest.raises(ValueError, match="needs n_in"):
        Codebook(np.zeros(3, F32), np.zeros(2, np.uint8), b)
    with pytest.raises(ValueError, match="unused high"):
        Codebook(np.zeros(2, F32), np.array([0xFF], np.uint8), b, n_in=3)
    with pytest.raises(ValueError, match="codes must be < n_codes"):
        SparseCodebook(ip, np.array([0, 1], np.int32), np.array([0, 4], np.uint8),
                       np.zeros(4, F32), b)
    with pytest.raises(ValueError, match="kind must be one of"):
        from_record({"kind": "conv2d"})


def test_sparse_twin_matches_scipy_product():
    rng = np.random.default_rng(9)
    layer = make_layer("sparse_csr", 30, 20, "identity", rng)
    x = rng.standard_normal((4, 30)).astype(F32)
    assert_close(layer.forward_numpy(x), x.astype(np.float64) @ layer.to_scipy().toarray()
                 + layer.b)


@pytest.mark.parametrize("kind", KINDS)
def test_record_bytes_is_the_file_record(kind, tmp_path):
    """record_bytes (what sparsify compares) is the record the writer writes."""
    import json
    import os
    from pykd.models import Model
    rng = np.random.default_rng([KINDS.index(kind), 21])
    for n_in, n_out in ((12, 10), (7, 300), (3, 70000)):
        layer = make_layer(kind, n_in, n_out, "relu", rng, static=True)
        Model([layer]).save(tmp_path / "m.pykd")
        header = 8 + 4 * 5 + 4 + 4 + len(json.dumps({}))      # no norms, metadata {}
        assert os.path.getsize(tmp_path / "m.pykd") == header + layer.record_bytes() + 12
