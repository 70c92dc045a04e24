"""The batch-1 path: the dense layer's one-sample kernel
(fortran/kernels/pykd_dense_simd.c) and Model.forward's lean path with its
per-thread workspace (pykd/models.py).

* One sample: each output is summed in input order, one float32 multiply and
  one add per term, so a NumPy float32 loop over the inputs is the same bits
  (identity and relu exactly; other activations within an ulp of NumPy's).
* Every path this CPU has (avx512, avx2) and the forced portable path give
  the same bits.
* The lean path (one C-contiguous float32 chunk) gives the same bits as the
  full path, keeps every check, and two Python threads on one model keep
  separate workspaces and get the bits of one thread.
"""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import pykd
from pykd.layers import Dense, DenseInt8
from pykd.models import Model

F32 = np.float32
# (n_in, n_out): whole 64-output blocks, every vector count 1..7, a tail of
# fewer than 8 outputs, fewer outputs than one vector, the student's shapes;
# for avx512: whole and masked 16-lane vectors, one 256-output pass exactly,
# two or more passes with a masked tail.
SHAPES = [(784, 200), (200, 10), (37, 203), (5, 7), (64, 64), (3, 129), (1, 1), (130, 57),
          (9, 120), (6, 15), (13, 17), (20, 256), (11, 300), (7, 513), (4, 241)]


def sequential(W, b, x, act):
    """The kernel's arithmetic in NumPy: acc = acc + W[i] * x[i], i in order."""
    acc = np.zeros(W.shape[1], F32)
    for i in range(W.shape[0]):
        acc = acc + W[i] * x[i]
    z = acc + b
    if act == "relu":
        return np.where(z < 0, F32(0), z)
    return z


def _layer(n_in, n_out, act, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n_in, n_out)).astype(F32)
    b = rng.standard_normal(n_out).astype(F32)
    return W, b, Dense(W, b, act)


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("act", ["identity", "relu"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_one_sample_is_the_sequential_float32_sum(shape, act):
    W, b, layer = _layer(*shape, act, seed=shape[0] * 1000 + shape[1])
    model = Model([layer])
    x = np.random.default_rng(7).standard_normal((1, shape[0])).astype(F32)
    assert same_bits(model.forward(x)[0], sequential(W, b, x[0], act))


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "gelu", "silu"])
def test_other_activations_follow_the_bias(act):
    W, b, layer = _layer(130, 57, act, seed=3)
    x = np.random.default_rng(8).standard_normal((1, 130)).astype(F32)
    got = Model([layer]).forward(x)[0]
    ref = layer.forward_numpy(x)[0]
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)


def test_relu_keeps_nan():
    W = np.zeros((2, 9), F32)
    W[:, 0] = (3e38, -3e38)                  # inf + (-inf): NaN for output 0
    b = np.zeros(9, F32)
    b[1] = 2.0
    b[2] = -1.0
    y = Model([Dense(W, b, "relu")]).forward(np.full((1, 2), 10, F32))[0]
    assert np.isnan(y[0])
    assert y[1] == 2
    assert y[2] == 0 and not np.signbit(y[2])


PROBE = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from test_batch1 import SHAPES, _layer
from pykd import _fkernels
from pykd.models import Model
out = []
for k, (n_in, n_out) in enumerate(SHAPES):
    for act in ("relu", "identity"):
        W, b, layer = _layer(n_in, n_out, act, seed=k)
        x = np.random.default_rng(k).standard_normal((1, n_in)).astype(np.float32)
        x[0, ::5] = 0                 # relu'd inputs: zeros in the sums
        out.append(Model([layer]).forward(x)[0])
np.save(sys.argv[2], np.concatenate(out))
print(_fkernels.dense_path().decode().strip())
"""
PATHS = ("portable", "avx2", "avx512")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return set(next(line for line in f if line.startswith("flags")).split()[2:])
    except (OSError, StopIteration):
        return set()


def test_every_path_gives_the_same_bits(tmp_path):
    results, ran = {}, {}
    for path in PATHS:
        env = dict(os.environ)
        env["PYKD_DENSE_PATH"] = path
        out = tmp_path / f"{path}.npy"
        res = subprocess.run([sys.executable, "-c", PROBE, os.path.dirname(__file__), str(out)],
                             env=env, check=True, timeout=300, cwd=tmp_path,
                             capture_output=True, text=True)
        ran[path] = res.stdout.split()[-1]
        results[path] = np.load(out)
    assert ran["portable"] == "portable"
    flags = _cpu_flags()
    if "avx2" in flags:
        assert ran["avx2"] == "avx2"
    if "avx512f" in flags:
        assert ran["avx512"] == "avx512"
    for path in PATHS[1:]:
        assert same_bits(results[path], results["portable"]), (path, ran[path])


def _student(seed=0):
    mlp = pykd.MLP([784, 200, 200, 10], seed=seed, norm=(F32(0.3), F32(0.35)))
    return mlp


@pytest.mark.parametrize("kind", ["mlp", "model", "int8"])
def test_lean_path_is_the_full_path(kind):
    mlp = _student()
    model = {"mlp": mlp, "model": mlp.to_model(),
             "int8": pykd.quantize_model(mlp, activations="dynamic")}[kind]
    X = np.random.default_rng(1).standard_normal((9, 784)).astype(F32)
    for n in (1, 2, 9):
        lean = model.forward(X[:n])
        full = model.forward(X[:n], upto=3)       # the full path (upto given)
        assert same_bits(lean, full)
        # Non-contiguous or float64 inputs take the full path, converted.
        assert same_bits(model.forward(X[:n].astype(np.float64)), lean)
    # A batch larger than batch_size: chunks, the full path.
    chunked = model.forward(X, batch_size=4)
    assert same_bits(chunked[:4], model.forward(X[:4]))


def test_workspace_reuse_does_not_change_the_bits():
    mlp = _student(2)
    X = np.random.default_rng(2).standard_normal((64, 784)).astype(F32)
    fresh = [_student(2).forward(X[:n]) for n in (1, 64, 3, 1)]
    again = [mlp.forward(X[:n]) for n in (1, 64, 3, 1)]
    for a, b in zip(fresh, again):
        assert same_bits(a, b)


def test_lean_path_keeps_the_checks():
    model = _student().to_model()
    with pytest.raises(ValueError, match=r"\(n, 784\)"):
        model.forward(np.zeros((1, 783), F32))
    with pytest.raises(TypeError, match="numpy array"):
        model.forward([[0.0] * 784])
    with pytest.raises(TypeError, match="numeric"):
        model.forward(np.zeros((1, 784), np.bool_).astype(object))
    with pytest.raises(ValueError):
        model.forward(np.zeros((1, 784), F32), batch_size=0)
    with pytest.raises(ValueError):
        model.forward(np.zeros((1, 784), F32), backend="nope")
    q = pykd.quantize_model(_student(), activations="dynamic")
    x = np.zeros((1, 784), F32)
    x[0, 5] = np.nan
    with pytest.raises(ValueError, match=r"layer 1 \(dense_int8\).*NaN"):
        q.forward(x)
    assert np.isfinite(q.forward(np.zeros((1, 784), F32))).all()   # still works after


def test_a_changed_table_is_refused_not_read_out_of_bounds():
    model = _student().to_model()
    x = np.zeros((1, 784), F32)
    model.forward(x)                             # caches the workspace size
    model.table[0, 4] = model.f32.size           # layer 1's f32 slice outside the buffer
    with pytest.raises(ValueError, match="layer 1"):
        model.forward(x)


def test_two_threads_share_a_model_with_their_own_workspaces():
    mlp = _student(4)
    rng = np.random.default_rng(4)
    Xs = [rng.standard_normal((n, 784)).astype(F32) for n in (1, 1, 5, 1, 256, 1) * 6]
    expected = [mlp.forward(X) for X in Xs]
    results, errors = {}, []
    works = {}

    def run(t):
        try:
            for _ in range(20):
                for k in range(t, len(Xs), 2):
                    got = mlp.forward(Xs[k])
                    if not same_bits(got, expected[k]):
                        errors.append(k)
            works[t] = mlp._net._tls.work
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert works[0] is not works[1]                      # one workspace per thread
    assert not np.shares_memory(works[0], works[1])


def test_int8_one_sample_matches_the_twin_with_relu():
    rng = np.random.default_rng(9)
    q = rng.integers(-127, 128, (200, 77)).astype(np.int8)
    scale = (rng.random(77, dtype=F32) * F32(0.02)).astype(F32)
    b = rng.standard_normal(77).astype(F32)
    layer = DenseInt8(q, scale, b, "relu")
    X = rng.standard_normal((3, 200)).astype(F32)
    model = Model([layer])
    for n in (1, 3):
        assert same_bits(model.forward(X[:n]), layer.forward_numpy(X[:n]))


@pytest.mark.parametrize("n_in, n_out, n", [(1, 1, 1), (7, 33, 1), (131, 65, 3), (784, 200, 9),
                                            (200, 10, 256)])
def test_public_int8_products_are_exact_on_the_layer_kernel(n_in, n_out, n):
    rng = np.random.default_rng(n_in + n_out + n)
    q = rng.integers(-128, 128, (n_in, n_out)).astype(np.int8)       # -128 too
    qx = rng.integers(-128, 128, (n, n_in)).astype(np.int8)
    q[0, 0], qx[0, 0] = -128, -128
    acc = pykd.int8_gemm(qx, q)
    assert acc.dtype == np.int32
    np.testing.assert_array_equal(acc, qx.astype(np.int64) @ q.astype(np.int64))
    # int8_matmul: the NumPy twin's bits, and the int8 layer's for the same weights.
    q = np.clip(q, -127, 127).astype(np.int8)
    scale = (rng.random(n_out, dtype=F32) * F32(0.02) + F32(1e-3)).astype(F32)
    b = rng.standard_normal(n_out).astype(F32)
    X = rng.standard_normal((n, n_in)).astype(F32)
    y = pykd.int8_matmul(X, q, scale, b)
    assert same_bits(y, pykd.int8_matmul(X, q, scale, b, backend="numpy"))
    assert same_bits(y, Model([DenseInt8(q, scale, b)]).forward(X))
    one = scale[:1]
    assert same_bits(pykd.int8_matmul(X, q, one, b),
                     pykd.int8_matmul(X, q, one, b, backend="numpy"))
    X[-1, -1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        pykd.int8_matmul(X, q, scale, b)


@pytest.mark.parametrize("act", ["identity", "relu"])
def test_low_rank_one_sample_is_two_sequential_sums(act):
    from pykd.layers import LowRank
    rng = np.random.default_rng(5)
    U = rng.standard_normal((131, 13)).astype(F32)
    V = rng.standard_normal((13, 70)).astype(F32)
    b = rng.standard_normal(70).astype(F32)
    x = rng.standard_normal((1, 131)).astype(F32)
    t = sequential(U, np.zeros(13, F32), x[0], "identity")     # + 0 changes no bit here
    ref = sequential(V, b, t, act)
    assert same_bits(Model([LowRank(U, V, b, act)]).forward(x)[0], ref)


# One sample on 2+ threads: the leading dense identity/relu layers of at
# least 16384 weights split their outputs across the caller and helper
# threads (pykd_network's run_one_split, pykd_dense_team.c); each output is
# summed as on one thread, so every path and thread count gives the same bits. Each run is a fresh interpreter (OMP_NUM_THREADS and
# PYKD_DENSE_PATH are read when the extension loads).
SPLIT_PROBE = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from test_batch1 import split_models
from pykd import _fkernels
out, ks = [], []
for model in split_models():
    ks.append(int(_fkernels.network_split_layers(table=model.table.T)))
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, model.n_features)).astype(np.float32)
        out.append(model.forward(x)[0])
        if model.n_layers > 1:
            out.append(model.forward(x, upto=1)[0])
# two Python threads at once (one uses the helpers, the other runs alone),
# then a forked child (its own helpers): the same bits
import os, threading
student = split_models()[0]
x = np.random.default_rng(5).standard_normal((1, 784)).astype(np.float32)
ref = student.forward(x)
bad = []
def loop():
    for _ in range(300):
        if not np.array_equal(student.forward(x).view(np.uint32), ref.view(np.uint32)):
            bad.append(1)
ts = [threading.Thread(target=loop) for _ in range(2)]
[t.start() for t in ts]
[t.join() for t in ts]
assert not bad
pid = os.fork()
if pid == 0:
    os._exit(0 if np.array_equal(student.forward(x).view(np.uint32), ref.view(np.uint32)) else 3)
assert os.waitpid(pid, 0)[1] == 0
np.save(sys.argv[2], np.concatenate(out))
print(" ".join(map(str, ks)), _fkernels.dense_path().decode().strip())
"""


def split_models():
    """Models whose leading dense layers split (widths not multiples of 16,
    the last layer split or not, a layer after that is not dense, norms)."""
    rng = np.random.default_rng(11)

    def dense(n_in, n_out, act):
        W = (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(F32)
        return Dense(W, rng.standard_normal(n_out).astype(F32), act)

    student = Model([dense(784, 200, "relu"), dense(200, 200, "relu"), dense(200, 10, "identity")],
                    norm=(F32(0.3), F32(0.35)))
    odd = Model([dense(300, 203, "relu"), dense(203, 97, "identity"), dense(97, 129, "tanh"),
                 dense(129, 5, "identity")], out_norm=(F32(1.5), F32(2.0)))
    last = Model([dense(256, 257, "relu"), dense(257, 130, "identity")])
    q = DenseInt8(rng.integers(-127, 128, (300, 200)).astype(np.int8),
                  np.full(200, 0.001, F32), np.zeros(200, F32), "relu")
    after_int8 = Model([q, dense(200, 200, "identity")])
    # low rank (two products each: t = U x, then V t + b), then dense; a
    # rank of 8 (< 16) does not split, so neither does what follows it
    from pykd.layers import LowRank

    def low_rank(n_in, r, n_out, act):
        return LowRank((rng.standard_normal((n_in, r)) / np.sqrt(n_in)).astype(F32),
                       (rng.standard_normal((r, n_out)) / np.sqrt(r)).astype(F32),
                       rng.standard_normal(n_out).astype(F32), act)

    low = Model([low_rank(784, 129, 200, "relu"), low_rank(200, 48, 203, "identity"),
                 dense(203, 100, "relu"), low_rank(100, 8, 100, "relu"),
                 dense(100, 7, "identity")])
    # codebook layers of 16, 32 (8-bit indices), 4 and 200 codes, then one
    # too small to split
    from pykd.layers import Codebook

    def codebook(n_in, n_out, n_codes, act):
        return Codebook((rng.standard_normal(n_codes) / np.sqrt(n_in)).astype(F32),
                        rng.integers(0, n_codes, (n_in, n_out)).astype(np.uint8),
                        rng.standard_normal(n_out).astype(F32), act)

    cb = Model([codebook(784, 200, 16, "relu"), codebook(200, 203, 32, "identity"),
                codebook(203, 150, 4, "relu"), codebook(150, 120, 200, "relu"),
                codebook(120, 10, 16, "identity")], norm=(F32(0.3), F32(0.35)))
    return [student, odd, last, after_int8, low, cb]


SPLIT_LAYERS = [2, 2, 2, 0, 3, 4]   # per split_models() on 2+ threads


@pytest.mark.parametrize("path", PATHS)
def test_one_sample_on_two_threads_gives_the_bits_of_one(tmp_path, path):
    flags = _cpu_flags()
    if path != "portable" and (path + ("f" if path == "avx512" else "")) not in flags:
        pytest.skip(f"this CPU has no {path}")
    results = {}
    for threads, limit in (("1", None), ("2", None), ("3", None), ("2", "1")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
        env.update(PYKD_DENSE_PATH=path, OMP_NUM_THREADS=threads)
        if limit:
            env["OMP_THREAD_LIMIT"] = limit   # caps the threads when pykd loads: no split
        name = f"{threads}-{limit}"
        out = tmp_path / f"{name}.npy"
        res = subprocess.run([sys.executable, "-c", SPLIT_PROBE, os.path.dirname(__file__),
                              str(out)], env=env, check=True, timeout=300, cwd=tmp_path,
                             capture_output=True, text=True)
        words = res.stdout.split()
        assert words[-1] == path
        ks = [int(w) for w in words[:-1]]
        assert ks == ([0] * len(SPLIT_LAYERS) if threads == "1" or limit else SPLIT_LAYERS), \
            (name, ks)
        results[name] = np.load(out)
    for name, got in results.items():
        assert same_bits(got, results["1-None"]), name


# Late helpers (pykd_dense_team.c): after 6 split calls in 8 whose helper
# part the caller had to run itself, the caller runs alone for 20 ms. A hold
# makes the helpers claim nothing, as if another process had their core.
LATE_PROBE = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from test_batch1 import split_models
from pykd import _fkernels
student = split_models()[0]
x = np.random.default_rng(5).standard_normal((1, 784)).astype(np.float32)
ref = student.forward(x).view(np.uint32).copy()
probe = _fkernels.network_team_probe
probe(hold=1, reset=1)
same = all(np.array_equal(student.forward(x).view(np.uint32), ref) for _ in range(20))
held = [int(c) for c in probe(hold=0, reset=1)]
same = same and all(np.array_equal(student.forward(x).view(np.uint32), ref) for _ in range(5))
freed = [int(c) for c in probe(hold=-1, reset=0)]
print(int(same), *held, *freed)
"""


def test_late_helpers_make_the_caller_run_alone_with_the_same_bits():
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env["OMP_NUM_THREADS"] = "2"
    res = subprocess.run([sys.executable, "-c", LATE_PROBE, os.path.dirname(__file__)],
                         env=env, check=True, timeout=300, capture_output=True, text=True)
    same, split, alone, late, split2, alone2, late2 = map(int, res.stdout.split())
    assert same == 1
    # held: every split call is late; the sixth starts an alone period (a call
    # more than 20 ms after it, on a very loaded machine, splits again: late too)
    assert split >= 6 and late == split and alone >= 1 and split + alone == 20
    # released and reset: the split resumes (a loaded machine may still make
    # some calls late, and six of them another alone period)
    assert split2 >= 1 and split2 + alone2 == 5 and late2 <= split2


# A codebook layer in the chain that sees a NaN (a NaN input, or an index
# past the codebook in a corrupt buffer) makes the layers run again on one
# thread: the outputs and errors of one thread.
NAN_PROBE = r"""
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from test_batch1 import split_models
from pykd import _fkernels
model = split_models()[-1]
out = []
x = np.random.default_rng(7).standard_normal((1, 784)).astype(np.float32)
out.append(model.forward(x)[0])
x[0, 100] = np.nan
out.append(model.forward(x)[0])
x[0, 100] = 0.5
off = int(model.table[0, 6])          # layer 1's packed indices in i8 (4 bits)
model.i8[off + 1000] = np.uint8(0xff).view(np.int8)   # valid: 16 codes
out.append(model.forward(x)[0])
model.i8[off + 1000] = np.int8(0)
off = int(model.table[1, 6])          # layer 2: 32 codes in 8-bit indices
model.i8[off + 77] = np.int8(40)
try:
    model.forward(x)
    print("no error")
except ValueError as e:
    print("error:", e)
np.save(sys.argv[2], np.stack(out))
"""


def test_a_nan_in_a_split_codebook_layer_gives_what_one_thread_gives(tmp_path):
    got = {}
    for threads in ("1", "2"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
        env["OMP_NUM_THREADS"] = threads
        out = tmp_path / f"{threads}.npy"
        res = subprocess.run([sys.executable, "-c", NAN_PROBE, os.path.dirname(__file__),
                              str(out)], env=env, check=True, timeout=300, capture_output=True,
                             text=True)
        got[threads] = (np.load(out), res.stdout.strip())
    (one, msg1), (two, msg2) = got["1"], got["2"]
    assert same_bits(one, two)
    assert np.isfinite(one[0]).all() and np.isnan(one[1]).all() and np.isfinite(one[2]).all()
    assert msg1 == msg2 and msg1.startswith("error:") and "corrupt layer data" in msg1, msg1


def test_lean_binding_takes_only_the_common_case():
    """pykd/_lean.c: a fresh array for native aligned C-contiguous arrays of
    the model's dtypes; None for anything else, the network's status when it
    refuses the arguments (the full path then runs and raises); nothing is
    copied or cast."""
    from pykd import _lean, models
    model = _student().to_model()
    x = np.random.default_rng(6).standard_normal((3, 784)).astype(F32)
    model.forward(x)                                  # binds and sizes the workspace
    work = model._fast_work(3)
    lean = models._lean_forward()
    args = [model.table, model.f32, model.i8, model.i32, model._norm_buf, model._norm_kinds, x,
            10, work]
    y = lean(*args)
    assert y.dtype == F32 and y.shape == (3, 10) and y.flags.c_contiguous and y.base is None
    assert same_bits(y, model.forward(x, upto=3))
    assert lean(*args) is not y

    def refused(i, value, by_network=False):
        a = list(args)
        a[i] = value
        got = lean(*a)
        if by_network:                                # the network's status (ERR_ARG)
            assert type(got) is int and got == models._codes.ERR_ARG, (i, got)
        else:
            assert got is None, i

    refused(6, np.asfortranarray(x))                  # not C-contiguous
    refused(6, x.astype(np.float64))                  # another dtype: never cast
    refused(6, x.astype(">f4"))                       # byte-swapped
    refused(6, x[:, None])                            # another rank
    refused(6, x[:0])                                 # no rows
    refused(6, x[:, ::2])                             # a strided view
    refused(6, x[:, :783].copy(), by_network=True)    # the width
    refused(7, 9, by_network=True)                    # y's shape
    refused(7, "10")
    ro = work.copy()
    ro.flags.writeable = False
    refused(8, ro)                                    # work must be writable
    refused(8, work[:5], by_network=True)             # its size
    refused(0, model.table.astype(np.int32))
    refused(0, np.zeros((3, 15), np.int64))           # N_FIELDS = 14 (pykd._codes)
    refused(0, np.asfortranarray(model.table))
    refused(1, model.f32.astype(np.float64))
    refused(5, model._norm_kinds.astype(np.int64))
    refused(1, list(model.f32))
    assert lean(*args[:8]) is None                    # too few arguments
    assert models._codes.N_FIELDS == 14
    with pytest.raises(ValueError, match="null"):
        _lean.bind(0)
