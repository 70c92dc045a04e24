"""Train the closures of the Lorenz-96 example with pykd's regression API.

    python train.py WORK_DIR [--quick]

Reads the training data l96_truth wrote (train_X.f64, train_U.f64: the slow
variables X and the subgrid tendency U_k = -(h c / b) sum_j Y_{j,k}, shape
(n_times, K)) and the test trajectory (test_X.f64, test_U.f64). One sample
is one slow variable at one time: the 5 inputs are its periodic stencil
X_{k-2}..X_{k+2}, the output U_k, so one network serves every k (n_times x K
samples). Writes to WORK_DIR:

* teacher.pykd: a wide MLP fitted to U (MSE);
* student.pykd: a small MLP distilled from the teacher (mse_kd: a weighted
  sum of the error against U and against the teacher's outputs);
* student_scratch.pykd: the same small MLP fitted to U alone (no teacher);
* student_int8.pykd: the distilled student quantized to int8 (static
  activation scales calibrated on training inputs);
* student_pruned.pykd: the distilled student pruned to 50% of its weights
  (gradual magnitude pruning while fine-tuning against the teacher), stored
  as sparse CSR layers;
* poly.txt: the coefficients c0..c4 of the quartic U ~ sum_i c_i X_k**i
  (Wilks 2005's deterministic closure, least squares), for l96_forecast;
* train.json: per model its layers, parameters, bytes and the offline RMSE
  and R^2 of U on the test trajectory.

Every network's input and target normalisation (per feature, per output)
is computed by pykd.fit and stored in the model, so the Fortran side feeds
raw X and gets U in physical units.
"""
import argparse
import json
import os
import time

import numpy as np

import pykd

#: (full, quick) recipes: hidden widths, epochs, batch size, Adam lr.
RECIPES = {
    "full": {"teacher": ([128, 128], 40), "student": ([16, 16], 40), "batch": 256,
             "lr": 2e-3, "prune_epochs": 10},
    "quick": {"teacher": ([32, 32], 4), "student": ([16, 16], 4), "batch": 256,
              "lr": 3e-3, "prune_epochs": 2},
}
KD_ALPHA = 0.1          # weight of the target term in mse_kd (1 - alpha: the teacher's)
PRUNE_SPARSITY = 0.5
POLY_DEGREE = 4


def read_series(work, name, K):
    return np.fromfile(os.path.join(work, name), dtype="<f8").reshape(-1, K)


def stencil(X):
    """(n_times, K) -> (n_times * K, 5) float32 rows (X_{k-2}, ..., X_{k+2}),
    periodic in k: the same order as l96.f90's stencil_features."""
    cols = [np.roll(X, -d, axis=1) for d in (-2, -1, 0, 1, 2)]
    return np.ascontiguousarray(np.stack(cols, axis=-1).reshape(-1, 5), dtype=np.float32)


def targets(U):
    return np.ascontiguousarray(U.reshape(-1, 1), dtype=np.float32)


def describe(label, model, path, X_test, y_test, seconds, epochs):
    """The train.json record of one saved model (offline metrics in physical units)."""
    loaded = pykd.load_model(path)
    m = pykd.evaluate(loaded, X_test, y_test)
    net = loaded.to_model() if isinstance(loaded, pykd.MLP) else loaded
    kinds = sorted({layer.kind for layer in net.layers})
    return {"label": label, "file": os.path.basename(path),
            "layers": "-".join(str(s) for s in loaded.sizes) + f" ({', '.join(kinds)})",
            "parameters": int(m["parameters"]), "nonzeros": int(m["nonzeros"]),
            "bytes": os.path.getsize(path), "test_rmse": m["rmse"], "test_r2": m["r2"],
            "train_seconds": seconds, "epochs": epochs}


def mlp(hidden, seed):
    return pykd.MLP([5, *hidden, 1], seed=seed)


def train(work, quick):
    recipe = RECIPES["quick" if quick else "full"]
    with open(os.path.join(work, "truth.json"), encoding="utf-8") as fh:
        K = json.load(fh)["K"]
    X_all, y_all = stencil(read_series(work, "train_X.f64", K)), targets(read_series(work, "train_U.f64", K))
    X_test, y_test = stencil(read_series(work, "test_X.f64", K)), targets(read_series(work, "test_U.f64", K))
    # The last tenth of the training period (in time) is the validation set.
    n_val = (len(X_all) // 10) // K * K
    X, y, X_val, y_val = X_all[:-n_val], y_all[:-n_val], X_all[-n_val:], y_all[-n_val:]
    batch, lr = recipe["batch"], recipe["lr"]
    common = dict(batch_size=batch, lr_schedule="cosine", X_val=X_val, y_val=y_val,
                  progress=False, seed=0)
    records = []

    def save(label, model, seconds, epochs):
        path = os.path.join(work, f"{label}.pykd")
        model.save(path)
        rec = describe(label, model, path, X_test, y_test, seconds, epochs)
        records.append(rec)
        print(f"train.py: {label:16s} {rec['layers']:32s} test RMSE {rec['test_rmse']:.4f}  "
              f"R^2 {rec['test_r2']:.4f}  ({seconds:.1f} s)", flush=True)

    hidden, epochs = recipe["teacher"]
    teacher = mlp(hidden, seed=1)
    t0 = time.perf_counter()
    pykd.fit(teacher, X, y, cfg=pykd.TrainConfig(loss="mse", lr=lr), epochs=epochs, **common)
    save("teacher", teacher, time.perf_counter() - t0, epochs)
    t_out = teacher.forward(X)                      # physical units, (n, 1)

    hidden, epochs = recipe["student"]
    student = mlp(hidden, seed=2)
    t0 = time.perf_counter()
    pykd.fit(student, X, y, cfg=pykd.TrainConfig(loss="mse_kd", alpha=KD_ALPHA, lr=lr),
             teacher_outputs=t_out, epochs=epochs, **common)
    save("student", student, time.perf_counter() - t0, epochs)

    scratch = mlp(hidden, seed=2)
    t0 = time.perf_counter()
    pykd.fit(scratch, X, y, cfg=pykd.TrainConfig(loss="mse", lr=lr), epochs=epochs, **common)
    save("student_scratch", scratch, time.perf_counter() - t0, epochs)

    t0 = time.perf_counter()
    q = pykd.quantize_model(student, "static", calibration=X[:: max(1, len(X) // 20000)])
    save("student_int8", q, time.perf_counter() - t0, 0)

    # Gradual magnitude pruning (Zhu & Gupta) while fine-tuning the distilled
    # student against the teacher: 0 -> 50% over the first two thirds of the
    # steps, the last third recovers; then CSR layers hold the non-zeros.
    t0 = time.perf_counter()
    pruned = student.copy()
    steps = recipe["prune_epochs"] * -(-len(X) // batch)
    end = max(1, 2 * steps // 3)
    sched = pykd.PruneSchedule(PRUNE_SPARSITY, end=end, every=max(1, end // 20))
    pykd.fit(pruned, X, y, cfg=pykd.TrainConfig(loss="mse_kd", alpha=KD_ALPHA, lr=lr / 4),
             teacher_outputs=t_out, epochs=recipe["prune_epochs"], prune=sched, **common)
    pruned = pykd.sparsify(pruned)
    save("student_pruned", pruned, time.perf_counter() - t0, recipe["prune_epochs"])

    # Wilks (2005)'s deterministic closure: a quartic in X_k alone.
    xk = X[:, 2].astype(np.float64)
    coef = np.polynomial.polynomial.polyfit(xk, y[:, 0].astype(np.float64), POLY_DEGREE)
    with open(os.path.join(work, "poly.txt"), "w", encoding="utf-8") as fh:
        fh.write(", ".join(repr(float(c)) for c in coef) + "\n")
    pred = np.polynomial.polynomial.polyval(X_test[:, 2].astype(np.float64), coef)
    m = pykd.regression_metrics(y_test, pred.reshape(-1, 1))
    records.append({"label": "poly", "file": "poly.txt", "layers": f"degree {POLY_DEGREE} in X_k",
                    "parameters": POLY_DEGREE + 1, "nonzeros": POLY_DEGREE + 1,
                    "bytes": 8 * (POLY_DEGREE + 1), "test_rmse": m["rmse"], "test_r2": m["r2"],
                    "train_seconds": None, "epochs": None})
    print(f"train.py: {'poly':16s} {records[-1]['layers']:32s} test RMSE {m['rmse']:.4f}  "
          f"R^2 {m['r2']:.4f}", flush=True)

    info = {"n_train": int(len(X)), "n_val": int(n_val), "n_test": int(len(X_test)),
            "batch_size": batch, "lr": lr, "lr_schedule": "cosine", "kd_alpha": KD_ALPHA,
            "prune_sparsity": PRUNE_SPARSITY, "models": records}
    path = os.path.join(work, "train.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", help="the work directory of run.sh (l96_truth's output)")
    ap.add_argument("--quick", action="store_true", help="small networks, few epochs")
    args = ap.parse_args(argv)
    train(args.work, args.quick)


if __name__ == "__main__":
    main()
