"""``FineTune``: how a compression workflow fine-tunes its result (the
training set, the teacher, the schedule), shared by every workflow."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _validate as check

__all__ = ["FineTune"]


@dataclass(frozen=True)
class FineTune:
    """Fine-tuning of a compressed model, by distillation or on labels
    (classification) or targets (regression).

    The task is the model's (``model.task``): a classifier is fine-tuned
    with cross-entropy or Hinton KD, a regression model with MSE or Huber
    (``loss``) in its normalised target units (``(y - mean) / std`` with
    the model's ``out_norm``), distilled when a teacher is given
    (``alpha * loss(s, y) + (1 - alpha) * loss(s, teacher)``).

    Parameters
    ----------
    X : float32 ndarray (n, n_features)
        Raw training inputs (the model's normalisation is applied).
    y : ndarray
        Classification: int labels (n,). Regression: float32 or float64
        targets (n, n_outputs), or (n,) with one output, physical units.
    teacher : MLP or Model, optional
        Distil from its logits (classification) or outputs (regression),
        computed once. Give at most one of ``teacher``, ``teacher_logits``
        and ``teacher_outputs``; with none, the loss is plain cross-entropy
        (or ``loss``).
    teacher_logits : float32 ndarray (n, classes), optional
    epochs : int >= 1
    lr : float > 0
        Adam's learning rate; fine-tuning uses a smaller one than training.
    batch_size : int >= 1
    temperature, alpha : float
        Hinton KD settings (``alpha`` weighs the hard-label term).
    seed : int >= 0
        Shuffling seed.
    lr_decay : float in (0, 1]
        Per-epoch learning-rate factor.
    X_val, y_val : optional
        Evaluated after every epoch.
    progress : bool
        A progress bar per epoch.
    teacher_outputs : float32 or float64 ndarray (n, n_outputs), optional
        A regression teacher's outputs for ``X`` (physical units).
    loss : {None, "mse", "huber"}
        Regression only: the loss on targets (and on the teacher's outputs
        when distilling). None: "mse".
    huber_delta : float > 0
        The Huber threshold in normalised target units (``loss="huber"``).
    """

    X: Any
    y: Any
    teacher: Any = None
    teacher_logits: Any = None
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 64
    temperature: float = 5.0
    alpha: float = 0.1
    seed: int = 0
    lr_decay: float = 1.0
    X_val: Any = None
    y_val: Any = None
    progress: bool = False
    teacher_outputs: Any = None
    loss: Any = None
    huber_delta: float = 1.0

    def __post_init__(self):
        check.array("FineTune.X", self.X, np.float32, ndim=2)
        if not isinstance(self.y, np.ndarray) or self.y.ndim not in (1, 2) \
                or self.y.shape[0] != self.X.shape[0]:
            raise ValueError("FineTune.y must be a 1-D array of "
                             f"{check.plural(self.X.shape[0], 'label')} "
                             f"(one per row of X), or float targets of "
                             f"{check.plural(self.X.shape[0], 'row')}")
        given = [k for k in ("teacher", "teacher_logits", "teacher_outputs")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError("FineTune: give at most one of teacher, teacher_logits and "
                             f"teacher_outputs (got {' and '.join(given)})")
        if self.teacher_outputs is not None:
            if not isinstance(self.teacher_outputs, np.ndarray) \
                    or self.teacher_outputs.dtype not in (np.float32, np.float64) \
                    or self.teacher_outputs.ndim not in (1, 2):
                raise TypeError("FineTune.teacher_outputs must be a float32 or float64 array "
                                "of shape (n, n_outputs)")
            if self.teacher_outputs.shape[0] != self.X.shape[0]:
                raise ValueError(f"FineTune.teacher_outputs has {self.teacher_outputs.shape[0]} "
                                 f"rows but X has {self.X.shape[0]}")
        if self.loss not in (None, "mse", "huber"):
            raise ValueError(f"FineTune.loss must be None, 'mse' or 'huber' (regression), got "
                             f"{self.loss!r}")
        check.real("FineTune.huber_delta", self.huber_delta, 0, low_open=True)
        if self.huber_delta != 1.0 and self.loss != "huber":
            raise ValueError(f"FineTune.huber_delta={self.huber_delta!r} has no effect without "
                             "loss='huber'")
        if self.teacher is not None and not hasattr(self.teacher, "forward"):
            raise TypeError(f"FineTune.teacher must be a pykd.MLP or pykd.Model, got "
                            f"{type(self.teacher).__name__}")
        if self.teacher_logits is not None:
            check.array("FineTune.teacher_logits", self.teacher_logits, np.float32, ndim=2)
            if self.teacher_logits.shape[0] != self.X.shape[0]:
                raise ValueError(f"FineTune.teacher_logits has {self.teacher_logits.shape[0]} "
                                 f"rows but X has {self.X.shape[0]}")
        if (self.X_val is None) != (self.y_val is None):
            raise ValueError("FineTune: give both X_val and y_val, or neither")
        check.integer("FineTune.epochs", self.epochs, low=1)
        check.integer("FineTune.batch_size", self.batch_size, low=1)
        check.integer("FineTune.seed", self.seed, low=0)
        check.real("FineTune.lr", self.lr, 0, low_open=True)
        check.real("FineTune.temperature", self.temperature, 0, low_open=True)
        check.real("FineTune.alpha", self.alpha, 0, 1)
        check.real("FineTune.lr_decay", self.lr_decay, 0, 1, low_open=True)

    @property
    def distills(self) -> bool:
        """True when the loss is KD (a teacher, its logits or outputs is given)."""
        return (self.teacher is not None or self.teacher_logits is not None
                or self.teacher_outputs is not None)

    def regression_loss(self, distill=None):
        """The step's loss code name for a regression model: "mse", "huber",
        "mse_kd" or "huber_kd" (distilling when a teacher is given)."""
        base = self.loss or "mse"
        return base + "_kd" if (self.distills if distill is None else distill) else base

    def logits(self, backend=None):
        """The teacher's logits (or a regression teacher's outputs) for
        ``X``, or None."""
        if self.teacher_logits is not None:
            return self.teacher_logits
        if self.teacher_outputs is not None:
            return self.teacher_outputs
        if self.teacher is None:
            return None
        from ..train import soft_labels
        return soft_labels(self.teacher, self.X, backend=backend)
