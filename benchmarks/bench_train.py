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
  * blas:<name> -- the sgemm calls of the same steps (the exact shapes and
    transposes pykd makes), run natively by benchmarks/train_floor.c (built
    into build/bench/ with cc, called through ctypes once per step), for
    each BLAS found: pykd's own OpenBLAS (the library file the extension
    loads) and Debian's BLIS (the OpenMP build; --blis names its folder).
    Each product runs in the faster of two modes, measured in the worker:
    one threaded call, or one single-threaded call per thread on its share
    of C (as pykd's step splits); a barrier after each product.

The floor of an epoch is the sum of the products' time on the faster BLAS
and the time to move the bytes Adam must move (read p, m, v and write them
back: 24 bytes a parameter, the gradient left in cache) at the copy
bandwidth measured here; the elementwise passes work on activations that
stay in cache (64 x 1200 floats is 300 KiB) and add no memory bytes. Never
fails on timing.
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
    """A BLAS library's name and version (OpenBLAS or BLIS), read through ctypes."""

    def __init__(self, path):
        self.path = path
        self.lib = ctypes.CDLL(path)
        if hasattr(self.lib, "bli_init"):
            # before threadpoolctl asks its architecture: with BLIS_ARCH_TYPE
            # set, that query aborts the process on an uninitialised BLIS
            self.lib.bli_init()
        self.version = self._version()

    def _version(self):
        if hasattr(self.lib, "openblas_get_config"):
            self.lib.openblas_get_config.restype = ctypes.c_char_p
            return self.lib.openblas_get_config().decode()
        if hasattr(self.lib, "bli_info_get_version_str"):
            self.lib.bli_info_get_version_str.restype = ctypes.c_char_p
            return "BLIS " + self.lib.bli_info_get_version_str().decode()
        return "unknown"


FLOOR_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_floor.c")
FLOOR_DIR = os.path.join(harness.REPO, "build", "bench")


def floor_library():
    """benchmarks/train_floor.c built into build/bench/ (rebuilt when the
    source is newer); its path. Raises RuntimeError without a C compiler."""
    so = os.path.join(FLOOR_DIR, "libtrain_floor.so")
    if os.path.exists(so) and os.path.getmtime(so) >= os.path.getmtime(FLOOR_SRC):
        return so
    import shutil
    import subprocess
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc) to build benchmarks/train_floor.c")
    os.makedirs(FLOOR_DIR, exist_ok=True)
    tmp = f"{so}.{os.getpid()}.tmp"
    r = subprocess.run([cc, "-O2", "-fopenmp", "-shared", "-fPIC", FLOOR_SRC, "-o", tmp, "-ldl"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building train_floor.c failed: {r.stderr.strip()}")
    os.replace(tmp, so)
    return so


class NativeProducts:
    """The products of a step on one BLAS library, run natively
    (benchmarks/train_floor.c): each product in the faster of two modes,
    measured here -- one threaded call, or `threads` OpenMP threads each
    making a single-threaded call on its share (as pykd's step splits)."""

    MODES = ("threaded", "split")

    def __init__(self, floor_so, blas_path, threads):
        self.tf = ctypes.CDLL(floor_so)
        tf = self.tf
        tf.tf_open.restype = ctypes.c_void_p
        tf.tf_open.argtypes = [ctypes.c_char_p]
        tf.tf_plan_new.restype = ctypes.c_void_p
        tf.tf_plan_new.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        tf.tf_time.restype = ctypes.c_double
        tf.tf_time.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        tf.tf_set_mode.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        tf.tf_run.argtypes = [ctypes.c_void_p]
        tf.tf_operand.restype = ctypes.POINTER(ctypes.c_float)
        tf.tf_operand.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self.lib = tf.tf_open(blas_path.encode())
        if not self.lib:
            raise RuntimeError(f"{blas_path}: cannot load it or it has no sgemm_")
        blas = ctypes.CDLL(blas_path)  # the same library
        if hasattr(blas, "bli_init"):
            # before threadpoolctl asks its architecture: with BLIS_ARCH_TYPE
            # set, that query aborts the process on an uninitialised BLIS
            blas.bli_init()
        self.threads = threads

    def plan(self, calls, modes=None, rounds=3, reps=3):
        """A zero-argument callable running `calls` [(transa, transb, m, n, k)]
        once. modes: one per call (0 threaded, 1 split); default: the faster
        of the two for each call, over `rounds` alternating rounds of `reps`
        calls each (kept in run.modes)."""
        spec = (ctypes.c_int * (5 * len(calls)))(
            *[v for ta, tb, m, n, k in calls for v in (ord(ta), ord(tb), m, n, k)])
        plan = self.tf.tf_plan_new(self.lib, len(calls), spec, self.threads)
        if not plan:
            raise MemoryError("train_floor: cannot allocate the operands")
        if modes is None:
            modes = []
            for i in range(len(calls)):
                best = [min(self.tf.tf_time(plan, i, mode, reps) for _ in range(rounds))
                        for mode in (0, 1)]
                modes.append(0 if best[0] <= best[1] else 1)
        for i, mode in enumerate(modes):
            self.tf.tf_set_mode(plan, i, mode)
        tf = self.tf

        def run():
            tf.tf_run(plan)
        run.modes, run.plan = list(modes), plan
        return run

    def operand(self, run, calls, i, which):
        """Operand `which` (0 A, 1 B, 2 C) of call i, as a flat NumPy view."""
        ta, tb, m, n, k = calls[i]
        size = (m * k, k * n, m * n)[which]
        return np.ctypeslib.as_array(self.tf.tf_operand(run.plan, i, which), (size,))


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


def phase_products(kind, sizes, batch):
    """The products a phase's BLAS candidates time: one training step's, or
    one batch's forward for soft labels."""
    if kind == "soft":
        return [("N", "N", b, batch, a) for a, b in zip(sizes[:-1], sizes[1:])]
    return step_products(sizes, batch)


def worker_factory(backend, blis_dir, nthreads, floor_so):
    """In a timing worker: name = (kind, sizes, batch, steps or rows)."""
    data = make_data()
    blas = {}
    if backend.startswith("blas:"):
        lib = backend[5:]
        path = pykd_blas_path() if lib == "openblas" else os.path.join(blis_dir, "libblis.so.4")
        blas["s"] = NativeProducts(floor_so, path, nthreads)

    def get(name):
        kind, sizes, batch, count = name
        if backend.startswith("blas:"):
            # as many steps (or batches) as the loops' sample runs
            run = blas["s"].plan(phase_products(kind, sizes, batch))
            reps = range(count if kind != "soft" else -(-count // batch))

            def products():
                for _ in reps:
                    run()
            products.modes = run.modes
            return products
        if kind == "soft":
            return soft_labels(backend, data, count)
        loop = LOOPS[backend](sizes, kind == "kd", batch, data)
        loop.run(2)  # warm: first-touch of the buffers, thread pools up
        return lambda: loop.run(count)
    return get


def cpu_line():
    """The CPU as the tables name it: model, family/model numbers, the vector
    extensions that matter here, cores and cache sizes (from /proc and /sys)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read().split("\n\n")[0]
    except OSError:
        return "CPU: unknown"
    field = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    field = {k.strip(): v.strip() for k, v in field.items()}
    flags = set(field.get("flags", "").split())
    ext = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"),
                                   ("AVX512-VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"),
                                   ("AMX", "amx_tile")) if flag in flags]
    if "amx_tile" not in flags:
        ext.append("no AMX")
    caches = []
    for idx, name in (("index2", "L2 (per core)"), ("index3", "L3")):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/{idx}/size", encoding="ascii") as fh:
                caches.append(f"{name} {fh.read().strip()}")
        except OSError:
            pass
    return (f"CPU: {field.get('model name', '?')} (family {field.get('cpu family', '?')} "
            f"model {field.get('model', '?')}), {os.cpu_count()} cores, {', '.join(ext)}; "
            f"{', '.join(caches)}")


def blis_arch(path):
    """The kernel set BLIS picks in a fresh process (its name), or None."""
    import subprocess
    code = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.bli_init(); "
            "lib.bli_arch_string.restype = ctypes.c_char_p; "
            "print(lib.bli_arch_string(lib.bli_arch_query_id()).decode())")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def choose_blis_arch(path):
    """Debian's BLIS 0.9.0 knows no kernels for newer CPUs (AMD Zen 5 among
    them) and falls back to 'generic', its reference code (about 1/6 of its
    AVX-512 kernels here). Then this sets BLIS_ARCH_TYPE for the run's
    workers -- skx (AVX-512) or haswell (AVX2), which run on any CPU with
    those extensions; BLIS 0.9 reads the number of its arch_t value, 0 and
    3 -- unless the user set it. Returns the note to print."""
    if os.environ.get("BLIS_ARCH_TYPE"):
        return f"arch {blis_arch(path)} (BLIS_ARCH_TYPE={os.environ['BLIS_ARCH_TYPE']}, set by the user)"
    arch = blis_arch(path)
    if arch != "generic":
        return f"arch {arch}"
    flags = harness._cpuinfo()["flags"]
    want = "skx" if "avx512f" in flags else "haswell" if "avx2" in flags else None
    if want is None:
        return "arch generic"
    os.environ["BLIS_ARCH_TYPE"] = {"skx": "0", "haswell": "3"}[want]
    got = blis_arch(path)
    if got != want:  # another BLIS version numbers its kernels otherwise
        del os.environ["BLIS_ARCH_TYPE"]
        return "arch generic"
    return (f"arch {got}: BLIS_ARCH_TYPE={os.environ['BLIS_ARCH_TYPE']} set by this benchmark "
            "(this BLIS picked 'generic', its reference code, on this CPU)")


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
    """The BLAS candidates: pykd's OpenBLAS, and BLIS when found."""
    return ["blas:openblas"] + (["blas:blis"] if blis_dir else [])


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
    try:
        floor_so = floor_library()
    except RuntimeError as exc:
        print(f"WARNING: no floor: {exc}", file=sys.stderr)
        floor_so, backends = None, loops
    with harness.Workers(worker_factory, backends, threads=threads, blis_dir=blis_dir,
                         nthreads=threads, floor_so=floor_so) as w:
        for be, msg in w.errors.items():
            print(f"WARNING: worker {be} failed to start: {msg}", file=sys.stderr)
        for label, kind, sizes, batch, count, scale in phase_plan(fraction, quick):
            t0 = time.perf_counter()
            # The BLAS candidates run the products of as many steps (or
            # soft-label batches) as the loops do in a sample.
            cands = {be: (be, (kind, sizes, batch, count)) for be in backends
                     if be in w.backends}
            r = time_phase(w, cands, repeats)
            med = {be: st["median"] * scale for be, st in r.items()}
            spread = {be: (st["min"] / st["median"], st["max"] / st["median"])
                      for be, st in r.items()}
            calls = phase_products(kind, sizes, batch)
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
    head = ["phase", "pykd", "GFLOP/s", "% of ceiling (best sgemm here)", "floor", "pykd/floor",
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
    if t and t["best_blas"]:
        blas = {be[5:]: v for be, v in t["seconds"].items() if be.startswith("blas:")}
        out.append("BLAS (chosen by this measurement, never switched silently): pykd links "
                   "OpenBLAS; the teacher's batch-64 products took " +
                   ", ".join(f"{harness.format_seconds(v)} on {k}" for k, v in blas.items()) +
                   f" -> fastest: {t['best_blas'][5:]}" +
                   ("" if t["best_blas"] == "blas:openblas" else
                    " (faster than the library pykd links: the floor uses it)"))
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
    info["pykd_blas_config"] = Sgemm(info["pykd_blas"]).version
    if blis_dir:
        blis_so = os.path.join(blis_dir, "libblis.so.4")
        had = "BLIS_ARCH_TYPE" in os.environ
        info["blis"] = f"{Sgemm(blis_so).version}, {choose_blis_arch(blis_so)}"
        info["blis_arch_forced"] = not had and "BLIS_ARCH_TYPE" in os.environ
    info["cpu_line"] = cpu_line()
    print(harness.format_machine_info(info))
    print(info["cpu_line"])
    print(f"pykd's BLAS: {info['pykd_blas']} ({info['pykd_blas_config']})")
    print(f"BLIS: {info.get('blis', 'not found (apt-get install libblis4-openmp, or --blis DIR)')}")
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if forced:
        # the sessions' environment here sets Haswell: OpenBLAS's AVX2 kernels
        # on an AVX-512 CPU, about half of its sgemm throughput
        print(f"WARNING: OPENBLAS_CORETYPE={forced} forces OpenBLAS's kernels for every "
              "candidate; unset it to measure this CPU's own", file=sys.stderr)
    busy = harness.cpu_busy_fraction()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    try:
        rows = measure(a.threads, fraction, repeats, a.quick, blis_dir)
    finally:
        if info.get("blis_arch_forced"):   # the caller's environment as it was
            os.environ.pop("BLIS_ARCH_TYPE", None)
    load1 = os.getloadavg()
    head, body = table(rows)
    print(harness.text_table(head, body))
    note = (f"threads {a.threads}; epochs timed on {fraction:.0%} of an epoch and scaled; "
            f"copy bandwidth {rows[0]['copy_gbps']:.1f} GB/s; CPU busy before "
            f"{'?' if busy is None else f'{busy:.0%}'}; "
            f"{f'OPENBLAS_CORETYPE={forced} (forced kernels); ' if forced else ''}"
            f"load average {load0[0]:.1f} before, "
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
                               f"\n{info['cpu_line']}\npykd's BLAS: {info['pykd_blas']} ({info['pykd_blas_config']})"
                               f"\nBLIS: {info.get('blis', 'not found')}\n```\n\n" +
                               harness.markdown_table(head, body) + "\n\n" + note +
                               "\n\nTargets:\n\n" + "".join(f"- {v}\n" for v in judged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
