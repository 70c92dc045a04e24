"""``--config FILE.toml`` on every command, the report's configuration block,
and ``--report -``."""
import argparse
import json
import os

import numpy as np
import pytest

from pykd import Model
from pykd.cli import build_parser, main
from pykd.cli import config as cfg
from pykd.layers import Dense

F32 = np.float32


def _parse(argv):
    parser = build_parser()
    cfg.prepare(parser, argv)
    return parser, parser.parse_args(argv)


def _write(path, text):
    path.write_text(text)
    return str(path)


def _commands():
    parser = build_parser()
    return {name: sub for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for name, sub in a.choices.items()}


def _accepted(action):
    """A value the option's type accepts."""
    for text in ("x.file", "1", "0.5", "0", "relu"):
        try:
            if action.type is None or action.type(text) is not None:
                return text
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            pass
    raise AssertionError(f"no test value for {action.dest}")


def _minimal_argv(name, sub):
    """The command with a value for every required option (positionals too)."""
    argv = [name]
    for a in sub._actions:
        required = a.required or any(a in g._group_actions[:1] and g.required
                                     for g in sub._mutually_exclusive_groups)
        if not required:
            continue
        value = str(sorted(a.choices)[0]) if a.choices else _accepted(a)
        argv += [value] if not a.option_strings else [a.option_strings[-1], value]
    return argv


def test_every_command_has_config():
    for name, sub in _commands().items():
        assert any(a.dest == "config" for a in sub._actions), name


@pytest.mark.parametrize("name", sorted(_commands()))
def test_configuration_block_reruns_every_command(tmp_path, name):
    """effective(args) written as TOML and read back with --config alone
    gives the same options, for every command (new ones included)."""
    sub = _commands()[name]
    argv = _minimal_argv(name, sub)
    parser, args = _parse(argv)
    block = cfg.effective(parser, args)
    assert "config" not in block and "help" not in block
    path = _write(tmp_path / "c.toml", cfg.to_toml(block))
    parser2, args2 = _parse([name, "--config", path])
    assert cfg.effective(parser2, args2) == block
    # and straight from a report's JSON
    (tmp_path / "r.json").write_text(json.dumps({"command": name, "configuration": block}))
    parser3, args3 = _parse([name, "--config", str(tmp_path / "r.json")])
    assert cfg.effective(parser3, args3) == block


def test_values_types_and_overrides(tmp_path):
    path = _write(tmp_path / "t.toml", 'hidden = [256, 128]\nbatch_size = 128\n'
                  'out = "t.pkd"\nlr = 0.01\noptimizer = "sgd"\nquiet = true\n'
                  'weight-decay = 1e-4\n')
    _, a = _parse(["train-teacher", "--config", path])
    assert (a.hidden, a.batch_size, a.out, a.lr, a.optimizer, a.quiet, a.weight_decay) == \
        ([256, 128], 128, "t.pkd", 0.01, "sgd", True, 1e-4)
    _, a = _parse(["train-teacher", "--config", path, "--batch-size", "32", "--hidden", "8",
                   "--optim", "adam"])
    assert (a.batch_size, a.hidden, a.optimizer, a.out) == (32, [8], "adam", "t.pkd")
    _, a = _parse(["train-teacher", f"--config={path}", "--batch-size=16"])
    assert a.batch_size == 16 and a.lr == 0.01
    _, a = _parse(["distill", "--config", path, "--teacher", "t.pykd", "-T", "3"])
    assert a.temperature == 3 and a.hidden == [256, 128]


def test_config_satisfies_required_and_cli_picks_alternative(tmp_path):
    path = _write(tmp_path / "i.toml", 'onnx = "a.onnx"\nout = "m.pykd"\n')
    _, a = _parse(["import", "--config", path])
    assert (a.onnx, a.npz, a.out) == ("a.onnx", None, "m.pykd")
    _, a = _parse(["import", "--config", path, "--npz", "w.npz"])
    assert (a.onnx, a.npz) == (None, "w.npz")           # the command line chose
    _, a = _parse(["info", "--config", _write(tmp_path / "p.toml", 'model = "m.pykd"\n')])
    assert a.model == "m.pykd"
    _, a = _parse(["info", "--config", str(tmp_path / "p.toml"), "other.pykd"])
    assert a.model == "other.pykd"


@pytest.mark.parametrize("text,match", [
    ("batch_sise = 3\n", "unknown key 'batch_sise' for pykd train-teacher; did you mean "
                         "'batch_size'"),
    ("nonsense_key = 3\n", "unknown key 'nonsense_key'"),
    ('batch_size = "128"\n', "key 'batch_size': expected a number, got the string"),
    ("batch_size = 1.5\n", "key 'batch_size': expected an integer"),
    ("batch_size = 0\n", "key 'batch_size': must be >= 1"),
    ("batch_size = true\n", "key 'batch_size': expected a number"),
    ('optimizer = "adagrad"\n', "key 'optimizer': must be one of adam, sgd"),
    ("resume = 1\n", "key 'resume': expected true or false"),
    ("out = 3\n", "key 'out': expected a string"),
    ('hidden = [1, "a"]\n', "key 'hidden': expected comma-separated layer widths"),
    ('config = "x.toml"\n', "key 'config' cannot be set"),
    ("lr = [1, 2]\n", "key 'lr'"),
    ("batch_size = [3\n", "not valid TOML"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, text, match):
    path = _write(tmp_path / "bad.toml", text)
    assert main(["train-teacher", "--config", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pykd train-teacher: error: ")
    assert path in err and match in err


def test_missing_config_and_alternatives(tmp_path, capsys):
    assert main(["predict", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "config file" in capsys.readouterr().err
    path = _write(tmp_path / "both.toml", 'onnx = "a"\nnpz = "b"\nout = "m"\n')
    assert main(["import", "--config", path]) == 2
    assert "'onnx', 'npz' are alternatives" in capsys.readouterr().err


@pytest.fixture
def model_and_data(tmp_path):
    rng = np.random.default_rng(0)
    m = Model([Dense(rng.standard_normal((6, 3)).astype(F32), np.zeros(3, F32), "tanh")])
    m.save(tmp_path / "m.pykd")
    X = rng.standard_normal((40, 6)).astype(F32)
    np.save(tmp_path / "X.npy", X)
    return m, X


def test_report_configuration_reruns_the_job(tmp_path, model_and_data, monkeypatch):
    m, X = model_and_data
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "p.toml", 'model = "m.pykd"\ndata = "X.npy"\nout = "Y.npy"\n'
                  'batch_size = 9\n')
    assert main(["predict", "--config", path, "--labels", "--report", "r1.json"]) == 0
    rep = json.loads((tmp_path / "r1.json").read_text())
    conf = rep["configuration"]
    assert conf["batch_size"] == 9 and conf["labels"] is True and conf["model"] == "m.pykd"
    first = np.load(tmp_path / "Y.npy")
    os.remove(tmp_path / "Y.npy")
    conf["report"] = "r2.json"
    _write(tmp_path / "again.toml", cfg.to_toml(conf))
    assert main(["predict", "--config", "again.toml"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "Y.npy"), first)
    assert json.loads((tmp_path / "r2.json").read_text())["configuration"] == conf
    np.testing.assert_array_equal(first, m.forward(X).argmax(1))


def test_report_dash_goes_to_stdout(tmp_path, model_and_data, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--model", "m.pykd", "--data", "X.npy", "--out", "Y.npy",
                 "--report", "-"]) == 0
    out = capsys.readouterr()
    assert not os.path.exists(tmp_path / "-")
    rep = json.loads(out.out)                       # the JSON alone on stdout
    assert rep["command"] == "predict" and rep["configuration"]["report"] == "-"
    assert "predict: 40 rows" in out.err


def test_to_toml_round_trip():
    import tomllib
    d = {"a": 1, "b": 2.5e-7, "c": "x \"y\" \\ é", "d": [1, 2], "e": True, "f": [],
         "g": ["relu", "tanh"]}
    assert tomllib.loads(cfg.to_toml(d)) == d
