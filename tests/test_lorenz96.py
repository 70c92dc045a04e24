"""examples/lorenz96 in seconds: ``run.sh --quick`` end to end (the two-scale
truth in Fortran, training with pykd's regression API, the one-scale Fortran
model calling every network through pykd_predict in an OpenMP ensemble), then
checks of what it built against independent NumPy re-implementations.

The example links the Fortran library of this checkout's ``build/fortran``
(``make test-fortran``), installed into a temporary stage with ``meson
install --destdir`` and found through its relocatable pykd.pc, as a user
would; without that build, or without gfortran, the tests are skipped.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import pykd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "lorenz96")
BUILD = os.path.join(REPO, "build", "fortran")
K, J, F, H, B, C = 8, 32, 20.0, 1.0, 10.0, 10.0
DT, DT_TRUTH = 0.005, 0.001
RUNS = ("none", "poly", "teacher", "student", "student_scratch", "student_int8", "student_pruned")


def _meson():
    try:
        import mesonbuild  # noqa: F401
        return [sys.executable, "-m", "mesonbuild.mesonmain"]
    except ImportError:
        return [shutil.which("meson")] if shutil.which("meson") else None


pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(BUILD, "build.ninja")) or shutil.which("gfortran") is None
    or _meson() is None or shutil.which("pkg-config") is None,
    reason="needs gfortran, pkg-config, meson and the Fortran-only build in build/fortran "
           "(`make test-fortran`)")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The work directory of one ``run.sh --quick``."""
    root = tmp_path_factory.mktemp("lorenz96")
    stage = root / "stage"
    subprocess.run(_meson() + ["install", "-C", BUILD, "--destdir", str(stage), "--no-rebuild",
                               "--quiet"], check=True, capture_output=True)
    pc = glob.glob(str(stage / "**" / "pykd.pc"), recursive=True)
    assert len(pc) == 1, pc
    env = dict(os.environ, PKG_CONFIG_PATH=os.path.dirname(pc[0]), PYTHON=sys.executable,
               PYKD_L96_DIR=str(root / "work"), OMP_NUM_THREADS="2")
    p = subprocess.run(["sh", os.path.join(EXAMPLE, "run.sh"), "--quick"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"run.sh --quick failed:\n{p.stdout}\n{p.stderr}"
    return {"work": root / "work", "stdout": p.stdout, "env": env}


def _results(quick):
    with open(quick["work"] / "results.json", encoding="utf-8") as fh:
        return json.load(fh)


def _run(res, label):
    return next(r for r in res["runs"] if r["label"] == label)


# ---------------------------------------------------------------- NumPy twins

def drift(x):
    """-X_{k-1} (X_{k-2} - X_{k+1}) - X_k + F, periodic, in l96.f90's order."""
    return -np.roll(x, 1) * (np.roll(x, 2) - np.roll(x, -1)) - x + F


def stencil(x):
    return np.ascontiguousarray(np.stack([np.roll(x, -d) for d in (-2, -1, 0, 1, 2)], axis=1),
                                dtype=np.float32)


def one_scale_rk4(x, model, steps):
    """The one-scale model with the network closure, every state."""
    def f(s):
        return drift(s) + model.forward(stencil(s))[:, 0].astype(np.float64)
    out = []
    for _ in range(steps):
        k1 = f(x)
        k2 = f(x + (0.5 * DT) * k1)
        k3 = f(x + (0.5 * DT) * k2)
        k4 = f(x + DT * k3)
        x = x + (DT / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        out.append(x)
    return np.array(out)


def two_scale_tendency(x, y):
    u = -(H * C / B) * y.reshape(K, J).sum(axis=1)
    dx = drift(x) + u
    dy = (-C * B * np.roll(y, -1) * (np.roll(y, -2) - np.roll(y, 1)) - C * y
          + (H * C / B) * np.repeat(x, J))
    return dx, dy, u


def two_scale_rk4(x, y, dt):
    kx1, ky1, _ = two_scale_tendency(x, y)
    kx2, ky2, _ = two_scale_tendency(x + 0.5 * dt * kx1, y + 0.5 * dt * ky1)
    kx3, ky3, _ = two_scale_tendency(x + 0.5 * dt * kx2, y + 0.5 * dt * ky2)
    kx4, ky4, _ = two_scale_tendency(x + dt * kx3, y + dt * ky3)
    return (x + dt / 6 * (kx1 + 2 * kx2 + 2 * kx3 + kx4),
            y + dt / 6 * (ky1 + 2 * ky2 + 2 * ky3 + ky4))


def run_forecast(quick, out, closures, *, members, stride, leads, threads="2", real32=False):
    """l96_forecast on the quick run's truth with a namelist of our own."""
    out.mkdir(exist_ok=True)
    work = quick["work"]
    specs = ", ".join(f"'{c}'" for c in closures)
    nml = out / "f.nml"
    nml.write_text(f"""&forecast
  truth_dir = '{work}', out_dir = '{out}', closures = {specs}
  dt = {DT}, test_interval = {DT}, dt_truth = {DT_TRUTH}
  n_members = {members}, member_stride = {stride}, lead_steps = {", ".join(map(str, leads))}
  climate_members = 0, timing_mtu = 0.01, timing_repeats = 1
  real32_entry = {".true." if real32 else ".false."}
/
""")
    env = dict(quick["env"], OMP_NUM_THREADS=threads)
    return subprocess.run([str(work / "bin" / "l96_forecast"), str(nml)], env=env,
                          capture_output=True, text=True, timeout=120)


def truth_series(quick, name):
    return np.fromfile(quick["work"] / name, dtype="<f8").reshape(-1, K)


# ---------------------------------------------------------------------- tests

def test_quick_run_writes_every_table(quick):
    res = _results(quick)
    assert [r["label"] for r in res["runs"]] == list(RUNS)
    md = (quick["work"] / "results.md").read_text()
    assert md in quick["stdout"]                   # run.sh printed the tables
    for label in RUNS:
        assert f"| {label} |" in md
    for r in res["runs"]:
        # compare.py recomputes the forecast errors from the raw forecasts.
        np.testing.assert_allclose([f["rmse"] for f in r["forecast"]],
                                   r["forecast_rmse_fortran"], rtol=1e-12)
        assert r["cpu_ms_per_mtu"] > 0
        if r["label"] != "none":
            assert r["n_blown_up"] == 0, r["label"]
            assert r["climate"] is not None and np.isfinite(r["climate"]["std"])
    assert res["truth"]["cpu_ms_per_mtu"] > 0
    kinds = {m["label"]: m["layers"] for m in res["train"]["models"]}
    assert "dense_int8" in kinds["student_int8"] and "sparse_csr" in kinds["student_pruned"]


def test_network_closures_beat_no_parameterisation(quick):
    res = _results(quick)
    none = _run(res, "none")["forecast"]
    for label in ("teacher", "student", "student_int8", "student_pruned"):
        fc = _run(res, label)["forecast"]
        assert all(f["rmse"] < g["rmse"] for f, g in zip(fc, none)), label
        # At the first lead the two bootstrap intervals do not even overlap.
        assert fc[0]["high"] < none[0]["low"], label
    offline = {m["label"]: m for m in res["train"]["models"]}
    assert offline["student"]["test_r2"] > 0.8
    assert offline["student"]["parameters"] < offline["teacher"]["parameters"]


def test_fortran_ensemble_matches_numpy_twin(quick, tmp_path):
    """20 RK4 steps of the one-scale model driven by the int8 student (its
    bits do not depend on the batch) and the float32 student, Fortran against
    the NumPy twin calling the same network through pykd."""
    truth = truth_series(quick, "test_X.f64")
    leads = list(range(1, 21))
    for label in ("student_int8", "student"):
        path = quick["work"] / f"{label}.pykd"
        p = run_forecast(quick, tmp_path / label, [f"net:{path}"], members=4, stride=150,
                         leads=leads)
        assert p.returncode == 0, p.stderr
        fc = np.fromfile(tmp_path / label / f"forecast_{label}.f64").reshape(4, len(leads), K)
        model = pykd.load_model(str(path))
        for m in range(4):
            ref = one_scale_rk4(truth[m * 150].copy(), model, len(leads))
            np.testing.assert_allclose(fc[m], ref, rtol=1e-12, atol=1e-12,
                                       err_msg=f"{label}, member {m}")


def test_real32_entry_and_thread_count_give_the_same_bits(quick, tmp_path):
    path = quick["work"] / "student.pykd"
    outs = []
    for name, threads, real32 in (("a", "2", False), ("b", "1", False), ("c", "2", True)):
        p = run_forecast(quick, tmp_path / name, [f"net:{path}"], members=12, stride=100,
                         leads=[10, 40, 100], threads=threads, real32=real32)
        assert p.returncode == 0, p.stderr
        outs.append((tmp_path / name / "forecast_student.f64").read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_two_scale_truth_matches_numpy(quick):
    """The first training samples of l96_truth against NumPy's RK4 from the
    state it saved (20 steps of dt = 0.001 between samples)."""
    s0 = np.fromfile(quick["work"] / "state0.f64")
    x, y = s0[:K].copy(), s0[K:].copy()
    tx, tu = truth_series(quick, "train_X.f64"), truth_series(quick, "train_U.f64")
    np.testing.assert_array_equal(tx[0], x)
    for sample in range(1, 4):
        for _ in range(20):
            x, y = two_scale_rk4(x, y, DT_TRUTH)
        np.testing.assert_allclose(tx[sample], x, rtol=1e-11, atol=1e-11)
        np.testing.assert_allclose(tu[sample], two_scale_tendency(x, y)[2], rtol=1e-11,
                                   atol=1e-11)


def test_forecast_reports_a_bad_closure(quick, tmp_path):
    p = run_forecast(quick, tmp_path / "bad", [f"net:{tmp_path}/missing.pykd"], members=2,
                     stride=10, leads=[1])
    assert p.returncode != 0 and "missing.pykd" in p.stderr
    p = run_forecast(quick, tmp_path / "bad2", ["cubic"], members=2, stride=10, leads=[1])
    assert p.returncode != 0 and "expected none, poly or net:PATH" in p.stderr
    bad = tmp_path / "wide.pykd"
    pykd.MLP([4, 3, 1], seed=0).save(str(bad))
    p = run_forecast(quick, tmp_path / "bad3", [f"net:{bad}"], members=2, stride=10, leads=[1])
    assert p.returncode != 0 and "needs 5 inputs and 1 output" in p.stderr
