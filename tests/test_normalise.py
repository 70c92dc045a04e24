"""The network's input normalisation, (x - mean) / std in float32, against
NumPy's float32 division bit for bit, on values spread over the float32
range, subnormal and overflowing quotients, 0, inf and NaN, at batch sizes
on either side of the team and vector paths (through a one-layer identity
model: y = xn exactly). A faster form must keep these bits: multiplying by
a float32 reciprocal changes ~28% of the quotients here (a float64 one
none, but it was no faster on ymm: docs/performance.md, "Tried and not
kept")."""
import numpy as np
import pytest

import pykd
from pykd.layers import Dense

F32 = np.float32


def _wide(rng, shape, lo=-40, hi=40):
    """Float32 values of random sign, significand and exponent 2**lo..2**hi."""
    mant = rng.uniform(1, 2, shape)
    return (np.where(rng.random(shape) < 0.5, -1, 1) * mant
            * np.exp2(rng.integers(lo, hi, shape))).astype(F32)


def _identity_model(n, mean, std):
    # y_j = sum_i xn_i * I_ij + 0: every term but xn_j * 1 is +-0, so y = xn
    # exactly for finite xn (a -0 may come out +0: compared by value).
    return pykd.Model([Dense(np.eye(n, dtype=F32), np.zeros(n, F32))], norm=(mean, std))


def _twin(x, mean, std):
    with np.errstate(all="ignore"):
        return (x - mean) / std


@pytest.mark.parametrize("batch", [1, 7, 8, 64, 300])
def test_normalise_equals_the_float32_division(batch):
    rng = np.random.default_rng([batch, 7])
    n = 96
    mean = _wide(rng, n, -30, 30)
    std = np.abs(_wide(rng, n, -60, 60))
    x = _wide(rng, (batch, n), -30, 30)
    x[:, ::5] = mean[::5]                     # d = 0
    tiny = slice(1, None, 7)                  # subnormal quotients: small d, large std
    mean[tiny] = 0
    std[tiny] = np.abs(_wide(rng, len(std[tiny]), 40, 60))
    x[:, tiny] = _wide(rng, (batch, len(std[tiny])), -100, -80)
    model = _identity_model(n, mean, std)
    want = _twin(x, mean, std)
    assert np.isfinite(want).all()
    assert (np.abs(want[want != 0]) < np.finfo(F32).tiny).any()       # subnormal quotients
    got = model.forward(x)
    assert np.array_equal(got, want)


def test_normalise_many_random_quotients():
    # 2 million quotients with close-to-midpoint cases likely among them.
    rng = np.random.default_rng(11)
    n = 512
    mean = np.zeros(n, F32)
    std = rng.uniform(1, 2, n).astype(F32)
    x = rng.uniform(-4, 4, (4096, n)).astype(F32)
    model = _identity_model(n, mean, std)
    assert np.array_equal(model.forward(x), _twin(x, mean, std))


def test_normalise_overflow_inf_nan_bits():
    # Outputs that are inf or NaN would turn the identity product's other
    # terms into NaN, so these go through a 1 x 1 model (y = xn * 1 + 0);
    # a model's std is finite and > 0, its inputs anything.
    cases = np.array([3e38, -3e38, np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, 3e-39], F32)
    stds = np.array([1e-30, 1e-30, 2.0, 0.5, 3.0, 1.5, 1.5, 1e10, 3.0], F32)
    for batch in (1, 16):
        for v, s in zip(cases, stds):
            model = pykd.Model([Dense(np.ones((1, 1), F32), np.zeros(1, F32))],
                               norm=(np.zeros(1, F32), np.array([s], F32)))
            x = np.full((batch, 1), v, F32)
            got = model.forward(x)[:, 0]
            want = _twin(x[:, 0], F32(0), s)
            assert np.array_equal(np.isnan(got), np.isnan(want)), (v, s)
            ok = ~np.isnan(want)
            assert np.array_equal(got[ok], want[ok] + F32(0)), (v, s, got, want)
