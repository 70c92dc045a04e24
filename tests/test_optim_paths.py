"""Adam's CPU paths (fortran/kernels/pykd_optim_simd.c: portable, avx2,
avx512) give the same bits: each path the CPU has runs in a process of its
own (PYKD_OPTIM_PATH), on 1 and 2 threads, and every result must equal the
Fortran loop of the masked update with every entry kept (an independent
implementation of the same float32 operations) bit for bit, and a float64
evaluation of the formula to rounding. A whole training step must give the
same bits on every path too."""
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kinds_helpers import run_on_path  # noqa: E402

PATHS = ("portable", "avx2", "avx512")
# sizes around the vector widths and the 16-float shares, and one large
# enough for the OpenMP split (PAR_MIN_OPT = 32768)
SIZES = (1, 7, 8, 15, 16, 17, 33, 1000, 40_001)
SETTINGS = ({}, {"weight_decay": 1e-2, "lr": 3e-3, "beta1": 0.8, "beta2": 0.99})


def _state(n, seed):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 2, n)).astype(np.float32)
    m = (rng.standard_normal(n) * 0.1).astype(np.float32)
    v = np.abs(rng.standard_normal(n) * 0.01).astype(np.float32)
    v[::5] = 0   # sqrt(0): the eps term alone
    return p, g, m, v


def _cases():
    import pykd
    from pykd import _step
    from pykd._step import TrainConfig, Workspace, train_step

    out = {}
    for n in SIZES:
        for k, kw in enumerate(SETTINGS):
            p, g, m, v = _state(n, n + k)
            for step in (1, 2, 7):
                pykd.adam_step(p, g, m, v, step, **kw)
            out[f"adam-{n}-{k}"] = np.concatenate([p, m, v])
    # one whole step of a net whose big layer is tiled
    sizes, acts = [300, 700, 10], ["relu", "identity"]
    rng = np.random.default_rng(3)
    P = _step.param_count(sizes)
    p = (rng.standard_normal(P) * 0.05).astype(np.float32)
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    x = rng.standard_normal((64, 300)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    ws = Workspace(sizes, 64)
    for st in (1, 2):
        train_step(sizes, acts, p, g, s1, s2, x, y, TrainConfig(), st, ws)
    out["step"] = np.concatenate([p, s1, s2])
    return out


def _child(outdir):
    import pykd._fkernels as fk

    np.savez(os.path.join(outdir, "out.npz"), path=fk.optim_path().decode().strip(), **_cases())


def _run(path, tmp_path, threads):
    return run_on_path(__file__, "PYKD_OPTIM_PATH", path, tmp_path, threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(path, threads): outputs} for each path this CPU runs."""
    tmp = tmp_path_factory.mktemp("optimpaths")
    got = {}
    for p in PATHS:
        for threads in (1, 2):
            r = _run(p, tmp, threads)
            if str(r["path"]) == p:
                got[p, threads] = r
    return got


def test_portable_and_the_best_path_run(runs):
    import pykd._fkernels as fk

    assert ("portable", 1) in runs and ("portable", 2) in runs
    assert (fk.optim_path().decode().strip(), 1) in runs
    print("optimizer paths tested:", sorted(runs))


def test_every_path_gives_the_bits_of_the_fortran_loop(runs):
    import pykd

    for n in SIZES:
        for k, kw in enumerate(SETTINGS):
            p, g, m, v = _state(n, n + k)
            keep = np.ones(n, bool)   # the masked update: gfortran's own loop
            want = [p.copy(), m.copy(), v.copy()]
            for step in (1, 2, 7):
                pykd.adam_step(*want[:1], g, *want[1:], step, mask=keep, **kw)
            want = np.concatenate(want)
            for key, r in runs.items():
                got = r[f"adam-{n}-{k}"]
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (key, n, k)


def test_every_path_agrees_with_float64(runs):
    for n in SIZES:
        p, g, m, v = (a.astype(np.float64) for a in _state(n, n))
        for step in (1, 2, 7):
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            p = p - 1e-3 / (1 - 0.9 ** step) * m / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
        want = np.concatenate([p, m, v])
        for key, r in runs.items():
            np.testing.assert_allclose(r[f"adam-{n}-0"], want, rtol=2e-4, atol=1e-5,
                                       err_msg=str(key))


def test_a_training_step_has_the_same_bits_on_every_path(runs):
    for threads in (1, 2):
        ref = runs["portable", threads]["step"]
        for (path, t), r in runs.items():
            if t == threads:
                assert np.array_equal(r["step"].view(np.uint32), ref.view(np.uint32)), path


def test_an_unknown_path_falls_back_to_the_automatic_one():
    import pykd._fkernels as fk

    env = dict(os.environ, PYKD_OPTIM_PATH="no-such-path")
    out = subprocess.run([sys.executable, "-c", "import pykd._fkernels as f; "
                          "print(f.optim_path().decode().strip())"],
                         env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert out == fk.optim_path().decode().strip()


if __name__ == "__main__":
    _child(sys.argv[1])
