"""Tests for pykd.data: IDX reading and dataset loading."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from pykd import data
from pykd.data import Dataset, DatasetError, load_dataset, read_idx

CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr):
    """Encode ``arr`` as IDX, written here from the spec rather than by pykd."""
    arr = np.asarray(arr)
    header = bytes([0, 0, CODES[arr.dtype.type], arr.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path, arr, gz=None):
    """Write IDX; gzip if ``gz`` (default: if the name ends in .gz)."""
    raw = idx_bytes(arr) if isinstance(arr, np.ndarray) else arr
    if gz if gz is not None else str(path).endswith(".gz"):
        raw = gzip.compress(raw)
    Path(path).write_bytes(raw)
    return path


def write_dataset_dir(directory, n_train=12, n_test=5, gz=(True, False, False, True), seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "X_train": rng.integers(0, 256, (n_train, 4, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 7, n_train, dtype=np.uint8),
        "X_test": rng.integers(0, 256, (n_test, 4, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 7, n_test, dtype=np.uint8),
    }
    for (role, stem), z in zip(data.IDX_FILES.items(), gz):
        write_idx(directory / (stem + ".gz" * z), arrays[role])
    return arrays


# --------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("dtype", list(CODES))
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (0, 28, 28)])
def test_read_idx_round_trip(tmp_path, dtype, gz, shape):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    path = write_idx(tmp_path / "f.idx", arr, gz=gz)
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    assert got.shape == shape and got.flags.c_contiguous and got.flags.writeable
    np.testing.assert_array_equal(got, arr)


def test_gzip_detected_by_magic_not_name(tmp_path):
    arr = np.arange(10, dtype=np.int16)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "plain.gz", arr, gz=False)), arr)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "packed", arr, gz=True)), arr)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_payload(tmp_path, gz):
    raw = idx_bytes(np.zeros((10, 28, 28), np.uint8))
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", raw[: 16 + 1000], gz=gz)
    with pytest.raises(
        DatasetError,
        match=r"train-images-idx3-ubyte.gz: truncated: expected 7840 bytes of data, found 1000$",
    ):
        read_idx(path)


@pytest.mark.parametrize("cut", [0, 2, 4, 9, 15])
def test_truncated_header(tmp_path, cut):
    raw = idx_bytes(np.zeros((2, 2, 2), np.uint8))
    path = write_idx(tmp_path / "f", raw[:cut], gz=False)
    with pytest.raises(DatasetError, match=f"{path}: truncated"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_trailing_bytes(tmp_path, gz):
    raw = idx_bytes(np.zeros(5, np.int32)) + b"xyz"
    path = write_idx(tmp_path / "f", raw, gz=gz)
    with pytest.raises(DatasetError, match=f"{path}: trailing bytes: expected 20 bytes of data, found 23"):
        read_idx(path)


@pytest.mark.parametrize(
    "header, match",
    [
        (b"\x01\x00\x08\x01", "bad magic 01 00 08 01"),
        (b"\x00\x00\x0a\x01", "bad magic"),  # 0x0A is not an IDX type code
        (b"\x00\x00\x08\x00", "ndim is 0"),
    ],
)
def test_bad_magic(tmp_path, header, match):
    path = write_idx(tmp_path / "f", header + (5).to_bytes(4, "big") + bytes(5), gz=False)
    with pytest.raises(DatasetError, match=f"{path}: .*{match}"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True])
def test_huge_bogus_dims_do_not_allocate(tmp_path, gz):
    header = b"\x00\x00\x0e\x03" + (2**31).to_bytes(4, "big") * 3  # 2^93 doubles
    path = write_idx(tmp_path / "f", header + bytes(64), gz=gz)
    with pytest.raises(DatasetError, match=f"expected {2**93 * 8} bytes of data, found 64"):
        read_idx(path)


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(1000, dtype=np.int32)))
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    for name, content in [("flipped.gz", bytes(bad)), ("cut.gz", good[: len(good) // 2]),
                          ("header-only.gz", b"\x1f\x8b garbage")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DatasetError, match=f"{path}: .*gzip"):
            read_idx(path)


def test_missing_idx_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


# --------------------------------------------------------------------------
# load_dataset: directories


def test_load_directory(tmp_path):
    arrays = write_dataset_dir(tmp_path)
    ds = load_dataset(tmp_path)
    assert isinstance(ds, Dataset) and ds.name == tmp_path.name
    for key in ("X_train", "X_test"):
        X = getattr(ds, key)
        assert X.dtype == np.float32 and X.flags.c_contiguous and X.shape[1] == 12
        expected = arrays[key].reshape(len(X), -1).astype(np.float32) / np.float32(255)
        np.testing.assert_array_equal(X, expected)
    for key in ("y_train", "y_test"):
        assert getattr(ds, key).dtype == np.int64
        np.testing.assert_array_equal(getattr(ds, key), arrays[key])
    assert ds.n_features == 12
    assert ds.n_classes == max(arrays["y_train"].max(), arrays["y_test"].max()) + 1
    assert "train=12" in repr(ds)
    with pytest.raises(AttributeError):
        ds.name = "other"  # frozen


def test_load_directory_missing_file(tmp_path):
    write_dataset_dir(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DatasetError, match=f"{tmp_path}: missing t10k-images-idx3-ubyte"):
        load_dataset(tmp_path)


def test_load_nonexistent_path(tmp_path):
    with pytest.raises(DatasetError, match="no such file or directory"):
        load_dataset(tmp_path / "nope")


def test_load_directory_count_mismatch(tmp_path):
    write_dataset_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(DatasetError, match="train set has 12 images but 11 labels"):
        load_dataset(tmp_path)


def test_load_directory_corrupt_file_is_named(tmp_path):
    write_dataset_dir(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=str(path)):
        load_dataset(tmp_path)


def test_missing_default_dataset_explains_install(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path / "fashion-mnist")
    with pytest.raises(DatasetError) as info:
        load_dataset()
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert "--data DIR" in msg and str(tmp_path / "fashion-mnist") in msg


def test_default_uses_default_dir(tmp_path, monkeypatch):
    write_dataset_dir(tmp_path)
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path)
    ds = load_dataset()
    assert ds.name == "fashion-mnist" and ds.X_train.shape == (12, 12)


# --------------------------------------------------------------------------
# load_dataset: .npz


def test_load_npz_four_keys(tmp_path):
    rng = np.random.default_rng(0)
    X_train = rng.random((8, 5))  # float64, 2-D: converted unchanged
    X_test = rng.integers(0, 256, (3, 5), dtype=np.uint8)  # scaled by 1/255
    y_train, y_test = np.arange(8) % 3, np.array([0, 4, 1], np.int32)
    np.savez(tmp_path / "d.npz", X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test)
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.name == "d"
    np.testing.assert_array_equal(ds.X_train, X_train.astype(np.float32))
    np.testing.assert_array_equal(ds.X_test, X_test.astype(np.float32) / np.float32(255))
    assert ds.y_test.dtype == np.int64 and ds.n_classes == 5


def test_load_npz_x_y_only(tmp_path):
    X = np.random.default_rng(0).random((6, 2, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(6))
    ds = load_dataset(tmp_path / "d.npz")
    assert ds.X_train.shape == (6, 6) and ds.X_test.shape == (0, 6)
    assert ds.X_test.dtype == np.float32 and ds.y_test.dtype == np.int64 and ds.y_test.shape == (0,)
    assert ds.n_classes == 6


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"X": np.zeros((3, 2)), "labels": np.zeros(3, int)}, "expected arrays .* found X, labels"),
        ({"X": np.zeros((3, 2)), "y": np.zeros(4, int)}, "train set has 3 images but 4 labels"),
        ({"X": np.zeros((3, 2)), "y": np.array([0, -1, 2])}, "negative labels"),
        ({"X": np.zeros((3, 2)), "y": np.array(["0", "1", "2"])}, "y_train must be integers"),
        ({"X": np.zeros((3, 2)), "y": np.zeros((3, 1), int)}, "y_train must be 1-D"),
        ({"X": np.zeros(3), "y": np.zeros(3, int)}, "X_train must be 2-D or 3-D"),
        ({"X": np.zeros((3, 2, 2, 2)), "y": np.zeros(3, int)}, "X_train must be 2-D or 3-D"),
        ({"X": np.array([[0, np.nan], [1, 2], [3, 4]]), "y": np.zeros(3, int)}, "NaN or infinite"),
        ({"X": np.array([["a", "b"]] * 3), "y": np.zeros(3, int)}, "must be numeric"),
        ({"X_train": np.zeros((3, 2)), "y_train": np.zeros(3, int),
          "X_test": np.zeros((2, 3)), "y_test": np.zeros(2, int)}, "2 features but test images have 3"),
    ],
)
def test_load_npz_invalid(tmp_path, arrays, match):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=f"{path}: .*{match}"):
        load_dataset(path)


def test_load_npz_refuses_pickle(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.array([{"a": 1}] * 2, dtype=object), y=np.zeros(2, int))
    with pytest.raises(DatasetError, match=f"{path}: cannot read .npz"):
        load_dataset(path)


def test_load_corrupt_npz_and_other_files(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DatasetError, match="cannot read .npz"):
        load_dataset(tmp_path / "d.npz")
    (tmp_path / "d.txt").write_text("1,2,3\n")
    with pytest.raises(DatasetError, match="expected a directory of IDX files or a .npz"):
        load_dataset(tmp_path / "d.txt")


# --------------------------------------------------------------------------
# The real Fashion-MNIST (Debian package dataset-fashion-mnist)


@pytest.mark.skipif(not data.DEFAULT_DATA_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    ds = load_dataset()
    assert ds.name == "fashion-mnist"
    assert ds.X_train.shape == (60000, 784) and ds.X_test.shape == (10000, 784)
    assert ds.X_train.dtype == np.float32 and ds.X_train.flags.c_contiguous
    assert ds.y_train.shape == (60000,) and ds.y_train.dtype == np.int64
    assert ds.X_train.min() == 0.0 and ds.X_train.max() == 1.0
    assert 0.2 < ds.X_train.mean() < 0.4
    assert ds.n_classes == 10
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    assert (np.bincount(ds.y_train) == 6000).all() and (np.bincount(ds.y_test) == 1000).all()
