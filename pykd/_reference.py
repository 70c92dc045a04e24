"""Pure-NumPy twins of the Fortran kernels.

Readable reference implementations with the same conventions as the
Fortran path (see pykd.kernels for the documentation of each function).
They assume already-validated arguments and serve as the test oracle and the
benchmark baseline.
"""
import numpy as np

ACTIVATIONS = ("identity", "relu", "tanh")
QMAX = 127


def _act(z, activation):
    if activation == "relu":
        return np.maximum(z, 0, out=z)
    if activation == "tanh":
        return np.tanh(z, out=z)
    return z


def dense(x, W, b, activation="identity"):
    y = x @ W
    y += b
    return _act(y, activation)


def dense_backward(dy, x, W, y, activation="identity", need_dx=True):
    if activation == "relu":
        dz = dy * (y > 0)
    elif activation == "tanh":
        dz = dy * (1 - y * y)
    else:
        dz = dy
    dW = x.T @ dz
    db = dz.sum(axis=0)
    dx = dz @ W.T if need_dx else None
    return dx, dW, db


def log_softmax(z, T=1.0):
    # Subtract the row maximum before dividing by T: (z - max) / T <= 0.
    s = (z - z.max(axis=1, keepdims=True)) / np.float32(T)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def softmax(z, T=1.0):
    e = np.exp((z - z.max(axis=1, keepdims=True)) / np.float32(T))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(logits, labels):
    n = logits.shape[0]
    rows = np.arange(n)
    logp = log_softmax(logits)
    loss = -logp[rows, labels].mean()
    grad = np.exp(logp)
    grad[rows, labels] -= 1
    grad /= n
    return np.float32(loss), grad.astype(np.float32, copy=False)


def kd_loss(student_logits, teacher_logits, labels, T=4.0, alpha=0.1):
    n = student_logits.shape[0]
    T = np.float32(T)
    alpha = np.float32(alpha)
    loss = np.float32(0)
    grad = np.zeros_like(student_logits)
    if alpha > 0:
        hard, dhard = cross_entropy(student_logits, labels)
        loss = loss + alpha * hard
        grad += alpha * dhard
    if alpha < 1:
        log_q = log_softmax(student_logits, T)
        log_p = log_softmax(teacher_logits, T)
        p = np.exp(log_p)
        kl = (p * (log_p - log_q)).sum() / n   # batch mean, not element mean
        loss = loss + (1 - alpha) * T * T * kl
        grad += ((1 - alpha) * T / n) * (np.exp(log_q) - p)
    return np.float32(loss), grad


def sgd_step(params, grads, velocity, lr, momentum=0.9, weight_decay=0.0, mask=None):
    g = grads + np.float32(weight_decay) * params
    velocity *= np.float32(momentum)
    velocity += g
    params -= np.float32(lr) * velocity
    if mask is not None:
        params[~mask] = 0
        velocity[~mask] = 0


def adam_step(params, grads, m, v, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.0, mask=None):
    g = grads + np.float32(weight_decay) * params
    m *= np.float32(beta1)
    m += np.float32(1 - beta1) * g
    v *= np.float32(beta2)
    v += np.float32(1 - beta2) * g * g
    step_size = np.float32(lr / (1 - beta1 ** step))
    inv_sqrt_bc2 = np.float32(1 / np.sqrt(1 - beta2 ** step))
    params -= step_size * m / (np.sqrt(v) * inv_sqrt_bc2 + np.float32(eps))
    if mask is not None:
        params[~mask] = 0
        m[~mask] = 0
        v[~mask] = 0


def prune_count(n, sparsity):
    """How many of n entries to prune: round-half-even(sparsity * n)."""
    return int(round(float(sparsity) * n))


def magnitude_masks(arrays, k):
    """Masks (True = keep) pruning the k smallest |w| over all arrays.

    Ties are broken by position: the stable sort prunes the earlier entry
    (flat C order, then list order) first.
    """
    flat = np.concatenate([np.abs(a).ravel() for a in arrays])
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    masks, start = [], 0
    for a in arrays:
        masks.append(keep[start:start + a.size].reshape(a.shape))
        start += a.size
    return masks


def _scale(amax):
    # At least the smallest normal float32, so 1/scale stays finite.
    tiny = np.finfo(np.float32).tiny
    return np.where(amax > 0, np.maximum(amax / np.float32(QMAX), tiny),
                    np.float32(1)).astype(np.float32)


def _quantize(x, scale):
    inv = np.float32(1) / scale
    return np.clip(np.rint(x * inv), -QMAX, QMAX).astype(np.int8)


def quantize_int8(W, per_channel=False):
    if per_channel:
        scale = _scale(np.abs(W).max(axis=0))
    else:
        scale = _scale(np.abs(W).max()).reshape(1)
    return _quantize(W, scale), scale


def dequantize_int8(q, scale):
    return q.astype(np.float32) * scale


def quantize_activations(x):
    sx = _scale(np.abs(x).max(axis=1))
    return _quantize(x, sx[:, None]), sx


def int8_gemm(qx, q):
    return qx.astype(np.int32) @ q.astype(np.int32)


def int8_matmul(x, q, scale, b=None):
    qx, sx = quantize_activations(x)
    y = int8_gemm(qx, q).astype(np.float32) * (scale[None, :] * sx[:, None])
    if b is not None:
        y += b
    return y
