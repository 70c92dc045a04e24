"""The compute kernels, NumPy-style.

Every function checks its arguments, then runs the Fortran kernel
(``backend="fortran"``, the default) or its pure-NumPy twin
(``backend="numpy"``). Arrays follow NumPy's conventions: a batch ``x`` is
``(n, in)``, a weight ``W`` is ``(in, out)`` and a dense layer is
``x @ W + b``. Arrays must already have the documented dtype and be
C-contiguous: nothing is cast or copied behind your back (a wrong dtype is a
TypeError, a wrong shape or value a ValueError).
"""
import numpy as np

from . import _codes
from . import _openblas
from . import _reference as ref
from . import _validate as check

try:
    with _openblas.loading():
        from . import _fkernels as _f
except ImportError as exc:  # pragma: no cover - only without a build
    from . import _extension_missing
    _f = None
    _import_error = _extension_missing(exc)

_F32 = np.float32


def _fortran():
    if _f is None:
        raise ImportError(_import_error)
    return _f


def _raise_for(stat, what):
    """Turn a Fortran status into an exception (the checks above normally
    catch everything first; this is the backstop)."""
    if stat == _codes.OK:
        return
    if stat == _codes.ERR_NONFINITE:
        raise ValueError(f"{what} contains NaN or inf")
    if stat == _codes.ERR_ALLOC:
        raise MemoryError(f"{what}: the Fortran kernel could not allocate its workspace")
    raise ValueError(f"{what}: rejected by the Fortran kernel (status {stat})")


def _no_overlap(out, *inputs):
    for name, a in inputs:
        if np.may_share_memory(out, a):
            raise ValueError(f"out must not overlap {name}")


# ---------------------------------------------------------------- dense layer

def dense(x, W, b, activation="identity", *, out=None, backend="fortran"):
    """Dense layer ``y = activation(x @ W + b)``, bias and activation fused.

    Parameters
    ----------
    x : ndarray, float32, shape (n, in)
    W : ndarray, float32, shape (in, out)
    b : ndarray, float32, shape (out,)
    activation : {"identity", "relu", "tanh"}
    out : ndarray, float32, shape (n, out), optional
        Where to write the result (must not overlap the inputs).
    backend : {"fortran", "numpy"}

    Returns
    -------
    y : ndarray, float32, shape (n, out)

    Examples
    --------
    >>> x = np.ones((2, 3), np.float32); W = np.ones((3, 4), np.float32)
    >>> pykd.dense(x, W, np.zeros(4, np.float32), "relu")[0]
    array([3., 3., 3., 3.], dtype=float32)
    """
    check.backend(backend)
    act = check.activation(activation)
    x = check.array("x", x, ndim=2)
    W = check.array("W", W, ndim=2)
    b = check.array("b", b, ndim=1)
    n, n_in = x.shape
    if W.shape[0] != n_in:
        raise ValueError(f"x has {check.plural(n_in, 'feature')} but W has shape {W.shape} "
                         f"(expected ({n_in}, out))")
    if b.shape != (W.shape[1],):
        raise ValueError(f"b must have shape ({W.shape[1]},), got {b.shape}")
    shape = (n, W.shape[1])
    if out is None:
        out = np.empty(shape, _F32)
    else:
        check.array("out", out, ndim=2, writeable=True)
        if out.shape != shape:
            raise ValueError(f"out must have shape {shape}, got {out.shape}")
        _no_overlap(out, ("x", x), ("W", W), ("b", b))
    if backend == "numpy":
        np.matmul(x, W, out=out)
        out += b
        return ref._act(out, activation)
    _raise_for(_fortran().dense_forward(x.T, W.T, b, act, out.T), "dense")
    return out


def dense_backward(dy, x, W, y, activation="identity", *, need_dx=True, backend="fortran"):
    """Gradients of :func:`dense` given the upstream gradient ``dy``.

    The activation's derivative is taken from the forward output ``y``
    (relu: ``y > 0``; tanh: ``1 - y**2``) and fused with the bias gradient.

    Parameters
    ----------
    dy : ndarray, float32, shape (n, out)
        d loss / d y.
    x : ndarray, float32, shape (n, in)
        The layer's forward input.
    W : ndarray, float32, shape (in, out)
    y : ndarray, float32, shape (n, out)
        The layer's forward output.
    activation : {"identity", "relu", "tanh"}
    need_dx : bool
        False skips the input gradient (a first layer does not need it).
    backend : {"fortran", "numpy"}

    Returns
    -------
    dx : ndarray, float32, shape (n, in), or None when ``need_dx`` is False
    dW : ndarray, float32, shape (in, out)
    db : ndarray, float32, shape (out,)

    Examples
    --------
    >>> dx, dW, db = pykd.dense_backward(dy, x, W, y, "relu")
    """
    check.backend(backend)
    act = check.activation(activation)
    dy = check.array("dy", dy, ndim=2)
    x = check.array("x", x, ndim=2)
    W = check.array("W", W, ndim=2)
    y = check.array("y", y, ndim=2)
    n, n_in = x.shape
    if W.shape[0] != n_in:
        raise ValueError(f"x has {check.plural(n_in, 'feature')} but W has shape {W.shape}")
    if dy.shape != (n, W.shape[1]):
        raise ValueError(f"dy must have shape {(n, W.shape[1])}, got {dy.shape}")
    check.same_shape("y", y, "dy", dy)
    if backend == "numpy":
        return ref.dense_backward(dy, x, W, y, activation, need_dx)
    f = _fortran()
    dW = np.empty(W.shape, _F32)
    db = np.empty(W.shape[1], _F32)
    if need_dx:
        dx = np.empty(x.shape, _F32)
        stat = f.dense_backward(dy.T, x.T, W.T, y.T, act, dW.T, db, dx.T)
    else:
        dx = None
        stat = f.dense_backward_nodx(dy.T, x.T, W.T, y.T, act, dW.T, db)
    _raise_for(stat, "dense_backward")
    return dx, dW, db


# ------------------------------------------------------------ softmax, losses

def _softmax(name, z, T, take_log, backend):
    check.backend(backend)
    z = check.array("z", z, ndim=2)
    T = check.real("T", T, low=0, low_open=True)
    if backend == "numpy":
        # Same rule as the Fortran kernel: NaN, +inf or an all -inf row is an
        # error; a -inf logit (a masked class) is fine.
        if not np.isfinite(z.max(axis=1)).all():
            raise ValueError("z contains NaN or inf")
        return ref.log_softmax(z, T) if take_log else ref.softmax(z, T)
    p = np.empty_like(z)
    _raise_for(_fortran().softmax(z.T, T, int(take_log), p.T), "z")
    return p


def softmax(z, T=1.0, *, backend="fortran"):
    """Row-wise ``softmax(z / T)``, numerically stable.

    The row maximum is subtracted before dividing by T, so logits of
    +-1e4 and temperatures from 0.05 to 100 neither overflow nor give NaN.

    Parameters
    ----------
    z : ndarray, float32, shape (n, classes)
    T : float > 0
        Temperature; larger T gives softer probabilities.
    backend : {"fortran", "numpy"}

    Returns
    -------
    p : ndarray, float32, shape (n, classes); rows sum to 1.

    Examples
    --------
    >>> pykd.softmax(np.array([[0., 0.]], np.float32))
    array([[0.5, 0.5]], dtype=float32)
    """
    return _softmax("softmax", z, T, False, backend)


def log_softmax(z, T=1.0, *, backend="fortran"):
    """Row-wise ``log(softmax(z / T))``, computed without forming the softmax.

    Parameters and shapes as for :func:`softmax`.

    Examples
    --------
    >>> pykd.log_softmax(np.array([[0., 0.]], np.float32))
    array([[-0.6931472, -0.6931472]], dtype=float32)
    """
    return _softmax("log_softmax", z, T, True, backend)


def _logits_and_labels(name, z, labels):
    z = check.array(name, z, ndim=2)
    return z, check.labels("labels", labels, z.shape[0], z.shape[1])


def cross_entropy(logits, labels, *, backend="fortran"):
    """Mean cross-entropy of ``softmax(logits)`` against integer labels.

    Parameters
    ----------
    logits : ndarray, float32, shape (n, classes)
    labels : ndarray of integers, shape (n,)
        Class indices in [0, classes). Non-int64 labels are converted to
        int64 (a copy of n integers).
    backend : {"fortran", "numpy"}

    Returns
    -------
    loss : numpy.float32
        Batch mean of ``-log softmax(logits)[i, labels[i]]``.
    dlogits : ndarray, float32, shape (n, classes)
        Gradient of the batch mean: ``(softmax(logits) - onehot) / n``.

    Examples
    --------
    >>> loss, g = pykd.cross_entropy(np.zeros((4, 10), np.float32), np.zeros(4, np.int64))
    >>> round(float(loss), 4)   # log(10)
    2.3026
    """
    check.backend(backend)
    logits, labels = _logits_and_labels("logits", logits, labels)
    if backend == "numpy":
        loss, grad = ref.cross_entropy(logits, labels)
        if not np.isfinite(loss):
            raise ValueError("logits contains NaN or inf")
        return loss, grad
    grad = np.empty_like(logits)
    loss, stat = _fortran().cross_entropy(logits.T, labels, grad.T)
    _raise_for(stat, "logits")
    return _F32(loss), grad


def kd_loss(student_logits, teacher_logits, labels, T=5.0, alpha=0.1, *, backend="fortran"):
    """Hinton distillation loss and its gradient, in one fused pass.

    ``loss = alpha * CE(softmax(s), y)
    + (1 - alpha) * T**2 * KL(softmax(t / T) || softmax(s / T))``

    Both terms are batch means (summed over classes, averaged over samples:
    PyTorch's ``reduction="batchmean"``). ``alpha`` weights the hard-label
    term, as in the seed PyTorch example; ``T**2`` keeps the soft term's
    gradient on the same scale as the hard one.

    Parameters
    ----------
    student_logits : ndarray, float32, shape (n, classes)
    teacher_logits : ndarray, float32, shape (n, classes)
    labels : ndarray of integers, shape (n,)
        Class indices in [0, classes) (non-int64 labels are converted).
    T : float > 0
        Distillation temperature.
    alpha : float in [0, 1]
        Weight of the hard-label cross-entropy.
    backend : {"fortran", "numpy"}

    Returns
    -------
    loss : numpy.float32
    dstudent_logits : ndarray, float32, shape (n, classes)
        ``alpha/n (softmax(s) - onehot) + (1-alpha) T/n (softmax(s/T) - softmax(t/T))``

    Examples
    --------
    >>> loss, ds = pykd.kd_loss(s, t, y, T=5.0, alpha=0.1)
    """
    check.backend(backend)
    s, labels = _logits_and_labels("student_logits", student_logits, labels)
    t = check.array("teacher_logits", teacher_logits, ndim=2)
    check.same_shape("teacher_logits", t, "student_logits", s)
    T = check.real("T", T, low=0, low_open=True)
    alpha = check.real("alpha", alpha, low=0, high=1)
    if backend == "numpy":
        loss, grad = ref.kd_loss(s, t, labels, T, alpha)
        if not np.isfinite(loss):
            raise ValueError("student_logits or teacher_logits contains NaN or inf")
        return loss, grad
    grad = np.empty_like(s)
    loss, stat = _fortran().kd_loss(s.T, t.T, labels, T, alpha, grad.T)
    _raise_for(stat, "student_logits or teacher_logits")
    return _F32(loss), grad


# ------------------------------------------------------------------ optimizers

def _flat_state(named, mask):
    """Check same-shaped float32 buffers (updated in place) and the mask;
    return flat views and the mask as int8 (a view, not a copy)."""
    (pname, params) = named[0]
    check.array(pname, params, writeable=True)
    flats = [params.reshape(-1)]
    for name, a in named[1:]:
        check.array(name, a, writeable=name != "grads")
        check.same_shape(name, a, pname, params)
        flats.append(a.reshape(-1))
    if mask is not None:
        check.array("mask", mask, dtype=np.bool_)
        check.same_shape("mask", mask, pname, params)
        mask = mask.reshape(-1).view(np.int8)
    return flats, mask


def sgd_step(params, grads, velocity, lr, momentum=0.9, weight_decay=0.0, mask=None, *,
             backend="fortran"):
    """One SGD-with-momentum step, in place (PyTorch convention, no dampening).

    ``g = grads + weight_decay * params; velocity = momentum * velocity + g;
    params -= lr * velocity``. Where ``mask`` is False, params and velocity
    are set to exactly zero (pruned weights stay pruned).

    Parameters
    ----------
    params, velocity : ndarray, float32, any shape, C-contiguous, writeable
        Updated in place. Usually a model's single flat buffer.
    grads : ndarray, float32, same shape
    lr : float >= 0
    momentum : float >= 0
    weight_decay : float >= 0
    mask : ndarray of bool, same shape, optional
        True = keep, False = pruned.
    backend : {"fortran", "numpy"}

    Examples
    --------
    >>> pykd.sgd_step(params, grads, velocity, lr=0.01)
    """
    check.backend(backend)
    (p, g, vel), m8 = _flat_state([("params", params), ("grads", grads), ("velocity", velocity)],
                                  mask)
    lr = check.real("lr", lr, low=0)
    momentum = check.real("momentum", momentum, low=0)
    weight_decay = check.real("weight_decay", weight_decay, low=0)
    if backend == "numpy":
        ref.sgd_step(p, g, vel, lr, momentum, weight_decay, None if mask is None else mask.reshape(-1))
        return
    f = _fortran()
    if m8 is None:
        stat = f.sgd_step(p, g, vel, lr, momentum, weight_decay)
    else:
        stat = f.sgd_step_masked(p, g, vel, lr, momentum, weight_decay, m8)
    _raise_for(stat, "sgd_step")


def adam_step(params, grads, m, v, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
              mask=None, *, weight_decay=0.0, backend="fortran"):
    """One Adam step with bias correction, in place (PyTorch convention).

    ``g = grads + weight_decay * params; m = beta1 m + (1-beta1) g;
    v = beta2 v + (1-beta2) g**2;
    params -= lr / (1-beta1**step) * m / (sqrt(v) / sqrt(1-beta2**step) + eps)``.
    Where ``mask`` is False, params, m and v are set to exactly zero.

    Parameters
    ----------
    params, m, v : ndarray, float32, any shape, C-contiguous, writeable
    grads : ndarray, float32, same shape
    step : int >= 1
        Number of this step, counting from 1 (for the bias correction).
    lr : float >= 0
    beta1, beta2 : float in [0, 1)
    eps : float > 0
    mask : ndarray of bool, same shape, optional
    weight_decay : float >= 0 (L2, added to the gradient)
    backend : {"fortran", "numpy"}

    Examples
    --------
    >>> for step in range(1, 101):
    ...     pykd.adam_step(params, grads, m, v, step)
    """
    check.backend(backend)
    (p, g, m_, v_), m8 = _flat_state(
        [("params", params), ("grads", grads), ("m", m), ("v", v)], mask)
    step = check.integer("step", step, low=1)
    lr = check.real("lr", lr, low=0)
    beta1 = check.real("beta1", beta1, low=0, high=1, high_open=True)
    beta2 = check.real("beta2", beta2, low=0, high=1, high_open=True)
    eps = check.real("eps", eps, low=0, low_open=True)
    weight_decay = check.real("weight_decay", weight_decay, low=0)
    if backend == "numpy":
        ref.adam_step(p, g, m_, v_, step, lr, beta1, beta2, eps, weight_decay,
                      None if mask is None else mask.reshape(-1))
        return
    f = _fortran()
    if m8 is None:
        stat = f.adam_step(p, g, m_, v_, step, lr, beta1, beta2, eps, weight_decay)
    else:
        stat = f.adam_step_masked(p, g, m_, v_, step, lr, beta1, beta2, eps, weight_decay, m8)
    _raise_for(stat, "adam_step")


# --------------------------------------------------------------------- pruning

def magnitude_mask(W, sparsity, *, backend="fortran"):
    """Mask pruning the smallest-magnitude weights (True = keep).

    ``k = round-half-even(sparsity * n)`` entries are pruned (as PyTorch's
    ``l1_unstructured`` with a fractional amount). The threshold is found by
    selection in O(n), not by sorting. Ties at the threshold are broken by
    position: the entry that comes first (flat C order, then list order) is
    pruned first, so the result is deterministic.

    Parameters
    ----------
    W : ndarray, float32, or a list/tuple of them
        Given a list, one global threshold ranks all tensors together (as
        PyTorch's ``global_unstructured``) and a list of masks is returned.
    sparsity : float in [0, 1]
        Fraction of the weights to prune.
    backend : {"fortran", "numpy"}

    Returns
    -------
    mask : ndarray of bool, shape of W (or a list of them)

    Examples
    --------
    >>> pykd.magnitude_mask(np.array([3., -1., 2., 0.5], np.float32), 0.5)
    array([ True, False,  True, False])
    """
    check.backend(backend)
    sparsity = check.real("sparsity", sparsity, low=0, high=1)
    if isinstance(W, (list, tuple)):
        if not W:
            raise ValueError("W is an empty list")
        arrays = [check.array(f"W[{i}]", a) for i, a in enumerate(W)]
        single = False
    else:
        arrays = [check.array("W", W)]
        single = True
    n = sum(a.size for a in arrays)
    k = ref.prune_count(n, sparsity)
    if backend == "numpy":
        for i, a in enumerate(arrays):
            if not np.isfinite(a).all():
                raise ValueError(f"{'W' if single else f'W[{i}]'} contains NaN or inf")
        masks = ref.magnitude_masks(arrays, k)
        return masks[0] if single else masks

    f = _fortran()
    masks = [np.empty(a.shape, np.bool_) for a in arrays]
    if single:
        _raise_for(f.magnitude_mask(W.reshape(-1), k, masks[0].reshape(-1).view(np.int8)), "W")
        return masks[0]
    # Global: one scratch buffer of magnitudes, one selection, then the masks.
    mags = np.empty(n, _F32)
    start = 0
    for i, a in enumerate(arrays):
        _raise_for(f.prune_magnitudes(a.reshape(-1), mags[start:start + a.size]), f"W[{i}]")
        start += a.size
    if k == 0:
        for mk in masks:
            mk[...] = True
        return masks
    tau, stat = f.prune_select(mags, k)
    _raise_for(stat, "magnitude_mask")
    ties = k - sum(int(f.prune_count_below(a.reshape(-1), tau)) for a in arrays)
    for a, mk in zip(arrays, masks):
        ties = f.prune_apply(a.reshape(-1), tau, ties, mk.reshape(-1).view(np.int8))
    return masks


# ---------------------------------------------------------------- quantization

def quantize_int8(W, per_channel=False, *, backend="fortran"):
    """Symmetric int8 quantization of a weight matrix.

    ``scale = max|W| / 127`` (1 for an all-zero group) and
    ``q = clip(rint(W * (1/scale)), -127, 127)``, rounding half to even with
    the float32 reciprocal (as PyTorch). The range is symmetric, [-127, 127],
    with zero point 0 (as TFLite's int8 weights), and
    ``|W - q * scale| <= scale / 2``.

    Parameters
    ----------
    W : ndarray, float32, shape (in, out)
    per_channel : bool
        One scale per output column instead of one per tensor.
    backend : {"fortran", "numpy"}

    Returns
    -------
    q : ndarray, int8, shape (in, out)
    scale : ndarray, float32, shape (1,) or (out,) when per_channel

    Examples
    --------
    >>> q, scale = pykd.quantize_int8(np.array([[1.0, -0.5]], np.float32))
    >>> q, scale
    (array([[127, -64]], dtype=int8), array([0.00787402], dtype=float32))
    """
    check.backend(backend)
    W = check.array("W", W, ndim=2)
    if backend == "numpy":
        if not np.isfinite(W).all():
            raise ValueError("W contains NaN or inf")
        return ref.quantize_int8(W, per_channel)
    q = np.empty(W.shape, np.int8)
    scale = np.empty(W.shape[1] if per_channel else 1, _F32)
    _raise_for(_fortran().quantize_weights(W.T, q.T, scale), "W")
    return q, scale


def _scale_arg(scale, n_out):
    scale = check.array("scale", scale, ndim=1)
    if scale.shape[0] not in (1, n_out):
        raise ValueError(f"scale must have shape (1,) or ({n_out},), got {scale.shape}")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("scale must be finite and > 0")
    return scale


def dequantize_int8(q, scale, *, backend="fortran"):
    """``q * scale``: float32 weights from :func:`quantize_int8` output.

    Parameters
    ----------
    q : ndarray, int8, shape (in, out)
    scale : ndarray, float32, shape (1,) or (out,)
    backend : {"fortran", "numpy"}

    Returns
    -------
    W : ndarray, float32, shape (in, out)
    """
    check.backend(backend)
    q = check.array("q", q, dtype=np.int8, ndim=2)
    scale = _scale_arg(scale, q.shape[1])
    if backend == "numpy":
        return ref.dequantize_int8(q, scale)
    W = np.empty(q.shape, _F32)
    _raise_for(_fortran().dequantize_weights(q.T, scale, W.T), "dequantize_int8")
    return W


def quantize_activations(x, *, backend="fortran"):
    """Dynamic per-sample int8 quantization of a batch.

    Each row gets its own scale (same rule as :func:`quantize_int8`), so a
    sample's result does not depend on the rest of its batch.

    Parameters
    ----------
    x : ndarray, float32, shape (n, in)

    Returns
    -------
    qx : ndarray, int8, shape (n, in)
    sx : ndarray, float32, shape (n,)
    """
    check.backend(backend)
    x = check.array("x", x, ndim=2)
    if backend == "numpy":
        if not np.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        return ref.quantize_activations(x)
    qx = np.empty(x.shape, np.int8)
    sx = np.empty(x.shape[0], _F32)
    _raise_for(_fortran().quantize_activations(x.T, qx.T, sx), "x")
    return qx, sx


_MAX_IN = 131071   # in * 128**2 must fit an int32 accumulator (q may hold -128)


def _int8_operands(x_name, x, x_dtype, q):
    x = check.array(x_name, x, dtype=x_dtype, ndim=2)
    q = check.array("q", q, dtype=np.int8, ndim=2)
    if q.shape[0] != x.shape[1]:
        raise ValueError(f"{x_name} has {check.plural(x.shape[1], 'feature')} but q has shape "
                         f"{q.shape}")
    if q.shape[0] > _MAX_IN:
        raise ValueError(f"q has {q.shape[0]} input features; at most {_MAX_IN} fit int32 sums")
    return x, q


def int8_gemm(qx, q, *, backend="fortran"):
    """Exact int8 x int8 -> int32 product ``qx @ q``.

    Parameters
    ----------
    qx : ndarray, int8, shape (n, in)
    q : ndarray, int8, shape (in, out), in <= 131071

    Returns
    -------
    acc : ndarray, int32, shape (n, out)
    """
    check.backend(backend)
    qx, q = _int8_operands("qx", qx, np.int8, q)
    if backend == "numpy":
        return ref.int8_gemm(qx, q)
    acc = np.empty((qx.shape[0], q.shape[1]), np.int32)
    # The int8 layer's kernel (CPU path chosen at run time, threads).
    _raise_for(_fortran().int8_gemm_fast(q.T, qx.T, acc.T), "qx")
    return acc


def int8_matmul(x, q, scale, b=None, *, backend="fortran"):
    """Dynamic-int8 dense product ``≈ x @ (q * scale) + b``.

    ``x`` is quantized per row inside (:func:`quantize_activations`), the
    product is exact in int32 (:func:`int8_gemm`) and rescaled to float32:
    ``y = acc * (sx[:, None] * scale) + b``.

    Parameters
    ----------
    x : ndarray, float32, shape (n, in)
    q : ndarray, int8, shape (in, out)
    scale : ndarray, float32, shape (1,) or (out,)
    b : ndarray, float32, shape (out,), optional

    Returns
    -------
    y : ndarray, float32, shape (n, out)

    Examples
    --------
    >>> q, scale = pykd.quantize_int8(W, per_channel=True)
    >>> y = pykd.int8_matmul(x, q, scale, b)      # close to x @ W + b
    """
    check.backend(backend)
    x, q = _int8_operands("x", x, np.float32, q)
    scale = _scale_arg(scale, q.shape[1])
    if b is not None:
        b = check.array("b", b, ndim=1)
        if b.shape != (q.shape[1],):
            raise ValueError(f"b must have shape ({q.shape[1]},), got {b.shape}")
    if backend == "numpy":
        if not np.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        return ref.int8_matmul(x, q, scale, b)
    if b is None:
        b = np.zeros(q.shape[1], _F32)
    y = np.empty((x.shape[0], q.shape[1]), _F32)
    # The int8 layer's quantization and kernel (same rounding and rescale).
    _raise_for(_fortran().int8_matmul_fast(x.T, q.T, scale, b, y.T), "x")
    return y
