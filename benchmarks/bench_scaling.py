"""Scaling benchmark: how the cost grows with batch size, layer width and
dataset size, Fortran against the NumPy path; peak memory of a training run
against dataset size.

    python benchmarks/bench_scaling.py [--quick] [--json out.json] [--plots DIR]

* batch size 1..4096: time per sample of a student (784-200-200-10) KD
  training step and of teacher inference;
* layer width 128..4096: one hidden layer 784-W-10, time of a training step
  at batch 64, and its GFLOP/s;
* dataset size: a KD student epoch over n samples (time should be linear in
  n), and the peak resident memory of a child process that loads n samples
  and trains one epoch (nothing O(dataset) beyond the data and its logits).

Each point alternates the backends, each in a worker process of its own
(harness.Workers), and takes medians. Writes JSON and, when
matplotlib is installed, PNG plots. Never fails on timing.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from pykd import MLP, _step  # noqa: E402

BACKENDS = ("fortran", "numpy")


def step_timer(sizes, batch, backend, cfg, rng):
    acts = ["relu"] * (len(sizes) - 2) + ["identity"]
    n = _step.param_count(sizes)
    p = (rng.standard_normal(n) * 0.02).astype(np.float32)
    g, m, v = (np.zeros(n, np.float32) for _ in range(3))
    ws = _step.Workspace(sizes, batch)
    x = rng.random((batch, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], batch)
    t = rng.standard_normal((batch, sizes[-1])).astype(np.float32)
    state = {"step": 0}

    def f():
        state["step"] += 1
        _step.train_step(sizes, acts, p, g, m, v, x, y, cfg, state["step"], ws,
                         teacher_logits=t if cfg.loss == "kd" else None, backend=backend)
    return f


STUDENT = (784, 200, 200, 10)
TEACHER = (784, 1200, 1200, 10)


def worker_factory(backend):
    """Runs in a timing worker (harness.Workers): ("step", sizes, batch, loss)
    -> one training step; ("infer", batch) -> teacher inference."""
    tp = (np.random.default_rng(0).standard_normal(_step.param_count(TEACHER)) * 0.02
          ).astype(np.float32)
    teacher = MLP(list(TEACHER), ["relu", "relu", "identity"], backend=backend)

    def get(name):
        if name[0] == "step":
            _, sizes, batch, loss = name
            cfg = _step.TrainConfig(loss=loss, temperature=5.0)
            return step_timer(list(sizes), batch, backend, cfg, np.random.default_rng(batch))
        x = np.random.default_rng(1).random((name[1], 784), dtype=np.float32)
        teacher.params[...] = tp            # inference as users run it: MLP.forward
        return lambda: teacher.forward(x, batch_size=4096)
    return get


def _time(workers, name, repeats):
    r, errs = workers.time({be: (be, name) for be in BACKENDS}, repeats=repeats, warmup=1,
                           settle=harness.SETTLE)
    if errs:
        raise RuntimeError(f"{name}: {errs}")
    return r


def batch_scaling(workers, batches, repeats):
    out = []
    for b in batches:
        r = _time(workers, ("step", STUDENT, b, "kd"), repeats)
        ri = _time(workers, ("infer", b), repeats)
        out.append({"batch": b,
                    "train_step_s": {be: r[be]["median"] for be in BACKENDS},
                    "teacher_infer_s": {be: ri[be]["median"] for be in BACKENDS}})
        print(f"batch {b:5d}: student KD step per sample F {r['fortran']['median'] / b * 1e6:8.2f} us"
              f"  N {r['numpy']['median'] / b * 1e6:8.2f} us | teacher inference per sample "
              f"F {ri['fortran']['median'] / b * 1e6:7.2f} us  N {ri['numpy']['median'] / b * 1e6:7.2f} us")
    return out


def width_scaling(workers, widths, repeats):
    out = []
    for w in widths:
        r = _time(workers, ("step", (784, w, 10), 64, "ce"), repeats)
        flops = 2 * 64 * (784 * w + w * 10) * 2 + 2 * 64 * w * 10
        out.append({"width": w, "train_step_s": {be: r[be]["median"] for be in BACKENDS},
                    "gflops": {be: flops / r[be]["median"] / 1e9 for be in BACKENDS}})
        print(f"width {w:5d}: step F {r['fortran']['median'] * 1e3:8.3f} ms ({out[-1]['gflops']['fortran']:.0f} GF/s)"
              f"  N {r['numpy']['median'] * 1e3:8.3f} ms ({out[-1]['gflops']['numpy']:.0f} GF/s)")
    return out


CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from pykd import _step
    n, backend = int(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    x = rng.random((n, 784), dtype=np.float32)
    y = rng.integers(0, 10, n)
    t = rng.standard_normal((n, 10)).astype(np.float32)
    sizes, acts = [784, 200, 200, 10], ["relu", "relu", "identity"]
    P = _step.param_count(sizes)
    p = (rng.standard_normal(P) * 0.05).astype(np.float32)
    g, m, v = (np.zeros(P, np.float32) for _ in range(3))
    ws = _step.Workspace(sizes, 64)
    cfg = _step.TrainConfig(loss="kd", temperature=5.0)
    t0 = time.perf_counter()
    order = rng.permutation(n)
    for s, i in enumerate(range(0, n, 64), 1):
        idx = order[i:i + 64]
        _step.train_step(sizes, acts, p, g, m, v, x[idx], y[idx], cfg, s, ws,
                         teacher_logits=t[idx], backend=backend)
    dt = time.perf_counter() - t0
    # VmHWM belongs to this address space; ru_maxrss would carry the parent's
    # peak across fork and exec.
    with open("/proc/self/status") as fh:
        peak = next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))
    print(json.dumps({"n": n, "seconds": dt, "peak_bytes": peak,
                      "data_bytes": x.nbytes + y.nbytes + t.nbytes}))
""")


def dataset_scaling(sizes):
    out = []
    for n in sizes:
        row = {"n": n}
        for be in BACKENDS:
            # cwd: away from a source checkout, whose pykd/ has no extension.
            proc = subprocess.run([sys.executable, "-c", CHILD, str(n), be],
                                  capture_output=True, text=True, cwd=tempfile.gettempdir())
            if proc.returncode != 0:
                print(f"n {n} {be}: child failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                break
            row[be] = json.loads(proc.stdout.strip().splitlines()[-1])
        if len(row) < 3:
            continue
        out.append(row)
        f, nb = row["fortran"], row["numpy"]
        print(f"n {n:6d}: KD epoch F {f['seconds']:6.2f} s  N {nb['seconds']:6.2f} s | peak RSS "
              f"F {f['peak_bytes'] / 2**20:6.0f} MiB (data {f['data_bytes'] / 2**20:.0f} MiB)"
              f"  N {nb['peak_bytes'] / 2**20:6.0f} MiB")
    if len(out) >= 2:
        # Peak memory above the data itself should not grow with n.
        extra = [r["fortran"]["peak_bytes"] - r["fortran"]["data_bytes"] for r in out]
        print(f"peak RSS minus data, Fortran: {extra[0] / 2**20:.0f} MiB at n={out[0]['n']} -> "
              f"{extra[-1] / 2**20:.0f} MiB at n={out[-1]['n']}")
    return out


def plots(result, folder):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    os.makedirs(folder, exist_ok=True)
    files = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    bs = [r["batch"] for r in result["batch"]]
    for be in BACKENDS:
        ax[0].loglog(bs, [r["train_step_s"][be] / r["batch"] * 1e6 for r in result["batch"]], "o-", label=be)
        ax[1].loglog(bs, [r["teacher_infer_s"][be] / r["batch"] * 1e6 for r in result["batch"]], "o-", label=be)
    ax[0].set(title="student KD step", xlabel="batch size", ylabel="us per sample")
    ax[1].set(title="teacher inference", xlabel="batch size", ylabel="us per sample")
    for a in ax:
        a.legend()
    files.append(os.path.join(folder, "scaling_batch.png"))
    fig.tight_layout(); fig.savefig(files[-1], dpi=90); plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ws = [r["width"] for r in result["width"]]
    for be in BACKENDS:
        ax.semilogx(ws, [r["gflops"][be] for r in result["width"]], "o-", label=be)
    if result.get("sgemm_ceiling"):
        ax.axhline(result["sgemm_ceiling"], ls="--", c="gray", label="sgemm ceiling")
    ax.set(title="784-W-10 training step, batch 64", xlabel="hidden width W", ylabel="GFLOP/s")
    ax.legend()
    files.append(os.path.join(folder, "scaling_width.png"))
    fig.tight_layout(); fig.savefig(files[-1], dpi=90); plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r["n"] for r in result["dataset"]]
    for be in BACKENDS:
        ax[0].plot(ns, [r[be]["seconds"] for r in result["dataset"]], "o-", label=be)
        ax[1].plot(ns, [r[be]["peak_bytes"] / 2**20 for r in result["dataset"]], "o-", label=f"{be} peak RSS")
    ax[1].plot(ns, [r["fortran"]["data_bytes"] / 2**20 for r in result["dataset"]], "k--", label="data + logits")
    ax[0].set(title="KD student epoch", xlabel="samples", ylabel="seconds")
    ax[1].set(title="peak memory", xlabel="samples", ylabel="MiB")
    for a in ax:
        a.legend()
    files.append(os.path.join(folder, "scaling_dataset.png"))
    fig.tight_layout(); fig.savefig(files[-1], dpi=90); plt.close(fig)
    print("plots:", ", ".join(files))
    return [harness.portable_path(f) for f in files]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--plots", help="folder for PNG plots")
    a = ap.parse_args(argv)
    if a.quick:
        batches, widths, ns, repeats = [1, 256], [128, 512], [5000, 10000], 3
    else:
        batches = [1, 4, 16, 64, 256, 1024, 4096]
        widths = [128, 256, 512, 1024, 2048, 4096]
        ns, repeats = [7500, 15000, 30000, 60000, 120000], 5
    result = {"machine": harness.machine_info(),
              "sgemm_ceiling": harness.measure_sgemm_ceiling()["gflops"]}
    with harness.Workers(worker_factory, BACKENDS) as workers:
        if workers.errors:
            raise RuntimeError(f"timing workers failed to start: {workers.errors}")
        result["batch"] = batch_scaling(workers, batches, repeats)
        result["width"] = width_scaling(workers, widths, repeats)
    result["dataset"] = dataset_scaling(ns)
    if a.plots:
        result["plots"] = plots(result, a.plots)
    if a.json:
        harness.write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
