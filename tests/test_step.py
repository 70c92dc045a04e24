"""The whole training step (pykd._step): Fortran against its NumPy twin,
gradients against finite differences, and the failure modes."""
import numpy as np
import pytest

from pykd import _step
from pykd._step import TrainConfig, Workspace, train_step

SIZES = [13, 17, 11, 5]
ACTS = ["relu", "tanh", "identity"]


def problem(seed, n=23, sizes=SIZES, hint=None):
    rng = np.random.default_rng(seed)
    P = _step.param_count(sizes, hint)
    return dict(
        p=(rng.standard_normal(P) * 0.3).astype(np.float32),
        x=rng.standard_normal((n, sizes[0])).astype(np.float32),
        y=rng.integers(0, sizes[-1], n),
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
                              teacher_logits=pb["t"] if cfg.loss == "kd" else None,
                              hint_target=pb["h"], mask=pb["mask"] if use_mask else None,
                              backend=backend))
    return p, g, s1, out


CASES = {
    "ce-adam": (TrainConfig(), None, False),
    "kd-adam": (TrainConfig(loss="kd", temperature=3.0, alpha=0.3), None, False),
    "ce-sgd-wd": (TrainConfig(optimizer="sgd", lr=0.05, weight_decay=1e-3), None, False),
    "dropout": (TrainConfig(dropout=0.3, seed=5), None, False),
    "hint": (TrainConfig(loss="kd", hint_layer=2, hint_weight=0.5), (2, 7), False),
    "hint1-dropout-mask": (TrainConfig(loss="kd", hint_layer=1, hint_weight=0.5, dropout=0.2),
                           (1, 4), True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fortran_step_matches_numpy_twin(case):
    cfg, hint, use_mask = CASES[case]
    pb = problem(1, hint=hint)
    pf, gf, sf, of = run(pb, cfg, "fortran", hint=hint, use_mask=use_mask)
    pn, gn, sn, on = run(pb, cfg, "numpy", hint=hint, use_mask=use_mask)
    assert [c for _, c in of] == [c for _, c in on]
    np.testing.assert_allclose([l for l, _ in of], [l for l, _ in on], rtol=1e-5)
    np.testing.assert_allclose(gf, gn, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(pf, pn, atol=1e-6, rtol=2e-5)
    assert np.abs(pf - pb["p"]).max() > 1e-4          # it did train
    if use_mask:
        assert np.all(pf[~pb["mask"]] == 0) and np.all(sf[~pb["mask"]] == 0)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_dropout_on_a_wide_layer_matches_numpy_twin(p):
    # 32 x 1500 hidden units: the multipliers take the parallel, vectorized
    # path; p = 0.5 puts the keep/drop threshold exactly on a hash value.
    sizes, acts = [12, 1500, 5], ["relu", "identity"]
    pb = problem(4, n=32, sizes=sizes)
    cfg = TrainConfig(dropout=p, seed=11)
    pf, gf, _, of = run(pb, cfg, "fortran", steps=2, sizes=sizes, acts=acts)
    pn, gn, _, on = run(pb, cfg, "numpy", steps=2, sizes=sizes, acts=acts)
    np.testing.assert_allclose([l for l, _ in of], [l for l, _ in on], rtol=1e-5)
    np.testing.assert_allclose(gf, gn, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(pf, pn, atol=1e-6, rtol=2e-5)


@pytest.mark.parametrize("cfg,hint", [(TrainConfig(loss="kd", temperature=2.0, alpha=0.4), None),
                                      (TrainConfig(hint_layer=1, hint_weight=0.7), (1, 3))],
                         ids=["kd", "hint"])
def test_gradient_matches_finite_differences(cfg, hint):
    # One SGD step with lr=1, momentum 0: the update is exactly -grad. The
    # loss is recomputed in float64 by perturbing parameters (central differences).
    sizes, acts = [6, 5, 4], ["tanh", "identity"]
    pb = problem(3, n=7, sizes=sizes, hint=hint)
    cfg.optimizer, cfg.lr, cfg.momentum = "sgd", 1.0, 0.0
    p0 = pb["p"].astype(np.float64)

    def loss64(p):
        P = [(p[w].reshape(s), p[b]) for w, b, s in _step.layer_slices(sizes, hint)]
        h, hs = pb["x"].astype(np.float64), []
        for (W, b), a in zip(P, acts):
            h = h @ W + b
            h = np.tanh(h) if a == "tanh" else h
            hs.append(h)
        def logsm(z, T=1.0):
            z = z / T
            z = z - z.max(1, keepdims=True)
            return z - np.log(np.exp(z).sum(1, keepdims=True))
        n = h.shape[0]
        ce = -logsm(h)[np.arange(n), pb["y"]].mean()
        if cfg.loss == "kd":
            lp, lq = logsm(pb["t"].astype(np.float64), cfg.temperature), logsm(h, cfg.temperature)
            kl = (np.exp(lp) * (lp - lq)).sum() / n
            L = cfg.alpha * ce + (1 - cfg.alpha) * cfg.temperature ** 2 * kl
        else:
            L = ce
        if hint:
            R, c = P[-1]
            r = hs[hint[0] - 1] @ R + c - pb["h"]
            L += cfg.hint_weight * (r ** 2).mean()
        return L

    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    train_step(sizes, acts, p, g, s1, s2, pb["x"], pb["y"], cfg, 1, Workspace(sizes, 8, hint),
               teacher_logits=pb["t"] if cfg.loss == "kd" else None, hint_target=pb["h"])
    rng = np.random.default_rng(0)
    for i in rng.choice(p0.size, 12, replace=False):
        e = np.zeros_like(p0)
        e[i] = 1e-5
        fd = (loss64(p0 + e) - loss64(p0 - e)) / 2e-5
        assert g[i] == pytest.approx(fd, rel=2e-3, abs=2e-5), i


def test_same_seed_same_bits():
    pb = problem(4)
    cfg = TrainConfig(loss="kd", dropout=0.25, seed=9)
    a = run(pb, cfg, "fortran", steps=4)[0]
    b = run(pb, cfg, "fortran", steps=4)[0]
    assert np.array_equal(a, b)


def test_dropout_multipliers():
    m = _step.dropout_multipliers((64, 1200), 0.3, 7, 5, 1)
    assert abs((m == 0).mean() - 0.3) < 0.01
    assert set(np.unique(m)) == {np.float32(0), np.float32(1) / np.float32(0.7)}
    other = _step.dropout_multipliers((64, 1200), 0.3, 7, 6, 1)
    assert (m != other).mean() > 0.3                   # a new step, a new mask


def test_nonfinite_loss_leaves_params_untouched():
    pb = problem(5)
    p = pb["p"].copy()
    p[:5] = np.inf
    before = p.copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    for backend in ("fortran", "numpy"):
        with pytest.raises(FloatingPointError, match="not finite"):
            train_step(SIZES, ACTS, p, g, s1, s2, pb["x"], pb["y"], TrainConfig(), 1,
                       Workspace(SIZES, 32), backend=backend)
        assert np.array_equal(p, before, equal_nan=True)
        assert not s1.any()


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
def test_bad_step_arguments(backend):
    pb = problem(6)
    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    ws = Workspace(SIZES, 32)
    args = (SIZES, ACTS, p, g, s1, s2)
    with pytest.raises(ValueError, match="labels"):
        train_step(*args, pb["x"], pb["y"] + 5, TrainConfig(), 1, ws, backend=backend)
    with pytest.raises(ValueError, match="x must be"):
        train_step(*args, pb["x"].astype(np.float64), pb["y"], TrainConfig(), 1, ws,
                   backend=backend)
    with pytest.raises(ValueError, match="teacher_logits"):
        train_step(*args, pb["x"], pb["y"], TrainConfig(loss="kd"), 1, ws, backend=backend)
    with pytest.raises(ValueError, match="alpha"):
        TrainConfig(loss="kd", alpha=1.5)
    if backend == "fortran":
        big = np.zeros((40, SIZES[0]), np.float32)
        with pytest.raises(ValueError, match="workspace"):
            train_step(*args, big, np.zeros(40, np.int64), TrainConfig(), 1, ws)
