"""pykd's int8 models on every CPU path against its float32 model and ONNX Runtime.

    python benchmarks/bench_int8.py [--rounds 7] [--threads 1 2] [--paths ...] [--no-ort]

The 784-200-200-10 student shape (random weights, ReLU): ``Model.forward``
of the float32 model, of ``quantize_model(..., "dynamic")`` and of the
static one, and (if onnxruntime is installed) ONNX Runtime float32 and
dynamic int8 (``quantize_dynamic``, per channel, QInt8) on the same
weights, at batch 1 and 256, alternating in one process per (path, thread
count) (PYKD_INT8_PATH and OMP_NUM_THREADS set before pykd loads), medians
of ``--rounds`` rounds. Then the int8 product alone (the fused kernel of one
784-200 int8 layer at batch 256) in GMAC/s, against the VNNI peak of one
core measured by benchmarks/int8_peak.c (compiled with ``cc`` when there is
one; register-only vpdpbusd, so an upper bound). Paths the CPU lacks are
skipped (the child reports the path that ran).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PATHS = ("portable", "avx2", "avxvnni", "avx512vnni")


def _ort_sessions(mlp, threads, tmp):
    """(float32 run, int8 run) of ONNX Runtime on the MLP's weights, or None."""
    try:
        import onnxruntime as ort
        sys.path.insert(0, HERE)
        from bench_inference import save_onnx
    except ImportError:
        return None
    layers = [(layer.W, layer.b, layer.activation) for layer in mlp.to_model().layers]
    f32, i8 = save_onnx(tmp, layers, None, None)
    runs = []
    for path in (f32, i8):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        runs.append(lambda x, s=sess: s.run(["logits"], {"x": x})[0])
    return runs


def _time(fn, X, reps):
    fn(X)
    t = time.perf_counter()
    for _ in range(reps):
        fn(X)
    return (time.perf_counter() - t) / reps


def _child(rounds, threads, use_ort):
    import numpy as np

    import pykd
    import pykd._fkernels as fk

    mlp = pykd.MLP([784, 200, 200, 10], ["relu", "relu", "identity"], seed=0)
    rng = np.random.default_rng(0)
    calib = rng.random((256, 784), dtype=np.float32)
    models = {"float32": mlp.to_model().forward,
              "int8 dynamic": pykd.quantize_model(mlp, activations="dynamic").forward,
              "int8 static": pykd.quantize_model(mlp, activations="static",
                                                 calibration=calib).forward}
    with tempfile.TemporaryDirectory() as tmp:
        ort = _ort_sessions(mlp, threads, tmp) if use_ort else None
        if ort:
            models["ORT float32"], models["ORT int8"] = ort
        out = {"path": fk.int8_path().decode().strip(), "rows": []}
        for batch in (1, 256):
            X = rng.random((batch, 784), dtype=np.float32)
            reps = 2000 if batch == 1 else 40
            times = {k: [] for k in models}
            for _ in range(rounds):
                for name, fn in models.items():
                    times[name].append(_time(fn, X, reps))
            out["rows"].append({"batch": batch,
                                **{k: float(np.median(v)) for k, v in times.items()}})
    layer = pykd.Model([pykd.quantize_model(mlp, activations="dynamic").layers[0]])
    X = rng.random((256, 784), dtype=np.float32)
    t = float(np.median([_time(layer.forward, X, 40) for _ in range(rounds)]))
    out["layer_gmacs"] = 256 * 784 * 200 / t / 1e9
    print(json.dumps(out))


def _compile(tmp):
    """benchmarks/int8_peak.c built into ``tmp``, or None (no C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    exe = os.path.join(tmp, "int8_peak")
    try:
        subprocess.run([cc, "-O2", os.path.join(HERE, "int8_peak.c"), "-o", exe], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, OSError):
        return None
    return exe


def _parse(out):
    words = out.split()
    return float(words[1]), float(words[3])


def _peak():
    """(zmm, ymm) GMAC/s of one core, or None without a C compiler."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = _compile(tmp)
        if exe is None:
            return None
        try:
            return _parse(subprocess.run([exe], check=True, capture_output=True,
                                         text=True).stdout)
        except (subprocess.CalledProcessError, OSError, IndexError, ValueError):
            return None


def _peak_all_cpus():
    """The zmm GMAC/s of one probe per CPU this process may use, all started
    at once, each pinned to its CPU: [per CPU], or None (no compiler, one
    CPU, no affinity). Their sum over the one-CPU peak says whether the
    CPUs have vector units of their own (about the CPU count) or are
    hyperthreads of one core (about 1)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(cpus) < 2:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        exe = _compile(tmp)
        if exe is None:
            return None
        procs = [subprocess.Popen([exe], stdout=subprocess.PIPE, text=True,
                                  preexec_fn=(lambda c=c: os.sched_setaffinity(0, {c})))
                 for c in cpus]
        try:
            return [_parse(p.communicate(timeout=120)[0])[0] for p in procs]
        except (subprocess.TimeoutExpired, OSError, IndexError, ValueError):
            for p in procs:
                p.kill()
            return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.rounds, args.threads[0], not args.no_ort)
        return
    peak = _peak()
    results = []
    for path in args.paths:
        for nt in args.threads:
            env = dict(os.environ, OMP_NUM_THREADS=str(nt), PYKD_INT8_PATH=path)
            cmd = [sys.executable, __file__, "--child", "--rounds", str(args.rounds),
                   "--threads", str(nt)] + (["--no-ort"] if args.no_ort else [])
            res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if r["path"] != path:
                print(f"(path {path}: not on this CPU, skipped)")
                break
            results.append((nt, r))
    names = [k for k in results[0][1]["rows"][0] if k != "batch"]
    print("| path | threads | batch | " + " | ".join(f"{k} us" for k in names)
          + " | int8 dynamic / float32 |")
    print("| --- " * (4 + len(names)) + "|")
    for nt, r in results:
        for row in r["rows"]:
            cells = " | ".join(f"{row[k] * 1e6:.1f}" for k in names)
            print(f"| {r['path']} | {nt} | {row['batch']} | {cells} | "
                  f"{row['int8 dynamic'] / row['float32']:.2f} |")
    if peak:
        gm = ["absent" if v <= 0 else f"{v:.0f} GMAC/s" for v in peak]
        print(f"VNNI peak of one core (register-only vpdpbusd): zmm {gm[0]}, "
              f"ymm (AVX-VNNI) {gm[1]}")
    for nt, r in results:
        g = r["layer_gmacs"]
        ref = ""
        if peak and r["path"] in ("avx512vnni", "avxvnni"):
            reg = "zmm" if r["path"] == "avx512vnni" else "ymm"
            frac = g / (nt * peak[0 if reg == "zmm" else 1])
            ref = f" = {frac:.0%} of the {reg} peak x {nt}"
            if frac > 1:   # the probe and the kernel saw different loads
                ref += " (above the peak: the probe ran on a busier machine; rerun quiet)"
        print(f"int8 784x200 layer (quantize + product + rescale), batch 256, {nt} thread(s), "
              f"{r['path']}: {g:.1f} GMAC/s{ref}")


if __name__ == "__main__":
    main()
