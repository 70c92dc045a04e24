"""Training, soft labels and evaluation.

One training step on a batch (forward, loss, backward, optimizer update) is a
single call of :func:`pykd._step.train_step` (one Fortran call with the
default backend). This module does the rest: normalisation, seeded shuffling,
batching, progress, validation, checkpoints and resuming. With an MPI
communicator (``fit(..., comm=...)``) every rank computes the gradient of
its share of each global batch, one deterministic sum of the flat gradient
buffer per step joins them, and every rank applies the same update
(docs/distributed.md).

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
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings

import numpy as np

from . import _buffers, _step
from . import _validate as check
from . import io as _io
from ._step import REGRESSION_LOSSES, TrainConfig
from .callbacks import EpochState
from .config import LR_SCHEDULES, NORMS, RunConfig
from .data import ScaledImages, take_rows
from .metrics import regression_metrics, target_loss
from .models import MLP, _argmax_finite

__all__ = [
    "CHECKPOINT_VERSION", "LR_SCHEDULES", "CheckpointError", "LearningRateWarning",
    "NonFiniteLossError", "TrainConfig", "TrainingInterrupted",
    "NORM_MODES", "evaluate", "fit", "hint_targets_from", "load_checkpoint", "soft_labels",
]

CHECKPOINT_VERSION = 1
#: fit's per-epoch lines (INFO) when it shows no progress bar.
_log = logging.getLogger(__name__)
_F32 = np.float32
#: Precompute the teacher's hidden features for hints when they fit in this.
HINT_PRECOMPUTE_BYTES = 1 << 30
#: An exponentially decayed rate below this gets a LearningRateWarning.
LR_WARN_BELOW = 1e-7
#: The ``norm`` argument of :func:`fit` (None is "auto"): pykd.config.NORMS.
NORM_MODES = NORMS


class LearningRateWarning(RuntimeWarning):
    """The exponentially decayed learning rate fell below ``LR_WARN_BELOW``:
    the remaining epochs barely change the weights."""


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
    if isinstance(y, np.ndarray) and y.dtype.kind == "f":
        raise TypeError(f"{name} holds floats ({y.dtype}) but classification (loss 'ce' or "
                        "'kd') needs integer class labels; for float targets use a "
                        "regression loss (loss='mse' or 'huber', or 'mse_kd'/'huber_kd')")
    if not isinstance(y, np.ndarray) or y.dtype.kind not in "iu" or y.ndim != 1:
        raise TypeError(f"{name} must be a 1-D integer numpy array")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {check.plural(y.shape[0], 'label')} but {x_name} has "
                         f"{check.plural(n, 'row')}")
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


def _as_targets(name, y, n, n_out, loss, x_name="X"):
    """Float targets of a regression loss as an (n, n_out) view (a 1-D y of
    n values when n_out == 1 is reshaped, not copied); NaN/inf is an error
    naming the rows."""
    if isinstance(y, np.ndarray) and y.dtype.kind in "iub":
        raise TypeError(f"{name} holds integers ({y.dtype}) but cfg.loss={loss!r} is a "
                        "regression loss, which needs float targets (float32 or float64); "
                        "for class labels use loss='ce' or 'kd'")
    if not isinstance(y, np.ndarray) or y.dtype not in (np.float32, np.float64) \
            or y.ndim not in (1, 2):
        got = (f"a {y.dtype} array of shape {y.shape}" if isinstance(y, np.ndarray)
               else type(y).__name__)
        raise TypeError(f"{name} must be a float32 or float64 numpy array of shape "
                        f"({n}, {n_out}){' or (n,)' if n_out == 1 else ''} for "
                        f"cfg.loss={loss!r}, got {got}")
    if y.ndim == 1:
        if n_out != 1:
            raise ValueError(f"{name} is 1-D but the model has {n_out} outputs: give "
                             f"{name} of shape ({n}, {n_out})")
        y = y.reshape(-1, 1)
    if y.shape[1] != n_out:
        raise ValueError(f"{name} has {check.plural(y.shape[1], 'column')} but the model has "
                         f"{check.plural(n_out, 'output')}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {check.plural(y.shape[0], 'row')} but {x_name} has "
                         f"{check.plural(n, 'row')}")
    _check_finite(name, y)
    return y


def _column_stats(A, chunk=8192):
    """Per-column mean and std of A (float64 sums, chunk by chunk) as
    float32 arrays; a constant column (max == min) gets std 1."""
    k = A.shape[1]
    total = np.zeros(k)
    lo, hi = np.full(k, np.inf), np.full(k, -np.inf)
    for i in range(0, A.shape[0], chunk):
        c = A[i:i + chunk]
        total += c.sum(axis=0, dtype=np.float64)
        lo = np.minimum(lo, c.min(axis=0))
        hi = np.maximum(hi, c.max(axis=0))
    mean = total / A.shape[0]
    sq = np.zeros(k)
    for i in range(0, A.shape[0], chunk):
        c = A[i:i + chunk].astype(np.float64)
        c -= mean
        sq += np.einsum("ij,ij->j", c, c)
    std = np.sqrt(sq / A.shape[0])
    std32 = std.astype(_F32)
    std32[(lo == hi) | ~(std32 > 0)] = 1
    return mean.astype(_F32), std32


def _normalized(A, norm):
    """``(A - mean) / std`` as a new C-contiguous float32 array (the same
    float32 operations as MLP.normalize); A itself if norm is None and A is
    already float32 and C-contiguous."""
    if norm is None:
        return np.ascontiguousarray(A, _F32)
    out = np.empty(A.shape, _F32)
    np.subtract(A, norm[0], out=out, casting="unsafe")
    out /= norm[1]
    return out


def _norm_json(norm):
    """A normalisation as JSON: None, [mean, std] numbers, or two lists."""
    if norm is None:
        return None
    return [v.tolist() if np.ndim(v) else float(v) for v in norm]


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


def _save_checkpoint(path, P, S1, S2, meta, mask=None, arrays=None):
    """np.savez through the package's atomic write; a failure names ``path``.
    A mask is stored as ``np.packbits(mask)`` (member ``mask``); ``arrays``
    (the on_epoch callback's) as members ``on_epoch.NAME``."""
    blob = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    extra = {} if mask is None else {"mask": np.packbits(mask)}
    extra.update({f"on_epoch.{k}": v for k, v in (arrays or {}).items()})
    try:
        atomic_write(path, lambda f: np.savez(f, params=P, state1=S1, state2=S2, meta=blob,
                                              **extra))
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
    if meta.get("mask", False) not in (True, False):
        raise CheckpointError(f"{path}: checkpoint metadata 'mask' must be true or false")
    if meta.get("mask"):     # the packed mask of a run with a mask or a pruning schedule
        try:
            packed = _io.load_npz(path, {"mask": ("u", 1)}, what="checkpoint")["mask"]
        except (OSError, ValueError) as e:
            msg = str(e)
            msg = msg[len(path) + 2:] if msg.startswith(path + ": ") else msg
            raise CheckpointError(f"{path}: not a readable pykd checkpoint ({msg})") from None
        if packed.dtype != np.uint8:
            raise CheckpointError(f"{path}: checkpoint array 'mask' must be uint8, got "
                                  f"{packed.dtype}")
        arrays["mask"] = packed
    arrays["on_epoch"] = _load_callback_arrays(path, meta)
    return arrays, meta


def _load_callback_arrays(path, meta):
    """The float arrays of the on_epoch callback's state (``{}`` if none)."""
    state = meta.get("on_epoch")
    if state is None:
        return {}
    if not isinstance(state, dict) or set(state) != {"state", "arrays"} \
            or not isinstance(state["state"], dict) or not isinstance(state["arrays"], list) \
            or len(state["arrays"]) > 64 or not all(
                isinstance(k, str) and k.isidentifier() for k in state["arrays"]):
        raise CheckpointError(f"{path}: checkpoint metadata 'on_epoch' must hold 'state' (an "
                              "object) and 'arrays' (names)")
    try:
        return _io.load_npz(path, {f"on_epoch.{k}": ("f", None) for k in state["arrays"]},
                            what="checkpoint")
    except (OSError, ValueError) as e:
        msg = str(e)
        msg = msg[len(path) + 2:] if msg.startswith(path + ": ") else msg
        raise CheckpointError(f"{path}: not a readable pykd checkpoint ({msg})") from None


_HISTORY_KEYS = ("epoch", "loss", "train_accuracy", "test_accuracy", "test_loss", "seconds",
                 "samples_per_second", "sparsity", "lr")
#: The history of a regression run has these too (overall, physical units).
_REGRESSION_KEYS = ("test_rmse", "test_r2")


def _history_keys(regress):
    return _HISTORY_KEYS + (_REGRESSION_KEYS if regress else ())


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v, low=-math.inf, high=math.inf):
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and low <= v <= high)


def _check_resume(path, arrays, meta, *, fingerprint, epochs, n, batch_size, seed, shape,
                  norm, mask, tracks_mask=None, out_norm=None, regress=False):
    """Every field of a checkpoint against the run resuming from it (see
    :func:`fit`); returns (step, epoch, batch, rng_state, history, accum, norm).
    ``norm`` and ``out_norm`` are the run's normalisations (as JSON,
    :func:`_norm_json`). Raises CheckpointError naming ``path`` and the field."""
    def bad(msg):
        raise CheckpointError(f"{path}: cannot resume: {msg}")

    required = ("fingerprint", "epoch", "batch", "step", "rng_state", "accum", "history", "norm")
    missing = [k for k in required if k not in meta]
    if missing:
        bad(f"the checkpoint has no {', '.join(missing)}")
    fp = meta["fingerprint"]
    if not isinstance(fp, dict):
        bad("its fingerprint is not a JSON object")
    if fp.get("prune") != fingerprint.get("prune"):
        _schedule_differs(path, fp.get("prune"), fingerprint.get("prune"))
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
    if tracks_mask is None:
        tracks_mask = mask is not None
    if tracks_mask:
        if "mask" not in arrays:
            bad("the checkpoint has no mask (the run has a mask or a pruning schedule)")
        packed = arrays["mask"]
        if packed.shape != (-(-shape[0] // 8),):
            bad(f"array 'mask' has {packed.size} bytes, the run needs {-(-shape[0] // 8)} "
                f"(a packed bit per parameter)")
        cur = np.unpackbits(packed, count=shape[0]).view(np.bool_)
        if mask is not None and np.any(cur & ~mask):
            bad("its mask keeps weights that the run's mask prunes")
        if np.any(arrays["params"][~cur]):
            bad("parameters the mask prunes (False) are not zero")
        arrays["mask"] = cur
    elif mask is not None and np.any(arrays["params"][~mask]):
        bad("parameters the mask prunes (False) are not zero")
    hist = meta["history"]
    keys = _history_keys(regress)
    if not isinstance(hist, dict) or set(hist) != set(keys) or any(
            not isinstance(hist[k], list) or len(hist[k]) != epoch for k in keys):
        bad(f"history must hold the lists {', '.join(keys)}, one entry per "
            f"finished epoch ({epoch})")
    optional = hist["test_accuracy"] + hist["test_loss"] + hist["samples_per_second"]
    if regress:
        optional = optional + hist["test_rmse"] + hist["test_r2"]
    if hist["epoch"] != list(range(1, epoch + 1)) or not all(
            _is_num(v) for v in hist["loss"] + hist["seconds"]) or not all(
            _is_num(v, 0, 1) for v in hist["sparsity"]) or not all(
            (v is None) if regress else _is_num(v, 0, 1) for v in hist["train_accuracy"]
            ) or not all(_is_num(v, 0) for v in hist["lr"]) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            for v in optional):
        bad("history holds values that are not finite numbers of the right range")
    acc = meta["accum"]
    seen = min(batch * batch_size, n)
    if not isinstance(acc, dict) or set(acc) != {"loss_sum", "correct", "seen", "seconds"} \
            or not _is_num(acc["loss_sum"]) or not _is_num(acc["seconds"], 0) \
            or (batch and (acc["seen"] != seen or not _is_int(acc["correct"])
                           or not 0 <= acc["correct"] <= seen)):
        bad(f"accum must hold loss_sum, correct, seen ({seen} after batch {batch}) and seconds")
    got = meta["norm"]
    _check_norm_json(bad, "norm", got, len(norm[0]) if norm is not None and isinstance(
        norm[0], list) else None)
    if got != norm:
        bad(f"norm {_short(got)} is not the run's input normalisation {_short(norm)}")
    if regress:
        got_out = meta.get("out_norm")
        _check_norm_json(bad, "out_norm", got_out, len(out_norm[0]) if out_norm is not None
                         and isinstance(out_norm[0], list) else None)
        if got_out != out_norm:
            bad(f"out_norm {_short(got_out)} is not the run's output normalisation "
                f"{_short(out_norm)}")
    return step, epoch, batch, meta["rng_state"], hist, acc, got


def _check_norm_json(bad, name, got, n):
    """``got`` must be None, [mean, std] (finite numbers) or two lists of n."""
    if got is None:
        return
    ok = isinstance(got, list) and len(got) == 2
    if ok and all(isinstance(v, list) for v in got):
        ok = len(got[0]) == len(got[1]) and (n is None or len(got[0]) == n) and all(
            _is_num(x) for v in got for x in v)
    elif ok:
        ok = all(_is_num(v) for v in got)
    if not ok:
        bad(f"{name} must be [mean, std] (two numbers, or two lists"
            + (f" of {n} values" if n else "") + f" per feature) or null, got {_short(got)}")


def _short(v, limit=80):
    text = json.dumps(v)
    return text if len(text) <= limit else text[:limit] + "..."


def _schedule_differs(path, got, want):
    """CheckpointError naming the pruning schedule's fields that differ."""
    if got is None or want is None:
        had = "no pruning schedule" if got is None else "a pruning schedule"
        raise CheckpointError(f"{path} was written by a run with {had} (differs in: prune); "
                              "start without --resume or use the same settings")
    if not isinstance(got, dict):
        raise CheckpointError(f"{path}: cannot resume: its pruning schedule is not a JSON object")
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    shown = ", ".join(f"prune.{k} (checkpoint {got.get(k)!r}, this run {want.get(k)!r})"
                      for k in diff)
    raise CheckpointError(f"{path} was written with a different pruning schedule (differs in: "
                          f"{shown}); start without --resume or use the same schedule")


# ------------------------------------------------------------------- public

def soft_labels(teacher, X, T=1.0, *, batch_size=4096, backend=None, progress=False,
                comm=None):
    """Teacher logits for a transfer set, computed in large batches.

    ``T`` is accepted (and checked, T > 0) so that callers can pass the
    distillation temperature, but the logits are returned **unscaled**: the
    temperature is applied inside the distillation loss. Save them with
    ``np.save(path, logits)``; :func:`fit` (and ``pykd distill
    --teacher-logits``) distills from logits alone, so a teacher trained in
    any framework can be used. ``progress=True`` shows a tqdm bar on a
    terminal.

    With ``comm`` (an mpi4py communicator or :class:`pykd.distributed.Comm`)
    each rank computes a contiguous share of the rows, cut at multiples of
    ``batch_size`` (the same bits as one process), and every rank gets the
    whole array (``pykd soft-labels`` under mpirun writes the shares into
    one file instead: :func:`pykd.distributed.soft_labels`).

    Returns
    -------
    ndarray, float32, shape (n, classes)
    """
    T = float(T)
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"T must be a finite number > 0, got {T}")
    if comm is not None:
        return _distributed().soft_labels(comm, teacher, X, batch_size=batch_size,
                                          backend=backend)
    bar = _progress_bar(progress, total=X.shape[0], desc="soft labels")
    if bar is None:
        return _forward_rows(teacher, X, batch_size=batch_size, backend=backend)
    out = np.empty((X.shape[0], teacher.n_outputs), _F32)
    chunk = 8 * batch_size
    with bar:
        for s in range(0, X.shape[0], chunk):
            out[s:s + chunk] = teacher.forward(X[s:s + chunk], batch_size=batch_size,
                                               backend=backend)
            bar.update(min(chunk, X.shape[0] - s))
    return out


def _forward_rows(model, X, *, method="forward", batch_size=1024, **kw):
    """``model.forward(X)`` (or ``predict``), also for :class:`pykd.data.ScaledImages`,
    which is converted chunk by chunk (whole batches, so the same bits)."""
    f = getattr(model, method)
    if not isinstance(X, ScaledImages):
        return f(X, batch_size=batch_size, **kw)
    chunk = 64 * batch_size
    out = None
    for s in range(0, X.shape[0], chunk):
        part = f(X[s:s + chunk], batch_size=batch_size, **kw)
        if out is None:
            out = np.empty((X.shape[0],) + part.shape[1:], part.dtype)
        out[s:s + part.shape[0]] = part
    return out if out is not None else f(X[0:0], batch_size=batch_size, **kw)


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
        return _forward_rows(teacher, X, upto=layer, batch_size=4096, backend=backend)
    return lambda idx: teacher.forward(X[idx], upto=layer, backend=backend)


def evaluate(model, X, y, teacher=None, *, batch_size=1024, backend=None):
    """Metrics of ``model`` on ``(X, y)``: accuracy, loss, confusion matrix
    and teacher agreement of a classifier, or RMSE, MAE and R^2 of a
    regression model (``model.task``).

    Parameters
    ----------
    model : MLP or Model
        Any model with ``forward``, ``n_outputs``, ``parameters``, ``nbytes``.
    X : ndarray (n, n_features), raw inputs
    y : int labels (n,) for a classifier; float targets (n, n_outputs) (or
        (n,) with one output), physical units, for a regression model
    teacher : MLP, Model or ndarray, optional
        Classifier: a model or its logits (n, classes); adds ``agreement``,
        the fraction of rows where the model's and the teacher's top-1
        predictions agree. Regression: a model or its outputs (n, n_outputs);
        adds ``teacher_rmse``, the RMSE between the model's and the
        teacher's outputs (overall: the mean over outputs).

    Returns
    -------
    dict
        Classifier: ``task`` ("classification"), ``accuracy``, ``loss``
        (mean cross-entropy), ``confusion`` (list of lists; row = true
        class, column = predicted), ``agreement`` (or None),
        ``parameters``, ``nonzeros``, ``bytes`` (in memory), ``n``.
        Regression: ``task`` ("regression"), the keys of
        :func:`pykd.regression_metrics` (``rmse``, ``mae``, ``r2`` and
        their ``*_per_output`` lists; physical units), ``teacher_rmse``
        (or None), ``parameters``, ``nonzeros``, ``bytes``, ``n``.
    """
    if getattr(model, "task", "classification") == "regression":
        return _evaluate_regression(model, X, y, teacher, batch_size, backend)
    n_classes = model.n_outputs
    y = _as_labels("y", y, X.shape[0], n_classes)
    logits = _forward_rows(model, X, batch_size=batch_size, backend=backend)
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
            t_pred = _forward_rows(teacher, X, method="predict", batch_size=batch_size,
                                   backend=backend)
        agreement = float((t_pred == pred).mean()) if len(y) else float("nan")
    return {
        "task": "classification",
        "accuracy": accuracy,
        "loss": loss,
        "confusion": confusion.reshape(n_classes, n_classes).tolist(),
        "agreement": agreement,
        "parameters": model.parameters,
        "nonzeros": model.nonzeros,
        "bytes": model.nbytes,
        "n": int(len(y)),
    }


def _evaluate_regression(model, X, y, teacher, batch_size, backend):
    n_out = model.n_outputs
    y = _as_targets("y", y, X.shape[0], n_out, "mse")
    out = _forward_rows(model, X, batch_size=batch_size, backend=backend)
    res = {"task": "regression"}
    res.update(regression_metrics(y, out))       # NaN/inf outputs: a ValueError naming rows
    t_rmse = None
    if teacher is not None:
        if isinstance(teacher, np.ndarray):
            t_out = teacher.reshape(-1, 1) if teacher.ndim == 1 and n_out == 1 else teacher
            if t_out.shape != out.shape:
                raise ValueError(f"teacher outputs must have shape {out.shape}, got "
                                 f"{teacher.shape}")
        else:
            t_out = _forward_rows(teacher, X, batch_size=batch_size, backend=backend)
        t_rmse = regression_metrics(t_out, out)["rmse"]
    res.update({"teacher_rmse": t_rmse, "parameters": model.parameters,
                "nonzeros": model.nonzeros, "bytes": model.nbytes, "n": int(X.shape[0])})
    return res


def fit(model, X, y, *, config=None, cfg=None, epochs=None, batch_size=None,
        teacher_logits=None, teacher_outputs=None, hint_targets=None, X_val=None, y_val=None,
        checkpoint=None, resume=False, progress=True, backend=None, seed=None, mask=None,
        prune=None, callback=None, on_epoch=None, desc="train", lr_decay=None,
        lr_schedule=None, norm=None, comm=None):
    """Train ``model`` in place; one :func:`pykd._step.train_step` per batch.

    Parameters
    ----------
    model : MLP
        Trained in place. If ``model.norm`` is None it is set from ``X``
        (see ``norm``; float64 sums, chunk by chunk). A regression run also
        sets ``model.out_norm`` (if None) to the per-output mean/std of
        ``y`` and ``model.task = "regression"``.
    X : ndarray (n, n_features), raw inputs (float32)
        An in-memory float32 array is normalised once per run into one copy
        (the fastest). A ``numpy.memmap`` or :class:`pykd.data.ScaledImages`
        (uint8 images as ``x / 255``, e.g. from ``load_dataset`` on a
        directory of ``.npy`` files) is never copied whole: each batch is
        read, converted and normalised into the batch buffer, so memory is
        bounded by the batch, not the data. Both give the same bits.
    y : ndarray
        Classification (``cfg.loss`` "ce" or "kd"): int labels (n,).
        Regression ("mse", "huber", "mse_kd", "huber_kd"): float32 or
        float64 targets (n, n_outputs), or (n,) when the model has one
        output (read as a view), in physical units. The step sees the
        normalised targets ``(y - mean) / std`` (one float32 copy per run),
        so the loss and ``cfg.huber_delta`` are in normalised target units.
    config : RunConfig, optional
        Every serialisable setting of the run in one object (docs/config.md):
        ``step`` (the TrainConfig), epochs, batch_size, lr_schedule,
        lr_decay, seed, backend, norm, prune. A keyword below given
        explicitly (not None) overrides the config's value; without a config
        the defaults are ``RunConfig()``'s (epochs=1, batch_size=64,
        constant rate, backend "fortran").
    cfg : TrainConfig, optional
        Loss, optimizer and its settings, dropout, hint (overrides
        ``config.step``; default ``TrainConfig()``).
    epochs, batch_size : int, optional
        ``epochs >= 0`` (default 1), ``batch_size >= 1`` (default 64). The last partial batch of each
        epoch is used; a batch_size larger than ``X`` is one batch of all of
        it (buffers are sized for ``min(batch_size, n)`` rows).
    teacher_logits : float32 (n, classes), for ``cfg.loss == "kd"``
        Unscaled teacher logits (see :func:`soft_labels`).
    teacher_outputs : float32 or float64 (n, n_outputs), for "mse_kd" and "huber_kd"
        The teacher's outputs for ``X`` in physical units (e.g.
        ``teacher.forward(X)``); normalised with the student's
        ``out_norm`` (one float32 copy per run). Refused with other losses.
    hint_targets : float32 (n, width) or callable idx -> (len(idx), width)
        Needed when ``cfg.hint_layer > 0`` (see :func:`hint_targets_from`).
        The regressor (width x sizes[hint_layer]) lives after the model's
        parameters in the training buffer and is saved in checkpoints only.
    X_val, y_val : optional
        Evaluated after every epoch (``test_accuracy``/``test_loss``; for
        regression ``test_rmse``/``test_r2``/``test_loss``).
    checkpoint : path, optional
        Written atomically after every epoch and on Ctrl-C. It holds the
        current mask (when there is a mask or a pruning schedule) and the
        schedule.
    resume : bool
        Continue from ``checkpoint``, which must exist and match the run:
        every field is checked first (the fingerprint of sizes, activations,
        hint, n, batch size, seed, config, lr_decay, lr_schedule, mask and pruning
        schedule; epoch in [0, epochs]; batch; step = epoch * batches +
        batch; the shuffling state of the seed at that epoch; the shapes and
        finiteness of the buffers; the mask, within the run's mask, and
        zeros where it prunes; history, running sums, norm and, for
        regression, out_norm).
    progress : bool or "bar"
        True: a tqdm bar per epoch (loss, accuracy, samples/s) on stderr when
        it is a terminal, else one line per epoch logged at INFO level to the
        ``pykd.train`` logger (configure :mod:`logging` to see it, e.g.
        ``logging.basicConfig(level=logging.INFO)``); "bar": always the bar.
    backend : {"fortran", "numpy"}, optional
        Default "fortran".
    seed : int, optional
        Seed of the shuffling generator (default ``cfg.seed``).
    mask : bool array like the parameters, or a list of per-layer masks
        Pruning mask passed to the optimizer (False entries, and their
        optimizer moments, stay zero). The list form has one bool array per
        layer shaped like its ``W`` (:func:`pykd.weight_masks`); biases and
        a hint regressor are never masked.
    prune : pykd.PruneSchedule, optional
        Gradual magnitude pruning while training: after the schedule's steps
        (optimizer steps; step 0 is before the first) the weights are pruned
        to its sparsity and the newly pruned weights and their optimizer
        moments are set to exactly zero. Starts from ``mask`` if given.
    callback : callable(dict), optional
        Called after every step with epoch, batch, step, loss and lr (the
        learning rate of that step).
    on_epoch : callable(EpochState), optional
        Called after every epoch (after validation, before the checkpoint)
        with an :class:`EpochState`: the epoch, the history so far and the
        model. It stops training by setting ``state.stop = True`` or
        returning True, and sets the learning rate of the following epochs
        with ``state.lr = value`` (recorded in checkpoints, so resuming
        gives the same bits). :class:`pykd.EarlyStopping` is one. An object
        with ``state_dict()``/``load_state_dict(d)`` has its state saved in
        every checkpoint and restored on resume; ``reset()``, if it has one,
        is called at the start of a fresh run.
    lr_decay : float in (0, 1], optional
        The factor of the exponential schedule: epoch e (from 0) uses
        ``cfg.lr * lr_decay**e``. 1 (the default) keeps the rate constant;
        another value with a non-exponential ``lr_schedule`` is an error.
    lr_schedule : {None, "constant", "exponential", "cosine"}, optional
        The learning rate over the run. "constant": ``cfg.lr`` throughout;
        "exponential": ``cfg.lr * lr_decay**e`` in epoch e; "cosine": per
        optimizer step, step s (from 0) of the run's S = epochs x batches
        steps uses ``cfg.lr * (1 + cos(pi * s / S)) / 2``, a half cosine
        from ``cfg.lr`` towards 0. None (the default): "exponential" if
        ``lr_decay != 1``, else "constant". It is in the checkpoint's
        fingerprint. When an exponentially decayed rate falls below
        ``LR_WARN_BELOW`` (1e-7), one :class:`LearningRateWarning` is issued
        (the cosine schedule reaches 0 by design and gives none).
    norm : {None, "auto", "scalar", "per_feature", "none"}, optional
        The input normalisation when ``model.norm`` is None (also
        :class:`RunConfig`'s ``norm``): None/"auto" is per-feature for
        regression and scalar (one mean and std over all of X) for
        classification; "per_feature" and "scalar" choose one; "none" trains
        on raw inputs. A constant feature gets std 1 (so do constant
        targets). When ``model.norm`` is set it is kept; a ``norm`` of
        another kind is then an error.
    comm : mpi4py communicator or pykd.distributed.Comm, optional
        Data-parallel training on the communicator's N ranks, every rank
        calling fit with the same arguments (the same X, y, model and
        settings): each rank takes its contiguous 1/N share of every global
        batch (same shuffling from the seed), computes its gradient, the
        flat gradient buffer is summed once per step (a reduce to rank 0 and
        a broadcast, so every rank holds the same bits), and every rank
        applies the same update. Batch size, shuffling and learning rate
        mean what they mean in one process; the history (loss, accuracy)
        is the whole batch's. Rank 0 alone prints progress and writes the
        checkpoint; a checksum of the parameters is compared across ranks
        every epoch and at every save. A bad argument on any rank is raised
        on every rank; an exception only one rank sees aborts the job
        (MPI_Abort) with its message; a collective that waits longer than the
        Comm's timeout (default 60 s) aborts it with exit code 3. The
        checkpoint records N: resume with the same N. None (the default):
        one process. See docs/distributed.md.

    Returns
    -------
    dict of per-epoch lists: ``epoch``, ``loss``, ``train_accuracy``,
    ``test_accuracy``, ``test_loss``, ``seconds`` (training time of the
    epoch, without validation and checkpointing), ``samples_per_second``,
    ``sparsity`` (fraction of the model's weights that are zero at the end
    of the epoch; biases not counted), ``lr`` (the learning rate of the
    epoch's first step). A regression run has ``train_accuracy`` and
    ``test_accuracy`` None and adds ``test_rmse`` and ``test_r2`` (overall,
    physical units; :func:`pykd.regression_metrics`); its ``test_loss`` is
    the target term of the loss (MSE or Huber) in normalised units.

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
    dist = None
    if comm is not None:
        dist = _distributed().Comm(comm) if not isinstance(comm, _distributed().Comm) else comm
        if dist.size == 1:
            dist = None

    def prepare():
        rc = _run_config(config, step=cfg, epochs=epochs, batch_size=batch_size,
                         backend=backend, seed=seed, prune=prune, lr_decay=lr_decay,
                         lr_schedule=lr_schedule, norm=norm)
        return _prepare(model, X, y, rc=rc, teacher_logits=teacher_logits,
                        hint_targets=hint_targets, X_val=X_val, y_val=y_val,
                        checkpoint=checkpoint, resume=resume, mask=mask, on_epoch=on_epoch,
                        teacher_outputs=teacher_outputs, dist=dist)

    if dist is None:
        run = prepare()
    else:
        # A bad argument on any rank fails on every rank, with its message.
        run = dist.agree(prepare)
        settings = json.dumps([run.fingerprint, run.step], sort_keys=True).encode("utf-8")
        norms = [np.asarray(v, np.float64) for nm in (model.norm, model.out_norm)
                 if nm is not None for v in nm]
        dist.check_same(np.frombuffer(settings, np.uint8), *norms,
                        what="the run's settings and normalisation")
        run.check_ranks("the initial parameters (every rank must start from the same model)")
        progress = progress if dist.is_root else False
    if run.stopped:                      # resuming a run an on_epoch callback stopped
        return run.history
    with _sigint_flag() as interrupt:
        run.interrupt = interrupt
        try:
            for epoch in range(run.start_epoch, run.epochs):
                if _run_epoch(run, epoch, interrupt, progress=progress, callback=callback,
                              desc=desc):
                    break
        except BaseException as e:
            if dist is not None and not getattr(e, "mpi_collective", False):
                # Only this rank saw it: the others would wait in the next sum.
                dist.abort(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            raise
    return run.history


# ------------------------------------------------------ fit: preparation

def _run_config(config, **given):
    """The run's RunConfig: ``config`` (default ``RunConfig()``, whose
    defaults are fit's) with every keyword given (not None) put in."""
    if config is None:
        config = RunConfig()
    elif not isinstance(config, RunConfig):
        raise TypeError(f"config must be a pykd.RunConfig or None, got {type(config).__name__}")
    changes = {k: v for k, v in given.items() if v is not None}
    return config.replace(**changes) if changes else config


def _check_fit_inputs(model, X, y, cfg, teacher_logits, hint_targets, X_val, y_val,
                      teacher_outputs=None):
    """Validate the data arguments of fit; returns (y, teacher, hint,
    hint_targets, y_val) with hint = (layer, width) or None. For a
    regression loss y and y_val are (n, n_out) float views and teacher is
    teacher_outputs (physical units, not yet normalised)."""
    sizes = model.sizes
    if not isinstance(X, ScaledImages) and (
            not isinstance(X, np.ndarray) or X.dtype != _F32 or X.ndim != 2):
        raise TypeError("X must be a 2-D float32 numpy array (or pykd.data.ScaledImages)")
    n = X.shape[0]
    if X.shape[1] != sizes[0]:
        raise ValueError(f"X has {check.plural(X.shape[1], 'feature')} but the model takes "
                         f"{sizes[0]}")
    if n == 0:
        raise ValueError("X is empty")
    if not isinstance(X, ScaledImages):    # uint8 images are finite
        _check_finite("X", X)
    n_classes = sizes[-1]
    regress = cfg.loss in REGRESSION_LOSSES
    if regress:
        y = _as_targets("y", y, n, n_classes, cfg.loss)
        if teacher_logits is not None:
            raise ValueError(f"teacher_logits given with the regression loss {cfg.loss!r}: "
                             "a regression teacher's outputs go in teacher_outputs (physical "
                             "units, shape (n, n_outputs))")
        if cfg.loss.endswith("_kd"):
            if teacher_outputs is None:
                raise ValueError(f"cfg.loss={cfg.loss!r} needs teacher_outputs (the "
                                 "teacher's outputs for X, physical units)")
            teacher_logits = _as_targets("teacher_outputs", teacher_outputs, n, n_classes,
                                         cfg.loss)
        elif teacher_outputs is not None:
            raise ValueError(f"teacher_outputs given but cfg.loss is {cfg.loss!r} (use "
                             f"loss={cfg.loss + '_kd'!r} to distil from them)")
    else:
        y = _as_labels("y", y, n, n_classes)
        if teacher_outputs is not None:
            raise ValueError(f"teacher_outputs is for the regression losses 'mse_kd' and "
                             f"'huber_kd'; cfg.loss is {cfg.loss!r} (a classifier distils from "
                             "teacher_logits with loss='kd')")
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
    if X_val is not None and not isinstance(X_val, ScaledImages):
        if not isinstance(X_val, np.ndarray) or X_val.ndim != 2 or X_val.dtype.kind not in "iuf":
            raise TypeError("X_val must be a 2-D numeric numpy array")
        _check_finite("X_val", X_val)
    if X_val is not None:
        if X_val.shape[1] != sizes[0]:
            raise ValueError(f"X_val has {check.plural(X_val.shape[1], 'feature')} but the "
                             f"model takes {sizes[0]}")
        if regress:
            y_val = _as_targets("y_val", y_val, X_val.shape[0], n_classes, cfg.loss, "X_val")
        else:
            y_val = _as_labels("y_val", y_val, X_val.shape[0], n_classes, "X_val")
    return y, teacher_logits, hint, hint_targets, y_val


def _flat_mask(mask, sizes, n_total):
    """The run's own copy of ``mask`` as one bool array over the training
    buffer (True = trained), from a flat mask or a list of per-layer masks."""
    if isinstance(mask, (list, tuple)):
        sl = _step.layer_slices(sizes)
        if len(mask) != len(sl):
            raise ValueError(f"mask as a list needs one bool array per layer ({len(sl)}), "
                             f"got {len(mask)}")
        flat = np.ones(n_total, np.bool_)
        for k, (m, (ws, _, shape)) in enumerate(zip(mask, sl)):
            if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.shape != shape:
                got = (f"{m.dtype} array of shape {m.shape}" if isinstance(m, np.ndarray)
                       else type(m).__name__)
                raise ValueError(f"mask[{k}] (layer {k + 1}'s W) must be a bool array of "
                                 f"shape {shape}, got {got}")
            flat[ws] = m.ravel()
        return flat
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (n_total,):
        raise ValueError(f"mask must be a bool array of shape ({n_total},) or a list of one "
                         "bool array per layer shaped like its W (pykd.weight_masks)")
    return mask.copy()


def _training_buffer(model, sizes, hint, seed):
    """The model's parameters, then a hint regressor, in one buffer (the
    model is rebound to its first part)."""
    n_model = model.parameters
    n_total = _step.param_count(sizes, hint)
    if n_total == n_model:
        return model.params
    P = _buffers.empty(n_total, _F32)
    P[:n_model] = model.params
    model._bind(P[:n_model])
    reg_rng = np.random.default_rng([seed, 0x68696E74])
    for ws, bs, (n_in, _) in _step.layer_slices(sizes, hint)[len(sizes) - 1:]:
        bound = 1.0 / math.sqrt(n_in)
        P[ws] = reg_rng.uniform(-bound, bound, ws.stop - ws.start)
        P[bs] = reg_rng.uniform(-bound, bound, bs.stop - bs.start)
    return P


def _new_accum():
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


class _Run:
    """The state of one fit run: buffers, data, the mask and schedule,
    counters, history. Built by :func:`_prepare`."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    # -- pruning
    def weight_views(self):
        """(W of P, W of the mask) per model layer (the hint regressor is never pruned)."""
        return [(self.P[ws].reshape(shape), self.mask[ws].reshape(shape))
                for ws, _, shape in _step.layer_slices(self.sizes)]

    def prune_if_due(self):
        """Prune after step ``self.step`` if the schedule says so: grow the
        mask, zero the newly pruned weights and their optimizer moments."""
        sched = self.schedule
        if sched is None or not sched.is_step(self.step):
            return
        from .compress.prune import extend_masks
        views = self.weight_views()
        target = sched._value(self.step, sched.end)
        if extend_masks([w for w, _ in views], [m for _, m in views], target, sched.scope,
                        self.backend):
            off = ~self.mask
            self.P[off] = 0
            self.S1[off] = 0
            self.S2[off] = 0

    def sparsity(self):
        """Fraction of the model's weights that are zero."""
        sl = _step.layer_slices(self.sizes)
        total = sum(ws.stop - ws.start for ws, _, _ in sl)
        nz = sum(int(np.count_nonzero(self.P[ws])) for ws, _, _ in sl)
        return 1.0 - nz / total

    # -- learning rate
    def epoch_lr(self, epoch):
        """The learning rate of the first step of ``epoch`` (from 0): the one
        an on_epoch callback set, else the schedule's."""
        return self.lr_set if self.lr_set is not None else self.lr_at(epoch * self.n_batches)

    def lr_at(self, step):
        """The schedule's learning rate of optimizer step ``step`` (0-based)."""
        lr = self.cfg.lr
        if self.lr_schedule == "exponential":
            return lr * self.lr_decay**(step // self.n_batches)
        if self.lr_schedule == "cosine":
            return lr * 0.5 * (1.0 + math.cos(math.pi * step / (self.epochs * self.n_batches)))
        return lr

    def warn_lr(self, epoch, lr):
        """One LearningRateWarning per run when the decayed rate of ``epoch``
        is below LR_WARN_BELOW (cosine reaches 0 by design: no warning)."""
        if self.lr_schedule != "exponential" or self.lr_warned or self.lr_set is not None or \
                not lr < LR_WARN_BELOW <= self.cfg.lr:
            return
        self.lr_warned = True
        warnings.warn(
            f"the learning rate has decayed to {lr:.3g} at epoch {epoch + 1} of {self.epochs} "
            f"(lr {self.cfg.lr:g} x lr_decay {self.lr_decay:g}^{epoch}), below "
            f"{LR_WARN_BELOW:g}: the remaining epochs barely train; use a larger lr_decay, "
            "fewer epochs, or the constant or cosine schedule", LearningRateWarning,
            stacklevel=4)

    # -- checkpoints
    def meta_for(self, epoch, batch, epoch_rng_state):
        meta = {"format": "pykd-checkpoint", "version": CHECKPOINT_VERSION,
                "fingerprint": self.fingerprint, "epoch": epoch, "batch": batch,
                "step": self.step, "epochs": self.epochs, "rng_state": epoch_rng_state,
                "accum": self.accum, "history": self.history,
                "norm": _norm_json(self.model.norm), "backend": self.backend,
                "mask": self.mask is not None}
        if self.regress:
            meta["out_norm"] = _norm_json(self.model.out_norm)
        if self.schedule is not None:
            meta["prune"] = self.schedule.to_dict()
        if self.lr_set is not None:      # an on_epoch callback's rate (absent: the schedule)
            meta["lr_set"] = self.lr_set
        if self.stopped:
            meta["stopped"] = True
        return meta

    def callback_state(self):
        """(JSON state, float32 arrays) of an on_epoch callback with
        ``state_dict()``, else (None, None)."""
        get = getattr(self.on_epoch, "state_dict", None)
        if get is None:
            return None, None
        state, arrays = {}, {}
        for k, v in get().items():
            if isinstance(v, np.ndarray):
                if v.dtype.kind != "f" or not k.isidentifier():
                    raise TypeError(f"on_epoch.state_dict(): array {k!r} must be a float array "
                                    "under an identifier")
                arrays[k] = v
            else:
                state[k] = v
        return {"state": state, "arrays": sorted(arrays)}, arrays

    def save(self, epoch, batch, epoch_rng_state):
        if self.checkpoint is None:
            return
        meta = self.meta_for(epoch, batch, epoch_rng_state)
        cb_meta, cb_arrays = self.callback_state()
        if cb_meta is not None:
            meta["on_epoch"] = cb_meta
        if self.dist is None:
            _save_checkpoint(self.checkpoint, self.P, self.S1, self.S2, meta, mask=self.mask,
                             arrays=cb_arrays)
            return
        # Every rank holds the same state (checked), and rank 0 alone writes it.
        self.check_ranks(f"the parameters and optimizer state at the checkpoint (epoch "
                         f"{epoch}, batch {batch})")
        self.dist.on_root(_save_checkpoint, self.checkpoint, self.P, self.S1, self.S2, meta,
                          mask=self.mask, arrays=cb_arrays,
                          what="writing the checkpoint on rank 0")

    def check_ranks(self, what):
        """With MPI: the ranks' parameters, optimizer state and mask are the
        same bits, or RanksDivergedError on every rank."""
        if self.dist is not None:
            bufs = (self.P, self.S1, self.S2) + (() if self.mask is None else (self.mask,))
            self.dist.check_same(*bufs, what=what)


def _prepare(model, X, y, *, rc, teacher_logits, hint_targets, X_val, y_val, checkpoint,
             resume, mask, on_epoch=None, teacher_outputs=None, dist=None):
    """Check every argument of fit, build the buffers, restore a checkpoint.
    ``rc`` is the run's resolved :class:`RunConfig` (already checked)."""
    if not isinstance(model, MLP):
        hint = (" (Model.to_mlp() densifies and dequantizes a Model into a trainable MLP)"
                if hasattr(model, "to_mlp") else "")
        raise TypeError(f"model must be a pykd.MLP, got {type(model).__name__}{hint}")
    cfg, epochs, batch_size, backend = rc.step, rc.epochs, rc.batch_size, rc.backend
    seed, lr_decay, lr_schedule, prune = rc.shuffle_seed, rc.lr_decay, rc.schedule, rc.prune
    if cfg.loss not in ("ce", "kd") + REGRESSION_LOSSES:
        raise ValueError(f"cfg.loss must be 'ce', 'kd' or a regression loss "
                         f"({', '.join(map(repr, REGRESSION_LOSSES))}), got {cfg.loss!r}")
    regress = cfg.loss in REGRESSION_LOSSES
    if not regress and model.task == "regression":
        raise ValueError(f"the model's task is regression (model.task) but cfg.loss is "
                         f"{cfg.loss!r}, a classification loss; train it with 'mse', 'huber', "
                         "'mse_kd' or 'huber_kd'")
    norm = "auto" if rc.norm is None else rc.norm
    sizes, acts = model.sizes, model.activations
    y, teacher_logits, hint, hint_targets, y_val = _check_fit_inputs(
        model, X, y, cfg, teacher_logits, hint_targets, X_val, y_val, teacher_outputs)
    in_norm, out_norm = _run_norms(model, X, y, norm, regress)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    n = X.shape[0]
    n_batches = -(-n // batch_size)
    n_total = _step.param_count(sizes, hint)
    given_mask = None if mask is None else _flat_mask(mask, sizes, n_total)
    schedule = None if prune is None else prune.resolved(epochs * n_batches)
    if schedule is not None and schedule.end > epochs * n_batches:
        raise ValueError(f"prune.end ({schedule.end}) is after the run's last optimizer step "
                         f"({epochs * n_batches} = {check.plural(epochs, 'epoch')} x "
                         f"{check.plural(n_batches, 'batch', 'batches')}): the "
                         "final sparsity would never be reached")

    P = _training_buffer(model, sizes, hint, seed)
    fingerprint = {
        "sizes": sizes, "activations": acts, "hint": list(hint) if hint else None,
        "n_train": n, "batch_size": batch_size, "seed": seed, "config": _cfg_dict(cfg),
        "lr_decay": lr_decay, "lr_schedule": lr_schedule,
    }
    if given_mask is not None:   # only with a mask, so checkpoints without one keep matching
        fingerprint["mask"] = hashlib.sha256(np.packbits(given_mask).tobytes()).hexdigest()
    if schedule is not None:
        fingerprint["prune"] = schedule.to_dict()
    if dist is not None:       # only with MPI, so one-process checkpoints keep matching
        fingerprint["ranks"] = dist.size
    cur_mask = given_mask
    if cur_mask is None and schedule is not None:
        cur_mask = np.ones(n_total, np.bool_)
    run = _Run(model=model, rc=rc, sizes=sizes, acts=acts, cfg=cfg, epochs=epochs,
               batch_size=batch_size, n=n, n_batches=n_batches, backend=backend, seed=seed,
               lr_decay=lr_decay, lr_schedule=lr_schedule, lr_warned=False, P=P, G=np.zeros_like(P), S1=np.zeros_like(P),
               S2=np.zeros_like(P), y=y, teacher_logits=teacher_logits, hint=hint,
               hint_targets=hint_targets, X_val=X_val, y_val=y_val, checkpoint=checkpoint,
               mask=cur_mask, schedule=schedule, fingerprint=fingerprint,
               history={k: [] for k in _history_keys(regress)}, rng=np.random.default_rng(seed),
               step=0, start_epoch=0, start_batch=0, accum=_new_accum(), saved_epoch=None,
               on_epoch=on_epoch, lr_set=None, stopped=False, regress=regress, dist=dist,
               interrupt={"hit": False})
    if on_epoch is not None and not callable(on_epoch):
        raise TypeError(f"on_epoch must be callable, got {type(on_epoch).__name__}")
    if dist is not None:
        # The gradient, then this rank's loss, correct count and Ctrl-C flag:
        # the one buffer summed across the ranks per step.
        run.red = np.zeros(run.P.size + 3, _F32)
        run.G = run.red[:run.P.size]
    if resume:
        _restore(run, X, given_mask, in_norm, out_norm)
    else:
        if hasattr(on_epoch, "reset"):
            on_epoch.reset()
        model.norm = in_norm
        if regress:
            model.out_norm = out_norm
        run.prune_if_due()                # the schedule's step 0
    if regress:
        model.task = "regression"
        # The step trains in normalised target units: one float32 copy of the
        # targets (and of the teacher's outputs) per run, like X's.
        run.y = _normalized(y, model.out_norm)
        if teacher_logits is not None:
            run.teacher_logits = _normalized(teacher_logits, model.out_norm)
    # In memory: one normalised copy of the training set (fastest). Memory-
    # mapped or uint8 data: each batch is read and normalised into the batch
    # buffer (_batch), so memory stays bounded; the same bits either way.
    run.X = X
    run.Xn = model.normalize(X) if type(X) is np.ndarray else None
    rows = min(batch_size, n)             # a batch larger than the set is the whole set
    if dist is not None:
        rows = max(1, -(-rows // dist.size))     # the largest share of a batch
    run.ws = _step.Workspace(sizes, rows, hint)
    run.xbuf = np.empty((rows, sizes[0]), _F32)
    run.ybuf = np.empty((rows, sizes[-1]), _F32) if regress else np.empty(rows, np.int64)
    run.tbuf = np.empty((rows, sizes[-1]), _F32) if teacher_logits is not None else None
    run.hbuf = np.empty((rows, hint[1]), _F32) if hint else None
    return run


def _restore(run, X, given_mask, in_norm, out_norm):
    """Load and check ``run.checkpoint``, then continue from it."""
    checkpoint, model = run.checkpoint, run.model
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"no checkpoint at {checkpoint} to resume from")
    arrays, meta = load_checkpoint(checkpoint)
    _upgrade_meta(meta, run)
    (run.step, run.start_epoch, run.start_batch, rng_state, run.history, run.accum,
     _) = _check_resume(checkpoint, arrays, meta, fingerprint=run.fingerprint,
                        epochs=run.epochs, n=run.n, batch_size=run.batch_size, seed=run.seed,
                        shape=run.P.shape, norm=_norm_json(in_norm), mask=given_mask,
                        tracks_mask=run.mask is not None, out_norm=_norm_json(out_norm),
                        regress=run.regress)
    run.P[...] = arrays["params"]
    run.S1[...] = arrays["state1"]
    run.S2[...] = arrays["state2"]
    if run.mask is not None:
        run.mask[...] = arrays["mask"]
    model.norm = in_norm                  # equal to the checkpoint's (checked)
    if run.regress:
        model.out_norm = out_norm
    run.rng.bit_generator.state = rng_state
    run.saved_epoch = run.start_epoch
    _restore_epoch_control(run, checkpoint, arrays, meta)


def _restore_epoch_control(run, path, arrays, meta):
    """What on_epoch callbacks set: the rate (``lr_set``), a stop, and the
    callback's own state."""
    lr_set, stopped = meta.get("lr_set"), meta.get("stopped", False)
    if lr_set is not None and not _is_num(lr_set, 0):
        raise CheckpointError(f"{path}: cannot resume: lr_set must be a finite number >= 0, "
                              f"got {lr_set!r}")
    if not isinstance(stopped, bool) or (stopped and run.start_batch):
        raise CheckpointError(f"{path}: cannot resume: stopped must be true or false (and "
                              "true only at the end of an epoch)")
    run.lr_set, run.stopped = lr_set, stopped
    cb, saved = run.on_epoch, meta.get("on_epoch")
    if cb is None:
        return
    if saved is None or not hasattr(cb, "load_state_dict"):
        if hasattr(cb, "reset"):
            cb.reset()
        return
    try:
        cb.load_state_dict({**saved["state"], **{k: arrays["on_epoch"][f"on_epoch.{k}"]
                                                  for k in saved["arrays"]}})
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot resume: the on_epoch callback refuses its saved "
                              f"state ({e})") from None


def _run_norms(model, X, y, mode, regress):
    """The input and output normalisations of the run: the model's where it
    has them, else computed from X and y (see ``norm`` in :func:`fit`)."""
    have = model.norm
    kind = None if have is None else ("per_feature" if np.ndim(have[0]) else "scalar")
    if mode == "none":
        if have is not None:
            raise ValueError(f"norm='none' but the model already has a {kind} input "
                             "normalisation; set model.norm = None first, or leave norm=None")
        in_norm = None
    elif have is not None:
        if mode != "auto" and mode != kind:
            raise ValueError(f"norm={mode!r} but the model already has a {kind} input "
                             f"normalisation; set model.norm = None to recompute it, or leave "
                             "norm=None")
        in_norm = have
    elif mode == "per_feature" or (mode == "auto" and regress):
        in_norm = _column_stats(X)
    else:
        in_norm = tuple(_F32(v) for v in _norm_stats(X))
    out_norm = None
    if regress:
        out_norm = model.out_norm if model.out_norm is not None else _column_stats(y)
    return in_norm, out_norm


def _upgrade_meta(meta, run):
    """A checkpoint of a pykd without learning-rate schedules has no
    ``lr_schedule`` in its fingerprint and no ``lr`` history: fill them in
    as that version trained (exponential when lr_decay != 1), so it resumes."""
    fp, hist = meta.get("fingerprint"), meta.get("history")
    if not isinstance(fp, dict) or "lr_schedule" in fp:
        return
    fp["lr_schedule"] = "exponential" if fp.get("lr_decay", 1.0) != 1 else "constant"
    if fp == run.fingerprint and isinstance(hist, dict) and "lr" not in hist \
            and isinstance(hist.get("epoch"), list):
        hist["lr"] = [run.lr_at(e * run.n_batches) for e in range(len(hist["epoch"]))]


# ------------------------------------------------------ fit: one epoch

def _batch(run, idx):
    """The batch ``idx`` in the run's buffers: (x, labels, teacher logits, hint targets)."""
    b = idx.shape[0]
    if run.Xn is not None:
        xb = np.take(run.Xn, idx, axis=0, out=run.xbuf[:b], mode="clip")
    else:
        xb = run.model.normalize(take_rows(run.X, idx, run.xbuf), out=run.xbuf[:b])
    yb = np.take(run.y, idx, axis=0, out=run.ybuf[:b], mode="clip")
    tb = hb = None
    if run.tbuf is not None:
        tb = np.take(run.teacher_logits, idx, axis=0, out=run.tbuf[:b], mode="clip")
    if run.hint:
        if callable(run.hint_targets):
            run.hbuf[:b] = run.hint_targets(idx)
            hb = run.hbuf[:b]
        else:
            hb = np.take(run.hint_targets, idx, axis=0, out=run.hbuf[:b], mode="clip")
    return xb, yb, tb, hb


def _step_once(run, cfg, xb, yb, tb, hb, where, bar, n_global=None, first=0):
    """One optimizer step; a non-finite loss is NonFiniteLossError. With MPI
    the batch is this rank's share (rows ``first..`` of ``n_global``), and
    the loss and correct count returned are the whole batch's."""
    if run.dist is not None:
        return _step_distributed(run, cfg, xb, yb, tb, hb, where, bar, n_global, first)
    try:
        return _step.train_step(run.sizes, run.acts, run.P, run.G, run.S1, run.S2, xb, yb, cfg,
                                run.step + 1, run.ws, teacher_logits=tb, hint_target=hb,
                                mask=run.mask, backend=run.backend)
    except FloatingPointError as e:
        raise _nonfinite(run, cfg, where, bar) from e


def _step_distributed(run, cfg, xb, yb, tb, hb, where, bar, n_global, first):
    """Gradient of this rank's share, one sum across the ranks of the
    gradient buffer (with the loss, the correct count and the Ctrl-C flag),
    then the same update on every rank."""
    red, G = run.red, run.G
    loss, correct = 0.0, 0
    if xb.shape[0]:
        try:
            loss, correct = _step.gradient_step(
                run.sizes, run.acts, run.P, G, xb, yb, cfg, run.step + 1, run.ws,
                teacher_logits=tb, hint_target=hb, n_global=n_global, first=first,
                backend=run.backend)
        except FloatingPointError:
            loss = math.nan               # every rank sees NaN in the sum and stops
    else:
        G[...] = 0                        # a batch smaller than the ranks: nothing here
    red[-3:] = (loss, correct, 1.0 if run.interrupt["hit"] else 0.0)
    run.dist.sum(red)
    loss, correct = float(red[-3]), int(red[-2])
    run.interrupt["hit"] = bool(red[-1] > 0)
    if not math.isfinite(loss):
        err = _nonfinite(run, cfg, where, bar)
        err.mpi_collective = True
        raise err
    _step.apply_update(run.P, G, run.S1, run.S2, cfg, run.step + 1, mask=run.mask,
                       backend=run.backend)
    return loss, correct


def _nonfinite(run, cfg, where, bar):
    """The NonFiniteLossError of a step at ``where`` = (epoch, batch)."""
    if bar is not None:
        bar.close()
    if run.checkpoint is not None and run.saved_epoch is not None:
        kept = (f"the last good checkpoint {run.checkpoint} (epoch {run.saved_epoch}) is "
                "kept")
    else:
        kept = "no checkpoint was written yet"
    epoch, bi = where
    return NonFiniteLossError(
        f"the training loss became NaN or inf at epoch {epoch + 1}, batch {bi + 1} (step "
        f"{run.step + 1}); training stopped and {kept}. Try a lower learning rate "
        f"(lr={cfg.lr:g}) or check the inputs.")


def _run_epoch(run, epoch, interrupt, *, progress, callback, desc):
    """Train one epoch (from ``run.start_batch``), record it in the history
    and checkpoint; TrainingInterrupted after a checkpoint on Ctrl-C."""
    epoch_rng_state = run.rng.bit_generator.state
    perm = run.rng.permutation(run.n)
    per_step = run.lr_schedule == "cosine" and run.lr_set is None   # the others: per epoch
    lr0 = run.epoch_lr(epoch)
    cfg = run.cfg if lr0 == run.cfg.lr and not per_step else dataclasses.replace(run.cfg, lr=lr0)
    run.warn_lr(epoch, lr0)
    if run.start_batch == 0:
        run.accum = _new_accum()
    accum, batch_size = run.accum, run.batch_size
    bar = _progress_bar(progress, total=run.n, initial=min(run.start_batch * batch_size, run.n),
                        desc=f"{desc} epoch {epoch + 1}/{run.epochs}")
    t_start = time.perf_counter()
    t_post = t_start
    for bi in range(run.start_batch, run.n_batches):
        idx = perm[bi * batch_size:(bi + 1) * batch_size]
        b, first = idx.shape[0], 0
        if run.dist is not None:              # this rank's contiguous share of the batch
            part = _distributed().shard(b, run.dist.rank, run.dist.size)
            idx, first = idx[part], part.start
        xb, yb, tb, hb = _batch(run, idx)
        if per_step:
            cfg.lr = run.lr_at(run.step)          # cfg is this epoch's own copy
        loss, n_correct = _step_once(run, cfg, xb, yb, tb, hb, (epoch, bi), bar, b, first)
        run.step += 1
        run.prune_if_due()
        accum["loss_sum"] += loss * b
        accum["correct"] += int(n_correct)
        accum["seen"] += b
        if bar is not None:
            bar.update(b)
            now = time.perf_counter()
            if now - t_post > 0.5:
                t_post = now
                post = {"loss": f"{accum['loss_sum'] / accum['seen']:.4f}"}
                if not run.regress:
                    post["acc"] = f"{accum['correct'] / accum['seen']:.3f}"
                bar.set_postfix(post, refresh=False)
        if callback is not None:
            callback({"epoch": epoch, "batch": bi + 1, "step": run.step, "loss": loss,
                      "lr": cfg.lr})
        if interrupt["hit"]:
            accum["seconds"] += time.perf_counter() - t_start
            if bar is not None:
                bar.close()
            run.save(epoch, bi + 1, epoch_rng_state)
            raise _collective(TrainingInterrupted(run.checkpoint, epoch, bi + 1, run.step),
                              run)
    seconds = accum["seconds"] + time.perf_counter() - t_start
    run.start_batch = 0
    _end_epoch(run, epoch, seconds, bar, progress, desc, lr0)
    run.stopped = _call_on_epoch(run, epoch)
    if run.dist is not None and run.on_epoch is not None:
        # Rank 0's decision (stop, a new rate) is every rank's.
        run.stopped, run.lr_set = run.dist.check(
            None, (run.stopped, run.lr_set), what="agreeing on the on_epoch callback's decision")
    run.accum = _new_accum()
    if run.checkpoint is not None:
        run.save(epoch + 1, 0, run.rng.bit_generator.state)
        run.saved_epoch = epoch + 1
    else:
        run.check_ranks(f"the parameters after epoch {epoch + 1}")
    if interrupt["hit"]:
        raise _collective(TrainingInterrupted(run.checkpoint, epoch + 1, 0, run.step), run)
    return run.stopped


def _collective(exc, run):
    """Mark ``exc`` as raised on every rank at once (with MPI: the Ctrl-C
    flag is part of the step's sum), so fit does not abort the job for it."""
    if run.dist is not None:
        exc.mpi_collective = True
    return exc


def _distributed():
    from . import distributed
    return distributed


def _call_on_epoch(run, epoch):
    """Run the on_epoch callback after ``epoch``; True if it stops training.
    A rate it sets is used from the next epoch on."""
    if run.on_epoch is None:
        return False
    state = EpochState(epoch=epoch + 1, epochs=run.epochs, step=run.step, history=run.history,
                       model=run.model, next_lr=run.epoch_lr(epoch + 1))
    ret = run.on_epoch(state)
    if state.lr_set:
        run.lr_set = state.lr
    return bool(state.stop or ret is True)


def _end_epoch(run, epoch, seconds, bar, progress, desc, lr):
    """Append the epoch to the history (validating on X_val) and report it."""
    history, accum = run.history, run.accum
    seen = max(accum["seen"], 1)
    history["epoch"].append(epoch + 1)
    history["loss"].append(accum["loss_sum"] / seen)
    history["train_accuracy"].append(None if run.regress else accum["correct"] / seen)
    history["seconds"].append(seconds)
    history["samples_per_second"].append(accum["seen"] / seconds if seconds > 0 else None)
    history["sparsity"].append(run.sparsity())
    history["lr"].append(lr)
    rmse = r2 = None
    if run.X_val is not None and run.regress:
        out = _forward_rows(run.model, run.X_val, backend=run.backend)
        acc = None
        try:
            met = regression_metrics(run.y_val, out)
        except ValueError:            # NaN/inf outputs: no metric, the loss says nan
            vloss = float("nan")
        else:
            rmse, r2 = met["rmse"], met["r2"]
            vloss = target_loss(run.y_val, out, run.model.out_norm, run.cfg.loss,
                                run.cfg.huber_delta)
    elif run.X_val is not None:
        acc, vloss = _logits_stats(_forward_rows(run.model, run.X_val, backend=run.backend),
                                   run.y_val)
    else:
        acc = vloss = None
    history["test_accuracy"].append(acc)
    history["test_loss"].append(vloss)
    if run.regress:
        history["test_rmse"].append(rmse)
        history["test_r2"].append(r2)
    if bar is not None:
        post = {"loss": f"{history['loss'][-1]:.4f}"}
        if not run.regress:
            post["acc"] = f"{history['train_accuracy'][-1]:.3f}"
        if acc is not None:
            post["test_acc"] = f"{acc:.4f}"
        if rmse is not None:
            post["test_rmse"] = f"{rmse:.4g}"
        bar.set_postfix(post, refresh=True)
        bar.close()
    elif progress:
        if run.regress:
            train = ""
            test = "" if rmse is None else f", test rmse {rmse:.4g}, test r2 {r2:.4f}"
        else:
            train = f", train accuracy {history['train_accuracy'][-1]:.4f}"
            test = "" if acc is None else f", test accuracy {acc:.4f}"
        sparse = "" if run.mask is None else f", sparsity {history['sparsity'][-1]:.3f}"
        _log.info(f"{desc} epoch {epoch + 1}/{run.epochs}: loss {history['loss'][-1]:.4f}"
                  f"{train}{test}{sparse} "
                  f"({seconds:.2f} s, {accum['seen'] / max(seconds, 1e-9):,.0f} samples/s)")
