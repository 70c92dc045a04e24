"""The benchmark harness's worker processes (benchmarks/harness.py, Workers).

The benchmarks' numbers are only as good as this machinery: each backend is
timed in a process of its own, and a failing or crashing candidate must show
up as an error for that candidate, not as a number or a hang.
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import harness  # noqa: E402


def factory(backend, delay):
    """Runs in the worker: "sleep" takes `delay` seconds for backend "slow"
    and returns at once otherwise (a margin no machine load can close);
    "fail" raises; "crash" ends the process."""
    if backend == "broken":
        raise RuntimeError("cannot build this backend")

    def get(name):
        if name == "sleep":
            if backend == "slow":
                return lambda: time.sleep(delay)
            return lambda: None
        if name == "pid":
            return lambda: os.getpid()
        if name == "fail":
            def fail():
                raise ValueError("bad kernel")
            return fail
        if name == "crash":
            return lambda: os._exit(3)
        raise KeyError(name)
    return get


def test_workers_time_each_backend_in_its_own_process():
    with harness.Workers(factory, ["slow", "fast"], threads=1, delay=0.05) as w:
        assert w.errors == {}
        stats, errors = w.time({"s": ("slow", "sleep"), "f": ("fast", "sleep")},
                               repeats=3, warmup=0, min_time=0.0)
        assert errors == {}
        assert stats["s"]["n_samples"] == 3 and stats["f"]["n_samples"] == 3
        # sleep(0.05) against a no-op: the order must come out right
        assert stats["s"]["median"] >= 0.049
        assert stats["f"]["median"] < stats["s"]["median"] / 3
        pids = {p.pid for p in w.procs.values()}
        assert len(pids) == 2 and os.getpid() not in pids


def test_worker_errors_are_reported_per_candidate():
    with harness.Workers(factory, ["fast", "broken"], delay=0.001) as w:
        assert "cannot build this backend" in w.errors["broken"]
        stats, errors = w.time({"ok": ("fast", "sleep"), "bad": ("fast", "fail"),
                                "missing": ("broken", "sleep"), "unknown": ("fast", "nope")},
                               repeats=2, warmup=0, min_time=0.0)
        assert set(stats) == {"ok"}
        assert "bad kernel" in errors["bad"]
        assert "cannot build" in errors["missing"]
        assert "KeyError" in errors["unknown"]


def test_a_crashing_worker_is_an_error_not_a_hang():
    with harness.Workers(factory, ["fast", "other"], delay=0.001) as w:
        stats, errors = w.time({"crash": ("fast", "crash"), "fine": ("other", "sleep")},
                               repeats=2, warmup=0, min_time=0.0)
        assert "died" in errors["crash"] or "gone" in errors["crash"]
        assert "fine" in stats


def env_factory(backend):
    """A worker that reports an environment variable as it started."""
    def get(name):
        return lambda: os.environ.get(name)
    return get


def test_workers_start_with_the_given_environment(monkeypatch):
    monkeypatch.setenv("PYKD_BENCH_GONE", "1")
    monkeypatch.delenv("PYKD_BENCH_SET", raising=False)
    with harness.Workers(env_factory, ["a"], env={"PYKD_BENCH_GONE": None,
                                                  "PYKD_BENCH_SET": "yes"}) as w:
        assert w.call("a", "PYKD_BENCH_GONE") is None
        assert w.call("a", "PYKD_BENCH_SET") == "yes"
    # the parent's environment is restored
    assert os.environ["PYKD_BENCH_GONE"] == "1" and "PYKD_BENCH_SET" not in os.environ


def test_worker_environment_undoes_imports_and_drops_blas_overrides(monkeypatch):
    """Synthetic start environment: the user set OMP_NUM_THREADS; an import
    then set GOMP_SPINCOUNT and changed OMP_NUM_THREADS; the session pins
    OpenBLAS's kernels."""
    start = {"OMP_NUM_THREADS": "2", "OPENBLAS_CORETYPE": "Haswell", "PATH": "/bin"}
    monkeypatch.setattr(harness, "initial_environ", lambda: dict(start))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = harness.worker_environment()
    assert env["OMP_NUM_THREADS"] == "2" and env["GOMP_SPINCOUNT"] is None
    assert env["OPENBLAS_CORETYPE"] is None and env["OPENBLAS_L2_SIZE"] is None
    assert "OMP_WAIT_POLICY" not in env and "PATH" not in env
    kept = harness.worker_environment(keep_blas_overrides=True)
    assert "OPENBLAS_CORETYPE" not in kept and kept["GOMP_SPINCOUNT"] is None


def test_initial_environ_and_sched_times_read_proc():
    start = harness.initial_environ()
    if start is None:          # not Linux
        return
    assert start.get("PATH") == os.environ.get("PATH") or "PATH" in start
    st = harness.sched_times()
    assert st is None or (st[0] > 0 and st[1] >= 0)
    assert harness._processes_cpu_ns([os.getpid()]) > 0
    assert harness._processes_cpu_ns([-1]) == 0


def test_cpu_core_names():
    assert harness.cpu_core("AuthenticAMD", 26, 2) == "Zen 5"
    assert harness.cpu_core("AuthenticAMD", 25, 0x01) == "Zen 3"
    assert harness.cpu_core("AuthenticAMD", 25, 0x11) == "Zen 4"
    assert harness.cpu_core("AuthenticAMD", 23, 0x31) == "Zen 2"
    assert harness.cpu_core("GenuineIntel", 6, 0x8f) == "Sapphire Rapids"
    assert harness.cpu_core("GenuineIntel", 6, 0x01) is None
    assert harness.cpu_core(None, None, None) is None
    info = {"cpu_model": "AMD EPYC", "cpu_vendor": "AuthenticAMD", "cpu_family": 26,
            "cpu_model_id": 2}
    assert harness.cpu_name(info) == "AMD EPYC (Zen 5, family 26 model 2)"
    assert harness.cpu_name({"cpu_model": "aarch64"}) == "aarch64"
