"""The training step's layers split across threads (fortran/train/
pykd_step_layers.f90): rows of the forward and of dz, input units of dx and
of dW, dW in L2-sized tiles each followed by the optimizer step. Layers here
are large enough to split (and, for the wide one, to take several tiles per
thread); the sizes are not multiples of the 16-row blocks. The NumPy twin is
the reference; the bits repeat for a given thread count."""
import os
import subprocess
import sys

import numpy as np
import pytest
import threadpoolctl

from pykd import _step
from pykd._step import TrainConfig, Workspace, train_step

# (sizes, acts, batch): uneven blocks; a 1000 -> 1100 layer (1 MiB dW tiles of
# 224 columns: three per thread on 2 threads, five on 1).
NETS = {
    "uneven": ([50, 97, 33, 7], ["relu", "tanh", "identity"], 700),
    "wide": ([1000, 1100, 40, 5], ["relu", "relu", "identity"], 64),
}
CFGS = {
    "ce-adam": (TrainConfig(), False),
    "kd-adam-mask": (TrainConfig(loss="kd", temperature=3.0, alpha=0.3), True),
    "sgd-wd-dropout": (TrainConfig(optimizer="sgd", lr=0.05, weight_decay=1e-3, dropout=0.2,
                                   seed=4), False),
    "mse": (TrainConfig(loss="mse"), False),
}


def run(net, cfg, use_mask, backend, threads, steps=3):
    sizes, acts, n = NETS[net]
    rng = np.random.default_rng(7)
    P = _step.param_count(sizes)
    p = (rng.standard_normal(P) * 0.1).astype(np.float32)
    g, s1, s2 = (np.zeros_like(p) for _ in range(3))
    x = rng.standard_normal((n, sizes[0])).astype(np.float32)
    regress = cfg.loss == "mse"
    y = (rng.standard_normal((n, sizes[-1])).astype(np.float32) if regress
         else rng.integers(0, sizes[-1], n))
    t = rng.standard_normal((n, sizes[-1])).astype(np.float32)
    mask = rng.random(P) > 0.3 if use_mask else None
    ws = Workspace(sizes, n)
    out = []
    with threadpoolctl.threadpool_limits(threads):
        for st in range(1, steps + 1):
            out.append(train_step(sizes, acts, p, g, s1, s2, x, y, cfg, st, ws,
                                  teacher_logits=t if cfg.loss == "kd" else None,
                                  mask=mask, backend=backend))
    return p, g, s1, out


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("case", list(CFGS))
def test_split_step_matches_numpy_twin(net, case):
    cfg, use_mask = CFGS[case]
    p0 = run(net, cfg, use_mask, "numpy", 2, steps=0)[0]
    pf, gf, sf, of = run(net, cfg, use_mask, "fortran", 2)
    pn, gn, sn, on = run(net, cfg, use_mask, "numpy", 2)
    assert [c for _, c in of] == [c for _, c in on]
    np.testing.assert_allclose([l for l, _ in of], [l for l, _ in on], rtol=2e-5)
    # float32 sums over the batch: where they cancel (|g| ~ 1e-3), a few in a
    # million entries differ by up to ~3e-6 (AMD Zen 4's OpenBLAS kernels, 2
    # of the wide net's 1.1M): allow 5 per million up to 10x the tolerance.
    for got, want in ((gf, gn), (sf, sn)):
        off = ~np.isclose(got, want, atol=2e-6, rtol=2e-4)
        assert off.sum() <= 5e-6 * off.size, f"{off.sum()} of {off.size} values differ"
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)
    # Adam moves a weight whose gradient is near 0 by up to lr (1e-3) a
    # step, the sign set by rounding noise: allow 5% of one step, and for
    # a few in a million weights (2 of the wide net's 1.1M here) up to the
    # 3 steps' lr.
    off = np.abs(pf - pn) > 5e-5 + 5e-5 * np.abs(pn)
    assert off.mean() < 1e-5, f"{off.sum()} of {off.size} parameters differ"
    np.testing.assert_allclose(pf, pn, atol=3 * 1e-3)
    assert np.abs(pf - p0).max() > 1e-4  # it did train


@pytest.mark.parametrize("net", list(NETS))
def test_split_step_repeats_its_bits_and_agrees_across_thread_counts(net):
    cfg, use_mask = CFGS["kd-adam-mask"]
    one = run(net, cfg, use_mask, "fortran", 1)
    two = run(net, cfg, use_mask, "fortran", 2)
    again = run(net, cfg, use_mask, "fortran", 2)
    for a, b in zip(two[:3], again[:3]):
        assert np.array_equal(a, b)
    # Another thread count splits the products differently: close, not equal bits.
    np.testing.assert_allclose(one[0], two[0], atol=5e-5, rtol=5e-5)  # Adam: see above
    np.testing.assert_allclose(one[1], two[1], atol=1e-6, rtol=1e-4)


def test_masked_entries_stay_zero_in_the_split_step():
    cfg, _ = CFGS["kd-adam-mask"]
    sizes = NETS["wide"][0]
    p, g, s1, _ = run("wide", cfg, True, "fortran", 2)
    mask = np.random.default_rng(7)
    # The mask run() drew: replay its generator up to the mask.
    P = _step.param_count(sizes)
    n = NETS["wide"][2]
    mask.standard_normal(P); mask.standard_normal((n, sizes[0]))
    mask.integers(0, sizes[-1], n); mask.standard_normal((n, sizes[-1]))
    keep = mask.random(P) > 0.3
    assert np.all(p[~keep] == 0) and np.all(s1[~keep] == 0)
    assert np.any(p[keep] != 0)


PTHREADS_DIR = "/usr/lib/x86_64-linux-gnu/openblas-pthread"
FALLBACK = r"""
import sys
sys.path.insert(0, {here!r})
import numpy as np, threadpoolctl
import test_step_team as t
layers = {{p["internal_api"]: p.get("threading_layer") for p in threadpoolctl.threadpool_info()
          if "scipy_openblas" not in p["filepath"]}}
assert layers.get("openblas") == "pthreads", layers
cfg, use_mask = t.CFGS["kd-adam-mask"]
pf, gf, _, _ = t.run("wide", cfg, use_mask, "fortran", 2)
pn, gn, _, _ = t.run("wide", cfg, use_mask, "numpy", 2)
np.testing.assert_allclose(gf, gn, atol=2e-6, rtol=2e-4)
np.testing.assert_allclose(pf, pn, atol=5e-5, rtol=5e-5)
print("ok")
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(PTHREADS_DIR, "libopenblas.so.0")),
                    reason="Debian's pthreads OpenBLAS is not installed")
def test_step_on_pthreads_openblas_matches_numpy_twin():
    # LD_LIBRARY_PATH wins over the extension's RUNPATH: the pthreads build,
    # whose pool concurrent callers share, so the step takes its unsplit path
    # (one threaded product per layer, a zeroed dW accumulated into).
    env = dict(os.environ, LD_LIBRARY_PATH=PTHREADS_DIR)
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", FALLBACK.format(here=here)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=here)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
