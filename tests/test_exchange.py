"""Models in and out (pykd.exchange, pykd export/import/predict/info).

ONNX Runtime runs every exported kind and normalisation against pykd's
own forward; imports are checked against float64 references written from
the graphs' definitions, and round trips bit for bit.
"""
import json
import math
import os

import numpy as np
import pytest

from kinds_helpers import ACTIVATIONS, KINDS, make_layer
from pykd import MLP, Model
from pykd.cli import main
from pykd.exchange import npz as xnpz
from pykd.exchange.onnx import ExchangeError, export_onnx, import_onnx, to_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

F32 = np.float32
N_IN, N_HID, N_OUT = 20, 16, 7


def _run(proto, X):
    s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: X})[0]


def _norms(rng, which):
    if which == "none":
        return None, None
    if which == "scalar":
        return (F32(0.5), F32(2.0)), (F32(-1.0), F32(3.0))
    return ((rng.standard_normal(N_IN).astype(F32),
             (rng.random(N_IN) + 0.5).astype(F32)),
            (rng.standard_normal(N_OUT).astype(F32),
             (rng.random(N_OUT) + 0.5).astype(F32)))


def _data(rng, n=400):
    return (rng.standard_normal((n, N_IN)) * 2 + 0.5).astype(F32)


def _model(kind, act, rng, norm="none", static=False, layers=2):
    ls = [make_layer(kind, N_IN, N_HID if layers == 2 else N_OUT, act, rng, static)]
    if layers == 2:
        ls.append(make_layer(kind, N_HID, N_OUT, "identity", rng, static))
    n, o = _norms(rng, norm)
    return Model(ls, norm=n, out_norm=o)


# ------------------------------------------------------------ ORT: float kinds

FLOAT_KINDS = [k for k in KINDS if k != "dense_int8"]


@pytest.mark.parametrize("kind", FLOAT_KINDS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_ort_float_kinds(kind, act):
    rng = np.random.default_rng(hash((kind, act)) % 2**32)
    norm = ("none", "scalar", "per_feature")[ACTIVATIONS.index(act) % 3]
    m = _model(kind, act, rng, norm)
    X = _data(rng)
    y, yo = m.forward(X), _run(to_onnx(m), X)
    # float32 within 1e-5 of the outputs' scale (the sums' order differs)
    np.testing.assert_allclose(yo, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())
    assert (yo.argmax(1) == y.argmax(1)).all()


@pytest.mark.parametrize("norm", ["none", "scalar", "per_feature"])
def test_ort_normalisations_exact_for_dense_identity(norm):
    rng = np.random.default_rng(5)
    m = _model("dense", "identity", rng, norm, layers=1)
    X = _data(rng)
    ref = X.astype(np.float64)
    if m.norm is not None:
        ref = (ref - m.norm[0]) / m.norm[1]
    ref = ref @ m.layers[0].W.astype(np.float64) + m.layers[0].b
    if m.out_norm is not None:
        ref = ref * m.out_norm[1] + m.out_norm[0]
    yo = _run(to_onnx(m), X)
    np.testing.assert_allclose(yo, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_export_graph_ops():
    rng = np.random.default_rng(1)
    ops = {}
    for kind in KINDS:
        ops[kind] = {n.op_type for n in to_onnx(_model(kind, "relu", rng)).graph.node}
    assert "Gemm" in ops["dense"] and "Gemm" in ops["codebook"] and "Gemm" in ops["sparse_csr"]
    assert "Gemm" not in ops["low_rank"] and "MatMul" in ops["low_rank"]
    assert {"MatMulInteger", "Cast", "Mul", "ReduceMax"} <= ops["dense_int8"]
    st = to_onnx(_model("dense_int8", "relu", rng, static=True))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in st.graph.node}
    p = to_onnx(_model("dense", "gelu", rng, "per_feature"))
    names = [n.op_type for n in p.graph.node]
    assert names[:2] == ["Sub", "Div"] and "Erf" in names and names[-3:-1] == ["Mul", "Add"]
    assert p.opset_import[0].version == 17


# ------------------------------------------------------------- ORT: int8

@pytest.mark.parametrize("act", ACTIVATIONS)
def test_ort_dynamic_int8_one_layer_same_products(act):
    """One int8 layer: the same per-row scales, int8 inputs and int32 sums,
    so the outputs are pykd's bits up to the activation's last bits."""
    rng = np.random.default_rng(10 + ACTIVATIONS.index(act))
    m = _model("dense_int8", act, rng, "scalar", layers=1)
    X = _data(rng)
    X[3] = 0                                     # an all-zero row: scale 1
    y, yo = m.forward(X), _run(to_onnx(m), X)
    if act in ("identity", "relu"):
        np.testing.assert_array_equal(yo, y)
    else:
        np.testing.assert_allclose(yo, y, rtol=4e-7, atol=4e-7 * np.abs(y).max())


@pytest.mark.parametrize("mode", ["integer", "qdq"])
@pytest.mark.parametrize("act", ["identity", "tanh"])
def test_ort_static_int8_one_layer(mode, act):
    rng = np.random.default_rng(20)
    m = _model("dense_int8", act, rng, "none", static=True, layers=1)
    X = _data(rng)                               # many inputs beyond 127 x_scale: clipped
    y, yo = m.forward(X), _run(to_onnx(m, static_int8=mode), X)
    if mode == "integer" and act == "identity":
        np.testing.assert_array_equal(yo, y)
    else:                                        # QDQ: float sums of the same int8 values
        np.testing.assert_allclose(yo, y, rtol=1e-5, atol=1e-5 * np.abs(y).max())


def _last_step(m, X):
    """One quantization step of the last int8 layer: max_j sx * scale_j * max_i |q_ij|."""
    last = m.layers[-1]
    h = m.forward(X, upto=m.n_layers - 1)
    sx = (np.abs(h).max(1) / 127).max() if last.x_scale is None else last.x_scale
    step = float(sx) * (last.scale * np.abs(last.q).max(0)).max()
    return step * (1 if m.out_norm is None else float(np.max(m.out_norm[1])))


@pytest.mark.parametrize("static,mode", [(False, "qdq"), (True, "integer"), (True, "qdq")])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_ort_int8_two_layers(static, mode, act):
    """Two int8 layers: the hidden activations may differ in their last bit,
    which can move an input of the second layer by one quantization step."""
    rng = np.random.default_rng(30 + ACTIVATIONS.index(act))
    m = _model("dense_int8", act, rng, "per_feature", static=static)
    X = _data(rng, 2000)
    y, yo = m.forward(X), _run(to_onnx(m, static_int8=mode), X)
    assert (yo.argmax(1) == y.argmax(1)).mean() >= 0.999
    assert np.abs(yo - y).max() <= 3 * _last_step(m, X) + 1e-5 * np.abs(y).max()
    if not static and act in ("identity", "relu"):
        np.testing.assert_array_equal(yo, y)     # exact all the way


def test_ort_mlp_and_file(tmp_path):
    mlp = MLP([N_IN, 12, N_OUT], ["tanh", "identity"], seed=3, norm=(0.5, 2.0))
    X = _data(np.random.default_rng(0))
    path = tmp_path / "m.onnx"
    export_onnx(mlp, path)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = mlp.forward(X)
    np.testing.assert_allclose(s.run(None, {"input": X})[0], y, rtol=1e-5,
                               atol=1e-5 * np.abs(y).max())
    assert [i.name for i in s.get_inputs()] == ["input"]


# ---------------------------------------------------------------- import

@pytest.mark.parametrize("kind", ["dense", "low_rank"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_onnx_round_trip_bitwise(tmp_path, kind, act):
    rng = np.random.default_rng(40 + ACTIVATIONS.index(act))
    norm = ("none", "scalar", "per_feature")[ACTIVATIONS.index(act) % 3]
    m = _model(kind, act, rng, norm)
    m.metadata["note"] = "kept"
    export_onnx(m, tmp_path / "m.onnx")
    back = import_onnx(tmp_path / "m.onnx")
    assert back.kinds == m.kinds and back.activations == m.activations
    for a, b in zip(back.layers, m.layers):
        for name in a.f32_items:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    X = _data(rng, 100)
    np.testing.assert_array_equal(back.forward(X), m.forward(X))
    assert back.metadata["note"] == "kept"
    assert back.metadata["imported_from"]["format"] == "onnx"


def test_onnx_round_trip_other_kinds_densified(tmp_path):
    rng = np.random.default_rng(41)
    for kind in ("sparse_csr", "codebook", "sparse_codebook"):
        m = _model(kind, "relu", rng, "scalar")
        export_onnx(m, tmp_path / "m.onnx")
        back = import_onnx(tmp_path / "m.onnx")
        assert back.kinds == ["dense", "dense"]
        for a, b in zip(back.layers, m.layers):
            np.testing.assert_array_equal(a.W, b.to_dense())


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, F32), name)


def _torch_like(rng, act="relu", norm=True, gemm=True, extra=None):
    """A graph as torch.onnx.export writes an MLP: Gemm with transB=1 (or
    MatMul of the transposed weight + Add), gelu as Erf, silu as x*sigmoid."""
    W1, b1 = rng.standard_normal((N_HID, N_IN)).astype(F32) * 0.3, rng.standard_normal(N_HID)
    W2, b2 = rng.standard_normal((N_OUT, N_HID)).astype(F32) * 0.3, rng.standard_normal(N_OUT)
    mean, std = rng.standard_normal(N_IN).astype(F32), (rng.random(N_IN) + 0.5).astype(F32)
    inits = [_init("W1", W1), _init("b1", b1), _init("W2", W2), _init("b2", b2),
             _init("mean", mean), _init("std", std), _init("sqrt2", math.sqrt(2)),
             _init("one", 1.0), _init("half", 0.5), _init("W1T", W1.T), _init("W2T", W2.T)]
    nodes, h = [], "x"
    if norm:
        nodes += [helper.make_node("Sub", ["x", "mean"], ["xs"], name="sub"),
                  helper.make_node("Div", ["xs", "std"], ["xn"], name="div")]
        h = "xn"
    if gemm:
        nodes.append(helper.make_node("Gemm", [h, "W1", "b1"], ["z1"], name="fc1", transB=1))
    else:
        nodes += [helper.make_node("MatMul", [h, "W1T"], ["m1"], name="mm1"),
                  helper.make_node("Add", ["m1", "b1"], ["z1"], name="add1")]
    if act == "relu":
        nodes.append(helper.make_node("Relu", ["z1"], ["a1"], name="relu"))
    elif act == "gelu":
        nodes += [helper.make_node("Div", ["z1", "sqrt2"], ["g1"], name="g_div"),
                  helper.make_node("Erf", ["g1"], ["g2"], name="g_erf"),
                  helper.make_node("Add", ["g2", "one"], ["g3"], name="g_add"),
                  helper.make_node("Mul", ["z1", "g3"], ["g4"], name="g_mul"),
                  helper.make_node("Mul", ["g4", "half"], ["a1"], name="g_half")]
    elif act == "silu":
        nodes += [helper.make_node("Sigmoid", ["z1"], ["s1"], name="sig"),
                  helper.make_node("Mul", ["z1", "s1"], ["a1"], name="silu")]
    nodes.append(helper.make_node("Gemm", ["a1", "W2", "b2"], ["y"], name="fc2", transB=1))
    out = "y"
    if extra:
        nodes.append(helper.make_node(extra, ["y"], ["p"], name="final", axis=1))
        out = "p"
    g = helper.make_graph(nodes, "torch_jit", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", N_IN])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", N_OUT])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="pytorch")
    proto.ir_version = 8

    def ref(X):                                   # float64, from the definitions
        h = X.astype(np.float64)
        if norm:
            h = (h - mean) / std
        z = h @ W1.T.astype(np.float64) + b1.astype(F32)
        a = {"relu": np.maximum(z, 0), "silu": z / (1 + np.exp(-z)),
             "gelu": z * (1 + np.vectorize(math.erf)(z / math.sqrt(2))) / 2}[act]
        return a @ W2.T.astype(np.float64) + b2.astype(F32)
    return proto, ref


@pytest.mark.parametrize("act,gemm", [("relu", True), ("gelu", True), ("silu", False),
                                      ("relu", False)])
def test_import_torch_like_graph(tmp_path, act, gemm):
    rng = np.random.default_rng(50)
    proto, ref = _torch_like(rng, act, gemm=gemm)
    onnx.save(proto, tmp_path / "t.onnx")
    m = import_onnx(tmp_path / "t.onnx")
    assert m.activations == [act, "identity"] and m.kinds == ["dense", "dense"]
    assert m.norm is not None and np.ndim(m.norm[0]) == 1
    X = _data(rng, 200)
    r = ref(X)
    np.testing.assert_allclose(m.forward(X), r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
    np.testing.assert_allclose(_run(proto, X), r, rtol=1e-5, atol=1e-5 * np.abs(r).max())


def test_import_refuses_softmax_naming_node(tmp_path):
    proto, _ = _torch_like(np.random.default_rng(0), extra="Softmax")
    onnx.save(proto, tmp_path / "t.onnx")
    with pytest.raises(ExchangeError, match=r"t\.onnx: node 'final' \(Softmax\): .*logits"):
        import_onnx(tmp_path / "t.onnx")


def test_import_refuses_unknown_op_and_int8(tmp_path):
    rng = np.random.default_rng(0)
    proto, _ = _torch_like(rng)
    proto.graph.node[3].op_type = "HardSwish"          # replaces Relu
    onnx.save(proto, tmp_path / "h.onnx")
    with pytest.raises(ExchangeError, match=r"node 'relu' \(HardSwish\)"):
        import_onnx(tmp_path / "h.onnx")
    export_onnx(_model("dense_int8", "relu", rng), tmp_path / "q.onnx")
    with pytest.raises(ExchangeError, match="quantized graphs are not imported"):
        import_onnx(tmp_path / "q.onnx")


def test_import_refuses_tanh_gelu_and_nonconstant_weights(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [x, w], [y])
    p = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p.ir_version = 8
    onnx.save(p, tmp_path / "w.onnx")
    with pytest.raises(ExchangeError, match="one input and one output"):
        import_onnx(tmp_path / "w.onnx")
    # tanh-approximate gelu (opset 20 Gelu) is not pykd's exact gelu
    W = _init("W", np.ones((3, 2)))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["z"], name="mm"),
                           helper.make_node("Gelu", ["z"], ["y"], name="gelu",
                                            approximate="tanh")], "g", [x], [y], [W])
    p = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(p, tmp_path / "g.onnx")
    with pytest.raises(ExchangeError, match=r"node 'gelu' \(Gelu\).*no activation"):
        import_onnx(tmp_path / "g.onnx")


def test_import_not_onnx(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ExchangeError, match=r"x\.onnx"):
        import_onnx(tmp_path / "x.onnx")
    with pytest.raises(ExchangeError, match="directory"):
        import_onnx(tmp_path)


def test_import_scale_shift_normalisation(tmp_path):
    """A leading Mul/Add by constants: (x - mean) / std with std = 1/a."""
    a, c = np.array([2.0, 4.0, 0.5], F32), np.array([1.0, -2.0, 0.25], F32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    W = rng_W = np.random.default_rng(0).standard_normal((3, 2)).astype(F32)
    g = helper.make_graph([helper.make_node("Mul", ["x", "a"], ["xa"]),
                           helper.make_node("Add", ["xa", "c"], ["xn"]),
                           helper.make_node("MatMul", ["xn", "W"], ["y"])], "g", [x], [y],
                          [_init("a", a), _init("c", c), _init("W", rng_W)])
    p = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p.ir_version = 8
    onnx.save(p, tmp_path / "n.onnx")
    m = import_onnx(tmp_path / "n.onnx")
    X = np.random.default_rng(1).standard_normal((50, 3)).astype(F32)
    ref = (X.astype(np.float64) * a + c) @ W
    np.testing.assert_allclose(m.forward(X), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(1 / m.norm[1], a, rtol=1e-7)


# ------------------------------------------------------------------- npz

@pytest.mark.parametrize("layout", ["torch", "pykd"])
def test_npz_round_trip(tmp_path, layout):
    rng = np.random.default_rng(60)
    m = _model("dense", "gelu", rng, "per_feature")
    xnpz.export_npz(m, tmp_path / "w.npz", layout)
    with np.load(tmp_path / "w.npz", allow_pickle=False) as z:
        W0 = z["W0"]
    assert W0.shape == ((N_HID, N_IN) if layout == "torch" else (N_IN, N_HID))
    back = xnpz.import_npz(tmp_path / "w.npz", layout)
    X = _data(rng, 100)
    np.testing.assert_array_equal(back.forward(X), m.forward(X))
    assert back.activations == ["gelu", "identity"]


def test_npz_torch_state_dict(tmp_path):
    rng = np.random.default_rng(61)
    sd = {"net.0.weight": rng.standard_normal((5, N_IN)).astype(F32),
          "net.0.bias": rng.standard_normal(5).astype(F32),
          "net.2.weight": rng.standard_normal((3, 5)).astype(F32),
          "net.2.bias": rng.standard_normal(3).astype(F32)}
    np.savez(tmp_path / "sd.npz", **sd)
    m = xnpz.import_npz(tmp_path / "sd.npz", "torch", "tanh,identity")
    X = _data(rng, 30).astype(np.float64)
    ref = np.tanh(X @ sd["net.0.weight"].T + sd["net.0.bias"]) @ sd["net.2.weight"].T \
        + sd["net.2.bias"]
    np.testing.assert_allclose(m.forward(X.astype(F32)), ref, rtol=1e-5, atol=1e-5)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays,match", [
    (dict(W0=np.zeros((5, 4), F32), b0=np.zeros(5, F32), W1=np.zeros((3, 4), F32),
          b1=np.zeros(3, F32)), r"W1 \(3, 4\) \(out, in\) takes 4 inputs but layer 0 gives 5"),
    (dict(W0=np.zeros((5, 4), F32), b0=np.zeros(4, F32)), r"b0 has shape \(4,\)"),
    (dict(W0=np.zeros((5, 4), F32)), "W0 has no bias b0"),
    (dict(W1=np.zeros((5, 4), F32), b1=np.zeros(5, F32)), "W0 is missing"),
    (dict(W0=np.zeros((5, 4), F32), b0=np.zeros(5, F32), extra=np.zeros(2)),
     "unexpected member"),
    (dict(W0=np.zeros((5, 4), np.int32), b0=np.zeros(5, F32)), "must be float32"),
    (dict(W0=np.zeros(5, F32), b0=np.zeros(5, F32)), "must be 2-D"),
    (dict(W0=np.full((5, 4), 0.1), b0=np.zeros(5, F32)), "cannot hold exactly"),
    (dict(W0=np.full((5, 4), np.nan, F32), b0=np.zeros(5, F32)), "NaN or inf"),
    (dict(a=np.zeros(3)), "no weights found"),
])
def test_npz_errors_name_the_member(tmp_path, arrays, match):
    p = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ExchangeError, match=match):
        xnpz.import_npz(p, "torch", "identity" if len([k for k in arrays if k[0] == "W"]) == 1
                        else "relu,identity")


def test_npz_refuses_pickles_and_needs_activations(tmp_path):
    np.savez(tmp_path / "o.npz", W0=np.array([[1, "a"]], dtype=object),
             b0=np.zeros(1, F32))
    with pytest.raises(ExchangeError, match="W0.*float32"):
        xnpz.import_npz(tmp_path / "o.npz", "torch", "identity")
    p = _npz(tmp_path / "n.npz", W0=np.zeros((5, 4), F32), b0=np.zeros(5, F32))
    with pytest.raises(ExchangeError, match="does not say the activations"):
        xnpz.import_npz(p, "torch")
    with pytest.raises(ValueError, match="2 activations given for the 1 layer of"):
        xnpz.import_npz(p, "torch", "relu,relu")


# ------------------------------------------------------------------- CLI

@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(70)
    m = Model([make_layer("dense_int8", N_IN, N_HID, "relu", rng),
               make_layer("low_rank", N_HID, N_OUT, "identity", rng)],
              norm=(F32(0.5), F32(2.0)), metadata={"note": "hi"})
    m.save(tmp_path / "m.pykd")
    X = _data(rng, 50)
    np.save(tmp_path / "X.npy", X)
    return m, X


def test_cli_export_onnx_predict_agree(tmp_path, saved, capsys):
    m, X = saved
    assert main(["export", "--model", str(tmp_path / "m.pykd"), "--out",
                 str(tmp_path / "m.onnx")]) == 0
    assert main(["predict", "--model", str(tmp_path / "m.pykd"), "--data",
                 str(tmp_path / "X.npy"), "--out", str(tmp_path / "Y.npy"),
                 "--batch-size", "7"]) == 0
    Y = np.load(tmp_path / "Y.npy")
    np.testing.assert_array_equal(Y, m.forward(X, batch_size=7))
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(s.run(None, {"input": X})[0], Y, rtol=1e-5,
                               atol=1e-5 * np.abs(Y).max())
    assert main(["predict", "--model", str(tmp_path / "m.pykd"), "--data",
                 str(tmp_path / "X.npy"), "--out", str(tmp_path / "L.npy"), "--labels"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "L.npy"), Y.argmax(1))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_cli_npz_both_ways_and_import(tmp_path, saved, capsys):
    m, X = saved
    for layout in ("torch", "pykd"):
        w, out = tmp_path / f"w-{layout}.npz", tmp_path / f"i-{layout}.pykd"
        assert main(["export", "--model", str(tmp_path / "m.pykd"), "--out", str(w),
                     "--layout", layout]) == 0
        assert "int8 layers dequantized" in capsys.readouterr().out
        assert main(["import", "--npz", str(w), "--layout", layout, "--activations",
                     "relu,identity", "--out", str(out)]) == 0
        from pykd import load_model
        back = load_model(out)
        ref = np.maximum((X - 0.5) / 2 @ m.layers[0].to_dense() + m.layers[0].b, 0) \
            @ m.layers[1].to_dense() + m.layers[1].b
        np.testing.assert_allclose(back.forward(X), ref, rtol=1e-5, atol=1e-5)
    assert main(["import", "--npz", str(tmp_path / "w-torch.npz"), "--layout", "pykd",
                 "--out", str(tmp_path / "x.pykd")]) == 2
    assert "is the layout 'pykd' right?" in capsys.readouterr().err


def test_cli_import_onnx(tmp_path, capsys):
    proto, ref = _torch_like(np.random.default_rng(80), "gelu")
    onnx.save(proto, tmp_path / "t.onnx")
    assert main(["import", "--onnx", str(tmp_path / "t.onnx"), "--out",
                 str(tmp_path / "t.pykd")]) == 0
    assert "gelu,identity" in capsys.readouterr().out
    proto, _ = _torch_like(np.random.default_rng(80), extra="LogSoftmax")
    onnx.save(proto, tmp_path / "s.onnx")
    assert main(["import", "--onnx", str(tmp_path / "s.onnx"), "--out",
                 str(tmp_path / "s.pykd")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "node 'final' (LogSoftmax)" in err
    assert not (tmp_path / "s.pykd").exists()


def test_cli_predict_dtypes(tmp_path, saved, capsys):
    m, X = saved
    args = ["predict", "--model", str(tmp_path / "m.pykd"), "--out", str(tmp_path / "Y.npy"),
            "--data"]
    np.save(tmp_path / "X64.npy", X.astype(np.float64))          # exactly float32 values
    assert main(args + [str(tmp_path / "X64.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "Y.npy"), m.forward(X))
    X64 = X.astype(np.float64)
    X64[2, 3] += 1e-12
    np.save(tmp_path / "Xb.npy", X64)
    assert main(args + [str(tmp_path / "Xb.npy")]) == 2
    assert "X[2, 3]" in capsys.readouterr().err
    np.save(tmp_path / "Xu8.npy", np.arange(N_IN * 4, dtype=np.uint8).reshape(4, N_IN))
    assert main(args + [str(tmp_path / "Xu8.npy")]) == 0
    np.save(tmp_path / "Xw.npy", X[:, :5])
    assert main(args + [str(tmp_path / "Xw.npy")]) == 2
    assert "5 columns but the model" in capsys.readouterr().err


def test_cli_info(tmp_path, saved, capsys):
    assert main(["info", str(tmp_path / "m.pykd")]) == 0
    out = capsys.readouterr().out
    assert "dense_int8" in out and "low_rank" in out and "rank=" in out
    assert "input normalisation: scalar (mean 0.5, std 2)" in out and "note" in out
    assert main(["info", str(tmp_path / "m.pykd"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    m, _ = saved
    assert [d["kind"] for d in info["layers"]] == m.kinds
    assert info["parameters"] == m.parameters and info["nonzeros"] == m.nonzeros
    assert info["bytes"] == m.nbytes and info["layers"][0]["quant"] == "dynamic"
    assert info["bytes_on_disk"] == os.path.getsize(tmp_path / "m.pykd")
    assert info["metadata"]["note"] == "hi"


def test_export_refuses_more_than_one_onnx_file_holds(monkeypatch):
    import pykd.exchange.onnx as xonnx
    monkeypatch.setattr(xonnx, "MAX_ONNX_BYTES", (1 << 24) + 100)
    m = _model("dense", "relu", np.random.default_rng(0))
    with pytest.raises(ExchangeError, match="more than one ONNX file holds"):
        to_onnx(m)
