"""The model's flat buffers: 64-byte aligned, and the slices laid out in them.

The kernels stream W (and a sparse layer's planes) with 64-byte vector
loads; from a buffer only 16-byte aligned (what NumPy gives) every other
load straddles two cache lines. Measured on Intel model 207, one thread,
batch 1 (docs/performance.md, "Aligned buffers"): the 784-200-200-10
student 11.0 us from a 64-byte aligned buffer against 12.9 us 16 bytes off.
Alignment changes where the numbers are, never the numbers: the same bits.
"""
from __future__ import annotations

import numpy as np

#: Bytes: a cache line and one zmm load.
ALIGN = 64


def empty(n, dtype):
    """A 1-D uninitialised array of ``n`` elements starting at an ALIGN-byte
    boundary (a view of a slightly larger array)."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n * dtype.itemsize].view(dtype)


def zeros(n, dtype):
    """As :func:`empty`, filled with zeros."""
    a = empty(n, dtype)
    a[...] = 0
    return a


def slice_offsets(lengths, leads, itemsizes=(4, 1, 4)):
    """Offsets of the layers' slices, one after another in each buffer,
    each slice placed so that element ``lead`` of it starts at an
    ALIGN-byte boundary of an aligned buffer (the first element by default;
    a sparse layer's planes). An empty slice takes no padding.

    Parameters
    ----------
    lengths, leads : int arrays, shape (n_layers, n_buffers)
        Elements of each slice, and the element of it to align.
    itemsizes : sequence of int
        Bytes per element of each buffer.

    Returns
    -------
    offsets : int64 array like ``lengths``
    totals : int64 array (n_buffers,), the elements each buffer needs.
    """
    lengths = np.asarray(lengths, np.int64)
    leads = np.asarray(leads, np.int64)
    unit = np.array([ALIGN // s for s in itemsizes], np.int64)
    offsets = np.zeros_like(lengths)
    end = np.zeros(lengths.shape[1], np.int64)
    for k in range(lengths.shape[0]):
        aligned = -(-(end + leads[k]) // unit) * unit - leads[k]
        offsets[k] = np.where(lengths[k] > 0, aligned, end)
        end = offsets[k] + lengths[k]
    return offsets, end
