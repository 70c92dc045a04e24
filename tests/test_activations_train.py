"""Training with sigmoid, gelu and silu (issue 14): the fused step against its
NumPy twin and float64 finite differences, fit on a small problem, and the
trained model's outputs through save / load and pure Fortran."""
import os

import numpy as np
import pytest

from kinds_helpers import act64
from pykd import MLP, fit, load_model
from pykd import _step
from pykd._step import TrainConfig, Workspace, train_step

NEW = ["sigmoid", "gelu", "silu"]
F32 = np.float32


def problem(seed, sizes, n):
    rng = np.random.default_rng(seed)
    P = _step.param_count(sizes)
    return dict(
        p=(rng.standard_normal(P) * 0.5).astype(F32),
        x=(rng.standard_normal((n, sizes[0])) * 1.5).astype(F32),
        y=rng.integers(0, sizes[-1], n),
        t=rng.standard_normal((n, sizes[-1])).astype(F32),
    )


def run(sizes, acts, pb, cfg, backend, steps=3):
    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    ws = Workspace(sizes, len(pb["x"]))
    labels = pb["t"] if cfg.loss == "mse" else pb["y"]
    losses = [train_step(sizes, acts, p, g, s1, s2, pb["x"], labels, cfg, st, ws,
                         backend=backend)[0] for st in range(1, steps + 1)]
    return p, g, losses


CASES = {
    "ce-adam": ([13, 17, 11, 5], TrainConfig()),
    "dropout-sgd": ([13, 17, 11, 5], TrainConfig(optimizer="sgd", lr=0.05, dropout=0.3, seed=4)),
    "mse": ([13, 17, 11, 5], TrainConfig(loss="mse")),
    # 256 x 1100 hidden units: the derivative's parallel path, several blocks a column
    "wide": ([12, 1100, 5], TrainConfig()),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("act", NEW)
def test_fortran_step_matches_numpy_twin(act, case):
    sizes, cfg = CASES[case]
    acts = [act] * (len(sizes) - 1)               # hidden layers and the output layer
    pb = problem(NEW.index(act), sizes, 256 if case == "wide" else 23)
    pf, gf, lf = run(sizes, acts, pb, cfg, "fortran")
    pn, gn, ln = run(sizes, acts, pb, cfg, "numpy")
    np.testing.assert_allclose(lf, ln, rtol=1e-5)
    np.testing.assert_allclose(gf, gn, atol=1e-6, rtol=1e-4)
    # Adam moves a weight whose gradient is near 0 by up to lr (1e-3) a step,
    # the sign set by rounding noise (the products' float32 sums differ
    # between OpenBLAS's kernels and NumPy's): a few in ten thousand weights
    # (2 of the wide net's 19805 on AMD Zen 4) may differ by up to 10% of a
    # step; the rest within float32 noise.
    off = ~np.isclose(pf, pn, atol=1e-6, rtol=2e-5)
    assert off.sum() <= max(1, 2e-4 * off.size), f"{off.sum()} of {off.size} parameters differ"
    np.testing.assert_allclose(pf, pn, atol=1e-4, rtol=2e-5)
    assert np.abs(pf - pb["p"]).max() > 1e-4          # it did train
    assert np.abs(gf).max() > 0


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("act", NEW)
def test_gradient_matches_finite_differences(act, loss):
    # One SGD step with lr=1 and no momentum leaves the gradient in g; the
    # loss is recomputed in float64 from the activations' definitions.
    sizes, acts = [6, 5, 4], [act, act]
    pb = problem(10 + NEW.index(act), sizes, 7)
    cfg = TrainConfig(loss=loss, optimizer="sgd", lr=1.0, momentum=0.0)
    p0 = pb["p"].astype(np.float64)

    def loss64(p):
        h = pb["x"].astype(np.float64)
        for (ws, bs, shape), a in zip(_step.layer_slices(sizes), acts):
            h = act64(h @ p[ws].reshape(shape) + p[bs], a)
        if loss == "mse":
            return ((h - pb["t"]) ** 2).mean()
        z = h - h.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -logp[np.arange(len(h)), pb["y"]].mean()

    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    labels = pb["t"] if loss == "mse" else pb["y"]
    train_step(sizes, acts, p, g, s1, s2, pb["x"], labels, cfg, 1, Workspace(sizes, 8))
    rng = np.random.default_rng(0)
    for i in rng.choice(p0.size, 16, replace=False):
        e = np.zeros_like(p0)
        e[i] = 1e-5
        fd = (loss64(p0 + e) - loss64(p0 - e)) / 2e-5
        assert g[i] == pytest.approx(fd, rel=2e-3, abs=2e-5), i


def rings(n, seed):
    """Two classes: inside / outside a circle (not linearly separable)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, (n, 2)).astype(F32)
    return X, (np.hypot(X[:, 0], X[:, 1]) > 1.3).astype(np.int64)


@pytest.mark.parametrize("act", NEW)
def test_fit_learns_and_round_trips(tmp_path, act):
    X, y = rings(600, 1)
    model = MLP([2, 24, 2], [act, act], seed=3)         # hidden and output layer
    before = (model.forward(X).argmax(1) == y).mean()
    fit(model, X, y, cfg=TrainConfig(lr=0.02), epochs=40, batch_size=32, progress=False,
        seed=0)
    out = model.forward(X)
    acc = (out.argmax(1) == y).mean()
    assert acc > 0.93 and acc > before + 0.2, (before, acc)
    model.save(tmp_path / "m.pykd")
    back = load_model(tmp_path / "m.pykd")
    assert isinstance(back, MLP) and back.activations == [act, act]
    assert np.array_equal(back.forward(X).view(np.uint32), out.view(np.uint32))


CLI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "build", "fortran", "tests", "fortran", "predict_cli")


@pytest.mark.skipif(not os.access(os.environ.get("PYKD_PREDICT_CLI") or CLI, os.X_OK),
                    reason="Fortran driver predict_cli not built (make test-fortran)")
def test_trained_model_fortran_parity(tmp_path):
    from test_fortran_parity import run_fortran, same_bits
    X, y = rings(300, 2)
    model = MLP([2, 16, 8, 2], ["gelu", "silu", "sigmoid"], seed=1)
    fit(model, X, y, cfg=TrainConfig(lr=0.02), epochs=3, batch_size=32, progress=False, seed=0)
    model.save(tmp_path / "m.pykd")
    got, _ = run_fortran(tmp_path, tmp_path / "m.pykd", X)
    assert same_bits(got, model.forward(X))


@pytest.mark.parametrize("act", NEW)
def test_split_step_equals_one_call_bit_for_bit(act):
    """mlp_gradient + mlp_apply_update (data parallelism) give the fused
    step's bits with the new activations too; shards add up to the batch."""
    sizes, acts = [13, 17, 11, 5], [act] * 3
    pb = problem(20, sizes, 24)
    cfg = TrainConfig(dropout=0.2, seed=3)
    one, _, _ = run(sizes, acts, pb, cfg, "fortran", steps=2)
    p = pb["p"].copy()
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    ws = Workspace(sizes, 24)
    for st in (1, 2):
        _step.gradient_step(sizes, acts, p, g, pb["x"], pb["y"], cfg, st, ws)
        _step.apply_update(p, g, s1, s2, cfg, st)
    assert np.array_equal(p, one)
    whole, half = np.zeros_like(p), np.zeros_like(p)
    _step.gradient_step(sizes, acts, p, whole, pb["x"], pb["y"], cfg, 3, ws)
    for lo, hi in ((0, 10), (10, 24)):
        part = np.zeros_like(p)
        _step.gradient_step(sizes, acts, p, part, pb["x"][lo:hi], pb["y"][lo:hi], cfg, 3, ws,
                            n_global=24, first=lo)
        half += part
    np.testing.assert_allclose(half, whole, atol=1e-7, rtol=1e-5)
