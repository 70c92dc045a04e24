"""The int8 kernel's packed weights (docs/model.md, dense_int8's i32 slice):
the layout checked by hand, derived data that the file never holds, and
kept in step with q (repack, the Fortran check of a stale copy).

Run: cd tests && python -m pytest -q -p no:cacheprovider test_int8_packed.py
"""
import numpy as np
import pytest

import pykd
from pykd import _reference as ref
from pykd.layers import DenseInt8
from pykd.models import Model


def _layer(n_in, n_out, seed=0, x_scale=None):
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (n_in, n_out)).astype(np.int8)
    return DenseInt8(q, np.full(n_out, 0.01, np.float32), rng.standard_normal(n_out).astype(np.float32),
                     "relu", x_scale=x_scale)


def test_layout_by_hand():
    # 5 inputs x 18 outputs: 2 groups of 16 outputs, 2 quads of 4 inputs.
    q = (np.arange(5 * 18).reshape(5, 18) % 251 - 125).astype(np.int8)
    p = ref.int8_packed(q)
    G, NQ = 2, 2
    assert p.dtype == np.int32 and p.shape == (16 * G * (1 + NQ),)
    want_csum = np.zeros(32, np.int64)
    want_csum[:18] = 128 * q.astype(np.int64).sum(axis=0)
    assert (p[:32] == want_csum).all()
    w = p[32:].view(np.int8)             # bytes, little-endian words
    for g in range(G):
        for k in range(NQ):
            for jj in range(16):
                for t in range(4):
                    i, j = 4 * k + t, 16 * g + jj
                    want = q[i, j] if i < 5 and j < 18 else 0
                    assert w[((g * NQ + k) * 16 + jj) * 4 + t] == want, (g, k, jj, t)


def test_model_holds_the_packed_copy_in_its_i32_slice():
    layer = _layer(13, 21)
    m = Model([layer])
    off, length = m.table[0, 8], m.table[0, 9]
    assert length == 16 * 2 * (1 + 4)
    assert (m.i32[off:off + length] == ref.int8_packed(layer.q)).all()


def test_the_file_never_holds_the_packed_copy(tmp_path):
    m = Model([_layer(30, 7), _layer(7, 3, seed=1, x_scale=0.05)])
    path = tmp_path / "m.pykd"
    m.save(path)
    r = pykd.load_model(path)
    assert path.stat().st_size < 30 * 7 + 7 * 3 + 1024       # q bytes + small records
    assert (r.i32 == m.i32).all() and (r.table == m.table).all()
    X = np.random.default_rng(2).standard_normal((9, 30)).astype(np.float32)
    assert (r.forward(X).view(np.uint32) == m.forward(X).view(np.uint32)).all()


def test_repack_after_changing_q_in_place():
    m = Model([_layer(40, 20)])
    X = np.random.default_rng(3).standard_normal((5, 40)).astype(np.float32)
    layer = m.layers[0]
    layer.q[...] = -layer.q
    layer.repack()
    got = m.forward(X)
    want = m.forward(X, backend="numpy")
    assert (got.view(np.uint32) == want.view(np.uint32)).all()


@pytest.mark.parametrize("n", [1, 3, 256])
def test_int8_matmul_and_gemm_run_on_the_packed_kernel(n):
    rng = np.random.default_rng(n)
    q = rng.integers(-128, 128, (37, 19)).astype(np.int8)     # -128 allowed here
    qx = rng.integers(-128, 128, (n, 37)).astype(np.int8)
    acc = pykd.int8_gemm(qx, q)
    assert (acc == qx.astype(np.int64) @ q.astype(np.int64)).all()
