"""A whole training step of an MLP in one call.

The network lives in one flat float32 buffer (see :func:`layer_slices`);
gradients and optimizer state are buffers of the same layout. With
``backend="fortran"`` a step is a single call into ``pykd_mlp``; with
``backend="numpy"`` the same step runs on the NumPy twins of the kernels,
with the same dropout random numbers, so the two paths agree to rounding.

For data-parallel training the step also comes in two halves:
:func:`gradient_step` (the gradient of one shard of a global batch, whose
sum over the shards is the whole batch's gradient) and :func:`apply_update`
(the optimizer on the whole buffer). :func:`train_step` equals
``gradient_step`` + ``apply_update`` on the whole batch bit for bit.
"""
from dataclasses import dataclass, fields

import numpy as np

from . import _codes
from . import _reference as ref

from . import kernels as _kernels
from .kernels import _fortran

LOSSES = tuple(_codes.LOSSES)          # names; the codes live in _codes.LOSSES
REGRESSION_LOSSES = _codes.REGRESSION_LOSSES
OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainConfig:
    """Settings of a training step (see pykd.kernels for the formulas).

    Losses: ``"ce"`` (labels), ``"kd"`` (Hinton KD against teacher logits),
    and for float targets ``"mse"``, ``"huber"`` (threshold ``huber_delta``)
    and their distilled forms ``"mse_kd"``, ``"huber_kd"``:
    ``alpha * loss(student, y) + (1 - alpha) * loss(student, teacher_outputs)``
    (docs/regression.md).

    An option set to a value other than its default where it has no effect
    is an error: ``temperature`` without ``loss="kd"``, ``alpha`` without a
    distillation loss, ``huber_delta`` without a Huber loss, ``momentum``
    with ``optimizer="adam"``, ``beta1``/``beta2``/``eps`` with ``"sgd"``,
    ``hint_weight`` with ``hint_layer=0``. Defaults that do nothing are fine.
    """
    loss: str = "ce"            # one of LOSSES (see above)
    temperature: float = 5.0
    alpha: float = 0.1          # distillation weight of the hard-label / target term
    huber_delta: float = 1.0    # Huber threshold, in target units
    optimizer: str = "adam"     # "adam" or "sgd" (with momentum)
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.0
    dropout: float = 0.0        # probability of dropping a hidden unit
    seed: int = 0               # dropout random stream
    hint_layer: int = 0         # 0: no hint; k: output of layer k (1-based) is hinted
    hint_weight: float = 1.0    # weight of the hint MSE term (the CLI's default too)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not (self.huber_delta > 0 and np.isfinite(self.huber_delta)):
            raise ValueError(f"huber_delta must be finite and > 0, got {self.huber_delta}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (self.lr >= 0 and self.weight_decay >= 0 and self.momentum >= 0):
            raise ValueError("lr, weight_decay and momentum must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise ValueError("beta1 and beta2 must be in [0, 1) and eps > 0")
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.hint_layer < 0 or self.hint_weight < 0:
            raise ValueError("hint_layer and hint_weight must be >= 0")
        self._reject_unused()

    #: option -> (when it has no effect, what to set instead)
    _UNUSED = {
        "temperature": (lambda c: c.loss != "kd", "loss='kd'"),
        "alpha": (lambda c: c.loss in ("ce", "mse", "huber"), "loss='kd', 'mse_kd' or 'huber_kd'"),
        "huber_delta": (lambda c: "huber" not in c.loss, "loss='huber' or 'huber_kd'"),
        "momentum": (lambda c: c.optimizer == "adam", "optimizer='sgd'"),
        "beta1": (lambda c: c.optimizer == "sgd", "optimizer='adam'"),
        "beta2": (lambda c: c.optimizer == "sgd", "optimizer='adam'"),
        "eps": (lambda c: c.optimizer == "sgd", "optimizer='adam'"),
        "hint_weight": (lambda c: not c.hint_layer, "hint_layer=K"),
    }

    def _reject_unused(self):
        defaults = {f.name: f.default for f in fields(self)}
        for name, (unused, needs) in self._UNUSED.items():
            value = getattr(self, name)
            if value != defaults[name] and unused(self):
                raise ValueError(
                    f"TrainConfig: {name}={value!r} has no effect with loss={self.loss!r}, "
                    f"optimizer={self.optimizer!r}, hint_layer={self.hint_layer!r}; it needs "
                    f"{needs} (or leave {name} at its default {defaults[name]!r})")


def layer_slices(sizes, hint=None):
    """Where each layer's W and b live in the flat buffer.

    Returns a list of ``(W_slice, b_slice, (n_in, n_out))``, one per layer,
    then one for the hint regressor when ``hint=(k, n_teacher_units)``
    (R maps the output of student layer k to the teacher's units).
    ``buf[W_slice].reshape(n_in, n_out)`` is a view.
    """
    shapes = list(zip(sizes[:-1], sizes[1:]))
    if hint is not None:
        k, n_t = hint
        if not 1 <= k <= len(shapes):
            raise ValueError(f"hint layer must be in [1, {len(shapes)}], got {k}")
        shapes.append((sizes[k], n_t))
    out, pos = [], 0
    for n_in, n_out in shapes:
        w = slice(pos, pos + n_in * n_out)
        b = slice(w.stop, w.stop + n_out)
        out.append((w, b, (n_in, n_out)))
        pos = b.stop
    return out


def param_count(sizes, hint=None):
    return layer_slices(sizes, hint)[-1][1].stop


def _views(buf, sizes, hint=None):
    return [(buf[w].reshape(shape), buf[b]) for w, b, shape in layer_slices(sizes, hint)]


class Workspace:
    """Scratch memory for training steps on batches of up to ``batch_size``;
    allocate once per run."""

    def __init__(self, sizes, batch_size, hint=None):
        self.sizes = np.asarray(sizes, np.int32)
        self.batch_size = int(batch_size)
        self.n_hint = 0 if hint is None else int(hint[1])
        # Only the Fortran step uses it; the NumPy path works without the extension.
        ext = _kernels._f
        words = ext.mlp_workspace_size(self.sizes, self.batch_size, self.n_hint) if ext else 0
        self.work = np.empty(words, np.float32)
        self.placeholder = np.zeros((1, 1), np.float32)
        self.no_labels = np.zeros(1, np.int64)
        self.no_mask = np.ones(1, np.int8)


# --- dropout random numbers, identical to pykd_random.f90 -------------------
_M32 = np.uint64(0xFFFFFFFF)


def _hash32(x):
    """lowbias32 of the low 32 bits of x (uint64 array)."""
    h = x & _M32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x7FEB352D)) & _M32
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x846CA68B)) & _M32
    h ^= h >> np.uint64(16)
    return h


def dropout_multipliers(shape, p, seed, step, layer, first=0):
    """0 with probability p, else 1/(1-p); entry i (flat C order) is a hash of
    (seed, step, layer, first * shape[1] + i): rows ``first, first + 1, ...``
    of the batch's multipliers, so a shard of a batch draws what the whole
    batch draws for its rows."""
    one = lambda v: np.array([v], dtype=np.uint64)
    seed = one(seed)
    key = _hash32(_hash32(seed ^ (seed >> np.uint64(32)))
                  ^ _hash32((one(step) & _M32) * np.uint64(64) + np.uint64(layer)))
    idx = np.arange(int(np.prod(shape)), dtype=np.uint64) + np.uint64(int(first) * int(shape[-1]))
    u = (_hash32(key + idx) >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)
    keep = np.float32(1) / (np.float32(1) - np.float32(p))
    return np.where(u >= np.float32(p), keep, np.float32(0)).reshape(shape)


# --- the step ------------------------------------------------------------------
def _check_batch(x, labels, n_in):
    if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2
            and x.flags.c_contiguous and x.shape[1] == n_in and x.shape[0] >= 1):
        raise ValueError(f"x must be a non-empty C-contiguous float32 array of shape (n, {n_in})")
    if not (isinstance(labels, np.ndarray) and labels.dtype == np.int64
            and labels.shape == (x.shape[0],)):
        raise ValueError(f"labels must be an int64 array of shape ({x.shape[0]},)")


def _check_targets(y, n, n_out):
    if not (isinstance(y, np.ndarray) and y.dtype == np.float32 and y.ndim == 2
            and y.flags.c_contiguous and y.shape == (n, n_out)):
        got = (f"{y.dtype} array of shape {y.shape}" if isinstance(y, np.ndarray)
               else type(y).__name__)
        raise ValueError(f"targets (the labels argument of a regression loss) must be a "
                         f"C-contiguous float32 array of shape ({n}, {n_out}), got {got}")


def _check_rows(name, a, n):
    if a is None:
        raise ValueError(f"{name} is required by this configuration")
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 2
            and a.flags.c_contiguous and a.shape[0] == n):
        raise ValueError(f"{name} must be a C-contiguous float32 array with {n} rows")


def _check_step(sizes, x, labels, cfg, teacher_logits, hint_target):
    """The checks of train_step and gradient_step; returns (n, regress, use_t)."""
    n = x.shape[0] if isinstance(x, np.ndarray) else 0
    regress = cfg.loss in REGRESSION_LOSSES
    if regress:
        _check_batch(x, np.zeros(n, np.int64), sizes[0])
        _check_targets(labels, n, sizes[-1])
    else:
        _check_batch(x, labels, sizes[0])
    use_t = cfg.loss in ("kd", "mse_kd", "huber_kd")
    if use_t:
        _check_rows("teacher_logits", teacher_logits, n)
        if teacher_logits.shape[1] != sizes[-1]:
            raise ValueError(f"teacher_logits must have {sizes[-1]} columns (the student's "
                             f"outputs), got {teacher_logits.shape[1]}")
    if cfg.hint_layer:
        _check_rows("hint_target", hint_target, n)
    return n, regress, use_t


def _raise_status(stat, step, sizes, what):
    if stat == _codes.ERR_NONFINITE:
        raise FloatingPointError(f"loss is not finite at step {step}; parameters not updated")
    if stat == _codes.ERR_LABEL:
        raise ValueError(f"labels out of range [0, {sizes[-1]})")
    if stat != _codes.OK:
        raise ValueError(f"{what} rejected its arguments (status {stat})")


def train_step(sizes, acts, params, grads, state1, state2, x, labels, cfg, step, ws, *,
               teacher_logits=None, hint_target=None, mask=None, backend="fortran"):
    """One training step: forward, loss, backward and optimizer update of
    ``params`` in place. Returns ``(loss, n_correct)``.

    ``labels`` holds int64 class labels of shape (n,) for ``"ce"``/``"kd"``,
    and float32 targets of shape (n, n_out) for the regression losses
    (which return n_correct = 0). ``teacher_logits`` holds the teacher's
    logits for ``"kd"`` and its outputs for ``"mse_kd"``/``"huber_kd"``.

    Raises FloatingPointError, leaving every buffer's parameters untouched,
    if the loss is not finite.
    """
    n, regress, use_t = _check_step(sizes, x, labels, cfg, teacher_logits, hint_target)
    if backend == "numpy":
        return _numpy_step(sizes, acts, params, grads, state1, state2, x, labels, cfg, step,
                           teacher_logits, hint_target, mask)
    if n > ws.batch_size:
        raise ValueError(f"batch of {n} exceeds the workspace's batch size {ws.batch_size}")
    act_codes = np.array([_codes.ACTIVATIONS[a] for a in acts], np.int32)
    use_h = cfg.hint_layer > 0
    use_m = mask is not None
    loss, n_correct, stat = _fortran().mlp_train_step(
        sizes=ws.sizes, acts=act_codes, params=params, grads=grads, state1=state1,
        state2=state2, x=x.T, labels=ws.no_labels if regress else labels,
        teacher=teacher_logits.T if use_t else ws.placeholder, use_teacher=int(use_t),
        hint_target=hint_target.T if use_h else ws.placeholder, use_hint=int(use_h),
        mask=mask.view(np.int8) if use_m else ws.no_mask, use_mask=int(use_m),
        targets=labels.T if regress else ws.placeholder,
        loss_kind=_codes.LOSSES[cfg.loss], temperature=cfg.temperature, alpha=cfg.alpha,
        huber_delta=cfg.huber_delta, optimizer=OPTIMIZERS.index(cfg.optimizer),
        lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, dropout=cfg.dropout, seed=int(cfg.seed),
        hint_layer=cfg.hint_layer, hint_weight=cfg.hint_weight, step=int(step), work=ws.work)
    _raise_status(stat, step, sizes, "training step")
    return float(loss), int(n_correct)


def gradient_step(sizes, acts, params, grads, x, labels, cfg, step, ws, *, teacher_logits=None,
                  hint_target=None, n_global=None, first=0, backend="fortran"):
    """The first half of a data-parallel step: forward, loss and backward on
    the shard ``x`` (rows ``first .. first + n - 1`` of a global batch of
    ``n_global`` rows; default: the whole batch) into ``grads``; ``params``
    is not changed. Returns ``(loss, n_correct)`` of the shard.

    The loss is the shard's share of the global batch mean (its sum over the
    shard divided by ``n_global``) and ``grads`` its gradient, so the shards'
    losses and gradients add up to those of the whole batch (to rounding:
    only the sums over samples are split). Dropout draws the multipliers of
    each row from its position ``first + i`` in the global batch, so N shards
    draw what one process draws. Arguments as in :func:`train_step`; the sum
    of the shards' gradients goes to :func:`apply_update`.

    Raises FloatingPointError if the shard's loss is not finite (``grads``
    is then incomplete).
    """
    n, regress, use_t = _check_step(sizes, x, labels, cfg, teacher_logits, hint_target)
    n_global = n if n_global is None else int(n_global)
    first = int(first)
    if not (n_global >= n and 0 <= first <= n_global - n):
        raise ValueError(f"the shard of {n} rows at first={first} does not lie in a global batch "
                         f"of n_global={n_global} rows")
    if backend == "numpy":
        return _numpy_step(sizes, acts, params, grads, None, None, x, labels, cfg, step,
                           teacher_logits, hint_target, None, n_global=n_global, first=first)
    if n > ws.batch_size:
        raise ValueError(f"batch of {n} exceeds the workspace's batch size {ws.batch_size}")
    act_codes = np.array([_codes.ACTIVATIONS[a] for a in acts], np.int32)
    use_h = cfg.hint_layer > 0
    loss, n_correct, stat = _fortran().mlp_gradient(
        sizes=ws.sizes, acts=act_codes, params=params, grads=grads, x=x.T,
        labels=ws.no_labels if regress else labels,
        teacher=teacher_logits.T if use_t else ws.placeholder, use_teacher=int(use_t),
        hint_target=hint_target.T if use_h else ws.placeholder, use_hint=int(use_h),
        targets=labels.T if regress else ws.placeholder,
        loss_kind=_codes.LOSSES[cfg.loss], temperature=cfg.temperature, alpha=cfg.alpha,
        huber_delta=cfg.huber_delta, dropout=cfg.dropout, seed=int(cfg.seed),
        hint_layer=cfg.hint_layer, hint_weight=cfg.hint_weight, step=int(step),
        n_global=n_global, first=first, work=ws.work)
    _raise_status(stat, step, sizes, "gradient step")
    return float(loss), int(n_correct)


def apply_update(params, grads, state1, state2, cfg, step, *, mask=None, backend="fortran"):
    """The second half of a data-parallel step: the optimizer update (``cfg``'s
    optimizer, its settings and ``cfg.lr``; ``step`` from 1) of the whole
    buffer ``params`` from ``grads``, in place, as :func:`train_step` does.
    ``mask`` (bool, like params) keeps pruned entries and their state at 0."""
    for name, a in (("params", params), ("grads", grads), ("state1", state1),
                    ("state2", state2)):
        if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 1
                and a.flags.c_contiguous and a.shape == params.shape):
            raise ValueError(f"{name} must be a C-contiguous 1-D float32 array like params")
    if mask is not None and not (isinstance(mask, np.ndarray) and mask.dtype == np.bool_
                                 and mask.shape == params.shape):
        raise ValueError("mask must be a bool array shaped like params")
    if int(step) < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if backend == "numpy":
        _numpy_update(params, grads, state1, state2, cfg, step, mask)
        return
    stat = _fortran().mlp_apply_update(
        params=params, grads=grads, state1=state1, state2=state2,
        mask=mask.view(np.int8) if mask is not None else np.ones(1, np.int8),
        use_mask=int(mask is not None), optimizer=OPTIMIZERS.index(cfg.optimizer), lr=cfg.lr,
        beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, step=int(step))
    _raise_status(stat, step, [0], "optimizer update")


def _numpy_update(params, grads, state1, state2, cfg, step, mask):
    """The NumPy twin of the optimizer update on one range of the buffers."""
    if cfg.optimizer == "adam":
        ref.adam_step(params, grads, state1, state2, step, cfg.lr, cfg.beta1, cfg.beta2,
                      cfg.eps, cfg.weight_decay, mask)
    else:
        ref.sgd_step(params, grads, state1, cfg.lr, cfg.momentum, cfg.weight_decay, mask)


def regression_loss(s, y, loss="mse", delta=1.0, alpha=1.0, teacher=None):
    """NumPy twin of the Fortran ``regression_loss``: the loss (float32) and
    its gradient with respect to the student outputs ``s`` (n, n_out).

    MSE: mean (s - y)**2; Huber: mean of r**2 / 2 (|r| <= delta) or
    delta (|r| - delta / 2); ``*_kd`` adds ``(1 - alpha)`` times the same
    loss against ``teacher`` and weights the target term by ``alpha``. Means
    run over all n * n_out elements.
    """
    huber = loss.startswith("huber")
    a = float(alpha) if loss.endswith("_kd") else 1.0
    n, c = s.shape
    f32 = np.float32
    total = np.zeros(n, np.float64)
    grad = np.zeros_like(s)
    for weight, ref_ in ((a, y), (1 - a, teacher)):
        if weight == 0:
            continue                    # as in Fortran: 0 * inf would give NaN
        w = f32(weight / (n * c))
        r = s - ref_
        r64 = r.astype(np.float64)
        if huber:
            d = f32(delta)
            inside = np.abs(r) <= d
            part = np.where(inside, 0.5 * r64 ** 2,
                            float(d) * (np.abs(r64) - 0.5 * float(d)))
            g = np.where(inside, r, np.copysign(d, r))
        else:
            part = r64 ** 2
            g = f32(2) * r
        total += f32(weight) * part.sum(axis=1)
        grad += w * g
    return f32(total.sum() / (n * c)), grad


def _numpy_step(sizes, acts, params, grads, state1, state2, x, labels, cfg, step,
                teacher_logits, hint_target, mask, n_global=None, first=0):
    """The NumPy twin of mlp_train_step (state1 given) or of mlp_gradient
    (state1 None: no update) on rows first .. of a batch of n_global rows."""
    nl = len(sizes) - 1
    n = x.shape[0]
    n_global = n if n_global is None else n_global
    share = np.float32(n / n_global)      # the shard's share of the global mean
    hint = (cfg.hint_layer, hint_target.shape[1]) if cfg.hint_layer else None
    P, G = _views(params, sizes, hint), _views(grads, sizes, hint)
    slices = layer_slices(sizes, hint)
    regress = cfg.loss in REGRESSION_LOSSES
    if not regress and (labels.min() < 0 or labels.max() >= sizes[-1]):
        raise ValueError(f"labels out of range [0, {sizes[-1]})")

    # Forward; `inputs[l]` is what layer l reads (dropped-out output of l-1).
    outs, inputs, drops = [], [x], []
    for l, ((W, b), act) in enumerate(zip(P[:nl], acts), start=1):
        a = ref.dense(inputs[-1], W, b, act)
        outs.append(a)
        if l < nl and cfg.dropout > 0:
            m = dropout_multipliers(a.shape, cfg.dropout, cfg.seed, step, l, first)
            drops.append(m)
            inputs.append(a * m)
        else:
            inputs.append(a)
    logits = outs[-1]
    if regress:
        loss, dy = regression_loss(logits, labels, cfg.loss, cfg.huber_delta, cfg.alpha,
                                   teacher_logits)
        n_correct = 0
    else:
        if cfg.loss == "kd":
            loss, dy = ref.kd_loss(logits, teacher_logits, labels, cfg.temperature, cfg.alpha)
        else:
            loss, dy = ref.cross_entropy(logits, labels)
        n_correct = int((logits.argmax(axis=1) == labels).sum())
    if n_global != n:
        loss, dy = np.float32(loss * share), dy * share
    if hint:
        k, n_t = hint
        R, c = P[nl]
        r = outs[k - 1] @ R + c - hint_target
        ng = n_global
        loss = loss + np.float32(cfg.hint_weight * float((r.astype(np.float64) ** 2).sum()) / (ng * n_t))
        dr = np.float32(2 * cfg.hint_weight / (ng * n_t)) * r
    if not np.isfinite(loss):
        raise FloatingPointError(f"loss is not finite at step {step}; parameters not updated")

    def update(sl):
        if state1 is None:                # gradient only
            return
        _numpy_update(params[sl], grads[sl], state1[sl], state2[sl], cfg, step,
                      None if mask is None else mask[sl])

    for l in range(nl, 0, -1):
        if hint and l == hint[0]:
            R, _ = P[nl]
            dR, dc = G[nl]
            dR[...] = outs[l - 1].T @ dr
            dc[...] = dr.sum(axis=0)
            dy = dy + dr @ R.T
            update(slice(slices[nl][0].start, slices[nl][1].stop))
        W, b = P[l - 1]
        dW, db = G[l - 1]
        dx, dW[...], db[...] = ref.dense_backward(dy, inputs[l - 1], W, outs[l - 1], acts[l - 1],
                                                  need_dx=l > 1, b=b)
        update(slice(slices[l - 1][0].start, slices[l - 1][1].stop))
        if l > 1:
            dy = dx * drops[l - 2] if cfg.dropout > 0 else dx
    return float(loss), n_correct
