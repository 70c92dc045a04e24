"""Python writes a model file of every layer kind, pure Fortran reads and runs it.

The Fortran half is ``tests/fortran/predict_cli.f90`` (built by meson in the
``-Dpython=false`` build, ``make test-fortran``): it loads a model with
``pykd_load_model``, runs ``pykd_predict`` on raw float32 inputs, writes raw
float32 logits and, if asked, saves the model again with ``pykd_save_model``.

* Logits: Python's ``Model.forward`` and Fortran's ``pykd_predict`` both run
  ``pykd_network:network_forward`` on the same arrays, so for the same batch
  and thread count they are the same bits, for every kind. They are also
  checked against an independent float64 reference (tests/kinds_helpers.py).
* Files: a Fortran load + save of a file Python wrote reproduces its bytes
  (both writers make the format's canonical choices), and Python reads what
  Fortran wrote.
* Bad files are refused by both readers with the same words.
"""
import json
import os
import re
import subprocess
import zlib

import numpy as np
import pytest

from kinds_helpers import ACTIVATIONS, KINDS, act64, dense64, int8_reference, make_layer
from pykd.layers import DenseInt8
from pykd.modelfile import ModelFormatError, read_model, write_model
from pykd.models import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.environ.get("PYKD_PREDICT_CLI") or os.path.join(
    REPO, "build", "fortran", "tests", "fortran", "predict_cli")

pytestmark = pytest.mark.skipif(
    not os.access(CLI, os.X_OK),
    reason=f"Fortran driver {CLI} not built: run `make test-fortran` (meson setup build/fortran "
           "-Dpython=false && meson compile -C build/fortran) or set PYKD_PREDICT_CLI",
)

F32 = np.float32
SIZES = (40, 24, 16, 6)
N = 300


def _threads_env(threads):
    env = dict(os.environ)
    # The driver runs the OpenBLAS build the extension runs (its OpenMP build
    # when the extension found one): from 16 samples network_forward splits
    # the batch across the OpenMP team only with a BLAS that runs calls made
    # in a parallel region on the calling thread, so Debian's default
    # pthreads build, which the Fortran-only build links, gives other bits.
    from pykd import _build_config
    if _build_config.blas_openmp_dir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (_build_config.blas_openmp_dir, env.get("LD_LIBRARY_PATH")) if p)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    return env


def run_fortran(tmp_path, model_path, X, chunk=0, resave=None, threads=None, quant=None):
    """(logits, per-layer description lines) from predict_cli."""
    inp, out = tmp_path / "x.f32", tmp_path / "logits.f32"
    np.ascontiguousarray(X, dtype="<f4").tofile(inp)
    args = [CLI, str(model_path), str(inp), str(out), str(chunk)]
    if resave is not None or quant is not None:
        args.append("-" if resave is None else str(resave))
    if quant is not None:
        args.append(quant)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env=_threads_env(threads))
    assert proc.returncode == 0, proc.stderr
    return np.fromfile(out, dtype="<f4").reshape(X.shape[0], -1), proc.stdout.splitlines()


def python_forward(model, X, batch_size, threads=None):
    if threads is None:
        return model.forward(X, batch_size=batch_size)
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=threads):
        return model.forward(X, batch_size=batch_size)


def kind_model(kind, seed, static=False, scalar_norms=False):
    """Three layers of one kind, activations cycling through all six, both norms."""
    rng = np.random.default_rng(seed)
    acts = [ACTIVATIONS[(seed + k) % len(ACTIVATIONS)] for k in range(3)]
    layers = [make_layer(kind, n_in, n_out, act, rng, static=static)
              for n_in, n_out, act in zip(SIZES[:-1], SIZES[1:], acts)]
    if scalar_norms:
        norm, out_norm = (F32(0.25), F32(1.5)), (F32(-2), F32(3))
    else:
        norm = (rng.standard_normal(SIZES[0]).astype(F32),
                (1 + rng.random(SIZES[0])).astype(F32))
        out_norm = (rng.standard_normal(SIZES[-1]).astype(F32) * F32(5),
                    (0.5 + rng.random(SIZES[-1])).astype(F32))
    return Model(layers, norm=norm, out_norm=out_norm,
                 metadata={"kind": kind, "caf\u00e9": [1, 2.5, None, True], "nested": {"a": {}}})


def inputs(seed, n=N):
    return np.random.default_rng(100 + seed).standard_normal((n, SIZES[0])).astype(F32)


def reference(model, X):
    """Independent of network_forward: float64 layers from the layers' own
    arrays (int8 layers by hand, exactly), output normalisation undone."""
    h = ((X - model.norm[0]) / model.norm[1]).astype(F32)
    for layer in model.layers:
        if isinstance(layer, DenseInt8):
            h = act64(int8_reference(h, layer).astype(np.float64), layer.activation).astype(F32)
        else:
            h = act64(h.astype(np.float64) @ dense64(layer) + layer.b, layer.activation).astype(F32)
    return h.astype(np.float64) * model.out_norm[1] + model.out_norm[0]


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_fortran_logits_are_python_bits(tmp_path, kind):
    model = kind_model(kind, KINDS.index(kind))
    X = inputs(KINDS.index(kind))
    path = tmp_path / f"{kind}.pykd"
    model.save(path)
    got, info = run_fortran(tmp_path, path, X)
    assert info == [f"{layer.kind} {layer.activation} {layer.n_in} {layer.n_out}"
                    for layer in model.layers]
    ref = python_forward(model, X, batch_size=N)
    assert same_bits(got, ref), f"max |diff| {np.abs(got - ref).max()}"
    # Chunks from an OpenMP loop (one workspace per thread) against the same
    # chunks from Python.
    chunked, _ = run_fortran(tmp_path, path, X, chunk=64)
    assert same_bits(chunked, python_forward(model, X, batch_size=64))
    # And both against an independent float64 reference.
    exact = reference(model, X)
    rel = 1e-5 if kind == "dense_int8" else 1e-4
    np.testing.assert_allclose(got, exact, rtol=rel, atol=rel * np.abs(exact).max())


@pytest.mark.parametrize("threads", [1, 2])
def test_mixed_model_same_bits_at_a_given_thread_count(tmp_path, threads):
    """One model with every kind in a chain (static int8 in it): the same
    bits from Fortran and Python for 1 and for 2 threads."""
    rng = np.random.default_rng(7)
    widths = [32, 28, 24, 20, 16, 12, 8]
    layers = [make_layer(kind, a, b, act, rng, static=(kind == "dense_int8"))
              for kind, a, b, act in zip(KINDS, widths[:-1], widths[1:], ACTIVATIONS)]
    model = Model(layers, norm=(F32(0.5), F32(2)))
    X = rng.standard_normal((2000, 32)).astype(F32)
    path = tmp_path / "mixed.pykd"
    model.save(path)
    got, info = run_fortran(tmp_path, path, X, threads=threads)
    assert [line.split()[0] for line in info] == list(KINDS)
    ref = python_forward(model, X, batch_size=len(X), threads=threads)
    assert same_bits(got, ref), f"max |diff| {np.abs(got - ref).max()}"


@pytest.mark.parametrize("kind, variant", [(k, v) for k in KINDS for v in ("per_feature", "scalar")]
                         + [("dense_int8", "static")])
def test_fortran_load_save_reproduces_python_bytes(tmp_path, kind, variant):
    model = kind_model(kind, 20 + KINDS.index(kind), static=variant == "static",
                       scalar_norms=variant == "scalar")
    path, again = tmp_path / "python.pykd", tmp_path / "fortran.pykd"
    model.save(path)
    run_fortran(tmp_path, path, inputs(0, 5), resave=again)
    assert again.read_bytes() == path.read_bytes()  # the same bytes, CRC included


def test_python_reads_what_fortran_wrote(tmp_path):
    rng = np.random.default_rng(9)
    layers = [make_layer(kind, 10, 10, "relu", rng) for kind in KINDS]
    model = Model(layers, metadata={"name": "round trip", "unicode": "\u00e9\u4e2d"})
    path, again = tmp_path / "orig.pykd", tmp_path / "again.pykd"
    model.save(path)
    run_fortran(tmp_path, path, rng.standard_normal((3, 10)).astype(F32), resave=again)
    a, b = read_model(path), read_model(again)
    assert b["metadata"] == model.metadata and b["version"] == 2
    assert [layer["kind"] for layer in b["layers"]] == list(KINDS)
    for la, lb in zip(a["layers"], b["layers"]):
        assert la.keys() == lb.keys()
        for key in la:
            if isinstance(la[key], np.ndarray):
                assert np.array_equal(la[key], lb[key]), key
            else:
                assert la[key] == lb[key], key


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_fortran_quantize_model_is_pykd_quantize_model(tmp_path, activations):
    """pykd_quantize_model as pykd.quantize_model: every kind becomes
    dense_int8 with the same q and scale (the weights of a low-rank layer
    are U V as each side multiplies them: allowed 1 step), the same input
    scales (static: to float32 rounding of the calibration maxima)."""
    rng = np.random.default_rng(12)
    widths = [32, 28, 24, 20, 16, 12, 8]
    layers = [make_layer(kind, a, b, act, rng) for kind, a, b, act in
              zip(KINDS, widths[:-1], widths[1:], ACTIVATIONS)]
    model = Model(layers, norm=(F32(0.5), F32(2)), out_norm=(F32(1), F32(3)))
    X = rng.standard_normal((500, 32)).astype(F32)
    path, fq = tmp_path / "f.pykd", tmp_path / "fq.pykd"
    model.save(path)
    got, _ = run_fortran(tmp_path, path, X, resave=fq, quant=activations)
    import pykd
    pq = pykd.quantize_model(model, activations=activations,
                             calibration=X if activations == "static" else None)
    theirs, ours = pq.layers, read_model(fq)["layers"]
    assert [layer["kind"] for layer in ours] == ["dense_int8"] * len(KINDS)
    for k, (a, b) in enumerate(zip(theirs, ours), start=1):
        np.testing.assert_array_equal(a.scale, b["scale"], err_msg=f"layer {k}")
        np.testing.assert_array_equal(a.b, b["b"], err_msg=f"layer {k}")
        steps = np.abs(a.q.astype(int) - b["q"].astype(int))
        assert steps.max() <= (1 if KINDS[k - 1] == "low_rank" else 0), f"layer {k}"
        if activations == "static":
            np.testing.assert_allclose(a.x_scale, b["x_scale"], rtol=2e-7, err_msg=f"layer {k}")
        else:
            assert a.x_scale is None and b["x_scale"] is None
    if all(np.array_equal(a.q, b["q"]) for a, b in zip(theirs, ours)) and (
            activations == "dynamic" or all(a.x_scale == b["x_scale"] for a, b in zip(theirs, ours))):
        assert same_bits(got, pq.forward(X, batch_size=len(X)))   # the same arrays: the same bits


def _v1_file(W, b, q, scale, b2):
    """A version-1 file by hand: scalar norm, dense relu then int8 identity."""
    u32 = lambda *v: np.array(v, "<u4").tobytes()  # noqa: E731
    body = (b"PYKDMDL\0" + u32(1, 2, W.shape[0], q.shape[1], 2)
            + np.array([0.5, 2.0], "<f4").tobytes() + u32(2) + b"{}"
            + u32(1, 1, *W.shape) + W.astype("<f4").tobytes() + b.astype("<f4").tobytes()
            + u32(2, 0, *q.shape) + q.tobytes() + scale.astype("<f4").tobytes()
            + b2.astype("<f4").tobytes())
    return body + u32(zlib.crc32(body)) + b"PYKDEND\0"


def test_version1_file_same_in_both(tmp_path):
    rng = np.random.default_rng(11)
    W = (rng.integers(-8, 9, (12, 9)) / 16).astype(F32)
    b = (rng.integers(-8, 9, 9) / 16).astype(F32)
    q = rng.integers(-127, 128, (9, 4)).astype(np.int8)
    scale, b2 = rng.random(4).astype(F32) / 50, rng.standard_normal(4).astype(F32)
    path = tmp_path / "v1.pykd"
    path.write_bytes(_v1_file(W, b, q, scale, b2))
    m = read_model(path)
    assert m["version"] == 1 and [layer["kind"] for layer in m["layers"]] == ["dense", "dense_int8"]
    X = rng.integers(-40, 40, (50, 12)).astype(F32)
    got, info = run_fortran(tmp_path, path, X, resave=tmp_path / "v2.pykd")
    assert info == ["dense relu 12 9", "dense_int8 identity 9 4"]
    h = np.maximum((X - F32(0.5)) / F32(2) @ W + b, 0)  # exact: dyadic numbers
    layer = DenseInt8(q, scale, b2, "identity")
    assert same_bits(got, int8_reference(h.astype(F32), layer))
    v2 = read_model(tmp_path / "v2.pykd")
    assert v2["version"] == 2 and np.array_equal(v2["layers"][1]["q"], q)


def _with_crc(body_and_trailer):
    body = body_and_trailer[:-12]
    return body + zlib.crc32(body).to_bytes(4, "little") + body_and_trailer[-8:]


def _patch_u32(data, at, value):
    return _with_crc(data[:at] + int(value).to_bytes(4, "little") + data[at + 4:])


REC = 28 + 4 + 4 + 2   # layer 1's record: header, out_norm, meta_len, "{}" (no norms)

BAD = {
    "magic": (lambda d: b"XYKDMDL\0" + d[8:], "bad magic"),
    "version": (lambda d: d[:8] + (7).to_bytes(4, "little") + d[12:],
                "unsupported model format version 7 (this pykd reads versions 1 and 2)"),
    "truncated": (lambda d: d[: len(d) // 2], "truncated"),
    "checksum": (lambda d: d[: len(d) // 2] + bytes([d[len(d) // 2] ^ 0xFF]) + d[len(d) // 2 + 1:],
                 "checksum mismatch"),
    "trailing": (lambda d: d + b"\0\0\0", "trailing garbage"),
    "unknown kind": (lambda d: _patch_u32(d, REC, 9), "layer 1: unknown kind 9"),
    "unknown activation": (lambda d: _patch_u32(d, REC + 4, 6), "layer 1: unknown activation 6"),
    "payload_bytes": (lambda d: _patch_u32(d, REC + 16, 4),
                      "layer 1: payload_bytes is 4, but its fields imply"),
    "n_layers": (lambda d: _patch_u32(d, 12, 2**32 - 1),
                 "n_layers = 4294967295 is larger than the largest count 2^31 - 1"),
    "no layers": (lambda d: _patch_u32(d, 12, 0), "model has no layers"),
    "n_outputs": (lambda d: _patch_u32(d, 20, 7), "outputs 6 but the model has n_outputs = 7"),
    "in_norm": (lambda d: _patch_u32(d, 24, 5), "in_norm: unknown norm kind 5"),
    "out_norm": (lambda d: _patch_u32(d, 28, 5), "out_norm: unknown norm kind 5"),
    "metadata": (lambda d: _with_crc(d[:36] + b"[]" + d[38:]), "metadata is not a JSON object"),
    "chain": (lambda d: _patch_u32(d, REC + 8, 41),
              "layer 1 takes 41 inputs but the model has n_features = 40"),
}


@pytest.mark.parametrize("what", sorted(BAD))
def test_bad_files_are_refused_by_both_readers(tmp_path, what):
    good = tmp_path / "good.pykd"
    rng = np.random.default_rng(6)
    write_model(good, [make_layer("dense", a, b, "relu", rng).to_record()
                       for a, b in zip(SIZES[:-1], SIZES[1:])])
    assert json.dumps(read_model(good)["metadata"]) == "{}"
    damage, phrase = BAD[what]
    bad = tmp_path / "bad.pykd"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(ModelFormatError, match=re.escape(phrase)):
        read_model(bad)
    inp = tmp_path / "x.f32"
    np.zeros((1, SIZES[0]), "<f4").tofile(inp)
    proc = subprocess.run([CLI, str(bad), str(inp), str(tmp_path / "out.f32")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert phrase in proc.stderr and str(bad) in proc.stderr, proc.stderr


# ------------------------------------------------ regression models (issue 14)

REG_SIZES = (7, 12, 10, 8, 3)


def regression_model(kind, seed):
    """A regression model of one kind: per-feature input normalisation from
    physical-unit inputs, per-output normalisation of three outputs on very
    different scales, sigmoid, gelu and silu hidden layers, identity output."""
    rng = np.random.default_rng(seed)
    acts = ["sigmoid", "gelu", "silu", "identity"]
    layers = [make_layer(kind, n_in, n_out, act, rng)
              for n_in, n_out, act in zip(REG_SIZES[:-1], REG_SIZES[1:], acts)]
    scale = np.array([1, 100, 0.01, 5, 1, 30, 2], F32)
    offset = np.array([0, 500, -1, 10, 3, -40, 0], F32)
    out_norm = (np.array([300, -5, 0.02], F32), np.array([40, 2, 0.003], F32))
    model = Model(layers, norm=(offset, scale), out_norm=out_norm,
                  metadata={"task": "regression"})
    X = (rng.standard_normal((N, REG_SIZES[0])) * scale + offset).astype(F32)
    return model, X


@pytest.mark.parametrize("kind", KINDS)
def test_regression_model_outputs_match_per_output(tmp_path, kind):
    """Fortran's pykd_predict gives a regression model's physical outputs
    equal to Python's to 1e-5 of each output's largest magnitude (in fact
    the same bits), for every kind, and both match the float64 reference."""
    model, X = regression_model(kind, 50 + KINDS.index(kind))
    path = tmp_path / f"reg-{kind}.pykd"
    model.save(path)
    got, _ = run_fortran(tmp_path, path, X)
    py = model.predict(X)                        # regression: the outputs, physical units
    assert got.shape == py.shape == (N, 3)
    for j in range(3):
        big = np.abs(py[:, j]).max()
        assert np.abs(got[:, j] - py[:, j]).max() <= 1e-5 * big, (kind, j)
    assert same_bits(got, py)
    exact = reference(model, X)
    for j in range(3):
        big = np.abs(exact[:, j]).max()
        np.testing.assert_allclose(got[:, j], exact[:, j], rtol=0, atol=1e-4 * big)
    back = read_model(path)
    assert back["metadata"]["task"] == "regression"


def test_trained_regression_mlp_and_its_compressions_match(tmp_path):
    """A regression MLP trained by fit (its norms computed by fit) and its
    compressed forms give Fortran outputs equal to Python's."""
    import pykd
    rng = np.random.default_rng(60)
    X = (rng.standard_normal((400, 5)) * [1, 10, 0.1, 3, 1] + [0, 50, -2, 1, 7]).astype(F32)
    Y = np.stack([np.sin(X[:, 0]) * 20 + 100, X[:, 1] * X[:, 2], 1e-3 * X[:, 3]], 1)
    mlp = pykd.MLP([5, 16, 12, 3], ["tanh", "relu", "identity"], seed=0)
    pykd.fit(mlp, X, Y, cfg=pykd.TrainConfig(loss="mse", lr=3e-3), epochs=2, progress=False)
    models = {"dense": mlp, "int8": pykd.quantize_model(mlp),
              "int8 static": pykd.quantize_model(mlp, "static", X[:100]),
              "low_rank": pykd.low_rank(mlp, rank=4), "codebook": pykd.cluster(mlp, 4),
              "sparse": pykd.sparsify(pykd.prune(mlp, 0.6)),
              "sparse_codebook": pykd.cluster(pykd.sparsify(pykd.prune(mlp, 0.6)), 2)}
    for name, m in models.items():
        path = tmp_path / "m.pykd"
        m.save(path)
        got, _ = run_fortran(tmp_path, path, X)
        py = m.predict(X)
        assert pykd.load_model(path).task == "regression", name
        for j in range(3):
            assert np.abs(got[:, j] - py[:, j]).max() <= 1e-5 * np.abs(py[:, j]).max(), (name, j)


def test_fortran_writer_fsyncs_the_directory_after_the_rename(tmp_path):
    """pykd_save_model as pykd.io.atomic_write: fsync of the temporary file,
    rename over the target, then fsync of the target's directory (traced)."""
    import shutil
    if shutil.which("strace") is None:
        pytest.skip("needs strace")
    path, sub = tmp_path / "python.pykd", tmp_path / "out dir"
    sub.mkdir()
    kind_model("dense", 3).save(path)
    inp, out = tmp_path / "x.f32", tmp_path / "y.f32"
    inputs(0, 2).astype("<f4").tofile(inp)
    log = tmp_path / "trace"
    proc = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,fsync,rename", "-o",
                           str(log), CLI, str(path), str(inp), str(out), "0",
                           str(sub / "f.pykd")], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and not log.exists():
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    calls = [re.sub(r"\s+= ", " = ", line.split(None, 1)[1])      # drop the pid, the padding
             for line in log.read_text().splitlines() if " " in line]
    k = next(i for i, c in enumerate(calls)
             if c.startswith("rename(") and f'"{sub / "f.pykd"}") = 0' in c)
    tmp_fd = re.search(r"= (\d+)$", next(c for c in calls[:k][::-1] if ".tmp" in c
                                         and c.startswith("openat("))).group(1)
    assert f"fsync({tmp_fd}) = 0" in calls[:k]
    opened = next(c for c in calls[k + 1:] if c.startswith("openat("))
    assert f'"{sub}"' in opened and "O_DIRECTORY" in opened
    dir_fd = re.search(r"= (\d+)$", opened).group(1)
    assert f"fsync({dir_fd}) = 0" in calls[k + 1:]
