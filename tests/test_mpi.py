"""Data-parallel training and soft labels over MPI (issue 16), run with
``mpirun -np 2 --oversubscribe`` on tiny problems: 2 ranks against one
process (SGD parameters to 1e-4, Adam losses to 1e-5), bit-identical reruns
and ranks, resume, a rank that raises, a timeout, a bad argument on one
rank, diverged ranks, and the CLI (train-teacher, distill, soft-labels).

mpirun and mpi4py come from tools/setup.sh; without them these tests skip,
except in CI (CI=true), where they fail."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from pykd import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "mpi_driver.py")


def _missing():
    if shutil.which("mpirun") is None:
        return "mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install --no-binary mpi4py mpi4py)"
    return None


MISSING = _missing()
if MISSING and os.environ.get("CI"):
    raise RuntimeError(f"the MPI tests must run in CI, but {MISSING}: see tools/setup.sh")
pytestmark = [pytest.mark.fortran,
              pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


def mpirun(args, np_=2, timeout=60, env=None):
    """Run ``args`` on np_ ranks; returns the CompletedProcess."""
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    # Shared memory between the ranks of this one machine; one thread each.
    cmd += ["--mca", "btl", "self,vader", "-x", "OMP_NUM_THREADS=1"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout,
                          env=full_env, stdin=subprocess.DEVNULL)


def alone(args, timeout=60):
    env = {k: v for k, v in os.environ.items() if k not in distributed.SIZE_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def driver(scenario, out, ranks=2, timeout=60):
    run = mpirun([sys.executable, DRIVER, scenario, str(out)], timeout=timeout) if ranks > 1 \
        else alone([sys.executable, DRIVER, scenario, str(out)], timeout=timeout)
    return run


def load(out, scenario, rank):
    with np.load(os.path.join(out, f"{scenario}.rank{rank}.npz")) as z:
        return dict(z)


@pytest.fixture(scope="module")
def fit_runs(tmp_path_factory):
    """The fit scenarios on one process, and twice on 2 ranks."""
    dirs = {k: tmp_path_factory.mktemp(k) for k in ("one", "two", "again")}
    for key, ranks in (("one", 1), ("two", 2), ("again", 2)):
        r = driver("fit", dirs[key], ranks)
        assert r.returncode == 0, r.stderr
    return {k: [load(d, "fit", rank) for rank in range(1 if k == "one" else 2)]
            for k, d in dirs.items()}


def test_sgd_parameters_match_one_process(fit_runs):
    one, two = fit_runs["one"][0], fit_runs["two"][0]
    assert len(one["sgd.losses"]) == 24                     # 3 epochs x 8 steps
    np.testing.assert_allclose(two["sgd.params"], one["sgd.params"], rtol=1e-4, atol=1e-6)
    assert np.abs(one["sgd.params"] - two["sgd.params"]).max() < 1e-4 * np.abs(
        one["sgd.params"]).max()


def test_adam_losses_match_one_process(fit_runs):
    one, two = fit_runs["one"][0], fit_runs["two"][0]
    np.testing.assert_allclose(two["adam.losses"], one["adam.losses"], rtol=1e-5)
    np.testing.assert_array_equal(two["adam.acc"], one["adam.acc"])


def test_dropout_hint_kd_pruning_and_regression_match_one_process(fit_runs):
    """Dropout drawn by global position: the same masks on 2 ranks."""
    one, two = fit_runs["one"][0], fit_runs["two"][0]
    for name in ("kd-dropout-hint", "prune", "mse"):
        np.testing.assert_allclose(two[f"{name}.losses"], one[f"{name}.losses"], rtol=1e-4)
        np.testing.assert_allclose(two[f"{name}.params"], one[f"{name}.params"], rtol=1e-3,
                                   atol=1e-5)
    zero1, zero2 = one["prune.params"] == 0, two["prune.params"] == 0
    assert zero1.mean() > 0.3 and (zero1 != zero2).mean() < 0.01


def test_rank_0s_on_epoch_decision_stops_every_rank(fit_runs):
    for res in fit_runs["one"] + fit_runs["two"]:
        assert len(res["stop.acc"]) == 2
    np.testing.assert_allclose(fit_runs["two"][1]["stop.losses"],
                               fit_runs["one"][0]["stop.losses"], rtol=1e-5)


def test_every_rank_holds_the_same_bits_and_reruns_repeat(fit_runs):
    two, again = fit_runs["two"], fit_runs["again"]
    for key in two[0]:
        np.testing.assert_array_equal(two[1][key], two[0][key], err_msg=key)
        np.testing.assert_array_equal(again[0][key], two[0][key], err_msg=key)


def test_resume_with_two_ranks(fit_runs):
    """One epoch with a checkpoint, resumed to three: the bits of the
    uninterrupted 2-rank run."""
    for res in fit_runs["two"]:
        np.testing.assert_array_equal(res["resumed.params"], res["adam.params"])
        assert list(res["resumed.epochs"]) == [1, 2, 3]


def test_a_rank_that_raises_stops_the_job(tmp_path):
    t = time.monotonic()
    r = driver("raise", tmp_path)
    assert r.returncode != 0
    assert "rank one fails on purpose" in r.stderr
    assert "rank 1 of 2" in r.stderr
    assert time.monotonic() - t < 30          # not the 60 s timeout


def test_a_stalled_rank_times_out_with_exit_code_3(tmp_path):
    t = time.monotonic()
    r = driver("timeout", tmp_path)
    assert r.returncode == distributed.EXIT_TIMEOUT, r.stderr
    assert "did not complete within the MPI timeout of 1 s" in r.stderr
    assert time.monotonic() - t < 25


def test_a_bad_argument_on_one_rank_and_diverged_ranks_fail_on_every_rank(tmp_path):
    r = driver("errors", tmp_path)
    assert r.returncode == 2, r.stderr
    import re
    msgs = re.findall(r"rank ([01]): ValueError: (.*?got 0)", r.stderr)
    assert sorted(r for r, _ in msgs) == ["0", "1"], r.stderr       # raised on both ranks
    assert len({m for _, m in msgs}) == 1 and "batch_size" in msgs[0][1]   # one message
    assert r.stderr.count("differ across MPI ranks (rank 1 against rank 0)") == 2, r.stderr


# ---------------------------------------------------------------- the CLI

PYKD = [sys.executable, "-m", "pykd"]
TRAIN = ["--hidden", "16", "--epochs", "1", "--batch-size", "256", "--optimizer", "sgd", "--lr", "0.05",
         "--quiet"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """5000 rows (two soft-label batches of 4096), 10 features, 3 classes,
    and a teacher trained on them by one process (with its report)."""
    d = tmp_path_factory.mktemp("mpi-cli")
    rng = np.random.default_rng(5)
    X = rng.standard_normal((5200, 10)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)
    np.savez(d / "data.npz", X_train=X[:5000], y_train=y[:5000], X_test=X[5000:],
             y_test=y[5000:])
    r = alone(PYKD + ["train-teacher", "--data", str(d / "data.npz"), *TRAIN, "--out",
                      str(d / "one.pykd"), "--report", str(d / "one.json")])
    assert r.returncode == 0, r.stderr
    return d


def test_cli_train_teacher_on_two_ranks(cli, tmp_path):
    out = tmp_path / "two.pykd"
    r = mpirun(PYKD + ["train-teacher", "--data", str(cli / "data.npz"), *TRAIN, "--out",
                       str(out), "--report", str(tmp_path / "two.json")])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("teacher: test accuracy") == 1          # rank 0 alone
    rep, one = (json.loads(p.read_text()) for p in (tmp_path / "two.json", cli / "one.json"))
    assert rep["ranks"] == 2 and one["ranks"] == 1
    assert len(rep["models"][0]["seconds_per_epoch"]) == 1
    assert sorted(os.listdir(tmp_path)) == ["two.json", "two.pykd", "two.pykd.ckpt.npz"]
    import pykd
    a, b = pykd.load_model(cli / "one.pykd"), pykd.load_model(out)
    np.testing.assert_allclose(b.params, a.params, rtol=1e-4, atol=1e-6)
    assert rep["models"][0]["test_accuracy"] == pytest.approx(
        one["models"][0]["test_accuracy"], abs=0.01)


def test_cli_soft_labels_shards_equal_one_process(cli, tmp_path):
    """Each rank's rows written into one .npy: the bits of one process
    (computed here, on one thread like the ranks)."""
    from threadpoolctl import threadpool_limits
    import pykd
    out = tmp_path / "logits.npy"
    r = mpirun(PYKD + ["soft-labels", "--data", str(cli / "data.npz"), "--teacher",
                       str(cli / "one.pykd"), "--out", str(out), "--quiet", "--report",
                       str(tmp_path / "r.json")])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("soft labels: 5000 x 3") == 1 and "on 2 MPI ranks" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["ranks"] == 2
    got = np.load(out)
    with threadpool_limits(1):
        want = pykd.soft_labels(pykd.load_model(cli / "one.pykd"),
                                np.load(cli / "data.npz")["X_train"])
    assert got.shape == (5000, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert sorted(os.listdir(tmp_path)) == ["logits.npy", "r.json"]     # no temporary left


def test_cli_distill_and_resume_on_two_ranks(cli, tmp_path):
    """distill from the teacher (soft labels gathered from the 2 ranks): 1
    epoch, then --resume to 2; the second run continues the first."""
    base = PYKD + ["distill", "--data", str(cli / "data.npz"), "--teacher",
                   str(cli / "one.pykd"), "--hidden", "8", "--batch-size", "256", "--quiet",
                   "--out", str(tmp_path / "s.pykd"), "--report", str(tmp_path / "r.json")]
    r = mpirun(base + ["--epochs", "1"])
    assert r.returncode == 0, r.stderr
    first = json.loads((tmp_path / "r.json").read_text())["models"][0]["history"]
    r = mpirun(base + ["--epochs", "2", "--resume"])
    assert r.returncode == 0, r.stderr
    hist = json.loads((tmp_path / "r.json").read_text())["models"][0]["history"]
    assert hist["epoch"] == [1, 2] and hist["loss"][0] == first["loss"][0]
    assert hist["loss"][1] < hist["loss"][0]


def test_cli_bad_argument_fails_on_every_rank_with_one_line(tmp_path):
    r = mpirun(PYKD + ["train-teacher", "--data", str(tmp_path / "missing.npz"), *TRAIN,
                       "--out", str(tmp_path / "t.pykd")])
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if "pykd train-teacher: error:" in ln]
    assert len(errors) == 1 and "missing.npz" in errors[0], r.stderr


def test_cli_mpi_timeout_option_and_commands_without_mpi(tmp_path):
    r = alone(PYKD + ["train-teacher", "--mpi-timeout", "0", "--out", str(tmp_path / "t")])
    assert r.returncode == 2 and "--mpi-timeout" in r.stderr
    r = mpirun(PYKD + ["evaluate", "--model", str(tmp_path / "m.pykd")])
    assert r.returncode == 2
    assert r.stderr.count("pykd evaluate does not run under MPI") == 1, r.stderr
