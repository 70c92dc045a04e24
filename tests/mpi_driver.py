"""Scenarios run under ``mpirun`` (or alone, as one process) by tests/test_mpi.py.

    python mpi_driver.py SCENARIO OUTDIR

Every rank writes ``OUTDIR/SCENARIO.rank<R>.npz`` with what it holds, so
the test can compare the ranks' bits and a one-process run.
"""
import os
import sys
import time

import numpy as np

import pykd
from pykd import distributed
from pykd.train import fit

SIZES = [12, 16, 10, 4]


def data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, SIZES[0])).astype(np.float32)
    y = (X[:, :2].sum(axis=1) > 0).astype(np.int64) + 2 * (X[:, 2] > 0)
    t = (rng.standard_normal((n, SIZES[-1])) * 2).astype(np.float32)
    h = rng.standard_normal((n, 6)).astype(np.float32)
    return X, y, t, h


def comm():
    if distributed.launched_by_mpi() is None:
        return None
    from mpi4py import MPI
    return MPI.COMM_WORLD


def rank():
    c = comm()
    return 0 if c is None else c.Get_rank()


def cases():
    """name -> fit keyword arguments; batch 13 of 96 rows: a last batch of 5
    rows, shares of 6 and 7 on 2 ranks."""
    X, y, t, h = data()
    sgd = pykd.TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9)
    return {
        # 8 batches per epoch: 24 steps
        "sgd": dict(cfg=sgd, epochs=3, batch_size=13),
        "adam": dict(cfg=pykd.TrainConfig(lr=3e-3), epochs=3, batch_size=13),
        "kd-dropout-hint": dict(
            cfg=pykd.TrainConfig(loss="kd", dropout=0.3, seed=4, hint_layer=1,
                                 hint_weight=0.5),
            epochs=2, batch_size=13, teacher_logits=t, hint_targets=h),
        "prune": dict(cfg=sgd, epochs=2, batch_size=13,
                      prune=pykd.PruneSchedule(0.5, begin=0, end=12, every=4)),
        # regression (float targets, per-feature and per-output normalisation)
        "mse": dict(cfg=pykd.TrainConfig(loss="mse", optimizer="sgd", lr=0.02), epochs=2,
                    batch_size=13, y=np.ascontiguousarray(X[:, :4] * 2 + 1)),
        # an on_epoch callback that stops after epoch 2 on rank 0 only: rank
        # 0's decision is every rank's
        "stop": dict(cfg=sgd, epochs=4, batch_size=13,
                     on_epoch=lambda state: state.epoch >= 2 and rank() == 0),
    }


def train(**kw):
    X, y, _, _ = data()
    y = kw.pop("y", y)
    model = pykd.MLP(SIZES, seed=1)
    losses = []
    kw.setdefault("progress", False)
    hist = fit(model, X, y, comm=comm(), callback=lambda d: losses.append(d["loss"]), **kw)
    return model, hist, np.array(losses)


def scenario_fit(out):
    """Every case of cases(); then one epoch of Adam with a checkpoint
    (written by rank 0) and a resume to three epochs."""
    res = {}
    for name, kw in cases().items():
        model, hist, losses = train(**kw)
        res[f"{name}.params"] = model.params
        res[f"{name}.losses"] = losses
        res[f"{name}.acc"] = np.array([np.nan if v is None else v    # None: regression
                                       for v in hist["train_accuracy"]], np.float64)
    kw = cases()["adam"]
    ckpt = os.path.join(out, "resume.ckpt.npz")
    train(**{**kw, "epochs": 1, "checkpoint": ckpt})
    resumed, hist, _ = train(**{**kw, "checkpoint": ckpt, "resume": True})
    res["resumed.params"] = resumed.params
    res["resumed.epochs"] = np.array(hist["epoch"])
    return res


def scenario_raise(out):
    """Rank 1 raises in its callback at step 3: the job must stop at once."""
    X, y, _, _ = data()

    def callback(d):
        if rank() == 1 and d["step"] == 3:
            raise RuntimeError("rank one fails on purpose")
    fit(pykd.MLP(SIZES, seed=1), X, y, epochs=50, batch_size=8, progress=False,
        callback=callback, comm=comm())
    return {}


def scenario_timeout(out):
    """Rank 1 stalls before its second step; the others time out after 1 s."""
    X, y, _, _ = data()

    def callback(d):
        if rank() == 1 and d["step"] == 1:
            time.sleep(30)
    c = distributed.Comm(comm(), timeout=1.0)
    fit(pykd.MLP(SIZES, seed=1), X, y, epochs=5, batch_size=8, progress=False,
        callback=callback, comm=c)
    return {}


def scenario_errors(out):
    """A bad argument on rank 1 only (every rank raises its error), then
    rank 1 starting from other weights (every rank sees the checksums
    differ); each rank prints what it caught."""
    X, y, _, _ = data()
    try:
        fit(pykd.MLP(SIZES, seed=1), X, y, epochs=1, batch_size=0 if rank() == 1 else 8,
            progress=False, comm=comm())
    except ValueError as e:
        sys.stderr.write(f"rank {rank()}: ValueError: {e}\n")      # one write: no interleaving
        sys.stderr.flush()
    try:
        fit(pykd.MLP(SIZES, seed=1 + rank()), X, y, epochs=1, batch_size=8, progress=False,
            comm=comm())
    except distributed.RanksDivergedError as e:
        sys.stderr.write(f"rank {rank()}: RanksDivergedError: {e}\n")
        sys.stderr.flush()
    comm().Barrier()              # both have printed before either exits
    sys.exit(2)


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    res = globals()[f"scenario_{scenario}"](out)
    np.savez(os.path.join(out, f"{scenario}.rank{rank()}.npz"), **res)


if __name__ == "__main__":
    main()
