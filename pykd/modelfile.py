"""The pykd binary model format: writer (version 2) and reader (versions 1 and 2).

The format is specified byte by byte in ``docs/format.md``. In short: fixed
width little-endian fields, no padding, no compression (except the Rice-coded
positions of a sparse codebook layer), a CRC-32 trailer, so that NumPy alone
or a Fortran program with ``access='stream'`` can read it. The codes come
from :mod:`pykd._codes`; the names below are kept as aliases.

The writer makes the canonical choices of the format (the narrowest column
index width, the fewest bits per code, the Rice parameter giving the fewest
bytes, ties to the smallest), so a model has exactly one file, the same bytes
from Python and from Fortran.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import zlib

import numpy as np

from . import _bits, _codes
from ._validate import plural
from . import io as _io

__all__ = [
    "ACTIVATION_CODES", "END_MAGIC", "KIND_CODES", "MAGIC", "MAX_COUNT",
    "NORM_CODES", "SUPPORTED_KINDS", "VERSION", "ModelFormatError",
    "codebook_bits", "index_bits", "read_model", "sparse_codebook_bits", "write_model",
]

MAGIC = b"PYKDMDL\0"
END_MAGIC = b"PYKDEND\0"
#: The version written; :data:`READ_VERSIONS` are read.
VERSION = _codes.FORMAT_VERSION
READ_VERSIONS = _codes.FORMAT_VERSIONS
KIND_CODES = _codes.KINDS
SUPPORTED_KINDS = tuple(_codes.KINDS)
ACTIVATION_CODES = _codes.ACTIVATIONS
NORM_CODES = _codes.NORMS
QUANT_CODES = _codes.QUANT_MODES

#: Largest value of a count field, so that a Fortran reader may use default
#: (signed 32-bit) integers for every size field.
MAX_COUNT = 2**31 - 1
#: Metadata limits: bytes of JSON, and nesting depth (``{}`` is depth 1).
MAX_METADATA_BYTES = 16 * 2**20
MAX_METADATA_DEPTH = 64
#: Largest ``n_in`` of a dense_int8 layer: its int32 sums cannot overflow.
MAX_INT8_INPUTS = 131071
#: Largest codebook.
MAX_CODES = 256
#: The decoded-size rule: a reader allocates at most this many bytes per byte
#: of file, plus :data:`DECODED_SLACK`, for a model's arrays.
DECODED_PER_BYTE = 64
DECODED_SLACK = 64 * 1024

#: What version 1 had.
V1_KINDS = ("dense", "dense_int8")
V1_ACTIVATIONS = ("identity", "relu", "tanh")

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_KIND_NAMES = {v: k for k, v in KIND_CODES.items()}
_ACTIVATION_NAMES = {v: k for k, v in ACTIVATION_CODES.items()}
_NORM_NAMES = {v: k for k, v in NORM_CODES.items()}
_TRAILER_LEN = 4 + len(END_MAGIC)
_F32 = np.dtype(np.float32)
_I32 = np.dtype(np.int32)

#: Keys of each kind's layer dict besides "kind" and "activation" (the
#: contract with pykd.layers); those in _OPTIONAL_KEYS may be left out.
LAYER_KEYS = {
    "dense": ("W", "b"),
    "dense_int8": ("q", "scale", "b", "x_scale"),
    "sparse_csr": ("indptr", "indices", "values", "b"),
    "low_rank": ("U", "V", "b"),
    "codebook": ("n_in", "centroids", "bits", "packed", "b"),
    "sparse_codebook": ("indptr", "indices", "codes", "centroids", "b"),
}
_OPTIONAL_KEYS = {"dense_int8": {"x_scale"}}


class ModelFormatError(ValueError):
    """A model file is not a valid pykd model file of a supported version."""


# --------------------------------------------------------------------------
# The canonical choices


def codebook_bits(n_codes: int) -> int:
    """Bits per index of a codebook layer: the fewest of 1, 2, 4, 8 with
    ``2**bits >= n_codes``."""
    return next(b for b in (1, 2, 4, 8) if 1 << b >= n_codes)


def sparse_codebook_bits(n_codes: int) -> int:
    """Bits per code of a sparse codebook layer: the fewest of 1..8 with
    ``2**bits >= n_codes``."""
    return max(1, (int(n_codes) - 1).bit_length())


def index_bits(n_out: int) -> int:
    """Column index width of a sparse_csr layer: the narrowest of 8, 16, 32
    that holds ``n_out - 1``."""
    return next(b for b in (8, 16, 32) if n_out - 1 < 1 << b)


def _fspath(path) -> str:
    """``path`` as a str; only str, bytes and os.PathLike are paths (an int
    would be taken for a file descriptor)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


# --------------------------------------------------------------------------
# Checks shared by the writer and the reader (they return a problem or None)


def _csr_problem(indptr: np.ndarray, indices: np.ndarray, n_out: int) -> str | None:
    """What is wrong with a CSR pattern (``indices`` int32), or None."""
    nnz = indices.shape[0]
    if int(indptr[0]) != 0:
        return f"indptr[0] must be 0, got {int(indptr[0])}"
    if (indptr[1:] < indptr[:-1]).any():
        return "indptr must be non-decreasing"
    if int(indptr[-1]) != nnz:
        return f"indptr[-1] must equal nnz = len(indices) = {nnz}, got {int(indptr[-1])}"
    if nnz == 0:
        return None
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= n_out:
        return f"indices must be in [0, n_out = {n_out}), found {lo if lo < 0 else hi}"
    row_start = np.zeros(nnz, bool)
    row_start[indptr[:-1][indptr[:-1] < nnz]] = True
    bad = (indices[1:] <= indices[:-1]) & ~row_start[1:]
    if bad.any():
        row = int(np.searchsorted(indptr, int(bad.argmax()) + 1, side="right")) - 1
        return f"indices in row {row} are not strictly increasing"
    return None


def _codes_problem(packed: np.ndarray, bits: int, count: int, n_codes: int) -> str | None:
    """What is wrong with a codebook's stream of ``count`` indices (``bits`` in
    1, 2, 4, 8), each to be < ``n_codes``, or None.

    Decodes a chunk at a time, so a 1-bit stream costs no 8x copy.
    """
    try:
        _bits.check_padding(packed, count * bits)
    except ValueError as e:
        return str(e)
    if n_codes >= 1 << bits:
        return None
    chunk = 1 << 20
    for a in range(0, packed.size, chunk):
        part = packed[a : a + chunk]
        top = int(_bits.unpack(part, bits, part.size * 8 // bits).max())
        if top >= n_codes:  # the padding fields are 0, so they never fail here
            return f"index {top} is >= n_codes = {n_codes}"
    return None


# --------------------------------------------------------------------------
# Writing


def _check_array(a, dtype, what: str, *, ndim: int | None = None, shape: tuple | None = None,
                 finite: bool = False, min_size: int = 0) -> np.ndarray:
    """Check type, dtype (no casting), ndim / shape and finiteness; return ``a``."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        got = f"dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{what} must be a numpy array of dtype {np.dtype(dtype)}, got {got}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {a.shape}")
    if ndim is not None and not (a.ndim == ndim
                                 and all(min_size <= n <= MAX_COUNT for n in a.shape)):
        dims = "2-D (n_in, n_out)" if ndim == 2 else f"{ndim}-D"
        raise ValueError(f"{what} must be {dims} with sizes in [{min_size}, 2^31 - 1], "
                         f"got shape {a.shape}")
    if finite and a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return a


def _check_int(v, what: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{what} must be in [{lo}, {hi}], got {v}")
    return int(v)


def _f32_scalar(v, what: str):
    """A float32 scalar (np.float32 or a 0-d float32 array) as a 0-d array."""
    if isinstance(v, np.float32):
        v = np.asarray(v)
    if not isinstance(v, np.ndarray) or v.dtype != _F32 or v.shape != ():
        got = f"dtype {v.dtype}, shape {v.shape}" if isinstance(v, np.ndarray) \
            else type(v).__name__
        raise TypeError(f"{what} must be a float32 scalar (e.g. np.float32(x)), got {got}")
    return v


def _u32(*values: int) -> bytes:
    return np.array(values, dtype="<u4").tobytes()


def _le(a: np.ndarray, code: str) -> np.ndarray:
    """``a`` as a C-ordered array of the file's type ``code`` (values checked)."""
    return np.ascontiguousarray(a, dtype=np.dtype(code))


def _write_dense(layer, what):
    W = _check_array(layer["W"], _F32, f"{what}: W", ndim=2, min_size=1, finite=True)
    n_in, n_out = W.shape
    b = _check_array(layer["b"], _F32, f"{what}: b", shape=(n_out,), finite=True)
    return n_in, n_out, [_le(W, "<f4"), _le(b, "<f4")]


def _write_dense_int8(layer, what):
    q = _check_array(layer["q"], np.int8, f"{what}: q", ndim=2, min_size=1)
    n_in, n_out = q.shape
    scale = _check_array(layer["scale"], _F32, f"{what}: scale", shape=(n_out,), finite=True)
    b = _check_array(layer["b"], _F32, f"{what}: b", shape=(n_out,), finite=True)
    x_scale = layer.get("x_scale")
    if x_scale is not None:
        x_scale = _f32_scalar(x_scale, f"{what}: x_scale")
        if not (np.isfinite(x_scale) and x_scale >= np.finfo(_F32).tiny):
            raise ValueError(f"{what}: x_scale must be finite and at least the smallest "
                             f"normal float32, got {x_scale}")
    if n_in > MAX_INT8_INPUTS:
        raise ValueError(f"{what}: n_in = {n_in} is more than {MAX_INT8_INPUTS} (int32 sums)")
    if (q == -128).any():
        raise ValueError(f"{what}: q contains -128 (int8 weights must be in [-127, 127])")
    if (scale < 0).any():
        raise ValueError(f"{what}: scale contains negative values")
    quant = QUANT_CODES["dynamic" if x_scale is None else "static"]
    chunks = [_u32(quant), _le(q, "i1"), _le(scale, "<f4")]
    if x_scale is not None:
        chunks.append(_le(x_scale, "<f4"))
    return n_in, n_out, chunks + [_le(b, "<f4")]


def _write_csr_pattern(layer, what):
    """Check indptr, indices and b of a CSR kind; return (n_in, n_out, indptr, indices, b)."""
    indptr = _check_array(layer["indptr"], _I32, f"{what}: indptr", ndim=1, min_size=2)
    indices = _check_array(layer["indices"], _I32, f"{what}: indices", ndim=1)
    b = _check_array(layer["b"], _F32, f"{what}: b", ndim=1, min_size=1, finite=True)
    n_in, n_out = indptr.shape[0] - 1, b.shape[0]
    problem = _csr_problem(indptr, indices, n_out)
    if problem:
        raise ValueError(f"{what}: {problem}")
    return n_in, n_out, indptr, indices, b


def _write_sparse_csr(layer, what):
    n_in, n_out, indptr, indices, b = _write_csr_pattern(layer, what)
    nnz = indices.shape[0]
    values = _check_array(layer["values"], _F32, f"{what}: values", shape=(nnz,), finite=True)
    width = index_bits(n_out)
    return n_in, n_out, [_u32(nnz, width), _le(indptr, "<u4"),
                         _le(indices, {8: "u1", 16: "<u2", 32: "<u4"}[width]),
                         _le(values, "<f4"), _le(b, "<f4")]


def _write_low_rank(layer, what):
    U = _check_array(layer["U"], _F32, f"{what}: U", ndim=2, min_size=1, finite=True)
    n_in, rank = U.shape
    V = _check_array(layer["V"], _F32, f"{what}: V", ndim=2, min_size=1, finite=True)
    if V.shape[0] != rank:
        raise ValueError(f"{what}: V must have rank = U.shape[1] = {plural(rank, 'row')}, "
                         f"got shape {V.shape}")
    n_out = V.shape[1]
    b = _check_array(layer["b"], _F32, f"{what}: b", shape=(n_out,), finite=True)
    return n_in, n_out, [_u32(rank), _le(U, "<f4"), _le(V, "<f4"), _le(b, "<f4")]


def _check_centroids(layer, what):
    c = _check_array(layer["centroids"], _F32, f"{what}: centroids", ndim=1, finite=True)
    if not 1 <= c.shape[0] <= MAX_CODES:
        raise ValueError(f"{what}: centroids must hold 1 to {MAX_CODES} values, got {c.shape[0]}")
    return c


def _write_codebook(layer, what):
    n_in = _check_int(layer["n_in"], f"{what}: n_in", 1, MAX_COUNT)
    centroids = _check_centroids(layer, what)
    b = _check_array(layer["b"], _F32, f"{what}: b", ndim=1, min_size=1, finite=True)
    n_out, n_codes = b.shape[0], centroids.shape[0]
    bits = _check_int(layer["bits"], f"{what}: bits", 1, 8)
    if bits != codebook_bits(n_codes):
        raise ValueError(f"{what}: bits must be {codebook_bits(n_codes)}, the fewest of 1, 2, "
                         f"4, 8 that holds {n_codes} codes, got {bits}")
    count = n_in * n_out
    packed = _check_array(layer["packed"], np.uint8, f"{what}: packed",
                          shape=(_bits.packed_len(count, bits),))
    problem = _codes_problem(packed, bits, count, n_codes)
    if problem:
        raise ValueError(f"{what}: packed: {problem}")
    return n_in, n_out, [_u32(n_codes, bits), _le(centroids, "<f4"), _le(packed, "u1"),
                         _le(b, "<f4")]


def _write_sparse_codebook(layer, what):
    n_in, n_out, indptr, indices, b = _write_csr_pattern(layer, what)
    nnz = indices.shape[0]
    codes = _check_array(layer["codes"], np.uint8, f"{what}: codes", shape=(nnz,))
    centroids = _check_centroids(layer, what)
    n_codes = centroids.shape[0]
    if nnz and int(codes.max()) >= n_codes:
        raise ValueError(f"{what}: codes must be < n_codes = {n_codes}, found {int(codes.max())}")
    bits = sparse_codebook_bits(n_codes)
    rows = np.repeat(np.arange(n_in, dtype=np.int64), np.diff(indptr))
    gaps = _bits.positions_to_gaps(rows * n_out + indices)
    del rows
    k = _bits.best_rice_k(gaps)
    positions, _ = _bits.rice_encode(gaps, k)
    if positions.size > MAX_COUNT:
        raise ValueError(f"{what}: the position stream would be {positions.size} bytes, "
                         "more than 2^31 - 1")
    return n_in, n_out, [_u32(nnz, n_codes, bits, k, positions.size), _le(centroids, "<f4"),
                         positions, _bits.pack(codes, bits), _le(b, "<f4")]


_WRITERS = {
    "dense": _write_dense,
    "dense_int8": _write_dense_int8,
    "sparse_csr": _write_sparse_csr,
    "low_rank": _write_low_rank,
    "codebook": _write_codebook,
    "sparse_codebook": _write_sparse_codebook,
}


def _check_layers(layers) -> list[tuple]:
    """Validate ``layers``; return (kind, activation, n_in, n_out, chunks) for each."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError("layers must be a non-empty list of layer dicts")
    out = []
    for k, layer in enumerate(layers, start=1):  # layers are numbered from 1
        if not isinstance(layer, dict):
            raise TypeError(f"layer {k}: must be a dict, got {type(layer).__name__}")
        kind = layer.get("kind")
        if kind not in _WRITERS:
            raise ValueError(f"layer {k}: kind must be one of {list(_WRITERS)}, got {kind!r}")
        expected = {"kind", "activation", *LAYER_KEYS[kind]}
        optional = _OPTIONAL_KEYS.get(kind, set())
        if not expected - optional <= set(layer) <= expected:
            raise ValueError(
                f"layer {k} ({kind}): expected keys {sorted(expected)}, got {sorted(layer)}"
            )
        activation = layer["activation"]
        if activation not in ACTIVATION_CODES:
            raise ValueError(
                f"layer {k}: activation must be one of {list(ACTIVATION_CODES)}, got {activation!r}"
            )
        n_in, n_out, chunks = _WRITERS[kind](layer, f"layer {k}")
        if out and out[-1][3] != n_in:
            raise ValueError(
                f"layer sizes do not chain: layer {k - 1} outputs {out[-1][3]} "
                f"but layer {k} takes {n_in}"
            )
        out.append((kind, activation, n_in, n_out, chunks))
    return out


def _check_norm(norm, n: int, name: str, size_name: str) -> tuple[int, list[np.ndarray]]:
    if norm is None:
        return NORM_CODES["none"], []
    if not isinstance(norm, tuple) or len(norm) != 2:
        raise TypeError(f"{name} must be None or a tuple (mean, std)")
    arrays = []
    for part, v in zip(("mean", "std"), norm):
        if isinstance(v, np.float32):
            v = np.asarray(v)
        if not isinstance(v, np.ndarray) or v.dtype != _F32:
            got = f"dtype {v.dtype}" if isinstance(v, np.ndarray) else type(v).__name__
            raise TypeError(
                f"{name} {part} must be a float32 scalar (e.g. np.float32(x)) or a float32 "
                f"array, got {got}"
            )
        arrays.append(v)
    mean, std = arrays
    if mean.shape != std.shape or mean.shape not in ((), (n,)):
        raise ValueError(
            f"{name} mean and std must both be scalars or both have shape ({n},) "
            f"({size_name}), got {mean.shape} and {std.shape}"
        )
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError(f"{name} mean and std must be finite")
    if not (std > 0).all():
        raise ValueError(f"{name} std must be > 0")
    code = NORM_CODES["scalar" if mean.shape == () else "per_feature"]
    return code, [_le(mean, "<f4"), _le(std, "<f4")]


def _json_depth_exceeds(obj, limit: int) -> bool:
    """Whether ``obj`` nests dicts/lists more than ``limit`` deep (``{}`` is 1).

    Iterative, so a deep or circular object cannot exhaust the stack.
    """
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, (list, tuple)):
            children = o
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return False


def _encode_metadata(metadata) -> bytes:
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    if _json_depth_exceeds(metadata, MAX_METADATA_DEPTH):
        raise ValueError(f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep "
                         "(or is circular)")
    try:
        meta = json.dumps(metadata, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata is not JSON-serialisable: {e}") from e
    if len(meta) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is too large ({len(meta)} bytes of JSON; at most "
                         f"{MAX_METADATA_BYTES})")
    return meta


def write_model(path, layers, *, norm=None, out_norm=None, metadata=None) -> None:
    """Write a model in the pykd binary format (version 2), atomically.

    Parameters
    ----------
    path : str or path-like
        Destination. It is replaced only once the new file is complete and
        synced to disk; on failure an existing file is left untouched.
    layers : list of dict
        From input to output; layer k's n_out must equal layer k+1's n_in.
        Each has ``"kind"``, ``"activation"`` (one of :data:`ACTIVATION_CODES`)
        and the arrays of its kind, of exactly these dtypes (nothing is cast):

        * ``dense``: ``W`` float32 (n_in, n_out), ``b`` float32 (n_out,).
        * ``dense_int8``: ``q`` int8 (n_in, n_out) in [-127, 127], ``scale``
          float32 (n_out,) >= 0, ``b``, and ``x_scale``: None (or left out)
          for dynamic input quantization, or a float32 scalar > 0 (static).
          The weight is ``q * scale[None, :]``; n_in <= 131071.
        * ``sparse_csr``: ``indptr`` int32 (n_in + 1,), ``indices`` int32
          (nnz,), ``values`` float32 (nnz,), ``b`` (n_out,): scipy's CSR
          layout, column indices strictly increasing within a row.
        * ``low_rank``: ``U`` float32 (n_in, r), ``V`` float32 (r, n_out), ``b``.
        * ``codebook``: ``n_in`` int, ``centroids`` float32 (n_codes,) with
          1 <= n_codes <= 256, ``bits`` (:func:`codebook_bits` of n_codes),
          ``packed`` uint8 (ceil(n_in * n_out * bits / 8),): the row-major
          indices, LSB first, each < n_codes, zero padding; ``b`` (n_out,).
        * ``sparse_codebook``: ``indptr``, ``indices`` as for sparse_csr,
          ``codes`` uint8 (nnz,) each < n_codes, ``centroids``, ``b``.
    norm, out_norm : tuple (mean, std) or None, optional
        Input normalisation ``(x - mean) / std`` and output normalisation
        (the outputs are ``y * std + mean``): two float32 scalars (``np.float32``
        or 0-d arrays) or two float32 arrays of shape (n_features,) /
        (n_outputs,). ``std`` must be > 0.
    metadata : dict or None, optional
        JSON-serialisable metadata such as the training configuration, at
        most 16 MiB of JSON nested at most 64 deep. ``None`` is stored as ``{}``.

    Raises
    ------
    TypeError
        If an array is not a NumPy array of exactly the required dtype, or
        metadata is not a JSON-serialisable dict. Messages name the layer
        (counted from 1) and the array.
    ValueError
        If shapes are wrong or do not chain, values are NaN/inf or out of
        range, ``std <= 0``, or a kind, activation or key is unknown.
    OSError
        If the file cannot be written.
    """
    path = _fspath(path)
    checked = _check_layers(layers)
    n_features, n_outputs = checked[0][2], checked[-1][3]
    in_code, in_arrays = _check_norm(norm, n_features, "norm", "n_features")
    out_code, out_arrays = _check_norm(out_norm, n_outputs, "out_norm", "n_outputs")
    meta = _encode_metadata(metadata)

    chunks = [MAGIC, _u32(VERSION, len(checked), n_features, n_outputs, in_code), *in_arrays,
              _u32(out_code), *out_arrays, _u32(len(meta)), meta]
    for kind, activation, n_in, n_out, payload in checked:
        chunks.append(_u32(KIND_CODES[kind], ACTIVATION_CODES[activation], n_in, n_out))
        chunks.append(np.array([sum(memoryview(c).nbytes for c in payload)], "<u8").tobytes())
        chunks += payload
    _atomic_write(path, chunks)


def _atomic_write(path: str, chunks: list) -> None:
    """Write ``chunks`` plus the CRC trailer atomically (:func:`pykd.io.atomic_write`)."""
    def write(f):
        crc = 0
        for chunk in chunks:
            f.write(chunk)
            crc = zlib.crc32(chunk, crc)
        f.write(_u32(crc) + END_MAGIC)

    _io.atomic_write(path, write)


# --------------------------------------------------------------------------
# Reading


def read_model(path) -> dict:
    """Read and fully validate a model file (format version 1 or 2).

    Parameters
    ----------
    path : str or path-like
        The model file; it must be a regular file (a FIFO or device is
        refused without blocking).

    Returns
    -------
    dict
        ``{"version": int, "layers": [layer dicts as accepted by write_model],
        "norm": None or (mean, std), "out_norm": None or (mean, std),
        "metadata": dict, "n_features": int, "n_outputs": int}``. Every
        layer dict has all the keys of its kind (``x_scale`` is None for a
        dynamic int8 layer). Arrays are native-endian, C-contiguous,
        writeable and own their data. A scalar normalisation is returned as
        two ``np.float32`` values.

    Raises
    ------
    TypeError
        If ``path`` is not a str or path-like (an int is not taken for a file
        descriptor).
    ModelFormatError
        If the file is not a regular file, not a pykd model (bad magic), has
        an unsupported version, is truncated, has trailing bytes, fails the
        CRC-32 check, would decode to more than 64 times its size plus 64 KiB,
        or holds invalid content (unknown kind or activation, sizes that do
        not chain or disagree with payload_bytes, NaN/inf, ``std <= 0``,
        indices out of range, bad metadata, ...). The message starts with the
        file name.
    OSError
        If the file cannot be opened or read.
    """
    name = _fspath(path)
    data = _read_regular_file(name)
    try:
        return _parse(data)
    except ModelFormatError as e:
        raise ModelFormatError(f"{name}: {e}") from None


_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _not_regular(name: str, mode: int) -> ModelFormatError:
    what = next((w for test, w in _FILE_TYPES if test(mode)), "not a regular file")
    return ModelFormatError(f"{name}: is {what}, not a regular model file")


def _read_regular_file(name: str) -> bytes:
    """The bytes of ``name``, which must be a regular file; never blocks on a FIFO."""
    st = os.stat(name)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(name, st.st_mode)
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)  # it may have been replaced since the stat
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(name, st.st_mode)
        with io.FileIO(fd, "rb", closefd=False) as f:
            return f.readall()
    finally:
        os.close(fd)


def _parse(data: bytes) -> dict:
    if data[: len(MAGIC)] != MAGIC:
        if data and len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise ModelFormatError(f"truncated: file is only {plural(len(data), 'byte')}")
        raise ModelFormatError("not a pykd model file (bad magic)")
    if len(data) < 12:
        raise ModelFormatError(f"truncated: file is only {plural(len(data), 'byte')}")
    version = int.from_bytes(data[8:12], "little")
    if version not in READ_VERSIONS:
        raise ModelFormatError(
            f"unsupported model format version {version} (this pykd reads versions "
            f"{' and '.join(map(str, READ_VERSIONS))})"
        )
    if data.endswith(END_MAGIC) and len(data) >= 12 + _TRAILER_LEN:
        # Normal case: verify the checksum before trusting any size field.
        body_end = len(data) - _TRAILER_LEN
        stored = int.from_bytes(data[body_end : body_end + 4], "little")
        if zlib.crc32(memoryview(data)[:body_end]) != stored:
            raise ModelFormatError("checksum mismatch (file corrupted)")
        model, end = _Parser(data, body_end, version).parse()
        if end != body_end:
            raise ModelFormatError(
                f"{body_end - end} unexpected bytes between the last layer and the checksum"
            )
        return model
    # No end marker at the end of the file: use the (unverified) sizes in the
    # header to say whether the file is truncated or has trailing bytes.
    model, end = _Parser(data, len(data), version).parse()
    if len(data) < end + _TRAILER_LEN:
        raise ModelFormatError(
            f"truncated: file is {plural(len(data), 'byte')}, but the checksum and end marker "
            f"need {end + _TRAILER_LEN}"
        )
    if data[end + 4 : end + _TRAILER_LEN] == END_MAGIC:
        raise ModelFormatError(
            f"trailing garbage: {len(data) - end - _TRAILER_LEN} unexpected bytes after "
            f"the end marker at offset {end + 4}"
        )
    raise ModelFormatError(f"end marker {END_MAGIC!r} not found at offset {end + 4} (file corrupted)")


class _Parser:
    """Reads the fields after the version, up to ``limit``.

    Every size is checked against the bytes present (and against the
    decoded-size rule) before anything is allocated, so bogus sizes cannot
    cause huge allocations.
    """

    def __init__(self, data: bytes, limit: int, version: int):
        self.view = memoryview(data)
        self.pos = 12
        self.limit = limit
        self.version = version
        self.file_size = len(data)
        self.budget = DECODED_PER_BYTE * len(data) + DECODED_SLACK
        self.decoded = 0
        self.payload = None  # (layer number, payload_bytes, end) inside a v2 record

    # ---- primitives
    def take(self, n: int, what: str) -> memoryview:
        end = self.limit if self.payload is None else self.payload[2]
        if self.pos + n > end:
            if self.payload is not None and self.pos + n <= self.limit:
                k, nbytes, _ = self.payload
                raise ModelFormatError(f"layer {k}: payload_bytes = {nbytes} is too short "
                                       f"for its fields ({what})")
            raise ModelFormatError(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"but only {max(self.limit - self.pos, 0)} remain"
            )
        self.pos += n
        return self.view[self.pos - n : self.pos]

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def count(self, what: str) -> int:
        v = self.u32(what)
        if v > MAX_COUNT:
            raise ModelFormatError(f"{what} = {v} is larger than the largest count 2^31 - 1")
        return v

    def array(self, code: str, n: int, what: str, finite: bool = False,
              shape: tuple | None = None) -> np.ndarray:
        """``n`` values of file type ``code``: a native, owning copy of shape ``shape``."""
        dt = np.dtype(code)
        raw = np.frombuffer(self.take(n * dt.itemsize, what), dtype=dt)
        a = raw.reshape(shape or (n,)).astype(dt.newbyteorder("="))
        if finite and not np.isfinite(a).all():
            raise ModelFormatError(f"{what} contains NaN or infinite values")
        return a

    def charge(self, nbytes: int, what: str) -> None:
        """The decoded-size rule, checked before allocating ``nbytes``."""
        self.decoded += nbytes
        if self.decoded > self.budget:
            raise ModelFormatError(
                f"{what}: its arrays would take {nbytes} bytes, more than the file's size "
                f"allows (at most {DECODED_PER_BYTE} x {self.file_size} bytes + 64 KiB for "
                "all arrays)"
            )

    def implied(self, k: int, nbytes: int) -> None:
        """Check a record's payload length implied by its fields (v2: payload_bytes)."""
        if self.payload is None:  # version 1: just the bytes present
            if self.pos + nbytes > self.limit:
                raise ModelFormatError(
                    f"truncated: layer {k} payload needs {nbytes} bytes at offset "
                    f"{self.pos}, but only {max(self.limit - self.pos, 0)} remain")
            return
        payload_bytes = self.payload[1]
        if nbytes != payload_bytes:
            raise ModelFormatError(f"layer {k}: payload_bytes is {payload_bytes}, but its "
                                   f"fields imply {nbytes}")

    # ---- the file
    def parse(self) -> tuple[dict, int]:
        v2 = self.version >= 2
        n_layers = self.count("n_layers")
        n_features = self.count("n_features")
        n_outputs = self.count("n_outputs")
        if n_layers == 0:
            raise ModelFormatError("model has no layers")
        norm = self.norm("in_norm" if v2 else "norm", n_features)
        out_norm = self.norm("out_norm", n_outputs) if v2 else None
        metadata = self.metadata()
        layers, prev_out = [], n_features
        for k in range(1, n_layers + 1):
            layer, n_in, n_out = self.layer(k)
            if k == 1 and n_in != n_features:
                raise ModelFormatError(
                    f"layer 1 takes {plural(n_in, 'input')} but the model has n_features = "
                    f"{n_features}"
                )
            if n_in != prev_out:
                raise ModelFormatError(
                    f"layer sizes do not chain: layer {k - 1} outputs {prev_out} "
                    f"but layer {k} takes {n_in}"
                )
            layers.append(self.payload_of(k, layer, n_in, n_out))
            prev_out = n_out
        if prev_out != n_outputs:
            raise ModelFormatError(
                f"layer {n_layers} outputs {prev_out} but the model has n_outputs = {n_outputs}"
            )
        model = {
            "version": self.version,
            "layers": layers,
            "norm": norm,
            "out_norm": out_norm,
            "metadata": metadata,
            "n_features": n_features,
            "n_outputs": n_outputs,
        }
        return model, self.pos

    def norm(self, name: str, n: int):
        code = self.u32(name)
        if code == NORM_CODES["none"]:
            return None
        if code not in _NORM_NAMES:
            raise ModelFormatError(f"{name}: unknown norm kind {code}")
        size = n if code == NORM_CODES["per_feature"] else 1
        mean = self.array("<f4", size, f"{name} mean", finite=True)  # stored as they are,
        std = self.array("<f4", size, f"{name} std", finite=True)    # so bounded by the file
        self.charge(8 * size, name)
        if not (std > 0).all():
            raise ModelFormatError(f"{name} std must be > 0")
        if code == NORM_CODES["scalar"]:
            return mean[0], std[0]
        return mean, std

    def metadata(self) -> dict:
        meta_len = self.u32("meta_len")
        raw = bytes(self.take(meta_len, "metadata"))
        if meta_len > MAX_METADATA_BYTES:
            raise ModelFormatError(f"metadata is {meta_len} bytes, more than the "
                                   f"{MAX_METADATA_BYTES >> 20} MiB limit")
        if meta_len == 0:
            return {}

        def no_constants(name):
            raise ValueError(f"{name} is not JSON")

        try:
            metadata = json.loads(raw.decode("utf-8"), parse_constant=no_constants)
        except RecursionError:
            raise ModelFormatError(
                f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep") from None
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, int digits limit
            raise ModelFormatError(f"metadata is not valid UTF-8 JSON ({e})") from None
        if not isinstance(metadata, dict):
            raise ModelFormatError("metadata is not a JSON object")
        if _json_depth_exceeds(metadata, MAX_METADATA_DEPTH):
            raise ModelFormatError(
                f"metadata is nested more than {MAX_METADATA_DEPTH} levels deep")
        if _SURROGATE_ESCAPE.search(raw):  # only then can a string hold a lone surrogate
            try:
                json.dumps(metadata, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ModelFormatError("metadata holds a lone surrogate \\uD800-\\uDFFF "
                                       "(not valid Unicode)") from None
        return metadata

    def layer(self, k: int) -> tuple[dict, int, int]:
        """A layer's header: (partial layer dict, n_in, n_out)."""
        kind_code = self.u32(f"layer {k} kind")
        act_code = self.u32(f"layer {k} activation")
        n_in = self.count(f"layer {k} n_in")
        n_out = self.count(f"layer {k} n_out")
        v2 = self.version >= 2
        if kind_code not in _KIND_NAMES or (not v2 and _KIND_NAMES[kind_code] not in V1_KINDS):
            raise ModelFormatError(f"layer {k}: unknown kind {kind_code}"
                                   + ("" if v2 else " (for a version 1 file)"))
        activations = ACTIVATION_CODES if v2 else V1_ACTIVATIONS
        if act_code not in _ACTIVATION_NAMES or _ACTIVATION_NAMES[act_code] not in activations:
            raise ModelFormatError(f"layer {k}: unknown activation {act_code}"
                                   + ("" if v2 else " (for a version 1 file)"))
        if n_in == 0 or n_out == 0:
            raise ModelFormatError(f"layer {k}: has zero size ({n_in} x {n_out})")
        if v2:
            payload_bytes = int.from_bytes(self.take(8, f"layer {k} payload_bytes"), "little")
            if self.pos + payload_bytes > self.limit:
                raise ModelFormatError(
                    f"truncated: layer {k} payload_bytes = {payload_bytes} at offset "
                    f"{self.pos}, but only {max(self.limit - self.pos, 0)} bytes remain")
            self.payload = (k, payload_bytes, self.pos + payload_bytes)
        return {"kind": _KIND_NAMES[kind_code], "activation": _ACTIVATION_NAMES[act_code]}, \
            n_in, n_out

    def payload_of(self, k: int, layer: dict, n_in: int, n_out: int) -> dict:
        try:
            _READERS[layer["kind"]](self, k, layer, n_in, n_out)
        except ValueError as e:  # from _bits: a malformed stream
            if isinstance(e, ModelFormatError):
                raise
            raise ModelFormatError(f"layer {k}: {e}") from None
        if self.payload is not None:  # the fields implied payload_bytes, so all were read
            assert self.pos == self.payload[2]
            self.payload = None
        return layer


def _read_dense(p: _Parser, k, layer, n_in, n_out):
    p.implied(k, 4 * n_in * n_out + 4 * n_out)
    p.charge(4 * n_in * n_out + 4 * n_out, f"layer {k}")
    layer["W"] = p.array("<f4", n_in * n_out, f"layer {k}: W", finite=True,
                         shape=(n_in, n_out))
    layer["b"] = p.array("<f4", n_out, f"layer {k}: b", finite=True)


def _read_dense_int8(p: _Parser, k, layer, n_in, n_out):
    quant = QUANT_CODES["dynamic"]
    if p.version >= 2:
        quant = p.u32(f"layer {k} quant")
        if quant not in QUANT_CODES.values():
            raise ModelFormatError(f"layer {k}: unknown quant mode {quant}")
    static = int(quant == QUANT_CODES["static"])
    fixed = 4 if p.version >= 2 else 0
    p.implied(k, fixed + n_in * n_out + 4 * n_out + 4 * static + 4 * n_out)
    if n_in > MAX_INT8_INPUTS:
        raise ModelFormatError(f"layer {k}: an int8 layer has n_in = {n_in}, more than "
                               f"{MAX_INT8_INPUTS}")
    p.charge(n_in * n_out + 8 * n_out + 4 * static, f"layer {k}")
    q = p.array("i1", n_in * n_out, f"layer {k}: q", shape=(n_in, n_out))
    if (q == -128).any():
        raise ModelFormatError(f"layer {k}: q contains -128 (int8 weights are in [-127, 127])")
    scale = p.array("<f4", n_out, f"layer {k}: scale", finite=True)
    if (scale < 0).any():
        raise ModelFormatError(f"layer {k}: scale contains negative values")
    x_scale = None
    if static:
        x_scale = p.array("<f4", 1, f"layer {k}: x_scale", finite=True)[0]
        if not x_scale >= np.finfo(np.float32).tiny:
            raise ModelFormatError(f"layer {k}: x_scale must be at least the smallest normal "
                                   f"float32, got {x_scale}")
    layer.update(q=q, scale=scale, b=p.array("<f4", n_out, f"layer {k}: b", finite=True),
                 x_scale=x_scale)


def _read_csr_pattern(p: _Parser, k, n_in, n_out, nnz, indices_code) -> tuple:
    indptr = p.array("<u4", n_in + 1, f"layer {k}: indptr")
    if int(indptr.max()) > nnz:
        raise ModelFormatError(f"layer {k}: indptr must be <= nnz = {nnz}, "
                               f"found {int(indptr.max())}")
    indptr = indptr.astype(np.int32)
    indices = p.array(indices_code, nnz, f"layer {k}: indices")
    if nnz and int(indices.max()) >= n_out:
        raise ModelFormatError(f"layer {k}: indices must be < n_out = {n_out}, "
                               f"found {int(indices.max())}")
    indices = indices.astype(np.int32)
    problem = _csr_problem(indptr, indices, n_out)
    if problem:
        raise ModelFormatError(f"layer {k}: {problem}")
    return indptr, indices


def _read_nnz(p: _Parser, k, n_in, n_out) -> int:
    nnz = p.count(f"layer {k} nnz")
    if nnz > n_in * n_out:
        raise ModelFormatError(f"layer {k}: nnz = {nnz} is more than n_in x n_out = "
                               f"{n_in * n_out}")
    return nnz


def _read_sparse_csr(p: _Parser, k, layer, n_in, n_out):
    nnz = _read_nnz(p, k, n_in, n_out)
    width = p.u32(f"layer {k} index_bits")
    if width not in (8, 16, 32):
        raise ModelFormatError(f"layer {k}: index_bits must be 8, 16 or 32, got {width}")
    if n_out - 1 >= 1 << width:
        raise ModelFormatError(f"layer {k}: index_bits = {width} cannot hold the column "
                               f"index n_out - 1 = {n_out - 1}")
    p.implied(k, 8 + 4 * (n_in + 1) + nnz * (width // 8) + 4 * nnz + 4 * n_out)
    p.charge(4 * (n_in + 1) + 8 * nnz + 4 * n_out, f"layer {k}")
    indptr, indices = _read_csr_pattern(p, k, n_in, n_out, nnz,
                                        {8: "u1", 16: "<u2", 32: "<u4"}[width])
    layer.update(indptr=indptr, indices=indices,
                 values=p.array("<f4", nnz, f"layer {k}: values", finite=True),
                 b=p.array("<f4", n_out, f"layer {k}: b", finite=True))


def _read_low_rank(p: _Parser, k, layer, n_in, n_out):
    rank = p.count(f"layer {k} rank")
    if rank == 0:
        raise ModelFormatError(f"layer {k}: rank must be >= 1, got 0")
    size = 4 * n_in * rank + 4 * rank * n_out + 4 * n_out
    p.implied(k, 4 + size)
    p.charge(size, f"layer {k}")
    layer["U"] = p.array("<f4", n_in * rank, f"layer {k}: U", finite=True,
                         shape=(n_in, rank))
    layer["V"] = p.array("<f4", rank * n_out, f"layer {k}: V", finite=True,
                         shape=(rank, n_out))
    layer["b"] = p.array("<f4", n_out, f"layer {k}: b", finite=True)


def _read_n_codes(p: _Parser, k) -> int:
    n_codes = p.u32(f"layer {k} n_codes")
    if not 1 <= n_codes <= MAX_CODES:
        raise ModelFormatError(f"layer {k}: n_codes must be in 1..{MAX_CODES}, got {n_codes}")
    return n_codes


def _read_bits(p: _Parser, k, n_codes, expected, choices) -> int:
    bits = p.u32(f"layer {k} bits")
    if bits != expected:
        raise ModelFormatError(f"layer {k}: bits must be {expected} (the fewest of {choices} "
                               f"that holds {n_codes} codes), got {bits}")
    return bits


def _read_codebook(p: _Parser, k, layer, n_in, n_out):
    n_codes = _read_n_codes(p, k)
    bits = _read_bits(p, k, n_codes, codebook_bits(n_codes), "1, 2, 4, 8")
    nbytes = _bits.packed_len(n_in * n_out, bits)
    p.implied(k, 8 + 4 * n_codes + nbytes + 4 * n_out)
    p.charge(4 * n_codes + nbytes + 4 * n_out, f"layer {k}")
    centroids = p.array("<f4", n_codes, f"layer {k}: centroids", finite=True)
    packed = p.array("u1", nbytes, f"layer {k}: packed")
    problem = _codes_problem(packed, bits, n_in * n_out, n_codes)
    if problem:
        raise ModelFormatError(f"layer {k}: packed: {problem}")
    layer.update(n_in=n_in, centroids=centroids, bits=bits, packed=packed,
                 b=p.array("<f4", n_out, f"layer {k}: b", finite=True))


def _read_sparse_codebook(p: _Parser, k, layer, n_in, n_out):
    nnz = _read_nnz(p, k, n_in, n_out)
    n_codes = _read_n_codes(p, k)
    bits = _read_bits(p, k, n_codes, sparse_codebook_bits(n_codes), "1..8")
    rice_k = p.u32(f"layer {k} rice_k")
    if rice_k > _bits.MAX_RICE_K:
        raise ModelFormatError(f"layer {k}: rice_k must be in 0..{_bits.MAX_RICE_K}, "
                               f"got {rice_k}")
    pos_bytes = p.count(f"layer {k} pos_bytes")
    codes_bytes = _bits.packed_len(nnz, bits)
    p.implied(k, 20 + 4 * n_codes + pos_bytes + codes_bytes + 4 * n_out)
    if nnz * (rice_k + 1) > 8 * pos_bytes:  # before charging for nnz entries
        raise ModelFormatError(f"layer {k}: position stream runs out: {nnz} codes with "
                               f"rice_k = {rice_k} need more than {pos_bytes} bytes")
    p.charge(4 * (n_in + 1) + 5 * nnz + 4 * n_codes + 4 * n_out, f"layer {k}")
    centroids = p.array("<f4", n_codes, f"layer {k}: centroids", finite=True)
    stream = p.array("u1", pos_bytes, f"layer {k}: positions")
    positions = _bits.gaps_to_positions(_bits.rice_decode(stream, rice_k, nnz, n_in * n_out))
    del stream
    codes = _bits.unpack(p.array("u1", codes_bytes, f"layer {k}: codes"), bits, nnz)
    if nnz and int(codes.max()) >= n_codes:
        raise ModelFormatError(f"layer {k}: codes must be < n_codes = {n_codes}, "
                               f"found {int(codes.max())}")
    indptr = np.empty(n_in + 1, np.int32)
    step = 1 << 16                      # rows at a time: no int64 array of n_in rows
    for a in range(0, n_in + 1, step):
        starts = np.arange(a, min(a + step, n_in + 1), dtype=np.int64) * n_out
        indptr[a : a + starts.size] = np.searchsorted(positions, starts)
    indices = (positions % n_out).astype(np.int32)
    del positions
    layer.update(indptr=indptr, indices=indices, codes=codes, centroids=centroids,
                 b=p.array("<f4", n_out, f"layer {k}: b", finite=True))


_READERS = {
    "dense": _read_dense,
    "dense_int8": _read_dense_int8,
    "sparse_csr": _read_sparse_csr,
    "low_rank": _read_low_rank,
    "codebook": _read_codebook,
    "sparse_codebook": _read_sparse_codebook,
}
