"""Fuzz every file reader other than the model file's (tests/test_fuzz_models.py).

Readers and their documented errors:

* checkpoints (``.ckpt.npz`` written by :func:`pykd.train.fit`):
  :func:`pykd.train.load_checkpoint`, ``CheckpointError``;
* teacher logits (``.npy``): :func:`pykd.io.load_npy` as the CLI calls it,
  ``ArrayFileError`` (and every 8th case through ``cli._load_logits``,
  ``CLIError``);
* IDX datasets, raw and gzip: :func:`pykd.data.read_idx`, ``DatasetError``;
* ``.npz`` datasets, stored and deflated: :func:`pykd.data.load_dataset`,
  ``DatasetError``.

Pass means: each case is accepted (and the result is what the reader
promises) or rejected with that error, whose message names the file; no other
exception, no hang (a 10 s alarm per case), and no allocation beyond what the
file allows: peak traced memory at most 64 times the file size, plus 8 times
the size a compressed stream declares when that size is within what its
compressed bytes can hold (deflate: 1032:1), plus 1 MiB.

Mutations: bit flips; every fixed-width header field (.npy magic, version and
header length, IDX type, rank and dimensions, gzip trailer, zip local and
central headers and end record) set to 0, 1, 2^31 +- 1, 2^32 - 1 and
neighbours of its value; .npy header dicts with special shapes, dtypes and
malformed text; truncation at every header offset; payloads changed with the
checksums recomputed (members re-zipped, streams re-gzipped) so that the
checks behind the CRC are reached; huge declared sizes made consistent with
every other field. Every case is seeded; ``PYKD_FUZZ_SCALE=N`` runs N times
as many random cases.
"""

import collections
import gzip
import io
import os
import pathlib
import shutil
import signal
import struct
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from pykd import cli, data, train
from pykd import io as pio
from pykd.data import DatasetError
from pykd.io import ArrayFileError
from pykd.models import MLP
from pykd.train import CheckpointError

F32 = np.float32
SCALE = max(1, int(os.environ.get("PYKD_FUZZ_SCALE", "1")))
SPECIAL_U32 = (0, 1, 2, 255, 256, 2**16 - 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1)
SPECIAL_DIMS = (0, 1, 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**40, 2**63 - 1, 2**64)
DESCRS = ("<f4", ">f4", "<f8", "<f2", "<i4", "|u1", "|b1", "<c8", "|O", "<U4", "|S3", "|V4",
          "[('a', '<f4')]", "('<f4', (2,))", "'<f4'", "<M8[s]", "xyz", "")
BAD_HEADERS = (b"", b"{}", b"[1, 2]", b"{'descr': '<f4'}", b"(" * 300, b"{" * 300,
               b"{'descr': '<f4', 'fortran_order': 1, 'shape': (2,)}",
               b"{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
               b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}",
               b"{'descr': '<f4', 'fortran_order': False, 'shape': (2.5,)}",
               b"{'descr': '<f4', 'fortran_order': False, 'shape': 2}",
               b"{'descr': '<f4', 'fortran_order': False, 'shape': (" + b"1, " * 2000 + b")}",
               b"\xff\xfe\x00", b"__import__('os')")
MAX_DEFLATE = pio.MAX_DEFLATE_RATIO
CASE_SECONDS = 10
CASES = collections.Counter()  # cases run, by reader (the file name), for the summary


# --------------------------------------------------------------------------
# Building and taking apart the formats


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def npy_header_end(b):
    return 10 + int.from_bytes(b[8:10], "little")


def npy_with_header(text, body, version=1):
    """An .npy file with the header dict ``text`` (bytes, any content) and ``body``."""
    if version == 1:
        pad = -(10 + len(text) + 1) % 64
        return (b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) + pad + 1) + text
                + b" " * pad + b"\n" + body)
    pad = -(12 + len(text) + 1) % 64
    return (b"\x93NUMPY\x02\x00" + struct.pack("<I", len(text) + pad + 1) + text
            + b" " * pad + b"\n" + body)


def header_text(descr, shape, fortran=False):
    d = descr if descr.startswith(("[", "(", "'")) or not descr else repr(descr)
    return (f"{{'descr': {d or repr('')}, 'fortran_order': {fortran}, "
            f"'shape': {shape!r}, }}").encode()


def zip_of(members, method):
    """A zip of ``{name: bytes}`` as np.savez (stored) or savez_compressed (deflated) writes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as z:
        for name, b in members.items():
            z.writestr(name, b)
    return buf.getvalue()


def zip_members(b):
    with zipfile.ZipFile(io.BytesIO(b)) as z:
        return {n: z.read(n) for n in z.namelist()}


def zip_starts(b, signature):
    out, o = [], 0
    while (o := b.find(signature, o)) >= 0:
        out.append(o)
        o += 4
    return out


def zip_fields(b):
    """Every fixed-width field of a zip's local headers, central directory and end record."""
    fields = []
    o = 0
    while (o := b.find(b"PK\x03\x04", o)) >= 0:
        fields += [(o + off, w, f"local@{o}+{off}") for off, w in
                   ((4, 2), (6, 2), (8, 2), (14, 4), (18, 4), (22, 4), (26, 2), (28, 2))]
        o += 4
    o = 0
    while (o := b.find(b"PK\x01\x02", o)) >= 0:
        fields += [(o + off, w, f"central@{o}+{off}") for off, w in
                   ((10, 2), (16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (32, 2), (42, 4))]
        o += 4
    e = b.rfind(b"PK\x05\x06")
    fields += [(e + off, w, f"end+{off}") for off, w in ((8, 2), (10, 2), (12, 4), (16, 4), (20, 2))]
    return fields


def idx_bytes(a):
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    head = bytes([0, 0, codes[a.dtype], a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape)
    return head + a.astype(a.dtype.newbyteorder(">")).tobytes()


def gz(b):
    return gzip.compress(b, mtime=0)


def set_bytes(b, offset, raw):
    b = bytearray(b)
    b[offset:offset + len(raw)] = raw
    return bytes(b)


def set_field(b, offset, width, value, big=False):
    return set_bytes(b, offset, value.to_bytes(width, "big" if big else "little"))


def flip_bits(b, rng, n):
    b = bytearray(b)
    for _ in range(n):
        bit = int(rng.integers(0, 8 * len(b)))
        b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def field_values(old, width):
    values = {v for v in SPECIAL_U32 if v < 1 << (8 * width)}
    values |= {max(old - 1, 0), min(old + 1, (1 << 8 * width) - 1), min(old * 2, (1 << 8 * width) - 1)}
    values.discard(old)
    return sorted(values)


# --------------------------------------------------------------------------
# Declared sizes (for the memory bound) and the case runner


def declared_size(b):
    """What a compressed file may make the reader allocate: the sizes its
    streams declare, where those are within what their bytes can hold."""
    if b[:2] == b"\x1f\x8b" and len(b) >= 18:
        isize = int.from_bytes(b[-4:], "little")
        return isize if isize <= MAX_DEFLATE * len(b) else 0
    if b[:2] == b"PK":
        total = 0
        try:
            with zipfile.ZipFile(io.BytesIO(b)) as z:
                for info in z.infolist():
                    if info.file_size <= MAX_DEFLATE * info.compress_size + 64:
                        total += info.file_size
        except Exception:  # noqa: BLE001 - a broken zip declares nothing usable
            return 0
        return total
    return 0


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout(f"case took more than {CASE_SECONDS} s")


class Runner:
    """Runs one case in-process: the bytes go to a file, the reader reads it."""

    def __init__(self, path, read, error, check, alt=None):
        self.path, self.read, self.error, self.check = path, read, error, check
        self.alt = alt  # (every, read, error): another entry point, every n-th case
        self.timeout = CASE_SECONDS
        self.cases = 0
        self.outcomes = {"accepted": 0, "rejected": 0}

    def __call__(self, b, what):
        self.cases += 1
        CASES[self.path.name] += 1
        read, error = self.read, self.error
        if self.alt and self.cases % self.alt[0] == 0:
            read, error = self.alt[1], self.alt[2]
        self.path.write_bytes(b)
        declared = declared_size(b)
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            result = read(self.path)
        except error as e:
            assert str(self.path) in str(e), (what, str(e))
            self.outcomes["rejected"] += 1
            result = None
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        peak = tracemalloc.get_traced_memory()[1] - before
        limit = 64 * len(b) + 8 * declared + 2**20
        assert peak <= limit, f"{what}: peak {peak} bytes > {limit}"
        if result is not None:
            self.check(result)
            self.outcomes["accepted"] += 1


@pytest.fixture
def tracing():
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------
# The readers


def _check_checkpoint(result):
    arrays, meta = result
    assert isinstance(meta, dict)
    for k in ("params", "state1", "state2"):
        assert arrays[k].dtype == F32 and arrays[k].ndim == 1


def _check_logits(a):
    assert isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.ndim == 2


def _check_idx(a):
    assert isinstance(a, np.ndarray) and a.flags.c_contiguous and a.flags.writeable
    assert a.dtype.isnative and a.ndim >= 1


def _check_dataset(ds):
    assert isinstance(ds, data.Dataset)
    for X, y in ((ds.X_train, ds.y_train), (ds.X_test, ds.y_test)):
        assert X.dtype == F32 and X.ndim == 2 and y.dtype == np.int64 and y.shape == X.shape[:1]
        assert np.isfinite(X).all() and (y >= 0).all()


LOGITS_SHAPE = (6, 4)


def _read_logits(path):
    return pio.load_npy(path, dtype_kinds="f", ndim=2, what="teacher logits")


READERS = {
    "checkpoint": lambda p: Runner(p / "run.ckpt.npz", train.load_checkpoint, CheckpointError,
                                   _check_checkpoint),
    "logits": lambda p: Runner(p / "teacher.npy", _read_logits, ArrayFileError, _check_logits,
                               alt=(8, lambda q: cli._load_logits(q, *LOGITS_SHAPE), cli.CLIError)),
    "idx": lambda p: Runner(p / "train-images-idx3-ubyte", data.read_idx, DatasetError, _check_idx),
    "npz_dataset": lambda p: Runner(p / "data.npz", data.load_dataset, DatasetError,
                                    _check_dataset),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Valid files of every reader, as the package (or numpy) writes them."""
    d = tmp_path_factory.mktemp("fuzz_file_bases")
    rng = np.random.default_rng(13)
    X = rng.standard_normal((24, 5)).astype(F32)
    y = rng.integers(0, 3, 24)
    ckpt = d / "run.ckpt.npz"
    # A real checkpoint from train.py's checkpoint code: fit, interrupted by nothing.
    train.fit(MLP([5, 4, 3], seed=1), X, y, epochs=1, batch_size=8, checkpoint=ckpt,
              progress=False)
    logits = rng.standard_normal(LOGITS_SHAPE).astype(F32)
    images = rng.integers(0, 256, (5, 4, 3)).astype(np.uint8)
    npz = {"X_train": images[:3], "y_train": np.array([0, 2, 1]), "X_test": images[3:],
           "y_test": np.array([1, 1])}
    out = {
        "checkpoint": ckpt.read_bytes(),
        "logits": npy_bytes(logits),
        "logits_v2": npy_with_header(header_text("<f4", LOGITS_SHAPE), logits.tobytes(), 2),
        "idx_images": idx_bytes(images),
        "idx_labels": idx_bytes(np.array([1, 0, 2, 2, 1], np.uint8)),
        "idx_float": idx_bytes(rng.standard_normal((3, 2)).astype(np.float32)),
    }
    buf = io.BytesIO()
    np.savez(buf, **npz)
    out["npz_stored"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez_compressed(buf, **npz)
    out["npz_deflated"] = buf.getvalue()
    for name in ("idx_images", "idx_labels", "idx_float"):
        out[name + ".gz"] = gz(out[name])
    for name, b in out.items():  # every base is valid for its reader
        runner = READERS[reader_of(name)](d)
        runner(b, f"base {name}")
        assert runner.outcomes == {"accepted": 1, "rejected": 0}, name
    return out


def reader_of(name):
    return {"checkpoint": "checkpoint", "logits": "logits", "logits_v2": "logits",
            "npz_stored": "npz_dataset", "npz_deflated": "npz_dataset"}.get(name, "idx")


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory):
    """Where the cases are written: a directory in /dev/shm when there is one
    (a write there costs 0.1 ms, 1.5 ms on a disk-backed /tmp), else tmp."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        import tempfile
        d = tempfile.mkdtemp(prefix="pykd-fuzz-", dir=shm)
        yield pathlib.Path(d)
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("fuzz_cases")
    print(f"\nfile fuzz cases: {sum(CASES.values())} ({dict(CASES)})")


@pytest.fixture
def runner_for(case_dir, tracing):
    return lambda name: READERS[reader_of(name)](case_dir)


ALL = ["checkpoint", "logits", "logits_v2", "idx_images", "idx_labels", "idx_float",
       "idx_images.gz", "idx_labels.gz", "idx_float.gz", "npz_stored", "npz_deflated"]
ZIPS = ["checkpoint", "npz_stored", "npz_deflated"]


# --------------------------------------------------------------------------
# Mutations of the bytes as they arrive


@pytest.mark.parametrize("name", ALL)
def test_bit_flips(bases, runner_for, name):
    b, run = bases[name], runner_for(name)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for case in range(120 * SCALE):
        run(flip_bits(b, rng, 1 + case % 3), f"{name}: bit flips, case {case}")
    assert run.outcomes["rejected"] > 0


@pytest.mark.parametrize("name", ALL)
def test_truncation_at_every_header_offset(bases, runner_for, name):
    b, run = bases[name], runner_for(name)
    if name.startswith("logits"):
        head = npy_header_end(b) if name == "logits" else 12 + int.from_bytes(b[8:12], "little")
    elif name.startswith("idx"):
        head = 64 if name.endswith(".gz") else 4 + 4 * b[3]
    else:
        head = min(len(b), 200)
    cuts = set(range(0, min(head + 16, len(b))))
    cuts |= set(range(max(len(b) - 64, 0), len(b)))  # gzip trailer, zip central directory
    if name in ZIPS:
        for off, w, _ in zip_fields(b):
            cuts |= set(range(off - 1, off + w + 1))
    for cut in sorted(c for c in cuts if 0 <= c < len(b)):
        run(b[:cut], f"{name}: truncated at {cut}")
    assert run.outcomes["accepted"] == 0


@pytest.mark.parametrize("name", ["logits", "logits_v2"])
def test_npy_fixed_fields(bases, runner_for, name):
    b, run = bases[name], runner_for(name)
    width = 2 if name == "logits" else 4
    for off, w in [(i, 1) for i in range(8)] + [(8, width)]:
        old = int.from_bytes(b[off:off + w], "little")
        for v in field_values(old, w):
            run(set_field(b, off, w, v), f"{name}: byte field {off} = {v} (was {old})")


@pytest.mark.parametrize("name", ["logits", "logits_v2"])
def test_npy_header_dicts(bases, runner_for, name):
    """Special shapes and dtypes, for every body length that can matter."""
    run = runner_for(name)
    version = 1 if name == "logits" else 2
    body = bases[name][-4 * 24:]
    n, c = LOGITS_SHAPE
    shapes = [(n, c), (c, n), (n * c,), (n, c, 1), (), (0, c), (n, 0), (0, 0)]
    shapes += [(v, c) for v in SPECIAL_DIMS] + [(n, v) for v in SPECIAL_DIMS]
    shapes += [(2**31, 2**31), (2**32 - 1, 2**32 - 1), (2**21,) * 3, (1,) * 64]
    for descr in DESCRS:
        for shape in shapes:
            for fortran in (False, True) if descr == "<f4" else (False,):
                text = header_text(descr, shape, fortran)
                run(npy_with_header(text, body, version), f"{name}: {descr} {shape} F={fortran}")
    for text in BAD_HEADERS:
        run(npy_with_header(text, body, version), f"{name}: header {text[:30]!r}")
    # Every shape whose size equals the body is accepted (if the dtype is a float).
    assert run.outcomes["accepted"] >= 4


@pytest.mark.parametrize("name", ["idx_images", "idx_labels", "idx_float"])
def test_idx_fixed_fields(bases, runner_for, name):
    """Type code, rank and every dimension, raw and gzip-compressed (valid CRC)."""
    raw = bases[name]
    run = runner_for(name)
    ndim = raw[3]
    fields = [(i, 1) for i in range(4)] + [(4 + 4 * k, 4) for k in range(ndim)]
    for off, w in fields:
        old = int.from_bytes(raw[off:off + w], "big")
        for v in field_values(old, w):
            m = set_field(raw, off, w, v, big=True)
            run(m, f"{name}: field {off} = {v} (was {old})")
            run(gz(m), f"{name}.gz: field {off} = {v} (was {old})")
    # Only a type code of the same item size (uint8 <-> int8) can still be valid.
    assert run.outcomes["accepted"] <= 2 and run.outcomes["rejected"] > 0


@pytest.mark.parametrize("name", ["idx_images.gz", "idx_labels.gz", "idx_float.gz"])
def test_gzip_container_fields(bases, runner_for, name):
    """The gzip header bytes and the CRC / ISIZE trailer set to special values."""
    b, run = bases[name], runner_for(name)
    fields = [(i, 1) for i in range(10)] + [(len(b) - 8, 4), (len(b) - 4, 4)]
    for off, w in fields:
        old = int.from_bytes(b[off:off + w], "little")
        for v in field_values(old, w):
            run(set_field(b, off, w, v), f"{name}: byte {off} = {v} (was {old})")


def test_gzip_idx_claiming_huge_counts_does_not_allocate(runner_for):
    """A header claiming 2^32 - 1 images (or 2^31 + 1 x 2^16 ...) in a small
    gzip file, with the gzip trailer's ISIZE made to agree modulo 2^32."""
    run = runner_for("idx_images.gz")
    images = np.zeros((3, 28, 28), np.uint8)
    raw = idx_bytes(images)
    for dims in [(2**32 - 1, 28, 28), (2**31 + 1, 28, 28), (2**31 - 1, 1, 1), (1, 2**16, 2**16),
                 (2**20, 28, 28), (2**16, 28, 28), (3, 28, 28 * 1000)]:
        head = raw[:4] + b"".join(struct.pack(">I", d) for d in dims)
        for body in (raw[16:], bytes(2**16)):
            stream = gz(head + body)
            declared = (16 + int(np.prod(dims, dtype=object))) % 2**32
            run(set_field(stream, len(stream) - 4, 4, declared), f"dims {dims}, ISIZE agreeing")
            run(stream, f"dims {dims}, true ISIZE")
    assert run.outcomes["accepted"] == 0


def test_gzip_multi_member_and_bomb(runner_for):
    run = runner_for("idx_images.gz")
    raw = idx_bytes(np.arange(60, dtype=np.uint8).reshape(5, 3, 4))
    run(gz(raw[:20]) + gz(raw[20:]), "two members")  # valid: ISIZE is the last member's
    assert run.outcomes["accepted"] == 1
    # 64 MiB of zeros in ~64 KiB, under a header that wants 1 byte: rejected,
    # decompressed in chunks (never held in memory).
    bomb = gz(raw[:4] + struct.pack(">III", 1, 1, 1) + bytes(1 + (64 << 20)))
    run(bomb, "gzip bomb after a small header")
    assert run.outcomes["rejected"] == 1


@pytest.mark.parametrize("name", ZIPS)
def test_zip_fixed_fields(bases, runner_for, name):
    b, run = bases[name], runner_for(name)
    for off, w, field in zip_fields(b):
        old = int.from_bytes(b[off:off + w], "little")
        values = field_values(old, w)
        if w == 2:  # versions, flags, lengths, counts: the values that mean something
            values = [v for v in values if v in (0, 1, 8, 255, 2**16 - 1) or abs(v - old) <= 1]
        for v in values:
            run(set_field(b, off, w, v), f"{name}: {field} = {v} (was {old})")


@pytest.mark.parametrize("name", ZIPS)
def test_members_mutated_and_rezipped(bases, runner_for, name):
    """Member .npy headers and bodies changed, then re-zipped with valid CRCs
    (and the same compression), so the checks behind the CRC are reached."""
    b, run = bases[name], runner_for(name)
    method = zipfile.ZIP_DEFLATED if name == "npz_deflated" else zipfile.ZIP_STORED
    members = zip_members(b)
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    for member, mb in members.items():
        end = npy_header_end(mb)
        body = mb[end:]

        def rezip(new, what):
            run(zip_of({**members, member: new}, method), f"{name}: {member}: {what}")

        descr = "'|u1'" if b"|u1" in mb[:end] else ("'<f4'" if b"<f4" in mb[:end] else "'<i8'")
        for shape in [(0,), (1,), (len(body),), (2**31 - 1,), (2**31 + 1,), (2**32 - 1,),
                      (2**62,), (2**31, 2**31), (1, 1, 1), ()]:
            rezip(npy_with_header(header_text(descr.strip("'"), shape), body), f"shape {shape}")
        for d in DESCRS[::2]:  # every dtype is tried on the .npy reader itself
            rezip(npy_with_header(header_text(d, (1,)), body[:8]), f"descr {d}")
        for text in BAD_HEADERS[::2]:
            rezip(npy_with_header(text, body), f"header {text[:30]!r}")
        # Cuts at the magic, version, length and end of the header, and every
        # 9th byte between (each offset of the .npy header is cut in the
        # logits tests, through the same reader).
        for cut in sorted({0, 5, 6, 7, 8, 9, 10, 11, end - 1, end, end + 1} | set(range(0, end, 9))):
            rezip(mb[:cut], f"cut at {cut}")
        for case in range(10 * SCALE):
            rezip(flip_bits(mb, rng, 1 + case % 3), f"bit flips {case}")
        rezip(mb + b"\0" * 4, "trailing bytes")
    # A member missing, an extra one, a pickle in its place.
    first = next(iter(members))
    run(zip_of({k: v for k, v in members.items() if k != first}, method), f"{name}: no {first}")
    run(zip_of({**members, "extra.npy": npy_bytes(np.zeros(3))}, method), f"{name}: extra member")
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    run(zip_of({**members, first: buf.getvalue()}, method), f"{name}: pickled {first}")
    assert run.outcomes["rejected"] > 0 and run.outcomes["accepted"] > 0


@pytest.mark.parametrize("name", ZIPS)
def test_huge_declared_member_sizes(bases, runner_for, name):
    """A member's uncompressed size (local and central) set huge, with and
    without the compressed size raised to match (stored members)."""
    b, run = bases[name], runner_for(name)
    starts, cd = zip_starts(b, b"PK\x03\x04"), zip_starts(b, b"PK\x01\x02")
    for k, (lo, co) in enumerate(zip(starts, cd)):
        for v in (2**20, 2**31 - 1, 2**31 + 1, 2**32 - 2, 2**32 - 1):
            m = set_field(set_field(b, lo + 22, 4, v), co + 24, 4, v)
            run(m, f"{name}: member {k} file_size = {v}")
            m = set_field(set_field(m, lo + 18, 4, v), co + 20, 4, v)
            run(m, f"{name}: member {k} file_size = compress_size = {v}")
    assert run.outcomes["accepted"] == 0


def test_checkpoint_metadata_json(bases, runner_for):
    run = runner_for("checkpoint")
    members = zip_members(bases["checkpoint"])
    for meta in (b"[" * 100000, b'{"a": ' + b"1" * 5000 + b"}", b'{"a": NaN}', b"\xc3\x28",
                 b"null", b"[]", b'"x"', b"{}", b'{"format": "pykd-checkpoint"}', b"",
                 b'{"format": "pykd-checkpoint", "version": 1e999}'):
        blob = npy_bytes(np.frombuffer(meta, np.uint8))
        run(zip_of({**members, "meta.npy": blob}, zipfile.ZIP_STORED), f"meta {meta[:20]!r}")
    assert run.outcomes["accepted"] == 0


def test_not_regular_files(tmp_path, tracing):
    """A FIFO, a directory and a missing file, for every reader: no hang."""
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    for read, error in ((train.load_checkpoint, CheckpointError), (_read_logits, ArrayFileError),
                        (data.read_idx, DatasetError)):
        for p in (fifo, tmp_path):
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                with pytest.raises(error, match=str(p)):
                    read(p)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        with pytest.raises(FileNotFoundError):
            read(tmp_path / "missing")


def test_the_runner_catches_other_exceptions_large_allocations_and_hangs(tmp_path, tracing):
    def allocates(path):
        return np.ones(64 * path.stat().st_size + 2**21, np.uint8)

    run = Runner(tmp_path / "f", allocates, DatasetError, lambda r: None)
    with pytest.raises(AssertionError, match="peak"):
        run(b"abc", "allocates")
    run = Runner(tmp_path / "f", lambda p: {}[0], DatasetError, lambda r: None)
    with pytest.raises(pytest.fail.Exception, match="KeyError"):
        run(b"abc", "raises KeyError")
    run = Runner(tmp_path / "f", lambda p: time.sleep(5), DatasetError, lambda r: None)
    run.timeout = 0.2
    with pytest.raises(pytest.fail.Exception, match="CaseTimeout"):
        run(b"abc", "hangs")
