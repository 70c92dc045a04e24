"""pykd's float32 Model.forward against ONNX Runtime and plain NumPy, same
weights, each in a worker process of its own (harness.Workers), alternating.

    python benchmarks/bench_f32.py [--threads 2] [--repeats 15] [--site DIR ...]
                                   [--env VAR=value ...] [--cases student:1,...]

The 784-200-200-10 student shape (random weights, seed 0, ReLU, no
normalisation) at batch 1 and 256, plus a 4-4-2 model (the per-call
overhead). ``--site DIR`` adds a pykd candidate importing pykd from DIR
first (e.g. another build's site directory), to compare builds in one run;
``--env VAR=value`` one more with that variable set before pykd loads (e.g.
PYKD_DENSE_PATH=avx2).
ONNX Runtime's graph is bench_inference.onnx_graph (MatMul + Add + Relu per
layer, sequential execution, intra-op threads = the thread count).
Prints medians and p10-p90 in microseconds and the ratios to ORT.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SIZES = {"student": [784, 200, 200, 10], "tiny": [4, 4, 2]}
BATCHES = (1, 256)


def _weights(sizes, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.1).astype(np.float32)
        out.append((W, bias, "relu" if k < len(sizes) - 2 else "identity"))
    return out


def factory(backend, workdir, nthreads):
    """get(name) for one backend; name = 'model:batch'."""
    backend, _, env = backend.partition("#")   # name[@site][#VAR=value]: set before importing
    if env:
        var, _, val = env.partition("=")
        os.environ[var] = val
    kind, _, site = backend.partition("@")
    if site:
        sys.path.insert(0, site)
    rng = np.random.default_rng(1)
    models = {}
    for name, sizes in SIZES.items():
        layers = _weights(sizes)
        if kind == "pykd":
            import pykd
            models[name] = pykd.load_model(os.path.join(workdir, f"{name}.pykd")).forward
        elif kind == "numpy":
            acts = {"relu": lambda h: np.maximum(h, 0), "identity": lambda h: h}
            ls = [(W, b, acts[a]) for W, b, a in layers]

            def fwd(x, ls=ls):
                h = x
                for W, b, act in ls:
                    h = act(h @ W + b)
                return h
            models[name] = fwd
        elif kind == "ort":
            import onnxruntime as ort
            so = ort.SessionOptions()
            so.intra_op_num_threads = int(nthreads)
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            sess = ort.InferenceSession(os.path.join(workdir, f"{name}.onnx"), so,
                                        providers=["CPUExecutionProvider"])
            models[name] = (lambda run: lambda x: run(["logits"], {"x": x})[0])(sess.run)
        else:
            raise ValueError(backend)

    def get(name):
        model, batch = name.split(":")
        f = models[model]
        x = rng.random((int(batch), SIZES[model][0]), dtype=np.float32)
        return lambda: f(x)
    return get


def _prepare(workdir):
    from pykd.modelfile import write_model
    from bench_inference import onnx_graph
    import onnx
    for name, sizes in SIZES.items():
        layers = _weights(sizes)
        write_model(os.path.join(workdir, f"{name}.pykd"),
                        [{"kind": "dense", "W": W, "b": b, "activation": a} for W, b, a in layers])
        onnx.save(onnx_graph(layers, None, None), os.path.join(workdir, f"{name}.onnx"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--site", action="append", default=[],
                    help="another pykd build's site directory (one candidate each)")
    ap.add_argument("--env", action="append", default=[],
                    help="VAR=value: one more pykd candidate (of the last --site) with it set")
    ap.add_argument("--no-peers", action="store_true", help="pykd candidates only")
    ap.add_argument("--cases", default="tiny:1,student:1,student:256",
                    help="model:batch, comma-separated")
    args = ap.parse_args()
    backends = ["pykd"] + [f"pykd@{s}" for s in args.site]
    backends += [f"pykd@{args.site[-1] if args.site else ''}#{e}" for e in args.env]
    if not args.no_peers:
        backends += ["numpy", "ort"]
    print(f"load average before: {os.getloadavg()}")
    # OPENBLAS_CORETYPE=Haswell halves OpenBLAS's sgemm on an AVX-512 CPU
    print("env:", {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                  "OMP_NUM_THREADS", "OMP_WAIT_POLICY")})
    with tempfile.TemporaryDirectory() as wd:
        _prepare(wd)
        with harness.Workers(factory, backends, threads=args.threads, workdir=wd,
                             nthreads=args.threads) as w:
            if w.errors:
                print("errors:", w.errors)
            names = args.cases.split(",")
            for name in names:
                cands = {f"{be} {name}": (be, name) for be in w.backends}
                stats, errors = w.time(cands, repeats=args.repeats, settle=0.3)
                if errors:
                    print("errors:", errors)
                ref = stats.get(f"ort {name}", {}).get("median")
                for label, st in stats.items():
                    ratio = f"  / ort {st['median'] / ref:.2f}" if ref else ""
                    print(f"{label:40s} median {st['median'] * 1e6:8.2f} us  "
                          f"[{st['q1'] * 1e6:.2f} - "
                          f"{st['q3'] * 1e6:.2f}]{ratio}", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
