"""Every ```python block of README.md runs, in order, in one directory (a
later block may load what an earlier one saved), shrunk by the ``tiny``
fixture: ``pykd.data.load_dataset`` gives a 200-image synthetic dataset of
Fashion-MNIST's shape and ``pykd.fit`` runs one epoch whatever it is asked.
So the README's examples cannot rot."""
import pathlib
import re

import numpy as np
import pytest

import pykd
import pykd.data

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text):
    """[(line number, code)] of the ```python blocks."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return out


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)

    def load_dataset(*args, **kwargs):
        def split(n):
            y = rng.integers(0, 10, n)
            X = (rng.random((n, 784)) * 0.5 + (y[:, None] % 7 == np.arange(784) % 7) * 0.5)
            return np.ascontiguousarray(X, np.float32), y.astype(np.int64)
        X_train, y_train = split(200)
        X_test, y_test = split(100)
        return pykd.data.Dataset(X_train, y_train, X_test, y_test, "tiny")

    real_fit = pykd.fit

    def fit(*args, **kwargs):
        kwargs["epochs"] = 1
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(pykd.data, "load_dataset", load_dataset)
    monkeypatch.setattr(pykd, "fit", fit)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text())) >= 4


def test_readme_python_blocks_run(tiny, capsys):
    for line, code in python_blocks(README.read_text()):
        try:
            exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
        except Exception as e:
            pytest.fail(f"the ```python block at README.md line {line} fails: "
                        f"{type(e).__name__}: {e}")
