"""The training driver: MLP, fit (checkpoints, resume, Ctrl-C, NaN), soft
labels, evaluation and the ``pykd`` command line. Small synthetic data only."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pykd
from pykd import _step
from pykd.models import MLP, load_model
from pykd.train import (NonFiniteLossError, TrainConfig, TrainingInterrupted, evaluate, fit,
                        hint_targets_from, load_checkpoint, soft_labels)

pytestmark = pytest.mark.fortran


def make_data(n_train=600, n_test=300, n_features=30, n_classes=4, seed=0, noise=0.5):
    """Gaussian blobs around random class centres, as float32 in roughly [0, 1]."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.2, 0.8, (n_classes, n_features))
    def split(n):
        y = rng.integers(0, n_classes, n)
        X = centres[y] + noise * 0.3 * rng.standard_normal((n, n_features))
        return X.astype(np.float32), y.astype(np.int64)
    X, y = split(n_train)
    Xt, yt = split(n_test)
    return X, y, Xt, yt


@pytest.fixture(scope="module")
def data():
    return make_data()


def _fit(X, y, sizes=(30, 16, 4), *, seed=0, epochs=2, **kw):
    model = MLP(list(sizes), seed=seed)
    cfg = kw.pop("cfg", TrainConfig(seed=seed))
    hist = fit(model, X, y, cfg=cfg, epochs=epochs, batch_size=kw.pop("batch_size", 32),
               progress=False, seed=seed, **kw)
    return model, hist


# --------------------------------------------------------------------- MLP

def test_mlp_layers_are_views_of_one_buffer():
    m = MLP([5, 4, 3])
    assert m.activations == ["relu", "identity"]
    assert m.parameters == 5 * 4 + 4 + 4 * 3 + 3 == m.params.size
    assert m.nbytes == 4 * m.parameters
    assert m.params.dtype == np.float32 and m.params.flags.c_contiguous
    for (W, b), (ws, bs, shape) in zip(m.layers, _step.layer_slices(m.sizes)):
        assert W.shape == shape and np.shares_memory(W, m.params) and np.shares_memory(b, m.params)
        W[0, 0] = 7.0
        b[-1] = -3.0
        assert m.params[ws.start] == 7.0 and m.params[bs.stop - 1] == -3.0
    m.params[:] = 1.5
    assert all((W == 1.5).all() and (b == 1.5).all() for W, b in m.layers)


def test_init_like_pytorch_linear():
    m = MLP([400, 100, 10], seed=3)
    for W, b in m.layers:
        bound = 1 / math.sqrt(W.shape[0])
        for a in (W, b):
            assert np.abs(a).max() <= bound
        assert np.abs(W).max() > 0.95 * bound and W.min() < 0 < W.max()
    assert np.array_equal(MLP([400, 100, 10], seed=3).params, m.params)
    assert not np.array_equal(MLP([400, 100, 10], seed=4).params, m.params)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="activation"):
        MLP([3, 2], ["softmax"])
    with pytest.raises(ValueError, match="one activation per layer"):
        MLP([3, 2, 2], ["relu"])
    with pytest.raises(ValueError, match="sizes"):
        MLP([3])
    with pytest.raises(ValueError, match="shape"):
        MLP([3, 2]).forward(np.zeros((4, 5), np.float32))


def test_forward_applies_normalisation_to_a_copy(data):
    X = data[0]
    m = MLP([30, 16, 4], seed=1, norm=(0.5, 0.25))
    X0 = X.copy()
    out = m.forward(X, backend="numpy")
    assert np.array_equal(X, X0)
    h = (X.astype(np.float64) - 0.5) / 0.25
    (W1, b1), (W2, b2) = m.layers
    ref = np.maximum(h @ W1 + b1, 0) @ W2 + b2
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m.forward(X), out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m.predict(X), out.argmax(1))
    assert m.forward(X, upto=1).shape == (X.shape[0], 16)


def test_save_load_round_trip(tmp_path, data):
    X, y, Xt, yt = data
    m, hist = _fit(X, y, epochs=1)
    assert m.norm is not None and isinstance(m.norm[0], np.float32)
    path = tmp_path / "m.pykd"
    m.save(path, metadata={"note": "hello"})
    m2 = load_model(path)
    assert m2.sizes == m.sizes and m2.activations == m.activations and m2.norm == m.norm
    assert np.array_equal(m2.params, m.params)
    assert np.array_equal(m2.forward(Xt), m.forward(Xt))
    assert np.array_equal(m2.predict(Xt), m.predict(Xt))
    assert m2.metadata["note"] == "hello"
    m2.save(tmp_path / "again.pykd")
    assert np.array_equal(load_model(tmp_path / "again.pykd").params, m.params)


# ------------------------------------------------------- soft labels, eval

def test_soft_labels_and_evaluate(data):
    X, y, Xt, yt = data
    m, _ = _fit(X, y, epochs=2)
    logits = soft_labels(m, X, T=5.0)
    assert logits.shape == (X.shape[0], 4) and logits.dtype == np.float32
    assert np.array_equal(logits, m.forward(X))          # unscaled by T
    with pytest.raises(ValueError, match="T"):
        soft_labels(m, X, T=0)
    ev = evaluate(m, Xt, yt, teacher=m)
    assert ev["agreement"] == 1.0 and ev["parameters"] == m.parameters and ev["bytes"] == m.nbytes
    conf = np.array(ev["confusion"])
    assert conf.shape == (4, 4) and conf.sum() == len(yt)
    assert ev["accuracy"] == pytest.approx(np.trace(conf) / len(yt))
    assert ev["loss"] > 0
    assert evaluate(m, Xt, yt, teacher=m.forward(Xt))["agreement"] == 1.0


def test_fit_learns(data):
    X, y, Xt, yt = data
    m, hist = _fit(X, y, epochs=5, X_val=Xt, y_val=yt)
    assert set(hist) >= {"loss", "train_accuracy", "test_accuracy", "seconds"}
    assert len(hist["loss"]) == 5 and hist["loss"][-1] < hist["loss"][0]
    assert hist["test_accuracy"][-1] > 0.9              # chance is 0.25
    assert evaluate(m, Xt, yt)["accuracy"] == hist["test_accuracy"][-1]


def test_distillation_with_hint(data):
    X, y, Xt, yt = data
    teacher, _ = _fit(X, y, sizes=(30, 40, 40, 4), epochs=4)
    logits = soft_labels(teacher, X, 4.0)
    targets = hint_targets_from(teacher, X, 2)
    assert targets.shape == (X.shape[0], 40)
    cfg = TrainConfig(loss="kd", temperature=4.0, alpha=0.3, hint_layer=1, hint_weight=0.5)
    student, hist = _fit(X, y, sizes=(30, 12, 4), epochs=8, cfg=cfg, teacher_logits=logits,
                         hint_targets=targets, X_val=Xt, y_val=yt)
    assert student.parameters == 30 * 12 + 12 + 12 * 4 + 4   # the regressor is not the model's
    assert hist["test_accuracy"][-1] > 0.85
    assert evaluate(student, Xt, yt, teacher=teacher)["agreement"] > 0.85
    # callable targets (used when precomputing would not fit in memory) give the same run,
    # up to rounding (the teacher's features are computed in other batch sizes)
    fn = hint_targets_from(teacher, X, 2, precompute=False)
    student2, _ = _fit(X, y, sizes=(30, 12, 4), epochs=8, cfg=cfg, teacher_logits=logits,
                       hint_targets=fn)
    np.testing.assert_allclose(student2.params, student.params, rtol=1e-4, atol=1e-5)


# ------------------------------------------------ determinism and resuming

def test_same_seed_same_bits(data):
    X, y = data[:2]
    cfg = TrainConfig(dropout=0.3, seed=5)
    a, ha = _fit(X, y, seed=5, epochs=2, cfg=cfg)
    b, hb = _fit(X, y, seed=5, epochs=2, cfg=cfg)
    assert np.array_equal(a.params, b.params) and ha["loss"] == hb["loss"]
    c, _ = _fit(X, y, seed=6, epochs=2, cfg=TrainConfig(dropout=0.3, seed=6))
    assert not np.array_equal(a.params, c.params)


def _checkpoint_runs(tmp_path, X, y, cfg, extra, interrupt_at):
    """A straight 3-epoch run; and the same run interrupted by SIGINT after
    step `interrupt_at`, then resumed. Returns both models and the histories."""
    straight, h1 = _fit(X, y, epochs=3, cfg=cfg, checkpoint=tmp_path / "a.npz", **extra)
    ckpt = tmp_path / "b.npz"

    def ctrl_c(info):
        if info["step"] == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)

    m = MLP([30, 16, 4], seed=0)
    with pytest.raises(TrainingInterrupted) as exc:
        fit(m, X, y, cfg=cfg, epochs=3, batch_size=32, checkpoint=ckpt, progress=False,
            seed=0, callback=ctrl_c, **extra)
    assert exc.value.checkpoint == ckpt and exc.value.step == interrupt_at
    _, meta = load_checkpoint(ckpt)
    assert meta["step"] == interrupt_at
    resumed = MLP([30, 16, 4], seed=0)
    h2 = fit(resumed, X, y, cfg=cfg, epochs=3, batch_size=32, checkpoint=ckpt, resume=True,
             progress=False, seed=0, **extra)
    return straight, resumed, h1, h2, meta


@pytest.mark.parametrize("interrupt_at", [7, 19, 38])   # 19 batches per epoch: mid, end, mid
def test_ctrl_c_mid_epoch_then_resume_is_identical(tmp_path, data, interrupt_at):
    X, y = data[:2]
    cfg = TrainConfig(dropout=0.2, seed=0)
    straight, resumed, h1, h2, meta = _checkpoint_runs(tmp_path, X, y, cfg, {"lr_decay": 0.7},
                                                       interrupt_at)
    assert meta["epoch"] == (interrupt_at - 1) // 19 and meta["batch"] == (interrupt_at - 1) % 19 + 1
    assert np.array_equal(straight.params, resumed.params)
    assert h1["loss"] == h2["loss"] and h1["train_accuracy"] == h2["train_accuracy"]


def test_ctrl_c_resume_with_kd_hint_and_sgd(tmp_path, data):
    X, y = data[:2]
    teacher = MLP([30, 24, 4], seed=9)
    extra = {"teacher_logits": soft_labels(teacher, X), "hint_targets": hint_targets_from(teacher, X, 1)}
    cfg = TrainConfig(loss="kd", temperature=3.0, alpha=0.2, optimizer="sgd", lr=0.05,
                      hint_layer=1, hint_weight=0.3, weight_decay=1e-4)
    straight, resumed, *_ = _checkpoint_runs(tmp_path, X, y, cfg, extra, 25)
    assert np.array_equal(straight.params, resumed.params)
    arrays, _ = load_checkpoint(tmp_path / "a.npz")
    assert arrays["params"].size == _step.param_count([30, 16, 4], (1, 24))  # regressor saved


def test_epoch_checkpoint_resume_equals_straight_run(tmp_path, data):
    X, y = data[:2]
    straight, h = _fit(X, y, epochs=2)
    ckpt = tmp_path / "c.npz"
    m = MLP([30, 16, 4], seed=0)
    fit(m, X, y, cfg=TrainConfig(), epochs=1, batch_size=32, checkpoint=ckpt, progress=False)
    with np.load(ckpt, allow_pickle=False) as z:                   # no pickle anywhere
        assert set(z.files) == {"params", "state1", "state2", "meta"}
        assert z["meta"].dtype == np.uint8
    m2 = MLP([30, 16, 4], seed=0)
    h2 = fit(m2, X, y, cfg=TrainConfig(), epochs=2, batch_size=32, checkpoint=ckpt, resume=True,
             progress=False)
    assert np.array_equal(m2.params, straight.params) and h2["loss"] == h["loss"]
    with pytest.raises(ValueError, match="different run"):
        fit(MLP([30, 16, 4]), X, y, cfg=TrainConfig(lr=0.1), epochs=2, batch_size=32,
            checkpoint=ckpt, resume=True, progress=False)
    with pytest.raises(FileNotFoundError):
        fit(MLP([30, 16, 4]), X, y, epochs=1, checkpoint=tmp_path / "none.npz", resume=True,
            progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data):
    X, y = data[:2]
    ckpt = tmp_path / "n.npz"
    saved = {}

    def poison(info):
        if info["epoch"] == 1 and info["batch"] == 3:
            saved["bytes"] = ckpt.read_bytes()         # written at the end of epoch 1
            m.params[:] = np.nan

    m = MLP([30, 16, 4], seed=0)
    with pytest.raises(NonFiniteLossError, match="NaN or inf.*epoch 2, batch 4.*last good "
                                                  "checkpoint") as exc:
        fit(m, X, y, epochs=3, batch_size=32, checkpoint=ckpt, progress=False, callback=poison)
    assert isinstance(exc.value, FloatingPointError)
    assert ckpt.read_bytes() == saved["bytes"]
    _, meta = load_checkpoint(ckpt)
    assert meta["epoch"] == 1 and meta["batch"] == 0


def test_lr_decay_starts_after_the_first_epoch(data):
    X, y = data[:2]
    a, ha = _fit(X, y, epochs=2)
    b, hb = _fit(X, y, epochs=2, lr_decay=0.5)
    assert ha["loss"][0] == hb["loss"][0] and ha["loss"][1] != hb["loss"][1]
    with pytest.raises(ValueError, match="lr_decay"):
        _fit(X, y, epochs=1, lr_decay=0)


def test_fortran_and_numpy_backends_agree(data):
    X, y = data[0][:256], data[1][:256]
    for cfg in (TrainConfig(), TrainConfig(optimizer="sgd", lr=0.05, dropout=0.25)):
        a, ha = _fit(X, y, epochs=1, cfg=cfg, backend="fortran")
        b, hb = _fit(X, y, epochs=1, cfg=cfg, backend="numpy")
        np.testing.assert_allclose(a.params, b.params, rtol=1e-3, atol=2e-5)
        assert ha["loss"][0] == pytest.approx(hb["loss"][0], rel=1e-4)


def test_fit_rejects_bad_input(data):
    X, y = data[:2]
    m = MLP([30, 16, 4])
    with pytest.raises(TypeError, match="float32"):
        fit(m, X.astype(np.float64), y, progress=False)
    with pytest.raises(ValueError, match="labels|y must be in"):
        fit(m, X, y + 4, progress=False)
    with pytest.raises(ValueError, match="teacher_logits"):
        fit(m, X, y, cfg=TrainConfig(loss="kd"), progress=False)
    with pytest.raises(ValueError, match="hint"):
        fit(m, X, y, cfg=TrainConfig(hint_layer=1, hint_weight=1.0), progress=False)


# --------------------------------------------------------------------- CLI

def run_cli(*args, cwd, check=True):
    proc = subprocess.run([sys.executable, "-m", "pykd", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"pykd {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    X, y, Xt, yt = make_data(800, 300, n_features=64, n_classes=5, seed=1)
    np.savez(d / "small.npz", X_train=X, y_train=y, X_test=Xt, y_test=yt)
    return d


def test_cli_pipeline(small_npz):
    d = small_npz
    run_cli("train-teacher", "--epochs", 3, "--hidden", 32, "--dropout", 0.1, "--data",
            "small.npz", "--out", "t.pykd", "--report", "t.json", "--quiet", cwd=d)
    report = json.loads((d / "t.json").read_text())
    (entry,) = report["models"]
    for key in ("test_accuracy", "parameters", "bytes", "seconds_per_epoch", "config"):
        assert key in entry
    assert len(entry["seconds_per_epoch"]) == 3 and entry["config"]["train"]["dropout"] == 0.1
    assert entry["test_accuracy"] > 0.6
    p = run_cli("soft-labels", "--teacher", "t.pykd", "--out", "tl.npy", "--data", "small.npz",
                cwd=d)
    assert "unscaled" in p.stdout
    logits = np.load(d / "tl.npy")
    assert logits.shape == (800, 5) and logits.dtype == np.float32
    run_cli("distill", "--teacher-logits", "tl.npy", "--hidden", 16, "--epochs", 2, "-T", 4,
            "--alpha", 0.2, "--data", "small.npz", "--out", "s.pykd", "--quiet", cwd=d)
    run_cli("distill", "--teacher", "t.pykd", "--hidden", "16,16", "--epochs", 2,
            "--hint-student-layer", 2, "--hint-teacher-layer", 1, "--hint-weight", 0.5,
            "--optimizer", "sgd", "--lr", 0.05, "--data", "small.npz", "--out", "h.pykd",
            "--quiet", cwd=d)
    p = run_cli("evaluate", "--model", "s.pykd", "--teacher", "t.pykd", "--data", "small.npz",
                "--report", "e.json", cwd=d)
    assert "confusion matrix" in p.stdout and "agreement" in p.stdout
    (e,) = json.loads((d / "e.json").read_text())["models"]
    assert e["agreement"] is not None and len(e["seconds_per_epoch"]) == 2
    assert e["config"]["train"]["loss"] == "kd" and e["config"]["temperature"] == 4
    assert e["test_accuracy"] == pytest.approx(
        evaluate(load_model(d / "s.pykd"), *make_data(800, 300, 64, 5, seed=1)[2:])["accuracy"])


def test_cli_demo_quick(small_npz):
    d = small_npz
    p = run_cli("demo", "--quick", "--data", "small.npz", "--teacher-hidden", 64,
                "--student-hidden", 16, "--seeds", 2, "--out", "demo", "--report", "demo.json",
                "--quiet", "--backend", "numpy", cwd=d)
    for word in ("teacher", "KD student", "scratch student", "parameters", "s/epoch"):
        assert word in p.stdout
    report = json.loads((d / "demo.json").read_text())
    assert [m["name"] for m in report["models"]] == [
        "teacher", "kd_student_seed0", "scratch_student_seed0", "kd_student_seed1",
        "scratch_student_seed1"]
    assert report["summary"]["KD student"]["runs"] == 2
    assert report["demo_config"]["backend"] == "numpy"
    # --resume reuses every finished model
    p = run_cli("demo", "--quick", "--data", "small.npz", "--teacher-hidden", 64,
                "--student-hidden", 16, "--seeds", 2, "--out", "demo", "--resume",
                "--backend", "numpy", cwd=d)
    assert p.stderr.count("reusing") == 5


@pytest.mark.parametrize("args, message", [
    (["train-teacher", "--data", "nowhere"], "no such file"),
    (["train-teacher", "--alpha", "0.5"], "unrecognized arguments"),
    (["distill", "--teacher-logits", "x.npy", "--alpha", "2"], "alpha"),
    (["distill", "--teacher-logits", "tl.npy", "--data", "small.npz",
      "--hint-student-layer", "1"], "needs --teacher"),
    (["distill", "--teacher-logits", "small.npz", "--data", "small.npz"], "cannot read"),
    (["train-teacher", "--hidden", "12,x"], "layer widths"),
    (["evaluate", "--model", "missing.pykd", "--data", "small.npz"], "does not exist"),
    (["evaluate", "--model", "small.npz", "--data", "small.npz"], "not a pykd model"),
    (["soft-labels", "--teacher", "t.pykd"], "--out"),
    (["train-teacher", "--epochs", "1", "--resume", "--data", "small.npz", "--out", "fresh.pykd"],
     "no checkpoint"),
])
def test_cli_bad_input_fails_clearly(small_npz, args, message):
    (small_npz / "tl.npy").exists() or np.save(small_npz / "tl.npy", np.zeros((800, 5), np.float32))
    p = run_cli(*args, cwd=small_npz, check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_cli_plot_option(small_npz):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        p = run_cli("train-teacher", "--epochs", 1, "--hidden", 8, "--data", "small.npz",
                    "--out", "p.pykd", "--plot", "c.png", cwd=small_npz, check=False)
        assert p.returncode == 2 and "needs matplotlib" in p.stderr
        assert not (small_npz / "p.pykd").exists()          # checked before training
    else:
        run_cli("train-teacher", "--epochs", 2, "--hidden", 8, "--data", "small.npz",
                "--out", "p.pykd", "--plot", "c.png", "--quiet", cwd=small_npz)
        assert (small_npz / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_ctrl_c_then_resume(tmp_path):
    X, y, Xt, yt = make_data(3000, 200, n_features=200, n_classes=5, seed=2)
    np.savez(tmp_path / "d.npz", X_train=X, y_train=y, X_test=Xt, y_test=yt)
    common = ["train-teacher", "--hidden", "256,256", "--epochs", 12, "--dropout", 0.2,
              "--data", "d.npz", "--threads", 1]
    run_cli(*common, "--out", "straight.pykd", "--quiet", cwd=tmp_path)
    cmd = [sys.executable, "-m", "pykd", *map(str, common), "--out", "int.pykd"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ckpt = tmp_path / "int.pykd.ckpt.npz"
    deadline = time.monotonic() + 60
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)                                   # somewhere in epoch 2
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert not (tmp_path / "int.pykd").exists()
    run_cli(*common, "--out", "int.pykd", "--resume", "--quiet", cwd=tmp_path)
    a, b = load_model(tmp_path / "straight.pykd"), load_model(tmp_path / "int.pykd")
    assert np.array_equal(a.params, b.params)
    assert a.metadata["history"]["loss"] == b.metadata["history"]["loss"]


def test_public_api_exports():
    for name in ("MLP", "load_model", "soft_labels", "fit", "evaluate", "TrainConfig"):
        assert hasattr(pykd, name)
