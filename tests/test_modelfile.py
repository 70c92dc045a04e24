"""Tests for pykd.modelfile: the binary model format (docs/format.md).

The expected bytes are built here field by field with ``struct`` (``Rec``,
``file_bytes``), independently of the writer; version 1 files are built by
``v1_file``, the old writer's logic.
"""

import json
import os
import stat
import struct
import tempfile
import threading
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykd import _bits, _codes, modelfile
from pykd.modelfile import ModelFormatError, read_model, write_model

F32 = np.float32
ACTIVATIONS = list(_codes.ACTIVATIONS)


# --------------------------------------------------------------------------
# Layers of every kind


def dense(n_in, n_out, rng, act="relu"):
    return {"kind": "dense", "activation": act,
            "W": rng.standard_normal((n_in, n_out)).astype(F32),
            "b": rng.standard_normal(n_out).astype(F32)}


def dense_int8(n_in, n_out, rng, act="identity", x_scale=None):
    return {"kind": "dense_int8", "activation": act,
            "q": rng.integers(-127, 128, (n_in, n_out)).astype(np.int8),
            "scale": rng.uniform(0.01, 1, n_out).astype(F32),
            "b": rng.standard_normal(n_out).astype(F32), "x_scale": x_scale}


def csr_pattern(n_in, n_out, rng, density=0.3):
    mask = rng.random((n_in, n_out)) < density
    indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)
    return indptr, np.nonzero(mask)[1].astype(np.int32)


def sparse_csr(n_in, n_out, rng, act="tanh", density=0.3):
    indptr, indices = csr_pattern(n_in, n_out, rng, density)
    return {"kind": "sparse_csr", "activation": act, "indptr": indptr, "indices": indices,
            "values": rng.standard_normal(indices.size).astype(F32),
            "b": rng.standard_normal(n_out).astype(F32)}


def low_rank(n_in, n_out, rng, act="sigmoid", rank=2):
    return {"kind": "low_rank", "activation": act,
            "U": rng.standard_normal((n_in, rank)).astype(F32),
            "V": rng.standard_normal((rank, n_out)).astype(F32),
            "b": rng.standard_normal(n_out).astype(F32)}


def codebook(n_in, n_out, rng, act="gelu", n_codes=5):
    bits = modelfile.codebook_bits(n_codes)
    idx = rng.integers(0, n_codes, n_in * n_out).astype(np.uint8)
    return {"kind": "codebook", "activation": act, "n_in": n_in,
            "centroids": rng.standard_normal(n_codes).astype(F32), "bits": bits,
            "packed": _bits.pack(idx, bits), "b": rng.standard_normal(n_out).astype(F32)}


def sparse_codebook(n_in, n_out, rng, act="silu", n_codes=6, density=0.3):
    indptr, indices = csr_pattern(n_in, n_out, rng, density)
    return {"kind": "sparse_codebook", "activation": act, "indptr": indptr,
            "indices": indices, "codes": rng.integers(0, n_codes, indices.size).astype(np.uint8),
            "centroids": rng.standard_normal(n_codes).astype(F32),
            "b": rng.standard_normal(n_out).astype(F32)}


KINDS = {"dense": dense, "dense_int8": dense_int8, "sparse_csr": sparse_csr,
         "low_rank": low_rank, "codebook": codebook, "sparse_codebook": sparse_codebook}


def make_layers(sizes=(6, 5, 3), seed=0):
    """A dense relu layer, then dense_int8 layers; sizes are (n_features, ..., n_outputs)."""
    rng = np.random.default_rng(seed)
    return [dense(i, o, rng) if k == 0 else dense_int8(i, o, rng)
            for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))]


def zoo(seed=0):
    """Every kind once, chained: 6 -> 7 -> 300 -> 9 -> 5 -> 4 -> 3."""
    rng = np.random.default_rng(seed)
    return [dense(6, 7, rng), sparse_csr(7, 300, rng), sparse_codebook(300, 9, rng, density=0.1),
            low_rank(9, 5, rng), codebook(5, 4, rng), dense_int8(4, 3, rng, x_scale=F32(0.25))]


def assert_layers_equal(expected, got):
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        e = dict(e)
        if e["kind"] == "dense_int8":
            e.setdefault("x_scale", None)
        assert e.keys() == g.keys()
        for key, value in e.items():
            if isinstance(value, np.ndarray):
                assert g[key].dtype == value.dtype and g[key].shape == value.shape, key
                assert g[key].tobytes() == value.tobytes(), key  # bitwise
                assert g[key].flags.c_contiguous and g[key].flags.writeable
                assert g[key].flags.owndata
            elif isinstance(value, np.floating):
                assert type(g[key]) is type(value) and g[key].tobytes() == value.tobytes()
            else:
                assert g[key] == value and type(g[key]) is type(value), key


# --------------------------------------------------------------------------
# Expected bytes, field by field


def u32(data, offset):
    return int.from_bytes(data[offset : offset + 4], "little")


def le32(v):
    return int(v).to_bytes(4, "little")


def le64(v):
    return int(v).to_bytes(8, "little")


def f32s(*v):
    return np.array(v, "<f4").tobytes()


def record(kind, act, n_in, n_out, payload, version=2):
    head = struct.pack("<4I", _codes.KINDS[kind], _codes.ACTIVATIONS[act], n_in, n_out)
    return head + (struct.pack("<Q", len(payload)) if version == 2 else b"") + payload


def file_bytes(records, n_features, n_outputs, in_norm=b"\0\0\0\0", out_norm=b"\0\0\0\0",
               meta=b"{}", version=2, n_layers=None):
    body = b"PYKDMDL\0" + struct.pack("<4I", version, n_layers or len(records), n_features,
                                      n_outputs)
    body += in_norm + (out_norm if version == 2 else b"") + le32(len(meta)) + meta
    body += b"".join(records)
    return body + le32(zlib.crc32(body)) + b"PYKDEND\0"


def v1_file(layers, norm=None, meta=b"{}"):
    """A version 1 file, as pykd's version 1 writer made it."""
    recs = []
    for layer in layers:
        n_in, n_out = (layer["W"] if layer["kind"] == "dense" else layer["q"]).shape
        arrays = ([layer["W"], layer["b"]] if layer["kind"] == "dense"
                  else [layer["q"], layer["scale"], layer["b"]])
        recs.append(record(layer["kind"], layer["activation"], n_in, n_out,
                           b"".join(np.ascontiguousarray(a).tobytes() for a in arrays),
                           version=1))
    if norm is None:
        in_norm = le32(0)
    else:
        in_norm = le32(2 if np.ndim(norm[0]) == 0 else 1) + b"".join(
            np.asarray(a, "<f4").tobytes() for a in norm)
    n_features = recs and (layers[0]["W"] if layers[0]["kind"] == "dense" else layers[0]["q"]
                           ).shape[0]
    return file_bytes(recs, n_features, layers[-1]["b"].size, in_norm=in_norm, meta=meta,
                      version=1)


def patch(data, offset, new, fix_crc=True):
    """Overwrite bytes at ``offset``; optionally recompute the CRC so only ``new`` is wrong."""
    data = bytearray(data)
    data[offset : offset + len(new)] = new
    if fix_crc:
        data[-12:-8] = zlib.crc32(data[:-12]).to_bytes(4, "little")
    return bytes(data)


def refit_crc(body_without_trailer):
    return body_without_trailer + le32(zlib.crc32(body_without_trailer)) + b"PYKDEND\0"


@pytest.fixture
def model_file(tmp_path):
    """A 6 -> 5 -> 3 model with scalar norm and metadata {"a": 1} (M = 8)."""
    path = tmp_path / "m.pykd"
    write_model(path, make_layers(), norm=(F32(0.5), F32(2.0)), metadata={"a": 1})
    return path


# Byte offsets inside model_file: header 28, norm 8, out_norm 4, meta_len 4 + 8 bytes JSON.
LAYER1 = 28 + 8 + 4 + 4 + len(b'{"a": 1}')
LAYER2 = LAYER1 + 24 + 4 * 6 * 5 + 4 * 5
# In a file without normalisation and metadata "{}": layer 1 and its payload.
RECORD0 = 28 + 4 + 4 + 2
PAYLOAD0 = RECORD0 + 24


def check_error(tmp_path, data, match):
    bad = tmp_path / "bad.pykd"
    bad.write_bytes(data)
    with pytest.raises(ModelFormatError, match=match) as info:
        read_model(bad)
    assert str(info.value).startswith(f"{bad}: ")  # message names the file first
    return info.value


def read_bytes(tmp_path, data):
    path = tmp_path / "hand.pykd"
    path.write_bytes(data)
    return read_model(path)


def written(tmp_path, layers, **kw):
    path = tmp_path / "w.pykd"
    write_model(path, layers, **kw)
    return path.read_bytes()


# --------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize(
    "norm",
    [
        None,
        (F32(0.25), F32(3.0)),
        (np.asarray(F32(-1.5)), np.asarray(F32(0.5))),
        (np.linspace(-1, 1, 6, dtype=F32), np.linspace(0.5, 2, 6, dtype=F32)),
    ],
)
@pytest.mark.parametrize(
    "out_norm", [None, (F32(10), F32(0.5)), (np.arange(3, dtype=F32), np.full(3, 2, F32))])
def test_round_trip(tmp_path, norm, out_norm):
    layers = make_layers()
    meta = {"teacher": "mlp", "lr": 0.01, "sizes": [6, 5, 3], "note": "héllo ✓"}
    path = tmp_path / "model.pykd"
    write_model(path, layers, norm=norm, out_norm=out_norm, metadata=meta)
    model = read_model(path)
    assert model["version"] == 2
    assert model["n_features"] == 6 and model["n_outputs"] == 3
    assert model["metadata"] == meta
    assert_layers_equal(layers, model["layers"])
    for given_, got in ((norm, model["norm"]), (out_norm, model["out_norm"])):
        if given_ is None:
            assert got is None
            continue
        for e, g in zip(given_, got):
            assert np.asarray(g).dtype == F32 and np.asarray(g).shape == np.shape(e)
            assert np.asarray(g).tobytes() == np.asarray(e).tobytes()
            if np.ndim(e) == 0:
                assert type(g) is np.float32


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_round_trip_every_kind_and_activation(tmp_path, kind, act):
    rng = np.random.default_rng(hash((kind, act)) % 2**32)
    layers = [KINDS[kind](5, 4, rng, act=act), KINDS[kind](4, 3, rng, act=act)]
    write_model(tmp_path / "m.pykd", layers)
    model = read_model(tmp_path / "m.pykd")
    assert_layers_equal(layers, model["layers"])
    assert (model["n_features"], model["n_outputs"]) == (5, 3)


def test_round_trip_all_kinds_chained(tmp_path):
    layers = zoo()
    norm = (np.linspace(-1, 1, 6, dtype=F32), np.linspace(1, 2, 6, dtype=F32))
    out_norm = (np.arange(3, dtype=F32), np.array([1, 2, 3], F32))
    write_model(tmp_path / "z.pykd", layers, norm=norm, out_norm=out_norm, metadata={"k": [1]})
    model = read_model(tmp_path / "z.pykd")
    assert_layers_equal(layers, model["layers"])
    assert sorted(layer["kind"] for layer in model["layers"]) == sorted(KINDS)
    assert model["out_norm"][1].tolist() == [1, 2, 3]
    # Same model, same bytes (the writer is deterministic).
    write_model(tmp_path / "z2.pykd", zoo(), norm=norm, out_norm=out_norm, metadata={"k": [1]})
    assert (tmp_path / "z.pykd").read_bytes() == (tmp_path / "z2.pykd").read_bytes()


def test_round_trip_non_contiguous_and_default_metadata(tmp_path):
    W = np.arange(12, dtype=F32).reshape(3, 4).T  # Fortran-ordered view
    layers = [{"kind": "dense", "W": W, "b": np.zeros(3, F32), "activation": "tanh"}]
    write_model(tmp_path / "m.pykd", layers)
    model = read_model(tmp_path / "m.pykd")
    assert model["metadata"] == {}
    np.testing.assert_array_equal(model["layers"][0]["W"], W)
    assert model["layers"][0]["activation"] == "tanh"


def test_dense_int8_without_x_scale_is_dynamic(tmp_path):
    layer = dense_int8(4, 3, np.random.default_rng(1))
    del layer["x_scale"]
    write_model(tmp_path / "m.pykd", [layer])
    got = read_model(tmp_path / "m.pykd")["layers"][0]
    assert got["x_scale"] is None and got["q"].tobytes() == layer["q"].tobytes()


def test_sparse_layers_with_empty_rows_and_no_nonzeros(tmp_path):
    rng = np.random.default_rng(2)
    empty_csr = sparse_csr(3, 4, rng, density=0.0)
    empty_cb = sparse_codebook(4, 5, rng, density=0.0)
    rows = sparse_codebook(5, 6, rng)
    rows["indptr"] = np.array([0, 0, 2, 2, 2, 3], np.int32)
    rows["indices"] = np.array([0, 5, 5], np.int32)
    rows["codes"] = np.array([1, 0, 5], np.uint8)
    full = sparse_codebook(6, 2, rng, density=1.0)  # every weight present: gaps all 0
    layers = [empty_csr, empty_cb, rows, full]
    write_model(tmp_path / "m.pykd", layers)
    assert_layers_equal(layers, read_model(tmp_path / "m.pykd")["layers"])


@st.composite
def random_model(draw):
    sizes = draw(st.lists(st.integers(1, 9), min_size=2, max_size=5))
    kinds = draw(st.lists(st.sampled_from(list(KINDS)), min_size=len(sizes) - 1,
                          max_size=len(sizes) - 1))
    acts = draw(st.lists(st.sampled_from(ACTIVATIONS), min_size=len(kinds), max_size=len(kinds)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    layers = []
    for (n_in, n_out), kind, act in zip(zip(sizes[:-1], sizes[1:]), kinds, acts):
        extra = {}
        if kind == "codebook":
            extra = {"n_codes": int(rng.integers(1, 257))}
        elif kind == "sparse_codebook":
            extra = {"n_codes": int(rng.integers(1, 257)), "density": float(rng.random())}
        elif kind == "sparse_csr":
            extra = {"density": float(rng.random())}
        elif kind == "low_rank":
            extra = {"rank": int(rng.integers(1, 4))}
        elif kind == "dense_int8":
            extra = {"x_scale": None if rng.random() < 0.5 else F32(rng.uniform(0.01, 2))}
        layers.append(KINDS[kind](n_in, n_out, rng, act=act, **extra))
    return sizes, layers


@settings(max_examples=40, deadline=None)
@given(random_model())
def test_round_trip_property(sized_layers):
    sizes, layers = sized_layers
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.pykd")
        write_model(path, layers, metadata={"sizes": sizes})
        model = read_model(path)
    assert_layers_equal(layers, model["layers"])
    assert (model["n_features"], model["n_outputs"]) == (sizes[0], sizes[-1])


def test_reader_accepts_str_bytes_and_pathlike(model_file):
    for p in (model_file, str(model_file), os.fsencode(model_file)):
        assert read_model(p)["n_features"] == 6


# --------------------------------------------------------------------------
# Byte layouts, computed by hand


def test_header_layout_matches_spec(model_file):
    data = model_file.read_bytes()
    assert data[:8] == b"PYKDMDL\0" == modelfile.MAGIC
    assert [u32(data, o) for o in (8, 12, 16, 20, 24)] == [2, 2, 6, 3, 2]
    assert np.frombuffer(data[28:36], "<f4").tolist() == [0.5, 2.0]
    assert u32(data, 36) == 0                      # out_norm: none
    assert u32(data, 40) == 8 and data[44:52] == b'{"a": 1}'
    # layer 1: dense (1), relu (1), 6 -> 5, payload 4 * (30 + 5)
    assert LAYER1 == 52
    assert [u32(data, LAYER1 + 4 * i) for i in range(4)] == [1, 1, 6, 5]
    assert int.from_bytes(data[LAYER1 + 16 : LAYER1 + 24], "little") == 140
    W = np.frombuffer(data[LAYER1 + 24 : LAYER1 + 24 + 120], "<f4").reshape(6, 5)
    np.testing.assert_array_equal(W, make_layers()[0]["W"])  # NumPy (n_in, n_out), C order
    # layer 2: dense_int8 (2), identity (0), 5 -> 3: quant, q, scale, b
    assert [u32(data, LAYER2 + 4 * i) for i in range(4)] == [2, 0, 5, 3]
    assert int.from_bytes(data[LAYER2 + 16 : LAYER2 + 24], "little") == 4 + 15 + 12 + 12
    assert u32(data, LAYER2 + 24) == 0             # dynamic
    end = LAYER2 + 24 + 43
    assert len(data) == end + 12
    assert u32(data, end) == zlib.crc32(data[:end])
    assert data[end + 4 :] == b"PYKDEND\0" == modelfile.END_MAGIC


def test_out_norm_layout(tmp_path):
    layers = [{"kind": "dense", "activation": "identity", "W": np.ones((1, 2), F32),
               "b": np.zeros(2, F32)}]
    got = written(tmp_path, layers, norm=(F32(1), F32(2)),
                  out_norm=(np.array([3, 4], F32), np.array([5, 6], F32)))
    rec = record("dense", "identity", 1, 2, f32s(1, 1, 0, 0))
    assert got == file_bytes([rec], 1, 2, in_norm=le32(2) + f32s(1, 2),
                             out_norm=le32(1) + f32s(3, 4, 5, 6))


def test_dense_bytes(tmp_path):
    layer = {"kind": "dense", "activation": "silu", "W": np.array([[1], [2]], F32),
             "b": np.array([0.5], F32)}
    assert written(tmp_path, [layer]) == file_bytes(
        [record("dense", "silu", 2, 1, f32s(1, 2) + f32s(0.5))], 2, 1)


@pytest.mark.parametrize("x_scale", [None, F32(2)])
def test_dense_int8_bytes(tmp_path, x_scale):
    layer = {"kind": "dense_int8", "activation": "gelu",
             "q": np.array([[1, -2], [127, -127]], np.int8), "scale": np.array([0.5, 0.25], F32),
             "b": np.array([1, -1], F32), "x_scale": x_scale}
    static = x_scale is not None
    payload = (le32(int(static)) + bytes([1, 0xFE, 127, 0x81]) + f32s(0.5, 0.25)
               + (f32s(2) if static else b"") + f32s(1, -1))
    assert written(tmp_path, [layer]) == file_bytes(
        [record("dense_int8", "gelu", 2, 2, payload)], 2, 2)


@pytest.mark.parametrize("n_out, width, code", [(4, 8, "u1"), (256, 8, "u1"), (257, 16, "<u2"),
                                                (65536, 16, "<u2"), (65537, 32, "<u4")])
def test_sparse_csr_bytes_and_narrowest_index_width(tmp_path, n_out, width, code):
    # Row 0: W[0, 1] = 1.5, W[0, n_out - 1] = -2; row 1 empty; row 2: W[2, 0] = 4.
    indices = np.array([1, n_out - 1, 0], np.int32)
    b = np.zeros(n_out, F32)
    layer = {"kind": "sparse_csr", "activation": "relu",
             "indptr": np.array([0, 2, 2, 3], np.int32), "indices": indices,
             "values": np.array([1.5, -2, 4], F32), "b": b}
    payload = (le32(3) + le32(width) + struct.pack("<4I", 0, 2, 2, 3)
               + indices.astype(code).tobytes() + f32s(1.5, -2, 4) + b.tobytes())
    assert written(tmp_path, [layer]) == file_bytes(
        [record("sparse_csr", "relu", 3, n_out, payload)], 3, n_out)
    assert modelfile.index_bits(n_out) == width


def test_low_rank_bytes(tmp_path):
    layer = {"kind": "low_rank", "activation": "tanh", "U": np.array([[1], [2]], F32),
             "V": np.array([[3, 4, 5]], F32), "b": np.array([0, 0, 7], F32)}
    payload = le32(1) + f32s(1, 2) + f32s(3, 4, 5) + f32s(0, 0, 7)
    assert written(tmp_path, [layer]) == file_bytes(
        [record("low_rank", "tanh", 2, 3, payload)], 2, 3)


def test_codebook_bytes(tmp_path):
    # 2 x 3 indices [[0, 1, 2], [2, 1, 0]], 3 codes -> 2 bits, LSB first:
    # byte 0 = 0 | 1 << 2 | 2 << 4 | 2 << 6 = 0xA4, byte 1 = 1 | 0 << 2 = 0x01.
    layer = {"kind": "codebook", "activation": "sigmoid", "n_in": 2,
             "centroids": np.array([-1, 0, 1], F32), "bits": 2,
             "packed": np.array([0xA4, 0x01], np.uint8), "b": np.array([1, 2, 3], F32)}
    payload = le32(3) + le32(2) + f32s(-1, 0, 1) + bytes([0xA4, 0x01]) + f32s(1, 2, 3)
    assert written(tmp_path, [layer]) == file_bytes(
        [record("codebook", "sigmoid", 2, 3, payload)], 2, 3)


def test_sparse_codebook_bytes(tmp_path):
    # Non-zeros at (0, 1), (0, 3), (2, 0) of a 3 x 4 matrix: positions 1, 3, 8,
    # gaps 1, 1, 4. Rice bits: k = 0 -> 9, k = 1 -> 8, k = 2 -> 10: k = 1, one byte:
    # g=1: "0" "1"; g=1: "0" "1"; g=4: "11" "0" "0" -> bits 0,1,0,1,1,1,0,0 = 0x3A.
    # Codes [2, 0, 1] in 2 bits (3 codes): 2 | 0 << 2 | 1 << 4 = 0x12.
    layer = {"kind": "sparse_codebook", "activation": "identity",
             "indptr": np.array([0, 2, 2, 3], np.int32), "indices": np.array([1, 3, 0], np.int32),
             "codes": np.array([2, 0, 1], np.uint8), "centroids": np.array([0.5, -1, 2], F32),
             "b": np.array([0, 1, 0, 1], F32)}
    payload = (struct.pack("<5I", 3, 3, 2, 1, 1) + f32s(0.5, -1, 2) + bytes([0x3A, 0x12])
               + f32s(0, 1, 0, 1))
    data = written(tmp_path, [layer])
    assert data == file_bytes([record("sparse_codebook", "identity", 3, 4, payload)], 3, 4)
    assert_layers_equal([layer], read_bytes(tmp_path, data)["layers"])


def test_worked_example_in_docs(tmp_path):
    # docs/format.md walks through this model, offset by offset.
    layers = [
        {"kind": "dense", "W": np.zeros((784, 100), F32), "b": np.zeros(100, F32),
         "activation": "relu"},
        {"kind": "dense", "W": np.zeros((100, 10), F32), "b": np.zeros(10, F32),
         "activation": "identity"},
    ]
    norm = (np.zeros(784, F32), np.ones(784, F32))
    data = written(tmp_path, layers, norm=norm)
    assert len(data) == 324410
    assert [u32(data, o) for o in (8, 12, 16, 20, 24)] == [2, 2, 784, 10, 1]
    assert np.frombuffer(data[3164:6300], "<f4").tolist() == [1.0] * 784  # std
    assert u32(data, 6300) == 0 and u32(data, 6304) == 2 and data[6308:6310] == b"{}"
    assert [u32(data, 6310 + 4 * i) for i in range(4)] == [1, 1, 784, 100]
    assert int.from_bytes(data[6326:6334], "little") == 314000
    assert [u32(data, 320334 + 4 * i) for i in range(4)] == [1, 0, 100, 10]
    assert int.from_bytes(data[320350:320358], "little") == 4040
    assert u32(data, 324398) == zlib.crc32(data[:324398])
    assert data[324402:] == b"PYKDEND\0"


def test_public_constants():
    assert modelfile.VERSION == 2 == _codes.FORMAT_VERSION
    assert modelfile.KIND_CODES == {"dense": 1, "dense_int8": 2, "sparse_csr": 3, "low_rank": 4,
                                    "codebook": 5, "sparse_codebook": 6}
    assert modelfile.SUPPORTED_KINDS == tuple(modelfile.KIND_CODES)
    assert modelfile.ACTIVATION_CODES == {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3,
                                          "gelu": 4, "silu": 5}
    assert modelfile.NORM_CODES == {"none": 0, "per_feature": 1, "scalar": 2}
    assert modelfile.MAX_COUNT == 2**31 - 1
    assert modelfile.KIND_CODES is _codes.KINDS and modelfile.ACTIVATION_CODES is _codes.ACTIVATIONS
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC documented in format.md


# --------------------------------------------------------------------------
# Canonical choices


@pytest.mark.parametrize("n_codes, bits", [(1, 1), (2, 1), (3, 2), (4, 2), (5, 4), (16, 4),
                                           (17, 8), (256, 8)])
def test_codebook_uses_the_fewest_of_1_2_4_8_bits(tmp_path, n_codes, bits):
    assert modelfile.codebook_bits(n_codes) == bits
    layer = codebook(3, 5, np.random.default_rng(n_codes), n_codes=n_codes)
    assert layer["bits"] == bits
    data = written(tmp_path, [layer])
    assert u32(data, PAYLOAD0 + 4) == bits
    wrong = dict(layer, bits=8 if bits != 8 else 4)
    with pytest.raises(ValueError, match=f"layer 1: bits must be {bits}, the fewest"):
        write_model(tmp_path / "x.pykd", [wrong])


@pytest.mark.parametrize("n_codes, bits", [(1, 1), (2, 1), (3, 2), (5, 3), (8, 3), (9, 4),
                                           (33, 6), (65, 7), (129, 8), (256, 8)])
def test_sparse_codebook_uses_the_fewest_bits(tmp_path, n_codes, bits):
    assert modelfile.sparse_codebook_bits(n_codes) == bits
    layer = sparse_codebook(4, 6, np.random.default_rng(n_codes), n_codes=n_codes, density=0.5)
    data = written(tmp_path, [layer])
    assert struct.unpack_from("<3I", data, PAYLOAD0) == (layer["indices"].size, n_codes, bits)
    assert_layers_equal([layer], read_bytes(tmp_path, data)["layers"])


def brute_force_rice_bytes(gaps, k):
    """Bytes of the Rice code, by writing it out as a string of bits."""
    bits = "".join("1" * (g >> k) + "0" + format(g & ((1 << k) - 1), f"0{k}b")[::-1][:k]
                   for g in map(int, gaps))
    return -(-len(bits) // 8)


@pytest.mark.parametrize("density", [0.02, 0.1, 0.5, 0.95, 1.0])
def test_sparse_codebook_rice_k_gives_the_fewest_bytes(tmp_path, density):
    layer = sparse_codebook(40, 50, np.random.default_rng(7), density=density)
    data = written(tmp_path, [layer])
    nnz, _, _, k, pos_bytes = struct.unpack_from("<5I", data, PAYLOAD0)
    rows = np.repeat(np.arange(40), np.diff(layer["indptr"]))
    gaps = np.diff(rows * 50 + layer["indices"], prepend=-1) - 1
    sizes = [brute_force_rice_bytes(gaps, kk) for kk in range(32)]
    assert pos_bytes == min(sizes) and k == sizes.index(min(sizes))  # ties: smallest k


def test_reader_accepts_wider_index_bits_and_other_rice_k(tmp_path):
    # index_bits 32 for n_out = 4 (writers use 8), rice_k = 0 (writers use 1).
    indptr, values, b = struct.pack("<4I", 0, 2, 2, 3), f32s(1.5, -2, 4), f32s(0, 0, 0, 1)
    csr = le32(3) + le32(32) + indptr + struct.pack("<3I", 1, 3, 0) + values + b
    model = read_bytes(tmp_path, file_bytes([record("sparse_csr", "relu", 3, 4, csr)], 3, 4))
    assert model["layers"][0]["indices"].tolist() == [1, 3, 0]
    # gaps 1, 1, 4 with k = 0: "10" "10" "11110" -> bits 1,0,1,0,1,1,1,1 0 -> 0xF5 0x00
    cb = (struct.pack("<5I", 3, 3, 2, 0, 2) + f32s(0.5, -1, 2) + bytes([0xF5, 0x00, 0x12])
          + f32s(0, 1, 0, 1))
    model = read_bytes(tmp_path, file_bytes([record("sparse_codebook", "relu", 3, 4, cb)], 3, 4))
    layer = model["layers"][0]
    assert layer["indptr"].tolist() == [0, 2, 2, 3] and layer["indices"].tolist() == [1, 3, 0]
    assert layer["codes"].tolist() == [2, 0, 1]


# --------------------------------------------------------------------------
# Version 1 files


def test_version_1_file_loads(tmp_path):
    rng = np.random.default_rng(3)
    layers = [dense(6, 5, rng, act="tanh"), dense_int8(5, 3, rng, act="relu")]
    norm = (np.linspace(0, 1, 6, dtype=F32), np.linspace(1, 2, 6, dtype=F32))
    model = read_bytes(tmp_path, v1_file(layers, norm, meta=b'{"v": 1}'))
    assert model["version"] == 1 and model["out_norm"] is None
    assert model["metadata"] == {"v": 1} and model["n_features"] == 6
    assert_layers_equal(layers, model["layers"])  # x_scale None: dynamic
    assert model["norm"][1].tobytes() == norm[1].tobytes()
    scalar = read_bytes(tmp_path, v1_file(layers, (F32(3), F32(4))))
    assert scalar["norm"] == (F32(3), F32(4)) and type(scalar["norm"][0]) is np.float32
    # Saved again, it is a version 2 file of the same model.
    write_model(tmp_path / "v2.pykd", model["layers"], norm=model["norm"],
                metadata=model["metadata"])
    again = read_model(tmp_path / "v2.pykd")
    assert again["version"] == 2
    assert_layers_equal(model["layers"], again["layers"])


def test_version_1_only_has_its_kinds_and_activations(tmp_path):
    rng = np.random.default_rng(4)
    data = v1_file([dense(3, 2, rng)])
    at = 28 + 4 + 2  # no norm, metadata "{}"
    check_error(tmp_path, patch(data, at, le32(3)), r"layer 1: unknown kind 3 \(for a version 1")
    check_error(tmp_path, patch(data, at + 4, le32(3)), "layer 1: unknown activation 3")
    # Truncated inside a v1 payload (no payload_bytes to tell).
    check_error(tmp_path, refit_crc(data[:-12][:-4]), "truncated: layer 1 payload needs 32 bytes")


# --------------------------------------------------------------------------
# Reader: framing


@pytest.mark.parametrize("cut", [3, 8, 11, 14, 30, 38, LAYER1 + 2, LAYER1 + 20, LAYER1 + 50,
                                 LAYER2 + 20, LAYER2 + 30, -13, -12, -5, -1])
def test_truncated(model_file, tmp_path, cut):
    data = model_file.read_bytes()
    check_error(tmp_path, data[:cut], "truncated")


def test_empty_file(tmp_path):
    check_error(tmp_path, b"", "bad magic")


@pytest.mark.parametrize("offset", [12, 20, 30, 38, 44, LAYER1 + 20, LAYER2 + 17, -13, -10])
def test_flipped_byte_is_checksum_mismatch(model_file, tmp_path, offset):
    data = bytearray(model_file.read_bytes())
    data[offset] ^= 0x10
    check_error(tmp_path, bytes(data), r"checksum mismatch \(file corrupted\)")


def test_corrupt_end_marker(model_file, tmp_path):
    data = bytearray(model_file.read_bytes())
    data[-3] ^= 0xFF
    check_error(tmp_path, bytes(data), "end marker .* not found .*corrupted")


def test_bad_magic(model_file, tmp_path):
    data = model_file.read_bytes()
    check_error(tmp_path, b"PYKDMDX\0" + data[8:], r"not a pykd model file \(bad magic\)")
    check_error(tmp_path, b"\x89PNG\r\n\x1a\n" + data[8:], "bad magic")


@pytest.mark.parametrize("version", [0, 3, 7, 2**32 - 1])
def test_wrong_version(model_file, tmp_path, version):
    data = patch(model_file.read_bytes(), 8, le32(version))
    check_error(tmp_path, data, rf"unsupported model format version {version} "
                                r"\(this pykd reads versions 1 and 2\)")


def test_trailing_garbage(model_file, tmp_path):
    data = model_file.read_bytes()
    check_error(tmp_path, data + b"junk!", "trailing garbage: 5 unexpected bytes")


def test_bytes_between_last_layer_and_checksum(model_file, tmp_path):
    data = model_file.read_bytes()
    check_error(tmp_path, refit_crc(data[:-12] + b"\0\0"),
                "2 unexpected bytes between the last layer and the checksum")


# --------------------------------------------------------------------------
# Reader: header and record fields


def test_unknown_kind(model_file, tmp_path):
    for code in (0, 7, 9):
        data = patch(model_file.read_bytes(), LAYER2, le32(code))
        check_error(tmp_path, data, f"layer 2: unknown kind {code}$")


def test_unknown_activation(model_file, tmp_path):
    data = patch(model_file.read_bytes(), LAYER1 + 4, le32(6))
    check_error(tmp_path, data, "layer 1: unknown activation 6")


def test_layers_do_not_chain(model_file, tmp_path):
    data = patch(model_file.read_bytes(), LAYER2 + 8, le32(4))
    check_error(
        tmp_path, data, "layer sizes do not chain: layer 1 outputs 5 but layer 2 takes 4"
    )


def test_first_layer_must_match_n_features(model_file, tmp_path):
    data = patch(model_file.read_bytes(), 16, le32(7))
    check_error(tmp_path, data, "layer 1 takes 6 inputs but the model has n_features = 7")


def test_last_layer_must_match_n_outputs(model_file, tmp_path):
    data = patch(model_file.read_bytes(), 20, le32(4))
    check_error(tmp_path, data, "layer 2 outputs 3 but the model has n_outputs = 4")


def test_zero_layers_and_zero_sizes(model_file, tmp_path):
    check_error(tmp_path, patch(model_file.read_bytes(), 12, le32(0)), "model has no layers")
    check_error(tmp_path, patch(model_file.read_bytes(), LAYER1 + 12, le32(0)),
                r"layer 1: has zero size \(6 x 0\)")


def test_unknown_norm_kind(model_file, tmp_path):
    check_error(tmp_path, patch(model_file.read_bytes(), 24, le32(3)),
                "in_norm: unknown norm kind 3")
    check_error(tmp_path, patch(model_file.read_bytes(), 36, le32(7)),
                "out_norm: unknown norm kind 7")


@pytest.mark.parametrize(
    "offset, value, match",
    [
        (40, 0xFFFFFFF0, "truncated: metadata needs 4294967280 bytes"),  # meta_len
        (12, 0xFFFFFFFF, "n_layers = 4294967295 is larger than the largest count 2.31 - 1"),
        (16, 2**31, "n_features = 2147483648 is larger than"),
        (LAYER2 + 12, 2**32 - 1, "layer 2 n_out = 4294967295 is larger than"),
        (LAYER2 + 12, 2**31 - 1, "layer 2: payload_bytes is 43, but its fields imply 27917287415"),
        (LAYER1 + 8, 2**31 - 1, "layer 1 takes 2147483647 inputs but the model has n_features = 6"),
    ],
)
def test_huge_sizes_are_rejected_without_allocating(model_file, tmp_path, offset, value, match):
    data = patch(model_file.read_bytes(), offset, le32(value))
    check_error(tmp_path, data, match)


@pytest.mark.parametrize("value", [2**31 - 1, 2**32 - 1, 2**62, 2**64 - 1])
def test_huge_payload_bytes(model_file, tmp_path, value):
    data = patch(model_file.read_bytes(), LAYER1 + 16, le64(value))
    check_error(tmp_path, data, f"truncated: layer 1 payload_bytes = {value} at offset 76, "
                                "but only 207 bytes remain")


def test_payload_bytes_must_equal_the_implied_length(model_file, tmp_path):
    data = patch(model_file.read_bytes(), LAYER1 + 16, le64(139))
    check_error(tmp_path, data, "layer 1: payload_bytes is 139, but its fields imply 140")
    data = patch(model_file.read_bytes(), LAYER2 + 16, le64(2))  # too short for `quant`
    check_error(tmp_path, data, r"layer 2: payload_bytes = 2 is too short for its fields")


def test_huge_per_feature_norm(model_file, tmp_path):
    data = patch(model_file.read_bytes(), 16, le32(2**31 - 1))
    data = patch(data, 24, le32(1))
    check_error(tmp_path, data, "truncated: in_norm mean needs 8589934588 bytes")


def test_nan_in_file(model_file, tmp_path):
    nan = np.array(np.nan, "<f4").tobytes()
    check_error(tmp_path, patch(model_file.read_bytes(), LAYER1 + 24, nan),
                "layer 1: W contains NaN or infinite values")
    check_error(tmp_path, patch(model_file.read_bytes(), 28, nan),
                "in_norm mean contains NaN")


def test_nonpositive_std_in_file(model_file, tmp_path):
    zero = np.array(0, "<f4").tobytes()
    check_error(tmp_path, patch(model_file.read_bytes(), 32, zero), "in_norm std must be > 0")
    data = written(tmp_path, make_layers(), out_norm=(F32(0), F32(1)))
    check_error(tmp_path, patch(data, 28 + 4 + 4, zero), "out_norm std must be > 0")


# --------------------------------------------------------------------------
# Reader: each kind's content


def one_layer_file(kind, act, n_in, n_out, payload):
    return file_bytes([record(kind, act, n_in, n_out, payload)], n_in, n_out)


def int8_payload(q=(1, 2, 3, 4), scale=(1, 1), quant=0, x_scale=(), b=(0, 0)):
    return le32(quant) + np.array(q, "i1").tobytes() + f32s(*scale) + f32s(*x_scale) + f32s(*b)


def csr_payload(indptr=(0, 2, 2, 3), indices=(1, 3, 0), nnz=None, width=8, code="u1", b=4):
    nnz = len(indices) if nnz is None else nnz
    return (le32(nnz) + le32(width) + np.array(indptr, "<u4").tobytes()
            + np.array(indices, code).tobytes() + f32s(*range(len(indices))) + f32s(*[0] * b))


def cb_payload(n_codes=3, bits=2, packed=(0xA4, 0x01), centroids=None, b=3):
    centroids = [0.5] * n_codes if centroids is None else centroids
    return le32(n_codes) + le32(bits) + f32s(*centroids) + bytes(packed) + f32s(*[0] * b)


def scb_payload(nnz=3, n_codes=3, bits=2, k=1, positions=(0x3A,), codes=(0x12,), b=4):
    return (struct.pack("<5I", nnz, n_codes, bits, k, len(positions)) + f32s(*[1] * n_codes)
            + bytes(positions) + bytes(codes) + f32s(*[0] * b))


@pytest.mark.parametrize("kind, n_in, n_out, payload, match", [
    ("dense_int8", 2, 2, int8_payload(quant=2), "layer 1: unknown quant mode 2"),
    ("dense_int8", 2, 2, int8_payload(q=(1, -128, 3, 4)), r"layer 1: q contains -128"),
    ("dense_int8", 2, 2, int8_payload(scale=(1, -0.5)), "layer 1: scale contains negative"),
    ("dense_int8", 2, 2, int8_payload(scale=(1, np.inf)), "layer 1: scale contains NaN"),
    ("dense_int8", 2, 2, int8_payload(quant=1, x_scale=(0,)), "layer 1: x_scale must be at least the smallest normal"),
    ("dense_int8", 2, 2, int8_payload(quant=1, x_scale=(-1,)), "layer 1: x_scale must be at least the smallest normal"),
    # subnormal: its reciprocal is infinite, so zero inputs would quantize to NaN
    ("dense_int8", 2, 2, int8_payload(quant=1, x_scale=(1e-40,)), "layer 1: x_scale must be at least the smallest normal"),
    ("dense_int8", 2, 2, int8_payload(quant=1, x_scale=(np.nan,)), "layer 1: x_scale contains"),
    ("dense_int8", 2, 2, int8_payload(quant=1), "payload_bytes is 24, but its fields imply 28"),
    ("sparse_csr", 3, 4, csr_payload(width=12), "layer 1: index_bits must be 8, 16 or 32"),
    ("sparse_csr", 3, 300, csr_payload(b=300), "index_bits = 8 cannot hold the column index "
                                               "n_out - 1 = 299"),
    ("sparse_csr", 3, 4, csr_payload(indptr=(1, 2, 2, 3)), r"indptr\[0\] must be 0, got 1"),
    ("sparse_csr", 3, 4, csr_payload(indptr=(0, 2, 1, 3)), "indptr must be non-decreasing"),
    ("sparse_csr", 3, 4, csr_payload(indptr=(0, 2, 2, 2)), r"indptr\[-1\] must equal nnz = "),
    ("sparse_csr", 3, 4, csr_payload(indptr=(0, 2, 2, 9)), "indptr must be <= nnz = 3, found 9"),
    ("sparse_csr", 3, 4, csr_payload(indices=(1, 4, 0)), "indices must be < n_out = 4, found 4"),
    ("sparse_csr", 3, 4, csr_payload(indices=(3, 1, 0)), "indices in row 0 are not strictly"),
    ("sparse_csr", 3, 4, csr_payload(indices=(1, 1, 0)), "indices in row 0 are not strictly"),
    ("sparse_csr", 1, 2, csr_payload(indptr=(0, 3), indices=(0, 1, 1), b=2),
     "nnz = 3 is more than n_in x n_out = 2"),
    ("sparse_csr", 3, 4, csr_payload(indices=(1, 3, 0), nnz=2**31),
     "layer 1 nnz = 2147483648 is larger than"),
    ("low_rank", 2, 3, le32(0) + f32s(0, 0, 0), "layer 1: rank must be >= 1, got 0"),
    ("low_rank", 2, 3, le32(1) + f32s(1, 2, 3, 4, np.inf) + f32s(0, 0, 0), "layer 1: V contains"),
    ("codebook", 2, 3, cb_payload(n_codes=0, centroids=[]), "n_codes must be in 1..256, got 0"),
    ("codebook", 2, 3, cb_payload(n_codes=257), "n_codes must be in 1..256, got 257"),
    ("codebook", 2, 3, cb_payload(bits=4), r"bits must be 2 \(the fewest of 1, 2, 4, 8 that "
                                           r"holds 3 codes\), got 4"),
    ("codebook", 2, 3, cb_payload(packed=(0xE4, 0x01)), "packed: index 3 is >= n_codes = 3"),
    ("codebook", 2, 3, cb_payload(packed=(0xA4, 0x11)), "packed: the unused high 4 bits"),
    ("codebook", 2, 3, cb_payload(centroids=[0, np.nan, 1]), "centroids contains NaN"),
    ("sparse_codebook", 3, 4, scb_payload(bits=8), r"bits must be 2 \(the fewest of 1..8"),
    ("sparse_codebook", 3, 4, scb_payload(k=32), "rice_k must be in 0..31, got 32"),
    ("sparse_codebook", 3, 4, scb_payload(codes=(0x13,)), "codes must be < n_codes = 3, found 3"),
    ("sparse_codebook", 3, 4, scb_payload(codes=(0x52,)), "the unused high 2 bits"),
    ("sparse_codebook", 3, 4, scb_payload(positions=(0x3A, 0)), "1 unused bytes after the last"),
    ("sparse_codebook", 3, 4, scb_payload(positions=(0xFF,)), "runs out"),
    ("sparse_codebook", 3, 4, scb_payload(k=0, positions=(0xF5, 0x02)), "padding bits"),
    # gaps 1, 1, 10 -> position 12 of a 3 x 4 matrix; k = 1: 0,1 0,1 11111 0,0 = 0xFA 0x01
    ("sparse_codebook", 3, 4, scb_payload(positions=(0xFA, 0x01)), "a decoded position is >= 12"),
    ("sparse_codebook", 3, 4, scb_payload(nnz=13), "nnz = 13 is more than n_in x n_out = 12"),
    ("sparse_codebook", 3, 4, scb_payload(nnz=5, codes=(0x12, 0)),
     "position stream runs out: 5 codes with rice_k = 1 need more than 1 bytes"),
])
def test_bad_layer_content(tmp_path, kind, n_in, n_out, payload, match):
    err = check_error(tmp_path, one_layer_file(kind, "relu", n_in, n_out, payload), match)
    assert ": layer 1" in str(err)


def test_int8_layer_with_too_many_inputs(tmp_path):
    n_in = modelfile.MAX_INT8_INPUTS + 1
    payload = le32(0) + bytes(n_in) + f32s(1) + f32s(0)
    check_error(tmp_path, one_layer_file("dense_int8", "relu", n_in, 1, payload),
                "layer 1: an int8 layer has n_in = 131072, more than 131071")


def test_decoded_size_rule(tmp_path):
    # A sparse codebook layer with no non-zeros and 2^31 - 1 inputs: its indptr
    # alone would take 8 GiB from a file of ~100 bytes.
    n_in = 2**31 - 1
    payload = struct.pack("<5I", 0, 1, 1, 0, 0) + f32s(1) + f32s(0)
    err = check_error(tmp_path, one_layer_file("sparse_codebook", "relu", n_in, 1, payload),
                      "layer 1: its arrays would take 8589934600 bytes, more than the file's "
                      "size allows")
    assert "64 x 102 bytes + 64 KiB" in str(err)
    # Just inside the rule it loads (indptr of 4 * (n_in + 1) bytes).
    n_in = (64 * 102 + 64 * 1024 - 16) // 4 - 1
    model = read_bytes(tmp_path, one_layer_file("sparse_codebook", "relu", n_in, 1, payload))
    assert model["layers"][0]["indptr"].shape == (n_in + 1,)
    assert not model["layers"][0]["indptr"].any()


# --------------------------------------------------------------------------
# Reader: metadata


def meta_file(meta):
    return file_bytes([record("dense", "relu", 1, 1, f32s(1, 0))], 1, 1, meta=meta)


@pytest.mark.parametrize("meta, match", [
    (b'{"a": 1,', "not valid UTF-8 JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"\xff": 1}', "UTF-8"),
    (b'{"a": NaN}', "NaN is not JSON"),
    (b'{"a": -Infinity}', "-Infinity is not JSON"),
    (b'{"a": ' + b"9" * 5000 + b"}", "not valid UTF-8 JSON"),        # int digits limit
    (b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested more than 64 levels deep"),
    (b'{"a": ' + b"[" * 64 + b"]" * 64 + b"}", "nested more than 64 levels deep"),
    (b'{"a": "\\ud800"}', r"metadata holds a lone surrogate \\uD800-\\uDFFF"),
    (b'{"a": "x\\udfff"}', "lone surrogate"),
])
def test_bad_metadata_in_file(tmp_path, meta, match):
    check_error(tmp_path, meta_file(meta), match)


def test_metadata_with_escaped_surrogate_pair_loads(tmp_path):
    model = read_bytes(tmp_path, meta_file(b'{"a": "\\ud83d\\ude00"}'))
    assert model["metadata"] == {"a": "\U0001F600"}


def test_metadata_at_the_depth_limit_loads(tmp_path):
    meta = b'{"a": ' + b"[" * 63 + b"]" * 63 + b"}"  # depth 64
    model = read_bytes(tmp_path, meta_file(meta))
    assert model["metadata"] == json.loads(meta)


def test_metadata_over_16_mib(tmp_path):
    big = b'{"a": "' + b"x" * (16 * 2**20 - 9) + b'"}'
    assert len(big) == 16 * 2**20
    assert read_bytes(tmp_path, meta_file(big))["metadata"]["a"][:3] == "xxx"
    big = big[:-2] + b'x"}'
    check_error(tmp_path, meta_file(big), "metadata is 16777217 bytes, more than the 16 MiB")


# --------------------------------------------------------------------------
# Reader: paths


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_model(tmp_path / "nope.pykd")


@pytest.mark.parametrize("path", [3, 0, None, 2.5, ["m.pykd"]])
def test_path_must_be_a_path(path):
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        read_model(path)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        write_model(path, make_layers())


def test_fd_is_never_used(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(TypeError):
            read_model(fd)
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.pykd"
    os.mkfifo(fifo)
    result = []

    def run():
        try:
            read_model(fifo)
        except ModelFormatError as e:
            result.append(str(e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("read_model blocked on a FIFO")
    assert result == [f"{fifo}: is a FIFO, not a regular model file"]


def test_directory_and_device_are_refused(tmp_path):
    with pytest.raises(ModelFormatError, match=f"^{tmp_path}: is a directory"):
        read_model(tmp_path)
    if os.path.exists("/dev/null") and stat.S_ISCHR(os.stat("/dev/null").st_mode):
        with pytest.raises(ModelFormatError, match="^/dev/null: is a character device"):
            read_model("/dev/null")


# --------------------------------------------------------------------------
# Writer validation


def with_change(layer_index, key, value, sizes=(6, 5, 3)):
    layers = make_layers(sizes)
    layers[layer_index][key] = value
    return layers


def one(kind, shape=(4, 3), **change):
    layer = KINDS[kind](*shape, np.random.default_rng(5))
    layer.update(change)
    return [layer]


CSR = {"indptr": np.array([0, 2, 2, 3], np.int32), "indices": np.array([1, 3, 0], np.int32)}


def csr_layer(kind, **change):
    layer = one(kind, (3, 4))[0]
    layer.update(CSR)
    layer["values" if kind == "sparse_csr" else "codes"] = (
        np.ones(3, F32) if kind == "sparse_csr" else np.zeros(3, np.uint8))
    layer.update(change)
    return [layer]


@pytest.mark.parametrize(
    "layers, match",
    [
        (with_change(0, "W", np.zeros((6, 5), np.float64)),
         "layer 1: W must be a numpy array of dtype float32, got dtype float64"),
        (with_change(0, "b", np.zeros(5, np.float16)), "layer 1: b .* float32"),
        (with_change(0, "W", np.zeros((6, 5), ">f4")), "layer 1: W"),
        (with_change(0, "W", [[0.0] * 5] * 6), "layer 1: W .* got list"),
        (with_change(1, "q", np.zeros((5, 3), np.int16)), "layer 2: q must be a numpy array of dtype int8"),
        (with_change(1, "scale", np.ones(3, np.float64)), "layer 2: scale"),
        (with_change(1, "x_scale", 0.5), "layer 2: x_scale must be a float32 scalar"),
        (with_change(1, "x_scale", np.ones(1, F32)), "layer 2: x_scale must be a float32 scalar"),
        (["not a dict"], "layer 1: must be a dict"),
        (csr_layer("sparse_csr", indptr=np.array([0, 2, 2, 3], np.int64)),
         "layer 1: indptr must be a numpy array of dtype int32"),
        (csr_layer("sparse_csr", indices=np.array([1, 3, 0], np.uint8)), "layer 1: indices"),
        (csr_layer("sparse_codebook", codes=np.zeros(3, np.int8)),
         "layer 1: codes must be a numpy array of dtype uint8"),
        (one("codebook", n_in=4.0), "layer 1: n_in must be an int, got float"),
        (one("codebook", n_in=True), "layer 1: n_in must be an int, got bool"),
        (one("codebook", bits="4"), "layer 1: bits must be an int"),
        (one("codebook", packed=np.zeros(6, np.int8)), "layer 1: packed must be .* uint8"),
        (one("low_rank", V=np.zeros((2, 3), np.float64)), "layer 1: V must be"),
    ],
)
def test_write_wrong_type(tmp_path, layers, match):
    with pytest.raises(TypeError, match=match):
        write_model(tmp_path / "m.pykd", layers)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "layers, match",
    [
        ([], "non-empty"),
        (with_change(0, "b", np.zeros(4, F32)), r"layer 1: b must have shape \(5,\)"),
        (with_change(0, "W", np.zeros(30, F32)), "layer 1: W must be 2-D"),
        (with_change(0, "W", np.zeros((6, 0), F32)), "layer 1: W must be 2-D"),
        (with_change(0, "W", np.zeros((6, 4), F32)), r"layer 1: b must have shape \(4,\)"),
        (with_change(0, "activation", "softmax"), "layer 1: activation must be one of"),
        (with_change(0, "kind", "conv"), "layer 1: kind"),
        (with_change(0, "bias", 1), "layer 1 .*expected keys"),
        (with_change(0, "W", np.full((6, 5), np.inf, F32)), "layer 1: W contains NaN or inf"),
        (with_change(1, "scale", -np.ones(3, F32)), "layer 2: scale contains negative"),
        (with_change(1, "scale", np.full(3, np.nan, F32)), "layer 2: scale contains NaN"),
        (with_change(1, "q", np.full((5, 3), -128, np.int8)), r"layer 2: q contains -128"),
        (with_change(1, "x_scale", F32(0)), "layer 2: x_scale must be finite and at least the smallest"),
        (with_change(1, "x_scale", F32(np.inf)), "layer 2: x_scale must be finite and at least the smallest"),
        (with_change(1, "x_scale", F32(1e-40)), "layer 2: x_scale must be finite and at least the smallest"),
        (with_change(1, "q", np.zeros((4, 3), np.int8)),
         "layer sizes do not chain: layer 1 outputs 5 but layer 2 takes 4"),
        (one("dense_int8", (131072, 1)), "layer 1: n_in = 131072 is more than 131071"),
        (csr_layer("sparse_csr", indptr=np.array([1, 2, 2, 3], np.int32)), r"indptr\[0\] must be 0"),
        (csr_layer("sparse_csr", indptr=np.array([0, 2, 1, 3], np.int32)), "non-decreasing"),
        (csr_layer("sparse_csr", indptr=np.array([0, 2, 2, 2], np.int32)),
         r"layer 1: indptr\[-1\] must equal nnz = len\(indices\) = 3, got 2"),
        (csr_layer("sparse_csr", indptr=np.array([0], np.int32)), "layer 1: indptr must be 1-D"),
        (csr_layer("sparse_csr", indices=np.array([1, 4, 0], np.int32)),
         r"layer 1: indices must be in \[0, n_out = 4\), found 4"),
        (csr_layer("sparse_csr", indices=np.array([1, -1, 0], np.int32)), "found -1"),
        (csr_layer("sparse_csr", indices=np.array([3, 1, 0], np.int32)),
         "layer 1: indices in row 0 are not strictly increasing"),
        (csr_layer("sparse_csr", values=np.ones(2, F32)), r"layer 1: values must have shape \(3,\)"),
        (csr_layer("sparse_csr", values=np.array([1, np.nan, 1], F32)), "values contains NaN"),
        (csr_layer("sparse_codebook", codes=np.array([0, 6, 0], np.uint8)),
         "layer 1: codes must be < n_codes = 6, found 6"),
        (csr_layer("sparse_codebook", centroids=np.zeros(0, F32)),
         "layer 1: centroids must hold 1 to 256 values, got 0"),
        (csr_layer("sparse_codebook", centroids=np.zeros(257, F32)), "got 257"),
        (csr_layer("sparse_codebook", indices=np.array([1, 1, 0], np.int32)), "not strictly"),
        (one("low_rank", V=np.zeros((3, 3), F32)), "layer 1: V must have rank = U.shape.1. = 2 rows"),
        (one("low_rank", U=np.zeros((4, 0), F32)), "layer 1: U must be 2-D"),
        (one("codebook", n_in=0), r"layer 1: n_in must be in \[1, 2147483647\], got 0"),
        (one("codebook", bits=3), "layer 1: bits must be 4, the fewest"),
        (one("codebook", packed=np.zeros(5, np.uint8)), r"layer 1: packed must have shape \(6,\)"),
        (one("codebook", packed=np.full(6, 0x55, np.uint8)),
         "layer 1: packed: index 5 is >= n_codes = 5"),
        (one("codebook", (3, 3), packed=np.array([0, 0, 0, 0, 0x10], np.uint8)),
         "layer 1: packed: the unused high 4 bits"),
        (one("codebook", centroids=np.array([0, 1, np.inf, 2, 3], F32)), "centroids contains NaN"),
    ],
)
def test_write_invalid_value(tmp_path, layers, match):
    with pytest.raises(ValueError, match=match):
        write_model(tmp_path / "m.pykd", layers)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("which", ["norm", "out_norm"])
@pytest.mark.parametrize(
    "norm, exc, match",
    [
        ((0.5, 2.0), TypeError, "mean must be a float32"),
        ((F32(0), np.float64(1)), TypeError, "std"),
        ([F32(0), F32(1)], TypeError, "tuple"),
        ((F32(0), F32(0)), ValueError, "std must be > 0"),
        ((F32(np.nan), F32(1)), ValueError, "finite"),
        ((np.zeros(5, F32), np.ones(5, F32)), ValueError, r"shape \((6|3),\)"),
        ((np.zeros(6, F32), F32(1)), ValueError, "both"),
    ],
)
def test_write_invalid_norm(tmp_path, which, norm, exc, match):
    with pytest.raises(exc, match=f"^{which} .*{match}"):
        write_model(tmp_path / "m.pykd", make_layers(), **{which: norm})
    assert list(tmp_path.iterdir()) == []


def test_out_norm_shape_is_n_outputs(tmp_path):
    with pytest.raises(ValueError, match=r"out_norm .* shape \(3,\) \(n_outputs\)"):
        write_model(tmp_path / "m.pykd", make_layers(),
                    out_norm=(np.zeros(6, F32), np.ones(6, F32)))


def nested(depth):
    obj = {}
    for _ in range(depth - 1):
        obj = {"a": obj}
    return obj


@pytest.mark.parametrize("meta, exc, match", [
    ({"x": object()}, TypeError, "not JSON-serialisable"),
    ({"x": float("nan")}, TypeError, "not JSON-serialisable"),
    (["not", "a", "dict"], TypeError, "metadata must be a dict"),
    (nested(65), ValueError, "nested more than 64 levels deep"),
    (nested(100000), ValueError, "nested more than 64 levels deep"),
    ({"x": "y" * (16 * 2**20)}, ValueError, "metadata is too large"),
])
def test_write_invalid_metadata(tmp_path, meta, exc, match):
    with pytest.raises(exc, match=match):
        write_model(tmp_path / "m.pykd", make_layers(), metadata=meta)


def test_write_circular_metadata(tmp_path):
    meta = {"a": []}
    meta["a"].append(meta)
    with pytest.raises(ValueError, match="circular"):
        write_model(tmp_path / "m.pykd", make_layers(), metadata=meta)


def test_metadata_of_depth_64_round_trips(tmp_path):
    write_model(tmp_path / "m.pykd", make_layers(), metadata=nested(64))
    assert read_model(tmp_path / "m.pykd")["metadata"] == nested(64)


# --------------------------------------------------------------------------
# Atomic writing


def test_write_leaves_no_temp_file_and_normal_mode(tmp_path):
    write_model(tmp_path / "m.pykd", make_layers())
    write_model(tmp_path / "m.pykd", make_layers(seed=1))  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["m.pykd"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.pykd").stat().st_mode & 0o777 == 0o666 & ~umask
    assert_layers_equal(make_layers(seed=1), read_model(tmp_path / "m.pykd")["layers"])


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_failed_write_keeps_existing_file(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "m.pykd"
    write_model(path, make_layers())
    good = path.read_bytes()

    def boom(*args):
        raise OSError("disk on fire")

    monkeypatch.setattr(modelfile.os, fail_in, boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_model(path, make_layers(seed=1))
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.pykd"]


def test_invalid_write_keeps_existing_file(tmp_path):
    path = tmp_path / "m.pykd"
    write_model(path, make_layers())
    good = path.read_bytes()
    with pytest.raises(TypeError):
        write_model(path, with_change(0, "W", np.zeros((6, 5))))
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.pykd"]
