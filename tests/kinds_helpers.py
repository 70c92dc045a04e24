"""Random layers of every kind, and float64 references, for the layer-kind tests."""
import math
import os
import subprocess
import sys

import numpy as np

from pykd import _codes
from pykd.layers import (Codebook, Dense, DenseInt8, LowRank, SparseCodebook, SparseCSR)

KINDS = tuple(_codes.KINDS)
ACTIVATIONS = tuple(_codes.ACTIVATIONS)
F32 = np.float32


def sparse_W(rng, n_in, n_out, density=0.3):
    W = rng.standard_normal((n_in, n_out)).astype(F32)
    W[rng.random((n_in, n_out)) > density] = 0
    W[0] = 0                                   # an empty row
    return W


def make_layer(kind, n_in, n_out, act, rng, static=False):
    b = rng.standard_normal(n_out).astype(F32) * F32(0.1)
    if kind == "dense":
        return Dense((rng.standard_normal((n_in, n_out)) / math.sqrt(n_in)).astype(F32), b, act)
    if kind == "dense_int8":
        q = rng.integers(-127, 128, (n_in, n_out)).astype(np.int8)
        scale = (rng.random(n_out) * 0.02 / math.sqrt(n_in)).astype(F32)
        return DenseInt8(q, scale, b, act, x_scale=0.02 if static else None)
    if kind == "sparse_csr":
        return SparseCSR.from_dense(sparse_W(rng, n_in, n_out) / F32(math.sqrt(n_in)), b, act)
    if kind == "low_rank":
        r = max(1, min(n_in, n_out) // 3)
        return LowRank((rng.standard_normal((n_in, r)) / math.sqrt(n_in)).astype(F32),
                       (rng.standard_normal((r, n_out)) / math.sqrt(r)).astype(F32), b, act)
    if kind == "codebook":
        n_codes = 11                            # 4 bits per index
        cents = (rng.standard_normal(n_codes) / math.sqrt(n_in)).astype(F32)
        codes = rng.integers(0, n_codes, (n_in, n_out)).astype(np.uint8)
        return Codebook(cents, codes, b, act)
    if kind == "sparse_codebook":
        s = SparseCSR.from_dense(sparse_W(rng, n_in, n_out), b, act)
        cents = (rng.standard_normal(5) / math.sqrt(n_in)).astype(F32)
        codes = rng.integers(0, 5, s.nnz).astype(np.uint8)
        return SparseCodebook(s.indptr, s.indices, codes, cents, b, act)
    raise ValueError(kind)


def act64(z, act):
    """Activations in float64, written from their definitions."""
    if act == "identity":
        return z
    if act == "relu":
        return np.where(z < 0, 0.0, z)
    if act == "tanh":
        return np.tanh(z)
    if act == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if act == "gelu":
        return np.array([v * (1 + math.erf(v / math.sqrt(2))) / 2 for v in z.ravel()]
                        ).reshape(z.shape)
    if act == "silu":
        return z / (1 + np.exp(-z))
    raise ValueError(act)


def dense64(layer):
    """The layer's W in float64, from its own arrays (not to_dense)."""
    W = np.zeros((layer.n_in, layer.n_out))
    if layer.kind == "dense":
        return layer.W.astype(np.float64)
    if layer.kind == "dense_int8":
        return layer.q.astype(np.float64) * layer.scale.astype(np.float64)
    if layer.kind == "low_rank":
        return layer.U.astype(np.float64) @ layer.V.astype(np.float64)
    if layer.kind in ("sparse_csr", "sparse_codebook"):
        vals = layer.values if layer.kind == "sparse_csr" else layer.centroids[layer.codes]
        for i in range(layer.n_in):
            for k in range(layer.indptr[i], layer.indptr[i + 1]):
                W[i, layer.indices[k]] = vals[k]
        return W
    if layer.kind == "codebook":
        # Decode the packed stream bit by bit (LSB first), as docs/format.md says.
        bits = layer.bits
        packed = layer.packed
        for e in range(layer.n_in * layer.n_out):
            c = 0
            for m in range(bits):
                t = e * bits + m
                c |= ((int(packed[t // 8]) >> (t % 8)) & 1) << m
            W[e // layer.n_out, e % layer.n_out] = layer.centroids[c]
        return W
    raise ValueError(layer.kind)


def int8_reference(x, layer):
    """The int8 layer by hand: float32 scales and rounding, int64 sums."""
    out = np.empty((x.shape[0], layer.n_out), F32)
    for s in range(x.shape[0]):
        if layer.x_scale is None:
            amax = F32(np.abs(x[s]).max())
            sx = max(amax / F32(127), np.finfo(F32).tiny) if amax > 0 else F32(1)
        else:
            sx = layer.x_scale
        qx = np.clip(np.rint(x[s] * (F32(1) / F32(sx))), -127, 127).astype(np.int64)
        acc = qx @ layer.q.astype(np.int64)
        out[s] = acc.astype(F32) * (layer.scale * F32(sx)) + layer.b
    return out


def assert_close(a, b, rel=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.abs(a - b).max() if a.size else 0.0
    assert err <= rel * max(1.0, np.abs(b).max()), f"max error {err}, scale {np.abs(b).max()}"


def run_on_path(script, var, path, tmp_path, threads=None, timeout=600):
    """Run the test file ``script`` as a fresh process with ``var=path`` (a
    PYKD_*_PATH variable; libraries read it once per process) and, if given,
    OMP_NUM_THREADS=threads. Its ``__main__`` saves ``out.npz`` into the
    folder it is given; returns those arrays."""
    d = tmp_path / (path + ("" if threads is None else f"-{threads}threads"))
    d.mkdir()
    env = dict(os.environ, **{var: path})
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run([sys.executable, script, str(d)], env=env, check=True, timeout=timeout)
    return dict(np.load(d / "out.npz"))
