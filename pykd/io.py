"""File I/O shared by the whole package: atomic writes and checked array readers.

:func:`atomic_write` is the one way pykd writes a file (models, checkpoints,
logits, reports): a temporary file ``.NAME.<pid>.<random>.tmp`` in the target's
directory, fsync, rename over the target, fsync of the directory. A failure
at any point removes the temporary file and leaves an existing target as it
was. Temporary files of that naming left behind by killed runs are removed on
the next save of the same target, once their writer's pid is gone and they
are over an hour old.

:func:`load_npy` and :func:`load_npz` read ``.npy`` files and ``.npz``
members with every size checked before any data is read: the header's dtype
must be plain numeric (no objects, no pickles, no structured or subarray
dtypes), and its shape times the item size must equal the bytes present (for
an ``.npz`` member, the zip member's declared uncompressed size, itself
checked against the archive's size and deflate's largest ratio). Only regular
files are opened, so a FIFO or device never blocks. Every failure is an
:class:`ArrayFileError` naming the file.

Only NumPy and the standard library are used.
"""
from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import re
import secrets
import stat
import time
import zipfile

import numpy as np
from numpy.lib import format as npformat

__all__ = ["ArrayFileError", "atomic_write", "load_npy", "load_npz", "map_npy", "npz_names",
           "open_regular", "STALE_TMP_SECONDS"]

#: A temporary file of a dead writer is removed once it is older than this.
STALE_TMP_SECONDS = 3600
#: Deflate cannot expand data by more than about 1032:1: a member of ``c``
#: compressed bytes declares at most this many times ``c`` (plus a little).
MAX_DEFLATE_RATIO = 1032
#: The largest .npy header read (numpy allows 10000 for long structured
#: dtypes, which are refused here; a 64-dimension shape needs about 1.5 kB).
#: It bounds the memory of parsing the header (about 330 bytes per character).
MAX_HEADER_BYTES = 2048
_CHUNK = 1 << 20
_KINDS = {"b": "bool", "i": "signed integer", "u": "unsigned integer", "f": "floating point",
          "c": "complex"}


class ArrayFileError(ValueError):
    """An ``.npy``/``.npz`` file is missing, not a regular file, malformed or
    not what the caller expects. The message starts with the file's path."""


# --------------------------------------------------------------------------
# Writing


def _tmp_pattern(base: str) -> re.Pattern:
    """Our temporary names beside ``base``: ``.NAME.<pid>.<hex>.tmp`` (this
    module) and ``NAME.<pid>-<n>.tmp`` (the Fortran writer, pykd_save_model)."""
    b = re.escape(base)
    return re.compile(rf"(?:\.{b}\.([0-9]+)\.[0-9a-f]+|{b}\.([0-9]+)-[0-9]+)\.tmp\Z")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # never signal a process group
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**31  # exists but is not ours; an absurd pid cannot exist
    return True


def remove_stale_tmp(path, *, now=None, max_age=STALE_TMP_SECONDS) -> list[str]:
    """Remove temporary files of :func:`atomic_write`'s naming left beside
    ``path`` by writers that are gone: only regular files named
    ``.NAME.<pid>.<random>.tmp`` (or the Fortran writer's
    ``NAME.<pid>-<n>.tmp``) whose pid is not running and whose mtime is
    more than ``max_age`` seconds old. Returns the paths removed; errors
    (a file vanishing, no permission) are ignored."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    pattern = _tmp_pattern(os.path.basename(path))
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if (not stat.S_ISREG(st.st_mode) or now - st.st_mtime <= max_age
                    or _pid_alive(int(m.group(1) or m.group(2)))):
                continue
            os.unlink(entry.path)
            removed.append(entry.path)
        except OSError:
            continue
    return removed


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write) -> None:
    """Write a file atomically: ``write(f)`` fills a temporary file beside ``path``,
    which then replaces ``path``.

    Parameters
    ----------
    path : str or path-like
        The target. Its directory must exist; it must not be a directory.
    write : callable
        Called once with a binary file object open for writing.

    Notes
    -----
    The temporary file ``.NAME.<pid>.<random>.tmp`` is created with mode
    0666 minus the umask (the mode ``open`` would give the target), flushed,
    fsynced and renamed over ``path``; the directory is then fsynced so the
    rename is durable. On any failure (including ``KeyboardInterrupt``) the
    temporary file is removed and an existing ``path`` is untouched. Stale
    temporary files of dead writers are removed first (see
    :func:`remove_stale_tmp`).

    Raises
    ------
    IsADirectoryError
        If ``path`` is a directory (checked before anything is written).
    OSError
        If the directory does not exist, the disk is full, etc.; ``path`` is
        left as it was.
    """
    if isinstance(path, (int, bool)):
        raise TypeError(f"path must be a str or path-like, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    remove_stale_tmp(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # the kernel applies the umask
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


# --------------------------------------------------------------------------
# Reading


def open_regular(path, what="file", error=ArrayFileError):
    """Open ``path`` for binary reading, refusing anything but a regular file.

    A FIFO or device is refused without blocking (the open is non-blocking
    and the type is checked on the open descriptor, so there is no race).
    File descriptors (ints) are refused: only paths are accepted.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    error
        (``ArrayFileError`` by default) if it is not a regular file or cannot
        be opened; the message names the file.
    """
    if isinstance(path, (int, bool)) or not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{what} path must be a str or path-like, got {type(path).__name__}")
    name = os.fsdecode(os.fspath(path))
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{name}: cannot open {what} ({e.strerror or e})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise error(f"{name}: {what} is {kind}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _ndims(ndim):
    if ndim is None:
        return None
    return (ndim,) if isinstance(ndim, int) else tuple(ndim)


def _read_header(f, name, what):
    """(shape, fortran_order, dtype) of the .npy stream at ``f``, checked.

    The header's length is checked before its bytes are read: numpy's
    ``read_array_header_*`` reads all of a declared 4 GiB header before it
    compares the length with ``max_header_size``.
    """
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != npformat.MAGIC_PREFIX:
        state = "truncated" if npformat.MAGIC_PREFIX.startswith(magic[:6]) else "bad magic"
        raise ArrayFileError(f"{name}: {what}: not an .npy file ({state}: {magic[:8]!r})")
    version = (magic[6], magic[7])
    if version not in ((1, 0), (2, 0)):
        raise ArrayFileError(f"{name}: {what}: unsupported .npy format version "
                             f"{version[0]}.{version[1]} (1.0 and 2.0 are read)")
    raw_len = f.read(2 if version == (1, 0) else 4)
    hlen = int.from_bytes(raw_len, "little")
    if len(raw_len) < (2 if version == (1, 0) else 4) or hlen > MAX_HEADER_BYTES:
        problem = ("truncated header length" if hlen <= MAX_HEADER_BYTES
                   else f"a header of {hlen} bytes (at most {MAX_HEADER_BYTES})")
        raise ArrayFileError(f"{name}: {what}: not a valid .npy file ({problem})")
    header = f.read(hlen)
    if len(header) < hlen:
        raise ArrayFileError(f"{name}: {what}: truncated: the .npy header has {hlen} bytes, "
                             f"found {len(header)}")
    try:
        reader = (npformat.read_array_header_1_0 if version == (1, 0)
                  else npformat.read_array_header_2_0)
        shape, fortran, dtype = reader(io.BytesIO(raw_len + header),
                                       max_header_size=MAX_HEADER_BYTES)
    except Exception as e:  # numpy's parser raises ValueError, SyntaxError, TypeError...
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ArrayFileError(f"{name}: {what}: not a valid .npy file ({msg})") from None
    return shape, fortran, dtype


def _check_header(shape, dtype, name, what, dtype_kinds, ndims):
    """The byte count the header promises, after checking its dtype and shape."""
    if dtype.hasobject:
        raise ArrayFileError(f"{name}: {what} holds Python objects (pickles are refused)")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise ArrayFileError(f"{name}: {what} has a structured dtype {dtype.str}; "
                             "plain numbers are expected")
    if dtype.kind not in dtype_kinds:
        wanted = " or ".join(_KINDS.get(k, k) for k in dtype_kinds)
        raise ArrayFileError(f"{name}: {what} must be {wanted}, got dtype {dtype}")
    if ndims is not None and len(shape) not in ndims:
        wanted = " or ".join(f"{d}-D" for d in ndims)
        raise ArrayFileError(f"{name}: {what} must be {wanted}, got shape {shape}")
    return math.prod(shape) * dtype.itemsize


def readinto_full(f, buf: memoryview) -> int:
    """Fill ``buf`` from ``f`` in chunks (``f`` may return short reads, e.g.
    gzip); return the bytes read, fewer only at the end of the stream."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:got + _CHUNK])
        if not n:
            break
        got += n
    return got


def _fill(f, out: np.ndarray) -> int:
    """Read into ``out``'s bytes (no second copy); return bytes read."""
    return readinto_full(f, memoryview(out.reshape(-1, order="A").view(np.uint8)))


def _read_body(f, shape, fortran, dtype, nbytes, name, what):
    try:
        out = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    except MemoryError:  # sizes are checked against the file: it is this big
        raise ArrayFileError(f"{name}: {what}: cannot allocate {nbytes} bytes for shape "
                             f"{shape}") from None
    got = _fill(f, out)
    if got != nbytes:
        raise ArrayFileError(f"{name}: {what}: truncated: expected {nbytes} bytes of data, "
                             f"found {got}")
    if f.read(1):
        raise ArrayFileError(f"{name}: {what}: trailing bytes after {nbytes} bytes of data")
    return out


def load_npy(path, *, dtype_kinds="biuf", ndim=None, what="array"):
    """Read one array from an ``.npy`` file, checking its header first.

    Parameters
    ----------
    path : str or path-like
        A regular file (never a file descriptor, FIFO or device).
    dtype_kinds : str
        Accepted ``dtype.kind`` letters, e.g. ``"f"`` or ``"iu"``.
    ndim : int, sequence of int or None
        Accepted numbers of dimensions (None: any).
    what : str
        What the array is, for messages ("teacher logits").

    Returns
    -------
    ndarray
        A writeable array with the file's dtype (byte order included) and shape.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ArrayFileError
        If the file is not a regular file, is an ``.npz`` archive, has a bad
        header, an object/structured dtype, a dtype kind or number of
        dimensions not accepted, or if the header's shape times the item size
        differs from the bytes in the file (truncated or trailing bytes). It
        is checked before any array is allocated, so a bogus header cannot
        cause a large allocation.
    """
    ndims = _ndims(ndim)
    with open_regular(path, what) as f:
        name = os.fsdecode(os.fspath(path))
        try:
            return _load_npy(f, name, dtype_kinds, ndims, what)
        except OSError as e:  # EIO and the like, after a successful open
            raise ArrayFileError(f"{name}: {what}: cannot read ({e.strerror or e})") from None


def _npy_header(f, name, what):
    """(file size, shape, fortran, dtype) of the ``.npy`` file ``f``, left
    at the start of its data."""
    size = os.fstat(f.fileno()).st_size
    if f.read(4) == b"PK\x03\x04":
        raise ArrayFileError(f"{name}: {what}: expected an .npy file, found an .npz "
                             "(zip) archive")
    f.seek(0)
    return (size, *_read_header(f, name, what))


def _check_present(nbytes, present, shape, dtype, name, what):
    """The data the header declares must be exactly the bytes after it."""
    if nbytes != present:
        state = "truncated" if nbytes > present else "trailing bytes"
        raise ArrayFileError(f"{name}: {what}: {state}: the header declares shape {shape} "
                             f"of {dtype} ({nbytes} bytes), the file holds {present}")


def _load_npy(f, name, dtype_kinds, ndims, what):
    size, shape, fortran, dtype = _npy_header(f, name, what)
    nbytes = _check_header(shape, dtype, name, what, dtype_kinds, ndims)
    _check_present(nbytes, size - f.tell(), shape, dtype, name, what)
    return _read_body(f, shape, fortran, dtype, nbytes, name, what)


def map_npy(path, *, dtypes, ndim=None, what="array"):
    """Open an ``.npy`` file memory-mapped, read-only, after checking its header.

    The checks are :func:`load_npy`'s (regular file, magic, version, header
    length, no objects or structured dtypes, shape times item size equal to
    the bytes in the file) before anything is mapped; the data itself is not
    read. ``dtypes`` are the accepted dtypes exactly (byte order included):
    a mapped array is used as it is on disk, never converted as a whole.

    Returns
    -------
    numpy.memmap (C order, ``mode="r"``), or an empty in-memory array when
    the file holds no elements (an empty file cannot be mapped).

    Raises
    ------
    FileNotFoundError, ArrayFileError
        As :func:`load_npy`; also for a dtype not in ``dtypes`` and for a
        Fortran-ordered array (rows would not be contiguous on disk).
    """
    ndims = _ndims(ndim)
    dtypes = [np.dtype(d) for d in dtypes]
    name = os.fsdecode(os.fspath(path))
    with open_regular(path, what) as f:
        try:
            size, shape, fortran, dtype = _npy_header(f, name, what)
            offset = f.tell()
        except OSError as e:
            raise ArrayFileError(f"{name}: {what}: cannot read ({e.strerror or e})") from None
    nbytes = _check_header(shape, dtype, name, what, "biufc", ndims)
    if dtype not in dtypes:
        wanted = " or ".join(f"{d} ({d.str})" for d in dtypes)
        raise ArrayFileError(f"{name}: {what} must be {wanted} to be memory-mapped, got "
                             f"dtype {dtype} ({dtype.str})")
    if fortran and len(shape) > 1:
        raise ArrayFileError(f"{name}: {what} is stored in Fortran order; save it C-ordered "
                             "(np.save of a C-contiguous array) so that rows are contiguous")
    _check_present(nbytes, size - offset, shape, dtype, name, what)
    if nbytes == 0:
        return np.zeros(shape, dtype)
    try:
        return np.memmap(name, dtype=dtype, mode="r", offset=offset, shape=shape, order="C")
    except (OSError, ValueError) as e:
        raise ArrayFileError(f"{name}: {what}: cannot map ({e})") from None


def _open_zip(f, name, what):
    try:
        return zipfile.ZipFile(f)
    except Exception as e:  # BadZipFile, OSError, ValueError, EOFError, struct.error...
        raise ArrayFileError(f"{name}: {what}: not a valid .npz (zip) archive "
                             f"({type(e).__name__}: {e})") from None


def npz_names(path, *, what="archive") -> list[str]:
    """Names of the arrays in an ``.npz`` file (member names without ``.npy``).

    Raises :class:`ArrayFileError` (naming the file) if it is not a readable
    zip archive or not a regular file; FileNotFoundError if it is missing.
    """
    with open_regular(path, what) as f, _open_zip(f, os.fsdecode(os.fspath(path)), what) as z:
        return [n[:-4] for n in z.namelist() if n.endswith(".npy")]


def _member_limit(info, archive_size, name, label):
    """Check the member's declared uncompressed size against what the archive allows."""
    if info.flag_bits & 0x1:
        raise ArrayFileError(f"{name}: {label} is encrypted")
    if info.compress_type == zipfile.ZIP_STORED:
        limit = info.compress_size
        if info.file_size != info.compress_size:
            raise ArrayFileError(f"{name}: {label}: stored member declares {info.file_size} "
                                 f"bytes but occupies {info.compress_size}")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        limit = info.compress_size * MAX_DEFLATE_RATIO + 64
    else:
        raise ArrayFileError(f"{name}: {label}: unsupported zip compression method "
                             f"{info.compress_type} (only stored and deflate)")
    if info.compress_size > archive_size or info.file_size > limit:
        raise ArrayFileError(f"{name}: {label} declares {info.file_size} bytes, more than "
                             f"its {info.compress_size} bytes in the archive can hold")


def load_npz(path, members, *, what="archive"):
    """Read the named arrays of an ``.npz`` file, checking every size first.

    Parameters
    ----------
    path : str or path-like
        A regular file (never a file descriptor, FIFO or device).
    members : dict
        ``{name: (dtype_kinds, ndim)}`` for every array wanted (see
        :func:`load_npy`). All must be present; other members are ignored.
    what : str
        What the file is, for messages ("checkpoint").

    Returns
    -------
    dict
        ``{name: ndarray}`` in the order of ``members``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ArrayFileError
        If the file is not a regular file or a valid zip archive, a member is
        missing, encrypted or uses an unsupported compression, its declared
        uncompressed size exceeds what its compressed bytes can hold, its
        ``.npy`` header is bad or not as ``members`` asks, the header's shape
        times the item size differs from the member's declared size, or the
        data is corrupt (CRC mismatch, bad deflate stream). Every size is
        checked before the array is allocated.
    """
    name = os.fsdecode(os.fspath(path)) if isinstance(path, (str, bytes, os.PathLike)) else path
    with open_regular(path, what) as f:
        archive_size = os.fstat(f.fileno()).st_size
        with _open_zip(f, name, what) as z:
            out = {}
            for key, (kinds, ndim) in members.items():
                label = f"{what} member {key!r}"
                try:
                    info = z.getinfo(key + ".npy")
                except KeyError:
                    have = ", ".join(sorted(n[:-4] for n in z.namelist() if n.endswith(".npy")))
                    raise ArrayFileError(f"{name}: {what} has no array {key!r} "
                                         f"(found: {have or 'none'})") from None
                _member_limit(info, archive_size, name, label)
                out[key] = _read_member(z, info, name, label, kinds, _ndims(ndim))
            return out


def _read_member(z, info, name, label, kinds, ndims):
    try:
        with z.open(info) as m:
            shape, fortran, dtype = _read_header(m, name, label)
            nbytes = _check_header(shape, dtype, name, label, kinds, ndims)
            present = info.file_size - m.tell()
            if nbytes != present:
                raise ArrayFileError(
                    f"{name}: {label}: the header declares shape {shape} of {dtype} "
                    f"({nbytes} bytes) but the member holds {present}")
            return _read_body(m, shape, fortran, dtype, nbytes, name, label)
    except ArrayFileError:
        raise
    except Exception as e:  # CRC mismatch, zlib.error, EOFError, NotImplementedError...
        raise ArrayFileError(f"{name}: {label}: corrupt data ({type(e).__name__}: {e})") from None
