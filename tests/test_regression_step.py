"""Regression losses (MSE, Huber, and their distilled forms) in the fused
training step: Fortran against the NumPy twin, gradients against float64
finite differences, the distillation weights, and bad arguments."""
import numpy as np
import pytest

from pykd import _step
from pykd._step import TrainConfig, Workspace, train_step

SIZES = [9, 12, 10, 3]          # three outputs
ACTS = ["tanh", "relu", "identity"]


def problem(seed, n=21, sizes=SIZES, hint=None):
    rng = np.random.default_rng(seed)
    P = _step.param_count(sizes, hint)
    return dict(
        p=(rng.standard_normal(P) * 0.3).astype(np.float32),
        x=rng.standard_normal((n, sizes[0])).astype(np.float32),
        y=(rng.standard_normal((n, sizes[-1])) * 2).astype(np.float32),
        t=(rng.standard_normal((n, sizes[-1])) * 2).astype(np.float32),
        h=None if hint is None else rng.standard_normal((n, hint[1])).astype(np.float32),
        mask=rng.random(P) > 0.3,
    )


def run(pb, cfg, backend, steps=3, hint=None, use_mask=False, sizes=SIZES, acts=ACTS):
    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    ws = Workspace(sizes, 32, hint)
    out = []
    for st in range(1, steps + 1):
        out.append(train_step(sizes, acts, p, g, s1, s2, pb["x"], pb["y"], cfg, st, ws,
                              teacher_logits=pb["t"] if cfg.loss.endswith("_kd") else None,
                              hint_target=pb["h"], mask=pb["mask"] if use_mask else None,
                              backend=backend))
    return p, g, out


CASES = {
    "mse-adam": (TrainConfig(loss="mse"), None, False),
    "huber-adam": (TrainConfig(loss="huber", huber_delta=0.5), None, False),
    "mse-sgd": (TrainConfig(loss="mse", optimizer="sgd", lr=0.02, weight_decay=1e-3), None, False),
    "mse_kd": (TrainConfig(loss="mse_kd", alpha=0.3), None, False),
    "huber_kd-hint-dropout-mask": (TrainConfig(loss="huber_kd", alpha=0.6, huber_delta=2.0,
                                               hint_layer=1, hint_weight=0.5, dropout=0.2, seed=3),
                                   (1, 4), True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fortran_step_matches_numpy_twin(case):
    cfg, hint, use_mask = CASES[case]
    pb = problem(1, hint=hint)
    pf, gf, of = run(pb, cfg, "fortran", hint=hint, use_mask=use_mask)
    pn, gn, on = run(pb, cfg, "numpy", hint=hint, use_mask=use_mask)
    assert [c for _, c in of] == [c for _, c in on] == [0, 0, 0]
    np.testing.assert_allclose([l for l, _ in of], [l for l, _ in on], rtol=1e-5)
    np.testing.assert_allclose(gf, gn, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(pf, pn, atol=1e-6, rtol=2e-5)
    assert np.abs(pf - pb["p"]).max() > 1e-4          # it did train
    assert of[-1][0] < of[0][0]                       # and the loss went down


def _forward(sizes, acts, p, x):
    """The network's outputs in float64 (the formulas, not a kernel)."""
    h = x.astype(np.float64)
    for (w, b, s), a in zip(_step.layer_slices(sizes), acts):
        h = h @ p[w].reshape(s) + p[b]
        h = np.tanh(h) if a == "tanh" else (np.maximum(h, 0) if a == "relu" else h)
    return h


def loss64(p, pb, cfg, sizes, acts, hint=None):
    """The regression loss in float64, written from the formulas in docs/regression.md."""
    P = [(p[w].reshape(s), p[b]) for w, b, s in _step.layer_slices(sizes, hint)]
    h, hs = pb["x"].astype(np.float64), []
    for (W, b), a in zip(P, acts):
        h = h @ W + b
        h = np.tanh(h) if a == "tanh" else (np.maximum(h, 0) if a == "relu" else h)
        hs.append(h)

    def l(r):
        if cfg.loss.startswith("huber"):
            d = cfg.huber_delta
            return np.where(np.abs(r) <= d, 0.5 * r * r, d * (np.abs(r) - 0.5 * d)).mean()
        return (r * r).mean()

    y, t = pb["y"].astype(np.float64), pb["t"].astype(np.float64)
    L = cfg.alpha * l(h - y) + (1 - cfg.alpha) * l(h - t) if cfg.loss.endswith("_kd") else l(h - y)
    if hint:
        R, c = P[-1]
        L += cfg.hint_weight * ((hs[hint[0] - 1] @ R + c - pb["h"]) ** 2).mean()
    return L


FD_CASES = {
    "mse": (dict(loss="mse"), None),
    "huber-both-sides": (dict(loss="huber", huber_delta=1.5), None),
    "mse_kd": (dict(loss="mse_kd", alpha=0.25), None),
    "huber_kd-hint": (dict(loss="huber_kd", alpha=0.6, huber_delta=1.5, hint_layer=1,
                           hint_weight=0.4), (1, 3)),
}


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
@pytest.mark.parametrize("case", list(FD_CASES), ids=list(FD_CASES))
def test_gradient_matches_finite_differences(case, backend):
    # One SGD step with lr=1 and no momentum: grads holds exactly d loss / d p.
    kw, hint = FD_CASES[case]
    sizes, acts = [5, 6, 4], ["tanh", "identity"]
    pb = problem(3, n=9, sizes=sizes, hint=hint)
    cfg = TrainConfig(optimizer="sgd", lr=1.0, momentum=0.0, **kw)
    p0 = pb["p"].astype(np.float64)
    if cfg.loss.startswith("huber"):
        # Residuals on both sides of delta, none within 1e-4 of the kink.
        out = _forward(sizes, acts, pb["p"][:_step.param_count(sizes)], pb["x"])
        r = np.abs(out - pb["y"])
        assert (r < cfg.huber_delta).mean() > 0.2 and (r > cfg.huber_delta).mean() > 0.2
        assert np.abs(r - cfg.huber_delta).min() > 1e-4
    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    loss, _ = train_step(sizes, acts, p, g, s1, s2, pb["x"], pb["y"], cfg, 1,
                         Workspace(sizes, 16, hint), hint_target=pb["h"], backend=backend,
                         teacher_logits=pb["t"] if cfg.loss.endswith("_kd") else None)
    assert loss == pytest.approx(loss64(p0, pb, cfg, sizes, acts, hint), rel=1e-5)
    rng = np.random.default_rng(0)
    for i in rng.choice(p0.size, 16, replace=False):
        e = np.zeros_like(p0)
        e[i] = 1e-6
        fd = (loss64(p0 + e, pb, cfg, sizes, acts, hint)
              - loss64(p0 - e, pb, cfg, sizes, acts, hint)) / 2e-6
        assert g[i] == pytest.approx(fd, rel=2e-3, abs=2e-6), i


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
@pytest.mark.parametrize("base", ["mse", "huber"])
def test_distillation_weights(base, backend):
    """alpha = 1 is the plain loss on targets (the teacher is ignored, even if
    it holds inf); alpha = 0 is the plain loss on the teacher's outputs; in
    between the loss is the alpha-weighted sum."""
    pb = problem(5)
    sgd = dict(optimizer="sgd", lr=0.0, momentum=0.0)   # lr 0: parameters stay put

    def step(cfg, y, t=None):
        p = pb["p"].copy()
        g, s1, s2 = (np.zeros_like(p) for _ in range(3))
        loss, _ = train_step(SIZES, ACTS, p, g, s1, s2, pb["x"], y, cfg, 1, Workspace(SIZES, 32),
                             teacher_logits=t, backend=backend)
        return loss, g

    on_y = step(TrainConfig(loss=base, **sgd), pb["y"])
    on_t = step(TrainConfig(loss=base, **sgd), pb["t"])
    bad_t = np.full_like(pb["t"], np.inf)
    one = step(TrainConfig(loss=f"{base}_kd", alpha=1.0, **sgd), pb["y"], bad_t)
    zero = step(TrainConfig(loss=f"{base}_kd", alpha=0.0, **sgd), pb["y"] * np.inf, pb["t"])
    mix = step(TrainConfig(loss=f"{base}_kd", alpha=0.3, **sgd), pb["y"], pb["t"])
    assert one[0] == on_y[0] and np.array_equal(one[1], on_y[1])
    assert zero[0] == on_t[0] and np.array_equal(zero[1], on_t[1])
    assert mix[0] == pytest.approx(0.3 * on_y[0] + 0.7 * on_t[0], rel=1e-5)
    np.testing.assert_allclose(mix[1], 0.3 * on_y[1] + 0.7 * on_t[1], rtol=1e-4, atol=1e-7)


def test_mse_and_huber_values_by_hand():
    """A one-layer identity network with zero weights outputs its bias."""
    sizes, acts = [1, 2], ["identity"]
    p = np.array([0, 0, 1.0, -2.0], np.float32)        # W (1x2) = 0, b = (1, -2)
    x = np.zeros((2, 1), np.float32)
    y = np.array([[0.5, 1.0], [4.0, -2.0]], np.float32)  # residuals (0.5, -3), (-3, 0)
    want = {"mse": (0.25 + 9 + 9 + 0) / 4,
            "huber": (0.125 + (3 - 0.5) + (3 - 0.5) + 0) / 4}
    for loss, value in want.items():
        for backend in ("fortran", "numpy"):
            q = p.copy()
            g, s1, s2 = (np.zeros_like(q) for _ in range(3))
            cfg = TrainConfig(loss=loss, optimizer="sgd", lr=0.0, momentum=0.0)
            got, _ = train_step(sizes, acts, q, g, s1, s2, x, y, cfg, 1, Workspace(sizes, 2),
                                backend=backend)
            assert got == pytest.approx(value, rel=1e-6), (loss, backend)
            db = g[2:]
            if loss == "mse":
                np.testing.assert_allclose(db, [2 * (0.5 - 3) / 4, 2 * (-3 + 0) / 4], rtol=1e-6)
            else:
                np.testing.assert_allclose(db, [(0.5 - 1) / 4, (-1 + 0) / 4], rtol=1e-6)


def test_same_inputs_same_bits():
    pb = problem(4)
    cfg = TrainConfig(loss="huber_kd", alpha=0.5, dropout=0.25, seed=9)
    a = run(pb, cfg, "fortran", steps=4)[0]
    b = run(pb, cfg, "fortran", steps=4)[0]
    assert np.array_equal(a, b)


def test_nonfinite_target_leaves_params_untouched():
    pb = problem(5)
    y = pb["y"].copy()
    y[3, 1] = np.nan
    for backend in ("fortran", "numpy"):
        p = pb["p"].copy()
        g, s1, s2 = (np.zeros_like(p) for _ in range(3))
        with pytest.raises(FloatingPointError, match="not finite"):
            train_step(SIZES, ACTS, p, g, s1, s2, pb["x"], y, TrainConfig(loss="mse"), 1,
                       Workspace(SIZES, 32), backend=backend)
        assert np.array_equal(p, pb["p"]) and not s1.any()


def test_config_rejects_options_without_effect():
    with pytest.raises(ValueError, match="huber_delta=2.0 has no effect"):
        TrainConfig(loss="mse", huber_delta=2.0)
    with pytest.raises(ValueError, match="huber_delta=0.5 has no effect"):
        TrainConfig(loss="kd", huber_delta=0.5)
    with pytest.raises(ValueError, match="alpha=0.5 has no effect"):
        TrainConfig(loss="huber", alpha=0.5)
    with pytest.raises(ValueError, match="temperature=2.0 has no effect"):
        TrainConfig(loss="mse_kd", temperature=2.0)
    with pytest.raises(ValueError, match="huber_delta must be finite and > 0"):
        TrainConfig(loss="huber", huber_delta=0.0)
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="l1")
    TrainConfig(loss="huber_kd", huber_delta=0.1, alpha=0.9)      # all in use: fine


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
def test_bad_targets_and_teacher(backend):
    pb = problem(6)
    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    ws = Workspace(SIZES, 32)
    args = (SIZES, ACTS, p, g, s1, s2, pb["x"])
    mse, kd = TrainConfig(loss="mse"), TrainConfig(loss="mse_kd")
    bad = {
        "float64": pb["y"].astype(np.float64),
        "int labels": np.zeros(21, np.int64),
        "wrong width": pb["y"][:, :2].copy(),
        "wrong rows": pb["y"][:20].copy(),
        "not contiguous": np.asfortranarray(pb["y"]),
        "a list": pb["y"].tolist(),
    }
    for what, y in bad.items():
        with pytest.raises(ValueError, match=r"targets .* float32 array of shape \(21, 3\)"):
            train_step(*args, y, mse, 1, ws, backend=backend)
    with pytest.raises(ValueError, match="teacher_logits is required"):
        train_step(*args, pb["y"], kd, 1, ws, backend=backend)
    with pytest.raises(ValueError, match="teacher_logits must be a C-contiguous float32"):
        train_step(*args, pb["y"], kd, 1, ws, teacher_logits=pb["t"].astype(np.float64),
                   backend=backend)
    with pytest.raises(ValueError, match="teacher_logits must have 3 columns"):
        train_step(*args, pb["y"], kd, 1, ws, teacher_logits=pb["t"][:, :2].copy(),
                   backend=backend)
    assert np.array_equal(p, pb["p"]) and not s1.any()


def test_fortran_rejects_bad_shapes_directly():
    """The Fortran step checks shapes itself, not only the Python wrapper."""
    from pykd.kernels import _fortran
    from pykd import _codes
    pb = problem(7)
    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    ws = Workspace(SIZES, 32)
    acts = np.array([_codes.ACTIVATIONS[a] for a in ACTS], np.int32)

    def call(targets, loss="mse", teacher=None):
        return _fortran().mlp_train_step(
            sizes=ws.sizes, acts=acts, params=p, grads=g, state1=s1, state2=s2, x=pb["x"].T,
            labels=ws.no_labels, teacher=ws.placeholder if teacher is None else teacher.T,
            use_teacher=int(teacher is not None), hint_target=ws.placeholder, use_hint=0,
            mask=ws.no_mask, use_mask=0, targets=targets.T, loss_kind=_codes.LOSSES[loss],
            temperature=1.0, alpha=0.5, huber_delta=1.0, optimizer=1, lr=1e-3, beta1=0.9,
            beta2=0.999, eps=1e-8, momentum=0.9, weight_decay=0.0, dropout=0.0, seed=0,
            hint_layer=0, hint_weight=0.0, step=1, work=ws.work)[2]

    assert call(pb["y"]) == _codes.OK
    p[:] = pb["p"]
    assert call(pb["y"][:, :2].copy()) == _codes.ERR_ARG                 # wrong width
    assert call(pb["y"][:20].copy()) == _codes.ERR_ARG                   # wrong rows
    assert call(pb["y"], "mse_kd") == _codes.ERR_ARG                     # no teacher
    assert call(pb["y"], "mse_kd", pb["t"][:, :1].copy()) == _codes.ERR_ARG
    assert call(pb["y"], "huber_kd", pb["t"]) == _codes.OK


def test_regression_step_does_not_copy(tmp_path):
    """Targets, teacher outputs and hint targets reach Fortran without a copy
    (f2py's copy report, on in a copy_report build, stays silent)."""
    import subprocess
    import sys
    import textwrap
    from pykd import _build_config
    if not _build_config.copy_report:
        pytest.skip("pykd was built without copy_report")
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from pykd import _step
        sizes, acts, hint = [9, 12, 3], ["tanh", "identity"], (1, 4)
        rng = np.random.default_rng(0)
        r = lambda *s: rng.standard_normal(s).astype(np.float32)
        p = r(_step.param_count(sizes, hint)); g, s1, s2 = (np.zeros_like(p) for _ in range(3))
        ws = _step.Workspace(sizes, 64, hint)
        x, y, t, h = r(64, 9), r(64, 3), r(64, 3), r(64, 4)
        sys.stderr.write("@@ start\\n"); sys.stderr.flush()
        for i, loss in enumerate(["mse", "huber", "mse_kd", "huber_kd"], 1):
            cfg = _step.TrainConfig(loss=loss, hint_layer=1)
            _step.train_step(sizes, acts, p, g, s1, s2, x, y, cfg, i, ws, hint_target=h,
                             teacher_logits=t if loss.endswith("_kd") else None,
                             mask=rng.random(p.size) > 0.5)
        sys.stderr.flush()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "copied an array" not in proc.stderr.split("@@ start", 1)[1]
