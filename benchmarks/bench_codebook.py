"""Codebook layers (1, 2, 4, 5, 8 bits) against the dense float32 layers they replace.

    python benchmarks/bench_codebook.py [--quick] [--threads 1 2] [--paths avx2 avx512]
                                        [--out-dir DIR]

The 784-200-200-10 student (random weights, ReLU): ``Model.forward`` of the
dense float32 model and of the same weights clustered to 2, 4, 16, 32 and
256 centroids (1, 2, 4, 5 and 8 bits; 5-bit codes are stored as 8-bit
indices), and the 784x200 first layer alone, at batch 1 and 256. All
candidates alternate in one process per thread count and CPU path
(OMP_NUM_THREADS and PYKD_CODEBOOK_PATH set before pykd loads; the dense
layer's BLAS is the extension's OpenBLAS, named in the output), medians
over the rounds. Without --paths, the path this CPU picks.

Writes ``codebook-full.{md,json}`` (``codebook-quick.*`` with --quick) into
--out-dir (default: this directory). --quick takes a minute; the full run
about five on a quiet machine.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

N_CODES = (2, 4, 16, 32, 256)   # 1, 2, 4, 5, 8 bits
SIZES = [784, 200, 200, 10]
ACTS = ["relu", "relu", "identity"]


def clustered(W, n):
    """W's entries replaced by the nearest of n quantiles: (centroids, codes)."""
    cents = np.quantile(W, (np.arange(n) + 0.5) / n).astype(np.float32)
    mids = (cents[1:] + cents[:-1]) / 2
    return cents, np.searchsorted(mids, W).astype(np.uint8)


def _models():
    import pykd
    from pykd.layers import Codebook

    mlp = pykd.MLP(SIZES, ACTS, seed=0)
    dense = mlp.to_model()
    out = {"dense": dense}
    for n_codes in N_CODES:
        layers = []
        for layer in dense.layers:
            cents, codes = clustered(layer.W, n_codes)
            layers.append(Codebook(cents, codes, layer.b.copy(), layer.activation))
        out[f"codebook {int(n_codes - 1).bit_length()}-bit"] = pykd.Model(layers)
    return out


def _child(quick):
    import pykd
    import pykd._fkernels as fk

    models = _models()
    first = {k: pykd.Model([m.layers[0]]) for k, m in models.items()}
    rng = np.random.default_rng(0)
    rounds = 5 if quick else 15
    res = {"path": fk.codebook_path().decode().strip(), "rows": [], "blas": _blas(models["dense"])}
    for what, group in (("student", models), ("784x200 layer", first)):
        for batch in (1, 256):
            X = rng.random((batch, 784), dtype=np.float32)
            funcs = {k: (lambda m=m: m.forward(X)) for k, m in group.items()}
            t = harness.time_alternating(funcs, repeats=rounds, warmup=3,
                                         min_time=0.01 if quick else 0.02)
            for k, s in t.items():
                res["rows"].append({"what": what, "batch": batch, "model": k,
                                    "median_us": s["median"] * 1e6, "min_us": s["min"] * 1e6,
                                    "q1_us": s["q1"] * 1e6, "q3_us": s["q3"] * 1e6})
    # f32_len (column 5) float32 words and i8_len (column 7) bytes per layer
    res["bytes"] = {k: int(sum(4 * row[5] + row[7] for row in m.table)) for k, m in models.items()}
    print(json.dumps(res))


def _blas(model):
    """The BLAS the extension's dense layers call (not NumPy's): its
    threadpoolctl entry after a forward, and the build option."""
    import pykd._build_config as cfg

    model.forward(np.zeros((2, 784), np.float32))
    try:
        import threadpoolctl
        pools = [f"{p['internal_api']} {p['version']} {p.get('threading_layer')} "
                 f"{os.path.basename(p['filepath'])}" for p in threadpoolctl.threadpool_info()
                 if p["user_api"] == "blas" and "scipy_openblas" not in p["filepath"]]
    except ImportError:
        pools = []
    return {"pools": pools, "blas_openmp_dir": getattr(cfg, "blas_openmp_dir", "")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=[None],
                    help="PYKD_CODEBOOK_PATH values to run (default: the CPU's choice)")
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--keep-blas-env", action="store_true",
                    help="keep OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE in the children (by default "
                         "they are dropped, so the dense layers' OpenBLAS picks its kernels for "
                         "this CPU)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.quick)
        return
    info = harness.machine_info()
    runs = {}
    for path in args.paths:
        for nt in args.threads:
            env = dict(os.environ, OMP_NUM_THREADS=str(nt))
            env.pop("PYKD_CODEBOOK_PATH", None)
            if not args.keep_blas_env:   # a sandbox's pin (Haswell kernels on an AVX-512 CPU)
                env.pop("OPENBLAS_CORETYPE", None)
                env.pop("OPENBLAS_L2_SIZE", None)
            if path:
                env["PYKD_CODEBOOK_PATH"] = path
            cmd = [sys.executable, __file__, "--child"] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            runs[(nt, path)] = json.loads(out.strip().splitlines()[-1])
    with open("/proc/loadavg", encoding="ascii") as fh:
        load_after = fh.read().split()[:3]
    mode = "quick" if args.quick else "full"
    lines = [f"# Codebook layers against dense float32 ({mode} run)", "",
             "Generated by `python benchmarks/bench_codebook.py" + (" --quick" if args.quick else "")
             + "`. Medians of alternating rounds in one process per thread count "
             "(`Model.forward`, Python overhead included); ratio = codebook / dense "
             "(below 1: the codebook is faster).", "",
             "```", harness.format_machine_info(info),
             f"load average before {' '.join(info.get('loadavg', []))}, after {' '.join(load_after)}"
             f" (2 cores; above ~1 the machine is shared and the times are noisy)", "```", ""]
    first = next(iter(runs.values()))
    lines += [f"Dense layers' BLAS (the extension's): {'; '.join(first['blas']['pools']) or '?'} "
              f"(OpenMP build dir: {first['blas']['blas_openmp_dir'] or 'system default'}). "
              "The `pool:` line above is NumPy's own BLAS, unused here.", ""]
    lines += ["Weights in memory (float32 values and packed indices): " +
              ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in first["bytes"].items()), ""]
    header = ["threads", "path", "what", "batch", "model", "median", "q1-q3", "ratio to dense"]
    rows = []
    for (nt, _), r in runs.items():
        dense = {(x["what"], x["batch"]): x["median_us"] for x in r["rows"] if x["model"] == "dense"}
        for x in r["rows"]:
            d = dense[x["what"], x["batch"]]
            rows.append([nt, r["path"], x["what"], x["batch"], x["model"],
                         f"{x['median_us']:.1f} us", f"{x['q1_us']:.1f}-{x['q3_us']:.1f}",
                         f"{x['median_us'] / d:.2f}"])
    lines.append(harness.markdown_table(header, rows))
    text = "\n".join(lines)
    print(text)
    base = os.path.join(args.out_dir, f"codebook-{mode}")
    harness.write_markdown(base + ".md", text)
    harness.write_json(base + ".json", {"machine": info, "load_after": load_after,
                                        "runs": {f"{k[0]} {k[1] or 'auto'}": v
                                                 for k, v in runs.items()}})


if __name__ == "__main__":
    main()
