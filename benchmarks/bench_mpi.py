"""2 MPI ranks x 1 thread against 1 process x 2 threads on this machine
(issue 16; results in docs/distributed.md).

For the teacher 784-1200-1200-10 and the student 784-200-200-10 at a global
batch of 64 (Adam, cross-entropy, Fashion-MNIST-shaped random data), a
subset of an epoch's 938 batches is timed and the epoch extrapolated
(median step x 938):

* ``fortran``: the Fortran MPI build's driver ``bench_mpi_step``
  (benchmarks/mpi/, built by ``make test-fortran`` into build/fortran-mpi):
  ``mpirun -np 2`` with ``pykd_mpi_train_step``, whose parts (the shard
  gradient, the sum of the gradients, the update) are also timed
  separately, against one process calling ``mlp_train_step`` with 2
  OpenMP/BLAS threads;
* ``python`` (when ``pykd.fit`` takes ``comm``): ``fit(comm=MPI.COMM_WORLD)``
  under ``mpirun -np 2`` against ``fit`` in one process with 2 threads;
  the time spent in the gradient sum (``pykd.distributed.Comm.sum``) is
  measured by wrapping it.

The runs alternate (A B, B A, ...) and medians are reported with the CPU,
the BLAS and the load average. Open MPI runs with ``--oversubscribe --mca
mpi_yield_when_idle 1`` (a rank waiting in a collective yields its core:
on a shared 2-core machine a spinning rank takes the core its partner
needs).

    python benchmarks/bench_mpi.py [--reps 5] [--out results.json] [--modes fortran,python]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES_PER_EPOCH = 938              # ceil(60000 / 64)
MPIRUN = ["mpirun", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1"]

PY_WORKER = r"""
import json, sys, time
import numpy as np
import pykd
net, steps, use_mpi = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "mpi"
sizes = [784, 1200, 1200, 10] if net == "teacher" else [784, 200, 200, 10]
comm = None
sum_time = [0.0, 0]
if use_mpi:
    from mpi4py import MPI
    import pykd.distributed as dist
    comm = MPI.COMM_WORLD
    orig = dist.Comm.sum
    def timed(self, *a, **kw):
        t = time.perf_counter()
        try:
            return orig(self, *a, **kw)
        finally:
            sum_time[0] += time.perf_counter() - t
            sum_time[1] += 1
    dist.Comm.sum = timed
rng = np.random.default_rng(0)
n = 64 * steps
X = rng.random((n, 784), dtype=np.float32)
y = rng.integers(0, 10, n)
m = pykd.MLP(sizes, seed=0)
pykd.fit(m, X[:64 * 3], y[:64 * 3], progress=False, comm=comm)       # warm-up
sum_time[:] = [0.0, 0]
h = pykd.fit(m, X, y, progress=False, comm=comm)
rank = comm.Get_rank() if comm is not None else 0
if rank == 0:
    print(json.dumps({"step_ms": 1e3 * h["seconds"][0] / steps,
                      "sum_ms": 1e3 * sum_time[0] / max(sum_time[1], 1) if use_mpi else None,
                      "sums": sum_time[1]}))
"""


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_name():
    try:
        v = subprocess.run(["pkg-config", "--modversion", "openblas"], capture_output=True,
                           text=True).stdout.strip()
        return f"OpenBLAS {v} (Debian, pthreads build, linked by the Fortran library)" if v else "BLAS"
    except OSError:
        return "BLAS"


def env_for(threads):
    e = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
             OMP_WAIT_POLICY="passive", OMPI_ALLOW_RUN_AS_ROOT="1",
             OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return e


def ensure_build(build):
    exe = os.path.join(build, "benchmarks", "mpi", "bench_mpi_step")
    if not os.path.exists(exe):
        meson = [sys.executable, "-m", "mesonbuild.mesonmain"]
        if not os.path.exists(os.path.join(build, "build.ninja")):
            subprocess.run(meson + ["setup", build, "-Dpython=false", "-Dmpi=true"], cwd=REPO,
                           check=True, stdout=subprocess.DEVNULL)
        subprocess.run(meson + ["compile", "-C", build, "bench_mpi_step"], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    return exe


def parse(line):
    return {k: float(v) for k, v in re.findall(r"(\w+_ms)\s+([-\d.]+)", line)}


def run_fortran(exe, net, steps, ranks):
    if ranks == 1:
        cmd = MPIRUN + ["-np", "1", exe, net, str(steps), "single"]
        threads = 2
    else:
        cmd = MPIRUN + ["-np", str(ranks), exe, net, str(steps), "mpi"]
        threads = 1
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_for(threads), timeout=1800)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return parse(r.stdout.strip().splitlines()[-1])


def run_python(net, steps, ranks):
    cmd = [sys.executable, "-c", PY_WORKER, net, str(steps)]
    if ranks == 1:
        cmd, threads = cmd + ["single"], 2
    else:
        cmd, threads = MPIRUN + ["-np", str(ranks)] + cmd + ["mpi"], 1
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_for(threads), timeout=1800,
                       cwd=tempfile.gettempdir())
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{r.stdout}\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def python_has_comm():
    r = subprocess.run([sys.executable, "-c", "import inspect, pykd, mpi4py; "
                        "print('comm' in inspect.signature(pykd.fit).parameters)"],
                       capture_output=True, text=True, cwd=tempfile.gettempdir())
    return r.stdout.strip() == "True"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--teacher-steps", type=int, default=40)
    ap.add_argument("--student-steps", type=int, default=200)
    ap.add_argument("--modes", default="fortran,python")
    ap.add_argument("--build", default=os.path.join(REPO, "build", "fortran-mpi"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if shutil.which("mpirun") is None:
        raise SystemExit("mpirun not found (tools/setup.sh installs openmpi-bin)")
    modes = args.modes.split(",")
    if "python" in modes and not python_has_comm():
        print("python: pykd.fit has no comm argument (or mpi4py is missing): skipped")
        modes.remove("python")
    exe = ensure_build(args.build) if "fortran" in modes else None
    load0 = os.getloadavg()
    results = {"cpu": cpu_name(), "blas": blas_name(), "load_before": load0, "runs": []}
    for rep in range(args.reps):
        for net, steps in (("teacher", args.teacher_steps), ("student", args.student_steps)):
            order = (2, 1) if rep % 2 == 0 else (1, 2)
            for mode in modes:
                for ranks in order:
                    r = (run_fortran(exe, net, steps, ranks) if mode == "fortran"
                         else run_python(net, steps, ranks))
                    r.update(mode=mode, net=net, ranks=ranks, steps=steps, rep=rep,
                             load=os.getloadavg()[0])
                    results["runs"].append(r)
                    print(json.dumps(r), flush=True)
    results["load_after"] = os.getloadavg()
    print(f"\nCPU: {results['cpu']}; BLAS: {results['blas']}; load average before "
          f"{load0[0]:.1f}, after {results['load_after'][0]:.1f} (2 cores)")
    print(f"medians over {args.reps} alternating runs; epoch = median step x {BATCHES_PER_EPOCH} "
          "(timed on a subset of batches)")
    print(f"{'mode':8s} {'net':8s} {'layout':14s} {'step ms':>8s} {'epoch s':>8s} "
          f"{'sum ms':>7s} {'sum share':>9s}")
    for mode in modes:
        for net in ("teacher", "student"):
            for ranks in (1, 2):
                rs = [r for r in results["runs"] if (r["mode"], r["net"], r["ranks"]) == (mode, net, ranks)]
                if not rs:
                    continue
                step = statistics.median(r["step_ms"] for r in rs)
                sums = [r["sum_ms"] for r in rs if r.get("sum_ms") is not None]
                s = statistics.median(sums) if sums else None
                share = (statistics.median(r["sum_ms"] / (r.get("parts_ms") or r["step_ms"])
                                           for r in rs) if sums else None)
                layout = "2 ranks x 1 th" if ranks == 2 else "1 proc x 2 th"
                print(f"{mode:8s} {net:8s} {layout:14s} {step:8.2f} {step * BATCHES_PER_EPOCH / 1e3:8.2f} "
                      + (f"{s:7.2f} {100 * share:8.1f}%" if s is not None else f"{'-':>7s} {'-':>9s}"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
