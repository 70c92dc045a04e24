"""pykd.regression_metrics and evaluate() for regression models (issue 14):
hand-computed values, an independent float64 formula, the constant-target
convention and the error messages."""
import math

import numpy as np
import pytest

import pykd
from pykd import MLP, evaluate, regression_metrics

F32 = np.float32


def test_hand_computed_values():
    t = np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]])
    p = np.array([[1.0, 2.0], [2.0, 2.0], [4.0, 2.0]])
    m = regression_metrics(t, p)
    # output 0: residuals 0, 0, 1; sum of squares about the mean 2
    assert m["rmse_per_output"] == pytest.approx([math.sqrt(1 / 3), 0.0])
    assert m["mae_per_output"] == pytest.approx([1 / 3, 0.0])
    # output 1 is constant and predicted exactly: R^2 = 1 (force_finite)
    assert m["r2_per_output"] == [0.5, 1.0]
    assert m["rmse"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert m["mae"] == pytest.approx(1 / 6) and m["r2"] == 0.75
    # a constant target not predicted exactly: R^2 = 0
    p[2, 1] = 3.0
    m = regression_metrics(t, p)
    assert m["r2_per_output"] == [0.5, 0.0] and m["r2"] == 0.25
    assert m["rmse_per_output"][1] == pytest.approx(math.sqrt(1 / 3))


def test_against_an_independent_float64_formula():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((500, 4)) * [1, 10, 100, 0.01] + [0, 5, -3, 1]
    p = (t + rng.standard_normal(t.shape) * [0.1, 3, 50, 0.02]).astype(F32)
    m = regression_metrics(t.astype(F32), p)
    t32 = t.astype(F32).astype(np.float64)
    p64 = p.astype(np.float64)
    for j in range(4):
        r = p64[:, j] - t32[:, j]
        assert m["rmse_per_output"][j] == pytest.approx(math.sqrt(np.mean(r ** 2)), rel=1e-12)
        assert m["mae_per_output"][j] == pytest.approx(np.mean(np.abs(r)), rel=1e-12)
        assert m["r2_per_output"][j] == pytest.approx(1 - np.mean(r ** 2) / np.var(t32[:, j]),
                                                      rel=1e-10)
    assert m["r2"] == pytest.approx(np.mean(m["r2_per_output"]), rel=1e-15)
    # a 1-D pair is one output
    one = regression_metrics(t[:, 0], p[:, 0])
    assert one["rmse_per_output"] == [pytest.approx(m["rmse_per_output"][0])]
    assert regression_metrics(t[:, :1], p[:, 0])["rmse"] == one["rmse"]


def test_bad_arguments():
    t = np.zeros((4, 2))
    with pytest.raises(ValueError, match=r"y_pred has shape \(4, 3\) but y_true has \(4, 2\)"):
        regression_metrics(t, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="y_true is empty"):
        regression_metrics(np.zeros((0, 2)), np.zeros((0, 2)))
    bad = np.zeros((4, 2))
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match=r"y_pred contains NaN or inf \(rows 2\)"):
        regression_metrics(t, bad)
    with pytest.raises(TypeError, match="y_true must be a numeric numpy array"):
        regression_metrics([1, 2], np.zeros(2))


def test_evaluate_a_regression_model():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 4)).astype(F32)
    Y = np.stack([X[:, 0] * 3 + 10, X[:, 1] * X[:, 2]], 1)
    m = MLP([4, 16, 2], seed=0)
    pykd.fit(m, X, Y, cfg=pykd.TrainConfig(loss="mse", lr=3e-3), epochs=3, progress=False)
    res = evaluate(m, X, Y)
    out = m.forward(X).astype(np.float64)
    assert res["task"] == "regression" and res["n"] == 200 and res["teacher_rmse"] is None
    assert res["rmse"] == pytest.approx(np.sqrt(((out - Y) ** 2).mean(0)).mean(), rel=1e-12)
    assert res["parameters"] == m.parameters and res["bytes"] == m.nbytes
    assert set(res) >= {"rmse", "r2", "mae", "rmse_per_output", "r2_per_output",
                        "mae_per_output", "nonzeros"}
    # teacher: a model or its outputs; RMSE between the two models' outputs
    teacher = MLP([4, 8, 2], seed=5, norm=m.norm, out_norm=m.out_norm,
                  metadata={"task": "regression"})
    t_out = teacher.forward(X).astype(np.float64)
    want = np.sqrt(((out - t_out) ** 2).mean(0)).mean()
    assert evaluate(m, X, Y, teacher=teacher)["teacher_rmse"] == pytest.approx(want, rel=1e-12)
    assert evaluate(m, X, Y, teacher=teacher.forward(X))["teacher_rmse"] == pytest.approx(want)
    with pytest.raises(ValueError, match=r"teacher outputs must have shape \(200, 2\)"):
        evaluate(m, X, Y, teacher=np.zeros((200, 3), F32))
    with pytest.raises(TypeError, match="y holds integers"):
        evaluate(m, X, np.zeros((200, 2), np.int64))
    # A compressed regression model too.
    q = pykd.quantize_model(m)
    assert q.task == "regression"
    rq = evaluate(q, X, Y)
    assert rq["task"] == "regression" and abs(rq["rmse"] - res["rmse"]) < 0.1 * res["rmse"] + 0.05


def test_evaluate_a_classifier_says_so():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((50, 3)).astype(F32)
    y = (X[:, 0] > 0).astype(np.int64)
    res = evaluate(MLP([3, 2], seed=0), X, y)
    assert res["task"] == "classification" and "accuracy" in res and "rmse" not in res
