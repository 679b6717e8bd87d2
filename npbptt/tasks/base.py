"""What a task is: its settings (one defaults table, read by the API and the command line alike),
the training defaults of its experiment, and how it builds its network and data.

A task is one experiment of §5 / Appendix C (:mod:`npbptt.tasks` lists them).  Its *settings*
describe the data and the model (``batch``, ``hidden``, ...); its *training defaults* are
:class:`npbptt.train.TrainConfig` fields at the values of the paper's runs (``lr``, ``K0``,
``W``, ...).  ``quick`` values replace both for a run of seconds to a minute (``--quick``).
"""
from dataclasses import dataclass, field

import numpy as np

from ..checkpoint import RunFileError
from ..validate import is_int

__all__ = ["Setting", "Task", "COMMON_INFO", "DTYPES"]

DTYPES = ("float64", "float32")
# keys of a run's config.json "info" that every task stores beside its settings
COMMON_INFO = {"task": str, "name": str, "seed": int, "dtype": str, "data_dir": (str, None),
               "quick": bool}


@dataclass(frozen=True)
class Setting:
    """One task setting.  ``type``: int, float, bool or str; ``default`` may be None where
    ``nullable`` (e.g. "all the data"); ``minimum`` bounds ints and floats from below
    (``exclusive``: strictly); ``maximum`` from above, strictly; ``quick``: the value under
    ``--quick`` (``Setting.SAME``: unchanged); ``none``: what None means, for ``--help``;
    ``choices``: the allowed values of a str setting (None: any string); ``quick_unless``:
    (key, value) of another setting under which the quick value does not apply."""
    key: str
    type: type
    default: object
    help: str
    quick: object = "<same>"
    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False
    nullable: bool = False
    none: str = "none"          # what None means, for --help ("all": all the data)
    choices: tuple | None = None
    quick_unless: tuple | None = None
    SAME = "<same>"

    @property
    def flag(self):
        return "--" + self.key.replace("_", "-")

    def value(self, quick):
        return self.default if not quick or self.quick == Setting.SAME else self.quick

    def check(self, v, name=None):
        """``v`` checked (ValueError naming the setting); ints given for floats become floats."""
        name = name or self.key
        if v is None:
            if self.nullable:
                return None
            raise ValueError(f"{name}: expected {self._what()}, got None")
        if self.type is bool:
            ok = isinstance(v, (bool, np.bool_))
        elif self.type is int:
            ok = is_int(v)
        elif self.type is float:
            ok = is_int(v) or (isinstance(v, (float, np.floating)) and np.isfinite(v))
        else:
            ok = isinstance(v, self.type)
        if ok and self.type in (int, float):
            lo_bad = self.minimum is not None and (v <= self.minimum if self.exclusive else v < self.minimum)
            hi_bad = self.maximum is not None and v >= self.maximum
            ok = not (lo_bad or hi_bad)
        if ok and self.choices is not None:
            ok = v in self.choices
        if not ok:
            raise ValueError(f"{name}: expected {self._what()}, got {v!r}")
        return float(v) if self.type is float else (bool(v) if self.type is bool else v)

    def _what(self):
        kind = {int: "an integer", float: "a finite real number", bool: "True or False",
                str: "a string"}[self.type]
        if self.choices is not None:
            kind = "one of " + ", ".join(repr(c) for c in self.choices)
        if self.minimum is not None:
            kind += f" {'>' if self.exclusive else '>='} {self.minimum:g}"
        if self.maximum is not None:
            kind += f" and < {self.maximum:g}"
        return kind + (" or None" if self.nullable else "")


@dataclass(frozen=True)
class Task:
    """One experiment.

    name : the command-line name (``npbptt train NAME``)
    title : one line for ``--help`` and tables ("copy task (§5.1)")
    settings : the data/model :class:`Setting` s
    train_defaults : TrainConfig fields of the paper's runs; quick_train : their --quick values
    build : ``build(values, seed, dtype, data_dir) -> (net, data)``, ``values`` the checked
        settings; ``data`` has ``train``, ``valid``, ``test`` splits (x, y) of shape (T, B, ...)
        and a ``name``
    needs_data : the task reads files from a data directory (``data_dir`` / ``NPBPTT_DATA``):
        True, False, or ``needs_data(values) -> bool`` when a setting decides (copy ``data``)
    stream_steps : ``stream_steps(values) -> (T, setting)``: the steps of each training stream
        and the setting that decides it, when known before the data are read (else None)
    metrics : None, or ``metrics(net, valid, test, backend) -> dict``: the task's own columns of
        ``metrics.csv`` (:func:`npbptt.train.train`'s ``metrics_fn``)
    loss : the per-step loss of :data:`npbptt.losses.LOSSES` the task trains
    """
    name: str
    title: str
    settings: tuple
    train_defaults: dict
    quick_train: dict
    build: object
    needs_data: object = False
    stream_steps: object = None
    metrics: object = None
    loss: str = "cross_entropy"
    by_key: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "by_key", {s.key: s for s in self.settings})

    def reads_files(self, values):
        """True when a run with the checked settings ``values`` reads a data directory."""
        return bool(self.needs_data(values) if callable(self.needs_data) else self.needs_data)

    def values(self, given, quick=False):
        """The task's settings: defaults (``quick``: the quick ones) updated with ``given``,
        each checked.  An unknown key raises ValueError naming it and the task."""
        unknown = [k for k in given if k not in self.by_key]
        if unknown:
            raise ValueError(f"{unknown[0]}: not a setting of task {self.name!r} (its settings: "
                             f"{', '.join(self.by_key)})")
        out = {s.key: s.value(quick) for s in self.settings}
        out.update(given)
        for s in self.settings:
            if quick and s.quick_unless and s.key not in given \
                    and out[s.quick_unless[0]] == s.quick_unless[1]:
                out[s.key] = s.default
        return {k: self.by_key[k].check(v) for k, v in out.items()}

    def training(self, given, quick=False):
        """TrainConfig keyword arguments: the task's defaults (and quick ones) updated with
        ``given``."""
        return {**self.train_defaults, **(self.quick_train if quick else {}), **given}

    def check_info(self, info, path):
        """The "info" object of a config.json of this task: known keys of the right types, else
        :class:`RunFileError` naming ``path`` and the key."""
        for k, v in info.items():
            if k in COMMON_INFO:
                types = COMMON_INFO[k] if isinstance(COMMON_INFO[k], tuple) else (COMMON_INFO[k],)
                ok = any((t is None and v is None) or (t is int and is_int(v)) or
                         (t is bool and isinstance(v, bool)) or (t is str and isinstance(v, str))
                         for t in types)
            elif k in self.by_key:
                try:
                    self.by_key[k].check(v)
                    ok = True
                except ValueError:
                    ok = False
            else:
                raise RunFileError(f"{path}: unknown {self.name}-task setting 'info.{k}'")
            if not ok:
                raise RunFileError(f"{path}: 'info.{k}' has the wrong type ({v!r})")
        if info.get("dtype", "float64") not in DTYPES:
            raise RunFileError(f"{path}: 'info.dtype' must be one of {DTYPES}, got {info['dtype']!r}")
