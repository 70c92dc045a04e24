"""Fine-tuning of the compressed kinds (pykd/compress/finetune.py) and the
fine_tune= / qat= / method= arguments of the conversions (docs/compression.md).

Gradients are checked in float64 against central finite differences; QAT
against the converted int8 model bit for bit; fine-tuned models against
their saved and reloaded selves (not against hard-coded bits: the kernels'
bits may change)."""
import numpy as np
import pytest

import pykd
from pykd.compress import finetune as F
from pykd.layers import Codebook, Dense, DenseInt8, LowRank, SparseCodebook, SparseCSR

ACTS = ["identity", "relu", "tanh", "sigmoid", "gelu", "silu"]
F64 = np.float64


def num_grad(f, a, h=1e-6):
    """Central differences of the scalar f() over every entry of a (in place)."""
    g = np.zeros_like(a)
    flat, gf = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        gf[i] = (up - down) / (2 * h)
    return g


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def make_layer(kind, rng, n_in=6, n_out=5, act="tanh"):
    b = rand(rng, n_out)
    if kind == "dense":
        return Dense(rand(rng, n_in, n_out), b, act)
    if kind == "low_rank":
        return LowRank(rand(rng, n_in, 2), rand(rng, 2, n_out), b, act)
    if kind == "codebook":
        return Codebook(rand(rng, 4), rng.integers(0, 4, (n_in, n_out)).astype(np.uint8), b, act)
    W = rand(rng, n_in, n_out) * (rng.random((n_in, n_out)) < 0.5)
    csr = SparseCSR.from_dense(W, b, act)
    if kind == "sparse_csr":
        return csr
    codes = rng.integers(0, 3, csr.nnz).astype(np.uint8)
    return SparseCodebook(csr.indptr, csr.indices, codes, rand(rng, 3), b, act)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("act", ACTS)
def test_activation_derivatives_match_finite_differences(act):
    rng = np.random.default_rng(1)
    z = rng.standard_normal(50) * 3
    z = z[np.abs(z) > 1e-3]              # relu's kink
    dy = rng.standard_normal(z.size)
    y = F.activate(act, z)
    got = F.activation_grad(act, dy, y, z)
    h = 1e-6
    want = dy * (F.activate(act, z + h) - F.activate(act, z - h)) / (2 * h)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_activation_forward_twin_matches_the_kernel():
    """activate() is the reference of the kernels' activations (float32)."""
    rng = np.random.default_rng(2)
    x, W, b = rand(rng, 7, 6), rand(rng, 6, 5), rand(rng, 5)
    for act in ACTS:
        m = pykd.Model([Dense(W, b, act)])
        np.testing.assert_allclose(m.forward(x), F.activate(act, x.astype(F64) @ W + b),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "low_rank", "codebook", "sparse_csr",
                                  "sparse_codebook"])
@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_layer_gradients_match_float64_finite_differences(kind, act):
    """d loss / d (every trained parameter) and d loss / d x, in float64, for
    the loss sum(w * act(pre(x)))."""
    rng = np.random.default_rng(3)
    layer = make_layer(kind, rng, act=act)
    t = F._trainer(layer, None)
    p = {k: v.astype(F64) for k, v in t.params.items()}
    t.use(p)
    x = rng.standard_normal((4, layer.n_in))
    w = rng.standard_normal((4, layer.n_out))

    def loss():
        t.use(p)
        return float((w * F.activate(act, t.pre(x))).sum())

    z = t.pre(x)
    dz = F.activation_grad(act, w, F.activate(act, z), z)
    dx, grads = t.backward(x, dz, need_dx=True)
    assert set(grads) == set(t.params)
    for name, g in grads.items():
        assert g.shape == t.params[name].shape
        np.testing.assert_allclose(g, num_grad(loss, p[name]), rtol=1e-6, atol=1e-7,
                                   err_msg=f"{kind} {name}")
    np.testing.assert_allclose(dx, num_grad(loss, x), rtol=1e-6, atol=1e-7)


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    rng = np.random.default_rng(4)
    layer = make_layer("codebook", rng, n_in=9, n_out=7, act="identity")
    t = F._trainer(layer, None)
    t.use({k: v.astype(F64) for k, v in t.params.items()})
    x, dz = rng.standard_normal((5, 9)), rng.standard_normal((5, 7))
    _, g = t.backward(x, dz, need_dx=False)
    dW = x.T @ dz
    codes = layer.codes
    for c in range(layer.n_codes):
        assert g["centroids"][c] == pytest.approx(dW[codes == c].sum(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("static", [False, True])
def test_int8_straight_through_estimator(static):
    """STE: the shadow gradient is d/dW of the dequantized product at the
    quantized operands (float64 finite differences of that surrogate); the
    input gradient passes the quantization, zero where a static scale clips."""
    rng = np.random.default_rng(5)
    Wf = rand(rng, 6, 5)
    q, s = pykd.quantize_int8(Wf, per_channel=True)
    layer = DenseInt8(q, s, rand(rng, 5), "silu", x_scale=0.02 if static else None)
    t = F._trainer(layer, Wf)
    t.sync({k: v.copy() for k, v in t.params.items()})
    np.testing.assert_array_equal(layer.q, q)            # sync = quantize_int8 of the shadow
    x = (0.5 * rng.standard_normal((4, 6))).astype(np.float32)
    x[0, 0] = 5.0                                        # clipped by the static scale
    xq, mask = t.quantized_input(x)
    w = rng.standard_normal((4, 5))
    Wq = t.weight(F64).copy()                           # the kernel's dequantized weights
    np.testing.assert_array_equal(Wq, q.astype(np.float32) * s)
    b = layer.b.astype(F64)
    xq64 = xq.astype(F64)

    def surrogate():
        return float((w * F.activate("silu", xq64 @ Wq + b)).sum())

    z = t.pre(x.astype(F64))
    np.testing.assert_allclose(z, xq64 @ Wq + b, rtol=1e-12)
    dz = F.activation_grad("silu", w, F.activate("silu", z), z)
    dx, g = t.backward(x.astype(F64), dz, need_dx=True)
    np.testing.assert_allclose(g["W"], num_grad(surrogate, Wq), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g["b"], num_grad(surrogate, b), rtol=1e-6, atol=1e-7)
    want_dx = num_grad(surrogate, xq64)
    if static:
        assert not mask[0, 0] and mask.sum() == mask.size - 1
        want_dx = want_dx * mask
        assert dx[0, 0] == 0
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-7)
    # The quantized input is the kernel's: the int8 layer's output from it.
    y = pykd.Model([layer]).forward(x)
    np.testing.assert_allclose(y, F.activate("silu", z), rtol=1e-4, atol=1e-5)


def _kd64(s, t, y, T, alpha):
    """Hinton KD in float64 (docs: alpha CE + (1 - alpha) T^2 KL, batch means)."""
    def logsm(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = s.shape[0]
    ce = -logsm(s)[np.arange(n), y].mean()
    lp, lq = logsm(t / T), logsm(s / T)
    kl = (np.exp(lp) * (lp - lq)).sum() / n
    return alpha * ce + (1 - alpha) * T * T * kl


def test_network_gradient_matches_a_float64_reference():
    """The whole backward pass (chain, input normalisation, KD gradient)
    against float64 finite differences of a float64 twin of the network."""
    rng = np.random.default_rng(6)
    layers = [make_layer("low_rank", rng, 6, 5, "relu"), make_layer("codebook", rng, 5, 5, "gelu"),
              make_layer("sparse_csr", rng, 5, 4, "identity")]
    model = pykd.Model(layers, norm=(np.float32(0.5), np.float32(2.0)))
    net = F._Net(model)
    X = rand(rng, 8, 6)
    y = rng.integers(0, 4, 8)
    T = rand(rng, 8, 4) * 3
    outs = net.forward(X)
    _, dlog = pykd.kd_loss(outs[-1], T, y, 5.0, 0.3)
    net.backward(X, outs, dlog)
    P64 = net.P.astype(F64)
    views = []
    pos = 0
    for t in net.trainers:
        v = {}
        for name, a in t.params.items():
            v[name] = P64[pos:pos + a.size].reshape(a.shape)
            pos += a.size
        views.append(v)

    def loss():
        h = (X.astype(F64) - 0.5) / 2.0
        for t, v, layer in zip(net.trainers, views, layers):
            t.use(v)
            h = F.activate(layer.activation, t.pre(h))
        return _kd64(h, T.astype(F64), y, 5.0, 0.3)

    want = num_grad(loss, P64)
    np.testing.assert_allclose(net.G, want, rtol=2e-3, atol=2e-5)


# ---------------------------------------------------------------- training

def _data(rng, n=600, nf=12, classes=3):
    X = rand(rng, n, nf)
    y = (np.argmax(X[:, :classes] + 0.5 * X[:, classes:2 * classes], axis=1)).astype(np.int64)
    return X, y


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(7)
    X, y = _data(rng)
    m = pykd.MLP([12, 24, 16, 3], seed=0)
    pykd.fit(m, X, y, epochs=3, progress=False)
    return m, X, y


def _ce(model, X, y):
    from pykd.train import _logits_stats
    return _logits_stats(model.forward(X), y)[1]


CONVERSIONS = {
    "low_rank": lambda m, ft: pykd.low_rank(m, rank=3, fine_tune=ft),
    "codebook": lambda m, ft: pykd.cluster(m, 2, fine_tune=ft),
    "sparse_codebook": lambda m, ft: pykd.cluster(pykd.sparsify(pykd.prune(m, 0.7, scope="layer")),
                                                  2, fine_tune=ft),
    "sparse_csr": lambda m, ft: F.fine_tune(pykd.sparsify(pykd.prune(m, 0.7, scope="layer")), ft),
    "int8 dynamic": lambda m, ft: pykd.quantize_model(m, qat=True, fine_tune=ft),
    "int8 static": lambda m, ft: pykd.quantize_model(m, "static", ft.X[:100], qat=True,
                                                     fine_tune=ft),
}


def _before(name, m, X):
    """The conversion without fine-tuning."""
    if name == "low_rank":
        return pykd.low_rank(m, rank=3)
    if name == "codebook":
        return pykd.cluster(m, 2)
    if name == "sparse_codebook":
        return pykd.cluster(pykd.sparsify(pykd.prune(m, 0.7, scope="layer")), 2)
    if name == "sparse_csr":
        return pykd.sparsify(pykd.prune(m, 0.7, scope="layer"))
    if name == "int8 dynamic":
        return pykd.quantize_model(m)
    return pykd.quantize_model(m, "static", X[:100])


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_fine_tuning_lowers_the_loss_and_keeps_codes_and_pattern(name, trained, tmp_path):
    m, X, y = trained
    ft = pykd.FineTune(X, y, epochs=4, lr=3e-3, batch_size=32, X_val=X, y_val=y)
    before = _before(name, m, X)
    out = CONVERSIONS[name](m, ft)
    assert out.kinds == before.kinds
    assert _ce(out, X, y) < _ce(before, X, y) - 1e-3
    for lb, lo in zip(before.layers, out.layers):
        if isinstance(lb, Codebook):
            np.testing.assert_array_equal(lb.packed, lo.packed)          # codes fixed
        if isinstance(lb, (SparseCSR, SparseCodebook)):
            np.testing.assert_array_equal(lb.indptr, lo.indptr)          # pattern fixed
            np.testing.assert_array_equal(lb.indices, lo.indices)
        if isinstance(lb, SparseCodebook):
            np.testing.assert_array_equal(lb.codes, lo.codes)
    step = out.metadata["compression"][-1]
    h = step["history"]
    assert h["epoch"] == [1, 2, 3, 4] and len(h["loss"]) == 4 and len(h["seconds"]) == 4
    assert h["test_loss"][-1] == pytest.approx(_ce(out, X, y), rel=1e-9)
    assert step["fine_tune"]["loss"] == "ce" and step["fine_tune"]["epochs"] == 4
    # What is evaluated is what is saved.
    path = tmp_path / "ft.pykd"
    out.save(path)
    back = pykd.load_model(path)
    assert back.kinds == out.kinds
    np.testing.assert_array_equal(back.forward(X), out.forward(X))
    assert back.metadata["compression"][-1]["history"]["loss"] == h["loss"]


def test_the_trainer_sees_the_bits_of_the_saved_model(trained, tmp_path):
    """Each layer through its own kernel on the shared buffers gives the
    chain's logits bit for bit, before and after training steps."""
    m, X, y = trained
    mixed = pykd.Model([pykd.cluster(m, 3).layers[0], pykd.low_rank(m, rank=2).layers[1],
                        pykd.quantize_model(m).layers[2]], norm=m.norm)
    net = F._Net(mixed)
    np.testing.assert_array_equal(net.forward(X)[-1], mixed.forward(X))
    F._run(net, pykd.FineTune(X, y, epochs=1, lr=1e-2), y)
    path = tmp_path / "mixed.pykd"
    net.model.save(path)
    np.testing.assert_array_equal(net.forward(X)[-1], pykd.load_model(path).forward(X))


def test_kd_from_a_teacher_model_equals_kd_from_its_logits(trained):
    m, X, y = trained
    cb = pykd.cluster(m, 2)
    a = F.fine_tune(cb, pykd.FineTune(X, y, teacher=m, epochs=1, lr=1e-3))
    b = F.fine_tune(cb, pykd.FineTune(X, y, teacher_logits=pykd.soft_labels(m, X), epochs=1,
                                      lr=1e-3))
    np.testing.assert_array_equal(a.forward(X), b.forward(X))
    assert a.metadata["compression"][-1]["fine_tune"]["loss"] == "kd"
    assert a.metadata["compression"][-1]["fine_tune"]["teacher"] == "model"


def test_same_seed_same_bits(trained):
    m, X, y = trained
    runs = [pykd.low_rank(m, rank=3, fine_tune=pykd.FineTune(X, y, teacher=m, epochs=2, lr=1e-3,
                                                             seed=s)) for s in (3, 3, 4)]
    a, b, c = (r.forward(X) for r in runs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert runs[0].metadata["compression"][-1]["history"]["loss"] == \
        runs[1].metadata["compression"][-1]["history"]["loss"]


def test_the_input_model_is_not_modified(trained):
    m, X, y = trained
    cb = pykd.cluster(m, 2)
    before = cb.forward(X)
    params = m.params.copy()
    F.fine_tune(cb, pykd.FineTune(X, y, epochs=1, lr=1e-2))
    pykd.quantize_model(m, qat=True, fine_tune=pykd.FineTune(X, y, epochs=1, lr=1e-2))
    np.testing.assert_array_equal(cb.forward(X), before)
    np.testing.assert_array_equal(m.params, params)


def test_pruned_weights_stay_zero(trained):
    """Exact zeros of a dense layer (a pruned model) stay zero through
    fine-tuning and QAT."""
    m, X, y = trained
    p = pykd.prune(m, 0.6)
    zeros = [W == 0 for W, _ in p.layers]
    ft = pykd.FineTune(X, y, epochs=2, lr=1e-2)
    dense = F.fine_tune(p, ft)
    q = pykd.quantize_model(p, qat=True, fine_tune=ft)
    for z, ld, lq in zip(zeros, dense.layers, q.layers):
        assert z.any()
        assert (ld.W[z] == 0).all() and (ld.W[~z] != 0).mean() > 0.95
        assert (lq.q[z] == 0).all()


# ---------------------------------------------------------------- QAT bits

@pytest.mark.parametrize("static", [False, True])
def test_qat_model_equals_its_converted_int8_model_bit_for_bit(static, tmp_path):
    """The fake-quant forward of QAT (the trainer's logits, with the shadow
    weights) and the int8 model converted from the shadow weights give the
    same logits, with a 1200-input layer (past n_in = 1040, where a float
    product of integer values stops being exact), and after save/load."""
    rng = np.random.default_rng(8)
    X = rand(rng, 300, 40)
    y = rng.integers(0, 4, 300)
    m = pykd.MLP([40, 1200, 16, 4], seed=1)
    pykd.fit(m, X, y, epochs=1, progress=False)
    kw = {"activations": "static", "calibration": X[:64]} if static else {}
    m8 = pykd.quantize_model(m, **kw)
    shadow = [W.copy() for W, _ in m.layers]
    net = F._Net(m8, shadow)
    F._run(net, pykd.FineTune(X, y, epochs=2, lr=1e-3, batch_size=50), y)
    # The conversion of the trained shadow weights, built independently.
    layers = []
    for t, v, layer in zip(net.trainers, net.views, m8.layers):
        assert not np.array_equal(v["W"], shadow[len(layers)])          # it trained
        q, s = pykd.quantize_int8(np.ascontiguousarray(v["W"]), per_channel=True)
        layers.append(DenseInt8(q, s, v["b"].copy(), layer.activation, x_scale=layer.x_scale))
    converted = pykd.Model(layers, norm=m8.norm)
    fake = net.forward(X)[-1]
    np.testing.assert_array_equal(fake, converted.forward(X))
    np.testing.assert_array_equal(fake, net.model.forward(X))
    path = tmp_path / "qat.pykd"
    net.model.save(path)
    np.testing.assert_array_equal(fake, pykd.load_model(path).forward(X))
    # And the public path: quantize_model(qat=True) returns that int8 model.
    ft = pykd.FineTune(X, y, epochs=2, lr=1e-3, batch_size=50)
    out = pykd.quantize_model(m, qat=True, fine_tune=ft, **kw)
    np.testing.assert_array_equal(out.forward(X), fake)
    assert out.kinds == ["dense_int8"] * 3
    assert [layer.quant for layer in out.layers] == [layer.quant for layer in m8.layers]


# ---------------------------------------------------------------- calibration

def test_static_calibration_minmax_and_percentile(trained):
    m, X, _ = trained
    h = m.normalize(X[:200]).astype(F64)
    mm = pykd.quantize_model(m, "static", X[:200])
    pc = pykd.quantize_model(m, "static", X[:200], method="percentile", percentile=90)
    assert mm.layers[0].x_scale == np.float32(np.abs(h).max() / 127) or \
        mm.layers[0].x_scale == pytest.approx(np.abs(h).max() / 127, rel=1e-6)
    assert pc.layers[0].x_scale == pytest.approx(np.percentile(np.abs(h), 90) / 127, rel=1e-6)
    h1 = np.maximum(h @ m.layers[0][0] + m.layers[0][1], 0)
    assert pc.layers[1].x_scale == pytest.approx(np.percentile(np.abs(h1), 90) / 127, rel=1e-4)
    default = pykd.quantize_model(m, "static", X[:200], method="percentile")
    assert default.layers[0].x_scale == pytest.approx(
        np.percentile(np.abs(h), 99.99) / 127, rel=1e-6)
    assert default.metadata["compression"][-1]["calibration"] == {
        "method": "percentile", "rows": 200, "percentile": 99.99}


# ---------------------------------------------------------------- bad arguments

def test_bad_arguments_are_clear_errors(trained):
    m, X, y = trained
    ft = pykd.FineTune(X, y, epochs=1)
    with pytest.raises(ValueError, match="fine_tune needs qat=True"):
        pykd.quantize_model(m, fine_tune=ft)
    with pytest.raises(ValueError, match="qat=True needs fine_tune"):
        pykd.quantize_model(m, qat=True)
    with pytest.raises(TypeError, match="qat must be True or False"):
        pykd.quantize_model(m, qat="yes", fine_tune=ft)
    with pytest.raises(TypeError, match="fine_tune must be a pykd.FineTune"):
        pykd.quantize_model(m, qat=True, fine_tune={"epochs": 1})
    with pytest.raises(TypeError, match="low_rank: fine_tune must be"):
        pykd.low_rank(m, rank=2, fine_tune=3)
    with pytest.raises(TypeError, match="cluster: fine_tune must be"):
        pykd.cluster(m, 2, fine_tune="ft")
    with pytest.raises(ValueError, match="method must be one of"):
        pykd.quantize_model(m, "static", X, method="max")
    with pytest.raises(ValueError, match="percentile is only used with method='percentile'"):
        pykd.quantize_model(m, "static", X, percentile=99)
    with pytest.raises(ValueError, match="method is only used with activations='static'"):
        pykd.quantize_model(m, method="percentile")
    for bad in (0, 101, float("nan")):
        with pytest.raises(ValueError, match="percentile"):
            pykd.quantize_model(m, "static", X, method="percentile", percentile=bad)
    with pytest.raises(ValueError, match="FineTune.X has 5 features but the model takes 12"):
        pykd.low_rank(m, rank=2, fine_tune=pykd.FineTune(np.ascontiguousarray(X[:, :5]), y))
    with pytest.raises(ValueError, match=r"FineTune.y must be in \[0, 3\)"):
        pykd.cluster(m, 2, fine_tune=pykd.FineTune(X, y + 5))
    with pytest.raises(ValueError, match="teacher gives logits of shape"):
        pykd.cluster(m, 2, fine_tune=pykd.FineTune(X, y, teacher_logits=np.zeros((600, 7),
                                                                              np.float32)))
    with pytest.raises(ValueError, match="FineTune.X_val must have shape"):
        pykd.cluster(m, 2, fine_tune=pykd.FineTune(X, y, X_val=X[:, :3], y_val=y))
    with pytest.raises(TypeError, match="fine_tune must be a pykd.FineTune"):
        F.fine_tune(m, None)
    reg = pykd.Model([Dense(rand(np.random.default_rng(0), 12, 3), np.zeros(3, np.float32))],
                     out_norm=(np.float32(1), np.float32(2)), metadata={"task": "regression"})
    with pytest.raises(TypeError, match="FineTune.y holds integers .* regression loss"):
        F.fine_tune(reg, ft)
    with pytest.raises(ValueError, match="FineTune.loss is for regression models"):
        F.fine_tune(m, pykd.FineTune(X, y, loss="huber"))


def test_a_diverging_run_is_a_clear_error(trained):
    m, X, y = trained
    from pykd.train import NonFiniteLossError
    with pytest.raises(NonFiniteLossError, match="lower learning rate"):
        pykd.low_rank(m, rank=3, fine_tune=pykd.FineTune(X, y, epochs=3, lr=1e30))


def test_numpy_backend_model_fine_tunes_with_its_twins(trained):
    """A model with backend='numpy' runs its layers' NumPy twins in the
    trainer, and gets the same results as the Fortran kernels to rounding."""
    m, X, y = trained
    cb = pykd.cluster(m, 2)
    cbn = pykd.Model(cb.layers, norm=cb.norm, backend="numpy")
    ft = pykd.FineTune(X, y, epochs=1, lr=1e-3)
    a, b = F.fine_tune(cb, ft), F.fine_tune(cbn, ft)
    assert b.backend == "numpy"
    np.testing.assert_allclose(a.forward(X), b.forward(X), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sparse_csr", "sparse_codebook"])
def test_fine_tuned_planes_follow_the_values(name, tmp_path):
    """The planes (the batch-1 kernel's derived copy of W) follow every
    step's values: one sample of the fine-tuned model gives the bits of the
    model saved and loaded (planes rebuilt from the file), and the trainer's
    last batch of 5 ran on the current planes."""
    rng = np.random.default_rng(5)
    X, y = _data(rng)
    m = pykd.MLP([12, 200, 3], seed=0)
    pykd.fit(m, X, y, epochs=1, progress=False)
    ft = pykd.FineTune(X[:69], y[:69], epochs=2, lr=3e-3, batch_size=32)   # last batch: 5
    out = CONVERSIONS[name](m, ft)
    assert out.layers[0]._n_planes > 0
    path = tmp_path / "ft.pykd"
    out.save(path)
    back = pykd.load_model(path)
    for a in ("_pval", "_pidx", "_pcount"):
        assert getattr(out.layers[0], a).tobytes() == getattr(back.layers[0], a).tobytes(), a
    one = np.concatenate([out.forward(X[i:i + 1]) for i in range(5)])
    np.testing.assert_array_equal(one, np.concatenate([back.forward(X[i:i + 1]) for i in range(5)]))
