"""Peak memory of fit on a memory-mapped uint8 transfer set against its size
(issue 16; results in docs/distributed.md).

Writes a directory of X_train.npy (uint8, n x 784: Fashion-MNIST-shaped
random images), y_train.npy, X_test.npy, y_test.npy, then runs, each in a
fresh child process:

* ``mapped``: ``load_dataset(dir)`` (memory-mapped) and ``fit`` of the
  student 784-200-200-10 for a few batches (the epoch is cut short by a
  callback; the normalisation statistics are computed over the whole set,
  chunk by chunk, as in a real run);
* ``memory``: the same data read into memory as float32 (what an .npz or
  IDX dataset gives) and ``fit``, which keeps one normalised copy.

Each child reports its peak RSS (``VmHWM``) and the peak of its anonymous
memory (``RssAnon``, sampled every 5 ms): mapped file pages count in RSS but
are clean page cache the kernel drops under pressure, so the anonymous
peak is the memory the run really needs.

    python benchmarks/bench_memmap.py [--rows 2000000] [--memory-rows 200000] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = r"""
import json, sys, threading, time
import numpy as np
import pykd
from pykd.data import load_dataset

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out

peak_anon = [0]
stop = False
def sample():
    while not stop:
        peak_anon[0] = max(peak_anon[0], status()["RssAnon"])
        time.sleep(0.005)

mode, path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
threading.Thread(target=sample, daemon=True).start()
base = status()
t0 = time.perf_counter()
ds = load_dataset(path)
X = ds.X_train if mode == "mapped" else np.asarray(ds.X_train)   # float32 in memory
t_load = time.perf_counter() - t0

class Enough(Exception):
    pass

def cb(info):
    if info["step"] >= steps:
        raise Enough

model = pykd.MLP([784, 200, 200, 10], seed=0)
t0 = time.perf_counter()
try:
    pykd.fit(model, X, ds.y_train, batch_size=64, progress=False, callback=cb)
except Enough:
    pass
t_fit = time.perf_counter() - t0
stop = True
time.sleep(0.02)
end = status()
print(json.dumps({"mode": mode, "rows": int(X.shape[0]), "base_rss": base["VmRSS"],
                  "peak_rss": end["VmHWM"], "peak_anon": peak_anon[0], "rss_file_end": end["RssFile"],
                  "load_s": t_load, "fit_s": t_fit, "steps": steps}))
"""


def write_set(d, rows, seed=0):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    X = np.lib.format.open_memmap(os.path.join(d, "X_train.npy"), mode="w+", dtype=np.uint8,
                                  shape=(rows, 784))
    for s in range(0, rows, 65536):
        X[s:s + 65536] = rng.integers(0, 256, (min(65536, rows - s), 784), dtype=np.uint8)
    X.flush()
    del X
    np.save(os.path.join(d, "y_train.npy"), rng.integers(0, 10, rows).astype(np.uint8))
    np.save(os.path.join(d, "X_test.npy"), np.zeros((0, 784), np.uint8))
    np.save(os.path.join(d, "y_test.npy"), np.zeros(0, np.uint8))
    return os.path.getsize(os.path.join(d, "X_train.npy"))


def run(mode, d, steps):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CHILD, mode, d, str(steps)], capture_output=True,
                       text=True, env=env, cwd=tempfile.gettempdir())
    if r.returncode:
        raise SystemExit(f"{mode} child failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows of the big set (mapped only)")
    ap.add_argument("--memory-rows", type=int, default=200_000,
                    help="rows of the set run both ways")
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    ap.add_argument("--dir", default=None, help="where to write the sets (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="pykd-bench-memmap-")
    results = []
    try:
        for rows, modes in ((args.memory_rows, ("mapped", "memory")), (args.rows, ("mapped",))):
            d = os.path.join(root, f"set{rows}")
            t = time.perf_counter()
            size = write_set(d, rows)
            print(f"wrote {rows} x 784 uint8 ({size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s",
                  flush=True)
            for mode in modes:
                r = run(mode, d, args.steps)
                r["data_bytes"] = size
                results.append(r)
                print(f"  {mode:6s}: peak RSS {r['peak_rss'] / 1e6:8.1f} MB, peak anonymous "
                      f"{r['peak_anon'] / 1e6:8.1f} MB (start {r['base_rss'] / 1e6:.0f} MB), "
                      f"load {r['load_s']:.2f} s, fit {r['fit_s']:.2f} s "
                      f"({r['steps']} steps + norm stats)", flush=True)
            shutil.rmtree(d)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
