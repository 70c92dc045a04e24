"""Python writes a model file, pure Fortran reads and runs it: same answers.

The Fortran half is ``tests/fortran/predict_cli.f90`` (built by meson in the
``-Dpython=false`` build, ``make test-fortran``): it loads a model with
``pykd_load_model``, runs ``pykd_predict`` on raw float32 inputs and writes
raw float32 logits. The reference is NumPy:

* float32 layers: ``act(x @ W + b)``. The two sides use different BLAS
  builds (NumPy's bundled OpenBLAS, the system's for Fortran), which sum in
  different orders, so logits agree to ~1e-6, not bit for bit.
* int8 layers: ``pykd.int8_matmul(..., backend="numpy")`` (per-sample
  activation quantization, exact int32 product, float32 rescale). Every step
  is exact or a single correctly rounded float32 operation, so the logits
  are bit-identical, as long as the layer's input is: the input is the
  normalised data (elementwise, identical) or the output of float32 layers
  whose products are exact ("dyadic" weights below).

Bad files (wrong magic, version, checksum; truncated; unknown kind) must be
refused by both readers.
"""
import json
import os
import re
import subprocess
import zlib

import numpy as np
import pytest

import pykd
from pykd.modelfile import ModelFormatError, read_model, write_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.environ.get("PYKD_PREDICT_CLI") or os.path.join(
    REPO, "build", "fortran", "tests", "fortran", "predict_cli")

pytestmark = pytest.mark.skipif(
    not os.access(CLI, os.X_OK),
    reason=f"Fortran driver {CLI} not built: run `make test-fortran` (meson setup build/fortran "
           "-Dpython=false && meson compile -C build/fortran) or set PYKD_PREDICT_CLI",
)

SIZES = (784, 128, 64, 10)
TOL = 1e-5


@pytest.fixture(scope="module")
def pixels():
    """The Fashion-MNIST test images as uint8 (n, 784), or random ones."""
    try:
        from pykd.data import DEFAULT_DATA_DIR, read_idx
        return read_idx(DEFAULT_DATA_DIR / "t10k-images-idx3-ubyte.gz").reshape(-1, 784)
    except (OSError, ValueError):
        return np.random.default_rng(0).integers(0, 256, (10000, 784), dtype=np.uint8)


@pytest.fixture(scope="module")
def X(pixels):
    return np.divide(pixels, np.float32(255), dtype=np.float32)  # as pykd.data does


def he_layers(seed, activations=("relu", "tanh", "identity")):
    rng = np.random.default_rng(seed)
    layers = []
    for (n_in, n_out), act in zip(zip(SIZES[:-1], SIZES[1:]), activations):
        W = (rng.standard_normal((n_in, n_out)) * np.sqrt(2 / n_in)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
        layers.append({"kind": "dense", "W": W, "b": b, "activation": act})
    return layers


def to_int8(layer):
    q, scale = pykd.quantize_int8(layer["W"], per_channel=True, backend="numpy")
    return {"kind": "dense_int8", "q": q, "scale": scale, "b": layer["b"],
            "activation": layer["activation"]}


def reference(model, X):
    """NumPy forward pass of a model dict as returned by read_model."""
    h = X.astype(np.float32)
    if model["norm"] is not None:
        mean, std = model["norm"]
        h = (h - mean) / std
    for layer in model["layers"]:
        if layer["kind"] == "dense":
            h = h @ layer["W"]
            h += layer["b"]
        else:
            h = pykd.int8_matmul(h, layer["q"], layer["scale"], layer["b"], backend="numpy")
        if layer["activation"] == "relu":
            h = np.maximum(h, 0)
        elif layer["activation"] == "tanh":
            h = np.tanh(h)
    return h


def run_fortran(tmp_path, model_path, X, chunk=0, resave=None):
    inp, out = tmp_path / "x.f32", tmp_path / "logits.f32"
    np.ascontiguousarray(X, dtype="<f4").tofile(inp)
    args = [CLI, str(model_path), str(inp), str(out), str(chunk)]
    if resave is not None:
        args.append(str(resave))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return np.fromfile(out, dtype="<f4").reshape(X.shape[0], -1)


def assert_same_predictions(ref, got, margin):
    """argmax equal except where the reference's top two are within `margin`."""
    top2 = np.sort(ref, axis=1)[:, -2:]
    near_tie = top2[:, 1] - top2[:, 0] <= margin
    differ = ref.argmax(axis=1) != got.argmax(axis=1)
    assert not (differ & ~near_tie).any(), f"{int((differ & ~near_tie).sum())} predictions differ"


def test_float32_model_matches_numpy(tmp_path, X):
    mean = X.mean(axis=0, dtype=np.float64).astype(np.float32)
    std = (X.std(axis=0, dtype=np.float64) + 0.1).astype(np.float32)
    path = tmp_path / "f32.pykd"
    write_model(path, he_layers(1), norm=(mean, std), metadata={"test": "float32"})
    ref = reference(read_model(path), X)
    got = run_fortran(tmp_path, path, X)
    assert got.shape == ref.shape == (X.shape[0], 10)
    np.testing.assert_allclose(got, ref, rtol=TOL, atol=TOL)
    assert_same_predictions(ref, got, margin=4 * TOL * max(1, np.abs(ref).max()))
    # Chunks from an OpenMP loop, one workspace per thread: same logits.
    chunked = run_fortran(tmp_path, path, X, chunk=333)
    np.testing.assert_allclose(chunked, got, rtol=TOL, atol=TOL)


def test_int8_model_is_bit_identical(tmp_path, X):
    layers = [to_int8(layer) for layer in he_layers(2, ("relu", "relu", "identity"))]
    path = tmp_path / "int8.pykd"
    write_model(path, layers, norm=(np.float32(0.286), np.float32(0.353)))
    ref = reference(read_model(path), X)
    got = run_fortran(tmp_path, path, X)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), \
        f"max |diff| {np.abs(got - ref).max()}"
    assert np.array_equal(got.argmax(axis=1), ref.argmax(axis=1))
    # Per-sample quantization: a sample's result does not depend on its batch.
    assert np.array_equal(run_fortran(tmp_path, path, X, chunk=97), got)


def test_float32_then_int8_is_bit_identical_with_dyadic_weights(tmp_path, pixels):
    """A float32 layer feeding int8 layers. Weights are multiples of 1/16 and
    inputs (x - 128) / 64 multiples of 1/64, so every product and partial sum
    is exact in float32 whatever the BLAS summation order, and the int8 layers
    see identical inputs. (With arbitrary float weights a 1-ulp difference
    can move a quantized activation by one step; see the module docstring.)"""
    rng = np.random.default_rng(3)
    X = pixels.astype(np.float32)
    dense = {"kind": "dense", "activation": "relu",
             "W": (rng.integers(-8, 9, (784, 128)) / 16).astype(np.float32),
             "b": (rng.integers(-8, 9, 128) / 16).astype(np.float32)}
    tail = [to_int8(layer) for layer in he_layers(4, ("relu", "relu", "identity"))[1:]]
    path = tmp_path / "mixed.pykd"
    write_model(path, [dense] + tail, norm=(np.float32(128), np.float32(64)))
    ref = reference(read_model(path), X)
    got = run_fortran(tmp_path, path, X)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), \
        f"max |diff| {np.abs(got - ref).max()}"


def test_model_saved_by_fortran_reads_back_in_python(tmp_path, X):
    layers = he_layers(5)
    layers[1] = to_int8(layers[1])
    path, again = tmp_path / "orig.pykd", tmp_path / "again.pykd"
    meta = {"name": "round trip", "unicode": "\u00e9\u4e2d", "nested": {"a": [1, 2.5]}}
    mean = np.linspace(0, 1, 784, dtype=np.float32)
    std = np.linspace(1, 2, 784, dtype=np.float32)
    write_model(path, layers, norm=(mean, std), metadata=meta)
    run_fortran(tmp_path, path, X[:10], resave=again)
    assert again.read_bytes() == path.read_bytes()  # the same bytes, CRC included
    m = read_model(again)
    assert m["metadata"] == meta and m["n_features"] == 784 and m["n_outputs"] == 10
    assert [layer["kind"] for layer in m["layers"]] == ["dense", "dense_int8", "dense"]


def _bad(data, what):
    if what == "magic":
        return b"XYKDMDL\0" + data[8:]
    if what == "version":
        return data[:8] + (7).to_bytes(4, "little") + data[12:]
    if what == "truncated":
        return data[: len(data) // 2]
    if what == "checksum":
        mid = len(data) // 2
        return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
    if what == "trailing":
        return data + b"\0\0\0"
    if what == "unknown kind":  # layer 1 kind = 9, with a valid CRC
        at = 28 + 4 + 4 + 2       # no norms, metadata "{}"
        body = data[:at] + (9).to_bytes(4, "little") + data[at + 4:-12]
        return body + zlib.crc32(body).to_bytes(4, "little") + data[-8:]
    raise AssertionError(what)


@pytest.mark.parametrize("what, phrase", [
    ("magic", "bad magic"),
    ("version", "unsupported model format version 7"),
    ("truncated", "truncated"),
    ("checksum", "checksum mismatch"),
    ("trailing", "trailing garbage"),
    ("unknown kind", "layer 1: unknown kind 9"),
])
def test_bad_files_are_refused_by_both_readers(tmp_path, what, phrase):
    good = tmp_path / "good.pykd"
    write_model(good, he_layers(6), metadata={})
    assert json.dumps(read_model(good)["metadata"]) == "{}"
    bad = tmp_path / "bad.pykd"
    bad.write_bytes(_bad(good.read_bytes(), what))
    with pytest.raises(ModelFormatError, match=re.escape(phrase)):
        read_model(bad)
    inp = tmp_path / "x.f32"
    np.zeros((1, 784), "<f4").tofile(inp)
    proc = subprocess.run([CLI, str(bad), str(inp), str(tmp_path / "out.f32")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert phrase in proc.stderr and str(bad) in proc.stderr, proc.stderr
