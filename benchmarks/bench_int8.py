"""pykd's int8 model against its float32 model, and the int8 product's rate.

    python benchmarks/bench_int8.py [--rounds 7] [--threads 1 2]

The 784-200-200-10 student shape (random weights, ReLU): ``Model.forward``
of the float32 model and of ``quantize_model(..., "dynamic")`` at batch 1
and 256, alternating in one process per thread count (OMP_NUM_THREADS set
before pykd loads), medians of ``--rounds`` rounds. Then the int8 product
alone (one 784-200 int8 layer at batch 256) in GOP/s, one multiply-add = 2
ops. The path is the one this CPU runs (PYKD_INT8_PATH forces one).
"""
import argparse
import json
import os
import subprocess
import sys
import time


def _child(rounds):
    import numpy as np

    import pykd
    import pykd._fkernels as fk

    mlp = pykd.MLP([784, 200, 200, 10], ["relu", "relu", "identity"], seed=0)
    f32 = mlp.to_model()
    i8 = pykd.quantize_model(mlp, activations="dynamic")
    rng = np.random.default_rng(0)
    out = {"path": fk.int8_path().decode().strip(), "rows": []}
    for batch in (1, 256):
        X = rng.random((batch, 784), dtype=np.float32)
        reps = 2000 if batch == 1 else 40
        times = {"float32": [], "int8": []}
        for _ in range(rounds):
            for name, model in (("float32", f32), ("int8", i8)):
                model.forward(X)
                t = time.perf_counter()
                for _ in range(reps):
                    model.forward(X)
                times[name].append((time.perf_counter() - t) / reps)
        med = {k: float(np.median(v)) for k, v in times.items()}
        out["rows"].append({"batch": batch, **med})
    layer = pykd.Model([i8.layers[0]])
    X = rng.random((256, 784), dtype=np.float32)
    ts = []
    for _ in range(rounds):
        layer.forward(X)
        t = time.perf_counter()
        for _ in range(40):
            layer.forward(X)
        ts.append((time.perf_counter() - t) / 40)
    out["layer_gops"] = 2 * 256 * 784 * 200 / float(np.median(ts)) / 1e9
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.rounds)
        return
    print("| threads | path | batch | float32 us | int8 us | int8 / float32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    gops = {}
    for nt in args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(nt))
        res = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds)],
                             env=env, check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        gops[nt] = (r["path"], r["layer_gops"])
        for row in r["rows"]:
            print(f"| {nt} | {r['path']} | {row['batch']} | {row['float32'] * 1e6:.1f} | "
                  f"{row['int8'] * 1e6:.1f} | {row['int8'] / row['float32']:.2f} |")
    for nt, (path, g) in gops.items():
        print(f"int8 784x200 layer, batch 256, {nt} thread(s), {path}: {g:.1f} GOP/s")


if __name__ == "__main__":
    main()
