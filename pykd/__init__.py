"""pykd: knowledge distillation and model compression with Fortran kernels.

The kernels (dense layers, softmax, distillation loss, optimizers, pruning,
int8 quantization) run in Fortran by default and in pure NumPy with
``backend="numpy"``; both give the same answers.

On top of them: ``MLP`` (all parameters in one flat buffer), ``fit`` (one
Fortran call per training step: CE, Hinton KD, hints), ``soft_labels``,
``evaluate`` and ``load_model``; ``Model``, a chain of layers of any kind
(``pykd.layers``: dense, int8, sparse CSR, low rank, codebook, sparse
codebook) run by one Fortran call per batch; the conversions
``quantize_model``, ``sparsify``, ``low_rank`` and ``cluster``; the ``pykd``
command runs the pipeline.
"""
import os


def _set_thread_waiting():
    """How idle OpenMP threads wait; must be set before libgomp loads with the
    extension, and a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.

    With OpenBLAS on OpenMP (one thread pool), idle threads spin for about
    0.1 ms before they sleep: long enough to bridge the gaps between the BLAS
    calls and loops of a training step (waking a sleeping thread costs tens of
    microseconds), short enough to give the cores back soon. With OpenBLAS's
    own pthreads they must sleep at once, or they take the cores from the BLAS
    threads (on 2 cores a spinning team made steps 3x slower).
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    try:
        from ._build_config import blas_openmp_dir
    except ImportError:  # a source tree without a build: NumPy backend only
        blas_openmp_dir = ""
    if blas_openmp_dir and os.path.exists(os.path.join(blas_openmp_dir, "libopenblas.so.0")):
        os.environ["GOMP_SPINCOUNT"] = "10000"
    else:
        os.environ["OMP_WAIT_POLICY"] = "passive"


_set_thread_waiting()
from .kernels import (
    adam_step,
    cross_entropy,
    dense,
    dense_backward,
    dequantize_int8,
    int8_gemm,
    int8_matmul,
    kd_loss,
    log_softmax,
    magnitude_mask,
    quantize_activations,
    quantize_int8,
    sgd_step,
    softmax,
)
from . import layers
from .compress import FineTune, cluster, low_rank, quantize_model, sparsify
from .models import MLP, Model, load_model
from .train import TrainConfig, evaluate, fit, soft_labels

__version__ = "0.1.0"

__all__ = [
    "adam_step", "cross_entropy", "dense", "dense_backward", "dequantize_int8",
    "int8_gemm", "int8_matmul", "kd_loss", "log_softmax", "magnitude_mask",
    "quantize_activations", "quantize_int8", "sgd_step", "softmax",
    "MLP", "Model", "TrainConfig", "evaluate", "fit", "load_model", "soft_labels",
    "layers", "FineTune", "cluster", "low_rank", "quantize_model", "sparsify",
]
