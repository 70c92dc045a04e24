"""Pruning: one-shot magnitude pruning (per layer or global), gradual pruning
with the Zhu & Gupta cubic schedule, and structured pruning of hidden units.

* :func:`prune`: a new :class:`pykd.MLP` with exact zeros (or, structured,
  a smaller dense MLP), optionally fine-tuned (by distillation or on labels)
  with the mask held, so pruned weights stay exactly zero.
* :func:`weight_masks`: the keep-masks of a model's layers (True = non-zero).
* :class:`PruneSchedule`: the cubic schedule that :func:`pykd.fit` follows
  with ``prune=`` (teacher training, distillation, fine-tuning).

Biases are never pruned. Ties in magnitude are broken by position (the
entry first in flat C order, then layer order, is pruned first), so the
result is deterministic and the same on both backends.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .. import _validate as check
from .. import kernels
from .._reference import prune_count

__all__ = ["PruneSchedule", "prune", "weight_masks"]

_F32 = np.float32
SCOPES = ("global", "layer")
SCHEDULES = ("oneshot", "gradual")


@dataclass(frozen=True)
class PruneSchedule:
    """Gradual magnitude pruning during :func:`pykd.fit` (Zhu & Gupta 2017).

    After optimizer step ``t`` (``t = 0``: before the first step) with
    ``begin <= t <= end`` and ``(t - begin) % every == 0``, or ``t == end``,
    the weights are pruned to

    ``s_t = final + (initial - final) * (1 - (t - begin) / (end - begin))**3``

    by magnitude, and stay pruned (the mask only grows). Newly pruned weights
    and their optimizer moments are set to exactly zero.

    Parameters
    ----------
    final : float in [0, 1)
        Sparsity (fraction of weights removed) reached at step ``end``.
    initial : float in [0, final]
        Sparsity applied at step ``begin``.
    begin : int >= 0
        First pruning step (optimizer steps).
    end : int >= begin, optional
        Last pruning step; None: the run's last step.
    every : int >= 1
        Steps between pruning events.
    scope : {"global", "layer"}
        Rank all layers' weights together, or prune each layer to ``s_t``.
    """

    final: float
    initial: float = 0.0
    begin: int = 0
    end: int | None = None
    every: int = 100
    scope: str = "global"

    def __post_init__(self):
        final = check.real("PruneSchedule.final", self.final, 0, 1, high_open=True)
        initial = check.real("PruneSchedule.initial", self.initial, 0, 1, high_open=True)
        if initial > final:
            raise ValueError(f"PruneSchedule.initial ({initial}) must be <= final ({final})")
        check.integer("PruneSchedule.begin", self.begin, low=0)
        if self.end is not None:
            check.integer("PruneSchedule.end", self.end, low=0)
            if self.end < self.begin:
                raise ValueError(f"PruneSchedule.end ({self.end}) must be >= begin "
                                 f"({self.begin})")
        check.integer("PruneSchedule.every", self.every, low=1)
        if self.scope not in SCOPES:
            raise ValueError(f"PruneSchedule.scope must be one of {SCOPES}, got {self.scope!r}")
        object.__setattr__(self, "final", final)
        object.__setattr__(self, "initial", initial)

    def resolved(self, total_steps):
        """This schedule with ``end`` set (None becomes ``total_steps``)."""
        if self.end is not None:
            return self
        end = int(total_steps)
        if end < self.begin:
            raise ValueError(f"PruneSchedule.begin ({self.begin}) is after the run's last "
                             f"step ({end})")
        return dataclasses.replace(self, end=end)

    def _end(self, total_steps):
        if self.end is not None:
            return self.end
        if total_steps is None:
            raise ValueError("PruneSchedule.end is None: give total_steps (the run's last step)")
        return int(total_steps)

    def is_step(self, t, total_steps=None):
        """True if the weights are pruned after optimizer step ``t``."""
        end = self._end(total_steps)
        return self.begin <= t <= end and ((t - self.begin) % self.every == 0 or t == end)

    def sparsity_at(self, t, total_steps=None):
        """The target sparsity in effect after step ``t`` (that of the last
        pruning event at or before ``t``; 0 before ``begin``)."""
        end = self._end(total_steps)
        if t < self.begin:
            return 0.0
        if t >= end:
            return self.final
        last = self.begin + (t - self.begin) // self.every * self.every
        return self._value(last, end)

    def _value(self, t, end):
        if end == self.begin:
            return self.final
        frac = (t - self.begin) / (end - self.begin)
        return self.final + (self.initial - self.final) * (1.0 - frac) ** 3

    def to_dict(self):
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ masks

def weight_masks(model):
    """One bool array per layer, shaped like its weight matrix ``(n_in,
    n_out)``: True where the weight is kept (non-zero).

    Parameters
    ----------
    model : MLP or Model
        A Model's layers are densified (``layer.to_dense()``).

    Returns
    -------
    list of ndarray of bool
        Pass it to :func:`pykd.fit` as ``mask=`` (biases are never masked).
    """
    from ..models import MLP, Model
    if isinstance(model, MLP):
        return [W != 0 for W, _ in model.layers]
    if isinstance(model, Model):
        return [layer.to_dense() != 0 for layer in model.layers]
    raise TypeError(f"weight_masks: model must be a pykd.MLP or pykd.Model, got "
                    f"{type(model).__name__}")


def extend_masks(weights, masks, sparsity, scope, backend="fortran"):
    """Grow the keep-masks ``masks`` (bool, in place) so that a fraction
    ``sparsity`` of the weights is pruned: per layer (``scope="layer"``,
    ``round(sparsity * n_l)`` each) or over all layers (``"global"``).

    Entries already pruned stay pruned; among the kept ones the smallest
    magnitudes go first, ties broken by position. Returns the number of
    entries newly pruned.
    """
    def extra(n, m):
        return max(0, prune_count(n, sparsity) - (n - int(np.count_nonzero(m))))

    groups = ([[i] for i in range(len(weights))] if scope == "layer"
              else [list(range(len(weights)))])
    newly = 0
    for group in groups:
        n = sum(weights[i].size for i in group)
        e = extra(n, np.concatenate([masks[i].ravel() for i in group]))
        if e == 0:
            continue
        kept = [(i, np.abs(weights[i][masks[i]])) for i in group]
        kept = [(i, v) for i, v in kept if v.size]
        total = sum(v.size for _, v in kept)
        # e / total * total rounds back to e exactly (e < 2**50)
        sub = kernels.magnitude_mask([v for _, v in kept], e / total, backend=backend)
        for (i, _), keep in zip(kept, sub):
            m = masks[i]
            idx = np.flatnonzero(m.ravel())
            m.ravel()[idx[~keep]] = False   # masks[i] is C-contiguous: ravel is a view
        newly += e
    return newly


def _check_model(model, what="prune"):
    """An independent MLP copy of ``model`` (a Model is densified first)."""
    from ..models import MLP, Model
    if isinstance(model, MLP):
        return model.copy()
    if isinstance(model, Model):
        return model.to_mlp().copy()       # to_mlp may share the model's buffer
    raise TypeError(f"{what}: model must be a pykd.MLP or pykd.Model, got "
                    f"{type(model).__name__}")


# ---------------------------------------------------------------- prune

def prune(model, sparsity, *, scope="global", structured=False, schedule="oneshot",
          fine_tune=None):
    """Magnitude pruning of a trained model, optionally fine-tuned.

    Parameters
    ----------
    model : MLP or Model
        Not modified. A Model is densified first (``to_mlp()``).
    sparsity : float in [0, 1)
        The fraction of weights removed (biases are never pruned); with
        ``structured=True``, the fraction of each hidden layer's units
        removed (at least one unit of each layer is kept).
    scope : {"global", "layer"}
        "global" ranks all layers' weights together, "layer" prunes each
        layer to ``sparsity``. Ignored with ``structured`` only if left at
        its default (structured pruning is per layer).
    structured : bool
        Remove whole hidden units, ranked by the L2 norm of their incoming
        weights and bias (ties: the lower index goes first): the layer and
        the next layer's inputs physically shrink, giving a smaller dense
        MLP. The output layer keeps all its units. One-shot only.
    schedule : {"oneshot", "gradual"}
        "gradual" needs ``fine_tune``: the sparsity follows the Zhu & Gupta
        cubic schedule (:class:`PruneSchedule`) from 0 to ``sparsity`` over
        the first two thirds of the fine-tuning steps (about 20 pruning
        events), and the last third recovers at the final sparsity.
    fine_tune : pykd.FineTune, optional
        Fine-tune the pruned model with :func:`pykd.fit` (KD with a teacher
        or logits, CE otherwise) with the mask held: pruned weights and
        their Adam moments stay exactly zero.

    Returns
    -------
    MLP
        A new model; ``metadata["compression"][-1]`` records the step (and
        the fine-tuning history, with the per-epoch ``sparsity``).

    Examples
    --------
    >>> small = pykd.prune(student, 0.9)                       # doctest: +SKIP
    >>> ft = pykd.FineTune(X, y, teacher=teacher, epochs=2)    # doctest: +SKIP
    >>> small = pykd.prune(student, 0.9, schedule="gradual", fine_tune=ft)  # doctest: +SKIP
    """
    from .spec import FineTune
    sparsity = check.real("sparsity", sparsity, 0, 1, high_open=True)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not isinstance(structured, (bool, np.bool_)):
        raise TypeError(f"structured must be True or False, got {type(structured).__name__}")
    if fine_tune is not None and not isinstance(fine_tune, FineTune):
        raise TypeError(f"fine_tune must be a pykd.FineTune or None, got "
                        f"{type(fine_tune).__name__}")
    if schedule == "gradual" and fine_tune is None:
        raise ValueError("schedule='gradual' needs fine_tune (the pruning is spread over the "
                         "fine-tuning steps)")
    if structured and schedule == "gradual":
        raise ValueError("structured pruning is one-shot (schedule='oneshot'); it physically "
                         "removes units, then fine_tune retrains the smaller model")
    if structured and scope != "global":
        raise ValueError("scope does not apply to structured pruning (each hidden layer loses "
                         "the fraction sparsity of its units); leave it at its default")
    mlp = _check_model(model)
    backend = mlp.backend
    step = {"op": "prune", "sparsity": sparsity, "scope": "layer" if structured else scope,
            "structured": bool(structured), "schedule": schedule}
    if fine_tune is not None and fine_tune.X.shape[1] != mlp.sizes[0]:
        raise ValueError(f"FineTune.X has {check.plural(fine_tune.X.shape[1], 'feature')} but "
                         "the model takes "
                         f"{mlp.sizes[0]}")

    mask = None
    sched = None
    if structured:
        mlp, kept = _structured(mlp, sparsity)
        step["kept_units"] = kept
        step["sizes"] = list(mlp.sizes)
    elif schedule == "oneshot":
        masks = [np.ones(W.shape, np.bool_) for W, _ in mlp.layers]
        extend_masks([W for W, _ in mlp.layers], masks, sparsity, scope, backend)
        for (W, _), m in zip(mlp.layers, masks):
            W[~m] = 0
        mask = masks
    else:
        total = fine_tune.epochs * -(-fine_tune.X.shape[0] // fine_tune.batch_size)
        end = max(1, (2 * total) // 3)
        every = max(1, end // 20)
        end = every * max(1, end // every)
        sched = PruneSchedule(sparsity, 0.0, begin=0, end=end, every=every, scope=scope)
        step["prune_schedule"] = sched.to_dict()

    if fine_tune is not None:
        step["fine_tune"] = _ft_record(fine_tune, mlp.task == "regression")
        step["history"] = _fine_tune(mlp, fine_tune, mask=mask, prune=sched, backend=backend)
    n_w = sum(W.size for W, _ in mlp.layers)
    step["achieved_sparsity"] = 1.0 - mlp.nonzeros / n_w if n_w else 0.0
    meta = dict(mlp.metadata)
    meta["compression"] = list(meta.get("compression", [])) + [step]
    mlp.metadata = meta
    return mlp


def _ft_record(ft, regress=False):
    if regress:
        loss = ft.regression_loss()
        extra = {"huber_delta": ft.huber_delta} if "huber" in loss else {}
        if ft.distills:
            extra["alpha"] = ft.alpha
        return {"epochs": ft.epochs, "lr": ft.lr, "batch_size": ft.batch_size, "seed": ft.seed,
                "lr_decay": ft.lr_decay, "loss": loss, **extra}
    return {"epochs": ft.epochs, "lr": ft.lr, "batch_size": ft.batch_size, "seed": ft.seed,
            "lr_decay": ft.lr_decay, "loss": "kd" if ft.distills else "ce",
            **({"temperature": ft.temperature, "alpha": ft.alpha} if ft.distills else {})}


def _regression_config(ft):
    """fit's TrainConfig for a regression model's FineTune: MSE or Huber in
    normalised target units, distilled from the teacher's outputs if any."""
    from ..train import TrainConfig
    loss = ft.regression_loss()
    kw = {"huber_delta": ft.huber_delta} if "huber" in loss else {}
    if loss.endswith("_kd"):
        kw["alpha"] = ft.alpha
    return TrainConfig(loss=loss, lr=ft.lr, seed=ft.seed, **kw)


def _fine_tune(mlp, ft, *, mask=None, prune=None, backend="fortran"):
    """``fit`` with the FineTune's settings (KD with a teacher or its logits,
    CE otherwise; for a regression model MSE/Huber, distilled from the
    teacher's outputs if any); returns fit's history."""
    from ..train import TrainConfig, fit
    if mlp.task == "regression":
        if ft.teacher_logits is not None:
            raise ValueError("FineTune.teacher_logits given for a regression model: its "
                             "teacher's outputs go in FineTune.teacher_outputs")
        return fit(mlp, ft.X, ft.y, cfg=_regression_config(ft), epochs=ft.epochs,
                   batch_size=ft.batch_size, teacher_outputs=ft.logits(backend=backend),
                   X_val=ft.X_val, y_val=ft.y_val, progress=ft.progress, backend=backend,
                   seed=ft.seed, mask=mask, prune=prune, lr_decay=ft.lr_decay,
                   desc="fine-tune")
    if ft.loss is not None or ft.teacher_outputs is not None:
        what = "loss" if ft.loss is not None else "teacher_outputs"
        raise ValueError(f"FineTune.{what} is for regression models; this model's task is "
                         "classification")
    logits = ft.logits(backend=backend)
    kd = logits is not None
    cfg = TrainConfig(loss="kd" if kd else "ce", lr=ft.lr, seed=ft.seed,
                      **({"temperature": ft.temperature, "alpha": ft.alpha} if kd else {}))
    y = np.ascontiguousarray(ft.y, dtype=np.int64) if ft.y.dtype.kind in "iu" else ft.y
    y_val = ft.y_val
    if y_val is not None and y_val.dtype.kind in "iu":
        y_val = np.ascontiguousarray(y_val, dtype=np.int64)
    return fit(mlp, ft.X, y, cfg=cfg, epochs=ft.epochs, batch_size=ft.batch_size,
               teacher_logits=logits, X_val=ft.X_val, y_val=y_val, progress=ft.progress,
               backend=backend, seed=ft.seed, mask=mask, prune=prune, lr_decay=ft.lr_decay,
               desc="fine-tune")


def _structured(mlp, sparsity):
    """The smaller MLP without the lowest-norm hidden units; returns it and
    the kept unit indices of each hidden layer."""
    from ..models import MLP
    Ws = [W.copy() for W, _ in mlp.layers]
    bs = [b.copy() for _, b in mlp.layers]
    kept_all = []
    for l in range(len(Ws) - 1):            # hidden layers only; the output keeps its units
        W, b = Ws[l], bs[l]
        n_out = W.shape[1]
        r = min(prune_count(n_out, sparsity), n_out - 1)
        score = np.einsum("ij,ij->j", W.astype(np.float64), W.astype(np.float64)) \
            + b.astype(np.float64) ** 2      # squared L2 norm: the same order
        if not np.isfinite(score).all():
            raise ValueError(f"layer {l + 1} has NaN or inf weights")
        order = np.argsort(score, kind="stable")
        keep = np.sort(order[r:])
        Ws[l], bs[l] = np.ascontiguousarray(W[:, keep]), np.ascontiguousarray(b[keep])
        Ws[l + 1] = np.ascontiguousarray(Ws[l + 1][keep, :])
        kept_all.append(keep.tolist())
    sizes = [mlp.sizes[0]] + [W.shape[1] for W in Ws]
    out = MLP(sizes, mlp.activations, seed=None, norm=mlp.norm, out_norm=mlp.out_norm,
              metadata=mlp.metadata, backend=mlp.backend)
    for (W, b), W0, b0 in zip(out.layers, Ws, bs):
        W[...] = W0
        b[...] = b0
    out.seed = mlp.seed
    meta = dict(out.metadata)
    meta["sizes"] = sizes
    out.metadata = meta
    return out, kept_all
