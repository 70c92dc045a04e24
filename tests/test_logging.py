"""pykd logs through logging, never print (issue 17): the library adds only a
NullHandler; fit's and fine-tuning's per-epoch lines are INFO records of
pykd.train / pykd.compress.finetune; the pykd command shows them (and its
own messages) on stderr, hides the INFO ones with --quiet, and leaves the
logging configuration as it found it."""
import logging
import re

import numpy as np
import pytest

import pykd
from pykd.cli import main

EPOCH_LINE = re.compile(r"^t epoch (\d)/2: loss \d+\.\d{4}, train accuracy \d\.\d{4}, test "
                        r"accuracy \d\.\d{4} \(\d+\.\d\d s, [\d,]+ samples/s\)$")


def _data(n=60, f=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n).astype(np.int64)
    X = (np.eye(c, f)[y] + 0.3 * rng.standard_normal((n, f))).astype(np.float32)
    return X, y


def test_the_library_configures_nothing_but_a_null_handler():
    log = logging.getLogger("pykd")
    assert [type(h) for h in log.handlers] == [logging.NullHandler]
    assert log.level == logging.NOTSET and log.propagate


@pytest.mark.fortran
def test_fit_logs_its_epoch_lines(caplog, capsys):
    X, y = _data()
    with caplog.at_level(logging.INFO, logger="pykd"):
        pykd.fit(pykd.MLP([5, 4, 3]), X, y, epochs=2, X_val=X, y_val=y, progress=True,
                 desc="t")
    records = [r for r in caplog.records if r.name == "pykd.train"]
    assert [r.levelno for r in records] == [logging.INFO] * 2
    assert [EPOCH_LINE.match(r.getMessage()).group(1) for r in records] == ["1", "2"]
    assert capsys.readouterr().err == ""       # no print: without a handler, nothing shows
    caplog.clear()
    pykd.fit(pykd.MLP([5, 4, 3]), X, y, epochs=2, progress=False)
    assert not [r for r in caplog.records if r.name.startswith("pykd")]


@pytest.mark.fortran
def test_fine_tuning_logs_its_epoch_lines(caplog):
    X, y = _data()
    net = pykd.low_rank(pykd.MLP([5, 8, 3], seed=1), rank=2)
    with caplog.at_level(logging.INFO, logger="pykd"):
        pykd.compress.fine_tune(net, pykd.FineTune(X, y, epochs=2, progress=True))
    lines = [r.getMessage() for r in caplog.records if r.name == "pykd.compress.finetune"]
    assert [line.split(":")[0] for line in lines] == ["fine-tune epoch 1/2", "fine-tune epoch 2/2"]


@pytest.mark.fortran
def test_the_command_prints_the_records_on_stderr(tmp_path, capsys):
    X, y = _data(n=200)
    np.savez(tmp_path / "d.npz", X_train=X, y_train=y, X_test=X[:20], y_test=y[:20])
    base = ["train-teacher", "--data", str(tmp_path / "d.npz"), "--hidden", "4", "--epochs",
            "2", "--batch-size", "32", "--out", str(tmp_path / "t.pykd")]
    before = logging.getLogger("pykd")
    saved = (list(before.handlers), before.level, before.propagate)
    assert main(base) == 0
    err = capsys.readouterr().err.splitlines()
    epochs = [line for line in err if line.startswith("teacher epoch")]
    assert [e.split(":")[0] for e in epochs] == ["teacher epoch 1/2", "teacher epoch 2/2"]
    assert any(line.startswith("teacher: training 5-4-3") for line in err)   # the CLI's own
    assert (list(before.handlers), before.level, before.propagate) == saved
    # --quiet: the INFO lines go; a warning stays.
    assert main(base + ["--quiet", "--batch-size", "1000"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["pykd train-teacher: warning: --batch-size 1000 is larger than the training "
                   "set (200 rows): every epoch of teacher is one batch of all 200 rows"]
