"""Tests for pykd.modelfile: the binary model format."""

import os
import tempfile
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykd import modelfile
from pykd.modelfile import ModelFormatError, read_model, write_model


def make_layers(sizes=(6, 5, 3), seed=0):
    """A dense relu layer, then dense_int8 layers; sizes are (n_features, ..., n_outputs)."""
    rng = np.random.default_rng(seed)
    layers = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        b = rng.standard_normal(n_out).astype(np.float32)
        if k == 0:
            W = rng.standard_normal((n_in, n_out)).astype(np.float32)
            layers.append({"kind": "dense", "W": W, "b": b, "activation": "relu"})
        else:
            q = rng.integers(-127, 128, (n_in, n_out)).astype(np.int8)
            scale = rng.uniform(0.01, 1, n_out).astype(np.float32)
            layers.append(
                {"kind": "dense_int8", "q": q, "scale": scale, "b": b, "activation": "identity"}
            )
    return layers


def assert_layers_equal(expected, got):
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.keys() == g.keys()
        for key, value in e.items():
            if isinstance(value, np.ndarray):
                assert g[key].dtype == value.dtype and g[key].shape == value.shape
                assert g[key].tobytes() == value.tobytes(), key  # bitwise
                assert g[key].flags.c_contiguous and g[key].flags.writeable
                assert g[key].flags.owndata
            else:
                assert g[key] == value


def u32(data, offset):
    return int.from_bytes(data[offset : offset + 4], "little")


def patch(data, offset, new, fix_crc=True):
    """Overwrite bytes at ``offset``; optionally recompute the CRC so only ``new`` is wrong."""
    data = bytearray(data)
    data[offset : offset + len(new)] = new
    if fix_crc:
        data[-12:-8] = zlib.crc32(data[:-12]).to_bytes(4, "little")
    return bytes(data)


def le32(v):
    return int(v).to_bytes(4, "little")


@pytest.fixture
def model_file(tmp_path):
    """A 6 -> 5 -> 3 model with scalar norm and metadata {"a": 1} (M = 8)."""
    path = tmp_path / "m.pykd"
    write_model(path, make_layers(), norm=(np.float32(0.5), np.float32(2.0)), metadata={"a": 1})
    return path


# Byte offsets inside model_file: header 28, norm 8, meta_len 4 + 8 bytes JSON.
LAYER1 = 28 + 8 + 4 + len(b'{"a": 1}')
LAYER2 = LAYER1 + 16 + 4 * 6 * 5 + 4 * 5


def check_error(tmp_path, data, match):
    bad = tmp_path / "bad.pykd"
    bad.write_bytes(data)
    with pytest.raises(ModelFormatError, match=match) as info:
        read_model(bad)
    assert str(bad) in str(info.value)  # message names the file


# --------------------------------------------------------------------------
# Round trips and layout


@pytest.mark.parametrize(
    "norm",
    [
        None,
        (np.float32(0.25), np.float32(3.0)),
        (np.asarray(np.float32(-1.5)), np.asarray(np.float32(0.5))),
        (np.linspace(-1, 1, 6, dtype=np.float32), np.linspace(0.5, 2, 6, dtype=np.float32)),
    ],
)
def test_round_trip(tmp_path, norm):
    layers = make_layers()
    meta = {"teacher": "mlp", "lr": 0.01, "sizes": [6, 5, 3], "note": "héllo ✓"}
    path = tmp_path / "model.pykd"
    write_model(path, layers, norm=norm, metadata=meta)
    model = read_model(path)
    assert model["version"] == 1
    assert model["n_features"] == 6 and model["n_outputs"] == 3
    assert model["metadata"] == meta
    assert_layers_equal(layers, model["layers"])
    if norm is None:
        assert model["norm"] is None
    else:
        for e, g in zip(norm, model["norm"]):
            assert np.asarray(g).dtype == np.float32
            assert np.asarray(g).tobytes() == np.asarray(e).tobytes()


def test_round_trip_non_contiguous_and_default_metadata(tmp_path):
    W = np.arange(12, dtype=np.float32).reshape(3, 4).T  # Fortran-ordered view
    layers = [{"kind": "dense", "W": W, "b": np.zeros(3, np.float32), "activation": "tanh"}]
    write_model(tmp_path / "m.pykd", layers)
    model = read_model(tmp_path / "m.pykd")
    assert model["metadata"] == {}
    np.testing.assert_array_equal(model["layers"][0]["W"], W)
    assert model["layers"][0]["activation"] == "tanh"


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=5),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(sizes, seed):
    layers = make_layers(tuple(sizes), seed)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.pykd")
        write_model(path, layers, metadata={"seed": seed})
        model = read_model(path)
    assert_layers_equal(layers, model["layers"])
    assert (model["n_features"], model["n_outputs"]) == (sizes[0], sizes[-1])


def test_byte_layout_matches_spec(model_file):
    data = model_file.read_bytes()
    assert data[:8] == b"PYKDMDL\0" == modelfile.MAGIC
    assert [u32(data, o) for o in (8, 12, 16, 20, 24)] == [1, 2, 6, 3, 2]
    assert np.frombuffer(data[28:36], "<f4").tolist() == [0.5, 2.0]
    assert u32(data, 36) == 8 and data[40:48] == b'{"a": 1}'
    # layer 1: dense (1), relu (1), 6 -> 5; layer 2: dense_int8 (2), identity (0), 5 -> 3
    assert [u32(data, LAYER1 + 4 * i) for i in range(4)] == [1, 1, 6, 5]
    assert [u32(data, LAYER2 + 4 * i) for i in range(4)] == [2, 0, 5, 3]
    W = np.frombuffer(data[LAYER1 + 16 : LAYER1 + 16 + 120], "<f4").reshape(6, 5)
    np.testing.assert_array_equal(W, make_layers()[0]["W"])  # NumPy (n_in, n_out), C order
    end = LAYER2 + 16 + 5 * 3 + 4 * 3 + 4 * 3
    assert len(data) == end + 12
    assert u32(data, end) == zlib.crc32(data[:end])
    assert data[end + 4 :] == b"PYKDEND\0" == modelfile.END_MAGIC


def test_worked_example_size_in_docs(tmp_path):
    # docs/format.md walks through this model; its size must match.
    layers = [
        {"kind": "dense", "W": np.zeros((784, 100), np.float32),
         "b": np.zeros(100, np.float32), "activation": "relu"},
        {"kind": "dense", "W": np.zeros((100, 10), np.float32),
         "b": np.zeros(10, np.float32), "activation": "identity"},
    ]
    norm = (np.zeros(784, np.float32), np.ones(784, np.float32))
    write_model(tmp_path / "m.pykd", layers, norm=norm)
    data = (tmp_path / "m.pykd").read_bytes()
    assert len(data) == 324390
    assert u32(data, 6300) == 2 and [u32(data, 320322 + 4 * i) for i in range(4)] == [1, 0, 100, 10]


def test_public_constants():
    assert modelfile.VERSION == 1
    assert modelfile.KIND_CODES["dense"] == 1 and modelfile.KIND_CODES["dense_int8"] == 2
    assert modelfile.ACTIVATION_CODES == {"identity": 0, "relu": 1, "tanh": 2}
    assert modelfile.NORM_CODES == {"none": 0, "per_feature": 1, "scalar": 2}
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC documented in format.md


# --------------------------------------------------------------------------
# Reader errors


@pytest.mark.parametrize("cut", [3, 8, 11, 14, 30, LAYER1 + 2, LAYER1 + 50, LAYER2 + 20, -13, -12, -5, -1])
def test_truncated(model_file, tmp_path, cut):
    data = model_file.read_bytes()
    check_error(tmp_path, data[:cut], "truncated")


def test_empty_file(tmp_path):
    check_error(tmp_path, b"", "bad magic")


@pytest.mark.parametrize("offset", [12, 20, 30, 38, LAYER1 + 20, LAYER2 + 17, -13, -10])
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


def test_wrong_version(model_file, tmp_path):
    data = patch(model_file.read_bytes(), 8, le32(7))
    check_error(
        tmp_path, data, r"unsupported model format version 7 \(this pykd reads version 1\)"
    )


def test_trailing_garbage(model_file, tmp_path):
    data = model_file.read_bytes()
    check_error(tmp_path, data + b"junk!", "trailing garbage: 5 unexpected bytes")


def test_unknown_kind(model_file, tmp_path):
    data = patch(model_file.read_bytes(), LAYER2, le32(9))
    check_error(tmp_path, data, "layer 2: unknown kind 9")


def test_reserved_kind(model_file, tmp_path):
    data = patch(model_file.read_bytes(), LAYER2, le32(3))
    check_error(tmp_path, data, r"layer 2: kind 3 \(sparse_csr\) is reserved")


def test_unknown_activation(model_file, tmp_path):
    data = patch(model_file.read_bytes(), LAYER1 + 4, le32(5))
    check_error(tmp_path, data, "layer 1: unknown activation 5")


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


def test_unknown_norm_kind(model_file, tmp_path):
    check_error(tmp_path, patch(model_file.read_bytes(), 24, le32(3)), "unknown norm kind 3")


@pytest.mark.parametrize(
    "offset, value, match",
    [
        (36, 0xFFFFFFF0, "truncated: metadata needs 4294967280 bytes"),  # meta_len
        (12, 0xFFFFFFFF, "truncated"),  # n_layers
        (LAYER2 + 12, 0x7FFFFFFF, "truncated"),  # n_out of the last layer
    ],
)
def test_huge_sizes_are_rejected_without_allocating(model_file, tmp_path, offset, value, match):
    data = patch(model_file.read_bytes(), offset, le32(value))
    check_error(tmp_path, data, match)


def test_huge_per_feature_norm(model_file, tmp_path):
    data = patch(model_file.read_bytes(), 16, le32(2**31 - 1))
    data = patch(data, 24, le32(1))
    check_error(tmp_path, data, "truncated: norm mean needs")


def test_nan_in_file(model_file, tmp_path):
    nan = np.array(np.nan, "<f4").tobytes()
    check_error(tmp_path, patch(model_file.read_bytes(), LAYER1 + 16, nan), "layer 1: W contains NaN")


def test_nonpositive_std_in_file(model_file, tmp_path):
    zero = np.array(0, "<f4").tobytes()
    check_error(tmp_path, patch(model_file.read_bytes(), 32, zero), "std must be > 0")


@pytest.mark.parametrize(
    "meta, match",
    [(b'{"a": 1,', "not valid UTF-8 JSON"), (b"[1, 2]  ", "not a JSON object"), (b'{"\xff": 1}', "UTF-8")],
)
def test_bad_metadata_in_file(model_file, tmp_path, meta, match):
    assert len(meta) == 8  # keep every later offset unchanged
    check_error(tmp_path, patch(model_file.read_bytes(), 40, meta), match)


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_model(tmp_path / "nope.pykd")


# --------------------------------------------------------------------------
# Writer validation


def with_change(layer_index, key, value, sizes=(6, 5, 3)):
    layers = make_layers(sizes)
    layers[layer_index][key] = value
    return layers


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
        (["not a dict"], "layer 1: must be a dict"),
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
        (with_change(0, "b", np.zeros(4, np.float32)), r"layer 1: b must have shape \(5,\)"),
        (with_change(0, "W", np.zeros(30, np.float32)), "layer 1: W must be 2-D"),
        (with_change(0, "W", np.zeros((6, 0), np.float32)), "layer 1: W must be 2-D"),
        (with_change(0, "W", np.zeros((6, 4), np.float32)), r"layer 1: b must have shape \(4,\)"),
        (with_change(0, "activation", "sigmoid"), "layer 1: activation"),
        (with_change(0, "kind", "conv"), "layer 1: kind"),
        (with_change(0, "bias", 1), "layer 1 .*expected keys"),
        (with_change(0, "W", np.full((6, 5), np.inf, np.float32)), "layer 1: W contains NaN or inf"),
        (with_change(1, "scale", -np.ones(3, np.float32)), "layer 2: scale contains negative"),
        (with_change(1, "q", np.zeros((4, 3), np.int8)),
         "layer sizes do not chain: layer 1 outputs 5 but layer 2 takes 4"),
    ],
)
def test_write_invalid_value(tmp_path, layers, match):
    with pytest.raises(ValueError, match=match):
        write_model(tmp_path / "m.pykd", layers)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "norm, exc, match",
    [
        ((0.5, 2.0), TypeError, "norm mean must be a float32"),
        ((np.float32(0), np.float64(1)), TypeError, "norm std"),
        ([np.float32(0), np.float32(1)], TypeError, "tuple"),
        ((np.float32(0), np.float32(0)), ValueError, "std must be > 0"),
        ((np.float32(np.nan), np.float32(1)), ValueError, "finite"),
        ((np.zeros(5, np.float32), np.ones(5, np.float32)), ValueError, r"shape \(6,\)"),
        ((np.zeros(6, np.float32), np.float32(1)), ValueError, "both"),
    ],
)
def test_write_invalid_norm(tmp_path, norm, exc, match):
    with pytest.raises(exc, match=match):
        write_model(tmp_path / "m.pykd", make_layers(), norm=norm)


@pytest.mark.parametrize("meta", [{"x": object()}, {"x": float("nan")}, ["not", "a", "dict"]])
def test_write_invalid_metadata(tmp_path, meta):
    with pytest.raises(TypeError, match="metadata"):
        write_model(tmp_path / "m.pykd", make_layers(), metadata=meta)


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
