"""Training, soft labels and evaluation.

One training step on a batch (forward, loss, backward, optimizer update) is a
single call of :func:`pykd._step.train_step` (one Fortran call with the
default backend). This module does the rest: normalisation, seeded shuffling,
batching, progress, validation, checkpoints and resuming.

Checkpoints are ``.npz`` files written atomically (temp file, fsync,
``os.replace``) and read with ``allow_pickle=False``. They hold the flat
parameter buffer (including a hint regressor), the optimizer state buffers
and, as UTF-8 JSON bytes in a uint8 array, the step counter, epoch, batch
index, the shuffling generator's ``bit_generator.state`` at the start of the
current epoch, the running sums of the current epoch, the history so far and
the configuration. Resuming from any checkpoint, including one written by
Ctrl-C in the middle of an epoch, ends at the same weights as an
uninterrupted run (same backend and thread count).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time

import numpy as np

from . import _step
from . import _validate as check
from . import io as _io
from ._step import TrainConfig
from .models import MLP, _argmax_finite

__all__ = [
    "CHECKPOINT_VERSION", "CheckpointError", "NonFiniteLossError", "TrainConfig",
    "TrainingInterrupted",
    "evaluate", "fit", "hint_targets_from", "load_checkpoint", "soft_labels",
]

CHECKPOINT_VERSION = 1
_F32 = np.float32
#: Precompute the teacher's hidden features for hints when they fit in this.
HINT_PRECOMPUTE_BYTES = 1 << 30


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`fit`; a checkpoint was saved (``checkpoint``,
    None if fit had no checkpoint path) after the last completed step."""

    def __init__(self, checkpoint, epoch, batch, step):
        self.checkpoint, self.epoch, self.batch, self.step = checkpoint, epoch, batch, step
        where = f"epoch {epoch + 1}, after batch {batch}" if batch else f"end of epoch {epoch}"
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint path given"
        super().__init__(f"training interrupted at {where} (step {step}); {saved}")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the last good checkpoint is kept."""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, malformed, or does not belong to the
    run resuming from it. The message starts with the file's path."""


# ----------------------------------------------------------------- helpers

def _progress_bar(enabled, **kw):
    """A tqdm bar on a terminal (``enabled`` True) or always (``"bar"``);
    None otherwise (fit then prints one line per epoch when enabled)."""
    if not enabled or (enabled != "bar" and not sys.stderr.isatty()):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(unit="sample", unit_scale=True, dynamic_ncols=True, mininterval=0.25, **kw)


def _as_labels(name, y, n, n_classes, x_name="X"):
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu" or y.ndim != 1:
        raise TypeError(f"{name} must be a 1-D integer numpy array")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels but {x_name} has {n} rows")
    if n and (y.min() < 0 or y.max() >= n_classes):
        bad = int(y[(y < 0) | (y >= n_classes)][0])
        raise ValueError(f"{name} must be in [0, {n_classes}) (the model has {n_classes} "
                         f"outputs), got the label {bad}")
    return np.ascontiguousarray(y, dtype=np.int64)


def _check_finite(name, X, chunk=8192):
    """ValueError naming ``name`` and its first non-finite rows (chunk by
    chunk, so no full-size temporary)."""
    if X.dtype.kind != "f":
        return
    rows = []
    for i in range(0, X.shape[0], chunk):
        bad = ~np.isfinite(X[i:i + chunk]).all(axis=1)
        if bad.any():
            rows.extend((np.flatnonzero(bad) + i).tolist())
            if len(rows) > 10:
                break
    if rows:
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        raise ValueError(f"{name} contains NaN or inf (rows {shown}); clean or drop those rows "
                         "before training")


def _as_f32(name, a, shape):
    if not isinstance(a, np.ndarray) or a.dtype != _F32:
        raise TypeError(f"{name} must be a float32 numpy array")
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")
    return np.ascontiguousarray(a)


def _norm_stats(X, chunk=8192):
    """Scalar mean and std of all entries of X (float64 sums, chunk by chunk,
    so no full-size temporary)."""
    total = 0.0
    for i in range(0, X.shape[0], chunk):
        total += float(X[i:i + chunk].sum(dtype=np.float64))
    mean = total / X.size
    sq = 0.0
    for i in range(0, X.shape[0], chunk):
        c = X[i:i + chunk].astype(np.float64)
        c -= mean
        sq += float(np.einsum("ij,ij->", c, c))
    std = math.sqrt(sq / X.size)
    return mean, (std if std > 0 else 1.0)


def _cfg_dict(cfg):
    return {k: (float(v) if isinstance(v, float) else v) for k, v in dataclasses.asdict(cfg).items()}


def _logits_stats(logits, y):
    """Accuracy and mean cross-entropy of logits against labels."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean()) if len(y) else float("nan")
    acc = float((logits.argmax(axis=1) == y).mean()) if len(y) else float("nan")
    return acc, loss


@contextlib.contextmanager
def _sigint_flag():
    """While active, the first Ctrl-C only sets ``flag['hit']`` (the training
    loop then checkpoints and stops at a consistent point); a second one
    raises KeyboardInterrupt at once."""
    flag = {"hit": False}
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):   # e.g. a background job
        yield flag
        return

    def handler(signum, frame):
        if flag["hit"]:
            raise KeyboardInterrupt
        flag["hit"] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


# -------------------------------------------------------------- checkpoints

# One atomic-write helper for the package (temp file, fsync, rename, directory fsync).
atomic_write = _io.atomic_write


def _save_checkpoint(path, P, S1, S2, meta):
    """np.savez through the package's atomic write; a failure names ``path``."""
    blob = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    try:
        atomic_write(path, lambda f: np.savez(f, params=P, state1=S1, state2=S2, meta=blob))
    except OSError as e:
        raise OSError(e.errno, f"cannot write the checkpoint ({e.strerror or e})",
                      os.fspath(path)) from e


#: The largest metadata blob a checkpoint may hold (history of many epochs fits easily).
_MAX_META_BYTES = 64 << 20
_BUFFERS = ("params", "state1", "state2")


def load_checkpoint(path):
    """Read a checkpoint written by :func:`fit`: ``(arrays, meta)`` where
    arrays has params, state1, state2 (float32, 1-D) and meta is the JSON dict.

    Every array's header is checked against its size before it is read
    (:func:`pykd.io.load_npz`). This checks the file's structure only;
    :func:`fit` checks every field against the run before resuming.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If it is not a readable pykd checkpoint of this version (naming the file).
    """
    path = os.fspath(path)
    members = {k: ("f", 1) for k in _BUFFERS}
    members["meta"] = ("u", 1)
    try:
        arrays = _io.load_npz(path, members, what="checkpoint")
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        msg = str(e)
        msg = msg[len(path) + 2:] if msg.startswith(path + ": ") else msg
        raise CheckpointError(f"{path}: not a readable pykd checkpoint ({msg})") from None
    blob = arrays.pop("meta")
    for k in _BUFFERS:
        if arrays[k].dtype != _F32:
            raise CheckpointError(f"{path}: checkpoint array {k!r} must be float32, got "
                                  f"{arrays[k].dtype}")
    if blob.dtype != np.uint8 or blob.size > _MAX_META_BYTES:
        raise CheckpointError(f"{path}: checkpoint metadata must be at most "
                              f"{_MAX_META_BYTES} bytes of uint8")
    try:
        meta = json.loads(blob.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "pykd-checkpoint" \
            or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: not a pykd checkpoint of version {CHECKPOINT_VERSION}")
    return arrays, meta


_HISTORY_KEYS = ("epoch", "loss", "train_accuracy", "test_accuracy", "test_loss", "seconds",
                 "samples_per_second")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v, low=-math.inf, high=math.inf):
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and low <= v <= high)


def _check_resume(path, arrays, meta, *, fingerprint, epochs, n, batch_size, seed, shape,
                  norm, mask):
    """Every field of a checkpoint against the run resuming from it (see
    :func:`fit`); returns (step, epoch, batch, rng_state, history, accum, norm).
    Raises CheckpointError naming ``path`` and the field."""
    def bad(msg):
        raise CheckpointError(f"{path}: cannot resume: {msg}")

    required = ("fingerprint", "epoch", "batch", "step", "rng_state", "accum", "history", "norm")
    missing = [k for k in required if k not in meta]
    if missing:
        bad(f"the checkpoint has no {', '.join(missing)}")
    fp = meta["fingerprint"]
    if not isinstance(fp, dict):
        bad("its fingerprint is not a JSON object")
    if fp != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(fp) if fp.get(k) != fingerprint.get(k))
        raise CheckpointError(f"{path} was written by a different run (differs in: "
                              f"{', '.join(diff)}); start without --resume or use the same "
                              "settings")
    n_batches = -(-n // batch_size)
    epoch, batch, step = meta["epoch"], meta["batch"], meta["step"]
    if not _is_int(epoch) or not 0 <= epoch <= epochs:
        bad(f"epoch must be an integer in [0, {epochs}] (the run's epochs), got {epoch!r}")
    if not _is_int(batch) or not 0 <= batch <= n_batches or (epoch == epochs and batch):
        bad(f"batch must be an integer in [0, {n_batches}] (batches per epoch), got {batch!r}")
    if not _is_int(step) or step < 0 or step != epoch * n_batches + batch:
        bad(f"step must be epoch * batches per epoch + batch = {epoch * n_batches + batch} "
            f"(a non-negative integer), got {step!r}")
    # The shuffling generator at the start of epoch `epoch` is determined by the seed.
    rng = np.random.default_rng(seed)
    for _ in range(epoch):
        rng.permutation(n)
    if meta["rng_state"] != rng.bit_generator.state:
        bad(f"rng_state is not the shuffling state of seed {seed} at epoch {epoch}")
    for k in _BUFFERS:
        if arrays[k].shape != shape:
            bad(f"array {k!r} has shape {arrays[k].shape}, the run needs {shape}")
        if not np.isfinite(arrays[k]).all():
            bad(f"array {k!r} contains NaN or inf")
    if mask is not None and np.any(arrays["params"][~mask]):
        bad("parameters the mask prunes (False) are not zero")
    hist = meta["history"]
    if not isinstance(hist, dict) or set(hist) != set(_HISTORY_KEYS) or any(
            not isinstance(hist[k], list) or len(hist[k]) != epoch for k in _HISTORY_KEYS):
        bad(f"history must hold the lists {', '.join(_HISTORY_KEYS)}, one entry per "
            f"finished epoch ({epoch})")
    if hist["epoch"] != list(range(1, epoch + 1)) or not all(
            _is_num(v) for v in hist["loss"] + hist["seconds"]) or not all(
            _is_num(v, 0, 1) for v in hist["train_accuracy"]) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in
            hist["test_accuracy"] + hist["test_loss"] + hist["samples_per_second"]):
        bad("history holds values that are not finite numbers of the right range")
    acc = meta["accum"]
    seen = min(batch * batch_size, n)
    if not isinstance(acc, dict) or set(acc) != {"loss_sum", "correct", "seen", "seconds"} \
            or not _is_num(acc["loss_sum"]) or not _is_num(acc["seconds"], 0) \
            or (batch and (acc["seen"] != seen or not _is_int(acc["correct"])
                           or not 0 <= acc["correct"] <= seen)):
        bad(f"accum must hold loss_sum, correct, seen ({seen} after batch {batch}) and seconds")
    got = meta["norm"]
    if not isinstance(got, list) or len(got) != 2 or not all(_is_num(v) for v in got):
        bad(f"norm must be [mean, std], got {got!r}")
    if norm is not None and got != [float(v) for v in norm]:
        bad(f"norm {got} is not the run's input normalisation {[float(v) for v in norm]}")
    return step, epoch, batch, meta["rng_state"], hist, acc, got


# ------------------------------------------------------------------- public

def soft_labels(teacher, X, T=1.0, *, batch_size=4096, backend=None, progress=False):
    """Teacher logits for a transfer set, computed in large batches.

    ``T`` is accepted (and checked, T > 0) so that callers can pass the
    distillation temperature, but the logits are returned **unscaled**: the
    temperature is applied inside the distillation loss. Save them with
    ``np.save(path, logits)``; :func:`fit` (and ``pykd distill
    --teacher-logits``) distills from logits alone, so a teacher trained in
    any framework can be used. ``progress=True`` shows a tqdm bar on a
    terminal.

    Returns
    -------
    ndarray, float32, shape (n, classes)
    """
    T = float(T)
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"T must be a finite number > 0, got {T}")
    bar = _progress_bar(progress, total=X.shape[0], desc="soft labels")
    if bar is None:
        return teacher.forward(X, batch_size=batch_size, backend=backend)
    out = np.empty((X.shape[0], teacher.n_outputs), _F32)
    chunk = 8 * batch_size
    with bar:
        for s in range(0, X.shape[0], chunk):
            out[s:s + chunk] = teacher.forward(X[s:s + chunk], batch_size=batch_size,
                                               backend=backend)
            bar.update(min(chunk, X.shape[0] - s))
    return out


def hint_targets_from(teacher, X, layer, *, backend=None, precompute=None):
    """Targets for hint (FitNets) distillation: the teacher's output of
    hidden layer ``layer`` (1-based) for each training row.

    Returns a float32 array (n, width) when it fits in
    ``HINT_PRECOMPUTE_BYTES`` (or ``precompute`` is True), otherwise a
    function ``idx -> (len(idx), width)`` computing them batch by batch.
    """
    n_layers = len(teacher.sizes) - 1
    if not 1 <= int(layer) < n_layers:
        raise ValueError(f"the teacher's hint layer must be a hidden layer in [1, {n_layers - 1}], "
                         f"got {layer}")
    width = teacher.sizes[layer]
    if precompute is None:
        precompute = X.shape[0] * width * 4 <= HINT_PRECOMPUTE_BYTES
    if precompute:
        return teacher.forward(X, upto=layer, batch_size=4096, backend=backend)
    return lambda idx: teacher.forward(X[idx], upto=layer, backend=backend)


def evaluate(model, X, y, teacher=None, *, batch_size=1024, backend=None):
    """Accuracy, loss, confusion matrix and teacher agreement of ``model``.

    Parameters
    ----------
    model : MLP or Model
        Any model with ``forward``, ``n_outputs``, ``parameters``, ``nbytes``.
    X : ndarray (n, n_features), raw inputs; y : int labels (n,)
    teacher : MLP, Model or ndarray of teacher logits (n, classes), optional
        Adds ``agreement``: the fraction of rows where the model's and the
        teacher's top-1 predictions agree.

    Returns
    -------
    dict with ``accuracy``, ``loss`` (mean cross-entropy), ``confusion``
    (list of lists; row = true class, column = predicted), ``agreement``
    (or None), ``parameters``, ``nonzeros``, ``bytes`` (in memory), ``n``.
    """
    n_classes = model.n_outputs
    y = _as_labels("y", y, X.shape[0], n_classes)
    logits = model.forward(X, batch_size=batch_size, backend=backend)
    pred = _argmax_finite(logits)          # rows with NaN/inf logits: a ValueError naming them
    accuracy, loss = _logits_stats(logits, y)
    confusion = np.bincount(y * n_classes + pred, minlength=n_classes * n_classes)
    agreement = None
    if teacher is not None:
        if isinstance(teacher, np.ndarray):
            t_pred = teacher.argmax(axis=1) if teacher.shape == logits.shape else None
            if t_pred is None:
                raise ValueError(f"teacher logits must have shape {logits.shape}, got {teacher.shape}")
        else:
            t_pred = teacher.predict(X, batch_size=batch_size, backend=backend)
        agreement = float((t_pred == pred).mean()) if len(y) else float("nan")
    return {
        "accuracy": accuracy,
        "loss": loss,
        "confusion": confusion.reshape(n_classes, n_classes).tolist(),
        "agreement": agreement,
        "parameters": model.parameters,
        "nonzeros": model.nonzeros,
        "bytes": model.nbytes,
        "n": int(len(y)),
    }


def fit(model, X, y, *, cfg=None, epochs=1, batch_size=64, teacher_logits=None,
        hint_targets=None, X_val=None, y_val=None, checkpoint=None, resume=False,
        progress=True, backend="fortran", seed=None, mask=None, callback=None, desc="train",
        lr_decay=1.0):
    """Train ``model`` in place; one :func:`pykd._step.train_step` per batch.

    Parameters
    ----------
    model : MLP
        Trained in place. If ``model.norm`` is None it is set to the scalar
        mean/std of ``X``; the normalised copy of X is made once per run.
    X : ndarray (n, n_features), raw inputs (float32); y : int labels (n,)
    cfg : TrainConfig
        Loss ("ce" or "kd"), optimizer and its settings, dropout, hint.
    epochs, batch_size : int
        ``epochs >= 0``, ``batch_size >= 1``. The last partial batch of each
        epoch is used; a batch_size larger than ``X`` is one batch of all of
        it (buffers are sized for ``min(batch_size, n)`` rows).
    teacher_logits : float32 (n, classes), for ``cfg.loss == "kd"``
        Unscaled teacher logits (see :func:`soft_labels`).
    hint_targets : float32 (n, width) or callable idx -> (len(idx), width)
        Needed when ``cfg.hint_layer > 0`` (see :func:`hint_targets_from`).
        The regressor (width x sizes[hint_layer]) lives after the model's
        parameters in the training buffer and is saved in checkpoints only.
    X_val, y_val : optional
        Evaluated after every epoch (``test_accuracy``/``test_loss``).
    checkpoint : path, optional
        Written atomically after every epoch and on Ctrl-C.
    resume : bool
        Continue from ``checkpoint``, which must exist and match the run:
        every field is checked first (the fingerprint of sizes, activations,
        hint, n, batch size, seed, config, lr_decay and mask; epoch in
        [0, epochs]; batch; step = epoch * batches + batch; the shuffling
        state of the seed at that epoch; the shapes and finiteness of the
        buffers; zeros where the mask prunes; history, running sums, norm).
    progress : bool or "bar"
        True: a tqdm bar per epoch (loss, accuracy, samples/s) on stderr when
        it is a terminal, else one line per epoch; "bar": always the bar.
    backend : {"fortran", "numpy"}
    seed : int, optional
        Seed of the shuffling generator (default ``cfg.seed``).
    mask : bool array like the parameters, optional
        Pruning mask passed to the optimizer (False entries stay zero).
    callback : callable(dict), optional
        Called after every step with epoch, batch, step, loss.
    lr_decay : float in (0, 1]
        Per-epoch learning-rate factor: epoch e (from 0) uses
        ``cfg.lr * lr_decay**e``. 1 (the default) keeps the rate constant.

    Returns
    -------
    dict of per-epoch lists: ``epoch``, ``loss``, ``train_accuracy``,
    ``test_accuracy``, ``test_loss``, ``seconds`` (training time of the
    epoch, without validation and checkpointing), ``samples_per_second``.

    Raises
    ------
    ValueError, TypeError
        Bad arguments, naming them: labels outside ``[0, sizes[-1])``, NaN or
        inf in ``X`` or ``X_val`` (naming the rows), shapes, ...
    CheckpointError
        When resuming from a checkpoint that is unreadable or does not match
        the run (naming the file and the field).
    TrainingInterrupted
        On Ctrl-C, after saving a checkpoint at the last completed step.
    NonFiniteLossError
        When the loss becomes NaN or inf; the parameters are those before the
        failing step and the last checkpoint written is left untouched.
    """
    if not isinstance(model, MLP):
        hint = (" (Model.to_mlp() densifies and dequantizes a Model into a trainable MLP)"
                if hasattr(model, "to_mlp") else "")
        raise TypeError(f"model must be a pykd.MLP, got {type(model).__name__}{hint}")
    cfg = TrainConfig() if cfg is None else cfg
    if cfg.loss not in ("ce", "kd"):
        raise ValueError(f"cfg.loss must be 'ce' or 'kd', got {cfg.loss!r}")
    epochs = check.integer("epochs", epochs, low=0)
    batch_size = check.integer("batch_size", batch_size, low=1)
    if backend not in ("fortran", "numpy"):
        raise ValueError(f"backend must be 'fortran' or 'numpy', got {backend!r}")
    seed = cfg.seed if seed is None else int(seed)
    lr_decay = float(lr_decay)
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
    sizes, acts = model.sizes, model.activations
    if not isinstance(X, np.ndarray) or X.dtype != _F32 or X.ndim != 2:
        raise TypeError("X must be a 2-D float32 numpy array")
    n = X.shape[0]
    if X.shape[1] != sizes[0]:
        raise ValueError(f"X has {X.shape[1]} features but the model takes {sizes[0]}")
    if n == 0:
        raise ValueError("X is empty")
    _check_finite("X", X)
    n_classes = sizes[-1]
    y = _as_labels("y", y, n, n_classes)
    if cfg.loss == "kd":
        if teacher_logits is None:
            raise ValueError("cfg.loss='kd' needs teacher_logits")
        teacher_logits = _as_f32("teacher_logits", teacher_logits, (n, n_classes))
    elif teacher_logits is not None:
        raise ValueError("teacher_logits given but cfg.loss is 'ce' (use loss='kd')")
    hint = None
    if cfg.hint_layer:
        k = int(cfg.hint_layer)
        if not 1 <= k < len(sizes) - 1:
            raise ValueError(f"cfg.hint_layer must be a hidden layer of the model, in "
                             f"[1, {len(sizes) - 2}], got {k}")
        if hint_targets is None:
            raise ValueError("cfg.hint_layer > 0 needs hint_targets")
        if callable(hint_targets):
            width = int(np.asarray(hint_targets(np.arange(1))).shape[1])
        else:
            width = hint_targets.shape[1] if getattr(hint_targets, "ndim", 0) == 2 else -1
            hint_targets = _as_f32("hint_targets", hint_targets, (n, width))
        hint = (k, width)
    elif hint_targets is not None:
        raise ValueError("hint_targets given but cfg.hint_layer is 0")
    if (X_val is None) != (y_val is None):
        raise ValueError("give both X_val and y_val, or neither")
    if X_val is not None:
        if not isinstance(X_val, np.ndarray) or X_val.ndim != 2 or X_val.dtype.kind not in "iuf":
            raise TypeError("X_val must be a 2-D numeric numpy array")
        if X_val.shape[1] != sizes[0]:
            raise ValueError(f"X_val has {X_val.shape[1]} features but the model takes "
                             f"{sizes[0]}")
        _check_finite("X_val", X_val)
        y_val = _as_labels("y_val", y_val, X_val.shape[0], n_classes, "X_val")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")

    # The training buffer: the model's parameters, then a hint regressor.
    n_model = model.parameters
    n_total = _step.param_count(sizes, hint)
    if n_total != n_model:
        P = np.empty(n_total, _F32)
        P[:n_model] = model.params
        model._bind(P[:n_model])
        reg_rng = np.random.default_rng([seed, 0x68696E74])
        for ws, bs, (n_in, _) in _step.layer_slices(sizes, hint)[len(sizes) - 1:]:
            bound = 1.0 / math.sqrt(n_in)
            P[ws] = reg_rng.uniform(-bound, bound, ws.stop - ws.start)
            P[bs] = reg_rng.uniform(-bound, bound, bs.stop - bs.start)
    else:
        P = model.params
    G = np.zeros_like(P)
    S1 = np.zeros_like(P)
    S2 = np.zeros_like(P)
    if mask is not None and (not isinstance(mask, np.ndarray) or mask.dtype != np.bool_
                             or mask.shape != P.shape):
        raise ValueError(f"mask must be a bool array of shape {P.shape}")

    fingerprint = {
        "sizes": sizes, "activations": acts, "hint": list(hint) if hint else None,
        "n_train": n, "batch_size": batch_size, "seed": seed, "config": _cfg_dict(cfg),
        "lr_decay": lr_decay,
    }
    if mask is not None:     # only with a mask, so checkpoints without one keep matching
        fingerprint["mask"] = hashlib.sha256(np.packbits(mask).tobytes()).hexdigest()
    history = {k: [] for k in ("epoch", "loss", "train_accuracy", "test_accuracy", "test_loss",
                               "seconds", "samples_per_second")}
    rng = np.random.default_rng(seed)
    step, start_epoch, start_batch = 0, 0, 0
    accum = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}

    if resume:
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"no checkpoint at {checkpoint} to resume from")
        arrays, meta = load_checkpoint(checkpoint)
        norm = model.norm if model.norm is not None else tuple(
            _F32(v) for v in _norm_stats(X))
        step, start_epoch, start_batch, rng_state, history, accum, norm = _check_resume(
            checkpoint, arrays, meta, fingerprint=fingerprint, epochs=epochs, n=n,
            batch_size=batch_size, seed=seed, shape=P.shape, norm=norm, mask=mask)
        P[...] = arrays["params"]
        S1[...] = arrays["state1"]
        S2[...] = arrays["state2"]
        model.set_norm(*norm)
        rng.bit_generator.state = rng_state
    elif model.norm is None:
        model.set_norm(*_norm_stats(X))

    Xn = model.normalize(X)          # the one normalised copy of the training set
    rows = min(batch_size, n)        # a batch larger than the set is the whole set
    ws = _step.Workspace(sizes, rows, hint)
    xbuf = np.empty((rows, sizes[0]), _F32)
    ybuf = np.empty(rows, np.int64)
    tbuf = np.empty((rows, n_classes), _F32) if teacher_logits is not None else None
    hbuf = np.empty((rows, hint[1]), _F32) if hint else None
    n_batches = -(-n // batch_size)

    def meta_for(epoch, batch, epoch_rng_state):
        return {"format": "pykd-checkpoint", "version": CHECKPOINT_VERSION,
                "fingerprint": fingerprint, "epoch": epoch, "batch": batch, "step": step,
                "epochs": epochs, "rng_state": epoch_rng_state, "accum": accum,
                "history": history, "norm": [float(v) for v in model.norm],
                "backend": backend}

    saved_epoch = start_epoch if resume else None
    with _sigint_flag() as interrupt:
        for epoch in range(start_epoch, epochs):
            epoch_rng_state = rng.bit_generator.state
            perm = rng.permutation(n)
            ecfg = cfg if lr_decay == 1 else dataclasses.replace(cfg, lr=cfg.lr * lr_decay**epoch)
            if start_batch == 0:
                accum = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            bar = _progress_bar(progress, total=n, initial=min(start_batch * batch_size, n),
                                desc=f"{desc} epoch {epoch + 1}/{epochs}")
            t_start = time.perf_counter()
            t_post = t_start
            for bi in range(start_batch, n_batches):
                idx = perm[bi * batch_size:(bi + 1) * batch_size]
                b = idx.shape[0]
                xb = np.take(Xn, idx, axis=0, out=xbuf[:b], mode="clip")
                yb = np.take(y, idx, out=ybuf[:b], mode="clip")
                tb = hb = None
                if tbuf is not None:
                    tb = np.take(teacher_logits, idx, axis=0, out=tbuf[:b], mode="clip")
                if hint:
                    if callable(hint_targets):
                        hbuf[:b] = hint_targets(idx)
                        hb = hbuf[:b]
                    else:
                        hb = np.take(hint_targets, idx, axis=0, out=hbuf[:b], mode="clip")
                try:
                    loss, n_correct = _step.train_step(
                        sizes, acts, P, G, S1, S2, xb, yb, ecfg, step + 1, ws,
                        teacher_logits=tb, hint_target=hb, mask=mask, backend=backend)
                except FloatingPointError as e:
                    if bar is not None:
                        bar.close()
                    if checkpoint is not None and saved_epoch is not None:
                        kept = f"the last good checkpoint {checkpoint} (epoch {saved_epoch}) is kept"
                    else:
                        kept = "no checkpoint was written yet"
                    raise NonFiniteLossError(
                        f"the training loss became NaN or inf at epoch {epoch + 1}, batch "
                        f"{bi + 1} (step {step + 1}); training stopped and {kept}. Try a lower "
                        f"learning rate (lr={ecfg.lr:g}) or check the inputs.") from e
                step += 1
                accum["loss_sum"] += loss * b
                accum["correct"] += int(n_correct)
                accum["seen"] += b
                if bar is not None:
                    bar.update(b)
                    now = time.perf_counter()
                    if now - t_post > 0.5:
                        t_post = now
                        bar.set_postfix({"loss": f"{accum['loss_sum'] / accum['seen']:.4f}",
                                         "acc": f"{accum['correct'] / accum['seen']:.3f}"},
                                        refresh=False)
                if callback is not None:
                    callback({"epoch": epoch, "batch": bi + 1, "step": step, "loss": loss})
                if interrupt["hit"]:
                    accum["seconds"] += time.perf_counter() - t_start
                    if bar is not None:
                        bar.close()
                    if checkpoint is not None:
                        _save_checkpoint(checkpoint, P, S1, S2,
                                         meta_for(epoch, bi + 1, epoch_rng_state))
                    raise TrainingInterrupted(checkpoint, epoch, bi + 1, step)
            seconds = accum["seconds"] + time.perf_counter() - t_start
            start_batch = 0
            seen = max(accum["seen"], 1)
            history["epoch"].append(epoch + 1)
            history["loss"].append(accum["loss_sum"] / seen)
            history["train_accuracy"].append(accum["correct"] / seen)
            history["seconds"].append(seconds)
            history["samples_per_second"].append(accum["seen"] / seconds if seconds > 0 else None)
            if X_val is not None:
                acc, vloss = _logits_stats(model.forward(X_val, backend=backend), y_val)
            else:
                acc = vloss = None
            history["test_accuracy"].append(acc)
            history["test_loss"].append(vloss)
            if bar is not None:
                post = {"loss": f"{history['loss'][-1]:.4f}",
                        "acc": f"{history['train_accuracy'][-1]:.3f}"}
                if acc is not None:
                    post["test_acc"] = f"{acc:.4f}"
                bar.set_postfix(post, refresh=True)
                bar.close()
            elif progress:
                test = "" if acc is None else f", test accuracy {acc:.4f}"
                print(f"{desc} epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.4f}, "
                      f"train accuracy {history['train_accuracy'][-1]:.4f}{test} "
                      f"({seconds:.2f} s, {accum['seen'] / max(seconds, 1e-9):,.0f} samples/s)",
                      file=sys.stderr, flush=True)
            accum = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            if checkpoint is not None:
                _save_checkpoint(checkpoint, P, S1, S2,
                                 meta_for(epoch + 1, 0, rng.bit_generator.state))
                saved_epoch = epoch + 1
            if interrupt["hit"]:
                raise TrainingInterrupted(checkpoint, epoch + 1, 0, step)
    return history
