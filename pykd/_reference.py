"""Pure-NumPy twins of the Fortran kernels.

Readable reference implementations with the same conventions as the
Fortran path (see pykd.kernels for the documentation of each function).
They assume already-validated arguments and serve as the test oracle and the
benchmark baseline.
"""
import numpy as np

from . import _codes

#: Activations the training kernels accept (codes from pykd._codes).
TRAINABLE_ACTIVATIONS = _codes.TRAINABLE_ACTIVATIONS
QMAX = 127
_F32 = np.float32
_SQRT1_2 = np.float32(1 / np.sqrt(2))


def _act(z, activation):
    """Apply ``activation`` to the float32 array ``z`` in place; returns z.

    relu keeps NaN (np.maximum propagates it); sigmoid is ``1 / (1 + exp(-z))``
    (exp overflows to inf for very negative z, giving 0); gelu is the exact
    ``z (1 + erf(z / sqrt 2)) / 2`` (PyTorch's default), silu ``z sigmoid(z)``.
    """
    if activation == "identity":
        return z
    if activation == "relu":
        return np.maximum(z, 0, out=z)
    if activation == "tanh":
        return np.tanh(z, out=z)
    with np.errstate(over="ignore"):
        if activation == "sigmoid":
            np.negative(z, out=z)
            np.exp(z, out=z)
            z += _F32(1)
            return np.divide(_F32(1), z, out=z)
        if activation == "gelu":
            from scipy.special import erf  # imported on first use: scipy.special takes ~0.5 s
            e = erf((z * _SQRT1_2).astype(_F32, copy=False)).astype(_F32, copy=False)
            e += _F32(1)
            e *= z
            z[...] = e * _F32(0.5)
            return z
        if activation == "silu":
            s = np.exp(-z)
            s += _F32(1)
            np.divide(_F32(1), s, out=s)
            z *= s
            return z
    raise ValueError(f"activation must be one of {list(_codes.ACTIVATIONS)}, got {activation!r}")


def dense(x, W, b, activation="identity"):
    y = x @ W
    y += b
    return _act(y, activation)


def _act_grad(dy, y, z, activation):
    """``dy * act'(z)`` for ``y = act(z)`` in float32: from y for relu, tanh and
    sigmoid; gelu (exact) and silu from z."""
    if activation == "relu":
        return dy * (y > 0)
    if activation == "tanh":
        return dy * (1 - y * y)
    if activation == "sigmoid":
        return dy * (y * (1 - y))
    if activation == "gelu":
        from scipy.special import erf
        cdf = _F32(0.5) * (1 + erf(z * _SQRT1_2).astype(_F32, copy=False))
        pdf = np.exp(_F32(-0.5) * z * z) * _F32(1 / np.sqrt(2 * np.pi))
        return dy * (cdf + z * pdf)
    if activation == "silu":
        with np.errstate(over="ignore"):
            s = _F32(1) / (_F32(1) + np.exp(-z))
        return dy * (s * (1 + z * (1 - s)))
    return dy


def dense_backward(dy, x, W, y, activation="identity", need_dx=True, b=None):
    """Gradients of ``y = act(x W + b)``; gelu and silu need ``b`` (their
    derivative reads the pre-activation ``x W + b``, recomputed here)."""
    z = None
    if activation in ("gelu", "silu"):
        z = x @ W
        z += b
    dz = _act_grad(dy, y, z, activation)
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


def kd_loss(student_logits, teacher_logits, labels, T=5.0, alpha=0.1):
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


# --- the layer kinds (docs/model.md); arguments already validated ---------

def int8_packed(q):
    """The int8 kernel's packed copy of ``q`` (n_in, n_out) int8, as int32
    words (fortran/kernels/pykd_int8_simd.c, docs/model.md): 16 G column
    sums ``128 * q.sum(axis=0)`` (0 past n_out), then for each group g of 16
    outputs and each quad k of 4 inputs the 64 bytes ``q[4k + t, 16g + jj]``
    at byte ``4 jj + t`` (0 past n_in or n_out); G = ceil(n_out / 16)."""
    n_in, n_out = q.shape
    G, NQ = -(-n_out // 16), -(-n_in // 4)
    qp = np.zeros((4 * NQ, 16 * G), np.int8)
    qp[:n_in, :n_out] = q
    csum = np.zeros(16 * G, np.int32)
    csum[:n_out] = 128 * q.sum(axis=0, dtype=np.int64)
    w = qp.reshape(NQ, 4, G, 16).transpose(2, 0, 3, 1)       # (g, k, jj, t)
    return np.concatenate([csum, np.ascontiguousarray(w).reshape(-1).view("<i4")]).astype(np.int32)


#: sparse_csr's planes (docs/model.md): outputs per block, inputs per chunk,
#: blocks per group (fortran/kernels/pykd_sparse_kernel.f90 PLANE_*).
PLANE_LANES, PLANE_CHUNK, PLANE_GROUP = 16, 32, 13
#: The fewest entries of a layer that keeps planes (planes_kept).
PLANE_MIN_NNZ = 128


def plane_cells(n_in, n_out):
    """Cells of the planes: ceil(n_in / 32) chunks times ceil(n_out / 16) blocks."""
    return -(-n_in // PLANE_CHUNK) * -(-n_out // PLANE_LANES)


def sparse_planes(indptr, indices, values, n_in, n_out, slots=False):
    """sparse_csr's planes of a valid CSR pattern (docs/model.md):
    ``(n_planes, counts, idx, val)``, counts uint8 (cells,), idx int8
    (n_planes, 16) input offsets in the chunk, val float32 (n_planes, 16);
    ``n_planes = 0`` and empty arrays when the layer keeps none (fewer than
    PLANE_MIN_NNZ entries, fewer than 2 per plane on average, or more than
    4 cells per entry). With ``slots``, also each entry's place in ``val``
    (flat, int64 (nnz,); None without planes)."""
    nnz = int(indices.shape[0])
    nc, nb = -(-n_in // PLANE_CHUNK), -(-n_out // PLANE_LANES)
    none = (0, np.zeros(0, np.uint8), np.zeros((0, PLANE_LANES), np.int8),
            np.zeros((0, PLANE_LANES), _F32))
    if slots:
        none = none + (None,)
    if nnz < PLANE_MIN_NNZ:
        return none
    rows = np.repeat(np.arange(n_in, dtype=np.int64), np.diff(indptr))
    j = indices.astype(np.int64)
    c, b = rows // PLANE_CHUNK, j // PLANE_LANES
    # rank: the entry's place among the entries of its (chunk, output), inputs ascending
    key = c * n_out + j
    order = np.lexsort((rows, key))
    ks = key[order]
    new = np.r_[True, ks[1:] != ks[:-1]]
    pos = np.arange(nnz)
    rank = np.empty(nnz, np.int64)
    rank[order] = pos - np.maximum.accumulate(np.where(new, pos, 0))
    g0 = b // PLANE_GROUP * PLANE_GROUP
    cell = g0 * nc + c * np.minimum(PLANE_GROUP, nb - g0) + (b - g0)
    counts = np.zeros(nc * nb, np.int64)
    np.maximum.at(counts, cell, rank + 1)
    n_planes = int(counts.sum())
    if not (0 < 2 * n_planes <= nnz and nc * nb <= 4 * nnz):
        return none
    t = (np.cumsum(counts) - counts)[cell] + rank
    idx = np.zeros((n_planes, PLANE_LANES), np.int8)
    val = np.zeros((n_planes, PLANE_LANES), _F32)
    idx[t, j % PLANE_LANES] = rows - PLANE_CHUNK * c
    val[t, j % PLANE_LANES] = values
    if slots:
        return n_planes, counts.astype(np.uint8), idx, val, t * PLANE_LANES + j % PLANE_LANES
    return n_planes, counts.astype(np.uint8), idx, val


def dense_int8(x, q, scale, b, activation="identity", x_scale=None):
    """int8 layer: ``qx = clamp(rint(x * (1/sx)), -127, 127)`` with one
    ``sx = max|x_s| / 127`` per sample (dynamic, ``x_scale`` None) or the
    static ``x_scale``; then ``act(float(qx @ q) * (scale * sx) + b)``:
    exact int32 sums, one float32 multiply by the float32 product
    ``scale * sx``, then the add of ``b`` (no fused multiply-add).

    Raises ValueError if x has a NaN or inf (the ``NONFINITE`` status)."""
    if not np.isfinite(x).all():
        raise ValueError("the input of an int8 layer contains NaN or inf")
    if x_scale is None:
        sx = _scale(np.abs(x).max(axis=1))
    else:
        sx = np.full(x.shape[0], x_scale, _F32)
    qx = _quantize(x, sx[:, None])
    acc = qx.astype(np.int32) @ q.astype(np.int32)
    y = acc.astype(_F32) * (scale[None, :] * sx[:, None])
    y += b
    return _act(y, activation)


def sparse_csr(x, indptr, indices, values, b, n_out, activation="identity"):
    """``act(x @ W + b)`` with W (n_in, n_out) in CSR rows (rows = inputs)."""
    from scipy.sparse import csr_array
    W = csr_array((values, indices, indptr), shape=(indptr.shape[0] - 1, n_out))
    y = np.asarray((W.T @ x.T).T, dtype=_F32)  # (x @ W) without densifying W
    y = np.ascontiguousarray(y)
    y += b
    return _act(y, activation)


def low_rank(x, U, V, b, activation="identity"):
    """``act((x @ U) @ V + b)``: two thin products."""
    y = (x @ U) @ V
    y += b
    return _act(y, activation)


def codebook(x, centroids, codes, b, activation="identity"):
    """``act(x @ centroids[codes] + b)``, codes (n_in, n_out) unpacked."""
    return dense(x, centroids[codes], b, activation)
