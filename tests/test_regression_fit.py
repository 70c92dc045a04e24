"""Regression in the Python API (issue 14): fit with mse/huber and their
distilled forms, per-feature input and per-output target normalisation
stored in the model, predict/evaluate in physical units, save/load and
resume."""
import os
import signal

import numpy as np
import pytest

import pykd
from pykd import MLP, TrainConfig, _step, evaluate, fit, load_model
from pykd.train import (
    CheckpointError,
    TrainingInterrupted,
    hint_targets_from,
    load_checkpoint,
)

F32 = np.float32
SIZES = [5, 16, 3]


def make_data(n=400, seed=0):
    """Three targets of five features on very different scales (so the
    normalisations matter), one feature constant."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 5)) * [1, 10, 0.1, 3, 0] + [0, 50, -2, 1, 7]
    z = (X - [0, 50, -2, 1, 7]) / [1, 10, 0.1, 3, 1]
    Y = np.stack([np.sin(z[:, 0]) + z[:, 1], 100 * z[:, 2] * z[:, 3] - 40, 0.01 * z[:, 0]], 1)
    Y += 0.01 * rng.standard_normal(Y.shape) * [1, 100, 0.01]
    return X.astype(F32), Y


@pytest.fixture(scope="module")
def data():
    return make_data()


def _fit(X, Y, *, cfg=None, epochs=2, backend="fortran", sizes=SIZES, acts=None, **kw):
    m = MLP(sizes, acts, seed=0)
    h = fit(m, X, Y, cfg=cfg or TrainConfig(loss="mse"), epochs=epochs, batch_size=32,
            progress=False, backend=backend, **kw)
    return m, h


# ------------------------------------------------------------ the step's inputs

def manual_run(X, Y, cfg, epochs, batch_size, T=None, backend="numpy"):
    """fit's loop by hand: float64 per-column statistics, normalised float32
    copies, the seeded permutation, one train_step per batch."""
    def stats(A):
        A = A.astype(np.float64)
        mean, std = A.mean(0), A.std(0)
        std[A.max(0) == A.min(0)] = 1
        return mean.astype(F32), std.astype(F32)
    (mx, sx), (my, sy) = stats(X), stats(Y)
    Xn = ((X - mx) / sx).astype(F32)
    Yn = ((Y - my).astype(F32) / sy).astype(F32)
    Tn = None if T is None else ((T - my).astype(F32) / sy).astype(F32)
    m = MLP(SIZES, seed=0)
    P = m.params
    G, S1, S2 = np.zeros_like(P), np.zeros_like(P), np.zeros_like(P)
    ws = _step.Workspace(SIZES, batch_size)
    rng = np.random.default_rng(cfg.seed)
    step = 0
    for _ in range(epochs):
        perm = rng.permutation(X.shape[0])
        for s in range(0, X.shape[0], batch_size):
            idx = perm[s:s + batch_size]
            step += 1
            _step.train_step(SIZES, m.activations, P, G, S1, S2, Xn[idx], Yn[idx], cfg, step,
                             ws, teacher_logits=None if Tn is None else Tn[idx],
                             backend=backend)
    return P, (mx, sx), (my, sy)


@pytest.mark.parametrize("loss", ["mse", "huber", "mse_kd", "huber_kd"])
def test_fit_is_the_step_on_normalised_data(data, loss):
    """fit(backend='numpy') is bit for bit the loop above; the Fortran
    backend agrees with it to rounding (as for classification)."""
    X, Y = data
    kw = {"huber_delta": 0.5} if "huber" in loss else {}
    if loss.endswith("_kd"):
        kw["alpha"] = 0.3
    cfg = TrainConfig(loss=loss, lr=3e-3, **kw)
    T = Y + np.random.default_rng(1).standard_normal(Y.shape) * Y.std(0) if "kd" in loss else None
    extra = {} if T is None else {"teacher_outputs": T}
    P, (mx, sx), (my, sy) = manual_run(X, Y, cfg, 2, 32, T)
    a, ha = _fit(X, Y, cfg=cfg, backend="numpy", **extra)
    assert np.array_equal(a.params, P)
    assert np.array_equal(a.norm[0], mx) and np.array_equal(a.norm[1], sx)
    assert np.array_equal(a.out_norm[0], my) and np.array_equal(a.out_norm[1], sy)
    assert a.norm[1][4] == 1                                   # the constant feature
    b, hb = _fit(X, Y, cfg=cfg, backend="fortran", **extra)
    np.testing.assert_allclose(b.params, a.params, rtol=1e-3, atol=2e-5)
    assert hb["loss"][0] == pytest.approx(ha["loss"][0], rel=1e-4)
    assert hb["train_accuracy"] == [None, None] and hb["test_accuracy"] == [None, None]


def test_hint_term_with_a_regression_loss(data):
    """The hint term adds to a regression loss as to CE: both backends
    agree, and the hint changes the run."""
    X, Y = data
    teacher = MLP([5, 24, 3], seed=4)
    hints = hint_targets_from(teacher, X, 1)
    cfg = TrainConfig(loss="mse_kd", alpha=0.5, hint_layer=1, hint_weight=0.5)
    T = Y * 0.9
    a, ha = _fit(X, Y, cfg=cfg, teacher_outputs=T, hint_targets=hints, backend="numpy")
    b, hb = _fit(X, Y, cfg=cfg, teacher_outputs=T, hint_targets=hints, backend="fortran")
    np.testing.assert_allclose(b.params, a.params, rtol=1e-3, atol=2e-5)
    assert hb["loss"][-1] == pytest.approx(ha["loss"][-1], rel=1e-4)
    c, hc = _fit(X, Y, cfg=TrainConfig(loss="mse_kd", alpha=0.5), teacher_outputs=T)
    assert hc["loss"][-1] < hb["loss"][-1]          # the hint term adds to the loss
    assert a.parameters == c.parameters             # the regressor is not the model's


def test_float32_and_float64_and_1d_targets(data):
    X, Y = data
    y1 = Y[:, 0].copy()
    cfg = TrainConfig(loss="mse")
    a, _ = _fit(X, y1, sizes=[5, 8, 1], cfg=cfg)
    b, _ = _fit(X, y1[:, None], sizes=[5, 8, 1], cfg=cfg)
    assert np.array_equal(a.params, b.params)
    c, _ = _fit(X, Y.astype(F32), cfg=cfg)
    d, _ = _fit(X, Y.astype(F32).astype(np.float64), cfg=cfg)
    assert np.array_equal(c.params, d.params)


def test_fit_learns_sin():
    rng = np.random.default_rng(0)
    X = rng.uniform(-3, 3, (1000, 1)).astype(F32)
    Xt = rng.uniform(-3, 3, (300, 1)).astype(F32)
    m = MLP([1, 32, 32, 1], ["tanh", "tanh", "identity"], seed=0)
    h = fit(m, X, np.sin(X[:, 0]), cfg=TrainConfig(loss="mse", lr=1e-2), epochs=15,
            batch_size=32, X_val=Xt, y_val=np.sin(Xt[:, 0]), progress=False)
    assert h["test_rmse"][-1] < 0.1 and h["test_r2"][-1] > 0.95
    met = evaluate(m, Xt, np.sin(Xt[:, 0].astype(np.float64)))
    assert met["task"] == "regression" and met["rmse"] == pytest.approx(h["test_rmse"][-1])
    pred = m.predict(Xt)
    assert pred.shape == (300, 1) and pred.dtype == F32
    assert np.sqrt(np.mean((pred[:, 0] - np.sin(Xt[:, 0].astype(np.float64)))**2)) < 0.1


def test_history_and_validation_metrics(data, caplog):
    X, Y = data
    Xv, Yv = make_data(100, seed=5)
    m = MLP(SIZES, seed=0)
    cfg = TrainConfig(loss="huber", huber_delta=0.7)
    with caplog.at_level("INFO", logger="pykd.train"):
        h = fit(m, X, Y, cfg=cfg, epochs=2, batch_size=32, X_val=Xv, y_val=Yv, progress=True)
    line = caplog.records[-1].getMessage()
    assert "test rmse" in line and "test r2" in line and "accuracy" not in line
    assert set(h) >= {"test_rmse", "test_r2", "test_loss"}
    out = m.forward(Xv).astype(np.float64)
    rmse = np.sqrt(((out - Yv)**2).mean(0)).mean()
    assert h["test_rmse"][-1] == pytest.approx(rmse, rel=1e-12)
    r = (out - Yv) / m.out_norm[1].astype(np.float64)
    hub = np.where(np.abs(r) <= 0.7, 0.5 * r * r, 0.7 * (np.abs(r) - 0.35)).mean()
    assert h["test_loss"][-1] == pytest.approx(hub, rel=1e-12)
    assert pykd.regression_metrics(Yv, out)["r2"] == pytest.approx(h["test_r2"][-1])


# ------------------------------------------------------------ norms in the model

def test_norms_are_applied_stored_and_round_trip(tmp_path, data):
    X, Y = data
    m, _ = _fit(X, Y, acts=["tanh", "identity"])
    assert m.task == "regression" and m.metadata["task"] == "regression"
    (mx, sx), (my, sy) = m.norm, m.out_norm
    # forward in physical units: an independent float64 reference
    h = ((X.astype(np.float64) - mx) / sx)
    (W1, b1), (W2, b2) = m.layers
    ref = (np.tanh(h @ W1 + b1) @ W2 + b2) * sy + my
    out = m.forward(X)
    for j in range(3):                            # 1e-5 of each output's largest magnitude
        np.testing.assert_allclose(out[:, j], ref[:, j], rtol=0, atol=1e-5 * np.abs(ref[:, j]).max())
    assert np.array_equal(m.predict(X), out)
    assert np.array_equal(m.forward(X, backend="numpy"), m.forward(X, backend="numpy"))
    np.testing.assert_allclose(m.forward(X, backend="numpy"), out, rtol=1e-5, atol=1e-4)
    path = tmp_path / "reg.pykd"
    m.save(path)
    back = load_model(path)
    assert isinstance(back, MLP) and back.task == "regression"
    for a, b in zip(back.norm + back.out_norm, m.norm + m.out_norm):
        assert a.dtype == F32 and np.array_equal(a, b)
    assert np.array_equal(back.forward(X), out)
    model = m.to_model()
    assert model.task == "regression" and np.array_equal(model.predict(X), out)
    assert np.shares_memory(model.f32, m.params)
    mlp = model.to_mlp()
    assert np.array_equal(mlp.out_norm[0], my) and np.array_equal(mlp.predict(X), out)
    assert m.copy().task == "regression" and np.array_equal(m.copy().forward(X), out)
    # A classifier's file has no task: it loads as classification.
    c = MLP([5, 3], seed=0, norm=(0.0, 1.0))
    c.save(tmp_path / "c.pykd")
    assert load_model(tmp_path / "c.pykd").task == "classification"
    assert "task" not in load_model(tmp_path / "c.pykd").metadata


def test_mlp_norm_validation_and_no_aliasing():
    m = MLP([3, 2], seed=0)
    mean = np.array([1, 2, 3], F32)
    m.norm = (mean, np.ones(3, F32))
    mean[0] = 99                                  # the model keeps its own copy
    assert m.norm[0][0] == 1 and not m.norm[0].flags.writeable
    with pytest.raises(ValueError, match=r"norm mean must be a scalar or have shape \(3,\)"):
        m.norm = (np.zeros(2, F32), np.ones(2, F32))
    with pytest.raises(TypeError, match="norm mean must be float32"):
        m.norm = (np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="std > 0"):
        m.out_norm = (np.zeros(2, F32), np.array([1, 0], F32))
    with pytest.raises(ValueError, match="task must be one of"):
        m.task = "ranking"
    x = np.ones((2, 3), F32)
    m.out_norm = (F32(10), F32(2))
    y1 = m.forward(x)
    m.out_norm = None                             # the cached network follows the change
    np.testing.assert_allclose(y1, m.forward(x) * 2 + 10, rtol=1e-6)


def test_norm_argument(data):
    X, Y = data
    for mode, kind in (("auto", "per_feature"), (None, "per_feature"),
                       ("scalar", "scalar"), ("per_feature", "per_feature")):
        m, _ = _fit(X, Y, epochs=1, norm=mode)
        assert (np.ndim(m.norm[0]) == 1) == (kind == "per_feature"), mode
    m, _ = _fit(X, Y, epochs=1, norm="none")
    assert m.norm is None and m.out_norm is not None
    m, _ = _fit(X, Y, epochs=1, norm="scalar")
    assert m.norm[0] == pytest.approx(X.astype(np.float64).mean(), rel=1e-6)
    # classification keeps its scalar default
    yc = (Y[:, 0] > 0).astype(np.int64)
    c = MLP([5, 8, 2], seed=0)
    fit(c, X, yc, epochs=1, progress=False)
    assert np.ndim(c.norm[0]) == 0 and c.out_norm is None and c.task == "classification"
    c2 = MLP([5, 8, 2], seed=0)
    fit(c2, X, yc, epochs=1, progress=False, norm="per_feature")
    assert c2.norm[0].shape == (5,)
    with pytest.raises(ValueError, match="norm must be None or one of"):
        _fit(X, Y, epochs=1, norm="minmax")
    with pytest.raises(ValueError, match="already has a per_feature input normalisation"):
        fit(c2, X, yc, epochs=1, progress=False, norm="scalar")
    # a model's own out_norm is kept
    m = MLP(SIZES, seed=0, out_norm=(F32(0), F32(1)))
    fit(m, X, Y, cfg=TrainConfig(loss="mse"), epochs=1, progress=False)
    assert m.out_norm == (0, 1)


# ------------------------------------------------------------ resume

@pytest.mark.parametrize("interrupt_at", [5, 13])       # 13 batches per epoch
def test_ctrl_c_then_resume_is_identical(tmp_path, data, interrupt_at):
    X, Y = data
    T = Y * 1.1
    cfg = TrainConfig(loss="huber_kd", alpha=0.4, huber_delta=0.5, dropout=0.1)
    kw = {"cfg": cfg, "epochs": 2, "batch_size": 32, "progress": False, "teacher_outputs": T,
          "X_val": X[:50], "y_val": Y[:50]}
    straight = MLP(SIZES, seed=0)
    h1 = fit(straight, X, Y, **kw)
    ckpt = tmp_path / "r.npz"

    def ctrl_c(info):
        if info["step"] == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        fit(MLP(SIZES, seed=0), X, Y, checkpoint=ckpt, callback=ctrl_c, **kw)
    _, meta = load_checkpoint(ckpt)
    assert len(meta["norm"][0]) == 5 and len(meta["out_norm"][1]) == 3
    resumed = MLP(SIZES, seed=0)
    h2 = fit(resumed, X, Y, checkpoint=ckpt, resume=True, **kw)
    assert np.array_equal(straight.params, resumed.params)
    for k in ("loss", "test_loss", "test_rmse", "test_r2", "train_accuracy", "lr"):
        assert h1[k] == h2[k], k
    for a, b in zip(straight.norm + straight.out_norm, resumed.norm + resumed.out_norm):
        assert np.array_equal(a, b)
    # a checkpoint whose per-feature norm was cut short is refused by name
    arrays, meta = load_checkpoint(ckpt)
    bad = dict(meta, norm=[meta["norm"][0][:4], meta["norm"][1][:4]])
    from pykd.train import _save_checkpoint
    _save_checkpoint(tmp_path / "bad.npz", arrays["params"], arrays["state1"], arrays["state2"],
                     bad)
    with pytest.raises(CheckpointError, match=r"norm must be \[mean, std\].* of 5 values"):
        fit(MLP(SIZES, seed=0), X, Y, checkpoint=tmp_path / "bad.npz", resume=True, **kw)
    # other targets: another out_norm, refused by name
    with pytest.raises(CheckpointError, match="out_norm"):
        fit(MLP(SIZES, seed=0), X, Y * 2, checkpoint=ckpt, resume=True,
            **{**kw, "teacher_outputs": T * 2})


# ------------------------------------------------------------ bad inputs

def test_bad_inputs_have_clear_messages(data):
    X, Y = data
    m = MLP(SIZES, seed=0)
    mse = TrainConfig(loss="mse")
    with pytest.raises(TypeError, match=r"y holds integers .* regression loss.*loss='ce'"):
        fit(m, X, Y.astype(np.int64), cfg=mse, progress=False)
    with pytest.raises(TypeError, match=r"y holds floats .*loss='mse'"):
        fit(m, X, Y[:, 0], progress=False)
    with pytest.raises(ValueError, match=r"y has 2 columns but the model has 3 outputs"):
        fit(m, X, Y[:, :2], cfg=mse, progress=False)
    with pytest.raises(ValueError, match=r"y is 1-D but the model has 3 outputs"):
        fit(m, X, Y[:, 0], cfg=mse, progress=False)
    with pytest.raises(ValueError, match=r"y has 10 rows but X has 400"):
        fit(m, X, Y[:10], cfg=mse, progress=False)
    with pytest.raises(TypeError, match=r"y must be a float32 or float64"):
        fit(m, X, Y.astype(np.float16), cfg=mse, progress=False)
    bad = Y.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match=r"y contains NaN or inf \(rows 7\)"):
        fit(m, X, bad, cfg=mse, progress=False)
    with pytest.raises(ValueError, match="needs teacher_outputs"):
        fit(m, X, Y, cfg=TrainConfig(loss="mse_kd"), progress=False)
    with pytest.raises(ValueError, match="teacher_outputs given but cfg.loss is 'mse'"):
        fit(m, X, Y, cfg=mse, teacher_outputs=Y, progress=False)
    with pytest.raises(ValueError, match="teacher_logits given with the regression loss.*"
                                         "teacher_outputs"):
        fit(m, X, Y, cfg=TrainConfig(loss="mse_kd"), teacher_logits=Y.astype(F32),
            progress=False)
    with pytest.raises(ValueError, match="teacher_outputs has 2 columns"):
        fit(m, X, Y, cfg=TrainConfig(loss="mse_kd"), teacher_outputs=Y[:, :2], progress=False)
    with pytest.raises(ValueError, match="teacher_outputs is for the regression losses"):
        fit(MLP([5, 2]), X, (Y[:, 0] > 0).astype(np.int64), teacher_outputs=Y[:, :2],
            progress=False)
    with pytest.raises(ValueError, match=r"y_val has 2 columns"):
        fit(m, X, Y, cfg=mse, X_val=X[:5], y_val=Y[:5, :2], progress=False)
    assert m.norm is None and m.out_norm is None          # nothing was set by failed calls
    r, _ = _fit(X, Y, epochs=1)
    with pytest.raises(ValueError, match="the model's task is regression .* cfg.loss is 'ce'"):
        fit(r, X, (Y[:, 0] > 0).astype(np.int64), progress=False)


def test_early_stopping_on_regression_metrics(data):
    X, Y = data
    assert pykd.EarlyStopping("test_r2").mode == "max"
    assert pykd.EarlyStopping("test_rmse").mode == "min"
    stop = pykd.EarlyStopping("test_rmse", patience=1, restore_best=False)
    m = MLP(SIZES, seed=0)
    h = fit(m, X, Y, cfg=TrainConfig(loss="mse", lr=0.3), epochs=6, batch_size=32,
            X_val=X[:100], y_val=Y[:100], progress=False, on_epoch=stop)
    rm = h["test_rmse"]
    assert all(rm[i] < rm[i - 1] for i in range(1, len(rm) - 1))     # it stopped at the rise
    assert len(rm) == 6 or rm[-1] >= rm[-2]


def test_targets_are_views_and_threads_share_a_regression_model(data):
    from concurrent.futures import ThreadPoolExecutor

    from pykd.train import _as_targets
    X, Y = data
    y1 = Y[:, 1]                                   # strided, 1-D
    v = _as_targets("y", y1, 400, 1, "mse")
    assert v.shape == (400, 1) and np.shares_memory(v, Y)
    assert _as_targets("y", Y, 400, 3, "mse") is Y
    m, _ = _fit(X, Y, epochs=1)
    want = m.forward(X[:64])
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda _: m.predict(X[:64]), range(16)))
    assert all(np.array_equal(o, want) for o in outs)


def test_a_file_with_an_unknown_task_is_refused(tmp_path):
    from pykd.modelfile import ModelFormatError, write_model
    W, b = np.ones((2, 1), F32), np.zeros(1, F32)
    write_model(tmp_path / "t.pykd", [{"kind": "dense", "W": W, "b": b, "activation": "identity"}],
                metadata={"task": "ranking"})
    with pytest.raises(ModelFormatError, match=r"t.pykd: metadata 'task' must be one of"):
        load_model(tmp_path / "t.pykd")
