"""``pykd demo``: the whole pipeline (teacher, KD students, scratch students)
and its summary tables."""
from __future__ import annotations

import contextlib
import os
import statistics
import time

from .._step import TrainConfig
from ..models import load_model
from ..train import evaluate, soft_labels
from . import _plural
from . import (DEMO, QUICK, CLIError, _add_classes, _add_common, _add_kd, _cfg_json,
               _check_out_dir_tree, _check_outputs, _data_path, _dropout, _entry, _finish,
               _fmt_bytes, _hidden, _input_file, _load_data, _meta_dict, _n_classes,
               _number, _pct, _pos_float, _pos_int, _save_npy, _train)

#: Position in ``pykd --help`` (see pykd.cli._command_modules).
ORDER = 90
#: The compression table: fine-tuning epochs and learning rate, and the
#: issue's targets (accuracy loss in points, file size against the student).
#: Pruning fine-tunes with the fused training step (batch 64, 8 epochs); the
#: other kinds with the layer-by-layer NumPy trainer, at batch 256 for speed
#: (1 epoch). Learning rates tuned on Fashion-MNIST students.
COMPRESS = {"epochs": 8, "lr": 3e-4, "batch_size": 64,
            "trainer_epochs": 1, "trainer_lr": 1e-4, "trainer_batch_size": 256,
            "sparsity": 0.9, "bits": 5, "calibrate": 1000}


def register(sub):
    p = sub.add_parser("demo", help="the whole pipeline: teacher, KD students, scratch students",
                       description="Train the teacher, distill students (one per seed), train "
                                   "the same students without distillation, and compare.")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK['n_train']} training images, "
                        f"{QUICK['teacher_epochs']} epochs each (under a minute)")
    p.add_argument("--teacher-hidden", type=_hidden, default=DEMO["teacher_hidden"],
                   metavar="W1,W2,...", help="teacher hidden widths (default: 1200,1200)")
    p.add_argument("--student-hidden", type=_hidden, default=DEMO["student_hidden"],
                   metavar="W1,W2,...", help="student hidden widths (default: 200,200)")
    p.add_argument("--teacher-epochs", type=_pos_int, default=None,
                   help=f"(default: {DEMO['teacher_epochs']})")
    p.add_argument("--student-epochs", type=_pos_int, default=None,
                   help=f"(default: {DEMO['student_epochs']})")
    p.add_argument("--dropout", type=_dropout, default=DEMO["teacher_dropout"],
                   help=f"teacher dropout (default: {DEMO['teacher_dropout']:g})")
    p.add_argument("--seeds", type=_pos_int, default=DEMO["seeds"],
                   help=f"students per kind, seeds 0..N-1 (default: {DEMO['seeds']})")
    _add_kd(p)
    p.add_argument("--batch-size", type=_pos_int, default=DEMO["batch_size"],
                   help=f"(default: {DEMO['batch_size']}); one larger than the training set "
                        "means one batch of the whole set (with a warning)")
    p.add_argument("--lr", type=_pos_float, default=DEMO["lr"])
    p.add_argument("--teacher-lr-decay", type=_number(float, 0, 1, low_open=True),
                   default=DEMO["teacher_lr_decay"], metavar="GAMMA",
                   help="the teacher's per-epoch learning-rate factor "
                        f"(default: {DEMO['teacher_lr_decay']:g})")
    p.add_argument("--student-lr-decay", type=_number(float, 0, 1, low_open=True),
                   default=DEMO["student_lr_decay"], metavar="GAMMA",
                   help="the students' per-epoch learning-rate factor "
                        f"(default: {DEMO['student_lr_decay']:g}, constant)")
    p.add_argument("--out", default="pykd-demo", metavar="DIR",
                   help="directory for models, logits and checkpoints (default: pykd-demo)")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished models in DIR and resume an interrupted one")
    p.add_argument("--plot", metavar="FILE.png", help="draw training curves (needs matplotlib)")
    p.add_argument("--compress-epochs", type=_pos_int, default=None, metavar="N",
                   help="fine-tuning epochs of every variant of the compression table "
                        f"(default: {COMPRESS['epochs']} for pruning, "
                        f"{COMPRESS['trainer_epochs']} for low rank and codebooks)")
    p.add_argument("--no-compression", action="store_true",
                   help="skip the compression table (pruned, int8, low-rank, codebook and "
                        "combined variants of the first KD student)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the training checkpoints (*.ckpt.npz) after a finished run "
                        "(default: removed)")
    _add_classes(p)
    _add_common(p, task=False)       # a classification demo
    p.set_defaults(func=cmd_demo)


def cmd_demo(args, ctx):
    quick = args.quick
    teacher_epochs = args.teacher_epochs if args.teacher_epochs is not None else (
        QUICK["teacher_epochs"] if quick else DEMO["teacher_epochs"])
    student_epochs = args.student_epochs if args.student_epochs is not None else (
        QUICK["student_epochs"] if quick else DEMO["student_epochs"])
    _check_out_dir_tree(args.out, "--out")
    _check_outputs(args, [])
    ds = _load_data(args, ctx, tasks=("classification",))
    if quick:
        from ..data import Dataset
        ds = Dataset(ds.X_train[:QUICK["n_train"]], ds.y_train[:QUICK["n_train"]],
                     ds.X_test[:QUICK["n_test"]], ds.y_test[:QUICK["n_test"]],
                     ds.name + " (quick subset)")
        ctx.info(f"quick: {ds!r}")
    if ds.X_test.shape[0] == 0:
        raise CLIError(f"{_data_path(args)}: the demo needs a test set")
    n_classes = _n_classes(args, ds)
    os.makedirs(args.out, exist_ok=True)
    path = lambda name: os.path.join(args.out, name)  # noqa: E731
    t0 = time.perf_counter()

    def phase(name, sizes, cfg, epochs, seed, lr_decay, **kw):
        out = path(f"{name}.pykd")
        if args.resume and os.path.exists(out):
            _input_file(out, "model")
            model = load_model(out, backend=args.backend)
            old = _meta_dict(model, "config")
            want = {"sizes": sizes, "epochs": epochs, "n_train": int(ds.X_train.shape[0]),
                    "train": _cfg_json(cfg), "lr_decay": lr_decay}
            if any(old.get(k) != v for k, v in want.items()):
                raise CLIError(f"{out} was trained with another configuration; use a new --out "
                               f"directory or run without --resume")
            ev = evaluate(model, ds.X_test, ds.y_test, teacher=kw.get("teacher"))
            history = _meta_dict(model, "history")
            ctx.histories[name] = history
            entry = _entry(name, model, ev, history, old, out)
            ctx.models.append(entry)
            ctx.info(f"{name}: reusing {out} (test accuracy {_pct(ev['accuracy'])})")
            return model, entry
        return _train(ctx, name, sizes, ds, cfg, epochs=epochs, batch_size=args.batch_size,
                      seed=seed, out=out, checkpoint=out + ".ckpt.npz", resume=args.resume
                      and os.path.exists(out + ".ckpt.npz"), backend=args.backend,
                      lr_decay=lr_decay, **kw)

    t_sizes = [ds.n_features, *args.teacher_hidden, n_classes]
    s_sizes = [ds.n_features, *args.student_hidden, n_classes]
    tcfg = TrainConfig(loss="ce", lr=args.lr, dropout=args.dropout, seed=0)
    teacher, t_entry = phase("teacher", t_sizes, tcfg, teacher_epochs, 0, args.teacher_lr_decay,
                             role="teacher")

    t = time.perf_counter()
    logits = soft_labels(teacher, ds.X_train, args.temperature, backend=args.backend,
                         progress=not ctx.quiet)
    soft_seconds = time.perf_counter() - t
    _save_npy(path("teacher_logits.npy"), logits)
    ctx.info(f"soft labels: {logits.shape} in {soft_seconds:.2f} s -> {path('teacher_logits.npy')}")

    kd_entries, scratch_entries = [], []
    for seed in range(args.seeds):
        kcfg = TrainConfig(loss="kd", temperature=args.temperature, alpha=args.alpha,
                           lr=args.lr, seed=seed)
        kd_model, e = phase(f"kd_student_seed{seed}", s_sizes, kcfg, student_epochs, seed,
                     args.student_lr_decay, teacher=teacher, teacher_logits=logits, role="student",
                     extra_config={"temperature": args.temperature, "alpha": args.alpha})
        kd_entries.append(e)
        if seed == 0:
            student0 = kd_model
        scfg = TrainConfig(loss="ce", lr=args.lr, seed=seed)
        _, e = phase(f"scratch_student_seed{seed}", s_sizes, scfg, student_epochs, seed,
                     args.student_lr_decay, teacher=teacher, role="scratch")
        scratch_entries.append(e)
    total = time.perf_counter() - t0

    rows = [("teacher", [t_entry]), ("KD student", kd_entries),
            ("scratch student", scratch_entries)]
    summary = {}
    print()
    decay = lambda g: f" x {g:g}/epoch" if g != 1 else ""  # noqa: E731
    print(f"pykd demo on {ds.name} ({args.backend} backend)")
    print(f"  teacher {'-'.join(map(str, t_sizes))}: {_plural(teacher_epochs, 'epoch')}, dropout "
          f"{args.dropout:g}, Adam lr {args.lr:g}{decay(args.teacher_lr_decay)}, batch "
          f"{args.batch_size}")
    print(f"  students {'-'.join(map(str, s_sizes))}: {_plural(student_epochs, 'epoch')}, Adam lr "
          f"{args.lr:g}{decay(args.student_lr_decay)}, batch {args.batch_size}; KD with "
          f"T={args.temperature:g}, alpha={args.alpha:g}; {args.seeds} seed"
          f"{'s' if args.seeds > 1 else ''} each")
    header = f"{'model':<17} {'test accuracy':>17} {'agreement':>10} {'parameters':>11} " \
             f"{'bytes':>10} {'s/epoch':>8}"
    print(header)
    print("-" * len(header))
    for label, entries in rows:
        accs = [e["test_accuracy"] for e in entries]
        agrees = [e["agreement"] for e in entries if e.get("agreement") is not None]
        spe = [s for e in entries for s in e["seconds_per_epoch"]]
        mean = statistics.fmean(accs)
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        acc_txt = f"{100 * mean:.2f}%" + (f" ± {100 * sd:.2f}" if len(accs) > 1 else "")
        agree_txt = f"{100 * statistics.fmean(agrees):.2f}%" if agrees else "-"
        med = statistics.median(spe) if spe else float("nan")
        print(f"{label:<17} {acc_txt:>17} {agree_txt:>10} {entries[0]['parameters']:>11,} "
              f"{_fmt_bytes(entries[0]['bytes']):>10} {med:>8.2f}")
        summary[label] = {"test_accuracy_mean": mean, "test_accuracy_std": sd,
                          "test_accuracy": accs, "runs": len(accs),
                          "agreement_mean": statistics.fmean(agrees) if agrees else None,
                          "parameters": entries[0]["parameters"], "bytes": entries[0]["bytes"],
                          "seconds_per_epoch_median": med}
    gain = summary["KD student"]["test_accuracy_mean"] - summary["scratch student"]["test_accuracy_mean"]
    n_seeds = args.seeds
    print(f"KD - scratch: {100 * gain:+.2f} points (mean over {n_seeds} seed"
          f"{'s' if n_seeds > 1 else ''}); compression {t_entry['parameters'] / kd_entries[0]['parameters']:.1f}x; "
          f"soft labels {soft_seconds:.2f} s; total {total:.0f} s")
    if quick:
        print("  (the quick subset is too small to show a KD gain: a difference of this size "
              "between a few short runs is noise; run without --quick)")
    summary["kd_gain_points"] = 100 * gain
    summary["soft_labels_seconds"] = soft_seconds
    summary["total_seconds"] = total
    demo_cfg = {"quick": quick, "teacher_sizes": t_sizes, "student_sizes": s_sizes,
                "teacher_epochs": teacher_epochs, "student_epochs": student_epochs,
                "teacher_dropout": args.dropout, "temperature": args.temperature,
                "alpha": args.alpha, "lr": args.lr, "teacher_lr_decay": args.teacher_lr_decay,
                "student_lr_decay": args.student_lr_decay,
                "batch_size": args.batch_size,
                "seeds": args.seeds, "backend": args.backend, "dataset": ds.name}
    extra = {"summary": summary, "demo_config": demo_cfg}
    if not args.no_compression:
        ft_epochs = args.compress_epochs
        demo_cfg["compress_epochs"] = ft_epochs
        extra["compression"] = compression_table(
            args, ctx, ds, student0, path("kd_student_seed0.pykd"), logits, ft_epochs)
    if not args.keep_checkpoints:
        names = ["teacher"] + [f"{k}_student_seed{s}" for s in range(args.seeds)
                               for k in ("kd", "scratch")]
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path(f"{name}.pykd.ckpt.npz"))
    return _finish(ctx, extra)


# ------------------------------------------------------- compression table

#: The issue's targets: (most points lost, largest file / student file).
TARGETS = {"pruned": (1.0, 0.2), "int8_dynamic": (0.3, None), "int8_static": (0.3, None),
           "lowrank": (1.0, None), "codebook": (None, None), "combined": (1.5, 1 / 25)}


def _half_rank(model):
    """The largest rank r at which :func:`pykd.low_rank` (which factors a
    layer only where ``r (n_in + n_out) < n_in n_out``) keeps at most half the
    model's parameters."""
    layers = model.to_model().layers
    total = model.parameters

    def params(r):
        n = 0
        for layer in layers:
            a, b = layer.n_in, layer.n_out
            n += (r * (a + b) if layer.kind == "dense" and r * (a + b) < a * b
                  else layer.parameters - layer.n_out) + layer.n_out
        return n
    best = None
    for r in range(1, max(layer.n_in for layer in layers) + 1):
        if params(r) <= total / 2:
            best = r
    return best


def compression_table(args, ctx, ds, student, student_path, logits, epochs):
    """The compressed variants of ``student`` (the first KD student), each
    fine-tuned by distillation from the teacher's logits where the issue
    says so; saved in the demo's directory, reused by --resume. Prints the
    table and returns its rows."""
    import pykd
    from ..compress import FineTune
    from .compress import save_smallest
    has_test = ds.X_test.shape[0] > 0
    C = COMPRESS
    e_prune, e_train = (epochs, epochs) if epochs else (C["epochs"], C["trainer_epochs"])
    common = dict(teacher_logits=logits, temperature=args.temperature, alpha=args.alpha,
                  seed=0, progress=not ctx.quiet, X_val=ds.X_test if has_test else None,
                  y_val=ds.y_test if has_test else None)
    ft_prune = FineTune(ds.X_train, ds.y_train, epochs=e_prune, lr=C["lr"],
                        batch_size=C["batch_size"], **common)
    ft = FineTune(ds.X_train, ds.y_train, epochs=e_train, lr=C["trainer_lr"],
                  batch_size=C["trainer_batch_size"], **common)
    sp, bits = COMPRESS["sparsity"], COMPRESS["bits"]
    n_cal = min(COMPRESS["calibrate"], ds.X_train.shape[0])
    rank = _half_rank(student)
    made = {}

    def pruned():
        return pykd.prune(student, sp, schedule="gradual", fine_tune=ft_prune)

    def combined():
        return pykd.cluster(made["pruned"], bits, fine_tune=ft)

    variants = [
        ("pruned", f"pruned {100 * sp:.0f}%", "gradual, KD fine-tuned", pruned),
        ("int8_dynamic", "int8 dynamic", "post-training", lambda: pykd.quantize_model(student)),
        ("int8_static", "int8 static", f"post-training, {n_cal} calibration rows",
         lambda: pykd.quantize_model(student, "static", ds.X_train[:n_cal])),
        ("lowrank", "low rank", f"rank {rank}, KD fine-tuned",
         lambda: pykd.low_rank(student, rank=rank, fine_tune=ft)) if rank else None,
        ("codebook", f"{bits}-bit codebook", "KD fine-tuned",
         lambda: pykd.cluster(student, bits, fine_tune=ft)),
        ("combined", f"sparse + {bits}-bit", f"pruned {100 * sp:.0f}% + codebook, KD fine-tuned",
         combined),
    ]
    s_bytes = os.path.getsize(student_path)
    s_acc = evaluate(student, ds.X_test, ds.y_test)["accuracy"] if has_test else None
    rows = [{"variant": "student", "label": "KD student", "how": "float32, dense",
             "path": student_path, "test_accuracy": s_acc, "change_points": 0.0,
             "parameters": student.parameters, "nonzeros": student.nonzeros,
             "bytes_on_disk": s_bytes, "ratio": 1.0, "seconds": 0.0, "target": None,
             "target_met": None}]
    t_all = time.perf_counter()
    for key, label, how, build in filter(None, variants):
        out = os.path.join(args.out, f"compressed_{key}.pykd")
        f = ft_prune if key == "pruned" else ft
        spec = {"variant": key, "how": how, "epochs": f.epochs, "lr": f.lr,
                "batch_size": f.batch_size, "student": os.path.basename(student_path),
                "student_bytes": s_bytes}
        if key == "combined":
            spec["pruned"] = {"epochs": ft_prune.epochs, "lr": ft_prune.lr}
        t = time.perf_counter()
        model = None
        if args.resume and os.path.exists(out):
            _input_file(out, "model")
            model = load_model(out, backend=args.backend)
            if model.metadata.get("demo_variant") != spec:
                raise CLIError(f"{out} was made with another configuration; use a new --out "
                               f"directory or run without --resume")
            ctx.info(f"{label}: loaded {out}")
        else:
            ctx.info(f"{label}: {how}")
            model = save_smallest(build(), out, {"role": "compressed", "demo_variant": spec})
        made[key] = model
        seconds = time.perf_counter() - t
        acc = evaluate(model, ds.X_test, ds.y_test)["accuracy"] if has_test else None
        size = os.path.getsize(out)
        change = None if acc is None else 100 * (acc - s_acc)
        max_loss, max_ratio = TARGETS[key]
        checks = []
        if max_loss is not None and change is not None:
            checks.append(-change <= max_loss)
        if max_ratio is not None:
            checks.append(size / s_bytes <= max_ratio)
        target = " and ".join(
            ([f"loss <= {max_loss:g} pt"] if max_loss is not None else [])
            + ([f"file <= {max_ratio:.2g}x" if max_ratio >= 0.1 else
                f">= {1 / max_ratio:.0f}x smaller"] if max_ratio is not None else []))
        rows.append({"variant": key, "label": label, "how": how, "path": out,
                     "test_accuracy": acc, "change_points": change,
                     "parameters": model.parameters, "nonzeros": model.nonzeros,
                     "bytes_on_disk": size, "ratio": size / s_bytes, "seconds": seconds,
                     "kinds": sorted(set(model.to_model().kinds)),
                     "target": target or None,
                     "target_met": all(checks) if checks else None})
    total = time.perf_counter() - t_all
    print()
    ep = lambda n: f"{n} epoch{'s' if n != 1 else ''}"  # noqa: E731
    print(f"Compression of kd_student_seed0 (fine-tuned by KD from the teacher's logits: "
          f"pruning {ep(ft_prune.epochs)}, batch {ft_prune.batch_size}, Adam lr "
          f"{ft_prune.lr:g}; low rank and codebooks {ep(ft.epochs)}, batch {ft.batch_size}, "
          f"lr {ft.lr:g}; {total:.0f} s)")
    head = (f"{'variant':<18} {'how':<42} {'accuracy':>9} {'change':>7} {'bytes':>10} "
            f"{'ratio':>7}  target")
    print(head)
    print("-" * (len(head) + 20))
    for r in rows:
        ch = "-" if r["change_points"] is None else f"{r['change_points']:+.2f}"
        verdict = "" if r["target"] is None else (
            f"{r['target']}: " + ("n/a" if r["target_met"] is None else
                                  "met" if r["target_met"] else "MISSED"))
        print(f"{r['label']:<18} {r['how']:<42} {_pct(r['test_accuracy']):>9} {ch:>7} "
              f"{_fmt_bytes(r['bytes_on_disk']):>10} {r['ratio']:>7.3f}  {verdict}")
    print(f"ratio: bytes on disk / the student's ({_fmt_bytes(s_bytes)}, float32); change: "
          "test accuracy points against the student")
    if args.quick:
        print("  (the targets are the issue's, for the full Fashion-MNIST run; on the quick "
              "subset they are only indicative)")
    return {"rows": rows, "seconds": total,
            "fine_tune": {"prune": {"epochs": ft_prune.epochs, "lr": ft_prune.lr,
                                    "batch_size": ft_prune.batch_size},
                          "others": {"epochs": ft.epochs, "lr": ft.lr,
                                     "batch_size": ft.batch_size}}}
