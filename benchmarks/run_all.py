"""Run every benchmark and write benchmarks/RESULTS.md, JSON and plots.

    python benchmarks/run_all.py [--quick] [--out benchmarks]

Kernels (bench_kernels.py), pipeline phases (bench_pipeline.py) and scaling
(bench_scaling.py), Fortran against the NumPy path in the same run, and
inference (bench_inference.py: every layer kind against ONNX Runtime, NumPy
and PyTorch). Timing never fails the run: targets are printed as MET or MISSED.
"""
import argparse
import datetime
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

# The benchmark modules are imported when their part runs, not here: the
# workers (harness.Workers, "spawn") import this main module again, and a
# top-level `import pykd` (bench_pipeline, bench_scaling) would load pykd,
# its libgomp and its OpenBLAS into the NumPy, ONNX Runtime and PyTorch
# workers too.


PARTS = ("training", "kernels", "pipeline", "scaling", "inference")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="about 4 minutes in all")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma list of {', '.join(PARTS)} (RESULTS.md holds those run)")
    ap.add_argument("--blis", default=None, help="training: folder holding BLIS's libblis.so.4")
    a = ap.parse_args(argv)
    parts_run = a.parts.split(",")
    out = a.out
    os.makedirs(out, exist_ok=True)
    tag = "quick" if a.quick else "full"
    q = ["--quick"] if a.quick else []
    parts = []
    for name, modname, extra in (
            ("training", "bench_train", ["--blis", a.blis] if a.blis else []),
            ("kernels", "bench_kernels", []),
            ("pipeline", "bench_pipeline", []),
            ("scaling", "bench_scaling", ["--plots", os.path.join(out, "plots")]),
            ("inference", "bench_inference",
             ["--plot", os.path.join(out, "plots", f"inference-{tag}.png")])):
        if name not in parts_run:
            continue
        mod = importlib.import_module(modname)
        print(f"\n=== {name} ===", flush=True)
        js = os.path.join(out, f"{name}-{tag}.json")
        md = os.path.join(out, f"{name}-{tag}.md")
        args = q + ["--json", js] + extra
        if name != "scaling":
            args += ["--markdown", md]
        mod.main(args)
        if os.path.exists(md):
            with open(md, encoding="utf-8") as fh:
                parts.append(f"## {name}\n\n{fh.read()}")
    info = harness.machine_info()
    head = (f"# pykd benchmark results ({tag})\n\n"
            f"{datetime.date.today()} on this machine:\n\n```\n"
            f"{harness.format_machine_info(info)}\n```\n\n"
            "Each candidate in a worker process of its own, alternating in one run; medians. "
            "The machine is a shared 2-core VM: compare ratios, not absolute times.\n\n")
    if not a.quick:
        with open(os.path.join(out, "RESULTS.md"), "w", encoding="utf-8") as fh:
            fh.write(head + "\n".join(parts) + ("\n## scaling\n\nSee `scaling-full.json` and "
                                                "`plots/*.png`.\n" if "scaling" in parts_run else ""))
        print(f"wrote {os.path.join(out, 'RESULTS.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
