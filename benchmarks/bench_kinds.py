"""Every layer kind on one student: bytes on disk, accuracy and latency.

Takes a trained student (default: trains the demo's 784-200-200-10 KD
student's architecture from scratch for a few epochs if no model is given),
makes one variant per layer kind with the one-shot conversions, saves each,
reloads it, and reports per variant: file bytes and the ratio to the float32
file, parameters, non-zeros, test accuracy, top-1 agreement with float32,
and the median latency of `forward` at batch 1 and 256 (alternating, in
this process; the per-backend worker comparison with ONNX Runtime and
PyTorch is bench_inference's job).

    python benchmarks/bench_kinds.py --model student.pykd [--json out.json]

The targets of the layer-kinds issue are checked and printed: int8 within
0.3 points of float32 and at most 0.27x its file, a 90%-sparse file at most
0.2x, a 4-bit codebook file at most 0.15x.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from bench_inference import pruned  # noqa: E402

import pykd  # noqa: E402
from pykd.data import load_dataset  # noqa: E402


def variants(student, X_cal):
    """(name, model) for every kind the conversions make."""
    p90 = pruned(student, 0.9)
    out = [
        ("float32", student),
        ("int8 dynamic", pykd.quantize_model(student, activations="dynamic")),
        ("int8 static", pykd.quantize_model(student, activations="static", calibration=X_cal)),
        ("pruned 90% (dense)", p90),
        ("sparse_csr 90%", pykd.sparsify(p90)),
        ("low_rank energy 0.9", pykd.low_rank(student, energy=0.9)),
        ("codebook 4-bit", pykd.cluster(student, bits=4, seed=0)),
        ("codebook 5-bit (8-bit indices)", pykd.cluster(student, bits=5, seed=0)),
        ("sparse 90% + codebook 5-bit", pykd.cluster(pykd.sparsify(p90), bits=5, seed=0)),
    ]
    return out


def measure(student, ds, *, repeats=7):
    rows, timing = [], {}
    ref_pred = student.predict(ds.X_test)
    with tempfile.TemporaryDirectory() as tmp:
        base_bytes = None
        for name, model in variants(student, ds.X_train[:1000]):
            path = os.path.join(tmp, name.replace(" ", "_").replace("%", "") + ".pykd")
            model.save(path)
            loaded = pykd.load_model(path)
            nbytes = os.path.getsize(path)
            base_bytes = base_bytes or nbytes
            pred = loaded.predict(ds.X_test)
            x1 = np.ascontiguousarray(ds.X_test[:1])
            x256 = np.ascontiguousarray(ds.X_test[:256])
            timing[name + " b1"] = lambda m=loaded, x=x1: m.forward(x)
            timing[name + " b256"] = lambda m=loaded, x=x256: m.forward(x)
            rows.append({
                "variant": name,
                "kinds": _kinds(loaded),
                "bytes_on_disk": nbytes,
                "ratio": nbytes / base_bytes,
                "parameters": int(loaded.parameters),
                "nonzeros": int(getattr(loaded, "nonzeros", loaded.parameters)),
                "test_accuracy": float((pred == ds.y_test).mean()),
                "agreement": float((pred == ref_pred).mean()),
            })
    t = harness.time_alternating(timing, repeats=repeats, min_time=0.01)
    for r in rows:
        r["latency_b1_us"] = t[r["variant"] + " b1"]["median"] * 1e6
        r["latency_b256_us"] = t[r["variant"] + " b256"]["median"] * 1e6
    return rows


def _kinds(model):
    layers = model.layers
    if layers and isinstance(layers[0], tuple):   # MLP: (W, b) pairs
        return ["dense"]
    return sorted({layer.kind for layer in layers})


def check_targets(rows):
    by = {r["variant"]: r for r in rows}
    f32 = by["float32"]
    checks = []
    for name in ("int8 dynamic", "int8 static"):
        r = by[name]
        loss = 100 * (f32["test_accuracy"] - r["test_accuracy"])
        checks.append((f"{name}: accuracy loss <= 0.3 points", f"{loss:.2f}", loss <= 0.3))
        checks.append((f"{name}: file <= 0.27x", f"{r['ratio']:.3f}", r["ratio"] <= 0.27))
    r = by["sparse_csr 90%"]
    checks.append(("90%-sparse file <= 0.2x", f"{r['ratio']:.3f}", r["ratio"] <= 0.2))
    r = by["codebook 4-bit"]
    checks.append(("4-bit codebook file <= 0.15x", f"{r['ratio']:.3f}", r["ratio"] <= 0.15))
    return checks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="student model file (default: train one for --epochs)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json", help="write the rows and machine info here")
    ap.add_argument("--markdown", help="write the table here")
    args = ap.parse_args(argv)
    ds = load_dataset()
    if args.model:
        student = pykd.load_model(args.model)
    else:
        student = pykd.MLP([ds.n_features, 200, 200, 10], seed=0)
        pykd.fit(student, ds.X_train, ds.y_train, epochs=args.epochs, progress=False)
    rows = measure(student, ds)
    info = harness.machine_info()
    headers = ["variant", "bytes", "ratio", "params", "nonzeros", "test acc %", "agree %",
               "b1 us", "b256 us"]
    table = [[r["variant"], r["bytes_on_disk"], f"{r['ratio']:.3f}", r["parameters"],
              r["nonzeros"], f"{100 * r['test_accuracy']:.2f}", f"{100 * r['agreement']:.2f}",
              f"{r['latency_b1_us']:.1f}", f"{r['latency_b256_us']:.0f}"] for r in rows]
    text = (harness.format_machine_info(info) + "\n\n" + harness.markdown_table(headers, table)
            + "\n\n" + "\n".join(f"- {'met' if ok else 'MISSED'}: {what} (measured {val})"
                                 for what, val, ok in check_targets(rows)) + "\n")
    print(text)
    if args.markdown:
        harness.write_markdown(args.markdown, text)
    if args.json:
        harness.write_json(args.json, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
