"""The kernels against independent float64 references written here.

Nothing in this file uses pykd's NumPy twins as the oracle: gradients are
checked by central finite differences of losses coded here in float64,
optimizers against a float64 re-implementation of PyTorch's update rules,
pruning and quantization against their defining properties.
Both backends are checked.
"""
import math

import numpy as np
import pytest

import pykd

pytestmark = pytest.mark.fortran

F32 = np.float32
BACKENDS = ["fortran", "numpy"]
ACTS = ["identity", "relu", "tanh"]


# ------------------------------------------------------- float64 references

def act64(z, activation):
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "tanh":
        return np.tanh(z)
    return z


def dense_loss64(x, W, b, dy, activation):
    """L = sum(dy * act(x @ W + b)), all in float64."""
    return float(np.sum(dy * act64(x @ W + b, activation)))


def logsumexp64(a, axis=-1):
    m = np.max(a, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True))).squeeze(axis)


def log_softmax64(z, T=1.0):
    z = np.asarray(z, np.float64) / T
    return z - logsumexp64(z)[:, None]


def softmax64(z, T=1.0):
    return np.exp(log_softmax64(z, T))


def ce64(s, labels):
    s = np.asarray(s, np.float64)
    n = s.shape[0]
    return float(np.mean(logsumexp64(s) - s[np.arange(n), labels]))


def kd64(s, t, labels, T, alpha):
    """alpha * CE(s) + (1 - alpha) * T^2 * batch-mean KL(p_t(T) || p_s(T))."""
    n = s.shape[0]
    logp, logq = log_softmax64(t, T), log_softmax64(s, T)
    kl = float(np.sum(np.exp(logp) * (logp - logq))) / n
    return alpha * ce64(s, labels) + (1 - alpha) * T * T * kl


def central_diff(f, a, idx, h):
    a = a.copy()
    a[idx] += h
    fp = f(a)
    a[idx] -= 2 * h
    fm = f(a)
    return (fp - fm) / (2 * h)


def pick(rng, shape, k):
    flat = rng.choice(int(np.prod(shape)), size=min(k, int(np.prod(shape))), replace=False)
    return [np.unravel_index(i, shape) for i in flat]


# ------------------------------------------------------ dense: finite diffs

def dense_problem(seed, n=4, n_in=5, n_out=6, margin=0.1):
    """float32 inputs whose pre-activations stay at least `margin` from 0
    (so relu is differentiable there, also after a finite-difference step)."""
    rng = np.random.default_rng(seed)
    while True:
        x = rng.standard_normal((n, n_in)).astype(F32)
        W = (rng.standard_normal((n_in, n_out)) * 0.5).astype(F32)
        b = (rng.standard_normal(n_out) * 0.5).astype(F32)
        z = x.astype(np.float64) @ W + b
        if np.abs(z).min() > margin:
            dy = rng.standard_normal((n, n_out)).astype(F32)
            return rng, x, W, b, dy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_backward_finite_differences(activation, backend, seed):
    rng, x, W, b, dy = dense_problem(seed)
    y = pykd.dense(x, W, b, activation, backend=backend)
    # The forward pass itself against float64.
    x64, W64, b64, dy64 = (a.astype(np.float64) for a in (x, W, b, dy))
    np.testing.assert_allclose(y, act64(x64 @ W64 + b64, activation), rtol=1e-5, atol=1e-6)

    dx, dW, db = pykd.dense_backward(dy, x, W, y, activation, backend=backend)
    h = 1e-6
    for idx in pick(rng, x.shape, 6):
        fd = central_diff(lambda a: dense_loss64(a, W64, b64, dy64, activation), x64, idx, h)
        assert dx[idx] == pytest.approx(fd, rel=1e-4, abs=1e-5), ("dx", idx)
    for idx in pick(rng, W.shape, 6):
        fd = central_diff(lambda a: dense_loss64(x64, a, b64, dy64, activation), W64, idx, h)
        assert dW[idx] == pytest.approx(fd, rel=1e-4, abs=1e-5), ("dW", idx)
    for idx in pick(rng, b.shape, 4):
        fd = central_diff(lambda a: dense_loss64(x64, W64, a, dy64, activation), b64, idx, h)
        assert db[idx] == pytest.approx(fd, rel=1e-4, abs=1e-5), ("db", idx)

    # need_dx=False gives the same parameter gradients and no dx.
    dx2, dW2, db2 = pykd.dense_backward(dy, x, W, y, activation, need_dx=False, backend=backend)
    assert dx2 is None
    np.testing.assert_allclose(dW2, dW, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db2, db, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_relu_derivative_is_zero_where_output_is_zero(backend):
    x = np.array([[1.0, -1.0]], F32)
    W = np.array([[1.0, -1.0, 2.0], [1.0, 1.0, 0.0]], F32)    # z = [0, -2, 2]
    b = np.zeros(3, F32)
    y = pykd.dense(x, W, b, "relu", backend=backend)
    assert y.tolist() == [[0.0, 0.0, 2.0]]
    dx, dW, db = pykd.dense_backward(np.ones((1, 3), F32), x, W, y, "relu", backend=backend)
    assert db.tolist() == [0.0, 0.0, 1.0]
    assert dW.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]
    assert dx.tolist() == [[2.0, 0.0]]


# ------------------------------------------------- losses: finite diffs, hand

def loss_problem(seed, n=3, c=4, scale=2.0):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((n, c)) * scale).astype(F32)
    t = (rng.standard_normal((n, c)) * scale).astype(F32)
    return s, t, rng.integers(0, c, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_entropy_value_and_finite_differences(backend, seed):
    s, _, y = loss_problem(seed)
    loss, g = pykd.cross_entropy(s, y, backend=backend)
    s64 = s.astype(np.float64)
    assert float(loss) == pytest.approx(ce64(s64, y), rel=1e-5, abs=1e-6)
    for idx in np.ndindex(*s.shape):
        fd = central_diff(lambda a: ce64(a, y), s64, idx, 1e-6)
        assert g[idx] == pytest.approx(fd, rel=1e-4, abs=1e-6), idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,alpha", [(1.0, 0.0), (4.0, 0.1), (2.0, 0.5), (0.5, 0.9),
                                     (3.0, 1.0), (10.0, 0.0)])
def test_kd_loss_value_and_finite_differences(backend, T, alpha):
    s, t, y = loss_problem(int(T * 10 + alpha * 100))
    loss, g = pykd.kd_loss(s, t, y, T, alpha, backend=backend)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    assert float(loss) == pytest.approx(kd64(s64, t64, y, T, alpha), rel=1e-5, abs=1e-6)
    gscale = (alpha + (1 - alpha) * T) / s.shape[0]
    for idx in np.ndindex(*s.shape):
        fd = central_diff(lambda a: kd64(a, t64, y, T, alpha), s64, idx, 1e-6)
        assert g[idx] == pytest.approx(fd, rel=1e-4, abs=1e-6 * gscale), idx


def hand_kd_2x3(s, t, y, T, alpha):
    """The 2x3 case written out with math.exp/math.log, one term at a time."""
    total_ce = 0.0
    total_kl = 0.0
    for i in range(2):
        z = [float(v) for v in s[i]]
        u = [float(v) for v in t[i]]
        # hard term at T = 1
        lse = math.log(math.exp(z[0]) + math.exp(z[1]) + math.exp(z[2]))
        total_ce += lse - z[y[i]]
        # soft term at T
        zs = [v / T for v in z]
        us = [v / T for v in u]
        lse_s = math.log(math.exp(zs[0]) + math.exp(zs[1]) + math.exp(zs[2]))
        lse_t = math.log(math.exp(us[0]) + math.exp(us[1]) + math.exp(us[2]))
        for j in range(3):
            p = math.exp(us[j] - lse_t)
            total_kl += p * ((us[j] - lse_t) - (zs[j] - lse_s))
    return alpha * total_ce / 2 + (1 - alpha) * T * T * total_kl / 2


S23 = np.array([[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]], F32)
T23 = np.array([[0.5, 2.5, -1.0], [0.0, 1.0, 2.0]], F32)
Y23 = np.array([1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,alpha", [(1.0, 0.0), (1.0, 1.0), (1.0, 0.3), (2.0, 0.0), (4.0, 0.1),
                                     (4.0, 1.0), (0.5, 0.5)])
def test_kd_loss_hand_checked_2x3(backend, T, alpha):
    loss, _ = pykd.kd_loss(S23, T23, Y23, T, alpha, backend=backend)
    assert float(loss) == pytest.approx(hand_kd_2x3(S23, T23, Y23, T, alpha), rel=2e-6, abs=1e-7)


def test_hand_formula_sanity():
    # Guard the hand formula itself: KL of identical distributions is 0, and
    # alpha=1 is the plain mean cross-entropy.
    assert hand_kd_2x3(S23, S23, Y23, 3.0, 0.0) == pytest.approx(0.0, abs=1e-12)
    ce = (math.log(math.exp(1) + math.exp(2) + math.exp(0.5)) - 2
          + math.log(math.exp(-1) + 1 + math.exp(3)) - 3) / 2
    assert hand_kd_2x3(S23, T23, Y23, 5.0, 1.0) == pytest.approx(ce, rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_alpha_one_is_cross_entropy(backend):
    s, t, y = loss_problem(5, n=6, c=7)
    ce, gce = pykd.cross_entropy(s, y, backend=backend)
    for T in (1.0, 4.0):
        loss, g = pykd.kd_loss(s, t, y, T, 1.0, backend=backend)
        assert float(loss) == pytest.approx(float(ce), rel=1e-6)
        np.testing.assert_allclose(g, gce, rtol=1e-6, atol=1e-8)
        # The teacher has weight 0: changing it changes nothing.
        loss2, g2 = pykd.kd_loss(s, -3 * t, y, T, 1.0, backend=backend)
        assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
        np.testing.assert_allclose(g2, g, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1.0, 3.0, 7.5])
def test_kd_alpha_zero_gradient_formula(backend, T):
    s, t, y = loss_problem(int(T * 3), n=5, c=6)
    n = s.shape[0]
    loss, g = pykd.kd_loss(s, t, y, T, 0.0, backend=backend)
    want = (T / n) * (softmax64(s, T) - softmax64(t, T))
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
    # and it does not depend on the labels
    loss2, g2 = pykd.kd_loss(s, t, (y + 1) % s.shape[1], T, 0.0, backend=backend)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    np.testing.assert_allclose(g2, g, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_t1_is_plain_kl_plus_ce(backend):
    s, t, y = loss_problem(9, n=4, c=5)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    p, logp, logq = softmax64(t64), log_softmax64(t64), log_softmax64(s64)
    kl = float(np.sum(p * (logp - logq))) / 4
    for alpha in (0.0, 0.25, 1.0):
        loss, _ = pykd.kd_loss(s, t, y, 1.0, alpha, backend=backend)
        assert float(loss) == pytest.approx(alpha * ce64(s64, y) + (1 - alpha) * kl, rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_identical_logits_soft_term_vanishes(backend):
    s, _, y = loss_problem(4, n=5, c=8)
    loss, g = pykd.kd_loss(s, s.copy(), y, 4.0, 0.0, backend=backend)
    assert abs(float(loss)) < 1e-5
    assert np.abs(g).max() < 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_kd_loss_is_batch_mean_not_element_mean(backend):
    # Duplicating the batch must leave the loss unchanged and halve the gradient.
    s, t, y = loss_problem(8, n=3, c=10)
    l1, g1 = pykd.kd_loss(s, t, y, 4.0, 0.3, backend=backend)
    l2, g2 = pykd.kd_loss(np.vstack([s, s]), np.vstack([t, t]), np.concatenate([y, y]), 4.0, 0.3,
                          backend=backend)
    assert float(l2) == pytest.approx(float(l1), rel=1e-6)
    np.testing.assert_allclose(g2[:3], g1 / 2, rtol=1e-6, atol=1e-9)
    # and scales with the number of classes as a sum, not a mean:
    assert float(l1) == pytest.approx(kd64(s.astype(np.float64), t.astype(np.float64), y, 4.0, 0.3),
                                      rel=1e-5)


# ------------------------------------------------------------------ softmax

EXTREME = np.array([[1e4, -1e4, 0.0, 1e4 - 1.0],
                    [-1e4, -1e4, -1e4, -1e4],
                    [1e4, 1e4, 1e4, -1e4],
                    [0.0, 1e-3, -1e-3, 5.0]], F32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [0.05, 1.0, 100.0])
def test_softmax_stable_at_extremes(backend, T):
    z64 = EXTREME.astype(np.float64)
    p = pykd.softmax(EXTREME, T, backend=backend)
    assert p.dtype == F32 and p.shape == EXTREME.shape
    assert np.isfinite(p).all() and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1, dtype=np.float64), 1.0, atol=1e-5)
    np.testing.assert_allclose(p, softmax64(z64, T), rtol=1e-5, atol=1e-6)
    lp = pykd.log_softmax(EXTREME, T, backend=backend)
    assert np.isfinite(lp).all() and (lp <= 0).all()
    ref = log_softmax64(z64, T)
    np.testing.assert_allclose(lp, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_invariances(backend):
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((6, 9)) * 3).astype(F32)
    p = pykd.softmax(z, 2.0, backend=backend)
    np.testing.assert_allclose(pykd.softmax(z + F32(100), 2.0, backend=backend), p,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(pykd.softmax(z / F32(2), 1.0, backend=backend), p,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.exp(pykd.log_softmax(z, 2.0, backend=backend)), p,
                               rtol=1e-5, atol=1e-7)
    # docstring examples
    assert pykd.softmax(np.zeros((1, 2), F32), backend=backend).tolist() == [[0.5, 0.5]]
    np.testing.assert_allclose(pykd.log_softmax(np.zeros((1, 2), F32), backend=backend),
                               [[-math.log(2)] * 2], rtol=1e-7)
    loss, _ = pykd.cross_entropy(np.zeros((4, 10), F32), np.zeros(4, np.int64), backend=backend)
    assert float(loss) == pytest.approx(math.log(10), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_at_extreme_logits(backend):
    s = EXTREME
    t = EXTREME[::-1].copy()
    y = np.array([1, 0, 3, 2])
    for T in (0.05, 100.0):
        for alpha in (0.0, 0.5, 1.0):
            loss, g = pykd.kd_loss(s, t, y, T, alpha, backend=backend)
            assert np.isfinite(loss) and np.isfinite(g).all()
            want = kd64(s.astype(np.float64), t.astype(np.float64), y, T, alpha)
            assert float(loss) == pytest.approx(want, rel=1e-5)


# -------------------------------------------------------------- optimizers

def torch_sgd64(p, grads, lr, momentum, wd, v0):
    """PyTorch SGD (dampening 0, nesterov False), float64."""
    p = p.astype(np.float64).copy()
    buf = v0.astype(np.float64).copy()
    for g in grads:
        d = g + wd * p
        buf = momentum * buf + d
        p = p - lr * buf
    return p, buf


def torch_adam64(p, grads, lr, b1, b2, eps, wd):
    """PyTorch Adam (amsgrad False, L2 weight decay), float64."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for step, g in enumerate(grads, start=1):
        g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        denom = np.sqrt(v) / math.sqrt(bc2) + eps
        p = p - (lr / bc1) * m / denom
    return p, m, v


def opt_problem(seed, shape=(40,), steps=5):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(shape).astype(F32)
    grads = [rng.standard_normal(shape).astype(F32) for _ in range(steps)]
    mask = rng.random(shape) > 0.4
    return p, grads, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.05), (0.5, 1e-3)])
@pytest.mark.parametrize("shape", [(40,), (5, 8)], ids=["flat", "2d"])
def test_sgd_matches_pytorch_rule(backend, momentum, wd, shape):
    p0, grads, mask = opt_problem(1, shape)
    lr = 0.1
    p, vel = p0.copy(), np.zeros_like(p0)
    for g in grads:
        pykd.sgd_step(p, g, vel, lr, momentum, wd, backend=backend)
    want_p, want_v = torch_sgd64(p0, grads, lr, momentum, wd, np.zeros_like(p0))
    np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vel, want_v, rtol=1e-5, atol=1e-6)

    # Masked: pruned entries (and their velocity) exactly 0, the rest unchanged.
    p, vel = p0.copy(), np.zeros_like(p0)
    for g in grads:
        pykd.sgd_step(p, g, vel, lr, momentum, wd, mask, backend=backend)
    assert np.all(p[~mask] == 0) and np.all(vel[~mask] == 0)
    np.testing.assert_allclose(p[mask], want_p[mask], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vel[mask], want_v[mask], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b1,b2,wd", [(0.9, 0.999, 0.0), (0.9, 0.999, 0.01), (0.5, 0.9, 0.0),
                                      (0.0, 0.99, 0.1)])
@pytest.mark.parametrize("shape", [(40,), (5, 8)], ids=["flat", "2d"])
def test_adam_matches_pytorch_rule(backend, b1, b2, wd, shape):
    p0, grads, mask = opt_problem(2, shape)
    lr, eps = 0.01, 1e-8
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        pykd.adam_step(p, g, m, v, step, lr, b1, b2, eps, weight_decay=wd, backend=backend)
    want_p, want_m, want_v = torch_adam64(p0, grads, lr, b1, b2, eps, wd)
    np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m, want_m, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(v, want_v, rtol=1e-4, atol=1e-6)

    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for step, g in enumerate(grads, start=1):
        pykd.adam_step(p, g, m, v, step, lr, b1, b2, eps, mask, weight_decay=wd, backend=backend)
    for a in (p, m, v):
        assert np.all(a[~mask] == 0)
    np.testing.assert_allclose(p[mask], want_p[mask], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_first_step_moves_by_lr(backend):
    # With bias correction the first step is lr * sign(g) (up to eps).
    g = np.array([3.0, -0.02, 1e-3, -50.0], F32)
    p = np.zeros(4, F32)
    m, v = np.zeros(4, F32), np.zeros(4, F32)
    pykd.adam_step(p, g, m, v, 1, lr=0.1, backend=backend)
    np.testing.assert_allclose(p, -0.1 * np.sign(g), rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_mask_keeps_pruned_weights_pruned(backend):
    rng = np.random.default_rng(3)
    W = rng.standard_normal((20, 10)).astype(F32)
    mask = pykd.magnitude_mask(W, 0.7, backend=backend)
    W[~mask] = 0
    vel = np.zeros_like(W)
    m, v = np.zeros_like(W), np.zeros_like(W)
    W2 = W.copy()
    for step in range(1, 6):
        g = rng.standard_normal(W.shape).astype(F32)
        pykd.sgd_step(W, g, vel, 0.1, 0.9, 0.01, mask, backend=backend)
        pykd.adam_step(W2, g, m, v, step, 0.01, mask=mask, weight_decay=0.01, backend=backend)
    assert (W[~mask] == 0).all() and (vel[~mask] == 0).all()
    assert (W2[~mask] == 0).all() and (m[~mask] == 0).all() and (v[~mask] == 0).all()
    assert (W[mask] != 0).all() and (W2[mask] != 0).all()


# ------------------------------------------------------------------ pruning

def check_prune_properties(W, sparsity, mask):
    n = W.size
    k = round(sparsity * n)               # Python's round: half to even
    assert mask.shape == W.shape and mask.dtype == np.bool_
    assert int((~mask).sum()) == k
    mag = np.abs(W.astype(np.float64)).ravel()
    m = mask.ravel()
    if 0 < k < n:
        assert mag[~m].max() <= mag[m].min()
        # Tie rule: at the threshold, the pruned ones come first in C order.
        tau = mag[~m].max()
        at = np.flatnonzero(mag == tau)
        pruned_at = ~m[at]
        assert np.all(pruned_at[:pruned_at.sum()]), "ties not pruned in flat C order"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,sparsity,k", [(7, 0.5, 4), (5, 0.5, 2), (3, 0.5, 2), (1, 0.5, 0),
                                          (10, 0.25, 2), (10, 0.35, 4), (4, 1.0, 4), (4, 0.0, 0)])
def test_prune_count_is_round_half_even(backend, n, sparsity, k):
    assert round(sparsity * n) == k           # the spec's own arithmetic
    W = np.random.default_rng(n).standard_normal(n).astype(F32)
    mask = pykd.magnitude_mask(W, sparsity, backend=backend)
    assert int((~mask).sum()) == k
    check_prune_properties(W, sparsity, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.77, 0.9])
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros"])
def test_prune_properties(backend, sparsity, kind):
    rng = np.random.default_rng(int(sparsity * 100))
    shape = (13, 11)
    if kind == "normal":
        W = rng.standard_normal(shape).astype(F32)
    elif kind == "ties":
        W = rng.integers(-2, 3, shape).astype(F32)
    else:
        W = np.where(rng.random(shape) < 0.6, 0, rng.standard_normal(shape)).astype(F32)
    check_prune_properties(W, sparsity, pykd.magnitude_mask(W, sparsity, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prune_ties_in_c_order_then_list_order(backend):
    W = np.full((3, 4), 2.0, F32)
    W[0, 1] = -2.0
    mask = pykd.magnitude_mask(W, 0.5, backend=backend)
    assert mask.ravel().tolist() == [False] * 6 + [True] * 6
    a, b = np.full(3, -1.0, F32), np.full((2, 2), 1.0, F32)
    ma, mb = pykd.magnitude_mask([a, b], 4 / 7, backend=backend)
    assert ma.tolist() == [False, False, False]
    assert mb.tolist() == [[False, True], [True, True]]
    # the docstring example
    m = pykd.magnitude_mask(np.array([3., -1., 2., 0.5], F32), 0.5, backend=backend)
    assert m.tolist() == [True, False, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_vs_per_tensor_pruning(backend):
    rng = np.random.default_rng(4)
    tiny = (rng.standard_normal(100) * 1e-3).astype(F32)
    big = rng.standard_normal((10, 10)).astype(F32)
    g_tiny, g_big = pykd.magnitude_mask([tiny, big], 0.5, backend=backend)
    assert int((~g_tiny).sum()) + int((~g_big).sum()) == 100
    assert int((~g_tiny).sum()) >= 95         # mostly the tiny tensor
    assert int((~g_big).sum()) <= 5
    # The global threshold: every pruned magnitude <= every kept one, across tensors.
    mags = np.concatenate([np.abs(tiny), np.abs(big).ravel()])
    keep = np.concatenate([g_tiny, g_big.ravel()])
    assert mags[~keep].max() <= mags[keep].min()
    # Per tensor, each loses exactly half.
    assert int((~pykd.magnitude_mask(tiny, 0.5, backend=backend)).sum()) == 50
    assert int((~pykd.magnitude_mask(big, 0.5, backend=backend)).sum()) == 50
    # A one-element list is the single-tensor case.
    (only,) = pykd.magnitude_mask([big], 0.5, backend=backend)
    assert np.array_equal(only, pykd.magnitude_mask(big, 0.5, backend=backend))


# ------------------------------------------------------------- quantization

ULP_SLACK = 1.0 + 2 * float(np.finfo(F32).eps)


TINY = float(np.finfo(np.float32).tiny)


def check_roundtrip(W, q, scale, per_channel):
    assert q.dtype == np.int8 and q.shape == W.shape
    assert scale.dtype == F32 and scale.shape == ((W.shape[1],) if per_channel else (1,))
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    W64 = W.astype(np.float64)
    cols = np.abs(W64).max(axis=0) if per_channel else np.full(W.shape[1], np.abs(W64).max())
    s = np.broadcast_to(scale.astype(np.float64), (W.shape[1],))
    for j in range(W.shape[1]):
        if cols[j] == 0:
            assert s[j] == 1.0 and np.all(q[:, j] == 0)
        else:
            # max|w| / 127, clamped to the smallest normal float32.
            assert s[j] == pytest.approx(max(cols[j] / 127, TINY), rel=1e-7)
    err = np.abs(W64 - q.astype(np.float64) * s)
    # |W - q*scale| <= scale/2, with a little float slack (1/scale is float32).
    assert np.all(err <= s / 2 * ULP_SLACK + 1e-45), float((err / s).max())
    # The largest magnitude of each group maps to +-127 with its sign.
    groups = range(W.shape[1]) if per_channel else [None]
    for j in groups:
        Wg = W64 if j is None else W64[:, [j]]
        qg = q if j is None else q[:, [j]]
        if np.abs(Wg).max() / 127 >= TINY:
            i = np.unravel_index(np.argmax(np.abs(Wg)), Wg.shape)
            assert int(qg[i]) == int(127 * np.sign(Wg[i]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_quantize_roundtrip_bound(backend, per_channel, scale):
    rng = np.random.default_rng(int(math.log10(scale)) + 10)
    W = (rng.standard_normal((50, 12)) * scale * rng.uniform(0.1, 10, 12)).astype(F32)
    W[:, 3] = 0                          # an all-zero column
    W[7, 5] = -np.abs(W).max() * 1.5     # a negative global maximum
    q, s = pykd.quantize_int8(W, per_channel=per_channel, backend=backend)
    check_roundtrip(W, q, s, per_channel)
    d = pykd.dequantize_int8(q, s, backend=backend)
    np.testing.assert_array_equal(d, q.astype(F32) * s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_spec_examples_and_rounding(backend):
    q, s = pykd.quantize_int8(np.array([[1.0, -0.5]], F32), backend=backend)
    assert q.tolist() == [[127, -64]]         # -63.5 rounds half to even
    assert s.tolist() == [pytest.approx(1 / 127, rel=1e-7)]
    assert s[0] == np.float32(1) / np.float32(127)
    # bit-exact rule: q = rint(W * float32(1/scale))
    rng = np.random.default_rng(0)
    W = rng.standard_normal((30, 5)).astype(F32)
    for per_channel in (False, True):
        q, s = pykd.quantize_int8(W, per_channel=per_channel, backend=backend)
        amax = np.abs(W).max(axis=0) if per_channel else np.abs(W).max(keepdims=True).reshape(1)
        want_s = (amax / np.float32(127)).astype(F32)
        assert np.array_equal(s, want_s)
        inv = (np.float32(1) / want_s).astype(F32)
        want_q = np.clip(np.rint((W * inv).astype(F32)), -127, 127).astype(np.int8)
        assert np.array_equal(q, want_q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_all_zero(backend):
    W = np.zeros((4, 3), F32)
    for per_channel in (False, True):
        q, s = pykd.quantize_int8(W, per_channel=per_channel, backend=backend)
        assert np.all(q == 0) and np.all(s == 1)
    qx, sx = pykd.quantize_activations(W, backend=backend)
    assert np.all(qx == 0) and np.all(sx == 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_tiny_weights_keep_zero_at_zero(backend, request):
    # max|W| = 1e-38: max|W|/127 (~7.9e-41) is subnormal and its float32
    # reciprocal would overflow; the scale is clamped to the smallest normal
    # float32, so zeros stay 0, signs are kept and the round trip holds.
    W = np.array([[1e-38, 0.0], [0.0, -1e-38]], F32)
    with np.errstate(all="ignore"):
        q, s = pykd.quantize_int8(W, per_channel=True, backend=backend)
        qx, sx = pykd.quantize_activations(W, backend=backend)
    tiny = np.finfo(F32).tiny
    assert np.all(s == tiny) and np.all(sx == tiny)
    expect = int(np.rint(np.float32(1e-38) * (np.float32(1) / tiny)))
    assert q.tolist() == [[expect, 0], [0, -expect]]
    assert qx.tolist() == [[expect, 0], [0, -expect]]
    check_roundtrip(W, q, s, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_denormal_weights_scale_positive(backend):
    W = np.array([[1e-44, 0.0]], F32)
    with np.errstate(all="ignore"):
        q, s = pykd.quantize_int8(W, backend=backend)
    assert np.all(s > 0)
    pykd.dequantize_int8(q, s, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_activations_per_row(backend):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((8, 20)) * rng.uniform(0.01, 100, (8, 1))).astype(F32)
    x[2] = 0
    qx, sx = pykd.quantize_activations(x, backend=backend)
    assert sx.shape == (8,)
    # each row quantized on its own: same as quantizing the row's transpose as
    # a one-channel weight, and independent of the rest of the batch
    for i in range(8):
        qi, si = pykd.quantize_int8(np.ascontiguousarray(x[i][:, None]), backend=backend)
        assert np.array_equal(qi[:, 0], qx[i]) and si[0] == sx[i]
        q1, s1 = pykd.quantize_activations(np.ascontiguousarray(x[i:i + 1]), backend=backend)
        assert np.array_equal(q1[0], qx[i]) and s1[0] == sx[i]
    check_roundtrip(np.ascontiguousarray(x.T), np.ascontiguousarray(qx.T), sx, True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 5), (9, 300, 33), (4, 2000, 3)])
def test_int8_gemm_exact(backend, shape):
    n, n_in, n_out = shape
    rng = np.random.default_rng(n_in)
    qx = rng.integers(-127, 128, (n, n_in), dtype=np.int8)
    q = rng.integers(-127, 128, (n_in, n_out), dtype=np.int8)
    acc = pykd.int8_gemm(qx, q, backend=backend)
    assert acc.dtype == np.int32 and acc.shape == (n, n_out)
    assert np.array_equal(acc.astype(np.int64), qx.astype(np.int64) @ q.astype(np.int64))
    # worst case magnitude: every product is 127 * 127 (or -127 * 127)
    ones = np.full((2, n_in), 127, np.int8)
    qq = np.full((n_in, 2), -127, np.int8)
    qq[:, 1] = 127
    acc = pykd.int8_gemm(ones, qq, backend=backend)
    assert acc.tolist() == [[-127 * 127 * n_in, 127 * 127 * n_in]] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_gemm_largest_allowed_input(backend):
    n_in = 131071
    qx = np.full((1, n_in), -127, np.int8)
    q = np.full((n_in, 1), 127, np.int8)
    assert pykd.int8_gemm(qx, q, backend=backend)[0, 0] == -127 * 127 * n_in


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_int8_matmul_close_to_float(backend, per_channel, with_bias):
    rng = np.random.default_rng(7)
    n, n_in, n_out = 16, 64, 10
    x = rng.standard_normal((n, n_in)).astype(F32)
    W = (rng.standard_normal((n_in, n_out)) * rng.uniform(0.01, 1, n_out)).astype(F32)
    b = rng.standard_normal(n_out).astype(F32) if with_bias else None
    q, scale = pykd.quantize_int8(W, per_channel=per_channel, backend=backend)
    y = pykd.int8_matmul(x, q, scale, b, backend=backend)
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    exact = x64 @ W64 + (0 if b is None else b)
    # Independent error bound: |x - qx sx| <= sx/2, |W - q s| <= s/2 per entry.
    sx = np.abs(x64).max(axis=1) / 127
    s = np.abs(W64).max(axis=0) / 127 if per_channel else np.full(n_out, np.abs(W64).max() / 127)
    bound = (np.abs(x64) @ (np.ones_like(W64) * s[None, :]) / 2
             + (sx[:, None] / 2) * np.abs(W64).sum(axis=0)[None, :]
             + n_in * sx[:, None] * s[None, :] / 4)
    err = np.abs(y - exact)
    assert np.all(err <= bound * 1.001 + 1e-5 * np.abs(exact) + 1e-6)
    rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    assert rel < 0.03
    # and it is exactly the documented composition of the int8 steps
    qx, sxk = pykd.quantize_activations(x, backend=backend)
    acc = qx.astype(np.int64) @ q.astype(np.int64)
    comp = acc * (sxk[:, None].astype(np.float64) * scale[None, :]) + (0 if b is None else b)
    np.testing.assert_allclose(y, comp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_gemm_minus_128_never_wraps(backend):
    # One feature more than the int32-safe length is refused, not wrapped.
    with pytest.raises(ValueError, match="q has"):
        pykd.int8_gemm(np.full((1, 131072), -128, np.int8), np.full((131072, 1), -128, np.int8),
                       backend=backend)
    n_in = 131071                              # 131071 * 128**2 = 2**31 - 2**14
    qx = np.full((1, n_in), -128, np.int8)
    q = np.full((n_in, 1), -128, np.int8)
    exact = 128 * 128 * n_in
    acc = pykd.int8_gemm(qx, q, backend=backend)
    assert int(acc[0, 0]) == exact
    # int8_matmul: x quantizes to +-127, q = -128 => 127 * 128 * n_in > 2**31 - 1
    x = np.ones((1, n_in), F32)
    try:
        y = pykd.int8_matmul(x, q, np.ones(1, F32), backend=backend)
    except ValueError:
        return
    assert y[0, 0] == pytest.approx(-128.0 * n_in * (1 / 127) * 127, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_found_anywhere_in_a_large_array(backend, bad):
    # The Fortran check is a vectorized count, not an early-exit loop: put
    # the bad value in the vector body, at the ends and in a remainder lane.
    rng = np.random.default_rng(5)
    W0 = rng.standard_normal((300, 1037)).astype(F32)    # > PAR_MIN_WORK elements
    for pos in [(0, 0), (150, 517), (299, 1036), (7, 1035)]:
        W = W0.copy()
        W[pos] = bad
        for per_channel in (False, True):
            with pytest.raises(ValueError, match="W contains NaN or inf"):
                pykd.quantize_int8(W, per_channel=per_channel, backend=backend)
        x = W[:5].copy() if pos[0] < 5 else W[pos[0] - 4:pos[0] + 1].copy()
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            pykd.quantize_activations(x, backend=backend)
    # and the clean array passes
    q, s = pykd.quantize_int8(W0, backend=backend)
    assert q.shape == W0.shape and np.isfinite(s).all()
