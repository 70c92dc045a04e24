"""The floor of benchmarks/bench_train.py: its list of a step's products
counts the FLOPs bench_pipeline counts, and its sgemm plans (one call, or
two threads running halves) compute the products they claim to time."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench_pipeline  # noqa: E402
import bench_train  # noqa: E402


@pytest.mark.parametrize("sizes", [bench_train.TEACHER, bench_train.STUDENT, (5, 7, 3)])
def test_step_products_count_the_epoch_flops(sizes):
    per_step = bench_train.product_flops(bench_train.step_products(sizes, 64))
    assert per_step * 1000 == pytest.approx(bench_pipeline.epoch_flops(list(sizes), 64000))


@pytest.mark.parametrize("halves", [False, True])
def test_sgemm_plans_compute_the_products(halves):
    # threads=None: setting them would change pykd's BLAS for the rest of
    # this process (and the bits of later tests).
    blas = bench_train.Sgemm(bench_train.pykd_blas_path(), None)
    calls = bench_train.step_products((40, 70, 33, 6), 50)
    run = blas.plan(calls, halves)
    run()
    ops = run._keep
    for i, (ta, tb, m, n, k) in enumerate(calls):
        a, b, c = ops[3 * i:3 * i + 3]
        A = a.reshape(k, m).T if ta == "N" else a.reshape(m, k).T   # column-major
        B = b.reshape(n, k).T if tb == "N" else b.reshape(k, n).T
        A = A if ta == "N" else A.T
        B = B if tb == "N" else B.T
        want = (A.astype(np.float64) @ B).T.ravel()  # C column-major
        np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-3)
