"""Datasets: IDX (MNIST-format) readers and a loader for Fashion-MNIST.

Only NumPy and the standard library are used, so this module can be imported
without the compiled Fortran extension.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import sys
import zlib
from pathlib import Path

import numpy as np

from . import io as _io
from ._validate import plural

__all__ = ["DEFAULT_DATA_DIR", "Dataset", "DatasetError", "ScaledImages", "load_dataset",
           "read_idx", "take_rows"]

#: Where the Debian package ``dataset-fashion-mnist`` installs the IDX files.
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

#: The four IDX files of an MNIST-style dataset directory, by role.
IDX_FILES = {
    "X_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "X_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

INSTALL_HINT = (
    "Install it with `apt-get install dataset-fashion-mnist` (as root; "
    "`sudo apt-get install dataset-fashion-mnist` otherwise), or pass "
    "`--data DIR` with a directory holding the four IDX files "
    "(or an .npz file with X_train, y_train, X_test, y_test, or a directory of "
    "X_train.npy, y_train.npy, X_test.npy, y_test.npy)."
)

# IDX type codes; the element data is big-endian, so we read into native
# arrays and swap in place afterwards.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(np.int16),
    0x0C: np.dtype(np.int32),
    0x0D: np.dtype(np.float32),
    0x0E: np.dtype(np.float64),
}
_GZIP_MAGIC = b"\x1f\x8b"
# Deflate cannot expand data by more than about 1032:1, so a gzip file of
# n bytes holds at most this many times n bytes. This bounds a bogus header
# before we allocate for it.
_MAX_GZIP_RATIO = 1032
#: The largest decompressed IDX file accepted (16 GiB), whatever a header says.
MAX_GZIP_BYTES = 1 << 34
_COUNT_CHUNK = 1 << 16


class DatasetError(ValueError):
    """A dataset file is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split of a classification dataset.

    Attributes
    ----------
    X_train, X_test : ndarray of float32, shape (n, n_features), or ScaledImages
        C-contiguous feature matrices. Images stored as uint8 are scaled to
        [0, 1] by dividing by 255. From a directory of ``.npy`` files they
        are memory-mapped, never read whole: a read-only float32
        ``numpy.memmap``, or for uint8 files a :class:`ScaledImages`, which
        gives float32 ``x / 255`` rows when indexed.
    y_train, y_test : ndarray of int64, shape (n,)
        Non-negative class labels.
    name : str
        Short name for messages and metadata.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    name: str

    @property
    def n_features(self) -> int:
        """Number of input features (columns of ``X_train``)."""
        return self.X_train.shape[1]

    @property
    def n_classes(self) -> int:
        """``max label + 1`` over train and test labels (0 if there are none)."""
        return int(max((y.max() + 1 for y in (self.y_train, self.y_test) if y.size), default=0))

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.X_train.shape[0]}, "
            f"test={self.X_test.shape[0]}, n_features={self.n_features}, "
            f"n_classes={self.n_classes})"
        )


class ScaledImages:
    """uint8 images seen as float32 ``x / 255``, converted rows at a time.

    Wraps a 2-D uint8 array, typically a ``numpy.memmap`` larger than memory.
    Indexing (``X[a:b]``, ``X[idx]``) returns a new C-contiguous float32
    array, the same bits as dividing the whole array at once (which is what
    :func:`load_dataset` does for uint8 images it reads into memory);
    ``np.asarray(X)`` converts everything. ``fit``, ``evaluate`` and
    ``soft_labels`` take it and read only the rows of each batch.

    Attributes
    ----------
    raw : ndarray of uint8, shape (n, n_features)
    shape, ndim, size, dtype (float32) : as the float32 array it stands for
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, raw: np.ndarray):
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
            raise TypeError("ScaledImages wraps a 2-D uint8 numpy array")
        self.raw = raw

    @property
    def shape(self) -> tuple:
        return self.raw.shape

    @property
    def size(self) -> int:
        return self.raw.size

    def __len__(self) -> int:
        return self.raw.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        return _scale_u8(np.asarray(self.raw[key]))

    def __array__(self, dtype=None, copy=None):
        a = _scale_u8(np.asarray(self.raw))
        return a if dtype is None else a.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"ScaledImages(shape={self.shape}, raw={type(self.raw).__name__} of uint8)"


def _scale_u8(u8: np.ndarray) -> np.ndarray:
    out = np.empty(u8.shape, dtype=np.float32)
    np.divide(u8, np.float32(255), out=out)  # one pass, no float64 temporary
    return out


def take_rows(X, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of ``X`` as float32 into ``out[:len(idx)]``, which is returned.

    ``X`` is a float32 array (in memory or memory-mapped: only these rows
    are read) or :class:`ScaledImages` (the rows' uint8 bytes are read and
    divided by 255 into ``out``). This is how ``fit`` fills its batch buffer
    when it does not keep a normalised copy of the data; a rank of a
    distributed run calls it with its own share of each batch.
    """
    dst = out[:idx.shape[0]]
    if isinstance(X, ScaledImages):
        np.divide(np.take(X.raw, idx, axis=0, mode="clip"), np.float32(255), out=dst)
    else:
        np.take(X, idx, axis=0, out=dst, mode="clip")
    return dst


def _count_rest(f) -> int:
    """Bytes left in ``f``, read in small chunks (a bomb is never held in memory)."""
    n = 0
    while chunk := f.read(_COUNT_CHUNK):
        n += len(chunk)
    return n


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), raw or gzip-compressed.

    Compression is detected from the gzip magic bytes ``1f 8b``, not from the
    file name. Sizes are checked before anything is allocated: for a raw file
    the header's shape times the item size must equal the bytes after the
    header; for a gzip file the header's size must fit what the compressed
    bytes can hold (deflate expands at most 1032:1, and at most
    :data:`MAX_GZIP_BYTES`), and must match the size the gzip trailer
    declares (otherwise the stream is first decompressed without storing it,
    to count its bytes, so a multi-member gzip file still reads).

    Parameters
    ----------
    path : str or path-like
        The IDX file (a regular file; FIFOs and devices are refused).

    Returns
    -------
    ndarray
        A writeable, native-endian, C-contiguous array with the dtype and
        shape given in the file header.

    Raises
    ------
    DatasetError
        If the file is not a regular file, the header is invalid, the data is
        truncated or followed by extra bytes, or the gzip stream is corrupt.
        The message names the file.
    FileNotFoundError
        If the file does not exist.
    """
    name = os.fsdecode(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else path
    with _io.open_regular(path, "IDX file", DatasetError) as raw:
        is_gzip = raw.read(2) == _GZIP_MAGIC
        file_size = os.fstat(raw.fileno()).st_size
        isize = None
        if is_gzip and file_size >= 18:  # 10-byte header + 8-byte trailer at least
            raw.seek(-4, os.SEEK_END)
            isize = int.from_bytes(raw.read(4), "little")
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
        try:
            return _read_idx_stream(f, name, file_size, is_gzip, isize)
        except (OSError, EOFError, zlib.error) as e:
            if not is_gzip:
                raise DatasetError(f"{name}: cannot read IDX file ({e})") from e
            raise DatasetError(f"{name}: corrupt gzip data ({e})") from e


def _read_idx_header(f, name: str):
    head = f.read(4)
    if len(head) < 4:
        raise DatasetError(f"{name}: truncated: expected a 4-byte IDX header, found "
                           f"{plural(len(head), 'byte')}")
    if head[:2] != b"\0\0" or head[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{name}: not an IDX file (bad magic {head.hex(' ')}; expected 00 00, "
            f"a type code in {{{', '.join(f'{c:#04x}' for c in _IDX_DTYPES)}}}, ndim)"
        )
    dtype, ndim = _IDX_DTYPES[head[2]], head[3]
    if ndim == 0:
        raise DatasetError(f"{name}: invalid IDX header: ndim is 0")
    dims_raw = f.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DatasetError(
            f"{name}: truncated: expected {4 * ndim} bytes of dimensions, found {len(dims_raw)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
    return dtype, shape, 4 + 4 * ndim


def _size_error(name: str, expected: int, found: int) -> DatasetError:
    state = "truncated" if found < expected else "trailing bytes"
    return DatasetError(f"{name}: {state}: expected {plural(expected, 'byte')} of data, "
                        f"found {found}")


def _read_idx_stream(f, name: str, file_size: int, is_gzip: bool, isize) -> np.ndarray:
    dtype, shape, header_len = _read_idx_header(f, name)
    expected = math.prod(shape) * dtype.itemsize
    if not is_gzip:
        present = file_size - header_len
        if expected != present:  # from the header and the file size alone: no allocation
            raise _size_error(name, expected, present)
    else:
        limit = min(file_size * _MAX_GZIP_RATIO, MAX_GZIP_BYTES) - header_len
        if expected > limit:  # cannot possibly be there: do not allocate for it
            raise _size_error(name, expected, _count_rest(f))
        if isize != (header_len + expected) % 2**32:
            # The trailer disagrees (corrupt, or a multi-member file): count the
            # decompressed bytes without keeping them, then read if they fit.
            found = _count_rest(f)
            if found != expected:
                raise _size_error(name, expected, found)
            f.seek(header_len)

    try:
        out = np.empty(shape, dtype=dtype)
    except MemoryError:  # within every limit, but more than this machine has
        raise DatasetError(f"{name}: cannot allocate {expected} bytes for shape {shape}") from None
    got = _io.readinto_full(f, memoryview(out.reshape(-1).view(np.uint8)))
    if got < expected:
        raise _size_error(name, expected, got)
    extra = _count_rest(f)
    if extra:
        raise _size_error(name, expected, expected + extra)
    if dtype.itemsize > 1 and sys.byteorder == "little":
        out.byteswap(inplace=True)
    return out


def _find_idx(directory: Path, stem: str) -> Path | None:
    # Prefer the uncompressed file: it is faster to read.
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _features(X: np.ndarray, what: str, source: str) -> np.ndarray:
    """Return ``X`` as C-contiguous float32 (n, features); uint8 is scaled by 1/255."""
    if X.ndim not in (2, 3):
        raise DatasetError(f"{source}: {what} must be 2-D or 3-D, got shape {X.shape}")
    if X.dtype.kind not in "uif":
        raise DatasetError(f"{source}: {what} must be numeric, got dtype {X.dtype}")
    X = X.reshape(X.shape[0], math.prod(X.shape[1:]))  # -1 fails for 0 rows
    if X.dtype == np.uint8:
        out = np.empty(X.shape, dtype=np.float32)
        np.divide(X, np.float32(255), out=out)  # one pass, no float64 temporary
        return out
    out = np.ascontiguousarray(X, dtype=np.float32)
    if X.dtype.kind == "f" and not np.isfinite(out).all():
        raise DatasetError(f"{source}: {what} contains NaN or infinite values")
    return out


def _labels(y: np.ndarray, what: str, source: str) -> np.ndarray:
    if y.ndim != 1:
        raise DatasetError(f"{source}: {what} must be 1-D, got shape {y.shape}")
    if y.dtype.kind not in "iu":
        raise DatasetError(f"{source}: {what} must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DatasetError(f"{source}: {what} contains negative labels (min {y.min()})")
    return np.ascontiguousarray(y, dtype=np.int64)


def _make_dataset(arrays: dict, name: str, source: str) -> Dataset:
    X_train = _features(arrays["X_train"], "X_train", source)
    X_test = _features(arrays["X_test"], "X_test", source)
    y_train = _labels(arrays["y_train"], "y_train", source)
    y_test = _labels(arrays["y_test"], "y_test", source)
    for split, X, y in (("train", X_train, y_train), ("test", X_test, y_test)):
        if X.shape[0] != y.shape[0]:
            raise DatasetError(
                f"{source}: {split} set has {plural(X.shape[0], 'image')} but "
                f"{plural(y.shape[0], 'label')}"
            )
    if X_test.shape[0] and X_test.shape[1] != X_train.shape[1]:
        raise DatasetError(
            f"{source}: train images have {plural(X_train.shape[1], 'feature')} but test images "
            f"have {X_test.shape[1]}"
        )
    return Dataset(X_train, y_train, X_test, y_test, name)


#: dtype kinds accepted from an .npz member before the checks of _features and
#: _labels (which give the messages): anything but objects.
_ANY_KIND = "biufcmMSUV"


def _load_npz(path: Path) -> dict:
    name = str(path)

    def fail(e):
        msg = str(e)
        msg = msg[len(name) + 2:] if msg.startswith(name + ": ") else msg
        return DatasetError(f"{name}: cannot read .npz file ({msg})")

    try:
        keys = set(_io.npz_names(path, what="dataset"))
        if {"X_train", "y_train", "X_test", "y_test"} <= keys:
            return _io.load_npz(path, {k: (_ANY_KIND, None) for k in IDX_FILES}, what="dataset")
        if {"X", "y"} <= keys:
            z = _io.load_npz(path, {"X": (_ANY_KIND, None), "y": (_ANY_KIND, None)},
                             what="dataset")
            X, y = z["X"], z["y"]
            return {
                "X_train": X,
                "y_train": y,
                "X_test": np.zeros((0,) + X.shape[1:], dtype=X.dtype),
                "y_test": np.zeros(0, dtype=y.dtype),
            }
    except _io.ArrayFileError as e:
        raise fail(e) from None
    raise DatasetError(
        f"{path}: expected arrays X_train, y_train, X_test, y_test (or X, y); "
        f"found {', '.join(sorted(keys)) or 'none'}"
    )


#: The four .npy files of a memory-mapped dataset directory.
NPY_FILES = {role: role + ".npy" for role in IDX_FILES}
_MAP_CHUNK = 1 << 16


def _mapped_features(directory: Path, role: str):
    path = directory / NPY_FILES[role]
    try:
        X = _io.map_npy(path, dtypes=[np.uint8, "<f4"], ndim=(2, 3), what=role)
    except _io.ArrayFileError as e:
        raise DatasetError(str(e)) from None
    X = X.reshape(X.shape[0], math.prod(X.shape[1:]))  # a view of the mapping
    if X.dtype == np.uint8:
        return ScaledImages(X)
    for i in range(0, X.shape[0], _MAP_CHUNK):  # chunk by chunk: bounded memory
        if not np.isfinite(X[i:i + _MAP_CHUNK]).all():
            raise DatasetError(f"{path}: {role} contains NaN or infinite values")
    return X


def _load_npy_dir(directory: Path) -> Dataset:
    """The memory-mapped dataset of a directory of the four .npy files."""
    missing = [f for f in NPY_FILES.values() if not (directory / f).is_file()]
    if missing:
        raise DatasetError(f"{directory}: missing {', '.join(missing)} (a directory of .npy "
                           "files needs all four)")
    source = str(directory)
    X = {role: _mapped_features(directory, role) for role in ("X_train", "X_test")}
    y = {}
    for role in ("y_train", "y_test"):
        path = directory / NPY_FILES[role]
        try:
            raw = _io.load_npy(path, dtype_kinds="biuf", ndim=None, what=role)
        except _io.ArrayFileError as e:
            raise DatasetError(str(e)) from None
        y[role] = _labels(raw, role, str(path))
    for split in ("train", "test"):
        n_x, n_y = X["X_" + split].shape[0], y["y_" + split].shape[0]
        if n_x != n_y:
            raise DatasetError(f"{source}: {split} set has {plural(n_x, 'image')} but "
                               f"{plural(n_y, 'label')}")
    if X["X_test"].shape[0] and X["X_test"].shape[1] != X["X_train"].shape[1]:
        raise DatasetError(
            f"{source}: train images have {plural(X['X_train'].shape[1], 'feature')} but test "
            f"images have {X['X_test'].shape[1]}")
    return Dataset(X["X_train"], y["y_train"], X["X_test"], y["y_test"], directory.name)


def load_dataset(path: str | os.PathLike | None = None) -> Dataset:
    """Load a classification dataset.

    Parameters
    ----------
    path : str, path-like or None
        * ``None``: Fashion-MNIST from :data:`DEFAULT_DATA_DIR`, as installed by
          the Debian package ``dataset-fashion-mnist``.
        * A directory: the MNIST-style IDX files ``train-images-idx3-ubyte``,
          ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
          ``t10k-labels-idx1-ubyte``, each optionally gzip-compressed with a
          ``.gz`` suffix (the uncompressed file is used if both exist).
        * A directory with ``X_train.npy`` (it takes precedence over IDX
          files): the four files ``X_train.npy``, ``y_train.npy``,
          ``X_test.npy``, ``y_test.npy``. The images (uint8 or little-endian
          float32, 2-D or 3-D, C order) are memory-mapped read-only after
          their headers are checked (dtype, shape, and that the file holds
          exactly the bytes the header declares); the labels are read.
          Nothing else is loaded, so the images may exceed memory: indexing
          reads only the rows asked for (float32 files are scanned once,
          chunk by chunk, for NaN and inf).
        * A ``.npz`` file with arrays ``X_train, y_train, X_test, y_test``, or
          with ``X, y`` only, in which case the test set is empty (0 rows).
          Loaded with ``allow_pickle=False``.

    Returns
    -------
    Dataset
        Images (2-D, or 3-D flattened to 2-D) as float32; ``uint8`` images are
        scaled to [0, 1] by dividing by 255, other numeric dtypes are converted
        unchanged (memory-mapped images: float32 memmaps or
        :class:`ScaledImages`). Labels as int64.

    Raises
    ------
    DatasetError
        If files are missing (the message names them; for the default
        location it gives the install command), malformed, or inconsistent:
        image and label counts differ, labels are negative or not integers,
        images are not 2-D/3-D or contain NaN/inf, or train and test feature
        counts differ.
    """
    default = path is None
    directory = Path(DEFAULT_DATA_DIR if default else path)
    if not default and directory.is_file():
        if directory.suffix != ".npz":
            raise DatasetError(
                f"{directory}: expected a directory of IDX files or a .npz file"
            )
        return _make_dataset(_load_npz(directory), directory.stem, str(directory))

    if not default and (directory / NPY_FILES["X_train"]).is_file():
        return _load_npy_dir(directory)
    files = {role: _find_idx(directory, stem) for role, stem in IDX_FILES.items()}
    missing = [IDX_FILES[role] + "[.gz]" for role, p in files.items() if p is None]
    if missing:
        if default:
            raise DatasetError(
                f"Fashion-MNIST not found in {directory} (missing {', '.join(missing)}). "
                + INSTALL_HINT
            )
        if not directory.exists():
            raise DatasetError(f"{directory}: no such file or directory")
        raise DatasetError(f"{directory}: missing {', '.join(missing)}")
    arrays = {role: read_idx(p) for role, p in files.items()}
    name = "fashion-mnist" if default else directory.name
    return _make_dataset(arrays, name, str(directory))
