"""Fuzz the Python model reader with seeded mutations of valid files of every kind.

Pass means: ``read_model`` returns a valid model (its layers, norms and
metadata pass the writer's own checks) or raises ``ModelFormatError``
naming the file; no other exception, and no allocation beyond the
decoded-size rule (peak traced memory per case at most 64 times the file's
size plus 1 MiB).

Mutations: bit flips (with and without the CRC recomputed), every header,
record and kind field set to 0, 1, 2^31 +- 1, 2^32 - 1 and neighbours of
its value, payload_bytes set to huge values, truncation at every offset of
the header and record headers, payload bytes overwritten (NaN, inf, 0x80,
random) with the CRC recomputed so that content validation is exercised,
and bytes inserted or deleted. Every case is seeded by its number.
``PYKD_FUZZ_SCALE=N`` runs N times as many random cases (for long runs).
"""

import os
import struct
import signal
import tracemalloc
import zlib

import numpy as np
import pytest

from pykd import _bits, modelfile
from pykd.modelfile import ModelFormatError, read_model, write_model

F32 = np.float32
KIND_FIXED_FIELDS = {1: 0, 2: 1, 3: 2, 4: 1, 5: 2, 6: 5}  # u32 fields at the payload start
SPECIAL_U32 = (0, 1, 2, 8, 256, 257, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1)
SPECIAL_U64 = (0, 1, 2**31 - 1, 2**32 - 1, 2**32, 2**62 - 1, 2**62, 2**63, 2**64 - 1)
SCALE = max(1, int(os.environ.get("PYKD_FUZZ_SCALE", "1")))
NASTY_BYTES = (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\x80",
               b"\xff", b"\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80")


# --------------------------------------------------------------------------
# Valid base files


def _csr(n_in, n_out, rng, density):
    mask = rng.random((n_in, n_out)) < density
    return (np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32),
            np.nonzero(mask)[1].astype(np.int32))


def _layer(kind, n_in, n_out, rng, act="relu", **kw):
    b = rng.standard_normal(n_out).astype(F32)
    if kind == "dense":
        return {"kind": kind, "activation": act, "b": b,
                "W": rng.standard_normal((n_in, n_out)).astype(F32)}
    if kind == "dense_int8":
        return {"kind": kind, "activation": act, "b": b, "x_scale": kw.get("x_scale"),
                "q": rng.integers(-127, 128, (n_in, n_out)).astype(np.int8),
                "scale": rng.uniform(0, 1, n_out).astype(F32)}
    if kind == "low_rank":
        r = kw.get("rank", 2)
        return {"kind": kind, "activation": act, "b": b,
                "U": rng.standard_normal((n_in, r)).astype(F32),
                "V": rng.standard_normal((r, n_out)).astype(F32)}
    if kind == "codebook":
        n_codes = kw.get("n_codes", 3)
        bits = modelfile.codebook_bits(n_codes)
        idx = rng.integers(0, n_codes, n_in * n_out).astype(np.uint8)
        return {"kind": kind, "activation": act, "b": b, "n_in": n_in, "bits": bits,
                "centroids": rng.standard_normal(n_codes).astype(F32),
                "packed": _bits.pack(idx, bits)}
    indptr, indices = _csr(n_in, n_out, rng, kw.get("density", 0.4))
    layer = {"kind": kind, "activation": act, "b": b, "indptr": indptr, "indices": indices}
    if kind == "sparse_csr":
        layer["values"] = rng.standard_normal(indices.size).astype(F32)
    else:
        n_codes = kw.get("n_codes", 6)
        layer["centroids"] = rng.standard_normal(n_codes).astype(F32)
        layer["codes"] = rng.integers(0, n_codes, indices.size).astype(np.uint8)
    return layer


def _v1_file(rng):
    """dense 3 -> 4 (tanh), dense_int8 4 -> 2, scalar norm: a version 1 file."""
    W, b1 = rng.standard_normal((3, 4)).astype(F32), rng.standard_normal(4).astype(F32)
    q = rng.integers(-127, 128, (4, 2)).astype(np.int8)
    scale, b2 = rng.uniform(0, 1, 2).astype(F32), rng.standard_normal(2).astype(F32)
    body = b"PYKDMDL\0" + struct.pack("<5I", 1, 2, 3, 2, 2) + struct.pack("<2f", 0.5, 2.0)
    body += struct.pack("<I", 8) + b'{"v": 1}'
    body += struct.pack("<4I", 1, 2, 3, 4) + W.tobytes() + b1.tobytes()
    body += struct.pack("<4I", 2, 0, 4, 2) + q.tobytes() + scale.tobytes() + b2.tobytes()
    return body + struct.pack("<I", zlib.crc32(body)) + b"PYKDEND\0"


def _base_models():
    rng = np.random.default_rng(2024)
    pf = (np.linspace(-1, 1, 3, dtype=F32), np.linspace(1, 2, 3, dtype=F32))
    return {
        "dense": ([_layer("dense", 3, 4, rng, "gelu"), _layer("dense", 4, 2, rng, "identity")],
                  {"norm": pf, "out_norm": (F32(1), F32(3)), "metadata": {"a": [1, 2]}}),
        "dense_int8": ([_layer("dense_int8", 3, 4, rng, x_scale=F32(0.05)),
                        _layer("dense_int8", 4, 2, rng, "silu")],
                       {"norm": (F32(0), F32(2))}),
        "sparse_csr": ([_layer("sparse_csr", 3, 260, rng, density=0.02),
                        _layer("sparse_csr", 260, 2, rng, "tanh", density=0.05)],
                       {"out_norm": (np.zeros(2, F32), np.ones(2, F32))}),
        "low_rank": ([_layer("low_rank", 3, 5, rng, "sigmoid"),
                      _layer("low_rank", 5, 2, rng, rank=1)], {}),
        "codebook": ([_layer("codebook", 3, 5, rng, n_codes=3),
                      _layer("codebook", 5, 3, rng, n_codes=1),
                      _layer("codebook", 3, 2, rng, n_codes=9)], {"norm": pf}),
        "sparse_codebook": ([_layer("sparse_codebook", 3, 7, rng, n_codes=6),
                             _layer("sparse_codebook", 7, 4, rng, n_codes=2, density=1.0),
                             _layer("sparse_codebook", 4, 2, rng, n_codes=200, density=0.3)],
                            {"metadata": {"k": "v"}}),
        "zoo": ([_layer("dense", 3, 4, rng), _layer("sparse_csr", 4, 6, rng),
                 _layer("sparse_codebook", 6, 5, rng), _layer("low_rank", 5, 4, rng),
                 _layer("codebook", 4, 3, rng, n_codes=4), _layer("dense_int8", 3, 2, rng)],
                {"norm": pf, "out_norm": (F32(-1), F32(0.5))}),
    }


def _locate(data):
    """Offsets of every fixed-width field of a valid file: [(offset, width, name)],
    the payload ranges and the end of the header."""
    u32 = lambda o: int.from_bytes(data[o : o + 4], "little")  # noqa: E731
    version, n_layers, n_features, n_outputs = (u32(o) for o in (8, 12, 16, 20))
    fields = [(o, 4, n) for o, n in ((8, "version"), (12, "n_layers"), (16, "n_features"),
                                     (20, "n_outputs"), (24, "in_norm"))]
    norm_size = {0: 0, 1: 8 * n_features, 2: 8}
    pos = 28 + norm_size[u32(24)]
    if version == 2:
        fields.append((pos, 4, "out_norm"))
        pos += 4 + {0: 0, 1: 8 * n_outputs, 2: 8}[u32(pos)]
    fields.append((pos, 4, "meta_len"))
    pos += 4 + u32(pos)
    header_end, payloads = pos, []
    for k in range(1, n_layers + 1):
        kind, n_in, n_out = u32(pos), u32(pos + 8), u32(pos + 12)
        fields += [(pos + 4 * i, 4, f"layer {k} {n}")
                   for i, n in enumerate(("kind", "activation", "n_in", "n_out"))]
        if version == 2:
            fields.append((pos + 16, 8, f"layer {k} payload_bytes"))
            start = pos + 24
            end = start + int.from_bytes(data[pos + 16 : pos + 24], "little")
            fields += [(start + 4 * i, 4, f"layer {k} field {i}")
                       for i in range(KIND_FIXED_FIELDS[kind])]
        else:
            start = pos + 16
            end = start + (4 if kind == 1 else 1) * n_in * n_out + (4 if kind == 1 else 8) * n_out
        payloads.append((start, end))
        pos = end
    assert pos == len(data) - 12
    return fields, payloads, header_end


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_bases")
    out = {}
    for name, (layers, kw) in _base_models().items():
        write_model(d / f"{name}.pykd", layers, **kw)
        out[name] = (d / f"{name}.pykd").read_bytes()
    out["v1"] = _v1_file(np.random.default_rng(1))
    for name, data in out.items():
        read_model_ok = _read_bytes(d / "check.pykd", data)
        assert read_model_ok["version"] == (1 if name == "v1" else 2), name
    return {name: (data, *_locate(data)) for name, data in out.items()}


def _read_bytes(path, data):
    path.write_bytes(data)
    return read_model(path)


# --------------------------------------------------------------------------
# Running cases


def _with_crc(body):
    """``body`` (the file without its 12-byte trailer) with a fresh valid trailer."""
    return body + struct.pack("<I", zlib.crc32(body)) + b"PYKDEND\0"


def _fixed(data):
    return _with_crc(data[:-12])


def _set(data, offset, raw):
    data = bytearray(data)
    data[offset : offset + len(raw)] = raw
    return bytes(data)


def _assert_valid(model):
    """An accepted file must be a model the writer accepts as it is."""
    layers = modelfile._check_layers(model["layers"])
    modelfile._check_norm(model["norm"], layers[0][2], "norm", "n_features")
    modelfile._check_norm(model["out_norm"], layers[-1][3], "out_norm", "n_outputs")
    modelfile._encode_metadata(model["metadata"])
    assert (model["n_features"], model["n_outputs"]) == (layers[0][2], layers[-1][3])


class Runner:
    """Runs one case in-process: the bytes go to the parser behind ``read_model``,
    and every ``through_file``-th case goes through ``read_model`` and a file."""

    def __init__(self, path, through_file=16):
        self.path = path
        self.through_file = through_file
        self.cases = 0
        self.outcomes = {"accepted": 0, "rejected": 0}

    def __call__(self, data, what):
        self.cases += 1
        via_file = self.cases % self.through_file == 0
        if via_file:
            self.path.write_bytes(data)
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)   # a hang fails the case
        try:
            model = read_model(self.path) if via_file else modelfile._parse(data)
        except CaseTimeout:
            pytest.fail(f"{what}: no answer within {CASE_SECONDS} s")
        except ModelFormatError as e:
            if via_file:
                assert str(e).startswith(f"{self.path}: "), (what, str(e))
            self.outcomes["rejected"] += 1
            model = None
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{what}: {type(e).__name__}: {e}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        peak = tracemalloc.get_traced_memory()[1] - before
        limit = 64 * len(data) + 2**20
        assert peak <= limit, f"{what}: peak {peak} bytes > {limit}"
        if model is not None:
            _assert_valid(model)
            self.outcomes["accepted"] += 1


CASE_SECONDS = 10


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout


@pytest.fixture
def run(tmp_path):
    """A case runner; traced memory is on for the whole test (peaks reset per
    case), and each case has CASE_SECONDS to answer."""
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    try:
        yield Runner(tmp_path / "case.pykd")
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGALRM, old)


NAMES = ["dense", "dense_int8", "sparse_csr", "low_rank", "codebook", "sparse_codebook", "zoo",
         "v1"]


@pytest.mark.parametrize("name", NAMES)
def test_bit_flips(bases, run, name):
    data, _, payloads, _ = bases[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for case in range(160 * SCALE):
        flipped = bytearray(data)
        for _ in range(1 + case % 3):
            bit = int(rng.integers(0, 8 * len(data)))
            flipped[bit // 8] ^= 1 << (bit % 8)
        flipped = bytes(flipped)
        run(flipped, f"{name}: bit flips, case {case}")
        if case % 5:  # and mostly with a valid checksum, to reach the content checks
            run(_fixed(flipped), f"{name}: bit flips + CRC, case {case}")
    assert run.outcomes["rejected"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_every_field_set_to_special_values(bases, run, name):
    data, fields, _, _ = bases[name]
    for offset, width, field in fields:
        old = int.from_bytes(data[offset : offset + width], "little")
        specials = SPECIAL_U64 if width == 8 else SPECIAL_U32
        values = set(specials) | {max(old - 1, 0), old + 1, old * 2}
        for v in sorted(values):
            if v >= 1 << (8 * width) or v == old:
                continue
            raw = v.to_bytes(width, "little")
            run(_fixed(_set(data, offset, raw)), f"{name}: {field} = {v} (was {old}) + CRC")
        run(_set(data, offset, (old ^ 1).to_bytes(width, "little")), f"{name}: {field} ^ 1")


@pytest.mark.parametrize("name", NAMES)
def test_truncation_at_every_header_offset(bases, run, name):
    data, fields, payloads, header_end = bases[name]
    cuts = set(range(0, min(header_end + 64, len(data))))
    for offset, width, _ in fields:  # every record header, and into each payload
        cuts.update(range(offset - 1, offset + width + 2))
    cuts.update(end for _, end in payloads)
    cuts.update(range(len(data) - 13, len(data)))
    for cut in sorted(c for c in cuts if 0 <= c < len(data)):
        run(data[:cut], f"{name}: truncated at {cut}")
        if 12 <= cut < len(data) - 12:  # shortened, but with a valid trailer
            run(_with_crc(data[:cut]), f"{name}: cut at {cut} + trailer")


@pytest.mark.parametrize("name", NAMES)
def test_payload_mutations_with_valid_crc(bases, run, name):
    data, _, payloads, header_end = bases[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    for case in range(250 * SCALE):
        start, end = payloads[int(rng.integers(0, len(payloads)))]
        mutated = data
        for _ in range(1 + case % 4):
            at = int(rng.integers(start, end))
            raw = (NASTY_BYTES[int(rng.integers(0, len(NASTY_BYTES)))] if case % 2
                   else rng.integers(0, 256, int(rng.integers(1, 5))).astype(np.uint8).tobytes())
            mutated = _set(mutated, at, raw[: max(len(data) - 12 - at, 0)])
        run(_fixed(mutated), f"{name}: payload mutation, case {case}")
    assert run.outcomes["rejected"] > 0 and run.outcomes["accepted"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_inserted_and_deleted_bytes(bases, run, name):
    data, _, _, _ = bases[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 2)
    body = data[:-12]
    for case in range(60 * SCALE):
        at = int(rng.integers(8, len(body)))
        n = int(rng.integers(1, 9))
        if case % 2:
            mutated = body[:at] + rng.integers(0, 256, n).astype(np.uint8).tobytes() + body[at:]
        else:
            mutated = body[:at] + body[at + n :]
        run(_with_crc(mutated), f"{name}: {'insert' if case % 2 else 'delete'} {n} at {at}")


def test_huge_declared_sizes_with_valid_crc(bases, run):
    """Large counts whose record is made consistent (payload_bytes matching), so
    only the size checks and the decoded-size rule stand between them and RAM."""
    data, fields, payloads, _ = bases["sparse_codebook"]
    start, end = payloads[0]
    # Layer 1 claims n_in up to 2^31 - 1 with no non-zeros: indptr would be 8 GiB.
    for n_in in (2**10, 2**20, 2**24, 2**31 - 1):
        payload = struct.pack("<5I", 0, 1, 1, 0, 0) + struct.pack("<f", 1) + data[end - 28 : end]
        body = (data[: start - 24] + struct.pack("<4I", 6, 1, n_in, 7)
                + struct.pack("<Q", len(payload)) + payload + data[end:-12])
        body = _set(body, 16, struct.pack("<I", n_in))  # n_features follows
        run(_with_crc(body), f"sparse_codebook: n_in = {n_in}, nnz = 0")
    assert run.outcomes["accepted"] >= 1 and run.outcomes["rejected"] >= 2
    # Every kind's record with counts just above what the file holds.
    for name in NAMES:
        data, fields, _, _ = bases[name]
        for offset, width, field in fields:
            if width == 4 and ("n_in" in field or "n_out" in field or "field" in field):
                for v in (2**16, 2**20, 2**24, 2**28):
                    run(_fixed(_set(data, offset, v.to_bytes(4, "little"))),
                        f"{name}: {field} = {v} + CRC")


def test_nasty_metadata_with_valid_crc(bases, run):
    data, fields, _, header_end = bases["dense"]
    meta_at = next(o for o, _, f in fields if f == "meta_len")
    for meta in (b"[" * 5000, b"{" * 100 + b"}" * 100, b'{"a": ' + b"1" * 5000 + b"}",
                 b'{"a": NaN}', b'{"\xc3\x28": 1}', b"\xef\xbb\xbf{}", b"null", b'"x"',
                 b'{"a": 1}' + b" " * 10, b'{"a": 1} {', b"{}" * 3, b'{"a": "\\ud800"}'):
        body = data[:meta_at] + struct.pack("<I", len(meta)) + meta + data[header_end:-12]
        run(_with_crc(body), f"metadata {meta[:20]!r}")


def test_the_runner_catches_other_exceptions_and_large_allocations(bases, run, monkeypatch):
    data = bases["dense"][0]

    def allocates(data):
        return np.ones(64 * len(data) + 2**21, np.uint8)

    monkeypatch.setattr(modelfile, "_parse", allocates)
    with pytest.raises(AssertionError, match="peak"):
        run(data, "allocates")
    monkeypatch.setattr(modelfile, "_parse", lambda data: {}[0])
    with pytest.raises(pytest.fail.Exception, match="KeyError"):
        run(data, "raises KeyError")
