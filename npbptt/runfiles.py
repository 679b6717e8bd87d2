"""The files of a run directory: what is written, and what is read back, checked.

    config.json     the TrainConfig, the model, the task's info and the data's sha256
    metrics.csv     one row per epoch (METRIC_COLUMNS)
    checkpoint.npz  parameters, best parameters, random-generator states: after every epoch
    phi_best.npz    the probe phi_k at the best parameters (Figure 3), at the end

Every file is written atomically (:mod:`npbptt.checkpoint`); every file read back is checked and
a damaged one raises :class:`RunFileError` naming it.  A new run writes only into a directory
that does not exist, is empty, or holds an npbptt run (:func:`check_run_dir`).
"""
import hashlib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from .checkpoint import (RunFileError, load_checkpoint, read_csv, read_json, rng_from_state,
                         rng_state, save_checkpoint, write_csv)
from .config import ADDED_LATER, RESUMABLE, TrainConfig, is_real
from .validate import is_int

__all__ = ["CHECKPOINT", "METRICS", "CONFIG", "PHI_BEST", "METRIC_COLUMNS", "RunFileError",
           "read_config", "check_run_dir", "same_run", "RunState", "save_state", "restore", "data_digest", "model_info",
           "load_metrics", "format_metrics"]

CHECKPOINT, METRICS, CONFIG, PHI_BEST = "checkpoint.npz", "metrics.csv", "config.json", "phi_best.npz"

# One row per epoch.  The first nine are the columns the issue names; the rest add detail.
METRIC_COLUMNS = (
    "epoch",            # 1-based epoch just finished
    "data_passes",      # training data consumed so far, in epochs, probes of Algorithm 1 included
    "K",                # truncation K_n used in the epoch's last segment
    "delta_hat",        # median over delta_probes probes of Delta_hat(K) (Eq. 24) after the epoch
    "beta_hat",         # median beta_hat (Eq. 21/22) of those probes
    "train_loss",       # mean batch loss L_t over the epoch's training steps (during training)
    "valid_ppl",        # exp(mean L_t) on the validation split after the epoch
    "test_ppl",         # exp(mean L_t) on the test split after the epoch
    "seconds",          # wall-clock seconds of the epoch (training, probes, evaluation)
    "valid_loss", "test_loss",
    "best_valid_ppl",   # running minimum of valid_ppl
    "test_ppl_at_best",  # test_ppl at the epoch of best_valid_ppl (the curve of Figure 1, left)
    "best_epoch",
    "K_mean",           # step-weighted mean of K over the epoch's segments
    "delta_hat_lo", "delta_hat_hi",   # 2.5 and 97.5 percentiles of the delta_probes estimates
    "probe_beta_hat", "probe_delta_hat", "probe_flag",  # the last truncation probe (adaptive)
    "lr",               # gamma * sqrt(K), the step size of the epoch's last segment
)


def data_digest(data):
    """sha256 of every split's arrays (shapes, dtypes, bytes): the data a run was trained on."""
    h = hashlib.sha256()
    for split in (data.train, data.valid, data.test):
        for a in split:
            a = np.ascontiguousarray(a)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def model_info(net):
    """The architecture as stored in config.json and checkpoints."""
    return {"kind": net.kind, **net.config()}


_CONFIG_KEYS = ("train", "model", "info", "data_sha256")
_META_KEYS = ("config", "model", "data_sha256", "epoch", "K", "data_passes", "best", "metrics",
              "rng_train", "rng_diag")
def _kind(v):
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def read_config(out):
    """The ``config.json`` of the run directory ``out``, checked: a JSON object whose "train" is a
    valid :class:`TrainConfig` and whose "info" is an object (what it holds is
    the task's to check: :func:`npbptt.tasks.read_config`).  Raises :class:`RunFileError` naming the file, FileNotFoundError."""
    path = Path(out) / CONFIG
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise RunFileError(f"{path}: not an npbptt run configuration (a JSON {_kind(doc)}, "
                           "not an object)")
    unknown = sorted(set(doc) - set(_CONFIG_KEYS))
    if unknown:
        raise RunFileError(f"{path}: unknown key {unknown[0]!r} (an npbptt config.json holds "
                           f"{', '.join(_CONFIG_KEYS)})")
    for key in ("train", "info"):
        if not isinstance(doc.get(key), dict):
            raise RunFileError(f"{path}: {key!r} must be a JSON object, got "
                               f"{'nothing' if key not in doc else 'a JSON ' + _kind(doc[key])}")
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(doc["train"]) - names)
    if unknown:
        raise RunFileError(f"{path}: unknown training setting 'train.{unknown[0]}'")
    for k, v in ADDED_LATER.items():               # a run written before the field existed
        doc["train"].setdefault(k, v)
    missing = [n for n in names if n not in doc["train"]]
    if missing:
        raise RunFileError(f"{path}: training setting 'train.{sorted(missing)[0]}' missing")
    try:
        TrainConfig(**doc["train"])
    except ValueError as e:
        raise RunFileError(f"{path}: train.{e}") from None
    if "model" in doc and not isinstance(doc["model"], dict):
        raise RunFileError(f"{path}: 'model' must be a JSON object, got a JSON {_kind(doc['model'])}")
    return doc


def check_run_dir(out):
    """Refuse (ValueError) a run directory that a new run must not write into: ``out`` must not
    exist, be an empty directory, or be an npbptt run (a readable ``config.json``,
    :func:`read_config`).  Anything else -- a file, a directory of other files such as the
    current directory -- could lose the user's files."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not (out / CONFIG).is_file():
        raise ValueError(f"out: {out} is neither empty nor an npbptt run (no {CONFIG}); choose a "
                         "new or empty directory")
    try:
        read_config(out)
    except RunFileError as e:
        raise ValueError(f"out: {out} is neither empty nor an npbptt run ({e}); choose a new or "
                         "empty directory") from None


def same_run(where, stored, model, data_sha256, net, cfg, digest):
    """ValueError unless the stored settings (at ``where``) are those of ``cfg``, ``net``, the data."""
    for f in fields(TrainConfig):
        was = stored.get(f.name, ADDED_LATER.get(f.name))      # absent: a run before the field
        if f.name not in RESUMABLE and was != getattr(cfg, f.name):
            raise ValueError(f"config: {f.name}={getattr(cfg, f.name)!r} differs from the run's "
                             f"{stored.get(f.name)!r}; a resumed run may change only {RESUMABLE}")
    if model != model_info(net):
        raise ValueError(f"net: the architecture {model_info(net)} differs from the run's {model}")
    if data_sha256 != digest:
        raise ValueError("data: differs from the data the run was trained on (sha256 mismatch)")


@dataclass
class RunState:
    """What a run carries from epoch to epoch, and what its checkpoint holds: with it a resumed
    run continues bit for bit.  Three generators from ``SeedSequence(config.seed)``: the probes of
    Algorithm 1, the diagnostics (delta_hat probes, Figure 3; never change the trajectory), and the
    dropout masks."""
    epoch: int                  # epochs finished
    K: int | None               # truncation in use (None: probe before the first segment)
    passes: float               # data passes so far, probes of Algorithm 1 included
    best: dict                  # {"valid_ppl", "test_ppl", "epoch"} of the best epoch so far
    best_params: dict
    metrics: list
    rng_train: np.random.Generator
    rng_diag: np.random.Generator
    rng_dropout: np.random.Generator

    @classmethod
    def fresh(cls, net, cfg):
        seeds = np.random.SeedSequence(cfg.seed).spawn(3)   # probes | diagnostics | dropout
        return cls(0, cfg.K if not cfg.adaptive else cfg.K0, 0.0,
                   {"valid_ppl": math.inf, "test_ppl": math.nan, "epoch": 0},
                   {k: v.copy() for k, v in net.params.items()}, [],
                   *(np.random.default_rng(s) for s in seeds))


def save_state(out, net, cfg, state, digest):
    """checkpoint.npz and metrics.csv of the run in ``out`` after ``state.epoch`` epochs."""
    meta = {"config": asdict(cfg), "model": model_info(net), "data_sha256": digest,
            "epoch": state.epoch, "K": state.K, "data_passes": state.passes, "best": state.best,
            "metrics": state.metrics, "rng_train": rng_state(state.rng_train),
            "rng_diag": rng_state(state.rng_diag), "rng_dropout": rng_state(state.rng_dropout)}
    arrays = {f"param/{k}": v for k, v in net.params.items()}
    arrays.update({f"best/{k}": v for k, v in state.best_params.items()})
    save_checkpoint(Path(out) / CHECKPOINT, arrays, meta)
    extra = [c for c in (state.metrics[0] if state.metrics else {}) if c not in METRIC_COLUMNS]
    write_csv(Path(out) / METRICS, state.metrics, METRIC_COLUMNS + tuple(extra))


def restore(path, net, cfg, digest):
    """Check the checkpoint ``path`` against the run and load it into ``net.params``: returns
    the :class:`RunState` it holds."""
    arrays, meta = load_checkpoint(path)
    missing = [k for k in _META_KEYS if k not in meta]
    if missing or not isinstance(meta["config"], dict):
        raise RunFileError(f"{path}: not an npbptt training checkpoint (no {missing[0] if missing else 'config'!r})")
    same_run(path, meta["config"], meta["model"], meta["data_sha256"], net, cfg, digest)
    for k, v in net.params.items():
        for kind in ("param", "best"):
            a = arrays.get(f"{kind}/{k}")
            if a is None or a.shape != v.shape:
                raise RunFileError(f"{path}: parameter {kind}/{k} "
                                   + ("missing" if a is None else f"has shape {a.shape}, the network {v.shape}"))
    epoch = meta["epoch"]
    if not is_int(epoch) or epoch < 0 or not isinstance(meta["metrics"], list) or len(meta["metrics"]) != epoch:
        raise RunFileError(f"{path}: inconsistent checkpoint (epoch {epoch!r}, "
                           f"{len(meta['metrics']) if isinstance(meta['metrics'], list) else '?'} metrics rows)")
    if cfg.epochs < epoch:
        raise ValueError(f"epochs: the run in {path.parent} has finished {epoch} epochs; a resumed "
                         f"run needs epochs >= {epoch}, got {cfg.epochs}")
    try:
        rngs = [rng_from_state(meta["rng_train"]), rng_from_state(meta["rng_diag"])]
        # checkpoints written before dropout existed have no dropout generator: a fresh one
        rngs.append(rng_from_state(meta["rng_dropout"]) if "rng_dropout" in meta else
                    RunState.fresh(net, cfg).rng_dropout)
        best = dict(meta["best"])
        best["valid_ppl"], best["epoch"]                      # noqa: B018 -- present
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RunFileError(f"{path}: damaged checkpoint (random-generator state or best epoch: "
                           f"{type(e).__name__}: {e})") from None
    for k in net.params:
        net.params[k][...] = arrays[f"param/{k}"]
    best_params = {k: arrays[f"best/{k}"] for k in net.params}
    return RunState(epoch, meta["K"], meta["data_passes"], best, best_params, meta["metrics"], *rngs)



def load_metrics(out):
    """The rows of ``out/metrics.csv`` (numbers parsed), [] when absent.  Raises
    :class:`RunFileError` naming the file when it is not a complete metrics file of
    :data:`METRIC_COLUMNS` with epochs 1, 2, ... and numeric perplexities."""
    path = Path(out) / METRICS
    if not path.is_file():
        return []
    rows = read_csv(path, METRIC_COLUMNS, extra=True)       # a task may add its own columns
    for i, r in enumerate(rows, start=1):
        if r["epoch"] != i:
            raise RunFileError(f"{path}: line {i + 1}: epoch {r['epoch']!r}, expected {i}")
        for c in ("data_passes", "K", "valid_ppl", "test_ppl"):
            if not is_real(r[c]):
                raise RunFileError(f"{path}: line {i + 1}: {c} is {r[c]!r}, not a number")
    return rows


def _fmt(v, nd=4):
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{nd}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


_NLL_COLUMNS = ("epoch", "data_passes", "K", "delta_hat", "beta_hat", "train_loss", "valid_nll",
                "test_nll", "test_rmse", "test_error", "seconds")


def format_metrics(metrics, columns=None):
    """A Markdown table of per-epoch metrics, then the best epoch (lowest validation loss).
    ``columns`` default: the perplexity columns, or Table C.3's (``valid_nll``, ...) for a task
    that writes them (Book Order)."""
    nll = bool(metrics) and "valid_nll" in metrics[0]
    if columns is None:
        columns = _NLL_COLUMNS if nll else ("epoch", "data_passes", "K", "delta_hat", "beta_hat",
                                            "train_loss", "valid_ppl", "test_ppl", "seconds")
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    nd = {"data_passes": 3, "seconds": 1, "delta_hat": 3, "beta_hat": 3, "test_rmse": 6}
    lines = [head, rule] + ["| " + " | ".join(_fmt(r.get(c), nd.get(c, 4)) for c in columns) + " |"
                            for r in metrics]
    if metrics:
        r = min(metrics, key=lambda r: r["valid_ppl"])
        lines.append("")
        if nll:
            lines.append(f"best valid NLL {_fmt(r['valid_nll'])} at epoch {r['epoch']} (data passes "
                         f"{_fmt(r['data_passes'], 3)}): test NLL {_fmt(r['test_nll'])}, RMSE(t) "
                         f"{_fmt(r['test_rmse'], 6)}, 0-1 loss {_fmt(r['test_error'])}")
        else:
            lines.append(f"best valid PPL {_fmt(r['valid_ppl'])} at epoch {r['epoch']} "
                         f"(data passes {_fmt(r['data_passes'], 3)}): test PPL {_fmt(r['test_ppl'])}")
    return "\n".join(lines)
