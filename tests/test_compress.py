"""The one-shot conversions: quantize_model, sparsify, low_rank, cluster."""
import numpy as np
import pytest

import pykd
from pykd.layers import Dense
from pykd.models import MLP, Model

from kinds_helpers import F32, assert_close, int8_reference

TINY = np.finfo(F32).tiny


def trained_like(seed=0, sizes=(20, 30, 16, 5)):
    m = MLP(list(sizes), seed=seed, norm=(0.2, 1.4))
    return m


def hand_quantize(W):
    """Per output channel: scale = max|W[:, j]| / 127 (>= tiny, 1 if zero),
    q = clip(rint(W * (1 / scale)), -127, 127), in float32."""
    amax = np.abs(W).max(axis=0)
    scale = np.where(amax > 0, np.maximum(amax / F32(127), TINY), F32(1)).astype(F32)
    q = np.clip(np.rint(W * (F32(1) / scale)), -127, 127).astype(np.int8)
    return q, scale


def test_quantize_dynamic_matches_hand_reference():
    mlp = trained_like()
    before = mlp.params.copy()
    qm = pykd.quantize_model(mlp)
    assert isinstance(qm, Model) and qm.kinds == ["dense_int8"] * 3
    assert np.array_equal(mlp.params, before)                   # input untouched
    assert not np.shares_memory(qm.f32, mlp.params)
    X = np.random.default_rng(1).standard_normal((25, 20)).astype(F32)
    h = ((X - F32(0.2)) / F32(1.4)).astype(F32)
    for layer, (W, b), act in zip(qm.layers, mlp.layers, mlp.activations):
        q, scale = hand_quantize(W)
        assert np.array_equal(layer.q, q) and np.array_equal(layer.scale, scale)
        assert np.array_equal(layer.b, b) and layer.x_scale is None
        h = int8_reference(h, layer)
        if act == "relu":
            h = np.maximum(h, 0)
    assert np.array_equal(qm.forward(X, backend="numpy"), h)
    assert_close(qm.forward(X, backend="numpy"), mlp.forward(X), rel=0.05)
    assert qm.metadata["compression"] == [{"quantize": "dynamic"}]


def test_quantize_static_calibrates_each_layer_input():
    mlp = trained_like(1)
    rng = np.random.default_rng(2)
    cal = rng.standard_normal((300, 20)).astype(F32)
    qm = pykd.quantize_model(mlp, activations="static", calibration=cal, batch_size=64)
    inputs = [((cal - F32(0.2)) / F32(1.4)).astype(F32)]
    inputs += [mlp.forward(cal, upto=k, backend="numpy") for k in (1, 2)]
    for layer, h in zip(qm.layers, inputs):
        want = F32(np.abs(h).max()) / F32(127)
        assert layer.quant == "static"
        assert layer.x_scale == pytest.approx(want, rel=1e-6)
    X = rng.standard_normal((10, 20)).astype(F32)
    h = ((X - F32(0.2)) / F32(1.4)).astype(F32)
    for layer, act in zip(qm.layers, mlp.activations):
        h = int8_reference(h, layer)
        h = np.maximum(h, 0) if act == "relu" else h
    assert np.array_equal(qm.forward(X, backend="numpy"), h)
    # An int8 model re-quantized keeps its weights and gets the new mode.
    again = pykd.quantize_model(qm)
    assert all(a.quant == "dynamic" and np.array_equal(a.q, b.q)
               for a, b in zip(again.layers, qm.layers))


def test_quantize_bad_arguments():
    mlp = trained_like()
    with pytest.raises(ValueError, match="calibration"):
        pykd.quantize_model(mlp, activations="static")
    with pytest.raises(ValueError, match="activations must be one of"):
        pykd.quantize_model(mlp, activations="per_tensor")
    with pytest.raises(ValueError, match=r"shape \(n, 20\)"):
        pykd.quantize_model(mlp, "static", calibration=np.zeros((3, 19), F32))
    with pytest.raises(ValueError, match="finite"):
        pykd.quantize_model(mlp, "static", calibration=np.full((3, 20), np.nan, F32))
    with pytest.raises(TypeError, match="pykd.MLP or pykd.Model"):
        pykd.quantize_model("model.pykd")


def test_sparsify_stores_exactly_the_zeros():
    mlp = trained_like(2)
    W1 = mlp.layers[0][0]
    rng = np.random.default_rng(3)
    W1[rng.random(W1.shape) < 0.9] = 0                 # 90% zeros: CSR pays
    sm = pykd.sparsify(mlp)
    assert sm.kinds == ["sparse_csr", "dense", "dense"]  # no zeros elsewhere: kept dense
    s = sm.layers[0]
    assert s.nnz == np.count_nonzero(W1) and np.count_nonzero(s.values) == s.nnz
    assert np.array_equal(s.to_dense(), W1)
    assert np.array_equal(sm.layers[1].W, mlp.layers[1][0])
    assert s.record_bytes() < Dense(W1, mlp.layers[0][1]).record_bytes()
    X = rng.standard_normal((12, 20)).astype(F32)
    assert_close(sm.forward(X, backend="numpy"), mlp.forward(X))
    assert sm.nonzeros == mlp.nonzeros and sm.parameters < mlp.parameters


def test_sparsify_keeps_layers_where_csr_does_not_pay():
    mlp = trained_like(3)
    W = mlp.layers[1][0]                               # 30 x 16: u8 column indices
    for step, kind in ((4, "dense"), (2, "sparse_csr")):
        W[:, ::step] = 0
        nnz = np.count_nonzero(W)
        dense_bytes = 24 + 4 * (30 * 16 + 16)
        csr_bytes = 24 + 8 + 4 * 31 + (1 + 4) * nnz + 4 * 16   # docs/format.md
        assert (csr_bytes < dense_bytes) == (kind == "sparse_csr")
        assert pykd.sparsify(mlp).kinds == ["dense", kind, "dense"]


def test_low_rank_exact_rank_reproduces_logits():
    rng = np.random.default_rng(4)
    W = (rng.standard_normal((40, 4)) @ rng.standard_normal((4, 30))).astype(F32) / F32(10)
    b = rng.standard_normal(30).astype(F32)
    model = Model([Dense(W, b, "relu"), Dense(rng.standard_normal((30, 3)).astype(F32),
                                              np.zeros(3, F32))])
    lr = pykd.low_rank(model, rank=4)
    assert lr.kinds == ["low_rank", "dense"]      # 4 * 70 < 1200; 30x3: 3 * 33 > 90, kept
    assert lr.layers[0].rank == 4
    X = rng.standard_normal((15, 40)).astype(F32)
    assert_close(lr.forward(X, backend="numpy"), model.forward(X, backend="numpy"))
    assert lr.layers[0].parameters == 4 * 70 + 30
    assert pykd.low_rank(model, energy=0.999999).layers[0].rank == 4
    # Full rank stores more than W: the layer stays dense.
    assert pykd.low_rank(model, rank=30).kinds == ["dense", "dense"]


def test_low_rank_energy_picks_the_rank():
    rng = np.random.default_rng(5)
    U, _ = np.linalg.qr(rng.standard_normal((40, 5)))
    V, _ = np.linalg.qr(rng.standard_normal((30, 5)))
    s = np.array([4, 3, 2, 1, 0.5])                   # squares 16, 9, 4, 1, 0.25 of 30.25
    W = ((U * s) @ V.T).astype(F32)
    model = Model([Dense(W, np.zeros(30, F32))])
    for energy, rank in ((0.5, 1), (0.53, 2), (0.8, 2), (0.9, 3), (0.96, 4), (0.99, 4), (0.995, 5)):
        lr = pykd.low_rank(model, energy=energy)
        assert lr.layers[0].rank == rank, energy
    assert_close(pykd.low_rank(model, rank=2).layers[0].to_dense(),
                 (U[:, :2] * s[:2]) @ V[:, :2].T)


def test_low_rank_bad_arguments():
    m = trained_like()
    with pytest.raises(ValueError, match="exactly one"):
        pykd.low_rank(m)
    with pytest.raises(ValueError, match="exactly one"):
        pykd.low_rank(m, rank=2, energy=0.5)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        pykd.low_rank(m, rank=0)
    with pytest.raises(ValueError, match="energy"):
        pykd.low_rank(m, energy=0.0)
    with pytest.raises(ValueError, match="energy"):
        pykd.low_rank(m, energy=1.5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_cluster_uses_at_most_2_to_the_bits_values(bits):
    mlp = trained_like(4)
    before = mlp.params.copy()
    cm = pykd.cluster(mlp, bits)
    assert np.array_equal(mlp.params, before)
    assert cm.kinds == ["codebook"] * 3
    for layer, (W, b) in zip(cm.layers, mlp.layers):
        assert np.unique(layer.to_dense()).size <= 2**bits
        assert layer.n_codes <= 2**bits and np.array_equal(layer.b, b)
        # every weight is its nearest centroid
        d = np.abs(W[..., None] - layer.centroids)
        assert np.allclose(np.abs(W - layer.to_dense()), d.min(axis=-1))


def test_cluster_is_deterministic_and_improves_with_bits():
    mlp = trained_like(5)
    a, b = pykd.cluster(mlp, 3, seed=7), pykd.cluster(mlp, 3, seed=7)
    assert np.array_equal(a.f32, b.f32) and np.array_equal(a.i8, b.i8)
    W = mlp.layers[0][0]
    err = [np.abs(pykd.cluster(mlp, bits).layers[0].to_dense() - W).mean() for bits in (1, 3, 6)]
    assert err[0] > err[1] > err[2]


def test_cluster_of_a_sparse_layer_clusters_its_nonzeros():
    mlp = trained_like(6)
    W = mlp.layers[0][0]
    W[np.random.default_rng(6).random(W.shape) < 0.9] = 0
    sm = pykd.sparsify(mlp)
    cm = pykd.cluster(sm, 2)
    assert cm.kinds == ["sparse_codebook", "codebook", "codebook"]
    s, c = sm.layers[0], cm.layers[0]
    assert np.array_equal(c.indptr, s.indptr) and np.array_equal(c.indices, s.indices)
    D = c.to_dense()
    assert np.array_equal(D == 0, W == 0) or (np.count_nonzero(D) <= np.count_nonzero(W))
    assert np.unique(c.centroids[c.codes]).size <= 4
    assert c.record_bytes() < s.record_bytes()


def test_cluster_keeps_few_distinct_values_exactly():
    W = np.array([[0.5, -1, 0.5], [2, -1, 0.5]], F32)
    m = Model([Dense(W, np.zeros(3, F32))])
    c = pykd.cluster(m, 2)
    assert np.array_equal(c.layers[0].to_dense(), W)
    with pytest.raises(ValueError, match="bits must be >= 1"):
        pykd.cluster(m, 0)
    with pytest.raises(ValueError, match="bits must be <= 8"):
        pykd.cluster(m, 9)
