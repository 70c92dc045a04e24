"""``pykd report MODEL...``: one row per model (accuracy, agreement with the
first model, parameters, non-zeros, bytes on disk, latency) and the ratios
to the first model; ``--json`` in the schema of docs/report.md."""
from __future__ import annotations

import os
import statistics
import time

import numpy as np

from .. import __version__
from ..data import DatasetError
from ..train import evaluate
from . import _plural
from . import (CLIError, _add_data_options, _add_debug, _check_model_task, _check_outputs,
               _data_path, _fmt_bytes, _load_data, _load_model_checked, _pos_int,
               _target_names, _write_json, regression_eval)

#: Position in ``pykd --help`` (see pykd.cli._command_modules).
ORDER = 60
#: Timed calls: this many untimed warm-up calls, then the median of ``--repeats``.
WARMUP = 3
REPEATS = 30
BATCHES = (1, 256)


def register(sub):
    p = sub.add_parser(
        "report", help="compare models: accuracy, agreement, size, latency",
        description="One row per model: test accuracy, top-1 agreement with the first model, "
                    "parameters, non-zeros, bytes on disk, batch-1 and batch-256 latency "
                    f"(median of --repeats timed calls after {WARMUP} warm-up calls), and the "
                    "ratios to the first model. Regression data (float targets, or --task "
                    "regression) gives RMSE and R^2 (overall and per output) instead of "
                    "accuracy and agreement. The JSON schema is in docs/report.md.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model files; the first is the reference of the ratios")
    p.add_argument("--json", metavar="OUT.json", help="write the table as JSON (- : stdout)")
    p.add_argument("--plot", metavar="OUT.png",
                   help="accuracy (regression: RMSE) against bytes on disk, log x "
                        "(needs matplotlib)")
    p.add_argument("--data", metavar="DIR|FILE.npz|FILE.csv",
                   help="dataset whose test split is used (default: Fashion-MNIST); float "
                        "targets are a regression set")
    _add_data_options(p)
    p.add_argument("--repeats", type=_pos_int, default=REPEATS, metavar="N",
                   help=f"timed calls per latency, after {WARMUP} warm-up calls; the median "
                        f"is reported (default: {REPEATS})")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--backend", choices=("fortran", "numpy"), default="fortran",
                   help="run the models in Fortran (default) or in NumPy")
    p.add_argument("--threads", type=_pos_int, metavar="N",
                   help="limit BLAS/OpenMP threads during the measurements")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_debug(p)
    p.set_defaults(func=cmd_report, report=None)


# ------------------------------------------------------------------ pieces

def latency_us(model, X, batch, repeats, warmup=WARMUP, backend=None):
    """Median wall time of ``model.forward`` on ``batch`` rows, in
    microseconds, over ``repeats`` calls after ``warmup`` untimed ones (rows
    of X repeated when X has fewer)."""
    rows = np.ascontiguousarray(np.resize(X, (batch, X.shape[1])), np.float32)
    for _ in range(warmup):
        model.forward(rows, batch_size=batch, backend=backend)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.forward(rows, batch_size=batch, backend=backend)
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def _ratio(a, b):
    return None if a is None or b is None or not b else a / b


def _measure(path, model, X, y, ref_pred, args, regression):
    row = {"path": os.fspath(path), "name": os.path.basename(path),
           "kinds": sorted({layer.kind for layer in model.to_model().layers}),
           "parameters": int(model.parameters), "nonzeros": int(model.nonzeros),
           "bytes_on_disk": os.path.getsize(path)}
    if regression:
        ev = regression_eval(model, X, y, backend=args.backend)
        for k in ("rmse", "r2", "mae", "rmse_per_output", "r2_per_output", "mae_per_output"):
            if k in ev:
                row[k] = ev[k]
        row["test_accuracy"] = row["agreement"] = None
        out = None
    else:
        ev = evaluate(model, X, y, backend=args.backend)
        out = model.predict(X, backend=args.backend)
        row["test_accuracy"] = ev["accuracy"]
        row["test_loss"] = ev["loss"]
        row["agreement"] = 1.0 if ref_pred is None else float((out == ref_pred).mean())
    for b in BATCHES:
        row[f"latency_b{b}_us"] = None if args.no_latency else latency_us(
            model, X, b, args.repeats, backend=args.backend)
    return row, out


def _add_ratios(rows):
    first = rows[0]
    for r in rows:
        acc, acc0 = r.get("test_accuracy"), first.get("test_accuracy")
        r["accuracy_change_points"] = None if acc is None or acc0 is None else 100 * (acc - acc0)
        r["parameters_ratio"] = _ratio(r["parameters"], first["parameters"])
        r["nonzeros_ratio"] = _ratio(r["nonzeros"], first["nonzeros"])
        r["bytes_ratio"] = _ratio(r["bytes_on_disk"], first["bytes_on_disk"])
        r["compression"] = _ratio(first["bytes_on_disk"], r["bytes_on_disk"])
        for b in BATCHES:
            key = f"latency_b{b}_us"
            r[f"latency_b{b}_ratio"] = _ratio(r[key], first[key])


def _us(v):
    if v is None:
        return "-"
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} us"


def _print_table(rows, regression, repeats, no_latency):
    width = max(12, *(len(r["name"]) for r in rows))
    q1, q2 = ("RMSE", "R^2") if regression else ("accuracy", "agree")
    head = (f"{'model':<{width}} {q1:>9} {q2:>7} {'change':>7} {'params':>9} {'nonzeros':>9} "
            f"{'on disk':>10} {'ratio':>6} {'b1':>9} {'b256':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if regression:
            a, g, ch = f"{r['rmse']:.4g}", f"{r['r2']:.4f}", "-"
        else:
            a, g = f"{100 * r['test_accuracy']:.2f}%", f"{100 * r['agreement']:.1f}%"
            ch = f"{r['accuracy_change_points']:+.2f}"
        print(f"{r['name']:<{width}} {a:>9} {g:>7} {ch:>7} {r['parameters']:>9,} "
              f"{r['nonzeros']:>9,} {_fmt_bytes(r['bytes_on_disk']):>10} "
              f"{r['bytes_ratio']:>6.3f} {_us(r['latency_b1_us']):>9} "
              f"{_us(r['latency_b256_us']):>9}")
    note = "change: points against the first model; ratio: bytes on disk / the first model's"
    if not no_latency:
        note += (f"; b1, b256: median forward time at batch 1 and 256 over {repeats} calls "
                 f"after {WARMUP} warm-up calls")
    print(note)


def _print_per_output(rows, targets):
    """RMSE and R^2 of every output, one row per model."""
    if "rmse_per_output" not in rows[0] or len(targets) < 2:
        return
    width = max(12, *(len(r["name"]) for r in rows))
    print("per output (RMSE / R^2):")
    print(f"{'model':<{width}}" + "".join(f" {t:>19}" for t in targets))
    for r in rows:
        print(f"{r['name']:<{width}}" + "".join(
            f" {f'{a:.4g} / {b:.4f}':>19}" for a, b in zip(r["rmse_per_output"],
                                                        r["r2_per_output"])))


def _plot_report(rows, path, regression):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["bytes_on_disk"] for r in rows]
    ys = [r["rmse"] if regression else 100 * r["test_accuracy"] for r in rows]
    ax.scatter(xs, ys, color="C0", zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4),
                    fontsize="small")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    # 1-2-5 ticks labelled in kB/MB; the default minor labels overlap on a short range
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda v, _: f"{v / 1e6:g} MB" if v >= 1e6 else f"{v / 1e3:g} kB"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="bytes on disk (log scale)",
           ylabel="test RMSE" if regression else "test accuracy (%)",
           title="Size against " + ("error" if regression else "accuracy"))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------- command

def cmd_report(args, ctx):
    json_out = None if args.json in (None, "-") else args.json
    _check_outputs(args, [(json_out, "JSON report", "--json")])
    for path in args.models:
        if os.path.realpath(path) in {os.path.realpath(p) for p in (json_out, args.plot) if p}:
            raise CLIError(f"{path}: a model is also an output (--json/--plot)")
    from . import _input_file
    for path in args.models:
        _input_file(path, "model")
    try:
        ds = _load_data(args, ctx)
    except DatasetError as e:
        raise CLIError(str(e)) from None
    X, y = ds.X_test, ds.y_test
    if X.shape[0] == 0:
        raise CLIError(f"{_data_path(args)}: the test split is empty")
    reg = ds.task == "regression"
    n_features = X.shape[1]
    models = [(p, _load_model_checked(p, n_features, "model", args.backend))
              for p in args.models]
    for p, m in models:
        _check_model_task(p, m, ds)
    if not reg:
        for p, m in models:
            if y.size and int(y.max()) >= m.n_outputs:
                raise CLIError(f"{_data_path(args)}: test label {int(y.max())} is outside the "
                               f"{_plural(m.n_outputs, 'class', 'classes')} of the model {p}")
    rows, ref = [], None
    for p, m in models:
        t = time.perf_counter()
        row, out = _measure(p, m, X, y, ref, args, reg)
        if ref is None:
            ref = out
        rows.append(row)
        ctx.info(f"{p}: measured in {time.perf_counter() - t:.1f} s")
    _add_ratios(rows)
    targets = list(_target_names(ds, models[0][1])) if reg else None
    if args.json != "-":
        _print_table(rows, reg, args.repeats, args.no_latency)
        if reg and not args.quiet:
            _print_per_output(rows, targets)
    doc = {"pykd_version": __version__, "data": _data_path(args), "split": "test",
           "n_test": int(X.shape[0]), "task": ds.task, "targets": targets,
           "backend": args.backend, "threads": args.threads,
           "timing": None if args.no_latency else {"warmup": WARMUP, "repeats": args.repeats,
                                                   "statistic": "median",
                                                   "batches": list(BATCHES)},
           "models": rows}
    if args.json:
        _write_json(args.json, doc, ctx.stdout)
        if args.json != "-":
            ctx.info(f"JSON: {args.json}")
    if args.plot:
        _plot_report(rows, args.plot, reg)
        ctx.info(f"plot: {args.plot}")
    return 0
