"""Datasets: IDX (MNIST-format) and CSV readers, .npz archives, and a
loader for Fashion-MNIST; classification (integer labels) or regression
(float targets, any number of outputs).

Only NumPy and the standard library are used, so this module can be imported
without the compiled Fortran extension.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import math
import os
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np

from . import io as _io
from ._validate import plural

__all__ = ["DEFAULT_DATA_DIR", "TASKS", "Dataset", "DatasetError", "IntegerTargetsWarning",
           "ScaledImages", "load_dataset", "read_csv", "read_csv_features", "read_idx",
           "take_rows"]

#: The tasks a dataset can be: integer class labels, or float targets.
TASKS = ("classification", "regression")

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


class IntegerTargetsWarning(UserWarning):
    """Float targets whose values are all integers were taken as regression
    targets; pass ``task="classification"`` (``--task classification``) if
    they are class labels."""


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split of a classification or regression dataset.

    Attributes
    ----------
    X_train, X_test : ndarray of float32, shape (n, n_features), or ScaledImages
        C-contiguous feature matrices. Images stored as uint8 are scaled to
        [0, 1] by dividing by 255. From a directory of ``.npy`` files they
        are memory-mapped, never read whole: a read-only float32
        ``numpy.memmap``, or for uint8 files a :class:`ScaledImages`, which
        gives float32 ``x / 255`` rows when indexed.
    y_train, y_test : ndarray
        Classification: int64 class labels, shape (n,), non-negative.
        Regression: targets of shape (n, n_outputs), C-contiguous, finite,
        float32 or float64 as stored (a CSV file's: float64), float32 from
        integers.
    name : str
        Short name for messages and metadata.
    task : {"classification", "regression"}
    feature_names, target_names : tuple of str or None
        The CSV header's names of the feature and target columns (None for
        other sources).
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    name: str
    task: str = "classification"
    feature_names: tuple | None = None
    target_names: tuple | None = None

    @property
    def n_features(self) -> int:
        """Number of input features (columns of ``X_train``)."""
        return self.X_train.shape[1]

    @property
    def n_classes(self) -> int:
        """``max label + 1`` over train and test labels (0 if there are none,
        and 0 for a regression set)."""
        if self.task == "regression":
            return 0
        return int(max((y.max() + 1 for y in (self.y_train, self.y_test) if y.size), default=0))

    @property
    def n_outputs(self) -> int:
        """Regression: the number of targets; classification: :attr:`n_classes`."""
        return self.y_train.shape[1] if self.task == "regression" else self.n_classes

    def __repr__(self) -> str:
        what = (f"n_outputs={self.n_outputs}" if self.task == "regression"
                else f"n_classes={self.n_classes}")
        return (
            f"Dataset(name={self.name!r}, task={self.task!r}, train={self.X_train.shape[0]}, "
            f"test={self.X_test.shape[0]}, n_features={self.n_features}, {what})"
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
        raise DatasetError(f"{source}: {what} must be 1-D class labels, got shape {y.shape} "
                           "(several targets are a regression: --task regression)")
    if y.dtype.kind == "f":          # --task classification: exact integers only
        bad = ~np.isfinite(y) | (np.mod(y, 1) != 0) if y.size else np.zeros(0, bool)
        if bad.any():
            i = int(np.argmax(bad))
            raise DatasetError(f"{source}: {what}[{i}] = {y[i].item()!r} is not an integer "
                               "class label (classification needs integer labels)")
        if y.size and np.abs(y).max() >= 2**53:
            raise DatasetError(f"{source}: {what} holds labels beyond 2**53")
    elif y.dtype.kind not in "iu":
        raise DatasetError(f"{source}: {what} must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DatasetError(f"{source}: {what} contains negative labels (min {y.min()}); "
                           "for regression targets pass --task regression")
    return np.ascontiguousarray(y, dtype=np.int64)


def _targets(y: np.ndarray, what: str, source: str) -> np.ndarray:
    """Regression targets as C-contiguous (n, n_outputs), finite and within
    float32's range: float32 or float64 as stored (the metrics then use the
    file's values), float32 for any other dtype."""
    if y.ndim not in (1, 2):
        raise DatasetError(f"{source}: {what} must be 1-D or 2-D (n, outputs), got shape "
                           f"{y.shape}")
    if y.dtype.kind not in "buif":
        raise DatasetError(f"{source}: {what} must be numeric, got dtype {y.dtype}")
    y2 = y.reshape(y.shape[0], 1) if y.ndim == 1 else y
    if y2.shape[1] == 0:
        raise DatasetError(f"{source}: {what} has no target columns (shape {y.shape})")
    keep = y2.dtype in (np.float32, np.float64)
    out = np.ascontiguousarray(y2, dtype=y2.dtype if keep else np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ~(np.abs(out) <= np.finfo(np.float32).max)       # NaN, inf, beyond float32
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        v = y2[i, j].item()
        why = "beyond float32" if math.isfinite(v) else "not finite"
        raise DatasetError(f"{source}: {what}[{i}, {j}] = {v!r} is {why}")
    return out


def _task_of(y: np.ndarray, task: str | None, source: str) -> str:
    """The task: ``task`` if given, else from the dtype of ``y`` (float:
    regression, with an :class:`IntegerTargetsWarning` when every value is an
    integer; anything else: classification)."""
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        return task
    if y.dtype.kind != "f":
        return "classification"
    if y.size and np.isfinite(y).all() and (np.mod(y, 1) == 0).all():
        warnings.warn(f"{source}: the targets are floats whose values are all integers; they "
                      "are taken as regression targets (pass --task classification to use "
                      "them as class labels)", IntegerTargetsWarning, stacklevel=3)
    return "regression"


def _make_dataset(arrays: dict, name: str, source: str, task: str | None = None,
                  **names) -> Dataset:
    task = _task_of(arrays["y_train"], task, source)
    if names and task == "classification":        # a CSV's one label column
        for key in ("y_train", "y_test"):
            y = arrays[key]
            if y.ndim == 2 and y.shape[1] != 1:
                raise DatasetError(f"{source}: classification takes one label column, got "
                                   f"{y.shape[1]} target columns (--task regression for "
                                   "several targets)")
            arrays = {**arrays, key: y.reshape(-1)}
    convert = _targets if task == "regression" else _labels
    X_train = _features(arrays["X_train"], "X_train", source)
    X_test = _features(arrays["X_test"], "X_test", source)
    y_train = convert(arrays["y_train"], "y_train", source)
    y_test = convert(arrays["y_test"], "y_test", source)
    for split, X, y in (("train", X_train, y_train), ("test", X_test, y_test)):
        if X.shape[0] != y.shape[0]:
            what = "target row" if task == "regression" else "label"
            raise DatasetError(
                f"{source}: {split} set has {plural(X.shape[0], 'image')} but "
                f"{plural(y.shape[0], what)}"
            )
    if X_test.shape[0] and X_test.shape[1] != X_train.shape[1]:
        raise DatasetError(
            f"{source}: train images have {plural(X_train.shape[1], 'feature')} but test images "
            f"have {X_test.shape[1]}"
        )
    if task == "regression" and y_test.shape[0] and y_test.shape[1] != y_train.shape[1]:
        raise DatasetError(f"{source}: y_train has {plural(y_train.shape[1], 'target column')} "
                           f"but y_test has {y_test.shape[1]}")
    return Dataset(X_train, y_train, X_test, y_test, name, task, **names)


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
                "y_test": np.zeros((0,) + y.shape[1:], dtype=y.dtype),
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


def _load_npy_dir(directory: Path, task: str | None = None) -> Dataset:
    """The memory-mapped dataset of a directory of the four .npy files."""
    missing = [f for f in NPY_FILES.values() if not (directory / f).is_file()]
    if missing:
        raise DatasetError(f"{directory}: missing {', '.join(missing)} (a directory of .npy "
                           "files needs all four)")
    source = str(directory)
    X = {role: _mapped_features(directory, role) for role in ("X_train", "X_test")}
    raw = {}
    for role in ("y_train", "y_test"):
        path = directory / NPY_FILES[role]
        try:
            raw[role] = _io.load_npy(path, dtype_kinds="biuf", ndim=None, what=role)
        except _io.ArrayFileError as e:
            raise DatasetError(str(e)) from None
    task = _task_of(raw["y_train"], task, str(directory / NPY_FILES["y_train"]))
    convert = _targets if task == "regression" else _labels
    y = {role: convert(raw[role], role, str(directory / NPY_FILES[role])) for role in raw}
    for split in ("train", "test"):
        n_x, n_y = X["X_" + split].shape[0], y["y_" + split].shape[0]
        if n_x != n_y:
            raise DatasetError(f"{source}: {split} set has {plural(n_x, 'image')} but "
                               f"{plural(n_y, 'label')}")
    if X["X_test"].shape[0] and X["X_test"].shape[1] != X["X_train"].shape[1]:
        raise DatasetError(
            f"{source}: train images have {plural(X['X_train'].shape[1], 'feature')} but test "
            f"images have {X['X_test'].shape[1]}")
    return Dataset(X["X_train"], y["y_train"], X["X_test"], y["y_test"], directory.name, task)


# ---------------------------------------------------------------------- CSV

#: Characters that make a finite number's text a float rather than an integer.
_FLOAT_CHARS = frozenset(".eE")


def _csv_names(line: str, name: str) -> list[str]:
    if not line.strip():
        raise DatasetError(f"{name}: the file is empty (expected a header row naming the "
                           "columns)" if not line else
                           f"{name}: line 1 is blank (expected a header row naming the "
                           "columns)")
    names = [c.strip() for c in line.rstrip("\n").split(",")]
    names = [c[1:-1].strip() if len(c) >= 2 and c[0] == c[-1] == '"' else c for c in names]
    for j, c in enumerate(names):
        if not c:
            raise DatasetError(f"{name}: column {j + 1} of the header (line 1) has no name")
    seen, dups = set(), []
    for c in names:
        if c in seen and c not in dups:
            dups.append(c)
        seen.add(c)
    if dups:
        raise DatasetError(f"{name}: duplicate column names in the header: "
                           f"{', '.join(map(repr, dups))}")

    def numeric(c):
        try:
            float(c)
            return True
        except ValueError:
            return False
    if all(numeric(c) for c in names):
        raise DatasetError(f"{name}: line 1 looks like data ({line.strip()[:60]!r}); the "
                           "first line must be a header row naming the columns")
    return names


def _csv_scan(f, name: str, n_cols: int):
    """Count the data rows after the header and check each has ``n_cols``
    fields, holding one line at a time; also the line numbers of the empty
    lines (NumPy skips them)."""
    n, blank = 0, []
    for lineno, line in enumerate(f, start=2):
        if line in ("\n", ""):
            blank.append(lineno)
            continue
        k = line.count(",") + 1
        if k != n_cols:
            raise DatasetError(f"{name}: line {lineno} has {plural(k, 'field')} but the header "
                               f"has {n_cols} (every row needs one value per column)")
        n += 1
    return n, blank


def _csv_lines(path):
    """(line number, fields) of the data rows of a CSV file."""
    with open(path, encoding="utf-8-sig", newline=None) as f:
        f.readline()
        for lineno, line in enumerate(f, start=2):
            if line not in ("\n", ""):
                yield lineno, line.rstrip("\n").split(",")


def _csv_bad_cell(path, name, names, numpy_error):
    for lineno, cells in _csv_lines(path):
        for j, cell in enumerate(cells):
            text = cell.strip()
            try:
                float(text)
                if "_" in text:
                    raise ValueError
            except ValueError:
                what = "an empty cell" if not text else f"{text[:40]!r} is not a number"
                return DatasetError(f"{name}: line {lineno}, column {j + 1} ({names[j]!r}): "
                                    f"{what}")
    return DatasetError(f"{name}: cannot read the CSV data ({numpy_error})")


def _csv_line_of_row(row: int, blank: list) -> int:
    line = row + 2
    for b in blank:
        if b <= line:
            line += 1
        else:
            break
    return line


def _written_as_integers(path, cols) -> bool:
    for _, cells in _csv_lines(path):
        for j in cols:
            if not _FLOAT_CHARS.isdisjoint(cells[j]):
                return False
    return True


def read_csv(path: str | os.PathLike, target_columns) -> tuple:
    """Read a CSV file of numbers: a header row naming the columns, then one
    row per sample, fields separated by commas.

    The file is scanned first, one line at a time (header, then the field
    count of every row), so nothing is allocated before its shape is known;
    NumPy (``numpy.loadtxt``) then parses the numbers. Empty lines are
    skipped; a UTF-8 byte-order mark and ``\\r\\n`` line ends are accepted;
    header names may be in double quotes (a name cannot hold a comma; data
    cells are plain numbers).

    Parameters
    ----------
    path : str or path-like
        The CSV file (a regular file).
    target_columns : sequence of str
        The header names of the target columns, in the order wanted; every
        other column is a feature.

    Returns
    -------
    X : ndarray of float32, shape (n, n_features)
    y : ndarray, shape (n, len(target_columns))
        int64 if every target cell is written as an integer (no ``.``, ``e``
        or ``E``: the dtype NumPy and pandas would infer), else float64.
    feature_names, target_names : tuple of str

    Raises
    ------
    DatasetError
        Naming the file (and, for a bad cell, the line and column): an empty
        file, a missing or duplicate header name, no data rows, a row with
        the wrong number of fields, a cell that is not a number, a value
        that is NaN, infinite or beyond float32, an unknown target column,
        no feature column left, or a file that is not UTF-8 text.
    """
    targets = list(target_columns)

    def check(names, name):
        missing = [t for t in targets if t not in names]
        if missing or not targets:
            which = (f"target column {', '.join(map(repr, missing))} is not in the header"
                     if missing else "no target columns given")
            raise DatasetError(f"{name}: {which}; the columns are: {', '.join(names)}")
        dup = sorted({t for t in targets if targets.count(t) > 1})
        if dup:
            raise DatasetError(f"{name}: target column {dup[0]!r} is named twice")
        if len(targets) == len(names):
            raise DatasetError(f"{name}: every column is a target; no feature column is "
                               "left")
    A, names = _read_csv_table(path, check)
    t_idx = [names.index(t) for t in targets]
    f_idx = [j for j in range(len(names)) if j not in set(t_idx)]
    X = np.ascontiguousarray(A[:, f_idx], dtype=np.float32)
    y = np.ascontiguousarray(A[:, t_idx])
    if (np.mod(y, 1) == 0).all() and np.abs(y).max() < 2**53 \
            and _written_as_integers(path, t_idx):
        y = y.astype(np.int64)
    return X, y, tuple(names[j] for j in f_idx), tuple(targets)


def _read_csv_table(path, check_header=None):
    """The numbers of a CSV file (float64, finite, within float32) and its
    header names; ``check_header(names, name)`` runs before the data is
    scanned, so a wrong header fails before anything is read."""
    name = os.fsdecode(os.fspath(path))
    with _io.open_regular(path, "CSV file", DatasetError) as raw:
        f = io.TextIOWrapper(raw, encoding="utf-8-sig", newline=None)
        try:
            names = _csv_names(f.readline(), name)
            if check_header is not None:
                check_header(names, name)
            n, blank = _csv_scan(f, name, len(names))
            if n == 0:
                raise DatasetError(f"{name}: no data rows (only the header)")
            f.seek(0)
            f.readline()
            try:
                A = np.loadtxt(f, delimiter=",", comments=None, dtype=np.float64, ndmin=2)
            except ValueError as e:
                raise _csv_bad_cell(path, name, names, e) from None
        except UnicodeDecodeError as e:
            raise DatasetError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start} of a "
                               "chunk); a CSV file must be plain text") from None
    if A.shape != (n, len(names)):      # the file changed between the passes
        raise DatasetError(f"{name}: expected {n} x {len(names)} values, read {A.shape}")
    bad = ~np.isfinite(A)
    with np.errstate(over="ignore"):
        big = np.abs(A) > np.finfo(np.float32).max
    if bad.any() or big.any():
        r, j = (int(v) for v in np.argwhere(bad | big)[0])
        why = "is not a finite number" if bad[r, j] else "is beyond float32"
        raise DatasetError(f"{name}: line {_csv_line_of_row(r, blank)}, column {j + 1} "
                           f"({names[j]!r}): {float(A[r, j])!r} {why}")
    return A, names


def read_csv_features(path: str | os.PathLike, features=None, n_features=None) -> tuple:
    """Read the inputs of a model from a CSV file (a header row, then one row
    per sample), for prediction.

    Parameters
    ----------
    path : str or path-like
        The CSV file, in the format of :func:`read_csv`.
    features : sequence of str, optional
        The feature columns by header name, in the model's order (a model
        trained from a CSV file records them in ``metadata['config']
        ['features']``). Other columns (the targets, say) are ignored. Without
        names every column is a feature.
    n_features : int, optional
        The number of features the model takes; checked against the file.

    Returns
    -------
    X : ndarray of float32, shape (n, n_features)
        The text's numbers rounded to float32, as :func:`read_csv` does.
    ignored : tuple of str
        The header names that were not used.

    Raises
    ------
    DatasetError
        The errors of :func:`read_csv`; a named feature missing from the
        header; a column count that is not ``n_features``.
    """
    want = None if features is None else [str(c) for c in features]
    if want is not None and n_features is not None and len(want) != n_features:
        raise ValueError(f"features names {len(want)} columns but n_features is "
                         f"{n_features}")

    def check(names, name):
        if want is None:
            if n_features is not None and len(names) != n_features:
                raise DatasetError(f"{name}: {plural(len(names), 'column')} but the model "
                                   f"takes {plural(n_features, 'feature')} (the columns "
                                   f"are: {', '.join(names)})")
            return
        missing = [c for c in want if c not in names]
        if missing:
            raise DatasetError(f"{name}: the model's feature column"
                               f"{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(map(repr, missing[:10]))}"
                               f"{' ...' if len(missing) > 10 else ''} "
                               f"{'are' if len(missing) > 1 else 'is'} not in the header; "
                               f"the columns are: {', '.join(names)}")
    A, names = _read_csv_table(path, check)
    cols = list(range(len(names))) if want is None else [names.index(c) for c in want]
    X = np.ascontiguousarray(A[:, cols], dtype=np.float32)
    used = set(cols)
    return X, tuple(c for j, c in enumerate(names) if j not in used)


def _split(arrays: dict, fraction: float, seed: int, source: str) -> dict:
    """Move a seeded random ``fraction`` of the rows (at least 1, leaving at
    least 1) to the test split; both splits keep the file's row order."""
    if not 0 < fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {fraction!r}")
    n = arrays["X_train"].shape[0]
    n_test = round(fraction * n)
    if n_test < 1 or n_test > n - 1:
        raise DatasetError(f"{source}: a test fraction of {fraction:g} of "
                           f"{plural(n, 'row')} leaves {plural(n_test, 'test row')} and "
                           f"{plural(n - n_test, 'training row')}; each needs at least 1")
    test = np.zeros(n, bool)
    test[np.random.default_rng(seed).permutation(n)[:n_test]] = True
    X, y = arrays["X_train"], arrays["y_train"]
    return {"X_train": X[~test], "y_train": y[~test], "X_test": X[test], "y_test": y[test]}


def _load_csv(path, target_columns, test_data, source):
    if target_columns is None:
        try:
            with _io.open_regular(path, "CSV file", DatasetError) as raw:
                header = io.TextIOWrapper(raw, encoding="utf-8-sig").readline(1 << 16).strip()
        except (OSError, UnicodeDecodeError, DatasetError):
            header = ""
        raise DatasetError(f"{source}: a CSV dataset needs --target-columns NAME[,NAME...] "
                           "(target_columns=) to say which columns are the targets"
                           + (f"; the columns are: {header.replace(',', ', ')}" if header
                              else ""))
    X, y, features, targets = read_csv(path, target_columns)
    arrays = {"X_train": X, "y_train": y, "X_test": X[:0], "y_test": y[:0]}
    if test_data is not None:
        Xt, yt, t_features, _ = read_csv(test_data, target_columns)
        if set(t_features) != set(features):
            extra = sorted(set(t_features) - set(features))
            lack = sorted(set(features) - set(t_features))
            raise DatasetError(
                f"{os.fspath(test_data)}: the test file's columns differ from {source}'s"
                + (f"; it lacks {', '.join(map(repr, lack))}" if lack else "")
                + (f"; it has extra {', '.join(map(repr, extra))}" if extra else ""))
        order = [t_features.index(c) for c in features]
        if yt.dtype != y.dtype:            # one file's targets integers, the other's floats
            y, yt = y.astype(np.float64), yt.astype(np.float64)
            arrays["y_train"] = y
        arrays.update(X_test=np.ascontiguousarray(Xt[:, order]), y_test=yt)
    return arrays, {"feature_names": features, "target_names": targets}


def load_dataset(path: str | os.PathLike | None = None, *, task: str | None = None,
                 target_columns=None, test_data=None, test_fraction: float | None = None,
                 seed: int = 0) -> Dataset:
    """Load a classification or regression dataset.

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
          with ``X, y`` only, in which case the test set is empty (0 rows)
          unless ``test_fraction`` is given. Loaded with ``allow_pickle=False``.
        * A ``.csv`` file (see :func:`read_csv`): a header row, then numbers
          separated by commas; ``target_columns`` names the targets and every
          other column is a feature.
    task : {"classification", "regression"} or None
        None: from the targets' dtype. Float targets mean regression (an
        :class:`IntegerTargetsWarning` if every value is an integer);
        integer targets (in a CSV file: every target cell written without
        ``.``, ``e`` or ``E``) mean classification. ``"regression"`` takes
        integer targets as float32 values; ``"classification"`` takes float
        targets that are all integers as labels.
    target_columns : sequence of str, optional
        CSV only, and required there: the header names of the targets.
    test_data : str or path-like, optional
        CSV only: a second CSV file with the same columns (in any order) as
        the test split.
    test_fraction : float in (0, 1), optional
        For a source without a test split (a CSV file without ``test_data``,
        an ``.npz`` with ``X, y``): move this fraction of the rows, chosen by
        a generator seeded with ``seed``, to the test split. Both splits keep
        the file's row order.
    seed : int
        Seed of the ``test_fraction`` split.

    Returns
    -------
    Dataset
        Images (2-D, or 3-D flattened to 2-D) as float32; ``uint8`` images are
        scaled to [0, 1] by dividing by 255, other numeric dtypes are converted
        unchanged (memory-mapped images: float32 memmaps or
        :class:`ScaledImages`). Classification labels as int64 (n,);
        regression targets (n, n_outputs), float32 or float64 as stored (CSV:
        float64; integers: float32).

    Raises
    ------
    DatasetError
        If files are missing (the message names them; for the default
        location it gives the install command), malformed, or inconsistent:
        image and label counts differ, labels are negative or not integers,
        images are not 2-D/3-D or contain NaN/inf, train and test feature
        counts differ, a CSV cell is not a finite number (the message names
        the line and column), ``target_columns`` names a column the header
        lacks, or ``test_fraction`` is given for a source that has a test
        split.
    ValueError
        For a bad ``task``, ``test_fraction``, or a CSV option given for
        another kind of source.
    """
    default = path is None
    directory = Path(DEFAULT_DATA_DIR if default else path)
    source = str(directory)
    is_csv = not default and directory.suffix.lower() == ".csv"
    if not is_csv and (target_columns is not None or test_data is not None):
        raise ValueError(f"{source}: target_columns and test_data are for a CSV dataset "
                         "(a .csv file)")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if test_fraction is not None and test_data is not None:
        raise ValueError("give test_data or test_fraction, not both")
    names = {}
    if is_csv:
        if directory.is_dir():
            raise DatasetError(f"{source}: expected a CSV file, and this is a directory")
        if not directory.exists():
            raise DatasetError(f"{source}: no such file or directory")
        arrays, names = _load_csv(directory, target_columns, test_data, source)
        name = directory.stem
    elif not default and directory.is_file():
        if directory.suffix != ".npz":
            raise DatasetError(
                f"{directory}: expected a directory of IDX files or a .npz or .csv file"
            )
        arrays, name = _load_npz(directory), directory.stem
    elif not default and (directory / NPY_FILES["X_train"]).is_file():
        if test_fraction is not None:
            raise DatasetError(f"{source}: --test-fraction (test_fraction=) is for a CSV file "
                               "or an .npz with X, y; a directory of .npy files has its test "
                               "split")
        return _load_npy_dir(directory, task)
    else:
        arrays, name = _load_idx_dir(directory, default), (
            "fashion-mnist" if default else directory.name)
    if test_fraction is not None:
        if arrays["X_test"].shape[0]:
            raise DatasetError(f"{source}: the dataset has a test split already; "
                               "--test-fraction (test_fraction=) is for one without")
        arrays = _split(arrays, test_fraction, seed, source)
    return _make_dataset(arrays, name, source, task, **names)


def _load_idx_dir(directory: Path, default: bool) -> dict:
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
    return {role: read_idx(p) for role, p in files.items()}
