"""The model buffers' layout (pykd/_buffers.py): 64-byte aligned buffers,
slices placed on line boundaries, and no bit changed by where they are."""
import numpy as np
import pytest

import pykd
from pykd import _buffers
from pykd.models import Model

from kinds_helpers import F32, KINDS, make_layer


def _addr_mod(a):
    return a.ctypes.data % _buffers.ALIGN


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.int32])
@pytest.mark.parametrize("n", [0, 1, 7, 1000, 100_003])
def test_zeros_and_empty_are_aligned(dtype, n):
    for make in (_buffers.zeros, _buffers.empty):
        a = make(n, dtype)
        assert a.shape == (n,) and a.dtype == dtype and a.flags.c_contiguous
        assert a.flags.writeable and (n == 0 or _addr_mod(a) == 0)   # empty: no address
    assert not _buffers.zeros(n, dtype).any()


def test_slice_offsets_by_hand():
    # f32 (16 a line), i8 (64 a line), i32 (16 a line); layer 2 aligns its
    # f32 element 5; layer 3 has an empty i8 slice (no padding).
    lengths = [[10, 3, 17], [20, 70, 1], [4, 0, 2]]
    leads = [[0, 0, 0], [5, 0, 0], [0, 0, 0]]
    offsets, totals = _buffers.slice_offsets(lengths, leads)
    assert offsets.tolist() == [[0, 0, 0], [11, 64, 32], [32, 134, 48]]
    assert totals.tolist() == [36, 134, 50]


def test_mlp_and_model_buffers_are_aligned():
    mlp = pykd.MLP([30, 20, 5], seed=0)
    assert _addr_mod(mlp.params) == 0
    rng = np.random.default_rng(3)
    W = rng.standard_normal((300, 40)).astype(F32)
    W[rng.random(W.shape) < 0.8] = 0                 # planes: nnz >= 128
    sparse = pykd.layers.SparseCSR.from_dense(W, np.zeros(40, F32), "relu")
    assert sparse._n_planes > 0
    model = Model([pykd.layers.Dense(rng.standard_normal((7, 300)).astype(F32),
                                     np.zeros(300, F32)), sparse,
                   pykd.layers.Dense(rng.standard_normal((40, 3)).astype(F32), np.zeros(3, F32))])
    for buf in (model.f32, model.i8, model.i32):
        assert _addr_mod(buf) == 0
    dense1, sp, dense3 = model.layers
    assert _addr_mod(dense1.W) == 0 and _addr_mod(dense3.W) == 0
    assert _addr_mod(sp._pval) == 0 and _addr_mod(sp.indptr) == 0
    # The slices still do not overlap and sit inside their buffers.
    t = model.table
    for col in (4, 6, 8):
        ends = t[:, col] + t[:, col + 1]
        assert (t[1:, col] >= ends[:-1]).all() and ends.max() <= {4: model.f32, 6: model.i8,
                                                                    8: model.i32}[col].size


def _shifted(buf, elems):
    """A copy of buf starting `elems` elements past a 64-byte boundary."""
    raw = _buffers.zeros(buf.size + elems, buf.dtype)
    out = raw[elems:]
    out[...] = buf
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_where_the_buffers_sit_changes_no_bit(kind):
    rng = np.random.default_rng([KINDS.index(kind), 64])
    layers = [make_layer(kind, 13, 11, "relu", rng), make_layer(kind, 11, 5, "identity", rng)]
    model = Model(layers)
    X = rng.standard_normal((9, 13)).astype(F32)
    want = model.forward(X).view(np.uint32)
    for shift in (1, 3, 4, 8):
        moved = Model._wrap(model.layers, model.table, _shifted(model.f32, shift),
                            _shifted(model.i8, shift), _shifted(model.i32, shift))
        for n in (1, 9):
            got = moved.forward(X[:n]).view(np.uint32)
            assert np.array_equal(got, model.forward(X[:n]).view(np.uint32)), (kind, shift, n)
        assert np.array_equal(moved.forward(X).view(np.uint32), want)
