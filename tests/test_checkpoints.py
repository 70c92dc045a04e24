"""Resuming checks every checkpoint field against the model and the run
(issue 13), and fit/forward/predict name the argument that is wrong."""
import json

import numpy as np
import pytest

from pykd.models import MLP
from pykd.train import (CheckpointError, TrainConfig, evaluate, fit, load_checkpoint)

pytestmark = pytest.mark.fortran

N, F, C, BATCH = 120, 10, 3, 32           # 4 batches per epoch, the last partial


def _data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    X = (np.eye(C, F)[y] + 0.3 * rng.standard_normal((n, F))).astype(np.float32)
    return X, y.astype(np.int64)


def _fit(ckpt, epochs, *, resume=False, mask=None, **kw):
    X, y = _data()
    m = MLP([F, 8, C], seed=1)
    hist = fit(m, X, y, cfg=TrainConfig(seed=3), epochs=epochs, batch_size=BATCH,
               checkpoint=ckpt, resume=resume, progress=False, mask=mask, **kw)
    return m, hist


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A checkpoint after epoch 1 of 3, and the weights of a straight 3-epoch run."""
    d = tmp_path_factory.mktemp("ckpt")
    straight, _ = _fit(d / "straight.npz", 3)
    _fit(d / "one.npz", 1)
    arrays, meta = load_checkpoint(d / "one.npz")
    return d, arrays, meta, straight.params.copy()


def _write(path, arrays, meta, raw_meta=None):
    blob = raw_meta if raw_meta is not None else json.dumps(meta).encode()
    np.savez(path, meta=np.frombuffer(blob, np.uint8), **arrays)


def test_untouched_checkpoint_resumes_to_the_same_bits(good, tmp_path):
    d, arrays, meta, straight = good
    _write(tmp_path / "c.npz", arrays, meta)
    m, hist = _fit(tmp_path / "c.npz", 3, resume=True)
    assert np.array_equal(m.params, straight)
    assert hist["epoch"] == [1, 2, 3]


def _set(path):
    """meta[path] = value, path like "accum.seen"; value KeyError deletes it."""
    def apply(meta, value):
        *head, last = path.split(".")
        target = meta
        for k in head:
            target = target[k]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return apply


BAD_META = [
    ("epoch", 10**9, "epoch must be an integer in [0, 3]"),
    ("epoch", -1, "epoch must be"),
    ("epoch", 1.5, "epoch must be"),
    ("epoch", True, "epoch must be"),
    ("epoch", "1", "epoch must be"),
    ("epoch", KeyError, "the checkpoint has no epoch"),
    ("step", -1, "step must be"),
    ("step", 3, "step must be epoch * batches per epoch + batch = 4"),
    ("step", KeyError, "has no step"),
    ("batch", 9, "batch must be an integer in [0, 4]"),
    ("batch", -1, "batch must be"),
    ("fingerprint", KeyError, "has no fingerprint"),
    ("fingerprint", [1, 2], "fingerprint is not a JSON object"),
    ("fingerprint.seed", 4, "different run (differs in: seed)"),
    ("fingerprint.batch_size", 16, "differs in: batch_size"),
    ("fingerprint.extra", 1, "differs in: extra"),
    ("rng_state", KeyError, "has no rng_state"),
    ("rng_state", {"bit_generator": "MT19937"}, "rng_state is not the shuffling state"),
    ("rng_state.state.state", 12345, "rng_state is not the shuffling state of seed 3 at epoch 1"),
    ("history", KeyError, "has no history"),
    ("history", [], "history must hold the lists"),
    ("history.loss", [], "one entry per finished epoch (1)"),
    ("history.loss", ["x"], "history holds values"),
    ("history.train_accuracy", [7.0], "history holds values"),
    ("history.epoch", [5], "history holds values"),
    ("accum", None, "accum must hold"),
    ("accum.seconds", -1.0, "accum must hold"),
    ("norm", KeyError, "has no norm"),
    ("norm", [0.0], "norm must be [mean, std]"),
    ("norm", [0.1, 2.0], "is not the run's input normalisation"),
]


@pytest.mark.parametrize("field, value, message", BAD_META,
                         ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_META])
def test_bad_checkpoint_field(good, tmp_path, field, value, message):
    _, arrays, meta, _ = good
    m2 = json.loads(json.dumps(meta))
    _set(field)(m2, value)
    path = tmp_path / "bad.npz"
    _write(path, arrays, m2)
    with pytest.raises(CheckpointError) as e:
        _fit(path, 3, resume=True)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def test_mid_epoch_checkpoint_fields_are_checked(good, tmp_path):
    """A Ctrl-C checkpoint (batch 2 of epoch 2): the running sums must fit the batch."""
    _, arrays, meta, straight = good
    m2 = json.loads(json.dumps(meta))
    m2.update(batch=2, step=6, accum={"loss_sum": 1.0, "correct": 10, "seen": 64,
                                      "seconds": 0.1})
    _write(tmp_path / "mid.npz", arrays, m2)
    _fit(tmp_path / "mid.npz", 3, resume=True)            # consistent: resumes
    for accum in ({"loss_sum": 1.0, "correct": 10, "seen": 63, "seconds": 0.1},
                  {"loss_sum": 1.0, "correct": 65, "seen": 64, "seconds": 0.1},
                  {"loss_sum": float("nan"), "correct": 1, "seen": 64, "seconds": 0.1}):
        m2["accum"] = accum
        _write(tmp_path / "mid.npz", arrays, m2)
        with pytest.raises(CheckpointError, match="accum must hold"):
            _fit(tmp_path / "mid.npz", 3, resume=True)


def test_checkpoint_past_the_run(good, tmp_path):
    """A checkpoint at epoch 1 cannot resume a run of 0 epochs; at the last
    epoch it must be at batch 0."""
    _, arrays, meta, _ = good
    _write(tmp_path / "c.npz", arrays, meta)
    with pytest.raises(CheckpointError, match=r"epoch must be an integer in \[0, 0\]"):
        _fit(tmp_path / "c.npz", 0, resume=True)
    m2 = dict(meta, batch=1, step=5)
    _write(tmp_path / "c.npz", arrays, m2)
    with pytest.raises(CheckpointError, match="batch must be"):
        _fit(tmp_path / "c.npz", 1, resume=True)


@pytest.mark.parametrize("member, value, message", [
    ("params", lambda a: a[:-1], "array 'params' has shape"),
    ("state1", lambda a: np.concatenate([a, a]), "array 'state1' has shape"),
    ("state2", lambda a: a.reshape(1, -1), "not a readable pykd checkpoint"),
    ("params", lambda a: np.where(np.arange(a.size) == 3, np.nan, a).astype(np.float32),
     "array 'params' contains NaN or inf"),
    ("state2", lambda a: a.astype(np.float64), "must be float32"),
    ("params", lambda a: a.astype(np.int32), "not a readable pykd checkpoint"),
    ("params", None, "has no array 'params'"),
])
def test_bad_checkpoint_array(good, tmp_path, member, value, message):
    _, arrays, meta, _ = good
    arrays = dict(arrays)
    if value is None:
        del arrays[member]
    else:
        arrays[member] = value(arrays[member])
    path = tmp_path / "bad.npz"
    _write(path, arrays, meta)
    with pytest.raises(CheckpointError) as e:
        _fit(path, 3, resume=True)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


@pytest.mark.parametrize("raw, message", [
    (b"not json", "metadata is not valid JSON"),
    (b"\xff\xfe", "metadata is not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "metadata is not valid JSON"),
    (b"[1, 2]", "not a pykd checkpoint of version 1"),
    (b'{"format": "pykd-checkpoint", "version": 99}', "not a pykd checkpoint of version 1"),
])
def test_bad_checkpoint_metadata(good, tmp_path, raw, message):
    _, arrays, meta, _ = good
    path = tmp_path / "bad.npz"
    _write(path, arrays, meta, raw_meta=raw)
    with pytest.raises(CheckpointError, match=message):
        _fit(path, 3, resume=True)


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "g.npz").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="g.npz: not a readable pykd checkpoint"):
        load_checkpoint(tmp_path / "g.npz")
    with pytest.raises(FileNotFoundError):
        _fit(tmp_path / "none.npz", 2, resume=True)


def test_mask_is_part_of_the_run(tmp_path):
    """A pruning mask: a checkpoint from another mask, or one whose pruned
    parameters are not zero, is refused; the right one resumes."""
    X, y = _data()
    sizes = [F, 8, C]
    n_params = MLP(sizes).parameters
    mask = np.random.default_rng(5).random(n_params) > 0.5

    def run(ckpt, epochs, mask, resume=False):
        m = MLP(sizes, seed=1)
        m.params[~mask] = 0
        fit(m, X, y, cfg=TrainConfig(seed=3), epochs=epochs, batch_size=BATCH, checkpoint=ckpt,
            resume=resume, progress=False, mask=mask)
        return m
    straight = run(tmp_path / "s.npz", 2, mask)
    run(tmp_path / "a.npz", 1, mask)
    assert np.array_equal(run(tmp_path / "a.npz", 2, mask, resume=True).params, straight.params)
    with pytest.raises(CheckpointError, match="differs in: mask"):
        run(tmp_path / "a.npz", 2, ~mask, resume=True)
    arrays, meta = load_checkpoint(tmp_path / "a.npz")
    arrays["params"][np.flatnonzero(~mask)[0]] = 1.0
    _write(tmp_path / "b.npz", arrays, meta)
    with pytest.raises(CheckpointError, match="parameters the mask prunes"):
        run(tmp_path / "b.npz", 2, mask, resume=True)


# ------------------------------------------- fit, forward, predict arguments

@pytest.mark.parametrize("kw, exc, message", [
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
    ({"batch_size": -4}, ValueError, "batch_size must be >= 1, got -4"),
    ({"batch_size": 2.5}, TypeError, "batch_size must be an integer, got float"),
    ({"batch_size": True}, TypeError, "batch_size must be an integer"),
    ({"epochs": -1}, ValueError, "epochs must be >= 0, got -1"),
    ({"epochs": 1.5}, TypeError, "epochs must be an integer"),
])
def test_fit_names_bad_numbers(kw, exc, message):
    X, y = _data()
    with pytest.raises(exc, match=message.replace("(", r"\(")):
        fit(MLP([F, 4, C]), X, y, progress=False, **kw)


def test_fit_rejects_non_finite_inputs_naming_rows():
    X, y = _data()
    for value in (np.nan, np.inf, -np.inf):
        Xb = X.copy()
        Xb[7, 2] = value
        Xb[90, 0] = value
        with pytest.raises(ValueError, match=r"^X contains NaN or inf \(rows 7, 90\)"):
            fit(MLP([F, 4, C]), Xb, y, progress=False)
    Xv = X[:10].copy()
    Xv[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"^X_val contains NaN or inf \(rows 4\)"):
        fit(MLP([F, 4, C]), X, y, X_val=Xv, y_val=y[:10], progress=False)
    with pytest.raises(ValueError, match="X_val has 3 features but the model takes 10"):
        fit(MLP([F, 4, C]), X, y, X_val=X[:, :3], y_val=y, progress=False)


def test_fit_labels_outside_the_outputs():
    """The classes are the model's outputs: a label outside is a ValueError
    naming the argument and the label (never extra outputs)."""
    X, y = _data()
    yb = y.copy()
    yb[11] = C
    with pytest.raises(ValueError, match=r"y must be in \[0, 3\) \(the model has 3 outputs\), "
                                         r"got the label 3"):
        fit(MLP([F, 4, C]), X, yb, progress=False)
    yv = y[:20].copy()
    yv[0] = 10**9
    with pytest.raises(ValueError, match="y_val must be in .* got the label 1000000000"):
        fit(MLP([F, 4, C]), X, y, X_val=X[:20], y_val=yv, progress=False)
    with pytest.raises(ValueError, match="y_val has 5 labels but X_val has 20 rows"):
        fit(MLP([F, 4, C]), X, y, X_val=X[:20], y_val=y[:5], progress=False)
    with pytest.raises(ValueError, match=r"y must be in \[0, 3\) .* got the label 3"):
        evaluate(MLP([F, 4, C]), X, yb)


def test_batch_larger_than_the_data_is_one_batch():
    """batch_size > n equals batch_size == n, bit for bit, and does not
    allocate for the larger size."""
    X, y = _data()
    a, b = MLP([F, 6, C], seed=2), MLP([F, 6, C], seed=2)
    fit(a, X, y, epochs=2, batch_size=N, progress=False)
    fit(b, X, y, epochs=2, batch_size=10**12, progress=False)
    assert np.array_equal(a.params, b.params)


@pytest.mark.parametrize("batch_size, exc, message", [
    (0, ValueError, "batch_size must be >= 1, got 0"),
    (-1, ValueError, "batch_size must be >= 1, got -1"),
    (1.5, TypeError, "batch_size must be an integer"),
    ("8", TypeError, "batch_size must be an integer"),
])
def test_forward_names_a_bad_batch_size(batch_size, exc, message):
    X, _ = _data()
    m = MLP([F, 4, C], seed=0)
    for f in (m.forward, m.predict, m.to_model().forward, m.to_model().predict):
        with pytest.raises(exc, match=message):
            f(X, batch_size=batch_size)


def test_predict_and_evaluate_name_non_finite_rows():
    """MLP.predict, Model.predict and evaluate agree: rows whose logits are
    not finite are a ValueError naming them, never a class."""
    X, y = _data()
    X = X[:20].copy()
    X[3] = np.nan
    X[15, 0] = np.inf
    m = MLP([F, 4, C], seed=0)
    for backend in ("fortran", "numpy"):
        logits = m.forward(X, backend=backend)
        assert not np.isfinite(logits[[3, 15]]).all(axis=1).any()
        for f in (m.predict, m.to_model().predict):
            with pytest.raises(ValueError, match=r"the logits of 2 row\(s\) are not finite "
                                                 r"\(rows 3, 15\)"):
                f(X, backend=backend)
        with pytest.raises(ValueError, match=r"rows 3, 15"):
            evaluate(m, X, y[:20], backend=backend)
