"""pykd models to and from ONNX (docs/exchange.md).

:func:`export_onnx` writes any pykd model as an ONNX graph (opset 17) that
takes the same raw inputs as ``model.forward`` and gives the same outputs:
the input normalisation as ``Sub``/``Div``, each layer as its dense (or
integer) equivalent plus its activation, the output normalisation undone
as ``Mul``/``Add``.

:func:`import_onnx` reads an MLP chain (``Gemm``, or ``MatMul`` [+
``MatMul``] [+ ``Add``], each followed by an element-wise activation) with
an optional leading affine normalisation by constants and a trailing
``Mul``/``Add`` by constants (the output normalisation), and returns a
:class:`pykd.Model`. Anything else is an :class:`ExchangeError` naming the
node and its op.

Both need the ``onnx`` package (an optional dependency).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from .. import __version__
from .. import _codes
from .._validate import plural
from ..layers import Dense, DenseInt8, LowRank
from ..models import Model

__all__ = ["ExchangeError", "export_onnx", "import_onnx", "OPSET"]

#: The ONNX operator set the exporter writes (ONNX Runtime >= 1.13 runs it).
OPSET = 17
#: IR version matching OPSET (so older runtimes load the file too).
IR_VERSION = 8
#: Largest ONNX file :func:`import_onnx` reads (protobuf's own limit is 2 GiB).
MAX_ONNX_BYTES = 2**31 - 1
_F32 = np.float32
_STATIC_INT8 = ("qdq", "integer")


class ExchangeError(ValueError):
    """A model cannot be exported or imported; the message names the file and
    the node, member or layer."""


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper  # noqa: F401
    except ImportError:
        raise ExchangeError("ONNX export and import need the onnx package, which is not "
                            "installed: pip install onnx onnxruntime (tools/setup.sh installs "
                            "both)") from None
    return onnx


# ==================================================================== export

class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self, helper, numpy_helper):
        self.h, self.nh = helper, numpy_helper
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, base):
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, base, array):
        name = self.name(base)
        self.inits.append(self.nh.from_array(np.ascontiguousarray(array), name))
        return name

    def scalar(self, base, value, dtype=_F32):
        return self.const(base, np.array(value, dtype))

    def op(self, op_type, inputs, base=None, **attrs):
        out = self.name(base or op_type.lower())
        self.nodes.append(self.h.make_node(op_type, list(inputs), [out],
                                           name=self.name(op_type), **attrs))
        return out


def _activation(g, z, act, where):
    if act == "identity":
        return z
    if act == "relu":
        return g.op("Relu", [z], f"{where}_relu")
    if act == "tanh":
        return g.op("Tanh", [z], f"{where}_tanh")
    if act == "sigmoid":
        return g.op("Sigmoid", [z], f"{where}_sigmoid")
    if act == "silu":
        s = g.op("Sigmoid", [z], f"{where}_sigmoid")
        return g.op("Mul", [z, s], f"{where}_silu")
    if act == "gelu":       # exact: z (1 + erf(z / sqrt 2)) / 2, as torch exports it
        e = g.op("Erf", [g.op("Div", [z, g.scalar("sqrt2", math.sqrt(2))])])
        e = g.op("Add", [e, g.scalar("one", 1)])
        return g.op("Mul", [g.op("Mul", [z, e]), g.scalar("half", 0.5)], f"{where}_gelu")
    raise ExchangeError(f"{where}: activation {act!r} has no ONNX export")


def _int8_integer(g, h, layer, where, x_scale=None):
    """pykd's int8 product with integer ops: per-row (or the static) scale
    sx, qx = clip(round(x * (1/sx)), -127, 127) as int8, MatMulInteger,
    then one multiply of the int32 sums by sx * scale, then + b."""
    if x_scale is None:       # sx = max|x_s| / 127, at least tiny, 1 for an all-zero row
        amax = g.op("ReduceMax", [g.op("Abs", [h])], f"{where}_amax", axes=[1], keepdims=1)
        s = g.op("Max", [g.op("Div", [amax, g.scalar("qmax", 127)]),
                         g.scalar("tiny", np.finfo(_F32).tiny)])
        pos = g.op("Greater", [amax, g.scalar("zero", 0)])
        sx = g.op("Where", [pos, s, g.scalar("one", 1)], f"{where}_sx")
        inv = g.op("Reciprocal", [sx], f"{where}_inv_sx")
        rescale = g.op("Mul", [sx, g.const(f"{where}_scale", layer.scale)], f"{where}_rescale")
        # ORT's MatMulIntegerToFloat fusion takes a per-row scale of A for a
        # per-tensor one (wrong sums): a Reshape hides the scale's product.
        rescale = g.op("Reshape", [rescale, g.const("shape", np.array([-1, layer.n_out],
                                                                        np.int64))])
    else:
        inv = g.scalar(f"{where}_inv_sx", _F32(1) / _F32(x_scale))
        rescale = g.const(f"{where}_rescale", layer.scale * _F32(x_scale))
    r = g.op("Round", [g.op("Mul", [h, inv])])
    r = g.op("Clip", [r, g.scalar("qmin", -127), g.scalar("qmax", 127)])
    qx = g.op("Cast", [r], f"{where}_qx", to=3)                           # INT8
    acc = g.op("MatMulInteger", [qx, g.const(f"{where}_q", layer.q)], f"{where}_acc")
    y = g.op("Mul", [g.op("Cast", [acc], to=1), rescale])                # FLOAT
    return g.op("Add", [y, g.const(f"{where}_b", layer.b)], f"{where}_z")


def _int8_qdq(g, h, layer, where):
    """Static int8 as QDQ: QuantizeLinear with x_scale, Clip to pykd's
    [-127, 127], DequantizeLinear, the weights as
    DequantizeLinear(q, scale per output), MatMul + b (runtimes fuse this
    into an integer product)."""
    xs = _F32(layer.x_scale)
    s, zp = g.scalar(f"{where}_x_scale", xs), g.scalar(f"{where}_x_zp", 0, np.int8)
    xq = g.op("QuantizeLinear", [h, s, zp], f"{where}_qx")
    # pykd's int8 is symmetric: -128 becomes -127 (a Clip on the floats
    # before QuantizeLinear is dropped by ORT's Clip/Quantize fusion).
    xq = g.op("Clip", [xq, g.scalar("qmin8", -127, np.int8), g.scalar("qmax8", 127, np.int8)],
              f"{where}_qx127")
    xd = g.op("DequantizeLinear", [xq, s, zp], f"{where}_xd")
    wd = g.op("DequantizeLinear", [g.const(f"{where}_q", layer.q),
                                   g.const(f"{where}_scale", layer.scale),
                                   g.const(f"{where}_w_zp", np.zeros(layer.n_out, np.int8))],
              f"{where}_w", axis=1)
    return g.op("Add", [g.op("MatMul", [xd, wd]), g.const(f"{where}_b", layer.b)],
                f"{where}_z")


def _layer(g, h, layer, k, static_int8):
    where = f"layer{k}"
    if isinstance(layer, DenseInt8):
        if layer.quant == "static" and static_int8 == "qdq":
            z = _int8_qdq(g, h, layer, where)
        else:
            z = _int8_integer(g, h, layer, where, layer.x_scale)
    elif isinstance(layer, LowRank):          # two thin products, as pykd runs it
        u = g.op("MatMul", [h, g.const(f"{where}_U", layer.U)])
        z = g.op("Add", [g.op("MatMul", [u, g.const(f"{where}_V", layer.V)]),
                         g.const(f"{where}_b", layer.b)], f"{where}_z")
    else:                                     # dense, sparse and codebook: the dense W
        W = layer.W if isinstance(layer, Dense) else layer.to_dense()
        z = g.op("Gemm", [h, g.const(f"{where}_W", W), g.const(f"{where}_b", layer.b)],
                 f"{where}_z")
    return _activation(g, z, layer.activation, where)


def to_onnx(model, *, static_int8="qdq"):
    """The ``onnx.ModelProto`` of a pykd model (see :func:`export_onnx`)."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper
    if static_int8 not in _STATIC_INT8:
        raise ValueError(f"static_int8 must be one of {list(_STATIC_INT8)}, got {static_int8!r}")
    if not hasattr(model, "to_model"):
        raise TypeError(f"model must be a pykd MLP or Model, got {type(model).__name__}")
    net = model.to_model()
    weights = sum(4 * (layer.U.size + layer.V.size) if isinstance(layer, LowRank)
                  else (1 if isinstance(layer, DenseInt8) else 4) * layer.n_in * layer.n_out
                  for layer in net.layers)
    if weights > MAX_ONNX_BYTES - (1 << 24):
        raise ExchangeError(f"the model's weights take {weights} bytes as ONNX tensors, more "
                            "than one ONNX file holds (2 GiB)")
    g = _Graph(helper, numpy_helper)
    h = "input"
    if net.norm is not None:
        mean, std = (np.asarray(v, _F32) for v in net.norm)
        h = g.op("Div", [g.op("Sub", [h, g.const("in_mean", mean)]), g.const("in_std", std)],
                 "normalised")
    for k, layer in enumerate(net.layers, start=1):
        h = _layer(g, h, layer, k, static_int8)
    if net.out_norm is not None:
        mean, std = (np.asarray(v, _F32) for v in net.out_norm)
        h = g.op("Add", [g.op("Mul", [h, g.const("out_std", std)]), g.const("out_mean", mean)],
                 "denormalised")
    g.nodes.append(helper.make_node("Identity", [h], ["output"], name="output"))
    graph = helper.make_graph(
        g.nodes, "pykd",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", net.n_features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", net.n_outputs])],
        g.inits)
    proto = helper.make_model(graph, producer_name="pykd", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = IR_VERSION
    meta = {"pykd.kinds": ",".join(net.kinds), "pykd.activations": ",".join(net.activations)}
    try:
        meta["pykd.metadata"] = json.dumps(net.metadata, allow_nan=False)
    except (TypeError, ValueError):
        pass                   # metadata that is not plain JSON is left out
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model, path, *, static_int8="qdq"):
    """Write ``model`` as an ONNX file (opset 17), atomically.

    Parameters
    ----------
    model : pykd.MLP or pykd.Model
    path : str or path-like
    static_int8 : {"qdq", "integer"}
        Static int8 layers as QuantizeLinear/DequantizeLinear around a
        MatMul (the QDQ form runtimes accelerate; a product may differ from
        pykd's by a rounding of the float32 sum) or as the exact integer
        product that dynamic int8 layers always use (MatMulInteger, Cast,
        Mul).

    Notes
    -----
    The graph has one input ``input`` (float32, ``(batch, n_features)``)
    and one output ``output``. Dense, sparse and codebook layers are Gemm
    with the dense ``W``; low-rank layers two MatMuls and an Add; int8 layers
    as described above. pykd refuses NaN or inf inputs of an int8 layer; the
    ONNX graph does not check.
    """
    from ..io import atomic_write
    proto = to_onnx(model, static_int8=static_int8)
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))


# ==================================================================== import

#: Element-wise ops an activation region may contain (with scalar constants).
_ELEMENTWISE = {"Relu", "Tanh", "Sigmoid", "Erf", "Gelu", "Mul", "Div", "Add", "Sub",
                "Identity", "Neg"}
_AFFINE = {"Gemm", "MatMul"}
_HINTS = {
    "Softmax": "pykd models output logits: export the network without its final softmax",
    "LogSoftmax": "pykd models output logits: export the network without its final softmax",
    "Conv": "pykd imports multilayer perceptrons only",
    "DynamicQuantizeLinear": "quantized graphs are not imported: import the float32 model "
                             "and quantize it with pykd",
    "QuantizeLinear": "quantized graphs are not imported: import the float32 model and "
                      "quantize it with pykd",
    "MatMulInteger": "quantized graphs are not imported: import the float32 model and "
                     "quantize it with pykd",
    "Abs": "quantized graphs are not imported: import the float32 model and quantize it "
           "with pykd",
}


def _erf(x):
    from scipy.special import erf
    return erf(x)


def _eval_op(node, args, attrs):
    op = node.op_type
    if op == "Relu":
        return np.maximum(args[0], 0)
    if op == "Tanh":
        return np.tanh(args[0])
    if op == "Sigmoid":
        return 1 / (1 + np.exp(-args[0]))
    if op == "Erf":
        return _erf(args[0])
    if op == "Gelu":
        x = args[0]
        if attrs.get("approximate", b"none") in (b"tanh", "tanh"):
            return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if op == "Identity":
        return args[0]
    if op == "Neg":
        return -args[0]
    a, b = args
    return {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}[op](a, b)


def _reference_activation(name, x):
    if name == "gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "sigmoid":
        return 1 / (1 + np.exp(-x))
    return {"identity": x, "relu": np.maximum(x, 0), "tanh": np.tanh(x)}[name]


class _Reader:
    """One ONNX graph, indexed: producers, consumers, constants."""

    def __init__(self, proto, source):
        from onnx import numpy_helper
        self.nh = numpy_helper
        self.source = source
        g = proto.graph
        self.graph = g
        self.consts = {}
        for t in g.initializer:
            self.consts[t.name] = t
        for t in g.sparse_initializer:
            self.consts[t.values.name] = None        # refused when used
        self.nodes = list(g.node)
        self.consumers, self.producer = {}, {}
        for node in self.nodes:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = node
                continue
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
            for o in node.output:
                self.producer[o] = node
        self.outputs = [o.name for o in g.output]
        self._cache = {}

    def err(self, node, msg):
        label = f"node {node.name!r} ({node.op_type})" if node.name else f"a {node.op_type} node"
        return ExchangeError(f"{self.source}: {label}: {msg}")

    def is_const(self, name):
        return name in self.consts

    def const(self, name, node):
        """The float32 value of a constant input of ``node``."""
        if name in self._cache:
            return self._cache[name]
        src = self.consts.get(name)
        if src is None:
            raise self.err(node, f"input {name!r} is a sparse initializer, which is not read")
        if hasattr(src, "op_type"):                 # a Constant node
            attrs = {a.name: a for a in src.attribute}
            if "value" not in attrs:
                raise self.err(src, "only Constant nodes with a tensor 'value' are read")
            tensor = attrs["value"].t
        else:
            tensor = src
        from onnx import TensorProto
        if tensor.data_location == TensorProto.EXTERNAL:
            raise self.err(node, f"input {name!r} is stored in an external data file, which "
                                 "is not read (save the model with its weights inside)")
        if tensor.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            raise self.err(node, f"input {name!r} must be float32 (or float16), got ONNX "
                                 f"data type {TensorProto.DataType.Name(tensor.data_type)}")
        try:
            a = self.nh.to_array(tensor)
        except Exception as e:
            raise self.err(node, f"input {name!r} cannot be read ({type(e).__name__}: "
                                 f"{e})") from None
        a = _exact_f32(a, lambda m: self.err(node, f"input {name!r}: {m}"))
        if not np.isfinite(a).all():
            raise self.err(node, f"input {name!r} contains NaN or inf")
        self._cache[name] = a
        return a

    def only_consumer(self, tensor, after):
        users = self.consumers.get(tensor, [])
        if tensor in self.outputs and not users:
            return None
        if len(users) != 1 or tensor in self.outputs:
            for u in users:
                if u.op_type in _HINTS:
                    raise self.err(u, _HINTS[u.op_type])
            names = ", ".join(f"{u.name or '?'} ({u.op_type})" for u in users)
            raise self.err(after, f"its output {tensor!r} feeds {len(users)} nodes ({names})"
                                  + (" and is a graph output" if tensor in self.outputs else "")
                                  + "; an MLP chain passes each result to one node")
        return users[0]

    def other_input(self, node, tensor):
        """The constant operand of a binary node whose other operand is ``tensor``."""
        ins = [i for i in node.input]
        if len(ins) != 2 or tensor not in ins:
            raise self.err(node, "expected two inputs, one of them the previous result")
        other = ins[1] if ins[0] == tensor else ins[0]
        if other == tensor or not self.is_const(other):
            raise self.err(node, f"input {other!r} must be a constant (an initializer)")
        return other, ins[0] == tensor


def _exact_f32(a, err):
    if a.dtype == np.float32:
        return np.ascontiguousarray(a)
    if a.dtype == np.float16:
        return a.astype(_F32)
    b = a.astype(_F32)
    with np.errstate(invalid="ignore"):
        if not np.array_equal(b.astype(a.dtype), a, equal_nan=True):
            raise err(f"{a.dtype} values that float32 cannot hold exactly; convert the "
                      "model to float32 first")
    return b


def _attrs(node):
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _bias(r, node, tensor, n_out):
    name, _ = r.other_input(node, tensor)
    b = r.const(name, node)
    if b.size == 1:
        return np.full(n_out, b.reshape(-1)[0], _F32)
    if b.shape not in ((n_out,), (1, n_out)):
        raise r.err(node, f"bias {name!r} has shape {b.shape}; expected ({n_out},)")
    return b.reshape(n_out).copy()


def _gemm(r, node, h):
    at = _attrs(node)
    if len(node.input) < 2 or node.input[0] != h:
        raise r.err(node, "its first input must be the previous result")
    if at.get("transA", 0):
        raise r.err(node, "transA=1 is not an MLP layer")
    if not r.is_const(node.input[1]):
        raise r.err(node, f"weights {node.input[1]!r} must be a constant (an initializer)")
    W = r.const(node.input[1], node)
    if W.ndim != 2:
        raise r.err(node, f"weights {node.input[1]!r} must be 2-D, got shape {W.shape}")
    if at.get("transB", 0):
        W = W.T
    W = np.ascontiguousarray(W * _F32(at.get("alpha", 1.0)) if at.get("alpha", 1.0) != 1
                             else W, _F32)
    n_out = W.shape[1]
    b = np.zeros(n_out, _F32)
    if len(node.input) > 2 and node.input[2]:
        c = node.input[2]
        if not r.is_const(c):
            raise r.err(node, f"bias {c!r} must be a constant (an initializer)")
        cv = r.const(c, node)
        if cv.size == 1:
            b[:] = cv.reshape(-1)[0]
        elif cv.shape in ((n_out,), (1, n_out)):
            b[:] = cv.reshape(n_out)
        else:
            raise r.err(node, f"bias {c!r} has shape {cv.shape}; expected ({n_out},)")
        beta = at.get("beta", 1.0)
        if beta != 1:
            b *= _F32(beta)
    return [W], b, node.output[0]


def _matmul_weight(r, node, h):
    if len(node.input) != 2 or node.input[0] != h:
        raise r.err(node, "expected MatMul(previous result, weights)")
    if not r.is_const(node.input[1]):
        raise r.err(node, f"weights {node.input[1]!r} must be a constant (an initializer)")
    W = r.const(node.input[1], node)
    if W.ndim != 2:
        raise r.err(node, f"weights {node.input[1]!r} must be 2-D, got shape {W.shape}")
    return W


def _matmul(r, node, h):
    """MatMul, an optional second MatMul (low rank), an optional Add of the bias."""
    factors = [_matmul_weight(r, node, h)]
    out = node.output[0]
    nxt = r.only_consumer(out, node)
    if nxt is not None and nxt.op_type == "MatMul" and nxt.input[0] == out \
            and len(nxt.input) == 2 and r.is_const(nxt.input[1]):
        factors.append(_matmul_weight(r, nxt, out))
        out, node = nxt.output[0], nxt
        nxt = r.only_consumer(out, nxt)
    n_out = factors[-1].shape[1]
    b = np.zeros(n_out, _F32)
    if nxt is not None and nxt.op_type == "Add":
        name, _ = r.other_input(nxt, out)
        if r.const(name, nxt).size in (1, n_out):
            b = _bias(r, nxt, out, n_out)
            out = nxt.output[0]
    return factors, b, out


def _region(r, start, after):
    """The element-wise nodes after ``start`` up to the next affine node or
    the graph output: (nodes in order, exit tensor)."""
    nodes, frontier, seen = [], [start], set()
    produced = {start}
    while frontier:
        t = frontier.pop()
        for node in r.consumers.get(t, []):
            if id(node) in seen:
                continue
            if node.op_type in _AFFINE:
                continue
            if node.op_type not in _ELEMENTWISE:
                hint = _HINTS.get(node.op_type, "not part of an MLP chain pykd can import "
                                  "(Gemm, MatMul, Add, Relu, Tanh, Sigmoid, exact Gelu, silu, "
                                  "Identity, and a normalisation by constants)")
                raise r.err(node, hint)
            seen.add(id(node))
            nodes.append(node)
            for o in node.output:
                produced.add(o)
                frontier.append(o)
    for node in nodes:
        for i in node.input:
            if i and i not in produced and not r.is_const(i):
                raise r.err(node, f"input {i!r} comes from outside the layer")
    exits = [t for t in produced
             if t in r.outputs or any(id(u) not in seen for u in r.consumers.get(t, []))]
    if len(exits) != 1:
        raise r.err(after, f"its result reaches the rest of the graph through {len(exits)} "
                           f"tensors ({', '.join(sorted(exits)) or 'none'}); expected one")
    order = {id(n): i for i, n in enumerate(r.nodes)}
    return sorted(nodes, key=lambda n: order[id(n)]), exits[0]


def _evaluate(r, nodes, start, end, probe):
    vals = {start: probe}
    for node in nodes:
        args = []
        for i in node.input:
            if i in vals:
                args.append(vals[i])
            else:
                c = r.const(i, node)
                if c.size != 1:
                    raise r.err(node, f"constant {i!r} of shape {c.shape} inside an activation; "
                                      "only scalars are expected there")
                args.append(np.float64(c.reshape(-1)[0]))
        with np.errstate(all="ignore"):
            vals[node.output[0]] = _eval_op(node, args, _attrs(node))
    return vals.get(end)


_PROBE = np.linspace(-8, 8, 257)


def _match_activation(r, nodes, start, end, after):
    if not nodes:
        return "identity"
    y = _evaluate(r, nodes, start, end, _PROBE)
    for name in ("identity", "relu", "tanh", "sigmoid", "gelu", "silu"):
        ref = _reference_activation(name, _PROBE)
        if y is not None and np.allclose(y, ref, rtol=1e-5, atol=1e-6):
            return name
    ops = ", ".join(f"{n.name or '?'} ({n.op_type})" for n in nodes)
    raise r.err(nodes[0], f"the nodes after {after.name or after.op_type!r} ({ops}) compute "
                          "no activation pykd has (identity, relu, tanh, sigmoid, exact gelu, "
                          "silu)")


def _peel_out_norm(r, nodes, end):
    """Trailing Mul/Add/Sub/Div by constants before the output: the output
    normalisation ``y * std + mean``; returns (remaining nodes, new end,
    (mean, std) or None)."""
    a, c = None, None     # y_out = a * y + c, per output (float64)
    exact, kinds = [], []
    while nodes and nodes[-1].output[0] == end and nodes[-1].op_type in ("Mul", "Add", "Sub",
                                                                       "Div", "Identity"):
        node = nodes[-1]
        if node.op_type == "Identity":
            nodes, end = nodes[:-1], node.input[0]
            continue
        ins = list(node.input)
        prev = [i for i in ins if not r.is_const(i)]
        if len(prev) != 1 or len(ins) != 2:
            break
        k = r.const(next(i for i in ins if r.is_const(i)), node).astype(np.float64).reshape(-1)
        first = ins[0] == prev[0]
        if node.op_type in ("Sub", "Div") and not first:
            break
        a = np.ones(1) if a is None else a
        c = np.zeros(1) if c is None else c
        # compose: y_out = a * f(y) + c with f the node's op on y
        if node.op_type == "Mul":
            a = a * k
        elif node.op_type == "Div":
            a = a / k
        elif node.op_type == "Add":
            c = c + a * k
        else:
            c = c - a * k
        kinds.append(node.op_type)
        exact.append(r.const(next(i for i in ins if r.is_const(i)), node))
        nodes = nodes[:-1]
        end = prev[0]
    if a is None:
        return nodes, end, None
    if kinds == ["Add", "Mul"]:             # y * std + mean exactly as written
        return nodes, end, _norm_pair(exact[0], exact[1])
    return nodes, end, _norm_pair(c, a)


def _norm_pair(mean, std):
    mean = np.asarray(mean, _F32).reshape(-1)
    std = np.asarray(std, _F32).reshape(-1)
    if mean.size == 1 and std.size == 1:
        return _F32(mean[0]), _F32(std[0])
    n = max(mean.size, std.size)
    return (np.ascontiguousarray(np.broadcast_to(mean, (n,)), _F32),
            np.ascontiguousarray(np.broadcast_to(std, (n,)), _F32))


def _input_norm(r, h):
    """A leading chain of Sub/Div/Mul/Add by constants: ``(x - mean) / std``.
    Returns (tensor after it, (mean, std) or None)."""
    a, c, kinds, vals = np.ones(1), np.zeros(1), [], []
    while True:
        node = r.only_consumer(h, r.producer.get(h) or _Pseudo("input"))
        if node is None:
            break
        if node.op_type in ("Identity", "Dropout"):
            h = node.output[0]
            continue
        if node.op_type == "Flatten" and not kinds:
            if _attrs(node).get("axis", 1) != 1:
                raise r.err(node, "only Flatten(axis=1) is read (pykd takes flat rows)")
            h = node.output[0]
            continue
        if node.op_type not in ("Sub", "Div", "Mul", "Add"):
            break
        name, first = r.other_input(node, h)
        if node.op_type in ("Sub", "Div") and not first:
            raise r.err(node, "a normalisation subtracts from / divides the input, not the "
                              "other way round")
        k = r.const(name, node).astype(np.float64).reshape(-1)
        if node.op_type == "Sub":
            c = c - k
        elif node.op_type == "Add":
            c = c + k
        elif node.op_type == "Mul":
            a, c = a * k, c * k
        else:
            a, c = a / k, c / k
        kinds.append(node.op_type)
        vals.append(r.const(name, node))
        h = node.output[0]
    if not kinds:
        return h, None
    if (a <= 0).any():
        raise ExchangeError(f"{r.source}: the input normalisation scales by a value <= 0")
    if kinds == ["Sub", "Div"]:
        return h, _norm_pair(vals[0], vals[1])
    std = 1 / a
    return h, _norm_pair(-c * std, std)


class _Pseudo:
    def __init__(self, name):
        self.name, self.op_type = name, "graph input"


def _layers(r, h):
    layers = []
    while True:
        node = r.only_consumer(h, r.producer.get(h) or _Pseudo("input"))
        if node is None:
            return layers, h, None
        if node.op_type in ("Identity", "Dropout"):
            h = node.output[0]
            continue
        if node.op_type == "Gemm":
            factors, b, z = _gemm(r, node, h)
        elif node.op_type == "MatMul":
            factors, b, z = _matmul(r, node, h)
        elif not layers:
            raise r.err(node, _HINTS.get(node.op_type, "expected the first layer (Gemm or "
                                                       "MatMul) after the normalisation"))
        else:
            raise r.err(node, _HINTS.get(node.op_type, "not part of an MLP chain"))
        nodes, end = _region(r, z, node)
        out_norm = None
        last = end in r.outputs and not any(
            u.op_type in _AFFINE for u in r.consumers.get(end, []))
        if last:
            try:
                act = _match_activation(r, nodes, z, end, node)
            except ExchangeError:
                nodes, inner, out_norm = _peel_out_norm(r, nodes, end)
                act = _match_activation(r, nodes, z, inner, node)
        else:
            act = _match_activation(r, nodes, z, end, node)
        n_in = factors[0].shape[0]
        if layers and layers[-1].n_out != n_in:
            raise r.err(node, f"takes {plural(n_in, 'input')} but the previous layer has "
                              f"{plural(layers[-1].n_out, 'output')}")
        if len(factors) == 2:
            if factors[0].shape[1] != factors[1].shape[0]:
                raise r.err(node, f"low-rank factors of shapes {factors[0].shape} and "
                                  f"{factors[1].shape} do not chain")
            layers.append(LowRank(factors[0], np.ascontiguousarray(factors[1]), b, act))
        else:
            layers.append(Dense(factors[0], b, act))
        h = end
        if last:
            return layers, h, out_norm


def read_onnx(path):
    """The ``onnx.ModelProto`` of a file: a regular file of at most 2 GiB,
    weights inside it (no external data), passing ``onnx.checker``."""
    onnx = _onnx()
    from ..io import open_regular
    source = os.fsdecode(os.fspath(path))
    with open_regular(path, "ONNX model", error=ExchangeError) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_ONNX_BYTES:
            raise ExchangeError(f"{source}: {size} bytes, more than an ONNX file can hold "
                                "(2 GiB)")
        data = f.read()
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:
        raise ExchangeError(f"{source}: not an ONNX model ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ExchangeError(f"{source}: not a valid ONNX model "
                            f"({' '.join(str(e).split())[:300]})") from None
    return proto


def import_onnx(path, *, backend="fortran"):
    """A pykd :class:`~pykd.Model` from an ONNX MLP chain.

    Read: a leading ``Flatten(axis=1)``; a leading affine normalisation by
    constants (``Sub`` then ``Div``, or any chain of ``Sub``/``Div``/
    ``Mul``/``Add``) as the input normalisation; per layer a ``Gemm``
    (``transB`` 0 or 1, ``alpha``/``beta``) or ``MatMul`` (+ a second
    ``MatMul``: a low-rank layer) (+ ``Add`` of the bias), then the
    element-wise nodes up to the next layer, recognised by their values as
    identity, relu, tanh, sigmoid, exact gelu (``Gelu`` or the ``Erf``
    form) or silu (``x * Sigmoid(x)``); trailing ``Mul``/``Add`` by
    constants as the output normalisation; ``Identity`` and ``Dropout``
    anywhere. Weights must be float32 (float16, or float64 values float32
    holds exactly).

    Raises
    ------
    ExchangeError
        Naming the file and the node and op that is not read, or the
        tensor that is wrong.
    """
    source = os.fsdecode(os.fspath(path))
    proto = read_onnx(path)
    r = _Reader(proto, source)
    g = proto.graph
    inputs = [i for i in g.input if i.name not in r.consts]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ExchangeError(f"{source}: an MLP graph has one input and one output, this one "
                            f"has {plural(len(inputs), 'input')} and "
                            f"{plural(len(g.output), 'output')}")
    for io_, what in ((inputs[0], "input"), (g.output[0], "output")):
        if io_.type.tensor_type.elem_type not in (1, 0):
            raise ExchangeError(f"{source}: the graph {what} {io_.name!r} must be float32")
    h, norm = _input_norm(r, inputs[0].name)
    layers, end, out_norm = _layers(r, h)
    if not layers:
        raise ExchangeError(f"{source}: the graph has no Gemm or MatMul layer")
    if end != g.output[0].name:
        raise ExchangeError(f"{source}: the chain ends at {end!r}, not at the graph output "
                            f"{g.output[0].name!r}")
    dims = inputs[0].type.tensor_type.shape.dim
    if dims and dims[-1].HasField("dim_value") and len(dims) == 2 \
            and dims[-1].dim_value != layers[0].n_in:
        raise ExchangeError(f"{source}: the input {inputs[0].name!r} has {dims[-1].dim_value} "
                            f"features but the first layer takes {layers[0].n_in}")
    props = {p.key: p.value for p in proto.metadata_props}
    meta = {}
    if "pykd.metadata" in props:
        try:
            m = json.loads(props["pykd.metadata"])
            meta = m if isinstance(m, dict) else {}
        except (ValueError, RecursionError):
            meta = {}
    meta["imported_from"] = {"format": "onnx", "file": os.path.basename(source),
                             "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
                             "opset": max((o.version for o in proto.opset_import
                                           if o.domain in ("", "ai.onnx")), default=None)}
    try:
        return Model(layers, norm=norm, out_norm=out_norm, metadata=meta, backend=backend)
    except (TypeError, ValueError) as e:
        raise ExchangeError(f"{source}: {e}") from None


def activation_names():
    """Activations the exporter writes and the importer recognises."""
    return list(_codes.ACTIVATIONS)
