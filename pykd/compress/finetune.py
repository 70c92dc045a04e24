"""Fine-tuning of the compressed layer kinds: a layer-by-layer trainer.

The forward pass of each layer is the layer kind's own inference routine:
the model is one :class:`pykd.Model` (its buffers hold the current
parameters) and each layer runs as a one-layer model over those same
buffers, so the logits the trainer sees are the bits the saved model gives.
The backward pass is NumPy/BLAS in float32. What is trained, per kind:

==================  ==========================================================
``dense``           ``W`` and ``b``; exact zeros of ``W`` stay zero (a pruned
                    layer stays pruned)
``low_rank``        ``U``, ``V``, ``b``
``codebook``        ``centroids`` (each one's gradient is the sum of its
                    weights' gradients, Deep Compression) and ``b``; the
                    codes stay fixed
``sparse_csr``      ``values`` and ``b``; the pattern stays fixed
``sparse_codebook`` ``centroids`` and ``b``; pattern and codes stay fixed
``dense_int8``      quantization-aware: float shadow weights ``W`` and ``b``;
                    every step ``q, scale = quantize_int8(W, per_channel=True)``
                    and the forward pass is the int8 kernel itself; the
                    backward pass is a straight-through estimator (the
                    gradient of the dequantized product, passed to ``W``)
==================  ==========================================================

The loss is the model's task's: for a classifier Hinton KD from the
teacher's logits (:func:`pykd.kd_loss`) or cross-entropy on labels
(:func:`pykd.cross_entropy`); for a regression model MSE or Huber
(``FineTune.loss``) on the normalised targets ``(y - mean) / std`` of the
model's ``out_norm``, plus the same loss against the normalised teacher
outputs when distilling (:func:`pykd._step.regression_loss`, the NumPy
twin of the training step's loss; the trainer's last layer output is in
normalised units, the output normalisation is undone only by the saved
model's ``forward``). The optimizer is Adam
(:func:`pykd.adam_step`, one call per step on one flat buffer of every
trained parameter), the shuffling ``np.random.default_rng(seed).permutation``
per epoch as in :func:`pykd.fit`.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from .. import _codes, _step, kernels
from .._validate import plural as _plural
from ..layers import Codebook, Dense, DenseInt8, LowRank, SparseCodebook, SparseCSR
from .spec import FineTune

__all__ = ["TRAINABLE_KINDS", "fine_tune"]

_F32 = np.float32
#: The per-epoch lines (INFO) when there is no progress bar.
_log = logging.getLogger(__name__)
QMAX = 127
#: The layer kinds the trainer fine-tunes.
TRAINABLE_KINDS = ("dense", "dense_int8", "sparse_csr", "low_rank", "codebook",
                   "sparse_codebook")
_ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
_SQRT_2PI = np.sqrt(2 * np.pi)


# ------------------------------------------------------------ activations

def activation_grad(activation, dy, y, z=None):
    """``d loss / d z`` from ``dy = d loss / d y`` for ``y = act(z)``.

    identity, relu, tanh and sigmoid use the output ``y`` (relu: ``y > 0``;
    tanh: ``1 - y**2``; sigmoid: ``y (1 - y)``); gelu (exact, erf) and silu
    need the pre-activation ``z``. Works in the dtype of its arguments.
    """
    if activation == "identity":
        return dy
    if activation == "relu":
        return dy * (y > 0)
    if activation == "tanh":
        return dy * (1 - y * y)
    if activation == "sigmoid":
        return dy * (y * (1 - y))
    if z is None:
        raise ValueError(f"the {activation} derivative needs the pre-activation z")
    if activation == "gelu":
        from scipy.special import erf
        cdf = 0.5 * (1 + erf(z / np.sqrt(2)))
        pdf = np.exp(-0.5 * z * z) / _SQRT_2PI
        return dy * (cdf + z * pdf).astype(z.dtype, copy=False)
    if activation == "silu":
        with np.errstate(over="ignore"):
            s = 1 / (1 + np.exp(-z))
        return dy * (s * (1 + z * (1 - s)))
    raise ValueError(f"activation must be one of {list(_codes.ACTIVATIONS)}, got {activation!r}")


def activate(activation, z):
    """``act(z)`` in the dtype of z (the float64 reference of the tests)."""
    if activation == "identity":
        return z
    if activation == "relu":
        return np.maximum(z, 0)
    if activation == "tanh":
        return np.tanh(z)
    if activation == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if activation == "gelu":
        from scipy.special import erf
        return z * 0.5 * (1 + erf(z / np.sqrt(2)))
    if activation == "silu":
        return z / (1 + np.exp(-z))
    raise ValueError(f"activation must be one of {list(_codes.ACTIVATIONS)}, got {activation!r}")


_NEEDS_Z = ("gelu", "silu")


# ------------------------------------------------------------ per-kind trainers
#
# Each trainer knows one layer of the model: ``params`` (name -> initial
# float32 array) are its trained parameters. ``sync(p)`` writes their
# current values into the model's buffers (what the kernel reads) and
# ``use(p)``s them; ``use(p)`` only sets the arrays the NumPy math reads
# (the float64 tests pass float64 copies). ``pre(x)`` is the pre-activation
# in x's dtype (for gelu/silu, and the tests), ``backward(x, dz, need_dx)``
# returns (dx or None, {name: gradient}).

def _as(a, dtype):
    return a.astype(dtype, copy=False)


class _Trainer:
    layer = None
    names = ()

    def __init__(self, layer):
        self.layer = layer
        self.params = {n: getattr(layer, n).copy() for n in self.names}

    def sync(self, p):
        for n in self.names:
            getattr(self.layer, n)[...] = p[n]
        self.use(p)

    def use(self, p):
        self.p = p
        self._W = None

    def weight(self, dtype):
        """The effective W (n_in, n_out) of the current parameters."""
        if self._W is None:
            self._W = self._weight()
        return _as(self._W, dtype)

    def pre(self, x):
        return x @ self.weight(x.dtype) + _as(self.p["b"], x.dtype)


class _DenseT(_Trainer):
    names = ("W", "b")

    def __init__(self, layer):
        super().__init__(layer)
        self.keep = layer.W != 0                    # a pruned weight stays zero

    def _weight(self):
        return self.p["W"]

    def backward(self, x, dz, need_dx):
        dx = dz @ self.weight(x.dtype).T if need_dx else None
        return dx, {"W": x.T @ dz, "b": dz.sum(axis=0)}


class _LowRankT(_Trainer):
    names = ("U", "V", "b")

    def pre(self, x):
        U, V = _as(self.p["U"], x.dtype), _as(self.p["V"], x.dtype)
        return (x @ U) @ V + _as(self.p["b"], x.dtype)

    def backward(self, x, dz, need_dx):
        U, V = _as(self.p["U"], x.dtype), _as(self.p["V"], x.dtype)
        t = x @ U
        dt = dz @ V.T
        g = {"U": x.T @ dt, "V": t.T @ dz, "b": dz.sum(axis=0)}
        return (dt @ U.T if need_dx else None), g


class _CodebookT(_Trainer):
    names = ("centroids", "b")

    def __init__(self, layer):
        super().__init__(layer)
        self.codes = layer.codes.astype(np.intp).reshape(-1)      # fixed
        self.k = layer.n_codes

    def _weight(self):
        return self.p["centroids"][self.codes].reshape(self.layer.n_in, self.layer.n_out)

    def backward(self, x, dz, need_dx):
        dW = x.T @ dz
        # Deep Compression: a centroid's gradient is the sum of its weights'.
        dc = np.bincount(self.codes, weights=dW.reshape(-1), minlength=self.k)
        dx = dz @ self.weight(x.dtype).T if need_dx else None
        return dx, {"centroids": _as(dc, x.dtype), "b": dz.sum(axis=0)}


class _SparseT(_Trainer):
    """sparse_csr (values trained) and sparse_codebook (centroids trained)."""

    def __init__(self, layer):
        self.book = isinstance(layer, SparseCodebook)
        self.names = ("centroids" if self.book else "values", "b")
        super().__init__(layer)
        rows = np.repeat(np.arange(layer.n_in, dtype=np.intp), np.diff(layer.indptr))
        self.pos = rows * layer.n_out + layer.indices.astype(np.intp)     # fixed pattern
        if self.book:
            self.codes = layer.codes.astype(np.intp)
            self.k = layer.n_codes

    def sync(self, p):
        super().sync(p)
        self.layer._refresh_values()              # the planes: derived from the values

    def _values(self):
        return self.p["centroids"][self.codes] if self.book else self.p["values"]

    def _weight(self):
        v = self._values()
        W = np.zeros(self.layer.n_in * self.layer.n_out, v.dtype)
        W[self.pos] = v
        return W.reshape(self.layer.n_in, self.layer.n_out)

    def backward(self, x, dz, need_dx):
        dv = (x.T @ dz).reshape(-1)[self.pos]
        if self.book:
            grads = {"centroids": _as(np.bincount(self.codes, weights=dv, minlength=self.k),
                                      x.dtype)}
        else:
            grads = {"values": dv}
        grads["b"] = dz.sum(axis=0)
        return (dz @ self.weight(x.dtype).T if need_dx else None), grads


def _act_scale(x):
    """The dynamic per-sample input scale of the int8 kernel (docs/model.md)."""
    amax = np.abs(x).max(axis=1).astype(_F32)
    tiny = np.finfo(_F32).tiny
    return np.where(amax > 0, np.maximum(amax / _F32(QMAX), tiny), _F32(1)).astype(_F32)


class _Int8T(_Trainer):
    """Quantization-aware training of a dense_int8 layer: ``W`` is the float
    shadow weight, quantized at every ``sync`` by the conversion's own
    :func:`pykd.quantize_int8`."""
    names = ("W", "b")

    def __init__(self, layer, shadow=None):
        self.layer = layer
        if shadow is None:
            W = layer.to_dense()
            self.keep = None
        else:
            W = np.ascontiguousarray(shadow, _F32).copy()
            self.keep = W != 0                     # a pruned float model stays pruned
        self.params = {"W": W, "b": layer.b.copy()}

    def sync(self, p):
        q, scale = kernels.quantize_int8(p["W"], per_channel=True)
        self.layer.q[...] = q
        self.layer.repack()                       # the kernel's packed copy of q
        self.layer.scale[...] = scale
        self.layer.b[...] = p["b"]
        self.use(p)
        self._W = q.astype(_F32) * scale          # the dequantized weights of the kernel

    def _weight(self):
        raise RuntimeError("an int8 trainer's weights are set by sync")

    def quantized_input(self, x):
        """(dequantized int8 input ``qx * sx`` in x's dtype, mask of the
        entries a static scale does not clip, or None): the kernel's
        activation quantization."""
        xs = self.layer.x_scale
        x32 = _as(x, _F32)
        sx = _act_scale(x32) if xs is None else np.full(x.shape[0], xs, _F32)
        r = np.rint(x32 * (_F32(1) / sx)[:, None])
        mask = None if xs is None else np.abs(r) <= QMAX
        qx = np.clip(r, -QMAX, QMAX)
        return _as(qx * sx[:, None], x.dtype), mask

    def pre(self, x):
        xq, _ = self.quantized_input(x)
        return xq @ self.weight(x.dtype) + _as(self.p["b"], x.dtype)

    def backward(self, x, dz, need_dx):
        # Straight-through: the gradient of the dequantized product at the
        # quantized operands; the input gradient passes the activation
        # quantization (zero where a static scale clips).
        xq, mask = self.quantized_input(x)
        dx = None
        if need_dx:
            dx = dz @ self.weight(x.dtype).T
            if mask is not None:
                dx *= mask
        return dx, {"W": xq.T @ dz, "b": dz.sum(axis=0)}


def _trainer(layer, shadow):
    if isinstance(layer, Dense):
        return _DenseT(layer)
    if isinstance(layer, DenseInt8):
        return _Int8T(layer, shadow)
    if isinstance(layer, LowRank):
        return _LowRankT(layer)
    if isinstance(layer, Codebook):
        return _CodebookT(layer)
    if isinstance(layer, (SparseCSR, SparseCodebook)):
        return _SparseT(layer)
    raise TypeError(f"cannot fine-tune a {layer.kind} layer (trainable kinds: "
                    f"{', '.join(TRAINABLE_KINDS)})")


# ------------------------------------------------------------ the network

class _Net:
    """The model, its per-layer one-layer models over the same buffers, the
    flat buffer ``P`` of every trained parameter and the gradient ``G``."""

    def __init__(self, model, shadow=None):
        from ..models import Model
        self.model = model.copy()                 # own buffers; the input is untouched
        layers = self.model.layers
        shadow = shadow or [None] * len(layers)
        self.trainers = [_trainer(layer, s) for layer, s in zip(layers, shadow)]
        sizes = [sum(a.size for a in t.params.values()) for t in self.trainers]
        self.P = np.empty(sum(sizes), _F32)
        self.G = np.zeros_like(self.P)
        self.M1, self.M2 = np.zeros_like(self.P), np.zeros_like(self.P)     # Adam's moments
        self.views, self.gviews = [], []
        keep = np.ones(self.P.size, bool)
        pos = 0
        for t in self.trainers:
            pv, gv = {}, {}
            for name, a in t.params.items():
                pv[name] = self.P[pos:pos + a.size].reshape(a.shape)
                gv[name] = self.G[pos:pos + a.size].reshape(a.shape)
                pv[name][...] = a
                if name == "W" and getattr(t, "keep", None) is not None:
                    keep[pos:pos + a.size] = t.keep.reshape(-1)
                pos += a.size
            self.views.append(pv)
            self.gviews.append(gv)
        self.mask = None if keep.all() else keep
        # One-layer models over the model's buffers: the kernel of each layer
        # on its own, so the trainer keeps every layer's input and output.
        self.sub = []
        for k, layer in enumerate(layers):
            self.sub.append(Model._wrap([layer], self.model.table[k:k + 1].copy(),
                                        self.model.f32, self.model.i8, self.model.i32,
                                        norm=self.model.norm if k == 0 else None,
                                        backend=self.model.backend))
        self.sync()

    def sync(self):
        for t, p in zip(self.trainers, self.views):
            t.sync(p)

    def normalize(self, x):
        norm = self.model.norm
        if norm is None:
            return x
        return ((x - norm[0]) / norm[1]).astype(_F32, copy=False)

    def forward(self, x):
        """(outputs of every layer, last = logits): raw x (n, n_features)."""
        outs, h = [], x
        for m in self.sub:
            h = m.forward(h, batch_size=max(h.shape[0], 1))
            outs.append(h)
        return outs

    def backward(self, x, outs, dlogits):
        """Fill G from ``dlogits`` (d loss / d logits), raw input x."""
        dy = dlogits
        n_layers = len(self.trainers)
        for k in range(n_layers - 1, -1, -1):
            t = self.trainers[k]
            layer = t.layer
            xin = outs[k - 1] if k else self.normalize(x)
            z = t.pre(xin) if layer.activation in _NEEDS_Z else None
            dz = activation_grad(layer.activation, dy, outs[k], z).astype(_F32, copy=False)
            dy, grads = t.backward(xin, dz, need_dx=k > 0)
            for name, g in grads.items():
                self.gviews[k][name][...] = g


# ------------------------------------------------------------ validation

def check_trainable(model, what="fine_tune"):
    """TypeError/ValueError if the trainer cannot fine-tune ``model``."""
    from ..models import Model
    if not isinstance(model, Model):
        raise TypeError(f"{what}: model must be a pykd.Model, got {type(model).__name__}")
    for k, layer in enumerate(model.layers, start=1):
        if layer.kind not in TRAINABLE_KINDS:
            raise ValueError(f"{what}: layer {k} is {layer.kind}, which cannot be fine-tuned "
                             f"(trainable kinds: {', '.join(TRAINABLE_KINDS)})")


def _check_spec(model, ft):
    """(y, y_val): int64 labels of a classifier, or (n, n_out) float target
    views of a regression model (``model.task``)."""
    from ..train import _as_labels, _as_targets, _check_finite
    if not isinstance(ft, FineTune):
        raise TypeError(f"fine_tune must be a pykd.FineTune or None, got {type(ft).__name__}")
    n, nf = ft.X.shape
    if nf != model.n_features:
        raise ValueError(f"FineTune.X has {_plural(nf, 'feature')} but the model takes "
                         f"{model.n_features}")
    if n == 0:
        raise ValueError("FineTune.X is empty")
    _check_finite("FineTune.X", ft.X)
    regress = model.task == "regression"
    if regress:
        loss = ft.regression_loss()
        y = _as_targets("FineTune.y", ft.y, n, model.n_outputs, loss, "FineTune.X")
        if ft.teacher_logits is not None:
            raise ValueError("FineTune.teacher_logits given for a regression model: its "
                             "teacher's outputs go in FineTune.teacher_outputs")
    else:
        if ft.loss is not None or ft.teacher_outputs is not None:
            what = "loss" if ft.loss is not None else "teacher_outputs"
            raise ValueError(f"FineTune.{what} is for regression models; this model's task is "
                             "classification (cross-entropy, or KD from teacher or "
                             "teacher_logits)")
        y = _as_labels("FineTune.y", ft.y, n, model.n_outputs, "FineTune.X")
    yv = None
    if ft.X_val is not None:
        if not isinstance(ft.X_val, np.ndarray) or ft.X_val.ndim != 2 \
                or ft.X_val.shape[1] != model.n_features:
            raise ValueError(f"FineTune.X_val must have shape (n, {model.n_features})")
        _check_finite("FineTune.X_val", ft.X_val)
        if regress:
            yv = _as_targets("FineTune.y_val", ft.y_val, ft.X_val.shape[0], model.n_outputs,
                             loss, "FineTune.X_val")
        else:
            yv = _as_labels("FineTune.y_val", ft.y_val, ft.X_val.shape[0], model.n_outputs,
                            "FineTune.X_val")
    return y, yv


def _spec_summary(ft, n, regress=False):
    loss = ft.regression_loss() if regress else ("kd" if ft.distills else "ce")
    extra = {"huber_delta": ft.huber_delta} if "huber" in loss else {}
    return {"loss": loss, **extra, "epochs": ft.epochs, "lr": ft.lr,
            "batch_size": ft.batch_size, "temperature": ft.temperature, "alpha": ft.alpha,
            "seed": ft.seed, "lr_decay": ft.lr_decay, "n_train": n,
            "teacher": ("model" if ft.teacher is not None
                        else "logits" if ft.teacher_logits is not None
                        else "outputs" if ft.teacher_outputs is not None else None)}


# ------------------------------------------------------------ the loop

def _one_blas_thread():
    """One BLAS thread (both OpenBLAS pools: NumPy's and the extension's)
    while training. A step's products are small (batch x layer width), and
    the two pools alternating every few hundred microseconds fight for the
    cores: on the loaded 2-core VM a step took 255 ms with 2 threads, 14 ms
    with one."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=1, user_api="blas")


def _batch_loss(ft, logits, yb, tb, regress):
    """(loss, d loss / d logits) of one batch: the task's loss."""
    if regress:
        return _step.regression_loss(logits, yb, ft.regression_loss(tb is not None),
                                     ft.huber_delta, ft.alpha, tb)
    if tb is None:
        return kernels.cross_entropy(logits, yb)
    return kernels.kd_loss(logits, tb, yb, ft.temperature, ft.alpha)


def _epoch(net, X, y, teacher, ft, perm, lr, it, bar, stats, regress=False):
    """One epoch of steps over the rows ``perm``; ``it`` steps done before.
    For regression ``y`` and ``teacher`` are the normalised float32 copies."""
    bs = ft.batch_size
    for bi in range(-(-perm.size // bs)):
        idx = perm[bi * bs:(bi + 1) * bs]
        xb = np.ascontiguousarray(X[idx])
        yb = y[idx]
        outs = net.forward(xb)
        logits = outs[-1]
        if not np.isfinite(logits).all():
            from ..train import NonFiniteLossError
            raise NonFiniteLossError(f"fine-tuning: the logits became NaN or inf at step "
                                     f"{it + 1} (batch {bi + 1} of the epoch); try a lower "
                                     f"learning rate (lr={lr:g})")
        tb = None if teacher is None else np.ascontiguousarray(teacher[idx])
        loss, dlog = _batch_loss(ft, logits, yb, tb, regress)
        if not np.isfinite(loss):
            from ..train import NonFiniteLossError
            raise NonFiniteLossError(f"fine-tuning: the loss became NaN or inf at step "
                                     f"{it + 1} (batch {bi + 1} of the epoch); try a lower "
                                     f"learning rate (lr={lr:g})")
        net.backward(xb, outs, dlog)
        it += 1
        kernels.adam_step(net.P, net.G, net.M1, net.M2, it, lr, mask=net.mask, **_ADAM)
        net.sync()
        stats["loss_sum"] += float(loss) * idx.size
        if not regress:
            stats["correct"] += int((logits.argmax(axis=1) == yb).sum())
        if bar is not None:
            bar.update(idx.size)


def _run(net, ft, y, y_val=None, teacher=None):
    """The epochs of ``ft`` on ``net``; returns the history. For a regression
    model ``y`` and ``teacher`` are in physical units (normalised here,
    once) and the history has ``test_rmse``/``test_r2`` too."""
    from ..metrics import regression_metrics, target_loss
    from ..train import _logits_stats, _normalized, _progress_bar
    X = ft.X
    n = X.shape[0]
    rng = np.random.default_rng(ft.seed)
    n_batches = -(-n // ft.batch_size)
    regress = net.model.task == "regression"
    keys = ("epoch", "loss", "train_accuracy", "test_accuracy", "test_loss", "seconds",
            "samples_per_second") + (("test_rmse", "test_r2") if regress else ())
    history = {k: [] for k in keys}
    if regress:
        y = _normalized(y, net.model.out_norm)
        if teacher is not None:
            teacher = _normalized(teacher, net.model.out_norm)
    it = 0
    for epoch in range(ft.epochs):
        perm = rng.permutation(n)
        lr = ft.lr * ft.lr_decay**epoch
        stats = {"loss_sum": 0.0, "correct": 0}
        bar = _progress_bar(ft.progress, total=n, desc=f"fine-tune epoch {epoch + 1}/{ft.epochs}")
        t0 = time.perf_counter()
        with _one_blas_thread():
            _epoch(net, X, y, teacher, ft, perm, lr, it, bar, stats, regress)
        it += n_batches
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        history["epoch"].append(epoch + 1)
        history["loss"].append(stats["loss_sum"] / n)
        history["train_accuracy"].append(None if regress else stats["correct"] / n)
        history["seconds"].append(seconds)
        history["samples_per_second"].append(n / seconds if seconds > 0 else None)
        acc = vloss = rmse = r2 = None
        if ft.X_val is not None and regress:
            out = net.model.forward(ft.X_val)
            met = regression_metrics(y_val, out)
            rmse, r2 = met["rmse"], met["r2"]
            vloss = target_loss(y_val, out, net.model.out_norm, ft.loss or "mse",
                                ft.huber_delta)
        elif ft.X_val is not None:
            acc, vloss = _logits_stats(net.model.forward(ft.X_val), y_val)
        history["test_accuracy"].append(acc)
        history["test_loss"].append(vloss)
        if regress:
            history["test_rmse"].append(rmse)
            history["test_r2"].append(r2)
        if ft.progress and bar is None:
            if regress:
                train = ""
                test = "" if rmse is None else f", test rmse {rmse:.4g}, test r2 {r2:.4f}"
            else:
                train = f", train accuracy {history['train_accuracy'][-1]:.4f}"
                test = "" if acc is None else f", test accuracy {acc:.4f}"
            _log.info(f"fine-tune epoch {epoch + 1}/{ft.epochs}: loss "
                      f"{history['loss'][-1]:.4f}{train}{test} ({seconds:.2f} s)")
    return history


def train(model, ft, *, shadow=None, merge=False):
    """Fine-tune ``model`` (a :class:`pykd.Model` of trainable kinds) with
    ``ft``; returns ``(new model, history)``. The input is not modified.

    ``shadow``: per layer, the float32 shadow ``W`` of a dense_int8 layer
    (None: its dequantized weights). ``merge``: set ``fine_tune`` and
    ``history`` on the metadata's last compression step (the conversion just
    made) instead of appending a ``{"fine_tune": ..., "history": ...}`` step.
    """
    check_trainable(model)
    y, y_val = _check_spec(model, ft)
    if shadow is not None:
        if len(shadow) != model.n_layers:
            raise ValueError(f"shadow must have one entry per layer ({model.n_layers})")
        for k, (s, layer) in enumerate(zip(shadow, model.layers), start=1):
            if s is not None and (not isinstance(layer, DenseInt8) or not isinstance(
                    s, np.ndarray) or s.shape != (layer.n_in, layer.n_out)):
                raise ValueError(f"shadow[{k - 1}]: only a dense_int8 layer takes a shadow "
                                 f"weight, of shape (n_in, n_out)")
    X = ft.X
    n = X.shape[0]
    teacher = ft.logits()
    regress = model.task == "regression"
    if regress and teacher is not None:
        from ..train import _as_targets
        teacher = _as_targets("the teacher's outputs (FineTune.teacher or teacher_outputs)",
                              teacher, n, model.n_outputs, ft.regression_loss(), "FineTune.X")
    elif teacher is not None and teacher.shape != (n, model.n_outputs):
        raise ValueError(f"the teacher gives logits of shape {teacher.shape}, expected "
                         f"{(n, model.n_outputs)}")
    net = _Net(model, shadow)
    history = _run(net, ft, y, y_val, teacher)
    out = net.model
    meta = dict(out.metadata)
    comp = list(meta.get("compression", []))
    summary = _spec_summary(ft, n, regress)
    if merge and comp:
        comp[-1] = {**comp[-1], "fine_tune": summary, "history": history}
    else:
        comp.append({"fine_tune": summary, "history": history})
    meta["compression"] = comp
    out.metadata = meta
    return out, history


def fine_tune(model, fine_tune):
    """Fine-tune a model of any trainable kind (see the module docstring).

    Parameters
    ----------
    model : MLP or Model
        Layers of the kinds in :data:`TRAINABLE_KINDS`; a ``dense_int8``
        layer is trained quantization-aware from its dequantized weights.
    fine_tune : pykd.FineTune

    Returns
    -------
    Model
        A new model (the input is not modified) of the same kinds, codes
        and patterns; ``metadata["compression"][-1]`` is ``{"fine_tune":
        settings, "history": per-epoch lists}``.
    """
    from ..models import MLP
    if isinstance(model, MLP):
        model = model.to_model()
    if not isinstance(fine_tune, FineTune):
        raise TypeError(f"fine_tune must be a pykd.FineTune, got {type(fine_tune).__name__}")
    return train(model, fine_tune)[0]
