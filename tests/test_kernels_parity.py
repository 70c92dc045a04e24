"""Fortran kernels vs their pure-NumPy twins (backend="fortran" vs "numpy").

Floating-point results are compared with float32 error bounds derived from
the magnitudes involved (a GEMM's bound grows with its reduction length);
results the spec defines exactly (int8 codes and scales, int32 products,
pruning masks with their tie rule) must be identical.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import pykd

pytestmark = pytest.mark.fortran

F32 = np.float32
EPS = float(np.finfo(F32).eps)          # 2**-23
TINY = float(np.finfo(F32).tiny)
ACTS = ("identity", "relu", "tanh")

HYP = settings(max_examples=30, deadline=None, database=None,
               phases=(Phase.explicit, Phase.generate, Phase.shrink),
               suppress_health_check=[HealthCheck.too_slow])

dims = st.integers(1, 96)
seeds = st.integers(0, 2**32 - 1)
magnitudes = st.sampled_from([1e-3, 1.0, 30.0])


def rand(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


def both(fn, *args, **kw):
    return fn(*args, backend="fortran", **kw), fn(*args, backend="numpy", **kw)


def assert_within(got, want, bound, what=""):
    """|got - want| <= bound elementwise (bound broadcastable)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all() and np.isfinite(want).all(), what
    err = np.abs(got - want)
    bound = np.broadcast_to(np.asarray(bound, np.float64), err.shape)
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{what}: {bad.sum()} of {err.size} entries differ beyond the bound; "
                             f"worst at {i}: got {got[i]!r} want {want[i]!r} bound {bound[i]!r}")


def gemm_bound(absprod, k):
    """Float32 error bound for two independent evaluations of a length-k dot
    product whose |terms| sum to `absprod` (each within ~k*eps of the truth)."""
    return 2.0 * (k + 4) * EPS * absprod + 4 * TINY


# --------------------------------------------------------------------- dense

def check_dense(n, n_in, n_out, act, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    x, W, b = rand(rng, (n, n_in), scale), rand(rng, (n_in, n_out)), rand(rng, n_out)
    yf, yn = both(pykd.dense, x, W, b, act)
    assert yf.dtype == F32 and yf.shape == (n, n_out)
    absprod = np.abs(x.astype(np.float64)) @ np.abs(W.astype(np.float64)) + np.abs(b)
    # relu and tanh are 1-Lipschitz; tanh itself may differ by an ulp or two.
    assert_within(yf, yn, gemm_bound(absprod, n_in) + 4 * EPS * np.abs(yn), f"dense {act}")
    return x, W, b, yf


def check_dense_backward(n, n_in, n_out, act, seed, need_dx):
    rng = np.random.default_rng(seed)
    x, W, b = rand(rng, (n, n_in)), rand(rng, (n_in, n_out)), rand(rng, n_out)
    y = pykd.dense(x, W, b, act, backend="numpy")
    dy = rand(rng, (n, n_out))
    (dxf, dWf, dbf), (dxn, dWn, dbn) = both(pykd.dense_backward, dy, x, W, y, act,
                                            need_dx=need_dx)
    # Both backends must agree on dz exactly up to rounding of dy * act'(y).
    y64 = y.astype(np.float64)
    dz = np.abs(dy.astype(np.float64)) * {"identity": 1.0, "relu": (y64 > 0),
                                          "tanh": np.abs(1 - y64 ** 2)}[act]
    dz_err = 2 * EPS * dz
    assert_within(dWf, dWn, gemm_bound(np.abs(x.T.astype(np.float64)) @ dz, n)
                  + np.abs(x.T) @ dz_err, f"dW {act}")
    assert_within(dbf, dbn, gemm_bound(dz.sum(axis=0), n) + dz_err.sum(axis=0), f"db {act}")
    if need_dx:
        assert dxf.shape == (n, n_in) and dxf.dtype == F32
        assert_within(dxf, dxn, gemm_bound(dz @ np.abs(W.T.astype(np.float64)), n_out)
                      + dz_err @ np.abs(W.T), f"dx {act}")
    else:
        assert dxf is None and dxn is None
    assert dWf.shape == W.shape and dbf.shape == (n_out,)


@HYP
@given(n=dims, n_in=dims, n_out=dims, act=st.sampled_from(ACTS), seed=seeds, scale=magnitudes)
def test_dense_forward_random(n, n_in, n_out, act, seed, scale):
    check_dense(n, n_in, n_out, act, seed, scale)


@HYP
@given(n=dims, n_in=dims, n_out=dims, act=st.sampled_from(ACTS), seed=seeds,
       need_dx=st.booleans())
def test_dense_backward_random(n, n_in, n_out, act, seed, need_dx):
    check_dense_backward(n, n_in, n_out, act, seed, need_dx)


ODD_SHAPES = [(1, 1, 1), (1, 7, 1023), (1, 1023, 7), (7, 1023, 1), (1023, 7, 7),
              (1023, 7, 64)]   # the last one is large enough for the OpenMP paths


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ACTS)
def test_dense_odd_sizes(shape, act):
    check_dense(*shape, act, seed=sum(shape))


@pytest.mark.parametrize("need_dx", [True, False], ids=["dx", "nodx"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ACTS)
def test_dense_backward_odd_sizes(shape, act, need_dx):
    check_dense_backward(*shape, act, seed=7 * sum(shape), need_dx=need_dx)


def test_dense_out_argument():
    rng = np.random.default_rng(3)
    x, W, b = rand(rng, (5, 9)), rand(rng, (9, 4)), rand(rng, 4)
    outs = {}
    for be in ("fortran", "numpy"):
        out = np.full((5, 4), np.nan, F32)
        res = pykd.dense(x, W, b, "tanh", out=out, backend=be)
        assert res is out
        outs[be] = out
    assert_within(outs["fortran"], outs["numpy"], 1e-5, "dense out=")


# ------------------------------------------------------------ softmax family

def softmax_inputs(rng, n, c, scale):
    return rand(rng, (n, c), scale)


@HYP
@given(n=dims, c=st.integers(1, 300), seed=seeds, scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
       T=st.sampled_from([0.05, 0.5, 1.0, 4.0, 100.0]))
def test_softmax_random(n, c, seed, scale, T):
    z = softmax_inputs(np.random.default_rng(seed), n, c, scale)
    pf, pn = both(pykd.softmax, z, T)
    assert pf.dtype == F32 and pf.shape == z.shape
    assert_within(pf, pn, 2e-5 * np.abs(pn) + 1e-7 + 2e-6 * c * EPS, f"softmax T={T}")
    lf, ln = both(pykd.log_softmax, z, T)
    assert_within(lf, ln, 1e-5 * (1 + np.abs(ln)), f"log_softmax T={T}")


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (1, 1023), (7, 1), (1023, 7), (64, 1023)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("T", [0.05, 1.0, 100.0])
def test_softmax_odd_sizes(shape, T):
    z = softmax_inputs(np.random.default_rng(shape[0] * 31 + shape[1]), *shape, 10.0)
    pf, pn = both(pykd.softmax, z, T)
    assert_within(pf, pn, 2e-5 * np.abs(pn) + 1e-7, "softmax")
    lf, ln = both(pykd.log_softmax, z, T)
    assert_within(lf, ln, 1e-5 * (1 + np.abs(ln)), "log_softmax")


@pytest.mark.parametrize("T", [1.0, 1e-35], ids=["neg-inf-logit", "tiny-T"])
def test_log_softmax_minus_inf_backends_agree(T):
    z = np.array([[0.0, -np.inf, 1.0]], F32) if T == 1.0 else np.array([[0.0, 1e4, 1.0]], F32)
    outcome = {}
    for be in ("fortran", "numpy"):
        try:
            with np.errstate(all="ignore"):
                outcome[be] = pykd.log_softmax(z, T, backend=be)
        except ValueError as exc:
            outcome[be] = f"ValueError: {exc}"
    f, n = outcome["fortran"], outcome["numpy"]
    assert type(f) is type(n), outcome
    if isinstance(f, np.ndarray):
        assert np.array_equal(np.isneginf(f), np.isneginf(n)), outcome
        finite = np.isfinite(n)
        np.testing.assert_allclose(f[finite], n[finite], rtol=1e-6)
    # softmax itself agrees (probability 0 is fine)
    pf, pn = both(pykd.softmax, z, T)
    assert np.array_equal(pf == 0, pn == 0)


# ---------------------------------------------------------------- the losses

def log_softmax64(z, T=1.0):
    s = z.astype(np.float64) / T
    s = s - s.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def check_losses(s, t, labels, T, alpha):
    n = s.shape[0]
    (lf, gf), (ln, gn) = both(pykd.cross_entropy, s, labels)
    assert isinstance(lf, np.float32) and gf.dtype == F32 and gf.shape == s.shape
    p1 = np.exp(log_softmax64(s))
    ce_terms = -log_softmax64(s)[np.arange(n), labels]
    assert_within(lf, ln, 4e-6 * (1 + np.abs(ce_terms).mean()) + 2e-6 * s.shape[1] * EPS,
                  "cross_entropy loss")
    assert_within(gf, gn, 4e-6 * (p1 + 1) / n, "cross_entropy grad")

    (lf, gf), (ln, gn) = both(pykd.kd_loss, s, t, labels, T, alpha)
    assert isinstance(lf, np.float32) and gf.dtype == F32 and gf.shape == s.shape
    logq, logp = log_softmax64(s, T), log_softmax64(t, T)
    q, p = np.exp(logq), np.exp(logp)
    # Magnitude of everything summed into the loss (cancellation-aware bound).
    mag = alpha * np.abs(ce_terms).mean() + \
        (1 - alpha) * T * T * (p * (np.abs(logp) + np.abs(logq))).sum() / n
    assert_within(lf, ln, 1e-5 * (1 + mag), f"kd_loss loss T={T} alpha={alpha}")
    gmag = (alpha * (p1 + 1) + (1 - alpha) * T * (q + p)) / n
    assert_within(gf, gn, 4e-6 * gmag + 1e-9, f"kd_loss grad T={T} alpha={alpha}")


@HYP
@given(n=dims, c=st.integers(1, 200), seed=seeds, scale=st.sampled_from([0.1, 1.0, 10.0]),
       T=st.sampled_from([0.5, 1.0, 2.0, 4.0, 20.0]),
       alpha=st.sampled_from([0.0, 0.1, 0.5, 1.0]) | st.floats(0, 1))
def test_losses_random(n, c, seed, scale, T, alpha):
    rng = np.random.default_rng(seed)
    s, t = rand(rng, (n, c), scale), rand(rng, (n, c), scale)
    labels = rng.integers(0, c, n)
    check_losses(s, t, labels, T, alpha)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (1, 1023), (7, 1), (1023, 7), (64, 1023)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("T,alpha", [(1.0, 0.0), (4.0, 0.1), (5.0, 1.0), (0.3, 0.7)])
def test_losses_odd_sizes(shape, T, alpha):
    n, c = shape
    rng = np.random.default_rng(n * 1000 + c)
    s, t = rand(rng, shape, 3.0), rand(rng, shape, 3.0)
    check_losses(s, t, rng.integers(0, c, n), T, alpha)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.int16])
def test_losses_accept_other_integer_labels(dtype):
    rng = np.random.default_rng(11)
    s, t = rand(rng, (6, 5)), rand(rng, (6, 5))
    y = rng.integers(0, 5, 6)
    for be in ("fortran", "numpy"):
        l64, g64 = pykd.kd_loss(s, t, y.astype(np.int64), 3.0, 0.4, backend=be)
        l, g = pykd.kd_loss(s, t, y.astype(dtype), 3.0, 0.4, backend=be)
        assert l == l64 and np.array_equal(g, g64)
        c64, h64 = pykd.cross_entropy(s, y.astype(np.int64), backend=be)
        c, h = pykd.cross_entropy(s, y.astype(dtype), backend=be)
        assert c == c64 and np.array_equal(h, h64)


# ---------------------------------------------------------------- optimizers

def run_optimizer(kind, shape, seed, steps, mask_p, wd, backend, **hp):
    rng = np.random.default_rng(seed)
    p = rand(rng, shape)
    mask = None if mask_p is None else rng.random(shape) > mask_p
    state = [np.zeros(shape, F32) for _ in range(1 if kind == "sgd" else 2)]
    if kind == "sgd":
        state[0][...] = rand(rng, shape, 0.1)      # a non-zero starting velocity
    grads = [rand(rng, shape) for _ in range(steps)]
    for i, g in enumerate(grads):
        if kind == "sgd":
            pykd.sgd_step(p, g, state[0], hp["lr"], hp["momentum"], wd, mask, backend=backend)
        else:
            pykd.adam_step(p, g, state[0], state[1], i + 1, hp["lr"], hp["beta1"], hp["beta2"],
                           hp["eps"], mask, weight_decay=wd, backend=backend)
    return p, state, mask


def check_optimizer(kind, shape, seed, mask_p, wd, steps=4, **hp):
    pf, sf, mask = run_optimizer(kind, shape, seed, steps, mask_p, wd, "fortran", **hp)
    pn, sn, _ = run_optimizer(kind, shape, seed, steps, mask_p, wd, "numpy", **hp)
    # Per-step rounding of O(1) quantities (params, gradients and the state
    # are all O(1) here; e.g. 1 - beta1 may be rounded in float32 or float64)
    # accumulates over a few steps; the state can cancel to near zero, so the
    # bound is on the scale of the terms, not of the result.
    tol = 5e-6 * steps
    assert_within(pf, pn, tol * (1 + np.abs(pn)), f"{kind} params")
    for a, b, name in zip(sf, sn, ("state0", "state1")):
        assert_within(a, b, tol * (1 + np.abs(b)), f"{kind} {name}")
    if mask is not None:
        for arr in [pf, pn, *sf, *sn]:
            assert np.all(arr[~mask] == 0), f"{kind}: masked entries not exactly zero"


SGD_HP = dict(lr=0.05, momentum=0.9)
ADAM_HP = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)


@HYP
@given(size=st.integers(1, 3000), seed=seeds, masked=st.booleans(),
       wd=st.sampled_from([0.0, 1e-4, 0.1]), momentum=st.sampled_from([0.0, 0.5, 0.9]))
def test_sgd_random(size, seed, masked, wd, momentum):
    check_optimizer("sgd", (size,), seed, 0.4 if masked else None, wd, lr=0.05, momentum=momentum)


@HYP
@given(size=st.integers(1, 3000), seed=seeds, masked=st.booleans(),
       wd=st.sampled_from([0.0, 1e-4, 0.1]), beta2=st.sampled_from([0.9, 0.999]))
def test_adam_random(size, seed, masked, wd, beta2):
    check_optimizer("adam", (size,), seed, 0.4 if masked else None, wd,
                    lr=0.01, beta1=0.9, beta2=beta2, eps=1e-8)


@pytest.mark.parametrize("shape", [(1,), (7,), (1023,), (3, 7), (1023, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("wd", [0.0, 0.01], ids=["wd0", "wd"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizers_odd_sizes(kind, shape, masked, wd):
    hp = SGD_HP if kind == "sgd" else ADAM_HP
    check_optimizer(kind, shape, seed=len(shape) * 97 + shape[0], mask_p=0.5 if masked else None,
                    wd=wd, **hp)


# ------------------------------------------------------------------- pruning

def tied_weights(rng, shape, n_values=4):
    """Many exact ties: small integers of either sign, and zeros."""
    return (rng.integers(-n_values, n_values + 1, shape)).astype(F32)


def assert_masks_equal(mf, mn, what):
    assert mf.dtype == np.bool_ and mn.dtype == np.bool_, what
    assert mf.shape == mn.shape, what
    if not np.array_equal(mf, mn):
        diff = np.flatnonzero(mf.ravel() != mn.ravel())
        raise AssertionError(f"{what}: masks differ at flat indices {diff[:10]}")


@HYP
@given(size=st.integers(1, 2000), seed=seeds, sparsity=st.floats(0, 1),
       tied=st.booleans(), ndim=st.integers(1, 3))
def test_magnitude_mask_single_random(size, seed, sparsity, tied, ndim):
    rng = np.random.default_rng(seed)
    shape = (size,) if ndim == 1 else (size, 3) if ndim == 2 else (2, size, 2)
    W = tied_weights(rng, shape) if tied else rand(rng, shape)
    mf, mn = both(pykd.magnitude_mask, W, sparsity)
    assert_masks_equal(mf, mn, f"single sparsity={sparsity}")


@HYP
@given(sizes=st.lists(st.integers(1, 600), min_size=1, max_size=4), seed=seeds,
       sparsity=st.floats(0, 1), tied=st.booleans())
def test_magnitude_mask_global_random(sizes, seed, sparsity, tied):
    rng = np.random.default_rng(seed)
    Ws = [tied_weights(rng, (s,)) if tied else rand(rng, (s,), 10.0 ** rng.integers(-2, 2))
          for s in sizes]
    mf, mn = both(pykd.magnitude_mask, Ws, sparsity)
    assert isinstance(mf, list) and len(mf) == len(Ws)
    for i, (a, b) in enumerate(zip(mf, mn)):
        assert_masks_equal(a, b, f"global W[{i}] sparsity={sparsity}")


@pytest.mark.parametrize("size", [1, 7, 1023, 40000])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("kind", ["random", "tied", "allzero", "allsame"])
def test_magnitude_mask_odd_sizes(size, sparsity, kind):
    rng = np.random.default_rng(size)
    W = {"random": lambda: rand(rng, (size,)), "tied": lambda: tied_weights(rng, (size,), 2),
         "allzero": lambda: np.zeros(size, F32),
         "allsame": lambda: np.where(rng.random(size) < 0.5, F32(-1.5), F32(1.5))}[kind]()
    mf, mn = both(pykd.magnitude_mask, W, sparsity)
    assert_masks_equal(mf, mn, f"single {kind}")
    # The same data split into a list must give the same decisions (list order
    # continues the flat order), on both backends.
    parts = np.array_split(W, 3) if size >= 3 else [W]
    gf, gn = both(pykd.magnitude_mask, [np.ascontiguousarray(a) for a in parts], sparsity)
    assert_masks_equal(np.concatenate(gf), mn, f"global {kind} (fortran) vs single")
    assert_masks_equal(np.concatenate(gn), mn, f"global {kind} (numpy) vs single")


# -------------------------------------------------------------- quantization

def check_quantize(W, per_channel):
    (qf, sf), (qn, sn) = both(pykd.quantize_int8, W, per_channel=per_channel)
    assert qf.dtype == np.int8 and sf.dtype == F32
    assert sf.shape == ((W.shape[1],) if per_channel else (1,))
    assert np.array_equal(sf.view(np.uint32), sn.view(np.uint32)), "scales differ bitwise"
    assert np.array_equal(qf, qn), f"q differs at {np.argwhere(qf != qn)[:5].tolist()}"
    df, dn = both(pykd.dequantize_int8, qf, sf)
    assert df.dtype == F32 and np.array_equal(df.view(np.uint32), dn.view(np.uint32))
    return qf, sf


def quant_weights(rng, shape, scale, zero_cols):
    W = rand(rng, shape, scale)
    if zero_cols:
        W[:, rng.random(shape[1]) < 0.3] = 0
    return W


@HYP
@given(n_in=dims, n_out=dims, seed=seeds, scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e3, 1e30]),
       per_channel=st.booleans(), zero_cols=st.booleans())
def test_quantize_int8_random(n_in, n_out, seed, scale, per_channel, zero_cols):
    W = quant_weights(np.random.default_rng(seed), (n_in, n_out), scale, zero_cols)
    check_quantize(W, per_channel)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (1023, 7), (7, 1023), (300, 200)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_quantize_int8_odd_sizes(shape, per_channel):
    rng = np.random.default_rng(shape[0] + 5 * shape[1])
    check_quantize(quant_weights(rng, shape, 1.0, True), per_channel)


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_quantize_int8_halfway_points(per_channel):
    # max|W| = 127 gives scale 1 exactly, so k + 0.5 is an exact tie.
    W = np.array([[127.0, -127.0], [0.5, -0.5], [1.5, -1.5], [2.5, -2.5], [126.5, -126.5]], F32)
    q, _ = check_quantize(W, per_channel)
    assert q[:, 0].tolist() == [127, 0, 2, 2, 126]
    assert q[:, 1].tolist() == [-127, 0, -2, -2, -126]


def check_activations(x):
    (qf, sf), (qn, sn) = both(pykd.quantize_activations, x)
    assert qf.dtype == np.int8 and sf.dtype == F32 and sf.shape == (x.shape[0],)
    assert np.array_equal(sf.view(np.uint32), sn.view(np.uint32)), "row scales differ bitwise"
    assert np.array_equal(qf, qn), f"qx differs at {np.argwhere(qf != qn)[:5].tolist()}"
    return qf, sf


@HYP
@given(n=dims, n_in=st.integers(1, 300), seed=seeds, scale=st.sampled_from([1e-3, 1.0, 1e3]),
       zero_rows=st.booleans())
def test_quantize_activations_random(n, n_in, seed, scale, zero_rows):
    rng = np.random.default_rng(seed)
    x = rand(rng, (n, n_in), scale)
    if zero_rows:
        x[rng.random(n) < 0.3] = 0
    check_activations(x)


@pytest.mark.parametrize("shape", [(1, 1), (1, 1023), (1023, 1), (1023, 40)],
                         ids=lambda s: "x".join(map(str, s)))
def test_quantize_activations_odd_sizes(shape):
    rng = np.random.default_rng(shape[0])
    x = np.maximum(rand(rng, shape, 2.0), 0)     # relu outputs: many exact zeros
    check_activations(x)


def int8_operands(rng, n, n_in, n_out, extreme=False):
    if extreme:
        qx = rng.choice(np.array([-127, 127], np.int8), (n, n_in))
        q = rng.choice(np.array([-127, 127], np.int8), (n_in, n_out))
    else:
        qx = rng.integers(-127, 128, (n, n_in), dtype=np.int8)
        q = rng.integers(-127, 128, (n_in, n_out), dtype=np.int8)
    return qx, q


@HYP
@given(n=dims, n_in=st.integers(1, 400), n_out=dims, seed=seeds, extreme=st.booleans())
def test_int8_gemm_random(n, n_in, n_out, seed, extreme):
    qx, q = int8_operands(np.random.default_rng(seed), n, n_in, n_out, extreme)
    af, an = both(pykd.int8_gemm, qx, q)
    assert af.dtype == np.int32 and af.shape == (n, n_out)
    assert np.array_equal(af, an)
    assert np.array_equal(af.astype(np.int64), qx.astype(np.int64) @ q.astype(np.int64))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 1023), (7, 1023, 1), (1023, 7, 7),
                                   (5, 1023, 9), (9, 13, 1023)],
                         ids=lambda s: "x".join(map(str, s)))
def test_int8_gemm_odd_sizes(shape):
    qx, q = int8_operands(np.random.default_rng(sum(shape)), *shape, extreme=shape[0] == 5)
    af, an = both(pykd.int8_gemm, qx, q)
    assert np.array_equal(af, an)
    assert np.array_equal(af.astype(np.int64), qx.astype(np.int64) @ q.astype(np.int64))


def check_int8_matmul(x, q, scale, b):
    yf, yn = both(pykd.int8_matmul, x, q, scale, b)
    assert yf.dtype == F32 and yf.shape == (x.shape[0], q.shape[1])
    qx, sx = pykd.quantize_activations(x, backend="numpy")
    acc = qx.astype(np.int64) @ q.astype(np.int64)
    mag = np.abs(acc) * (sx[:, None].astype(np.float64) * scale[None, :])
    if b is not None:
        mag = mag + np.abs(b)
    # The same handful of float32 operations on the same exact int32 sums.
    assert_within(yf, yn, 4 * EPS * mag + 4 * TINY, "int8_matmul")


@HYP
@given(n=dims, n_in=st.integers(1, 300), n_out=dims, seed=seeds, per_channel=st.booleans(),
       with_bias=st.booleans())
def test_int8_matmul_random(n, n_in, n_out, seed, per_channel, with_bias):
    rng = np.random.default_rng(seed)
    x, W = rand(rng, (n, n_in)), rand(rng, (n_in, n_out), 0.1)
    q, scale = pykd.quantize_int8(W, per_channel=per_channel, backend="numpy")
    check_int8_matmul(x, q, scale, rand(rng, n_out) if with_bias else None)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1023, 7), (7, 7, 1023), (1023, 7, 64)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_int8_matmul_odd_sizes(shape, per_channel):
    n, n_in, n_out = shape
    rng = np.random.default_rng(n + n_in + n_out)
    x, W = np.maximum(rand(rng, (n, n_in)), 0), rand(rng, (n_in, n_out))
    q, scale = pykd.quantize_int8(W, per_channel=per_channel)
    check_int8_matmul(x, q, scale, rand(rng, n_out))
    check_int8_matmul(x, q, scale, None)
