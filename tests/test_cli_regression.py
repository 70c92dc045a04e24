"""The command line on regression data (issue 14) and CSV files (issue 17):
train-teacher -> distill -> evaluate -> quantize -> evaluate on a CSV, teacher
outputs, predict in physical units, --loss/--huber-delta/--norm/--task,
--config and the report's configuration block, pykd report and info.

References are computed here, independently of the CLI: the test split from
NumPy's generator, the targets from the csv module, RMSE/R^2 in float64 from
``model.forward``; the baseline is predicting the training mean."""
import contextlib
import csv
import io
import json

import numpy as np
import pytest

from pykd import cli
from pykd.models import load_model

pytestmark = pytest.mark.fortran

N, FRACTION, SEED = 400, 0.25, 3
TARGETS = ["u", "v"]
COMMON = ["--target-columns", "u,v", "--test-fraction", str(FRACTION), "--seed", str(SEED),
          "--quiet"]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _csv_table(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array([[float(v) for v in r] for r in rows[1:]])


def _split(n):
    test = np.zeros(n, bool)
    test[np.random.default_rng(SEED).permutation(n)[:round(FRACTION * n)]] = True
    return ~test, test


def _rmse_r2(pred, y):
    pred, y = pred.astype(np.float64), y.astype(np.float64)
    rmse = np.sqrt(((pred - y) ** 2).mean(axis=0))
    r2 = 1 - ((pred - y) ** 2).sum(axis=0) / ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    return rmse, r2


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A CSV regression set (3 features, 2 targets in different units) and
    the CLI pipeline on it: teacher, student, evaluate, quantize, evaluate."""
    d = tmp_path_factory.mktemp("cliregr")
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (N, 3))
    u = np.sin(2 * X[:, 0]) + 0.5 * X[:, 1] * X[:, 2]
    v = 10 + 3 * X[:, 2] ** 2 - 2 * X[:, 0]
    Y = np.c_[u, v] + 0.02 * rng.standard_normal((N, 2))
    cols = ["a", "u", "b", "c", "v"]                  # targets between the features
    A = np.c_[X[:, 0], Y[:, 0], X[:, 1], X[:, 2], Y[:, 1]]
    (d / "reg.csv").write_text(",".join(cols) + "\n" + "\n".join(
        ",".join(f"{x:.6f}" for x in r) for r in A) + "\n")
    return d


def _run_captured(argv):
    """cli.main with stdout and stderr captured (for a module-scoped fixture,
    where capsys is not available): (code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trained(pipe):
    d = pipe
    data = ["--data", d / "reg.csv", *COMMON]
    steps = [
        ["train-teacher", *data, "--hidden", "32,32", "--epochs", "40", "--lr", "3e-3",
         "--batch-size", "32", "--out", d / "t.pykd"],
        ["distill", *data, "--teacher", d / "t.pykd", "--hidden", "16", "--epochs", "40",
         "--lr", "3e-3", "--batch-size", "32", "--out", d / "s.pykd"],
        ["evaluate", *data[:-1], "--model", d / "s.pykd", "--teacher", d / "t.pykd",
         "--report", d / "s.json"],
        ["quantize", *data, "--model", d / "s.pykd", "--out", d / "q.pykd"],
        ["evaluate", *data, "--model", d / "q.pykd", "--report", d / "q.json"],
    ]
    printed = []
    for argv in steps:
        code, out, err = _run_captured(argv)
        assert code == 0, (argv[0], err)
        printed.append(out)
    return d, "".join(printed)


def test_round_trip_beats_the_mean(trained):
    d, out = trained
    header, A = _csv_table(d / "reg.csv")
    feats = [header.index(c) for c in ("a", "b", "c")]
    tgts = [header.index(c) for c in TARGETS]
    train, test = _split(A.shape[0])
    X_test = A[test][:, feats].astype(np.float32)
    y_test, y_train = A[test][:, tgts], A[train][:, tgts]
    baseline = np.sqrt(((y_test - y_train.mean(axis=0)) ** 2).mean(axis=0))
    for name in ("t", "s", "q"):
        model = load_model(d / f"{name}.pykd")
        assert model.task == "regression" and model.n_outputs == 2
        rmse, r2 = _rmse_r2(model.forward(X_test), y_test)
        assert np.all(rmse < 0.6 * baseline), (name, rmse, baseline)
        assert np.all(r2 > 0.6), (name, r2)
        if name != "t":
            e = json.loads((d / f"{name}.json").read_text())["models"][0]
            assert e["task"] == "regression" and e["test_accuracy"] is None
            np.testing.assert_allclose(e["test_rmse_per_output"], rmse, rtol=1e-6)
            np.testing.assert_allclose(e["test_r2_per_output"], r2, rtol=1e-6)
            assert e["test_rmse"] == pytest.approx(rmse.mean(), rel=1e-6)
            assert e["test_r2"] == pytest.approx(r2.mean(), rel=1e-6)
            assert e["parameters"] == model.parameters and e["bytes_on_disk"] > 0
    s_rmse = _rmse_r2(load_model(d / "s.pykd").forward(X_test), y_test)[0]
    q_rmse = _rmse_r2(load_model(d / "q.pykd").forward(X_test), y_test)[0]
    np.testing.assert_allclose(q_rmse, s_rmse, rtol=0.05)      # int8 costs little here
    s = json.loads((d / "s.json").read_text())["models"][0]
    assert s["teacher"]["path"].endswith("t.pykd") and s["teacher_rmse"] > 0
    # the printed tables name the CSV's targets
    assert "test RMSE" in out and "  u " in out and "  v " in out and "overall" in out
    # the split and names are recorded with the model
    cfg = load_model(d / "t.pykd").metadata["config"]
    assert cfg["task"] == "regression" and cfg["targets"] == TARGETS
    assert cfg["features"] == ["a", "b", "c"] and cfg["split_seed"] == SEED
    assert cfg["train"]["loss"] == "mse" and cfg["norm"] == "per-feature"
    assert load_model(d / "s.pykd").metadata["config"]["train"]["loss"] == "mse_kd"


def test_per_feature_normalisation_in_physical_units(trained, capsys, tmp_path):
    d, _ = trained
    t = load_model(d / "t.pykd")
    mean, std = t.norm
    _, A = _csv_table(d / "reg.csv")
    train, _ = _split(A.shape[0])
    X_train = A[train][:, [0, 2, 3]]
    np.testing.assert_allclose(mean, X_train.mean(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(std, X_train.std(axis=0), rtol=1e-4)
    out_mean, _ = t.out_norm
    np.testing.assert_allclose(out_mean, A[train][:, [1, 4]].mean(axis=0), rtol=1e-4,
                               atol=1e-5)
    # predict: the model's outputs, in the targets' units (v is around 11)
    X = A[:, [0, 2, 3]].astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    code, _, err = run(["predict", "--model", d / "t.pykd", "--data", tmp_path / "x.npy",
                        "--out", tmp_path / "p.npy", "--quiet"], capsys)
    assert code == 0, err
    P = np.load(tmp_path / "p.npy")
    assert np.array_equal(P, t.forward(X))
    assert abs(P[:, 1].mean() - A[:, 4].mean()) < 0.2


def test_teacher_outputs_file_equals_teacher(trained, capsys, tmp_path):
    """soft-labels on a regression teacher writes its outputs (physical
    units); distill --teacher-outputs FILE then trains the same bits as
    distill --teacher MODEL."""
    d, _ = trained
    data = ["--data", d / "reg.csv", *COMMON]
    code, out, err = run(["soft-labels", *data, "--teacher", d / "t.pykd",
                          "--out", tmp_path / "to.npy"], capsys)
    assert code == 0, err
    assert "teacher outputs (physical units)" in out
    _, A = _csv_table(d / "reg.csv")
    train, _ = _split(A.shape[0])
    t = load_model(d / "t.pykd")
    outputs = np.load(tmp_path / "to.npy")
    assert np.array_equal(outputs, t.forward(A[train][:, [0, 2, 3]].astype(np.float32)))
    common = ["distill", *data, "--hidden", "6", "--epochs", "2", "--alpha", "0.3",
              "--loss", "huber", "--huber-delta", "0.5"]
    assert run(common + ["--teacher", d / "t.pykd", "--out", tmp_path / "a.pykd"],
               capsys)[0] == 0
    assert run(common + ["--teacher-outputs", tmp_path / "to.npy",
                         "--out", tmp_path / "b.pykd"], capsys)[0] == 0
    a, b = load_model(tmp_path / "a.pykd"), load_model(tmp_path / "b.pykd")
    assert np.array_equal(a.params, b.params)
    train_cfg = a.metadata["config"]["train"]
    assert train_cfg["loss"] == "huber_kd" and train_cfg["huber_delta"] == 0.5
    assert train_cfg["alpha"] == 0.3


def test_npz_float_targets_and_task(capsys, tmp_path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((120, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.float64) + 2 * (X[:, 1] > 0)     # 0..3, stored as floats
    np.savez(tmp_path / "f.npz", X_train=X[:90], y_train=y[:90], X_test=X[90:], y_test=y[90:])
    base = ["train-teacher", "--data", tmp_path / "f.npz", "--hidden", "8", "--epochs", "2",
            "--quiet"]
    code, out, err = run(base + ["--out", tmp_path / "r.pykd"], capsys)
    assert code == 0, err
    (warning,) = err.splitlines()
    assert warning.startswith("pykd train-teacher: warning: ") and \
        "--task classification" in warning
    r = load_model(tmp_path / "r.pykd")
    assert r.task == "regression" and r.n_outputs == 1 and "test RMSE" in out
    code, out, err = run(base + ["--task", "classification", "--out", tmp_path / "c.pykd"],
                         capsys)
    assert code == 0 and err == "", err
    c = load_model(tmp_path / "c.pykd")
    assert c.task == "classification" and c.n_outputs == 4 and "test accuracy" in out
    assert np.ndim(c.norm[0]) == 0                       # classification: scalar by default
    code, _, err = run(base + ["--task", "classification", "--norm", "per-feature",
                               "--out", tmp_path / "cp.pykd"], capsys)
    assert code == 0, err
    mean, _ = load_model(tmp_path / "cp.pykd").norm
    np.testing.assert_allclose(mean, X[:90].mean(axis=0), rtol=1e-4, atol=1e-6)
    code, _, err = run(base + ["--norm", "scalar", "--out", tmp_path / "rs.pykd"], capsys)
    assert code == 0
    assert np.ndim(load_model(tmp_path / "rs.pykd").norm[0]) == 0


def test_config_file_and_configuration_block(pipe, capsys, tmp_path):
    """Every new option from --config; the report's configuration block
    holds them and reruns the same job, bit for bit."""
    (tmp_path / "c.toml").write_text(
        f'data = "{pipe / "reg.csv"}"\ntarget_columns = ["u", "v"]\ntest_fraction = 0.2\n'
        'task = "regression"\nloss = "huber"\nhuber_delta = 0.25\nnorm = "per-feature"\n'
        'hidden = [8]\nepochs = 2\nseed = 5\n')
    code, _, err = run(["train-teacher", "--config", tmp_path / "c.toml", "--quiet",
                        "--out", tmp_path / "m.pykd", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    conf = json.loads((tmp_path / "r.json").read_text())["configuration"]
    for k, v in {"target_columns": ["u", "v"], "test_fraction": 0.2, "task": "regression",
                 "loss": "huber", "huber_delta": 0.25, "norm": "per-feature", "seed": 5}.items():
        assert conf[k] == v, k
    assert "classes" not in conf and "temperature" not in conf
    code, _, err = run(["train-teacher", "--config", tmp_path / "r.json", "--quiet",
                        "--out", tmp_path / "m2.pykd"], capsys)
    assert code == 0, err
    a, b = load_model(tmp_path / "m.pykd"), load_model(tmp_path / "m2.pykd")
    assert np.array_equal(a.params, b.params)
    assert a.metadata["config"]["train"]["huber_delta"] == 0.25
    # a distill default that has no effect on regression stays out of the block
    code, _, err = run(["distill", "--config", tmp_path / "c.toml", "--quiet", "--teacher",
                        tmp_path / "m.pykd", "--out", tmp_path / "d.pykd", "--report",
                        tmp_path / "d.json"], capsys)
    assert code == 0, err
    conf = json.loads((tmp_path / "d.json").read_text())["configuration"]
    assert "temperature" not in conf and conf["alpha"] == 0.1 and conf["loss"] == "huber"


def test_report_and_info(trained, capsys):
    d, _ = trained
    code, out, err = run(["report", d / "s.pykd", d / "q.pykd", "--data", d / "reg.csv",
                          *COMMON, "--no-latency", "--json", d / "rep.json"], capsys)
    assert code == 0, err
    doc = json.loads((d / "rep.json").read_text())
    assert doc["task"] == "regression" and doc["targets"] == TARGETS
    for row, name in zip(doc["models"], ("s", "q")):
        e = json.loads((d / f"{name}.json").read_text())["models"][0]
        assert row["rmse_per_output"] == pytest.approx(e["test_rmse_per_output"], rel=1e-9)
        assert row["r2"] == pytest.approx(e["test_r2"], rel=1e-9)
    assert "RMSE" in out and "R^2" in out
    code, out, _ = run(["info", d / "q.pykd", "--json"], capsys)
    info = json.loads(out)
    assert info["task"] == "regression" and info["out_norm"]["kind"] == "per_feature"
    code, out, _ = run(["info", d / "q.pykd"], capsys)
    assert "task: regression" in out and "output normalisation (targets): per_feature" in out


def test_compression_fine_tuning_on_regression(trained, capsys, tmp_path):
    d, _ = trained
    code, out, err = run(["prune", "--data", d / "reg.csv", *COMMON, "--model", d / "s.pykd",
                          "--sparsity", "0.5", "--epochs", "1", "--teacher", d / "t.pykd",
                          "--out", tmp_path / "p.pykd", "--report", tmp_path / "p.json"],
                         capsys)
    assert code == 0, err
    assert out.startswith("prune: test RMSE ")
    rows = json.loads((tmp_path / "p.json").read_text())["models"]
    assert rows[1]["test_rmse"] > 0 and rows[1]["test_r2"] is not None
    assert load_model(tmp_path / "p.pykd").task == "regression"


def test_classification_from_csv(capsys, tmp_path):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((150, 3))
    label = (X[:, 0] + X[:, 1] > 0).astype(int) + (X[:, 2] > 1)
    lines = ["p,q,label,r"] + [f"{a:.5f},{b:.5f},{k},{c:.5f}" for (a, b, c), k in zip(X, label)]
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    code, out, err = run(["train-teacher", "--data", tmp_path / "c.csv", "--target-columns",
                          "label", "--test-fraction", "0.2", "--hidden", "8", "--epochs", "3",
                          "--quiet", "--out", tmp_path / "c.pykd"], capsys)
    assert code == 0, err
    assert "test accuracy" in out
    m = load_model(tmp_path / "c.pykd")
    assert m.n_outputs == int(label.max()) + 1 and m.n_features == 3


def test_evaluate_warns_about_another_split(trained, capsys):
    d, _ = trained
    code, _, err = run(["evaluate", "--data", d / "reg.csv", "--target-columns", "u,v",
                        "--test-fraction", str(FRACTION), "--seed", str(SEED + 1), "--quiet",
                        "--model", d / "s.pykd"], capsys)
    assert code == 0
    (line,) = err.splitlines()
    assert line.startswith("pykd evaluate: warning: ") and f"--seed {SEED}" in line
    assert "may include training rows" in line


def test_test_file_and_hint_term(trained, capsys, tmp_path):
    """--test-data FILE.csv is the test split (its columns in any order), and
    regression distillation takes the hint term."""
    d, _ = trained
    header, A = _csv_table(d / "reg.csv")
    order = [4, 3, 2, 1, 0]
    (tmp_path / "test.csv").write_text(",".join(header[k] for k in order) + "\n" + "\n".join(
        ",".join(f"{r[k]:.6f}" for k in order) for r in A[:50]) + "\n")
    data = ["--data", d / "reg.csv", "--target-columns", "u,v", "--test-data",
            tmp_path / "test.csv", "--quiet"]
    code, _, err = run(["distill", *data, "--teacher", d / "t.pykd", "--hidden", "8",
                        "--epochs", "2", "--hint-student-layer", "1", "--hint-weight", "0.5",
                        "--out", tmp_path / "h.pykd", "--report", tmp_path / "h.json"], capsys)
    assert code == 0, err
    h = load_model(tmp_path / "h.pykd")
    cfg = h.metadata["config"]
    assert cfg["train"]["loss"] == "mse_kd" and cfg["train"]["hint_layer"] == 1
    assert cfg["hint_teacher_layer"] == 2 and cfg["test_data"].endswith("test.csv")
    e = json.loads((tmp_path / "h.json").read_text())["models"][0]
    rmse, _ = _rmse_r2(h.forward(A[:50][:, [0, 2, 3]].astype(np.float32)), A[:50][:, [1, 4]])
    np.testing.assert_allclose(e["test_rmse_per_output"], rmse, rtol=1e-6)


def test_classification_configuration_reruns(capsys, tmp_path):
    """The configuration block of a classification run (task and norm filled
    in) is a valid config of the same command; pykd demo has no --task."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((60, 3)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "c.npz", X_train=X[:40], y_train=y[:40], X_test=X[40:], y_test=y[40:])
    code, _, err = run(["train-teacher", "--data", tmp_path / "c.npz", "--hidden", "4",
                        "--epochs", "1", "--quiet", "--out", tmp_path / "a.pykd", "--report",
                        tmp_path / "a.json"], capsys)
    assert code == 0, err
    conf = json.loads((tmp_path / "a.json").read_text())["configuration"]
    assert conf["task"] == "classification" and conf["norm"] == "scalar" and "loss" not in conf
    code, _, err = run(["train-teacher", "--config", tmp_path / "a.json", "--quiet",
                        "--out", tmp_path / "b.pykd"], capsys)
    assert code == 0, err
    assert np.array_equal(load_model(tmp_path / "a.pykd").params,
                          load_model(tmp_path / "b.pykd").params)
    code, out, _ = run(["demo", "--help"], capsys)
    assert code == 0 and "--task" not in out and "--target-columns" not in out


def _csv_floats(path):
    """A CSV file as the csv module reads it: the header and float32 values."""
    names, A = _csv_table(path)
    return names, A.astype(np.float32)


def test_predict_csv_in_and_out(trained, capsys, tmp_path):
    """predict takes the CSV the model was trained on: the feature columns by
    name (the targets between them ignored), and writes a CSV whose header is
    the target names and whose values read back as the model's float32
    outputs, bit for bit."""
    d, _ = trained
    t = load_model(d / "t.pykd")
    _, A = _csv_table(d / "reg.csv")
    X = A[:, [0, 2, 3]].astype(np.float32)
    code, out, err = run(["predict", "--model", d / "t.pykd", "--data", d / "reg.csv",
                          "--out", tmp_path / "p.csv"], capsys)
    assert code == 0, err
    assert "ignored 2 columns the model does not take: u, v" in out
    names, P = _csv_floats(tmp_path / "p.csv")
    assert names == TARGETS
    assert np.array_equal(P, t.forward(X))
    # columns in another order, targets dropped: the same outputs
    cols = ["c", "a", "b"]
    B = np.c_[A[:, 3], A[:, 0], A[:, 2]]
    (tmp_path / "x.csv").write_text(",".join(cols) + "\n" + "\n".join(
        ",".join(f"{x:.6f}" for x in r) for r in B) + "\n")
    code, out, err = run(["predict", "--model", d / "t.pykd", "--data", tmp_path / "x.csv",
                          "--out", tmp_path / "p2.npy"], capsys)
    assert code == 0, err
    assert "ignored" not in out
    assert np.array_equal(np.load(tmp_path / "p2.npy"), t.forward(X))


def test_predict_csv_errors(trained, capsys, tmp_path):
    d, _ = trained
    (tmp_path / "few.csv").write_text("a,b,u\n0.1,0.2,0.3\n")
    code, _, err = run(["predict", "--model", d / "t.pykd", "--data", tmp_path / "few.csv",
                        "--out", tmp_path / "p.csv"], capsys)
    assert code != 0
    assert "feature column 'c' is not in the header" in err and "a, b, u" in err
    assert not (tmp_path / "p.csv").exists()
    (tmp_path / "bad.csv").write_text("a,b,c\n0.1,x,0.3\n")
    code, _, err = run(["predict", "--model", d / "t.pykd", "--data", tmp_path / "bad.csv",
                        "--out", tmp_path / "p.csv"], capsys)
    assert code != 0 and "line 2, column 2 ('b'): 'x' is not a number" in err


def test_predict_csv_without_feature_names(capsys, tmp_path):
    """A model that records no column names (trained from an .npz) takes every
    CSV column as a feature, in the file's order, and checks their count;
    --labels writes one 'label' column of integers."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((60, 3)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", X_train=X, y_train=y, X_test=X[:10], y_test=y[:10])
    code, _, err = run(["train-teacher", "--data", tmp_path / "d.npz", "--hidden", "4",
                        "--epochs", "2", "--quiet", "--out", tmp_path / "m.pykd"], capsys)
    assert code == 0, err
    m = load_model(tmp_path / "m.pykd")
    text = "p,q,r\n" + "\n".join(",".join(f"{v:.6f}" for v in r) for r in X) + "\n"
    (tmp_path / "x.csv").write_text(text)
    X6 = np.array([[float(f"{v:.6f}") for v in r] for r in X], np.float32)
    code, _, err = run(["predict", "--model", tmp_path / "m.pykd", "--data",
                        tmp_path / "x.csv", "--out", tmp_path / "l.csv", "--labels"], capsys)
    assert code == 0, err
    rows = (tmp_path / "l.csv").read_text().split("\n")
    assert rows[0] == "label"
    assert [int(r) for r in rows[1:] if r] == list(m.predict(X6))
    code, _, err = run(["predict", "--model", tmp_path / "m.pykd", "--data",
                        tmp_path / "x.csv", "--out", tmp_path / "o.csv"], capsys)
    assert code == 0, err
    names, P = _csv_floats(tmp_path / "o.csv")
    assert names == ["output_0", "output_1"] and np.array_equal(P, m.forward(X6))
    (tmp_path / "w.csv").write_text("p,q\n1,2\n")
    code, _, err = run(["predict", "--model", tmp_path / "m.pykd", "--data",
                        tmp_path / "w.csv", "--out", tmp_path / "o2.csv"], capsys)
    assert code != 0 and "2 columns but the model takes 3 features" in err


def test_compress_teacher_outputs_file_equals_teacher(trained, capsys, tmp_path):
    """compress commands take --teacher-outputs for regression fine-tuning
    (the file distill takes): the same bits as --teacher MODEL, in a
    command and in a recipe; the wrong file option for the task is refused
    before any work, naming the right one."""
    d, _ = trained
    data = ["--data", d / "reg.csv", *COMMON]
    assert run(["soft-labels", *data, "--teacher", d / "t.pykd",
                "--out", tmp_path / "to.npy"], capsys)[0] == 0
    prune = ["prune", *data, "--model", d / "s.pykd", "--sparsity", "0.5", "--epochs", "1"]
    code, _, err = run(prune + ["--teacher", d / "t.pykd", "--out", tmp_path / "a.pykd"], capsys)
    assert code == 0, err
    code, _, err = run(prune + ["--teacher-outputs", tmp_path / "to.npy",
                                "--out", tmp_path / "b.pykd"], capsys)
    assert code == 0, err
    _, A = _csv_table(d / "reg.csv")
    X = A[:, [0, 2, 3]].astype(np.float32)
    a, b = load_model(tmp_path / "a.pykd"), load_model(tmp_path / "b.pykd")
    assert a.kinds == b.kinds and np.array_equal(a.forward(X), b.forward(X))
    # a stage's seed (fine-tuning) is its own key; --seed is the split's
    (tmp_path / "r.toml").write_text('[[stage]]\nop = "prune"\nsparsity = 0.5\nepochs = 1\n'
                                     f'seed = {SEED}\n')
    recipe = ["compress", *data, "--model", d / "s.pykd", "--recipe", tmp_path / "r.toml"]
    for teacher, out in ((["--teacher", d / "t.pykd"], "sa"),
                         (["--teacher-outputs", tmp_path / "to.npy"], "sb")):
        code, _, err = run(recipe + teacher + ["--out", tmp_path / out], capsys)
        assert code == 0, err
    c, e = (load_model(tmp_path / out / "01-prune.pykd") for out in ("sa", "sb"))
    assert c.kinds == e.kinds == a.kinds
    assert np.array_equal(c.forward(X), a.forward(X))
    assert np.array_equal(e.forward(X), a.forward(X))
    code, _, err = run(prune + ["--teacher-logits", tmp_path / "to.npy",
                                "--out", tmp_path / "c.pykd"], capsys)
    assert code != 0 and "give --teacher-outputs FILE.npy" in err
    assert not (tmp_path / "c.pykd").exists()
