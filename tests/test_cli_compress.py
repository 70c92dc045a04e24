"""The compression commands end to end on tiny synthetic data: ``pykd prune``,
``quantize``, ``lowrank``, ``cluster``, ``compress --recipe``, ``report`` and
the compression table of ``pykd demo --quick``. Run in-process through
:func:`pykd.cli.main`; every model written is loaded back and checked against
:func:`pykd.evaluate` computed here."""
import json
import os
import sys

import numpy as np
import pytest

import pykd
from pykd import cli
from pykd.models import MLP, load_model
from pykd.train import evaluate

pytestmark = pytest.mark.fortran

N_TRAIN, N_TEST, N_FEAT, N_CLASSES = 240, 80, 12, 5


def _blobs(n, seed):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).uniform(0.2, 0.8, (N_CLASSES, N_FEAT))
    y = rng.integers(0, N_CLASSES, n)
    y[:N_CLASSES] = np.arange(N_CLASSES)
    X = centres[y] + 0.1 * rng.standard_normal((n, N_FEAT))
    return X.astype(np.float32), y.astype(np.int64)


def _run(args, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("clicompress")
    X, y = _blobs(N_TRAIN, 1)
    Xt, yt = _blobs(N_TEST, 2)
    np.savez(d / "data.npz", X_train=X, y_train=y, X_test=Xt, y_test=yt)
    data = str(d / "data.npz")
    assert cli.main(["train-teacher", "--hidden", "32", "--epochs", "3", "--data", data,
                     "--out", str(d / "t.pykd"), "--quiet"]) == 0
    assert cli.main(["distill", "--teacher", str(d / "t.pykd"), "--hidden", "24,16",
                     "--epochs", "4", "--data", data, "--out", str(d / "s.pykd"),
                     "--quiet"]) == 0
    assert cli.main(["soft-labels", "--teacher", str(d / "t.pykd"), "--data", data,
                     "--out", str(d / "tl.npy"), "--quiet"]) == 0
    return d


def _test_split(work):
    z = np.load(work / "data.npz")
    return z["X_test"], z["y_test"]


# ------------------------------------------------------------- commands

CASES = [
    (["prune", "--sparsity", "0.7"], {"sparse_csr", "dense"}),
    (["prune", "--sparsity", "0.8", "--scope", "layer", "--schedule", "gradual",
      "--epochs", "2", "--teacher", "t.pykd"], {"sparse_csr", "dense"}),
    (["prune", "--sparsity", "0.5", "--structured", "--epochs", "1"], {"dense"}),
    (["quantize"], {"dense_int8"}),
    (["quantize", "--static", "--calibrate", "50", "--calibration", "percentile",
      "--percentile", "99.5"], {"dense_int8"}),
    (["quantize", "--qat", "--epochs", "1", "--teacher-logits", "tl.npy"], {"dense_int8"}),
    (["lowrank", "--rank", "3"], {"low_rank", "dense"}),
    (["lowrank", "--energy", "0.6", "--epochs", "1", "--teacher", "t.pykd",
      "--lr", "1e-3"], {"low_rank", "dense"}),
    (["cluster", "--bits", "3", "--epochs", "1", "--teacher-logits", "tl.npy"], {"codebook"}),
]


@pytest.mark.parametrize("args, kinds", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_command_writes_a_model_the_report_measures(work, capsys, args, kinds, tmp_path):
    args = [str(work / a) if a in ("t.pykd", "tl.npy") else a for a in args]
    out = tmp_path / "out.pykd"
    rc, stdout, err = _run([*args, "--model", work / "s.pykd", "--out", out,
                            "--data", work / "data.npz", "--quiet"], capsys)
    assert rc == 0, err
    assert f"-> {out}" in stdout and "test accuracy" in stdout
    assert not [f for f in os.listdir(tmp_path) if f != "out.pykd"]   # no temporary left
    model = load_model(out)
    got = set(model.to_model().kinds)
    assert got <= kinds and got & (kinds - {"dense"} or {"dense"}), got
    X, y = _test_split(work)
    student = load_model(work / "s.pykd")
    acc = evaluate(model, X, y)["accuracy"]
    assert f"-> {100 * acc:.2f}%" in stdout
    agree = float((model.predict(X) == student.predict(X)).mean())
    rc, _, err = _run(["report", work / "s.pykd", out, "--data", work / "data.npz",
                       "--json", tmp_path / "r.json", "--repeats", "2", "--quiet"], capsys)
    assert rc == 0, err
    rows = json.loads((tmp_path / "r.json").read_text())["models"]
    assert rows[1]["test_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert rows[1]["agreement"] == pytest.approx(agree, abs=1e-12)
    assert rows[0]["agreement"] == 1.0
    assert rows[1]["bytes_on_disk"] == os.path.getsize(out)
    assert rows[1]["nonzeros"] == model.nonzeros
    steps = model.metadata["compression"]
    tuned = [s for s in steps if "history" in s or "fine_tune" in s]
    epochs = int(args[args.index("--epochs") + 1]) if "--epochs" in args else 0
    if epochs:
        (step,) = tuned
        assert len(step["history"]["epoch"]) == epochs
    else:
        assert not tuned, steps


def test_pruned_model_saved_sparse_and_smaller(work, capsys, tmp_path):
    out = tmp_path / "p.pykd"
    rc, _, err = _run(["prune", "--model", work / "s.pykd", "--sparsity", "0.9", "--out", out,
                       "--data", work / "data.npz", "--quiet"], capsys)
    assert rc == 0, err
    model = load_model(out)
    assert "sparse_csr" in model.kinds
    dense = load_model(work / "s.pykd")
    n_w = sum(W.size for W, _ in dense.layers)
    assert model.nonzeros == n_w - round(0.9 * n_w)
    # the same weights saved dense take more bytes
    mlp = model.to_mlp()
    mlp.save(tmp_path / "dense.pykd")
    assert os.path.getsize(out) < os.path.getsize(tmp_path / "dense.pykd")
    X, _ = _test_split(work)
    np.testing.assert_array_equal(model.forward(X), mlp.forward(X))


def test_cluster_of_a_pruned_model_is_sparse_codebook(work, capsys, tmp_path):
    p, c = tmp_path / "p.pykd", tmp_path / "c.pykd"
    d = ["--data", work / "data.npz", "--quiet"]
    assert _run(["prune", "--model", work / "s.pykd", "--sparsity", "0.9", "--out", p, *d],
                capsys)[0] == 0
    rc, _, err = _run(["cluster", "--model", p, "--bits", "4", "--out", c, *d], capsys)
    assert rc == 0, err
    model = load_model(c)
    assert "sparse_codebook" in model.kinds
    assert model.nonzeros <= load_model(p).nonzeros
    assert os.path.getsize(c) < os.path.getsize(p)


@pytest.mark.parametrize("args, message", [
    (["quantize", "--epochs", "3"], "--epochs must be 0 without --qat"),
    (["quantize", "--qat"], "--qat quantization-aware training needs --epochs"),
    (["quantize", "--calibrate", "10"], "--calibrate applies to --static only"),
    (["quantize", "--static", "--percentile", "99"], "--percentile needs --calibration"),
    (["prune", "--sparsity", "0.5", "--teacher", "T"], "--teacher is used only for fine-tuning"),
    (["prune", "--sparsity", "0.5", "--lr", "0.01"], "--lr is a fine-tuning option"),
    (["prune", "--sparsity", "0.5", "--schedule", "gradual"], "give --epochs N"),
    (["prune", "--sparsity", "0.5", "--structured", "--scope", "layer"],
     "--scope does not apply to --structured"),
    (["prune", "--sparsity", "1"], "--sparsity: must be in [0, 1)"),
    (["cluster", "--bits", "9"], "--bits: must be in [1, 8]"),
    (["lowrank", "--rank", "2", "--energy", "0.5"], "not allowed with argument"),
    (["lowrank", "--rank", "2", "--epochs", "1", "--teacher-logits", "missing.npy"],
     "missing.npy does not exist"),
    (["prune", "--sparsity", "0.5", "--teacher-outputs", "T"],
     "--teacher-outputs is used only for fine-tuning"),
    (["prune", "--sparsity", "0.5", "--epochs", "1", "--teacher", "T", "--teacher-outputs",
      "T"], "not allowed with argument"),
])
def test_bad_options_one_line_exit_2(work, capsys, tmp_path, args, message):
    out = tmp_path / "o.pykd"
    rc, _, err = _run([*args, "--model", work / "s.pykd", "--out", out,
                       "--data", work / "data.npz"], capsys)
    assert rc == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_teacher_outputs_refused_for_classification(work, capsys, tmp_path):
    out = tmp_path / "o.pykd"
    rc, _, err = _run(["cluster", "--bits", "4", "--epochs", "1", "--teacher-outputs",
                       work / "tl.npy", "--model", work / "s.pykd", "--out", out,
                       "--data", work / "data.npz"], capsys)
    assert rc == 2 and not out.exists()
    assert "--teacher-outputs has no effect on a classification task" in err, err
    rec = tmp_path / "r.toml"
    rec.write_text(f'[[stage]]\nop = "cluster"\nbits = 4\nepochs = 1\n'
                   f'teacher_outputs = "{work / "tl.npy"}"\n')
    rc, _, err = _run(["compress", "--recipe", rec, "--model", work / "s.pykd", "--out",
                       tmp_path / "st", "--data", work / "data.npz"], capsys)
    assert rc == 2 and not (tmp_path / "st").exists()
    assert "stage 1: teacher_outputs has no effect on a classification task" in err, err


def test_out_same_as_model_refused(work, capsys, tmp_path):
    m = tmp_path / "m.pykd"
    m.write_bytes((work / "s.pykd").read_bytes())
    rc, _, err = _run(["quantize", "--model", m, "--out", m, "--data", work / "data.npz"],
                      capsys)
    assert rc == 2 and "same file" in err
    assert m.read_bytes() == (work / "s.pykd").read_bytes()


# --------------------------------------------------------------- recipes

RECIPE = """
[[stage]]
op = "prune"
sparsity = 0.8
schedule = "gradual"
epochs = 2

[[stage]]
op = "distill"
epochs = 1
lr = 1e-4

[[stage]]
op = "cluster"
bits = 4
epochs = 1

[[stage]]
op = "quantize"
"""


def test_recipe_runs_every_stage(work, capsys, tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE)
    out = tmp_path / "stages"
    rc, stdout, err = _run(["compress", "--model", work / "s.pykd", "--recipe",
                            tmp_path / "r.toml", "--out", out, "--teacher", work / "t.pykd",
                            "--data", work / "data.npz", "--report", tmp_path / "c.json",
                            "--quiet"], capsys)
    assert rc == 0, err
    names = ["01-prune", "02-distill", "03-cluster", "04-quantize"]
    assert sorted(os.listdir(out)) == [n + ".pykd" for n in names]
    for n in names:
        assert n in stdout
    X, y = _test_split(work)
    rows = json.loads((tmp_path / "c.json").read_text())["models"]
    assert [r["name"] for r in rows] == ["s.pykd", *names]
    n_w = sum(W.size for W, _ in load_model(work / "s.pykd").layers)
    for r, n in zip(rows[1:], names):
        m = load_model(out / f"{n}.pykd")
        assert r["test_accuracy"] == pytest.approx(evaluate(m, X, y)["accuracy"], abs=1e-12)
        assert r["bytes_on_disk"] == os.path.getsize(out / f"{n}.pykd")
        # pruned weights stay pruned through distill and cluster
        assert m.nonzeros <= n_w - round(0.8 * n_w)
    assert "sparse_codebook" in load_model(out / "03-cluster.pykd").kinds
    assert set(load_model(out / "04-quantize.pykd").kinds) == {"dense_int8"}


@pytest.mark.parametrize("text, message", [
    ('[[stage]]\nop = "prune"\nsparsity = 0.5\n[[stage]]\nop = "cluster"\nbits = "4"\n',
     "stage 2: bits must be an integer"),
    ('[[stage]]\nop = "prune"\nsparsity = 0.5\nscheduel = "gradual"\n',
     "stage 1: unknown key 'scheduel'"),
    ('[[stage]]\nop = "prune"\nsparsity = 0.5\n[[stage]]\nop = "quantize"\nepochs = 2\n',
     "stage 2: epochs must be 0 without qat = true"),
    ('[[stage]]\nop = "squash"\n', "stage 1: op must be one of"),
    ('[[stage]]\nsparsity = 0.5\n', "stage 1: op is missing"),
    ('[[stage]]\nop = "prune"\n', "stage 1: sparsity is missing"),
    ('[[stage]]\nop = "prune"\nsparsity = 1.5\n', "stage 1: sparsity must be in [0, 1)"),
    ('[[stage]]\nop = "prune"\nsparsity = 0.5\nstructured = 1\n',
     "stage 1: structured must be true or false"),
    ('[[stage]]\nop = "prune"\nsparsity = 0.5\nbatch-size = 8\nepochs = 1\n',
     "write dashes as underscores (batch_size)"),
    ('[[stage]]\nop = "lowrank"\n', "stage 1: rank, energy: give exactly one"),
    ('[[stage]]\nop = "distill"\n', "stage 1: epochs a distill stage needs epochs"),
    ('[[stage]]\nop = "cluster"\nbits = 4\nschedule = "gradual"\n',
     "stage 1: unknown key 'schedule' for op = \"cluster\""),
    ('[[stage]]\nop = "prune"\nsparsity = 0.5\n[[stage]]\nop = "quantize"\ncalibrate = 9\n',
     "stage 2: calibrate applies to static = true only"),
    ('[[stage]]\nop = "cluster"\nbits = 4\n[[stage]]\nop = "distill"\nepochs = 1\n',
     "stage 2: op = \"distill\" trains a dense model"),
    ('stage = 3\n', "no stages"),
    ('[[stage]]\nop = "prune"\nsparsity = 0.5\n[other]\nx = 1\n', "unknown top-level key"),
    ('[[stage]\nop = "prune"\n', "not valid TOML"),
])
def test_recipe_errors_name_stage_and_key(work, capsys, tmp_path, text, message):
    (tmp_path / "r.toml").write_text(text)
    out = tmp_path / "stages"
    rc, _, err = _run(["compress", "--model", work / "s.pykd", "--recipe", tmp_path / "r.toml",
                       "--out", out, "--data", work / "data.npz"], capsys)
    assert rc == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()               # checked before any work


# ---------------------------------------------------------------- report

def test_report_fields_hand_checked(capsys, tmp_path):
    X, y = _blobs(N_TEST, 3)
    np.savez(tmp_path / "d.npz", X_train=X, y_train=y, X_test=X, y_test=y)
    mlp = MLP([N_FEAT, 4, N_CLASSES], seed=3)
    mlp.set_norm(0.5, 0.2)
    W1 = mlp.layers[0][0]
    W1[:5, 0] = 0.0                               # 5 zeros in the first layer
    mlp.save(tmp_path / "a.pykd")
    lr = pykd.low_rank(mlp, rank=1)               # 12x4: 1*(12+4) < 48 factored; 4x5: 9 < 20
    lr.save(tmp_path / "b.pykd")
    rc, stdout, err = _run(["report", tmp_path / "a.pykd", tmp_path / "b.pykd", "--data",
                            tmp_path / "d.npz", "--json", tmp_path / "r.json", "--repeats", "3",
                            "--quiet"], capsys)
    assert rc == 0, err
    assert "median forward time at batch 1 and 256 over 3 calls after 3 warm-up" in stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["task"] == "classification" and doc["timing"]["repeats"] == 3
    a, b = doc["models"]
    for key in ("path", "test_accuracy", "agreement", "parameters", "nonzeros",
                "bytes_on_disk", "latency_b1_us", "latency_b256_us"):
        assert key in a and key in b
    assert a["parameters"] == 12 * 4 + 4 + 4 * 5 + 5 == 77
    assert a["nonzeros"] == 12 * 4 + 4 * 5 - 5 == 63
    assert b["parameters"] == (12 + 4) * 1 + 4 + (4 + 5) * 1 + 5 == 34
    U, V = lr.layers[0].U, lr.layers[0].V
    assert b["nonzeros"] == np.count_nonzero(U @ V) + np.count_nonzero(
        lr.layers[1].U @ lr.layers[1].V)
    assert a["bytes_on_disk"] == os.path.getsize(tmp_path / "a.pykd")
    assert b["bytes_on_disk"] == os.path.getsize(tmp_path / "b.pykd")
    assert b["bytes_ratio"] == pytest.approx(b["bytes_on_disk"] / a["bytes_on_disk"])
    assert b["parameters_ratio"] == pytest.approx(34 / 77)
    acc_a = float((mlp.predict(X) == y).mean())
    acc_b = float((lr.predict(X) == y).mean())
    assert a["test_accuracy"] == pytest.approx(acc_a) and b["test_accuracy"] == pytest.approx(acc_b)
    assert b["agreement"] == pytest.approx(float((lr.predict(X) == mlp.predict(X)).mean()))
    assert b["accuracy_change_points"] == pytest.approx(100 * (acc_b - acc_a))
    assert a["latency_b1_us"] > 0 and a["latency_b256_us"] > 0
    # --json - : the JSON alone on stdout
    rc, stdout, _ = _run(["report", tmp_path / "a.pykd", "--data", tmp_path / "d.npz",
                          "--json", "-", "--no-latency"], capsys)
    assert rc == 0 and json.loads(stdout)["models"][0]["latency_b1_us"] is None


def test_report_regression_rmse_r2(capsys, tmp_path):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((50, 3)).astype(np.float32)
    yt = (X @ np.array([1.0, -2.0, 0.5]) + 0.3).astype(np.float64)
    np.savez(tmp_path / "reg.npz", X_train=X, y_train=yt, X_test=X, y_test=yt)
    m = MLP([3, 1], seed=0)
    m.save(tmp_path / "r.pykd")
    rc, _, err = _run(["report", tmp_path / "r.pykd", "--data", tmp_path / "reg.npz",
                       "--json", tmp_path / "o.json", "--no-latency", "--quiet"], capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "o.json").read_text())
    (row,) = doc["models"]
    pred = m.forward(X)[:, 0].astype(np.float64)
    rmse = np.sqrt(np.mean((pred - yt) ** 2))
    r2 = 1 - np.sum((pred - yt) ** 2) / np.sum((yt - yt.mean()) ** 2)
    assert doc["task"] == "regression" and row["test_accuracy"] is None
    assert row["rmse"] == pytest.approx(rmse, rel=1e-9)
    assert row["r2"] == pytest.approx(r2, rel=1e-9)


def test_report_bad_inputs(work, capsys, tmp_path):
    rc, _, err = _run(["report", tmp_path / "none.pykd", "--data", work / "data.npz"], capsys)
    assert rc == 2 and "does not exist" in err
    rc, _, err = _run(["report", work / "s.pykd", "--data", work / "data.npz",
                       "--json", tmp_path], capsys)
    assert rc == 2 and "is a directory" in err


# ------------------------------------------------------------------ demo

def test_demo_quick_compression_table(work, capsys, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--quick", "--data", work / "data.npz", "--teacher-hidden", "32",
            "--student-hidden", "16,16", "--seeds", "1", "--teacher-epochs", "2",
            "--student-epochs", "2", "--out", out, "--report", tmp_path / "d.json", "--quiet"]
    rc, stdout, err = _run(args, capsys)
    assert rc == 0, err
    assert "too small to show a KD gain" in stdout
    assert "Compression of kd_student_seed0" in stdout
    for label in ("pruned 90%", "int8 dynamic", "int8 static", "low rank", "5-bit codebook",
                  "sparse + 5-bit"):
        assert label in stdout
    assert not [f for f in os.listdir(out) if f.endswith(".ckpt.npz")]
    doc = json.loads((tmp_path / "d.json").read_text())
    rows = doc["compression"]["rows"]
    assert [r["variant"] for r in rows] == ["student", "pruned", "int8_dynamic", "int8_static",
                                            "lowrank", "codebook", "combined"]
    student = load_model(out / "kd_student_seed0.pykd")
    X, y = _test_split(work)
    for r in rows[1:]:
        m = load_model(r["path"])
        assert r["test_accuracy"] == pytest.approx(evaluate(m, X, y)["accuracy"], abs=1e-12)
        assert r["bytes_on_disk"] == os.path.getsize(r["path"])
        assert r["ratio"] == pytest.approx(r["bytes_on_disk"] / rows[0]["bytes_on_disk"])
        if r["target"] is not None:
            assert isinstance(r["target_met"], bool) and ("met" in stdout or "MISSED" in stdout)
    by = {r["variant"]: r for r in rows}
    assert by["lowrank"]["parameters"] <= student.parameters / 2
    assert "sparse_codebook" in by["combined"]["kinds"]
    assert by["combined"]["nonzeros"] <= by["pruned"]["nonzeros"]
    # --resume reuses the compressed models
    rc, stdout2, err = _run([*args[:-1], "--resume"], capsys)
    assert rc == 0, err
    assert err.count("loaded") == 6
    assert stdout2.split("Compression of")[1].split("s)")[1] == \
        stdout.split("Compression of")[1].split("s)")[1]


def test_report_plot(work, capsys, tmp_path, monkeypatch):
    png = tmp_path / "r.png"
    argv = ["report", work / "s.pykd", work / "t.pykd", "--data", work / "data.npz",
            "--plot", png, "--no-latency", "--quiet"]
    with monkeypatch.context() as m:          # matplotlib missing: a clear error, no file
        m.setitem(sys.modules, "matplotlib", None)
        rc, _, err = _run(argv, capsys)
        assert rc == 2 and "--plot needs matplotlib" in err and not png.exists()
    import matplotlib  # noqa: F401  (tools/setup.sh installs it: the drawing is tested)
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_fine_tunes_at_its_own_default_rate(work, capsys, tmp_path):
    """Pruning must recover from losing most weights: its default rate is
    PRUNE_LR, the other commands' FineTune's; --lr overrides both."""
    from pykd.cli.compress import FT_DEFAULTS, PRUNE_LR
    d = ["--data", work / "data.npz", "--quiet", "--epochs", "1"]
    rates = {}
    for name, cmd in (("prune", ["prune", "--sparsity", "0.5"]),
                      ("prune_lr", ["prune", "--sparsity", "0.5", "--lr", "0.002"]),
                      ("lowrank", ["lowrank", "--rank", "2"])):
        out = tmp_path / f"{name}.pykd"
        rc, _, err = _run([*cmd, "--model", work / "s.pykd", "--out", out, *d], capsys)
        assert rc == 0, err
        steps = [st for st in load_model(out).metadata["compression"] if "fine_tune" in st]
        assert len(steps) == 1, steps
        rates[name] = steps[0]["fine_tune"]["lr"]
    assert rates == {"prune": PRUNE_LR, "prune_lr": 0.002, "lowrank": FT_DEFAULTS["lr"]}
