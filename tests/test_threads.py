"""Thread pools: which OpenBLAS the extension loads and how idle threads wait.

Each case runs in a fresh interpreter: libgomp reads its settings once, when
the extension loads.
"""
import json
import os
import subprocess
import sys

import pytest

from pykd import _build_config

PROBE = r"""
import json, os
import numpy as np
import pykd, threadpoolctl
pykd.dense(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32), np.zeros(4, np.float32))
pools = [{"api": p["internal_api"], "layer": p.get("threading_layer"), "path": p["filepath"]}
         for p in threadpoolctl.threadpool_info()]
print(json.dumps({"pools": pools, "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
                  "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}))
"""


def probe(**env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LD_LIBRARY_PATH")}
    clean.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def our_openblas(pools):
    """The OpenBLAS pool that is not NumPy's own (NumPy's wheel bundles scipy_openblas)."""
    ours = [p for p in pools if p["api"] == "openblas" and "scipy_openblas" not in p["path"]]
    assert len(ours) == 1, pools
    return ours[0]


@pytest.mark.skipif(not _build_config.blas_openmp_dir,
                    reason="built without the OpenMP build of OpenBLAS")
def test_openmp_openblas_shares_the_kernels_pool():
    info = probe()
    blas = our_openblas(info["pools"])
    assert blas["layer"] == "openmp"
    assert os.path.realpath(blas["path"]).startswith(
        os.path.realpath(_build_config.blas_openmp_dir))
    # One pool: idle threads spin briefly instead of sleeping at once.
    assert info["GOMP_SPINCOUNT"] == "10000"
    assert info["OMP_WAIT_POLICY"] is None


@pytest.mark.skipif(bool(_build_config.blas_openmp_dir),
                    reason="built with the OpenMP build of OpenBLAS")
def test_pthreads_openblas_gets_passive_openmp_threads():
    info = probe()
    assert our_openblas(info["pools"])["layer"] == "pthreads"
    assert info["OMP_WAIT_POLICY"] == "passive"
    assert info["GOMP_SPINCOUNT"] is None


@pytest.mark.parametrize("name, value", [("OMP_WAIT_POLICY", "active"),
                                         ("GOMP_SPINCOUNT", "123")])
def test_user_setting_wins(name, value):
    info = probe(**{name: value})
    assert info[name] == value
    other = "GOMP_SPINCOUNT" if name == "OMP_WAIT_POLICY" else "OMP_WAIT_POLICY"
    assert info[other] is None


def test_source_tree_without_a_build_imports_with_numpy_backend():
    # The source tree has no _build_config.py or extension: pykd still imports,
    # the NumPy backend works, and the Fortran one says what is missing.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import numpy as np, pykd, os\n"
            "assert os.path.dirname(pykd.__file__) == os.path.join(%r, 'pykd')\n"
            "print(pykd.softmax(np.zeros((1, 2), np.float32), backend='numpy')[0, 0])\n"
            "try:\n"
            "    pykd.softmax(np.zeros((1, 2), np.float32))\n"
            "except ImportError as e:\n"
            "    print('ImportError', 'not built' in str(e))\n") % (root, root)
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True,
                         timeout=120, cwd=root)
    if os.path.exists(os.path.join(root, "pykd", "_build_config.py")):
        pytest.skip("this source tree holds a build")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0.5", "ImportError", "True"]


LIMITED = r"""
import numpy as np
import pykd
rng = np.random.default_rng(0)
x = rng.random((256, 784), dtype=np.float32)
W = rng.random((784, 200), dtype=np.float32)
b = rng.random(200, dtype=np.float32)
y = pykd.dense(x, W, b, "relu")
ref = np.maximum(x.astype(np.float64) @ W + b, 0)
assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max(), "dense"
m = pykd.MLP([784, 200, 200, 10]); m.init(0)
M = m.to_model()
out = M.forward(x)
assert np.allclose(out, M.forward(x, backend="numpy"), rtol=1e-4, atol=1e-4), "forward"
print("ok")
"""


@pytest.mark.parametrize("limit", ["1", "2"])
def test_omp_thread_limit_below_the_thread_count_does_not_hang(limit):
    """OMP_THREAD_LIMIT (common on batch systems) below OMP_NUM_THREADS: the
    products and the network run, with the right answer. OpenBLAS 0.3.21's
    OpenMP build hung in the first sgemm until the library capped its count."""
    env = dict(os.environ, OMP_THREAD_LIMIT=limit, OMP_NUM_THREADS="4")
    out = subprocess.run([sys.executable, "-c", LIMITED], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


THREADED = r"""
import threading
import numpy as np
import pykd
x = np.ones((256, 784), np.float32)
m = pykd.MLP([784, 200, 200, 10]); m.init(0)
M = m.to_model()
ref = M.forward(x, backend="numpy")
res = []
t = threading.Thread(target=lambda: res.append(M.forward(x)))
t.start(); t.join()
assert np.allclose(res[0], ref, rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_omp_thread_limit_in_a_python_thread():
    """The cap holds in threads other than the one that loaded the library."""
    env = dict(os.environ, OMP_THREAD_LIMIT="2", OMP_NUM_THREADS="4")
    out = subprocess.run([sys.executable, "-c", THREADED], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
