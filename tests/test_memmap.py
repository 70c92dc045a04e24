"""Datasets larger than memory: a directory of .npy files, memory-mapped
(issue 16). fit reads, converts and normalises each batch instead of keeping
a normalised copy, and must give the bits of the in-memory path."""
import os
import subprocess
import sys

import numpy as np
import pytest

import pykd
from pykd.data import DatasetError, ScaledImages, load_dataset, take_rows
from pykd.train import _norm_stats

SIZES = [20, 16, 3]


def _write_dir(d, X_train, y_train, X_test, y_test):
    d.mkdir(exist_ok=True)
    for name, a in (("X_train", X_train), ("y_train", y_train), ("X_test", X_test),
                    ("y_test", y_test)):
        np.save(d / f"{name}.npy", a)
    return d


def _data(rng, n=300, n_test=50, dtype=np.uint8):
    if dtype == np.uint8:
        X = rng.integers(0, 256, (n + n_test, 4, 5), dtype=np.uint8)
    else:
        X = rng.standard_normal((n + n_test, 20)).astype(np.float32)
    y = rng.integers(0, 3, n + n_test)
    return X[:n], y[:n], X[n:], y[n:]


def _train(X, y, X_val=None, y_val=None, cfg=None, **kw):
    model = pykd.MLP(SIZES, seed=3)
    cfg = cfg or pykd.TrainConfig(lr=1e-2, dropout=0.2, seed=5)
    hist = pykd.fit(model, X, y, cfg=cfg, epochs=2, batch_size=32, progress=False,
                    X_val=X_val, y_val=y_val, **kw)
    return model, hist


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_mapped_directory_trains_to_the_same_bits(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arrays = _data(rng, dtype=dtype)
    mapped = load_dataset(_write_dir(tmp_path / "npy", *arrays))
    np.savez(tmp_path / "mem.npz", X_train=arrays[0], y_train=arrays[1], X_test=arrays[2],
             y_test=arrays[3])
    mem = load_dataset(tmp_path / "mem.npz")
    if dtype == np.uint8:
        assert isinstance(mapped.X_train, ScaledImages)
        assert isinstance(mapped.X_train.raw, np.memmap) and mapped.X_train.shape == (300, 20)
    else:
        assert isinstance(mapped.X_train, np.memmap) and not mapped.X_train.flags.writeable
    assert type(mem.X_train) is np.ndarray
    np.testing.assert_array_equal(np.asarray(mapped.X_train), mem.X_train)
    assert _norm_stats(mapped.X_train) == _norm_stats(mem.X_train)
    a, ha = _train(mapped.X_train, mapped.y_train, mapped.X_test, mapped.y_test)
    b, hb = _train(mem.X_train, mem.y_train, mem.X_test, mem.y_test)
    assert a.norm == b.norm
    np.testing.assert_array_equal(a.params, b.params)
    assert ha["loss"] == hb["loss"] and ha["test_accuracy"] == hb["test_accuracy"]
    ea = pykd.evaluate(a, mapped.X_train, mapped.y_train, teacher=b)
    eb = pykd.evaluate(b, mem.X_train, mem.y_train, teacher=b)
    assert ea == eb and ea["agreement"] == 1.0
    np.testing.assert_array_equal(pykd.soft_labels(b, mapped.X_train, batch_size=64),
                                  pykd.soft_labels(b, mem.X_train, batch_size=64))


def test_distill_from_mapped_uint8(tmp_path):
    rng = np.random.default_rng(1)
    ds = load_dataset(_write_dir(tmp_path / "npy", *_data(rng)))
    X_mem = np.asarray(ds.X_train)
    teacher, _ = _train(X_mem, ds.y_train)
    logits = pykd.soft_labels(teacher, ds.X_train)
    cfg = pykd.TrainConfig(loss="kd", lr=1e-2, seed=2)
    a, _ = _train(ds.X_train, ds.y_train, cfg=cfg, teacher_logits=logits)
    b, _ = _train(X_mem, ds.y_train, cfg=cfg, teacher_logits=logits)
    np.testing.assert_array_equal(a.params, b.params)


def test_take_rows_against_numpy():
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (40, 7), dtype=np.uint8)
    idx = rng.permutation(40)[:9]
    out = np.full((12, 7), np.nan, np.float32)
    got = take_rows(ScaledImages(raw), idx, out)
    assert got.base is out or got is out[:9] or np.shares_memory(got, out)
    np.testing.assert_array_equal(got, (raw[idx].astype(np.float64) / 255).astype(np.float32))
    assert np.isnan(out[9:]).all()
    Xf = rng.standard_normal((40, 7)).astype(np.float32)
    np.testing.assert_array_equal(take_rows(Xf, idx, out), Xf[idx])


def test_bad_mapped_files(tmp_path):
    rng = np.random.default_rng(3)
    X, y, Xt, yt = _data(rng, n=10, n_test=4)
    d = _write_dir(tmp_path / "d", X, y, Xt, yt)
    os.remove(d / "y_test.npy")
    with pytest.raises(DatasetError, match="missing y_test.npy"):
        load_dataset(d)
    np.save(d / "y_test.npy", yt)
    np.save(d / "X_train.npy", X.astype(np.int16))
    with pytest.raises(DatasetError, match=r"X_train must be uint8 .* or float32 .* got dtype int16"):
        load_dataset(d)
    np.save(d / "X_train.npy", X.astype(">f4"))
    with pytest.raises(DatasetError, match="got dtype >f4"):
        load_dataset(d)
    np.save(d / "X_train.npy", np.asfortranarray(X.reshape(10, 20)))
    with pytest.raises(DatasetError, match="Fortran order"):
        load_dataset(d)
    np.save(d / "X_train.npy", X)
    with open(d / "X_train.npy", "r+b") as f:        # cut the last row short
        f.truncate(os.path.getsize(d / "X_train.npy") - 3)
    with pytest.raises(DatasetError, match=r"X_train.npy: X_train: truncated: .*\(200 bytes\)"):
        load_dataset(d)
    np.save(d / "X_train.npy", X)
    np.save(d / "y_train.npy", y[:9])
    with pytest.raises(DatasetError, match="train set has 10 images but 9 labels"):
        load_dataset(d)
    np.save(d / "y_train.npy", y)
    Xf = rng.standard_normal((10, 20)).astype(np.float32)
    Xf[7, 3] = np.inf
    np.save(d / "X_train.npy", Xf)
    with pytest.raises(DatasetError, match="X_train contains NaN or infinite"):
        load_dataset(d)
    np.save(d / "X_train.npy", X.reshape(10, 20)[:, :19])
    with pytest.raises(DatasetError, match="train images have 19 features but test images have 20"):
        load_dataset(d)
    np.save(d / "X_train.npy", np.zeros((0, 20), np.uint8))
    np.save(d / "y_train.npy", np.zeros(0, np.int64))
    assert load_dataset(d).X_train.shape == (0, 20)


def test_cli_trains_from_a_mapped_directory(tmp_path):
    rng = np.random.default_rng(4)
    d = _write_dir(tmp_path / "npy", *_data(rng, n=200, n_test=40))
    out = tmp_path / "t.pykd"
    r = subprocess.run([sys.executable, "-m", "pykd", "train-teacher", "--data", str(d),
                        "--hidden", "8", "--epochs", "1", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    m = pykd.load_model(out)
    ds = load_dataset(d)
    assert m.sizes == [20, 8, 3]
    assert 0 <= pykd.evaluate(m, ds.X_test, ds.y_test)["accuracy"] <= 1


def test_memory_stays_bounded(tmp_path):
    """fit on a mapped uint8 set does not make a float32 copy of it: the
    child's peak RSS grows by far less than the 4x-size float32 copy."""
    rng = np.random.default_rng(5)
    n, f = 40_000, 784                       # 31 MB of uint8, a 125 MB float32 copy
    d = tmp_path / "big"
    d.mkdir()
    X = np.lib.format.open_memmap(d / "X_train.npy", mode="w+", dtype=np.uint8, shape=(n, f))
    for s in range(0, n, 8192):
        X[s:s + 8192] = rng.integers(0, 256, (min(8192, n - s), f), dtype=np.uint8)
    X.flush()
    del X
    np.save(d / "y_train.npy", rng.integers(0, 10, n))
    np.save(d / "X_test.npy", np.zeros((0, f), np.uint8))
    np.save(d / "y_test.npy", np.zeros(0, np.int64))
    code = f"""
import resource, numpy as np, pykd
from pykd.data import load_dataset
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ds = load_dataset({str(d)!r})
m = pykd.MLP([784, 32, 10], seed=0)
pykd.fit(m, ds.X_train, ds.y_train, epochs=0, progress=False)     # imports, buffers
base = peak()
pykd.fit(m, ds.X_train, ds.y_train, batch_size=256, progress=False)
print(base, peak())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    base, top = map(int, r.stdout.split())
    # The mapped pages of the file itself count in RSS (31 MB, clean page
    # cache, reclaimable); a float32 copy would add 125 MB on top of them.
    assert top - base < 31_360_000 + 40_000_000, (base, top)


def test_cli_bad_mapped_file_is_one_line_exit_2(tmp_path):
    rng = np.random.default_rng(6)
    X, y, Xt, yt = _data(rng, n=10, n_test=4)
    d = _write_dir(tmp_path / "npy", X.astype(np.int16), y, Xt, yt)
    r = subprocess.run([sys.executable, "-m", "pykd", "train-teacher", "--data", str(d),
                        "--out", str(tmp_path / "t.pykd"), "--epochs", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"pykd train-teacher: error: {d}/X_train.npy: X_train must be uint8 (|u1) or float32 "
        "(<f4) to be memory-mapped, got dtype int16 (<i2)"]
    assert not (tmp_path / "t.pykd").exists()
