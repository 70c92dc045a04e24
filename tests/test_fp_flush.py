"""The training steps flush subnormal float results to zero (MXCSR.FTZ on
x86-64: pykd_fp_env.c, ~100x cheaper on Intel cores), and leave the mode as
they found it on every thread: inference keeps subnormals."""
import platform

import numpy as np
import pytest

import pykd
from pykd import _step
from pykd.config import TrainConfig
from pykd.layers import Dense

F32 = np.float32
TINY = np.finfo(F32).tiny
X86 = platform.machine().lower() in ("x86_64", "amd64")


def _adam_after_one_update(backend):
    n = 64
    p = np.ones(n, F32)
    g = np.full(n, 1e-20, F32)                 # g * g = 1e-40: subnormal
    s1, s2 = np.zeros(n, F32), np.zeros(n, F32)
    _step.apply_update(p, g, s1, s2, TrainConfig(optimizer="adam"), 1, backend=backend)
    return p, s1, s2


@pytest.mark.skipif(not X86, reason="FTZ is the x86-64 MXCSR's; elsewhere subnormals are kept")
def test_the_optimizer_update_flushes_subnormal_results():
    _, s1, s2 = _adam_after_one_update("fortran")
    _, t1, t2 = _adam_after_one_update("numpy")
    assert (0 < t2).all() and (t2 < TINY).all()         # the twin keeps (1 - beta2) g^2
    assert (s2 == 0).all()                              # the step flushed it
    np.testing.assert_allclose(s1, t1, rtol=1e-6)       # normal results as the twin's


def _subnormal_outputs(n):
    """A batch of n whose every output is 1e-20 * 1e-20 = 1e-40 (subnormal)."""
    model = pykd.Model([Dense(np.full((1, 1), 1e-20, F32), np.zeros(1, F32))])
    return model.forward(np.full((n, 1), 1e-20, F32))[:, 0]


@pytest.mark.parametrize("n", [1, 64, 4096])             # one thread, and the team's slices
def test_inference_after_training_keeps_subnormals(n):
    mlp = pykd.MLP([3, 4, 2], seed=0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 3)).astype(F32)
    y = rng.integers(0, 2, 256)
    pykd.train.fit(mlp, X, y, epochs=1, batch_size=32, progress=False)
    _adam_after_one_update("fortran")
    out = _subnormal_outputs(n)
    assert (out > 0).all() and (out < TINY).all()
