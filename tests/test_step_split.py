"""The training step in two halves (pykd._step.gradient_step + apply_update,
Fortran mlp_gradient + mlp_apply_update) for data-parallel training: the
split equals the one-call step bit for bit, shards of a batch add up to the
whole batch's gradient and loss, dropout draws by position in the global
batch, and the NumPy twins agree."""
import numpy as np
import pytest

from pykd import _step
from pykd._step import TrainConfig, Workspace, apply_update, gradient_step, train_step

SIZES = [13, 17, 11, 5]
ACTS = ["relu", "tanh", "identity"]

CASES = {
    "ce-adam": (TrainConfig(), None, False),
    "kd-adam": (TrainConfig(loss="kd", temperature=3.0, alpha=0.3), None, False),
    "ce-sgd-wd": (TrainConfig(optimizer="sgd", lr=0.05, weight_decay=1e-3), None, False),
    "dropout-sgd-mask": (TrainConfig(optimizer="sgd", lr=0.05, dropout=0.3, seed=5), None, True),
    "hint-dropout-mask": (TrainConfig(loss="kd", hint_layer=1, hint_weight=0.5, dropout=0.2,
                                      seed=3), (1, 4), True),
    "mse-adam": (TrainConfig(loss="mse"), None, False),
    "huber_kd-sgd": (TrainConfig(loss="huber_kd", huber_delta=0.5, alpha=0.4, optimizer="sgd",
                                 lr=0.02), None, False),
}


def problem(seed, cfg, hint, n=23):
    rng = np.random.default_rng(seed)
    P = _step.param_count(SIZES, hint)
    regress = cfg.loss in _step.REGRESSION_LOSSES
    return dict(
        p=(rng.standard_normal(P) * 0.3).astype(np.float32),
        x=rng.standard_normal((n, SIZES[0])).astype(np.float32),
        y=(rng.standard_normal((n, SIZES[-1])).astype(np.float32) if regress
           else rng.integers(0, SIZES[-1], n)),
        t=((rng.standard_normal((n, SIZES[-1])) * 2).astype(np.float32)
           if cfg.loss in ("kd", "mse_kd", "huber_kd") else None),
        h=None if hint is None else rng.standard_normal((n, hint[1])).astype(np.float32),
        mask=rng.random(P) > 0.3,
    )


def rows(pb, lo, hi):
    """The rows lo:hi of every per-sample array, as contiguous copies."""
    take = lambda a: None if a is None else np.ascontiguousarray(a[lo:hi])
    return take(pb["x"]), take(pb["y"]), take(pb["t"]), take(pb["h"])


def split_run(pb, cfg, backend, hint, use_mask, steps=3, cuts=None):
    """`steps` steps of gradient (summed over the shards cut at `cuts`) +
    update; returns params, the last summed gradient, state1, losses."""
    n = pb["x"].shape[0]
    cuts = [0, n] if cuts is None else cuts
    p = pb["p"].copy()
    g, s1, s2, part = (np.zeros_like(p) for _ in range(4))
    ws = Workspace(SIZES, 32, hint)
    mask = pb["mask"] if use_mask else None
    losses = []
    for st in range(1, steps + 1):
        g[...] = 0
        loss, correct = 0.0, 0
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            x, y, t, h = rows(pb, lo, hi)
            target = g if len(cuts) == 2 else part
            lo_loss, c = gradient_step(SIZES, ACTS, p, target, x, y, cfg, st, ws,
                                       teacher_logits=t, hint_target=h, n_global=n, first=lo,
                                       backend=backend)
            if target is part:
                g += part
            loss += lo_loss
            correct += c
        losses.append((loss, correct))
        apply_update(p, g, s1, s2, cfg, st, mask=mask, backend=backend)
    return p, g, s1, losses


def one_call_run(pb, cfg, backend, hint, use_mask, steps=3):
    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    ws = Workspace(SIZES, 32, hint)
    out = []
    for st in range(1, steps + 1):
        out.append(train_step(SIZES, ACTS, p, g, s1, s2, pb["x"], pb["y"], cfg, st, ws,
                              teacher_logits=pb["t"], hint_target=pb["h"],
                              mask=pb["mask"] if use_mask else None, backend=backend))
    return p, g, s1, out


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_split_equals_one_call_bit_for_bit(case, backend):
    cfg, hint, use_mask = CASES[case]
    pb = problem(1, cfg, hint)
    p1, g1, s1, o1 = one_call_run(pb, cfg, backend, hint, use_mask)
    p2, g2, s2, o2 = split_run(pb, cfg, backend, hint, use_mask)
    assert np.abs(p1 - pb["p"]).max() > 1e-4                # it did train
    assert o1 == o2
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(p1, p2)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_shards_add_up_to_the_whole_batch(case):
    """Three unequal shards (dropout drawn by global position) against the
    whole batch in one call: gradients and losses to float32 rounding, and
    the Fortran shards against their NumPy twins."""
    cfg, hint, use_mask = CASES[case]
    pb = problem(2, cfg, hint)
    cuts = [0, 5, 6, 23]
    pw, gw, _, ow = split_run(pb, cfg, "fortran", hint, use_mask, steps=2)
    ps, gs, _, os_ = split_run(pb, cfg, "fortran", hint, use_mask, steps=2, cuts=cuts)
    pn, gn, _, on = split_run(pb, cfg, "numpy", hint, use_mask, steps=2, cuts=cuts)
    scale = np.abs(gw).max()
    np.testing.assert_allclose(gs, gw, atol=1e-6 * scale, rtol=1e-5)
    np.testing.assert_allclose(gn, gs, atol=1e-6 * scale, rtol=1e-4)
    np.testing.assert_allclose([l for l, _ in os_], [l for l, _ in ow], rtol=1e-6)
    np.testing.assert_allclose([l for l, _ in on], [l for l, _ in os_], rtol=1e-5)
    assert [c for _, c in os_] == [c for _, c in ow] == [c for _, c in on]
    np.testing.assert_allclose(ps, pw, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(pn, ps, atol=1e-6, rtol=1e-4)


def test_dropout_shard_draws_the_global_rows():
    whole = _step.dropout_multipliers((10, 7), 0.4, 9, 3, 2)
    np.testing.assert_array_equal(_step.dropout_multipliers((4, 7), 0.4, 9, 3, 2, first=6),
                                  whole[6:])
    np.testing.assert_array_equal(_step.dropout_multipliers((10, 7), 0.4, 9, 3, 2, first=0),
                                  whole)


def test_dropout_shard_matters():
    """Without the global position a shard would draw the first rows' mask:
    with dropout, the gradient of the rows 5.. computed as a batch of their
    own differs from their share of the whole batch."""
    cfg = TrainConfig(dropout=0.5, seed=1)
    pb = problem(3, cfg, None)
    p = pb["p"].copy()
    ws = Workspace(SIZES, 32)
    x, y, _, _ = rows(pb, 5, 23)
    g_at5, g_at0 = np.zeros_like(p), np.zeros_like(p)
    gradient_step(SIZES, ACTS, p, g_at5, x, y, cfg, 1, ws, n_global=23, first=5)
    gradient_step(SIZES, ACTS, p, g_at0, x, y, cfg, 1, ws, n_global=23, first=0)
    assert np.abs(g_at5 - g_at0).max() > 1e-3


def test_gradient_step_leaves_params_alone():
    cfg = TrainConfig()
    pb = problem(4, cfg, None)
    p = pb["p"].copy()
    g = np.zeros_like(p)
    for backend in ("fortran", "numpy"):
        gradient_step(SIZES, ACTS, p, g, pb["x"], pb["y"], cfg, 1, Workspace(SIZES, 32),
                      backend=backend)
        np.testing.assert_array_equal(p, pb["p"])


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
def test_bad_shards_and_buffers(backend):
    cfg = TrainConfig()
    pb = problem(5, cfg, None)
    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    ws = Workspace(SIZES, 32)
    with pytest.raises(ValueError, match="does not lie in a global batch"):
        gradient_step(SIZES, ACTS, p, g, pb["x"], pb["y"], cfg, 1, ws, n_global=22,
                      backend=backend)
    with pytest.raises(ValueError, match="does not lie in a global batch"):
        gradient_step(SIZES, ACTS, p, g, pb["x"], pb["y"], cfg, 1, ws, n_global=30, first=8,
                      backend=backend)
    with pytest.raises(ValueError, match="state2 must be"):
        apply_update(p, g, s1, s2[:-1], cfg, 1, backend=backend)
    with pytest.raises(ValueError, match="mask must be"):
        apply_update(p, g, s1, s2, cfg, 1, mask=np.ones(3, bool), backend=backend)
    with pytest.raises(ValueError, match="step must be"):
        apply_update(p, g, s1, s2, cfg, 0, backend=backend)


def test_nonfinite_shard_loss():
    cfg = TrainConfig()
    pb = problem(6, cfg, None)
    p = pb["p"].copy()
    p[:3] = np.inf
    with pytest.raises(FloatingPointError):
        gradient_step(SIZES, ACTS, p, np.zeros_like(p), pb["x"], pb["y"], cfg, 1,
                      Workspace(SIZES, 32))


def test_split_copies_nothing():
    """With copy_report, f2py prints 'copied an array' on any hidden copy."""
    import subprocess
    import sys
    import textwrap
    try:
        from pykd._build_config import copy_report
    except ImportError:
        copy_report = False
    if not copy_report:
        pytest.skip("pykd was built without copy_report")
    code = textwrap.dedent("""
        import numpy as np
        from pykd import _step
        from pykd._step import TrainConfig, Workspace
        sizes, acts = [13, 17, 11, 5], ["relu", "tanh", "identity"]
        rng = np.random.default_rng(0)
        p = rng.standard_normal(_step.param_count(sizes)).astype(np.float32)
        g, s1, s2 = (np.zeros_like(p) for _ in range(3))
        x = rng.standard_normal((9, 13)).astype(np.float32)
        y = rng.integers(0, 5, 9)
        t = rng.standard_normal((9, 5)).astype(np.float32)
        ws = Workspace(sizes, 9)
        for cfg in (TrainConfig(dropout=0.2), TrainConfig(loss="kd", optimizer="sgd")):
            _step.gradient_step(sizes, acts, p, g, x[2:], y[2:], cfg, 1, ws,
                                teacher_logits=t[2:] if cfg.loss == "kd" else None,
                                n_global=9, first=2)
            _step.apply_update(p, g, s1, s2, cfg, 1, mask=rng.random(p.size) > 0.5)
            _step.apply_update(p, g, s1, s2, cfg, 2)
        print("done")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "done" in out.stdout
    assert "copied an array" not in out.stderr
