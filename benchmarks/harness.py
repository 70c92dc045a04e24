"""Shared helpers for the pykd benchmarks.

The machine is a small, shared, noisy VM (see shared/notes/ENGINEERING.md):
never trust one absolute time. Everything here is built to compare several
candidates *in the same run*, interleaved (A B A B ...), so that a noisy
neighbour hits all of them alike, and to report medians and ratios.

Only NumPy is required; threadpoolctl is used when importable.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

try:  # optional
    import threadpoolctl as _tpc
except Exception:  # pragma: no cover - depends on the environment
    _tpc = None

__all__ = [
    "time_alternating",
    "Workers",
    "measure_sgemm_ceiling",
    "measure_copy_bandwidth",
    "machine_info",
    "with_threads",
    "default_threads",
    "write_json",
    "markdown_table",
    "write_markdown",
    "format_seconds",
    "capture_stderr_fd",
    "cpu_times",
    "steal_fraction",
    "sched_times",
    "environment",
    "initial_environ",
    "worker_environment",
    "cpu_name",
]

_perf = time.perf_counter


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------

def _calibrate(func: Callable[[], object], min_time: float, max_inner: int) -> tuple[int, float]:
    """Return (inner loop count, estimated seconds per call) such that one
    sample of ``inner`` calls lasts at least ``min_time`` seconds."""
    n = 1
    while True:
        t0 = _perf()
        for _ in range(n):
            func()
        dt = _perf() - t0
        if dt >= min_time or n >= max_inner:
            return n, dt / n
        if dt <= 0.0:
            n = min(max_inner, n * 10)
            continue
        # aim a bit above min_time; grow by at most 100x per step so that a
        # first, cold measurement cannot blow the count up absurdly
        want = int(math.ceil(n * 1.2 * min_time / dt))
        n = min(max_inner, max(n + 1, min(want, n * 100)))


def _sample_order(names, inner, est, repeats, max_time, blocked) -> list:
    """Which candidate takes each sample: ``repeats`` rounds of A B A B ...
    (``blocked``: A A ... B B ...), fewer rounds (never below 3) when the
    calibration (``inner`` calls of ``est`` seconds) predicts more than
    ``max_time`` seconds."""
    rounds = max(1, int(repeats))
    if max_time is not None and names:
        per_round = sum(inner[n] * est[n] for n in names)
        if per_round > 0:
            rounds = max(min(3, rounds), min(rounds, int(max_time / per_round)))
    if blocked:
        return [n for n in names for _ in range(rounds)]
    return [n for _ in range(rounds) for n in names]


def _stats(samples: Sequence[float]) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25.0, 50.0, 75.0])
    return {
        "median": float(med),
        "min": float(a.min()),
        "max": float(a.max()),
        "q1": float(q1),
        "q3": float(q3),
        "iqr": float(q3 - q1),
        "n_samples": int(a.size),
    }


# Pause (s) before a sample when the backend changes. After its last call
# NumPy's OpenBLAS keeps its threads spinning for ~0.1-0.2 s (PyTorch's OpenMP
# threads likewise); on 2 cores they preempt the next backend's threads in the
# middle of a BLAS call, whose threads then wait for each other: a one-sample
# teacher forward took 2.2 ms right after NumPy calls, 0.26 ms after 0.2 s.
SETTLE = 0.3


def time_alternating(
    funcs: Mapping[str, Callable[[], object]],
    repeats: int = 15,
    warmup: int = 2,
    min_time: float = 0.02,
    max_time: float | None = None,
    max_inner: int = 1_000_000,
    keep_samples: bool = False,
    blocked: bool = False,
    settle: float = 0.0,
) -> dict[str, dict]:
    """Time zero-argument callables interleaved: A B A B ... for ``repeats``
    rounds.

    * each candidate is first called ``warmup`` times;
    * then an inner loop count is chosen per candidate so that one sample
      (``inner`` back-to-back calls) lasts at least ``min_time`` seconds
      (20 ms by default; microsecond kernels get thousands of calls);
    * ``repeats`` rounds follow; in each round every candidate takes one
      sample, in the same fixed order, so noise lands on all alike;
    * ``max_time`` (seconds, optional) caps the timed rounds: the number of
      rounds is lowered (never below 3) if the calibration predicts more.

    The garbage collector is disabled during the samples.

    ``settle`` (seconds) sleeps before each sample, outside the timed part,
    when the candidate changes: idle BLAS/OpenMP worker threads of the
    previous candidate spin for a while after its last call (OpenBLAS up to
    ~0.1 s, libgomp with an active wait policy likewise) and on a 2-core
    machine steal the cores of the next candidate's pool.

    ``blocked=True`` is a diagnostic: all rounds of the first candidate, then
    all of the next, ... (no interleaving). Use it to see whether candidates
    disturb each other, e.g. two BLAS/OpenMP thread pools whose idle threads
    spin on the two cores after a call.

    Returns ``{name: {"median", "min", "max", "q1", "q3", "iqr",
    "n_samples", "inner"}}`` in seconds per call (plus ``"samples"`` when
    ``keep_samples``).
    """
    if not funcs:
        return {}
    names = list(funcs)
    for name in names:
        for _ in range(max(0, int(warmup))):
            funcs[name]()

    inner: dict[str, int] = {}
    est: dict[str, float] = {}
    for name in names:
        inner[name], est[name] = _calibrate(funcs[name], min_time, max_inner)

    order = _sample_order(names, inner, est, repeats, max_time, blocked)
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    prev = None
    try:
        for name in order:
            f = funcs[name]
            k = inner[name]
            if settle > 0 and name != prev:
                time.sleep(settle)
            prev = name
            t0 = _perf()
            for _ in range(k):
                f()
            samples[name].append((_perf() - t0) / k)
    finally:
        if gc_was_enabled:
            gc.enable()

    out: dict[str, dict] = {}
    for name in names:
        s = _stats(samples[name])
        s["inner"] = inner[name]
        if keep_samples:
            s["samples"] = samples[name]
        out[name] = s
    return out


# --------------------------------------------------------------------------
# timing in worker processes
# --------------------------------------------------------------------------

def _worker_loop(conn, factory, kwargs, threads):
    """Body of a timing worker process (see :class:`Workers`)."""
    limiter = None  # kept alive: the limits hold for the life of the process
    try:
        get = factory(**kwargs)
        # after the factory's imports: threadpoolctl sees loaded libraries only
        if threads is not None and _tpc is not None:
            limiter = _tpc.threadpool_limits(limits=int(threads))
        torch_mod = sys.modules.get("torch")
        if threads is not None and torch_mod is not None:
            torch_mod.set_num_threads(int(threads))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", os.getpid()))
    funcs: dict = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        op = msg[0]
        if op == "quit":
            break
        try:
            name = msg[1]
            if name not in funcs:
                funcs[name] = get(name)
            f = funcs[name]
            if op == "call":
                conn.send(("ok", f()))
            elif op == "calibrate":
                _, _, warmup, min_time, max_inner = msg
                for _ in range(warmup):
                    f()
                conn.send(("ok", _calibrate(f, min_time, max_inner)))
            elif op == "sample":
                _, _, inner, warm = msg
                for _ in range(warm):
                    f()
                gc.collect()
                gc.disable()
                try:
                    t0 = _perf()
                    for _ in range(inner):
                        f()
                    dt = _perf() - t0
                finally:
                    gc.enable()
                conn.send(("ok", dt / inner))
            else:
                conn.send(("error", f"unknown request {op!r}"))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    del limiter


class Workers:
    """One worker process per backend, for timing each backend in a process
    of its own while the parent alternates between them.

    In one process, the thread pools of several backends (pykd's OpenMP and
    BLAS pool, NumPy's OpenBLAS, PyTorch's OpenMP) disturb each other on a
    2-core machine: measured here, pykd's 64x784x1200 forward took 0.75 ms
    alone but 0.9-1.7 ms when alternating with NumPy in the same process
    (even with a pause between them). A user runs one backend; so does each
    worker.

    ``factory(backend=..., **kwargs)`` runs in the worker (it must be a
    module-level function, picklable by reference) and returns
    ``get(name) -> zero-argument callable``. Workers are started with the
    "spawn" method, so they share nothing with the parent but the files.
    Thread pools are limited to ``threads`` (threadpoolctl, and PyTorch's
    own setting when the factory imported it).

    ``env`` (optional) maps environment variables to the value the workers
    start with, None to unset one (see :func:`worker_environment`).

    Use as a context manager; :meth:`time` has the interface and the result
    of :func:`time_alternating`.
    """

    def __init__(self, factory, backends: Sequence[str], threads: int | None = None,
                 env: Mapping[str, str | None] | None = None, **kwargs):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.procs: dict = {}
        self.conns: dict = {}
        self.errors: dict[str, str] = {}
        with environment(env):
            for be in backends:
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker_loop,
                                args=(child, factory, dict(kwargs, backend=be), threads),
                                daemon=True)
                p.start()
                child.close()
                self.procs[be], self.conns[be] = p, parent
        for be in backends:
            status, val = self._recv(be)
            if status != "ok":
                self.errors[be] = str(val)
                self._stop(be)

    @property
    def backends(self) -> list[str]:
        return list(self.conns)

    def call(self, backend: str, name: str):
        """Call ``get(name)()`` once in ``backend``'s worker; its (picklable)
        result. Raises RuntimeError with the worker's message on failure."""
        if backend not in self.conns:
            raise RuntimeError(self.errors.get(backend, f"no worker for backend {backend!r}"))
        status, val = self._ask(backend, "call", name)
        if status != "ok":
            raise RuntimeError(str(val))
        return val

    def _recv(self, be):
        try:
            return self.conns[be].recv()
        except (EOFError, OSError):
            code = self.procs[be].exitcode
            return "error", f"worker process died (exit code {code})"

    def _ask(self, be, *msg):
        try:
            self.conns[be].send(msg)
        except (BrokenPipeError, OSError):
            return "error", "worker process is gone"
        return self._recv(be)

    def _stop(self, be):
        conn = self.conns.pop(be, None)
        proc = self.procs.pop(be, None)
        if conn is not None:
            try:
                conn.send(("quit",))
            except Exception:
                pass
            conn.close()
        if proc is not None:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def close(self) -> None:
        for be in list(self.conns):
            self._stop(be)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def time(self, candidates: Mapping[str, tuple[str, str]], repeats: int = 15,
             warmup: int = 2, min_time: float = 0.02, max_time: float | None = None,
             max_inner: int = 1_000_000, settle: float = 0.0, warm: int = 1,
             blocked: bool = False) -> tuple[dict[str, dict], dict[str, str]]:
        """Time ``candidates`` = ``{label: (backend, name)}`` as
        :func:`time_alternating` does (calibration, then rounds of one sample
        per candidate, medians), each in its backend's worker.

        ``warm`` untimed calls precede every sample: after a pause the first
        call pays for waking sleeping threads (1-2 ms measured here), which
        a training loop, calling back to back, does not.

        Returns ``(stats, errors)``: the statistics per label in seconds per
        call, and an error message per label that could not be timed.
        """
        errors: dict[str, str] = {}
        inner: dict[str, int] = {}
        est: dict[str, float] = {}
        for label, (be, name) in candidates.items():
            if be not in self.conns:
                errors[label] = self.errors.get(be, f"no worker for backend {be!r}")
                continue
            if settle > 0:
                time.sleep(settle)
            status, val = self._ask(be, "calibrate", name, int(warmup), float(min_time),
                                    int(max_inner))
            if status != "ok":
                errors[label] = str(val)
                continue
            inner[label], est[label] = val
        labels = list(inner)
        order = _sample_order(labels, inner, est, repeats, max_time, blocked)
        samples: dict[str, list[float]] = {k: [] for k in labels}
        others: dict[str, list[float]] = {k: [0.0, 0.0] for k in labels}
        prev = None
        for label in order:
            if label in errors:
                continue
            be, name = candidates[label]
            if settle > 0 and label != prev:
                time.sleep(settle)
            prev = label
            idle = [self.procs[b].pid for b in self.procs if b != be]
            c0, t0 = _processes_cpu_ns(idle), _perf()
            status, val = self._ask(be, "sample", name, inner[label], int(warm))
            t1, c1 = _perf(), _processes_cpu_ns(idle)
            if status != "ok":
                errors[label] = str(val)
                continue
            samples[label].append(val)
            others[label][0] += (c1 - c0) * 1e-9
            others[label][1] += t1 - t0
        out: dict[str, dict] = {}
        for label in labels:
            if label in errors or not samples[label]:
                continue
            s = _stats(samples[label])
            s["inner"] = inner[label]
            # CPU the other (idle) workers used while this one was timed,
            # over the samples' wall time: should be ~0
            s["others_cpu"] = others[label][0] / others[label][1] if others[label][1] else None
            out[label] = s
        return out, errors


def _processes_cpu_ns(pids) -> int:
    """CPU time (ns) used so far by all threads of the processes ``pids``
    (/proc/PID/task/*/schedstat; 0 where unreadable)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as fh:
                    total += int(fh.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


@contextlib.contextmanager
def environment(env: Mapping[str, str | None] | None):
    """Set (value) or unset (None) environment variables inside the block,
    e.g. around starting processes that must inherit them; restored after."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    try:
        for k, v in (env or {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def initial_environ() -> dict[str, str] | None:
    """The environment this process started with (/proc/self/environ), before
    any import changed ``os.environ`` (pykd sets GOMP_SPINCOUNT or
    OMP_WAIT_POLICY on import); None where it is not readable."""
    try:
        with open("/proc/self/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
    return out


# Set outside the project (e.g. by a CI or sandbox) to pin OpenBLAS's kernels
# and cache sizes; a user's process on this CPU has neither.
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def worker_environment(keep_blas_overrides: bool = False) -> dict[str, str | None]:
    """The environment changes that make a worker start as a user's fresh
    process would: every threading variable (ENV_VARS) as the benchmark
    process itself started with it (undoing what an import such as pykd's
    set since), and, unless ``keep_blas_overrides``, without the OpenBLAS
    kernel/cache overrides (BLAS_OVERRIDES), so each BLAS picks its kernels
    for this CPU."""
    start = initial_environ()
    env: dict[str, str | None] = {}
    if start is not None:
        for k in ENV_VARS:
            if os.environ.get(k) != start.get(k):
                env[k] = start.get(k)
    if not keep_blas_overrides:
        for k in BLAS_OVERRIDES:
            env[k] = None
    return env


class _Captured:
    text = ""


@contextlib.contextmanager
def capture_stderr_fd():
    """Capture what is written to file descriptor 2 (also by C/Fortran code,
    e.g. f2py's "copied an array" reports) inside the block; the text is in
    the yielded object's ``.text`` afterwards."""
    import tempfile
    res = _Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield res
        finally:
            try:
                sys.stderr.flush()
            except Exception:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            res.text = tmp.read().decode("utf-8", "replace")


# --------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------

@contextlib.contextmanager
def with_threads(n: int | None):
    """Limit BLAS and OpenMP thread pools (all that threadpoolctl sees: NumPy's
    OpenBLAS, a system OpenBLAS, libgomp) to ``n`` threads inside the block.

    Nothing else is changed (no environment variables). ``n=None`` or a
    missing threadpoolctl makes this a no-op.
    """
    if n is None or _tpc is None:
        yield None
        return
    with _tpc.threadpool_limits(limits=int(n)) as lim:
        yield lim


def default_threads() -> int:
    """The thread count the process would use by default: the largest
    ``num_threads`` among the pools threadpoolctl sees, else the CPU count."""
    if _tpc is not None:
        try:
            counts = [int(p.get("num_threads", 0)) for p in _tpc.threadpool_info()]
            counts = [c for c in counts if c > 0]
            if counts:
                return max(counts)
        except Exception:
            pass
    return os.cpu_count() or 1


# --------------------------------------------------------------------------
# ceilings
# --------------------------------------------------------------------------

def measure_sgemm_ceiling(threads: int | None = None, n: int = 2048,
                          repeats: int = 7, warmup: int = 1) -> dict:
    """Square float32 ``n x n @ n x n`` through ``np.matmul`` (NumPy's BLAS)
    with ``threads`` BLAS threads. Returns GFLOP/s (median, min, max over
    repeats, each repeat one product) and the timing statistics."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    flops = 2.0 * n * n * n
    with with_threads(threads):
        r = time_alternating({"sgemm": lambda: np.matmul(a, b, out=c)},
                             repeats=repeats, warmup=warmup, min_time=0.0)["sgemm"]
    return {
        "n": n,
        "threads": threads,
        "gflops": flops / r["median"] / 1e9,
        "gflops_best": flops / r["min"] / 1e9,
        "gflops_worst": flops / r["max"] / 1e9,
        "timing": r,
    }


def measure_copy_bandwidth(mib: int = 256, repeats: int = 7, warmup: int = 1) -> dict:
    """``np.copyto`` of a ``mib`` MiB float32 array into another; GB/s (1e9
    bytes) counting read + write (2 x size) per copy."""
    n = mib * (1 << 20) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.zeros(n, dtype=np.float32)  # touched: no page faults in timing
    nbytes = 2.0 * src.nbytes
    r = time_alternating({"copy": lambda: np.copyto(dst, src)},
                         repeats=repeats, warmup=warmup, min_time=0.0)["copy"]
    del src, dst
    return {
        "mib": mib,
        "gbps": nbytes / r["median"] / 1e9,
        "gbps_best": nbytes / r["min"] / 1e9,
        "gbps_worst": nbytes / r["max"] / 1e9,
        "timing": r,
    }


# --------------------------------------------------------------------------
# machine description
# --------------------------------------------------------------------------

def _cpuinfo() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": set()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return info
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    if m:
        info["model"] = m.group(1).strip()
    m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    if m:
        info["flags"] = set(m.group(1).split())
    m = re.search(r"^cpu MHz\s*:\s*(.+)$", text, re.M)
    if m:
        info["mhz"] = m.group(1).strip()
    for key, pat in (("vendor", r"^vendor_id\s*:\s*(\S+)"), ("family", r"^cpu family\s*:\s*(\d+)"),
                     ("model_id", r"^model\s*:\s*(\d+)")):
        m = re.search(pat, text, re.M)
        if m:
            info[key] = int(m.group(1)) if key != "vendor" else m.group(1)
    return info


# (family, first model, last model) -> core; a short list of server parts
_AMD_CORES = ((23, 0x00, 0x2f, "Zen/Zen+"), (23, 0x30, 0xff, "Zen 2"),
              (25, 0x00, 0x0f, "Zen 3"), (25, 0x10, 0x1f, "Zen 4"), (25, 0x20, 0x5f, "Zen 3"),
              (25, 0x60, 0xaf, "Zen 4"), (26, 0x00, 0xff, "Zen 5"))
_INTEL_CORES = {0x55: "Skylake-SP/Cascade Lake", 0x6a: "Ice Lake-SP", 0x6c: "Ice Lake-SP",
                0x8f: "Sapphire Rapids", 0xcf: "Emerald Rapids", 0xad: "Granite Rapids",
                0xae: "Granite Rapids", 0xaf: "Sierra Forest"}


def cpu_core(vendor, family, model) -> str | None:
    """The core's name (e.g. "Zen 5") from the CPUID family and model, for
    the x86 server parts this project meets; None when unknown."""
    if vendor == "AuthenticAMD" and family is not None and model is not None:
        for fam, lo, hi, name in _AMD_CORES:
            if family == fam and lo <= model <= hi:
                return name
    if vendor == "GenuineIntel" and family == 6:
        return _INTEL_CORES.get(model)
    return None


def cpu_name(info: Mapping) -> str:
    """"AMD EPYC (Zen 5, family 26 model 2)": the model name /proc/cpuinfo
    gives (a VM may hide the part number) with the core that its family
    and model identify."""
    fam, mod = info.get("cpu_family"), info.get("cpu_model_id")
    core = cpu_core(info.get("cpu_vendor"), fam, mod)
    ident = ", ".join(x for x in (core, None if fam is None else f"family {fam} model {mod}")
                      if x)
    return f"{info.get('cpu_model')}" + (f" ({ident})" if ident else "")


def _gfortran_version() -> str | None:
    exe = shutil.which("gfortran")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except Exception:
        return None
    return out.splitlines()[0].strip() if out else None


ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE",
            "OPENBLAS_L2_SIZE", "OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
            "OMP_PROC_BIND", "MKL_NUM_THREADS")


def thread_env() -> dict:
    """The environment variables that steer BLAS/OpenMP threading."""
    return {k: os.environ.get(k) for k in ENV_VARS}


def cpu_busy_fraction(interval: float = 0.5) -> float | None:
    """Fraction of all CPU time (user+system+steal, over all cores) that was
    busy during ``interval`` seconds while this process sleeps: a sign that
    other processes (or the hypervisor) are taking the cores."""
    def snap():
        with open("/proc/stat", encoding="ascii") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v[:8]), idle
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except Exception:
        return None
    dt = t1 - t0
    return None if dt <= 0 else max(0.0, 1.0 - (i1 - i0) / dt)


def cpu_times() -> tuple[int, int] | None:
    """(all CPU time, steal time) so far, in clock ticks over all cores, from
    /proc/stat; None where that is not readable."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
    except Exception:
        return None
    return sum(v[:8]), (v[7] if len(v) > 7 else 0)


def steal_fraction(before, after) -> float | None:
    """Share of CPU time the hypervisor gave to other guests between two
    :func:`cpu_times` readings ("st" in top). Several percent means the
    timings in between are slower than the machine can do."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


def sched_times() -> tuple[int, int] | None:
    """(CPU time, run-queue wait) in nanoseconds so far, summed over this
    process's live threads (/proc/self/task/*/schedstat; Linux with
    schedstats, else None). The wait is time a thread was runnable but
    another task had its core: over a timed block it says how much of the
    block other processes (or this one's own extra threads) took from it."""
    run = wait = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as fh:
                v = fh.read().split()
            run += int(v[0])
            wait += int(v[1])
        except (OSError, ValueError, IndexError):
            continue   # a thread that ended meanwhile
    return run, wait


def machine_info() -> dict:
    cpu = _cpuinfo()
    flags = cpu["flags"]
    info: dict = {
        "cpu_model": cpu["model"],
        "cpu_mhz": cpu.get("mhz"),
        "cpu_vendor": cpu.get("vendor"),
        "cpu_family": cpu.get("family"),
        "cpu_model_id": cpu.get("model_id"),
        "avx2": "avx2" in flags,
        "fma": "fma" in flags,
        "avx512f": "avx512f" in flags,
        "logical_cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "gfortran": _gfortran_version(),
        "env": thread_env(),
    }
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            info["loadavg"] = fh.read().split()[:3]
    except OSError:
        pass
    try:
        info["affinity_cores"] = len(os.sched_getaffinity(0))
    except Exception:
        pass
    if _tpc is not None:
        try:
            info["threadpools"] = [
                {k: (portable_path(p.get(k)) if k == "filepath" else p.get(k))
                 for k in ("user_api", "internal_api", "prefix", "version",
                           "num_threads", "architecture", "threading_layer", "filepath")}
                for p in _tpc.threadpool_info()
            ]
        except Exception as exc:  # pragma: no cover
            info["threadpools"] = f"threadpool_info failed: {exc!r}"
    else:
        info["threadpools"] = None
    return info


def format_machine_info(info: Mapping) -> str:
    lines = [
        f"CPU: {cpu_name(info)}  cores={info.get('logical_cores')} "
        f"avx2={info.get('avx2')} fma={info.get('fma')} avx512f={info.get('avx512f')}",
        f"Python {info.get('python')}  NumPy {info.get('numpy')}  "
        f"gfortran: {info.get('gfortran') or 'not found'}",
    ]
    env = {k: v for k, v in (info.get("env") or {}).items() if v is not None}
    lines.append("env: " + (", ".join(f"{k}={v}" for k, v in env.items()) or "(none set)"))
    pools = info.get("threadpools")
    if isinstance(pools, list):
        for p in pools:
            lines.append(
                f"pool: {p.get('user_api')}/{p.get('internal_api')} {p.get('version')} "
                f"threads={p.get('num_threads')} arch={p.get('architecture')} "
                f"{os.path.basename(str(p.get('filepath')))}")
    elif pools is None:
        lines.append("pool: threadpoolctl not importable")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable_path(path):
    """A path as results files record it: relative to the repository when it
    lies inside it (``benchmarks/plots/x.png``), from ``site-packages/`` on
    when it lies in an installed package (the machine's Python prefix is left
    out), else unchanged (system paths such as /usr/lib/...)."""
    if not path:
        return path
    full = os.path.abspath(str(path))
    if full == REPO or full.startswith(REPO + os.sep):
        return os.path.relpath(full, REPO)
    parts = full.split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return os.path.join(*parts[len(parts) - 1 - parts[::-1].index(marker):])
    return str(path)


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_jsonable(obj), fh, indent=2, sort_keys=False)
        fh.write("\n")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
                   align: Sequence[str] | None = None) -> str:
    """GitHub-flavoured Markdown table. ``align`` entries: 'l', 'r' or 'c'."""
    headers = [str(h) for h in headers]
    rows = [["" if c is None else str(c).replace("|", "\\|") for c in r] for r in rows]
    if align is None:
        align = ["l"] + ["r"] * (len(headers) - 1)
    sep = {"l": ":---", "r": "---:", "c": ":---:"}
    out = ["| " + " | ".join(headers) + " |",
           "| " + " | ".join(sep.get(a, "---") for a in align) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
               left: Sequence[int] = (0, 1, -1)) -> str:
    """Plain aligned table for the terminal; columns in ``left`` (indices,
    negative allowed) are left-aligned, the rest right-aligned."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    cols = [list(map(str, headers))] + rows
    ncol = len(headers)
    widths = [max(len(r[i]) for r in cols) for i in range(ncol)]
    lefts = {i % ncol for i in left}

    def fmt(r):
        return "  ".join(c.ljust(w) if i in lefts else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    lines = [fmt(list(map(str, headers))), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def write_markdown(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us" if s < 1e-4 else f"{s * 1e6:.0f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms" if s < 1e-2 else f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


if __name__ == "__main__":  # small self-test / machine report
    info = machine_info()
    print(format_machine_info(info))
    x = np.random.default_rng(0).standard_normal((64, 10), dtype=np.float32)
    r = time_alternating({"np.exp": lambda: np.exp(x), "np.max": lambda: x.max(axis=1)},
                         repeats=5)
    for k, v in r.items():
        print(f"{k:8s} {format_seconds(v['median'])}  inner={v['inner']}  "
              f"iqr={format_seconds(v['iqr'])}")
    for t in (1, default_threads()):
        c = measure_sgemm_ceiling(t, repeats=3)
        print(f"sgemm 2048 threads={t}: {c['gflops']:.1f} GFLOP/s "
              f"[{c['gflops_worst']:.1f}-{c['gflops_best']:.1f}]")
    bw = measure_copy_bandwidth(repeats=3)
    print(f"copy 256 MiB: {bw['gbps']:.1f} GB/s [{bw['gbps_worst']:.1f}-{bw['gbps_best']:.1f}]")
