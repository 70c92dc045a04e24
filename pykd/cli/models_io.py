"""Models in and out: ``pykd export``, ``pykd import``, ``pykd predict`` and
``pykd info`` (docs/exchange.md)."""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from .. import _codes
from .. import io as _io
from ..exchange.onnx import ExchangeError
from ..models import _argmax_finite, load_model
from ..io import atomic_write
from . import _plural
from . import (CLIError, _add_common, _check_outputs, _finish, _fmt_bytes, _input_file,
               _meta_dict, _model_task, _nan_to_none, _pos_int, _save_npy, _writing)

#: Position in ``pykd --help`` (see pykd.cli._command_modules).
ORDER = 70
FORMATS = ("onnx", "npz")
LAYOUTS = ("torch", "pykd")
#: .npy dtypes ``predict`` takes as they are: float32 holds every value exactly.
EXACT_DTYPES = ("float32", "float16", "int8", "uint8", "int16", "uint16", "bool")
#: Dtypes taken when every value is exactly a float32 (checked).
CHECKED_DTYPES = ("float64", "int32", "uint32", "int64", "uint64")


def _activations(text):
    names = [a.strip() for a in text.split(",")]
    bad = [a for a in names if a not in _codes.ACTIVATIONS]
    if bad or not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected comma-separated activations from {', '.join(_codes.ACTIVATIONS)}, "
            f"got {text!r}")
    return names


def register(sub):
    p = sub.add_parser(
        "export", help="write a model as ONNX or as an .npz of its weights",
        description="Export a pykd model: --format onnx writes a graph that takes the raw "
                    "inputs of model.forward (normalisation included) and gives its outputs "
                    "(float32 layers as Gemm + activation, int8 as integer products, sparse, "
                    "codebook and low-rank layers as their dense equivalents or two MatMuls); "
                    "--format npz writes W0, b0, W1, b1, ... (every layer's effective dense "
                    "W), the activation codes and the normalisation.")
    p.add_argument("--model", required=True, metavar="MODEL", help="the pykd model file")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="onnx or npz (default: from the --out suffix)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file")
    p.add_argument("--layout", choices=LAYOUTS, default="torch",
                   help="npz only: W as (out, in), torch.nn.Linear's weight (torch, default), "
                        "or (in, out), pykd's x @ W (pykd)")
    p.add_argument("--static-int8", choices=("qdq", "integer"), default="qdq",
                   help="onnx only: static int8 layers as QuantizeLinear/DequantizeLinear "
                        "around MatMul (qdq, default) or as pykd's exact integer product "
                        "(integer: MatMulInteger, Cast, Mul, as dynamic int8 layers)")
    _add_common(p, data=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import", help="make a pykd model from ONNX or from an .npz of weights",
        description="Import an MLP: --onnx reads a chain of Gemm (or MatMul [+ MatMul] + Add) "
                    "layers with relu, tanh, sigmoid, exact gelu, silu or no activation, a "
                    "leading Sub/Div (or Mul/Add) by constants as the input normalisation and "
                    "a trailing Mul/Add by constants as the output normalisation; --npz reads "
                    "W0, b0, W1, b1, ... (or a torch state dict's *.weight, *.bias).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", metavar="FILE.onnx", help="an ONNX model")
    src.add_argument("--npz", metavar="FILE.npz", help="an .npz of weights")
    p.add_argument("--layout", choices=LAYOUTS, default="torch",
                   help="npz only: W as (out, in) (torch, default) or (in, out) (pykd)")
    p.add_argument("--activations", type=_activations, metavar="A1,A2,...",
                   help="npz only: one activation per layer, e.g. relu,relu,identity "
                        "(default: the archive's 'activations' member, as pykd export writes)")
    p.add_argument("--out", required=True, metavar="MODEL", help="the pykd model to write")
    _add_common(p, data=False)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "predict", help="a model's outputs for an .npy or .csv of inputs",
        description="Batch inference: the model's outputs (logits, or physical units with an "
                    "output normalisation) for every row of X, written atomically as a float32 "
                    ".npy of shape (n, n_outputs), or as CSV when --out ends in .csv. X is an "
                    ".npy of shape (n, n_features): "
                    f"{', '.join(EXACT_DTYPES)} as they are; {', '.join(CHECKED_DTYPES)} only "
                    "when every value is exactly a float32 (checked; otherwise convert it "
                    "yourself); or a .csv file with a header row: a model trained from CSV "
                    "takes its feature columns by name (other columns, such as the targets, "
                    "are ignored), any other model takes every column. Raw inputs: the model "
                    "applies its own normalisation.")
    p.add_argument("--model", required=True, metavar="MODEL", help="the pykd model file")
    p.add_argument("--data", required=True, metavar="X.npy|X.csv",
                   help="inputs (n, n_features): .npy, or .csv with a header row")
    p.add_argument("--out", required=True, metavar="Y.npy|Y.csv",
                   help="output file: .npy, or .csv (a header row, then one row per input)")
    p.add_argument("--batch-size", type=_pos_int, default=1024,
                   help="rows per call of the model (default: 1024)")
    p.add_argument("--labels", action="store_true",
                   help="write the predicted classes (int64 argmax, shape (n,)) instead")
    _add_common(p, data=False)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "info", help="a model's layers, kinds, sizes, normalisation and metadata",
        description="Print a model's layers (kind, size, activation, parameters, non-zeros, "
                    "bytes), its normalisation and its metadata.")
    p.add_argument("model", metavar="MODEL", help="the pykd model file")
    p.add_argument("--json", action="store_true", help="print the information as JSON")
    _add_common(p, data=False)
    p.set_defaults(func=cmd_info)


# ------------------------------------------------------------------ helpers

def _load(path, what="model", backend="fortran"):
    _input_file(path, what)
    return load_model(path, backend=backend)


def _format(args):
    if args.format:
        return args.format
    ext = os.path.splitext(args.out)[1].lower()
    if ext in (".onnx", ".npz"):
        return ext[1:]
    raise CLIError(f"--out {args.out}: cannot tell the format from the suffix; give "
                   "--format onnx or --format npz")


def _norm_info(norm):
    if norm is None:
        return {"kind": "none"}
    mean, std = norm
    if np.ndim(mean) == 0:
        return {"kind": "scalar", "mean": float(mean), "std": float(std)}
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return {"kind": "per_feature", "size": int(mean.size),
            "mean_range": [float(mean.min()), float(mean.max())],
            "std_range": [float(std.min()), float(std.max())]}


def model_info(model, path=None):
    """What ``pykd info`` shows, as a JSON-able dict."""
    net = model.to_model()
    layers = []
    for k, layer in enumerate(net.layers, start=1):
        d = {"layer": k, "kind": layer.kind, "n_in": layer.n_in, "n_out": layer.n_out,
             "activation": layer.activation, "parameters": int(layer.parameters),
             "nonzeros": int(layer.nonzeros), "bytes": int(layer.nbytes)}
        for attr in ("rank", "nnz", "n_codes", "bits", "quant"):
            if hasattr(layer, attr):
                d[attr] = getattr(layer, attr)
        if layer.kind == "dense_int8" and layer.x_scale is not None:
            d["x_scale"] = float(layer.x_scale)
        layers.append(d)
    return {"path": None if path is None else os.fspath(path),
            "bytes_on_disk": os.path.getsize(path) if path and os.path.isfile(path) else None,
            "task": _model_task(model, "classification"),
            "sizes": net.sizes, "layers": layers, "parameters": int(net.parameters),
            "nonzeros": int(net.nonzeros), "bytes": int(net.nbytes),
            "norm": _norm_info(net.norm), "out_norm": _norm_info(net.out_norm),
            "metadata": net.metadata}


def _meta_summary(meta):
    """One line per metadata key; long values (history, config) shortened."""
    lines = []
    for key, value in meta.items():
        text = json.dumps(value, default=str)
        if len(text) > 100:
            text = (f"{{{len(value)} keys: {', '.join(map(str, list(value)[:8]))}"
                    f"{', ...' if len(value) > 8 else ''}}}" if isinstance(value, dict)
                    else text[:97] + "...")
        lines.append(f"  {key}: {text}")
    return lines


# ----------------------------------------------------------------- commands

def cmd_export(args, ctx):
    fmt = _format(args)
    _check_outputs(args, [(args.out, f"{fmt} file", "--out")])
    model = _load(args.model, backend=args.backend)
    t = time.perf_counter()
    try:
        if fmt == "onnx":
            from ..exchange.onnx import export_onnx
            with _writing(args.out, "ONNX file"):
                export_onnx(model, args.out, static_int8=args.static_int8)
            changed = []
        else:
            from ..exchange.npz import export_npz
            with _writing(args.out, "weights archive"):
                changed = export_npz(model, args.out, args.layout)
    except ExchangeError as e:
        raise CLIError(str(e)) from None
    net = model.to_model()
    note = ""
    if changed:
        note = (f" (the {', '.join(changed)} layers as their effective dense W"
                + ("; int8 layers dequantized, so the file holds a float32 model"
                   if "dense_int8" in changed else "") + ")")
    layout = f", {args.layout} layout" if fmt == "npz" else ""
    print(f"{args.model}: {'-'.join(map(str, net.sizes))} ({', '.join(sorted(set(net.kinds)))})"
          f" -> {args.out} ({fmt}{layout}, {_fmt_bytes(os.path.getsize(args.out))}){note}")
    return _finish(ctx, {"export": {"model": args.model, "out": args.out, "format": fmt,
                                    "layout": args.layout if fmt == "npz" else None,
                                    "seconds": time.perf_counter() - t}})


def cmd_import(args, ctx):
    if args.onnx is not None and args.activations is not None:
        raise CLIError("--activations is for --npz; an ONNX graph names its own activations")
    source = args.onnx if args.onnx is not None else args.npz
    _check_outputs(args, [(args.out, "model", "--out")])
    _input_file(source, "ONNX" if args.onnx is not None else "weights archive")
    try:
        if args.onnx is not None:
            from ..exchange.onnx import import_onnx
            model = import_onnx(source, backend=args.backend)
        else:
            from ..exchange.npz import import_npz
            model = import_npz(source, args.layout, args.activations, backend=args.backend)
    except ExchangeError as e:
        raise CLIError(str(e)) from None
    except ValueError as e:          # --activations that do not fit the archive
        raise CLIError(f"--activations: {e}") from None
    with _writing(args.out, "model"):
        model.save(args.out)
    info = model_info(model, args.out)
    acts = ",".join(model.activations)
    print(f"{source}: {'-'.join(map(str, model.sizes))} ({acts}), {model.parameters:,} "
          f"parameters, norm {info['norm']['kind']}, out_norm {info['out_norm']['kind']} "
          f"-> {args.out}")
    return _finish(ctx, {"import": {"source": source, "out": args.out, **info}})


def _exact_inputs(X, path):
    if X.dtype.name in EXACT_DTYPES:
        return X
    if X.dtype.name in CHECKED_DTYPES:
        step = 1 << 16
        for s in range(0, X.shape[0], step):
            part = X[s:s + step]
            with np.errstate(over="ignore", invalid="ignore"):
                back = part.astype(np.float32).astype(X.dtype)
            bad = ~((back == part) | (np.isnan(part) if X.dtype.kind == "f" else False))
            if bad.any():
                i, j = (int(v) for v in np.argwhere(bad)[0])
                raise CLIError(f"{path}: X is {X.dtype} and X[{s + i}, {j}] = "
                               f"{part[i, j].item()!r} is not exactly a float32; convert the "
                               "data yourself (X.astype(numpy.float32)) if rounding is "
                               "acceptable")
        return X
    raise CLIError(f"{path}: X has dtype {X.dtype}; predict takes "
                   f"{', '.join(EXACT_DTYPES + CHECKED_DTYPES)}")


def cmd_predict(args, ctx):
    _check_outputs(args, [(args.out, "predictions file", "--out")])
    _input_file(args.data, "data")
    model = _load(args.model, backend=args.backend)
    if args.labels and _model_task(model) == "regression":
        raise CLIError(f"--labels has no effect on a regression model ({args.model}): it "
                       "predicts values, not classes; drop --labels for its outputs in "
                       "physical units")
    X = (_csv_inputs(args.data, model) if _is_csv(args.data)
         else _npy_inputs(args.data, model, args.model))
    t = time.perf_counter()
    try:
        Y = model.forward(X, batch_size=args.batch_size)
        if args.labels:
            Y = _argmax_finite(Y)
    except ValueError as e:
        raise CLIError(f"{args.data}: {e}") from None
    seconds = time.perf_counter() - t
    if _is_csv(args.out):
        _save_csv(args.out, Y, _output_names(model, Y, args.labels))
    else:
        _save_npy(args.out, Y, "predictions file")
    what = "labels" if args.labels else ("outputs, physical units" if _model_task(model) ==
                                         "regression" else "outputs")
    print(f"predict: {_plural(X.shape[0], 'row')} -> {args.out} ({what}, shape {Y.shape}, "
          f"{Y.dtype}) in "
          f"{seconds:.2f} s")
    return _finish(ctx, {"predict": {"model": args.model, "data": args.data, "out": args.out,
                                     "shape": list(Y.shape), "seconds": seconds}})


def _is_csv(path):
    return os.fspath(path).lower().endswith(".csv")


def _npy_inputs(path, model, model_path):
    try:
        X = _io.load_npy(path, dtype_kinds="biuf", ndim=2, what="inputs")
    except _io.ArrayFileError as e:
        raise CLIError(str(e)) from None
    if X.shape[1] != model.n_features:
        raise CLIError(f"{path}: X has {_plural(X.shape[1], 'column')} but the model "
                       f"{model_path} takes {_plural(model.n_features, 'feature')}")
    X = _exact_inputs(X, path)
    return X.view(np.uint8) if X.dtype == np.bool_ else X


def _config_names(model, key, count):
    """Column names a model trained from CSV records (``config[key]``), if
    they are a list of ``count`` distinct strings."""
    names = _meta_dict(model, "config").get(key)
    ok = (isinstance(names, list) and len(names) == count and len(set(names)) == count
          and all(isinstance(c, str) and c and "," not in c for c in names))
    return names if ok else None


def _csv_inputs(path, model):
    from ..data import DatasetError, read_csv_features
    names = _config_names(model, "features", model.n_features)
    try:
        X, ignored = read_csv_features(path, names, model.n_features)
    except DatasetError as e:
        raise CLIError(str(e)) from None
    if ignored:
        print(f"predict: {path}: ignored {_plural(len(ignored), 'column')} the model does not "
              f"take: {', '.join(ignored[:10])}{' ...' if len(ignored) > 10 else ''}")
    return X


def _output_names(model, Y, labels):
    if labels:
        return ["label"]
    return (_config_names(model, "targets", Y.shape[1])
            or [f"output_{j}" for j in range(Y.shape[1])])


def _save_csv(path, Y, names):
    """Y as CSV: a header row, then one row per input; float32 values with 9
    significant digits, which read back as the same float32."""
    fmt = "%d" if Y.dtype.kind in "iu" else "%.9g"
    rows = Y.reshape(len(Y), -1)

    def write(f):
        f.write((",".join(names) + "\n").encode())
        np.savetxt(f, rows, fmt=fmt, delimiter=",")
    with _writing(path, "predictions file"):
        atomic_write(path, write)


def _print_info(info, model, path):
    net = model.to_model()
    disk = info["bytes_on_disk"]
    print(f"{path}: {type(model).__name__}, {_plural(net.n_layers, 'layer')}, "
          f"{'-'.join(map(str, net.sizes))}, {info['parameters']:,} parameters, "
          f"{info['nonzeros']:,} non-zero weights, {_fmt_bytes(info['bytes'])} in memory"
          + ("" if disk is None else f", {_fmt_bytes(disk)} on disk"))
    print(f"  {'#':>2} {'kind':<16} {'n_in':>7} {'n_out':>7} {'activation':<10} "
          f"{'parameters':>11} {'non-zeros':>10} {'bytes':>10}  details")
    for d in info["layers"]:
        extra = ", ".join(f"{k}={d[k]}" for k in ("rank", "nnz", "n_codes", "bits", "quant",
                                                  "x_scale") if k in d)
        print(f"  {d['layer']:>2} {d['kind']:<16} {d['n_in']:>7} {d['n_out']:>7} "
              f"{d['activation']:<10} {d['parameters']:>11,} {d['nonzeros']:>10,} "
              f"{d['bytes']:>10,}  {extra}")
    print(f"  task: {info['task']}")
    for key, label in (("norm", "input normalisation"),
                       ("out_norm", "output normalisation (targets)")):
        n = info[key]
        text = n["kind"]
        if n["kind"] == "scalar":
            text += f" (mean {n['mean']:.6g}, std {n['std']:.6g})"
        elif n["kind"] == "per_feature":
            text += (f" ({_plural(n['size'], 'value')}; mean in [{n['mean_range'][0]:.4g}, "
                     f"{n['mean_range'][1]:.4g}], std in [{n['std_range'][0]:.4g}, "
                     f"{n['std_range'][1]:.4g}])")
        print(f"  {label}: {text}")
    meta = net.metadata
    print("  metadata:" + ("" if meta else " none"))
    for line in _meta_summary(meta):
        print("  " + line)


def cmd_info(args, ctx):
    _check_outputs(args, [])
    model = _load(args.model, backend=args.backend)
    info = model_info(model, args.model)
    if args.json:
        print(json.dumps(_nan_to_none(info), indent=2, default=str))
    else:
        _print_info(info, model, args.model)
    return _finish(ctx, {"info": info})
