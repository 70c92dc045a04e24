"""pykd: knowledge distillation and model compression with Fortran kernels.

The kernels (dense layers, softmax, distillation loss, optimizers, pruning,
int8 quantization) run in Fortran by default and in pure NumPy with
``backend="numpy"``; both give the same answers.
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

__version__ = "0.1.0"

__all__ = [
    "adam_step", "cross_entropy", "dense", "dense_backward", "dequantize_int8",
    "int8_gemm", "int8_matmul", "kd_loss", "log_softmax", "magnitude_mask",
    "quantize_activations", "quantize_int8", "sgd_step", "softmax",
]
