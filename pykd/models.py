"""Models: :class:`Model`, a chain of typed layers, and :class:`MLP`, the
trainable stack of dense layers whose parameters live in one flat buffer.

A :class:`Model` is the layout of docs/model.md: a layer table (int64, one
row per layer) and three flat buffers (float32, int8, int32) holding every
layer's arrays; its layers' arrays are views of those buffers. A forward
pass on a batch is one Fortran call (``pykd_network:network_forward``) that
runs every layer, the input normalisation and the output normalisation.


``MLP`` owns a single contiguous float32 buffer ``params``; every weight
matrix ``W`` (shape ``(n_in, n_out)``, so a layer is ``x @ W + b``) and bias
``b`` is a NumPy *view* into it (layout: :func:`pykd._step.layer_slices`).
Gradients and optimizer moments used during training are buffers of the same
layout, so an optimizer step is one pass over a buffer and a checkpoint is the
buffer itself. A model holds no training state: optimizers, gradients and
checkpoints belong to :func:`pykd.train.fit`.
"""
from __future__ import annotations

import math
import numbers
import os
import threading

import numpy as np

from . import _buffers, _codes, _step
from . import _validate as check
from . import kernels as _kernels
from .layers import Dense, DenseInt8, Layer, from_record
from .modelfile import ModelFormatError, read_model, write_model

__all__ = ["MLP", "Model", "TASKS", "load_model"]

#: What a model predicts (``model.task``, metadata key ``"task"``): class
#: labels from logits, or float outputs in physical units.
TASKS = ("classification", "regression")

_TRAINABLE = _codes.TRAINABLE_ACTIVATIONS
_COL = _codes.COL

_F32 = np.float32
#: Cached workspace sizes per model: beyond this many batch sizes the cache is cleared.
_WORDS_CACHE = 64
_OK = _codes.OK


def _check_sizes(sizes):
    try:
        items = list(sizes)
    except TypeError:
        raise TypeError(f"sizes must be a sequence of positive integers, got {sizes!r}") from None
    for s in items:   # 3.7 is an error, not 3
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Integral):
            raise TypeError(f"sizes must be a sequence of positive integers, got {sizes!r}")
    sizes = [int(s) for s in items]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(
            f"sizes must list at least an input and an output size, all >= 1, got {sizes}")
    return sizes


class MLP:
    """A stack of dense layers ``h = activation(h @ W + b)``.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths from input to output, e.g. ``[784, 1200, 1200, 10]``.
    activations : sequence of str, optional
        One per layer, from ``"identity"``, ``"relu"``, ``"tanh"``,
        ``"sigmoid"``, ``"gelu"`` (exact, erf) and ``"silu"`` (all of them
        trainable). Default:
        relu on hidden layers, identity (logits) on the output layer.
    seed : int
        Seed of the initialisation: like PyTorch's ``nn.Linear`` default,
        ``W`` and ``b`` of a layer are drawn from ``U(-1/sqrt(n_in),
        1/sqrt(n_in))`` with ``np.random.default_rng(seed)``, layer by layer
        (``W`` then ``b``). ``None`` leaves all parameters at zero.
    norm : (mean, std) or None
        Input normalisation ``(x - mean) / std`` applied by :meth:`forward`:
        two scalars, or two float32 arrays of shape ``(sizes[0],)``
        (per-feature), std > 0. Stored as ``np.float32`` scalars or
        read-only float32 copies. :func:`pykd.train.fit` sets it from the
        training set when it is None.
    out_norm : (mean, std) or None
        Output normalisation, undone after the last layer: ``y * std +
        mean`` (scalars or float32 arrays of shape ``(sizes[-1],)``), so a
        regression model's outputs are in physical units. :func:`pykd.fit`
        sets it per output from the targets of a regression run.
    metadata : dict, optional
        Free-form JSON-serialisable information saved with the model. Its
        ``"task"`` (``"classification"``, the default when absent, or
        ``"regression"``) is :attr:`task`.

    Attributes
    ----------
    params : ndarray, float32, shape (parameters,)
        The flat parameter buffer.
    layers : list of (W, b)
        Views into ``params``.
    """

    def __init__(self, sizes, activations=None, *, seed=0, norm=None, out_norm=None,
                 metadata=None, backend="fortran"):
        self.sizes = _check_sizes(sizes)
        n_layers = len(self.sizes) - 1
        if activations is None:
            activations = ["relu"] * (n_layers - 1) + ["identity"]
        activations = list(activations)
        if len(activations) != n_layers:
            raise ValueError(
                f"need one activation per layer ({n_layers}), got {len(activations)}")
        for a in activations:
            if a not in _TRAINABLE:
                raise ValueError(
                    f"an MLP (trainable) takes the activations {list(_TRAINABLE)}, got {a!r}")
        self.activations = activations
        self.norm = norm
        self.out_norm = out_norm
        self.metadata = dict(metadata or {})
        _check_task(self.metadata)
        self.backend = backend
        self._bind(_buffers.zeros(_step.param_count(self.sizes), _F32))
        self.seed = None
        if seed is not None:
            self.init(seed)

    # ------------------------------------------------------------ the buffer
    def _bind(self, buffer):
        """Use ``buffer`` (flat float32, C-contiguous) as the parameter buffer."""
        n = _step.param_count(self.sizes)
        if (not isinstance(buffer, np.ndarray) or buffer.dtype != _F32 or buffer.ndim != 1
                or buffer.shape[0] != n or not buffer.flags.c_contiguous):
            raise ValueError(f"the parameter buffer must be a flat C-contiguous float32 array "
                             f"of {n} elements")
        self.params = buffer
        self.layers = [(buffer[ws].reshape(shape), buffer[bs])
                       for ws, bs, shape in _step.layer_slices(self.sizes)]
        self._net = None        # the network view of the buffer, made on first use

    def init(self, seed=0):
        """Re-initialise all parameters in place (PyTorch nn.Linear default)."""
        rng = np.random.default_rng(seed)
        for W, b in self.layers:
            bound = 1.0 / math.sqrt(W.shape[0])
            W[...] = rng.uniform(-bound, bound, W.shape)
            b[...] = rng.uniform(-bound, bound, b.shape)
        self.seed = seed
        return self

    def set_norm(self, mean, std):
        """Set the input normalisation ``(x - mean) / std``: scalars, or
        float32 arrays of shape ``(n_features,)``."""
        self.norm = (mean, std)

    def set_out_norm(self, mean, std):
        """Set the output normalisation (``y * std + mean`` after the last
        layer): scalars, or float32 arrays of shape ``(n_outputs,)``."""
        self.out_norm = (mean, std)

    @property
    def norm(self):
        """Input normalisation ``(mean, std)`` or None (see the class docstring)."""
        return self._norm

    @norm.setter
    def norm(self, value):
        self._norm = _own_norm("norm", value, self.sizes[0])

    @property
    def out_norm(self):
        """Output normalisation ``(mean, std)`` or None (see the class docstring)."""
        return self._out_norm

    @out_norm.setter
    def out_norm(self, value):
        self._out_norm = _own_norm("out_norm", value, self.sizes[-1])

    task = property(lambda self: _task_of(self.metadata), lambda self, v: _set_task(self, v),
                    doc="``metadata['task']``: 'classification' (the default) or "
                        "'regression' (:meth:`predict` returns the outputs)")

    @property
    def parameters(self) -> int:
        """Number of parameters (weights and biases)."""
        return int(self.params.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the parameters (float32)."""
        return int(self.params.nbytes)

    @property
    def nonzeros(self) -> int:
        """Non-zero weights (entries of the W matrices; biases not counted)."""
        return sum(int(np.count_nonzero(W)) for W, _ in self.layers)

    @property
    def n_features(self) -> int:
        return self.sizes[0]

    @property
    def n_outputs(self) -> int:
        return self.sizes[-1]

    def __repr__(self):
        acts = ",".join(self.activations)
        norm = self.norm
        if norm is not None:
            norm = "per_feature" if np.ndim(norm[0]) else tuple(float(v) for v in norm)
        out = "" if self.out_norm is None else (
            ", out_norm=" + ("per_output" if np.ndim(self.out_norm[0])
                             else str(tuple(float(v) for v in self.out_norm))))
        task = "" if self.task == "classification" else f", task={self.task!r}"
        return (f"MLP(sizes={self.sizes}, activations=[{acts}], parameters={self.parameters}, "
                f"norm={norm}{out}{task})")

    def copy(self):
        """An independent copy (own buffer)."""
        m = MLP(self.sizes, self.activations, seed=None, norm=self.norm, out_norm=self.out_norm,
                metadata=self.metadata, backend=self.backend)
        m.params[...] = self.params
        m.seed = self.seed
        return m

    # ------------------------------------------------------------- inference
    def normalize(self, X, out=None):
        """``(X - mean) / std`` as a new float32 array (or into ``out``),
        with a scalar or per-feature normalisation; the same float32
        operations as the network's (subtract, then divide)."""
        if out is None:
            out = np.empty(X.shape, _F32)
        if self.norm is None:
            out[...] = X
        else:
            mean, std = self.norm
            np.subtract(X, mean, out=out, casting="unsafe")
            out /= std
        return out

    def forward(self, X, *, upto=None, batch_size=1024, backend=None):
        """Logits (or hidden features) of ``X``.

        Runs through the same network routine as :meth:`Model.forward` (one
        Fortran call per ``batch_size`` rows; the model's normalisation is
        applied inside it, X itself is never modified).

        Parameters
        ----------
        X : ndarray, shape (n, n_features)
            Raw inputs; non-float32 or non-contiguous inputs are converted to
            float32 chunk by chunk.
        upto : int, optional
            Return the output of layer ``upto`` (1-based; hidden features)
            instead of the logits.
        batch_size : int
            Rows per Fortran call.
        backend : {"fortran", "numpy"}, optional
            Defaults to the model's ``backend`` attribute.

        Returns
        -------
        ndarray, float32, shape (n, sizes[upto or -1])
        """
        net = self._net
        if (net is not None and upto is None and backend is None and self.backend == "fortran"
                and net._mlp_key[0] is self._norm and net._mlp_key[2] is self._out_norm
                and net._mlp_key[1] == self.activations):
            return net.forward(X, batch_size=batch_size, backend="fortran")
        return self._network().forward(X, upto=upto, batch_size=batch_size,
                                       backend=backend or self.backend)

    def _network(self):
        """The :class:`Model` view of the buffer (cached; rebuilt when the
        buffer, the normalisation or the activations change)."""
        net, key = self._net, (self._norm, list(self.activations), self._out_norm)
        if (net is None or net._mlp_key[0] is not key[0] or net._mlp_key[1] != key[1]
                or net._mlp_key[2] is not key[2]):
            net = self._view(self.metadata)
            net._mlp_key = key
            self._net = net
        return net

    def _view(self, metadata):
        return Model._wrap([Dense._unchecked(W, b, a) for (W, b), a
                            in zip(self.layers, self.activations)],
                           _mlp_table(self.sizes, self.activations), self.params,
                           norm=self.norm, out_norm=self.out_norm, metadata=metadata,
                           backend=self.backend)

    def to_model(self):
        """This network as a :class:`Model` of dense layers, without a copy:
        the model's float32 buffer *is* ``self.params`` (training this MLP
        changes the model)."""
        return self._view(dict(self.metadata))

    __call__ = forward

    def predict(self, X, *, batch_size=1024, backend=None):
        """Predictions for ``X``: class labels (int64, the argmax of the
        logits) for a classification model; the outputs (float32, physical
        units: :meth:`forward`) for a regression model (:attr:`task`).

        Raises ValueError naming the rows whose logits are not finite
        (classification)."""
        return _predict(self, X, batch_size, backend)

    # ------------------------------------------------------------------ files
    def save(self, path, metadata=None):
        """Write the model in the pykd model format (``docs/format.md``).

        Stores the layers, the input and output normalisations and the
        metadata (``self.metadata`` updated with ``metadata``, plus sizes,
        activations and the initialisation seed; ``task`` when set).
        """
        meta = dict(self.metadata)
        if metadata:
            meta.update(metadata)
        meta.setdefault("model", "MLP")
        meta["sizes"] = self.sizes
        meta["activations"] = self.activations
        meta.setdefault("init_seed", self.seed)
        _check_task(meta)
        layers = [{"kind": "dense", "W": W, "b": b, "activation": a}
                  for (W, b), a in zip(self.layers, self.activations)]
        kw = {} if self.out_norm is None else {"out_norm": self.out_norm}
        write_model(path, layers, norm=self.norm, metadata=meta, **kw)


def _mlp_table(sizes, activations):
    """The layer table of an MLP's flat buffer (docs/model.md): dense rows
    pointing at the slices of :func:`pykd._step.layer_slices`."""
    sl = _step.layer_slices(sizes)
    table = np.zeros((len(sl), _codes.N_FIELDS), np.int64)
    for k, ((ws, bs, (n_in, n_out)), a) in enumerate(zip(sl, activations)):
        table[k, [_COL["kind"], _COL["act"], _COL["n_in"], _COL["n_out"], _COL["f32_off"],
                  _COL["f32_len"]]] = (_codes.KINDS["dense"], _codes.ACTIVATIONS[a], n_in,
                                       n_out, ws.start, bs.stop - ws.start)
    return table


def _argmax_finite(logits):
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(map(str, rows[:10])) + (", ..." if rows.size > 10 else "")
        raise ValueError(f"the logits of {rows.size} row(s) are not finite (rows {shown}): "
                         "their inputs contain NaN or inf, or the model overflowed")
    return logits.argmax(axis=1)


def _task_of(metadata):
    return metadata.get("task", "classification")


def _check_task(metadata, where="metadata"):
    task = metadata.get("task", "classification")
    if task not in TASKS:
        raise ValueError(f"{where} 'task' must be one of {', '.join(map(repr, TASKS))}, "
                         f"got {task!r}")


def _set_task(model, task):
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}, got {task!r}")
    model.metadata["task"] = task


def _predict(model, X, batch_size, backend):
    out = model.forward(X, batch_size=batch_size, backend=backend)
    return out if model.task == "regression" else _argmax_finite(out)


def _own_norm(name, value, n):
    """A validated normalisation for an MLP: None, or (mean, std) as two
    np.float32 scalars or two read-only float32 copies of shape (n,)."""
    if value is None:
        return None
    _, _, _, (mean, std) = _norm_parts(name, value, n)
    if np.ndim(mean):
        mean, std = mean.copy(), std.copy()
        mean.flags.writeable = std.flags.writeable = False
    return (mean, std)




# ---------------------------------------------------------------- Model

def _norm_parts(name, norm, n):
    """Validate a normalisation ``(mean, std)`` for ``n`` values: two scalars
    (numbers or 0-d float32) or two float32 arrays of shape (n,). Returns
    (code, mean float32 1-D, std float32 1-D, the norm as stored)."""
    if norm is None:
        return _codes.NORMS["none"], np.zeros(0, np.float32), np.zeros(0, np.float32), None
    if not isinstance(norm, (tuple, list)) or len(norm) != 2:
        raise TypeError(f"{name} must be None or a pair (mean, std)")
    parts = []
    for what, v in zip(("mean", "std"), norm):
        if isinstance(v, np.ndarray) and v.ndim == 1:
            if v.dtype != np.float32:
                raise TypeError(f"{name} {what} must be float32, got {v.dtype}")
            if v.shape != (n,):
                raise ValueError(f"{name} {what} must be a scalar or have shape ({n},), "
                                 f"got {v.shape}")
            parts.append(np.ascontiguousarray(v))
        elif (isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)) \
                or (isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind in "fiu"):
            parts.append(np.float32(v))
        else:
            raise TypeError(f"{name} {what} must be a number or a float32 array of shape "
                            f"({n},), got {type(v).__name__}")
    mean, std = parts
    if np.ndim(mean) != np.ndim(std):
        raise ValueError(f"{name} mean and std must both be scalars or both arrays of ({n},)")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (np.asarray(std) > 0).all()):
        raise ValueError(f"{name} needs a finite mean and a finite std > 0")
    code = _codes.NORMS["per_feature" if np.ndim(mean) else "scalar"]
    return code, np.atleast_1d(mean).astype(np.float32), np.atleast_1d(std).astype(np.float32), \
        (mean, std)


def _network_ext():
    ext = _kernels._fortran()
    if not hasattr(ext, "network_forward"):
        raise ImportError("this build of the pykd extension has no network_forward; rebuild "
                          "pykd or use backend='numpy'")
    return ext


_lean = None


def _lean_forward():
    """pykd._lean.forward (pykd/_lean.c), bound once to the network's C entry:
    ``forward(table, f32, i8, i32, norm, norm_kinds, x, n_out, work)`` gives
    a new (n, n_out) float32 array; None when the arguments are not the
    common case, the network's status (an int) when it refused them (then
    the full path runs)."""
    global _lean
    if _lean is None:
        ext = _network_ext()
        try:
            from . import _lean as lean
        except ImportError as e:
            raise ImportError(f"this build of pykd has no pykd._lean ({e}); rebuild pykd or use "
                              "backend='numpy'") from None
        lean.bind(int(ext.network_forward_c_address()))
        _lean = lean.forward
    return _lean


def _as_layer(layer, k):
    if isinstance(layer, Layer):
        return layer
    if isinstance(layer, dict):
        try:
            return from_record(layer)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {k}: {e}") from None
    raise TypeError(f"layer {k} must be a pykd.layers.Layer or a layer record dict, "
                    f"got {type(layer).__name__}")


class Model:
    """A chain of typed layers (any kind), with input and output
    normalisation and metadata, in the layout of docs/model.md.

    Parameters
    ----------
    layers : sequence of pykd.layers.Layer (or record dicts)
        From input to output; layer k's ``n_out`` is layer k+1's ``n_in``.
        Their arrays are copied, once, into the model's buffers: the model's
        ``layers`` are new layer objects whose arrays are views of the
        buffers (the given layers are not modified).
    norm : (mean, std) or None
        Input normalisation ``(x - mean) / std``: two scalars or two float32
        arrays of shape (n_features,), std > 0.
    out_norm : (mean, std) or None
        Output normalisation, undone after the last layer:
        ``y * std + mean`` (scalars or arrays of shape (n_outputs,)).
    metadata : dict, optional
        Free-form JSON-serialisable information saved with the model.
    backend : {"fortran", "numpy"}
        Default backend of :meth:`forward`. "numpy" runs the layers' NumPy
        twins layer by layer.

    Attributes
    ----------
    table : ndarray, int64, shape (n_layers, 14)
    f32, i8, i32 : ndarray
        The flat buffers (each at least one element).
    """

    def __init__(self, layers, *, norm=None, out_norm=None, metadata=None, backend="fortran"):
        if isinstance(layers, (Layer, dict)) or not hasattr(layers, "__iter__"):
            raise TypeError("layers must be a sequence of layers")
        layers = [_as_layer(layer, k) for k, layer in enumerate(layers, start=1)]
        if not layers:
            raise ValueError("a model needs at least one layer")
        for k in range(1, len(layers)):
            if layers[k].n_in != layers[k - 1].n_out:
                raise ValueError(f"layer sizes do not chain: layer {k} outputs "
                                 f"{layers[k - 1].n_out} but layer {k + 1} takes {layers[k].n_in}")
        if metadata is not None and not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        check.backend(backend)
        # Pack: each layer's slices in turn, in each buffer.
        clones = []
        for layer in layers:
            c = object.__new__(type(layer))
            c.__dict__.update(layer.__dict__)
            clones.append(c)
        lengths = np.array([c.slice_lengths() for c in clones], np.int64)   # (nl, 3)
        offsets, totals = _buffers.slice_offsets(lengths, [c.align_leads() for c in clones])
        f32 = _buffers.zeros(max(int(totals[0]), 1), np.float32)
        i8 = _buffers.zeros(max(int(totals[1]), 1), np.int8)
        i32 = _buffers.zeros(max(int(totals[2]), 1), np.int32)
        table = np.zeros((len(clones), _codes.N_FIELDS), np.int64)
        for k, c in enumerate(clones):
            c._pack((f32, i8, i32), offsets[k])
            table[k, :4] = (_codes.KINDS[c.kind], _codes.ACTIVATIONS[c.activation], c.n_in,
                            c.n_out)
            table[k, 4:10] = np.stack([offsets[k], lengths[k]], axis=1).reshape(-1)
            table[k, 10:14] = c.kind_params()
        self._setup(clones, table, f32, i8, i32, norm, out_norm, metadata, backend)

    @classmethod
    def _wrap(cls, layers, table, f32, i8=None, i32=None, *, norm=None, out_norm=None,
              metadata=None, backend="fortran"):
        """A model over existing buffers (no copy, no check of the layers)."""
        self = object.__new__(cls)
        one8, one32 = np.zeros(1, np.int8), np.zeros(1, np.int32)
        self._setup(layers, table, f32, one8 if i8 is None else i8, one32 if i32 is None else i32,
                    norm, out_norm, metadata, backend)
        return self

    def _setup(self, layers, table, f32, i8, i32, norm, out_norm, metadata, backend):
        self._layers = list(layers)
        self.table = table
        self._table_f = table.T            # Fortran's table(N_FIELDS, n_layers): same memory
        self.f32, self.i8, self.i32 = f32, i8, i32
        nf, no = self._layers[0].n_in, self._layers[-1].n_out
        c_in, m_in, s_in, self.norm = _norm_parts("norm", norm, nf)
        c_out, m_out, s_out, self.out_norm = _norm_parts("out_norm", out_norm, no)
        buf = np.concatenate([m_in, s_in, m_out, s_out]).astype(np.float32)
        self._norm_buf = buf if buf.size else np.zeros(1, np.float32)
        self._norm_kinds = np.array([c_in, c_out], np.int32)
        self.metadata = dict(metadata or {})
        _check_task(self.metadata)
        self.backend = backend
        self._mlp_key = (None, [], None)
        self._n_features, self._n_outputs = nf, no
        self._words = {}                  # (n, upto) -> network_workspace_size
        self._tls = threading.local()     # .work: this thread's workspace

    # ----------------------------------------------------------- properties
    @property
    def layers(self):
        """The layers (their arrays are views of the model's buffers)."""
        return list(self._layers)

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def n_features(self) -> int:
        return self._layers[0].n_in

    @property
    def n_outputs(self) -> int:
        return self._layers[-1].n_out

    @property
    def sizes(self):
        """Widths from input to output, ``[n_features, n_out of each layer]``."""
        return [self.n_features] + [layer.n_out for layer in self._layers]

    @property
    def activations(self):
        return [layer.activation for layer in self._layers]

    @property
    def kinds(self):
        return [layer.kind for layer in self._layers]

    @property
    def parameters(self) -> int:
        """Values stored: weights or factors, centroids, biases and int8 scales."""
        return sum(layer.parameters for layer in self._layers)

    @property
    def nonzeros(self) -> int:
        """Non-zero entries of the effective weight matrices (biases not counted)."""
        return sum(layer.nonzeros for layer in self._layers)

    @property
    def nbytes(self) -> int:
        """Bytes of the layers' arrays in memory."""
        return sum(layer.nbytes for layer in self._layers)

    def __repr__(self):
        layers = ", ".join(f"{layer.kind} {layer.n_in}x{layer.n_out} {layer.activation}"
                           for layer in self._layers)
        norm = "none" if self.norm is None else ("per_feature" if np.ndim(self.norm[0])
                                                 else "scalar")
        out = "none" if self.out_norm is None else ("per_output" if np.ndim(self.out_norm[0])
                                                    else "scalar")
        return (f"Model([{layers}], parameters={self.parameters}, nonzeros={self.nonzeros}, "
                f"nbytes={self.nbytes}, norm={norm}, out_norm={out})")

    def copy(self):
        """An independent copy (own buffers)."""
        return Model(self._layers, norm=self.norm, out_norm=self.out_norm,
                     metadata=self.metadata, backend=self.backend)

    # ------------------------------------------------------------ inference
    def _check_forward(self, X, upto, batch_size, backend):
        backend = check.backend(backend or self.backend)
        if not isinstance(X, np.ndarray):
            raise TypeError(f"X must be a numpy array, got {type(X).__name__}")
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (n, {self.n_features}), got {X.shape}")
        if X.dtype.kind not in "iuf":
            raise TypeError(f"X must be numeric, got dtype {X.dtype}")
        batch_size = check.integer("batch_size", batch_size, low=1)
        nl = self.n_layers
        if upto is not None:
            upto = check.integer("upto", upto, low=1, high=nl)
        return backend, (nl if upto is None else upto), batch_size

    def forward(self, X, *, upto=None, batch_size=1024, backend=None):
        """Outputs (logits, or physical units with an output normalisation)
        of ``X``, or the output of layer ``upto``.

        With the Fortran backend every chunk of ``batch_size`` rows is one
        call of ``network_forward``, which normalises the input, runs every
        layer and undoes the output normalisation; each call has its own
        workspace, so threads may share a model.

        Parameters
        ----------
        X : ndarray, shape (n, n_features)
            Raw inputs (not modified); non-float32 or non-contiguous inputs
            are converted to float32 chunk by chunk.
        upto : int, optional
            Return the output of layer ``upto`` (1-based) instead; no output
            normalisation unless ``upto`` is the last layer (the same as None).
        batch_size : int >= 1
            Rows per call.
        backend : {"fortran", "numpy"}, optional
            Defaults to the model's ``backend``.

        Returns
        -------
        ndarray, float32, shape (n, width of layer upto or n_outputs)

        Raises
        ------
        ValueError
            If an int8 layer's input holds NaN or inf (naming the layer).
        """
        # The common case (one chunk of rows, all layers, the Fortran backend)
        # in a few cheap tests; pykd._lean checks the array (float32, C order,
        # ...) and the network its width. Anything else, and any failure,
        # takes the full path below, which checks everything.
        if (upto is None and type(X) is np.ndarray and X.ndim == 2 and type(batch_size) is int
                and 0 < (n := len(X)) <= batch_size and (backend or self.backend) == "fortran"):
            try:                       # this thread's workspace for n rows, if known
                work = self._tls.fast[n]
            except (AttributeError, KeyError):
                work = self._fast_work(n)
            out = (_lean or _lean_forward())(self.table, self.f32, self.i8, self.i32,
                                             self._norm_buf, self._norm_kinds, X,
                                             self._n_outputs, work)
            if type(out) is np.ndarray:
                return out
            if out is not None:        # the network refused (e.g. the table was changed):
                self._words.clear()    # size the workspace anew
                self._tls.fast = {}
        backend, upto, batch_size = self._check_forward(X, upto, batch_size, backend)
        n = X.shape[0]
        out = np.empty((n, self._layers[upto - 1].n_out), np.float32)
        if n == 0:
            return out
        direct = X.dtype == np.float32 and X.flags.c_contiguous
        if backend == "numpy":
            for s in range(0, n, batch_size):
                xs = X[s:s + batch_size]
                out[s:s + xs.shape[0]] = self._forward_numpy(
                    xs if direct else np.ascontiguousarray(xs, np.float32), upto)
            return out
        ext = _network_ext()
        up = 0 if upto == self.n_layers else upto       # 0: all layers, out_norm undone
        work = self._work(min(batch_size, n), up)
        for s in range(0, n, batch_size):
            xs = X[s:s + batch_size]
            if not direct:
                xs = np.ascontiguousarray(xs, np.float32)
            ys = out[s:s + xs.shape[0]]
            res = ext.network_forward(table=self._table_f, f32=self.f32, i8=self.i8,
                                      i32=self.i32, norm=self._norm_buf,
                                      norm_kinds=self._norm_kinds, x=xs.T, upto=up, y=ys.T,
                                      work=work)
            stat, bad = int(res[0]), int(res[1])
            if stat != _codes.OK:
                self._raise(stat, bad, res[2] if len(res) > 2 else None)
        return out

    def _work(self, n, up):
        """This thread's workspace, at least network_workspace_size(n, up)
        words: one array per thread and model, kept between calls and grown
        when a call needs more (threads never share one; its contents never
        reach the results)."""
        words = self._words.get((n, up))
        if words is None:
            if len(self._words) >= _WORDS_CACHE:
                self._words.clear()
            words = max(int(_network_ext().network_workspace_size(
                table=self._table_f, n=n, upto=up)), 1)
            self._words[(n, up)] = words
        work = getattr(self._tls, "work", None)
        if work is None or work.shape[0] < words:
            work = self._tls.work = np.empty(words, np.float32)
        return work

    def _fast_work(self, n):
        """_work(n, 0), remembered per thread by n for the lean path (a dict
        lookup instead of a method call, a tuple key and a size check: about
        an eighth of a tiny model's call). Cleared when a call fails, e.g.
        after a table change or a larger thread count needs more words."""
        work = self._work(n, 0)
        fast = self._tls.__dict__.setdefault("fast", {})
        if len(fast) >= _WORDS_CACHE:
            fast.clear()
        fast[n] = work
        return work

    __call__ = forward

    def _raise(self, stat, bad, msg=None):
        if isinstance(msg, bytes):
            msg = msg.decode("utf-8", "replace")
        msg = (msg or "").strip()
        where = (f"layer {bad} ({self._layers[bad - 1].kind})"
                 if 1 <= bad <= self.n_layers else "the model")
        if stat == _codes.ERR_NONFINITE:
            raise ValueError(f"{where}: its input contains NaN or inf, which an int8 layer "
                             "cannot quantize")
        name = {v: k for k, v in _codes.STATUS.items()}.get(stat, str(stat))
        raise ValueError(f"{where}: network_forward failed with status {name}"
                         + (f" ({msg})" if msg else ""))

    def _forward_numpy(self, x, upto):
        """The NumPy twin of network_forward on one chunk."""
        h = x
        if self.norm is not None:
            h = (h - self.norm[0]).astype(np.float32, copy=False) / self.norm[1]
        for k, layer in enumerate(self._layers[:upto], start=1):
            if isinstance(layer, DenseInt8) and not np.isfinite(h).all():
                self._raise(_codes.ERR_NONFINITE, k)
            h = layer.forward_numpy(np.ascontiguousarray(h, np.float32))
        if upto == self.n_layers and self.out_norm is not None:
            h = h * self.out_norm[1] + self.out_norm[0]
        return h

    def predict(self, X, *, batch_size=1024, backend=None):
        """Predicted class labels (int64, the argmax of :meth:`forward`) for
        a classification model; the outputs (physical units) for a
        regression model (:attr:`task`).

        Raises ValueError naming the rows whose outputs are not finite
        (classification)."""
        return _predict(self, X, batch_size, backend)

    task = property(lambda self: _task_of(self.metadata), lambda self, v: _set_task(self, v),
                    doc="``metadata['task']``: 'classification' (the default) or 'regression'")

    # ------------------------------------------------------------ conversion
    def to_mlp(self):
        """This model as a trainable :class:`MLP`: every layer densified and
        dequantized (``layer.to_dense()``). When the float32 buffer already
        has the MLP layout (dense layers, in order, back to back) the MLP
        uses it without a copy.

        The normalisations, metadata (so the task) and backend are carried
        (every activation trains: pykd._codes.TRAINABLE_ACTIVATIONS).
        """
        mlp = MLP(self.sizes, self.activations, seed=None, norm=self.norm,
                  out_norm=self.out_norm, metadata=self.metadata, backend=self.backend)
        ref = _mlp_table(self.sizes, self.activations)
        if (all(layer.kind == "dense" for layer in self._layers)
                and np.array_equal(self.table, ref)
                and self.f32.size == _step.param_count(self.sizes)):
            mlp._bind(self.f32)
        else:
            for (W, b), layer in zip(mlp.layers, self._layers):
                W[...] = layer.to_dense()
                b[...] = layer.b
        mlp.seed = self.metadata.get("init_seed")
        return mlp

    def to_model(self):
        """The model itself (for code that takes an MLP or a Model)."""
        return self

    # ------------------------------------------------------------------ files
    def save(self, path, metadata=None):
        """Write the model in the pykd model format (docs/format.md):
        its layers, normalisations and ``self.metadata`` updated with
        ``metadata``."""
        meta = dict(self.metadata)
        if metadata:
            meta.update(metadata)
        kw = {} if self.out_norm is None else {"out_norm": self.out_norm}
        write_model(path, [layer.to_record() for layer in self._layers], norm=self.norm,
                    metadata=meta, **kw)


def load_model(path, *, backend="fortran"):
    """Load a pykd model file (any version this pykd reads).

    Returns an :class:`MLP` when every layer is dense float32 with an
    activation training can differentiate (identity, relu, tanh), with its
    normalisations (none, scalar or per-feature; so :func:`pykd.fit` on a
    loaded model keeps working); a :class:`Model` otherwise. Both carry
    the metadata, so ``task`` (absent: classification), and have
    ``forward``, ``predict``, ``save``, ``parameters``, ``n_features`` and
    ``n_outputs``.

    Raises
    ------
    TypeError
        If ``path`` is not a str or path-like (a file descriptor is refused).
    ModelFormatError
        If the file is not a valid pykd model (the message names the file).
    """
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    m = read_model(path)
    layers = m["layers"]
    norm, out_norm = m["norm"], m.get("out_norm")
    meta = m["metadata"]
    if meta.get("task", "classification") not in TASKS:
        raise ModelFormatError(f"{os.fspath(path)}: metadata 'task' must be one of "
                               f"{', '.join(map(repr, TASKS))}, got {meta.get('task')!r}")
    is_mlp = all(layer["kind"] == "dense" and layer["activation"] in _TRAINABLE
                 for layer in layers)
    if not is_mlp:
        objs = []
        for k, layer in enumerate(layers, start=1):
            try:
                objs.append(from_record(layer))
            except (TypeError, ValueError) as e:
                raise ModelFormatError(f"{os.fspath(path)}: layer {k}: {e}") from None
        return Model(objs, norm=norm, out_norm=out_norm, metadata=meta, backend=backend)
    sizes = [m["n_features"]] + [layer["W"].shape[1] for layer in layers]
    model = MLP(sizes, [layer["activation"] for layer in layers], seed=None, norm=norm,
                out_norm=out_norm, metadata=meta, backend=backend)
    for (W, b), layer in zip(model.layers, layers):
        W[...] = layer["W"]
        b[...] = layer["b"]
    model.seed = meta.get("init_seed", None)
    return model
