"""The pykd binary model format (version 1): writer and reader.

The format is specified byte by byte in ``docs/format.md``. In short: fixed
width little-endian fields, no padding, no compression, a CRC-32 trailer, so
that NumPy alone or a Fortran program with ``access='stream'`` can read it.
The constants below are the single source of truth for the codes used in the
file; the Fortran reader is checked against them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zlib

import numpy as np

__all__ = [
    "ACTIVATION_CODES", "END_MAGIC", "KIND_CODES", "MAGIC", "MAX_COUNT",
    "NORM_CODES", "SUPPORTED_KINDS", "VERSION", "ModelFormatError",
    "read_model", "write_model",
]

MAGIC = b"PYKDMDL\0"
END_MAGIC = b"PYKDEND\0"
VERSION = 1

#: Layer kind codes. Kinds 3-5 are reserved (layout in docs/format.md) and
#: not yet read or written by this version of pykd.
KIND_CODES = {"dense": 1, "dense_int8": 2, "sparse_csr": 3, "low_rank": 4, "codebook": 5}
SUPPORTED_KINDS = ("dense", "dense_int8")
ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2}
NORM_CODES = {"none": 0, "per_feature": 1, "scalar": 2}

#: Largest count the writer stores in a uint32 field, so that a Fortran reader
#: may use default (signed 32-bit) integers for every size field.
MAX_COUNT = 2**31 - 1

_KIND_NAMES = {v: k for k, v in KIND_CODES.items()}
_ACTIVATION_NAMES = {v: k for k, v in ACTIVATION_CODES.items()}
_TRAILER_LEN = 4 + len(END_MAGIC)
# Arrays per layer kind, in file order, with dtype and shape (by n_in, n_out).
_PAYLOAD = {
    "dense": (("W", "<f4", lambda i, o: (i, o)), ("b", "<f4", lambda i, o: (o,))),
    "dense_int8": (
        ("q", "i1", lambda i, o: (i, o)),
        ("scale", "<f4", lambda i, o: (o,)),
        ("b", "<f4", lambda i, o: (o,)),
    ),
}
_NATIVE = {"<f4": np.dtype(np.float32), "i1": np.dtype(np.int8)}


class ModelFormatError(ValueError):
    """A model file is not a valid pykd model file of a supported version."""


# --------------------------------------------------------------------------
# Writing


def _check_array(a, dtype: np.dtype, shape: tuple | None, what: str) -> None:
    """Check type, dtype (no casting), shape (None: 2-D, any size) and finiteness."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        got = f"dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{what} must be a numpy array of dtype {dtype}, got {got}")
    if shape is None:
        if a.ndim != 2 or not (1 <= min(a.shape) and max(a.shape) <= MAX_COUNT):
            raise ValueError(f"{what} must be 2-D (n_in, n_out) with sizes >= 1, got shape {a.shape}")
    elif a.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {a.shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite values")


def _check_layers(layers) -> list[tuple]:
    """Validate ``layers``; return (kind, activation, n_in, n_out, arrays) for each."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError("layers must be a non-empty list of layer dicts")
    out = []
    for k, layer in enumerate(layers, start=1):  # layers are numbered from 1
        if not isinstance(layer, dict):
            raise TypeError(f"layer {k}: must be a dict, got {type(layer).__name__}")
        kind = layer.get("kind")
        if kind not in _PAYLOAD:
            raise ValueError(f"layer {k}: kind must be one of {list(_PAYLOAD)}, got {kind!r}")
        names = [name for name, _, _ in _PAYLOAD[kind]]
        expected_keys = {"kind", "activation", *names}
        if set(layer) != expected_keys:
            raise ValueError(
                f"layer {k} ({kind}): expected keys {sorted(expected_keys)}, got {sorted(layer)}"
            )
        activation = layer["activation"]
        if activation not in ACTIVATION_CODES:
            raise ValueError(
                f"layer {k}: activation must be one of {list(ACTIVATION_CODES)}, got {activation!r}"
            )
        (first, code, _), *rest = _PAYLOAD[kind]
        _check_array(layer[first], _NATIVE[code], None, f"layer {k}: {first}")
        n_in, n_out = layer[first].shape
        for name, code, shape in rest:
            _check_array(layer[name], _NATIVE[code], shape(n_in, n_out), f"layer {k}: {name}")
        if kind == "dense_int8" and (layer["scale"] < 0).any():
            raise ValueError(f"layer {k}: scale contains negative values")
        if out and out[-1][3] != n_in:
            raise ValueError(
                f"layer sizes do not chain: layer {k - 1} outputs {out[-1][3]} "
                f"but layer {k} takes {n_in}"
            )
        out.append((kind, activation, n_in, n_out, [layer[name] for name in names]))
    return out


def _check_norm(norm, n_features: int) -> tuple[int, list[np.ndarray]]:
    if norm is None:
        return NORM_CODES["none"], []
    if not isinstance(norm, tuple) or len(norm) != 2:
        raise TypeError("norm must be None or a tuple (mean, std)")
    arrays = []
    for name, v in zip(("mean", "std"), norm):
        if isinstance(v, np.float32):
            v = np.asarray(v)
        if not isinstance(v, np.ndarray) or v.dtype != np.float32:
            got = f"dtype {v.dtype}" if isinstance(v, np.ndarray) else type(v).__name__
            raise TypeError(
                f"norm {name} must be a float32 scalar (e.g. np.float32(x)) or a float32 "
                f"array, got {got}"
            )
        arrays.append(v)
    mean, std = arrays
    if mean.shape != std.shape or mean.shape not in ((), (n_features,)):
        raise ValueError(
            f"norm mean and std must both be scalars or both have shape ({n_features},) "
            f"(n_features), got {mean.shape} and {std.shape}"
        )
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise ValueError("norm mean and std must be finite")
    if not (std > 0).all():
        raise ValueError("norm std must be > 0")
    return NORM_CODES["scalar" if mean.shape == () else "per_feature"], arrays


def _u32(*values: int) -> bytes:
    return np.array(values, dtype="<u4").tobytes()


def write_model(path, layers, *, norm=None, metadata=None) -> None:
    """Write a model in the pykd binary format (version 1), atomically.

    Parameters
    ----------
    path : str or path-like
        Destination. It is replaced only once the new file is complete and
        synced to disk; on failure an existing file is left untouched.
    layers : list of dict
        From input to output. Each is either ``{"kind": "dense", "W": W,
        "b": b, "activation": a}`` with W float32 (n_in, n_out) and b float32
        (n_out,), or ``{"kind": "dense_int8", "q": q, "scale": s, "b": b,
        "activation": a}`` with q int8 (n_in, n_out), s float32 (n_out,) >= 0
        and b float32 (n_out,); the weight it stands for is
        ``q * scale[None, :]``. ``a`` is ``"identity"``, ``"relu"`` or
        ``"tanh"``. Layer k's n_out must equal layer k+1's n_in.
    norm : tuple (mean, std) or None, optional
        Input normalisation ``(x - mean) / std``: two float32 scalars
        (``np.float32`` or 0-d arrays) or two float32 arrays of shape
        (n_features,). ``std`` must be > 0.
    metadata : dict or None, optional
        JSON-serialisable metadata such as the training configuration.
        ``None`` is stored as ``{}``.

    Raises
    ------
    TypeError
        If an array is not a NumPy array of exactly the required dtype (nothing
        is cast), or metadata is not a JSON-serialisable dict. Messages name
        the layer (counted from 1) and the array.
    ValueError
        If shapes are wrong or do not chain, values are NaN/inf, ``std <= 0``,
        or a kind, activation or key is unknown.
    OSError
        If the file cannot be written.
    """
    checked = _check_layers(layers)
    n_features, n_outputs = checked[0][2], checked[-1][3]
    norm_code, norm_arrays = _check_norm(norm, n_features)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    try:
        meta = json.dumps(metadata, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata is not JSON-serialisable: {e}") from e
    if len(meta) > MAX_COUNT:
        raise ValueError(f"metadata is too large ({len(meta)} bytes of JSON)")

    chunks = [MAGIC, _u32(VERSION, len(checked), n_features, n_outputs, norm_code)]
    chunks += norm_arrays
    chunks += [_u32(len(meta)), meta]
    for kind, activation, n_in, n_out, arrays in checked:
        chunks.append(_u32(KIND_CODES[kind], ACTIVATION_CODES[activation], n_in, n_out))
        chunks += arrays
    # Little-endian and C order as the format requires; on little-endian hosts
    # this is a no-op for the (already validated, usually contiguous) arrays.
    chunks = [
        np.ascontiguousarray(c, dtype=c.dtype.newbyteorder("<")) if isinstance(c, np.ndarray) else c
        for c in chunks
    ]
    _atomic_write(os.fspath(path), chunks)


def _atomic_write(path: str, chunks: list) -> None:
    """Write ``chunks`` plus the CRC trailer to a temp file, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.NamedTemporaryFile(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp", delete=False
    )
    try:
        with tmp as f:
            crc = 0
            for chunk in chunks:
                f.write(chunk)
                crc = zlib.crc32(chunk, crc)
            f.write(_u32(crc) + END_MAGIC)
            f.flush()
            os.fsync(f.fileno())
        # NamedTemporaryFile creates mode 0600; give the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)
        os.replace(tmp.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp.name)
        raise
    # Make the rename itself durable.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Reading


def read_model(path) -> dict:
    """Read and fully validate a model written by :func:`write_model`.

    Parameters
    ----------
    path : str or path-like
        The model file.

    Returns
    -------
    dict
        ``{"version": int, "layers": [layer dicts as accepted by write_model],
        "norm": None or (mean, std), "metadata": dict, "n_features": int,
        "n_outputs": int}``. Arrays are native-endian, C-contiguous, writeable
        and own their data. A scalar normalisation is returned as two
        ``np.float32`` values.

    Raises
    ------
    ModelFormatError
        If the file is not a pykd model (bad magic), has an unsupported
        version, is truncated, has trailing bytes, fails the CRC-32 check, or
        holds invalid content (unknown kind or activation, sizes that do not
        chain, NaN/inf, ``std <= 0``, bad metadata). The message starts with
        the file name.
    OSError
        If the file cannot be opened.
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _parse(data)
    except ModelFormatError as e:
        raise ModelFormatError(f"{os.fspath(path)}: {e}") from None


def _parse(data: bytes) -> dict:
    if data[: len(MAGIC)] != MAGIC:
        if data and len(data) < len(MAGIC) and MAGIC.startswith(data):
            raise ModelFormatError(f"truncated: file is only {len(data)} bytes")
        raise ModelFormatError("not a pykd model file (bad magic)")
    if len(data) < 12:
        raise ModelFormatError(f"truncated: file is only {len(data)} bytes")
    version = int.from_bytes(data[8:12], "little")
    if version != VERSION:
        raise ModelFormatError(
            f"unsupported model format version {version} (this pykd reads version {VERSION})"
        )
    if data.endswith(END_MAGIC) and len(data) >= 12 + _TRAILER_LEN:
        # Normal case: verify the checksum before trusting any size field.
        body_end = len(data) - _TRAILER_LEN
        stored = int.from_bytes(data[body_end : body_end + 4], "little")
        if zlib.crc32(memoryview(data)[:body_end]) != stored:
            raise ModelFormatError("checksum mismatch (file corrupted)")
        model, end = _parse_body(data, body_end)
        if end != body_end:
            raise ModelFormatError(
                f"{body_end - end} unexpected bytes between the last layer and the checksum"
            )
        return model
    # No end marker at the end of the file: use the (unverified) sizes in the
    # header to say whether the file is truncated or has trailing bytes.
    model, end = _parse_body(data, len(data))
    if len(data) < end + _TRAILER_LEN:
        raise ModelFormatError(
            f"truncated: file is {len(data)} bytes, but the checksum and end marker "
            f"need {end + _TRAILER_LEN}"
        )
    if data[end + 4 : end + _TRAILER_LEN] == END_MAGIC:
        raise ModelFormatError(
            f"trailing garbage: {len(data) - end - _TRAILER_LEN} unexpected bytes after "
            f"the end marker at offset {end + 4}"
        )
    raise ModelFormatError(f"end marker {END_MAGIC!r} not found at offset {end + 4} (file corrupted)")


def _parse_body(data: bytes, limit: int) -> tuple[dict, int]:
    """Parse everything after the version up to ``limit``; return (model, end offset)."""
    view = memoryview(data)
    pos = 12

    def take(n: int, what: str) -> memoryview:
        # Every size is checked against the bytes actually present before
        # anything is allocated, so bogus sizes cannot cause huge allocations.
        nonlocal pos
        if pos + n > limit:
            raise ModelFormatError(
                f"truncated: {what} needs {n} bytes at offset {pos}, "
                f"but only {max(limit - pos, 0)} remain"
            )
        pos += n
        return view[pos - n : pos]

    def u32(what: str) -> int:
        return int.from_bytes(take(4, what), "little")

    def array(code: str, shape: tuple, what: str) -> np.ndarray:
        raw = take(math.prod(shape) * np.dtype(code).itemsize, what)
        a = np.frombuffer(raw, dtype=code).reshape(shape).astype(_NATIVE[code])  # a copy
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ModelFormatError(f"{what} contains NaN or infinite values")
        return a

    n_layers, n_features, n_outputs, norm_code = (
        u32(f) for f in ("n_layers", "n_features", "n_outputs", "norm_kind")
    )
    if n_layers == 0:
        raise ModelFormatError("model has no layers")
    if norm_code == NORM_CODES["none"]:
        norm = None
    elif norm_code in (NORM_CODES["per_feature"], NORM_CODES["scalar"]):
        shape = (n_features,) if norm_code == NORM_CODES["per_feature"] else ()
        mean, std = array("<f4", shape, "norm mean"), array("<f4", shape, "norm std")
        if not (std > 0).all():
            raise ModelFormatError("norm std must be > 0")
        norm = (mean, std) if shape else (mean[()], std[()])
    else:
        raise ModelFormatError(f"unknown norm kind {norm_code}")

    meta_raw = bytes(take(u32("meta_len"), "metadata"))
    try:
        metadata = json.loads(meta_raw.decode("utf-8")) if meta_raw else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"metadata is not valid UTF-8 JSON ({e})") from None
    if not isinstance(metadata, dict):
        raise ModelFormatError("metadata is not a JSON object")

    layers, prev_out = [], n_features
    for k in range(1, n_layers + 1):
        kind_code, act_code, n_in, n_out = (
            u32(f"layer {k} {f}") for f in ("kind", "activation", "n_in", "n_out")
        )
        if kind_code not in _KIND_NAMES:
            raise ModelFormatError(f"layer {k}: unknown kind {kind_code}")
        kind = _KIND_NAMES[kind_code]
        if kind not in SUPPORTED_KINDS:
            raise ModelFormatError(
                f"layer {k}: kind {kind_code} ({kind}) is reserved but not supported "
                "by this version of pykd"
            )
        if act_code not in _ACTIVATION_NAMES:
            raise ModelFormatError(f"layer {k}: unknown activation {act_code}")
        if n_in == 0 or n_out == 0:
            raise ModelFormatError(f"layer {k}: has zero size ({n_in} x {n_out})")
        if k == 1 and n_in != n_features:
            raise ModelFormatError(
                f"layer 1 takes {n_in} inputs but the model has n_features = {n_features}"
            )
        if n_in != prev_out:
            raise ModelFormatError(
                f"layer sizes do not chain: layer {k - 1} outputs {prev_out} "
                f"but layer {k} takes {n_in}"
            )
        layer = {"kind": kind, "activation": _ACTIVATION_NAMES[act_code]}
        for name, code, shape in _PAYLOAD[kind]:
            layer[name] = array(code, shape(n_in, n_out), f"layer {k}: {name}")
        if kind == "dense_int8" and (layer["scale"] < 0).any():
            raise ModelFormatError(f"layer {k}: scale contains negative values")
        layers.append(layer)
        prev_out = n_out
    if prev_out != n_outputs:
        raise ModelFormatError(
            f"layer {n_layers} outputs {prev_out} but the model has n_outputs = {n_outputs}"
        )
    model = {
        "version": VERSION,
        "layers": layers,
        "norm": norm,
        "metadata": metadata,
        "n_features": n_features,
        "n_outputs": n_outputs,
    }
    return model, pos
