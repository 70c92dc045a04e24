"""Bad ``pykd`` invocations: every one ends in exit code 2 and exactly one
line on stderr naming the file or option and the problem, with no traceback
(issue 13). Run in-process through :func:`pykd.cli.main` (fast); the
``--debug`` traceback is also checked in a subprocess."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pykd import cli, modelfile
from pykd.models import MLP, load_model
from pykd.train import load_checkpoint

pytestmark = pytest.mark.fortran

N_TRAIN, N_TEST, N_FEAT, N_CLASSES = 160, 60, 12, 5


def _blobs(n, seed, n_classes=N_CLASSES, n_features=N_FEAT):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).uniform(0.2, 0.8, (n_classes, n_features))
    y = rng.integers(0, n_classes, n)
    y[:n_classes] = np.arange(n_classes)               # every class present
    X = centres[y] + 0.1 * rng.standard_normal((n, n_features))
    return X.astype(np.float32), y.astype(np.int64)


def _save_ckpt(path, arrays, meta):
    blob = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, meta=blob, **arrays)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory with datasets, a teacher, logits, checkpoints and bad files."""
    d = tmp_path_factory.mktemp("clierr")
    X, y = _blobs(N_TRAIN, 1)
    Xt, yt = _blobs(N_TEST, 2)
    np.savez(d / "small.npz", X_train=X, y_train=y, X_test=Xt, y_test=yt)
    # a test label (7) above the training set's largest (4)
    yt7 = yt.copy()
    yt7[3] = 7
    np.savez(d / "testlabel.npz", X_train=X, y_train=y, X_test=Xt, y_test=yt7)
    # a label of 1e9: must not allocate 1e9 outputs
    yb = y.copy()
    yb[0] = 10**9
    np.savez(d / "huge_label.npz", X_train=X, y_train=yb, X_test=Xt, y_test=yt)
    np.savez(d / "other_features.npz", X_train=X[:, :6], y_train=y, X_test=Xt[:, :6], y_test=yt)
    np.savez(d / "trainonly.npz", X=X, y=y)
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    # regression (issue 14): float targets with 2 outputs, a CSV, teacher outputs
    Y = np.c_[X[:, 0] - X[:, 1], X[:, 2] * 2].astype(np.float64)
    Yt = np.c_[Xt[:, 0] - Xt[:, 1], Xt[:, 2] * 2].astype(np.float64)
    np.savez(d / "reg.npz", X_train=X, y_train=Y, X_test=Xt, y_test=Yt)
    np.savez(d / "reg3.npz", X_train=X, y_train=np.c_[Y, Y[:, 0]], X_test=Xt,
             y_test=np.c_[Yt, Yt[:, 0]])
    np.save(d / "to.npy", Y.astype(np.float32))
    np.save(d / "to_narrow.npy", Y[:, :1].astype(np.float32))
    reg = MLP([N_FEAT, 4, 2], seed=0)
    reg.metadata["task"] = "regression"
    reg.save(d / "reg.pykd")
    header = ",".join([f"x{j}" for j in range(N_FEAT)] + ["u", "v"])
    rows = [",".join(f"{v:.5f}" for v in r) for r in np.c_[X, Y]]
    (d / "reg.csv").write_text("\n".join([header] + rows) + "\n")
    (d / "bad.csv").write_text("a,b,y\n1,2,3\n4,oops,6\n")
    (d / "ragged.csv").write_text("a,b,y\n1,2,3\n4,5,6,7\n")
    (d / "empty.csv").write_text("")
    (d / "twolabels.csv").write_text("a,y,z\n1.5,0,1\n2.5,1,0\n")
    (d / "hd.toml").write_text('huber_delta = 0.5\n')
    # a teacher and its logits
    assert cli.main(["train-teacher", "--hidden", "8", "--epochs", "1", "--data",
                     str(d / "small.npz"), "--out", str(d / "t.pykd"), "--quiet"]) == 0
    teacher = load_model(d / "t.pykd")
    logits = teacher.forward(X)
    np.save(d / "tl.npy", logits)
    np.save(d / "tl_narrow.npy", logits[:, :3])
    np.save(d / "tl_int.npy", logits.astype(np.int32))
    bad = logits.copy()
    bad[5, 1] = np.nan
    np.save(d / "tl_nan.npy", bad)
    raw = (d / "tl.npy").read_bytes()
    (d / "tl_trunc.npy").write_bytes(raw[:len(raw) // 2])
    # a header that declares 10^12 rows: refused before any allocation
    hdr = raw[:raw.index(b"\n") + 1].replace(f"({N_TRAIN}, ".encode(), b"(1000000000000, ")
    (d / "tl_huge.npy").write_bytes(hdr + raw[len(hdr):])
    # models: truncated, bit-flipped, nested metadata, history not a dict
    model = (d / "t.pykd").read_bytes()
    (d / "trunc.pykd").write_bytes(model[:len(model) // 3])
    flipped = bytearray(model)
    flipped[len(flipped) // 2] ^= 0x40
    (d / "flip.pykd").write_bytes(bytes(flipped))
    deep = {}
    cur = deep
    for _ in range(300):
        cur["a"] = {}
        cur = cur["a"]
    m = MLP([N_FEAT, 8, N_CLASSES], seed=0)
    check = modelfile._json_depth_exceeds     # the writer refuses it: write it anyway
    modelfile._json_depth_exceeds = lambda obj, limit: False
    try:
        m.save(d / "deep.pykd", metadata={"deep": deep})
    finally:
        modelfile._json_depth_exceeds = check
    m.save(d / "listhistory.pykd", metadata={"history": [1, 2, 3], "config": "x"})
    (d / "adir").mkdir()
    os.mkfifo(d / "fifo.pykd")
    # a checkpoint of `train-teacher --hidden 8 --epochs 1` (epoch 1 done), and damaged copies
    arrays, meta = load_checkpoint(d / "t.pykd.ckpt.npz")
    ck = d / "t.pykd.ckpt.npz"

    def tamper(name, **changes):
        m2 = json.loads(json.dumps(meta))
        for k, v in changes.items():
            if v is KeyError:
                del m2[k]
            else:
                m2[k] = v
        _save_ckpt(d / name, arrays, m2)

    tamper("ck_epoch.npz", epoch=10**9)
    tamper("ck_step.npz", step=-5)
    tamper("ck_nofp.npz", fingerprint=KeyError)
    tamper("ck_rng.npz", rng_state={"bit_generator": "PCG64", "state": {"state": 1, "inc": 3},
                                    "has_uint32": 0, "uinteger": 0})
    short = dict(arrays, state1=arrays["state1"][:-1])
    _save_ckpt(d / "ck_shape.npz", short, meta)
    (d / "ck_garbage.npz").write_bytes(os.urandom(300))
    raw_ck = ck.read_bytes()
    (d / "ck_trunc.npz").write_bytes(raw_ck[:len(raw_ck) // 2])
    return d


D, T, L = "small.npz", "t.pykd", "tl.npy"
TRAIN = ["train-teacher", "--hidden", "8", "--data", D]
DIST = ["distill", "--hidden", "4", "--data", D]
RESUME = ["train-teacher", "--hidden", "8", "--epochs", "2", "--data", D, "--out", "r.pykd",
          "--resume", "--checkpoint"]

#: (argv, a piece of the one-line message)
CASES = [
    # bad numbers and options
    (["train-teacher", "--epochs", "0"], "--epochs: must be >= 1"),
    (["distill", "--teacher-logits", L, "--epochs", "0"], "--epochs: must be >= 1"),
    (["train-teacher", "--epochs", "-3"], "must be >= 1"),
    (["train-teacher", "--epochs", "2.5"], "expected int"),
    (["train-teacher", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["train-teacher", "--lr", "0"], "--lr: must be > 0"),
    (["train-teacher", "--lr", "nan"], "must be finite"),
    (["train-teacher", "--lr-decay", "1.5"], "--lr-decay"),
    (["train-teacher", "--dropout", "1"], "--dropout"),
    (["train-teacher", "--seed", "-1"], "--seed"),
    (["train-teacher", "--threads", "0"], "--threads"),
    (["train-teacher", "--classes", "0"], "--classes"),
    (["train-teacher", "--classes", "70000"], "--classes: must be in [1, 65536]"),
    (["train-teacher", "--hidden", "12,x"], "layer widths"),
    (["train-teacher", "--hidden", "0"], "layer widths must be >= 1"),
    (["distill", "--teacher-logits", L, "--alpha", "2"], "--alpha"),
    (["distill", "--teacher-logits", L, "-T", "0"], "--temperature"),
    (["train-teacher", "--backend", "cuda"], "invalid choice"),
    (["train-teacher", "--alpha", "0.5"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
    (["soft-labels", "--teacher", T], "--out"),
    # conflicting options
    (["distill", "--teacher", T, "--teacher-logits", L], "not allowed with"),
    (DIST + ["--teacher-logits", L, "--hint-student-layer", "1"], "needs --teacher"),
    (DIST + ["--teacher-logits", L, "--hint-teacher-layer", "1"], "needs --teacher"),
    (DIST + ["--teacher", T, "--hint-teacher-layer", "1"], "needs --hint-student-layer"),
    (DIST + ["--teacher", T, "--hint-student-layer", "3"], "--hint-student-layer must be"),
    (DIST + ["--teacher", T, "--hint-student-layer", "1", "--hint-teacher-layer", "4"],
     "--hint-teacher-layer must be"),
    (TRAIN + ["--out", "same.pykd", "--checkpoint", "same.pykd"], "are the same file"),
    (TRAIN + ["--out", "x.pykd", "--report", "x.pykd"], "are the same file"),
    # missing inputs
    (["train-teacher", "--data", "nowhere"], "nowhere: no such file"),
    (["evaluate", "--model", "missing.pykd", "--data", D], "missing.pykd does not exist"),
    (["evaluate", "--model", T, "--teacher", "nope.pykd", "--data", D], "nope.pykd does not"),
    (DIST + ["--teacher-logits", "missing.npy"], "missing.npy does not exist"),
    (DIST + ["--teacher", "missing.pykd"], "missing.pykd does not exist"),
    (["soft-labels", "--teacher", "missing.pykd", "--out", "o.npy", "--data", D],
     "missing.pykd does not exist"),
    (TRAIN + ["--epochs", "1", "--out", "fresh.pykd", "--resume"], "no checkpoint"),
    # wrong kinds of file
    (["evaluate", "--model", "small.npz", "--data", D], "not a pykd model"),
    (["evaluate", "--model", "adir", "--data", D], "adir: the model file is a directory"),
    (["evaluate", "--model", "fifo.pykd", "--data", D], "fifo.pykd: the model file is not a "
                                                         "regular file"),
    (DIST + ["--teacher-logits", "small.npz"], "cannot read"),
    (DIST + ["--teacher-logits", T], "t.pykd"),
    (DIST + ["--teacher-logits", "adir"], "is a directory"),
    (["train-teacher", "--data", T], "expected a directory of IDX files or a .npz"),
    (["train-teacher", "--data", "adir"], "adir: missing"),
    (["train-teacher", "--data", "corrupt.npz"], "corrupt.npz"),
    (["train-teacher", "--data", "fifo.pykd"], "fifo.pykd: the dataset (--data) is neither"),
    (["evaluate", "--model", "/dev/null", "--data", D], "/dev/null: the model file is not a "
                                                        "regular file"),
    (DIST + ["--teacher", T, "--classes", "7", "--teacher-logits", L], "not allowed with"),
    (["evaluate", "--model", T, "--data", "other_features.npz"], "takes 12 inputs"),
    # corrupt models, logits, checkpoints
    (["evaluate", "--model", "trunc.pykd", "--data", D], "trunc.pykd"),
    (["evaluate", "--model", "flip.pykd", "--data", D], "flip.pykd"),
    (["evaluate", "--model", "deep.pykd", "--data", D], "deep.pykd: metadata is nested more"),
    (DIST + ["--teacher-logits", "tl_trunc.npy"], "tl_trunc.npy"),
    (DIST + ["--teacher-logits", "tl_huge.npy"], "tl_huge.npy"),
    (DIST + ["--teacher-logits", "tl_narrow.npy"], f"must have shape ({N_TRAIN}, {N_CLASSES})"),
    (DIST + ["--teacher-logits", "tl_int.npy"], "tl_int.npy"),
    (DIST + ["--teacher-logits", "tl_nan.npy"], "contain NaN"),
    (RESUME + ["ck_garbage.npz"], "ck_garbage.npz: not a readable pykd checkpoint"),
    (RESUME + ["ck_trunc.npz"], "ck_trunc.npz: not a readable pykd checkpoint"),
    (RESUME + ["ck_epoch.npz"], "ck_epoch.npz: cannot resume: epoch must be"),
    (RESUME + ["ck_step.npz"], "ck_step.npz: cannot resume: step must be"),
    (RESUME + ["ck_nofp.npz"], "ck_nofp.npz: cannot resume: the checkpoint has no fingerprint"),
    (RESUME + ["ck_rng.npz"], "ck_rng.npz: cannot resume: rng_state"),
    (RESUME + ["ck_shape.npz"], "ck_shape.npz: cannot resume: array 'state1' has shape"),
    (["train-teacher", "--hidden", "9", "--epochs", "2", "--data", D, "--out", "r.pykd",
      "--resume", "--checkpoint", "t.pykd.ckpt.npz"], "different run (differs in: sizes)"),
    # labels and classes
    (TRAIN + ["--data", "testlabel.npz"], "testlabel.npz: test label 7 is outside the training "
                                          "set's 5 classes"),
    (TRAIN + ["--data", "huge_label.npz"], "huge_label.npz: the training labels go up to "
                                           "1000000000, but at most 65536"),
    (TRAIN + ["--classes", "3"], "small.npz: training label 3 is outside the --classes 3"),
    (DIST + ["--data", "testlabel.npz", "--teacher-logits", L], "test label 7"),
    (DIST + ["--teacher", T, "--classes", "6"], "t.pykd: the teacher has 5 outputs"),
    (DIST + ["--teacher-logits", L, "--classes", "6"], "must have shape (160, 6)"),
    (["evaluate", "--model", T, "--data", "testlabel.npz"], "testlabel.npz: test label 7 is "
                                                             "outside"),
    (["evaluate", "--model", T, "--data", "trainonly.npz"], "the test split is empty"),
    # outputs, checked before any training
    (TRAIN + ["--out", "adir"], "adir: the model (--out) is a directory"),
    (TRAIN + ["--out", "no/such/dir/m.pykd"], "directory"),
    (TRAIN + ["--out", "fifo.pykd"], "not a regular file"),
    (TRAIN + ["--report", "no/such/r.json"], "does not exist"),
    (TRAIN + ["--checkpoint", "adir"], "the checkpoint (--checkpoint) is a directory"),
    (["soft-labels", "--teacher", T, "--out", "adir", "--data", D], "is a directory"),
    (["evaluate", "--model", T, "--data", D, "--report", "adir"], "the report (--report) is a "
                                                                   "directory"),
    (["demo", "--quick", "--data", D, "--out", T], "--out must be a directory"),
    # regression and CSV data (issues 14, 17): options with no effect, bad files
    (DIST + ["--data", "reg.npz", "--teacher-outputs", "to.npy", "-T", "3"],
     "-T/--temperature has no effect on a regression task"),
    (TRAIN + ["--data", "reg.npz", "--classes", "3"], "--classes has no effect on a regression"),
    (TRAIN + ["--loss", "huber"], "--loss has no effect on a classification task"),
    (TRAIN + ["--huber-delta", "0.5"], "--huber-delta has no effect on a classification task"),
    (TRAIN + ["--data", "reg.npz", "--huber-delta", "0.5"],
     "--huber-delta applies to --loss huber only (the loss is mse)"),
    (TRAIN + ["--data", "reg.npz", "--config", "hd.toml"], "--huber-delta applies to --loss"),
    (TRAIN + ["--data", "reg.npz", "--huber-delta", "0"], "--huber-delta: must be > 0"),
    (TRAIN + ["--data", "reg.npz", "--loss", "l1"], "invalid choice"),
    (TRAIN + ["--data", "reg.npz", "--norm", "minmax"], "invalid choice"),
    (TRAIN + ["--task", "ranking"], "invalid choice"),
    (DIST + ["--data", "reg.npz", "--teacher-logits", L],
     "--teacher-logits has no effect on a regression task: for regression give "
     "--teacher-outputs"),
    (DIST + ["--teacher-outputs", "to.npy"], "--teacher-outputs has no effect on a "
                                              "classification task"),
    (DIST + ["--data", "reg.npz", "--teacher-outputs", "to_narrow.npy"],
     f"to_narrow.npy: teacher outputs must have shape ({N_TRAIN}, 2)"),
    (DIST + ["--data", "reg.npz", "--teacher-outputs", "missing.npy"], "missing.npy does not"),
    (DIST + ["--data", "reg.npz", "--teacher", T], "t.pykd: the teacher has 5 outputs but the "
                                                   "data has 2 target columns"),
    (DIST + ["--teacher", "reg.pykd"], "reg.pykd: the teacher is a regression model but the "
                                        "data is a classification set"),
    (["evaluate", "--model", "reg.pykd", "--data", "reg3.npz"],
     "reg.pykd: the model has 2 outputs but the data has 3 target columns"),
    (["evaluate", "--model", "reg.pykd", "--data", D, "--task", "regression"],
     "the model has 2 outputs but the data has 1 target column"),
    (["soft-labels", "--teacher", "reg.pykd", "--out", "o.npy", "--data", "reg.npz", "-T", "2"],
     "-T/--temperature has no effect on a regression task"),
    (["predict", "--model", "reg.pykd", "--data", "to.npy", "--out", "p.npy", "--labels"],
     "--labels has no effect on a regression model"),
    (["demo", "--quick", "--data", "reg.npz", "--out", "dd"], "pykd demo is for classification"),
    (["quantize", "--model", "reg.pykd", "--out", "q.pykd", "--data", "reg.npz", "--loss", "mse"],
     "--loss is a fine-tuning option"),
    (TRAIN + ["--data", "reg.csv"], "reg.csv: a CSV dataset needs --target-columns"),
    (TRAIN + ["--data", "reg.csv", "--target-columns", "u,zz"],
     "reg.csv: target column 'zz' is not in the header; the columns are: x0, x1"),
    (TRAIN + ["--data", "reg.csv", "--target-columns", "u,"], "--target-columns: expected"),
    (TRAIN + ["--target-columns", "u"], "--target-columns is for a CSV dataset"),
    (TRAIN + ["--test-data", "reg.csv"], "--test-data is for a CSV dataset"),
    (TRAIN + ["--data", "reg.csv", "--target-columns", "u", "--test-data", "none.csv"],
     "none.csv does not exist"),
    (TRAIN + ["--data", "reg.csv", "--target-columns", "u", "--test-fraction", "1.5"],
     "--test-fraction: must be in (0, 1)"),
    (TRAIN + ["--data", "reg.csv", "--target-columns", "u", "--test-fraction", "0.2",
              "--test-data", "reg.csv"], "not allowed with"),
    (TRAIN + ["--test-fraction", "0.2"], "small.npz: the dataset has a test split already"),
    (TRAIN + ["--data", "bad.csv", "--target-columns", "y"],
     "bad.csv: line 3, column 2 ('b'): 'oops' is not a number"),
    (TRAIN + ["--data", "ragged.csv", "--target-columns", "y"],
     "ragged.csv: line 3 has 4 fields but the header has 3"),
    (TRAIN + ["--data", "empty.csv", "--target-columns", "y"], "empty.csv: the file is empty"),
    (TRAIN + ["--data", "twolabels.csv", "--target-columns", "y,z"],
     "classification takes one label column, got 2"),
    (["evaluate", "--model", T, "--data", "reg.csv", "--target-columns", "u,v,x0,x1,x2,x3,x4,"
      "x5,x6,x7,x8,x9,x10,x11"], "every column is a target"),
]


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_bad_invocation(work, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(work)
    before = set(os.listdir(work))
    code, out, err = run(list(argv) + ["--quiet"], capsys)
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and 'File "' not in err
    assert message in lines[0], lines[0]
    assert lines[0].startswith("pykd"), lines[0]
    assert set(os.listdir(work)) == before            # nothing written, no temp files


def test_table_is_large():
    assert len(CASES) >= 40


def test_unwritable_directory(work, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(work)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):          # root: simulate what a read-only directory says
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if os.fspath(p) == str(ro)
                            else real(p, m, **k))
    try:
        code, _, err = run(TRAIN + ["--epochs", "1", "--out", ro / "m.pykd", "--quiet"], capsys)
    finally:
        ro.chmod(0o700)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"directory {ro} is not writable" in err
    assert not (work / "m.pykd").exists()


def test_disk_full_names_the_file(work, monkeypatch, capsys):
    """ENOSPC during the first save (the epoch-end checkpoint): exit 2, one
    line naming the checkpoint, no temporary file left behind."""
    monkeypatch.chdir(work)
    before = set(os.listdir(work))

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run(TRAIN + ["--epochs", "1", "--out", "full.pykd", "--quiet"], capsys)
    assert code == 2, err
    (line,) = err.splitlines()
    assert "full.pykd.ckpt.npz: cannot write the checkpoint (No space left on device)" in line
    assert set(os.listdir(work)) == before


@pytest.mark.parametrize("exc, message", [
    (MemoryError("Unable to allocate 33.0 GiB"), "out of memory (Unable to allocate 33.0 GiB)"),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    (KeyError("fingerprint"), "KeyError: 'fingerprint' (run with --debug for a traceback)"),
    (AttributeError("'list' object has no attribute 'get'"), "AttributeError: 'list' object"),
    (OSError(errno.EIO, "Input/output error", "t.pykd"), "t.pykd: Input/output error"),
    (PermissionError(errno.EACCES, "Permission denied", "x.npz"), "x.npz: Permission denied"),
    (TypeError("bad\nmulti-line\nmessage"), "bad multi-line message"),
])
def test_every_exception_is_one_line(work, monkeypatch, capsys, exc, message):
    monkeypatch.chdir(work)

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(cli, "load_dataset", boom)
    code, _, err = run(TRAIN + ["--epochs", "1", "--out", "boom.pykd", "--quiet"], capsys)
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("pykd train-teacher: error: ") and message in line, line


def test_debug_flag_prints_the_traceback(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    for argv in (["--debug", "evaluate", "--model", "trunc.pykd", "--data", D],
                 ["evaluate", "--model", "trunc.pykd", "--data", D, "--debug"]):
        code, _, err = run(argv, capsys)
        assert code == 2
        assert "Traceback (most recent call last)" in err
        assert err.splitlines()[-1].startswith("pykd evaluate: error: ")
    monkeypatch.setenv("PYKD_DEBUG", "1")
    code, _, err = run(["evaluate", "--model", "trunc.pykd", "--data", D], capsys)
    assert code == 2 and "Traceback" in err


def test_debug_traceback_in_a_subprocess(work):
    env = {k: v for k, v in os.environ.items() if k != "PYKD_DEBUG"}
    args = [sys.executable, "-m", "pykd", "evaluate", "--model", "missing.pykd", "--data", D]
    plain = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=60, env=env)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1
    assert "Traceback" not in plain.stderr
    dbg = subprocess.run(args + ["--debug"], cwd=work, capture_output=True, text=True,
                         timeout=60, env=env)
    assert dbg.returncode == 2 and "Traceback (most recent call last)" in dbg.stderr
    assert "missing.pykd does not exist" in dbg.stderr.splitlines()[-1]


# -------------------------------------------------- things that must work

def test_history_metadata_not_a_dict_is_ignored(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    code, out, err = run(["evaluate", "--model", "listhistory.pykd", "--data", D, "--quiet"],
                         capsys)
    assert code == 0, err
    assert "accuracy" in out


def test_report_dash_writes_json_to_stdout(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    code, out, err = run(["evaluate", "--model", T, "--data", D, "--report", "-", "--quiet"],
                         capsys)
    assert code == 0, err
    report = json.loads(out)                  # stdout is the JSON alone
    assert report["command"] == "evaluate" and report["models"][0]["path"] == T
    assert "test accuracy" in err              # the result lines went to stderr
    assert not (work / "-").exists()


def test_batch_larger_than_the_dataset_is_one_batch(work, monkeypatch, capsys):
    monkeypatch.chdir(work)
    common = ["train-teacher", "--hidden", "6", "--epochs", "2", "--data", D, "--quiet",
              "--dropout", "0"]
    code, _, err = run(common + ["--batch-size", "1000000", "--out", "big.pykd"], capsys)
    assert code == 0, err
    (line,) = err.splitlines()
    assert line == (f"pykd train-teacher: warning: --batch-size 1000000 is larger than the "
                    f"training set ({N_TRAIN} rows): every epoch of teacher is one batch of all "
                    f"{N_TRAIN} rows")
    code, _, err = run(common + ["--batch-size", str(N_TRAIN), "--out", "exact.pykd"], capsys)
    assert code == 0 and err == ""
    a, b = load_model(work / "big.pykd"), load_model(work / "exact.pykd")
    assert np.array_equal(a.params, b.params)


def test_classes_option_adds_outputs(work, monkeypatch, capsys):
    """--classes N: N outputs even when the training set lacks the top classes."""
    monkeypatch.chdir(work)
    code, _, err = run(TRAIN + ["--epochs", "1", "--classes", "8", "--out", "c8.pykd",
                                "--quiet"], capsys)
    assert code == 0, err
    assert load_model(work / "c8.pykd").n_outputs == 8
    code, _, err = run(["evaluate", "--model", "c8.pykd", "--data", "testlabel.npz",
                        "--quiet"], capsys)
    assert code == 0, err           # label 7 is within the model's 8 outputs


def test_help_documents_batch_size_and_exit_codes(capsys):
    assert cli.main(["train-teacher", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "one larger than the training set means one batch of the whole set" in out
    assert "--debug" in out and "--classes" in out
    assert cli.main(["--help"]) == 0
    assert "2 bad input" in " ".join(capsys.readouterr().out.split())
