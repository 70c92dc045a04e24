"""Layer kinds: one class per kind of ``docs/model.md``.

Every layer computes ``y = activation(x @ W + b)`` with ``x`` of shape
``(n, n_in)``; each kind stores ``W (n_in, n_out)`` its own way:

========================  ===================================================
:class:`Dense`            ``W`` float32
:class:`DenseInt8`        ``W = q * scale`` (int8, one scale per output)
:class:`SparseCSR`        the non-zeros of ``W`` in CSR rows (rows = inputs)
:class:`LowRank`          ``W = U @ V``
:class:`Codebook`         ``W[i, j] = centroids[code(i, j)]``, codes packed
:class:`SparseCodebook`   the CSR pattern, each value a centroid
========================  ===================================================

A layer holds its arrays as attributes; inside a :class:`pykd.Model` they
are views of the model's flat buffers (the layer's slices, in the order of
docs/model.md: ``f32_items``, ``i8_items``, ``i32_items``). Constructors
check dtypes, shapes and values and never cast: a wrong dtype is a
TypeError, a wrong shape or value a ValueError naming the argument.
"""
from __future__ import annotations

import numpy as np

from . import _bits, _codes
from . import _reference as ref
from . import _validate as check

__all__ = ["Layer", "Dense", "DenseInt8", "SparseCSR", "LowRank", "Codebook",
           "SparseCodebook", "KIND_CLASSES", "from_record", "pack_bits", "unpack_bits"]

_F32 = np.float32
MAX_COUNT = 2**31 - 1
#: The widest int8 layer input for which int32 sums cannot overflow.
MAX_INT8_INPUTS = 131071


# ----------------------------------------------------------------- checks

def _arr(name, a, dtype, ndim, shape=None, finite=False):
    # Layers copy their arrays into the model's buffers, so any layout will do.
    check.array(name, a, dtype, ndim=ndim, allow_empty=True, contiguous=False)
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if any(s > MAX_COUNT for s in a.shape):
        raise ValueError(f"{name} is too large (shape {a.shape}; sizes are at most {MAX_COUNT})")
    if finite and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _activation(a):
    if a not in _codes.ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(_codes.ACTIVATIONS)}, got {a!r}")
    return a


def _size(name, v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if not 1 <= v <= MAX_COUNT:
        raise ValueError(f"{name} must be in [1, {MAX_COUNT}], got {v}")
    return int(v)


def _csr(indptr, indices, n_in, n_out):
    """Check a CSR pattern (docs/format.md): indptr from 0, non-decreasing,
    ending at nnz; indices < n_out and strictly increasing within a row."""
    _arr("indptr", indptr, np.int32, 1, (n_in + 1,))
    _arr("indices", indices, np.int32, 1)
    nnz = indices.shape[0]
    if indptr[0] != 0 or indptr[-1] != nnz:
        raise ValueError(f"indptr must start at 0 and end at nnz = {nnz}, "
                         f"got {int(indptr[0])} and {int(indptr[-1])}")
    if (np.diff(indptr) < 0).any():
        raise ValueError("indptr must be non-decreasing")
    if nnz:
        if indices.min() < 0 or indices.max() >= n_out:
            raise ValueError(f"indices must be in [0, {n_out}) (n_out)")
        step = np.diff(indices.astype(np.int64))
        starts = indptr[1:-1]                    # first entry of rows 1.. (not a step)
        inner = np.ones(nnz - 1, bool)
        inner[starts[(starts > 0) & (starts < nnz)] - 1] = False
        if (step[inner] <= 0).any():
            raise ValueError("indices must be strictly increasing within each row")
    return nnz


def _centroids(centroids):
    _arr("centroids", centroids, _F32, 1, finite=True)
    if not 1 <= centroids.shape[0] <= 256:
        raise ValueError(f"a codebook has 1 to 256 centroids, got {centroids.shape[0]}")
    return centroids.shape[0]


def _fewest_bits(n_codes, choices):
    return next(b for b in choices if 2**b >= n_codes)


# ------------------------------------------------------------- bit streams

def pack_bits(codes, bits):
    """Pack unsigned codes (any shape, uint8) ``bits`` to an index, least
    significant bit first (docs/format.md, *Bit streams*): :func:`pykd._bits.pack`."""
    return _bits.pack(np.ascontiguousarray(codes, np.uint8).reshape(-1), bits)


def unpack_bits(packed, bits, count):
    """The ``count`` codes of a stream written by :func:`pack_bits`
    (:func:`pykd._bits.unpack`; ValueError on a wrong length or padding)."""
    return _bits.unpack(packed, bits, count)


# ------------------------------------------------------------------ layers

class Layer:
    """Base class: a layer ``y = activation(x @ W + b)``.

    Subclasses set ``kind`` and the names of their arrays in buffer order:
    ``f32_items``, ``i8_items``, ``i32_items`` (docs/model.md).
    """
    kind = ""
    f32_items: tuple = ()
    i8_items: tuple = ()
    i32_items: tuple = ()
    #: Per buffer (f32, i8, i32), the item a model places at a 64-byte
    #: boundary (pykd._buffers); None: the slice's first.
    aligned_items: tuple = (None, None, None)

    # --- what every kind provides
    def to_dense(self):
        """The effective weight matrix ``W``, float32 (n_in, n_out) (a new array)."""
        raise NotImplementedError

    def forward_numpy(self, x):
        """The NumPy twin: ``activation(x @ W + b)`` for float32 x (n, n_in)."""
        raise NotImplementedError

    def to_record(self):
        """The layer as the dict of :func:`pykd.modelfile.write_model`."""
        raise NotImplementedError

    @property
    def parameters(self) -> int:
        """Values the layer stores: weights or factors, centroids, biases, int8 scales."""
        raise NotImplementedError

    @property
    def nonzeros(self) -> int:
        """Non-zero entries of the effective ``W``."""
        return int(np.count_nonzero(self.to_dense()))

    def kind_params(self):
        """The table's p1..p4 for this layer."""
        return (0, 0, 0, 0)

    # --- shared
    @property
    def nbytes(self) -> int:
        """Bytes of the layer's arrays in memory."""
        return sum(getattr(self, n).nbytes for n in self.f32_items + self.i8_items
                   + self.i32_items)

    def _buffer_arrays(self):
        """(buffer dtype, [(attribute, array)]) for f32, i8 and i32, in order."""
        return [(np.float32, [(n, getattr(self, n)) for n in self.f32_items]),
                (np.int8, [(n, getattr(self, n)) for n in self.i8_items]),
                (np.int32, [(n, getattr(self, n)) for n in self.i32_items])]

    def align_leads(self):
        """Per buffer, the elements of the slice before its ``aligned_items``
        one (0 for the slice's start)."""
        leads = []
        for want, (_, items) in zip(self.aligned_items, self._buffer_arrays()):
            k = 0 if want is None else [name for name, _ in items].index(want)
            leads.append(sum(a.size for _, a in items[:k]))
        return tuple(leads)

    def slice_lengths(self):
        """Elements of the layer's f32, i8 and i32 slices."""
        return tuple(sum(a.size for _, a in items) for _, items in self._buffer_arrays())

    def _pack(self, buffers, offsets, copy=True):
        """Copy the arrays into ``buffers`` at ``offsets`` (or, with
        ``copy=False``, only rebind) and make the attributes views of them."""
        for buf, off, (_, items) in zip(buffers, offsets, self._buffer_arrays()):
            pos = off
            for name, a in items:
                v = buf[pos:pos + a.size]
                if copy:
                    v[...] = a.reshape(-1).view(buf.dtype)
                setattr(self, name, v.view(a.dtype).reshape(a.shape))
                pos += a.size

    def copy(self):
        """An independent copy (own arrays)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        for _, items in self._buffer_arrays():
            for name, a in items:
                setattr(new, name, a.copy())
        return new

    @classmethod
    def from_record(cls, d):
        """A layer from the dict :func:`pykd.modelfile.read_model` returns."""
        raise NotImplementedError

    def _record_base(self):
        return {"kind": self.kind, "activation": self.activation}

    def record_bytes(self) -> int:
        """Bytes of the layer's record in a version-2 file (header included)."""
        return 24 + self._payload_bytes()

    def __repr__(self):
        return (f"{type(self).__name__}({self.n_in}x{self.n_out}, {self.activation}, "
                f"parameters={self.parameters})")


def _kind_check(d, cls):
    if not isinstance(d, dict) or d.get("kind") != cls.kind:
        raise ValueError(f"not a {cls.kind} record: {d!r:.80}")


class Dense(Layer):
    """A float32 layer ``activation(x @ W + b)``.

    Parameters
    ----------
    W : ndarray, float32, shape (n_in, n_out)
    b : ndarray, float32, shape (n_out,)
    activation : str
        One of ``pykd._codes.ACTIVATIONS``.
    """
    kind = "dense"
    f32_items = ("W", "b")

    def __init__(self, W, b, activation="identity"):
        _arr("W", W, _F32, 2, finite=True)
        self.n_in, self.n_out = (_size("n_in", W.shape[0]), _size("n_out", W.shape[1]))
        _arr("b", b, _F32, 1, (self.n_out,), finite=True)
        self.W, self.b, self.activation = W, b, _activation(activation)

    @classmethod
    def _unchecked(cls, W, b, activation):
        obj = object.__new__(cls)
        obj.W, obj.b, obj.activation = W, b, activation
        obj.n_in, obj.n_out = W.shape
        return obj

    def to_dense(self):
        return self.W.copy()

    def forward_numpy(self, x):
        return ref.dense(x, self.W, self.b, self.activation)

    @property
    def parameters(self):
        return self.W.size + self.b.size

    @property
    def nonzeros(self):
        return int(np.count_nonzero(self.W))

    def to_record(self):
        return {**self._record_base(), "W": self.W, "b": self.b}

    @classmethod
    def from_record(cls, d):
        _kind_check(d, cls)
        return cls(d["W"], d["b"], d["activation"])

    def _payload_bytes(self):
        return 4 * (self.W.size + self.n_out)


class DenseInt8(Layer):
    """An int8 layer: ``W = q * scale`` (one symmetric scale per output).

    Inputs are quantized to int8 per sample (dynamic, ``x_scale`` None) or
    with the static ``x_scale`` (from calibration); the sums are exact in
    int32 (docs/model.md).

    Parameters
    ----------
    q : ndarray, int8, shape (n_in, n_out), values in [-127, 127]
    scale : ndarray, float32, shape (n_out,), finite and >= 0
    b : ndarray, float32, shape (n_out,)
    activation : str
    x_scale : None or float > 0
        The static input scale; None for dynamic quantization.
    """
    kind = "dense_int8"
    f32_items = ("scale", "b", "_xs")
    i8_items = ("q",)
    #: The kernel's packed copy of q (derived, never saved: docs/model.md).
    i32_items = ("_packed",)

    def __init__(self, q, scale, b, activation="identity", x_scale=None):
        _arr("q", q, np.int8, 2)
        self.n_in, self.n_out = (_size("n_in", q.shape[0]), _size("n_out", q.shape[1]))
        if self.n_in > MAX_INT8_INPUTS:
            raise ValueError(f"an int8 layer takes at most {MAX_INT8_INPUTS} inputs "
                             f"(int32 sums), got {self.n_in}")
        if q.size and q.min() < -127:
            raise ValueError("q must be in [-127, 127] (symmetric int8), found -128")
        _arr("scale", scale, _F32, 1, (self.n_out,), finite=True)
        if (scale < 0).any():
            raise ValueError("scale must be >= 0")
        _arr("b", b, _F32, 1, (self.n_out,), finite=True)
        if x_scale is None:
            xs = _F32(0)
        else:
            if isinstance(x_scale, (bool, np.bool_)) or not isinstance(
                    x_scale, (float, int, np.floating, np.integer)) or np.ndim(x_scale):
                raise TypeError(f"x_scale must be None or a number > 0, got {x_scale!r}")
            xs = _F32(x_scale)
            # A subnormal scale has an infinite reciprocal: zero inputs would
            # quantize to NaN. Calibration never gives one (_input_scale).
            if not (np.isfinite(xs) and xs >= np.finfo(_F32).tiny):
                raise ValueError("x_scale must be finite and at least the smallest normal "
                                 f"float32 ({np.finfo(_F32).tiny}), got {x_scale!r}")
        self.q, self.scale, self.b = q, scale, b
        self._packed = ref.int8_packed(q)
        self._xs = np.array([xs], _F32)
        self.activation = _activation(activation)
        self._static = x_scale is not None

    @property
    def x_scale(self):
        """The static input scale (np.float32), or None when dynamic."""
        return _F32(self._xs[0]) if self._static else None

    @property
    def quant(self):
        """``"static"`` or ``"dynamic"``."""
        return "static" if self._static else "dynamic"

    def kind_params(self):
        return (_codes.QUANT_MODES[self.quant], 0, 0, 0)

    def repack(self):
        """Rebuild the kernel's packed copy of ``q`` (in place, so a model
        holding the layer sees it): call it after changing ``q`` in place."""
        self._packed[...] = ref.int8_packed(self.q)

    def to_dense(self):
        return self.q.astype(_F32) * self.scale

    def forward_numpy(self, x):
        return ref.dense_int8(x, self.q, self.scale, self.b, self.activation, self.x_scale)

    @property
    def parameters(self):
        return self.q.size + self.scale.size + self.b.size + int(self._static)

    @property
    def nonzeros(self):
        return int(np.count_nonzero(self.q * (self.scale != 0)))

    @property
    def nbytes(self):
        return self.q.nbytes + self.scale.nbytes + self.b.nbytes + 4 * int(self._static)

    def to_record(self):
        return {**self._record_base(), "q": self.q, "scale": self.scale, "b": self.b,
                "x_scale": self.x_scale}

    @classmethod
    def from_record(cls, d):
        _kind_check(d, cls)
        return cls(d["q"], d["scale"], d["b"], d["activation"], d.get("x_scale"))

    def _payload_bytes(self):
        return 4 + self.q.size + 4 * self.n_out + 4 * int(self._static) + 4 * self.n_out


class _Planes:
    """The planes of sparse_csr and sparse_codebook: the one-sample kernel's
    derived copy of W (``_pcount``, ``_pidx``, ``_pval``; never saved:
    docs/model.md, "sparse_csr's planes"), built from ``_plane_values()``, the
    entry values the CSR kernels read."""

    def _build_planes(self):
        self._n_planes, counts, idx, val = ref.sparse_planes(self.indptr, self.indices,
                                                             self._plane_values(), self.n_in,
                                                             self.n_out)
        self._pcount = counts.view(np.int8) if self._n_planes else np.zeros(0, np.int8)
        self._pidx, self._pval = idx, val

    def _check_arrays(self):
        _csr(self.indptr, self.indices, self.n_in, self.n_out)

    def _refresh_values(self):
        """The planes' values after a change of the values alone (the
        pattern and, for sparse_codebook, the codes unchanged): what the
        fine-tuner calls at every step, a scatter of nnz floats."""
        if not self._n_planes:
            return
        slots = self.__dict__.get("_pslots")
        if slots is None:
            *_, slots = ref.sparse_planes(self.indptr, self.indices, self._plane_values(),
                                          self.n_in, self.n_out, slots=True)
            self._pslots = slots
        self._pval.reshape(-1)[slots] = self._plane_values()

    def repack(self):
        """Rebuild the planes from the layer's arrays (in place, so a model
        holding the layer sees them): call it after changing the values (or
        the pattern, keeping its number of planes) in place."""
        self._check_arrays()
        self.__dict__.pop("_pslots", None)
        n, counts, idx, val = ref.sparse_planes(self.indptr, self.indices, self._plane_values(),
                                                self.n_in, self.n_out)
        if n != self._n_planes:
            raise ValueError(f"the pattern now has {n} planes, not {self._n_planes}: "
                             f"build a new {type(self).__name__}")
        if n:
            self._pcount[...] = counts.view(np.int8)
            self._pidx[...] = idx
            self._pval[...] = val

    @property
    def nbytes(self):
        """Bytes of the stored arrays (the planes are derived, not counted)."""
        return sum(getattr(self, n).nbytes for n in self.f32_items + self.i8_items
                   + self.i32_items if n not in ("_pcount", "_pidx", "_pval"))


def _index_bytes(n_out):
    return 1 if n_out - 1 < 2**8 else 2 if n_out - 1 < 2**16 else 4


class SparseCSR(_Planes, Layer):
    """``W`` in compressed sparse rows: only the non-zeros are stored.

    Row ``i`` (input ``i``) holds ``values[indptr[i]:indptr[i+1]]`` at the
    output columns ``indices[...]``; ``scipy.sparse.csr_array((values,
    indices, indptr), shape=(n_in, n_out))`` is the same matrix.

    Parameters
    ----------
    indptr : ndarray, int32, shape (n_in + 1,)
    indices : ndarray, int32, shape (nnz,)
    values : ndarray, float32, shape (nnz,)
    b : ndarray, float32, shape (n_out,)
    activation : str
    """
    kind = "sparse_csr"
    #: After the CSR: the planes, the one-sample kernel's derived copy of W
    #: (never saved: docs/model.md, "sparse_csr's planes").
    f32_items = ("values", "_pval", "b")
    i8_items = ("_pcount", "_pidx")
    aligned_items = ("_pval", None, None)
    i32_items = ("indptr", "indices")

    def __init__(self, indptr, indices, values, b, activation="identity"):
        _arr("b", b, _F32, 1, finite=True)
        _arr("indptr", indptr, np.int32, 1)
        self.n_in = _size("n_in", indptr.shape[0] - 1)
        self.n_out = _size("n_out", b.shape[0])
        nnz = _csr(indptr, indices, self.n_in, self.n_out)
        _arr("values", values, _F32, 1, (nnz,), finite=True)
        self.indptr, self.indices, self.values, self.b = indptr, indices, values, b
        self.activation = _activation(activation)
        self._build_planes()

    def _plane_values(self):
        return self.values

    @classmethod
    def from_dense(cls, W, b, activation="identity"):
        """The non-zeros of W (float32 (n_in, n_out)), in CSR rows."""
        _arr("W", W, _F32, 2, finite=True)
        rows, cols = np.nonzero(W)
        indptr = np.zeros(W.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(rows, minlength=W.shape[0]), out=indptr[1:])
        return cls(indptr.astype(np.int32), cols.astype(np.int32), W[rows, cols], b, activation)

    @classmethod
    def from_scipy(cls, csr, b, activation="identity"):
        """From a ``scipy.sparse`` CSR array or matrix of shape (n_in, n_out),
        float32; explicit zeros are dropped and indices sorted (on a copy)."""
        import scipy.sparse as sp
        if not sp.issparse(csr) or csr.format != "csr":
            raise TypeError(f"csr must be a scipy.sparse CSR array, got {type(csr).__name__}")
        if csr.dtype != _F32:
            raise TypeError(f"csr must have dtype float32, got {csr.dtype}")
        c = sp.csr_array(csr, copy=True)
        c.eliminate_zeros()
        c.sort_indices()
        c.sum_duplicates()
        _arr("b", b, _F32, 1, (c.shape[1],))
        return cls(c.indptr.astype(np.int32), c.indices.astype(np.int32),
                   np.ascontiguousarray(c.data, _F32), b, activation)

    def to_scipy(self):
        """``scipy.sparse.csr_array`` of W (copies of the arrays)."""
        import scipy.sparse as sp
        return sp.csr_array((self.values.copy(), self.indices.copy(), self.indptr.copy()),
                            shape=(self.n_in, self.n_out))

    @property
    def nnz(self):
        return int(self.indices.shape[0])

    def kind_params(self):
        return (self.nnz, self._n_planes, 0, 0)

    def _rows(self):
        return np.repeat(np.arange(self.n_in), np.diff(self.indptr))

    def to_dense(self):
        W = np.zeros((self.n_in, self.n_out), _F32)
        W[self._rows(), self.indices] = self.values
        return W

    def forward_numpy(self, x):
        return ref.sparse_csr(x, self.indptr, self.indices, self.values, self.b, self.n_out,
                              self.activation)

    @property
    def parameters(self):
        return self.nnz + self.n_out

    @property
    def nonzeros(self):
        return int(np.count_nonzero(self.values))

    def to_record(self):
        return {**self._record_base(), "indptr": self.indptr, "indices": self.indices,
                "values": self.values, "b": self.b}

    @classmethod
    def from_record(cls, d):
        _kind_check(d, cls)
        return cls(d["indptr"], d["indices"], d["values"], d["b"], d["activation"])

    def _payload_bytes(self):
        return (8 + 4 * (self.n_in + 1) + _index_bytes(self.n_out) * self.nnz
                + 4 * self.nnz + 4 * self.n_out)


class LowRank(Layer):
    """``W = U @ V``, run as two thin products.

    Parameters
    ----------
    U : ndarray, float32, shape (n_in, r)
    V : ndarray, float32, shape (r, n_out)
    b : ndarray, float32, shape (n_out,)
    activation : str
    """
    kind = "low_rank"
    f32_items = ("U", "V", "b")

    def __init__(self, U, V, b, activation="identity"):
        _arr("U", U, _F32, 2, finite=True)
        self.n_in, r = _size("n_in", U.shape[0]), _size("rank", U.shape[1])
        _arr("V", V, _F32, 2, finite=True)
        if V.shape[0] != r:
            raise ValueError(f"V must have shape ({r}, n_out) (U has rank {r}), got {V.shape}")
        self.n_out = _size("n_out", V.shape[1])
        _arr("b", b, _F32, 1, (self.n_out,), finite=True)
        self.U, self.V, self.b, self.activation = U, V, b, _activation(activation)

    @property
    def rank(self):
        return int(self.U.shape[1])

    def kind_params(self):
        return (self.rank, 0, 0, 0)

    def to_dense(self):
        return self.U @ self.V

    def forward_numpy(self, x):
        return ref.low_rank(x, self.U, self.V, self.b, self.activation)

    @property
    def parameters(self):
        return self.U.size + self.V.size + self.b.size

    def to_record(self):
        return {**self._record_base(), "U": self.U, "V": self.V, "b": self.b}

    @classmethod
    def from_record(cls, d):
        _kind_check(d, cls)
        return cls(d["U"], d["V"], d["b"], d["activation"])

    def _payload_bytes(self):
        return 4 + 4 * (self.U.size + self.V.size + self.n_out)


class Codebook(Layer):
    """``W[i, j] = centroids[code(i, j)]``, one code per weight packed in
    ``bits`` (1, 2, 4 or 8: the fewest with ``2**bits >= n_codes``).

    Parameters
    ----------
    centroids : ndarray, float32, shape (n_codes,), 1 <= n_codes <= 256
    codes : ndarray, uint8
        Either the codes, shape (n_in, n_out), each < n_codes, or the packed
        stream (1-D, ``ceil(n_in * n_out * bits / 8)`` bytes; then ``n_in``
        is required and ``n_out`` is ``len(b)``).
    b : ndarray, float32, shape (n_out,)
    activation : str
    n_in : int, optional
        Only with a packed stream.
    """
    kind = "codebook"
    f32_items = ("centroids", "b")
    i8_items = ("packed",)

    def __init__(self, centroids, codes, b, activation="identity", *, n_in=None):
        n_codes = _centroids(centroids)
        _arr("b", b, _F32, 1, finite=True)
        self.n_out = _size("n_out", b.shape[0])
        self.bits = _fewest_bits(n_codes, (1, 2, 4, 8))
        if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
            raise TypeError("codes must be a numpy.ndarray of uint8 (the codes (n_in, n_out) "
                            "or the packed stream)")
        if codes.ndim == 2:
            if n_in is not None and n_in != codes.shape[0]:
                raise ValueError(f"n_in = {n_in} but codes has shape {codes.shape}")
            _arr("codes", codes, np.uint8, 2, (codes.shape[0], self.n_out))
            self.n_in = _size("n_in", codes.shape[0])
            if codes.size and codes.max() >= n_codes:
                raise ValueError(f"codes must be < n_codes = {n_codes}, found {codes.max()}")
            packed = pack_bits(codes, self.bits)
        elif codes.ndim == 1:
            if n_in is None:
                raise ValueError("a packed code stream needs n_in")
            self.n_in = _size("n_in", n_in)
            nbytes = -(-self.n_in * self.n_out * self.bits // 8)
            _arr("packed codes", codes, np.uint8, 1, (nbytes,))
            try:
                decoded = unpack_bits(codes, self.bits, self.n_in * self.n_out)
            except ValueError as e:
                raise ValueError(f"packed codes: {e}") from None
            if decoded.size and decoded.max() >= n_codes:
                raise ValueError(f"codes must be < n_codes = {n_codes}, found {decoded.max()}")
            packed = codes
        else:
            raise ValueError(f"codes must be 2-D (n_in, n_out) or a 1-D packed stream, "
                             f"got shape {codes.shape}")
        self.centroids, self.packed, self.b = centroids, packed, b
        self.activation = _activation(activation)

    @property
    def n_codes(self):
        return int(self.centroids.shape[0])

    @property
    def codes(self):
        """The codes, uint8 (n_in, n_out) (decoded: a new array)."""
        return unpack_bits(self.packed, self.bits, self.n_in * self.n_out).reshape(
            self.n_in, self.n_out)

    def kind_params(self):
        return (self.n_codes, self.bits, 0, 0)

    def to_dense(self):
        return self.centroids[self.codes]

    def forward_numpy(self, x):
        return ref.codebook(x, self.centroids, self.codes, self.b, self.activation)

    @property
    def parameters(self):
        return self.n_codes + self.n_out

    @property
    def nonzeros(self):
        return int(np.count_nonzero(self.centroids[self.codes]))

    def to_record(self):
        return {**self._record_base(), "n_in": self.n_in, "centroids": self.centroids,
                "bits": self.bits, "packed": self.packed, "b": self.b}

    @classmethod
    def from_record(cls, d):
        _kind_check(d, cls)
        layer = cls(d["centroids"], d["packed"], d["b"], d["activation"], n_in=d["n_in"])
        if "bits" in d and d["bits"] != layer.bits:
            raise ValueError(f"codebook of {check.plural(layer.n_codes, 'code')} must use "
                             f"{check.plural(layer.bits, 'bit')}, "
                             f"got {d['bits']}")
        return layer

    def _payload_bytes(self):
        return 8 + 4 * self.n_codes + self.packed.size + 4 * self.n_out


class SparseCodebook(_Planes, Layer):
    """Deep Compression's layer: the CSR pattern of :class:`SparseCSR` with
    the value of entry ``k`` equal to ``centroids[codes[k]]``.

    Parameters
    ----------
    indptr : ndarray, int32, shape (n_in + 1,)
    indices : ndarray, int32, shape (nnz,)
    codes : ndarray, uint8, shape (nnz,), each < n_codes
    centroids : ndarray, float32, shape (n_codes,), 1 <= n_codes <= 256
    b : ndarray, float32, shape (n_out,)
    activation : str
    """
    kind = "sparse_codebook"
    #: After the centroids and codes: the planes of sparse_csr, with the
    #: values ``centroids[codes]`` (never saved: docs/model.md, "sparse_csr's planes").
    f32_items = ("centroids", "_pval", "b")
    i8_items = ("codes", "_pcount", "_pidx")
    aligned_items = ("_pval", None, None)
    i32_items = ("indptr", "indices")

    def __init__(self, indptr, indices, codes, centroids, b, activation="identity"):
        _arr("b", b, _F32, 1, finite=True)
        _arr("indptr", indptr, np.int32, 1)
        self.n_in = _size("n_in", indptr.shape[0] - 1)
        self.n_out = _size("n_out", b.shape[0])
        nnz = _csr(indptr, indices, self.n_in, self.n_out)
        n_codes = _centroids(centroids)
        _arr("codes", codes, np.uint8, 1, (nnz,))
        if nnz and codes.max() >= n_codes:
            raise ValueError(f"codes must be < n_codes = {n_codes}, found {codes.max()}")
        self.indptr, self.indices, self.codes = indptr, indices, codes
        self.centroids, self.b = centroids, b
        self.bits = _fewest_bits(n_codes, range(1, 9))
        self.activation = _activation(activation)
        self._build_planes()

    def _plane_values(self):
        return self.centroids[self.codes]

    def _check_arrays(self):
        super()._check_arrays()
        _centroids(self.centroids)
        if self.nnz and self.codes.max() >= self.n_codes:
            raise ValueError(f"codes must be < n_codes = {self.n_codes}, found {self.codes.max()}")

    @property
    def nnz(self):
        return int(self.indices.shape[0])

    @property
    def n_codes(self):
        return int(self.centroids.shape[0])

    def kind_params(self):
        return (self.nnz, self.n_codes, self.bits, self._n_planes)

    def to_dense(self):
        W = np.zeros((self.n_in, self.n_out), _F32)
        rows = np.repeat(np.arange(self.n_in), np.diff(self.indptr))
        W[rows, self.indices] = self.centroids[self.codes]
        return W

    def forward_numpy(self, x):
        return ref.sparse_csr(x, self.indptr, self.indices, self.centroids[self.codes], self.b,
                              self.n_out, self.activation)

    @property
    def parameters(self):
        return self.n_codes + self.n_out

    @property
    def nonzeros(self):
        return int(np.count_nonzero(self.centroids[self.codes]))

    def to_record(self):
        return {**self._record_base(), "indptr": self.indptr, "indices": self.indices,
                "codes": self.codes, "centroids": self.centroids, "b": self.b}

    @classmethod
    def from_record(cls, d):
        _kind_check(d, cls)
        return cls(d["indptr"], d["indices"], d["codes"], d["centroids"], d["b"],
                   d["activation"])

    def _positions(self):
        rows = np.repeat(np.arange(self.n_in, dtype=np.int64), np.diff(self.indptr))
        return rows * self.n_out + self.indices

    def _payload_bytes(self):
        gaps = _bits.positions_to_gaps(self._positions())
        pos = _bits.packed_len(_bits.rice_nbits(gaps, _bits.best_rice_k(gaps)), 1)
        return 20 + 4 * self.n_codes + pos + -(-self.nnz * self.bits // 8) + 4 * self.n_out


KIND_CLASSES = {cls.kind: cls for cls in (Dense, DenseInt8, SparseCSR, LowRank, Codebook,
                                           SparseCodebook)}
assert set(KIND_CLASSES) == set(_codes.KINDS)


def from_record(d):
    """The layer object of a record dict (any kind)."""
    if not isinstance(d, dict):
        raise TypeError(f"a layer record must be a dict, got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in KIND_CLASSES:
        raise ValueError(f"layer kind must be one of {list(KIND_CLASSES)}, got {kind!r}")
    return KIND_CLASSES[kind].from_record(d)
