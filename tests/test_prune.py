"""Pruning (issue 12): one-shot magnitude pruning (global, per layer, ties),
the Zhu & Gupta schedule against the hand formula, structured pruning
against the big model with the removed units zeroed, masks and optimizer
moments held exactly through fit (both backends), resume restoring the
mask and schedule bit for bit, TrainConfig's no-effect options, and the
CLI's --prune-* and --init."""
import json
import os
import signal

import numpy as np
import pytest

import pykd
from pykd import cli
from pykd.models import MLP, load_model
from pykd.train import (CheckpointError, TrainConfig, TrainingInterrupted, fit,
                        load_checkpoint)

pytestmark = pytest.mark.fortran

BACKENDS = ["fortran", "numpy"]
F, C = 10, 3


def _data(n=120, seed=0, n_features=F):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    X = (np.eye(C, n_features)[y] + 0.3 * rng.standard_normal((n, n_features)))
    return X.astype(np.float32), y.astype(np.int64)


def _model(sizes=(F, 12, 9, C), seed=1, backend="fortran"):
    return MLP(list(sizes), seed=seed, backend=backend)


def _zeros(m):
    return [int((W == 0).sum()) for W, _ in m.layers]


# ------------------------------------------------------------- one-shot

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9])
def test_global_prunes_the_smallest_magnitudes_overall(backend, s):
    m = _model(backend=backend)
    p = pykd.prune(m, s)
    allw = np.concatenate([np.abs(W).ravel() for W, _ in m.layers]).astype(np.float64)
    k = int(round(s * allw.size))
    assert sum(_zeros(p)) == k
    # independent reference: the k smallest |w| (no ties in random weights)
    cut = np.sort(allw)[k - 1] if k else -1.0
    for (W, b), (W0, b0) in zip(p.layers, m.layers):
        assert np.array_equal(W == 0, np.abs(W0) <= cut)
        assert np.array_equal(W[W != 0], W0[W != 0])       # survivors untouched
        assert np.array_equal(b, b0)                        # biases never pruned


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_scope_prunes_each_layer_to_the_sparsity(backend):
    m = _model(backend=backend)
    p = pykd.prune(m, 0.5, scope="layer")
    # round-half-even of 0.5 * (120, 108, 27)
    assert _zeros(p) == [60, 54, 14]
    for (W, _), (W0, _) in zip(p.layers, m.layers):
        a = np.abs(W0)
        assert a[W == 0].max() < a[W != 0].min()


def test_ties_are_broken_by_position():
    m = MLP([2, 3, 2], seed=None)
    m.layers[0][0][...] = 1.0
    m.layers[1][0][...] = -1.0
    g = pykd.prune(m, 0.5)                      # k = 6 of 12: all of layer 1 first
    assert _zeros(g) == [6, 0]
    lay = pykd.prune(m, 0.5, scope="layer")     # 3 of each: the first 3 in C order
    for W, _ in lay.layers:
        assert np.array_equal((W == 0).ravel(), [True] * 3 + [False] * 3)
    g2 = pykd.prune(m, 0.25)                    # k = 3: the first three of layer 1
    assert np.array_equal((g2.layers[0][0] == 0).ravel(), [True] * 3 + [False] * 3)


def test_prune_returns_a_new_model_and_records_the_step():
    m = _model()
    before = m.params.copy()
    p = pykd.prune(m.to_model(), 0.7)
    assert isinstance(p, MLP) and np.array_equal(m.params, before)
    assert p.params is not m.params
    step = p.metadata["compression"][-1]
    assert step["op"] == "prune" and step["sparsity"] == 0.7 and step["schedule"] == "oneshot"
    masks = pykd.weight_masks(p)
    assert [mk.shape for mk in masks] == [W.shape for W, _ in p.layers]
    assert sum(int((~mk).sum()) for mk in masks) == round(0.7 * 255)
    assert step["achieved_sparsity"] == pytest.approx(round(0.7 * 255) / 255)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(sparsity=1.0), ValueError, "sparsity"),
    (dict(sparsity=-0.1), ValueError, "sparsity"),
    (dict(sparsity=0.5, scope="row"), ValueError, "scope"),
    (dict(sparsity=0.5, schedule="gradual"), ValueError, "needs fine_tune"),
    (dict(sparsity=0.5, structured=True, scope="layer"), ValueError, "scope does not apply"),
    (dict(sparsity=0.5, fine_tune="yes"), TypeError, "FineTune"),
])
def test_bad_arguments(kw, err, msg):
    with pytest.raises(err, match=msg):
        pykd.prune(_model(), **kw)
    with pytest.raises(TypeError, match="pykd.MLP or pykd.Model"):
        pykd.prune(np.zeros(3), 0.5)


# ------------------------------------------------------------- schedule

def test_cubic_schedule_matches_the_hand_formula():
    s = pykd.PruneSchedule(0.9, 0.1, begin=10, end=50, every=10)
    # s_t = 0.9 + (0.1 - 0.9) (1 - (t - 10) / 40)^3
    want = {0: 0.0, 9: 0.0, 10: 0.1, 19: 0.1, 20: 0.9 - 0.8 * 0.75 ** 3, 25: 0.5625,
            30: 0.9 - 0.8 * 0.5 ** 3, 40: 0.9 - 0.8 * 0.25 ** 3, 49: 0.8875, 50: 0.9, 99: 0.9}
    for t, v in want.items():
        assert s.sparsity_at(t) == pytest.approx(v, abs=1e-15), t
    assert [t for t in range(60) if s.is_step(t)] == [10, 20, 30, 40, 50]
    u = pykd.PruneSchedule(0.5, every=10)               # end None: the run's last step
    assert [t for t in range(30) if u.is_step(t, 25)] == [0, 10, 20, 25]
    assert u.resolved(25).end == 25
    with pytest.raises(ValueError, match="initial"):
        pykd.PruneSchedule(0.5, 0.6)
    with pytest.raises(ValueError, match="end"):
        pykd.PruneSchedule(0.5, begin=10, end=5)
    with pytest.raises(ValueError, match="every"):
        pykd.PruneSchedule(0.5, every=0)
    with pytest.raises(ValueError, match="scope"):
        pykd.PruneSchedule(0.5, scope="rows")
    X, y = _data()
    with pytest.raises(ValueError, match=r"prune.end \(13\) is after the run's last "
                                         r"optimizer step \(12 = 3 epochs x 4 batches\)"):
        fit(_model(), X, y, epochs=3, batch_size=32, progress=False,
            prune=pykd.PruneSchedule(0.5, end=13))
    with pytest.raises(ValueError, match="begin"):
        fit(_model(), X, y, epochs=3, batch_size=32, progress=False,
            prune=pykd.PruneSchedule(0.5, begin=13))
    with pytest.raises(TypeError, match="PruneSchedule"):
        fit(_model(), X, y, epochs=1, progress=False, prune=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_fit_prunes_on_schedule_and_holds_weights_and_moments_at_zero(backend, scope,
                                                                       tmp_path):
    X, y = _data()
    m = _model(backend=backend)
    sizes = [W.size for W, _ in m.layers]
    N = sum(sizes)
    sched = pykd.PruneSchedule(0.8, 0.2, begin=2, end=9, every=3, scope=scope)
    seen = []

    def cb(info):      # after every step (and its pruning): count the zeros
        seen.append((info["step"], _zeros(m)))

    # 4 batches per epoch, 3 epochs: 12 steps; pruning after steps 2, 5, 8, 9
    hist = fit(m, X, y, cfg=TrainConfig(seed=3), epochs=3, batch_size=32, progress=False,
               backend=backend, prune=sched, callback=cb, checkpoint=tmp_path / "c.npz")
    def expect(t):
        s = sched.sparsity_at(t)
        if scope == "global":
            return round(s * N)
        return [round(s * n) for n in sizes]
    for t, z in seen:
        got = sum(z) if scope == "global" else z
        assert got == expect(t), (t, z)
    assert hist["sparsity"][-1] == pytest.approx(sum(seen[-1][1]) / N)
    arrays, meta = load_checkpoint(tmp_path / "c.npz")
    mask = np.unpackbits(arrays["mask"], count=arrays["params"].size).view(bool)
    assert meta["prune"] == sched.to_dict()
    off = ~mask
    assert off.sum() == sum(seen[-1][1])
    for k in ("params", "state1", "state2"):           # exactly zero, both moments
        assert not np.any(arrays[k][off]), k
    assert np.array_equal(mask[:m.parameters], m.params != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_masks_hold_through_fit_with_adam_moments_zero(backend, tmp_path):
    X, y = _data()
    p = pykd.prune(_model(backend=backend), 0.6, scope="layer")
    masks = pykd.weight_masks(p)
    a, b = p.copy(), p.copy()
    fit(a, X, y, epochs=2, batch_size=32, progress=False, backend=backend, mask=masks,
        checkpoint=tmp_path / "a.npz")
    flat = np.concatenate([np.concatenate([mk.ravel(), np.ones(bb.size, bool)])
                           for mk, (_, bb) in zip(masks, p.layers)])
    fit(b, X, y, epochs=2, batch_size=32, progress=False, backend=backend, mask=flat)
    assert np.array_equal(a.params, b.params)          # the list is the flat mask
    assert all(np.array_equal(x, z) for x, z in zip(pykd.weight_masks(a), masks))
    arrays, _ = load_checkpoint(tmp_path / "a.npz")
    assert not np.any(arrays["state1"][~flat]) and not np.any(arrays["state2"][~flat])
    assert np.any(arrays["state1"][flat])
    with pytest.raises(ValueError, match=r"mask\[1\] \(layer 2's W\)"):
        fit(p.copy(), X, y, epochs=1, progress=False, mask=[masks[0], masks[0], masks[2]])
    with pytest.raises(ValueError, match="one bool array per layer"):
        fit(p.copy(), X, y, epochs=1, progress=False, mask=masks[:2])


# ------------------------------------------------------------- resume

def _sched_run(ckpt, *, interrupt_at=None, resume=False, sched=None, backend="fortran"):
    X, y = _data()
    m = _model(backend=backend)
    sched = sched or pykd.PruneSchedule(0.7, 0.1, begin=1, every=2)

    def cb(info):
        if info["step"] == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
    hist = fit(m, X, y, cfg=TrainConfig(seed=3), epochs=3, batch_size=32, progress=False,
               backend=backend, prune=sched, checkpoint=ckpt, resume=resume,
               callback=cb if interrupt_at else None)
    return m, hist


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_restores_mask_and_schedule_bit_for_bit(backend, tmp_path):
    straight, h0 = _sched_run(tmp_path / "s.npz", backend=backend)
    with pytest.raises(TrainingInterrupted):
        _sched_run(tmp_path / "i.npz", interrupt_at=6, backend=backend)   # mid epoch 2
    arrays, meta = load_checkpoint(tmp_path / "i.npz")
    assert meta["step"] == 6 and meta["mask"] is True
    resumed, h1 = _sched_run(tmp_path / "i.npz", resume=True, backend=backend)
    assert np.array_equal(resumed.params, straight.params)
    assert h1["sparsity"] == h0["sparsity"] and h1["loss"] == h0["loss"]
    a, b = load_checkpoint(tmp_path / "s.npz")[0], load_checkpoint(tmp_path / "i.npz")[0]
    for k in ("params", "state1", "state2", "mask"):
        assert np.array_equal(a[k], b[k]), k


def test_resume_rejects_a_different_schedule_naming_the_field(tmp_path):
    with pytest.raises(TrainingInterrupted):
        _sched_run(tmp_path / "i.npz", interrupt_at=5)
    other = pykd.PruneSchedule(0.7, 0.1, begin=1, every=3)
    with pytest.raises(CheckpointError, match=r"prune\.every \(checkpoint 2, this run 3\)"):
        _sched_run(tmp_path / "i.npz", resume=True, sched=other)
    X, y = _data()
    with pytest.raises(CheckpointError, match="differs in: prune"):
        fit(_model(), X, y, cfg=TrainConfig(seed=3), epochs=3, batch_size=32, progress=False,
            checkpoint=tmp_path / "i.npz", resume=True)


def test_resume_rejects_a_mask_with_nonzero_pruned_weights(tmp_path):
    with pytest.raises(TrainingInterrupted):
        _sched_run(tmp_path / "i.npz", interrupt_at=5)
    arrays, meta = load_checkpoint(tmp_path / "i.npz")
    mask = np.unpackbits(arrays["mask"], count=arrays["params"].size).view(bool)
    arrays["params"][np.flatnonzero(~mask)[0]] = 0.5
    np.savez(tmp_path / "j.npz", meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             **arrays)
    with pytest.raises(CheckpointError, match="mask prunes .* are not zero"):
        _sched_run(tmp_path / "j.npz", resume=True)


# ------------------------------------------------------------- structured

@pytest.mark.parametrize("acts", [None, ["tanh", "relu", "identity"]])
def test_structured_equals_the_big_model_with_the_units_zeroed(acts):
    m = MLP([F, 12, 9, C], acts, seed=4)
    m.set_norm(0.1, 2.0)
    s = pykd.prune(m, 0.5, structured=True)
    assert s.sizes == [F, 6, 5, C]      # removed: round-half-even 6 of 12, 4.5 -> 4 of 9
    # independent reference: rank by the L2 norm of incoming weights and bias
    # (over the inputs still present), zero the removed units in the big model
    big = m.copy()
    keep_prev = np.arange(F)
    kept = []
    for layer in range(2):
        W, b = big.layers[layer]
        sub = W[keep_prev].astype(np.float64)
        norms = np.sqrt((sub ** 2).sum(axis=0) + b.astype(np.float64) ** 2)
        r = int(round(0.5 * W.shape[1]))
        removed = np.argsort(norms, kind="stable")[:r]
        W[:, removed] = 0
        b[removed] = 0
        keep_prev = np.setdiff1d(np.arange(W.shape[1]), removed)
        kept.append(keep_prev)
    assert s.metadata["compression"][-1]["kept_units"] == [k.tolist() for k in kept]
    X, _ = _data(50)
    np.testing.assert_allclose(s.forward(X), big.forward(X), rtol=1e-5, atol=1e-5)
    for layer in (1, 2):
        np.testing.assert_allclose(s.forward(X, upto=layer),
                                   big.forward(X, upto=layer)[:, kept[layer - 1]],
                                   rtol=1e-5, atol=1e-6)
    assert s.parameters < m.parameters and s.norm == m.norm
    with pytest.raises(ValueError, match="one-shot"):
        pykd.prune(m, 0.5, structured=True, schedule="gradual",
                   fine_tune=pykd.FineTune(X, np.zeros(50, np.int64), epochs=1))


def test_structured_keeps_at_least_one_unit():
    s = pykd.prune(MLP([4, 3, 2], seed=0), 0.95, structured=True)
    assert s.sizes == [4, 1, 2]


# ------------------------------------------------------------- fine-tuning

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradual_and_oneshot_fine_tuning_hold_the_sparsity(backend):
    X, y = _data(160)
    teacher = _model((F, 16, C), seed=7)
    fit(teacher, X, y, epochs=2, batch_size=32, progress=False)
    m = _model(backend=backend)
    ft = pykd.FineTune(X, y, teacher=teacher, epochs=2, lr=1e-3, batch_size=32)
    N = sum(W.size for W, _ in m.layers)
    for schedule in ("oneshot", "gradual"):
        p = pykd.prune(m, 0.8, schedule=schedule, fine_tune=ft)
        step = p.metadata["compression"][-1]
        assert sum(_zeros(p)) == round(0.8 * N), schedule
        assert step["history"]["sparsity"][-1] == pytest.approx(round(0.8 * N) / N)
        assert step["fine_tune"]["loss"] == "kd"
        assert not np.array_equal(p.layers[-1][1], m.layers[-1][1])   # it trained
    ce = pykd.prune(m, 0.5, fine_tune=pykd.FineTune(X, y, epochs=1, batch_size=32))
    assert ce.metadata["compression"][-1]["fine_tune"]["loss"] == "ce"
    assert sum(_zeros(ce)) == round(0.5 * N)


# ------------------------------------------------------------- TrainConfig

@pytest.mark.parametrize("kw, name", [
    (dict(hint_weight=0.5), "hint_weight"),
    (dict(temperature=3.0), "temperature"),
    (dict(alpha=0.3), "alpha"),
    (dict(momentum=0.5), "momentum"),
    (dict(optimizer="sgd", beta1=0.8), "beta1"),
    (dict(optimizer="sgd", beta2=0.9), "beta2"),
    (dict(optimizer="sgd", eps=1e-6), "eps"),
])
def test_trainconfig_rejects_options_without_effect(kw, name):
    with pytest.raises(ValueError, match=rf"TrainConfig: {name}=.* has no effect"):
        TrainConfig(**kw)


def test_trainconfig_defaults_agree_with_the_cli():
    c = TrainConfig(hint_layer=1)
    assert c.hint_weight == 1.0 and c.temperature == 5.0
    assert cli.DEMO["temperature"] == c.temperature
    import inspect
    assert inspect.signature(pykd.kd_loss).parameters["T"].default == 5.0
    # options with an effect, and defaults that do nothing, are fine
    TrainConfig(loss="kd", temperature=3.0, alpha=0.3, hint_layer=1, hint_weight=0.5)
    TrainConfig(optimizer="sgd", momentum=0.5)
    TrainConfig(optimizer="sgd")
    TrainConfig(loss="ce", temperature=5.0)
    import dataclasses
    with pytest.raises(ValueError, match="temperature"):
        dataclasses.replace(TrainConfig(loss="kd", temperature=2.0), loss="ce")


# ------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("prunecli")
    X, y = _data(160, 1)
    Xt, yt = _data(60, 2)
    np.savez(d / "small.npz", X_train=X, y_train=y, X_test=Xt, y_test=yt)
    return d


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv] + ["--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_teacher_and_distill_prune_while_training(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    # 160 rows / 32 = 5 steps per epoch, 2 epochs: 10 steps; end 8
    code, out, err = _run(["train-teacher", "--hidden", "16", "--epochs", "2", "--batch-size",
                           "32", "--data", "small.npz", "--out", "t.pykd", "--prune-to", "0.6",
                           "--prune-from", "0.2", "--prune-start", "2", "--prune-end", "8",
                           "--prune-every", "3", "--report", "t.json"], capsys)
    assert code == 0, err
    t = load_model("t.pykd")
    N = sum(W.size for W, _ in t.layers)
    assert N - t.nonzeros == round(0.6 * N)
    rep = json.load(open("t.json"))
    assert rep["models"][0]["config"]["prune"] == {"final": 0.6, "initial": 0.2, "begin": 2,
                                                   "end": 8, "every": 3, "scope": "global"}
    assert t.metadata["history"]["sparsity"][-1] == pytest.approx(round(0.6 * N) / N)
    # distill a student, then continue it (--init) while pruning it to 50%
    assert _run(["distill", "--teacher", "t.pykd", "--hidden", "8,6", "--epochs", "1",
                 "--data", "small.npz", "--out", "s.pykd"], capsys)[0] == 0
    code, out, err = _run(["distill", "--teacher", "t.pykd", "--init", "s.pykd", "--epochs",
                           "2", "--data", "small.npz", "--out", "s2.pykd", "--prune-to", "0.5",
                           "--prune-every", "2", "--lr", "1e-4"], capsys)
    assert code == 0, err
    s, s2 = load_model("s.pykd"), load_model("s2.pykd")
    assert s2.sizes == s.sizes == [F, 8, 6, C] and s2.norm == s.norm
    N = sum(W.size for W, _ in s2.layers)
    assert N - s2.nonzeros == round(0.5 * N)
    # --init really starts from s: one step at lr ~ 0 changes nothing but the zeros
    code, _, err = _run(["distill", "--teacher", "t.pykd", "--init", "s.pykd", "--epochs", "1",
                         "--hidden", "8,6", "--data", "small.npz", "--out", "s3.pykd",
                         "--lr", "1e-30"], capsys)
    assert code == 0, err
    np.testing.assert_allclose(load_model("s3.pykd").forward(_data(5)[0]),
                               s.forward(_data(5)[0]), atol=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["train-teacher", "--prune-from", "0.2"], "--prune-from needs --prune-to S"),
    (["train-teacher", "--prune-every", "3"], "--prune-every needs --prune-to"),
    (["train-teacher", "--prune-to", "0.3", "--prune-from", "0.5"],
     "--prune-from 0.5 must be <= --prune-to 0.3"),
    (["train-teacher", "--prune-to", "1"], "--prune-to: must be in [0, 1)"),
    (["train-teacher", "--prune-to", "0.5", "--prune-start", "5", "--prune-end", "2"],
     "--prune-end 2 must be >= --prune-start 5"),
    (["train-teacher", "--epochs", "1", "--prune-to", "0.5", "--prune-end", "99"],
     "--prune-end 99 is after the run's last optimizer step, 3"),
    (["train-teacher", "--momentum", "0.5"], "--momentum applies to --optimizer sgd only"),
    (["distill", "--teacher", "t.pykd", "--hint-weight", "0.5"],
     "--hint-weight needs --hint-student-layer"),
    (["distill", "--teacher", "t.pykd", "--init", "t.pykd", "--hidden", "3"],
     "t.pykd: the student's hidden layers are 16 but --hidden is 3"),
    (["distill", "--teacher", "t.pykd", "--init", "nothere.pykd"], "nothere.pykd"),
])
def test_cli_errors_are_one_line(work, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(work)
    if not os.path.exists("t.pykd"):
        assert _run(["train-teacher", "--hidden", "16", "--epochs", "1", "--data",
                     "small.npz", "--out", "t.pykd"], capsys)[0] == 0
    code, out, err = _run(argv + ["--data", "small.npz", "--out", "x.pykd"], capsys)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykd"), err
    assert message in lines[0], lines[0]
    assert not os.path.exists("x.pykd")
