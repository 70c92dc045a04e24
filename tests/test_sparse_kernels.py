"""The sparse layers' kernels (fortran/kernels/pykd_sparse_kernel.f90).

Every kernel (scatter, panel, dense; forced with PYKD_SPARSE_KERNEL, which
libpykd reads once per process, so each case runs in a fresh interpreter)
and the layer's own choice, at 1 and 2 threads, on batch sizes around the
panel width (16) and the dense crossover, for sparse_csr and
sparse_codebook: against a float64 reference; scatter and panel give the
same bits as each other, for any batch size and thread count; NaN / inf
samples give all-NaN rows and leave the others alone; empty rows and
columns, nnz = 0, 16- and 32-bit indices; a corrupted pattern or code
is an error, not a stray write.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import pykd
from pykd.layers import SparseCodebook, SparseCSR

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_SRC = os.path.join(os.path.dirname(HERE), "fortran", "kernels", "pykd_sparse_kernel.f90")
NETWORK_SRC = os.path.join(os.path.dirname(HERE), "fortran", "model", "pykd_network.f90")
F32 = np.float32
BATCHES = (1, 2, 7, 8, 9, 15, 16, 17, 33, 64, 65, 256)
# (n_in, n_out, density, activation): 8-bit, 16-bit (300 outputs) and
# 32-bit (70000 outputs) indices in the file, nnz = 0, a dense-ish layer
# (above the crossover density) and a 99% sparse one.
SHAPES = ((60, 40, 0.1, "relu"), (30, 300, 0.05, "tanh"), (3, 70000, 0.002, "identity"),
          (5, 7, 0.0, "relu"), (50, 20, 0.6, "identity"), (200, 100, 0.01, "gelu"))


def layers(seed=0):
    """[(name, layer)]: each shape as sparse_csr and as sparse_codebook."""
    rng = np.random.default_rng(seed)
    out = []
    for n_in, n_out, density, act in SHAPES:
        W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(F32)
        W[rng.random((n_in, n_out)) >= density] = 0
        if n_in > 3:
            W[1] = 0                   # an empty row
        W[:, 0] = 0                    # an empty column
        b = (rng.standard_normal(n_out) * 0.1).astype(F32)
        csr = SparseCSR.from_dense(W, b, act)
        cents = (rng.standard_normal(7) / np.sqrt(n_in)).astype(F32)
        codes = rng.integers(0, 7, csr.nnz).astype(np.uint8)
        sc = SparseCodebook(csr.indptr, csr.indices, codes, cents, b, act)
        out += [(f"csr {n_in}x{n_out} d={density}", csr), (f"sc {n_in}x{n_out} d={density}", sc)]
    return out


def inputs(n_in, n, seed):
    """ReLU'd Gaussians (about half 0), row 2 with a NaN and row 5 an inf."""
    rng = np.random.default_rng([n_in, n, seed])
    X = np.maximum(rng.standard_normal((n, n_in)), 0).astype(F32)
    if n > 2:
        X[2, n_in // 2] = np.nan
    if n > 5:
        X[5, 0] = -np.inf
    return X


CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_sparse_kernels as t
import pykd
out = {}
for name, layer in t.layers():
    m = pykd.Model([layer])
    for n in t.BATCHES:
        if layer.n_out > 10000 and n > 40:
            continue
        X = t.inputs(layer.n_in, n, 0)
        a = m.forward(X)
        again = m.forward(X)
        assert np.array_equal(a, again, equal_nan=True), (name, n, "run to run")
        out[f"{name}|{n}"] = a
np.savez(sys.argv[2], **out)
"""


def run(tmp_path, kernel, threads, cpu_path=None):
    """{key: output} of every layer and batch with PYKD_SPARSE_KERNEL=kernel
    (None: the layer's own choice), OMP_NUM_THREADS=threads and
    PYKD_SPARSE_PATH=cpu_path (None: the CPU's best)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYKD_SPARSE_KERNEL", "PYKD_SPARSE_PATH")}
    env["OMP_NUM_THREADS"] = str(threads)
    if kernel:
        env["PYKD_SPARSE_KERNEL"] = kernel
    if cpu_path:
        env["PYKD_SPARSE_PATH"] = cpu_path
    path = tmp_path / f"{kernel}-{threads}-{cpu_path}.npz"
    subprocess.run([sys.executable, "-c", CHILD, HERE, str(path)], env=env, check=True,
                   timeout=600, cwd=str(tmp_path))
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse")
    got = {(k, t): run(tmp, k, t) for k in ("scatter", "panel", "dense", None) for t in (1, 2)}
    for p in CPU_PATHS:   # the C helpers' paths (pattern check, scatter, transposes)
        got[("scatter", p)] = run(tmp, "scatter", 1, p)
        got[("panel", p)] = run(tmp, "panel", 1, p)
    return got


CPU_PATHS = ("portable", "avx2", "avx512")


def test_every_cpu_path_gives_the_same_bits(results):
    """PYKD_SPARSE_PATH: each path this CPU runs, and the forced portable one."""
    from pykd import _fkernels as fk
    best = fk.sparse_path().decode().strip()
    assert best in CPU_PATHS
    ran = []
    for p in CPU_PATHS:
        env = dict(os.environ, PYKD_SPARSE_PATH=p)
        name = subprocess.run([sys.executable, "-c", "import pykd._fkernels as f; "
                               "print(f.sparse_path().decode().strip())"], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()
        if name != p:
            continue
        ran.append(p)
        for k in ("scatter", "panel"):
            base = results[(k, 1)]
            for key, y in results[(k, p)].items():
                assert np.array_equal(y, base[key], equal_nan=True), (p, k, key)
                ok = np.isfinite(y)
                assert (y[ok].view(np.uint32) == base[key][ok].view(np.uint32)).all(), (p, k, key)
    assert "portable" in ran and best in ran
    print("sparse paths tested:", ran)


def reference(layer, X):
    """float64 act(x W + b) from the layer's own arrays, NaN rows for bad samples."""
    from kinds_helpers import act64, dense64
    with np.errstate(invalid="ignore"):
        z = X.astype(np.float64) @ dense64(layer) + layer.b
        y = act64(z, layer.activation)
    y[~np.isfinite(X).all(axis=1)] = np.nan
    return y


def chosen_kernel(n_in, n_out, nnz, n, planes=False):
    """The rule of pykd_sparse_kernel's sparse_kernel_for, with its constants
    read from the Fortran source (BAND_BATCH, BAND_DENSITY, NARROW_OUT); a
    layer with planes runs them up to PLANE_MAX_BATCH samples (planes_for),
    which gives the scatter's bits."""
    src = open(KERNEL_SRC, encoding="utf-8").read()
    if planes and n <= int(re.search(r"PLANE_MAX_BATCH = (\d+)", src).group(1)):
        return "scatter"
    batches = [int(v) for v in re.search(r"BAND_BATCH\(3\) = \[([^]]*)\]", src).group(1).split(",")]
    dens = [float(v) for v in re.search(r"BAND_DENSITY\(3\) = \[([^]]*)\]", src).group(1).split(",")]
    narrow = int(re.search(r"NARROW_OUT = (\d+)", src).group(1))
    if n == 1:
        return "scatter"
    density = np.float32(nnz) / (np.float32(n_in) * np.float32(n_out))
    for k in range(len(batches) - 1, -1, -1):
        if n >= batches[k]:
            if density >= np.float32(dens[k]) or (k >= 1 and n_out < narrow):
                return "dense"
            break
    return "panel"


@pytest.mark.parametrize("kernel", ["scatter", "panel", "dense", None])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_kernel_matches_the_float64_reference(results, kernel, threads):
    got = results[(kernel, threads)]
    for name, layer in layers():
        for n in BATCHES:
            key = f"{name}|{n}"
            if key not in got:
                continue
            X = inputs(layer.n_in, n, 0)
            want = reference(layer, X)
            y = got[key]
            bad = ~np.isfinite(X).all(axis=1)
            assert np.isnan(y[bad]).all(), (key, "a NaN/inf sample gives all-NaN outputs")
            assert np.isfinite(y[~bad]).all(), key
            err = np.abs(y[~bad] - want[~bad]).max(initial=0.0)
            assert err <= 2e-6 * max(1.0, np.abs(want[~bad]).max(initial=0.0)), (key, err)


def test_scatter_and_panel_give_the_same_bits_at_any_batch_and_thread_count(results):
    """The sparse kernels sum in one order: forward(x[i:i+1]) == forward(x)[i]."""
    base = results[("scatter", 1)]
    for name, layer in layers():
        one = {}
        for key in base:
            if not key.startswith(name + "|"):
                continue
            for k in (("scatter", 2), ("panel", 1), ("panel", 2)):
                assert np.array_equal(results[k][key], base[key], equal_nan=True), (key, k)
            one[int(key.split("|")[1])] = base[key]
        # Row i of every batch is the same bits as the batch of one sample
        # (the inputs of a batch of n are not those of a batch of 1, so
        # compare through a model call on the row itself).
        m = pykd.Model([layer])
        X = inputs(layer.n_in, 17, 0)
        rows = np.concatenate([m.forward(X[i:i + 1]) for i in range(17)])
        assert np.array_equal(rows, results[("panel", 1)][f"{name}|17"], equal_nan=True), name


def team_slices(n, threads):
    """The rows each thread of network_forward runs (its TEAM_MIN_BATCH and
    TEAM_MIN_SLICE): from 16 samples the batch is cut into slices, and the
    layer picks its kernel for the slice it is given."""
    from pykd import _build_config
    src = open(NETWORK_SRC, encoding="utf-8").read()
    tmin = int(re.search(r"TEAM_MIN_BATCH = (\d+)", src).group(1))
    smin = int(re.search(r"TEAM_MIN_SLICE = (\d+)", src).group(1))
    nt = 1
    if n >= tmin and _build_config.blas_openmp_dir:   # a BLAS that runs inside a team
        nt = max(1, min(threads, n // smin))
    return [(n * t // nt, n * (t + 1) // nt) for t in range(nt)]


def test_the_layer_picks_the_kernel_of_the_recorded_crossover(results):
    """The layer's own choice gives the bits of the kernel the recorded
    crossover names for the samples it is given (panel and scatter: the same
    bits), at 1 and 2 threads."""
    seen = set()
    for name, layer in layers():
        for key in results[(None, 1)]:
            if not key.startswith(name + "|"):
                continue
            n = int(key.split("|")[1])
            for t in (1, 2):
                for r0, r1 in team_slices(n, t):
                    want = chosen_kernel(layer.n_in, layer.n_out, layer.nnz, r1 - r0,
                                         getattr(layer, "_n_planes", 0) > 0)
                    seen.add(want)
                    assert np.array_equal(results[(None, t)][key][r0:r1],
                                          results[(want, t)][key][r0:r1],
                                          equal_nan=True), (key, want, t, r0)
    assert seen == {"scatter", "panel", "dense"}


def test_bad_samples_leave_the_others_alone(results):
    """The rows without NaN/inf equal the same rows computed without the bad
    ones (on one thread, as the results: from 16 samples the network splits
    the batch across the threads, and the dense kernel's bits depend on the
    size of the product)."""
    from threadpoolctl import threadpool_limits
    for name, layer in layers():
        if f"{name}|64" not in results[(None, 1)]:
            continue
        m = pykd.Model([layer])
        X = inputs(layer.n_in, 64, 0)
        good = np.isfinite(X).all(axis=1)
        clean = np.where(good[:, None], X, 0).astype(F32)
        with threadpool_limits(limits=1):
            got = m.forward(clean)
        assert np.array_equal(got[good], results[(None, 1)][f"{name}|64"][good]), name


def test_workspace_grows_with_the_batch():
    """Model.forward sizes one workspace for its largest chunk: the words
    needed must not decrease with n, whichever kernel n takes."""
    from pykd import _fkernels as fk
    for _, layer in layers():
        m = pykd.Model([layer])
        sizes = [int(fk.network_workspace_size(table=m._table_f, n=n, upto=0))
                 for n in range(1, 300, 7)]
        assert sizes == sorted(sizes)


@pytest.mark.parametrize("damage", ["decreasing index", "index >= n_out", "negative index",
                                    "indptr not monotone", "code >= n_codes"])
@pytest.mark.parametrize("n", [1, 40])
@pytest.mark.parametrize("n_in", [6, 40])
def test_a_corrupted_pattern_is_an_error_not_a_stray_write(damage, n, n_in):
    """6 x 9 keeps no planes (nnz < PLANE_MIN_NNZ), 40 x 9 does."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((n_in, 9)).astype(F32)
    W[rng.random((n_in, 9)) < 0.5] = 0
    W[2, :3] = 1                       # row 2 has at least 3 entries, the first at 0
    b = np.zeros(9, F32)
    csr = SparseCSR.from_dense(W, b)
    kind = SparseCodebook(csr.indptr, csr.indices, np.zeros(csr.nnz, np.uint8),
                          np.ones(3, F32), b) if damage == "code >= n_codes" else csr
    m = pykd.Model([kind])
    X = np.ones((n, n_in), F32)
    before = m.forward(X)
    layer = m.layers[0]
    k = int(layer.indptr[2])
    if damage == "decreasing index":
        layer.indices[k], layer.indices[k + 1] = layer.indices[k + 1], layer.indices[k]
    elif damage == "index >= n_out":
        layer.indices[k + 2] = 9
    elif damage == "negative index":
        layer.indices[k] = -1
    elif damage == "indptr not monotone":
        layer.indptr[2] = layer.indptr[3] + 1
    else:
        layer.codes[0] = 3
    planes = m.table[0, 11 if kind is csr else 13] > 0      # p2 of sparse_csr, p4 of sparse_codebook
    assert planes == (n_in == 40)
    if n == 1 and planes:
        # One sample runs on the planes alone (docs/model.md): the damaged
        # CSR (or codes) is not read, so nothing changes (and nothing can go astray).
        np.testing.assert_array_equal(m.forward(X), before)
        return
    with pytest.raises(ValueError, match="layer 1"):
        m.forward(X)


def test_a_corrupted_pattern_is_an_error_on_the_portable_path():
    """The same damages, in a child with PYKD_SPARSE_PATH=portable."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pytest, test_sparse_kernels as t\n"
            "for d in ('decreasing index', 'index >= n_out', 'negative index',\n"
            "          'indptr not monotone', 'code >= n_codes'):\n"
            "    for n in (1, 40):\n"
            "        for n_in in (6, 40):\n"
            "            t.test_a_corrupted_pattern_is_an_error_not_a_stray_write(d, n, n_in)\n"
            "import pykd._fkernels as f; print(f.sparse_path().decode().strip())\n")
    env = dict(os.environ, PYKD_SPARSE_PATH="portable")
    out = subprocess.run([sys.executable, "-c", code, HERE], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout.strip()
    assert out == "portable"


def test_benchmark_script_runs_quick(tmp_path):
    """benchmarks/bench_sparse.py on a tiny grid writes its table."""
    script = os.path.join(os.path.dirname(HERE), "benchmarks", "bench_sparse.py")
    out = tmp_path / "sparse"
    subprocess.run([sys.executable, script, "--quick", "--rounds", "1", "--min-time", "0.0001",
                    "--grid", json.dumps([[[20, 10]], [0.9], [1, 8]]), "--out", str(out)],
                   check=True, timeout=600, capture_output=True, cwd=str(tmp_path))
    data = json.loads((tmp_path / "sparse.json").read_text())
    assert {r["batch"] for r in data["runs"]["auto_1"]["rows"]} == {1, 8}
    assert "| 20x10 | 90% |" in (tmp_path / "sparse.md").read_text()
