"""pykd.RunConfig: every run setting of fit in one object (issue 17).

It checks its values on construction with fit's own messages, round-trips
losslessly through dict, JSON and TOML (read back by tomllib, independently
of our writer), and fit(config=...) trains the same bits as the keywords,
with an explicit keyword overriding the config. A checkpoint written by the
pykd before RunConfig (tests/data/checkpoint-0c39b89.npz) still resumes.
"""
import json
import os
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    import tomllib
except ModuleNotFoundError:           # Python 3.10
    import tomli as tomllib

import pykd
from pykd import MLP, PruneSchedule, RunConfig, TrainConfig, fit

DATA = pathlib.Path(__file__).parent / "data"


def _data(n=40, f=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    X = (np.eye(c, f)[y] + 0.3 * rng.standard_normal((n, f))).astype(np.float32)
    return X, y.astype(np.int64)


CONFIGS = [
    RunConfig(),
    RunConfig(step=TrainConfig(loss="kd", temperature=4.0, alpha=0.25, lr=3e-3, dropout=0.1,
                               seed=7), epochs=12, batch_size=128, lr_decay=0.9, seed=5),
    RunConfig(step=TrainConfig(optimizer="sgd", momentum=0.5, weight_decay=1e-4),
              lr_schedule="cosine", backend="numpy", norm="per_feature"),
    RunConfig(epochs=0, lr_schedule="exponential", lr_decay=0.95, norm="auto",
              prune=PruneSchedule(0.9, initial=0.1, begin=3, every=7, scope="layer")),
    RunConfig(prune=PruneSchedule(0.5, end=40), step=TrainConfig(hint_layer=1, hint_weight=0.5)),
]


# ------------------------------------------------------------- round trips

@pytest.mark.parametrize("rc", CONFIGS)
def test_round_trips(rc, tmp_path):
    assert RunConfig.from_dict(rc.to_dict()) == rc
    assert RunConfig.from_json(rc.to_json()) == rc
    assert RunConfig.from_toml(rc.to_toml()) == rc
    for name in ("run.toml", "run.json"):
        rc.save(tmp_path / name)
        assert RunConfig.load(tmp_path / name) == rc
    assert sorted(os.listdir(tmp_path)) == ["run.json", "run.toml"]    # no temp files left
    # Equal configs give equal text, and a second trip changes nothing.
    assert RunConfig.from_toml(rc.to_toml()).to_toml() == rc.to_toml()


@pytest.mark.parametrize("rc", CONFIGS)
def test_toml_text_is_what_tomllib_reads(rc):
    """Our TOML writer checked by the standard reader: the same values, with
    None (TOML has no null) left out."""
    want = {k: v for k, v in rc.to_dict().items() if v is not None}
    want["step"] = dict(rc.to_dict()["step"])
    if rc.prune is not None:
        want["prune"] = {k: v for k, v in rc.prune.to_dict().items() if v is not None}
    assert tomllib.loads(rc.to_toml()) == want
    assert json.loads(rc.to_json()) == rc.to_dict()


def test_dict_holds_every_field_and_the_step_names():
    d = RunConfig().to_dict()
    assert list(d) == ["step", "epochs", "batch_size", "lr_schedule", "lr_decay", "seed",
                       "backend", "norm", "prune"]
    assert d["step"] == {k: getattr(TrainConfig(), k) for k in d["step"]}
    assert d["epochs"] == 1 and d["batch_size"] == 64 and d["backend"] == "fortran"


floats = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(lr=floats, decay=floats, epochs=st.integers(0, 10**6), batch=st.integers(1, 10**6),
       seed=st.one_of(st.none(), st.integers(0, 2**63 - 1)), wd=floats,
       norm=st.sampled_from([None, "auto", "scalar", "per_feature", "none"]))
def test_round_trip_any_values(lr, decay, epochs, batch, seed, wd, norm):
    """Floats survive TOML and JSON bit for bit (repr round-trips)."""
    rc = RunConfig(step=TrainConfig(lr=lr, weight_decay=wd), epochs=epochs, batch_size=batch,
                   lr_decay=decay, seed=seed, norm=norm)
    for back in (RunConfig.from_toml(rc.to_toml()), RunConfig.from_json(rc.to_json())):
        assert back == rc
        assert back.step.lr.hex() == rc.step.lr.hex() and back.lr_decay.hex() == decay.hex()


def test_partial_dicts_take_the_defaults():
    rc = RunConfig.from_toml('epochs = 3\n[step]\nlr = 0.01\n')
    assert rc == RunConfig(step=TrainConfig(lr=0.01), epochs=3)
    assert RunConfig.from_dict({}) == RunConfig()
    assert RunConfig.from_dict({"seed": None, "prune": None}) == RunConfig()
    assert isinstance(RunConfig.from_toml("[step]\nlr = 1\n").step.lr, float)


# ------------------------------------------------------------------ errors

@pytest.mark.parametrize("text, message", [
    ("epoch = 3\n", "RunConfig: unknown key 'epoch'; the valid keys are step, epochs, "
                    "batch_size, lr_schedule, lr_decay, seed, backend, norm, prune"),
    ("[step]\nlearning_rate = 0.1\n", "RunConfig.step: unknown key 'learning_rate'; the valid "
                                      "keys are loss, temperature, alpha"),
    ("[prune]\nfinal = 0.5\nstart = 2\n", "RunConfig.prune: unknown key 'start'; the valid keys "
                                          "are final, initial, begin, end, every, scope"),
])
def test_unknown_keys_name_the_key_and_the_valid_ones(text, message):
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.")):
        RunConfig.from_toml(text)


@pytest.mark.parametrize("d, exc, message", [
    ({"epochs": "3"}, TypeError, "RunConfig.epochs must be an integer, got str '3'"),
    ({"epochs": 3.0}, TypeError, "RunConfig.epochs must be an integer, got float"),
    ({"batch_size": True}, TypeError, "RunConfig.batch_size must be an integer, got a boolean"),
    ({"lr_decay": "0.9"}, TypeError, "RunConfig.lr_decay must be a number"),
    ({"backend": 1}, TypeError, "RunConfig.backend must be a string"),
    ({"step": {"lr": "fast"}}, TypeError, "RunConfig.step.lr must be a number, got str"),
    ({"step": {"hint_layer": 1.5}}, TypeError, "RunConfig.step.hint_layer must be an integer"),
    ({"step": 3}, TypeError, r"RunConfig.step must be a dict \(a table\), got int"),
    ({"prune": {"every": 5}}, TypeError, "RunConfig.prune: .*final"),
    ({"prune": {"final": 0.5, "end": "x"}}, TypeError, "RunConfig.prune.end must be an integer"),
    ({"step": {"lr": -1.0}}, ValueError, "lr, weight_decay and momentum must be >= 0"),
    ({"step": {"loss": "ce", "temperature": 3.0}}, ValueError, "temperature=3.0 has no effect"),
    ({"backend": "cuda"}, ValueError, "backend must be 'fortran' or 'numpy', got 'cuda'"),
    ({"norm": "minmax"}, ValueError, "norm must be None or one of 'auto', 'scalar', "
                                     "'per_feature', 'none', got 'minmax'"),
])
def test_bad_values_name_the_key(d, exc, message):
    with pytest.raises(exc, match=message):
        RunConfig.from_dict(d)


@pytest.mark.parametrize("kw, exc, message", [
    ({"epochs": -1}, ValueError, "epochs must be >= 0, got -1"),
    ({"epochs": 1.5}, TypeError, "epochs must be an integer, got float"),
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1, got 0"),
    ({"batch_size": True}, TypeError, "batch_size must be an integer"),
    ({"lr_decay": 0.0}, ValueError, r"lr_decay must be in \(0, 1\], got 0.0"),
    ({"lr_decay": 1.5}, ValueError, r"lr_decay must be in \(0, 1\], got 1.5"),
    ({"lr_schedule": "step"}, ValueError, "lr_schedule must be one of 'constant', "
                                          "'exponential', 'cosine', got 'step'"),
    ({"lr_schedule": "cosine", "lr_decay": 0.9}, ValueError,
     "lr_decay=0.9 is the factor of lr_schedule='exponential', but lr_schedule='cosine'"),
    ({"backend": "gpu"}, ValueError, "backend must be 'fortran' or 'numpy', got 'gpu'"),
    ({"seed": -3}, ValueError, "seed must be >= 0, got -3"),
    ({"prune": 0.5}, TypeError, "prune must be a pykd.PruneSchedule or None, got float"),
])
def test_construction_checks_with_the_messages_of_fit(kw, exc, message):
    with pytest.raises(exc, match=message) as from_config:
        RunConfig(**kw)
    X, y = _data()
    with pytest.raises(exc, match=message) as from_fit:
        fit(MLP([6, 4, 3]), X, y, progress=False, **kw)
    assert str(from_fit.value) == str(from_config.value)


def test_config_type_and_replace():
    X, y = _data()
    with pytest.raises(TypeError, match="config must be a pykd.RunConfig or None, got dict"):
        fit(MLP([6, 4, 3]), X, y, config={"epochs": 2}, progress=False)
    with pytest.raises(TypeError, match="step \\(cfg\\) must be a pykd.TrainConfig, got dict"):
        RunConfig(step={"lr": 0.1})
    rc = RunConfig(epochs=3)
    with pytest.raises(AttributeError):
        rc.epochs = 4                               # frozen: derive with replace
    assert rc.replace(epochs=4).epochs == 4 and rc.epochs == 3
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        rc.replace(epochs=-2)


def test_files(tmp_path):
    rc = CONFIGS[1]
    with pytest.raises(ValueError, match=r"run.yaml: a RunConfig file must end in .toml or .json"):
        rc.save(tmp_path / "run.yaml")
    with pytest.raises(FileNotFoundError):
        RunConfig.load(tmp_path / "absent.toml")
    with pytest.raises(ValueError, match="config file is a directory"):
        RunConfig.load(_dir(tmp_path / "d.toml"))
    (tmp_path / "bad.toml").write_text("epochs = = 3\n")
    with pytest.raises(ValueError, match=r"bad.toml: not valid TOML"):
        RunConfig.load(tmp_path / "bad.toml")
    (tmp_path / "bad.json").write_text('{"epochs": NaN}')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        RunConfig.load(tmp_path / "bad.json")
    (tmp_path / "key.toml").write_text("[step]\nlrr = 1.0\n")
    with pytest.raises(ValueError, match=r"key.toml.step: unknown key 'lrr'"):
        RunConfig.load(tmp_path / "key.toml")
    # Saving over a file replaces it whole.
    (tmp_path / "r.toml").write_text("x" * 10000)
    rc.save(tmp_path / "r.toml")
    assert RunConfig.load(tmp_path / "r.toml") == rc


def _dir(p):
    p.mkdir()
    return p


# -------------------------------------------------------------------- fit

@pytest.mark.fortran
def test_fit_with_a_config_trains_the_same_bits_as_the_keywords():
    X, y = _data()
    step = TrainConfig(lr=1e-2, seed=3, dropout=0.2)
    a, b, c = MLP([6, 5, 3], seed=1), MLP([6, 5, 3], seed=1), MLP([6, 5, 3], seed=1)
    ha = fit(a, X, y, cfg=step, epochs=3, batch_size=16, lr_decay=0.8, seed=9, progress=False)
    rc = RunConfig(step=step, epochs=3, batch_size=16, lr_decay=0.8, seed=9)
    hb = fit(b, X, y, config=RunConfig.from_toml(rc.to_toml()), progress=False)
    assert np.array_equal(a.params, b.params) and ha["loss"] == hb["loss"]
    # Explicit keywords override the config's values.
    other = RunConfig(step=TrainConfig(lr=5.0), epochs=7, batch_size=3, lr_decay=0.5, seed=1,
                      backend="numpy")
    hc = fit(c, X, y, config=other, cfg=step, epochs=3, batch_size=16, lr_decay=0.8, seed=9,
             backend="fortran", progress=False)
    assert np.array_equal(a.params, c.params) and hc["lr"] == ha["lr"]


@pytest.mark.fortran
def test_no_config_keeps_the_old_defaults():
    X, y = _data()
    a, b = MLP([6, 5, 3], seed=1), MLP([6, 5, 3], seed=1)
    ha = fit(a, X, y, progress=False)
    hb = fit(b, X, y, config=RunConfig(epochs=1, batch_size=64, lr_decay=1.0,
                                       lr_schedule="constant", backend="fortran", seed=0),
             progress=False)
    assert np.array_equal(a.params, b.params)
    assert ha["epoch"] == [1] and ha["lr"] == [TrainConfig().lr]


@pytest.mark.fortran
def test_a_checkpoint_of_the_pykd_before_runconfig_resumes(tmp_path):
    """tests/data/checkpoint-0c39b89.npz: epoch 1 of 3 of this run, written by
    pykd at commit 0c39b89 (fit with keywords, before RunConfig). Resuming it
    through a RunConfig ends at the bits of an uninterrupted run."""
    X, y = _data()
    step = TrainConfig(seed=3, lr=1e-2)
    straight = MLP([6, 5, 3], seed=1)
    fit(straight, X, y, config=RunConfig(step=step, epochs=3, batch_size=16, lr_decay=0.9),
        progress=False)
    ckpt = tmp_path / "c.npz"
    ckpt.write_bytes((DATA / "checkpoint-0c39b89.npz").read_bytes())
    m = MLP([6, 5, 3], seed=1)
    hist = fit(m, X, y, config=RunConfig(step=step, epochs=3, batch_size=16, lr_decay=0.9),
               checkpoint=ckpt, resume=True, progress=False)
    assert hist["epoch"] == [1, 2, 3]
    assert np.array_equal(m.params, straight.params)
    # The fingerprint written now is the one written then.
    _, old = pykd.train.load_checkpoint(DATA / "checkpoint-0c39b89.npz")
    _, new = pykd.train.load_checkpoint(ckpt)
    assert new["fingerprint"] == old["fingerprint"]


def test_the_documented_toml_example_reads(tmp_path, monkeypatch):
    """docs/config.md's TOML example is a valid RunConfig (and its Python block runs)."""
    text = (pathlib.Path(__file__).parent.parent / "docs" / "config.md").read_text()
    toml_block = text.split("```toml\n")[1].split("```")[0]
    rc = RunConfig.from_toml(toml_block)
    assert rc.epochs == 20 and rc.step.loss == "kd" and rc.prune.final == 0.9
    assert rc.schedule == "exponential" and rc.shuffle_seed == 1
    monkeypatch.chdir(tmp_path)
    for block in text.split("```python\n")[1:]:
        exec(compile(block.split("```")[0], "docs/config.md", "exec"), {})
    assert RunConfig.load("run.toml").schedule == "cosine"
