"""One-shot compression of a trained model, each returning a new :class:`pykd.Model`.

* :func:`quantize_model`: int8 weights (one scale per output channel),
  activations quantized per sample (dynamic) or with one calibrated scale
  per layer input (static).
* :func:`sparsify`: the existing zeros are not stored (CSR), where that
  makes the file smaller.
* :func:`low_rank`: truncated SVD ``W ~ U @ V``, where that stores fewer numbers.
* :func:`cluster`: k-means weight sharing (a codebook of ``2**bits`` values
  per layer; only the non-zeros of a sparse layer).

None of them modifies its input (an :class:`pykd.MLP` or a :class:`pykd.Model`).
``quantize_model(qat=True)``, ``low_rank`` and ``cluster`` take
``fine_tune=pykd.FineTune(...)`` and fine-tune the result
(:mod:`pykd.compress.finetune`).
"""
from __future__ import annotations

import warnings

import numpy as np

from .. import _codes
from .. import _validate as check
from .. import kernels
from ..layers import (Codebook, Dense, DenseInt8, LowRank, SparseCodebook, SparseCSR)

__all__ = ["cluster", "low_rank", "quantize_model", "sparsify"]

_F32 = np.float32
QMAX = 127


def _as_model(model, what):
    from ..models import MLP, Model
    if isinstance(model, MLP):
        return model.to_model()
    if isinstance(model, Model):
        return model
    raise TypeError(f"{what}: model must be a pykd.MLP or pykd.Model, got {type(model).__name__}")


def _rebuild(model, layers, step):
    """A new Model with ``layers`` and the model's normalisation; the step is
    appended to the metadata's ``compression`` list."""
    from ..models import Model
    meta = dict(model.metadata)
    if meta.get("model") == "MLP":
        meta["model"] = "Model"           # what the file now holds (training history kept)
    meta["compression"] = list(meta.get("compression", [])) + [step]
    return Model(layers, norm=model.norm, out_norm=model.out_norm, metadata=meta,
                 backend=model.backend)


def _input_scale(amax):
    """``max|x| / 127`` in float32, at least the smallest normal float32
    (1 for an all-zero input), as the dynamic per-sample scale."""
    amax = _F32(amax)
    if amax > 0:
        return max(amax / _F32(QMAX), np.finfo(_F32).tiny)
    return _F32(1)


def _fine_tune_arg(fine_tune, what):
    from .spec import FineTune
    if fine_tune is not None and not isinstance(fine_tune, FineTune):
        raise TypeError(f"{what}: fine_tune must be a pykd.FineTune or None, got "
                        f"{type(fine_tune).__name__}")
    return fine_tune


def _bool_arg(name, v):
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {v!r}")
    return bool(v)


CALIBRATION_METHODS = ("minmax", "percentile")
DEFAULT_PERCENTILE = 99.99


def quantize_model(model, activations="dynamic", calibration=None, *, method="minmax",
                   percentile=None, qat=False, fine_tune=None, batch_size=1024):
    """int8 weights and activations for every layer, optionally after
    quantization-aware fine-tuning.

    Each layer's (dense, dequantized) weight ``W`` is quantized per output
    channel with :func:`pykd.quantize_int8` (``scale = max|W[:, j]| / 127``);
    an int8 layer keeps its ``q`` and ``scale`` (without QAT).

    Parameters
    ----------
    model : MLP or Model
    activations : {"dynamic", "static"}
        "dynamic": each sample's layer input is quantized with its own
        ``max|x| / 127``. "static": one scale per layer from that layer's
        input over the ``calibration`` rows, computed with the unquantized
        model: ``max|x| / 127`` (``method="minmax"``) or the ``percentile``
        of ``|x|`` over all its entries, divided by 127
        (``method="percentile"``).
    calibration : ndarray (n, n_features), needed for "static"
        Raw inputs (the model's normalisation is applied).
    method : {"minmax", "percentile"}
        Static calibration only.
    percentile : float in (0, 100], optional
        With ``method="percentile"`` only; default 99.99.
    qat : bool
        Quantization-aware fine-tuning (needs ``fine_tune``): float shadow
        weights start from the model's weights, every step's forward pass is
        the int8 kernel with ``quantize_int8(shadow)`` (the conversion's own
        quantization) and the static scales calibrated first; the backward
        pass is a straight-through estimator. The returned model is the
        last step's int8 model, so its logits are the fine-tuned ones, bit
        for bit.
    fine_tune : pykd.FineTune, with ``qat=True`` only
        Post-training quantization has no trainable floats left, so
        ``fine_tune`` without ``qat`` is an error.
    batch_size : int
        Rows per forward call during calibration.

    Returns
    -------
    Model
        ``metadata["compression"][-1]`` is ``{"quantize": activations, ...}``
        with, after QAT, ``fine_tune`` (the settings) and ``history``.
    """
    m = _as_model(model, "quantize_model")
    if activations not in _codes.QUANT_MODES:
        raise ValueError(f"activations must be one of {list(_codes.QUANT_MODES)}, "
                         f"got {activations!r}")
    qat = _bool_arg("qat", qat)
    fine_tune = _fine_tune_arg(fine_tune, "quantize_model")
    if qat and fine_tune is None:
        raise ValueError("qat=True needs fine_tune=pykd.FineTune(...) (the training set "
                         "and schedule of quantization-aware fine-tuning)")
    if fine_tune is not None and not qat:
        raise ValueError("fine_tune needs qat=True: post-training quantization has no "
                         "trainable floats left (pass qat=True for quantization-aware "
                         "fine-tuning, or fine_tune=None)")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {list(CALIBRATION_METHODS)}, got {method!r}")
    if percentile is not None:
        if method != "percentile":
            raise ValueError("percentile is only used with method='percentile'")
        percentile = check.real("percentile", percentile, 0, 100, low_open=True)
    elif method == "percentile":
        percentile = DEFAULT_PERCENTILE
    batch_size = check.integer("batch_size", batch_size, low=1)
    x_scales = [None] * m.n_layers
    if activations == "static":
        if calibration is None:
            raise ValueError("activations='static' needs calibration inputs (calibration=X)")
        if not isinstance(calibration, np.ndarray) or calibration.ndim != 2 \
                or calibration.shape[1] != m.n_features or calibration.shape[0] == 0:
            raise ValueError(f"calibration must be a non-empty array of shape "
                             f"(n, {m.n_features})")
        if calibration.dtype.kind not in "iuf" or not np.isfinite(calibration).all():
            raise ValueError("calibration must be numeric and finite")
        x_scales = _calibrate(m, calibration, batch_size, percentile)
    else:
        if calibration is not None:
            raise ValueError("calibration is only used with activations='static'")
        if method != "minmax":
            raise ValueError("method is only used with activations='static' (calibration)")
    layers, shadow = [], []
    for layer, xs in zip(m.layers, x_scales):
        if isinstance(layer, DenseInt8):
            q, scale = layer.q.copy(), layer.scale.copy()
            shadow.append(None)
        else:
            W = np.ascontiguousarray(layer.to_dense())
            q, scale = kernels.quantize_int8(W, per_channel=True)
            shadow.append(W)
        layers.append(DenseInt8(q, scale, layer.b.copy(), layer.activation, x_scale=xs))
    step = {"quantize": activations}
    if activations == "static":
        step["calibration"] = {"method": method, "rows": int(calibration.shape[0])}
        if method == "percentile":
            step["calibration"]["percentile"] = percentile
    if qat:
        step["qat"] = True
    out = _rebuild(m, layers, step)
    if qat:
        from .finetune import train
        out = train(out, fine_tune, shadow=shadow, merge=True)[0]
    return out


def _calibrate(m, X, batch_size, percentile=None):
    """Per layer, the static input scale from max|input| (or the percentile
    of |input| over all entries) over the rows of X."""
    from threadpoolctl import threadpool_limits

    amax = np.zeros(m.n_layers, np.float32)
    absval = [[] for _ in range(m.n_layers)]
    # NumPy's BLAS on one thread: its threaded sgemm can round a product
    # differently (seen on AMD Zen 4), and the scales, so every int8 output,
    # would then depend on the thread count.
    with threadpool_limits(limits=1, user_api="blas"):
        for s in range(0, X.shape[0], batch_size):
            h = np.ascontiguousarray(X[s:s + batch_size], np.float32)
            if m.norm is not None:
                h = (h - m.norm[0]).astype(np.float32, copy=False) / m.norm[1]
            for k, layer in enumerate(m.layers):
                if percentile is None:
                    amax[k] = max(amax[k], np.abs(h).max())
                else:
                    absval[k].append(np.abs(h).reshape(-1))
                if k + 1 < m.n_layers:
                    h = layer.forward_numpy(np.ascontiguousarray(h, np.float32))
    if percentile is not None:
        for k in range(m.n_layers):
            amax[k] = np.float32(np.percentile(np.concatenate(absval[k]), percentile))
    return [_input_scale(a) for a in amax]


def sparsify(model):
    """Store each dense layer as :class:`pykd.layers.SparseCSR` (its zeros
    not stored) where that makes its file record smaller; other layers are
    kept. The weights are unchanged (prune first, e.g. with
    :func:`pykd.magnitude_mask`).

    Returns
    -------
    Model
    """
    m = _as_model(model, "sparsify")
    layers = []
    for layer in m.layers:
        if isinstance(layer, Dense):
            sparse = SparseCSR.from_dense(layer.W, layer.b.copy(), layer.activation)
            if sparse.record_bytes() < layer.record_bytes():
                layers.append(sparse)
                continue
        layers.append(layer.copy())
    return _rebuild(m, layers, {"sparsify": True})


def low_rank(model, rank=None, energy=None, *, fine_tune=None):
    """Factor each dense layer ``W ~ U @ V`` by truncated SVD
    (``scipy.linalg.svd``), where the factors store fewer numbers than W
    (``r (n_in + n_out) < n_in n_out``); other layers are kept. Then,
    optionally, fine-tune the factors and biases (and the kept layers).

    Parameters
    ----------
    model : MLP or Model
    rank : int >= 1, optional
        Keep ``min(rank, n_in, n_out)`` singular values.
    energy : float in (0, 1], optional
        Keep the fewest singular values whose squares sum to at least this
        fraction of the total. Give exactly one of ``rank`` and ``energy``.
    fine_tune : pykd.FineTune, optional
        Fine-tune ``U``, ``V`` and ``b`` of every factored layer (and the
        parameters of the other layers, see :mod:`pykd.compress.finetune`).

    Returns
    -------
    Model
        ``U = U_r sqrt(s_r)`` and ``V = sqrt(s_r) Vt_r`` (float32) before
        fine-tuning; with ``fine_tune`` the metadata's last compression step
        holds its ``history``.
    """
    from scipy.linalg import svd
    m = _as_model(model, "low_rank")
    fine_tune = _fine_tune_arg(fine_tune, "low_rank")
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    if rank is not None:
        rank = check.integer("rank", rank, low=1)
    else:
        energy = check.real("energy", energy, 0, 1, low_open=True)
    layers = []
    for layer in m.layers:
        if not isinstance(layer, Dense):
            layers.append(layer.copy())
            continue
        n_in, n_out = layer.n_in, layer.n_out
        U, s, Vt = svd(layer.W.astype(np.float64), full_matrices=False, lapack_driver="gesdd")
        r = min(rank, s.size) if rank is not None else _energy_rank(s, energy)
        if r * (n_in + n_out) >= n_in * n_out:
            layers.append(layer.copy())
            continue
        root = np.sqrt(s[:r])
        layers.append(LowRank(np.ascontiguousarray(U[:, :r] * root, _F32),
                              np.ascontiguousarray(root[:, None] * Vt[:r], _F32),
                              layer.b.copy(), layer.activation))
    step = {"low_rank": {"rank": rank} if rank is not None else {"energy": energy}}
    return _maybe_fine_tune(_rebuild(m, layers, step), fine_tune)


def _maybe_fine_tune(model, fine_tune):
    if fine_tune is None:
        return model
    from .finetune import train
    return train(model, fine_tune, merge=True)[0]


def _energy_rank(s, energy):
    """Fewest singular values whose squares reach ``energy`` of the total."""
    sq = s.astype(np.float64) ** 2
    total = sq.sum()
    if total == 0:
        return 1
    frac = np.cumsum(sq) / total
    # A relative slack of 1e-12 so that energy = 1 is reached despite rounding.
    return int(min(np.searchsorted(frac, energy - 1e-12) + 1, s.size))


def cluster(model, bits, seed=0, *, fine_tune=None):
    """k-means weight sharing: each layer's weights replaced by the nearest
    of ``k = 2**bits`` centroids (1-D k-means, ``scipy.cluster.vq.kmeans2``
    with k-means++ seeding from ``np.random.default_rng([seed, layer])``:
    the same seed gives the same model).

    A sparse layer (:class:`~pykd.layers.SparseCSR` or
    :class:`~pykd.layers.SparseCodebook`) becomes a
    :class:`~pykd.layers.SparseCodebook` clustering only its non-zeros;
    every other layer becomes a :class:`~pykd.layers.Codebook` of its
    effective (dense, dequantized) ``W``. A layer with at most ``k``
    distinct weights keeps them exactly.

    Parameters
    ----------
    model : MLP or Model
    bits : int in 1..8
    seed : int >= 0
    fine_tune : pykd.FineTune, optional
        Then fine-tune the centroids and biases: a centroid's gradient is
        the sum of its weights' gradients (Deep Compression); codes and
        sparsity pattern stay fixed.

    Returns
    -------
    Model
    """
    m = _as_model(model, "cluster")
    fine_tune = _fine_tune_arg(fine_tune, "cluster")
    bits = check.integer("bits", bits, low=1, high=8)
    seed = check.integer("seed", seed, low=0)
    k = 2**bits
    layers = []
    for li, layer in enumerate(m.layers):
        rng = np.random.default_rng([seed, li])
        if isinstance(layer, (SparseCSR, SparseCodebook)):
            values = (layer.values if isinstance(layer, SparseCSR)
                      else layer.centroids[layer.codes])
            centroids, codes = _kmeans_1d(values, k, rng)
            layers.append(SparseCodebook(layer.indptr.copy(), layer.indices.copy(), codes,
                                         centroids, layer.b.copy(), layer.activation))
        else:
            W = layer.to_dense()
            centroids, codes = _kmeans_1d(W.reshape(-1), k, rng)
            layers.append(Codebook(centroids, codes.reshape(W.shape), layer.b.copy(),
                                   layer.activation))
    return _maybe_fine_tune(_rebuild(m, layers, {"cluster": {"bits": bits, "seed": seed}}),
                            fine_tune)


def _kmeans_1d(values, k, rng):
    """(centroids float32 (<= k,), codes uint8) of 1-D k-means on values."""
    from scipy.cluster.vq import kmeans2
    if values.size == 0:
        return np.zeros(1, _F32), np.zeros(0, np.uint8)
    uniq, inverse = np.unique(values, return_inverse=True)
    if uniq.size <= k:
        return uniq.astype(_F32), inverse.astype(np.uint8).reshape(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # an empty cluster keeps its centroid
        cents, _ = kmeans2(values.astype(np.float64), k, iter=20, minit="++", rng=rng)
    cents = np.unique(cents.astype(_F32))            # sorted; merges coincident centroids
    # Assign each weight to its nearest float32 centroid (ties to the lower).
    mid = (cents[:-1].astype(np.float64) + cents[1:]) / 2
    codes = np.searchsorted(mid, values.astype(np.float64), side="left")
    used = np.unique(codes)
    if used.size < cents.size:                       # drop centroids no weight uses
        remap = np.full(cents.size, 0, np.int64)
        remap[used] = np.arange(used.size)
        cents, codes = cents[used], remap[codes]
    return np.ascontiguousarray(cents, _F32), codes.astype(np.uint8)
