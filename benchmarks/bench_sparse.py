"""The sparse layer kinds' kernels against the dense layer: the crossover.

    python benchmarks/bench_sparse.py [--quick] [--out benchmarks/sparse-full]

One layer (ReLU) of each shape and sparsity, ``Model.forward`` of a
``Dense`` layer and of the same weights as ``SparseCSR``, alternating in
one process (medians of the rounds, ``harness.time_alternating``). Inputs
are ReLU'd Gaussians (about half of them 0, like a hidden layer's); the
pattern is uniformly random. Each configuration runs in child processes:

- ``panel`` and ``dense`` (1 thread): the sparse layer forced onto one
  kernel (``PYKD_SPARSE_KERNEL``; one sample always takes the planes, or
  ``scatter`` for a layer without), to find where each beats the dense
  layer: the crossover that ``pykd_sparse_kernel`` encodes;
- ``auto`` (1 and 2 threads): the kernel the layer picks itself.

Then the 784-200-200-10 student (random weights, pruned 90% by global
magnitude) as float32, sparse_csr and sparse_codebook (5 bits), whole
model, batch 1 and 256. ``overhead_us`` is the same call on a 1 x 1 dense
model: the Python and f2py part of every number. The issue's target (a
90%-sparse layer at least 3x faster than its dense version at batch 1) is
the ratio of the times less that overhead at 784 x 200 and 200 x 200, 1
thread (``targets``). Writes ``OUT.json`` and ``OUT.md``. On a shared machine the numbers are noisy: the table records
the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES_FULL = [(784, 200), (200, 200), (200, 10), (784, 1200), (1200, 1200)]
SPARSITIES_FULL = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
BATCHES_FULL = [1, 4, 8, 64, 256]
SHAPES_QUICK = [(784, 200), (200, 200), (1200, 1200)]
SPARSITIES_QUICK = [0.5, 0.9, 0.99]
BATCHES_QUICK = [1, 64, 256]


def _layer_models(n_in, n_out, sparsity, rng):
    import numpy as np

    import pykd
    from pykd.layers import Dense, SparseCSR
    W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
    W[rng.random((n_in, n_out)) < sparsity] = 0
    b = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    return (pykd.Model([Dense(W, b, "relu")]),
            pykd.Model([SparseCSR.from_dense(W, b, "relu")]))


def _overhead_model():
    import numpy as np

    import pykd
    from pykd.layers import Dense
    return pykd.Model([Dense(np.ones((1, 1), np.float32), np.zeros(1, np.float32))])


def _child(args):
    import numpy as np

    rng = np.random.default_rng(0)
    tiny = _overhead_model()
    rows = []
    kw = dict(repeats=args.rounds, min_time=args.min_time, warmup=2)
    for n_in, n_out in args.shapes:
        for sp in args.sparsities:
            dense, sparse = _layer_models(n_in, n_out, sp, rng)
            for n in args.batches:
                X = np.maximum(rng.standard_normal((n, n_in)), 0).astype(np.float32)
                X1 = np.zeros((n, 1), np.float32)
                t = time_alternating({
                    "dense": lambda m=dense, x=X: m.forward(x),
                    "sparse": lambda m=sparse, x=X: m.forward(x),
                    "overhead": lambda x=X1: tiny.forward(x)}, **kw)
                rows.append({"n_in": n_in, "n_out": n_out, "sparsity": sp, "batch": n,
                             **{k + "_us": v["median"] * 1e6 for k, v in t.items()},
                             **{k + "_min_us": v["min"] * 1e6 for k, v in t.items()}})
    out = {"rows": rows}
    if args.model:
        out["model"] = _model_rows(rng, kw)
    print(json.dumps(out))


def _model_rows(rng, kw):
    import numpy as np

    import pykd
    sys.path.insert(0, HERE)
    from bench_inference import pruned
    mlp = pykd.MLP([784, 200, 200, 10], ["relu", "relu", "identity"], seed=0)
    p90 = pruned(mlp, 0.9)
    csr = pykd.sparsify(p90)
    variants = {"float32": mlp.to_model(), "sparse_csr": csr,
                "sparse_codebook": pykd.cluster(csr, bits=5, seed=0)}
    tiny = _overhead_model()
    rows = []
    for n in (1, 256):
        X = (np.maximum(rng.random((n, 784)) - 0.5, 0) * 2).astype(np.float32)
        funcs = {k: (lambda m=m, x=X: m.forward(x)) for k, m in variants.items()}
        funcs["overhead"] = lambda x=np.zeros((n, 1), np.float32): tiny.forward(x)
        t = harness_time(funcs, kw)
        rows.append({"batch": n, **{k + "_us": v["median"] * 1e6 for k, v in t.items()}})
    return rows


def harness_time(funcs, kw):
    return time_alternating(funcs, **kw)


def time_alternating(funcs, repeats, min_time, warmup=2):
    """A B C A B C ... for ``repeats`` rounds, ``inner`` calls per sample
    (calibrated to ``min_time``); seconds per call, {"median", "min"}.

    With one OpenMP thread the clock is the process's CPU time, which does
    not count the time other processes hold the core (the machine is
    shared); with more threads, wall time (CPU time would count spinning).
    """
    import gc
    import time

    import numpy as np
    one = os.environ.get("OMP_NUM_THREADS") == "1"
    clock = time.process_time if one else time.perf_counter
    inner = {}
    for k, f in funcs.items():
        for _ in range(warmup):
            f()
        n, t = 1, 0.0
        while True:
            t0 = clock()
            for _ in range(n):
                f()
            t = clock() - t0
            if t >= min_time or n >= 100000:
                break
            n = max(n * 2, int(n * min_time / max(t, 1e-7) * 1.2))
        inner[k] = n
    samples = {k: [] for k in funcs}
    gc.disable()
    try:
        for _ in range(repeats):
            for k, f in funcs.items():
                t0 = clock()
                for _ in range(inner[k]):
                    f()
                samples[k].append((clock() - t0) / inner[k])
    finally:
        gc.enable()
    return {k: {"median": float(np.median(v)), "min": float(np.min(v))} for k, v in samples.items()}


def _run_child(mode, threads, args):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    env.pop("PYKD_SPARSE_KERNEL", None)
    if not args.keep_blas_env:   # a sandbox's pin (e.g. Haswell kernels on an AVX-512 CPU)
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    if mode != "auto":
        env["PYKD_SPARSE_KERNEL"] = mode
    cmd = [sys.executable, os.path.abspath(__file__), "--child",
           "--rounds", str(args.rounds), "--min-time", str(args.min_time),
           "--grid", json.dumps([args.shapes, args.sparsities, args.batches])]
    if mode == "auto":
        cmd.append("--model")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/tmp")
    if res.returncode != 0:
        raise RuntimeError(f"child {mode}/{threads} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _markdown(result):
    info = result["machine"]
    lines = [f"# Sparse layers: kernels against dense ({'quick' if result['quick'] else 'full'} run)",
             "",
             f"CPU: {info.get('cpu_model')}, {info.get('logical_cores')} cores, "
             f"avx2={info.get('avx2')} fma={info.get('fma')} avx512f={info.get('avx512f')}; "
             f"BLAS: {result['blas']}; load average at start {info.get('loadavg')}, "
             f"at end {result.get('loadavg_end')}.",
             "",
             "Times in us per `Model.forward` call (one ReLU layer), medians; `ovh` is the same "
             "call on a 1 x 1 model (Python + f2py). ratio = dense / sparse on the times less "
             "`ovh` (> 1: sparse is faster). 1 thread: process CPU time (robust to other "
             "processes, not to their cache traffic); 2 threads: wall time. A shared, loaded "
             "machine: expect 20-50% noise, far more at 2 threads.",
             ""]
    for key, title in (("panel_1", "forced panel (planes or scatter at batch 1), 1 thread"),
                       ("dense_1", "forced dense decode, 1 thread"),
                       ("auto_1", "the layer's own choice, 1 thread"),
                       ("auto_2", "the layer's own choice, 2 threads")):
        if key not in result["runs"]:
            continue
        lines += [f"## {title}", "", "| shape | sparsity | batch | dense | sparse | ovh | ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["runs"][key]["rows"]:
            net_d = max(r["dense_us"] - r["overhead_us"], 1e-3)
            net_s = max(r["sparse_us"] - r["overhead_us"], 1e-3)
            lines.append(f"| {r['n_in']}x{r['n_out']} | {r['sparsity']:.0%} | {r['batch']} | "
                         f"{r['dense_us']:.1f} | {r['sparse_us']:.1f} | {r['overhead_us']:.1f} | "
                         f"{net_d / net_s:.2f} |")
        lines.append("")
    tg = targets(result)
    if tg:
        lines += ["## Target (issue 11): a 90%-sparse layer >= 3x faster than its dense version, "
                  "batch 1, 1 thread", "",
                  "The layer-level ratio: times less `ovh` (the layer's own choice: the planes).", "",
                  "| shape | dense - ovh | sparse - ovh | ratio | result |",
                  "| --- | --- | --- | --- | --- |"]
        for t in tg:
            lines.append(f"| {t['shape']} | {t['dense_net_us']:.2f} | {t['sparse_net_us']:.2f} | "
                         f"{t['ratio']:.2f} | {'met' if t['met'] else '**not met**'} |")
        lines.append("")
    for key in ("auto_1", "auto_2"):
        if key in result["runs"] and "model" in result["runs"][key]:
            lines += [f"## 784-200-200-10 student, 90% pruned, whole model ({key[-1]} thread(s))", "",
                      "| batch | float32 | sparse_csr | sparse_codebook 5-bit | ovh |",
                      "| --- | --- | --- | --- | --- |"]
            for r in result["runs"][key]["model"]:
                lines.append(f"| {r['batch']} | {r['float32_us']:.1f} | {r['sparse_csr_us']:.1f} | "
                             f"{r['sparse_codebook_us']:.1f} | {r['overhead_us']:.1f} |")
            lines.append("")
    return "\n".join(lines)


#: The layers of the issue's sparse target: 90% sparse, batch 1, 1 thread.
TARGET_SHAPES = ((784, 200), (200, 200))


def targets(result):
    """[{shape, dense_net_us, sparse_net_us, ratio, met}] of the target
    layers in the 1-thread run of the layer's own choice (those it has)."""
    out = []
    for r in result["runs"].get("auto_1", {}).get("rows", []):
        if (r["n_in"], r["n_out"]) in TARGET_SHAPES and r["sparsity"] == 0.9 and r["batch"] == 1:
            d = max(r["dense_us"] - r["overhead_us"], 1e-3)
            sp = max(r["sparse_us"] - r["overhead_us"], 1e-3)
            out.append({"shape": f"{r['n_in']}x{r['n_out']}", "dense_net_us": d,
                        "sparse_net_us": sp, "ratio": d / sp, "met": d / sp >= 3})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small grid, 3 rounds (a few minutes)")
    ap.add_argument("--out", default=None, help="OUT.json and OUT.md (default: no files)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--min-time", type=float, default=None)
    ap.add_argument("--keep-blas-env", action="store_true",
                    help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE in the children (by default "
                         "they are dropped, so OpenBLAS picks its kernels for this CPU)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--grid", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.min_time = args.min_time or (0.002 if args.quick else 0.005)
    if args.grid:
        shapes, args.sparsities, args.batches = json.loads(args.grid)
        args.shapes = [tuple(s) for s in shapes]
    elif args.quick:
        args.shapes, args.sparsities, args.batches = SHAPES_QUICK, SPARSITIES_QUICK, BATCHES_QUICK
    else:
        args.shapes, args.sparsities, args.batches = SHAPES_FULL, SPARSITIES_FULL, BATCHES_FULL
    sys.path.insert(0, HERE)
    if args.child:
        return _child(args)
    import harness
    info = harness.machine_info()
    runs = {}
    plan = [("auto", 1), ("auto", 2)] if args.quick else \
        [("panel", 1), ("dense", 1), ("auto", 1), ("auto", 2)]
    for mode, threads in plan:
        print(f"running {mode}, {threads} thread(s) ...", file=sys.stderr, flush=True)
        runs[f"{mode}_{threads}"] = _run_child(mode, threads, args)
    with open("/proc/loadavg", encoding="ascii") as fh:
        end = fh.read().split()[:3]
    result = {"quick": args.quick, "machine": info, "loadavg_end": end, "runs": runs,
              "blas": _blas_name()}
    result["targets"] = targets(result)
    md = _markdown(result)
    print(md)
    if args.out:
        with open(args.out + ".json", "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        with open(args.out + ".md", "w", encoding="utf-8") as fh:
            fh.write(md + "\n")


def _blas_name():
    """The BLAS pykd's extension loads (threadpoolctl), else 'unknown'."""
    code = ("import numpy as np, pykd, threadpoolctl, json;"
            "from pykd.layers import Dense;"
            "pykd.Model([Dense(np.ones((2, 2), np.float32), np.zeros(2, np.float32))])"
            ".forward(np.ones((4, 2), np.float32));"
            "print(json.dumps([(p['internal_api'], p.get('version'), p.get('threading_layer'),"
            " p['filepath']) for p in threadpoolctl.threadpool_info()"
            " if 'scipy_openblas' not in p['filepath'] and p['internal_api'] != 'openmp']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/tmp")
    try:
        pools = json.loads(res.stdout)
        return "; ".join(f"{a} {v} ({t}) {os.path.basename(p)}" for a, v, t, p in pools) or "unknown"
    except ValueError:
        return "unknown"


if __name__ == "__main__":
    main()
