"""Models: a multilayer perceptron whose parameters live in one flat buffer.

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
import os

import numpy as np

from . import _step
from ._validate import BACKENDS
from .modelfile import ACTIVATION_CODES, read_model, write_model

__all__ = ["MLP", "load_model"]

_F32 = np.float32


def _check_sizes(sizes):
    try:
        sizes = [int(s) for s in sizes]
    except (TypeError, ValueError):
        raise TypeError(f"sizes must be a sequence of positive integers, got {sizes!r}") from None
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
        One per layer, from ``"identity"``, ``"relu"``, ``"tanh"``. Default:
        relu on hidden layers, identity (logits) on the output layer.
    seed : int
        Seed of the initialisation: like PyTorch's ``nn.Linear`` default,
        ``W`` and ``b`` of a layer are drawn from ``U(-1/sqrt(n_in),
        1/sqrt(n_in))`` with ``np.random.default_rng(seed)``, layer by layer
        (``W`` then ``b``). ``None`` leaves all parameters at zero.
    norm : (mean, std) or None
        Input normalisation ``(x - mean) / std`` applied by :meth:`forward`
        (two ``np.float32`` scalars). :func:`pykd.train.fit` sets it from the
        training set when it is None.
    metadata : dict, optional
        Free-form JSON-serialisable information saved with the model.

    Attributes
    ----------
    params : ndarray, float32, shape (parameters,)
        The flat parameter buffer.
    layers : list of (W, b)
        Views into ``params``.
    """

    def __init__(self, sizes, activations=None, *, seed=0, norm=None, metadata=None,
                 backend="fortran"):
        self.sizes = _check_sizes(sizes)
        n_layers = len(self.sizes) - 1
        if activations is None:
            activations = ["relu"] * (n_layers - 1) + ["identity"]
        activations = list(activations)
        if len(activations) != n_layers:
            raise ValueError(
                f"need one activation per layer ({n_layers}), got {len(activations)}")
        for a in activations:
            if a not in ACTIVATION_CODES:
                raise ValueError(
                    f"activation must be one of {list(ACTIVATION_CODES)}, got {a!r}")
        self.activations = activations
        self.norm = None
        if norm is not None:
            self.set_norm(*norm)
        self.metadata = dict(metadata or {})
        self.backend = backend
        self._bind(np.zeros(_step.param_count(self.sizes), _F32))
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
        """Set the input normalisation ``(x - mean) / std`` (scalars)."""
        mean, std = _F32(mean), _F32(std)
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise ValueError(f"norm needs a finite mean and a finite std > 0, got {mean}, {std}")
        self.norm = (mean, std)

    @property
    def parameters(self) -> int:
        """Number of parameters (weights and biases)."""
        return int(self.params.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the parameters (float32)."""
        return int(self.params.nbytes)

    @property
    def n_features(self) -> int:
        return self.sizes[0]

    @property
    def n_outputs(self) -> int:
        return self.sizes[-1]

    def __repr__(self):
        acts = ",".join(self.activations)
        return (f"MLP(sizes={self.sizes}, activations=[{acts}], parameters={self.parameters}, "
                f"norm={None if self.norm is None else tuple(float(v) for v in self.norm)})")

    def copy(self):
        """An independent copy (own buffer)."""
        m = MLP(self.sizes, self.activations, seed=None, norm=self.norm,
                metadata=self.metadata, backend=self.backend)
        m.params[...] = self.params
        m.seed = self.seed
        return m

    # ------------------------------------------------------------- inference
    def _check_input(self, X):
        if not isinstance(X, np.ndarray):
            raise TypeError(f"X must be a numpy array, got {type(X).__name__}")
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (n, {self.n_features}), got {X.shape}")
        if X.dtype.kind not in "iuf":
            raise TypeError(f"X must be numeric, got dtype {X.dtype}")

    def normalize(self, X, out=None):
        """``(X - mean) / std`` as a new float32 array (or into ``out``)."""
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

        Parameters
        ----------
        X : ndarray, shape (n, n_features)
            Raw inputs; the model's normalisation is applied to a copy of each
            chunk of rows (X itself is never modified). Non-float32 inputs are
            converted chunk by chunk.
        upto : int, optional
            Return the output of layer ``upto`` (1-based; hidden features)
            instead of the logits.
        batch_size : int
            Rows per internal batch.
        backend : {"fortran", "numpy"}, optional
            Defaults to the model's ``backend`` attribute.

        Returns
        -------
        ndarray, float32, shape (n, sizes[upto or -1])
        """
        backend = backend or self.backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'fortran' or 'numpy', got {backend!r}")
        self._check_input(X)
        n_layers = len(self.sizes) - 1
        if upto is not None and not (1 <= int(upto) <= n_layers):
            raise ValueError(f"upto must be in [1, {n_layers}], got {upto}")
        width = self.sizes[upto or -1]
        n = X.shape[0]
        out = np.empty((n, width), _F32)
        if n == 0:
            return out
        direct = self.norm is None and X.dtype == _F32 and X.flags.c_contiguous
        chunk = max(batch_size, 1) * 8 if not direct else n
        buf = None if direct else np.empty((min(chunk, n), self.n_features), _F32)
        for s in range(0, n, chunk):
            xs = X[s:s + chunk]
            if not direct:
                xs = self.normalize(xs, out=buf[:xs.shape[0]])
            out[s:s + xs.shape[0]] = _step.forward(
                self.sizes, self.activations, self.params, xs, upto=upto,
                batch_size=batch_size, backend=backend)
        return out

    __call__ = forward

    def predict(self, X, *, batch_size=1024, backend=None):
        """Predicted class labels (int64) of ``X``."""
        return self.forward(X, batch_size=batch_size, backend=backend).argmax(axis=1)

    # ------------------------------------------------------------------ files
    def save(self, path, metadata=None):
        """Write the model in the pykd model format (``docs/format.md``).

        Stores the layers, the scalar input normalisation and the metadata
        (``self.metadata`` updated with ``metadata``, plus sizes, activations
        and the initialisation seed).
        """
        meta = dict(self.metadata)
        if metadata:
            meta.update(metadata)
        meta.setdefault("model", "MLP")
        meta["sizes"] = self.sizes
        meta["activations"] = self.activations
        meta.setdefault("init_seed", self.seed)
        layers = [{"kind": "dense", "W": W, "b": b, "activation": a}
                  for (W, b), a in zip(self.layers, self.activations)]
        write_model(path, layers, norm=self.norm, metadata=meta)


def load_model(path, *, backend="fortran"):
    """Load an :class:`MLP` written by :meth:`MLP.save` (or any pykd model
    file of dense layers with no or scalar normalisation).

    Returns a model with ``.forward(X)`` (logits), ``.predict(X)`` (labels)
    and ``.save(path)``.
    """
    m = read_model(path)
    layers = m["layers"]
    for k, layer in enumerate(layers, start=1):
        if layer["kind"] != "dense":
            raise ValueError(f"{os.fspath(path)}: layer {k} is {layer['kind']}; "
                             "pykd.load_model reads dense layers only")
    norm = m["norm"]
    if norm is not None and np.ndim(norm[0]) != 0:
        raise ValueError(f"{os.fspath(path)}: per-feature normalisation is not supported by "
                         "pykd.MLP (only a scalar mean/std)")
    sizes = [m["n_features"]] + [layer["W"].shape[1] for layer in layers]
    meta = m["metadata"]
    model = MLP(sizes, [layer["activation"] for layer in layers], seed=None, norm=norm,
                metadata=meta, backend=backend)
    for (W, b), layer in zip(model.layers, layers):
        W[...] = layer["W"]
        b[...] = layer["b"]
    model.seed = meta.get("init_seed", None)
    return model
