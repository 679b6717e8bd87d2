"""Every experiment of §5 and Appendix C as a task of one trainer (:func:`npbptt.train.train`).

    copy       synthetic copy task (§5.1, Table C.1)
    ptb        Penn Treebank language model (§5.2, Table C.2)
    wikitext2  WikiText-2 language model (§5.2, Table C.2)
    book-order Book Order marked point process (Appendix C.3, Table C.3)

A task decides its model, data and defaults (:mod:`npbptt.tasks.base`); everything else -- the
progress bar, the run directory, ``metrics.csv``, atomic checkpoints, bit-exact resume,
divergence handling -- is the trainer's, the same for every task.  :func:`train_task` is the API
of ``npbptt train TASK``: the same defaults table, the same checks.
"""
import os
from pathlib import Path

import numpy as np

from ..train import TrainConfig, train
from .base import COMMON_INFO, DTYPES, Setting, Task
from .copy import COPY
from .book_order import BOOK_ORDER
from .language import PTB, WIKITEXT2

__all__ = ["TASKS", "Task", "Setting", "get_task", "train_task", "train_copy", "resume_run",
           "read_config", "data_dir_of", "DTYPES"]

TASKS = {t.name: t for t in (COPY, PTB, WIKITEXT2, BOOK_ORDER)}
_CONFIG_FIELDS = set(TrainConfig.__dataclass_fields__)


def get_task(name):
    """The :class:`Task` called ``name``; ValueError listing the tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {name!r}")
    return TASKS[name]


def data_dir_of(task, data_dir, values=None):
    """The data directory of a task that reads files: ``data_dir``, else the ``NPBPTT_DATA``
    environment variable; ValueError when neither is set.  None for a task without files
    (``values``: the run's checked settings, where a setting decides, e.g. copy ``data``)."""
    if not (task.reads_files(values) if values is not None else task.needs_data is True):
        return None
    if data_dir is None or data_dir == "":
        data_dir = os.environ.get("NPBPTT_DATA") or None
    if data_dir is None:
        raise ValueError(f"data_dir: task {task.name!r}"
                         + (" with data='authors'" if callable(task.needs_data) else "")
                         + " reads its data from a directory: give "
                         "data_dir (--data-dir DIR) or set the NPBPTT_DATA environment variable")
    return str(Path(data_dir))


def prepare(task, *, K=None, delta=None, seed=0, dtype="float64", data_dir=None, quick=False,
            **settings):
    """Check every setting, then build: returns (net, data, config, info).  Nothing is written."""
    task = get_task(task) if isinstance(task, str) else task
    if dtype not in DTYPES and np.dtype(dtype).name not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    dtype = np.dtype(dtype).name
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {seed!r}")
    train_kw = {k: v for k, v in settings.items() if k in _CONFIG_FIELDS}
    task_kw = {k: v for k, v in settings.items() if k not in _CONFIG_FIELDS}
    for k in ("K", "delta", "seed"):
        train_kw.pop(k, None)
    values = task.values(task_kw, quick)
    config = TrainConfig(K=K, delta=delta, seed=int(seed),
                         **{"loss": task.loss, **task.training(train_kw, quick)})
    where = data_dir_of(task, data_dir, values)
    try:
        net, data = task.build(values, int(seed), dtype, where)
    except FileNotFoundError as e:                   # a missing data file is a bad data_dir
        raise ValueError(f"data_dir: {e}") from None
    info = {"task": task.name, "name": data.name, "seed": int(seed), "dtype": dtype,
            "data_dir": where, "quick": bool(quick), **values}
    return net, data, config, info


def train_task(task, out=None, *, K=None, delta=None, seed=0, dtype="float64", data_dir=None,
               quick=False, resume=False, progress=True, label=None, **settings):
    """Train one run of ``task`` (a name of :data:`TASKS`): fixed ``K`` or adaptive ``delta``.

    ``settings``: the task's settings (``npbptt.tasks.TASKS[task].settings``) and
    :class:`npbptt.train.TrainConfig` fields; every one not given takes the task's default (the
    paper's value; ``quick=True``: the quick run's).  ``dtype``: "float64" or "float32" (the
    network's parameters and arithmetic).  ``data_dir``: the data directory of ptb/wikitext2
    (default: the NPBPTT_DATA environment variable).  ``seed`` seeds the initial parameters and
    every random choice of the run.  Returns :class:`npbptt.train.TrainResult`.
    """
    task = get_task(task) if isinstance(task, str) else task
    net, data, config, info = prepare(task, K=K, delta=delta, seed=seed, dtype=dtype,
                                      data_dir=data_dir, quick=quick, **settings)
    return train(net, data, config, out=out, resume=resume, progress=progress, info=info,
                 label=label, metrics_fn=task.metrics)


def train_copy(out=None, *, K=None, delta=None, seed=0, resume=False, progress=True, label=None,
               **settings):
    """The copy task of §5.1 (:func:`train_task` with ``task="copy"``): a 2-layer LSTM
    (embedding 6, hidden 50, linear read-out) on :func:`npbptt.data.copy_task` streams."""
    return train_task("copy", out, K=K, delta=delta, seed=seed, resume=resume, progress=progress,
                      label=label, **settings)


def read_config(out):
    """The checked ``config.json`` of the run in ``out`` (:func:`npbptt.runfiles.read_config`),
    its "info" checked against the settings of its task: RunFileError naming the file."""
    from ..runfiles import CONFIG, read_config as read_run_config
    doc = read_run_config(out)
    task = TASKS.get(doc["info"].get("task"))
    if task is not None:
        task.check_info(doc["info"], Path(out) / CONFIG)
    return doc


def stored_settings(info):
    """The :func:`train_task` keywords stored in a run's ``info`` (config.json)."""
    task = get_task(info.get("task"))
    kw = {k: v for k, v in info.items() if k in task.by_key}
    return task, kw


def resume_run(out, epochs=None, backend=None, data_dir=None, progress=True, label=None):
    """Continue the run in ``out`` from its checkpoint (``config.json`` rebuilds the task),
    optionally with more ``epochs``, another ``backend`` or the data read from another
    ``data_dir`` (the data must be the same: its sha256 is checked).  A run stopped before its
    first checkpoint starts again from epoch 0 with its settings.  Returns TrainResult."""
    from ..runfiles import CONFIG
    out = Path(out)
    if not (out / CONFIG).is_file():
        raise ValueError(f"out: {out} holds no run to resume ({CONFIG} not found)")
    cfg = read_config(out)
    info, tc = dict(cfg["info"]), dict(cfg["train"])
    if info.get("task") not in TASKS:
        raise ValueError(f"out: {out}/{CONFIG} names an unknown task {info.get('task')!r}")
    task, kw = stored_settings(info)
    if epochs is not None:
        tc["epochs"] = epochs
    if backend is not None:
        tc["backend"] = backend
    K, delta, seed = tc.pop("K"), tc.pop("delta"), tc.pop("seed")
    return train_task(task.name, out, K=K, delta=delta, seed=seed,
                      dtype=info.get("dtype", "float64"),
                      data_dir=data_dir if data_dir is not None else info.get("data_dir"),
                      quick=bool(info.get("quick", False)), resume=True, progress=progress,
                      label=label, **kw, **tc)
