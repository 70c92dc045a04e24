"""The inference benchmark (benchmarks/bench_inference.py) on a tiny model.

Its numbers are only worth something if every candidate computes the same
function: each candidate (every pykd variant, plain NumPy, ONNX Runtime
float32 and int8, PyTorch when importable) is loaded from its file as the
benchmark's workers do and compared with the NumPy float64 reference of its
weights; the check itself must reject wrong logits; and a candidate that
fails it must be reported, not timed. No timing is asserted.
"""
import contextlib
import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench_inference as bi  # noqa: E402

import pykd  # noqa: E402

pytestmark = pytest.mark.fortran
HAVE_ORT = (importlib.util.find_spec("onnx") is not None
            and importlib.util.find_spec("onnxruntime") is not None)
PYKD_LABELS = ["pykd float32", "pykd int8 dynamic", "pykd int8 static", "pykd pruned 90% dense",
               "pykd sparse_csr 90%", "pykd low_rank e0.9", "pykd codebook 4-bit",
               "pykd sparse90+codebook 5-bit"]


def blobs(n, rng, centers):
    """Well separated Gaussian blobs in [0, 1]-ish pixels: the int8 models'
    argmax then matches the float32 model's on (nearly) every row."""
    y = rng.integers(0, len(centers), n)
    X = (centers[y] + 0.05 * rng.standard_normal((n, centers.shape[1]))).astype(np.float32)
    return X, y


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    rng = np.random.default_rng(0)
    centers = rng.random((4, 48)).astype(np.float32)
    X, y = blobs(1500, rng, centers)
    Xc, _ = blobs(300, rng, centers)
    student = pykd.MLP([48, 24, 24, 4], seed=0)
    pykd.fit(student, X, y, epochs=4, progress=False)
    work = str(tmp_path_factory.mktemp("bench_inference"))
    specs, absent = bi.prepare(student, X[:200], Xc, work, with_onnx=HAVE_ORT)
    return student, Xc, work, specs, absent


@contextlib.contextmanager
def torch_threads_kept():
    """PyTorch's set_num_threads (load_candidate's threads=1) also sets the
    system libgomp's, which pykd shares: restore it, or later tests in this
    process run pykd on one thread (other bits than a fresh process's)."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(before if before is not None else os.cpu_count() or 1)


def test_every_candidate_agrees_with_the_numpy_reference(prepared):
    _, Xc, work, specs, absent = prepared
    labels = [s["label"] for s in specs]
    expected = PYKD_LABELS + ["numpy float32"] + (["ORT float32", "ORT int8 dynamic"]
                                                  if HAVE_ORT else [])
    assert labels[:len(expected)] == expected
    if importlib.util.find_spec("torch") is None:
        assert "torch" in absent
    ref_f32 = np.load(os.path.join(work, "ref_f32.npy"))
    for s in specs:
        assert s["bytes"] == os.path.getsize(s["path"]) > 0
        with torch_threads_kept():
            y = bi.batched(bi.load_candidate(s, 1), Xc, batch=64)
        res = bi.check_logits(y, np.load(os.path.join(work, s["ref"])), s["check"], ref_f32)
        assert res["ok"], (s["label"], res)
        if s["check"] == "float":
            assert res["max_abs_diff"] <= res["tol"]
        else:
            assert res["agreement"] >= bi.INT8_AGREEMENT
    # the converted variants really are smaller files than the float32 one
    size = {s["label"]: s["bytes"] for s in specs}
    for small in ("pykd int8 dynamic", "pykd sparse_csr 90%", "pykd codebook 4-bit",
                  "pykd sparse90+codebook 5-bit"):
        assert size[small] < size["pykd float32"], small


def test_reference_is_independent_of_pykd(prepared):
    """The float64 reference of the float32 student, by hand."""
    student, Xc, work, _, _ = prepared
    mean, std = (float(v) for v in student.norm)
    h = (Xc.astype(np.float64) - mean) / std
    for k, (W, b) in enumerate(student.layers):
        h = h @ W.astype(np.float64) + b
        if k < len(student.layers) - 1:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(np.load(os.path.join(work, "ref_f32.npy")), h, rtol=0, atol=1e-9)


def test_check_rejects_wrong_logits():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((200, 4)) * 5
    good = ref.astype(np.float32)
    assert bi.check_logits(good, ref, "float", ref)["ok"]
    bad = good.copy()
    bad[7, 2] += 1e-2 * np.abs(ref).max()
    r = bi.check_logits(bad, ref, "float", ref)
    assert not r["ok"] and "reference" in r["why"]
    nan = good.copy()
    nan[0, 0] = np.nan
    assert not bi.check_logits(nan, ref, "float", ref)["ok"]
    assert not bi.check_logits(good[:, :3], ref, "float", ref)["ok"]
    # int8: argmax agreement with the float32 model; 3 of 200 rows flipped is 98.5 %
    flipped = good.copy()
    for i in range(3):
        flipped[i] = -flipped[i]
    r = bi.check_logits(flipped, ref, "int8", ref)
    assert not r["ok"] and r["agreement"] == pytest.approx(0.985)
    assert bi.check_logits(good + 0.1, ref, "int8", ref)["ok"]


def test_onnx_graph_structure():
    pytest.importorskip("onnx")
    rng = np.random.default_rng(2)
    layers = [(rng.standard_normal((5, 3)).astype(np.float32), np.ones(3, np.float32), "relu"),
              (rng.standard_normal((3, 2)).astype(np.float32), np.zeros(2, np.float32),
               "identity")]
    g = bi.onnx_graph(layers, (np.float32(0.5), np.float32(2.0)), None).graph
    assert [n.op_type for n in g.node] == ["Sub", "Div", "MatMul", "Add", "Relu", "MatMul",
                                           "Add", "Identity"]
    with pytest.raises(ValueError, match="activation 'gelu'"):
        bi.onnx_graph([(layers[0][0], layers[0][1], "gelu")], None, None)


def test_workers_time_passing_candidates_and_report_failed_ones(prepared, tmp_path):
    """The worker path end to end on two candidates, one of them given a
    wrong reference: it is reported as failed and not timed."""
    _, _, work, specs, _ = prepared
    keep = {"pykd float32", "pykd low_rank e0.9"}
    sub = [dict(s) for s in specs if s["label"] in keep]
    for s in sub:
        if s["label"] == "pykd low_rank e0.9":
            s["ref"] = "ref_pykd_codebook_4_bit.npy"     # another model's logits
    bi.harness.write_json(os.path.join(work, "specs.json"), sub)
    try:
        rows, block = bi.run_threads(sub, work, 1, rounds=1, block_calls={1: 3, 256: 2},
                                     cold_reps=0, settle=0.0, log=lambda s: None)
    finally:
        bi.harness.write_json(os.path.join(work, "specs.json"), specs)
    assert block["threads"] == 1
    by = {(r["label"], r["batch"]): r for r in rows}
    assert len(rows) == 4
    for b in bi.BATCHES:
        for lb in ("pykd float32",):
            r = by[(lb, b)]
            assert r["error"] is None and r["check"]["ok"]
            assert r["median_s"] > 0 and r["p99_s"] >= r["median_s"] and r["n_calls"] >= 3
        assert by[("pykd float32", b)]["vs_pykd_f32"] == 1.0
        bad = by[("pykd low_rank e0.9", b)]
        assert bad["error"].startswith("check failed") and "median_s" not in bad
    result = {"model": "tiny", "model_sizes": "48-24-24-4", "mode": "test",
              "machine": bi.harness.machine_info(), "versions": bi.versions(), "absent": {},
              "blocks": [block], "rows": rows}
    result["machine"]["cpu_flags"] = {}
    md = bi.tables(result)
    assert "### 1 thread, batch 256" in md and "FAILED: check failed" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert bi.plot(result, str(tmp_path / "p.png")) is None
        assert (tmp_path / "p.png").stat().st_size > 0


def test_cold_factory_times_load_and_first_call(prepared, tmp_path):
    """What a cold-start worker does, here in this process."""
    _, _, work, _, _ = prepared
    out = tmp_path / "cold.json"
    # n_threads None: no thread limits on this (the test) process
    get = bi.cold_factory("pykd codebook 4-bit", work, None, 256, str(out))
    assert get("anything")() is None
    import json
    got = json.loads(out.read_text())
    assert set(got) == {"load_s", "first_s"} and got["load_s"] > 0 and got["first_s"] > 0
    with pytest.raises(KeyError, match="no candidate 'nope'"):
        bi.cold_factory("nope", work, 1, 1, str(out))


# ---- the tables' logic on synthetic numbers (no timing) -------------------

def _row(label, batch, median, threads=2, **extra):
    return dict({"threads": threads, "batch": batch, "label": label, "backend": "pykd",
                 "kinds": ["dense"], "bytes": 1000, "median_s": median, "p99_s": 2 * median,
                 "n_calls": 10, "check": {"ok": True}}, **extra)


def synthetic_rows():
    us = 1e-6
    rows = [_row("pykd float32", 1, 10 * us), _row("pykd float32", 256, 600 * us),
            _row("ORT float32", 1, 16 * us), _row("ORT float32", 256, 400 * us),
            _row("pykd int8 dynamic", 1, 5 * us), _row("pykd int8 dynamic", 256, 350 * us),
            _row("ORT int8 dynamic", 1, 12 * us), _row("ORT int8 dynamic", 256, 200 * us),
            _row("pykd low_rank e0.9", 1, 10 * us), _row("pykd low_rank e0.9", 256, 300 * us),
            _row("pykd pruned 90% dense", 1, 12 * us), _row("pykd sparse_csr 90%", 1, 4 * us,
                                                            wait_frac=0.2),
            _row("pykd sparse90+codebook 5-bit", 1, 12 * us)]
    bi.add_ratios(rows)
    return rows


def test_targets_ratios_and_verdicts():
    got = {(t["target"], t["candidate"]): t for t in bi.targets(synthetic_rows())}
    t = got[("float32 b1 <= 0.5x ORT f32", "pykd float32")]
    assert t["ratio"] == pytest.approx(10 / 16) and t["met"] is False
    t = got[("float32 b256 <= 1.0x ORT f32", "pykd float32")]
    assert t["ratio"] == pytest.approx(1.5) and t["met"] is False
    assert got[("int8 b1 <= 0.5x ORT int8", "pykd int8 dynamic")]["met"] is True   # 5/12
    assert got[("int8 b1 <= pykd f32", "pykd int8 dynamic")]["met"] is True
    assert got[("int8 b256 <= 0.5x pykd f32", "pykd int8 dynamic")]["met"] is False  # 350/600
    assert got[("int8 b256 <= 0.5x ORT int8", "pykd int8 dynamic")]["ratio"] == \
        pytest.approx(1.75)
    # "faster than": strictly below 1; equal is not met
    assert got[("low_rank faster than dense, b1", "pykd low_rank e0.9")]["met"] is False
    assert got[("low_rank faster than dense, b256", "pykd low_rank e0.9")]["met"] is True
    sp = got[("sparse_csr 90% >= 3x faster than its dense, b1 (whole model)",
              "pykd sparse_csr 90%")]
    assert sp["ratio"] == pytest.approx(1 / 3) and sp["met"] is True and sp["disturbed"]
    sc = got[("sparse90+codebook faster than its dense, b1", "pykd sparse90+codebook 5-bit")]
    assert sc["ratio"] == pytest.approx(1.0) and sc["met"] is False   # equal is not faster
    # a candidate that was not timed: no verdict
    assert got[("int8 b1 <= 0.5x ORT int8", "pykd int8 static")]["met"] is None
    assert got[("codebook faster than dense, b1", "pykd codebook 4-bit")]["ratio"] is None
    assert {t["threads"] for t in bi.targets(synthetic_rows())} == {2}


def test_report_ends_with_the_targets_table():
    rows = synthetic_rows()
    block = {"threads": 2, "workers": {
        "pykd float32": {"pools": [{"user_api": "blas", "internal_api": "openblas",
                                    "version": "0.3.21", "num_threads": 2,
                                    "architecture": "Cooperlake", "threading_layer": "openmp",
                                    "filepath": "libopenblasp-r0.3.21.so"},
                                   {"user_api": "blas", "internal_api": "openblas",
                                    "version": "0.3.31", "num_threads": 2,
                                    "architecture": "SkylakeX", "threading_layer": "pthreads",
                                    "filepath": "libscipy_openblas64_.so"}],
                         "env": {"GOMP_SPINCOUNT": "10000"}},
        "ORT float32": {"ort": {"version": "1.32.0", "intra_op_threads": 2}, "env": {}}},
        "dense_limits": [{"shape": [256, 784, 200], "median_s": 200e-6, "gflops": 401.4},
                         {"shape": [256, 200, 10], "median_s": 10e-6, "gflops": 102.4}],
        "int8_peak_gmacs": {"zmm": 509.0, "ymm": 254.5}}
    result = {"model": "tiny", "model_sizes": "48-24-24-4", "mode": "test",
              "machine": {"cpu_model": "AMD EPYC", "cpu_vendor": "AuthenticAMD",
                          "cpu_family": 26, "cpu_model_id": 2, "cpu_flags": {"avx2": True}},
              "versions": {"numpy": "2"}, "absent": {}, "blocks": [block], "rows": rows,
              "config": {"worker_env": {"OPENBLAS_CORETYPE": None}}}
    md = bi.tables(result)
    assert "AMD EPYC (Zen 5, family 26 model 2)" in md
    assert "OPENBLAS_CORETYPE unset" in md
    assert "OpenBLAS 0.3.21 openmp Cooperlake x2" in md     # pykd's BLAS, not NumPy's copy
    assert "MLAS (ORT 1.32.0) intra-op x2" in md
    assert "| 2 | 256x784 @ 784x200 | 200 | 401 |" in md
    assert "| 2 | sum of the 3 layers | 210 |" in md
    # 50.9 M multiply-adds over 2 cores x 509 GMAC/s
    assert "zmm 509 GMAC/s" in md and "at least 50.0 us on 2 threads" in md
    tail = md[md.rindex("### "):]
    assert tail.startswith("### Targets (issue 11)")
    assert "| float32 b1 <= 0.5x ORT f32 | 2 | pykd float32 | ORT float32 | 10.0 | 16.0 | " \
        "0.62x | 0.50x | **not met** |" in tail
    assert "| 0.33x | 0.33x | met (disturbed) |" in tail
    # the probe on both CPUs at once: hyperthreads of one core share ~500 GMAC/s,
    # so 2 threads have one core's peak (50.9 M / 499 GMAC/s = 102 us)
    block["int8_peak_all_cpus"] = [250.0, 249.0]
    md = bi.tables(result)
    assert "on all 2 CPUs at once: 250 + 249 GMAC/s, 0.98x one CPU (the CPUs share vector " \
        "units now: hyperthreads of one core, or siblings busy with other work)" in md
    assert "at least 102 us on 2 threads" in md
    block["int8_peak_all_cpus"] = [500.0, 509.0]
    md = bi.tables(result)
    assert "1.98x one CPU;" in md and "hyperthreads" not in md
    assert "at least 50.4 us on 2 threads" in md


def test_the_int8_probe_runs_on_every_cpu_at_once():
    """bench_int8._peak_all_cpus compiles benchmarks/int8_peak.c and runs
    one pinned copy per CPU: one positive zmm rate per CPU (0 without VNNI)."""
    import bench_int8
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    got = bench_int8._peak_all_cpus()
    assert got is not None and len(got) == len(os.sched_getaffinity(0))
    assert all(v >= 0 for v in got)


def test_wait_summaries():
    lat = np.array([1.0, 1.0, 1.1, 5.0]) * 1e-3
    waits = np.array([0.0, 1e-6, 0.0, 4e-3])
    u = bi.undisturbed(lat, waits)
    assert u["n_disturbed"] == 1 and u["p99_undisturbed_s"] < 1.2e-3
    assert u["median_undisturbed_s"] == pytest.approx(1e-3)
    assert bi.undisturbed(lat, None) == {} and bi.undisturbed(lat, waits[:2]) == {}
    s = bi.sched_summary(np.array([[0.010, 0.018, 0.001, 10], [0.010, 0.020, 0.003, 10]]))
    assert s["cpu_per_call_s"] == pytest.approx(0.038 / 20)
    assert s["wait_per_call_s"] == pytest.approx(0.004 / 20)
    assert s["wait_frac"] == pytest.approx(0.2)
    assert bi.sched_summary(None) == {}


def test_blas_summary_names_each_backends_kernels():
    torch_info = {"torch": {"blas": "mkl", "mkl": "2024.2", "onednn": "v3.12.0",
                            "capability": "AVX512", "threads": 2}}
    assert bi.blas_summary("torch", torch_info) == "MKL 2024.2 + oneDNN v3.12.0 (AVX512) x2"
    numpy_info = {"pools": [{"user_api": "blas", "version": "0.3.31", "threading_layer":
                             "pthreads", "architecture": "SkylakeX", "num_threads": 1,
                             "filepath": "libscipy_openblas64_.so"},
                            {"user_api": "openmp", "filepath": "libgomp.so"}]}
    assert bi.blas_summary("numpy", numpy_info) == "OpenBLAS 0.3.31 pthreads SkylakeX x1"
    assert bi.blas_summary("pykd", None) == "?"
    assert bi.blas_summary("pykd", {"error": "gone"}) == "?"


def test_a_peers_worker_runs_without_pykd(prepared, tmp_path, monkeypatch):
    """The NumPy peer's worker is the script a user would write: numpy only.
    pykd, imported in this (the parent) process, sets GOMP_SPINCOUNT in
    os.environ; the worker starts without it and without an OpenBLAS kernel
    pin, and loads neither pykd nor PyTorch."""
    _, _, work, specs, _ = prepared
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    env = bi.harness.worker_environment()
    assert env["OPENBLAS_CORETYPE"] is None
    labels = ["numpy float32", "pykd float32"]
    with bi.harness.Workers(bi.worker_factory, labels, threads=1, env=env, workdir=work,
                            n_threads=1, check_dir=str(tmp_path),
                            block_calls={"1": 2, "256": 2}) as w:
        assert w.errors == {}
        np_info, pykd_info = w.call("numpy float32", "info"), w.call("pykd float32", "info")
    assert np_info["loaded"] == [] and "pykd" in pykd_info["loaded"]
    assert np_info["env"]["OPENBLAS_CORETYPE"] is None
    assert np_info["env"]["GOMP_SPINCOUNT"] == bi.harness.initial_environ().get("GOMP_SPINCOUNT")
    if bi.harness._tpc is not None:
        assert bi.blas_summary("numpy", np_info).startswith("OpenBLAS")
