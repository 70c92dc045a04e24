"""pykd.Model: every layer kind through the one Fortran network routine against
the NumPy twins, the layout of docs/model.md, conversions to and from MLP,
files, threads and bad inputs."""
import threading

import numpy as np
import pytest

import pykd
from pykd import _codes
from pykd.layers import Dense, DenseInt8
from pykd.models import MLP, Model, load_model

from kinds_helpers import (ACTIVATIONS, F32, KINDS, act64, assert_close, dense64,
                           make_layer)


def chain(kinds, acts, rng, sizes=None, static=False):
    sizes = sizes or [13] + [11, 9, 8, 7, 6, 5][:len(kinds)]
    return [make_layer(k, n_in, n_out, a, rng, static=static)
            for k, a, n_in, n_out in zip(kinds, acts, sizes[:-1], sizes[1:])]


def twin_chain(layers, x, norm=None, out_norm=None):
    """Layer by layer with the twins, from the definitions of docs/model.md."""
    h = x if norm is None else ((x - norm[0]) / norm[1]).astype(F32)
    for layer in layers:
        h = layer.forward_numpy(h)
    return h if out_norm is None else (h * out_norm[1] + out_norm[0]).astype(F32)


# ------------------------------------------------------------- Fortran == twin

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_fortran_forward_equals_twin(kind, act):
    rng = np.random.default_rng([KINDS.index(kind), ACTIVATIONS.index(act), 1])
    layers = chain([kind, kind], [act, "identity"], rng)
    model = Model(layers)
    X = (rng.standard_normal((37, 13)) * 1.5).astype(F32)
    want = twin_chain(model.layers, X)
    for n, bs in ((1, 1), (5, 2), (37, 8), (37, 1024)):
        got = model.forward(X[:n], batch_size=bs)
        if kind == "dense_int8" and act in ("identity", "relu"):
            assert np.array_equal(got, want[:n]), (n, bs)    # exact int32 sums
        else:
            assert_close(got, want[:n])


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_backend_equals_float64_reference(kind):
    rng = np.random.default_rng([KINDS.index(kind), 2])
    layers = chain([kind, "dense"], ["tanh", "identity"], rng)
    model = Model(layers, backend="numpy")
    X = rng.standard_normal((6, 13)).astype(F32)
    h1 = model.layers[0].forward_numpy(X).astype(np.float64)
    want = act64(h1 @ dense64(model.layers[1]) + model.layers[1].b, "identity")
    assert_close(model.forward(X), want)


def test_all_kinds_in_one_model():
    rng = np.random.default_rng(5)
    acts = ["relu", "gelu", "silu", "sigmoid", "tanh", "identity"]
    layers = chain(list(KINDS), acts, rng)
    model = Model(layers, norm=(0.25, 1.5), out_norm=(np.float32(2), np.float32(0.5)))
    X = rng.standard_normal((20, 13)).astype(F32)
    want = twin_chain(model.layers, X, (F32(0.25), F32(1.5)), (F32(2), F32(0.5)))
    assert np.array_equal(model.forward(X, backend="numpy"), want)
    for bs in (1, 7, 64):
        assert_close(model.forward(X, batch_size=bs), want)


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
def test_upto_gives_hidden_outputs(backend):
    rng = np.random.default_rng(6)
    layers = chain(["dense"] * 3, ["relu", "tanh", "identity"], rng)
    model = Model(layers, norm=(0.5, 2.0), out_norm=(1.0, 3.0), backend=backend)
    X = rng.standard_normal((9, 13)).astype(F32)
    h = ((X - F32(0.5)) / F32(2)).astype(F32)
    for k, layer in enumerate(model.layers, start=1):
        h = layer.forward_numpy(h)
        got = model.forward(X, upto=k)
        if k < 3:
            assert got.shape == (9, layer.n_out)
            assert_close(got, h)                   # hidden: no output normalisation
    assert_close(model.forward(X, upto=3), h * F32(3) + F32(1))
    assert np.array_equal(model.forward(X, upto=3), model.forward(X))


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
def test_per_feature_norms(backend):
    rng = np.random.default_rng(8)
    layers = chain(["dense", "dense"], ["relu", "identity"], rng)
    mean = rng.standard_normal(13).astype(F32)
    std = (rng.random(13) + 0.5).astype(F32)
    omean = rng.standard_normal(9).astype(F32)
    ostd = (rng.random(9) + 0.5).astype(F32)
    model = Model(layers, norm=(mean, std), out_norm=(omean, ostd), backend=backend)
    X = rng.standard_normal((11, 13)).astype(F32)
    want = twin_chain(model.layers, X, (mean, std), (omean, ostd))
    assert_close(model.forward(X), want)
    # float64 reference of the whole thing
    h = (X.astype(np.float64) - mean) / std
    h = np.maximum(h @ dense64(model.layers[0]) + model.layers[0].b, 0)
    h = (h @ dense64(model.layers[1]) + model.layers[1].b) * ostd + omean
    assert_close(model.forward(X), h)


def test_mlp_forward_runs_the_network_routine():
    rng = np.random.default_rng(10)
    mlp = MLP([13, 11, 9], seed=3, norm=(0.1, 1.7))
    X = rng.standard_normal((50, 13)).astype(F32)
    net = mlp.to_model()
    assert np.array_equal(mlp.forward(X, batch_size=16), net.forward(X, batch_size=16))
    assert np.array_equal(mlp.forward(X, backend="numpy"), net.forward(X, backend="numpy"))
    h = (X.astype(np.float64) - F32(0.1)) / F32(1.7)
    (W1, b1), (W2, b2) = mlp.layers
    want = np.maximum(h @ W1 + b1, 0) @ W2 + b2
    assert_close(mlp.forward(X), want)
    assert_close(mlp.forward(X, upto=1), np.maximum(h @ W1 + b1, 0))


def test_non_float32_and_strided_inputs_are_converted():
    rng = np.random.default_rng(11)
    model = Model(chain(["dense", "dense"], ["relu", "identity"], rng))
    X = rng.standard_normal((10, 13))
    want = model.forward(X.astype(F32))
    assert np.array_equal(model.forward(X), want)
    assert np.array_equal(model.forward(np.asfortranarray(X.astype(F32))), want)
    assert model.forward(np.zeros((0, 13), F32)).shape == (0, 9)


# ------------------------------------------------------------------ layout

def test_layout_table_and_views():
    rng = np.random.default_rng(12)
    layers = chain(list(KINDS), ["relu"] * 6, rng)
    model = Model(layers)
    t = model.table
    assert t.dtype == np.int64 and t.shape == (6, _codes.N_FIELDS) and t.flags.c_contiguous
    C = _codes.COL
    for buf in (model.f32, model.i8, model.i32):
        assert buf.ndim == 1 and buf.size >= 1
    used = {name: np.zeros(buf.size, int) for name, buf in
            (("f32", model.f32), ("i8", model.i8), ("i32", model.i32))}
    for row, layer, given in zip(t, model.layers, layers):
        assert row[C["kind"]] == _codes.KINDS[layer.kind]
        assert row[C["act"]] == _codes.ACTIVATIONS["relu"]
        assert (row[C["n_in"]], row[C["n_out"]]) == (layer.n_in, layer.n_out)
        assert tuple(row[C["p1"]:C["p4"] + 1]) == layer.kind_params()
        for name in used:
            off, n = row[C[name + "_off"]], row[C[name + "_len"]]
            assert off + n <= used[name].size
            used[name][off:off + n] += 1
        # The layer's arrays are views of the buffers; the given layer is untouched.
        first = {"dense": "W", "dense_int8": "q", "sparse_csr": "values", "low_rank": "U",
                 "codebook": "packed", "sparse_codebook": "codes"}[layer.kind]
        buf = model.i8 if first in ("q", "packed", "codes") else model.f32
        assert np.shares_memory(getattr(layer, first), buf)
        assert not np.shares_memory(getattr(given, first), buf)
        assert layer is not given and np.array_equal(layer.to_dense(), given.to_dense())
    for name, count in used.items():
        assert count.max() <= 1, f"slices of {name} overlap"
    # dense: W then b; sparse_csr: values then b, indptr then indices
    d = model.layers[0]
    off = t[0, C["f32_off"]]
    assert np.array_equal(model.f32[off:off + d.W.size], d.W.ravel())
    s = model.layers[2]
    off = t[2, C["i32_off"]]
    assert np.array_equal(model.i32[off:off + s.indptr.size], s.indptr)
    assert np.array_equal(model.i32[off + s.indptr.size:off + s.indptr.size + s.nnz], s.indices)
    q = model.layers[1]
    off = t[1, C["f32_off"]]
    assert t[1, C["f32_len"]] == 2 * q.n_out + 1
    assert model.f32[off + 2 * q.n_out] == 0                # x_scale slot: 0 when dynamic


def test_counts_and_repr():
    rng = np.random.default_rng(13)
    layers = chain(list(KINDS), ["relu"] * 6, rng)
    model = Model(layers)
    assert model.parameters == sum(layer.parameters for layer in layers)
    assert model.nonzeros == sum(int(np.count_nonzero(dense64(layer))) for layer in layers)
    assert model.nbytes == sum(layer.nbytes for layer in layers)
    assert model.sizes == [13, 11, 9, 8, 7, 6, 5]
    assert (model.n_features, model.n_outputs) == (13, 5)
    text = repr(model)
    for kind in KINDS:
        assert kind in text


# ------------------------------------------------------- MLP <-> Model

def test_to_model_is_zero_copy():
    mlp = MLP([13, 11, 9], seed=1, norm=(0.0, 2.0))
    model = mlp.to_model()
    assert model.f32 is mlp.params or np.shares_memory(model.f32, mlp.params)
    assert model.f32.size == mlp.params.size
    for layer, (W, b) in zip(model.layers, mlp.layers):
        assert np.shares_memory(layer.W, mlp.params) and np.shares_memory(layer.b, mlp.params)
    X = np.random.default_rng(0).standard_normal((4, 13)).astype(F32)
    before = model.forward(X)
    mlp.params *= 2                               # training the MLP changes the model
    assert not np.array_equal(model.forward(X), before)
    back = model.to_mlp()
    assert np.shares_memory(back.params, mlp.params)
    assert np.array_equal(back.forward(X), mlp.forward(X))


def test_to_mlp_densifies_and_dequantizes():
    rng = np.random.default_rng(14)
    layers = chain(list(KINDS), ["relu"] * 5 + ["identity"], rng)
    model = Model(layers, norm=(0.5, 2.0))
    mlp = model.to_mlp()
    assert isinstance(mlp, MLP) and mlp.sizes == model.sizes
    assert not np.shares_memory(mlp.params, model.f32)
    for (W, b), layer in zip(mlp.layers, model.layers):
        assert np.array_equal(W, layer.to_dense()) and np.array_equal(b, layer.b)
        assert_close(W, dense64(layer))
    X = rng.standard_normal((8, 13)).astype(F32)
    # int8 activations are quantized in the model, not in the MLP: close, not equal
    float_only = Model([Dense(layer.to_dense(), layer.b.copy(), layer.activation)
                        for layer in model.layers], norm=(0.5, 2.0))
    assert_close(mlp.forward(X, backend="numpy"), float_only.forward(X, backend="numpy"))
    gelu = Model(chain(["dense_int8", "dense"], ["gelu", "silu"], rng))
    assert gelu.to_mlp().activations == ["gelu", "silu"]      # every activation trains
    # Per-feature input and per-output normalisations and the task are carried.
    norm = (rng.standard_normal(13).astype(F32), (1 + rng.random(13)).astype(F32))
    out_norm = (rng.standard_normal(11).astype(F32), (1 + rng.random(11)).astype(F32))
    reg = Model(chain(["dense"], ["relu"], rng), norm=norm, out_norm=out_norm,
                metadata={"task": "regression"})
    back = reg.to_mlp()
    assert back.task == "regression" and np.array_equal(back.norm[0], norm[0])
    assert np.array_equal(back.out_norm[1], out_norm[1])
    assert np.array_equal(back.forward(X), reg.forward(X))
    assert np.array_equal(back.predict(X), reg.forward(X))       # regression: the outputs


def test_fit_rejects_a_model_with_a_hint():
    model = Model(chain(["dense"], ["relu"], np.random.default_rng(0)))
    with pytest.raises(TypeError, match="to_mlp"):
        pykd.fit(model, np.zeros((2, 13), F32), np.zeros(2, np.int64), progress=False)


# ------------------------------------------------------------------ files

@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_every_kind(kind, tmp_path):
    rng = np.random.default_rng([KINDS.index(kind), 15])
    layers = chain([kind, kind], ["gelu", "identity"], rng, static=True)
    model = Model(layers, norm=(np.arange(13, dtype=F32), np.full(13, 2, F32)),
                  out_norm=(1.0, 4.0), metadata={"note": kind})
    model.save(tmp_path / "m.pykd", metadata={"extra": 1})
    again = load_model(tmp_path / "m.pykd")
    if kind == "dense":                  # dense float32 layers (gelu trains): an MLP
        assert isinstance(again, MLP)    # (its flat training buffer: packed as a Model's)
        mlp = again.to_model()
        again = Model(mlp.layers, norm=mlp.norm, out_norm=mlp.out_norm, metadata=mlp.metadata)
    assert isinstance(again, Model) and again.kinds == [kind, kind]
    assert again.metadata["note"] == kind and again.metadata["extra"] == 1
    assert np.array_equal(again.table, model.table)
    assert np.array_equal(again.f32, model.f32)
    assert np.array_equal(again.i8, model.i8) and np.array_equal(again.i32, model.i32)
    X = rng.standard_normal((6, 13)).astype(F32)
    for backend in ("fortran", "numpy"):
        assert np.array_equal(again.forward(X, backend=backend),
                              model.forward(X, backend=backend))


def test_load_model_returns_mlp_or_model(tmp_path):
    rng = np.random.default_rng(16)
    mlp = MLP([13, 11, 9], seed=2, norm=(0.5, 2.0))
    mlp.save(tmp_path / "mlp.pykd")
    assert isinstance(load_model(tmp_path / "mlp.pykd"), MLP)
    cases = {
        "int8": Model(chain(["dense_int8", "dense"], ["relu", "identity"], rng)),
        "gelu": Model(chain(["dense", "dense"], ["gelu", "identity"], rng)),
        "per_feature": Model(chain(["dense"], ["relu"], rng),
                             norm=(np.zeros(13, F32), np.ones(13, F32))),
        "out_norm": Model(chain(["dense"], ["relu"], rng), out_norm=(0.0, 2.0)),
    }
    for name, model in cases.items():
        model.save(tmp_path / f"{name}.pykd")
        want = Model if name == "int8" else MLP   # dense layers (any activation): trainable
        assert type(load_model(tmp_path / f"{name}.pykd")) is want, name
    dense = Model(chain(["dense", "dense"], ["tanh", "identity"], rng), norm=(1.0, 3.0))
    dense.save(tmp_path / "dense.pykd")
    loaded = load_model(tmp_path / "dense.pykd")
    assert isinstance(loaded, MLP)
    X = rng.standard_normal((5, 13)).astype(F32)
    assert np.array_equal(loaded.forward(X), dense.forward(X))


def test_load_model_refuses_non_paths():
    with pytest.raises(TypeError, match="path"):
        load_model(3)


# ---------------------------------------------------------------- threads

def test_two_threads_share_one_model():
    rng = np.random.default_rng(17)
    layers = [make_layer(KINDS[i], n_in, n_out, "relu", rng) for i, (n_in, n_out) in
              enumerate([(200, 300), (300, 300), (300, 250), (250, 200), (200, 150), (150, 10)])]
    model = Model(layers, norm=(0.1, 1.3))
    X = [rng.standard_normal((3000, 200)).astype(F32) for _ in range(2)]
    want = [model.forward(x, batch_size=256) for x in X]
    got = [[None] * 4 for _ in range(2)]
    barrier = threading.Barrier(2)

    def run(i):
        barrier.wait()
        for r in range(4):
            got[i][r] = model.forward(X[i], batch_size=256)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        for r in range(4):
            assert np.array_equal(got[i][r], want[i]), (i, r)


# -------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("backend", ["fortran", "numpy"])
def test_nonfinite_into_int8_names_the_layer(backend):
    rng = np.random.default_rng(18)
    model = Model(chain(["dense", "dense_int8"], ["relu", "identity"], rng), backend=backend)
    X = rng.standard_normal((4, 13)).astype(F32)
    X[2, 5] = np.nan
    with pytest.raises(ValueError, match=r"layer 2 \(dense_int8\).*NaN or inf"):
        model.forward(X)


@pytest.mark.parametrize("backend", ["fortran", "numpy"])
def test_predict_names_rows_with_nonfinite_logits(backend):
    rng = np.random.default_rng(19)
    model = Model(chain(["dense", "dense"], ["relu", "identity"], rng), backend=backend)
    X = rng.standard_normal((5, 13)).astype(F32)
    X[3, 0] = np.nan
    logits = model.forward(X)
    assert np.isnan(logits[3]).all() and np.isfinite(np.delete(logits, 3, 0)).all()
    with pytest.raises(ValueError, match=r"rows 3\)"):
        model.predict(X)
    assert model.predict(np.delete(X, 3, 0)).shape == (4,)


def test_forward_argument_errors():
    model = Model(chain(["dense", "dense"], ["relu", "identity"], np.random.default_rng(0)))
    X = np.zeros((3, 13), F32)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.forward(X, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.forward(X, batch_size=-4)
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        model.forward(X, batch_size=2.5)
    with pytest.raises(ValueError, match="upto must be >= 1"):
        model.forward(X, upto=0)
    with pytest.raises(ValueError, match="upto must be <= 2"):
        model.forward(X, upto=3)
    with pytest.raises(ValueError, match=r"shape \(n, 13\)"):
        model.forward(np.zeros((3, 12), F32))
    with pytest.raises(TypeError, match="numpy array"):
        model.forward([[0.0] * 13])
    with pytest.raises(TypeError, match="numeric"):
        model.forward(np.zeros((3, 13), bool))
    with pytest.raises(ValueError, match="backend"):
        model.forward(X, backend="gpu")


def test_model_constructor_errors():
    rng = np.random.default_rng(1)
    a, b = make_layer("dense", 13, 11, "relu", rng), make_layer("dense", 10, 9, "relu", rng)
    with pytest.raises(ValueError, match="do not chain"):
        Model([a, b])
    with pytest.raises(ValueError, match="at least one layer"):
        Model([])
    with pytest.raises(TypeError, match="layer 1"):
        Model([np.eye(3)])
    with pytest.raises(ValueError, match=r"shape \(13,\)"):
        Model([a], norm=(np.zeros(12, F32), np.ones(12, F32)))
    with pytest.raises(ValueError, match="std > 0"):
        Model([a], norm=(0.0, 0.0))
    with pytest.raises(TypeError, match="float32"):
        Model([a], out_norm=(np.zeros(11), np.ones(11)))
    with pytest.raises(ValueError, match="layer 1"):
        Model([{"kind": "dense", "activation": "relu", "W": np.ones((2, 2), F32),
                "b": np.ones(3, F32)}])
    m = Model([{"kind": "dense", "activation": "relu", "W": np.ones((2, 2), F32),
                "b": np.ones(2, F32)}])
    assert m.kinds == ["dense"]


def test_mlp_rejects_unknown_activation():
    with pytest.raises(ValueError, match="takes the activations.*'swish'"):
        MLP([3, 2], ["swish"])


# -------------------------------------------------------------------- CLI

def _cli_data(tmp_path):
    rng = np.random.default_rng(20)
    X = rng.random((120, 13)).astype(F32)
    y = rng.integers(0, 5, 120)
    Xt = rng.random((60, 13)).astype(F32)
    yt = rng.integers(0, 5, 60)
    y[:5] = yt[:5] = np.arange(5)                 # every class present
    np.savez(tmp_path / "d.npz", X_train=X, y_train=y, X_test=Xt, y_test=yt)
    return X, Xt, yt


def _check_cli_model(tmp_path, model, capsys):
    import json
    import os
    from pykd.cli import main
    X, Xt, yt = _cli_data(tmp_path)
    path = tmp_path / "m.pykd"
    model.save(path)
    assert main(["evaluate", "--model", str(path), "--data", str(tmp_path / "d.npz"),
                 "--report", str(tmp_path / "r.json"), "--quiet"]) == 0
    out = capsys.readouterr().out
    (e,) = json.loads((tmp_path / "r.json").read_text())["models"]
    loaded = load_model(path)
    assert e["bytes_on_disk"] == os.path.getsize(path)
    assert e["parameters"] == model.parameters and e["nonzeros"] == model.nonzeros
    assert e["layers"] == [{"kind": layer.kind, "activation": layer.activation,
                            "n_in": layer.n_in, "n_out": layer.n_out}
                           for layer in model.to_model().layers]
    assert e["test_accuracy"] == pytest.approx(pykd.evaluate(loaded, Xt, yt)["accuracy"])
    assert "accuracy" in out
    assert main(["soft-labels", "--teacher", str(path), "--data", str(tmp_path / "d.npz"),
                 "--out", str(tmp_path / "l.npy"), "--report", str(tmp_path / "s.json"),
                 "--quiet"]) == 0
    assert np.array_equal(np.load(tmp_path / "l.npy"), loaded.forward(X, batch_size=4096))
    (t,) = json.loads((tmp_path / "s.json").read_text())["models"]
    assert t["bytes_on_disk"] == os.path.getsize(path) and t["layers"] == e["layers"]


def test_cli_evaluate_and_soft_labels_on_an_mlp(tmp_path, capsys):
    _check_cli_model(tmp_path, MLP([13, 8, 5], seed=0, norm=(0.5, 0.3)), capsys)


@pytest.mark.parametrize("convert", ["quantize", "sparsify", "low_rank", "cluster"])
def test_cli_evaluate_and_soft_labels_on_every_kind(tmp_path, capsys, convert):
    mlp = MLP([13, 40, 30, 5], seed=0, norm=(0.5, 0.3))
    mlp.layers[0][0][np.abs(mlp.layers[0][0]) < 0.25] = 0
    model = {"quantize": lambda: pykd.quantize_model(mlp),
             "sparsify": lambda: pykd.sparsify(mlp),
             "low_rank": lambda: pykd.low_rank(mlp, rank=3),
             "cluster": lambda: pykd.cluster(pykd.sparsify(mlp), 4)}[convert]()
    _check_cli_model(tmp_path, model, capsys)


# ------------------------------------------------------------- no copies

NO_COPY_CHILD = """
import sys
import numpy as np
import pykd
from kinds_helpers import make_layer
rng = np.random.default_rng(0)
for kind in sys.argv[1].split(","):
    layers = [make_layer(kind, 40, 30, "relu", rng), make_layer(kind, 30, 7, "identity", rng)]
    model = pykd.Model(layers, norm=(np.zeros(40, np.float32), np.ones(40, np.float32)),
                       out_norm=(1.0, 2.0))
    X = rng.standard_normal((300, 40)).astype(np.float32)
    sys.stderr.write("@@ " + kind + "\\n"); sys.stderr.flush()
    model.forward(X, batch_size=64); model.forward(X, upto=1); model.predict(X[:3])
    sys.stderr.flush()
mlp = pykd.MLP([40, 30, 7], norm=(0.5, 2.0))
sys.stderr.write("@@ mlp\\n"); sys.stderr.flush()
mlp.forward(X); mlp.to_model().forward(X, batch_size=1)
sys.stderr.flush()
sys.stderr.write("@@ done\\n")
"""


def test_forward_copies_no_array(tmp_path):
    import os
    import subprocess
    import sys
    from pykd import _build_config
    if not _build_config.copy_report:
        pytest.skip("built without copy_report")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", NO_COPY_CHILD, ",".join(KINDS)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "@@ done" in proc.stderr
    assert "copied an array" not in proc.stderr, proc.stderr[-2000:]


def test_evaluate_refuses_nonfinite_logits():
    model = Model(chain(["dense", "dense"], ["relu", "identity"], np.random.default_rng(2)))
    X = np.ones((4, 13), F32)
    X[1, 1] = np.inf
    with pytest.raises(ValueError, match=r"rows 1\)"):
        pykd.evaluate(model, X, np.zeros(4, np.int64))
    ev = pykd.evaluate(model, np.ones((4, 13), F32), np.zeros(4, np.int64))
    assert ev["parameters"] == model.parameters and ev["nonzeros"] == model.nonzeros


def test_distill_from_a_compressed_teacher_with_a_hint(tmp_path, capsys):
    from pykd.cli import main
    X, _, _ = _cli_data(tmp_path)
    teacher = pykd.quantize_model(MLP([13, 20, 5], seed=1, norm=(0.5, 0.3)))
    teacher.save(tmp_path / "t.pykd")
    feats = pykd.train.hint_targets_from(teacher, X, 1)
    assert np.array_equal(feats, teacher.forward(X, upto=1, batch_size=4096))
    assert main(["distill", "--teacher", str(tmp_path / "t.pykd"), "--hidden", "6",
                 "--epochs", "1", "--hint-student-layer", "1", "--data",
                 str(tmp_path / "d.npz"), "--out", str(tmp_path / "s.pykd"), "--quiet"]) == 0
    student = load_model(tmp_path / "s.pykd")
    assert isinstance(student, MLP) and student.sizes == [13, 6, 5]


def test_mlp_sizes_must_be_integers():
    with pytest.raises(TypeError, match="positive integers"):
        MLP([3.7, 4, 2])
    with pytest.raises(TypeError, match="positive integers"):
        MLP(["3", 2])
    assert MLP([np.int64(3), 2]).sizes == [3, 2]


def test_mlp_forward_follows_norm_and_activation_changes():
    mlp = MLP([13, 11, 9], seed=4)
    X = np.random.default_rng(3).standard_normal((6, 13)).astype(F32)
    a = mlp.forward(X)
    mlp.set_norm(0.5, 2.0)
    b = mlp.forward(X)
    assert np.array_equal(b, MLP([13, 11, 9], seed=4, norm=(0.5, 2.0)).forward(X))
    mlp.activations[0] = "tanh"
    c = mlp.forward(X)
    assert np.array_equal(c, MLP([13, 11, 9], ["tanh", "identity"], seed=4,
                                 norm=(0.5, 2.0)).forward(X))
    assert not np.array_equal(a, b) and not np.array_equal(b, c)
