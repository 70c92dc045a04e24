"""A model's weights as a NumPy ``.npz``, both ways (docs/exchange.md).

Two layouts of the members ``W0, b0, W1, b1, ...``:

- ``torch``: ``Wk`` of shape ``(out, in)``, as ``torch.nn.Linear.weight``;
  on import, a state dict saved as is (``np.savez(f, **{k: v.numpy() for
  k, v in net.state_dict().items()})``: members ``*.weight``, ``*.bias`` in
  the archive's order) is read too;
- ``pykd``: ``Wk`` of shape ``(in, out)``, pykd's ``x @ W``.

Optional members: ``activations`` (int32 codes of ``pykd._codes.ACTIVATIONS``,
one per layer), ``norm_mean``/``norm_std`` (the input normalisation, 0-d or
``(n_features,)``) and ``out_norm_mean``/``out_norm_std``. Every layer is
exported as its effective dense ``W`` (int8 layers dequantized, so the file
holds a float32 model). Import checks every member's header (names, dtypes,
shapes, the chain) before any array is read, with :mod:`pykd.io`'s checked
readers (no pickles).
"""
from __future__ import annotations

import os
import re

import numpy as np

from .. import _codes
from .._validate import plural
from .. import io as _io
from ..layers import Dense
from ..models import Model
from .onnx import ExchangeError

__all__ = ["LAYOUTS", "export_npz", "import_npz", "npz_arrays"]

LAYOUTS = ("torch", "pykd")
_F32 = np.float32
_NORM_KEYS = ("norm_mean", "norm_std", "out_norm_mean", "out_norm_std")
_CODE_ACT = {v: k for k, v in _codes.ACTIVATIONS.items()}


def _layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return layout


def npz_arrays(model, layout="torch"):
    """The ``{name: array}`` of :func:`export_npz` (float32, C order)."""
    _layout(layout)
    net = model.to_model()
    out = {}
    for k, layer in enumerate(net.layers):
        W = layer.to_dense()
        out[f"W{k}"] = np.ascontiguousarray(W.T if layout == "torch" else W, _F32)
        out[f"b{k}"] = np.array(layer.b, _F32)
    out["activations"] = np.array([_codes.ACTIVATIONS[a] for a in net.activations], np.int32)
    for prefix, norm in (("norm", net.norm), ("out_norm", net.out_norm)):
        if norm is not None:
            out[f"{prefix}_mean"] = np.array(norm[0], _F32)
            out[f"{prefix}_std"] = np.array(norm[1], _F32)
    return out


def export_npz(model, path, layout="torch"):
    """Write the model's weights as an ``.npz`` (atomically; no pickles).

    Parameters
    ----------
    model : pykd.MLP or pykd.Model
    path : str or path-like
    layout : {"torch", "pykd"}
        ``Wk`` as ``(out, in)`` (torch) or ``(in, out)`` (pykd).

    Returns
    -------
    list of str
        The kinds that were densified or dequantized (empty for a model of
        dense layers), so a caller can say so.
    """
    arrays = npz_arrays(model, layout)
    _io.atomic_write(path, lambda f: np.savez(f, **arrays))
    return sorted({k for k in model.to_model().kinds if k != "dense"})


# ------------------------------------------------------------------ import

def _headers(path, source):
    """{member: (shape, dtype)} of every ``.npy`` member, from the headers
    only (each checked against the member's declared size)."""
    out = {}
    with _io.open_regular(path, "weights archive", error=ExchangeError) as f:
        size = os.fstat(f.fileno()).st_size
        with _io._open_zip(f, source, "weights archive") as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    raise ExchangeError(f"{source}: member {info.filename!r} is not an .npy "
                                        "array")
                key = info.filename[:-4]
                label = f"member {key!r}"
                _io._member_limit(info, size, source, label)
                try:
                    with z.open(info) as m:
                        shape, _, dtype = _io._read_header(m, source, label)
                except (_io.ArrayFileError, ExchangeError):
                    raise
                except Exception as e:
                    raise ExchangeError(f"{source}: {label}: corrupt ({type(e).__name__}: "
                                        f"{e})") from None
                out[key] = (shape, dtype)
    return out


def _pairs(names, layout, source):
    """[(weight member, bias member)] in layer order."""
    rest = [n for n in names if n not in _NORM_KEYS and n != "activations"]
    ws = sorted((int(m.group(1)), n) for n in rest if (m := re.fullmatch(r"W(\d+)", n)))
    if ws:
        pairs = []
        for i, (k, n) in enumerate(ws):
            if k != i:
                raise ExchangeError(f"{source}: weight members must be W0, W1, ... without "
                                    f"gaps; W{i} is missing")
            if f"b{k}" not in names:
                raise ExchangeError(f"{source}: W{k} has no bias b{k}")
            pairs.append((n, f"b{k}"))
        used = {n for p in pairs for n in p}
    elif layout == "torch" and any(n.endswith(".weight") for n in rest):
        pairs = []
        for n in rest:
            if n.endswith(".weight"):
                bias = n[:-len(".weight")] + ".bias"
                if bias not in names:
                    raise ExchangeError(f"{source}: {n} has no bias {bias}")
                pairs.append((n, bias))
        used = {n for p in pairs for n in p}
    else:
        raise ExchangeError(f"{source}: no weights found: expected members W0, b0, W1, b1, ..."
                            + (" (or a torch state dict's *.weight, *.bias)"
                               if layout == "torch" else "")
                            + f"; found {', '.join(names) or 'none'}")
    extra = [n for n in rest if n not in used]
    if extra:
        raise ExchangeError(f"{source}: unexpected member(s) {', '.join(extra)} (expected "
                            "W0, b0, ..., activations, norm_mean, norm_std, out_norm_mean, "
                            "out_norm_std)")
    return pairs


def _check_float(source, name, shape, dtype, ndim):
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise ExchangeError(f"{source}: member {name!r} must be float32 (or float16), got "
                            f"{dtype}")
    if len(shape) != ndim:
        raise ExchangeError(f"{source}: member {name!r} must be {ndim}-D, got shape {shape}")


def _to_f32(source, name, a):
    b = a.astype(_F32, order="C", copy=a.dtype != _F32 or not a.flags.c_contiguous)
    if a.dtype.itemsize > 4 and not np.array_equal(b.astype(a.dtype), a, equal_nan=True):
        raise ExchangeError(f"{source}: member {name!r} is {a.dtype} with values float32 "
                            "cannot hold exactly; save it as float32")
    return b


def _parse_activations(activations, n_layers, source, stored):
    if activations is None:
        if stored is None:
            raise ExchangeError(f"{source}: the archive does not say the activations: give "
                                f"them, one per layer ({n_layers}), e.g. "
                                f"{','.join(['relu'] * (n_layers - 1) + ['identity'])}")
        bad = [int(c) for c in stored if int(c) not in _CODE_ACT]
        if bad:
            raise ExchangeError(f"{source}: member 'activations' holds unknown codes {bad}")
        return [_CODE_ACT[int(c)] for c in stored]
    if isinstance(activations, str):
        activations = [a.strip() for a in activations.split(",")]
    activations = list(activations)
    for a in activations:
        if a not in _codes.ACTIVATIONS:
            raise ValueError(f"activation {a!r} is not one of {list(_codes.ACTIVATIONS)}")
    if len(activations) != n_layers:
        raise ValueError(f"{plural(len(activations), 'activation')} given for the "
                         f"{plural(n_layers, 'layer')} of "
                         f"{source}")
    return activations


def import_npz(path, layout="torch", activations=None, *, backend="fortran"):
    """A :class:`pykd.Model` of dense layers from an ``.npz`` of weights.

    Parameters
    ----------
    path : str or path-like
    layout : {"torch", "pykd"}
    activations : str or sequence of str, optional
        One per layer (``"relu,relu,identity"``); by default the archive's
        ``activations`` member (an archive without one needs them).

    Raises
    ------
    ExchangeError
        Naming the file and member for a wrong name, dtype, shape, a chain
        that does not link, or non-finite values; every header is checked
        before any array is read.
    """
    _layout(layout)
    source = os.fsdecode(os.fspath(path))
    try:
        heads = _headers(path, source)
    except _io.ArrayFileError as e:
        raise ExchangeError(str(e)) from None
    pairs = _pairs(list(heads), layout, source)
    n_prev = None
    members = {}
    for k, (wn, bn) in enumerate(pairs):
        (ws, wd), (bs, bd) = heads[wn], heads[bn]
        _check_float(source, wn, ws, wd, 2)
        _check_float(source, bn, bs, bd, 1)
        n_out, n_in = ws if layout == "torch" else ws[::-1]
        order = "(out, in)" if layout == "torch" else "(in, out)"
        if n_in < 1 or n_out < 1:
            raise ExchangeError(f"{source}: {wn} has an empty shape {ws}")
        if bs != (n_out,):
            raise ExchangeError(f"{source}: {bn} has shape {bs} but {wn} {ws} {order} has "
                                f"{plural(n_out, 'output')} (is the layout {layout!r} right?)")
        if n_prev is not None and n_in != n_prev:
            raise ExchangeError(f"{source}: {wn} {ws} {order} takes {plural(n_in, 'input')} "
                                "but layer "
                                f"{k - 1} gives {n_prev} (is the layout {layout!r} right?)")
        n_prev = n_out
        members[wn] = ("f", 2)
        members[bn] = ("f", 1)
    n_features = (heads[pairs[0][0]][0][1] if layout == "torch" else heads[pairs[0][0]][0][0])
    stored = None
    if "activations" in heads:
        shape, dtype = heads["activations"]
        if dtype.kind not in "iu" or shape != (len(pairs),):
            raise ExchangeError(f"{source}: member 'activations' must be {len(pairs)} integer "
                                f"codes, got {dtype} of shape {shape}")
        members["activations"] = ("iu", 1)
    for prefix, n in (("norm", n_features), ("out_norm", n_prev)):
        keys = (f"{prefix}_mean", f"{prefix}_std")
        present = [key for key in keys if key in heads]
        if len(present) == 1:
            raise ExchangeError(f"{source}: {present[0]} without "
                                f"{({*keys} - {present[0]}).pop()}")
        for key in present:
            shape, dtype = heads[key]
            _check_float(source, key, shape, dtype, len(shape))
            if shape not in ((), (n,)):
                raise ExchangeError(f"{source}: {key} must be a scalar or have shape ({n},), "
                                    f"got {shape}")
            members[key] = ("f", (0, 1))
    try:
        arrays = _io.load_npz(path, members, what="weights archive")
    except _io.ArrayFileError as e:
        raise ExchangeError(str(e)) from None
    if "activations" in arrays:
        stored = arrays["activations"]
    acts = _parse_activations(activations, len(pairs), source, stored)
    layers = []
    for k, (wn, bn) in enumerate(pairs):
        W, b = _to_f32(source, wn, arrays[wn]), _to_f32(source, bn, arrays[bn])
        for name, a in ((wn, W), (bn, b)):
            if not np.isfinite(a).all():
                raise ExchangeError(f"{source}: member {name!r} contains NaN or inf")
        W = np.ascontiguousarray(W.T) if layout == "torch" else W
        layers.append(Dense(W, b, acts[k]))
    norms = {}
    for prefix in ("norm", "out_norm"):
        if f"{prefix}_mean" in arrays:
            pair = []
            for part in ("mean", "std"):
                key = f"{prefix}_{part}"
                a = _to_f32(source, key, arrays[key])
                pair.append(_F32(a) if a.ndim == 0 else a)
            norms[prefix] = tuple(pair)
    meta = {"imported_from": {"format": "npz", "file": os.path.basename(source),
                              "layout": layout}}
    try:
        return Model(layers, norm=norms.get("norm"), out_norm=norms.get("out_norm"),
                     metadata=meta, backend=backend)
    except (TypeError, ValueError) as e:
        raise ExchangeError(f"{source}: {e}") from None
