"""pykd.io: the one atomic writer and the checked .npy/.npz readers."""

import io
import os
import re
import stat
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from pykd import io as pio
from pykd import modelfile, train
from pykd.io import ArrayFileError, atomic_write, load_npy, load_npz


def _npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npy_header(descr, shape):
    """A version 1.0 .npy header (magic, length, dict padded to 64 bytes)."""
    d = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape!r}, }}".encode()
    pad = -(10 + len(d) + 1) % 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(d) + pad + 1) + d + b" " * pad + b"\n"


def _tmp_files(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


# -------------------------------------------------------------------- writing


def test_one_atomic_writer_everywhere():
    assert train.atomic_write is pio.atomic_write
    src = open(modelfile.__file__).read()
    assert "tempfile" not in src and "_io.atomic_write(" in src


def test_atomic_write_writes_with_umask_mode_and_no_leftovers(tmp_path):
    target = tmp_path / "out.bin"
    old = os.umask(0o027)
    try:
        atomic_write(target, lambda f: f.write(b"hello"))
    finally:
        os.umask(old)
    assert target.read_bytes() == b"hello"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _tmp_files(tmp_path) == []


def test_temp_name_has_pid_and_lives_beside_the_target(tmp_path):
    seen = []

    def write(f):
        seen.extend(_tmp_files(tmp_path))
        f.write(b"x")

    atomic_write(tmp_path / "m.pykd", write)
    assert re.fullmatch(rf"\.m\.pykd\.{os.getpid()}\.[0-9a-f]+\.tmp", seen[0]), seen


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_removes_temp_and_keeps_the_old_target(tmp_path, exc):
    target = tmp_path / "keep.bin"
    target.write_bytes(b"old")

    def write(f):
        f.write(b"partial new content")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, write)
    assert target.read_bytes() == b"old"
    assert _tmp_files(tmp_path) == []


def test_a_directory_target_is_refused_before_writing(tmp_path):
    called = []
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):
        atomic_write(tmp_path, lambda f: called.append(1))
    assert not called
    with pytest.raises(TypeError):
        atomic_write(3, lambda f: None)


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no such process (reuse within the test is very unlikely)


def test_stale_temp_files_of_dead_writers_are_removed_on_save(tmp_path):
    dead = _dead_pid()
    old = time.time() - 2 * pio.STALE_TMP_SECONDS
    names = {
        "dead_old": f".t.bin.{dead}.abc123.tmp",            # removed
        "dead_new": f".t.bin.{dead}.abc124.tmp",            # too young: kept
        "alive_old": f".t.bin.{os.getppid()}.abc125.tmp",  # writer running: kept
        "other_target": f".u.bin.{dead}.abc126.tmp",       # another file's: kept
        "not_ours": ".t.bin.xyz.tmp",                       # not our naming: kept
        "fortran_dead": f"t.bin.{dead}-123456.tmp",         # pykd_save_model's: removed
        "fortran_alive": f"t.bin.{os.getppid()}-1.tmp",     # writer running: kept
    }
    for key, n in names.items():
        (tmp_path / n).write_bytes(b"junk")
        if key != "dead_new":
            os.utime(tmp_path / n, (old, old))
    atomic_write(tmp_path / "t.bin", lambda f: f.write(b"new"))
    left = set(_tmp_files(tmp_path))
    gone = {"dead_old", "fortran_dead"}
    assert left == {names[k] for k in names if k not in gone}
    assert (tmp_path / "t.bin").read_bytes() == b"new"


def test_stale_cleanup_skips_symlinks_and_directories(tmp_path):
    dead = _dead_pid()
    old = time.time() - 2 * pio.STALE_TMP_SECONDS
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / f".t.bin.{dead}.aa.tmp"
    link.symlink_to(victim)
    d = tmp_path / f".t.bin.{dead}.bb.tmp"
    d.mkdir()
    for p in (link, d):
        os.utime(p, (old, old), follow_symlinks=False)
    assert pio.remove_stale_tmp(tmp_path / "t.bin") == []
    assert victim.read_bytes() == b"precious" and link.is_symlink() and d.is_dir()


def test_modelfile_and_checkpoint_saves_go_through_it(tmp_path, monkeypatch):
    calls = []
    real = pio.atomic_write
    monkeypatch.setattr(pio, "atomic_write", lambda p, w: (calls.append(os.fspath(p)), real(p, w)))
    W = np.ones((2, 3), np.float32)
    modelfile.write_model(tmp_path / "a.pykd", [{"kind": "dense", "activation": "identity",
                                                 "W": W, "b": np.zeros(3, np.float32)}])
    assert calls == [str(tmp_path / "a.pykd")]
    assert modelfile.read_model(tmp_path / "a.pykd")["layers"][0]["W"].shape == (2, 3)


# -------------------------------------------------------------------- reading


def test_load_npy_round_trip_dtypes_and_orders(tmp_path):
    for a in (np.arange(12, dtype=np.float32).reshape(3, 4),
              np.asfortranarray(np.arange(6, dtype=">f8").reshape(2, 3)),
              np.zeros((0, 5), np.int16), np.array(7, np.uint8)):
        p = tmp_path / "a.npy"
        np.save(p, a)
        got = load_npy(p)
        assert got.dtype == a.dtype and got.shape == a.shape and got.flags.writeable
        np.testing.assert_array_equal(got, a)


def test_load_npy_refuses_wrong_kind_ndim_objects_and_pickles(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.arange(6, dtype=np.int32).reshape(2, 3))
    with pytest.raises(ArrayFileError, match=rf"^{re.escape(str(p))}: logits must be floating"):
        load_npy(p, dtype_kinds="f", what="logits")
    with pytest.raises(ArrayFileError, match="must be 1-D or 3-D, got shape \\(2, 3\\)"):
        load_npy(p, ndim=(1, 3))
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArrayFileError, match="objects"):
        load_npy(p, dtype_kinds="O")
    np.save(p, np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]))
    with pytest.raises(ArrayFileError, match="structured"):
        load_npy(p)


def test_load_npy_checks_sizes_before_allocating(tmp_path):
    p = tmp_path / "a.npy"
    data = _npy_bytes(np.zeros((4, 3), np.float32))
    p.write_bytes(data[:-1])
    with pytest.raises(ArrayFileError, match="truncated"):
        load_npy(p)
    p.write_bytes(data + b"\0")
    with pytest.raises(ArrayFileError, match="trailing"):
        load_npy(p)
    # A header claiming 2^31 x 2^31 floats: refused from the header alone.
    p.write_bytes(_npy_header("<f4", (2**31, 2**31)) + data[128:])
    with pytest.raises(ArrayFileError, match="the header declares shape"):
        load_npy(p)


def test_load_npy_refuses_npz_fifo_directory_and_fd(tmp_path):
    np.savez(tmp_path / "z.npz", a=np.zeros(2))
    with pytest.raises(ArrayFileError, match="found an .npz"):
        load_npy(tmp_path / "z.npz")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ArrayFileError, match="not a regular file"):
        load_npy(fifo)  # must not block
    with pytest.raises(ArrayFileError, match="directory"):
        load_npy(tmp_path)
    with pytest.raises(TypeError):
        load_npy(0)
    with pytest.raises(FileNotFoundError):
        load_npy(tmp_path / "missing.npy")


def test_load_npz_members_and_declared_sizes(tmp_path):
    p = tmp_path / "c.npz"
    np.savez_compressed(p, x=np.arange(10, dtype=np.float32), y=np.arange(3, dtype=np.int64),
                        extra=np.zeros(1))
    got = load_npz(p, {"x": ("f", 1), "y": ("iu", 1)}, what="checkpoint")
    np.testing.assert_array_equal(got["x"], np.arange(10, dtype=np.float32))
    np.testing.assert_array_equal(got["y"], np.arange(3))
    with pytest.raises(ArrayFileError, match=r"checkpoint has no array 'z' \(found: extra, x, y\)"):
        load_npz(p, {"z": ("f", 1)}, what="checkpoint")
    with pytest.raises(ArrayFileError, match="member 'y' must be floating"):
        load_npz(p, {"y": ("f", 1)}, what="checkpoint")


def _zip_with_declared_size(path, payload, declared, method=zipfile.ZIP_STORED):
    """A one-member zip whose local and central headers declare ``declared`` bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as z:
        z.writestr("a.npy", payload)
    data = bytearray(buf.getvalue())
    real = len(payload)
    # Patch the uncompressed size in the local header (offset 22) and central
    # directory entry (offset 24 from its signature).
    struct.pack_into("<I", data, 22, declared)
    cd = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, cd + 24, declared)
    assert struct.unpack_from("<I", bytes(buf.getvalue()), 22)[0] == real
    path.write_bytes(bytes(data))


def test_load_npz_refuses_declared_sizes_beyond_the_member(tmp_path):
    p = tmp_path / "z.npz"
    payload = _npy_bytes(np.zeros(100, np.float32))
    _zip_with_declared_size(p, payload, 2**32 - 1)
    with pytest.raises(ArrayFileError, match="declares"):
        load_npz(p, {"a": ("f", 1)})
    _zip_with_declared_size(p, payload, 2**32 - 1, zipfile.ZIP_DEFLATED)
    with pytest.raises(ArrayFileError, match="more than its"):
        load_npz(p, {"a": ("f", 1)})
    # Declared size consistent with the zip but not with the .npy header.
    bad = payload.replace(b"(100,)", b"(999,)")
    _zip_with_declared_size(p, bad, len(bad))
    with pytest.raises(ArrayFileError, match="header declares shape \\(999,\\)"):
        load_npz(p, {"a": ("f", 1)})


def test_load_npz_crc_mismatch_is_an_array_file_error(tmp_path):
    p = tmp_path / "z.npz"
    np.savez(p, a=np.arange(50, dtype=np.float32))
    data = bytearray(p.read_bytes())
    data[200] ^= 0xFF  # inside the stored array data
    p.write_bytes(bytes(data))
    with pytest.raises(ArrayFileError, match=rf"^{re.escape(str(p))}: .*corrupt"):
        load_npz(p, {"a": ("f", 1)})


@pytest.mark.parametrize("version, width", [(1, 2), (2, 4)])
def test_header_length_is_checked_before_the_header_is_read(tmp_path, version, width):
    """numpy's read_array_header_* reads a declared 4 GiB header before checking
    max_header_size; load_npy must refuse it from the length field alone."""
    import tracemalloc

    p = tmp_path / "a.npy"
    hlen = 2 ** (8 * width) - 1  # 65535 or 2^32 - 1 bytes of header
    p.write_bytes(b"\x93NUMPY" + bytes([version, 0]) + hlen.to_bytes(width, "little")
                  + b"{" * 70000)
    tracemalloc.start()
    try:
        with pytest.raises(ArrayFileError, match=f"a header of {hlen} bytes"):
            load_npy(p)
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()
    p.write_bytes(b"\x93NUMPY\x03\x00" + b"\0" * 100)
    with pytest.raises(ArrayFileError, match="unsupported .npy format version 3.0"):
        load_npy(p)


def test_an_allocation_failure_is_a_file_error(tmp_path, monkeypatch):
    from pykd import data

    np.save(tmp_path / "a.npy", np.zeros(3, np.float32))
    idx = tmp_path / "i"
    idx.write_bytes(b"\0\0\x08\x01" + (3).to_bytes(4, "big") + b"abc")

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(np, "empty", no_memory)
    with pytest.raises(ArrayFileError, match=r"a\.npy: array: cannot allocate 12 bytes"):
        load_npy(tmp_path / "a.npy")
    with pytest.raises(data.DatasetError, match=r"i: cannot allocate 3 bytes"):
        data.read_idx(idx)
