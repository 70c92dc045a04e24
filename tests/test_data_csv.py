"""CSV datasets and the task of a dataset (issues 14 and 17): pykd.data.read_csv
and load_dataset(task=, target_columns=, test_data=, test_fraction=, seed=).

The reference for every parsed value is Python's own csv module and float()."""
import csv
import warnings

import numpy as np
import pytest

from pykd import data
from pykd.data import DatasetError, IntegerTargetsWarning, load_dataset, read_csv


def _write(path, header, rows, newline="\n"):
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    path.write_text(newline.join(lines) + newline, encoding="utf-8")
    return path


def _reference(path):
    """(header, float64 rows) by the csv module: independent of NumPy."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r]
    return rows[0], np.array([[float(v) for v in r] for r in rows[1:]])


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(3)
    A = rng.standard_normal((40, 5)) * [1, 10, 0.01, 3, 100]
    rows = [[repr(float(v)) for v in r] for r in A]
    return _write(tmp_path / "t.csv", ["x0", "x1", "u", "x3", "v"], rows)


def test_values_columns_and_dtypes(table):
    _, ref = _reference(table)
    X, y, features, targets = read_csv(table, ["v", "u"])
    assert features == ("x0", "x1", "x3") and targets == ("v", "u")
    assert X.dtype == np.float32 and X.flags.c_contiguous and X.shape == (40, 3)
    assert np.array_equal(X, ref[:, [0, 1, 3]].astype(np.float32))
    assert y.dtype == np.float64 and np.array_equal(y, ref[:, [4, 2]])
    ds = load_dataset(table, target_columns=["v", "u"])
    assert ds.task == "regression" and ds.n_outputs == 2 and ds.n_classes == 0
    assert ds.y_train.dtype == np.float64 and ds.y_train.shape == (40, 2)
    assert np.array_equal(ds.y_train, ref[:, [4, 2]])
    assert ds.X_test.shape == (0, 3) and ds.y_test.shape == (0, 2)
    assert ds.target_names == ("v", "u") and ds.feature_names == ("x0", "x1", "x3")


def test_bom_crlf_quotes_blank_lines(tmp_path):
    p = tmp_path / "w.csv"
    p.write_bytes(b'\xef\xbb\xbf"a", b ,c\r\n1,2,3.5\r\n\r\n4, 5 ,6.25\r\n')
    X, y, features, _ = read_csv(p, ["c"])
    assert features == ("a", "b")
    assert np.array_equal(X, [[1, 2], [4, 5]]) and np.array_equal(y, [[3.5], [6.25]])


def test_integer_column_is_classification(tmp_path):
    rows = [[i * 0.5, i % 3] for i in range(9)]
    p = _write(tmp_path / "c.csv", ["f", "label"], rows)
    ds = load_dataset(p, target_columns=["label"])
    assert ds.task == "classification" and ds.y_train.dtype == np.int64
    assert ds.y_train.shape == (9,) and np.array_equal(ds.y_train, [i % 3 for i in range(9)])
    assert ds.n_classes == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # explicit: no warning
        reg = load_dataset(p, target_columns=["label"], task="regression")
    assert reg.task == "regression" and reg.y_train.dtype == np.float32
    assert np.array_equal(reg.y_train[:, 0], [i % 3 for i in range(9)])


def test_float_written_integers_warn(tmp_path):
    p = _write(tmp_path / "f.csv", ["f", "y"], [[i, f"{i % 2}.0"] for i in range(6)])
    with pytest.warns(IntegerTargetsWarning, match="--task classification"):
        ds = load_dataset(p, target_columns=["y"])
    assert ds.task == "regression"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls = load_dataset(p, target_columns=["y"], task="classification")
    assert cls.task == "classification" and np.array_equal(cls.y_train, [0, 1, 0, 1, 0, 1])


def test_npz_task_rules(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 3))
    np.savez(tmp_path / "r.npz", X=X, y=rng.standard_normal(8))
    ds = load_dataset(tmp_path / "r.npz")
    assert ds.task == "regression" and ds.y_train.shape == (8, 1)
    assert ds.y_train.dtype == np.float64                     # as stored
    np.savez(tmp_path / "r32.npz", X=X, y=rng.standard_normal(8).astype(np.float32))
    assert load_dataset(tmp_path / "r32.npz").y_train.dtype == np.float32
    np.savez(tmp_path / "r2.npz", X_train=X, y_train=rng.standard_normal((8, 2)),
             X_test=X[:3], y_test=rng.standard_normal((3, 2)))
    ds = load_dataset(tmp_path / "r2.npz")
    assert ds.y_test.shape == (3, 2) and ds.n_outputs == 2
    np.savez(tmp_path / "i.npz", X=X, y=np.arange(8.0))
    with pytest.warns(IntegerTargetsWarning):
        assert load_dataset(tmp_path / "i.npz").task == "regression"
    assert load_dataset(tmp_path / "i.npz", task="classification").y_train.dtype == np.int64
    np.savez(tmp_path / "half.npz", X=X, y=np.arange(8.0) / 2)
    with pytest.raises(DatasetError, match=r"y_train\[1\] = 0.5 is not an integer"):
        load_dataset(tmp_path / "half.npz", task="classification")
    np.savez(tmp_path / "int.npz", X=X, y=np.arange(8) - 3)
    with pytest.raises(DatasetError, match="negative labels .*--task regression"):
        load_dataset(tmp_path / "int.npz")
    ds = load_dataset(tmp_path / "int.npz", task="regression")
    assert np.array_equal(ds.y_train[:, 0], np.arange(8) - 3)
    y = rng.standard_normal((8, 2))
    y[5, 1] = np.nan
    np.savez(tmp_path / "nan.npz", X=X, y=y)
    with pytest.raises(DatasetError, match=r"y_train\[5, 1\] = nan is not finite"):
        load_dataset(tmp_path / "nan.npz")
    y[5, 1] = 1e39
    np.savez(tmp_path / "big.npz", X=X, y=y)
    with pytest.raises(DatasetError, match="beyond float32"):
        load_dataset(tmp_path / "big.npz")
    np.savez(tmp_path / "w.npz", X_train=X, y_train=rng.standard_normal((8, 2)),
             X_test=X[:3], y_test=rng.standard_normal((3, 3)))
    with pytest.raises(DatasetError, match="2 target columns but y_test has 3"):
        load_dataset(tmp_path / "w.npz")
    with pytest.raises(ValueError, match="task must be one of"):
        load_dataset(tmp_path / "r.npz", task="ranking")


def test_test_fraction_is_seeded(table):
    _, ref = _reference(table)
    a = load_dataset(table, target_columns=["v"], test_fraction=0.25, seed=7)
    b = load_dataset(table, target_columns=["v"], test_fraction=0.25, seed=7)
    c = load_dataset(table, target_columns=["v"], test_fraction=0.25, seed=8)
    assert a.X_test.shape[0] == 10 and a.X_train.shape[0] == 30
    assert np.array_equal(a.X_test, b.X_test) and np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.X_test, c.X_test)
    # the rows of the generator's permutation, each split in file order
    test = np.sort(np.random.default_rng(7).permutation(40)[:10])
    train = np.setdiff1d(np.arange(40), test)
    assert np.array_equal(a.y_test[:, 0], ref[test, 4])
    assert np.array_equal(a.y_train[:, 0], ref[train, 4])


def test_test_fraction_of_an_xy_npz(tmp_path):
    X = np.arange(20.0).reshape(10, 2)
    np.savez(tmp_path / "xy.npz", X=X, y=np.arange(10) % 2)
    ds = load_dataset(tmp_path / "xy.npz", test_fraction=0.3, seed=1)
    assert ds.X_test.shape == (3, 2) and ds.task == "classification"
    assert sorted(ds.X_train[:, 0].tolist() + ds.X_test[:, 0].tolist()) == X[:, 0].tolist()
    np.savez(tmp_path / "split.npz", X_train=X, y_train=np.arange(10) % 2, X_test=X[:2],
             y_test=np.zeros(2, int))
    with pytest.raises(DatasetError, match="has a test split already"):
        load_dataset(tmp_path / "split.npz", test_fraction=0.3)


def test_test_file_with_columns_in_another_order(tmp_path, table):
    _, ref = _reference(table)
    cols = ["v", "x3", "u", "x1", "x0"]
    rows = [[repr(float(r[[4, 3, 2, 1, 0][k]])) for k in range(5)] for r in ref[:6]]
    test = _write(tmp_path / "test.csv", cols, rows)
    ds = load_dataset(table, target_columns=["u"], test_data=test)
    assert np.array_equal(ds.X_test, ds.X_train[:6]) and np.array_equal(ds.y_test, ds.y_train[:6])
    other = _write(tmp_path / "other.csv", ["x0", "x1", "u", "z", "v"], rows)
    with pytest.raises(DatasetError, match="other.csv: the test file's columns differ.*lacks "
                                           "'x3'.*extra 'z'"):
        load_dataset(table, target_columns=["u"], test_data=other)


BAD = [
    ("", ["y"], "the file is empty"),
    ("a,y\n", ["y"], "no data rows"),
    ("\na,y\n1,2\n", ["y"], "line 1 is blank"),
    ("a,y\n1,2\n3,4,5\n", ["y"], "line 3 has 3 fields but the header has 2"),
    ("a,y\n1,2\n\n3\n", ["y"], "line 4 has 1 field but the header has 2"),
    ("a,y\n1,2\n3,x\n", ["y"], "line 3, column 2 ('y'): 'x' is not a number"),
    ("a,y\n1,2\n,4\n", ["y"], "line 3, column 1 ('a'): an empty cell"),
    ("a,y\n1,2\n\n\n3,nan\n", ["y"], "line 5, column 2 ('y'): nan is not a finite number"),
    ("a,y\r\n1,2\r\n-inf,4\r\n", ["y"], "line 3, column 1 ('a'): -inf is not a finite number"),
    ("a,y\n1,2\n1e39,4\n", ["y"], "line 3, column 1 ('a'): 1e+39 is beyond float32"),
    ("a,y,a\n1,2,3\n", ["y"], "duplicate column names in the header: 'a'"),
    ("a,,y\n1,2,3\n", ["y"], "column 2 of the header (line 1) has no name"),
    ("a,y\n1,2\n", ["z"], "target column 'z' is not in the header; the columns are: a, y"),
    ("a,y\n1,2\n", ["y", "y"], "target column 'y' is named twice"),
    ("a,y\n1,2\n", ["a", "y"], "every column is a target"),
    ("1,2\n3,4\n", ["y"], "line 1 looks like data"),
    ("a,y,z\n1,2,3\n", ["y", "z"], "classification takes one label column, got 2"),
]


@pytest.mark.parametrize("text, targets, message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_csv(tmp_path, text, targets, message):
    p = tmp_path / "bad.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match=f"^{p}: ") as e:
        load_dataset(p, target_columns=targets)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_not_text_and_not_a_file(tmp_path):
    p = tmp_path / "bin.csv"
    p.write_bytes(b"a,y\n1,2\n\xff\xfe\x00\x01\n")
    with pytest.raises(DatasetError, match="bin.csv: not UTF-8 text"):
        load_dataset(p, target_columns=["y"])
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(DatasetError, match="is a directory"):
        load_dataset(tmp_path / "d.csv", target_columns=["y"])
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "none.csv", target_columns=["y"])
    _write(tmp_path / "ok.csv", ["a", "y"], [[1, 2]])
    with pytest.raises(DatasetError, match="needs --target-columns .* the columns are: a, y"):
        load_dataset(tmp_path / "ok.csv")
    np.savez(tmp_path / "n.npz", X=np.zeros((2, 2)), y=np.zeros(2, int))
    with pytest.raises(ValueError, match="for a CSV dataset"):
        load_dataset(tmp_path / "n.npz", target_columns=["y"])


def test_fraction_leaving_an_empty_split(tmp_path):
    p = _write(tmp_path / "s.csv", ["a", "y"], [[1, 2.5], [3, 4.5], [5, 6.5]])
    with pytest.raises(DatasetError, match="leaves 0 test rows and 3 training rows"):
        load_dataset(p, target_columns=["y"], test_fraction=0.1)
    with pytest.raises(DatasetError, match="leaves 3 test rows and 0 training rows"):
        load_dataset(p, target_columns=["y"], test_fraction=0.9)


def test_shape_checked_before_parsing(tmp_path, monkeypatch):
    """A ragged last row is found by the line scan, before NumPy parses (and
    allocates) anything."""
    rows = [[i, i + 0.5] for i in range(500)] + [[1, 2, 3]]
    p = _write(tmp_path / "r.csv", ["a", "y"], rows)

    def no(*a, **k):
        raise AssertionError("parsed before the shape was checked")
    monkeypatch.setattr(data.np, "loadtxt", no)
    with pytest.raises(DatasetError, match="line 502 has 3 fields"):
        read_csv(p, ["y"])
