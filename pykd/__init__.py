"""pykd: knowledge distillation and model compression with Fortran kernels.

The kernels (dense layers, softmax, distillation loss, optimizers, pruning,
int8 quantization) run in Fortran by default and in pure NumPy with
``backend="numpy"``; both give the same answers.

On top of them: ``MLP`` (all parameters in one flat buffer), ``fit`` (one
Fortran call per training step: CE, Hinton KD, hints; MSE and Huber
regression with per-feature and per-output normalisation), ``soft_labels``,
``evaluate``, ``regression_metrics`` and ``load_model``; ``Model``, a
chain of layers of any kind (``pykd.layers``: dense, int8, sparse CSR, low
rank, codebook, sparse codebook) run by one Fortran call per batch; the conversions
``quantize_model``, ``sparsify``, ``low_rank`` and ``cluster``; the ``pykd``
command runs the pipeline.

Importing pykd sets one OpenMP variable in ``os.environ`` (so in the whole
process, and in its child processes), before the extension loads libgomp:
``GOMP_SPINCOUNT=10000`` when the extension runs the OpenMP build of OpenBLAS
(one thread pool: idle threads spin about 0.1 ms before they sleep), else
``OMP_WAIT_POLICY=passive`` (idle OpenMP threads sleep at once, leaving the
cores to OpenBLAS's own threads). It sets nothing if either variable is
already set, or if ``PYKD_NO_OMP_DEFAULTS=1`` is (set it when other OpenMP
libraries in the process must keep libgomp's defaults; pykd's results are
the same, only its speed on few cores may suffer).

While the extension loads OpenBLAS, pykd also sets
``OPENBLAS_CORETYPE`` to OpenBLAS's own AVX-512 kernels for the CPU's flags
(an OpenBLAS older than the CPU would run its SSE3 kernels) and removes it once loaded; a user's
``OPENBLAS_CORETYPE`` wins (``pykd._openblas``).

Without a build (a source checkout), ``import pykd`` works and
``backend="numpy"`` runs; a Fortran kernel raises ImportError saying the
extension is not built and how to build it.
"""
import logging
import os

# The library logs (per-epoch lines of fit, fine-tuning) under "pykd.*" and
# configures nothing: an application adds handlers (the pykd command adds one
# on stderr); without one, nothing is printed.
logging.getLogger("pykd").addHandler(logging.NullHandler())


def _read_version():
    """The version: written once, in meson.build's project(); the build copies
    it into _build_config.py. A source checkout without a build reads it from
    meson.build itself."""
    try:
        from ._build_config import version
        return version
    except ImportError:
        pass
    import re
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "meson.build"), encoding="utf-8") as fh:
            m = re.search(r"^project\([^)]*?version:\s*'([^']+)'", fh.read(), re.M | re.S)
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


def _extension_missing(exc):
    """The message of the ImportError a Fortran kernel raises when
    pykd._fkernels cannot be imported (``exc``: the original error)."""
    here = os.path.dirname(os.path.abspath(__file__))
    import importlib.machinery
    built = any(os.path.exists(os.path.join(here, "_fkernels" + suffix))
                for suffix in importlib.machinery.EXTENSION_SUFFIXES)
    if built:
        return (f"pykd's Fortran extension (pykd._fkernels) is installed in {here} but failed "
                f"to load: {exc}. Reinstall pykd, or use backend='numpy'")
    checkout = os.path.exists(os.path.join(os.path.dirname(here), "meson.build"))
    where = (f"pykd was imported from the source checkout {os.path.dirname(here)}, "
             "which holds no build" if checkout else f"{here} holds no compiled extension")
    return ("pykd's Fortran extension (pykd._fkernels) is not built: " + where + ". "
            "Build and install it with `pip install .` in the checkout (needs gfortran, "
            "OpenBLAS and pkg-config; on Debian `make setup` installs them and builds pykd "
            "into .venv), then run Python from outside the checkout so that the installed "
            "pykd is imported. backend='numpy' works without the extension")


def _vendored_openblas():
    """True if a repaired wheel put OpenBLAS beside the package (auditwheel's
    <distribution>.libs directory)."""
    site = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    libs = os.path.join(site, "pykd_distill.libs")
    try:
        return any(name.startswith("libopenblas") for name in os.listdir(libs))
    except OSError:
        return False


def _set_thread_waiting():
    """How idle OpenMP threads wait; must be set before libgomp loads with the
    extension. A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins, and
    PYKD_NO_OMP_DEFAULTS=1 (any value but "" or "0") sets nothing.

    With OpenBLAS on OpenMP (one thread pool), idle threads spin for about
    0.1 ms before they sleep: long enough to bridge the gaps between the BLAS
    calls and loops of a training step (waking a sleeping thread costs tens of
    microseconds), short enough to give the cores back soon. With OpenBLAS's
    own pthreads they must sleep at once, or they take the cores from the BLAS
    threads (on 2 cores a spinning team made steps 3x slower).
    """
    if os.environ.get("PYKD_NO_OMP_DEFAULTS", "") not in ("", "0"):
        return
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    try:
        from ._build_config import blas_openmp_dir
    except ImportError:  # a source tree without a build: NumPy backend only
        blas_openmp_dir = ""
    # A repaired wheel bundles the OpenMP build the extension was linked with.
    if blas_openmp_dir and (os.path.exists(os.path.join(blas_openmp_dir, "libopenblas.so.0"))
                            or _vendored_openblas()):
        os.environ["GOMP_SPINCOUNT"] = "10000"
    else:
        os.environ["OMP_WAIT_POLICY"] = "passive"


__version__ = _read_version()
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
from .compress import PruneSchedule, prune, weight_masks
from .metrics import regression_metrics
from .models import MLP, Model, load_model
from .callbacks import EarlyStopping, EpochState
from .config import RunConfig
from .train import TrainConfig, evaluate, fit, soft_labels

__all__ = [
    "adam_step", "cross_entropy", "dense", "dense_backward", "dequantize_int8",
    "int8_gemm", "int8_matmul", "kd_loss", "log_softmax", "magnitude_mask",
    "quantize_activations", "quantize_int8", "sgd_step", "softmax",
    "MLP", "Model", "RunConfig", "TrainConfig", "EarlyStopping", "EpochState", "evaluate", "fit", "load_model", "soft_labels",
    "layers", "FineTune", "cluster", "low_rank", "quantize_model", "sparsify",
    "PruneSchedule", "prune", "weight_masks", "regression_metrics",
]
