"""fit's epoch callback (on_epoch) and pykd.EarlyStopping (issue 17).

References are independent runs: early stopping with restore_best must end
at the bits of a straight run of best_epoch epochs; a callback schedule that
equals the built-in exponential one must give its bits; a run interrupted
by Ctrl-C (after a callback set its rate, or before EarlyStopping stopped)
must resume to the bits of the uninterrupted run.
"""
import os
import signal

import numpy as np
import pytest

from pykd import MLP, EarlyStopping, RunConfig, TrainConfig, fit
from pykd.train import CheckpointError, TrainingInterrupted, _logits_stats, load_checkpoint

pytestmark = pytest.mark.fortran

F, C, HIDDEN = 8, 3, 24


@pytest.fixture(scope="module")
def noisy():
    """Random labels: the validation loss falls a little, then rises as the
    network memorises the 48 training rows."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((48, F)).astype(np.float32)
    y = rng.integers(0, C, 48).astype(np.int64)
    Xv = rng.standard_normal((64, F)).astype(np.float32)
    yv = rng.integers(0, C, 64).astype(np.int64)
    return X, y, Xv, yv


RUN = RunConfig(step=TrainConfig(lr=1e-2, seed=2), batch_size=16)


def _fit(data, epochs, **kw):
    X, y, Xv, yv = data
    m = MLP([F, HIDDEN, C], seed=4)
    hist = fit(m, X, y, config=RUN, epochs=epochs, X_val=Xv, y_val=yv, progress=False, **kw)
    return m, hist


def _first_stop(values, patience, min_delta=0.0):
    """An independent early-stopping rule on a list: (best_epoch, stop_epoch or None)."""
    best, best_epoch = None, 0
    for e, v in enumerate(values, 1):
        if best is None or v < best - min_delta:
            best, best_epoch = v, e
        elif e - best_epoch >= patience:
            return best_epoch, e
    return best_epoch, None


# ----------------------------------------------------------- early stopping

def test_early_stopping_stops_and_restores_the_best_parameters(noisy):
    _, full = _fit(noisy, 40)
    best_epoch, stop_epoch = _first_stop(full["test_loss"], patience=3)
    assert stop_epoch is not None and stop_epoch < 40     # the data really overfits
    es = EarlyStopping(monitor="test_loss", patience=3)
    m, hist = _fit(noisy, 40, on_epoch=es)
    assert hist["epoch"] == list(range(1, stop_epoch + 1))
    assert hist["test_loss"] == full["test_loss"][:stop_epoch]
    assert (es.best_epoch, es.stopped_epoch, es.wait) == (best_epoch, stop_epoch, 3)
    assert es.best == min(full["test_loss"])
    # The parameters are those of a straight run of best_epoch epochs.
    best, _ = _fit(noisy, best_epoch)
    assert np.array_equal(m.params, best.params)
    X, y, Xv, yv = noisy
    assert _logits_stats(m.forward(Xv), yv)[1] == es.best
    # Without restore_best the last epoch's parameters stay.
    last, _ = _fit(noisy, stop_epoch)
    m2, _ = _fit(noisy, 40, on_epoch=EarlyStopping(patience=3, restore_best=False))
    assert np.array_equal(m2.params, last.params)


def test_early_stopping_min_delta_mode_and_the_last_epoch(noisy):
    _, full = _fit(noisy, 40)
    delta = 0.01
    best_epoch, stop_epoch = _first_stop(full["test_loss"], patience=2, min_delta=delta)
    es = EarlyStopping(patience=2, min_delta=delta)
    _, hist = _fit(noisy, 40, on_epoch=es)
    assert len(hist["epoch"]) == stop_epoch and es.best_epoch == best_epoch
    # "accuracy" monitors are maximised; restore_best also applies at the last epoch.
    es = EarlyStopping(monitor="train_accuracy", patience=100)
    m, hist = _fit(noisy, 6, on_epoch=es)
    assert es.mode == "max" and es.stopped_epoch is None and len(hist["epoch"]) == 6
    want = int(np.argmax(hist["train_accuracy"])) + 1          # the first maximum
    assert es.best_epoch == want
    assert np.array_equal(m.params, _fit(noisy, want)[0].params)


def test_early_stopping_bad_use(noisy):
    X, y, _, _ = noisy
    with pytest.raises(ValueError, match="monitors 'test_loss', which fit records only with "
                                         "validation data: give X_val and y_val"):
        fit(MLP([F, 4, C]), X, y, on_epoch=EarlyStopping(), progress=False)
    with pytest.raises(ValueError, match="the history has no 'val_loss'; it has loss, "):
        _fit(noisy, 2, on_epoch=EarlyStopping(monitor="val_loss"))
    with pytest.raises(ValueError, match="patience must be >= 1, got 0"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="min_delta must be finite"):
        EarlyStopping(min_delta=-1)
    with pytest.raises(ValueError, match="mode must be None, 'min' or 'max'"):
        EarlyStopping(mode="up")
    with pytest.raises(TypeError, match="on_epoch must be callable, got int"):
        _fit(noisy, 1, on_epoch=3)


# ----------------------------------------------------------- the callback

def test_the_state_and_both_ways_to_stop(noisy):
    seen = []

    def look(state):
        seen.append((state.epoch, state.epochs, state.step, len(state.history["loss"]),
                     state.lr, state.model))
        return state.epoch == 3          # returning True stops
    m, hist = _fit(noisy, 10, on_epoch=look)
    assert hist["epoch"] == [1, 2, 3]
    assert [s[:5] for s in seen] == [(e, 10, 3 * e, e, 1e-2) for e in (1, 2, 3)]
    assert all(s[5] is m for s in seen)

    def flag(state):
        state.stop = state.epoch == 2
    assert _fit(noisy, 10, on_epoch=flag)[1]["epoch"] == [1, 2]


def test_a_custom_schedule_sets_the_rates(noisy):
    """A callback halving the rate is the exponential schedule: same rates in
    history["lr"] and the same bits; any other list of rates is recorded."""
    def halve(state):
        state.lr = RUN.step.lr * 0.5**state.epoch
    a, ha = _fit(noisy, 4, on_epoch=halve)
    b, hb = _fit(noisy, 4, lr_decay=0.5)
    assert ha["lr"] == hb["lr"] == [1e-2 * 0.5**e for e in range(4)]
    assert np.array_equal(a.params, b.params)

    rates = {1: 3e-3, 2: 1e-3}          # set after epochs 1 and 2, then kept

    def warm(state):
        if state.epoch in rates:
            state.lr = rates[state.epoch]
    _, h = _fit(noisy, 5, on_epoch=warm)
    assert h["lr"] == [1e-2, 3e-3, 1e-3, 1e-3, 1e-3]
    # None goes back to the schedule (here cosine, per step).
    def back(state):
        state.lr = 0.02 if state.epoch == 1 else None
    _, h = _fit(noisy, 3, on_epoch=back, lr_schedule="cosine")
    _, hc = _fit(noisy, 3, lr_schedule="cosine")
    assert h["lr"] == [hc["lr"][0], 0.02, hc["lr"][2]]

    def bad(state):
        state.lr = -1.0
    with pytest.raises(ValueError, match=r"state.lr must be finite in float32 and in \[0, "):
        _fit(noisy, 2, on_epoch=bad)


# ----------------------------------------------------------------- resume

def _ctrl_c_at(step):
    def cb(info):
        if info["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
    return cb


def test_resume_after_a_callback_set_rate_is_bit_identical(noisy, tmp_path):
    def sched(state):
        state.lr = [5e-3, 2e-2, 1e-3, 4e-3][state.epoch % 4]
    straight, h1 = _fit(noisy, 6, on_epoch=sched)
    for stop, lr_set in ((7, 1e-3), (9, 1e-3), (10, 4e-3)):   # 3 batches per epoch
        ckpt = tmp_path / f"c{stop}.npz"
        with pytest.raises(TrainingInterrupted):
            _fit(noisy, 6, on_epoch=sched, checkpoint=ckpt, callback=_ctrl_c_at(stop))
        assert load_checkpoint(ckpt)[1]["lr_set"] == lr_set
        resumed, h2 = _fit(noisy, 6, on_epoch=sched, checkpoint=ckpt, resume=True)
        assert np.array_equal(resumed.params, straight.params)
        assert h2["lr"] == h1["lr"] and h2["loss"] == h1["loss"]


def test_resume_with_early_stopping(noisy, tmp_path):
    es = EarlyStopping(patience=3)
    straight, h1 = _fit(noisy, 40, on_epoch=es)
    stop_epoch, best_epoch = es.stopped_epoch, es.best_epoch
    assert best_epoch + 3 == stop_epoch
    # Interrupted after the best epoch, before the stop: the resumed run (with
    # a new EarlyStopping) reads the saved state, stops at the same epoch and
    # restores the same best parameters.
    ckpt = tmp_path / "c.npz"
    with pytest.raises(TrainingInterrupted):
        _fit(noisy, 40, on_epoch=EarlyStopping(patience=3), checkpoint=ckpt,
             callback=_ctrl_c_at(3 * best_epoch + 2))
    es2 = EarlyStopping(patience=3)
    resumed, h2 = _fit(noisy, 40, on_epoch=es2, checkpoint=ckpt, resume=True)
    assert h2 == {**h1, "seconds": h2["seconds"], "samples_per_second": h2["samples_per_second"]}
    assert (es2.best_epoch, es2.stopped_epoch) == (best_epoch, stop_epoch)
    assert np.array_equal(resumed.params, straight.params)
    # Resuming the stopped run's checkpoint trains no further.
    meta = load_checkpoint(ckpt)[1]
    assert meta["stopped"] is True and meta["epoch"] == stop_epoch
    again, h3 = _fit(noisy, 40, on_epoch=EarlyStopping(patience=3), checkpoint=ckpt,
                     resume=True)
    assert h3["epoch"] == h1["epoch"] and np.array_equal(again.params, straight.params)
    # A fresh run resets a used EarlyStopping.
    _fit(noisy, 40, on_epoch=es2)
    assert (es2.best_epoch, es2.stopped_epoch) == (best_epoch, stop_epoch)


def test_a_bad_saved_callback_state_is_a_checkpoint_error(noisy, tmp_path):
    ckpt = tmp_path / "c.npz"
    _fit(noisy, 2, on_epoch=EarlyStopping(patience=5), checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="the on_epoch callback refuses its saved state "
                                              r"\(the on_epoch state monitors 'test_loss'"):
        _fit(noisy, 4, on_epoch=EarlyStopping(monitor="loss"), checkpoint=ckpt, resume=True)


@pytest.mark.parametrize("field, value, message", [
    ("lr_set", "fast", "lr_set must be a finite number >= 0, got 'fast'"),
    ("lr_set", -1.0, "lr_set must be a finite number >= 0, got -1.0"),
    ("stopped", 1, "stopped must be true or false"),
    ("on_epoch", {"state": {}, "arrays": ["../x"]}, "metadata 'on_epoch' must hold"),
    ("on_epoch", {"state": {}, "arrays": ["gone"]}, "has no array 'on_epoch.gone'"),
])
def test_bad_epoch_control_fields(noisy, tmp_path, field, value, message):
    import json
    ckpt = tmp_path / "c.npz"
    _fit(noisy, 2, on_epoch=EarlyStopping(patience=5), checkpoint=ckpt)
    with np.load(ckpt) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("meta").tobytes())
    meta[field] = value
    np.savez(ckpt, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(".", r"\.")):
        _fit(noisy, 4, on_epoch=EarlyStopping(patience=5), checkpoint=ckpt, resume=True)
