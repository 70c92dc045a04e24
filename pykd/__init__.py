"""pykd: knowledge distillation and model compression with Fortran kernels.

The kernels (dense layers, softmax, distillation loss, optimizers, pruning,
int8 quantization) run in Fortran by default and in pure NumPy with
``backend="numpy"``; both give the same answers.

On top of them: ``MLP`` (all parameters in one flat buffer), ``fit`` (one
Fortran call per training step: CE, Hinton KD, hints), ``soft_labels``,
``evaluate`` and ``load_model``; the ``pykd`` command runs the pipeline.
"""
import os

# Idle OpenMP threads must sleep, not spin: between our OpenMP loops the BLAS
# threads need the cores (on 2 cores a spinning team made steps 3x slower).
# Must be set before libgomp loads with the extension; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
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
from .models import MLP, load_model
from .train import TrainConfig, evaluate, fit, soft_labels

__version__ = "0.1.0"

__all__ = [
    "adam_step", "cross_entropy", "dense", "dense_backward", "dequantize_int8",
    "int8_gemm", "int8_matmul", "kd_loss", "log_softmax", "magnitude_mask",
    "quantize_activations", "quantize_int8", "sgd_step", "softmax",
    "MLP", "TrainConfig", "evaluate", "fit", "load_model", "soft_labels",
]
