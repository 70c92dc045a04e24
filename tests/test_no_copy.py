"""No hidden copies, determinism and thread safety of the Fortran backend.

With ``copy_report`` on, f2py's runtime prints ``copied an array`` on stderr
whenever a wrapper copies an argument. Every public function, given
float32 C-contiguous arrays (int64 labels, bool masks), must not trigger
one. The check runs in a child process that captures that stderr.
"""
import inspect
import json
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import pykd
import pykd.kernels

try:
    from pykd._build_config import copy_report as COPY_REPORT
except ImportError:  # a source tree without a build: the conftest reports it
    COPY_REPORT = False

pytestmark = pytest.mark.fortran

F32 = np.float32
COPY_MSG = "copied an array"

needs_copy_report = pytest.mark.skipif(
    not COPY_REPORT,
    reason="pykd was built without copy_report (pykd._build_config.copy_report is False): "
           "rebuild with -Csetup-args=-Dcopy_report=true to detect hidden array copies")


# Each entry: a statement run in the child with rng, f32, pykd in scope.
# Sizes include ones big enough for the OpenMP paths (>= 32768 elements).
CALLS = {
    "dense": "pykd.dense(x, W, b, 'relu')",
    "dense-out": "pykd.dense(x, W, b, 'tanh', out=np.empty((x.shape[0], W.shape[1]), f32))",
    "dense-big": "pykd.dense(xb, Wb, bb, 'identity')",
    "dense_backward": "pykd.dense_backward(dy, x, W, y, 'relu')",
    "dense_backward-nodx": "pykd.dense_backward(dy, x, W, y, 'tanh', need_dx=False)",
    "softmax": "pykd.softmax(z, 2.0)",
    "log_softmax": "pykd.log_softmax(z, 0.5)",
    "cross_entropy": "pykd.cross_entropy(z, labels)",
    "kd_loss": "pykd.kd_loss(z, t, labels, 4.0, 0.1)",
    "kd_loss-big": "pykd.kd_loss(zb, tb, labels_b, 2.0, 0.5)",
    "sgd_step": "pykd.sgd_step(p, g, vel, 0.1, 0.9, 1e-4)",
    "sgd_step-masked": "pykd.sgd_step(p2d, g2d, vel2d, 0.1, 0.9, 0.0, mask2d)",
    "adam_step": "pykd.adam_step(p, g, m, v, 3, weight_decay=1e-3)",
    "adam_step-masked": "pykd.adam_step(p2d, g2d, m2d, v2d, 1, mask=mask2d)",
    "magnitude_mask": "pykd.magnitude_mask(W, 0.5)",
    "magnitude_mask-global": "pykd.magnitude_mask([W, Wb, b], 0.7)",
    "quantize_int8": "pykd.quantize_int8(W)",
    "quantize_int8-per-channel": "pykd.quantize_int8(Wb, per_channel=True)",
    "dequantize_int8": "pykd.dequantize_int8(q, sq)",
    "quantize_activations": "pykd.quantize_activations(xb)",
    "int8_gemm": "pykd.int8_gemm(qx, q)",
    "int8_matmul": "pykd.int8_matmul(x, q, sq, b)",
    "int8_matmul-nobias": "pykd.int8_matmul(xb, qb, sqb)",
}

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pykd
    f32 = np.float32
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(f32)
    x, W, b = r(16, 40), r(40, 24), r(24)
    xb, Wb, bb = r(300, 128), r(128, 300), r(300)
    y = pykd.dense(x, W, b, 'relu'); dy = r(16, 24)
    z, t = r(16, 10), r(16, 10); labels = rng.integers(0, 10, 16)
    zb, tb = r(4000, 10), r(4000, 10); labels_b = rng.integers(0, 10, 4000)
    p, g, vel, m, v = r(50000), r(50000), r(50000), np.zeros(50000, f32), np.zeros(50000, f32)
    p2d, g2d, vel2d = r(20, 30), r(20, 30), np.zeros((20, 30), f32)
    m2d, v2d = np.zeros((20, 30), f32), np.zeros((20, 30), f32)
    mask2d = rng.random((20, 30)) > 0.5
    q, sq = pykd.quantize_int8(W, per_channel=True)
    qb, sqb = pykd.quantize_int8(Wb)
    qx, _ = pykd.quantize_activations(x)
    assert labels.dtype == np.int64 and mask2d.dtype == np.bool_
    calls = json.loads(sys.argv[1])
    for name, stmt in calls.items():
        sys.stderr.write("@@ " + name + "\\n"); sys.stderr.flush()
        exec(stmt)
        sys.stderr.flush()
    sys.stderr.write("@@ done\\n"); sys.stderr.flush()
""")


def run_child(code, *args, cwd):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


@pytest.fixture(scope="module")
def copy_sections(tmp_path_factory):
    proc = run_child(CHILD, json.dumps(CALLS), cwd=tmp_path_factory.mktemp("nocopy"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections, current = {}, None
    for line in proc.stderr.splitlines():
        if line.startswith("@@ "):
            current = line[3:]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    assert "done" in sections, proc.stderr[-3000:]
    return sections


@needs_copy_report
@pytest.mark.parametrize("name", list(CALLS), ids=list(CALLS))
def test_public_function_does_not_copy(name, copy_sections):
    lines = copy_sections[name]
    copies = [ln for ln in lines if COPY_MSG in ln]
    assert not copies, f"{name}: f2py copied arrays: {copies}"


def test_every_public_function_is_covered():
    covered = {stmt.split("(")[0].replace("pykd.", "") for stmt in CALLS.values()}
    kernels = {n for n, o in vars(pykd.kernels).items()
               if inspect.isfunction(o) and not n.startswith("_") and o.__module__ == "pykd.kernels"}
    assert covered == kernels


@needs_copy_report
@pytest.mark.parametrize("variant", ["float64-transposed", "c-order-not-transposed"])
def test_copy_detection_positive_control(variant, tmp_path):
    x = "np.ones((3, 5)).T" if variant == "float64-transposed" else "np.ones((5, 3), np.float32)"
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        import pykd._fkernels as f
        f32 = np.float32
        W = np.ones((5, 6), f32); b = np.ones(6, f32); y = np.empty((3, 6), f32)
        stat = f.dense_forward({x}, W.T, b, 0, y.T)
        sys.stderr.flush()
        print(stat, float(y[0, 0]))
    """)
    proc = run_child(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert COPY_MSG in proc.stderr
    stat, y00 = proc.stdout.split()
    assert int(stat) == 0 and float(y00) == 6.0


@needs_copy_report
def test_no_copy_through_public_api_even_for_converted_labels(tmp_path):
    """int32 labels are documented to be converted in Python (a copy of n
    integers), which f2py must not see as a copy of its own; logits never copy."""
    code = CHILD
    proc = run_child(code, json.dumps({"ce-int32": "pykd.cross_entropy(z, labels.astype(np.int32))",
                                       "kd-uint8": "pykd.kd_loss(z, t, labels.astype(np.uint8))"}),
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert COPY_MSG not in proc.stderr


# ----------------------------------------------------------- determinism

def kernel_suite(rng, big=True):
    """Inputs -> a function running every kernel and returning all outputs."""
    r = lambda *s: rng.standard_normal(s).astype(F32)   # noqa: E731
    n, n_in, n_out = (512, 200, 96) if big else (8, 12, 5)
    x, W, b = r(n, n_in), r(n_in, n_out), r(n_out)
    dy = r(n, n_out)
    z, t = r(n * 8, 10), r(n * 8, 10)
    labels = rng.integers(0, 10, n * 8)
    p0, g = r(n * n_in), r(n * n_in)
    mask = rng.random(n * n_in) > 0.3
    tied = rng.integers(-3, 4, (n, n_in)).astype(F32)

    def run():
        out = {}
        for act in ("identity", "relu", "tanh"):
            y = pykd.dense(x, W, b, act)
            out[f"dense-{act}"] = y
            dx, dW, db = pykd.dense_backward(dy, x, W, y, act)
            out[f"dback-{act}"] = (dx, dW, db)
            out[f"dback-nodx-{act}"] = pykd.dense_backward(dy, x, W, y, act, need_dx=False)[1:]
        out["softmax"] = pykd.softmax(z, 3.0)
        out["log_softmax"] = pykd.log_softmax(z, 0.7)
        out["ce"] = pykd.cross_entropy(z, labels)
        out["kd"] = pykd.kd_loss(z, t, labels, 4.0, 0.25)
        p, vel = p0.copy(), np.zeros_like(p0)
        pm, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
        for step in (1, 2, 3):
            pykd.sgd_step(p, g, vel, 0.1, 0.9, 1e-4, mask)
            pykd.adam_step(pm, g, m, v, step, weight_decay=1e-3)
        out["sgd"] = (p, vel)
        out["adam"] = (pm, m, v)
        out["mask"] = pykd.magnitude_mask(tied, 0.45)
        out["mask-global"] = pykd.magnitude_mask([tied, W, x], 0.6)
        q, s = pykd.quantize_int8(W, per_channel=True)
        out["quant"] = (q, s, pykd.quantize_int8(x))
        out["dequant"] = pykd.dequantize_int8(q, s)
        qx, sx = pykd.quantize_activations(x)
        out["qact"] = (qx, sx)
        out["gemm"] = pykd.int8_gemm(qx, q)
        out["i8mm"] = pykd.int8_matmul(x, q, s, b)
        return out
    return run


def flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}{k}/")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}{i}/")
    elif obj is not None:
        yield prefix.rstrip("/"), np.asarray(obj)


def assert_bitwise_equal(a, b, what):
    fa, fb = dict(flatten(a)), dict(flatten(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        x, y = fa[k], fb[k]
        assert x.dtype == y.dtype and x.shape == y.shape, (what, k)
        assert x.tobytes() == y.tobytes(), f"{what}: {k} differs"


def test_deterministic_repeat_calls():
    run = kernel_suite(np.random.default_rng(42))
    first = run()
    for _ in range(2):
        assert_bitwise_equal(first, run(), "repeat call")


def test_thread_safety_concurrent_calls():
    suites = [kernel_suite(np.random.default_rng(100 + i), big=(i % 2 == 0)) for i in range(4)]
    expected = [s() for s in suites]
    results = [[] for _ in suites]
    errors = []
    barrier = threading.Barrier(len(suites))

    def worker(i):
        try:
            barrier.wait()
            for _ in range(3):
                results[i].append(suites[i]())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(suites))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    for i, runs in enumerate(results):
        assert len(runs) == 3
        for res in runs:
            assert_bitwise_equal(expected[i], res, f"thread {i}")


def test_outputs_do_not_alias_inputs_or_each_other():
    rng = np.random.default_rng(5)
    x, W, b = (rng.standard_normal(s).astype(F32) for s in ((4, 6), (6, 3), (3,)))
    y1, y2 = pykd.dense(x, W, b), pykd.dense(x, W, b)
    assert not np.shares_memory(y1, y2)
    z = rng.standard_normal((4, 5)).astype(F32)
    p = pykd.softmax(z)
    assert not np.shares_memory(p, z)
    z0 = z.copy()
    pykd.kd_loss(z, z[::-1].copy(), np.zeros(4, np.int64))
    pykd.log_softmax(z)
    pykd.quantize_int8(z)
    pykd.magnitude_mask(z, 0.5)
    assert np.array_equal(z, z0), "an input was modified"
