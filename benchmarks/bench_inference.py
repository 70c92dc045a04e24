"""Inference benchmark: every pykd layer kind against ONNX Runtime, plain
NumPy and PyTorch, same weights, each candidate in a worker process of its own.

    python benchmarks/bench_inference.py [--model student.pykd] [--quick]
                                         [--threads 1,2] [--out DIR]

The model is the demo's 784-200-200-10 student (``--model FILE``, e.g. a
trained KD student; otherwise one is trained for ``--epochs`` epochs on
Fashion-MNIST so the script runs anywhere). From it, pykd's one-shot
conversions make one variant per layer kind (int8 dynamic and static, a
90%-magnitude-pruned copy dense and as sparse_csr, low rank, a 4-bit
codebook, sparse + 5-bit codebook). Every candidate is saved to a file (its
bytes on disk) and loaded back in its worker:

* each pykd variant: ``pykd.load_model(file).forward(x)``;
* plain NumPy: ``np.maximum(x @ W + b, 0)`` layer after layer, float32,
  the float32 student's weights from an ``.npz``;
* ONNX Runtime float32: a graph built here with the ``onnx`` helpers (the
  normalisation as Sub/Div, then MatMul + Add + Relu per layer; opset 17),
  ``intra_op_num_threads`` = the thread count, ``inter_op_num_threads`` 1,
  sequential execution;
* ONNX Runtime dynamic int8: ``quantize_dynamic`` of that graph
  (per-channel int8 weights);
* PyTorch float32 and ``torch.ao.quantization.quantize_dynamic`` int8, only
  when ``import torch`` works (reported as absent otherwise).

Before timing, each worker runs its candidate on the whole test set and the
parent compares the logits with a NumPy float64 reference of the same
weights (for a converted variant: its effective weights, ``to_dense()``):
float kinds must agree within 1e-4 of the largest reference logit, int8
kinds must give the float32 model's argmax on at least 99% of the test
rows. A candidate that fails is reported as failed and not timed.

Timing, per thread count and batch size (1 and 256): rounds in which every
candidate in turn (harness.Workers, a 0.3 s pause when the candidate
changes) makes one untimed call and then K calls, each timed on its own;
the median and p99 are over all those calls. The cold first call is the
first ``forward`` of a freshly spawned process right after loading the file
(median of ``--cold`` fresh processes, one at a time, at the largest thread
count). Ratios are medians over ONNX Runtime float32's and over pykd
float32's. Timing never fails the run.

Each worker starts as a user's fresh process of that library would: with
the threading variables the benchmark process started with (pykd's import
sets GOMP_SPINCOUNT or OMP_WAIT_POLICY in ``os.environ``; the NumPy, ONNX
Runtime and PyTorch workers must not inherit it), and without
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (a sandbox's pin: OPENBLAS_CORETYPE=
Haswell gives NumPy's and pykd's OpenBLAS AVX2 kernels on an AVX-512 CPU);
``--keep-blas-env`` keeps them. Each worker reports the pools it runs on.

How far to trust a number: every timed block records the run-queue wait of
its worker's threads (/proc schedstat: runnable, but another task had the
core), and from batch 64 on each call's; the tables show the wait per call
and the p99 over the calls that did not wait. On 2 cores, a second
process's thread turns a 2-thread call into one scheduler time slice
(4 ms at HZ=250), more for a BLAS whose threads spin on sched_yield.

The report ends with the machine limits (pykd.dense's sgemm at the
batch-256 shapes, in pykd float32's worker) and the issue-11 targets table.
Writes ``DIR/bench-inference.md``, ``.json`` and ``.png`` (latency against
bytes on disk, median with a bar to p99, open marker: cold first call;
matplotlib when importable).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import textwrap
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

BATCHES = (1, 256)
REFERENCES = ("pykd float32", "ORT float32")   # the ratios' denominators
PER_CALL_WAIT_BATCH = 64   # from this batch on, each call's run-queue wait is recorded
FLOAT_TOL = 1e-4         # of max |reference logit|, for the float kinds
INT8_AGREEMENT = 0.99    # argmax agreement with the float32 model, for the int8 kinds
OPSET = 17
# calls per timed block, per batch size (full mode, and --quick)
BLOCK_CALLS = {1: 300, 256: 50}
QUICK_CALLS = {1: 100, 256: 15}
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8",
             "amx_tile", "asimd", "asimddp", "sve")


def _slug(label):
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


# --------------------------------------------------------------------------
# the model and its variants
# --------------------------------------------------------------------------

def pruned(model, sparsity):
    """A copy of the MLP with its smallest ``sparsity`` of weights (global
    magnitude ranking) set to zero."""
    import pykd
    m = model.copy()
    Ws = [W for W, _ in m.layers]
    for W, keep in zip(Ws, pykd.magnitude_mask(Ws, sparsity)):
        W[~keep] = 0
    return m


def pykd_variants(student, X_cal):
    """[(label, model, check)] for every layer kind the conversions make;
    ``check`` is "float" (same effective weights within FLOAT_TOL) or
    "int8" (argmax agreement with the float32 student)."""
    import pykd
    p90 = pruned(student, 0.9)
    return [
        ("pykd float32", student, "float"),
        ("pykd int8 dynamic", pykd.quantize_model(student, activations="dynamic"), "int8"),
        ("pykd int8 static", pykd.quantize_model(student, activations="static",
                                                 calibration=X_cal), "int8"),
        ("pykd pruned 90% dense", p90, "float"),
        ("pykd sparse_csr 90%", pykd.sparsify(p90), "float"),
        ("pykd low_rank e0.9", pykd.low_rank(student, energy=0.9), "float"),
        ("pykd codebook 4-bit", pykd.cluster(student, bits=4, seed=0), "float"),
        ("pykd sparse90+codebook 5-bit", pykd.cluster(pykd.sparsify(p90), bits=5, seed=0),
         "float"),
    ]


def effective(model):
    """(layers [(W, b, activation)] float32, norm, out_norm) of an MLP or Model:
    the dense weights every layer kind stands for."""
    m = model.to_model()
    layers = [(np.ascontiguousarray(L.to_dense(), np.float32), np.asarray(L.b, np.float32),
               L.activation) for L in m.layers]
    return layers, m.norm, m.out_norm


_ACTS64 = {"identity": lambda h: h, "relu": lambda h: np.maximum(h, 0.0), "tanh": np.tanh,
           "sigmoid": lambda h: 1.0 / (1.0 + np.exp(-h))}


def reference_logits(layers, norm, out_norm, X):
    """The NumPy reference in float64 of ``layers`` = [(W, b, act)]."""
    h = np.asarray(X, np.float64)
    if norm is not None:
        h = (h - np.float64(norm[0]) if np.ndim(norm[0]) == 0 else h - norm[0])
        h = h / np.asarray(norm[1], np.float64)
    for W, b, act in layers:
        if act not in _ACTS64:
            raise ValueError(f"the reference has no activation {act!r}")
        h = _ACTS64[act](h @ W.astype(np.float64) + b.astype(np.float64))
    if out_norm is not None:
        h = h * np.asarray(out_norm[1], np.float64) + np.asarray(out_norm[0], np.float64)
    return h


def check_logits(y, ref, kind, ref_f32):
    """Compare a candidate's logits ``y`` with its reference.

    Returns a dict with ``ok``, ``max_abs_diff`` (to ``ref``), ``tol`` and
    ``agreement`` (argmax agreement with ``ref_f32``, the float32 model).
    """
    y = np.asarray(y)
    out = {"kind": kind}
    if y.shape != ref.shape:
        out.update(ok=False, why=f"logits shape {y.shape}, expected {ref.shape}")
        return out
    if not np.isfinite(y).all():
        out.update(ok=False, why="non-finite logits")
        return out
    diff = float(np.abs(y.astype(np.float64) - ref).max())
    tol = FLOAT_TOL * max(1.0, float(np.abs(ref).max()))
    agree = float((y.argmax(1) == ref_f32.argmax(1)).mean())
    out.update(max_abs_diff=diff, tol=tol, agreement=agree)
    if kind == "float":
        out["ok"] = diff <= tol
        if not out["ok"]:
            out["why"] = f"max |logit - reference| = {diff:.3g} > {tol:.3g}"
    else:
        out["ok"] = agree >= INT8_AGREEMENT
        if not out["ok"]:
            out["why"] = f"argmax agreement {agree:.2%} < {INT8_AGREEMENT:.0%}"
    return out


# --------------------------------------------------------------------------
# the peers' files
# --------------------------------------------------------------------------

def save_numpy(path, layers, norm, out_norm):
    """The float32 weights for the plain NumPy script (uncompressed .npz)."""
    arrs = {"n_layers": np.int64(len(layers)),
            "acts": np.array([a for _, _, a in layers])}
    for k, (W, b, _) in enumerate(layers):
        arrs[f"W{k}"], arrs[f"b{k}"] = W, b
    if norm is not None:
        arrs["mean"], arrs["std"] = (np.asarray(v, np.float32) for v in norm)
    if out_norm is not None:
        arrs["out_mean"], arrs["out_std"] = (np.asarray(v, np.float32) for v in out_norm)
    np.savez(path, **arrs)


def onnx_graph(layers, norm, out_norm):
    """ONNX model (opset 17): [Sub, Div], then MatMul + Add (+ Relu/Tanh/
    Sigmoid) per layer, [Mul, Add]; input "x" (batch, n_features) float32,
    output "logits"."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    acts = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "identity": None}
    nodes, inits = [], []
    n_in, n_out = layers[0][0].shape[0], layers[-1][0].shape[1]

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    h = "x"
    if norm is not None:
        nodes.append(helper.make_node("Sub", [h, const("in_mean", norm[0])], ["x_c"]))
        nodes.append(helper.make_node("Div", ["x_c", const("in_std", norm[1])], ["x_n"]))
        h = "x_n"
    for k, (W, b, act) in enumerate(layers):
        if act not in acts:
            raise ValueError(f"layer {k + 1}: no ONNX operator for activation {act!r}")
        nodes.append(helper.make_node("MatMul", [h, const(f"W{k}", W)], [f"mm{k}"]))
        nodes.append(helper.make_node("Add", [f"mm{k}", const(f"b{k}", b)], [f"z{k}"]))
        h = f"z{k}"
        if acts[act]:
            nodes.append(helper.make_node(acts[act], [h], [f"a{k}"]))
            h = f"a{k}"
    if out_norm is not None:
        nodes.append(helper.make_node("Mul", [h, const("out_std", out_norm[1])], ["y_s"]))
        nodes.append(helper.make_node("Add", ["y_s", const("out_mean", out_norm[0])], ["y_o"]))
        h = "y_o"
    nodes.append(helper.make_node("Identity", [h], ["logits"]))
    graph = helper.make_graph(
        nodes, "pykd_student",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="pykd bench_inference")
    model.ir_version = min(model.ir_version, 8)   # readable by older runtimes too
    onnx.checker.check_model(model)
    return model


def save_onnx(dirname, layers, norm, out_norm):
    """(float32 path, dynamic int8 path) of the ONNX files."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    f32 = os.path.join(dirname, "student_f32.onnx")
    i8 = os.path.join(dirname, "student_int8.onnx")
    onnx.save(onnx_graph(layers, norm, out_norm), f32)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)      # its advice to run a pre-processing step first
    try:
        quantize_dynamic(f32, i8, per_channel=True, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return f32, i8


def torch_module(layers):
    import torch
    mods = []
    acts = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
    for W, b, act in layers:
        lin = torch.nn.Linear(W.shape[0], W.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(W.T)))
            lin.bias.copy_(torch.from_numpy(b))
        mods.append(lin)
        if act != "identity":
            mods.append(acts[act]())
    return torch.nn.Sequential(*mods).eval()


def save_torch(dirname, layers):
    """(float32 path, int8 path): the state dicts of the float32 module and
    of its ``quantize_dynamic`` int8 copy (torch.save)."""
    import torch
    m = torch_module(layers)
    f32 = os.path.join(dirname, "student_f32.pt")
    i8 = os.path.join(dirname, "student_int8.pt")
    torch.save(m.state_dict(), f32)
    q = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    torch.save(q.state_dict(), i8)
    return f32, i8


def torch_available():
    try:
        import torch  # noqa: F401
    except Exception as exc:   # not installed here: reported as absent
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


def prepare(student, X_cal, X_check, workdir, *, with_onnx=True, with_torch=None):
    """Write every candidate's file and reference into ``workdir``.

    Returns ``(specs, absent)``: ``specs`` is a list of dicts (label,
    backend, path, bytes, check, ref, pykd kinds, shape info) that the
    workers read from ``workdir/specs.json``; ``absent`` maps a peer that
    could not be built to the reason.
    """
    import pykd
    os.makedirs(workdir, exist_ok=True)
    specs, absent = [], {}
    f32_layers, norm, out_norm = effective(student)
    ref_f32 = reference_logits(f32_layers, norm, out_norm, X_check)
    np.save(os.path.join(workdir, "ref_f32.npy"), ref_f32)
    np.save(os.path.join(workdir, "x_check.npy"), np.ascontiguousarray(X_check, np.float32))

    def add(label, backend, path, check, ref_name, **extra):
        specs.append(dict(label=label, slug=_slug(label), backend=backend, path=path,
                          bytes=os.path.getsize(path), check=check, ref=ref_name, **extra))

    for label, model, check in pykd_variants(student, X_cal):
        path = os.path.join(workdir, _slug(label) + ".pykd")
        model.save(path)
        loaded = pykd.load_model(path)
        if check == "float":
            ref_name = f"ref_{_slug(label)}.npy"
            np.save(os.path.join(workdir, ref_name),
                    reference_logits(*effective(loaded), X_check))
        else:
            ref_name = "ref_f32.npy"
        kinds = sorted(set(getattr(loaded, "kinds", ["dense"])))
        add(label, "pykd", path, check, ref_name, kinds=kinds,
            nonzeros=int(loaded.nonzeros), parameters=int(loaded.parameters))

    path = os.path.join(workdir, "student_f32.npz")
    save_numpy(path, f32_layers, norm, out_norm)
    add("numpy float32", "numpy", path, "float", "ref_f32.npy")
    if with_onnx:
        try:
            p32, p8 = save_onnx(workdir, f32_layers, norm, out_norm)
        except Exception as exc:
            absent["onnxruntime"] = f"{type(exc).__name__}: {exc}"
        else:
            add("ORT float32", "ort", p32, "float", "ref_f32.npy")
            add("ORT int8 dynamic", "ort", p8, "int8", "ref_f32.npy")
    if with_torch is None:
        with_torch, why = torch_available()
        if not with_torch:
            absent["torch"] = why
    if with_torch:
        try:
            p32, p8 = save_torch(workdir, f32_layers)
        except Exception as exc:
            absent["torch"] = f"{type(exc).__name__}: {exc}"
        else:
            add("torch float32", "torch", p32, "float", "ref_f32.npy")
            add("torch int8 dynamic", "torch", p8, "int8", "ref_f32.npy")
    harness.write_json(os.path.join(workdir, "specs.json"), specs)
    return specs, absent


# --------------------------------------------------------------------------
# loading a candidate (in its worker)
# --------------------------------------------------------------------------

def load_candidate(spec, threads):
    """``forward(x) -> logits`` of one candidate, loaded from its file as a
    user of that backend would; ``threads`` sets ONNX Runtime's and
    PyTorch's intra-op threads (threadpoolctl limits the BLAS/OpenMP pools)."""
    be, path = spec["backend"], spec["path"]
    if be == "pykd":
        import pykd
        model = pykd.load_model(path)
        return model.forward
    if be == "numpy":
        return _numpy_forward(path)
    if be == "ort":
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or 0)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        run = sess.run
        return lambda x: run(["logits"], {"x": x})[0]
    if be == "torch":
        return _torch_forward(spec, threads)
    raise ValueError(f"{spec['label']}: unknown backend {be!r}")


def _numpy_forward(path):
    with np.load(path, allow_pickle=False) as z:
        n = int(z["n_layers"])
        acts = [str(a) for a in z["acts"]]
        Ws = [np.ascontiguousarray(z[f"W{k}"]) for k in range(n)]
        bs = [np.ascontiguousarray(z[f"b{k}"]) for k in range(n)]
        norm = (z["mean"], z["std"]) if "mean" in z else None
        out_norm = (z["out_mean"], z["out_std"]) if "out_mean" in z else None
    f = {"relu": lambda h: np.maximum(h, 0), "identity": lambda h: h, "tanh": np.tanh}
    layers = [(W, b, f[a]) for W, b, a in zip(Ws, bs, acts)]

    def forward(x):
        h = x if norm is None else (x - norm[0]) / norm[1]
        for W, b, act in layers:
            h = act(h @ W + b)
        return h if out_norm is None else h * out_norm[1] + out_norm[0]
    return forward


def _torch_forward(spec, threads):
    import torch
    if threads:
        torch.set_num_threads(int(threads))
    with np.load(os.path.join(os.path.dirname(spec["path"]), "student_f32.npz")) as z:
        n = int(z["n_layers"])
        layers = [(z[f"W{k}"], z[f"b{k}"], str(z["acts"][k])) for k in range(n)]
        norm = (float(z["mean"]), float(z["std"])) if "mean" in z else None
    m = torch_module(layers)
    if spec["check"] == "int8":
        m = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    # our own file; a quantized state dict holds packed parameters, not only tensors
    m.load_state_dict(torch.load(spec["path"], weights_only=False))
    m.eval()

    def forward(x):
        with torch.inference_mode():
            t = torch.from_numpy(x)
            if norm is not None:
                t = (t - norm[0]) / norm[1]
            return m(t).numpy()
    return forward


def batched(forward, X, batch=256):
    return np.concatenate([np.asarray(forward(np.ascontiguousarray(X[s:s + batch])))
                           for s in range(0, X.shape[0], batch)])


# --------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------

_LIMITS = []   # threadpoolctl limits, kept for the life of a worker process


def _limit_threads(threads):
    if threads is not None and harness._tpc is not None:
        _LIMITS.append(harness._tpc.threadpool_limits(limits=int(threads)))


def _import_backend(spec):
    """Import the candidate's library before the thread limits are set
    (threadpoolctl limits only the pools already loaded: pykd's libgomp and
    BLAS come with ``import pykd``); a peer's worker does not load pykd."""
    if spec["backend"] == "pykd":
        import pykd  # noqa: F401
    elif spec["backend"] == "torch":
        import torch  # noqa: F401


def _spec(workdir, label):
    with open(os.path.join(workdir, "specs.json"), encoding="utf-8") as fh:
        specs = {s["label"]: s for s in json.load(fh)}
    if label not in specs:
        raise KeyError(f"no candidate {label!r} in {workdir}/specs.json")
    return specs[label]


def _pools():
    """The BLAS/OpenMP pools threadpoolctl sees in this process."""
    if harness._tpc is None:
        return None
    return [{k: (os.path.basename(str(p.get(k))) if k == "filepath" else p.get(k))
             for k in ("user_api", "internal_api", "version", "num_threads", "architecture",
                       "threading_layer", "filepath")}
            for p in harness._tpc.threadpool_info()]


def backend_info(spec, threads):
    """What a candidate's worker runs on: its thread pools (kernels each
    OpenBLAS picked, thread counts), the threading variables it started
    with, and its library's own build facts (PyTorch's BLAS and CPU
    capability, ONNX Runtime's device)."""
    info = {"pools": _pools(), "env": harness.thread_env(), "pid": os.getpid(),
            # a peer's worker must not have pykd in it (nor a pykd worker torch)
            "loaded": sorted(m for m in ("pykd", "torch", "onnxruntime") if m in sys.modules)}
    be = spec["backend"]
    if be == "pykd":
        try:
            from pykd import _build_config as bc
            info["pykd_simd"] = getattr(bc, "simd", None)
        except ImportError:
            pass
    elif be == "ort":
        import onnxruntime as ort
        info["ort"] = {"version": ort.__version__, "device": ort.get_device(),
                       "intra_op_threads": threads, "inter_op_threads": 1}
    elif be == "torch":
        import torch
        show = torch.__config__.show()

        def grab(pattern):
            import re
            m = re.search(pattern, show)
            return m.group(1).strip() if m else None
        info["torch"] = {
            "version": torch.__version__, "cuda": torch.version.cuda,
            "build": "CPU" if not torch.version.cuda else f"CUDA {torch.version.cuda}",
            "blas": grab(r"BLAS_INFO=(\w+)"),
            "mkl": grab(r"Math Kernel Library Version ([\d.]+)"),
            "onednn": grab(r"MKL-DNN (v[\d.]+)"),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "quantized_engine": torch.backends.quantized.engine,
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
    return info


# the batch-256 layer shapes of the 784-200-200-10 student, (batch, in, out)
DENSE_SHAPES = ((256, 784, 200), (256, 200, 200), (256, 200, 10))


def measure_dense_limits(threads, shapes=DENSE_SHAPES, calls=40):
    """sgemm throughput of one ``pykd.dense`` layer (bias, identity) at each
    shape, in this worker (its BLAS, its threads): the median of ``calls``
    calls timed one by one. Returns [{"shape", "median_s", "gflops"}]."""
    import pykd
    rng = np.random.default_rng(0)
    out = []
    for m, k, n in shapes:
        x = rng.standard_normal((m, k), dtype=np.float32)
        W = rng.standard_normal((k, n), dtype=np.float32)
        b = np.zeros(n, np.float32)
        y = np.empty((m, n), np.float32)
        for _ in range(5):
            pykd.dense(x, W, b, out=y)
        ts = np.empty(calls)
        for i in range(calls):
            t0 = time.perf_counter()
            pykd.dense(x, W, b, out=y)
            ts[i] = time.perf_counter() - t0
        med = float(np.median(ts))
        out.append({"shape": [m, k, n], "median_s": med, "gflops": 2.0 * m * k * n / med / 1e9,
                    "threads": threads})
    return out


def worker_factory(backend, workdir, n_threads, block_calls, check_dir):
    """A timing worker (harness.Workers) of one candidate (``backend`` is its
    label): loads its file, writes its logits on the check rows to
    ``check_dir/check-<slug>.npy``, and serves ``"lat<batch>"`` callables
    that make one untimed call and then ``block_calls[batch]`` calls timed
    one by one, appending their latencies (float64 seconds) to
    ``check_dir/lat-<slug>-<batch>.f64``."""
    spec = _spec(workdir, backend)
    _import_backend(spec)
    _limit_threads(n_threads)
    forward = load_candidate(spec, n_threads)
    X = np.load(os.path.join(workdir, "x_check.npy"))
    np.save(os.path.join(check_dir, f"check-{spec['slug']}.npy"),
            batched(forward, X).astype(np.float32))
    perf = time.perf_counter

    info = backend_info(spec, n_threads)

    def get(name):
        if name == "info":
            return lambda: info
        if name == "sgemm":
            return lambda: measure_dense_limits(n_threads)
        if not name.startswith("lat"):
            raise KeyError(name)
        batch = int(name[3:])
        x = np.ascontiguousarray(X[:batch])
        k = int(block_calls[str(batch)])
        buf = np.empty(k, np.float64)
        fh = open(os.path.join(check_dir, f"lat-{spec['slug']}-{batch}.f64"), "ab")
        sh = open(os.path.join(check_dir, f"sched-{spec['slug']}-{batch}.f64"), "ab")
        sched, cpu_time = harness.sched_times, time.process_time
        # per call, the run-queue wait of the worker's threads: reading it
        # (~15 us between calls) is cheap only next to a long call
        per_call = batch >= PER_CALL_WAIT_BATCH and sched() is not None
        waits = np.zeros(k, np.float64)
        wh = open(os.path.join(check_dir, f"wait-{spec['slug']}-{batch}.f64"), "ab") \
            if per_call else None

        def block():
            forward(x)              # wakes sleeping pool threads; not a steady-state call
            s0, c0, w0 = sched(), cpu_time(), perf()
            for i in range(k):
                if per_call:
                    q0 = sched()[1]
                t0 = perf()
                forward(x)
                buf[i] = perf() - t0
                if per_call:
                    waits[i] = (sched()[1] - q0) * 1e-9
            w1, c1, s1 = perf(), cpu_time(), sched()
            fh.write(buf.tobytes())
            fh.flush()
            if wh is not None:
                wh.write(waits.tobytes())
                wh.flush()
            # per block: wall, CPU of all this process's threads, and their
            # run-queue wait (runnable, but another task had the core), s
            wait = (s1[1] - s0[1]) * 1e-9 if s0 and s1 else np.nan
            sh.write(np.array([w1 - w0, c1 - c0, wait, k], np.float64).tobytes())
            sh.flush()
        return block
    return get


def cold_factory(backend, workdir, n_threads, batch, out):
    """A fresh process's first call: load the candidate ``backend`` (a
    label), call it once on ``batch`` test rows, write the load and call
    times (seconds) to ``out`` (JSON)."""
    spec = _spec(workdir, backend)
    _import_backend(spec)
    _limit_threads(n_threads)
    x = np.ascontiguousarray(np.load(os.path.join(workdir, "x_check.npy"))[:batch])
    t0 = time.perf_counter()
    forward = load_candidate(spec, n_threads)
    t1 = time.perf_counter()
    forward(x)
    t2 = time.perf_counter()
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"load_s": t1 - t0, "first_s": t2 - t1}, fh)
    return lambda name: (lambda: None)


# --------------------------------------------------------------------------
# one thread count
# --------------------------------------------------------------------------

def check_candidates(specs, workdir, check_dir):
    """{label: check result} from the logits the workers wrote."""
    ref_f32 = np.load(os.path.join(workdir, "ref_f32.npy"))
    out = {}
    for s in specs:
        p = os.path.join(check_dir, f"check-{s['slug']}.npy")
        if os.path.exists(p):
            out[s["label"]] = check_logits(np.load(p), np.load(os.path.join(workdir, s["ref"])),
                                           s["check"], ref_f32)
    return out


def run_threads(specs, workdir, threads, *, rounds, block_calls, cold_reps,
                cold_batches=BATCHES, settle=harness.SETTLE, env=None, limits=True,
                log=print):
    """Check and time every candidate at ``threads`` threads (``settle``
    seconds of pause before a sample when the candidate changes; cold
    first calls at ``cold_batches``, ``cold_reps`` fresh processes each;
    workers start with the environment changes ``env``, see
    harness.worker_environment). ``limits``: also measure pykd.dense's
    sgemm rate at the batch-256 shapes in pykd float32's worker.

    Returns ``(rows, block)``: one row per candidate and batch, and the
    block's facts (machine load before and after, steal, each worker's
    pools, the sgemm limits)."""
    block = {"threads": threads, "busy_before": harness.cpu_busy_fraction(),
             "loadavg_before": _loadavg(), "env": env}
    by = {s["label"]: s for s in specs}
    labels = list(by)
    tdir = os.path.join(workdir, f"t{threads}")
    os.makedirs(tdir, exist_ok=True)
    for f in os.listdir(tdir):
        os.remove(os.path.join(tdir, f))
    errors, lat, others, winfo = {}, {}, {}, {}
    cpu0 = harness.cpu_times()
    t0 = time.perf_counter()
    with harness.Workers(worker_factory, labels, threads=threads, env=env, workdir=workdir,
                         n_threads=threads, check_dir=tdir,
                         block_calls={str(k): v for k, v in block_calls.items()}) as w:
        for lb, msg in w.errors.items():
            errors[lb] = f"worker failed: {msg}"
        checks = check_candidates([by[lb] for lb in w.backends], workdir, tdir)
        for lb, c in checks.items():
            if not c["ok"]:
                errors[lb] = "check failed: " + c["why"]
        for lb in w.backends:
            try:
                winfo[lb] = w.call(lb, "info")
            except RuntimeError as exc:
                winfo[lb] = {"error": str(exc)}
        timed = [lb for lb in w.backends if lb not in errors]
        log(f"  [{threads} thr] {len(timed)} of {len(labels)} candidates pass the check; "
            "timing")
        for batch in BATCHES:
            stats, errs = w.time({lb: (lb, f"lat{batch}") for lb in timed}, repeats=rounds,
                                 warmup=1, min_time=0.0, settle=settle, warm=0)
            for lb, msg in errs.items():
                errors.setdefault(lb, f"timing failed: {msg}")
            for lb in timed:
                p = os.path.join(tdir, f"lat-{by[lb]['slug']}-{batch}.f64")
                if os.path.exists(p):
                    lat[(lb, batch)] = np.fromfile(p, np.float64)
                q = os.path.join(tdir, f"sched-{by[lb]['slug']}-{batch}.f64")
                if os.path.exists(q):
                    lat[(lb, batch, "sched")] = np.fromfile(q, np.float64).reshape(-1, 4)
                q = os.path.join(tdir, f"wait-{by[lb]['slug']}-{batch}.f64")
                if os.path.exists(q):
                    lat[(lb, batch, "wait")] = np.fromfile(q, np.float64)
                if lb in stats:
                    others[(lb, batch)] = stats[lb].get("others_cpu")
        if limits and "pykd float32" in timed:
            time.sleep(settle)
            try:
                block["dense_limits"] = w.call("pykd float32", "sgemm")
            except RuntimeError as exc:
                block["dense_limits_error"] = str(exc)
    block["steal"] = harness.steal_fraction(cpu0, harness.cpu_times())
    block["timing_s"] = time.perf_counter() - t0
    block["workers"] = winfo
    cold = {}
    t0 = time.perf_counter()
    cpu0 = harness.cpu_times()
    for lb in labels:     # fresh processes, one at a time, the timing workers gone
        if lb in errors:
            continue
        for batch in cold_batches:
            got = []
            for rep in range(cold_reps):
                out = os.path.join(tdir, f"cold-{by[lb]['slug']}-{batch}-{rep}.json")
                with harness.Workers(cold_factory, [lb], threads=threads, env=env,
                                     workdir=workdir, n_threads=threads, batch=batch,
                                     out=out) as cw:
                    if cw.errors:
                        errors.setdefault(lb, f"cold start failed: {cw.errors[lb]}")
                        break
                with open(out, encoding="utf-8") as fh:
                    got.append(json.load(fh))
            if got:
                cold[(lb, batch)] = got
    block["cold_steal"] = harness.steal_fraction(cpu0, harness.cpu_times())
    block["loadavg_after"] = _loadavg()
    block["cold_s"] = time.perf_counter() - t0
    rows = []
    for lb in labels:
        s = by[lb]
        for batch in BATCHES:
            row = {"threads": threads, "batch": batch, "label": lb, "backend": s["backend"],
                   "kinds": s.get("kinds"), "bytes": s["bytes"], "check": checks.get(lb),
                   "error": errors.get(lb), "blas": blas_summary(s["backend"], winfo.get(lb))}
            a = lat.get((lb, batch))
            if a is not None and a.size and lb not in errors:
                row.update(median_s=float(np.median(a)), p99_s=float(np.percentile(a, 99)),
                           mean_s=float(a.mean()), min_s=float(a.min()), n_calls=int(a.size))
                row.update(sched_summary(lat.get((lb, batch, "sched"))))
                row.update(undisturbed(a, lat.get((lb, batch, "wait"))))
                row["others_cpu"] = others.get((lb, batch))
            c = cold.get((lb, batch))
            if c:
                row["cold_first_s"] = float(np.median([v["first_s"] for v in c]))
                row["load_s"] = float(np.median([v["load_s"] for v in c]))
                row["cold_all_s"] = [v["first_s"] for v in c]
            rows.append(row)
    add_ratios(rows)
    return rows, block


def sched_summary(sched):
    """Per-call CPU time and run-queue wait of a candidate's timed blocks
    (rows of [wall, cpu, wait, calls] in seconds): ``cpu_per_call_s`` (all
    threads of its worker), ``wait_per_call_s`` (time its runnable threads
    waited for a core: another process, or a thread of its own, had it) and
    ``wait_frac`` (that wait over the blocks' wall time)."""
    if sched is None or not len(sched):
        return {}
    wall, cpu, wait, calls = np.nansum(sched, axis=0)
    if calls <= 0 or wall <= 0:
        return {}
    return {"cpu_per_call_s": float(cpu / calls), "wait_per_call_s": float(wait / calls),
            "wait_frac": float(wait / wall)}


def undisturbed(lat, waits, floor=20e-6):
    """The calls whose threads did not wait for a core (run-queue wait below
    ``floor`` seconds or 5% of the median): ``p99_undisturbed_s``, their
    ``median_undisturbed_s`` and ``n_disturbed``, the count of the others.
    Nothing when there is no per-call wait (small batches)."""
    if waits is None or lat is None or waits.size != lat.size or not lat.size:
        return {}
    ok = waits < max(floor, 0.05 * float(np.median(lat)))
    out = {"n_disturbed": int((~ok).sum())}
    if ok.any():
        out.update(p99_undisturbed_s=float(np.percentile(lat[ok], 99)),
                   median_undisturbed_s=float(np.median(lat[ok])))
    return out


def blas_summary(backend, info):
    """One short phrase: which kernels a candidate's worker ran on, e.g.
    "OpenBLAS 0.3.21 openmp Cooperlake x2" or "MKL 2024.2 + oneDNN v3.12.0
    (AVX512) x2"."""
    if not info or "error" in (info or {}):
        return "?"
    if backend == "ort":
        o = info.get("ort") or {}
        return f"MLAS (ORT {o.get('version')}) intra-op x{o.get('intra_op_threads')}"
    if backend == "torch":
        t = info.get("torch") or {}
        return (f"{(t.get('blas') or '?').upper()} {t.get('mkl') or ''} + oneDNN "
                f"{t.get('onednn')} ({t.get('capability')}) x{t.get('threads')}").replace("  ", " ")
    pools = info.get("pools") or []
    blas = [p for p in pools if p.get("user_api") == "blas"]
    if backend == "pykd":    # pykd's own BLAS, not NumPy's wheel copy
        blas = [p for p in blas if "scipy_openblas" not in str(p.get("filepath"))] or blas
    out = []
    for p in blas:
        out.append(f"OpenBLAS {p.get('version')} {p.get('threading_layer')} "
                   f"{p.get('architecture')} x{p.get('num_threads')}")
    return "; ".join(out) or "?"


def _loadavg():
    """The 1-minute load average (runnable processes; 2 cores here), or None."""
    try:
        with open("/proc/loadavg", encoding="ascii") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def add_ratios(rows):
    """``vs_ort_f32`` and ``vs_pykd_f32``: median over that peer's median
    (same threads and batch)."""
    base = {(r["threads"], r["batch"], r["label"]): r.get("median_s") for r in rows}
    for r in rows:
        for key, ref in (("vs_ort_f32", "ORT float32"), ("vs_pykd_f32", "pykd float32")):
            b = base.get((r["threads"], r["batch"], ref))
            r[key] = r["median_s"] / b if b and r.get("median_s") else None


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

def machine_summary(info, blocks=()):
    """One line: CPU (name, core), the SIMD flags that matter here, and the
    kernels each backend ran on in its worker (``blocks``' worker facts)."""
    flags = info.get("cpu_flags") or {}
    on = [f for f in CPU_FLAGS if flags.get(f)]
    off = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
           if not flags.get(f)]
    build = info.get("pykd_build") or {}
    seen = {}
    for blk in blocks:
        for lb, wi in (blk.get("workers") or {}).items():
            who = lb.split()[0]   # pykd, numpy, ORT, torch
            seen.setdefault(who, blas_summary({"ORT": "ort", "torch": "torch",
                                               "numpy": "numpy"}.get(who, "pykd"), wi))
    kernels = "; ".join(f"{k}: {v}" for k, v in seen.items()) or "?"
    return (f"CPU {harness.cpu_name(info)}, {info.get('logical_cores')} logical cores; "
            f"flags: {' '.join(on) or '-'}; absent: {' '.join(off) or '-'}; "
            f"kernels in each worker ({blocks[-1]['threads'] if blocks else '?'} threads) "
            f"{kernels}; pykd built with simd={build.get('simd', '?')}")


def _us(s):
    return "-" if s is None else (f"{s * 1e6:.1f}" if s < 1e-4 else f"{s * 1e6:.0f}")


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


# (target, candidate, reference, batch, limit, strict): met when the
# candidate's median over the reference's is <= limit (< limit if strict)
TARGETS = (
    ("float32 b1 <= 0.5x ORT f32", "pykd float32", "ORT float32", 1, 0.5, False),
    ("float32 b256 <= 1.0x ORT f32", "pykd float32", "ORT float32", 256, 1.0, False),
    ("int8 b1 <= 0.5x ORT int8", "pykd int8 dynamic", "ORT int8 dynamic", 1, 0.5, False),
    ("int8 b1 <= 0.5x ORT int8", "pykd int8 static", "ORT int8 dynamic", 1, 0.5, False),
    ("int8 b1 <= pykd f32", "pykd int8 dynamic", "pykd float32", 1, 1.0, False),
    ("int8 b1 <= pykd f32", "pykd int8 static", "pykd float32", 1, 1.0, False),
    ("int8 b256 <= 0.5x pykd f32", "pykd int8 dynamic", "pykd float32", 256, 0.5, False),
    ("int8 b256 <= 0.5x pykd f32", "pykd int8 static", "pykd float32", 256, 0.5, False),
    ("int8 b256 <= 0.5x ORT int8", "pykd int8 dynamic", "ORT int8 dynamic", 256, 0.5, False),
    ("int8 b256 <= 0.5x ORT int8", "pykd int8 static", "ORT int8 dynamic", 256, 0.5, False),
    ("low_rank faster than dense, b1", "pykd low_rank e0.9", "pykd float32", 1, 1.0, True),
    ("low_rank faster than dense, b256", "pykd low_rank e0.9", "pykd float32", 256, 1.0, True),
    ("codebook faster than dense, b1", "pykd codebook 4-bit", "pykd float32", 1, 1.0, True),
    ("codebook faster than dense, b256", "pykd codebook 4-bit", "pykd float32", 256, 1.0,
     True),
    ("sparse90+codebook faster than its dense, b1", "pykd sparse90+codebook 5-bit",
     "pykd pruned 90% dense", 1, 1.0, True),
    ("sparse90+codebook faster than its dense, b256", "pykd sparse90+codebook 5-bit",
     "pykd pruned 90% dense", 256, 1.0, True),
    # The target is per layer (bench_sparse.py's Target table, call overhead
    # subtracted); this row is the whole model, the Python call included.
    ("sparse_csr 90% >= 3x faster than its dense, b1 (whole model)", "pykd sparse_csr 90%",
     "pykd pruned 90% dense", 1, 1 / 3, False),
)
DISTURBED = 0.05   # run-queue wait over wall time above which a timing is flagged


def targets(rows, target_list=TARGETS):
    """[{target, threads, candidate, reference, batch, ratio, limit, met,
    disturbed}] for every target and thread count in ``rows``; ``met`` is
    None when either median is missing."""
    by = {(r["threads"], r["batch"], r["label"]): r for r in rows}
    out = []
    for th in sorted({r["threads"] for r in rows}):
        for name, cand, ref, batch, limit, strict in target_list:
            a, b = by.get((th, batch, cand), {}), by.get((th, batch, ref), {})
            ma, mb = a.get("median_s"), b.get("median_s")
            ratio = ma / mb if ma and mb else None
            met = None if ratio is None else (ratio < limit if strict else ratio <= limit)
            waits = [r.get("wait_frac") for r in (a, b) if r.get("wait_frac") is not None]
            out.append({"target": name, "threads": th, "candidate": cand, "reference": ref,
                        "batch": batch, "candidate_s": ma, "reference_s": mb, "ratio": ratio,
                        "limit": limit, "met": met,
                        "disturbed": bool(waits) and max(waits) > DISTURBED})
    return out


def targets_table(rows):
    """The "Targets (issue 11)" Markdown table."""
    table = []
    for t in targets(rows):
        met = "-" if t["met"] is None else ("met" if t["met"] else "**not met**")
        if t["disturbed"]:
            met += " (disturbed)"
        table.append([t["target"], t["threads"], t["candidate"], t["reference"],
                      _us(t["candidate_s"]), _us(t["reference_s"]),
                      "-" if t["ratio"] is None else f"{t['ratio']:.2f}x",
                      f"{t['limit']:.2f}x", met])
    return harness.markdown_table(["target", "threads", "candidate", "reference", "cand. us",
                                   "ref. us", "ratio", "limit", "result"], table)


def _gmacs(v):
    """A peak in GMAC/s, or "absent" (the probe reports 0 for an extension the CPU lacks)."""
    return "absent" if not v or v <= 0 else f"{v:.0f} GMAC/s"


def int8_peak():
    """(zmm, ymm) int8 multiply-add peak of one core in GMAC/s, register-only
    vpdpbusd (benchmarks/int8_peak.c via bench_int8), or None (no C
    compiler, no VNNI)."""
    try:
        import bench_int8
        peak = bench_int8._peak()
    except Exception:
        return None
    return peak if peak and max(peak) > 0 else None


def int8_peak_all_cpus():
    """[zmm GMAC/s per CPU] with the probe running on every CPU at once
    (bench_int8._peak_all_cpus), or None."""
    try:
        import bench_int8
        per_cpu = bench_int8._peak_all_cpus()
    except Exception:
        return None
    return per_cpu if per_cpu and max(per_cpu) > 0 else None


# multiply-adds of one batch-256 forward of the student
STUDENT_MACS_B256 = sum(m * k * n for m, k, n in DENSE_SHAPES)


def limits_table(blocks):
    """Markdown lines: pykd.dense's sgemm rate at the batch-256 shapes, per
    thread count, and the sum of the three layers' times (a floor for a
    float32 forward at batch 256 on this BLAS)."""
    lines = []
    rows = []
    for blk in blocks:
        lim = blk.get("dense_limits")
        if not lim:
            continue
        for d in lim:
            m, k, n = d["shape"]
            rows.append([blk["threads"], f"{m}x{k} @ {k}x{n}", _us(d["median_s"]),
                         f"{d['gflops']:.0f}"])
        rows.append([blk["threads"], "sum of the 3 layers", _us(sum(d["median_s"] for d in lim)),
                     f"{sum(2.0 * d['shape'][0] * d['shape'][1] * d['shape'][2] for d in lim) / sum(d['median_s'] for d in lim) / 1e9:.0f}"])
    if rows:
        lines += ["### Machine limits (same run)", "",
                  "sgemm through `pykd.dense` (one layer, bias, no activation) at the "
                  "student's batch-256 shapes, in pykd float32's worker (its BLAS and thread "
                  "count), median of 40 calls:", "",
                  harness.markdown_table(["threads", "shape", "median us", "GFLOP/s"], rows), ""]
    for blk in blocks:
        pk = blk.get("int8_peak_gmacs")
        if pk:
            th = max(b["threads"] for b in blocks)
            best = max(pk.values())
            together = blk.get("int8_peak_all_cpus")
            if together and pk.get("zmm"):
                # what th threads can have: the CPUs' sum when all run at once
                total = sum(together[:th])
                floor = STUDENT_MACS_B256 / (total * 1e9)
                share = total / pk["zmm"]
                shared = (f"; on all {len(together)} CPUs at once: "
                          f"{' + '.join(f'{v:.0f}' for v in together)} GMAC/s, "
                          f"{share:.2f}x one CPU" +
                          (" (the CPUs share vector units now: hyperthreads of one core, "
                           "or siblings busy with other work)"
                           if share < 1.3 else ""))
            else:
                floor = STUDENT_MACS_B256 / (best * 1e9 * th)
                shared = ""
            lines += [f"int8 peak of one core (register-only vpdpbusd, benchmarks/int8_peak.c): "
                      f"zmm {_gmacs(pk['zmm'])}, ymm (AVX-VNNI) {_gmacs(pk['ymm'])}{shared}; "
                      f"the student's {STUDENT_MACS_B256 / 1e6:.1f} M multiply-adds at batch "
                      f"256 take at least {_us(floor)} us on {th} thread{'s' if th != 1 else ''} "
                      "at that peak.", ""]
    return lines


def backends_table(blocks):
    """Markdown: per thread count, each candidate's kernels as its worker
    saw them (threadpoolctl, the library's own build facts)."""
    lines = ["### Each candidate's kernels and threads (seen in its worker)", ""]
    table = []
    for blk in blocks:
        for lb, wi in (blk.get("workers") or {}).items():
            be = {"ORT": "ort", "torch": "torch", "numpy": "numpy"}.get(lb.split()[0], "pykd")
            env = {k: v for k, v in ((wi or {}).get("env") or {}).items() if v is not None}
            table.append([blk["threads"], lb, blas_summary(be, wi),
                          ", ".join(f"{k}={v}" for k, v in env.items()) or "-",
                          ", ".join((wi or {}).get("loaded") or []) or "-"])
    return lines + [harness.markdown_table(["threads", "candidate", "kernels, threads",
                                            "threading env", "libraries loaded"], table), ""]


def tables(result):
    """The Markdown report: machine, one table per threads and batch, the
    backends, the machine limits, the targets."""
    info = result["machine"]
    blocks = result["blocks"]
    summary = machine_summary(info, blocks)
    vers = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    env = (result.get("config") or {}).get("worker_env") or {}
    lines = ["## Inference: every pykd kind against ONNX Runtime, NumPy and PyTorch", "",
             f"Model: `{result['model']}` ({result['model_sizes']}); inputs: Fashion-MNIST "
             f"test rows; mode: {result['mode']}.", "",
             "```", harness.format_machine_info(info), "```", "",
             f"{vers}.", "",
             "Workers' environment: as the benchmark process started (what an import such as "
             "pykd's set since is undone)" +
             ("; " + ", ".join(f"{k} {'unset' if v is None else '=' + v}" for k, v in env.items())
              if env else "") + ".", ""]
    for name, why in result["absent"].items():
        lines.append(f"- **{name} absent**: {why}")
    lines += ["", "Each candidate in a worker process of its own; candidates alternate in "
              "rounds (0.3 s pause when the candidate changes), each round making one untimed "
              "call and then a block of calls timed one by one. `median`/`p99` over all those "
              "calls; `cold` is the first `forward` of a fresh process after loading the file "
              "(median of fresh processes); `load` the load time; ratios are medians over "
              "ONNX Runtime float32's and pykd float32's (below 1: faster). `wait` is the time "
              "per call the worker's runnable threads waited for a core (another process had "
              "it), from /proc schedstat, with its share of the timed wall time: above "
              f"{DISTURBED:.0%} the timing is disturbed. From batch {PER_CALL_WAIT_BATCH} on "
              "each call's wait is recorded too: `p99 undisturbed` is the p99 over the calls "
              "that did not wait for a core (their count in brackets). `agree` is the "
              "argmax agreement with the float32 model on the test set, `max diff` the "
              "largest logit difference to the NumPy float64 reference of the candidate's own "
              "weights.", ""]
    headers = ["candidate", "kinds", "bytes on disk", "median us", "p99 us", "cold us",
               "load ms", "/ORT f32", "/pykd f32", "wait us (%)", "p99 undisturbed (calls)",
               "calls", "agree %", "max diff", "check"]
    for blk in blocks:
        th = blk["threads"]
        for batch in BATCHES:
            busy, steal = blk.get("busy_before"), blk.get("steal")
            lines += [f"### {th} thread{'s' if th != 1 else ''}, batch {batch}", "",
                      f"{summary}; threads {th} (BLAS/OpenMP pools via threadpoolctl, ORT "
                      f"intra-op {th}, inter-op 1, torch.set_num_threads({th})). Machine load: "
                      f"CPUs {'?' if busy is None else f'{busy:.0%}'} busy before the block, "
                      f"steal {'?' if steal is None else f'{steal:.1%}'} during it, 1-min load "
                      f"average {blk.get('loadavg_before')} before and "
                      f"{blk.get('loadavg_after')} after.", ""]
            table = []
            for r in result["rows"]:
                if r["threads"] != th or r["batch"] != batch:
                    continue
                c = r.get("check") or {}
                wait = ("-" if r.get("wait_per_call_s") is None else
                        f"{_us(r['wait_per_call_s'])} ({100 * r['wait_frac']:.0f}%)")
                table.append([
                    r["label"], ",".join(r.get("kinds") or []) or r["backend"], r["bytes"],
                    _us(r.get("median_s")), _us(r.get("p99_s")), _us(r.get("cold_first_s")),
                    "-" if r.get("load_s") is None else f"{r['load_s'] * 1e3:.1f}",
                    _x(r.get("vs_ort_f32")), _x(r.get("vs_pykd_f32")), wait,
                    "-" if r.get("n_disturbed") is None else
                    f"{_us(r.get('p99_undisturbed_s'))} ({r['n_calls'] - r['n_disturbed']})",
                    r.get("n_calls", "-"),
                    "-" if c.get("agreement") is None else f"{100 * c['agreement']:.2f}",
                    "-" if c.get("max_abs_diff") is None else f"{c['max_abs_diff']:.1e}",
                    "ok" if not r.get("error") else f"FAILED: {r['error']}"])
            lines += [harness.markdown_table(headers, table), ""]
    lines += backends_table(blocks)
    lines += limits_table(blocks)
    lines += ["### Targets (issue 11)", "",
              "Whole 784-200-200-10 model, medians of the same run; ratio = candidate's time "
              "over the reference's (the sparse target: sparse_csr over the same pruned "
              "weights run dense). `disturbed`: one of the two waited for a core more than "
              f"{DISTURBED:.0%} of its timed time.", "",
              targets_table(result["rows"]), ""]
    return "\n".join(lines)


def plot(result, path):
    """Latency (median, with a bar up to p99) against bytes on disk; one
    marker per candidate; a column per batch size, a row per thread count."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except Exception as exc:
        return f"no plot: matplotlib not importable ({exc})"
    ths = [b["threads"] for b in result["blocks"]]
    fig, axes = plt.subplots(len(ths), len(BATCHES), figsize=(13, 4.6 * len(ths) + 1.6),
                             squeeze=False)
    labels = list(dict.fromkeys(r["label"] for r in result["rows"]))
    markers = "oDs^vP*Xhd<>p8H"
    cmap = plt.get_cmap("tab20")
    for i, th in enumerate(ths):
        for j, batch in enumerate(BATCHES):
            ax = axes[i][j]
            for r in result["rows"]:
                if r["threads"] != th or r["batch"] != batch or r.get("median_s") is None:
                    continue
                k = labels.index(r["label"])
                med, p99 = r["median_s"] * 1e6, r["p99_s"] * 1e6
                # p99 as a thin bar: on a loaded machine it is a scheduler time slice
                ax.errorbar([r["bytes"]], [med], yerr=[[0], [max(p99 - med, 0)]],
                            fmt=markers[k % len(markers)], color=cmap(k % 20), ms=8,
                            capsize=3, elinewidth=0.8, alpha=0.9, label=r["label"])
                if r.get("cold_first_s") is not None:   # open marker: the cold first call
                    ax.plot([r["bytes"]], [r["cold_first_s"] * 1e6], markers[k % len(markers)],
                            mfc="none", mec=cmap(k % 20), ms=8, alpha=0.9)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(
                lambda v, _: f"{v / 1e3:g} kB" if v < 1e6 else f"{v / 1e6:g} MB"))
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("bytes on disk")
            ax.set_ylabel("latency per call, us")
            ax.set_title(f"batch {batch}, {th} thread{'s' if th != 1 else ''}")
            ax.grid(True, which="both", alpha=0.3)
    handles, labs = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=5, fontsize=8,
               title="filled marker: median, bar up to p99; open marker: cold first call "
                     "(fresh process)", title_fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(machine_summary(result["machine"], result["blocks"]),
                                        180)), fontsize=8)
    bottom = 1.5 / fig.get_figheight()     # room for the legend
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.5 / fig.get_figheight()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def versions():
    out = {"numpy": np.__version__}
    for name in ("pykd", "onnx", "onnxruntime", "torch"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:
            out[name] = "absent"
            continue
        if name == "torch":
            cuda = getattr(getattr(mod, "version", None), "cuda", None)
            out[name] += " (CPU build)" if not cuda else f" (CUDA {cuda} build, run on the CPU)"
    return out


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def load_student(path, epochs, ds):
    import pykd
    if path:
        return pykd.load_model(path), path
    student = pykd.MLP([ds.n_features, 200, 200, 10], seed=0)
    pykd.fit(student, ds.X_train, ds.y_train, epochs=epochs, progress=False)
    return student, f"784-200-200-10 trained here for {epochs} epoch(s) (CE, no KD)"


def run(student, model_name, X_cal, X_check, *, threads, rounds, block_calls, cold_reps,
        workdir, mode, cold_batches=BATCHES, keep_blas_env=False, only=None, limits=True,
        log=print):
    """Prepare every candidate, then check and time them at each thread
    count (``only``: the labels containing one of these strings, plus the
    two references). Returns the result dict (rows, blocks, machine, ...)."""
    env = harness.worker_environment(keep_blas_env)
    info = harness.machine_info()
    flags = harness._cpuinfo().get("flags", set())
    info["cpu_flags"] = {f: f in flags for f in CPU_FLAGS}
    try:
        from pykd import _build_config as bc
        info["pykd_build"] = {k: getattr(bc, k, None) for k in ("version", "simd",
                                                                "blas_openmp_dir")}
    except ImportError:
        info["pykd_build"] = None
    t0 = time.perf_counter()
    specs, absent = prepare(student, X_cal, X_check, workdir)
    if only:
        keep = set(REFERENCES)
        specs = [s for s in specs if s["label"] in keep or any(o in s["label"] for o in only)]
    log(f"prepared {len(specs)} candidates in {time.perf_counter() - t0:.1f} s"
        + "".join(f"; {k} absent" for k in absent)
        + f"; workers' environment changes: {env or 'none'}")
    rows, blocks = [], []
    for th in threads:
        # cold starts at the largest thread count only (each is a fresh process)
        r, b = run_threads(specs, workdir, th, rounds=rounds, block_calls=block_calls,
                           cold_reps=cold_reps if th == max(threads) else 0,
                           cold_batches=cold_batches, env=env, limits=limits, log=log)
        rows += r
        blocks.append(b)
        if b.get("busy_before") is not None and b["busy_before"] > 0.3:
            log(f"WARNING: the CPUs were {b['busy_before']:.0%} busy before the {th}-thread "
                "block (other workloads); timings are not reliable")
        if b.get("steal") is not None and b["steal"] > 0.03:
            log(f"WARNING: the hypervisor took {b['steal']:.0%} of the CPU time (steal) "
                f"during the {th}-thread block")
    sizes = getattr(student, "sizes", None)
    peak = int8_peak() if limits else None
    if peak:
        blocks[-1]["int8_peak_gmacs"] = {"zmm": peak[0], "ymm": peak[1]}
        blocks[-1]["int8_peak_all_cpus"] = int8_peak_all_cpus()
    return {"model": model_name, "model_sizes": "-".join(map(str, sizes)) if sizes else "?",
            "mode": mode, "machine": info, "versions": versions(), "absent": absent,
            "config": {"threads": threads, "rounds": rounds, "worker_env": env,
                       "keep_blas_env": keep_blas_env,
                       "block_calls": {str(k): v for k, v in block_calls.items()},
                       "cold_reps": cold_reps, "cold_batches": list(cold_batches),
                       "settle_s": harness.SETTLE,
                       "check_rows": int(X_check.shape[0]), "float_tol": FLOAT_TOL,
                       "int8_agreement": INT8_AGREEMENT},
            "blocks": blocks, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="student model file (default: train one for --epochs)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="2 threads only, fewer rounds and calls, one cold start at batch 1 "
                         "only: about a minute")
    ap.add_argument("--threads", help="comma list (default 1,2; --quick: 2)")
    ap.add_argument("--rounds", type=int, help="timed rounds per batch size (default 6, "
                                               "quick 3)")
    ap.add_argument("--cold", type=int, help="fresh processes per cold first call, at the "
                                             "largest thread count (default 2, quick 1)")
    ap.add_argument("--keep-blas-env", action="store_true",
                    help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE in the workers (by default "
                         "they are dropped: each BLAS picks its kernels for this CPU)")
    ap.add_argument("--only", help="comma list: time only the candidates whose label contains "
                                   "one of these (plus pykd float32 and ORT float32)")
    ap.add_argument("--out", default=".", help="directory for bench-inference.md/.json/.png")
    ap.add_argument("--json", help="JSON path (default OUT/bench-inference.json)")
    ap.add_argument("--markdown", help="Markdown path (default OUT/bench-inference.md)")
    ap.add_argument("--plot", help="plot path (default OUT/bench-inference.png)")
    a = ap.parse_args(argv)
    from pykd.data import load_dataset
    threads = ([int(s) for s in a.threads.split(",")] if a.threads
               else [2] if a.quick else [1, 2])
    rounds = a.rounds or (3 if a.quick else 6)
    cold_reps = a.cold if a.cold is not None else (1 if a.quick else 2)
    block_calls = dict(QUICK_CALLS if a.quick else BLOCK_CALLS)
    t0 = time.perf_counter()
    ds = load_dataset()
    student, name = load_student(a.model, a.epochs, ds)
    print(harness.format_machine_info(harness.machine_info()), flush=True)
    with tempfile.TemporaryDirectory(prefix="pykd-bench-inference-") as work:
        result = run(student, name, ds.X_train[:1000], ds.X_test, threads=threads,
                     rounds=rounds, block_calls=block_calls, cold_reps=cold_reps,
                     cold_batches=(1,) if a.quick else BATCHES,
                     workdir=work, mode="quick" if a.quick else "full",
                     keep_blas_env=a.keep_blas_env,
                     only=a.only.split(",") if a.only else None,
                     log=lambda s: print(s, flush=True))
    result["wall_s"] = time.perf_counter() - t0
    md = tables(result) + f"\n(wall time {result['wall_s']:.0f} s)\n"
    print(md)
    js = a.json or os.path.join(a.out, "bench-inference.json")
    mdp = a.markdown or os.path.join(a.out, "bench-inference.md")
    png = a.plot or os.path.join(a.out, "bench-inference.png")
    harness.write_json(js, result)
    harness.write_markdown(mdp, md)
    msg = plot(result, png)
    print(msg or f"wrote {mdp}, {js}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
