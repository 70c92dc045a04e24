"""``--config FILE.toml`` for every command, done once in the parser.

:func:`install` adds ``--config`` to every subcommand; :func:`prepare`, run
by :func:`pykd.cli.main` before argparse, reads the file named after the
command and makes its values the subcommand's defaults, so the command line
overrides them and a new command gets ``--config`` for free. Keys are the
options' long names with dashes as underscores (``batch_size = 128``,
``hidden = [256, 256]``, ``out = "t.pkd"``; dashes are accepted too); each
value goes through the option's own argparse ``type`` and ``choices`` (a
list for an option that takes several values or a comma-separated list). An
unknown key or a wrong type is a one-line error naming the file and the key.

:func:`effective` is the ``configuration`` block of a ``--report``: the
options as the command saw them, under the same names, itself a valid
config (``pykd CMD --config report.json`` or the block written as TOML with
:func:`to_toml`) that reruns the same job.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os

from ..config import toml_value

__all__ = ["ConfigError", "install", "prepare", "effective", "explicit", "load", "to_toml"]

#: Options that are not configuration: what the file itself cannot set.
_NOT_KEYS = {"help", "config", "version"}
#: The largest config file read (a config is a few lines).
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(Exception):
    """A config file is missing, malformed or has a bad key or value
    (printed as ``pykd CMD: error: FILE: ...``, exit code 2)."""

    def __init__(self, prog, message):
        super().__init__(message)
        self.prog = prog


def _subparsers(parser):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return a.choices
    return {}


def install(parser):
    """Add ``--config FILE.toml`` to every subcommand of ``parser`` (once)."""
    for sub in _subparsers(parser).values():
        if any(a.dest == "config" for a in sub._actions):
            continue
        sub.add_argument("--config", metavar="FILE.toml",
                         help="read options from this TOML file (keys: the long option names "
                              "with dashes as underscores, e.g. batch_size = 128; a --report "
                              "JSON's configuration block works too); the command line "
                              "overrides it")


def _command(parser, argv):
    """(command name, its parser, the arguments after it) or None."""
    choices = _subparsers(parser)
    for i, tok in enumerate(argv):
        if tok == "--":
            return None
        if not tok.startswith("-"):
            return (tok, choices[tok], argv[i + 1:]) if tok in choices else None
    return None


def _option_actions(sub):
    table = {}
    for a in sub._actions:
        for s in a.option_strings:
            table[s] = a
    return table


def _is_number(tok):
    try:
        float(tok)
        return True
    except ValueError:
        return False


def _given(sub, args):
    """The actions the command line sets (exact or unambiguous prefixes, as
    argparse reads them), and the value of --config."""
    table = _option_actions(sub)
    given, config, i = [], None, 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            break
        if tok.startswith("-") and len(tok) > 1 and not _is_number(tok):
            name, eq, value = tok.partition("=")
            action = table.get(name)
            if action is None and name.startswith("--"):
                hits = {a for s, a in table.items() if s.startswith(name)}
                action = hits.pop() if len(hits) == 1 else None
            if action is None and not name.startswith("--") and len(name) > 2:
                action = table.get(name[:2])           # -T5
                eq = eq or "x"
            if action is not None:
                given.append(action)
                if action.dest == "config":
                    if eq:
                        config = value
                    elif i + 1 < len(args):
                        config = args[i + 1]
                if action.nargs != 0 and not eq:
                    i += 1
        i += 1
    return given, config


def load(path, prog="pykd"):
    """The ``{key: value}`` of a TOML config file (or a JSON object / a
    ``--report`` JSON's ``configuration`` block, for a ``.json`` file)."""
    name = os.fspath(path)
    if os.path.isdir(name):
        raise ConfigError(prog, f"{name}: the config file is a directory")
    if os.path.exists(name) and not os.path.isfile(name):
        raise ConfigError(prog, f"{name}: the config file is not a regular file")
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(prog, f"config file {name} does not exist") from None
    except OSError as e:
        raise ConfigError(prog, f"{name}: cannot read the config file "
                                f"({e.strerror or e})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(prog, f"{name}: the config file is over {MAX_CONFIG_BYTES} bytes")
    if name.lower().endswith(".json"):
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ConfigError(prog, f"{name}: not valid JSON ({e})") from None
        if isinstance(obj, dict) and isinstance(obj.get("configuration"), dict):
            obj = obj["configuration"]              # a --report file
        if not isinstance(obj, dict):
            raise ConfigError(prog, f"{name}: a JSON config must be an object")
        return obj
    try:
        import tomllib
    except ModuleNotFoundError:                     # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(prog, f"{name}: not valid TOML ({' '.join(str(e).split())})") \
            from None


def _type_name(action):
    t = action.type
    return getattr(t, "__name__", "") if t is not None else "str"


def _typed(action, text):
    try:
        v = action.type(text) if action.type is not None else text
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None
    except (TypeError, ValueError):
        raise ValueError(f"invalid {_type_name(action)} value: {text!r}") from None
    if action.choices is not None and v not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}, got {v!r}")
    return v


def _convert_one(action, value):
    """One TOML value through the option's type and choices."""
    tname = _type_name(action)
    if isinstance(value, bool):
        raise ValueError(f"expected {'a number' if tname in ('int', 'float') else 'a string'}, "
                         f"got {str(value).lower()}")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a single value, got {type(value).__name__}")
    if tname in ("int", "float"):
        if isinstance(value, str):
            raise ValueError(f"expected a number, got the string {value!r}")
        if tname == "int" and isinstance(value, float):
            raise ValueError(f"expected an integer, got {value!r}")
        text = repr(value)
    elif isinstance(value, str):
        text = value
    elif action.type is None:
        raise ValueError(f"expected a string, got {value!r}")
    else:
        text = str(value)
    return _typed(action, text)


def _convert(action, value):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"expected a count >= 0, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) \
        or isinstance(action, argparse._AppendAction)
    if many:
        return [_convert_one(action, v) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list):               # a comma-separated option: hidden = [256, 256]
        if any(isinstance(v, (bool, list, dict)) for v in value):
            raise ValueError("expected a list of numbers or strings")
        if action.type is None and action.choices is None:
            raise ValueError(f"expected a string, got a list {value!r}")
        return _typed(action, ",".join(repr(v) if isinstance(v, float) else str(v)
                                       for v in value))
    return _convert_one(action, value)


def prepare(parser, argv):
    """Apply ``--config FILE`` of the command in ``argv`` to its subparser.

    The file's values become the subparser's defaults (options it sets are
    no longer required); an option given on the command line keeps the
    command line's value, and so does a mutually exclusive alternative of
    it. Raises :class:`ConfigError` for a missing or malformed file, an
    unknown key, a wrong type or a value the option refuses.
    """
    found = _command(parser, argv)
    if found is None:
        return
    name, sub, rest = found
    prog = f"pykd {name}"
    given, path = _given(sub, rest)
    if path is None:
        return
    values = load(path, prog)
    by_dest = {a.dest: a for a in sub._actions
               if a.dest not in _NOT_KEYS and a.dest != argparse.SUPPRESS
               and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))}
    converted = {}
    for key, value in values.items():
        dest = key.replace("-", "_")
        action = by_dest.get(dest)
        if action is None:
            if dest in _NOT_KEYS:
                raise ConfigError(prog, f"{path}: key {key!r} cannot be set in a config file")
            close = difflib.get_close_matches(dest, list(by_dest), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (see {prog} --help)"
            raise ConfigError(prog, f"{path}: unknown key {key!r} for {prog}{hint}")
        if dest in converted:
            raise ConfigError(prog, f"{path}: key {key!r} is given twice")
        try:
            converted[dest] = _convert(action, value)
        except ValueError as e:
            raise ConfigError(prog, f"{path}: key {key!r}: {' '.join(str(e).split())}") \
                from None
    given_dests = {a.dest for a in given}
    for group in sub._mutually_exclusive_groups:
        members = [a.dest for a in group._group_actions]
        in_file = [d for d in members if d in converted]
        if len(in_file) > 1:
            raise ConfigError(prog, f"{path}: keys {', '.join(map(repr, in_file))} are "
                                    "alternatives; give one")
        if any(d in given_dests for d in members):
            for d in in_file:
                if d not in given_dests:
                    del converted[d]            # the command line chose another one
        elif in_file:
            group.required = False
    for dest in converted:
        action = by_dest[dest]
        action.required = False
        if not action.option_strings and action.nargs is None:
            action.nargs = "?"                  # a positional the file gives
    sub.set_defaults(**converted)
    sub._pykd_config_dests = set(converted)


def explicit(parser, argv):
    """The options (dests) that ``argv`` or its ``--config`` file set
    explicitly (after :func:`prepare`), as opposed to defaults: a command
    refuses an option that has no effect only when it was given."""
    found = _command(parser, argv)
    if found is None:
        return set()
    _, sub, rest = found
    given, _ = _given(sub, rest)
    return {a.dest for a in given} | set(getattr(sub, "_pykd_config_dests", ()))


def _plain(v):
    import numpy as np
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return str(v)


def effective(parser, args):
    """The options of the parsed command, ``{name: value}`` under the config
    keys (None values left out: TOML has no null, and absent means the
    default); None if ``args`` has no command."""
    sub = _subparsers(parser).get(getattr(args, "command", None))
    if sub is None:
        return None
    out = {}
    for a in sub._actions:
        if a.dest in _NOT_KEYS or a.dest in (argparse.SUPPRESS, "debug") \
                or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        v = getattr(args, a.dest, None)
        if v is not None:
            out[a.dest] = _plain(v)
    return out


def to_toml(config):
    """A flat ``{key: value}`` (a ``configuration`` block) as TOML text."""
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in config.items())
