"""Fuzz the Fortran model reader (pykd_load_model) with damaged files of every kind.

Small valid models of every layer kind (and a version-1 file) are mutated
with a seeded RNG: bit flips (with and without the checksum recomputed),
every header and record field set to 0, 1, 2^31 - 1, 2^31, 2^31 + 1 and
2^32 - 1, truncation at every header offset, payload bytes overwritten with
the checksum recomputed (so that each kind's content checks run), bytes
inserted and deleted, and huge declared sizes. ``tests/fortran/load_cli``
loads them all under a 2 GiB address-space limit and a timeout.

Pass: every file is accepted or rejected with PYKD_ERR_FORMAT (or _IO), the
program neither crashes nor hangs, an accepted model's arrays take at most
64 x the file size + 64 KiB (docs/format.md), and the Python reader
(pykd.modelfile.read_model) accepts exactly the same files.
"""
import os
import resource
import subprocess
import zlib

import numpy as np
import pytest

from kinds_helpers import ACTIVATIONS, KINDS, make_layer
from pykd import _codes
from pykd.modelfile import ModelFormatError, read_model
from pykd.models import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PREDICT = os.environ.get("PYKD_PREDICT_CLI") or os.path.join(
    REPO, "build", "fortran", "tests", "fortran", "predict_cli")
CLI = os.environ.get("PYKD_LOAD_CLI") or os.path.join(os.path.dirname(_PREDICT), "load_cli")

pytestmark = pytest.mark.skipif(
    not os.access(CLI, os.X_OK),
    reason=f"Fortran driver {CLI} not built: run `make test-fortran` or set PYKD_LOAD_CLI "
           "(or PYKD_PREDICT_CLI, next to which load_cli is built)",
)

F32 = np.float32
MEMORY_LIMIT = 2 << 30
SPECIAL = (0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1)
ACCEPTED = {_codes.OK, _codes.ERR_FORMAT, _codes.ERR_IO}


def _u32(data, at):
    return int.from_bytes(data[at:at + 4], "little")


def fields(data):
    """(offset, width) of every header field, record header field and the
    first u32 fields of each payload, walking a valid v1 or v2 file."""
    version = _u32(data, 8)
    out = [(at, 4) for at in (8, 12, 16, 20, 24)]
    pos = 28
    n_norms = 2 if version >= 2 else 1
    units = (_u32(data, 16), _u32(data, 20))
    for k in range(n_norms):
        code = _u32(data, pos - 4)
        size = {0: 0, 1: units[k], 2: 1}[code]
        pos += 8 * size
        out.append((pos, 4))        # out_norm, or meta_len
        pos += 4
    meta_len = _u32(data, pos - 4)
    pos += meta_len
    for _ in range(_u32(data, 12)):
        out += [(pos + 4 * i, 4) for i in range(4)]
        pos += 16
        if version >= 2:
            payload = int.from_bytes(data[pos:pos + 8], "little")
            out += [(pos, 8), (pos, 4), (pos + 4, 4)]
            pos += 8
        else:
            kind, n_in, n_out = _u32(data, pos - 16), _u32(data, pos - 8), _u32(data, pos - 4)
            payload = (4 if kind == 1 else 1) * n_in * n_out + (4 if kind == 1 else 8) * n_out
        out += [(pos + 4 * i, 4) for i in range(min(5, payload // 4))]
        pos += payload
    return out, pos


def with_crc(data):
    body = data[:-12]
    return body + zlib.crc32(body).to_bytes(4, "little") + data[-8:]


def seeds():
    """Small valid files: each kind alone and in a chain, norms, a v1 file."""
    rng = np.random.default_rng(2026)
    files = []
    for kind in KINDS:
        for static in ((False, True) if kind == "dense_int8" else (False,)):
            layers = [make_layer(kind, 9, 7, ACTIVATIONS[KINDS.index(kind)], rng, static),
                      make_layer(kind, 7, 3, "identity", rng, static)]
            m = Model(layers, norm=(rng.standard_normal(9).astype(F32), np.ones(9, F32)),
                      out_norm=(F32(1), F32(2)), metadata={"k": [kind, 1.5, None]})
            files.append(m)
    chain = [make_layer(kind, a, b, "relu", rng) for kind, a, b in
             zip(KINDS, range(14, 7, -1), range(13, 6, -1))]
    files.append(Model(chain))
    return files


def v1_file():
    u32 = lambda *v: np.array(v, "<u4").tobytes()  # noqa: E731
    body = (b"PYKDMDL\0" + u32(1, 2, 3, 2, 2) + np.array([0.5, 2], "<f4").tobytes() + u32(0)
            + u32(1, 1, 3, 4) + np.arange(16, dtype="<f4").tobytes()
            + u32(2, 2, 4, 2) + np.arange(8, dtype=np.int8).tobytes()
            + np.array([0.5, 0.25, 1, -1], "<f4").tobytes())
    return body + u32(zlib.crc32(body)) + b"PYKDEND\0"


def mutations(data, rng):
    """Damaged copies of one valid file."""
    out = []
    n = len(data)
    flds, end = fields(data)
    # Every field set to the special values, checksum recomputed.
    for at, width in flds:
        for v in SPECIAL + (int(rng.integers(0, 2**32)),):
            out.append(with_crc(data[:at] + v.to_bytes(8, "little")[:width] + data[at + width:]))
        if width == 8:
            for v in (2**62, 2**63, 2**64 - 1, n):
                out.append(with_crc(data[:at] + v.to_bytes(8, "little") + data[at + 8:]))
    # Truncation at every header offset, and at random points.
    cuts = sorted({at + d for at, w in flds for d in range(w + 1)} | set(range(0, 40)))
    out += [data[:c] for c in cuts if c < n]
    out += [data[:int(c)] for c in rng.integers(0, n, 20)]
    # Bit flips: without the checksum fixed (caught by the CRC) and with it.
    for _ in range(60):
        b = bytearray(data)
        for t in rng.integers(0, 8 * (n - 12), int(rng.integers(1, 4))):
            b[t // 8] ^= 1 << (t % 8)
        out.append(bytes(b))
        out.append(with_crc(bytes(b)))
    # Payload bytes overwritten, checksum recomputed: the kinds' content checks.
    start = flds[5][0] if len(flds) > 5 else 28
    for _ in range(60):
        b = bytearray(data)
        at = int(rng.integers(start, end))
        k = int(rng.integers(1, 9))
        b[at:at + k] = rng.integers(0, 256, len(b[at:at + k])).astype(np.uint8).tobytes()
        out.append(with_crc(bytes(b)))
    # Bytes inserted or deleted inside the body.
    for _ in range(10):
        at = int(rng.integers(8, end))
        out.append(with_crc(data[:at] + bytes(int(rng.integers(1, 9))) + data[at:]))
        out.append(with_crc(data[:at] + data[at + int(rng.integers(1, 9)):]))
    # Trailing garbage, a bad end marker, an empty file.
    out += [data + b"\0", data[:-1] + b"X", b""]
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(13)
    valid = []
    for k, m in enumerate(seeds()):
        path = root / f"seed{k}.pykd"
        m.save(path)
        valid.append(path.read_bytes())
    valid.append(v1_file())
    paths = []
    for s, data in enumerate(valid):
        for i, damaged in enumerate([data] + mutations(data, rng)):
            path = root / f"case{s:02d}_{i:04d}.pykd"
            path.write_bytes(damaged)
            paths.append(path)
    return paths


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_loader(paths, tmp_path):
    """{path: (stat, bytes)} from load_cli, in chunks; a crash or hang fails
    naming the file being loaded."""
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    chunk = 1500
    for c in range(0, len(paths), chunk):
        part = paths[c:c + chunk]
        listing = tmp_path / f"list{c}.txt"
        listing.write_text("".join(f"{p}\n" for p in part))
        try:
            proc = subprocess.run([CLI, str(listing)], capture_output=True, text=True,
                                  timeout=120, env=env, preexec_fn=_limit_memory)
        except subprocess.TimeoutExpired as e:
            done = (e.stdout or b"").decode().count("\n") if isinstance(e.stdout, bytes) \
                else (e.stdout or "").count("\n")
            pytest.fail(f"load_cli hung on {part[min(done, len(part) - 1)]}")
        lines = proc.stdout.splitlines()
        if proc.returncode != 0:
            pytest.fail(f"load_cli exited with {proc.returncode} on {part[len(lines)]}: "
                        f"{proc.stderr[-2000:]}")
        assert len(lines) == len(part)
        for line in lines:
            stat, nbytes, path = line.split(" ", 2)
            results[path] = (int(stat), int(nbytes))
    return results


def test_fortran_reader_survives_damaged_files(cases, tmp_path):
    assert len(cases) > 3000
    results = run_loader([str(p) for p in cases], tmp_path)
    assert len(results) == len(cases)
    bad = {p: r for p, r in results.items() if r[0] not in ACCEPTED}
    assert not bad, f"{len(bad)} files gave another status, e.g. {sorted(bad.items())[:5]}"
    for path, (stat, nbytes) in results.items():
        if stat == _codes.OK:
            assert nbytes <= 64 * os.path.getsize(path) + 65536, path
    n_ok = sum(stat == _codes.OK for stat, _ in results.values())
    assert 20 <= n_ok < len(cases) // 2    # the seeds load; most damage is caught

    # The Python reader accepts exactly the same files.
    differ = []
    for path, (stat, _) in results.items():
        try:
            read_model(path)
            py_ok = True
        except ModelFormatError:
            py_ok = False
        if py_ok != (stat == _codes.OK):
            differ.append((path, stat))
    assert not differ, f"{len(differ)} files judged differently by Python and Fortran: {differ[:5]}"


def test_fortran_reader_fifo_and_directory(tmp_path):
    fifo = tmp_path / "fifo.pykd"
    os.mkfifo(fifo)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{fifo}\n{tmp_path}\n/dev/zero\n")
    proc = subprocess.run([CLI, str(listing)], capture_output=True, text=True, timeout=30,
                          preexec_fn=_limit_memory)
    assert proc.returncode == 0, proc.stderr
    assert [int(line.split()[0]) for line in proc.stdout.splitlines()] == [_codes.ERR_IO] * 3


def _empty_sparse_codebook(n_in):
    """A valid-format file whose one sparse codebook layer has no non-zeros:
    its payload is 32 bytes whatever n_in, but its indptr has n_in + 1 entries."""
    u32 = lambda *v: np.array(v, "<u4").tobytes()  # noqa: E731
    payload = u32(0, 1, 1, 0, 0) + np.array([0.5, 0, 0], "<f4").tobytes()
    body = (b"PYKDMDL\0" + u32(2, 1, n_in, 2, 0, 0, 0) + u32(6, 0, n_in, 2)
            + len(payload).to_bytes(8, "little") + payload)
    return body + u32(zlib.crc32(body)) + b"PYKDEND\0"


@pytest.mark.parametrize("n_in, ok", [(1000, True), (10**8, False), (2**31 - 1, False)])
def test_decoded_size_rule_in_both_readers(tmp_path, n_in, ok):
    """A tiny file that would decode to n_in + 1 row pointers: refused, with
    no allocation, once they exceed 64 x the file size + 64 KiB."""
    path = tmp_path / "expand.pykd"
    path.write_bytes(_empty_sparse_codebook(n_in))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{path}\n")
    proc = subprocess.run([CLI, str(listing)], capture_output=True, text=True, timeout=30,
                          preexec_fn=_limit_memory)
    assert proc.returncode == 0, proc.stderr
    stat = int(proc.stdout.split()[0])
    if ok:
        assert stat == _codes.OK
        assert read_model(path)["layers"][0]["indptr"].shape == (n_in + 1,)
    else:
        assert stat == _codes.ERR_FORMAT
        with pytest.raises(ModelFormatError, match="more than the file's size allows"):
            read_model(path)
