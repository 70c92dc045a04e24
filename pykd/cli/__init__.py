"""The ``pykd`` command line: train a teacher, make soft labels, distill a
student, evaluate, and ``pykd demo`` for the whole pipeline.

Run ``pykd COMMAND --help`` for the options of each command. Exit codes: 0 on
success, 2 for bad input (options, files) or a failure of the environment
(disk full, out of memory, ...), 1 when training fails (NaN/inf loss), 130
after Ctrl-C (a checkpoint is saved; rerun with ``--resume``). Every error is
one line on stderr naming the file and the problem; ``--debug`` (or
``PYKD_DEBUG=1``) prints the traceback first. Inputs and outputs are checked
before any training starts.

``mpirun -np N pykd train-teacher | distill | soft-labels ...`` runs the
command data-parallel on N ranks (docs/distributed.md): rank 0 alone prints
and writes; a collective that waits longer than ``--mpi-timeout`` seconds
aborts the job with exit code 3.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import logging
import math
import os
import pkgutil
import shlex
import stat
import statistics
import sys
import time
import traceback
import warnings

import numpy as np

from .. import __version__
from . import config as _config
from .. import io as _io
from .._step import TrainConfig
from ..config import RunConfig
from ..data import DEFAULT_DATA_DIR, TASKS, DatasetError, IntegerTargetsWarning, load_dataset
from ..modelfile import ModelFormatError
from ..models import MLP, load_model
from .._validate import plural as _plural
from ..train import (LR_SCHEDULES, CheckpointError, NonFiniteLossError, TrainingInterrupted,
                    atomic_write, evaluate, fit, hint_targets_from, soft_labels)

#: The reference configuration of ``pykd demo`` (architectures, optimizer,
#: batch, T, alpha from the issue; epochs, dropout and the teacher's decay
#: tuned on Fashion-MNIST). train-teacher and distill take their sizes,
#: epochs, lr and batch from here, but train at a constant rate without
#: dropout unless told otherwise: the decay and dropout are the demo's recipe.
DEMO = {
    "teacher_hidden": [1200, 1200],
    "student_hidden": [200, 200],
    "lr": 1e-3,
    "batch_size": 64,
    "temperature": 5.0,
    "alpha": 0.1,
    "teacher_epochs": 20,
    "teacher_dropout": 0.3,
    "teacher_lr_decay": 0.9,
    "student_epochs": 15,
    "student_lr_decay": 1.0,
    "seeds": 3,
}
#: ``pykd demo --quick``: a smoke test of the whole pipeline in seconds.
QUICK = {"n_train": 3000, "n_test": 1000, "teacher_epochs": 2, "student_epochs": 2}
#: The most classes a dataset (or ``--classes``) may have.
MAX_CLASSES = 65536


def _command_modules():
    """The modules of pykd.cli that add commands: every public module that
    defines ``register(sub)``, ordered by its ``ORDER`` number (the order of
    ``pykd --help``), so a new command needs no edit here."""
    mods = [importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    return sorted((m for m in mods if hasattr(m, "register")),
                  key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


class CLIError(Exception):
    """Bad input: printed as ``pykd CMD: error: ...``, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``pykd CMD: error: ... (see pykd CMD
    --help)``, exit code 2) instead of the usage text plus the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} "
                     f"(see {self.prog} --help)\n")


# ----------------------------------------------------------- option types

def _hidden(text):
    text = text.strip()
    if text in ("", "none"):
        return []
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths such as 1200,1200, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"layer widths must be >= 1, got {text!r}")
    return sizes


def _number(kind, low=None, high=None, low_open=False, high_open=False):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        lo_ok = low is None or (v > low if low_open else v >= low)
        hi_ok = high is None or (v < high if high_open else v <= high)
        if not (lo_ok and hi_ok):
            lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
            hi = "" if high is None else f"{high}" + (")" if high_open else "]")
            rng = f"in {lo}, {hi}" if low is not None and high is not None else (
                f"{'>' if low_open else '>='} {low}" if low is not None else
                f"{'<' if high_open else '<='} {high}")
            raise argparse.ArgumentTypeError(f"must be {rng}, got {text!r}")
        return v
    parse.__name__ = kind.__name__
    return parse


_pos_int = _number(int, 1)
_nonneg_int = _number(int, 0)
_pos_float = _number(float, 0, low_open=True)
_nonneg_float = _number(float, 0)
_unit = _number(float, 0, 1)
_dropout = _number(float, 0, 1, high_open=True)


def _names(text):
    names = [v.strip() for v in text.split(",")]
    if not text.strip() or not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names such as a,b, "
                                         f"got {text!r}")
    return names


#: --norm on the command line and the name fit takes.
NORMS = {"scalar": "scalar", "per-feature": "per_feature", "none": "none"}
#: --loss (regression); with a teacher, distill trains the _kd form.
REGRESSION_LOSSES = ("mse", "huber")


# ------------------------------------------------------------------ parser

def _add_common(p, *, data=True, task=True):
    if data:
        csv = ("; or a CSV file with a header row (needs --target-columns)" if task else "")
        p.add_argument("--data", metavar="DIR|FILE.npz|FILE.csv" if task else "DIR|FILE.npz",
                       help="dataset: a directory of MNIST-format IDX files, an .npz with "
                            "X_train, y_train, X_test, y_test (or X, y), or a directory of "
                            "those four .npy files (memory-mapped: the images may exceed "
                            f"memory){csv} (default: Fashion-MNIST from "
                            "/usr/share/datasets/fashion-mnist)")
        if task:
            _add_data_options(p)
    p.add_argument("--backend", choices=("fortran", "numpy"), default="fortran",
                   help="run the compute in Fortran (default) or in NumPy")
    p.add_argument("--threads", type=_pos_int, metavar="N",
                   help="limit BLAS/OpenMP threads (same seed and threads: same bits)")
    p.add_argument("--report", metavar="FILE.json",
                   help="write accuracy, size, timings and configuration as JSON "
                        "(- : to stdout; the result lines then go to stderr)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch output")
    _add_debug(p)


def _add_data_options(p):
    """--task, --target-columns, --test-data, --test-fraction (and --seed for
    the split, when the command has no --seed)."""
    p.add_argument("--task", choices=TASKS, default=None,
                   help="classification (integer labels) or regression (float targets) "
                        "(default: from the data: float targets are a regression)")
    p.add_argument("--target-columns", type=_names, metavar="NAME[,NAME...]",
                   help="CSV: the header names of the target columns (required for a CSV "
                        "file); every other column is a feature")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--test-data", metavar="FILE.csv",
                   help="CSV: the test split, a file with the same columns as --data")
    g.add_argument("--test-fraction", type=_number(float, 0, 1, low_open=True,
                                                   high_open=True), metavar="F",
                   help="hold out a fraction F of the rows of a dataset without a test split "
                        "(CSV, or an .npz with X, y) as the test split, chosen by --seed")
    if "--seed" not in p._option_string_actions:
        p.add_argument("--seed", type=_nonneg_int, default=0,
                       help="seed of the --test-fraction split (default: 0; give the training "
                            "run's)")


def _add_regression(p):
    g = p.add_argument_group("regression (float targets)")
    g.add_argument("--loss", choices=REGRESSION_LOSSES, default=None,
                   help="mse (default) or huber; distill with a teacher trains mse_kd or "
                        "huber_kd: alpha * loss(student, y) + (1 - alpha) * loss(student, "
                        "teacher)")
    g.add_argument("--huber-delta", type=_pos_float, default=None, metavar="D",
                   help="Huber threshold in normalised target units (default: 1); needs "
                        "--loss huber")
    p.add_argument("--norm", choices=tuple(NORMS), default=None,
                   help="input normalisation: one mean/std for all features (scalar, the "
                        "classification default) or one per feature (per-feature, the "
                        "regression default; regression targets are normalised per output)")


def _add_mpi(p):
    from ..distributed import DEFAULT_TIMEOUT
    p.add_argument("--mpi-timeout", type=_pos_float, default=DEFAULT_TIMEOUT, metavar="S",
                   help="under mpirun: abort the job (exit code 3) when a rank waits longer "
                        f"than S seconds for the others (default: {DEFAULT_TIMEOUT:g})")


def _add_debug(p, default=argparse.SUPPRESS):
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, print the traceback too (also: PYKD_DEBUG=1)")


def _add_classes(p):
    p.add_argument("--classes", type=_number(int, 1, MAX_CLASSES), metavar="N",
                   help="number of classes (default: the largest training label + 1; at "
                        f"most {MAX_CLASSES}); every label must be in [0, N)")


def _add_training(p, *, hidden, epochs, out):
    p.add_argument("--hidden", type=_hidden, default=hidden, metavar="W1,W2,...",
                   help=f"hidden layer widths (default: {','.join(map(str, hidden))})")
    p.add_argument("--epochs", type=_pos_int, default=epochs,
                   help=f"training epochs, >= 1 (default: {epochs})")
    p.add_argument("--batch-size", type=_pos_int, default=DEMO["batch_size"],
                   help=f"batch size (default: {DEMO['batch_size']}); one larger than the "
                        "training set means one batch of the whole set (with a warning)")
    p.add_argument("--lr", type=_pos_float, default=DEMO["lr"],
                   help=f"learning rate (default: {DEMO['lr']:g})")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="constant: --lr throughout; exponential: --lr x GAMMA^e in epoch e "
                        "(needs --lr-decay); cosine: per optimizer step, a half cosine from "
                        "--lr to 0 over the whole run (default: exponential if --lr-decay is "
                        "given, else constant)")
    p.add_argument("--lr-decay", type=_number(float, 0, 1, low_open=True), default=None,
                   metavar="GAMMA", help="multiply the learning rate by GAMMA after every "
                                         "epoch (the exponential schedule)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="adam (default) or sgd with momentum")
    p.add_argument("--momentum", type=_nonneg_float, default=None,
                   help="SGD momentum (default: 0.9); only with --optimizer sgd")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.0,
                   help="L2 weight decay added to the gradient (default: 0)")
    p.add_argument("--dropout", type=_dropout, default=0.0,
                   help="dropout probability on hidden layers (default: 0)")
    p.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of initialisation, shuffling and dropout (default: 0)")
    p.add_argument("--out", default=out, metavar="MODEL",
                   help=f"where to save the trained model (default: {out})")
    p.add_argument("--checkpoint", metavar="FILE.npz",
                   help="checkpoint file, written every epoch and on Ctrl-C "
                        "(default: MODEL.ckpt.npz)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint (ends at the same weights as an "
                        "uninterrupted run)")
    p.add_argument("--plot", metavar="FILE.png", help="draw training curves (needs matplotlib)")
    _add_classes(p)


def _add_pruning(p):
    g = p.add_argument_group(
        "pruning while training",
        "Gradual magnitude pruning (Zhu & Gupta cubic schedule) of all weights together, "
        "counted in optimizer steps: after step t in [START, END] with (t - START) % EVERY "
        "== 0 (and at END), the sparsity is S + (S0 - S) (1 - (t - START) / (END - START))^3. "
        "Pruned weights and their optimizer moments stay exactly zero; the checkpoint holds "
        "the mask.")
    g.add_argument("--prune-to", type=_number(float, 0, 1, high_open=True), metavar="S",
                   help="final sparsity, the fraction of weights removed (biases are kept)")
    g.add_argument("--prune-from", type=_number(float, 0, 1, high_open=True), metavar="S0",
                   help="sparsity at the first pruning step (default: 0)")
    g.add_argument("--prune-start", type=_nonneg_int, metavar="STEP",
                   help="first pruning step (default: 0, before the first optimizer step)")
    g.add_argument("--prune-end", type=_nonneg_int, metavar="STEP",
                   help="last pruning step, where S is reached (default: the last step)")
    g.add_argument("--prune-every", type=_pos_int, metavar="STEPS",
                   help="optimizer steps between pruning steps (default: 100)")


def _add_kd(p):
    p.add_argument("--temperature", "-T", type=_pos_float, default=DEMO["temperature"],
                   help=f"distillation temperature (default: {DEMO['temperature']:g}); "
                        "classification only")
    p.add_argument("--alpha", type=_unit, default=DEMO["alpha"],
                   help="weight of the hard-label (regression: target) loss; 1 - alpha "
                        f"weights the teacher term (default: {DEMO['alpha']:g})")


def build_parser():
    parser = _Parser(
        prog="pykd",
        description="Knowledge distillation with Fortran kernels: train a teacher, make soft "
                    "labels, distill a small student, compare.",
        epilog="Exit codes: 0 ok, 1 training failed (NaN/inf loss), 2 bad input or a failure "
               "of the environment (one line on stderr naming the file; --debug adds the "
               "traceback), 130 interrupted (resume with --resume).")
    parser.add_argument("--version", action="version", version=f"pykd {__version__}")
    _add_debug(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train-teacher", help="train a model on the labels (cross-entropy) "
                                             "or on regression targets (MSE, Huber)",
                       description="Train an MLP on the labels with cross-entropy, or on float "
                                   "targets with --loss mse|huber.")
    _add_training(p, hidden=DEMO["teacher_hidden"], epochs=DEMO["teacher_epochs"],
                  out="teacher.pykd")
    _add_regression(p)
    _add_pruning(p)
    _add_common(p)
    _add_mpi(p)
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("soft-labels", help="save a teacher's logits for the training set (.npy)",
                       description="Teacher logits (unscaled; the temperature is applied in "
                                   "the distillation loss) for the transfer set, as .npy.")
    p.add_argument("--teacher", required=True, metavar="MODEL", help="teacher model file")
    p.add_argument("--out", required=True, metavar="FILE.npy", help="output file")
    p.add_argument("--split", choices=("train", "test"), default="train",
                   help="which split to label (default: train, the transfer set)")
    p.add_argument("--temperature", "-T", type=_pos_float, default=DEMO["temperature"],
                   help="accepted for symmetry with distill; logits are saved unscaled")
    _add_common(p)
    _add_mpi(p)
    p.set_defaults(func=cmd_soft_labels)

    p = sub.add_parser("distill", help="train a student from a teacher (Hinton KD, hints)",
                       description="Train a student with the Hinton distillation loss against "
                                   "a teacher model or a file of teacher logits, optionally "
                                   "plus a hint (FitNets) term.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--teacher", metavar="MODEL", help="teacher model file")
    src.add_argument("--teacher-logits", metavar="FILE.npy",
                     help="teacher logits for the training set, shape (n_train, classes)")
    src.add_argument("--teacher-outputs", metavar="FILE.npy",
                     help="regression: the teacher's outputs for the training set in physical "
                          "units, shape (n_train, outputs) (pykd soft-labels writes them)")
    _add_kd(p)
    p.add_argument("--hint-student-layer", type=_nonneg_int, default=0, metavar="K",
                   help="add a hint term on the student's hidden layer K (1-based; 0: off)")
    p.add_argument("--hint-teacher-layer", type=_pos_int, metavar="J",
                   help="the teacher's hidden layer to match (default: the teacher's last "
                        "hidden layer); needs --teacher")
    p.add_argument("--hint-weight", type=_nonneg_float, default=None,
                   help="weight of the hint MSE term (default: 1); needs --hint-student-layer")
    _add_training(p, hidden=DEMO["student_hidden"], epochs=DEMO["student_epochs"],
                  out="student.pykd")
    _add_regression(p)
    p.add_argument("--init", metavar="MODEL",
                   help="continue from this student instead of a fresh initialisation (its "
                        "activations and input normalisation are kept); --hidden is taken "
                        "from it, and if given must match it")
    p.set_defaults(hidden=None)        # None: DEMO's, or the --init model's
    _add_pruning(p)
    _add_common(p)
    _add_mpi(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("evaluate", help="accuracy, loss, confusion matrix, size of a model",
                       description="Evaluate a model on the test split.")
    p.add_argument("--model", required=True, metavar="MODEL", help="model file")
    p.add_argument("--teacher", metavar="MODEL", help="also report top-1 agreement with this model")
    p.add_argument("--split", choices=("train", "test"), default="test",
                   help="which split to evaluate (default: test)")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    # Commands that live in their own modules of pykd.cli; each has
    # register(sub), which adds its parser and sets func.
    for module in _command_modules():
        module.register(sub)
    _config.install(parser)          # --config FILE.toml on every command
    return parser


# ----------------------------------------------------------------- helpers

_log = logging.getLogger(__name__)


class _StderrHandler(logging.Handler):
    """Each record as one plain line on the *current* ``sys.stderr`` (so a
    redirection or a test's capture set after the handler sees it too)."""

    def emit(self, record):
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # pragma: no cover - a closed stderr
            self.handleError(record)


@contextlib.contextmanager
def _log_to_stderr(quiet):
    """While a command runs: the ``pykd`` loggers (the library's per-epoch
    lines, the command's own messages) write to stderr, INFO and up, or
    WARNING and up with ``--quiet``. Restored afterwards (main may run many
    times in one process)."""
    root = logging.getLogger("pykd")
    handler = _StderrHandler()
    saved = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False          # an application's own root handler would print twice
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


class _Ctx:
    """What a command needs besides its options: output and the report."""

    def __init__(self, args, dist=None):
        self.args = args
        self.quiet = args.quiet
        self.models = []          # report entries
        self.histories = {}       # name -> history, for --plot
        self.stdout = sys.stdout  # where --report - goes (the result lines then go to stderr)
        self.dist = dist          # pykd.distributed.Comm under mpirun, else None
        self.root = dist is None or dist.is_root   # rank 0 alone prints and writes
        self.ranks = 1 if dist is None else dist.size

    def info(self, msg):
        """A progress message (INFO: hidden by --quiet)."""
        if self.root:
            _log.info(msg)

    def warn(self, msg):
        if self.root:
            _log.warning(f"pykd {self.args.command}: warning: {msg}")


def _data_path(args):
    return os.fspath(args.data) if args.data else os.fspath(DEFAULT_DATA_DIR)


def _load_data(args, ctx, *, tasks=TASKS, check=True):
    """The dataset of --data and its options; with ``check``, the options
    that have no effect on its task refused and the task's defaults filled
    (:func:`_task_options`)."""
    t = time.perf_counter()
    if args.data is not None and os.path.exists(args.data) and not (
            os.path.isdir(args.data) or os.path.isfile(args.data)):
        raise CLIError(f"{args.data}: the dataset (--data) is neither a directory nor a regular "
                       "file (a FIFO, socket or device?)")
    csv = args.data is not None and os.fspath(args.data).lower().endswith(".csv")
    kw = {k: getattr(args, k, None) for k in ("task", "target_columns", "test_data",
                                              "test_fraction")}
    if not csv:
        for key in ("target_columns", "test_data"):
            if kw[key] is not None:
                raise CLIError(f"--{key.replace('_', '-')} is for a CSV dataset (--data "
                               f"FILE.csv); the dataset is {_data_path(args)}")
    if kw["test_data"] is not None:
        _input_file(kw["test_data"], "test data (--test-data)")
    with warnings.catch_warnings(record=True) as caught:   # each a one-line warning
        warnings.simplefilter("always", IntegerTargetsWarning)
        ds = load_dataset(args.data, seed=getattr(args, "seed", None) or 0, **kw)
    for w in caught:
        ctx.warn(str(w.message))
    if ds.X_train.shape[0] == 0:
        raise CLIError(f"{_data_path(args)}: the training set is empty")
    if ds.task not in tasks:
        raise CLIError(f"{_data_path(args)}: pykd {args.command} is for "
                       f"{' or '.join(tasks)}, and the data is a {ds.task} set"
                       + (" (float targets; --task classification if they are labels)"
                          if ds.task == "regression" else ""))
    if check:
        _task_options(args, ds.task)
    ctx.info(f"data: {ds!r} ({time.perf_counter() - t:.1f} s)")
    return ds


def _given(args, dest):
    """Whether option ``dest`` was given (on the command line or in --config)."""
    return dest in getattr(args, "_explicit", ()) and getattr(args, dest, None) is not None


def _opt_name(dest):
    return {"temperature": "-T/--temperature"}.get(dest, "--" + dest.replace("_", "-"))


#: Options that have no effect on a task: (dest, why), refused when given.
_NOT_FOR = {
    "regression": (
        ("temperature", "regression distillation has no temperature"),
        ("classes", "a regression model has one output per target column"),
        ("teacher_logits", ("for regression give --teacher-outputs FILE.npy (n_train, "
                            "outputs) in physical units, or --teacher MODEL")),
        ("labels", "a regression model predicts values, not classes"),
    ),
    "classification": (
        ("loss", "classification trains with cross-entropy (KD with a teacher)"),
        ("huber_delta", "classification trains with cross-entropy"),
        ("teacher_outputs", ("for classification give --teacher-logits FILE.npy or "
                             "--teacher MODEL")),
    ),
}


def _task_options(args, task):
    """Refuse the options that have no effect on ``task`` (one line naming
    the option), fill the task's defaults (--loss mse, --huber-delta 1,
    --norm per-feature for regression and scalar for classification) and
    record them in the report's ``configuration``."""
    for dest, why in _NOT_FOR[task]:
        if _given(args, dest):
            raise CLIError(f"{_opt_name(dest)} has no effect on a {task} task: {why}")
    if getattr(args, "huber_delta", None) is not None and getattr(args, "loss", None) != "huber":
        raise CLIError(f"--huber-delta applies to --loss huber only (the loss is "
                       f"{getattr(args, 'loss', None) or 'mse'})")
    conf = getattr(args, "_configuration", None)
    fill = {"task": task}
    if task == "regression":
        if hasattr(args, "loss") and getattr(args, "epochs", 1):   # a command that trains
            fill["loss"] = args.loss or "mse"
            if fill["loss"] == "huber":
                fill["huber_delta"] = args.huber_delta or 1.0
        for dest, _ in _NOT_FOR["regression"]:      # defaults that do not apply
            if conf is not None and dest in conf:
                del conf[dest]
    if hasattr(args, "norm"):
        fill["norm"] = args.norm or ("per-feature" if task == "regression" else "scalar")
    for k, v in fill.items():
        if hasattr(args, k):            # an option of this command (demo has no --task)
            setattr(args, k, v)
            if conf is not None:
                conf[k] = v
    return task


def _model_task(model, default=None):
    """A model's task from its metadata's ``task``; a model without one
    (older files, models made outside ``fit``) is a regression model when it
    has an output normalisation, else ``default`` (None: unknown)."""
    meta = model.metadata if isinstance(model.metadata, dict) else {}
    if meta.get("task") in TASKS:
        return meta["task"]
    return "regression" if getattr(model, "out_norm", None) is not None else default


def _warn_split(args, ctx, model, path):
    """Warn when the model was trained on a --test-fraction split other than
    this command's: its test rows may then include training rows."""
    config = _meta_dict(model, "config")
    if "split_seed" not in config or getattr(args, "test_fraction", None) is None:
        return
    if (config.get("test_fraction"), config.get("split_seed")) != (args.test_fraction,
                                                                     args.seed):
        ctx.warn(f"{path} was trained with --test-fraction {config.get('test_fraction')} "
                 f"--seed {config.get('split_seed')}, and this split is --test-fraction "
                 f"{args.test_fraction} --seed {args.seed}: its test rows may include "
                 "training rows")


def _check_model_task(path, model, ds, what="model"):
    """The model's task and outputs match the data (regression: one output
    per target column)."""
    mt = _model_task(model)
    if mt is not None and mt != ds.task:
        raise CLIError(f"{path}: the {what} is a {mt} model but the data is a {ds.task} set"
                       + (" (its targets are floats: --task classification if they are "
                          "class labels)" if ds.task == "regression" else
                          " (--task regression to take integer targets as values)"))
    if ds.task == "regression" and model.n_outputs != ds.n_outputs:
        raise CLIError(f"{path}: the {what} has {_plural(model.n_outputs, 'output')} but the "
                       f"data has {_plural(ds.n_outputs, 'target column')}")


def _check_labels(source, split, y, n_classes, whose):
    """Every label of ``y`` in [0, n_classes), or a CLIError naming the file."""
    if y.size and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        bad = int(y[(y < 0) | (y >= n_classes)][0])
        raise CLIError(f"{source}: {split} label {bad} is outside {whose} "
                       f"{_plural(n_classes, 'class', 'classes')} "
                       f"(labels must be in [0, {n_classes}))")


def _n_classes(args, ds):
    """The number of classes: the training set's largest label + 1, unless
    ``--classes N`` says otherwise, at most MAX_CLASSES; a training or test
    label outside it is an error naming the dataset."""
    source = _data_path(args)
    top = int(ds.y_train.max())
    given = getattr(args, "classes", None)
    if given is None:
        if top + 1 > MAX_CLASSES:
            raise CLIError(f"{source}: the training labels go up to {top}, but at most "
                           f"{MAX_CLASSES} classes are supported")
        n, whose = top + 1, "the training set's"
    else:
        n, whose = given, "the --classes"
        _check_labels(source, "training", ds.y_train, n, whose)
    _check_labels(source, "test", ds.y_test, n, whose)
    return n


def _input_file(path, what):
    """Refuse a missing input, a directory, a FIFO or a device before opening it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CLIError(f"{what} file {path} does not exist") from None
    except OSError as e:
        raise CLIError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CLIError(f"{path}: the {what} file is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise CLIError(f"{path}: the {what} file is not a regular file (a FIFO, socket or "
                       "device?)")


def _check_output(path, what, option):
    """Refuse, before any work, an output that cannot be written: a
    directory, something that is not a regular file, a missing or unwritable
    directory."""
    path = os.fspath(path)
    if not path:
        raise CLIError(f"{option}: the {what} path is empty")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise CLIError(f"{path}: cannot write the {what} ({e.strerror or e})") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise CLIError(f"{path}: the {what} ({option}) is a directory; give a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise CLIError(f"{path}: the {what} ({option}) exists and is not a regular file")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CLIError(f"cannot write the {what} {path} ({option}): directory {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write the {what} {path} ({option}): directory {d} is not "
                       "writable")


def _check_out_dir_tree(path, option):
    """An output directory (demo --out): an existing writable directory, or
    creatable under the nearest existing, writable ancestor."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise CLIError(f"{path}: {option} must be a directory, and this is a file")
        if not os.access(path, os.W_OK | os.X_OK):
            raise CLIError(f"{path}: the {option} directory is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"cannot create the {option} directory {path}: {parent} is not a "
                       "writable directory")


def _check_outputs(args, outputs):
    """Check every output (``[(path, what, option)]``, None paths skipped),
    --report and --plot, and that no two of them are the same file."""
    outputs = [o for o in outputs if o[0] is not None]
    if getattr(args, "report", None) is not None and args.report != "-":
        outputs.append((args.report, "report", "--report"))
    if getattr(args, "plot", None) is not None:
        outputs.append((args.plot, "plot", "--plot"))
    seen = {}
    for path, what, option in outputs:
        _check_output(path, what, option)
        key = os.path.realpath(path)
        if key in seen:
            raise CLIError(f"{option} and {seen[key]} are the same file ({path}); give "
                           "different paths")
        seen[key] = option


@contextlib.contextmanager
def _writing(path, what):
    """Name the target (not a temporary file, not nothing) in a write error."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"cannot write the {what} ({e.strerror or e})",
                      os.fspath(path)) from e


def _meta_dict(model, key):
    """A metadata entry that should be a dict (a model file's metadata is free
    JSON: anything else is treated as absent)."""
    meta = model.metadata if isinstance(model.metadata, dict) else {}
    value = meta.get(key)
    return value if isinstance(value, dict) else {}


def _check_plot(args):
    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib, which is not installed; install it with "
                           "`pip install matplotlib`, or drop "
                           "--plot") from None


def _load_model_checked(path, n_features, what="model", backend="fortran"):
    _input_file(path, what)
    model = load_model(path, backend=backend)
    if model.n_features != n_features:
        raise CLIError(f"{path}: the {what} takes {_plural(model.n_features, 'input')} but the "
                       "data has "
                       f"{_plural(n_features, 'feature')}")
    return model


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.generic):
        return _nan_to_none(obj.item())
    return obj


def _write_json(path, obj, stdout=None):
    text = json.dumps(_nan_to_none(obj), indent=2) + "\n"
    if path == "-":
        (stdout or sys.stdout).write(text)
        (stdout or sys.stdout).flush()
        return
    with _writing(path, "report"):
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _save_npy(path, array, what="logits file"):
    with _writing(path, what):
        atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _threads_info():
    try:
        from threadpoolctl import threadpool_info
        return sorted({(p.get("internal_api"), p.get("num_threads")) for p in threadpool_info()})
    except Exception:  # pragma: no cover
        return None


def _model_info(model, path=None):
    """What a report says about a model: file size, counts and its layers."""
    net = model.to_model()
    size = None
    if path is not None and os.path.isfile(path):
        size = os.path.getsize(path)
    return {
        "bytes_on_disk": size,
        "parameters": model.parameters,
        "nonzeros": model.nonzeros,
        "layers": [{"kind": layer.kind, "activation": layer.activation, "n_in": layer.n_in,
                    "n_out": layer.n_out} for layer in net.layers],
    }


#: The regression metrics of evaluate() a report entry carries, as test_<name>.
REGRESSION_METRICS = ("rmse", "r2", "mae", "rmse_per_output", "r2_per_output",
                      "mae_per_output")


def _entry(name, model, ev, history, config, path=None):
    seconds = list(history.get("seconds", [])) if history else []
    if "rmse" in ev:                       # regression
        return {
            "name": name,
            "path": None if path is None else os.fspath(path),
            "task": "regression",
            "test_accuracy": None,
            **{f"test_{k}": ev[k] for k in REGRESSION_METRICS if k in ev},
            "test_loss": ev.get("loss"),
            "agreement": None,
            **_model_info(model, path),
            "bytes": model.nbytes,
            "seconds_per_epoch": seconds,
            "config": config,
            "history": history,
        }
    return {
        "name": name,
        "path": None if path is None else os.fspath(path),
        "test_accuracy": ev["accuracy"],
        "test_loss": ev["loss"],
        "agreement": ev.get("agreement"),
        **_model_info(model, path),
        "bytes": model.nbytes,
        "seconds_per_epoch": seconds,
        "confusion": ev["confusion"],
        "config": config,
        "history": history,
    }


def _train(ctx, name, sizes, ds, cfg, *, epochs, batch_size, seed, out, checkpoint, resume,
           backend, teacher=None, teacher_logits=None, hint_teacher_layer=None, role,
           extra_config=None, lr_decay=1.0, lr_schedule=None, prune=None, init=None,
           teacher_outputs=None, norm=None):
    """Train (or, when resuming a finished phase of the demo, reuse) one model;
    save it with its history and configuration; return the report entry."""
    if lr_schedule is None:            # fit's rule, written out for the model's metadata
        lr_schedule = "exponential" if lr_decay != 1 else "constant"
    config = {"role": role, "sizes": sizes, "epochs": epochs, "batch_size": batch_size,
              "seed": seed, "backend": backend, "dataset": ds.name, "lr_decay": lr_decay,
              "lr_schedule": lr_schedule,
              "n_train": int(ds.X_train.shape[0]), "train": _cfg_json(cfg)}
    config.update(extra_config or {})
    if prune is not None:
        config["prune"] = prune.to_dict()
    model = MLP(sizes, seed=seed, backend=backend) if init is None else init
    hint_targets = None
    if cfg.hint_layer:
        t = time.perf_counter()
        hint_targets = hint_targets_from(teacher, ds.X_train, hint_teacher_layer, backend=backend)
        ctx.info(f"{name}: teacher features of layer {hint_teacher_layer} for the hint "
                 f"({time.perf_counter() - t:.1f} s)")
    has_test = ds.X_test.shape[0] > 0
    n_train = int(ds.X_train.shape[0])
    if batch_size > n_train:
        ctx.warn(f"--batch-size {batch_size} is larger than the training set "
                 f"({_plural(n_train, 'row')}): "
                 f"every epoch of {name} is one batch of all {_plural(n_train, 'row')}")
    ctx.info(f"{name}: training {'-'.join(map(str, sizes))} ({model.parameters:,} parameters) "
             f"for {_plural(epochs, 'epoch')}" + (" (resuming)" if resume else ""))
    regression = getattr(ds, "task", "classification") == "regression"
    kw = {} if teacher_outputs is None else {"teacher_outputs": teacher_outputs}
    # scalar is fit's own default for classification: leave its run as it was
    fit_norm = NORMS[norm] if norm is not None and (regression or norm != "scalar") else None
    with warnings.catch_warnings():    # a warning of fit: one line, like the CLI's own
        warnings.showwarning = lambda message, *a, **k: ctx.warn(str(message))
        run_config = RunConfig(step=cfg, epochs=epochs, batch_size=batch_size, backend=backend,
                               seed=seed, lr_decay=lr_decay, lr_schedule=lr_schedule,
                               prune=prune, norm=fit_norm)
        history = fit(model, ds.X_train, ds.y_train, config=run_config,
                      teacher_logits=teacher_logits,
                      hint_targets=hint_targets, X_val=ds.X_test if has_test else None,
                      y_val=ds.y_test if has_test else None, checkpoint=checkpoint,
                      resume=resume, progress=not ctx.quiet, desc=name, comm=ctx.dist, **kw)
    if not ctx.root:                   # rank 0 evaluates, saves and reports
        return model, None
    agree_with = teacher if teacher is not None and not regression else None
    ev = (regression_eval(model, ds.X_test, ds.y_test, backend=backend) if regression else
          evaluate(model, ds.X_test, ds.y_test, teacher=agree_with)) if has_test else \
        _empty_eval(model, regression)
    result = ({"test_rmse": ev["rmse"] if has_test else None,
               "test_r2": ev["r2"] if has_test else None} if regression else
              {"test_accuracy": ev["accuracy"] if has_test else None})
    model.metadata.update({"role": role, "config": config, "history": history, **result,
                           "pykd_version": __version__})
    if regression:
        model.metadata["task"] = "regression"
        if ds.target_names is not None:
            model.metadata["targets"] = list(ds.target_names)
    with _writing(out, "model"):
        model.save(out)
    ctx.histories[name] = history
    entry = _entry(name, model, ev, history, config, out)
    ctx.models.append(entry)
    spe = history["seconds"]
    if ctx.args.command == "demo":     # the other commands print a result line
        ctx.info(f"{name}: test accuracy {_pct(ev['accuracy'])}, "
                 f"{statistics.median(spe) if spe else float('nan'):.2f} s/epoch; saved {out}")
    return model, entry


def _empty_eval(model, regression=False):
    nan = float("nan")
    if regression:
        k = model.n_outputs
        return {"rmse": nan, "r2": nan, "mae": nan, "rmse_per_output": [nan] * k,
                "r2_per_output": [nan] * k, "mae_per_output": [nan] * k, "loss": nan,
                "parameters": model.parameters, "bytes": model.nbytes, "n": 0}
    return {"accuracy": nan, "loss": nan, "confusion": [], "agreement": None,
            "parameters": model.parameters, "bytes": model.nbytes, "n": 0}


def _cfg_json(cfg):
    import dataclasses
    return dataclasses.asdict(cfg)


def _num(v, spec=".4g"):
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def _pct(v):
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"


def _fmt_bytes(n):
    for unit, div in (("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _finish(ctx, extra=None):
    args = ctx.args
    if not ctx.root:
        return 0
    if getattr(args, "plot", None) and ctx.histories:
        _plot(ctx.histories, args.plot)
        ctx.info(f"training curves: {args.plot}")
    if args.report:
        report = {"pykd_version": __version__, "command": args.command,
                  "argv": sys.argv[1:], "backend": getattr(args, "backend", None),
                  "threads": _threads_info(), "ranks": ctx.ranks, "models": ctx.models,
                  "configuration": getattr(args, "_configuration", None)}
        if extra:
            report.update(extra)
        _write_json(args.report, report, ctx.stdout)
        if args.report != "-":
            ctx.info(f"report: {args.report}")
    return 0


def _plot(histories, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    groups = {"kd_student": ("C1", "KD student"), "scratch_student": ("C2", "scratch student")}
    labelled = set()
    for i, (name, h) in enumerate(histories.items()):
        color, label = f"C{i % 10}", name
        for prefix, (c, group_label) in groups.items():
            if name.startswith(prefix):     # the demo's seeds: one colour, one legend entry
                color, label = c, group_label
        if label in labelled:
            label = None
        labelled.add(label)
        # markers, so that a one-epoch run shows its point
        ax1.plot(h["epoch"], h["loss"], "o-", color=color, label=label, alpha=0.85, ms=3)
        if any(v is not None for v in h.get("test_rmse", ())):      # regression
            acc = [np.nan if v is None else v for v in h["test_rmse"]]
        else:
            acc = [np.nan if v is None else 100 * v for v in h["test_accuracy"]]
        ax2.plot(h["epoch"], acc, "o-", color=color, label=label, alpha=0.85, ms=3)
    kd = any(name.startswith("kd_") for name in histories)
    ax1.set(xlabel="epoch", ylabel="training loss",
            title="Training loss (KD students: the KD objective)" if kd else "Training loss")
    regression = any(any(v is not None for v in h.get("test_rmse", ()))
                     for h in histories.values())
    ax2.set(xlabel="epoch", ylabel="test RMSE" if regression else "test accuracy (%)",
            title="Test RMSE (mean over outputs)" if regression else "Test accuracy")
    from matplotlib.ticker import MaxNLocator
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _train_cfg(args, *, loss="ce", **kw):
    if args.momentum is not None:
        if args.optimizer != "sgd":
            raise CLIError(f"--momentum applies to --optimizer sgd only (the optimizer is "
                           f"{args.optimizer})")
        kw["momentum"] = args.momentum
    return TrainConfig(loss=loss, optimizer=args.optimizer, lr=args.lr,
                       weight_decay=args.weight_decay, dropout=args.dropout, seed=args.seed, **kw)


def _lr_schedule(args):
    """(schedule, lr_decay) of --lr-schedule and --lr-decay: --lr-decay alone
    means exponential; with constant or cosine it is an error."""
    schedule, decay = args.lr_schedule, args.lr_decay
    if schedule is None:
        schedule = "constant" if decay is None else "exponential"
    if decay is not None and schedule != "exponential":
        raise CLIError(f"--lr-decay is the factor of --lr-schedule exponential, but the "
                       f"schedule is {schedule}; drop --lr-decay or use --lr-schedule "
                       "exponential")
    if schedule == "exponential" and decay is None:
        raise CLIError("--lr-schedule exponential needs --lr-decay GAMMA (the per-epoch "
                       "factor)")
    return schedule, 1.0 if decay is None else decay


def _check_pruning(args):
    """The --prune-* options that need --prune-to, and S0 <= S (before any work)."""
    if args.prune_to is None:
        for flag in ("prune_from", "prune_start", "prune_end", "prune_every"):
            if getattr(args, flag) is not None:
                raise CLIError(f"--{flag.replace('_', '-')} needs --prune-to S (the final "
                               "sparsity)")
        return
    if args.prune_from is not None and args.prune_from > args.prune_to:
        raise CLIError(f"--prune-from {args.prune_from:g} must be <= --prune-to "
                       f"{args.prune_to:g}")
    if args.prune_start is not None and args.prune_end is not None \
            and args.prune_end < args.prune_start:
        raise CLIError(f"--prune-end {args.prune_end} must be >= --prune-start "
                       f"{args.prune_start}")


def _prune_schedule(args, n_train):
    """The PruneSchedule of the --prune-* options, its steps checked against
    the run's optimizer steps; None without --prune-to."""
    if args.prune_to is None:
        return None
    from ..compress.prune import PruneSchedule
    total = args.epochs * -(-n_train // args.batch_size)
    start = args.prune_start or 0
    end = total if args.prune_end is None else args.prune_end
    for flag, v in (("--prune-start", start), ("--prune-end", end)):
        if v > total:
            raise CLIError(f"{flag} {v} is after the run's last optimizer step, {total} "
                           f"(--epochs {args.epochs} x {-(-n_train // args.batch_size)} "
                           f"batches of --batch-size {args.batch_size})")
    if end < start:
        raise CLIError(f"--prune-start {start} is after --prune-end {end}")
    return PruneSchedule(args.prune_to, args.prune_from or 0.0, begin=start, end=end,
                         every=args.prune_every or 100)


def _init_student(args):
    """The --init student as an MLP; sets args.hidden from it (or checks it)."""
    if args.init is None:
        if args.hidden is None:
            args.hidden = list(DEMO["student_hidden"])
        return None
    _input_file(args.init, "student (--init)")
    model = load_model(args.init, backend=args.backend)
    if not isinstance(model, MLP):
        try:
            model = model.to_mlp()
        except ValueError as e:
            raise CLIError(f"{args.init}: cannot continue from this model (--init): "
                           f"{e}") from None
    hidden = list(model.sizes[1:-1])
    if args.hidden is not None and list(args.hidden) != hidden:
        raise CLIError(f"{args.init}: the student's hidden layers are "
                       f"{','.join(map(str, hidden)) or 'none'} but --hidden is "
                       f"{','.join(map(str, args.hidden)) or 'none'}; leave out --hidden to "
                       "take them from --init")
    args.hidden = hidden
    return model.copy()


def _ckpt(args):
    return args.checkpoint or f"{args.out}.ckpt.npz"


def _check_training_files(args):
    """Outputs writable and distinct, and a checkpoint to resume from, before any work."""
    _check_outputs(args, [(args.out, "model", "--out"),
                          (_ckpt(args), "checkpoint", "--checkpoint")])
    if args.resume:
        ckpt = _ckpt(args)
        if not os.path.exists(ckpt):
            raise CLIError(f"no checkpoint at {ckpt} to resume from (--resume); run without "
                           "--resume or give --checkpoint FILE")
        _input_file(ckpt, "checkpoint")


# ---------------------------------------------------------------- commands

def cmd_train_teacher(args, ctx):
    lr_schedule, lr_decay = _lr_schedule(args)
    _check_pruning(args)
    cfg = _train_cfg(args)
    _check_training_files(args)
    ds = _load_data(args, ctx)
    if ds.task == "regression":
        cfg = _train_cfg(args, **_regression_loss(args))
        n_out = ds.n_outputs
    else:
        n_out = _n_classes(args, ds)
    sizes = [ds.n_features, *args.hidden, n_out]
    prune = _prune_schedule(args, ds.X_train.shape[0])
    _train(ctx, "teacher", sizes, ds, cfg, epochs=args.epochs, batch_size=args.batch_size,
           seed=args.seed, out=args.out, checkpoint=_ckpt(args), resume=args.resume,
           backend=args.backend, role="teacher", lr_decay=lr_decay, lr_schedule=lr_schedule,
           prune=prune, extra_config=_data_config(args, ds), norm=args.norm)
    _print_result(ctx)
    return _finish(ctx)


def cmd_soft_labels(args, ctx):
    _check_outputs(args, [(args.out, "logits file", "--out")])
    _input_file(args.teacher, "teacher")
    ds = _load_data(args, ctx, check=False)     # the teacher's task decides, not the data's
    teacher = _load_model_checked(args.teacher, ds.n_features, "teacher", args.backend)
    task = _task_options(args, _model_task(teacher, "classification"))
    X = ds.X_train if args.split == "train" else ds.X_test
    t = time.perf_counter()
    what = ("teacher outputs (physical units)" if task == "regression" else
            "teacher logits (unscaled)")
    if ctx.dist is None:
        logits = soft_labels(teacher, X, args.temperature, backend=args.backend,
                             progress=not ctx.quiet)
        seconds = time.perf_counter() - t
        _save_npy(args.out, logits, "outputs file" if task == "regression" else "logits file")
        shape = logits.shape
    else:    # each rank writes its rows into one memory-mapped .npy: never gathered
        from .. import distributed
        shape = distributed.soft_labels(ctx.dist, teacher, X, backend=args.backend,
                                        out=args.out)
        seconds = time.perf_counter() - t
        if not ctx.root:
            return 0
    ranks = "" if ctx.ranks == 1 else f" on {ctx.ranks} MPI ranks"
    print(f"soft labels: {shape[0]} x {shape[1]} {what} of the "
          f"{args.split} split in {seconds:.2f} s{ranks} -> {args.out}")
    if args.report:
        ctx.models.append({"name": "teacher", "path": args.teacher,
                           **_model_info(teacher, args.teacher), "bytes": teacher.nbytes,
                           "config": teacher.metadata.get("config")})
    return _finish(ctx, {"soft_labels": {"path": args.out, "shape": list(shape),
                                         "split": args.split, "task": task,
                                         "seconds": seconds}})


def cmd_distill(args, ctx):
    lr_schedule, lr_decay = _lr_schedule(args)
    _check_pruning(args)
    if args.hint_weight is not None and not args.hint_student_layer:
        raise CLIError("--hint-weight needs --hint-student-layer K (there is no hint term "
                       "without it)")
    init = _init_student(args)
    if args.hint_teacher_layer is not None and args.teacher is None:
        raise CLIError("--hint-teacher-layer needs --teacher MODEL (a logits file has no "
                       "hidden layers)")
    if args.hint_teacher_layer is not None and not args.hint_student_layer:
        raise CLIError("--hint-teacher-layer needs --hint-student-layer K")
    if args.hint_student_layer and args.teacher is None:
        raise CLIError("hint distillation (--hint-student-layer) needs --teacher MODEL: "
                       "the teacher's hidden features are not in a logits file")
    n_hidden = len(args.hidden)
    if args.hint_student_layer > n_hidden:
        raise CLIError(f"--hint-student-layer must be a hidden layer of the student, in "
                       f"[1, {n_hidden}], got {args.hint_student_layer}")
    _check_training_files(args)
    if args.teacher:
        _input_file(args.teacher, "teacher")
    elif args.teacher_outputs:
        _input_file(args.teacher_outputs, "teacher outputs")
    else:
        _input_file(args.teacher_logits, "teacher logits")
    ds = _load_data(args, ctx)
    if ds.task == "regression":
        return _distill_regression(args, ctx, ds, init, lr_schedule, lr_decay)
    n = ds.X_train.shape[0]
    n_classes = _n_classes(args, ds)
    teacher = None
    t = time.perf_counter()
    if args.teacher:
        teacher = _load_model_checked(args.teacher, ds.n_features, "teacher", args.backend)
        _check_model_task(args.teacher, teacher, ds, "teacher")
        if teacher.n_outputs != n_classes:
            hint = (f"; pass --classes {teacher.n_outputs} if the training set lacks its top "
                    "classes" if teacher.n_outputs > n_classes and args.classes is None else "")
            raise CLIError(f"{args.teacher}: the teacher has "
                           f"{_plural(teacher.n_outputs, 'output')} but the data has "
                           f"{_plural(n_classes, 'class', 'classes')}{hint}")
        logits = soft_labels(teacher, ds.X_train, args.temperature, backend=args.backend,
                             progress=not ctx.quiet, comm=ctx.dist)
        ctx.info(f"soft labels from {args.teacher}: {time.perf_counter() - t:.1f} s")
    else:
        logits = _load_logits(args.teacher_logits, n, n_classes)
    hint_teacher_layer = None
    extra = {"temperature": args.temperature, "alpha": args.alpha,
             "teacher": args.teacher, "teacher_logits": args.teacher_logits}
    hint_teacher_layer = _hint_layers(args, teacher, extra)
    cfg = _train_cfg(args, loss="kd", temperature=args.temperature, alpha=args.alpha,
                     hint_layer=args.hint_student_layer,
                     **({"hint_weight": args.hint_weight} if args.hint_weight is not None
                        else {}))
    sizes = [ds.n_features, *args.hidden, n_classes]
    if init is not None:
        _check_init(args, init, ds, n_classes)
        extra["init"] = args.init
    extra.update(_data_config(args, ds))
    prune = _prune_schedule(args, n)
    _train(ctx, "student", sizes, ds, cfg, epochs=args.epochs, batch_size=args.batch_size,
           seed=args.seed, out=args.out, checkpoint=_ckpt(args), resume=args.resume,
           backend=args.backend, teacher=teacher, teacher_logits=logits,
           hint_teacher_layer=hint_teacher_layer, role="student", extra_config=extra,
           lr_decay=lr_decay, lr_schedule=lr_schedule, prune=prune, init=init,
           norm=args.norm)
    _print_result(ctx)
    return _finish(ctx)


def _hint_layers(args, teacher, extra):
    """The teacher's hint layer (None without a hint term); records the hint
    settings in ``extra``."""
    if not args.hint_student_layer:
        return None
    t_hidden = len(teacher.sizes) - 2
    hint_teacher_layer = args.hint_teacher_layer or t_hidden
    if not 1 <= hint_teacher_layer <= t_hidden:
        raise CLIError(f"--hint-teacher-layer must be a hidden layer of the teacher, in "
                       f"[1, {t_hidden}], got {hint_teacher_layer}")
    extra.update(hint_student_layer=args.hint_student_layer,
                 hint_teacher_layer=hint_teacher_layer,
                 hint_weight=1.0 if args.hint_weight is None else args.hint_weight)
    return hint_teacher_layer


def _check_init(args, init, ds, n_out):
    if init.n_features != ds.n_features:
        raise CLIError(f"{args.init}: the student takes "
                       f"{_plural(init.n_features, 'input')} but the "
                       f"data has {_plural(ds.n_features, 'feature')}")
    if init.n_outputs != n_out:
        what = (_plural(n_out, 'target column') if ds.task == "regression"
                else _plural(n_out, 'class', 'classes'))
        raise CLIError(f"{args.init}: the student has "
                       f"{_plural(init.n_outputs, 'output')} but the "
                       f"data has {what}")


def _regression_loss(args, kd=False):
    """TrainConfig keywords of --loss/--huber-delta (and --alpha with a teacher)."""
    kw = {"loss": args.loss + ("_kd" if kd else "")}
    if args.loss == "huber":
        kw["huber_delta"] = args.huber_delta
    if kd:
        kw["alpha"] = args.alpha
    return kw


def _data_config(args, ds):
    """What a model's ``config`` metadata records about the data: the task,
    the CSV's column names, the split."""
    out = {"task": ds.task, "norm": getattr(args, "norm", None)}
    if ds.target_names is not None:
        out.update(targets=list(ds.target_names), features=list(ds.feature_names))
    if getattr(args, "test_fraction", None) is not None:
        out.update(test_fraction=args.test_fraction, split_seed=args.seed)
    if getattr(args, "test_data", None) is not None:
        out["test_data"] = args.test_data
    return out


def _distill_regression(args, ctx, ds, init, lr_schedule, lr_decay):
    """distill on float targets: mse_kd or huber_kd against a teacher model's
    outputs or a --teacher-outputs file, in physical units."""
    n, n_out = ds.X_train.shape[0], ds.n_outputs
    teacher = None
    if args.teacher:
        teacher = _load_model_checked(args.teacher, ds.n_features, "teacher", args.backend)
        _check_model_task(args.teacher, teacher, ds, "teacher")
        t = time.perf_counter()
        outputs = soft_labels(teacher, ds.X_train, backend=args.backend,
                              progress=not ctx.quiet, comm=ctx.dist)
        ctx.info(f"teacher outputs from {args.teacher}: {time.perf_counter() - t:.1f} s")
    else:
        outputs = _load_logits(args.teacher_outputs, n, n_out, what="teacher outputs",
                               columns="outputs")
    extra = {"alpha": args.alpha, "teacher": args.teacher,
             "teacher_outputs": args.teacher_outputs}
    hint_teacher_layer = _hint_layers(args, teacher, extra)
    cfg = _train_cfg(args, **_regression_loss(args, kd=True),
                     hint_layer=args.hint_student_layer,
                     **({"hint_weight": args.hint_weight} if args.hint_weight is not None
                        else {}))
    if init is not None:
        _check_init(args, init, ds, n_out)
        extra["init"] = args.init
    extra.update(_data_config(args, ds))
    _train(ctx, "student", [ds.n_features, *args.hidden, n_out], ds, cfg, epochs=args.epochs,
           batch_size=args.batch_size, seed=args.seed, out=args.out, checkpoint=_ckpt(args),
           resume=args.resume, backend=args.backend, teacher=teacher, teacher_outputs=outputs,
           hint_teacher_layer=hint_teacher_layer, role="student", extra_config=extra,
           lr_decay=lr_decay, lr_schedule=lr_schedule,
           prune=_prune_schedule(args, n), init=init, norm=args.norm)
    _print_result(ctx)
    return _finish(ctx)


def _load_logits(path, n, n_classes, what="teacher logits", columns="classes"):
    """Teacher logits (n, n_classes) (or outputs: ``what``, ``columns``) from
    an .npy file, its header checked against its size before anything is
    read; float32, finite."""
    _input_file(path, what)
    try:
        logits = _io.load_npy(path, dtype_kinds="f", ndim=2, what=what)
    except _io.ArrayFileError as e:
        raise CLIError(f"cannot read .npy file: {e}") from None
    if logits.shape != (n, n_classes):
        raise CLIError(f"{path}: {what} must have shape ({n}, {n_classes}) "
                       f"(training set x {columns}), got {logits.shape}")
    with np.errstate(over="ignore"):
        logits = np.ascontiguousarray(logits, dtype=np.float32)
    if not np.isfinite(logits).all():
        raise CLIError(f"{path}: {what} contain NaN or inf (or values beyond float32)")
    return logits


def _print_result(ctx):
    for e in ctx.models:          # empty on ranks other than 0
        agree = "" if e.get("agreement") is None else f", agreement {_pct(e['agreement'])}"
        spe = e["seconds_per_epoch"]
        if e.get("task") == "regression":
            print(f"{e['name']}: test RMSE {_num(e.get('test_rmse'))}, R^2 "
                  f"{_num(e.get('test_r2'), '.4f')}, {e['parameters']:,} parameters "
                  f"({_fmt_bytes(e['bytes'])}), "
                  f"{statistics.median(spe) if spe else float('nan'):.2f} s/epoch -> "
                  f"{e['path']}")
            continue
        print(f"{e['name']}: test accuracy {_pct(e['test_accuracy'])}{agree}, "
              f"{e['parameters']:,} parameters ({_fmt_bytes(e['bytes'])}), "
              f"{statistics.median(spe) if spe else float('nan'):.2f} s/epoch -> {e['path']}")


def cmd_evaluate(args, ctx):
    _check_outputs(args, [])
    _input_file(args.model, "model")
    if args.teacher:
        _input_file(args.teacher, "teacher")
    ds = _load_data(args, ctx)
    model = _load_model_checked(args.model, ds.n_features, "model", args.backend)
    X, y = (ds.X_test, ds.y_test) if args.split == "test" else (ds.X_train, ds.y_train)
    if X.shape[0] == 0:
        raise CLIError(f"{_data_path(args)}: the {args.split} split is empty")
    _warn_split(args, ctx, model, args.model)
    if ds.task == "regression":
        return _evaluate_regression(args, ctx, ds, model, X, y)
    _check_model_task(args.model, model, ds)
    _check_labels(_data_path(args), args.split, y, model.n_outputs,
                  f"the {args.model} model's")
    teacher = None
    if args.teacher:
        teacher = _load_model_checked(args.teacher, ds.n_features, "teacher", args.backend)
        if teacher.n_outputs != model.n_outputs:
            raise CLIError(f"{args.teacher}: the teacher has "
                           f"{_plural(teacher.n_outputs, 'output')} but "
                           f"the model {args.model} has {model.n_outputs}")
    t = time.perf_counter()
    ev = evaluate(model, X, y, teacher=teacher, backend=args.backend)
    seconds = time.perf_counter() - t
    history = _meta_dict(model, "history")
    config = _meta_dict(model, "config") or None
    entry = _entry(os.path.basename(args.model), model, ev, history, config, args.model)
    entry["split"] = args.split
    entry["eval_seconds"] = seconds
    ctx.models.append(entry)
    _print_model_line(args.model, model, entry)
    print(f"  {args.split} accuracy {_pct(ev['accuracy'])}, loss {ev['loss']:.4f} "
          f"({_plural(ev['n'], 'image')}, {seconds:.2f} s)")
    if ev["agreement"] is not None:
        print(f"  top-1 agreement with {args.teacher}: {_pct(ev['agreement'])}")
    if not ctx.quiet:
        conf = np.array(ev["confusion"])
        width = max(5, len(str(conf.max())) + 1)
        print("  confusion matrix (rows: true class, columns: predicted):")
        print("      " + "".join(f"{j:>{width}}" for j in range(conf.shape[1])))
        for i, row in enumerate(conf):
            print(f"  {i:>3} " + "".join(f"{v:>{width}}" for v in row))
    return _finish(ctx)


def _print_model_line(path, model, entry):
    """The first line `pykd evaluate` prints about a model: sizes, kinds, counts, bytes."""
    kinds = sorted({layer["kind"] for layer in entry["layers"]})
    print(f"{path}: {'-'.join(map(str, model.sizes))} ({', '.join(kinds)}), "
          f"{model.parameters:,} parameters, {model.nonzeros:,} non-zero weights "
          f"({_fmt_bytes(entry['bytes_on_disk'])} on disk)")


def _evaluate_regression(args, ctx, ds, model, X, y):
    _check_model_task(args.model, model, ds)
    teacher = None
    if args.teacher:
        teacher = _load_model_checked(args.teacher, ds.n_features, "teacher", args.backend)
        _check_model_task(args.teacher, teacher, ds, "teacher")
    t = time.perf_counter()
    ev = regression_eval(model, X, y, teacher=teacher, backend=args.backend)
    seconds = time.perf_counter() - t
    entry = _entry(os.path.basename(args.model), model, ev, _meta_dict(model, "history"),
                   _meta_dict(model, "config") or None, args.model)
    entry.update(split=args.split, eval_seconds=seconds,
                 targets=list(_target_names(ds, model)))
    if teacher is not None:           # the gap to the teacher, on the same rows
        tev = regression_eval(teacher, X, y, backend=args.backend)
        entry["teacher_rmse"] = ev["teacher_rmse"]
        entry["teacher"] = {"path": args.teacher,
                            **{f"test_{k}": tev[k] for k in REGRESSION_METRICS if k in tev}}
    ctx.models.append(entry)
    _print_model_line(args.model, model, entry)
    print(f"  {args.split} RMSE {_num(ev['rmse'])}, R^2 {_num(ev['r2'], '.4f')} "
          f"({_plural(ev['n'], 'row')}, {_plural(model.n_outputs, 'output')}, "
          f"{seconds:.2f} s; overall: the mean over outputs)")
    if teacher is not None:
        print(f"  teacher {args.teacher}: RMSE {_num(tev['rmse'])}, R^2 "
              f"{_num(tev['r2'], '.4f')}; RMSE between the two models' outputs "
              f"{_num(ev['teacher_rmse'])}")
    if not ctx.quiet:
        print_regression_table(ev, _target_names(ds, model))
    return _finish(ctx)


def regression_eval(model, X, y, *, teacher=None, backend=None):
    """evaluate() of a regression model on float targets, also for a model
    whose metadata names no task (made outside fit, or an older file): its
    outputs are then scored as values, which is what the data asks for."""
    if getattr(model, "task", None) == "regression":
        return evaluate(model, X, y, teacher=teacher, backend=backend)
    from ..metrics import regression_metrics
    out = model.forward(X, backend=backend)
    ev = {"task": "regression", **regression_metrics(y, out), "teacher_rmse": None}
    if teacher is not None:
        ev["teacher_rmse"] = regression_metrics(teacher.forward(X, backend=backend), out)["rmse"]
    ev.update(parameters=model.parameters, nonzeros=model.nonzeros, bytes=model.nbytes,
              n=int(X.shape[0]))
    return ev


def _target_names(ds, model):
    """The targets' names: the CSV header's, the model's metadata, or y[k]."""
    if ds is not None and ds.target_names is not None:
        return tuple(ds.target_names)
    meta = model.metadata if isinstance(model.metadata, dict) else {}
    names = meta.get("targets")
    if isinstance(names, list) and len(names) == model.n_outputs and \
            all(isinstance(v, str) for v in names):
        return tuple(names)
    return tuple(f"y[{k}]" for k in range(model.n_outputs))


def print_regression_table(ev, names, indent="  "):
    """Per-output RMSE, R^2 (and MAE when given), then the overall row."""
    cols = [("RMSE", "rmse", ".4g"), ("R^2", "r2", ".4f")]
    if "mae_per_output" in ev:
        cols.append(("MAE", "mae", ".4g"))
    width = max(8, *(len(n) for n in names))
    print(indent + f"{'output':<{width}}" + "".join(f" {h:>10}" for h, _, _ in cols))
    for k, name in enumerate(names):
        print(indent + f"{name:<{width}}" + "".join(
            f" {_num(ev[key + '_per_output'][k], spec):>10}" for _, key, spec in cols))
    print(indent + f"{'overall':<{width}}" + "".join(
        f" {_num(ev[key], spec):>10}" for _, key, spec in cols))


# -------------------------------------------------------------------- main

def _resume_command(argv):
    args = [a for a in argv if a != "--resume"]
    return " ".join(shlex.quote(a) for a in ["pykd", *args, "--resume"])


#: Failures whose message is written for the user (it names the file and the
#: problem); any other exception also gets a hint about --debug.
_USER_ERRORS = (CLIError, DatasetError, ModelFormatError, OSError, MemoryError, RecursionError,
                NonFiniteLossError, CheckpointError, _io.ArrayFileError)


def _describe(e):
    """One line for an exception: what failed and, when known, the file."""
    if isinstance(e, OSError):
        text = e.strerror or str(e) or type(e).__name__
        if e.filename is not None:
            name = e.filename
            name = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)
            text = f"{name}: {text}"
        if e.errno == errno.ENOSPC and "disk" not in text:
            text += " (the disk is full)"
    elif isinstance(e, MemoryError):
        text = (f"out of memory ({e})" if str(e) else "out of memory") + \
            "; try a smaller --batch-size, --hidden or dataset"
    elif isinstance(e, RecursionError):
        text = f"input nested too deeply ({e})"
    else:
        text = str(e) or type(e).__name__
        if isinstance(e, (LookupError, AttributeError)) or \
                not isinstance(e, (ValueError, TypeError) + _USER_ERRORS):
            text = f"{type(e).__name__}: {text}"
        if not isinstance(e, _USER_ERRORS):
            text += " (run with --debug for a traceback)"
    return " ".join(text.split())


def main(argv=None):
    """Run the ``pykd`` command line; return the exit code.

    0 ok, 1 training failed (NaN/inf loss), 2 bad input or a failure of the
    environment (one line on stderr naming the file and the problem; with
    ``--debug`` or ``PYKD_DEBUG=1`` the traceback first), 130 interrupted.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        _config.prepare(parser, argv)    # --config FILE: the command's defaults
        args = parser.parse_args(argv)
    except _config.ConfigError as e:
        print(f"{e.prog}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:          # --help, --version, or a one-line usage error
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    args._configuration = _config.effective(parser, args)   # the report's rerunnable options
    args._explicit = _config.explicit(parser, argv)         # given, not defaults
    prog = f"pykd {args.command}"
    try:
        dist = _mpi_comm(args)
    except CLIError as e:      # no mpi4py: nothing to coordinate with; every rank says it
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    ctx = _Ctx(args, dist)
    debug = bool(args.debug or os.environ.get("PYKD_DEBUG"))
    try:
        if dist is not None and args.command not in MPI_COMMANDS:
            raise CLIError(f"pykd {args.command} does not run under MPI (started by an MPI "
                           f"launcher with {dist.size} ranks); only {', '.join(MPI_COMMANDS)} "
                           "do: run it without mpirun")
        _check_plot(args)
        limiter = contextlib.nullcontext()
        if args.threads:
            from threadpoolctl import threadpool_limits
            limiter = threadpool_limits(limits=args.threads)
        # --report -: the JSON alone on stdout, the result lines on stderr
        redirect = (contextlib.redirect_stdout(sys.stderr) if getattr(args, "report", None) == "-"
                    else contextlib.nullcontext())
        with limiter, redirect, _log_to_stderr(getattr(args, "quiet", False)):
            return args.func(args, ctx)
    except TrainingInterrupted as e:
        if _mpi_failed(ctx, e, prog, 130):
            print(f"\n{prog}: interrupted: {e}.", file=sys.stderr)
            if e.checkpoint:
                print(f"Resume with:\n  {_resume_command(argv)}", file=sys.stderr)
        return _mpi_exit(ctx, 130)
    except KeyboardInterrupt as e:
        if _mpi_failed(ctx, e, prog, 130):
            print(f"\n{prog}: interrupted.", file=sys.stderr)
            if args.command == "demo":      # finished models are reused by --resume
                print(f"Resume with:\n  {_resume_command(argv)}", file=sys.stderr)
        return _mpi_exit(ctx, 130)
    except NonFiniteLossError as e:
        if _mpi_failed(ctx, e, prog, 1):
            if debug:
                traceback.print_exc()
            print(f"{prog}: error: {_describe(e)}", file=sys.stderr)
        return _mpi_exit(ctx, 1)
    except Exception as e:  # every failure of input or environment: exit 2, one line
        if debug:
            traceback.print_exc()
        try:
            text = _describe(e)
        except Exception:  # pragma: no cover - a broken __str__
            text = type(e).__name__
        if _mpi_failed(ctx, e, prog, 2, text):
            print(f"{prog}: error: {text}", file=sys.stderr)
        return _mpi_exit(ctx, 2)


#: The commands that run data-parallel under mpirun (they take --mpi-timeout).
MPI_COMMANDS = ("train-teacher", "distill", "soft-labels")


def _mpi_comm(args):
    """A pykd.distributed.Comm when launched by mpirun with more than one
    rank (mpi4py imported only then), else None."""
    from .. import distributed
    size = distributed.launched_by_mpi()
    if size is None or size == 1:
        return None
    try:
        return distributed.from_environment(
            getattr(args, "mpi_timeout", distributed.DEFAULT_TIMEOUT))
    except distributed.MPIUnavailableError as e:
        raise CLIError(str(e)) from None


def _mpi_exit(ctx, code):
    """The exit code, after a barrier under MPI: mpirun ends the job at the
    first rank that exits with an error, so the others wait until rank 0
    has printed it."""
    if ctx.dist is not None:
        ctx.dist.barrier("leaving together after the error")
    return code


def _mpi_failed(ctx, e, prog, code, text=None):
    """Under MPI, make this rank's failure every rank's: before the ranks'
    first collective (checking the arguments) it is passed to the others,
    which raise it too, with its message; later, when the others would wait
    in a sum, the job is aborted with ``code`` and the message. Returns
    whether this rank prints the message (rank 0, or no MPI)."""
    dist = ctx.dist
    if dist is None:
        return True
    if not getattr(e, "mpi_collective", False):
        if dist.collectives == 0:
            try:
                dist.check(e)
            except BaseException:
                pass
        else:
            dist.abort(f"{prog}: error: {text or _describe(e)}", code)
    return ctx.root


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
