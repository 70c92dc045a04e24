"""Every compressed kind for regression models (issue 14): the conversions
keep the normalisations and the task, fine-tuning trains on float targets
and teacher outputs with MSE/Huber (gradients against float64 finite
differences), and pruning fine-tunes through fit."""
import numpy as np
import pytest
from test_finetune import F64, make_layer, num_grad, rand

import pykd
from pykd.compress import finetune as F
from pykd.layers import Codebook, SparseCodebook, SparseCSR

F32 = np.float32


def _data(rng, n=600):
    X = (rng.standard_normal((n, 6)) * [1, 5, 0.2, 1, 2, 1] + [0, 20, 1, -1, 0, 3]).astype(F32)
    z = (X - [0, 20, 1, -1, 0, 3]) / [1, 5, 0.2, 1, 2, 1]
    Y = np.stack([np.tanh(z[:, 0] + z[:, 1]) * 50 + 100, z[:, 2] * z[:, 3], 0.1 * z[:, 4]], 1)
    return X, Y


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(11)
    X, Y = _data(rng)
    m = pykd.MLP([6, 24, 16, 3], seed=0)
    pykd.fit(m, X, Y, cfg=pykd.TrainConfig(loss="mse", lr=3e-3), epochs=4, batch_size=32,
             progress=False)
    return m, X, Y


def _nmse(model, X, Y):
    """MSE in normalised target units (the fine-tuning loss), float64."""
    r = (model.forward(X).astype(F64) - Y) / model.out_norm[1].astype(F64)
    return float((r * r).mean())


def _tuned(model, ft):
    return model if ft is None else F.fine_tune(model, ft)


CONVERSIONS = {     # (model, FineTune or None, calibration rows) -> converted model
    "int8 dynamic": lambda m, ft, X: pykd.quantize_model(m, qat=ft is not None, fine_tune=ft),
    "int8 static": lambda m, ft, X: pykd.quantize_model(m, "static", X[:100],
                                                        qat=ft is not None, fine_tune=ft),
    "low_rank": lambda m, ft, X: pykd.low_rank(m, rank=3, fine_tune=ft),
    "codebook": lambda m, ft, X: pykd.cluster(m, 2, fine_tune=ft),
    "sparse_csr": lambda m, ft, X: _tuned(pykd.sparsify(pykd.prune(m, 0.7, scope="layer")), ft),
    "sparse_codebook": lambda m, ft, X: pykd.cluster(
        pykd.sparsify(pykd.prune(m, 0.7, scope="layer")), 2, fine_tune=ft),
}


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_conversions_keep_norms_and_task_and_fine_tune_on_targets(name, trained, tmp_path):
    m, X, Y = trained
    before = CONVERSIONS[name](m, None, X)
    assert before.task == "regression"
    for a, b in zip(before.norm + before.out_norm, m.norm + m.out_norm):
        assert np.array_equal(a, b)
    assert isinstance(before.predict(X), np.ndarray) and before.predict(X).shape == (600, 3)
    ft = pykd.FineTune(X, Y, epochs=3, lr=3e-3, batch_size=32, X_val=X, y_val=Y)
    out = CONVERSIONS[name](m, ft, X)
    assert out.kinds == before.kinds and out.task == "regression"
    assert _nmse(out, X, Y) < _nmse(before, X, Y) - 1e-4
    for lb, lo in zip(before.layers, out.layers):
        if isinstance(lb, Codebook):
            np.testing.assert_array_equal(lb.packed, lo.packed)
        if isinstance(lb, (SparseCSR, SparseCodebook)):
            np.testing.assert_array_equal(lb.indices, lo.indices)
    step = out.metadata["compression"][-1]
    h = step["history"]
    assert step["fine_tune"]["loss"] == "mse" and h["train_accuracy"] == [None] * 3
    assert h["test_loss"][-1] == pytest.approx(_nmse(out, X, Y), rel=1e-9)
    assert h["test_rmse"][-1] == pytest.approx(pykd.evaluate(out, X, Y)["rmse"], rel=1e-12)
    path = tmp_path / "reg.pykd"
    out.save(path)
    back = pykd.load_model(path)
    assert back.task == "regression"
    np.testing.assert_array_equal(back.predict(X), out.predict(X))


def test_fine_tuning_distils_teacher_outputs_with_huber(trained):
    m, X, Y = trained
    teacher = m.copy()
    base = pykd.low_rank(m, rank=2)
    ft_model = pykd.FineTune(X, Y, teacher=teacher, loss="huber", huber_delta=0.5, alpha=0.3,
                             epochs=2, lr=3e-3)
    ft_out = pykd.FineTune(X, Y, teacher_outputs=teacher.forward(X), loss="huber",
                           huber_delta=0.5, alpha=0.3, epochs=2, lr=3e-3)
    a, b = pykd.low_rank(m, rank=2, fine_tune=ft_model), pykd.low_rank(m, rank=2, fine_tune=ft_out)
    np.testing.assert_array_equal(a.forward(X), b.forward(X))
    rec = a.metadata["compression"][-1]["fine_tune"]
    assert rec["loss"] == "huber_kd" and rec["huber_delta"] == 0.5 and rec["teacher"] == "model"
    t = teacher.forward(X).astype(F64)
    assert np.abs(a.forward(X) - t).mean() < np.abs(base.forward(X) - t).mean()
    with pytest.raises(ValueError, match="teacher_logits given for a regression model"):
        F.fine_tune(base, pykd.FineTune(X, Y, teacher_logits=teacher.forward(X)))
    with pytest.raises(ValueError, match="huber_delta=0.5 has no effect without loss='huber'"):
        pykd.FineTune(X, Y, huber_delta=0.5)
    with pytest.raises(ValueError, match="at most one of teacher, teacher_logits and "
                                         "teacher_outputs"):
        pykd.FineTune(X, Y, teacher=teacher, teacher_outputs=t)


def test_prune_fine_tunes_a_regression_model_through_fit(trained):
    m, X, Y = trained
    one = pykd.prune(m, 0.8)
    ft = pykd.FineTune(X, Y, teacher=m, epochs=2, lr=1e-3, batch_size=32, X_val=X, y_val=Y)
    for kw in ({"schedule": "oneshot"}, {"schedule": "gradual"}, {"structured": True}):
        out = pykd.prune(m, 0.8 if not kw.get("structured") else 0.5, fine_tune=ft, **kw)
        assert isinstance(out, pykd.MLP) and out.task == "regression"
        assert np.array_equal(out.out_norm[1], m.out_norm[1])
        step = out.metadata["compression"][-1]
        assert step["fine_tune"]["loss"] == "mse_kd" and "test_rmse" in step["history"]
        if not kw.get("structured"):
            assert step["achieved_sparsity"] == pytest.approx(0.8, abs=0.01)
    tuned = pykd.prune(m, 0.8, fine_tune=ft)
    assert _nmse(tuned, X, Y) < _nmse(one, X, Y)


@pytest.mark.parametrize("loss", ["mse_kd", "huber_kd"])
def test_regression_network_gradient_matches_float64(loss):
    """The trainer's backward pass with a regression loss, per-feature input
    normalisation and several kinds against float64 finite differences."""
    rng = np.random.default_rng(8)
    layers = [make_layer("dense", rng, 6, 5, "silu"), make_layer("codebook", rng, 5, 5, "sigmoid"),
              make_layer("sparse_csr", rng, 5, 3, "identity")]
    mean, std = rand(rng, 6), (1 + rng.random(6)).astype(F32)
    model = pykd.Model(layers, norm=(mean, std), out_norm=(rand(rng, 3), np.ones(3, F32) * 2),
                       metadata={"task": "regression"})
    net = F._Net(model)
    X = rand(rng, 8, 6)
    Yn, Tn = rand(rng, 8, 3), rand(rng, 8, 3)
    ft = pykd.FineTune(X, Yn, teacher_outputs=Tn, alpha=0.3,
                       **({"loss": "huber", "huber_delta": 0.6} if loss == "huber_kd" else {}))
    outs = net.forward(X)
    _, dlog = F._batch_loss(ft, outs[-1], Yn, Tn, True)
    net.backward(X, outs, dlog)
    P64 = net.P.astype(F64)
    views, pos = [], 0
    for t in net.trainers:
        v = {}
        for name, a in t.params.items():
            v[name] = P64[pos:pos + a.size].reshape(a.shape)
            pos += a.size
        views.append(v)

    def part(s, ref):
        r = s - ref.astype(F64)
        if loss == "huber_kd":
            return np.where(np.abs(r) <= 0.6, 0.5 * r * r, 0.6 * (np.abs(r) - 0.3)).mean()
        return (r * r).mean()

    def f():
        h = (X.astype(F64) - mean) / std
        for t, v, layer in zip(net.trainers, views, layers):
            t.use(v)
            h = F.activate(layer.activation, t.pre(h))
        return 0.3 * part(h, Yn) + 0.7 * part(h, Tn)

    want = num_grad(f, P64)
    np.testing.assert_allclose(net.G, want, rtol=2e-3, atol=2e-5)
