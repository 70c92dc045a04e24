"""The compression commands: ``pykd prune``, ``pykd quantize``, ``pykd
lowrank``, ``pykd cluster`` (each optionally fine-tuned by distillation or on
labels) and ``pykd compress --recipe FILE.toml`` (a sequence of them).

Every command checks all its inputs and outputs before any work, loads the
model and the data, converts (and fine-tunes), saves the model in its
smallest form (a pruned dense model goes through ``pykd.sparsify`` where
that is smaller) atomically, and prints one result line: test accuracy before
and after, non-zeros, bytes on disk.

Rules: ``--epochs 0`` (the default) means no fine-tuning, and a fine-tuning
option given with it (``--teacher``, ``--lr``, ...) is an error, not a no-op.
``quantize --static`` calibrates on the first N training rows. ``cluster`` of
a pruned model clusters only its non-zeros (``sparse_codebook``). In a
recipe, paths are relative to the current directory, ``compress --teacher``
is the teacher of every fine-tuning stage that names none, and a
``distill`` stage holds a pruned model's zeros (it trains dense models only,
so it must come before quantize, lowrank and cluster stages).
"""
from __future__ import annotations

import argparse
import inspect
import os
import time

import numpy as np

from .. import __version__
from ..train import TrainConfig, evaluate, fit, soft_labels
from . import _plural
from . import (_NOT_FOR, CLIError, _add_common, _check_model_task, _check_out_dir_tree,
               _check_outputs, _data_path, _finish, _fmt_bytes, _input_file, _load_data,
               _load_logits, _load_model_checked, _model_info, _nonneg_int, _num, _number,
               _pct, _pos_float, _pos_int, _unit, _writing, regression_eval)

#: Position in ``pykd --help`` (see pykd.cli._command_modules).
ORDER = 50

#: Defaults of the fine-tuning options (pykd.FineTune's).
FT_DEFAULTS = {"lr": 1e-4, "batch_size": 64, "temperature": 5.0, "alpha": 0.1}
#: Pruning's own fine-tuning rate: it must recover from removing most weights,
#: and 1e-4 is too low (on the demo's student, gradual 90% with 2 epochs lost
#: 3.4 points at 1e-4 and 0.9 at 1e-3).
PRUNE_LR = 1e-3
OPS = ("prune", "quantize", "lowrank", "cluster", "distill")
#: Options of a command that are not recipe keys (the recipe's command gives them).
NOT_IN_RECIPE = {"model", "out", "data", "backend", "threads", "report", "quiet", "debug",
                 "help", "func", "command"}
CALIBRATE = 1000
#: What a stage turns the model into (a distill stage after it cannot train it).
_MAKES = {"quantize": "int8", "lowrank": "low rank", "cluster": "a codebook model"}


# ------------------------------------------------------------------ options

def _add_io(p):
    p.add_argument("--model", required=True, metavar="IN", help="the trained model to compress")
    p.add_argument("--out", required=True, metavar="OUT", help="where to save the result")


def _add_finetune(p, *, epochs_help="fine-tuning epochs; 0 (default): no fine-tuning",
                  distill=False):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--teacher", metavar="MODEL",
                     help="fine-tune by distillation from this model (default: plain labels)")
    src.add_argument("--teacher-logits", metavar="FILE.npy",
                     help="fine-tune by distillation from these teacher logits of the "
                          "training set, shape (n_train, classes)")
    src.add_argument("--teacher-outputs", metavar="FILE.npy",
                     help="regression: fine-tune by distillation from these teacher outputs "
                          "of the training set, physical units, shape (n_train, outputs)")
    p.add_argument("--epochs", type=_pos_int if distill else _nonneg_int,
                   default=None if distill else 0, help=epochs_help)
    p.add_argument("--lr", type=_pos_float, default=None,
                   help=f"fine-tuning learning rate (default: {FT_DEFAULTS['lr']:g}; "
                        f"prune: {PRUNE_LR:g})")
    p.add_argument("--batch-size", type=_pos_int, default=None,
                   help=f"fine-tuning batch size (default: {FT_DEFAULTS['batch_size']})")
    p.add_argument("--temperature", "-T", type=_pos_float, default=None,
                   help=f"distillation temperature (default: {FT_DEFAULTS['temperature']:g})")
    p.add_argument("--alpha", type=_unit, default=None,
                   help="weight of the hard-label loss in distillation "
                        f"(default: {FT_DEFAULTS['alpha']:g})")
    p.add_argument("--loss", choices=("mse", "huber"), default=None,
                   help="regression fine-tuning loss (default: mse; with a teacher its _kd "
                        "form)")
    p.add_argument("--huber-delta", type=_pos_float, default=None, metavar="D",
                   help="Huber threshold in normalised target units (default: 1); needs "
                        "--loss huber")
    p.add_argument("--seed", type=_nonneg_int, default=0,
                   help="seed of the shuffling (and of k-means) (default: 0)")


def _add_prune(p):
    p.add_argument("--sparsity", type=_number(float, 0, 1, high_open=True), required=True,
                   metavar="S", help="fraction of the weights removed; with --structured, "
                                     "of each hidden layer's units")
    p.add_argument("--scope", choices=("global", "layer"), default=None,
                   help="rank all weights together (global, default) or prune each layer "
                        "to S")
    p.add_argument("--structured", action="store_true",
                   help="remove whole hidden units (a smaller dense model)")
    p.add_argument("--schedule", choices=("oneshot", "gradual"), default="oneshot",
                   help="prune at once (default), or gradually over the fine-tuning epochs "
                        "(cubic schedule; needs --epochs >= 1)")


def _add_quantize(p):
    p.add_argument("--static", action="store_true",
                   help="static activation scales from calibration samples (default: "
                        "dynamic, per sample)")
    p.add_argument("--calibrate", type=_pos_int, default=None, metavar="N",
                   help=f"calibration samples for --static: the first N training rows "
                        f"(default: {CALIBRATE})")
    p.add_argument("--calibration", choices=("minmax", "percentile"), default=None,
                   help="static scale from max|x| (minmax, default) or a percentile of |x|")
    p.add_argument("--percentile", type=_number(float, 0, 100, low_open=True), default=None,
                   metavar="P", help="the percentile of --calibration percentile "
                                     "(default: 99.99)")
    p.add_argument("--qat", action="store_true",
                   help="quantization-aware fine-tuning for --epochs epochs, then conversion")


def _add_lowrank(p):
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=_pos_int, metavar="R", help="keep R singular values per layer")
    g.add_argument("--energy", type=_number(float, 0, 1, low_open=True), metavar="E",
                   help="keep the fewest singular values holding a fraction E of the energy")


def _add_cluster(p):
    p.add_argument("--bits", type=_number(int, 1, 8), required=True, metavar="B",
                   help="codebook of 2^B centroids per layer (1 to 8)")


def _add_distill(p):
    p.add_argument("--lr-decay", type=_number(float, 0, 1, low_open=True), default=1.0,
                   metavar="GAMMA", help="per-epoch learning-rate factor (default: 1)")


_ADDERS = {"prune": _add_prune, "quantize": _add_quantize, "lowrank": _add_lowrank,
           "cluster": _add_cluster, "distill": _add_distill}
_HELP = {
    "prune": "magnitude pruning (global or per layer, structured, gradual), then fine-tuning",
    "quantize": "int8 weights and activations (dynamic or static; QAT with --qat)",
    "lowrank": "truncated SVD of each dense layer (by rank or kept energy)",
    "cluster": "k-means weight sharing: a codebook of 2^B values per layer",
}


def _stage_parser(op):
    """The parser of one op's options (for a recipe stage's keys)."""
    p = argparse.ArgumentParser(prog=op, add_help=False)
    _add_finetune(p, distill=op == "distill")
    _ADDERS[op](p)
    return p


def register(sub):
    for op in ("prune", "quantize", "lowrank", "cluster"):
        paras = [" ".join(t.replace("``", "").split()) for t in __doc__.split("\n\n")]
        p = sub.add_parser(op, help=_HELP[op], description=_HELP[op] + ". " + paras[1],
                           epilog=paras[2])
        _add_io(p)
        _ADDERS[op](p)
        _add_finetune(p, epochs_help=("quantization-aware fine-tuning epochs (needs --qat; "
                                      "default 0)") if op == "quantize" else
                      "fine-tuning epochs; 0 (default): no fine-tuning")
        _add_common(p)
        p.set_defaults(func=cmd_one, op=op)
    p = sub.add_parser("compress", help="run a recipe of compression stages (TOML)",
                       description="Run the [[stage]] tables of a TOML recipe in order; each "
                                   "has op = prune | quantize | lowrank | cluster | distill "
                                   "and that command's long options as keys (dashes as "
                                   "underscores). Stage N's model is saved as DIR/NN-op.pykd "
                                   "and is the input of stage N+1. The whole recipe is "
                                   "checked before any work.")
    p.add_argument("--model", required=True, metavar="IN", help="the trained model to compress")
    p.add_argument("--recipe", required=True, metavar="FILE.toml", help="the stages")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the stages' models")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--teacher", metavar="MODEL",
                     help="teacher of every fine-tuning stage that names none")
    src.add_argument("--teacher-logits", metavar="FILE.npy",
                     help="teacher logits of the training set, for every stage that names no "
                          "teacher")
    src.add_argument("--teacher-outputs", metavar="FILE.npy",
                     help="regression: teacher outputs of the training set (physical units), "
                          "for every stage that names no teacher")
    _add_common(p)
    p.set_defaults(func=cmd_compress)


# ------------------------------------------------------------------ checks

#: The ways to give a fine-tuning teacher (at most one per stage).
TEACHER_KEYS = ("teacher", "teacher_logits", "teacher_outputs")


def _teacher_key(ns):
    """Which of TEACHER_KEYS ``ns`` gives, or None."""
    return next((k for k in TEACHER_KEYS if getattr(ns, k, None)), None)


def check_stage(op, ns, opt=None):
    """Cross-option checks of one command or stage, before any work: None,
    or ``(option, message)``; ``opt(key)`` spells another option in the
    message (``--key`` on the command line, ``key`` in a recipe)."""
    opt = opt or _opt
    epochs = ns.epochs or 0
    key = _teacher_key(ns)
    if op == "distill" and ns.epochs is None:
        return "epochs", "a distill stage needs epochs >= 1"
    if epochs == 0:
        if key:
            return key, f"is used only for fine-tuning: give {opt('epochs')} N (N >= 1) too"
        for key in (*FT_DEFAULTS, "loss", "huber_delta"):
            if getattr(ns, key, None) is not None:
                return key, f"is a fine-tuning option: give {opt('epochs')} N (N >= 1) too"
    if op == "prune":
        if ns.schedule == "gradual" and epochs == 0:
            return "schedule", f"gradual pruning is spread over the fine-tuning: give {opt('epochs')} N"
        if ns.structured and ns.schedule == "gradual":
            return "schedule", ("structured pruning is one-shot (it removes units, then "
                                f"{opt('epochs')} retrains the smaller model)")
        if ns.structured and ns.scope is not None:
            return "scope", (f"does not apply to {opt('structured')} (each hidden layer loses the "
                             "fraction S of its units)")
    if op == "quantize":
        if ns.qat and epochs == 0:
            return "qat", f"quantization-aware training needs {opt('epochs')} N (N >= 1)"
        if epochs and not ns.qat:
            return "epochs", (f"must be 0 without {opt('qat')} (post-training quantization has "
                              f"nothing to fine-tune); add {opt('qat')} for quantization-aware "
                              "fine-tuning")
        if not ns.static:
            for key in ("calibrate", "calibration", "percentile"):
                if getattr(ns, key) is not None:
                    return key, f"applies to {opt('static')} only"
        if ns.percentile is not None and ns.calibration != "percentile":
            return "percentile", f"needs {opt('calibration')} percentile"
    return None


def _opt(key):
    return "--" + key.replace("_", "-")


def _api(op, wants_ft, ns):
    """The pykd function of ``op``, or a CLIError when this pykd lacks it
    (or lacks the fine-tuning the options ask for)."""
    import pykd
    name = {"prune": "prune", "quantize": "quantize_model", "lowrank": "low_rank",
            "cluster": "cluster"}[op]
    fn = getattr(pykd, name, None)
    if fn is None:
        raise CLIError(f"pykd {op} is not available yet in this pykd (no pykd.{name})")
    params = inspect.signature(fn).parameters
    needed = ["fine_tune"] if wants_ft else []
    if op == "quantize":
        needed += ["qat"] if ns.qat else []
        needed += ["method"] if ns.calibration not in (None, "minmax") else []
    missing = [k for k in needed if k not in params]
    if missing:
        what = "fine-tuning (--epochs N)" if "fine_tune" in missing else \
            ", ".join(_opt(k) for k in missing)
        raise CLIError(f"{op}: {what} is not available yet in this pykd (pykd.{name} has no "
                       f"{missing[0]} argument); run without it")
    return fn


# ------------------------------------------------------------------ runs

class Session:
    """Loaded data and teacher logits, shared by the stages of a run."""

    def __init__(self, args, ctx, ds):
        self.args, self.ctx, self.ds = args, ctx, ds
        self._logits = {}
        self.r2 = {}          # id(model) -> test R^2 (regression)

    def result(self, score, model):
        """The metadata of a converted model's test score."""
        if self.ds.task == "regression":
            return {"test_rmse": score, "test_r2": self.r2.get(id(model))}
        return {"test_accuracy": score}

    def check_teacher(self, ns, where):
        """Refuse a recipe stage's teacher file of the other task before any
        work (the command line's options are checked as every command's)."""
        for dest, why in _NOT_FOR[self.ds.task]:
            if dest in TEACHER_KEYS and getattr(ns, dest, None):
                raise CLIError(f"{where}{dest} has no effect on a {self.ds.task} task: {why}")

    def logits(self, teacher, teacher_logits, n_classes, teacher_outputs=None):
        key = (teacher, teacher_logits or teacher_outputs)
        if key not in self._logits:
            ds, args = self.ds, self.args
            if teacher:
                t = _load_model_checked(teacher, ds.n_features, "teacher", args.backend)
                _check_model_task(teacher, t, ds, "teacher")
                if t.n_outputs != n_classes:
                    raise CLIError(f"{teacher}: the teacher has "
                                   f"{_plural(t.n_outputs, 'output')} but the "
                                   f"model has {n_classes}")
                t0 = time.perf_counter()
                self._logits[key] = soft_labels(t, ds.X_train, backend=args.backend,
                                                progress=not self.ctx.quiet)
                self.ctx.info(f"soft labels from {teacher}: {time.perf_counter() - t0:.1f} s")
            elif teacher_outputs:
                self._logits[key] = _load_logits(teacher_outputs, ds.X_train.shape[0],
                                                 n_classes, what="teacher outputs",
                                                 columns="outputs")
            else:
                self._logits[key] = _load_logits(teacher_logits, ds.X_train.shape[0],
                                                 n_classes)
        return self._logits[key]

    def fine_tune(self, ns, model, op):
        from ..compress import FineTune
        defaults = dict(FT_DEFAULTS, lr=PRUNE_LR) if op == "prune" else FT_DEFAULTS
        logits = None
        if _teacher_key(ns):
            logits = self.logits(ns.teacher, ns.teacher_logits, model.n_outputs,
                                 getattr(ns, "teacher_outputs", None))
        ds = self.ds
        has_test = ds.X_test.shape[0] > 0
        kw = {k: (getattr(ns, k) if getattr(ns, k) is not None else v)
              for k, v in defaults.items()}
        if ds.task == "regression":
            kw.pop("temperature")
            kw.update(teacher_outputs=logits, loss=ns.loss or "mse")
            if ns.huber_delta is not None:
                kw["huber_delta"] = ns.huber_delta
        else:
            kw["teacher_logits"] = logits
        return FineTune(ds.X_train, ds.y_train, epochs=ns.epochs,
                        seed=ns.seed, X_val=ds.X_test if has_test else None,
                        y_val=ds.y_test if has_test else None, progress=not self.ctx.quiet,
                        **kw)


def convert(op, ns, model, session):
    """One op on ``model`` with the options ``ns``: the new model."""
    ft = session.fine_tune(ns, model, op) if (ns.epochs or 0) > 0 else None
    if op == "distill":
        return _distill(ns, model, ft, session)
    fn = _api(op, ft is not None, ns)
    kw = {} if ft is None else {"fine_tune": ft}
    if op == "prune":
        if ns.scope is not None:
            kw["scope"] = ns.scope
        return fn(model, ns.sparsity, structured=ns.structured, schedule=ns.schedule, **kw)
    if op == "quantize":
        calib = None
        if ns.static:
            n = min(ns.calibrate or CALIBRATE, session.ds.X_train.shape[0])
            calib = session.ds.X_train[:n]
        if ns.qat:
            kw["qat"] = True
        if ns.calibration is not None and "method" in inspect.signature(fn).parameters:
            kw["method"] = ns.calibration
        if ns.percentile is not None:
            kw["percentile"] = ns.percentile
        return fn(model, "static" if ns.static else "dynamic", calib, **kw)
    if op == "lowrank":
        return fn(model, rank=ns.rank, energy=ns.energy, **kw)
    if op == "cluster":
        src = _sparse_form(model)       # a pruned model: cluster only its non-zeros
        return fn(src, ns.bits, seed=ns.seed, **kw)
    raise AssertionError(op)


def _distill(ns, model, ft, session):
    """KD (or CE) training of a dense model, its zeros held (a pruned model
    stays pruned)."""
    from ..models import MLP
    mlp = model.copy() if isinstance(model, MLP) else model.to_mlp().copy()
    if set(mlp.to_model().kinds) != {"dense"}:
        raise CLIError("distill: the model must be dense (float32) to train it")
    mask = None
    if mlp.nonzeros < sum(W.size for W, _ in mlp.layers):
        import pykd
        mask = pykd.weight_masks(mlp) if hasattr(pykd, "weight_masks") else None
    kw = {} if mask is None else {"mask": mask}
    if session.ds.task == "regression":       # mse/huber, their _kd form with a teacher
        outputs = getattr(ft, "teacher_outputs", None)
        loss = ft.regression_loss()
        cfg = TrainConfig(loss=loss, lr=ft.lr, seed=ft.seed,
                          **({"alpha": ft.alpha} if loss.endswith("_kd") else {}),
                          **({"huber_delta": ft.huber_delta} if "huber" in loss else {}))
        kw["teacher_outputs"] = outputs
        logits = None
    else:
        kd = ft.teacher_logits is not None
        cfg = TrainConfig(loss="kd" if kd else "ce", lr=ft.lr, seed=ft.seed,
                          **({"temperature": ft.temperature, "alpha": ft.alpha} if kd else {}))
        logits = ft.teacher_logits
    history = fit(mlp, ft.X, ft.y, cfg=cfg, epochs=ft.epochs, batch_size=ft.batch_size,
                  teacher_logits=logits, X_val=ft.X_val, y_val=ft.y_val,
                  progress=ft.progress, backend=session.args.backend, seed=ft.seed,
                  lr_decay=ns.lr_decay, desc="distill", **kw)
    meta = dict(mlp.metadata)
    meta["compression"] = list(meta.get("compression", [])) + [
        {"op": "distill", "epochs": ft.epochs, "lr": ft.lr, "loss": cfg.loss,
         "mask_held": mask is not None, "history": history}]
    mlp.metadata = meta
    return mlp


def _record_bytes(model):
    return sum(layer.record_bytes() for layer in model.to_model().layers)


def _sparse_form(model):
    """``pykd.sparsify(model)`` when it stores the model in fewer bytes
    (some dense layers become CSR), else the model itself."""
    from ..compress import sparsify
    if "dense" not in model.to_model().kinds:
        return model
    sparse = sparsify(model)
    return sparse if _record_bytes(sparse) < _record_bytes(model) else model


def save_smallest(model, path, metadata):
    """Save ``model`` (or its sparse form, when smaller) atomically; return
    the saved model."""
    model = _sparse_form(model)
    meta = dict(model.metadata)
    meta.update(metadata)
    model.metadata = meta
    with _writing(path, "model"):
        model.save(path)
    return model


def _check_data(session, model, path):
    ds = session.ds
    if model.n_features != ds.n_features:
        raise CLIError(f"{path}: the model takes {_plural(model.n_features, 'input')} but the "
                       "data has "
                       f"{_plural(ds.n_features, 'feature')}")
    _check_model_task(path, model, ds)
    if ds.task == "regression":
        return
    for split, y in (("training", ds.y_train), ("test", ds.y_test)):
        if y.size and int(y.max()) >= model.n_outputs:
            raise CLIError(f"{_data_path(session.args)}: {split} label {int(y.max())} is "
                           f"outside the model's {_plural(model.n_outputs, 'class', 'classes')}")


def _evaluate(session, model):
    """The test accuracy (regression: the test RMSE), or None without a test split."""
    ds = session.ds
    if ds.X_test.shape[0] == 0:
        return None
    if ds.task == "regression":
        ev = regression_eval(model, ds.X_test, ds.y_test, backend=session.args.backend)
        session.r2[id(model)] = ev["r2"]
        return ev["rmse"]
    return evaluate(model, ds.X_test, ds.y_test, backend=session.args.backend)["accuracy"]


def _row(name, model, path, acc, acc0, bytes0, seconds, op=None, session=None):
    size = os.path.getsize(path)
    if session is not None and session.ds.task == "regression":
        score = {"task": "regression", "test_accuracy": None, "accuracy_change_points": None,
                 "test_rmse": acc, "test_r2": session.r2.get(id(model)),
                 "rmse_change": None if acc is None or acc0 is None else acc - acc0}
    else:
        score = {"test_accuracy": acc, "accuracy_change_points": None if acc is None or
                 acc0 is None else 100 * (acc - acc0)}
    return {"name": name, "op": op, "path": os.fspath(path), **score,
            **_model_info(model, path), "kinds": sorted(set(model.to_model().kinds)),
            "bytes": model.nbytes, "bytes_ratio": size / bytes0 if bytes0 else None,
            "seconds": seconds}


def _check_inputs(ns):
    if ns.teacher:
        _input_file(ns.teacher, "teacher")
    if ns.teacher_logits:
        _input_file(ns.teacher_logits, "teacher logits")
    if getattr(ns, "teacher_outputs", None):
        _input_file(ns.teacher_outputs, "teacher outputs")


def cmd_one(args, ctx):
    op = args.op
    bad = check_stage(op, args)
    if bad:
        key, msg = bad
        raise CLIError(f"{_opt(key)} {msg}")
    _check_outputs(args, [(args.out, "model", "--out")])
    if os.path.exists(args.out) and os.path.realpath(args.out) == os.path.realpath(args.model):
        raise CLIError(f"--out and --model are the same file ({args.out}); give another --out")
    _input_file(args.model, "model")
    _check_inputs(args)
    _api(op, args.epochs > 0, args)           # a missing API: say so before the work
    ds = _load_data(args, ctx)
    session = Session(args, ctx, ds)
    model = _load_model_checked(args.model, ds.n_features, "model", args.backend)
    _check_data(session, model, args.model)
    acc0 = _evaluate(session, model)
    t = time.perf_counter()
    new = convert(op, args, model, session)
    seconds = time.perf_counter() - t
    acc = _evaluate(session, new)
    saved = save_smallest(new, args.out, {"role": op, "source": os.fspath(args.model),
                                          **session.result(acc, new),
                                          "pykd_version": __version__})
    session.r2[id(saved)] = session.r2.get(id(new))
    b0, b1 = os.path.getsize(args.model), os.path.getsize(args.out)
    ctx.models.append(_row(os.path.basename(args.model), model, args.model, acc0, acc0, b0, 0.0,
                           session=session))
    ctx.models.append(_row(os.path.basename(args.out), saved, args.out, acc, acc0, b0, seconds,
                           op, session=session))
    kinds = ", ".join(sorted(set(saved.to_model().kinds)))
    if op == "lowrank" and "low_rank" not in saved.to_model().kinds:
        ctx.warn("no layer was factored: at this rank or energy the factors of every layer "
                 "store at least as many numbers as its weights")
    ft = f", fine-tuned {_plural(args.epochs, 'epoch')}" if args.epochs else ""
    score = (f"test RMSE {_num(acc0)} -> {_num(acc)}" if ds.task == "regression" else
             f"test accuracy {_pct(acc0)} -> {_pct(acc)}")
    print(f"{op}: {score}; non-zeros {model.nonzeros:,} -> "
          f"{saved.nonzeros:,}; {_fmt_bytes(b0)} -> {_fmt_bytes(b1)} on disk "
          f"({b1 / b0:.3f} of the input; {kinds}){ft}; {seconds:.1f} s -> {args.out}")
    return _finish(ctx)


# ------------------------------------------------------------------ recipes

class RecipeError(CLIError):
    pass


def _check_value(recipe, i, key, value, action):
    where = f"{recipe}: stage {i}: {key}"
    if isinstance(action, (argparse._StoreTrueAction,)):
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise RecipeError(f"{where} must be a single value, got {value!r}")
    kind = getattr(action.type, "__name__", "str") if action.type is not None else "str"
    if kind == "int" and not isinstance(value, int):
        raise RecipeError(f"{where} must be an integer, got {value!r}")
    if kind == "float" and not isinstance(value, (int, float)):
        raise RecipeError(f"{where} must be a number, got {value!r}")
    if kind == "str" and not isinstance(value, str):
        raise RecipeError(f"{where} must be a string, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except argparse.ArgumentTypeError as e:
            raise RecipeError(f"{where} {e}") from None
    if action.choices is not None and value not in action.choices:
        raise RecipeError(f"{where} must be one of {', '.join(map(repr, action.choices))}, "
                          f"got {value!r}")
    return value


def load_recipe(path, args):
    """The recipe's stages as ``[(op, namespace)]``, every key and the
    cross-option rules checked; a RecipeError naming the stage and key."""
    import tomllib
    _input_file(path, "recipe")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML (not UTF-8: {e})") from None
    extra = sorted(set(doc) - {"stage"})
    if extra:
        raise RecipeError(f"{path}: unknown top-level key {extra[0]!r} (a recipe is a list of "
                          "[[stage]] tables)")
    stages = doc.get("stage")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict)
                                                             for s in stages):
        raise RecipeError(f"{path}: no stages; a recipe is a list of [[stage]] tables, each "
                          "with op = \"prune\" | \"quantize\" | \"lowrank\" | \"cluster\" | "
                          "\"distill\"")
    out = []
    for i, stage in enumerate(stages, start=1):
        op = stage.get("op")
        if op is None:
            raise RecipeError(f"{path}: stage {i}: op is missing (one of {', '.join(OPS)})")
        if op not in OPS:
            raise RecipeError(f"{path}: stage {i}: op must be one of {', '.join(OPS)}, "
                              f"got {op!r}")
        parser = _stage_parser(op)
        actions = {a.dest: a for a in parser._actions if a.dest not in NOT_IN_RECIPE}
        ns = argparse.Namespace(**{a.dest: a.default for a in parser._actions})
        for key, value in stage.items():
            if key == "op":
                continue
            if key not in actions:
                hint = (f"; write dashes as underscores ({key.replace('-', '_')})"
                        if "-" in key and key.replace("-", "_") in actions else "")
                raise RecipeError(f"{path}: stage {i}: unknown key {key!r} for op = "
                                  f"\"{op}\"{hint} (keys: {', '.join(sorted(actions))})")
            setattr(ns, key, _check_value(path, i, key, value, actions[key]))
        for a in parser._actions:
            if a.required and getattr(ns, a.dest, None) is None:
                raise RecipeError(f"{path}: stage {i}: {a.dest} is missing (op = \"{op}\" "
                                  "needs it)")
        if op == "lowrank" and (ns.rank is None) == (ns.energy is None):
            raise RecipeError(f"{path}: stage {i}: rank, energy: give exactly one")
        if not _teacher_key(ns) and (ns.epochs or 0) > 0:
            for k in TEACHER_KEYS:
                setattr(ns, k, getattr(args, k))
        made = next((o for o, _ in reversed(out) if o in ("quantize", "lowrank", "cluster")),
                    None)
        if op == "distill" and made is not None:
            raise RecipeError(f"{path}: stage {i}: op = \"distill\" trains a dense model, but "
                              f"an earlier {made} stage makes it {_MAKES[made]} (put "
                              "distill before it)")
        bad = check_stage(op, ns, opt=lambda k: f"{k} = true" if k in (
            "qat", "static", "structured") else k)
        if bad:
            raise RecipeError(f"{path}: stage {i}: {bad[0]} {bad[1]}")
        out.append((op, ns))
    return out


def cmd_compress(args, ctx):
    stages = load_recipe(args.recipe, args)
    _check_out_dir_tree(args.out, "--out")
    _check_outputs(args, [])
    _input_file(args.model, "model")
    _check_inputs(args)
    for i, (op, ns) in enumerate(stages, start=1):
        _check_inputs(ns)
        if op != "distill":
            try:
                _api(op, (ns.epochs or 0) > 0, ns)
            except CLIError as e:
                raise CLIError(f"{args.recipe}: stage {i}: {e}") from None
    ds = _load_data(args, ctx)
    session = Session(args, ctx, ds)
    for i, (_, ns) in enumerate(stages, start=1):
        session.check_teacher(ns, f"{args.recipe}: stage {i}: ")
    model = _load_model_checked(args.model, ds.n_features, "model", args.backend)
    _check_data(session, model, args.model)
    os.makedirs(args.out, exist_ok=True)
    acc0 = _evaluate(session, model)
    b0 = os.path.getsize(args.model)
    rows = [_row(os.path.basename(args.model), model, args.model, acc0, acc0, b0, 0.0, "input",
                 session)]
    total = time.perf_counter()
    for i, (op, ns) in enumerate(stages, start=1):
        out = os.path.join(args.out, f"{i:02d}-{op}.pykd")
        ctx.info(f"stage {i}: {op} -> {out}")
        t = time.perf_counter()
        new = convert(op, ns, model, session)
        seconds = time.perf_counter() - t
        acc = _evaluate(session, new)
        model = save_smallest(new, out, {"role": op, "source": os.fspath(args.model),
                                         "recipe_stage": i, **session.result(acc, new),
                                         "pykd_version": __version__})
        session.r2[id(model)] = session.r2.get(id(new))
        rows.append(_row(f"{i:02d}-{op}", model, out, acc, acc0, b0, seconds, op, session))
    ctx.models.extend(rows)
    print_stage_table(rows, f"pykd compress: {args.recipe} on {args.model} "
                            f"({time.perf_counter() - total:.0f} s)")
    return _finish(ctx, {"recipe": os.fspath(args.recipe)})


def print_stage_table(rows, title):
    print(title)
    regression = bool(rows) and rows[0].get("task") == "regression"
    head = (f"{'stage':<14} {'kinds':<26} {'RMSE' if regression else 'accuracy':>9} "
            f"{'change':>7} {'non-zeros':>10} "
            f"{'on disk':>10} {'ratio':>7} {'seconds':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if regression:
            ch = "-" if r["rmse_change"] is None else f"{r['rmse_change']:+.3g}"
            score = _num(r["test_rmse"])
        else:
            ch = ("-" if r["accuracy_change_points"] is None
                  else f"{r['accuracy_change_points']:+.2f}")
            score = _pct(r["test_accuracy"])
        print(f"{r['name']:<14} {','.join(r['kinds']):<26} {score:>9} "
              f"{ch:>7} {r['nonzeros']:>10,} {_fmt_bytes(r['bytes_on_disk']):>10} "
              f"{r['bytes_ratio']:>7.3f} {r['seconds']:>8.1f}")
