"""Bad inputs raise the documented exception, naming the argument.

Every case of the table runs on both backends (the checks happen before the
backend is chosen, and the NaN/inf checks exist on both). Calls into the raw
f2py extension that could crash the interpreter run in a subprocess, so a
segfault fails one test instead of killing pytest.
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import inspect

import pytest

import pykd
import pykd.kernels

KERNELS = {n for n, o in vars(pykd.kernels).items()
           if inspect.isfunction(o) and not n.startswith("_") and o.__module__ == "pykd.kernels"}

pytestmark = pytest.mark.fortran

F32 = np.float32
BACKENDS = ["fortran", "numpy"]


def a32(*shape, fill=1.0):
    return np.full(shape, fill, F32)


def readonly(a):
    a.flags.writeable = False
    return a


def with_nan(a, value=np.nan, where=(0, 0)):
    a = a.copy()
    a[where] = value
    return a


def z23():
    return np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], F32)


LBL = np.array([0, 2])


# Each case: id -> (callable taking backend, exception type, regex the message must match).
def dense_args(**over):
    args = dict(x=a32(2, 3), W=a32(3, 4), b=a32(4))
    args.update(over)
    return args


def call_dense(**over):
    def run(be):
        a = dense_args(**over)
        extra = {k: v for k, v in a.items() if k not in ("x", "W", "b")}
        return pykd.dense(a["x"], a["W"], a["b"], backend=be, **extra)
    return run


def call_dense_backward(**over):
    def run(be):
        a = dict(dy=a32(2, 4), x=a32(2, 3), W=a32(3, 4), y=a32(2, 4), activation="relu")
        a.update(over)
        return pykd.dense_backward(a["dy"], a["x"], a["W"], a["y"], a["activation"], backend=be)
    return run


def call_softmax(z=None, T=1.0, log=False):
    def run(be):
        fn = pykd.log_softmax if log else pykd.softmax
        return fn(z23() if z is None else z, T, backend=be)
    return run


def call_ce(logits=None, labels=LBL):
    def run(be):
        return pykd.cross_entropy(z23() if logits is None else logits, labels, backend=be)
    return run


def call_kd(s=None, t=None, labels=LBL, T=4.0, alpha=0.1):
    def run(be):
        return pykd.kd_loss(z23() if s is None else s, z23() if t is None else t, labels, T, alpha,
                            backend=be)
    return run


def call_sgd(**over):
    def run(be):
        a = dict(params=a32(5), grads=a32(5), velocity=a32(5), lr=0.1, momentum=0.9,
                 weight_decay=0.0, mask=None)
        a.update(over)
        return pykd.sgd_step(a["params"], a["grads"], a["velocity"], a["lr"], a["momentum"],
                             a["weight_decay"], a["mask"], backend=be)
    return run


def call_adam(**over):
    def run(be):
        a = dict(params=a32(5), grads=a32(5), m=a32(5), v=a32(5), step=1, lr=1e-3, beta1=0.9,
                 beta2=0.999, eps=1e-8, mask=None, weight_decay=0.0)
        a.update(over)
        return pykd.adam_step(a["params"], a["grads"], a["m"], a["v"], a["step"], a["lr"],
                              a["beta1"], a["beta2"], a["eps"], a["mask"],
                              weight_decay=a["weight_decay"], backend=be)
    return run


def call_prune(W=None, sparsity=0.5):
    def run(be):
        return pykd.magnitude_mask(a32(4, 3) if W is None else W, sparsity, backend=be)
    return run


def call_quant(W=None, per_channel=False):
    def run(be):
        return pykd.quantize_int8(a32(4, 3) if W is None else W, per_channel, backend=be)
    return run


def q8(*shape):
    return np.ones(shape, np.int8)


def call_dequant(q=None, scale=None):
    def run(be):
        return pykd.dequantize_int8(q8(4, 3) if q is None else q,
                                    np.ones(3, F32) if scale is None else scale, backend=be)
    return run


def call_qact(x):
    return lambda be: pykd.quantize_activations(x, backend=be)


def call_gemm(qx=None, q=None):
    return lambda be: pykd.int8_gemm(q8(2, 3) if qx is None else qx, q8(3, 4) if q is None else q,
                                     backend=be)


def call_i8mm(x=None, q=None, scale=None, b=None):
    def run(be):
        return pykd.int8_matmul(a32(2, 3) if x is None else x, q8(3, 4) if q is None else q,
                                np.ones(1, F32) if scale is None else scale, b, backend=be)
    return run


CASES = {
    # ---- dense
    "dense-x-float64": (call_dense(x=np.ones((2, 3))), TypeError, r"\bx\b.*float32"),
    "dense-x-list": (call_dense(x=[[1.0, 2.0, 3.0]]), TypeError, r"\bx must be a numpy.ndarray"),
    "dense-x-matrix-int": (call_dense(x=np.ones((2, 3), np.int32)), TypeError, r"\bx must have dtype"),
    "dense-W-float16": (call_dense(W=np.ones((3, 4), np.float16)), TypeError, r"\bW must have dtype"),
    "dense-b-float64": (call_dense(b=np.ones(4)), TypeError, r"\bb must have dtype"),
    "dense-x-1d": (call_dense(x=a32(3)), ValueError, r"\bx must be 2-D"),
    "dense-W-3d": (call_dense(W=a32(3, 4, 1)), ValueError, r"\bW must be 2-D"),
    "dense-b-2d": (call_dense(b=a32(1, 4)), ValueError, r"\bb must be 1-D"),
    "dense-x-strided": (call_dense(x=a32(2, 6)[:, ::2]), ValueError, r"\bx must be C-contiguous"),
    "dense-x-fortran-order": (call_dense(x=np.asfortranarray(a32(2, 3))), ValueError,
                              r"\bx must be C-contiguous"),
    "dense-W-transposed": (call_dense(W=a32(4, 3).T), ValueError, r"\bW must be C-contiguous"),
    "dense-x-empty": (call_dense(x=a32(0, 3)), ValueError, r"\bx is empty"),
    "dense-W-empty": (call_dense(W=a32(3, 0), b=a32(0)), ValueError, r"\bW is empty"),
    "dense-W-mismatch": (call_dense(W=a32(5, 4)), ValueError, r"\bW has shape"),
    "dense-b-mismatch": (call_dense(b=a32(5)), ValueError, r"\bb must have shape"),
    "dense-activation-unknown": (call_dense(activation="sigmoid"), ValueError, r"activation"),
    "dense-activation-none": (call_dense(activation=None), ValueError, r"activation"),
    "dense-out-shape": (call_dense(out=a32(2, 5)), ValueError, r"\bout must have shape"),
    "dense-out-float64": (call_dense(out=np.ones((2, 4))), TypeError, r"\bout must have dtype"),
    "dense-out-readonly": (call_dense(out=readonly(a32(2, 4))), ValueError, r"\bout is read-only"),
    "dense-out-strided": (call_dense(out=a32(2, 8)[:, ::2]), ValueError, r"\bout must be C-contig"),
    # ---- dense_backward
    "dback-dy-shape": (call_dense_backward(dy=a32(2, 5)), ValueError, r"\bdy must have shape"),
    "dback-y-shape": (call_dense_backward(y=a32(3, 4)), ValueError, r"\by has shape"),
    "dback-dy-float64": (call_dense_backward(dy=np.ones((2, 4))), TypeError, r"\bdy must have dtype"),
    "dback-y-int": (call_dense_backward(y=np.ones((2, 4), np.int64)), TypeError, r"\by must have"),
    "dback-x-mismatch": (call_dense_backward(x=a32(2, 5)), ValueError, r"\bW has shape"),
    "dback-x-noncontig": (call_dense_backward(x=a32(2, 6)[:, ::2]), ValueError,
                          r"\bx must be C-contiguous"),
    "dback-activation": (call_dense_backward(activation="gelu"), ValueError, r"activation"),
    # ---- softmax / log_softmax
    "softmax-z-1d": (call_softmax(z=a32(3)), ValueError, r"\bz must be 2-D"),
    "softmax-z-int": (call_softmax(z=np.ones((2, 3), np.int32)), TypeError, r"\bz must have dtype"),
    "softmax-z-empty": (call_softmax(z=a32(2, 0)), ValueError, r"\bz is empty"),
    "softmax-z-noncontig": (call_softmax(z=a32(3, 2).T), ValueError, r"\bz must be C-contig"),
    "softmax-T-zero": (call_softmax(T=0.0), ValueError, r"\bT must be"),
    "softmax-T-negative": (call_softmax(T=-1.0), ValueError, r"\bT must be"),
    "softmax-T-nan": (call_softmax(T=float("nan")), ValueError, r"\bT must be"),
    "softmax-T-inf": (call_softmax(T=float("inf")), ValueError, r"\bT must be"),
    "softmax-T-str": (call_softmax(T="2"), TypeError, r"\bT must be a real"),
    "softmax-T-bool": (call_softmax(T=True), TypeError, r"\bT must be a real"),
    "softmax-z-nan": (call_softmax(z=with_nan(z23())), ValueError, r"\bz.*NaN"),
    "softmax-z-posinf": (call_softmax(z=with_nan(z23(), np.inf)), ValueError, r"\bz.*(NaN|inf)"),
    "log_softmax-z-nan": (call_softmax(z=with_nan(z23(), where=(1, 2)), log=True), ValueError,
                          r"\bz.*NaN"),
    "log_softmax-T-zero": (call_softmax(T=0, log=True), ValueError, r"\bT must be"),
    # ---- cross_entropy
    "ce-logits-float64": (call_ce(logits=np.zeros((2, 3))), TypeError, r"\blogits must have dtype"),
    "ce-logits-1d": (call_ce(logits=a32(3)), ValueError, r"\blogits must be 2-D"),
    "ce-labels-float": (call_ce(labels=np.array([0.0, 1.0])), TypeError, r"\blabels must hold int"),
    "ce-labels-bool": (call_ce(labels=np.array([True, False])), TypeError, r"\blabels"),
    "ce-labels-list": (call_ce(labels=[0, 1]), TypeError, r"\blabels must be a numpy.ndarray"),
    "ce-labels-too-big": (call_ce(labels=np.array([0, 3])), ValueError, r"\blabels out of range"),
    "ce-labels-negative": (call_ce(labels=np.array([-1, 0])), ValueError, r"\blabels out of range"),
    "ce-labels-huge-uint": (call_ce(labels=np.array([0, 2**63], np.uint64)), ValueError,
                            r"\blabels out of range"),
    "ce-labels-length": (call_ce(labels=np.array([0, 1, 2])), ValueError, r"\blabels must have shape"),
    "ce-labels-2d": (call_ce(labels=np.array([[0], [1]])), ValueError, r"\blabels must have shape"),
    "ce-logits-nan": (call_ce(logits=with_nan(z23())), ValueError, r"\blogits.*NaN"),
    "ce-logits-inf": (call_ce(logits=with_nan(z23(), np.inf)), ValueError, r"\blogits.*(NaN|inf)"),
    # ---- kd_loss
    "kd-student-float64": (call_kd(s=np.zeros((2, 3))), TypeError, r"\bstudent_logits must have"),
    "kd-teacher-float64": (call_kd(t=np.zeros((2, 3))), TypeError, r"\bteacher_logits must have"),
    "kd-teacher-shape": (call_kd(t=a32(2, 4)), ValueError, r"\bteacher_logits has shape"),
    "kd-teacher-1d": (call_kd(t=a32(6)), ValueError, r"\bteacher_logits must be 2-D"),
    "kd-teacher-noncontig": (call_kd(t=a32(3, 2).T), ValueError, r"\bteacher_logits must be C-c"),
    "kd-T-zero": (call_kd(T=0.0), ValueError, r"\bT must be"),
    "kd-T-negative": (call_kd(T=-4.0), ValueError, r"\bT must be"),
    "kd-T-nan": (call_kd(T=float("nan")), ValueError, r"\bT must be"),
    "kd-alpha-negative": (call_kd(alpha=-0.1), ValueError, r"\balpha must be"),
    "kd-alpha-above-one": (call_kd(alpha=1.5), ValueError, r"\balpha must be"),
    "kd-alpha-nan": (call_kd(alpha=float("nan")), ValueError, r"\balpha must be"),
    "kd-alpha-none": (call_kd(alpha=None), TypeError, r"\balpha must be a real"),
    "kd-labels-float": (call_kd(labels=np.array([0.0, 1.0], F32)), TypeError, r"\blabels"),
    "kd-labels-range": (call_kd(labels=np.array([0, 5])), ValueError, r"\blabels out of range"),
    "kd-labels-negative": (call_kd(labels=np.array([0, -2])), ValueError, r"\blabels out of range"),
    "kd-student-nan": (call_kd(s=with_nan(z23())), ValueError, r"\bstudent_logits.*NaN"),
    "kd-teacher-nan": (call_kd(t=with_nan(z23(), where=(1, 1))), ValueError, r"teacher_logits.*NaN"),
    "kd-student-nan-alpha0": (call_kd(s=with_nan(z23()), alpha=0.0), ValueError, r"NaN"),
    "kd-student-nan-alpha1": (call_kd(s=with_nan(z23()), alpha=1.0), ValueError, r"NaN"),
    "kd-student-inf": (call_kd(s=with_nan(z23(), np.inf)), ValueError, r"(NaN|inf)"),
    # ---- sgd_step
    "sgd-params-readonly": (call_sgd(params=readonly(a32(5))), ValueError, r"\bparams is read-only"),
    "sgd-velocity-readonly": (call_sgd(velocity=readonly(a32(5))), ValueError,
                              r"\bvelocity is read-only"),
    "sgd-params-float64": (call_sgd(params=np.ones(5)), TypeError, r"\bparams must have dtype"),
    "sgd-grads-float64": (call_sgd(grads=np.ones(5)), TypeError, r"\bgrads must have dtype"),
    "sgd-grads-shape": (call_sgd(grads=a32(6)), ValueError, r"\bgrads has shape"),
    "sgd-grads-2d-same-size": (call_sgd(grads=a32(5, 1)), ValueError, r"\bgrads has shape"),
    "sgd-velocity-shape": (call_sgd(velocity=a32(4)), ValueError, r"\bvelocity has shape"),
    "sgd-params-strided": (call_sgd(params=a32(10)[::2]), ValueError, r"\bparams must be C-contig"),
    "sgd-params-empty": (call_sgd(params=a32(0), grads=a32(0), velocity=a32(0)), ValueError,
                         r"\bparams is empty"),
    "sgd-mask-int8": (call_sgd(mask=np.ones(5, np.int8)), TypeError, r"\bmask must have dtype bool"),
    "sgd-mask-shape": (call_sgd(mask=np.ones(4, bool)), ValueError, r"\bmask has shape"),
    "sgd-mask-list": (call_sgd(mask=[True] * 5), TypeError, r"\bmask must be a numpy"),
    "sgd-lr-negative": (call_sgd(lr=-0.1), ValueError, r"\blr must be"),
    "sgd-lr-nan": (call_sgd(lr=float("nan")), ValueError, r"\blr must be"),
    "sgd-lr-str": (call_sgd(lr="0.1"), TypeError, r"\blr must be a real"),
    "sgd-momentum-negative": (call_sgd(momentum=-0.9), ValueError, r"\bmomentum must be"),
    "sgd-weight-decay-negative": (call_sgd(weight_decay=-1e-4), ValueError, r"\bweight_decay must"),
    "sgd-weight-decay-inf": (call_sgd(weight_decay=float("inf")), ValueError, r"\bweight_decay mus"),
    # ---- adam_step
    "adam-step-zero": (call_adam(step=0), ValueError, r"\bstep must be >= 1"),
    "adam-step-negative": (call_adam(step=-3), ValueError, r"\bstep must be >= 1"),
    "adam-step-float": (call_adam(step=1.0), TypeError, r"\bstep must be an integer"),
    "adam-step-bool": (call_adam(step=True), TypeError, r"\bstep must be an integer"),
    "adam-params-readonly": (call_adam(params=readonly(a32(5))), ValueError, r"\bparams is read-on"),
    "adam-m-readonly": (call_adam(m=readonly(a32(5))), ValueError, r"\bm is read-only"),
    "adam-v-readonly": (call_adam(v=readonly(a32(5))), ValueError, r"\bv is read-only"),
    "adam-v-shape": (call_adam(v=a32(6)), ValueError, r"\bv has shape"),
    "adam-m-float64": (call_adam(m=np.zeros(5)), TypeError, r"\bm must have dtype"),
    "adam-beta1-one": (call_adam(beta1=1.0), ValueError, r"\bbeta1 must be"),
    "adam-beta1-negative": (call_adam(beta1=-0.1), ValueError, r"\bbeta1 must be"),
    "adam-beta2-one": (call_adam(beta2=1.0), ValueError, r"\bbeta2 must be"),
    "adam-eps-zero": (call_adam(eps=0.0), ValueError, r"\beps must be"),
    "adam-lr-inf": (call_adam(lr=float("inf")), ValueError, r"\blr must be"),
    "adam-weight-decay-negative": (call_adam(weight_decay=-1.0), ValueError, r"\bweight_decay"),
    "adam-mask-float": (call_adam(mask=a32(5)), TypeError, r"\bmask must have dtype bool"),
    "adam-mask-noncontig": (call_adam(mask=np.ones(10, bool)[::2]), ValueError,
                            r"\bmask must be C-contig"),
    # ---- magnitude_mask
    "prune-sparsity-above-one": (call_prune(sparsity=1.01), ValueError, r"\bsparsity must be"),
    "prune-sparsity-negative": (call_prune(sparsity=-0.1), ValueError, r"\bsparsity must be"),
    "prune-sparsity-nan": (call_prune(sparsity=float("nan")), ValueError, r"\bsparsity must be"),
    "prune-sparsity-str": (call_prune(sparsity="0.5"), TypeError, r"\bsparsity must be a real"),
    "prune-W-float64": (call_prune(W=np.ones((4, 3))), TypeError, r"\bW must have dtype"),
    "prune-W-list-of-lists": (call_prune(W=[[1.0, 2.0]]), TypeError, r"W\[0\] must be a numpy"),
    "prune-W-list-bad-dtype": (call_prune(W=[a32(3), np.ones(3)]), TypeError, r"W\[1\] must have"),
    "prune-W-empty-list": (call_prune(W=[]), ValueError, r"\bW is an empty list"),
    "prune-W-empty": (call_prune(W=a32(0)), ValueError, r"\bW is empty"),
    "prune-W-list-empty-member": (call_prune(W=[a32(3), a32(0)]), ValueError, r"W\[1\] is empty"),
    "prune-W-noncontig": (call_prune(W=a32(3, 4).T), ValueError, r"\bW must be C-contiguous"),
    "prune-W-nan": (call_prune(W=with_nan(a32(4, 3))), ValueError, r"\bW contains NaN"),
    "prune-W-inf": (call_prune(W=with_nan(a32(4, 3), -np.inf)), ValueError, r"\bW contains NaN or"),
    "prune-W-list-nan": (call_prune(W=[a32(3), with_nan(a32(2, 2))]), ValueError,
                         r"W\[1\] contains NaN"),
    "prune-W-nan-sparsity0": (call_prune(W=with_nan(a32(4, 3)), sparsity=0.0), ValueError,
                              r"\bW contains NaN"),
    # ---- quantize_int8 / dequantize_int8 / quantize_activations
    "quant-W-float64": (call_quant(W=np.ones((4, 3))), TypeError, r"\bW must have dtype"),
    "quant-W-1d": (call_quant(W=a32(4)), ValueError, r"\bW must be 2-D"),
    "quant-W-empty": (call_quant(W=a32(4, 0)), ValueError, r"\bW is empty"),
    "quant-W-noncontig": (call_quant(W=a32(3, 4).T), ValueError, r"\bW must be C-contig"),
    "quant-W-nan": (call_quant(W=with_nan(a32(4, 3), where=(3, 2))), ValueError, r"\bW contains NaN"),
    "quant-W-inf-per-channel": (call_quant(W=with_nan(a32(4, 3), np.inf), per_channel=True),
                                ValueError, r"\bW contains NaN or inf"),
    "dequant-q-int16": (call_dequant(q=np.ones((4, 3), np.int16)), TypeError, r"\bq must have dtype"),
    "dequant-q-uint8": (call_dequant(q=np.ones((4, 3), np.uint8)), TypeError, r"\bq must have dtype"),
    "dequant-scale-float64": (call_dequant(scale=np.ones(3)), TypeError, r"\bscale must have dtype"),
    "dequant-scale-shape": (call_dequant(scale=a32(2)), ValueError, r"\bscale must have shape"),
    "dequant-scale-2d": (call_dequant(scale=a32(1, 3)), ValueError, r"\bscale must be 1-D"),
    "dequant-scale-zero": (call_dequant(scale=np.zeros(3, F32)), ValueError, r"\bscale must be fin"),
    "dequant-scale-negative": (call_dequant(scale=a32(1, fill=-1.0)), ValueError, r"\bscale must"),
    "dequant-scale-nan": (call_dequant(scale=a32(3, fill=np.nan)), ValueError, r"\bscale must be"),
    "qact-x-3d": (call_qact(a32(2, 3, 1)), ValueError, r"\bx must be 2-D"),
    "qact-x-float64": (call_qact(np.ones((2, 3))), TypeError, r"\bx must have dtype"),
    "qact-x-nan": (call_qact(with_nan(a32(2, 3), where=(1, 0))), ValueError, r"\bx contains NaN"),
    "qact-x-inf": (call_qact(with_nan(a32(2, 3), -np.inf)), ValueError, r"\bx contains NaN or inf"),
    # ---- int8_gemm / int8_matmul
    "gemm-qx-float32": (call_gemm(qx=a32(2, 3)), TypeError, r"\bqx must have dtype int8"),
    "gemm-q-uint8": (call_gemm(q=np.ones((3, 4), np.uint8)), TypeError, r"\bq must have dtype int8"),
    "gemm-mismatch": (call_gemm(qx=q8(2, 5)), ValueError, r"\bqx has 5 features but q has shape"),
    "gemm-q-1d": (call_gemm(q=q8(3)), ValueError, r"\bq must be 2-D"),
    "gemm-qx-empty": (call_gemm(qx=q8(0, 3)), ValueError, r"\bqx is empty"),
    "gemm-too-long": (call_gemm(qx=q8(1, 133144), q=q8(133144, 1)), ValueError,
                      r"\bq has 133144 input features"),
    "i8mm-x-int8": (call_i8mm(x=q8(2, 3)), TypeError, r"\bx must have dtype float32"),
    "i8mm-x-nan": (call_i8mm(x=with_nan(a32(2, 3))), ValueError, r"\bx contains NaN"),
    "i8mm-x-inf": (call_i8mm(x=with_nan(a32(2, 3), np.inf, (1, 2))), ValueError, r"\bx contains"),
    "i8mm-mismatch": (call_i8mm(x=a32(2, 4)), ValueError, r"\bx has 4 features but q has shape"),
    "i8mm-scale-shape": (call_i8mm(scale=a32(3)), ValueError, r"\bscale must have shape"),
    "i8mm-scale-zero": (call_i8mm(scale=np.zeros(4, F32)), ValueError, r"\bscale must be finite"),
    "i8mm-b-shape": (call_i8mm(b=a32(3)), ValueError, r"\bb must have shape"),
    "i8mm-b-float64": (call_i8mm(b=np.zeros(4)), TypeError, r"\bb must have dtype"),
    "i8mm-q-float": (call_i8mm(q=a32(3, 4)), TypeError, r"\bq must have dtype int8"),
}


def _dense_out_overlap(be):
    big = a32(8)
    x = big[:6].reshape(2, 3)
    out = big[:8].reshape(2, 4)
    return pykd.dense(x, a32(3, 4), a32(4), out=out, backend=be)


CASES["dense-out-overlaps-x"] = (_dense_out_overlap, ValueError, r"\bout must not overlap x")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input(case, backend):
    fn, exc, pattern = CASES[case]
    with np.errstate(all="ignore"):
        with pytest.raises(exc, match=pattern):
            fn(backend)


FUNCTIONS = {
    "dense": lambda be: pykd.dense(a32(2, 3), a32(3, 4), a32(4), backend=be),
    "dense_backward": call_dense_backward(),
    "softmax": call_softmax(),
    "log_softmax": call_softmax(log=True),
    "cross_entropy": call_ce(),
    "kd_loss": call_kd(),
    "sgd_step": call_sgd(),
    "adam_step": call_adam(),
    "magnitude_mask": call_prune(),
    "quantize_int8": call_quant(),
    "dequantize_int8": call_dequant(),
    "quantize_activations": call_qact(a32(2, 3)),
    "int8_gemm": call_gemm(),
    "int8_matmul": call_i8mm(),
}


@pytest.mark.parametrize("bad", ["cuda", "Fortran", None, 1], ids=["cuda", "Fortran", "None", "1"])
@pytest.mark.parametrize("name", list(FUNCTIONS), ids=list(FUNCTIONS))
def test_bad_backend(name, bad):
    with pytest.raises(ValueError, match=r"\bbackend must be"):
        FUNCTIONS[name](bad)


def test_table_covers_every_kernel():
    assert set(FUNCTIONS) == KERNELS
    assert KERNELS <= set(pykd.__all__)


@pytest.mark.parametrize("name", list(FUNCTIONS), ids=list(FUNCTIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_good_baseline_calls(name, backend):
    """The table's baseline arguments are valid, so each bad case tests one thing."""
    FUNCTIONS[name](backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_readonly_grads_and_inputs_are_fine(backend):
    g = readonly(a32(5))
    p, v = a32(5), a32(5, fill=0.0)
    pykd.sgd_step(p, g, v, 0.1, backend=backend)
    m, v2 = a32(5, fill=0.0), a32(5, fill=0.0)
    pykd.adam_step(p, g, m, v2, 1, backend=backend)
    x, W, b = readonly(a32(2, 3)), readonly(a32(3, 4)), readonly(a32(4))
    assert pykd.dense(x, W, b, backend=backend).shape == (2, 4)
    assert pykd.magnitude_mask(readonly(a32(6)), 0.5, backend=backend).shape == (6,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_step_leaves_state_untouched(backend):
    p, g, v = a32(5), a32(5), a32(5, fill=0.25)
    with pytest.raises(ValueError):
        pykd.sgd_step(p, g, v, 0.1, mask=np.ones(4, bool), backend=backend)
    assert (p == 1).all() and (v == 0.25).all()
    m = a32(5, fill=0.5)
    with pytest.raises(ValueError):
        pykd.adam_step(p, g, m, v, 0, backend=backend)
    assert (p == 1).all() and (m == 0.5).all() and (v == 0.25).all()


# Real scalars are validated as Python floats but used as float32: finite
# values outside float32's range reach the kernels as inf or 0.
SCALAR_RANGE_CASES = {
    "softmax-T-1e40": (call_softmax(T=1e40), r"\bT\b"),
    "softmax-T-1e-50": (call_softmax(T=1e-50), r"\bT\b"),
    "kd-T-1e40": (call_kd(T=1e40), r"\bT\b"),
    "kd-T-1e-50": (call_kd(T=1e-50), r"\bT\b"),
    "sgd-lr-1e39": (call_sgd(lr=1e39), r"\blr\b"),
    "adam-eps-1e-50": (call_adam(eps=1e-50), r"\beps\b"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SCALAR_RANGE_CASES), ids=list(SCALAR_RANGE_CASES))
def test_scalar_outside_float32_range(case, backend):
    fn, pattern = SCALAR_RANGE_CASES[case]
    with np.errstate(all="ignore"):
        with pytest.raises(ValueError, match=pattern):
            fn(backend)


# ------------------------------------------------------------------------
# The raw f2py extension, in a child process: it must never crash.

CHILD_PRELUDE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pykd._fkernels as f
    f32 = np.float32
    def report(fn):
        try:
            out = fn()
            print(json.dumps({"kind": "returned", "value": repr(out)}))
        except Exception as exc:
            print(json.dumps({"kind": "raised", "type": type(exc).__name__, "msg": str(exc)}))
    # Arrays in Fortran order (the layout the wrappers take without copying).
    def o(*shape, dt=f32):
        return np.ones(shape, dt, order="F")
    def e(*shape, dt=f32):
        return np.zeros(shape, dt, order="F")
""")


def run_child(body, tmp_path):
    code = CHILD_PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    return proc


def _status(v):
    """The first integer in the repr of a raw call's return value."""
    v = v.strip("()").split(",")[-1] if v.startswith("(") else v
    return int(float(v))


# id -> (code calling report(lambda: ...), expectation): "raise" (a Python
# exception), "status" (a non-zero status code returned), "ok" (any normal result).
RAW_CASES = {
    "dense_forward-mismatched-shapes": (
        "report(lambda: f.dense_forward(o(4,3), o(5,6), o(5), 0, e(5,3)))", "raise"),
    "dense_forward-zero-size": (
        "report(lambda: f.dense_forward(o(5,0), o(6,5), o(6), 0, e(6,0)))", "raise"),
    "dense_forward-bad-activation": (
        "report(lambda: f.dense_forward(o(3,2), o(4,3), o(4), 99, e(4,2)))", "status"),
    "dense_backward-mismatched-dx": (
        "report(lambda: f.dense_backward(o(4,2), o(3,2), o(4,3), o(4,2), 0, e(4,3), e(4), e(7,2)))",
        "raise"),
    "dense_backward_nodx-zero-size": (
        "report(lambda: f.dense_backward_nodx(o(4,0), o(3,0), o(4,3), o(4,0), 0, e(4,3), e(4)))",
        "raise"),
    "softmax-zero-size": (
        "report(lambda: f.softmax(o(0,3), 1.0, 0, e(0,3)))", "raise"),
    "softmax-bad-T": (
        "report(lambda: f.softmax(o(3,2), -1.0, 0, e(3,2)))", "status"),
    "softmax-nan-T": (
        "report(lambda: f.softmax(o(3,2), float('nan'), 1, e(3,2)))", "status"),
    "cross_entropy-label-out-of-range": (
        "report(lambda: f.cross_entropy(o(4,3), np.array([0,10**15,0]), e(4,3)))", "status"),
    "cross_entropy-label-negative": (
        "report(lambda: f.cross_entropy(o(4,3), np.array([0,-1,0]), e(4,3)))", "status"),
    "cross_entropy-labels-short": (
        "report(lambda: f.cross_entropy(o(4,3), np.array([0,1]), e(4,3)))", "raise"),
    "kd_loss-mismatched-teacher": (
        "report(lambda: f.kd_loss(o(4,3), o(5,3), np.zeros(3,np.int64), 2.0, 0.5, e(4,3)))",
        "raise"),
    "kd_loss-bad-alpha": (
        "report(lambda: f.kd_loss(o(4,3), o(4,3), np.zeros(3,np.int64), 2.0, 7.0, e(4,3)))",
        "status"),
    "kd_loss-zero-T": (
        "report(lambda: f.kd_loss(o(4,3), o(4,3), np.zeros(3,np.int64), 0.0, 0.5, e(4,3)))",
        "status"),
    "sgd_step-short-grads": (
        "report(lambda: f.sgd_step(o(5), o(3), o(5), .1, .9, 0.))", "raise"),
    "sgd_step_masked-short-mask": (
        "report(lambda: f.sgd_step_masked(o(5), o(5), o(5), .1, .9, 0., np.ones(2,np.int8)))",
        "raise"),
    "sgd_step-zero-size": (
        "report(lambda: f.sgd_step(o(0), o(0), o(0), .1, .9, 0.))", "ok"),
    "adam_step-step-zero": (
        "report(lambda: f.adam_step(o(5), o(5), o(5), o(5), 0, .1, .9, .999, 1e-8, 0.))",
        "status"),
    "adam_step-step-negative-huge": (
        "report(lambda: f.adam_step(o(5), o(5), o(5), o(5), -2**62, .1, .9, .999, 1e-8, 0.))",
        "status"),
    "magnitude_mask-huge-k": (
        "report(lambda: f.magnitude_mask(o(10), 10**12, e(10, dt=np.int8)))", "status"),
    "magnitude_mask-negative-k": (
        "report(lambda: f.magnitude_mask(o(10), -5, e(10, dt=np.int8)))", "status"),
    "magnitude_mask-short-mask": (
        "report(lambda: f.magnitude_mask(o(10), 3, e(4, dt=np.int8)))", "raise"),
    "magnitude_mask-zero-size": (
        "report(lambda: f.magnitude_mask(o(0), 0, e(0, dt=np.int8)))", "ok"),
    "prune_magnitudes-short": (
        "report(lambda: f.prune_magnitudes(o(4), e(3)))", "raise"),
    "prune_apply-short-mask": (
        "report(lambda: f.prune_apply(o(10), 1.0, 3, e(5, dt=np.int8)))", "raise"),
    "prune_apply-huge-ties": (
        "report(lambda: f.prune_apply(o(10), 1.0, 10**15, e(10, dt=np.int8)))", "ok"),
    "quantize_weights-empty-scale": (
        "report(lambda: f.quantize_weights(o(3,4), e(3,4, dt=np.int8), e(0)))", "status"),
    "quantize_weights-wrong-scale": (
        "report(lambda: f.quantize_weights(o(3,4), e(3,4, dt=np.int8), e(2)))", "status"),
    "quantize_activations-zero-size": (
        "report(lambda: f.quantize_activations(o(4,0), e(4,0, dt=np.int8), e(0)))", "raise"),
    "dequantize_weights-wrong-scale": (
        "report(lambda: f.dequantize_weights(o(3,4, dt=np.int8), o(2), e(3,4)))", "status"),
    "int8_gemm_fast-mismatched": (
        "report(lambda: f.int8_gemm_fast(o(4,6, dt=np.int8), o(7,3, dt=np.int8), "
        "e(4,3, dt=np.int32)))", "raise"),
    "int8_gemm_fast-zero-inner": (
        "report(lambda: f.int8_gemm_fast(o(4,0, dt=np.int8), o(0,3, dt=np.int8), "
        "e(4,3, dt=np.int32)))", "raise"),
    "int8_gemm_fast-int32-overflow": (
        "report(lambda: f.int8_gemm_fast(o(1,131072, dt=np.int8), o(131072,1, dt=np.int8), "
        "e(1,1, dt=np.int32)))", "status"),
    "int8_matmul_fast-wrong-scale": (
        "report(lambda: f.int8_matmul_fast(o(3,2), o(4,3, dt=np.int8), o(2), o(4), e(4,2)))",
        "status"),
    "int8_matmul_fast-empty-scale": (
        "report(lambda: f.int8_matmul_fast(o(3,2), o(4,3, dt=np.int8), o(0), o(4), e(4,2)))",
        "status"),
    "int8_matmul_fast-int32-overflow": (
        "report(lambda: f.int8_matmul_fast(o(131072,1), o(1,131072, dt=np.int8), o(1), o(1), "
        "e(1,1)))", "status"),
}


def check_child(proc, expect):
    assert proc.returncode == 0, (
        f"child died with return code {proc.returncode} "
        f"({'signal %d' % -proc.returncode if proc.returncode < 0 else 'error'}); "
        f"stderr: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if expect == "raise":
        assert result["kind"] == "raised" and result["type"] in ("ValueError", "TypeError"), result
    elif expect == "status":
        assert result["kind"] == "returned", result
        assert _status(result["value"]) != 0, result
    else:
        assert result["kind"] in ("returned", "raised"), result
    return result


@pytest.mark.parametrize("case", list(RAW_CASES), ids=list(RAW_CASES))
def test_raw_extension_does_not_crash(case, tmp_path):
    body, expect = RAW_CASES[case]
    check_child(run_child(body, tmp_path), expect)


@pytest.mark.parametrize("k", [10**12, -10**12, 11, 0], ids=["huge", "huge-negative", "n+1", "0"])
def test_raw_prune_select_rejects_bad_k(k, tmp_path):
    # Expect an error (exception, or a non-zero status), never a crash or a garbage value.
    proc = run_child(f"report(lambda: f.prune_select(np.arange(1, 11, dtype=f32), {k})[1])",
                     tmp_path)
    result = check_child(proc, "ok")
    assert result["kind"] == "raised" or result["value"] != "0", result


def test_raw_prune_select_valid_k(tmp_path):
    proc = run_child(textwrap.dedent("""
        rng = np.random.default_rng(0)
        a = rng.permutation(np.arange(1, 101)).astype(f32)
        print(json.dumps([float(f.prune_select(a.copy(), k)[0]) for k in (1, 37, 100)]))
    """), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [1.0, 37.0, 100.0]


def test_public_api_survives_extreme_sizes(tmp_path):
    """Public calls with odd extreme shapes, in a child: errors, never a crash."""
    proc = run_child(textwrap.dedent("""
        import pykd
        out = []
        for fn in [
            lambda: pykd.magnitude_mask(np.ones(1, f32), 1.0),
            lambda: pykd.magnitude_mask(np.full((), 3.0, f32), 0.6),
            lambda: pykd.magnitude_mask([np.ones(1, f32)] * 50, 0.5),
            lambda: pykd.dense(np.ones((1, 1), f32), np.ones((1, 1), f32), np.ones(1, f32)),
            lambda: pykd.softmax(np.ones((1, 1), f32), 1e-30),
            lambda: pykd.int8_gemm(np.ones((1, 131071), np.int8), np.ones((131071, 1), np.int8)),
            lambda: pykd.cross_entropy(np.zeros((1, 1), f32), np.zeros(1, np.int8)),
        ]:
            try:
                r = fn()
                out.append("ok")
            except (ValueError, TypeError) as exc:
                out.append(type(exc).__name__)
        print(json.dumps(out))
    """), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["ok"] * 7
