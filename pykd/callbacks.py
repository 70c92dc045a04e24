"""Epoch-level callbacks of :func:`pykd.fit` (``on_epoch=``).

After every epoch (after validation, before the checkpoint) ``fit`` calls
``on_epoch(state)`` with an :class:`EpochState`. The callback reads the
history so far and the model, and can

* stop training: ``state.stop = True`` or return True;
* set the learning rate: ``state.lr = value`` is the rate of every
  following epoch (each step of it) until set again, replacing the
  schedule; ``state.lr = None`` goes back to the schedule.

Both are recorded in the checkpoint, so resuming gives the same bits. A
callback with ``state_dict()`` and ``load_state_dict(d)`` has its state saved
in every checkpoint and restored on resume (``state_dict`` returns JSON
values and float32 arrays); ``reset()``, if it has one, is called when a
fresh (not resumed) run starts, so one object can serve several runs.

:class:`EarlyStopping` is the ready-made one::

    stop = pykd.EarlyStopping(monitor="test_loss", patience=3)
    pykd.fit(model, X, y, X_val=Xv, y_val=yv, epochs=100, on_epoch=stop)
    stop.best_epoch, stop.stopped_epoch
"""
from __future__ import annotations

import math

import numpy as np

from . import _validate as check

__all__ = ["EarlyStopping", "EpochState"]


class EpochState:
    """What an ``on_epoch`` callback of :func:`pykd.fit` sees.

    Attributes
    ----------
    epoch : int
        The epoch just finished, from 1 (``history["epoch"][-1]``).
    epochs : int
        The run's number of epochs.
    step : int
        Optimizer steps so far.
    history : dict of lists
        The history so far, as ``fit`` returns it (do not modify it).
    model : MLP
        The model being trained; its parameters are the training buffer, so
        writing ``model.params[...]`` changes the run.
    stop : bool
        Set it to True to stop after this epoch (returning True does too).
    """

    def __init__(self, *, epoch, epochs, step, history, model, next_lr):
        self.epoch, self.epochs, self.step = epoch, epochs, step
        self.history, self.model = history, model
        self.stop = False
        self._lr = next_lr
        self.lr_set = False

    @property
    def lr(self):
        """The learning rate of the next epoch's first step. Setting it makes
        that the rate of every following epoch, until set again (None: back
        to the run's schedule). It must be finite and >= 0."""
        return self._lr

    @lr.setter
    def lr(self, value):
        if value is not None:
            value = check.real("state.lr", value, 0)
        self._lr = value
        self.lr_set = True


class EarlyStopping:
    """Stop :func:`pykd.fit` when a history value stops improving.

    Parameters
    ----------
    monitor : str
        A key of the history (``"test_loss"``, ``"test_accuracy"``,
        ``"loss"``, ``"train_accuracy"``; for regression ``"test_rmse"``,
        ``"test_r2"``); the test values need
        ``X_val``/``y_val``.
    patience : int >= 1
        Stop after this many epochs in a row without improvement.
    min_delta : float >= 0
        An improvement must beat the best value by more than this.
    mode : {None, "min", "max"}
        Whether smaller or larger is better; None: "max" for a name with
        "accuracy" in it and for ``test_r2`` (regression), else "min".
    restore_best : bool
        When training stops (early, or after the last epoch), put the
        parameters of the best epoch back into the model. The checkpoint
        written after that epoch holds them.

    Attributes
    ----------
    best : float or None
        The best value seen.
    best_epoch : int
        Its epoch (from 1; 0 before the first).
    wait : int
        Epochs since the best.
    stopped_epoch : int or None
        The epoch after which it stopped training.
    """

    def __init__(self, monitor="test_loss", patience=5, min_delta=0.0, mode=None,
                 restore_best=True):
        if not isinstance(monitor, str) or monitor == "epoch":
            raise ValueError(f"EarlyStopping: monitor must be the name of a history value, "
                             f"got {monitor!r}")
        if mode is None:
            mode = "max" if "accuracy" in monitor or monitor.endswith("r2") else "min"
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be None, 'min' or 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.patience = check.integer("EarlyStopping: patience", patience, low=1)
        self.min_delta = check.real("EarlyStopping: min_delta", min_delta, 0)
        if not isinstance(restore_best, bool):
            raise TypeError(f"EarlyStopping: restore_best must be True or False, got "
                            f"{restore_best!r}")
        self.restore_best = restore_best
        self.reset()

    def reset(self):
        """Forget the previous run (fit calls it when a fresh run starts)."""
        self.best, self.best_epoch, self.wait, self.stopped_epoch = None, 0, 0, None
        self._best_params = None

    def _better(self, value):
        if self.best is None:
            return math.isfinite(value)
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def __call__(self, state):
        if self.monitor not in state.history:
            raise ValueError(f"EarlyStopping: the history has no {self.monitor!r}; it has "
                             f"{', '.join(k for k in state.history if k != 'epoch')}")
        if self._best_params is not None and self._best_params.shape != state.model.params.shape:
            raise ValueError(f"EarlyStopping: its best parameters ({self._best_params.size}) "
                             f"are not this model's ({state.model.params.size})")
        value = state.history[self.monitor][-1]
        if value is None:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, which fit records only "
                             "with validation data: give X_val and y_val")
        if self._better(value):
            self.best, self.best_epoch, self.wait = float(value), state.epoch, 0
            if self.restore_best:
                self._best_params = state.model.params.copy()
        else:
            self.wait += 1
        stop = self.wait >= self.patience
        if self.restore_best and (stop or state.epoch == state.epochs) \
                and self._best_params is not None and self.best_epoch != state.epoch:
            state.model.params[...] = self._best_params
        if stop:
            self.stopped_epoch = state.epoch
        return stop

    # -- checkpoints
    def state_dict(self):
        """JSON values and the best parameters (a float32 array), for fit's
        checkpoints."""
        d = {"monitor": self.monitor, "mode": self.mode, "best": self.best,
             "best_epoch": self.best_epoch, "wait": self.wait,
             "stopped_epoch": self.stopped_epoch}
        if self._best_params is not None:
            d["best_params"] = self._best_params
        return d

    def load_state_dict(self, d):
        """Continue from :meth:`state_dict`'s output (ValueError if it is not
        one of an EarlyStopping with the same monitor and mode)."""
        keys = {"monitor", "mode", "best", "best_epoch", "wait", "stopped_epoch"}
        if not isinstance(d, dict) or not keys <= set(d) or set(d) - keys - {"best_params"}:
            raise ValueError("the on_epoch state is not an EarlyStopping's")
        if (d["monitor"], d["mode"]) != (self.monitor, self.mode):
            raise ValueError(f"the on_epoch state monitors {d['monitor']!r} ({d['mode']}), "
                             f"this EarlyStopping {self.monitor!r} ({self.mode})")
        ints = (d["best_epoch"], d["wait"]) + (() if d["stopped_epoch"] is None
                                                else (d["stopped_epoch"],))
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints) or not (
                d["best"] is None or isinstance(d["best"], (int, float))
                and not isinstance(d["best"], bool)):
            raise ValueError("the EarlyStopping state holds values of the wrong type")
        params = d.get("best_params")
        if params is not None and (not isinstance(params, np.ndarray)
                                   or params.dtype != np.float32 or params.ndim != 1):
            raise ValueError("the EarlyStopping state's best_params must be a 1-D float32 array")
        self.best = None if d["best"] is None else float(d["best"])
        self.best_epoch, self.wait, self.stopped_epoch = (d["best_epoch"], d["wait"],
                                                          d["stopped_epoch"])
        self._best_params = None if params is None else params.copy()
