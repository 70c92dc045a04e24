"""One object for every serialisable setting of a :func:`pykd.fit` run.

:class:`RunConfig` holds the per-step :class:`~pykd.TrainConfig` (``step``)
and the run around it: epochs, batch size, the learning-rate schedule, the
shuffling seed, the backend, the regression normalisation and the pruning
schedule. It is checked when it is made (with the messages of ``fit``) and
round-trips losslessly through a dict, JSON and TOML (docs/config.md)::

    rc = pykd.RunConfig(step=pykd.TrainConfig(lr=3e-3), epochs=20, batch_size=128)
    rc.save("run.toml")
    pykd.fit(model, X, y, config=pykd.RunConfig.load("run.toml"), epochs=5)

A keyword given to ``fit`` explicitly overrides the config's value.
What is not a setting of the run (data, checkpoint path, progress, mask,
callbacks) stays an argument of ``fit``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field, fields

from . import _validate as check
from . import io as _io
from ._step import TrainConfig

__all__ = ["RunConfig"]

#: The backends of fit.
BACKENDS = ("fortran", "numpy")
#: The learning-rate schedules of fit (``lr_schedule``).
LR_SCHEDULES = ("constant", "exponential", "cosine")
#: The normalisation choices of fit (``norm``); None is "auto".
NORMS = ("auto", "scalar", "per_feature", "none")
#: The largest config file :meth:`RunConfig.load` reads.
MAX_CONFIG_BYTES = 1 << 20
#: Suffixes :meth:`RunConfig.save` and :meth:`RunConfig.load` know.
SUFFIXES = (".toml", ".json")


def _prune_cls():
    from .compress.prune import PruneSchedule      # late: compress imports train
    return PruneSchedule


@dataclass(frozen=True)
class RunConfig:
    """Every serialisable setting of a :func:`pykd.fit` run.

    Parameters
    ----------
    step : TrainConfig
        The per-step settings: loss, optimizer, learning rate, dropout, hint.
    epochs : int >= 0
    batch_size : int >= 1
    lr_schedule : {None, "constant", "exponential", "cosine"}
        None: "exponential" if ``lr_decay != 1``, else "constant"
        (:attr:`schedule` gives the resolved name).
    lr_decay : float in (0, 1]
        The factor of the exponential schedule; another value with a
        non-exponential ``lr_schedule`` is an error.
    seed : int >= 0, optional
        The shuffling seed; None uses ``step.seed``.
    backend : {"fortran", "numpy"}
    norm : {None, "auto", "scalar", "per_feature", "none"}
        How fit normalises a regression model's inputs and targets when the
        model has no normalisation yet (docs/regression.md); None is "auto".
    prune : pykd.PruneSchedule, optional
        Gradual magnitude pruning while training.

    Raises
    ------
    TypeError, ValueError
        On construction (and :meth:`replace`), for a bad value, naming it.

    Notes
    -----
    Frozen: derive a changed copy with :meth:`replace`. Equal configs give
    equal :meth:`to_dict`, JSON and TOML, and each form reads back equal.
    """

    step: TrainConfig = field(default_factory=TrainConfig)
    epochs: int = 1
    batch_size: int = 64
    lr_schedule: str | None = None
    lr_decay: float = 1.0
    seed: int | None = None
    backend: str = "fortran"
    norm: str | None = None
    prune: object = None

    def __post_init__(self):
        if not isinstance(self.step, TrainConfig):
            raise TypeError(f"step (cfg) must be a pykd.TrainConfig, got "
                            f"{type(self.step).__name__}")
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("epochs", check.integer("epochs", self.epochs, low=0))
        set_("batch_size", check.integer("batch_size", self.batch_size, low=1))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be 'fortran' or 'numpy', got {self.backend!r}")
        if self.seed is not None:
            set_("seed", check.integer("seed", self.seed, low=0, high=2**63 - 1))
        if isinstance(self.lr_decay, bool) or not isinstance(self.lr_decay, numbers.Real):
            raise TypeError(f"lr_decay must be a real number, got {type(self.lr_decay).__name__}")
        lr_decay = float(self.lr_decay)
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        set_("lr_decay", lr_decay)
        if self.lr_schedule is not None:
            if self.lr_schedule not in LR_SCHEDULES:
                raise ValueError(f"lr_schedule must be one of "
                                 f"{', '.join(map(repr, LR_SCHEDULES))}, got {self.lr_schedule!r}")
            if self.lr_schedule != "exponential" and lr_decay != 1:
                raise ValueError(f"lr_decay={lr_decay:g} is the factor of "
                                 f"lr_schedule='exponential', but "
                                 f"lr_schedule={self.lr_schedule!r}; leave lr_decay at 1 or use "
                                 "lr_schedule='exponential'")
        if self.norm is not None and self.norm not in NORMS:
            raise ValueError(f"norm must be None or one of {', '.join(map(repr, NORMS))}, got "
                             f"{self.norm!r}")
        if self.prune is not None and not isinstance(self.prune, _prune_cls()):
            raise TypeError(f"prune must be a pykd.PruneSchedule or None, got "
                            f"{type(self.prune).__name__}")

    # ------------------------------------------------------------ derived
    @property
    def schedule(self):
        """The learning-rate schedule that runs: ``lr_schedule``, or for
        None "exponential" when ``lr_decay != 1``, else "constant"."""
        if self.lr_schedule is not None:
            return self.lr_schedule
        return "exponential" if self.lr_decay != 1 else "constant"

    @property
    def shuffle_seed(self):
        """The shuffling seed that runs: ``seed``, or ``step.seed``."""
        return int(self.step.seed) if self.seed is None else self.seed

    def replace(self, **changes):
        """A copy with ``changes`` (checked like the constructor)."""
        return dataclasses.replace(self, **changes)

    # -------------------------------------------------------------- dicts
    def to_dict(self):
        """Plain ``{name: value}`` (JSON types): ``step`` and ``prune`` as
        nested dicts, unset values as None."""
        step = {f.name: _plain(getattr(self.step, f.name)) for f in fields(TrainConfig)}
        out = {"step": step}
        for f in fields(self):
            if f.name not in ("step", "prune"):
                out[f.name] = getattr(self, f.name)
        out["prune"] = None if self.prune is None else dict(self.prune.to_dict())
        return out

    @classmethod
    def from_dict(cls, d, *, where="RunConfig"):
        """The config of a dict as :meth:`to_dict` writes it; absent keys
        (and None) take their defaults.

        Raises
        ------
        ValueError
            For an unknown key (naming it and listing the valid ones).
        TypeError
            For a value of the wrong type (naming the key).
        """
        return _from_fields(cls, d, where, tables={"step": lambda: TrainConfig,
                                                   "prune": _prune_cls})

    # --------------------------------------------------------------- JSON
    def to_json(self, indent=2):
        """:meth:`to_dict` as JSON text (null for unset values)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text, *, where="RunConfig"):
        """The config of JSON text as :meth:`to_json` writes it."""
        try:
            obj = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(obj, where=where)

    # --------------------------------------------------------------- TOML
    def to_toml(self):
        """TOML text: the run's settings as top-level keys, then the
        ``[step]`` table and (with a schedule) the ``[prune]`` table. Unset
        values are left out (TOML has no null; absent means the default)."""
        d = self.to_dict()
        lines = [f"{k} = {toml_value(v)}" for k, v in d.items()
                 if k not in ("step", "prune") and v is not None]
        for table in ("step", "prune"):
            if d[table] is not None:
                lines += ["", f"[{table}]"]
                lines += [f"{k} = {toml_value(v)}" for k, v in d[table].items() if v is not None]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text, *, where="RunConfig"):
        """The config of TOML text as :meth:`to_toml` writes it."""
        try:
            import tomllib
        except ModuleNotFoundError:            # Python 3.10
            import tomli as tomllib
        try:
            obj = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{where}: not valid TOML ({' '.join(str(e).split())})") from None
        return cls.from_dict(obj, where=where)

    # -------------------------------------------------------------- files
    def save(self, path):
        """Write the config to ``path`` atomically, as TOML (``.toml``) or
        JSON (``.json``) by its suffix."""
        kind = _suffix(path)
        text = self.to_toml() if kind == ".toml" else self.to_json()
        _io.atomic_write(path, lambda f: f.write(text.encode("utf-8")))

    @classmethod
    def load(cls, path):
        """Read a config written by :meth:`save` (``.toml`` or ``.json``).
        Errors name the file."""
        kind = _suffix(path)
        name = os.fspath(path)
        with _io.open_regular(name, "config file", error=ValueError) as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError(f"{name}: the config file is over {MAX_CONFIG_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: not UTF-8 text ({e})") from None
        read = cls.from_toml if kind == ".toml" else cls.from_json
        return read(text, where=name)


# ------------------------------------------------------------------ helpers

#: The JSON/TOML type of a field by its annotation: (accepted types, description).
_NUM = ((int, float), "a number")
_INT = ((int,), "an integer")
_STR = ((str,), "a string")
_BOOL = ((bool,), "true or false")
_BY_ANNOTATION = {"float": _NUM, "int": _INT, "str": _STR, "bool": _BOOL}


def _plain(v):
    return float(v) if isinstance(v, float) else v


def _no_constant(name):
    raise ValueError(f"{name} is not a valid setting")


def _no_unknown(d, valid, where):
    bad = [k for k in d if k not in valid]
    if bad:
        raise ValueError(f"{where}: unknown key {bad[0]!r}; the valid keys are "
                         f"{', '.join(valid)}")


def _typed(name, value, spec):
    """``value`` checked against a field's JSON type (a bool is not a
    number); numbers for a float field become floats."""
    types, what = spec
    if (isinstance(value, bool) != (spec is _BOOL)) or not isinstance(value, types):
        got = "a boolean" if isinstance(value, bool) else type(value).__name__
        raise TypeError(f"{name} must be {what}, got {got} {value!r}")
    return float(value) if spec is _NUM else value


def _field_spec(f):
    """The JSON type of a dataclass field, from its annotation (``int | None``: int)."""
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return _BY_ANNOTATION[name.split("|")[0].strip()]


def _from_fields(cls, d, where, tables=None):
    """``cls(**d)`` for a dataclass: unknown keys refused, None skipped, each
    value's type checked first; ``tables`` maps a field to a function giving
    the dataclass its nested dict is read into."""
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a dict (a table), got {type(d).__name__}")
    own = {f.name: f for f in fields(cls)}
    _no_unknown(d, own, where)
    kw = {}
    for key, value in d.items():
        if value is None:
            continue
        name = f"{where}.{key}"
        if tables and key in tables:
            kw[key] = _from_fields(tables[key](), value, name)
        else:
            kw[key] = _typed(name, value, _field_spec(own[key]))
    try:
        return cls(**kw)
    except TypeError as e:           # a required field is missing
        if tables:                   # RunConfig's own checks name their argument
            raise
        raise TypeError(f"{where}: {e}") from None


def toml_value(v):
    """A TOML value's text: booleans, integers, floats (``repr``, so they
    read back bit for bit; nan and inf as TOML spells them), strings and
    lists of these. (The CLI's config writer uses it too.)"""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)     # a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def _suffix(path):
    name = os.fspath(path)
    kind = os.path.splitext(name)[1].lower()
    if kind not in SUFFIXES:
        raise ValueError(f"{name}: a RunConfig file must end in .toml or .json")
    return kind
