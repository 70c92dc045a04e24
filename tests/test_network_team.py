"""network_forward splits a batch of 16 or more samples across the OpenMP
team, each thread running every layer on its own slice (docs/performance.md,
"Batch 256: one parallel region"). Each case runs in fresh interpreters with
OMP_NUM_THREADS (and OMP_THREAD_LIMIT) set before the extension loads.

The exact kinds (int8 with identity/relu, sparse, codebook) give bits that do
not depend on how the batch is cut, so 1 and 2 threads must agree bit for
bit; the sgemm-based kinds agree with the NumPy twin.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

CHILD = r"""
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from kinds_helpers import make_layer
from pykd.models import Model

def build(kinds, acts, sizes, seed):
    rng = np.random.default_rng(seed)
    return Model([make_layer(k, a, b, act, rng) for k, act, a, b
                  in zip(kinds, acts, sizes[:-1], sizes[1:])], norm=(0.2, 1.5))

out = {{}}
rng = np.random.default_rng(3)
# sparse layers: their kernel depends on the slice size, so the runs force the panel kernel
exact = build(["codebook", "sparse_csr", "sparse_codebook", "dense_int8"],
              ["relu", "identity", "relu", "identity"], [40, 33, 34, 36, 9], 1)
sgemm = build(["dense", "low_rank", "dense"], ["relu", "tanh", "identity"], [40, 64, 48, 7], 2)
for n in (16, 17, 64, 255):
    X = rng.standard_normal((n, 40)).astype(np.float32)
    out[f"exact{{n}}"] = exact.forward(X)
    out[f"sgemm{{n}}"] = sgemm.forward(X)
    out[f"upto{{n}}"] = sgemm.forward(X, upto=2)
    out[f"twin{{n}}"] = sgemm.forward(X, backend="numpy")
np.savez({path!r}, **out)
"""


def run(tmp_path, name, **env):
    path = str(tmp_path / f"{name}.npz")
    code = CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)), path=path)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    clean.update(env)
    subprocess.run([sys.executable, "-c", code], env=clean, check=True, timeout=300)
    with np.load(path) as z:
        return dict(z)


def test_team_gives_the_bits_of_one_thread(tmp_path):
    # The sparse layers pick their kernel from the number of samples they are
    # given (pykd_sparse_kernel's crossover), and a thread's slice is smaller
    # than the batch: forced to the panel kernel (the scatter's bits), both
    # runs sum every output in the same order.
    one = run(tmp_path, "one", OMP_NUM_THREADS="1", PYKD_SPARSE_KERNEL="panel")
    two = run(tmp_path, "two", OMP_NUM_THREADS="2", PYKD_SPARSE_KERNEL="panel")
    for key in one:
        if key.startswith("exact"):
            assert np.array_equal(one[key], two[key]), key
        if key.startswith("sgemm"):
            ref = one[key.replace("sgemm", "twin")]
            tol = 1e-5 * max(1.0, float(np.abs(ref).max()))
            assert np.abs(two[key] - ref).max() <= tol, key


ERR_CHILD = r"""
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from kinds_helpers import make_layer
from pykd.layers import Dense
from pykd.models import Model

rng = np.random.default_rng(4)
big = Dense(np.full((12, 10), 1e30, np.float32), np.zeros(10, np.float32), "identity")
model = Model([make_layer("dense_int8", 13, 12, "relu", rng), big,
               make_layer("dense_int8", 10, 5, "identity", rng)])
X = rng.standard_normal((64, 13)).astype(np.float32)
X[:32] *= 1e20           # first slice: finite, but inf after layer 2 -> layer 3 fails
X[40, 3] = np.nan        # second slice: layer 1 fails
for rows in (slice(0, 64), slice(0, 32), slice(32, 64)):
    try:
        model.forward(X[rows])
        print("no error")
    except ValueError as exc:
        print(str(exc).split(":")[0])
"""


@pytest.mark.parametrize("threads", ["1", "2"])
def test_team_reports_the_first_failing_layer(threads):
    code = ERR_CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    clean["OMP_NUM_THREADS"] = threads
    res = subprocess.run([sys.executable, "-c", code], env=clean, check=True, timeout=300,
                         capture_output=True, text=True)
    assert res.stdout.split("\n")[:3] == ["layer 1 (dense_int8)", "layer 3 (dense_int8)",
                                          "layer 1 (dense_int8)"], res.stdout
