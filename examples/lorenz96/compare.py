"""Tables of the Lorenz-96 example from what l96_truth, train.py and
l96_forecast wrote in the work directory: results.json and results.md.

    python compare.py WORK_DIR [--seconds S]

Forecast errors are recomputed here from the raw forecasts (and must match
the RMSE l96_forecast printed); climate statistics are pooled over the K
slow variables and the climate members.
"""
import argparse
import json
import os
import platform
import sys

import numpy as np

#: Lags of the autocorrelation of X, in model time units (MTU).
ACF_LAGS = (0.1, 0.5, 1.0)
#: Histogram of X for the Hellinger distance between climates.
PDF_BINS = np.arange(-15.0, 25.01, 0.5)


def read_json(work, name):
    with open(os.path.join(work, name), encoding="utf-8") as fh:
        return json.load(fh)


def read_f64(path, shape):
    a = np.fromfile(path, dtype="<f8")
    return a.reshape(shape)


def forecast_errors(fc, truth_at_leads, n_boot=1000, seed=0):
    """RMSE over the members that did not diverge and all k, per lead, with
    a 95% bootstrap interval over members."""
    ok = np.isfinite(fc).all(axis=2)                         # (members, leads)
    sq = ((fc - truth_at_leads) ** 2).mean(axis=2)           # per member and lead
    rng = np.random.default_rng(seed)
    out = []
    for il in range(fc.shape[1]):
        s = sq[ok[:, il], il]
        if s.size == 0:
            out.append({"rmse": None, "low": None, "high": None, "n": 0})
            continue
        boot = np.sqrt(s[rng.integers(0, s.size, (n_boot, s.size))].mean(axis=1))
        out.append({"rmse": float(np.sqrt(s.mean())), "low": float(np.quantile(boot, 0.025)),
                    "high": float(np.quantile(boot, 0.975)), "n": int(s.size)})
    return out


def acf(series, lag):
    """Autocorrelation at ``lag`` samples of each column, averaged over
    columns (series: (n, K), or (members, n, K) averaged over members)."""
    if series.ndim == 2:
        series = series[None]
    vals = []
    for s in series:
        c = s - s.mean(axis=0)
        num = (c[:-lag] * c[lag:]).mean(axis=0) if lag else (c * c).mean(axis=0)
        vals.append(num / (c * c).mean(axis=0))
    return float(np.mean(vals))


def climate_stats(x, interval, truth_hist=None):
    """Mean, std, ACF at ACF_LAGS and the X histogram of x (members, n, K)
    sampled every ``interval`` MTU."""
    x = x[np.isfinite(x).all(axis=(1, 2))]
    if x.size == 0:
        return None
    hist, _ = np.histogram(x, bins=PDF_BINS)
    p = hist / hist.sum()
    res = {"mean": float(x.mean()), "std": float(x.std()), "members": int(x.shape[0]),
           "mtu": float(x.shape[1] * interval)}
    for lag in ACF_LAGS:
        res[f"acf_{lag:g}"] = acf(x, int(round(lag / interval)))
    if truth_hist is not None:
        res["hellinger"] = float(np.sqrt(0.5 * np.sum((np.sqrt(p) - np.sqrt(truth_hist)) ** 2)))
    return res, p


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def build(work, seconds=None):
    truth_meta = read_json(work, "truth.json")
    train = read_json(work, "train.json")
    fcm = read_json(work, "forecast.json")
    K = truth_meta["K"]
    truth = read_f64(os.path.join(work, "test_X.f64"), (-1, K))
    dt = fcm["dt"]
    leads = np.array(fcm["lead_steps"])
    starts = np.arange(fcm["n_members"]) * fcm["member_stride"]
    truth_at = truth[starts[:, None] + leads[None, :]]          # (members, leads, K)
    # The truth's climate: the test trajectory at the climate runs' interval.
    interval = fcm["climate_every"] * dt
    every = int(round(interval / truth_meta["test_interval"]))
    truth_clim, truth_hist = climate_stats(truth[::every][None], interval)
    models = {m["label"]: m for m in train["models"]}

    rows = []
    for cl in fcm["closures"]:
        label = cl["label"]
        fc = read_f64(os.path.join(work, f"forecast_{label}.f64"), (fcm["n_members"], len(leads), K))
        clim = np.fromfile(os.path.join(work, f"climate_{label}.f64"), dtype="<f8")
        clim = clim.reshape(fcm["climate_members"], -1, K)
        stats = climate_stats(clim, interval, truth_hist)
        steps_per_mtu = 1.0 / dt
        rows.append({
            "label": label,
            "model": models.get(label),
            "forecast": forecast_errors(fc, truth_at),
            "forecast_rmse_fortran": cl["rmse"],
            "n_blown_up": cl["n_blown_up"],
            "climate": stats[0] if stats else None,
            "cpu_ms_per_mtu": 1e3 * cl["cpu_seconds_per_mtu"],
            "wall_ms_per_mtu": 1e3 * cl["wall_seconds_per_mtu"],
            "us_per_closure_call": 1e6 * cl["cpu_seconds_per_mtu"] / (4 * steps_per_mtu),
            "ensemble_seconds": cl["ensemble_seconds"],
            "climate_seconds": cl["climate_seconds"],
        })
    return {
        "setup": {
            "K": K, "J": truth_meta["J"], "F": truth_meta["F"], "h": truth_meta["h"],
            "b": truth_meta["b"], "c": truth_meta["c"], "dt_two_scale": truth_meta["dt"],
            "dt_one_scale": dt, "n_train_samples": truth_meta["n_train"] * K,
            "train_interval": truth_meta["train_interval"], "n_members": fcm["n_members"],
            "lead_mtu": (leads * dt).tolist(), "climate_members": fcm["climate_members"],
            "climate_mtu": fcm["climate_mtu"], "threads": fcm["threads"], "cpu": cpu_name(),
            "cores": os.cpu_count(), "load_average": os.getloadavg()[0],
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "run_seconds": seconds,
        },
        "truth": {"climate": truth_clim,
                  "cpu_ms_per_mtu": 1e3 * fcm["two_scale"]["cpu_seconds_per_mtu"],
                  "wall_ms_per_mtu": 1e3 * fcm["two_scale"]["wall_seconds_per_mtu"]},
        "train": train,
        "runs": rows,
    }


def markdown(res):
    s, runs, truth = res["setup"], res["runs"], res["truth"]
    out = []
    out.append("Offline fit of U_k on the test trajectory (physical units):\n")
    out.append("| model | layers | parameters | bytes | RMSE of U | R^2 | train s |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    for m in res["train"]["models"]:
        out.append(f"| {m['label']} | {m['layers']} | {m['parameters']:,} | {m['bytes']:,} | "
                   f"{m['test_rmse']:.3f} | {m['test_r2']:.4f} | {fmt(m.get('train_seconds'), '.1f')} |")
    out.append("")
    leads = s["lead_mtu"]
    out.append(f"Forecast RMSE of X against the two-scale truth, {s['n_members']} initial states "
               "(95% bootstrap interval over them), and climate "
               f"({s['climate_members']} x {s['climate_mtu']:g} MTU; truth: the test trajectory):\n")
    out.append("| run | " + " | ".join(f"RMSE {t:g} MTU" for t in leads)
               + " | mean | std | " + " | ".join(f"ACF {lag:g}" for lag in ACF_LAGS)
               + " | Hellinger |")
    out.append("| --- " * (len(leads) + 3 + len(ACF_LAGS)) + "| --- |")
    tc = truth["climate"]
    out.append("| two-scale truth | " + " | ".join("0" for _ in leads)
               + f" | {tc['mean']:.3f} | {tc['std']:.3f} | "
               + " | ".join(f"{tc[f'acf_{lag:g}']:.3f}" for lag in ACF_LAGS) + " | 0 |")
    for r in runs:
        cells = []
        for f in r["forecast"]:
            cells.append("-" if f["rmse"] is None else
                         f"{f['rmse']:.3f} [{f['low']:.2f}, {f['high']:.2f}]")
        c = r["climate"]
        clim = (["-"] * (3 + len(ACF_LAGS)) if c is None else
                [f"{c['mean']:.3f}", f"{c['std']:.3f}"]
                + [f"{c[f'acf_{lag:g}']:.3f}" for lag in ACF_LAGS] + [f"{c['hellinger']:.3f}"])
        blown = f" ({r['n_blown_up']} diverged)" if r["n_blown_up"] else ""
        out.append(f"| {r['label']}{blown} | " + " | ".join(cells + clim) + " |")
    out.append("")
    out.append(f"Cost per model time unit, one member on one thread (median of the repeats, "
               f"alternating), and the ensemble's wall time on {s['threads']} threads:\n")
    out.append("| run | time step | ms CPU / MTU | x two-scale | us per closure call | "
               "ensemble wall s |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    two = truth["cpu_ms_per_mtu"]
    out.append(f"| two-scale truth | {s['dt_two_scale']:g} | {two:.2f} | 1 | - | - |")
    for r in runs:
        out.append(f"| {r['label']} | {s['dt_one_scale']:g} | {r['cpu_ms_per_mtu']:.2f} | "
                   f"{r['cpu_ms_per_mtu'] / two:.2f} | {r['us_per_closure_call']:.2f} | "
                   f"{r['ensemble_seconds']:.2f} |")
    out.append("")
    out.append(f"CPU: {s['cpu']}, {s['cores']} cores, {s['threads']} OpenMP threads, "
               f"OPENBLAS_NUM_THREADS={s['blas_threads']}, load average {s['load_average']:.2f} "
               "at the end" + (f"; whole run {s['run_seconds']} s." if s["run_seconds"] else "."))
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work")
    ap.add_argument("--seconds", type=int, default=None, help="wall time of the whole run")
    args = ap.parse_args(argv)
    res = build(args.work, args.seconds)
    text = markdown(res)
    for name, data in (("results.json", json.dumps(res, indent=1) + "\n"), ("results.md", text)):
        path = os.path.join(args.work, name)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(data)
        os.replace(tmp, path)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
