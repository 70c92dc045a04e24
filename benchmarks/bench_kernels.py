#!/usr/bin/env python
"""Kernel benchmark: pykd backend="fortran" vs backend="numpy" (and PyTorch
when importable), same inputs, timed interleaved.

    python benchmarks/bench_kernels.py [--quick] [--threads 1,2]
                                       [--json out.json] [--markdown out.md]
                                       [--only SUBSTRING] [--repeats N]

For every thread count (BLAS and OpenMP pools limited together through
threadpoolctl) every kernel is timed with its backends alternating
(F N F N ...), each backend in a worker process of its own (as a user runs
one backend; in one process the backends' thread pools slow each other
down, see harness.Workers; --in-process shows that), and the table shows medians, the speedup numpy/fortran, and
for GEMM-bound kernels GFLOP/s with the percentage of the sgemm ceiling
measured in the same run, for bandwidth-bound kernels GB/s with the
percentage of the measured copy bandwidth. Before timing, each kernel's
fortran output is compared with its numpy twin (column "check").

Timing targets are printed as MET/MISSED at the end; timing never makes the
script exit non-zero. The machine is a noisy shared VM: read ratios, not
absolute times (shared/notes/ENGINEERING.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import math
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

BACKENDS = ("fortran", "numpy")
N_PARAMS = 2_395_210  # teacher 784-1200-1200-10 parameter count

try:  # optional comparison column
    import torch  # type: ignore
except Exception:
    torch = None


# --------------------------------------------------------------------------
# case definitions
# --------------------------------------------------------------------------

class Case:
    """One benchmark row.

    make(backend) -> zero-arg callable for the timed loop (may own private
    in-place buffers); check(backend) -> outputs from fresh inputs for the
    fortran/numpy comparison (defaults to calling make(backend)());
    make_torch(), if given, -> zero-arg callable using PyTorch.
    kind: "flops" (GFLOP/s, % sgemm ceiling), "ops" (int8 GOP/s, % of the
    fp32 sgemm ceiling), "bytes" (GB/s, % copy bandwidth).
    """

    def __init__(self, kernel, shape, kind, work, make, check=None, make_torch=None,
                 target=None, note=None, skip=None):
        self.kernel = kernel
        self.shape = shape
        self.kind = kind
        self.work = float(work)
        self.make = make
        self.check = check
        self.make_torch = make_torch
        self.target = target  # minimum numpy/fortran ratio, or None
        self.note = note
        self.skip = skip  # reason string: row reported but not run

    @property
    def key(self):
        return f"{self.kernel} {self.shape}"


def _f32(rng, shape, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


def _accepts_kw(func, name):
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return True  # cannot tell: try it
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD or p.name == name:
            return True
    return False


def build_cases(pykd, quick=False):
    rng = np.random.default_rng(0)
    cases = []
    T = torch

    # ---- dense forward / backward ---------------------------------------
    dense_shapes = [(64, 784, 1200), (64, 1200, 1200), (256, 784, 200)]
    has_need_dx = _accepts_kw(pykd.dense_backward, "need_dx")
    for (n, i, o) in dense_shapes:
        x = _f32(rng, (n, i))
        W = _f32(rng, (i, o), 1.0 / math.sqrt(i))
        b = _f32(rng, (o,), 0.1)
        y = np.maximum(x @ W + b, 0.0).astype(np.float32)
        dy = _f32(rng, (n, o))
        shape = f"{n}x{i}@{i}x{o}"
        is_train = (n, i, o) == (64, 784, 1200)

        cases.append(Case(
            "dense fwd relu", shape, "flops", 2.0 * n * i * o,
            make=lambda be, x=x, W=W, b=b: (
                lambda: pykd.dense(x, W, b, activation="relu", backend=be)),
            make_torch=None if T is None else (
                lambda x=x, W=W, b=b: _torch_dense(x, W, b)),
            target=1.0 if is_train else None))

        cases.append(Case(
            "dense bwd relu", shape, "flops", 4.0 * n * i * o,
            make=lambda be, dy=dy, x=x, W=W, y=y: (
                lambda: pykd.dense_backward(dy, x, W, y, activation="relu", backend=be)),
            make_torch=None if T is None else (
                lambda dy=dy, x=x, W=W, y=y: _torch_dense_bwd(dy, x, W, y, True)),
            target=1.0 if is_train else None))

        cases.append(Case(
            "dense bwd relu no-dx", shape, "flops", 2.0 * n * i * o,
            make=lambda be, dy=dy, x=x, W=W, y=y: (
                lambda: pykd.dense_backward(dy, x, W, y, activation="relu",
                                            need_dx=False, backend=be)),
            make_torch=None if T is None else (
                lambda dy=dy, x=x, W=W, y=y: _torch_dense_bwd(dy, x, W, y, False)),
            skip=None if has_need_dx else "dense_backward has no need_dx keyword"))

    # ---- softmax / log_softmax -------------------------------------------
    for (n, k) in [(64, 10), (4096, 1000)]:
        z = _f32(rng, (n, k), 3.0)
        shape = f"{n}x{k}"
        nbytes = 2.0 * 4 * n * k
        cases.append(Case(
            "softmax T=4", shape, "bytes", nbytes,
            make=lambda be, z=z: (lambda: pykd.softmax(z, T=4.0, backend=be)),
            make_torch=None if T is None else (
                lambda z=z: _torch_softmax(z, 4.0, log=False)),
            target=3.0 if (n, k) == (64, 10) else None))
        cases.append(Case(
            "log_softmax T=4", shape, "bytes", nbytes,
            make=lambda be, z=z: (lambda: pykd.log_softmax(z, T=4.0, backend=be)),
            make_torch=None if T is None else (
                lambda z=z: _torch_softmax(z, 4.0, log=True))))

    # ---- kd_loss / cross_entropy -----------------------------------------
    for (n, k) in [(64, 10), (4096, 1000)]:
        s = _f32(rng, (n, k), 2.0)
        t = _f32(rng, (n, k), 4.0)
        lab = rng.integers(0, k, size=n, dtype=np.int64)
        cases.append(Case(
            "kd_loss T=5 a=0.1", f"{n}x{k}", "bytes", 3.0 * 4 * n * k + 8.0 * n,
            make=lambda be, s=s, t=t, lab=lab: (
                lambda: pykd.kd_loss(s, t, lab, T=5.0, alpha=0.1, backend=be)),
            make_torch=None if T is None else (
                lambda s=s, t=t, lab=lab: _torch_kd(s, t, lab, 5.0, 0.1)),
            target=3.0 if (n, k) == (64, 10) else None))
    n, k = 64, 10
    logits = _f32(rng, (n, k), 2.0)
    lab = rng.integers(0, k, size=n, dtype=np.int64)
    cases.append(Case(
        "cross_entropy", f"{n}x{k}", "bytes", 2.0 * 4 * n * k + 8.0 * n,
        make=lambda be: (lambda: pykd.cross_entropy(logits, lab, backend=be)),
        make_torch=None if T is None else (lambda: _torch_ce(logits, lab))))

    # ---- optimizer steps (in place) --------------------------------------
    N = N_PARAMS
    p0 = _f32(rng, (N,), 0.05)
    g0 = _f32(rng, (N,), 1e-3)
    v0 = np.zeros(N, dtype=np.float32)
    mask = rng.random(N) >= 0.9  # keep ~10%, like a 90 % sparsity mask

    def sgd_make(be, use_mask):
        p, g, v = p0.copy(), g0.copy(), v0.copy()
        m = mask if use_mask else None
        return lambda: pykd.sgd_step(p, g, v, lr=0.01, momentum=0.9, mask=m, backend=be)

    def sgd_check(be, use_mask):
        p, g, v = p0.copy(), g0.copy(), (g0 * 0.5).astype(np.float32)
        pykd.sgd_step(p, g, v, lr=0.01, momentum=0.9, mask=mask if use_mask else None,
                      backend=be)
        return p, v

    def adam_make(be, use_mask):
        p, g, m1, m2 = p0.copy(), g0.copy(), v0.copy(), v0.copy()
        m = mask if use_mask else None
        return lambda: pykd.adam_step(p, g, m1, m2, step=10, lr=1e-3, mask=m, backend=be)

    def adam_check(be, use_mask):
        p, g = p0.copy(), g0.copy()
        m1 = (g0 * 0.5).astype(np.float32)
        m2 = (g0 * g0 * 0.5).astype(np.float32)
        pykd.adam_step(p, g, m1, m2, step=10, lr=1e-3, mask=mask if use_mask else None,
                       backend=be)
        return p, m1, m2

    for use_mask in (False, True):
        suffix = " masked" if use_mask else ""
        extra = N if use_mask else 0
        cases.append(Case(
            "sgd_step" + suffix, f"{N}", "bytes", 5.0 * 4 * N + extra,
            make=lambda be, um=use_mask: sgd_make(be, um),
            check=lambda be, um=use_mask: sgd_check(be, um),
            make_torch=None if (T is None or use_mask) else (
                lambda: _torch_opt("sgd", p0, g0)),
            target=None if use_mask else 3.0))
        cases.append(Case(
            "adam_step" + suffix, f"{N}", "bytes", 7.0 * 4 * N + extra,
            make=lambda be, um=use_mask: adam_make(be, um),
            check=lambda be, um=use_mask: adam_check(be, um),
            make_torch=None if (T is None or use_mask) else (
                lambda: _torch_opt("adam", p0, g0)),
            target=None if use_mask else 3.0))

    # ---- pruning ---------------------------------------------------------
    W1 = _f32(rng, (784, 1200), 0.05)
    W2 = _f32(rng, (1200, 1200), 0.03)
    W3 = _f32(rng, (1200, 10), 0.03)
    cases.append(Case(
        "magnitude_mask 0.9", "784x1200", "bytes", 5.0 * W1.size,
        make=lambda be: (lambda: pykd.magnitude_mask(W1, 0.9, backend=be))))
    tot = W1.size + W2.size + W3.size
    cases.append(Case(
        "magnitude_mask 0.9 global", "[784x1200,1200x1200,1200x10]", "bytes", 5.0 * tot,
        make=lambda be: (lambda: pykd.magnitude_mask([W1, W2, W3], 0.9, backend=be))))

    # ---- int8 quantization -----------------------------------------------
    Wq = _f32(rng, (1200, 1200), 0.03)
    for pc in (False, True):
        cases.append(Case(
            f"quantize_int8 per_channel={pc}", "1200x1200", "bytes", 5.0 * Wq.size,
            make=lambda be, pc=pc: (
                lambda: pykd.quantize_int8(Wq, per_channel=pc, backend=be))))
    try:
        qd, sd = pykd.quantize_int8(Wq, per_channel=True, backend="numpy")
        cases.append(Case(
            "dequantize_int8 per_channel", "1200x1200", "bytes", 5.0 * Wq.size,
            make=lambda be: (lambda: pykd.dequantize_int8(qd, sd, backend=be))))
    except Exception as exc:
        cases.append(Case("dequantize_int8 per_channel", "1200x1200", "bytes", 0,
                          make=None, skip=f"numpy quantize_int8 failed: {exc!r}"))

    for (n, i, o) in [(64, 784, 1200), (1, 784, 200)]:
        x = _f32(rng, (n, i))
        W = _f32(rng, (i, o), 1.0 / math.sqrt(i))
        b = _f32(rng, (o,), 0.1)
        shape = f"{n}x{i}@{i}x{o}"
        try:
            q, sc = pykd.quantize_int8(W, per_channel=True, backend="numpy")
        except Exception as exc:
            cases.append(Case("int8_matmul", shape, "ops", 0, make=None,
                              skip=f"numpy quantize_int8 failed: {exc!r}"))
            continue
        cases.append(Case(
            "int8_matmul", shape, "ops", 2.0 * n * i * o,
            make=lambda be, x=x, q=q, sc=sc, b=b: (
                lambda: pykd.int8_matmul(x, q, sc, b, backend=be))))

    return cases


# --------------------------------------------------------------------------
# PyTorch comparison callables (only used when torch imports)
# --------------------------------------------------------------------------

def _torch_dense(x, W, b):
    tx, tW, tb = (torch.from_numpy(a) for a in (x, W, b))

    def f():
        with torch.no_grad():
            return torch.relu(torch.addmm(tb, tx, tW))
    return f


def _torch_dense_bwd(dy, x, W, y, need_dx):
    tdy, tx, tW, ty = (torch.from_numpy(a) for a in (dy, x, W, y))

    def f():
        with torch.no_grad():
            dz = tdy * (ty > 0)
            dW = tx.t() @ dz
            db = dz.sum(0)
            dx = dz @ tW.t() if need_dx else None
            return dx, dW, db
    return f


def _torch_softmax(z, Tmp, log):
    tz = torch.from_numpy(z)
    fn = torch.log_softmax if log else torch.softmax

    def f():
        with torch.no_grad():
            return fn(tz / Tmp, dim=1)
    return f


def _torch_kd(s, t, lab, Tmp, alpha):
    import torch.nn.functional as F
    ts, tt, tl = torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(lab)

    def f():
        sl = ts.detach().requires_grad_(True)
        soft = F.kl_div(F.log_softmax(sl / Tmp, dim=1), F.softmax(tt / Tmp, dim=1),
                        reduction="batchmean") * (Tmp * Tmp)
        hard = F.cross_entropy(sl, tl)
        loss = alpha * hard + (1.0 - alpha) * soft
        loss.backward()
        return loss.item(), sl.grad
    return f


def _torch_ce(logits, lab):
    import torch.nn.functional as F
    tz, tl = torch.from_numpy(logits), torch.from_numpy(lab)

    def f():
        z = tz.detach().requires_grad_(True)
        loss = F.cross_entropy(z, tl)
        loss.backward()
        return loss.item(), z.grad
    return f


def _torch_opt(which, p0, g0):
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    p.grad = torch.from_numpy(g0.copy())
    if which == "sgd":
        opt = torch.optim.SGD([p], lr=0.01, momentum=0.9, foreach=True)
    else:
        opt = torch.optim.Adam([p], lr=1e-3, foreach=True)
    return opt.step


# --------------------------------------------------------------------------
# checking fortran against numpy
# --------------------------------------------------------------------------

def _flatten(out):
    if isinstance(out, (tuple, list)):
        res = []
        for o in out:
            res.extend(_flatten(o))
        return res
    return [out]


def compare_outputs(a, b, rtol=1e-4):
    """Compare fortran output ``a`` with numpy output ``b``. Returns
    (ok, text)."""
    fa, fb = _flatten(a), _flatten(b)
    if len(fa) != len(fb):
        return False, f"{len(fa)} vs {len(fb)} outputs"
    worst = 0.0
    notes = []
    ok = True
    for idx, (x, y) in enumerate(zip(fa, fb)):
        if x is None or y is None:
            if (x is None) != (y is None):
                ok = False
                notes.append(f"out{idx}: None vs {type(y).__name__ if x is None else 'None'}")
            continue
        xa, ya = np.asarray(x), np.asarray(y)
        if xa.shape != ya.shape:
            ok = False
            notes.append(f"out{idx}: shape {xa.shape} vs {ya.shape}")
            continue
        if xa.dtype != ya.dtype and (xa.ndim or ya.ndim):  # scalars: any type
            ok = False
            notes.append(f"out{idx}: dtype {xa.dtype} vs {ya.dtype}")
        if xa.dtype.kind in "biu" and ya.dtype.kind in "biu":
            mism = int(np.count_nonzero(xa != ya))
            if mism:
                ok = False
                notes.append(f"out{idx}: {mism}/{xa.size} differ")
            continue
        xd, yd = xa.astype(np.float64), ya.astype(np.float64)
        if not (np.all(np.isfinite(xd)) and np.all(np.isfinite(yd))):
            if not np.array_equal(np.isfinite(xd), np.isfinite(yd)):
                ok = False
                notes.append(f"out{idx}: non-finite values differ")
                continue
        scale = float(np.max(np.abs(yd))) if yd.size else 0.0
        diff = float(np.max(np.abs(xd - yd))) if xd.size else 0.0
        rel = diff / scale if scale > 0 else diff
        worst = max(worst, rel)
        if rel > rtol:
            ok = False
            notes.append(f"out{idx}: max|diff|/max|ref| = {rel:.1e}")
    text = f"ok {worst:.0e}" if ok else "DIFF " + "; ".join(notes)
    return ok, text


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------

def worker_factory(backend, quick):
    """Runs in a timing worker (harness.Workers): the same cases, built from
    the same seed, for one backend; returns get(case key) -> callable."""
    import pykd
    cases = {c.key: c for c in build_cases(pykd, quick=quick)}

    def get(key):
        case = cases[key]
        if backend == "torch":
            if case.make_torch is None:
                raise ValueError("no PyTorch version of this kernel")
            return case.make_torch()
        return case.make(backend)
    return get


def _rate(case, seconds):
    if seconds is None or seconds <= 0 or case.work <= 0:
        return None
    return case.work / seconds / 1e9


def run_case(case, threads, ceil_gflops, copy_gbps, args, problems, workers=None):
    row = {
        "kernel": case.kernel, "shape": case.shape, "kind": case.kind,
        "work": case.work, "threads": threads, "timings": {}, "errors": {},
        "check": None, "check_ok": None, "target": case.target,
    }
    if case.note:
        row["note"] = case.note
    if case.skip:
        row["skipped"] = case.skip
        return row

    # correctness check + first call (so errors show before timing)
    outs = {}
    for be in BACKENDS:
        try:
            with H.capture_stderr_fd() as cap:
                outs[be] = case.check(be) if case.check else case.make(be)()
            if cap.text.strip():
                n_copy = cap.text.count("copied an array")
                msg = (f"{n_copy} f2py array copies reported" if n_copy
                       else "wrote to stderr: " + cap.text.strip().splitlines()[0][:120])
                row.setdefault("stderr", {})[be] = cap.text[:2000]
                problems.append(f"[{threads}T] {case.key} backend={be}: {msg}")
        except Exception as exc:
            msg = f"{type(exc).__name__}: {exc}"
            row["errors"][be] = msg
            problems.append(f"[{threads}T] {case.key} backend={be} raised {msg}")
            if args.verbose:
                traceback.print_exc()
    if "fortran" in outs and "numpy" in outs:
        try:
            ok, text = compare_outputs(outs["fortran"], outs["numpy"])
        except Exception as exc:
            ok, text = False, f"compare failed: {exc!r}"
        row["check"], row["check_ok"] = text, ok
        if not ok:
            problems.append(f"[{threads}T] {case.key}: fortran vs numpy {text}")
    del outs

    settle = args.settle if case.kind in ("flops", "ops") else 0.0
    if workers is not None:
        cands = {be: (be, case.key) for be in BACKENDS if be not in row["errors"]}
        if torch is not None and case.make_torch is not None:
            cands["torch"] = ("torch", case.key)
        res, errs = workers.time(cands, repeats=args.repeats, warmup=args.warmup,
                                 min_time=args.min_time, max_time=args.max_case_time,
                                 blocked=args.blocked, settle=settle)
        for be, msg in errs.items():
            row["errors"][be] = msg
            if be != "torch":
                problems.append(f"[{threads}T] {case.key} backend={be} failed while timing: {msg}")
        return _finish_row(row, case, res, ceil_gflops, copy_gbps)

    funcs = {}
    for be in BACKENDS:
        if be in row["errors"]:
            continue
        try:
            funcs[be] = case.make(be)
        except Exception as exc:
            row["errors"][be] = f"{type(exc).__name__}: {exc}"
    if torch is not None and case.make_torch is not None:
        try:
            ft = case.make_torch()
            ft()
            funcs["torch"] = ft
        except Exception as exc:
            row["errors"]["torch"] = f"{type(exc).__name__}: {exc}"
    if not funcs:
        return row
    try:
        res = H.time_alternating(funcs, repeats=args.repeats, warmup=args.warmup,
                                 min_time=args.min_time, max_time=args.max_case_time,
                                 blocked=args.blocked, settle=settle)
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        row["errors"]["timing"] = msg
        problems.append(f"[{threads}T] {case.key} failed while timing: {msg}")
        return row
    return _finish_row(row, case, res, ceil_gflops, copy_gbps)


def _finish_row(row, case, res, ceil_gflops, copy_gbps):
    row["timings"] = res
    med = {k: v["median"] for k, v in res.items()}
    if "fortran" in med and "numpy" in med:
        row["speedup"] = med["numpy"] / med["fortran"]
    if "fortran" in med and "torch" in med:
        row["speedup_vs_torch"] = med["torch"] / med["fortran"]
    for be, s in med.items():
        r = _rate(case, s)
        row[f"rate_{be}"] = r
        if r is not None:
            ref = copy_gbps if case.kind == "bytes" else ceil_gflops
            row[f"pct_ceiling_{be}"] = 100.0 * r / ref if ref else None
    return row


UNITS = {"flops": "GF/s", "ops": "GOP/s", "bytes": "GB/s"}


def _fmt_rate(row, be):
    r = row.get(f"rate_{be}")
    if r is None:
        return "-"
    return f"{r:.1f} {UNITS[row['kind']]}" if r < 100 else f"{r:.0f} {UNITS[row['kind']]}"


def _fmt_pct(row, be):
    p = row.get(f"pct_ceiling_{be}")
    if p is None:
        return "-"
    return f"{p:.0f}%" + ("*" if row["kind"] == "ops" else "")


def table_rows(rows, with_torch):
    out = []
    for r in rows:
        t = r.get("timings", {})
        med = {k: v["median"] for k, v in t.items()}
        cells = [r["kernel"], r["shape"]]
        for be in BACKENDS + (("torch",) if with_torch else ()):
            if be in med:
                cells.append(H.format_seconds(med[be]))
            elif be in r.get("errors", {}):
                cells.append("ERR")
            elif r.get("skipped"):
                cells.append("skip")
            else:
                cells.append("-")
        sp = r.get("speedup")
        cells.append(f"{sp:.2f}x" if sp is not None else "-")
        if with_torch:
            st = r.get("speedup_vs_torch")
            cells.append(f"{st:.2f}x" if st is not None else "-")
        cells += [_fmt_rate(r, "fortran"), _fmt_pct(r, "fortran"), _fmt_rate(r, "numpy")]
        iqr = t.get("fortran", {}).get("iqr")
        mf = med.get("fortran")
        cells.append(f"{100 * iqr / mf:.0f}%" if iqr is not None and mf else "-")
        cells.append(r.get("check") or (r.get("skipped") or "-"))
        out.append(cells)
    headers = ["kernel", "shape", "fortran", "numpy"]
    if with_torch:
        headers.append("torch")
    headers.append("np/F")
    if with_torch:
        headers.append("torch/F")
    headers += ["F rate", "F %ceil", "N rate", "F IQR", "check"]
    return headers, out


def evaluate_targets(rows):
    res = []
    for r in rows:
        if r.get("target") is None:
            continue
        sp = r.get("speedup")
        status = "MISSED" if sp is None or sp < r["target"] else "MET"
        noise = None
        t = r.get("timings", {})
        if "fortran" in t and "numpy" in t:
            rel = [t[b]["iqr"] / t[b]["median"] for b in ("fortran", "numpy")
                   if t[b]["median"] > 0]
            noise = 100.0 * math.sqrt(sum(x * x for x in rel))
        res.append({"kernel": r["kernel"], "shape": r["shape"], "threads": r["threads"],
                    "target": r["target"], "ratio": sp, "status": status,
                    "noise_pct": noise})
    return res


def parse_threads(text):
    out = []
    for tok in str(text).split(","):
        tok = tok.strip()
        if tok:
            out.append(int(tok))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="few repeats, one thread count (the current default); ~2 min")
    ap.add_argument("--threads", default=None,
                    help="comma-separated thread counts (default: 1,2; --quick: current default)")
    ap.add_argument("--json", default=None, help="write results JSON here")
    ap.add_argument("--markdown", default=None, help="write a Markdown summary here")
    ap.add_argument("--only", default=None, help="only kernels whose name contains this")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per kernel")
    ap.add_argument("--settle", type=float, default=H.SETTLE,
                    help="seconds to pause before a BLAS-bound sample when the backend changes "
                         f"(default {H.SETTLE}; see harness.SETTLE); 0: none")
    ap.add_argument("--blocked", action="store_true",
                    help="diagnostic: time each backend in its own block instead of "
                         "interleaved (shows cross-talk between thread pools)")
    ap.add_argument("--in-process", action="store_true",
                    help="diagnostic: time all backends in this one process instead of one "
                         "worker process per backend (their thread pools then disturb "
                         "each other)")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    busy_start = H.cpu_busy_fraction(0.3)  # before this process does any work
    if args.threads:
        threads = parse_threads(args.threads)
    elif args.quick:
        threads = [H.default_threads()]
    else:
        threads = [1, 2]
    if args.repeats is None:
        args.repeats = 4 if args.quick else 15
    args.warmup = 1 if args.quick else 3
    args.min_time = 0.02
    args.max_case_time = 0.7 if args.quick else 8.0
    ceil_repeats = 3 if args.quick else 7

    env_before = H.thread_env()
    try:
        import pykd
    except Exception as exc:
        print(H.format_machine_info(H.machine_info()))
        print(f"\nERROR: cannot import pykd: {type(exc).__name__}: {exc}")
        print("Build/install the package first (e.g. pip install --no-build-isolation -e .).")
        return 0
    # after importing pykd, so that its BLAS and OpenMP pools are listed too
    info = H.machine_info()
    info["env_before_import"] = env_before
    info["cpu_busy_at_start"] = busy_start
    if busy_start is not None:
        print(f"CPU busy with other work at start: {100 * busy_start:.0f}%"
              + ("  (WARNING: the machine is not quiet)" if busy_start > 0.25 else ""))
    print(H.format_machine_info(info))
    changed = {k: v for k, v in info["env"].items() if v != env_before.get(k)}
    if changed:
        print("env set by importing pykd: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
    pykd_info = {"file": H.portable_path(getattr(pykd, "__file__", None)),
                 "version": getattr(pykd, "__version__", None)}
    try:
        from pykd import _build_config as _bc  # written by the build, if any
        pykd_info["build_config"] = {k: v for k, v in vars(_bc).items()
                                     if not k.startswith("_")
                                     and isinstance(v, (str, int, float, bool))}
    except Exception:
        pass
    print(f"pykd {pykd_info['version']} from {pykd_info['file']}")
    if torch is not None:
        print(f"torch {torch.__version__} (comparison column)")

    bw = H.measure_copy_bandwidth(repeats=ceil_repeats)
    print(f"copy bandwidth (np.copyto 256 MiB, read+write): {bw['gbps']:.1f} GB/s "
          f"[{bw['gbps_worst']:.1f}-{bw['gbps_best']:.1f}]")

    problems = []
    try:
        cases = build_cases(pykd, quick=args.quick)
    except Exception as exc:
        print(f"\nERROR while preparing inputs: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 0
    if args.only:
        cases = [c for c in cases if args.only in c.kernel]
    for c in cases:
        if c.skip:
            problems.append(f"{c.key}: skipped: {c.skip}")

    runs = []
    md_parts = []
    old_torch_threads = torch.get_num_threads() if torch is not None else None
    for nt in threads:
        with H.with_threads(nt):
            if torch is not None:
                torch.set_num_threads(nt)
            time.sleep(0.2)  # let our own idle BLAS threads stop spinning first
            busy = H.cpu_busy_fraction(0.3)
            ceil = H.measure_sgemm_ceiling(nt, repeats=ceil_repeats)
            print(f"\n=== threads={nt}: sgemm 2048 ceiling {ceil['gflops']:.1f} GFLOP/s "
                  f"[{ceil['gflops_worst']:.1f}-{ceil['gflops_best']:.1f}]"
                  + ("" if busy is None else f", CPU busy before start {100 * busy:.0f}%")
                  + " ===", flush=True)
            workers = None
            if not args.in_process:
                workers = H.Workers(worker_factory,
                                    BACKENDS + (("torch",) if torch is not None else ()),
                                    threads=nt, quick=args.quick)
                for be, msg in workers.errors.items():
                    problems.append(f"[{nt}T] worker for backend={be} failed to start: {msg}")
            cpu0 = H.cpu_times()
            try:
                rows = []
                for c in cases:
                    row = run_case(c, nt, ceil["gflops"], bw["gbps"], args, problems, workers)
                    rows.append(row)
                    if args.verbose:
                        print(f"  done {c.key}", flush=True)
            finally:
                if workers is not None:
                    workers.close()
            steal = H.steal_fraction(cpu0, H.cpu_times())
            time.sleep(args.settle)
            ceil_after = H.measure_sgemm_ceiling(nt, repeats=ceil_repeats)
        noise_warnings = []
        if steal is not None and steal > 0.03:
            noise_warnings.append(f"the hypervisor took {100 * steal:.0f}% of the CPU time "
                                  "(steal) during the block")
        if busy is not None and busy > 0.25:
            noise_warnings.append(f"the CPUs were {100 * busy:.0f}% busy with other work "
                                  "before this block started")
        r_ceil = ceil_after["gflops"] / ceil["gflops"]
        if not 0.8 <= r_ceil <= 1.25:
            noise_warnings.append(f"sgemm ceiling moved from {ceil['gflops']:.0f} to "
                                  f"{ceil_after['gflops']:.0f} GFLOP/s during the block")
        for w in noise_warnings:
            print(f"WARNING [{nt}T]: {w}: the machine is noisy, distrust this block")
        headers, trows = table_rows(rows, torch is not None)
        print(H.text_table(headers, trows), flush=True)
        targets = evaluate_targets(rows)
        runs.append({"threads": nt, "sgemm_ceiling": ceil, "sgemm_ceiling_after": ceil_after,
                     "cpu_busy_before": busy, "steal": steal, "noise_warnings": noise_warnings,
                     "results": rows, "targets": targets})
        align = ["l", "l"] + ["r"] * (len(headers) - 3) + ["l"]
        md_parts.append(f"### threads = {nt}\n\nsgemm 2048 ceiling: "
                        f"{ceil['gflops']:.1f} GFLOP/s before, "
                        f"{ceil_after['gflops']:.1f} after\n\n"
                        + "".join(f"**Warning:** {w}.\n\n" for w in noise_warnings)
                        + H.markdown_table(headers, trows, align) + "\n")
    if torch is not None and old_torch_threads:
        torch.set_num_threads(old_torch_threads)

    # ---- targets ---------------------------------------------------------
    print("\ntargets (ratio = numpy median / fortran median, same run):")
    tgt_rows = []
    for run in runs:
        for t in run["targets"]:
            ratio = "-" if t["ratio"] is None else f"{t['ratio']:.3f}x"
            noise = "" if t["noise_pct"] is None else f"(IQR noise ~{t['noise_pct']:.0f}%)"
            line = (f"  [{t['threads']}T] {t['kernel']:<22s} {t['shape']:<16s} "
                    f"need >= {t['target']:.1f}x  got {ratio:>7s}  {t['status']:<6s} {noise}")
            print(line)
            tgt_rows.append([t["threads"], t["kernel"], t["shape"], f">= {t['target']:.1f}x",
                             ratio, t["status"], noise.strip("()")])
    n_met = sum(1 for run in runs for t in run["targets"] if t["status"] == "MET")
    n_all = sum(len(run["targets"]) for run in runs)
    print(f"  {n_met}/{n_all} targets met")

    if problems:
        print("\nproblems found:")
        for p in problems:
            print("  - " + p)

    elapsed = time.perf_counter() - t_start
    print(f"\ntotal {elapsed:.1f} s")

    result = {
        "tool": "benchmarks/bench_kernels.py",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "settings": {"threads": threads, "repeats": args.repeats, "warmup": args.warmup,
                     "min_time": args.min_time, "max_case_time": args.max_case_time,
                     "blocked": args.blocked, "in_process": args.in_process,
                     "settle": args.settle,
                     "only": args.only},
        "machine": info,
        "pykd": pykd_info,
        "torch": None if torch is None else torch.__version__,
        "copy_bandwidth": bw,
        "runs": runs,
        "problems": problems,
        "elapsed_s": elapsed,
    }
    if args.json:
        H.write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.markdown:
        md = [f"# pykd kernel benchmark ({result['mode']}, {result['timestamp']})", "",
              "```", H.format_machine_info(info), "```", "",
              f"Copy bandwidth (np.copyto 256 MiB, read+write): {bw['gbps']:.1f} GB/s. "
              "Times are medians of interleaved samples; np/F = numpy median / fortran "
              "median; F %ceil = fortran rate as % of the sgemm ceiling (GF/s; GOP/s "
              "marked * vs the fp32 ceiling) or of the copy bandwidth (GB/s); F IQR = "
              "interquartile range of the fortran samples relative to the median.", ""]
        md += md_parts
        md += ["", "## Targets", "",
               H.markdown_table(["threads", "kernel", "shape", "target", "ratio", "status", "noise"],
                                tgt_rows, ["r", "l", "l", "r", "r", "l", "l"]), ""]
        if problems:
            md += ["## Problems", ""] + [f"- {p}" for p in problems] + [""]
        H.write_markdown(args.markdown, "\n".join(md))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    except KeyboardInterrupt:
        rc = 130
    sys.exit(rc)
