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
    """Fine-tuning of a compressed model, by distillation or on labels.

    Parameters
    ----------
    X : float32 ndarray (n, n_features)
        Raw training inputs (the model's normalisation is applied).
    y : int ndarray (n,)
        Labels.
    teacher : MLP or Model, optional
        Distil from its logits (computed once, unscaled). Give at most one of
        ``teacher`` and ``teacher_logits``; with neither, the loss is plain
        cross-entropy.
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

    def __post_init__(self):
        check.array("FineTune.X", self.X, np.float32, ndim=2)
        if not isinstance(self.y, np.ndarray) or self.y.ndim != 1 \
                or self.y.shape[0] != self.X.shape[0]:
            raise ValueError("FineTune.y must be a 1-D array of "
                             f"{check.plural(self.X.shape[0], 'label')} "
                             f"(one per row of X)")
        if self.teacher is not None and self.teacher_logits is not None:
            raise ValueError("FineTune: give at most one of teacher and teacher_logits")
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
        """True when the loss is KD (a teacher or its logits is given)."""
        return self.teacher is not None or self.teacher_logits is not None

    def logits(self, backend=None):
        """The teacher's logits for ``X`` (float32 (n, classes)), or None."""
        if self.teacher_logits is not None:
            return self.teacher_logits
        if self.teacher is None:
            return None
        from ..train import soft_labels
        return soft_labels(self.teacher, self.X, backend=backend)
