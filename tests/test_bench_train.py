"""The floor of benchmarks/bench_train.py: its list of a step's products
counts the FLOPs bench_pipeline counts, and its native sgemm plans (one
threaded call, or each thread its share) compute the products they claim
to time."""
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


@pytest.mark.parametrize("mode", [0, 1])
def test_native_products_compute_the_products(mode):
    try:
        so = bench_train.floor_library()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    # The library restores pykd's BLAS thread count after every run, so the
    # bits of later tests in this process do not change.
    blas = bench_train.NativeProducts(so, bench_train.pykd_blas_path(), 2)
    calls = bench_train.step_products((40, 70, 33, 6), 50)
    run = blas.plan(calls, modes=[mode] * len(calls))
    run()
    for i, (ta, tb, m, n, k) in enumerate(calls):
        a, b, c = (blas.operand(run, calls, i, w) for w in range(3))
        A = a.reshape(k, m).T if ta == "N" else a.reshape(m, k).T   # column-major
        B = b.reshape(n, k).T if tb == "N" else b.reshape(k, n).T
        A = A if ta == "N" else A.T
        B = B if tb == "N" else B.T
        want = (A.astype(np.float64) @ B).T.ravel()  # C column-major
        np.testing.assert_allclose(c, want, rtol=1e-4, atol=1e-3)


def test_native_products_choose_a_mode_per_product():
    try:
        so = bench_train.floor_library()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    blas = bench_train.NativeProducts(so, bench_train.pykd_blas_path(), 2)
    calls = bench_train.step_products((40, 70, 33, 6), 50)
    run = blas.plan(calls, rounds=1, reps=1)
    assert len(run.modes) == len(calls) and set(run.modes) <= {0, 1}
