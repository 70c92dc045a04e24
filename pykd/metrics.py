"""Regression metrics (issue 14): RMSE, MAE and R^2, per output and overall.

Everything is computed in float64 from the arrays given, in their units
(physical units for a model's ``forward``/``predict``). "Overall" is the
unweighted mean over outputs of the per-output values (scikit-learn's
``multioutput="uniform_average"``).
"""
from __future__ import annotations

import numpy as np

__all__ = ["regression_metrics", "target_loss"]


def _as_2d(name, a, shape=None):
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu" or a.ndim not in (1, 2):
        got = (f"a {a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray)
               else type(a).__name__)
        raise TypeError(f"{name} must be a numeric numpy array of shape (n,) or (n, n_outputs), "
                        f"got {got}")
    a2 = a if a.ndim == 2 else a.reshape(-1, 1)
    if shape is not None and a2.shape != shape:
        raise ValueError(f"{name} has shape {a.shape} but y_true has {shape} (as (n, outputs))")
    if a2.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a2).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            shown = ", ".join(map(str, rows[:10])) + (", ..." if rows.size > 10 else "")
            raise ValueError(f"{name} contains NaN or inf (rows {shown})")
    return a2


def regression_metrics(y_true, y_pred):
    """RMSE, MAE and R^2 of predictions against targets.

    Parameters
    ----------
    y_true, y_pred : ndarray, shape (n,) or (n, n_outputs)
        Targets and predictions (any float or integer dtype; the same shape
        once a 1-D array is read as one output).

    Returns
    -------
    dict
        ``rmse``, ``mae``, ``r2`` (floats: the unweighted mean over outputs)
        and ``rmse_per_output``, ``mae_per_output``, ``r2_per_output``
        (lists of floats, one per output). Per output ``j``:
        ``rmse = sqrt(mean((p - t)**2))``, ``mae = mean(|p - t|)``,
        ``r2 = 1 - sum((p - t)**2) / sum((t - mean(t))**2)``. For a constant
        target (the denominator is 0) ``r2`` is 1.0 if it is predicted
        exactly and 0.0 otherwise (scikit-learn's ``force_finite=True``).

    Raises
    ------
    TypeError, ValueError
        For a non-array, mismatched shapes, an empty array or NaN/inf
        (naming the argument and the rows).
    """
    t = _as_2d("y_true", y_true).astype(np.float64)
    p = _as_2d("y_pred", y_pred, t.shape).astype(np.float64)
    r = p - t
    ss_res = np.einsum("ij,ij->j", r, r)
    c = t - t.mean(axis=0)
    ss_tot = np.einsum("ij,ij->j", c, c)
    n = t.shape[0]
    rmse = np.sqrt(ss_res / n)
    mae = np.abs(r).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0),
                      np.where(ss_res == 0, 1.0, 0.0))
    return {"rmse": float(rmse.mean()), "mae": float(mae.mean()), "r2": float(r2.mean()),
            "rmse_per_output": rmse.tolist(), "mae_per_output": mae.tolist(),
            "r2_per_output": r2.tolist()}


def target_loss(y_true, y_pred, out_norm, loss="mse", delta=1.0):
    """The regression loss of ``fit`` (its target term) in normalised target
    units, in float64: MSE or Huber (threshold ``delta``) of
    ``(y_pred - mean) / std`` against ``(y_true - mean) / std``, the mean
    over all elements. ``out_norm`` is ``(mean, std)`` or None (no scaling).
    """
    t = _as_2d("y_true", y_true).astype(np.float64)
    p = _as_2d("y_pred", y_pred, t.shape).astype(np.float64)
    r = p - t
    if out_norm is not None:
        r /= np.asarray(out_norm[1], np.float64)
    if loss.startswith("huber"):
        a = np.abs(r)
        return float(np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)).mean())
    return float((r * r).mean())
