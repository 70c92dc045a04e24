"""NaN policy of the float kernels: the Fortran backend agrees with the NumPy twin.

Float layers propagate NaN (a NaN input gives NaN outputs where the twin has
them, never a confident 0); the kernels that reject non-finite logits (softmax,
the losses) and weights (pruning) keep rejecting them on both backends; the
optimizers carry NaN through unmasked entries and zero masked ones on both.
Comparisons are bit for bit where the twin's arithmetic is the same (relu,
the relu gradient, the optimizers) and NaN-position-exact otherwise.
"""

import numpy as np
import pytest

import pykd
from pykd import kernels

F32 = np.float32
NAN, INF = F32(np.nan), F32(np.inf)


def _nan_data(shape, seed, frac=0.2, specials=(NAN,)):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(F32)
    hit = rng.random(shape) < frac
    a[hit] = rng.choice(np.array(specials, F32), hit.sum())
    return a


def _same(a, b, signs=True, rtol=0):
    """The same NaN positions and the same other values (exactly, by default
    with the sign of zeros; sums starting from +0 make -0 terms +0)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    if rtol:
        np.testing.assert_allclose(a[ok], b[ok], rtol=rtol, atol=rtol)
        return
    np.testing.assert_array_equal(a[ok], b[ok])
    if signs:
        np.testing.assert_array_equal(np.signbit(a[ok]), np.signbit(b[ok]))


def both(fn, *args, **kw):
    return fn(*args, backend="fortran", **kw), fn(*args, backend="numpy", **kw)


@pytest.mark.parametrize("activation", ["identity", "relu", "tanh"])
@pytest.mark.parametrize("n", [1, 2, 64])  # sgemv, sgemm, an OpenMP-sized batch
def test_dense_forward_propagates_nan(activation, n):
    x = _nan_data((n, 37), 1, specials=(NAN, INF, -INF))
    x[0] = NAN  # an all-NaN row, as in the issue
    rng = np.random.default_rng(2)
    W = rng.standard_normal((37, 300)).astype(F32)
    b = rng.standard_normal(300).astype(F32)
    b[:5] = NAN
    f, r = both(pykd.dense, x, W, b, activation)
    assert np.isnan(f[0]).all() and np.isnan(f[:, :5]).all()
    if activation == "tanh":  # tanh's last bits may differ; NaN positions must not
        np.testing.assert_array_equal(np.isnan(f), np.isnan(r))
        np.testing.assert_allclose(np.nan_to_num(f), np.nan_to_num(r), atol=2e-6)
    else:
        _same(f, r)


def test_relu_forward_bias_nan_and_negative_zero():
    # The matmul sees only zeros, so every value comes from the bias: exact.
    x = np.zeros((3, 2), F32)
    W = np.zeros((2, 6), F32)
    b = np.array([NAN, -1, -0.0, 0.0, 2, -NAN], F32)
    f, r = both(pykd.dense, x, W, b, "relu")
    _same(f, r)
    assert np.isnan(f[:, [0, 5]]).all() and (f[:, 1] == 0).all() and (f[:, 4] == 2).all()


@pytest.mark.parametrize("activation", ["identity", "relu", "tanh"])
def test_dense_backward_propagates_nan(activation):
    rng = np.random.default_rng(3)
    n, n_in, n_out = 70, 9, 130  # more than one ROW_BLOCK of outputs
    x = rng.standard_normal((n, n_in)).astype(F32)
    W = rng.standard_normal((n_in, n_out)).astype(F32)
    y = pykd.dense(x, W, np.zeros(n_out, F32), activation, backend="numpy")
    y[5, :] = NAN  # a NaN forward output
    dy = _nan_data((n, n_out), 4, frac=0.05, specials=(NAN, INF, -INF))
    (dxf, dWf, dbf), (dxr, dWr, dbr) = both(pykd.dense_backward, dy, x, W, y, activation)
    # dz is dy * relu'(y) on both: NaN / inf in dy where the unit is off is NaN.
    for f, r in ((dbf, dbr), (dWf, dWr), (dxf, dxr)):
        np.testing.assert_array_equal(np.isnan(f), np.isnan(r))
        ok = ~np.isnan(f)
        np.testing.assert_allclose(f[ok], r[ok], rtol=1e-5, atol=1e-4)
    if activation == "relu":
        off = (y <= 0) & ~np.isnan(y)
        assert np.isnan(dy[off]).any()  # the case the old merge() hid
        col = np.nonzero((off & np.isnan(dy)).any(axis=0))[0]
        assert np.isnan(dbf[col]).all()


def test_relu_backward_bits_match_the_twin():
    """With n_in = 1 and x = 1, dW is dz summed exactly: the dz bits themselves."""
    dy = np.array([[1.5, -2.0, NAN, INF, -3.0, NAN, 4.0, -0.0]], F32)
    y = np.array([[1.0, 0.0, 0.0, -0.0, -1.0, 2.0, NAN, 3.0]], F32)
    x = np.ones((1, 1), F32)
    W = np.ones((1, 8), F32)
    (_, dWf, dbf), (_, dWr, dbr) = both(pykd.dense_backward, dy, x, W, y, "relu")
    _same(dbf, dbr, signs=False)
    _same(dWf, dWr, signs=False)
    with np.errstate(invalid="ignore"):
        expected = dy * (y > 0)
    _same(dbf, expected[0], signs=False)
    np.testing.assert_array_equal(np.isnan(dbf), [0, 0, 1, 1, 0, 1, 0, 0])


@pytest.mark.parametrize("fn", [pykd.softmax, pykd.log_softmax])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_softmax_rejects_nan_on_both_backends(fn, bad):
    z = np.random.default_rng(5).standard_normal((40, 7)).astype(F32)
    z[3, 2] = bad
    for backend in ("fortran", "numpy"):
        with pytest.raises(ValueError, match="NaN"):
            fn(z, 2.0, backend=backend)
    z[3, 2] = -INF  # a masked class is fine, and the same on both
    f, r = both(fn, z, 2.0)
    _same(f, r, rtol=1e-5)
    assert (f[3, 2] == 0) if fn is pykd.softmax else (f[3, 2] == -INF)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_losses_reject_nan_on_both_backends(alpha, where):
    rng = np.random.default_rng(6)
    s = rng.standard_normal((33, 5)).astype(F32)
    t = rng.standard_normal((33, 5)).astype(F32)
    labels = rng.integers(0, 5, 33)
    (s if where == "student" else t)[7, 1] = NAN
    for backend in ("fortran", "numpy"):
        if where == "teacher" and alpha == 1.0:
            # The teacher is not used: both ignore it, and agree.
            lf, _ = pykd.kd_loss(s, t, labels, 2.0, alpha, backend="fortran")
            lr, _ = pykd.kd_loss(s, t, labels, 2.0, alpha, backend="numpy")
            np.testing.assert_allclose(lf, lr, rtol=1e-5)
            continue
        with pytest.raises(ValueError, match="NaN"):
            pykd.kd_loss(s, t, labels, 2.0, alpha, backend=backend)
    if where == "student":
        for backend in ("fortran", "numpy"):
            with pytest.raises(ValueError, match="NaN"):
                pykd.cross_entropy(s, labels, backend=backend)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("masked", [False, True])
def test_optimizers_carry_nan_like_the_twin(opt, masked):
    n = 5000
    g = _nan_data(n, 7, frac=0.01, specials=(NAN, INF, -INF))
    rng = np.random.default_rng(8)
    p0 = rng.standard_normal(n).astype(F32)
    p0[::97] = NAN
    mask = rng.random(n) > 0.3 if masked else None
    out = {}
    for backend in ("fortran", "numpy"):
        p = p0.copy()
        s1 = np.zeros(n, F32)
        s2 = np.zeros(n, F32)
        for step in (1, 2):
            if opt == "sgd":
                pykd.sgd_step(p, g, s1, 0.1, 0.9, 0.01, mask, backend=backend)
            else:
                pykd.adam_step(p, g, s1, s2, step, 1e-3, mask=mask, weight_decay=0.01,
                               backend=backend)
        out[backend] = (p, s1, s2)
    # Adam's 1 - beta is rounded differently (float32 vs float64): last bits.
    for f, r in zip(out["fortran"], out["numpy"]):
        _same(f, r, rtol=0 if opt == "sgd" else 1e-6)
    p = out["fortran"][0]
    assert np.isnan(p).any()
    if masked:
        assert (p[~mask] == 0).all() and not np.signbit(p[~mask]).any()


def test_pruning_rejects_nan_on_both_backends():
    W = np.random.default_rng(9).standard_normal((20, 30)).astype(F32)
    W[4, 4] = NAN
    for backend in ("fortran", "numpy"):
        with pytest.raises(ValueError, match="NaN"):
            pykd.magnitude_mask(W, 0.5, backend=backend)
        with pytest.raises(ValueError, match="NaN"):
            pykd.magnitude_mask([W[:10], W[10:]], 0.5, backend=backend)


def test_selection_on_nan_returns_nan_instead_of_running_off_the_array():
    f = kernels._fortran()
    for a in (np.array([NAN], F32), np.array([3, NAN, 1, 2], F32), np.full(1000, NAN, F32)):
        kth, stat = f.prune_select(a.copy(), 1)
        assert stat == 0 and np.isnan(kth)
    a = np.array([3, 1, 2], F32)
    assert f.prune_select(a, 2) == (2, 0)
    # A NaN weight is kept, never counted as a tie at the threshold.
    mask = np.ones(4, np.int8)
    ties = f.prune_apply(np.array([NAN, 0.5, 2, 0.5], F32), F32(0.5), 1, mask)
    np.testing.assert_array_equal(mask, [1, 0, 1, 1])
    assert ties == 0


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_mlp_forward_of_a_nan_row_is_nan_on_both_backends(activation):
    """The issue's example end to end: an all-NaN input row gets NaN logits
    (not confident finite ones), the other rows are untouched."""
    from pykd.models import MLP

    m = MLP([6, 16, 16, 3], [activation, activation, "identity"], seed=3)
    x = np.random.default_rng(10).standard_normal((5, 6)).astype(F32)
    x[2] = NAN
    x[4, 1] = NAN
    f, r = m.forward(x, backend="fortran"), m.forward(x, backend="numpy")
    assert np.isnan(f[[2, 4]]).all() and np.isfinite(f[[0, 1, 3]]).all()
    np.testing.assert_array_equal(np.isnan(f), np.isnan(r))
    np.testing.assert_allclose(f[[0, 1, 3]], r[[0, 1, 3]], rtol=1e-5, atol=1e-6)
