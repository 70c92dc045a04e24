"""Argument checks shared by the public functions.

Everything is checked before any array reaches Fortran: f2py would otherwise
cast or copy silently (float64 -> float32, C -> Fortran order, int64 -> int8
with wraparound) or reject zero-size arrays with an unhelpful message.
Type problems raise TypeError; shape and value problems raise ValueError.
"""
import math
import numbers

import numpy as np

BACKENDS = ("fortran", "numpy")


def backend(value):
    if value not in BACKENDS:
        raise ValueError(f"backend must be 'fortran' or 'numpy', got {value!r}")
    return value


def array(name, a, dtype=np.float32, ndim=None, allow_empty=False, writeable=False,
          contiguous=True):
    """Check that `a` is an ndarray of `dtype` (no conversion), C-contiguous
    unless ``contiguous=False``."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of {np.dtype(dtype).name}, "
                        f"got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype} "
                        f"(convert explicitly, e.g. {name}.astype(np.{np.dtype(dtype).name}))")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray({name}))")
    if a.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place")
    return a


def same_shape(name, a, ref_name, ref):
    if a.shape != ref.shape:
        raise ValueError(f"{name} has shape {a.shape} but {ref_name} has shape {ref.shape}")


def labels(name, y, n, n_classes):
    """Integer class indices of length n; returned as int64 (converted only if
    another integer dtype was given: a copy of n integers, documented)."""
    if not isinstance(y, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of integers, got {type(y).__name__}")
    if y.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        bad = y[(y < 0) | (y >= n_classes)][0]
        raise ValueError(f"{name} out of range: {bad} is not in [0, {n_classes})")
    return np.ascontiguousarray(y, dtype=np.int64)


def _in(u, low, high, low_open, high_open):
    return (u > low if low_open else u >= low) and (u < high if high_open else u <= high)


_F32_MAX = float(np.finfo(np.float32).max)


def real(name, value, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """A finite real scalar in [low, high] (or open at either end)."""
    # Plain float and int first: the abstract-class check costs about a
    # microsecond, a quarter of a small kernel call.
    if type(value) is not float and type(value) is not int and (
            isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    # The kernels take float32: check the value they will actually see, so
    # 1e40 (inf) or 1e-50 (0) cannot slip past a range check.
    if not abs(v) <= _F32_MAX:  # also NaN and inf
        ok = False
    else:
        v32 = float(np.float32(v))
        ok = (_in(v, low, high, low_open, high_open) and
              _in(v32, low, high, low_open, high_open) and math.isfinite(v32))
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be finite in float32 and in {lo}{low}, {high}{hi}, "
                         f"got {value!r}")
    return v


def integer(name, value, low=None, high=2**62):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return int(value)


#: The activations of the dense kernels pykd.dense and pykd.dense_backward
#: (pykd_dense fuses these three; the training step handles the others).
_DENSE_ACTIVATIONS = ("identity", "relu", "tanh")


def activation(value):
    from ._codes import ACTIVATIONS
    if value not in _DENSE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {_DENSE_ACTIVATIONS}, got {value!r}")
    return ACTIVATIONS[value]


def plural(n, word, many=None, fmt=""):
    """``n`` and ``word``, in the plural unless n is 1: ``plural(1, "epoch")``
    is "1 epoch", ``plural(3, "epoch")`` "3 epochs" (``many`` for an
    irregular plural, ``fmt`` formats n, e.g. "," for 1,000)."""
    return f"{n:{fmt}} {word if n == 1 else (many or word + 's')}"
