"""Pipeline benchmark: training epochs, soft labels and inference, Fortran
against the NumPy path, in the same run, alternating.

    python benchmarks/bench_pipeline.py [--quick] [--threads 1,2] [--fraction F]
                                        [--json out.json] [--markdown out.md]

Phases (reference configuration, Fashion-MNIST shapes, batch 64, Adam):
teacher 784-1200-1200-10 CE epoch, student 784-200-200-10 KD epoch (T=5,
alpha=0.1), soft labels (teacher forward over 60k rows), student inference at
batch 1 and 256 (float32 and dynamic int8). An epoch is timed on a fraction
of the 60k samples (default 0.25; --quick 0.03) and scaled to a whole epoch:
the cost per step does not depend on the step. Each phase alternates the
backends (F N F N ...), each backend in a worker process of its own (as a
user runs one; see harness.Workers, and --in-process for the alternative),
and reports medians, min-max and the ratio; the
teacher epoch's GFLOP/s is set against NumPy's sgemm ceiling measured here.
Synthetic data of the real shapes is used, so no dataset is needed; the
timings do not depend on the values. Never fails on timing.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import pykd  # noqa: E402
from pykd import _step  # noqa: E402

TEACHER = [784, 1200, 1200, 10]  # PyTorch (torch.nn + Adam) is a third column when importable
STUDENT = [784, 200, 200, 10]
ACTS = ["relu", "relu", "identity"]
N_TRAIN, BATCH = 60000, 64

# Issue 15's targets against PyTorch (the floor and the soft labels' share
# of sgemm are in bench_train.py); without PyTorch they are not judged.
TARGETS = {
    "teacher epoch": ("torch", 2.0, "teacher epoch >= 2x faster than PyTorch"),
    "KD student epoch": ("torch", 3.0, "KD student epoch >= 3x faster than PyTorch"),
}


def epoch_flops(sizes, n):
    """Forward + backward of a training step, without the first layer's dx."""
    mac = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    return 2.0 * n * (sum(mac) + sum(mac) + sum(mac[1:]))


class Trainer:
    """State for timing `steps` training steps of one backend."""

    def __init__(self, sizes, cfg, backend, rng, x, y, t):
        n = _step.param_count(sizes)
        self.args = (sizes, ACTS)
        self.p = (rng.standard_normal(n) * 0.02).astype(np.float32)
        self.g, self.m, self.v = (np.zeros(n, np.float32) for _ in range(3))
        self.ws = _step.Workspace(sizes, BATCH)
        self.cfg, self.backend = cfg, backend
        self.x, self.y, self.t = x, y, t
        self.rng = rng
        self.step = 0
        # Batch buffers allocated once, as pykd.train.fit does.
        self.xb = np.empty((BATCH, x.shape[1]), np.float32)
        self.yb = np.empty(BATCH, np.int64)
        self.tb = np.empty((BATCH, t.shape[1]), np.float32)

    def run(self, steps):
        # As a training loop does: shuffle, gather each batch, one step call.
        order = self.rng.permutation(len(self.x))
        for i in range(steps):
            idx = order[i * BATCH:(i + 1) * BATCH]
            self.step += 1
            # mode="clip" as in fit: with mode="raise" NumPy gathers into a
            # temporary and copies it to out (145 against 40 us for x here).
            xb = np.take(self.x, idx, axis=0, out=self.xb, mode="clip")
            yb = np.take(self.y, idx, out=self.yb, mode="clip")
            tb = (np.take(self.t, idx, axis=0, out=self.tb, mode="clip")
                  if self.cfg.loss == "kd" else None)
            _step.train_step(*self.args, self.p, self.g, self.m, self.v, xb, yb,
                             self.cfg, self.step, self.ws, teacher_logits=tb, backend=self.backend)


try:  # optional third column
    import torch
except ImportError:
    torch = None


def torch_mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


class TorchTrainer:
    """The same epoch in PyTorch: Adam, CE or the seed example's KD loss."""

    def __init__(self, sizes, cfg, x, y, t):
        torch.manual_seed(0)
        self.model = torch_mlp(sizes)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.cfg = cfg
        self.x, self.y, self.t = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(t)
        self.gen = torch.Generator().manual_seed(1)

    def run(self, steps):
        order = torch.randperm(len(self.x), generator=self.gen)
        T, alpha = self.cfg.temperature, self.cfg.alpha
        for i in range(steps):
            idx = order[i * BATCH:(i + 1) * BATCH]
            xb, yb = self.x[idx], self.y[idx]
            logits = self.model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            if self.cfg.loss == "kd":
                soft = torch.nn.functional.kl_div(
                    torch.log_softmax(logits / T, 1), torch.log_softmax(self.t[idx] / T, 1),
                    reduction="batchmean", log_target=True)
                loss = alpha * loss + (1 - alpha) * T * T * soft
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()


def torch_forward(model, x, batch=1024):
    with torch.no_grad():
        xt = torch.from_numpy(x)
        return [model(xt[i:i + batch]) for i in range(0, len(xt), batch)]


def int8_layers(rng, sizes):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        W = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        q, s = pykd.quantize_int8(W, per_channel=True)
        layers.append((q, s, np.zeros(b, np.float32)))
    return layers


def int8_forward(layers, x, backend):
    h = x
    for i, (q, s, b) in enumerate(layers):
        h = pykd.int8_matmul(h, q, s, b, backend=backend)
        if i < len(layers) - 1:
            np.maximum(h, 0, out=h)
    return h


def make_data():
    rng = np.random.default_rng(0)
    x = rng.random((N_TRAIN, 784), dtype=np.float32)
    y = rng.integers(0, 10, N_TRAIN)
    t = rng.standard_normal((N_TRAIN, 10)).astype(np.float32)
    return x, y, t


def phase_plan(fraction):
    """[(phase, samples timed, scale to the whole phase, work in FLOP or None)]."""
    steps = max(5, int(fraction * N_TRAIN / BATCH))
    full_steps = -(-N_TRAIN // BATCH)
    n_soft = max(1024, int(fraction * 4 * N_TRAIN) // 1024 * 1024)
    soft_flops = 2.0 * N_TRAIN * sum(a * b for a, b in zip(TEACHER[:-1], TEACHER[1:]))
    plan = [("teacher epoch", steps, full_steps / steps, epoch_flops(TEACHER, N_TRAIN)),
            ("KD student epoch", steps, full_steps / steps, epoch_flops(STUDENT, N_TRAIN)),
            ("soft labels 60k", n_soft, N_TRAIN / n_soft, soft_flops)]
    for nb in (1, 256):
        plan += [(f"inference float32 batch {nb}", nb, 1.0, None),
                 (f"inference int8 batch {nb}", nb, 1.0, None)]
    return plan


CONFIGS = {"teacher epoch": (TEACHER, dict(loss="ce")),
           "KD student epoch": (STUDENT, dict(loss="kd", temperature=5, alpha=0.1))}


def make_phase(name, backend, data, fraction):
    """Zero-argument callable running one timed sample of a phase."""
    x, y, t = data
    size = {p[0]: p[1] for p in phase_plan(fraction)}[name]
    if name in CONFIGS:
        sizes, cfg = CONFIGS[name]
        cfg = _step.TrainConfig(**cfg)
        tr = (TorchTrainer(sizes, cfg, x, y, t) if backend == "torch"
              else Trainer(sizes, cfg, backend, np.random.default_rng(1), x, y, t))
        return lambda: tr.run(size)
    if name == "soft labels 60k":
        xs = x[:size]
        if backend == "torch":
            tm = torch_mlp(TEACHER).eval()
            return lambda: torch_forward(tm, xs)
        p = (np.random.default_rng(2).standard_normal(_step.param_count(TEACHER)) * 0.02
             ).astype(np.float32)
        return _mlp_forward(TEACHER, p, xs, backend, batch_size=1024)
    xb = x[:size]
    if backend == "torch":
        torch.manual_seed(0)
        sm = torch_mlp(STUDENT).eval()
        if "int8" in name:
            sm = torch.ao.quantization.quantize_dynamic(sm, {torch.nn.Linear}, dtype=torch.qint8)
        return lambda: torch_forward(sm, xb)
    if "int8" in name:
        q_layers = int8_layers(np.random.default_rng(3), STUDENT)
        return lambda: int8_forward(q_layers, xb, backend)
    p = (np.random.default_rng(4).standard_normal(_step.param_count(STUDENT)) * 0.05
         ).astype(np.float32)
    return _mlp_forward(STUDENT, p, xb, backend)


def _mlp_forward(sizes, p, x, backend, batch_size=1024):
    """Inference as users run it: MLP.forward (the network routine), weights ``p``."""
    m = pykd.MLP(list(sizes), ACTS, backend=backend)
    m.params[...] = p
    return lambda: m.forward(x, batch_size=batch_size)


def worker_factory(backend, fraction):
    """Runs in a timing worker (harness.Workers): the phases of one backend."""
    data = make_data()
    return lambda name: make_phase(name, backend, data, fraction)


def run(threads, fraction, repeats, rows, in_process=False):
    backends = ("fortran", "numpy") + (("torch",) if torch is not None else ())
    results = []
    if torch is not None and in_process:
        torch.set_num_threads(threads)
    with harness.with_threads(threads):
        ceiling = harness.measure_sgemm_ceiling(threads)["gflops"]
        if in_process:
            data = make_data()
        else:
            workers = harness.Workers(worker_factory, backends, threads=threads,
                                      fraction=fraction)
            for be, msg in workers.errors.items():
                print(f"WARNING: worker for backend={be} failed to start: {msg}",
                      file=sys.stderr)
        cpu0 = harness.cpu_times()
        try:
            for name, size, scale, work in phase_plan(fraction):
                inference = name.startswith("inference")
                opts = dict(repeats=max(repeats, 7) if inference else repeats,
                            warmup=2 if inference else 0,
                            min_time=0.02 if inference else 0.0, settle=harness.SETTLE)
                if in_process:
                    funcs = {be: make_phase(name, be, data, fraction) for be in backends}
                    r = harness.time_alternating(funcs, **opts)
                else:
                    # one untimed sample's worth of warm-up calls only for the short phases
                    r, errs = workers.time({be: (be, name) for be in backends},
                                           warm=1 if inference else 0, **opts)
                    for be, msg in errs.items():
                        print(f"WARNING: {name} backend={be}: {msg}", file=sys.stderr)
                r = {be: {k: v * scale for k, v in st.items() if k in ("median", "min", "max")}
                     for be, st in r.items()}
                gf = None if work is None else work / r["fortran"]["median"] / 1e9
                results.append((name, r, gf, ceiling))
        finally:
            if not in_process:
                workers.close()
        steal = harness.steal_fraction(cpu0, harness.cpu_times())
        if steal is not None and steal > 0.03:
            print(f"WARNING: the hypervisor took {100 * steal:.0f}% of the CPU time (steal) "
                  f"during the {threads}-thread block; timings are slower than the machine "
                  "can do", file=sys.stderr)

    for name, r, gf, ceil in results:
        f, n = r["fortran"], r["numpy"]
        rows.append({
            "threads": threads, "phase": name,
            "fortran_s": f["median"], "fortran_min": f["min"], "fortran_max": f["max"],
            "numpy_s": n["median"], "numpy_min": n["min"], "numpy_max": n["max"],
            "speedup": n["median"] / f["median"],
            "torch_s": r["torch"]["median"] if "torch" in r else None,
            "gflops": gf, "sgemm_ceiling_gflops": ceil,
            "pct_ceiling": None if gf is None else 100 * gf / ceil,
            "steal": steal,
        })


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", default=None, help="comma list, default 1,2 (quick: current)")
    ap.add_argument("--fraction", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--in-process", action="store_true",
                    help="diagnostic: all backends in this process instead of one worker "
                         "process each (their thread pools then disturb each other)")
    a = ap.parse_args(argv)
    fraction = a.fraction or (0.01 if a.quick else 0.25)
    repeats = a.repeats or (2 if a.quick else 5)
    threads = ([int(s) for s in a.threads.split(",")] if a.threads
               else [harness.default_threads()] if a.quick else [1, 2])
    info = harness.machine_info()
    print(harness.format_machine_info(info))
    rows = []
    t0 = time.perf_counter()
    for th in threads:
        busy = harness.cpu_busy_fraction()
        if busy is not None and busy > 0.3:
            print(f"WARNING: the CPUs were {busy:.0%} busy before the {th}-thread block; "
                  "timings are not reliable", file=sys.stderr)
        run(th, fraction, repeats, rows, a.in_process)
    headers = ["threads", "phase", "fortran", "numpy", "torch", "np/F", "torch/F", "F GFLOP/s",
               "% sgemm ceiling", "steal"]
    table = [[r["threads"], r["phase"], harness.format_seconds(r["fortran_s"]),
              harness.format_seconds(r["numpy_s"]), harness.format_seconds(r["torch_s"]),
              f"{r['speedup']:.2f}x",
              "" if r["torch_s"] is None else f"{r['torch_s'] / r['fortran_s']:.2f}x",
              "" if r["gflops"] is None else f"{r['gflops']:.0f}",
              "" if r["pct_ceiling"] is None else f"{r['pct_ceiling']:.0f}%",
              "" if r["steal"] is None else f"{100 * r['steal']:.0f}%"] for r in rows]
    print(harness.text_table(headers, table))
    print(f"(epochs timed on {fraction:.0%} of an epoch and scaled; {time.perf_counter() - t0:.0f} s)")
    print("targets (Fortran backend):")
    verdicts = []
    for r in rows:
        if r["phase"] in TARGETS and r["torch_s"] is not None:
            kind, goal, text = TARGETS[r["phase"]]
            ratio = r["torch_s"] / r["fortran_s"]
            ok = ratio >= goal
            got = f"{ratio:.2f}x"
            line = f"  [{r['threads']} thr] {text}: {'MET' if ok else 'MISSED'} ({got})"
            verdicts.append(line)
            print(line)
    if a.json:
        harness.write_json(a.json, {"machine": info, "fraction": fraction, "rows": rows,
                                    "targets": verdicts})
    if a.markdown:
        md = harness.markdown_table(headers, table)
        harness.write_markdown(a.markdown, md + "\n\nTargets:\n\n" +
                               "\n".join(f"-{v[1:]}" for v in verdicts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
