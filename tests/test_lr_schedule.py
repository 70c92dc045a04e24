"""Learning-rate schedules of fit and the CLI (issue 17): the rate of every
step against the hand formula, that the optimizer really gets it, resume,
the fingerprint, the low-rate warning, errors, and the CLI's plain defaults
(constant rate, no dropout) with the demo's recipe left to the demo."""
import json
import math
import os
import signal
import warnings

import numpy as np
import pytest

from pykd import cli
from pykd.models import MLP, load_model
from pykd.train import (CheckpointError, LearningRateWarning, TrainConfig, TrainingInterrupted,
                        _save_checkpoint, fit, load_checkpoint)

pytestmark = pytest.mark.fortran

N, BATCH = 200, 32
N_BATCHES = -(-N // BATCH)          # 7


def make_data(n=N, n_features=12, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.2, 0.8, (n_classes, n_features))
    y = rng.integers(0, n_classes, n)
    X = centres[y] + 0.15 * rng.standard_normal((n, n_features))
    return X.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def data():
    return make_data()


def _hand_lr(schedule, lr, step, epochs, decay=1.0):
    """The documented formula, written out independently of pykd.train."""
    if schedule == "constant":
        return lr
    if schedule == "exponential":
        return lr * decay ** (step // N_BATCHES)
    return lr * (1 + math.cos(math.pi * step / (epochs * N_BATCHES))) / 2


def _fit(X, y, *, epochs=3, cfg=None, **kw):
    m = MLP([12, 8, 3], seed=0)
    rates = []
    cb = kw.pop("callback", None)

    def record(info):
        rates.append((info["step"], info["lr"]))
        if cb is not None:
            cb(info)
    h = fit(m, X, y, cfg=cfg or TrainConfig(lr=0.01), epochs=epochs, batch_size=BATCH,
            progress=False, callback=record, **kw)
    return m, h, rates


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
@pytest.mark.parametrize("schedule, decay", [("constant", 1.0), ("exponential", 0.6),
                                             ("cosine", 1.0), (None, 0.6), (None, 1.0)])
def test_rate_of_every_step_is_the_hand_formula(data, backend, schedule, decay):
    X, y = data
    epochs = 3
    _, h, rates = _fit(X, y, epochs=epochs, backend=backend, lr_schedule=schedule,
                       lr_decay=decay)
    name = schedule or ("exponential" if decay != 1 else "constant")
    assert [s for s, _ in rates] == list(range(1, epochs * N_BATCHES + 1))
    for s, lr in rates:                       # info["step"] counts done steps: s - 1 is the index
        assert lr == pytest.approx(_hand_lr(name, 0.01, s - 1, epochs, decay), rel=1e-12)
    assert h["lr"] == pytest.approx([_hand_lr(name, 0.01, e * N_BATCHES, epochs, decay)
                                     for e in range(epochs)], rel=1e-12)
    if name == "cosine":
        assert rates[0][1] == 0.01 and 0 < rates[-1][1] < 0.01 * 1e-2
        assert all(a[1] > b[1] for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
def test_the_optimizer_gets_the_cosine_rate(data, backend):
    """Plain SGD (no momentum, no optimizer state) with one full batch per
    epoch: a cosine run equals one-epoch constant-rate runs chained at the
    hand rates (the rows' order differs, so up to rounding)."""
    X, y = data
    epochs = 4
    cfg = TrainConfig(optimizer="sgd", momentum=0.0, lr=0.5)
    a = MLP([12, 8, 3], seed=0)
    fit(a, X, y, cfg=cfg, epochs=epochs, batch_size=N, progress=False, backend=backend,
        lr_schedule="cosine")
    b = MLP([12, 8, 3], seed=0)
    for e in range(epochs):
        lr = 0.5 * (1 + math.cos(math.pi * e / epochs)) / 2
        fit(b, X, y, cfg=TrainConfig(optimizer="sgd", momentum=0.0, lr=lr), epochs=1,
            batch_size=N, progress=False, backend=backend)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-5, atol=1e-6)
    c = MLP([12, 8, 3], seed=0)               # and it is not the constant rate
    fit(c, X, y, cfg=cfg, epochs=epochs, batch_size=N, progress=False, backend=backend)
    assert np.abs(c.params - a.params).max() > 1e-3


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
@pytest.mark.parametrize("schedule, decay, stop", [("cosine", 1.0, 10), ("exponential", 0.5, 9),
                                                   ("cosine", 1.0, 14)])
def test_resume_with_a_schedule_is_bit_identical(tmp_path, data, backend, schedule, decay, stop):
    X, y = data
    straight, h1, r1 = _fit(X, y, backend=backend, lr_schedule=schedule, lr_decay=decay)
    ckpt = tmp_path / "c.npz"

    def ctrl_c(info):
        if info["step"] == stop:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        _fit(X, y, backend=backend, lr_schedule=schedule, lr_decay=decay, checkpoint=ckpt,
             callback=ctrl_c)
    _, meta = load_checkpoint(ckpt)
    assert meta["fingerprint"]["lr_schedule"] == schedule
    resumed, h2, r2 = _fit(X, y, backend=backend, lr_schedule=schedule, lr_decay=decay,
                           checkpoint=ckpt, resume=True)
    assert np.array_equal(straight.params, resumed.params)
    assert h1["loss"] == h2["loss"] and h1["lr"] == h2["lr"]
    assert r2 == r1[stop:]                    # the resumed steps get the same rates


def test_the_schedule_is_in_the_fingerprint(tmp_path, data):
    X, y = data
    ckpt = tmp_path / "c.npz"
    _fit(X, y, epochs=1, lr_schedule="cosine", checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="differs in: lr_schedule"):
        _fit(X, y, epochs=3, lr_schedule="constant", checkpoint=ckpt, resume=True)
    with pytest.raises(CheckpointError, match="lr_decay, lr_schedule"):
        _fit(X, y, epochs=3, lr_decay=0.5, checkpoint=ckpt, resume=True)


def test_a_checkpoint_from_before_schedules_still_resumes(tmp_path, data):
    """No lr_schedule in its fingerprint, no lr in its history: read as the
    exponential (lr_decay != 1) or constant schedule it was trained with."""
    X, y = data
    straight, h1, _ = _fit(X, y, lr_decay=0.5)
    ckpt = tmp_path / "old.npz"
    _fit(X, y, epochs=1, lr_decay=0.5, checkpoint=ckpt)
    arrays, meta = load_checkpoint(ckpt)
    del meta["fingerprint"]["lr_schedule"], meta["history"]["lr"]
    _save_checkpoint(ckpt, arrays["params"], arrays["state1"], arrays["state2"], meta)
    resumed, h2, _ = _fit(X, y, lr_decay=0.5, checkpoint=ckpt, resume=True)
    assert np.array_equal(straight.params, resumed.params) and h2["lr"] == h1["lr"]


def test_a_rate_decayed_below_1e_7_warns_once(data):
    X, y = data
    with pytest.warns(LearningRateWarning) as got:
        _fit(X, y, epochs=6, cfg=TrainConfig(lr=1e-3), lr_decay=0.05)
    assert len(got) == 1
    msg = str(got[0].message)
    assert "decayed to 6.25e-09 at epoch 5 of 6" in msg and "lr_decay 0.05^4" in msg
    assert got[0].filename == __file__             # points at the caller of fit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(X, y, epochs=4, cfg=TrainConfig(lr=1e-3), lr_decay=0.05)   # ends at 1.25e-7
        _fit(X, y, epochs=3, cfg=TrainConfig(lr=1e-3), lr_schedule="cosine")  # 0 by design


@pytest.mark.parametrize("kw, match", [
    (dict(lr_schedule="cosine", lr_decay=0.9), "lr_decay=0.9 .*lr_schedule='cosine'"),
    (dict(lr_schedule="constant", lr_decay=0.5), "lr_decay=0.5 .*lr_schedule='constant'"),
    (dict(lr_schedule="linear"), "lr_schedule must be one of 'constant', 'exponential', "
                                 "'cosine', got 'linear'"),
    (dict(lr_schedule="exponential", lr_decay=0), "lr_decay must be in"),
])
def test_bad_schedules_are_errors(data, kw, match):
    X, y = data
    with pytest.raises(ValueError, match=match):
        _fit(X, y, epochs=1, **kw)


# --------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("sched")
    X, y = make_data(300, seed=1)
    Xt, yt = make_data(100, seed=2)
    np.savez(d / "d.npz", X_train=X, y_train=y, X_test=Xt, y_test=yt)
    return d


def _cli(d, *args):
    cwd = os.getcwd()
    os.chdir(d)
    try:
        return cli.main([str(a) for a in args])
    finally:
        os.chdir(cwd)


def test_train_teacher_defaults_are_constant_rate_no_dropout(npz, capsys):
    assert _cli(npz, "train-teacher", "--data", "d.npz", "--hidden", 8, "--epochs", 3,
                "--quiet", "--out", "t.pykd") == 0
    config = load_model(npz / "t.pykd").metadata["config"]
    assert config["lr_schedule"] == "constant" and config["lr_decay"] == 1.0
    assert config["train"]["dropout"] == 0.0
    assert load_model(npz / "t.pykd").metadata["history"]["lr"] == [1e-3] * 3


def test_distill_defaults_and_cosine(npz, capsys):
    _cli(npz, "train-teacher", "--data", "d.npz", "--hidden", 8, "--epochs", 1, "--quiet",
         "--out", "t1.pykd")
    assert _cli(npz, "distill", "--teacher", "t1.pykd", "--data", "d.npz", "--hidden", 6,
                "--epochs", 2, "--quiet", "--out", "s.pykd") == 0
    meta = load_model(npz / "s.pykd").metadata
    assert meta["config"]["lr_schedule"] == "constant" and meta["config"]["train"]["dropout"] == 0
    assert _cli(npz, "distill", "--teacher", "t1.pykd", "--data", "d.npz", "--hidden", 6,
                "--epochs", 2, "--quiet", "--out", "s2.pykd", "--lr-schedule", "cosine") == 0
    meta = load_model(npz / "s2.pykd").metadata
    assert meta["config"]["lr_schedule"] == "cosine"
    assert meta["history"]["lr"] == pytest.approx([1e-3, 1e-3 * (1 + math.cos(math.pi / 2)) / 2])


def test_lr_decay_alone_is_exponential_and_warns_in_one_line(npz, capsys):
    assert _cli(npz, "train-teacher", "--data", "d.npz", "--hidden", 8, "--epochs", 6,
                "--lr-decay", 0.05, "--quiet", "--out", "e.pykd") == 0
    config = load_model(npz / "e.pykd").metadata["config"]
    assert config["lr_schedule"] == "exponential" and config["lr_decay"] == 0.05
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "decayed" in ln]
    assert len(lines) == 1 and lines[0].startswith(
        "pykd train-teacher: warning: the learning rate has decayed to 6.25e-09 at epoch 5")


@pytest.mark.parametrize("args, match", [
    (["--lr-schedule", "cosine", "--lr-decay", "0.9"],
     "--lr-decay is the factor of --lr-schedule exponential, but the schedule is cosine"),
    (["--lr-schedule", "constant", "--lr-decay", "1"], "but the schedule is constant"),
    (["--lr-schedule", "exponential"], "--lr-schedule exponential needs --lr-decay GAMMA"),
])
@pytest.mark.parametrize("command", ["train-teacher", "distill"])
def test_cli_schedule_errors_are_one_line_exit_2(npz, capsys, args, match, command):
    src = ["--teacher-logits", "none.npy"] if command == "distill" else []
    assert _cli(npz, command, "--data", "d.npz", *src, *args, "--out", "x.pykd") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"pykd {command}: error: ") and match in err
    assert not (npz / "x.pykd").exists()


def test_bad_schedule_name_is_a_usage_error(npz, capsys):
    assert _cli(npz, "train-teacher", "--lr-schedule", "linear") == 2
    assert "invalid choice: 'linear'" in capsys.readouterr().err


def test_config_file_sets_the_schedule(npz, capsys):
    (npz / "c.toml").write_text('lr_schedule = "cosine"\nepochs = 2\nhidden = [8]\n')
    assert _cli(npz, "train-teacher", "--config", "c.toml", "--data", "d.npz", "--quiet",
                "--out", "c.pykd", "--report", "c.json") == 0
    assert load_model(npz / "c.pykd").metadata["config"]["lr_schedule"] == "cosine"
    assert json.loads((npz / "c.json").read_text())["configuration"]["lr_schedule"] == "cosine"


def test_one_epoch_is_singular(npz, capsys):
    assert _cli(npz, "train-teacher", "--data", "d.npz", "--hidden", 8, "--epochs", 1,
                "--out", "o.pykd") == 0
    err = capsys.readouterr().err
    assert "for 1 epoch" in err and "1 epochs" not in err


def test_the_demo_keeps_its_recipe():
    """The demo still trains its teacher with dropout 0.3 and lr x0.9 per
    epoch (exponential), its students at a constant rate."""
    args = cli.build_parser().parse_args(["demo"])
    assert args.dropout == cli.DEMO["teacher_dropout"] == 0.3
    assert args.teacher_lr_decay == cli.DEMO["teacher_lr_decay"] == 0.9
    assert args.student_lr_decay == cli.DEMO["student_lr_decay"] == 1.0


def test_plural_messages():
    from pykd._validate import plural
    assert plural(1, "epoch") == "1 epoch" and plural(0, "epoch") == "0 epochs"
    assert plural(2, "class", "classes") == "2 classes" and plural(1234, "row", fmt=",") == \
        "1,234 rows"
    X = np.zeros((1, 1), np.float32)
    with pytest.raises(ValueError, match="X has 1 feature but the model takes 2$"):
        fit(MLP([2, 3, 2]), X, np.zeros(1, np.int64), progress=False)
    with pytest.raises(ValueError, match="y has 2 labels but X has 1 row$"):
        fit(MLP([1, 3, 2]), X, np.zeros(2, np.int64), progress=False)
    with pytest.raises(ValueError, match=r"\(1 = 1 epoch x 1 batch\)"):
        from pykd.compress.prune import PruneSchedule
        fit(MLP([1, 3, 2]), X, np.zeros(1, np.int64), progress=False,
            prune=PruneSchedule(0.5, end=5))
