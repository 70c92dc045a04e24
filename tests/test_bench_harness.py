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
