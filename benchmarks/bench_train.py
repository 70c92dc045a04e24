"""Training at the hardware limit (issue 15): pykd's training epochs against
PyTorch, a plain NumPy script and the machine's floor, in one run.

    python benchmarks/bench_train.py [--quick] [--threads 2] [--fraction F]
                                     [--blis DIR] [--json out.json] [--markdown out.md]

Phases (Fashion-MNIST shapes, synthetic data, Adam, batch 64): the teacher
784-1200-1200-10 CE epoch, the student 784-200-200-10 KD epoch (T=5,
alpha=0.1); scaling rows at batch 256 and 1024; soft labels (the teacher's
forward over 60k rows at batch 1024).

Candidates, each in a worker process of its own, alternating, medians:
  * pykd     -- pykd's Fortran step (pykd._step.train_step, as fit calls it);
  * torch    -- torch.nn + torch.optim.Adam, when importable;
  * plain    -- a plain NumPy script (x @ W, np.maximum, the Adam formulas);
  * blas:<name> -- the sgemm calls of one step (the exact shapes and
    transposes pykd makes), through ctypes, for each BLAS found: pykd's own
    OpenBLAS (the library file the extension loads) and Debian's BLIS (the
    OpenMP build; --blis names its folder).

The floor of an epoch is the sum of the products' time at the best BLAS
measured here and the time to move the bytes Adam must move (read p, m, v
and write them back: 24 bytes a parameter, the gradient left in cache) at
the copy bandwidth measured here. Never fails on timing.
"""
import argparse
import ctypes
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

TEACHER = (784, 1200, 1200, 10)
STUDENT = (784, 200, 200, 10)
N_TRAIN = 60000
BLIS_DIRS = ("/usr/lib/x86_64-linux-gnu/blis-openmp",)  # Debian's libblis4-openmp


def step_products(sizes, n):
    """The sgemm calls of one training step as pykd makes them (column-major):
    [(transa, transb, m, n, k)]. Forward y = W x per layer; backward dW = dz x^T
    per layer and dx = W^T dz for all but the first."""
    calls = []
    for ni, no in zip(sizes[:-1], sizes[1:]):
        calls.append(("N", "N", no, n, ni))
    for layer, (ni, no) in enumerate(zip(sizes[:-1], sizes[1:])):
        calls.append(("N", "T", no, ni, n))
        if layer > 0:
            calls.append(("T", "N", ni, n, no))
    return calls


def product_flops(calls):
    return sum(2.0 * m * n * k for _, _, m, n, k in calls)


def adam_bytes(sizes):
    """Bytes Adam must move per step: p, m, v read and written (float32)."""
    p = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    return 24.0 * p


# --------------------------------------------------------------------------
# sgemm through ctypes (pykd's OpenBLAS, BLIS)
# --------------------------------------------------------------------------

def pykd_blas_path():
    """The libopenblas file pykd's extension has loaded (from /proc/self/maps)."""
    import pykd  # noqa: F401  (loads the extension and its BLAS)
    from pykd import _step
    _step._fortran()
    with open("/proc/self/maps", encoding="ascii") as fh:
        libs = {line.split()[-1] for line in fh if "libopenblas" in line}
    libs = [p for p in libs if "scipy_openblas" not in p and "numpy" not in p]
    if not libs:
        raise RuntimeError("pykd's OpenBLAS is not mapped in this process")
    return sorted(libs)[0]


class Sgemm:
    """Fortran sgemm_ of a shared library, on preallocated operands."""

    def __init__(self, path, threads):
        self.lib = ctypes.CDLL(path)
        self.fn = self.lib.sgemm_
        self.fn.restype = None
        self.set_threads(threads)
        self.version = self._version()

    def set_threads(self, threads):
        """The library's thread count for every caller in the process (None:
        leave it)."""
        if threads is None:
            return
        if hasattr(self.lib, "bli_thread_set_num_threads"):
            self.lib.bli_thread_set_num_threads(ctypes.c_long(threads))
        elif hasattr(self.lib, "openblas_set_num_threads"):
            self.lib.openblas_set_num_threads(ctypes.c_int(threads))

    def _version(self):
        if hasattr(self.lib, "openblas_get_config"):
            self.lib.openblas_get_config.restype = ctypes.c_char_p
            return self.lib.openblas_get_config().decode()
        if hasattr(self.lib, "bli_info_get_version_str"):
            self.lib.bli_info_get_version_str.restype = ctypes.c_char_p
            return "BLIS " + self.lib.bli_info_get_version_str().decode()
        return "unknown"

    def plan(self, calls, halves=False):
        """A zero-argument callable making the calls (operands allocated once).

        halves: as pykd's training step does, each call is split in two
        (rows of C, or its columns for dW = dz x^T) and two Python threads
        run one half each, single-threaded, through the whole list (ctypes
        releases the GIL); the threads join once per list. Call
        set_threads(1) first."""
        rng = np.random.default_rng(0)
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        parts = [[], []] if halves else [[]]
        keep = []
        for ta, tb, m, n, k in calls:
            a = rng.standard_normal(m * k, dtype=np.float32)
            b = rng.standard_normal(k * n, dtype=np.float32)
            c = np.zeros(m * n, np.float32)
            keep += [a, b, c]
            lda, ldb = (m if ta == "N" else k), (k if tb == "N" else n)
            for h, part in enumerate(parts):
                off_a = off_b = off_c = 0
                mh, nh = m, n
                if halves and ta == "N" and tb == "T":  # columns of C
                    j0 = min(n, (n // 2 + 15) // 16 * 16) * h
                    nh = min(n, (n // 2 + 15) // 16 * 16) if h == 0 else n - j0
                    off_b, off_c = j0, j0 * m
                elif halves:  # rows of C
                    i0 = min(m, (m // 2 + 15) // 16 * 16) * h
                    mh = min(m, (m // 2 + 15) // 16 * 16) if h == 0 else m - i0
                    off_a, off_c = (i0 if ta == "N" else i0 * lda), i0
                if mh == 0 or nh == 0:
                    continue
                ints = [ctypes.c_int(v) for v in (mh, nh, k, lda, ldb, m)]
                part.append((ctypes.c_char(ta.encode()), ctypes.c_char(tb.encode()), ints,
                             ctypes.c_void_p(a.ctypes.data + 4 * off_a),
                             ctypes.c_void_p(b.ctypes.data + 4 * off_b),
                             ctypes.c_void_p(c.ctypes.data + 4 * off_c)))
        fn, ref = self.fn, ctypes.byref

        def run_part(part):
            for ta, tb, (m, n, k, lda, ldb, ldc), a, b, c in part:
                fn(ref(ta), ref(tb), ref(m), ref(n), ref(k), ref(one), a, ref(lda),
                   b, ref(ldb), ref(zero), c, ref(ldc), ctypes.c_size_t(1), ctypes.c_size_t(1))
        if not halves:
            def run():
                run_part(parts[0])
        else:
            import concurrent.futures
            pool = concurrent.futures.ThreadPoolExecutor(2)

            def run():
                list(pool.map(run_part, parts))
            run._pool = pool
        run._keep = keep
        return run


# --------------------------------------------------------------------------
# training loops
# --------------------------------------------------------------------------

def make_data(n_out=10):
    rng = np.random.default_rng(0)
    x = rng.random((N_TRAIN, 784), dtype=np.float32)
    y = rng.integers(0, n_out, N_TRAIN)
    t = rng.standard_normal((N_TRAIN, n_out)).astype(np.float32)
    return x, y, t


class PykdLoop:
    """As pykd.train.fit runs an epoch: shuffle, gather, one step call."""

    def __init__(self, sizes, kd, batch, data):
        from pykd import _step
        self._step = _step
        rng = np.random.default_rng(1)
        n = _step.param_count(list(sizes))
        self.sizes, self.acts = list(sizes), ["relu"] * (len(sizes) - 2) + ["identity"]
        self.p = (rng.standard_normal(n) * 0.02).astype(np.float32)
        self.g, self.m, self.v = (np.zeros(n, np.float32) for _ in range(3))
        self.ws = _step.Workspace(self.sizes, batch)
        self.cfg = (_step.TrainConfig(loss="kd", temperature=5, alpha=0.1) if kd
                    else _step.TrainConfig(loss="ce"))
        self.kd, self.batch, self.rng = kd, batch, rng
        self.x, self.y, self.t = data
        self.xb = np.empty((batch, 784), np.float32)
        self.yb = np.empty(batch, np.int64)
        self.tb = np.empty((batch, sizes[-1]), np.float32)
        self.step = 0

    def run(self, steps):
        order = self.rng.permutation(len(self.x))
        B = self.batch
        for i in range(steps):
            idx = order[i * B:(i + 1) * B]
            self.step += 1
            xb = np.take(self.x, idx, axis=0, out=self.xb, mode="clip")
            yb = np.take(self.y, idx, out=self.yb, mode="clip")
            tb = np.take(self.t, idx, axis=0, out=self.tb, mode="clip") if self.kd else None
            self._step.train_step(self.sizes, self.acts, self.p, self.g, self.m, self.v, xb, yb,
                                  self.cfg, self.step, self.ws, teacher_logits=tb)


class PlainLoop:
    """The epoch a NumPy user writes: matmuls, np.maximum, the Adam formulas."""

    def __init__(self, sizes, kd, batch, data):
        rng = np.random.default_rng(1)
        self.W = [(rng.standard_normal((a, b)) * 0.02).astype(np.float32)
                  for a, b in zip(sizes[:-1], sizes[1:])]
        self.b = [np.zeros(b, np.float32) for b in sizes[1:]]
        self.params = self.W + self.b
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.kd, self.batch, self.rng = kd, batch, rng
        self.x, self.y, self.t = data
        self.step = 0

    def grads(self, xb, yb, tb):
        hs = [xb]
        for i, (W, b) in enumerate(zip(self.W, self.b)):
            z = hs[-1] @ W + b
            hs.append(np.maximum(z, 0) if i < len(self.W) - 1 else z)
        z = hs[-1]
        n = len(yb)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        onehot = np.zeros_like(p)
        onehot[np.arange(n), yb] = 1
        dz = (p - onehot) / n
        if self.kd:
            T, alpha = 5.0, 0.1
            ps = np.exp((z - z.max(1, keepdims=True)) / T)
            ps /= ps.sum(1, keepdims=True)
            pt = np.exp((tb - tb.max(1, keepdims=True)) / T)
            pt /= pt.sum(1, keepdims=True)
            dz = alpha * dz + (1 - alpha) * T * (ps - pt) / n
        gW, gb = [None] * len(self.W), [None] * len(self.W)
        for i in range(len(self.W) - 1, -1, -1):
            gW[i] = hs[i].T @ dz
            gb[i] = dz.sum(0)
            if i > 0:
                dz = (dz @ self.W[i].T) * (hs[i] > 0)
        return gW + gb

    def run(self, steps):
        order = self.rng.permutation(len(self.x))
        B = self.batch
        b1, b2, lr, eps = 0.9, 0.999, 1e-3, 1e-8
        for i in range(steps):
            idx = order[i * B:(i + 1) * B]
            g = self.grads(self.x[idx], self.y[idx], self.t[idx])
            self.step += 1
            c1, c2 = 1 - b1 ** self.step, 1 - b2 ** self.step
            for p, gi, m, v in zip(self.params, g, self.m, self.v):
                m *= b1
                m += (1 - b1) * gi
                v *= b2
                v += (1 - b2) * gi * gi
                p -= lr / c1 * m / (np.sqrt(v / c2) + eps)


class TorchLoop:
    def __init__(self, sizes, kd, batch, data):
        import torch
        self.torch = torch
        torch.manual_seed(0)
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.kd, self.batch = kd, batch
        self.x, self.y, self.t = (torch.from_numpy(a) for a in data)
        self.gen = torch.Generator().manual_seed(1)

    def run(self, steps):
        F = self.torch.nn.functional
        order = self.torch.randperm(len(self.x), generator=self.gen)
        B, T, alpha = self.batch, 5.0, 0.1
        for i in range(steps):
            idx = order[i * B:(i + 1) * B]
            logits = self.model(self.x[idx])
            loss = F.cross_entropy(logits, self.y[idx])
            if self.kd:
                soft = F.kl_div(self.torch.log_softmax(logits / T, 1),
                                self.torch.log_softmax(self.t[idx] / T, 1),
                                reduction="batchmean", log_target=True)
                loss = alpha * loss + (1 - alpha) * T * T * soft
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()


LOOPS = {"pykd": PykdLoop, "plain": PlainLoop, "torch": TorchLoop}


def soft_labels(backend, data, rows):
    """Teacher forward over `rows` samples at batch 1024."""
    x = data[0][:rows]
    rng = np.random.default_rng(2)
    if backend == "pykd":
        import pykd  # MLP.forward: the network routine users run
        from pykd import _step
        m = pykd.MLP(list(TEACHER), ["relu", "relu", "identity"])
        m.params[...] = (rng.standard_normal(_step.param_count(list(TEACHER))) * 0.02
                         ).astype(np.float32)
        return lambda: m.forward(x, batch_size=1024)
    if backend == "torch":
        import torch
        loop = TorchLoop(TEACHER, False, 1024, data)
        xt = torch.from_numpy(x)

        def f():
            with torch.no_grad():
                for i in range(0, rows, 1024):
                    loop.model(xt[i:i + 1024])
        return f
    W = [(rng.standard_normal((a, b)) * 0.02).astype(np.float32)
         for a, b in zip(TEACHER[:-1], TEACHER[1:])]

    def g():
        for i in range(0, rows, 1024):
            h = x[i:i + 1024]
            for j, w in enumerate(W):
                h = h @ w
                if j < len(W) - 1:
                    np.maximum(h, 0, out=h)
    return g


def worker_factory(backend, blis_dir, nthreads):
    """In a timing worker: name = (kind, sizes, batch, steps or rows)."""
    data = make_data()
    blas = {}
    halves = backend.endswith("-halves")
    if backend.startswith("blas:"):
        lib = backend[5:].replace("-halves", "")
        path = pykd_blas_path() if lib == "openblas" else os.path.join(blis_dir, "libblis.so.4")
        blas["s"] = Sgemm(path, 1 if halves else nthreads)

    def get(name):
        kind, sizes, batch, count = name
        if backend.startswith("blas:"):
            if halves:
                blas["s"].set_threads(1)  # after the worker's thread limits
            return blas["s"].plan(step_products(sizes, batch) if kind == "epoch"
                                  else [("N", "N", b, batch, a)
                                        for a, b in zip(sizes[:-1], sizes[1:])], halves)
        if kind == "soft":
            return soft_labels(backend, data, count)
        loop = LOOPS[backend](sizes, kind == "kd", batch, data)
        loop.run(2)  # warm: first-touch of the buffers, thread pools up
        return lambda: loop.run(count)
    return get


def find_blis(arg):
    for d in ([arg] if arg else BLIS_DIRS):
        if d and os.path.exists(os.path.join(d, "libblis.so.4")):
            return d
    return None


def phase_plan(fraction, quick):
    """[(label, kind, sizes, batch, count per sample, scale to the phase)]."""
    plan = []
    batches = (64,) if quick else (64, 256, 1024)
    for batch in batches:
        for label, kind, sizes in (("teacher epoch", "ce", TEACHER),
                                   ("KD student epoch", "kd", STUDENT)):
            full = -(-N_TRAIN // batch)
            steps = max(3, int(fraction * full))
            plan.append((f"{label}, batch {batch}", kind, sizes, batch, steps, full / steps))
    rows = 8192 if quick else 16384
    plan.append(("soft labels 60k", "soft", TEACHER, 1024, rows, N_TRAIN / rows))
    return plan


def blas_names(blis_dir):
    """Threaded BLAS, and two threads running single-threaded halves (-halves)."""
    libs = ["openblas"] + (["blis"] if blis_dir else [])
    return [f"blas:{lib}{h}" for lib in libs for h in ("", "-halves")]


def time_phase(workers, cands, repeats):
    r, errs = workers.time(cands, repeats=repeats, warmup=0, min_time=0.0, warm=0,
                           settle=harness.SETTLE)
    for label, msg in errs.items():
        print(f"WARNING: {label}: {msg}", file=sys.stderr)
    return r


def measure(threads, fraction, repeats, quick, blis_dir):
    loops = ["pykd", "plain"]
    try:
        import torch  # noqa: F401
        loops.append("torch")
    except ImportError:
        print("PyTorch is not importable: no torch column", file=sys.stderr)
    backends = loops + blas_names(blis_dir)
    bw = harness.measure_copy_bandwidth()["gbps"]
    rows = []
    with harness.Workers(worker_factory, backends, threads=threads, blis_dir=blis_dir,
                         nthreads=threads) as w:
        for be, msg in w.errors.items():
            print(f"WARNING: worker {be} failed to start: {msg}", file=sys.stderr)
        for label, kind, sizes, batch, count, scale in phase_plan(fraction, quick):
            t0 = time.perf_counter()
            cands = {be: (be, (kind, sizes, batch, count)) for be in loops}
            # The BLAS candidates time one step's products (or one batch's
            # forward for soft labels); a phase is `steps` of them.
            steps = count if kind != "soft" else -(-count // batch)
            for be in blas_names(blis_dir):
                cands[be] = (be, ("epoch" if kind != "soft" else "soft", sizes, batch, 1))
            r = time_phase(w, cands, repeats)
            med = {be: st["median"] * (scale if be in loops else scale * steps)
                   for be, st in r.items()}
            spread = {be: (st["min"] / st["median"], st["max"] / st["median"])
                      for be, st in r.items()}
            calls = (step_products(sizes, batch) if kind != "soft"
                     else [("N", "N", b, batch, a) for a, b in zip(sizes[:-1], sizes[1:])])
            n_calls = (-(-N_TRAIN // batch))
            flops = product_flops(calls) * n_calls
            blas_t = {be: t for be, t in med.items() if be.startswith("blas:")}
            best = min(blas_t, key=blas_t.get) if blas_t else None
            mem = 0.0 if kind == "soft" else adam_bytes(sizes) * n_calls / (bw * 1e9)
            floor = (blas_t[best] + mem) if best else None
            rows.append({"phase": label, "batch": batch, "seconds": med, "spread": spread,
                         "flops": flops, "best_blas": best, "adam_floor_s": mem,
                         "floor_s": floor, "copy_gbps": bw,
                         "wall": time.perf_counter() - t0})
            print(format_row(rows[-1]), flush=True)
    return rows


def format_row(r):
    s = r["seconds"]
    parts = [f"{r['phase']:28s}"]
    for be in ("pykd", "torch", "plain"):
        if be in s:
            parts.append(f"{be} {harness.format_seconds(s[be])}")
    for be in s:
        if be.startswith("blas:"):
            parts.append(f"{be} {harness.format_seconds(s[be])} "
                         f"({r['flops'] / s[be] / 1e9:.0f} GF/s)")
    if r["floor_s"] and "pykd" in s:
        parts.append(f"floor {harness.format_seconds(r['floor_s'])} "
                     f"pykd/floor {s['pykd'] / r['floor_s']:.2f}")
    return " | ".join(parts)


def table(rows):
    head = ["phase", "pykd", "GFLOP/s", "% of best sgemm", "floor", "pykd/floor",
            "PyTorch", "PyTorch/pykd", "plain NumPy", "plain/pykd"]
    for be in rows[0]["seconds"]:
        if be.startswith("blas:"):
            head.append(f"{be[5:]} products")
    out = []
    for r in rows:
        s = r["seconds"]
        p = s.get("pykd")
        best = s.get(r["best_blas"]) if r["best_blas"] else None
        line = [r["phase"], harness.format_seconds(p),
                f"{r['flops'] / p / 1e9:.0f}" if p else "",
                f"{100 * best / p:.0f}%" if p and best else "",
                harness.format_seconds(r["floor_s"]),
                f"{p / r['floor_s']:.2f}" if p and r["floor_s"] else ""]
        for be in ("torch", "plain"):
            line += [harness.format_seconds(s.get(be)),
                     f"{s[be] / p:.2f}x" if p and be in s else ""]
        for be in s:
            if be.startswith("blas:"):
                line.append(f"{harness.format_seconds(s[be])} ({r['flops'] / s[be] / 1e9:.0f} GF/s)")
        out.append(line)
    return head, out


def verdicts(rows):
    """Issue 15's targets, judged on this run's medians."""
    by = {r["phase"]: r for r in rows}
    out = []

    def judge(text, ok, got):
        out.append(f"{text}: {'MET' if ok else 'MISSED'} ({got})")

    t, s, soft = (by.get("teacher epoch, batch 64"), by.get("KD student epoch, batch 64"),
                  by.get("soft labels 60k"))
    if t and "torch" in t["seconds"]:
        r = t["seconds"]["torch"] / t["seconds"]["pykd"]
        judge("teacher epoch >= 2x faster than PyTorch", r >= 2, f"{r:.2f}x")
    if t and t["floor_s"]:
        r = t["seconds"]["pykd"] / t["floor_s"]
        judge("teacher epoch within 1.2x of its floor", r <= 1.2, f"{r:.2f}x the floor")
    if s and "torch" in s["seconds"]:
        r = s["seconds"]["torch"] / s["seconds"]["pykd"]
        judge("KD student epoch >= 3x faster than PyTorch", r >= 3, f"{r:.2f}x")
    if soft and soft["best_blas"]:
        r = soft["seconds"][soft["best_blas"]] / soft["seconds"]["pykd"]
        judge("soft labels >= 80% of sgemm at their shapes", r >= 0.8,
              f"{100 * r:.0f}% of {soft['best_blas']}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--blis", default=None, help="folder holding BLIS's libblis.so.4")
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    a = ap.parse_args(argv)
    fraction = a.fraction or (0.02 if a.quick else 0.05)
    repeats = a.repeats or 3
    blis_dir = find_blis(a.blis)
    info = harness.machine_info()
    info["pykd_blas"] = pykd_blas_path()
    info["pykd_blas_config"] = Sgemm(info["pykd_blas"], a.threads).version
    if blis_dir:
        info["blis"] = Sgemm(os.path.join(blis_dir, "libblis.so.4"), a.threads).version
    print(harness.format_machine_info(info))
    print(f"pykd's BLAS: {info['pykd_blas']} ({info['pykd_blas_config']})")
    print(f"BLIS: {info.get('blis', 'not found (apt-get install libblis4-openmp, or --blis DIR)')}")
    busy = harness.cpu_busy_fraction()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    rows = measure(a.threads, fraction, repeats, a.quick, blis_dir)
    load1 = os.getloadavg()
    head, body = table(rows)
    print(harness.text_table(head, body))
    note = (f"threads {a.threads}; epochs timed on {fraction:.0%} of an epoch and scaled; "
            f"copy bandwidth {rows[0]['copy_gbps']:.1f} GB/s; CPU busy before "
            f"{'?' if busy is None else f'{busy:.0%}'}; load average {load0[0]:.1f} before, "
            f"{load1[0]:.1f} after; {time.perf_counter() - t0:.0f} s")
    print(note)
    judged = verdicts(rows)
    print("targets:\n" + "\n".join("  " + v for v in judged))
    if a.json:
        harness.write_json(a.json, {"machine": info, "threads": a.threads, "fraction": fraction,
                                    "load_before": load0, "load_after": load1, "rows": rows,
                                    "targets": judged})
    if a.markdown:
        harness.write_markdown(a.markdown, "```\n" + harness.format_machine_info(info) +
                               f"\npykd's BLAS: {info['pykd_blas']} ({info['pykd_blas_config']})"
                               f"\nBLIS: {info.get('blis', 'not found')}\n```\n\n" +
                               harness.markdown_table(head, body) + "\n\n" + note +
                               "\n\nTargets:\n\n" + "".join(f"- {v}\n" for v in judged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
