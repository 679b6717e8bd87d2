"""SGD with truncated BPTT: fixed K, or the adaptive truncation of Algorithm 1 (§4).

One loop serves both.  Each epoch walks once over the training streams (T steps of B parallel
streams) in ``probes_per_epoch`` contiguous segments (the paper's alpha, §4.4).  At the start of a
segment an adaptive run

  * samples a random window of W + 1 steps from every stream (Algorithm 1, line 3), advances the
    state through ``burnin`` steps before it from zeros, and computes the gradient norms
    phi_k, k = 0..W, by BPTT(W, 1) (line 4, Eq. 18: :func:`npbptt.grad_norms`);
  * sets K_n = kappa_hat(delta) (lines 5-7, Eqs. 20-25: :func:`npbptt.bounds.kappa_hat`);

and then, fixed or adaptive, streams over the segment in the chunks S_m of Eq. (17) with
BPTT(2K_n, K_n) (lines 8-10, :func:`npbptt.stream`), the state carried from chunk to chunk, and
takes the step theta <- theta - gamma * sqrt(K_n) * g_hat after every chunk (line 11).
After each epoch: validation and test loss/perplexity from a forward pass over each split
(:func:`npbptt.step_losses`), the relative-bias estimate delta_hat(K_n) (Eq. 24) of the K in use
from ``delta_probes`` fresh probes (the curves of Figure 1, right), the best-validation parameters
kept, and an atomic checkpoint.

Notes
-----
* K0 (Algorithm 1's "initial truncation") is used for the first segment of the first epoch, as
  in the authors' code; Algorithm 1 as printed computes K_0 from a probe before any update and
  never reads K0.  ``K0=None`` probes before the first segment too.
* Data passes count the training steps consumed plus, for adaptive runs, the (burnin + W + 1)
  steps of every truncation probe (§5: "counting the data used to estimate kappa_hat").  The
  ``delta_probes`` diagnostics measure the run and are not part of the algorithm: not counted,
  and drawn from their own random generator so that they never change the trajectory.
* Weight decay adds ``weight_decay * theta`` to g_hat (the gradient of an L2 penalty, as
  PyTorch's SGD); gradient clipping rescales g_hat (without the decay) to norm <= ``clip`` before.
* The first chunk of a segment other than the first is backpropagated only back to the segment's
  start (the stream restarts there with the carried state): with ``probes_per_epoch = 1`` this
  never happens.
* Each epoch starts the streams from the zero state (one pass over the data = one sequence).
* All randomness comes from ``np.random.SeedSequence(config.seed)``: the generators' states are
  checkpointed, so a resumed run repeats an uninterrupted run bit for bit (same backend).
"""
import hashlib
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from . import bounds
from .backends import BACKENDS, resolve
from .bptt import step_losses, stream
from .checkpoint import (RunFileError, load_checkpoint, read_csv, read_json, rng_from_state,
                         rng_state, save_checkpoint, write_csv, write_json)
from .losses import LOSSES
from .probe import grad_norms
from .validate import check_inputs, is_int

__all__ = ["TrainConfig", "TrainResult", "Diverged", "METRIC_COLUMNS", "train", "train_copy",
           "probe_phi", "sgd_step", "resume_run", "load_metrics", "format_metrics",
           "read_config", "check_run_dir", "RunFileError", "CHECKPOINT", "METRICS", "CONFIG",
           "PHI_BEST"]

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

_RESUMABLE = ("epochs", "backend")      # the only settings a resumed run may change


def _is_real(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (the copy-task values of §5.1 in brackets).

    K : fixed truncation (BPTT(2K, K) chunks), or None for adaptive   [5, 10, 15, 20, 30]
    delta : relative-bias tolerance in (0, 1) of Algorithm 1, or None [0.9, 0.5, 0.1]
    epochs : number of passes over the training streams
    lr : gamma, the step is gamma * sqrt(K_n) * g_hat (Algorithm 1, line 11)          [1.0]
    weight_decay : L2 coefficient added to g_hat; clip : None or max ||g_hat|| (Notes)
    K0, K_min, K_max : Algorithm 1's initial truncation and the range of Eq. (25) [15, 2, 100]
    W : probe window: lags 0..W, by BPTT(W, 1) on W + 1 steps (R = W in §4.2)      [100]
    burnin : steps run from the zero state before a probe window, to warm its state
    probes_per_epoch : truncation updates per epoch (alpha of §4.4)                   [1]
    tau_hat, method, beta_alpha, variant : as :func:`npbptt.bounds.kappa_hat` (``beta_alpha``
        is its ``alpha``, the quantile level)
    delta_probes : probes per epoch measuring Delta_hat(K) for the metrics (0: none)
    loss : "cross_entropy" or "mse"; backend : as :func:`npbptt.bptt`
    seed : seeds every random choice of the run (probe windows)
    """
    K: int | None = None
    delta: float | None = None
    epochs: int = 1
    lr: float = 1.0
    weight_decay: float = 0.0
    clip: float | None = None
    K0: int | None = 15
    K_min: int = 2
    K_max: int = 100
    W: int = 100
    burnin: int = 20
    probes_per_epoch: int = 1
    tau_hat: int | None = None
    method: str = "ols"
    beta_alpha: float = 0.1
    variant: str = "paper"
    delta_probes: int = 10
    loss: str = "cross_entropy"
    backend: str | None = None
    seed: int = 0

    def __post_init__(self):
        if (self.K is None) == (self.delta is None):
            raise ValueError("K, delta: give exactly one -- a fixed truncation K or a relative-bias "
                             f"tolerance delta for adaptive truncation; got K={self.K!r}, delta={self.delta!r}")
        if self.K is not None and (not is_int(self.K) or self.K < 1):
            raise ValueError(f"K: expected an integer >= 1, got {self.K!r}")
        if self.delta is not None and (not _is_real(self.delta) or not 0 < self.delta < 1):
            raise ValueError(f"delta: expected a real number in (0, 1), got {self.delta!r}")
        for name, lo in (("epochs", 1), ("W", 1), ("burnin", 0), ("probes_per_epoch", 1),
                         ("delta_probes", 0), ("seed", 0)):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if not (is_int(self.K_min) and is_int(self.K_max) and 1 <= self.K_min <= self.K_max):
            raise ValueError(f"K_min, K_max: expected integers with 1 <= K_min <= K_max, "
                             f"got K_min={self.K_min!r}, K_max={self.K_max!r}")
        if self.K0 is not None and (not is_int(self.K0) or self.K0 < 1):
            raise ValueError(f"K0: expected None or an integer >= 1, got {self.K0!r}")
        if not _is_real(self.lr) or not 0 < self.lr < math.inf:
            raise ValueError(f"lr: expected a finite real number > 0, got {self.lr!r}")
        if not _is_real(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay: expected a finite real number >= 0, got {self.weight_decay!r}")
        if self.clip is not None and (not _is_real(self.clip) or not 0 < self.clip < math.inf):
            raise ValueError(f"clip: expected None or a finite real number > 0, got {self.clip!r}")
        if self.tau_hat is not None and (not is_int(self.tau_hat) or not 0 <= self.tau_hat < self.W):
            raise ValueError(f"tau_hat: expected None or an integer in [0, W) = [0, {self.W}), "
                             f"got {self.tau_hat!r}")
        if self.method not in ("max", "quantile", "ols"):
            raise ValueError(f"method: expected 'max', 'quantile' or 'ols', got {self.method!r}")
        if not _is_real(self.beta_alpha) or not 0 <= self.beta_alpha < 1:
            raise ValueError(f"beta_alpha: expected a real number in [0, 1), got {self.beta_alpha!r}")
        if self.variant not in ("paper", "authors"):
            raise ValueError(f"variant: expected 'paper' or 'authors', got {self.variant!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {self.backend!r}")

    @property
    def adaptive(self):
        return self.delta is not None

    def bounds_options(self):
        """Keyword arguments of :func:`npbptt.bounds.kappa_hat` / ``delta_hat``."""
        return dict(tau_hat=self.tau_hat, method=self.method, alpha=self.beta_alpha,
                    variant=self.variant)


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient.  ``epoch`` (1-based) and ``chunk``
    (1-based within the epoch, None when found at evaluation) say where; the last good checkpoint
    (if any) is untouched."""

    def __init__(self, message, epoch, chunk=None):
        super().__init__(message)
        self.epoch, self.chunk = epoch, chunk


@dataclass
class TrainResult:
    """What :func:`train` returns.

    metrics : list of dicts, one per epoch, keys :data:`METRIC_COLUMNS`
    params : the final parameters (``net.params`` after the last epoch)
    best_params : the parameters of the epoch with the lowest validation perplexity
    best_epoch : that epoch (1-based)
    phi_best : (W + 1, B) probe phi_k (Eq. 18) at ``best_params`` on a random window (Figure 3)
    out : the run directory, or None
    """
    metrics: list
    params: dict
    best_params: dict
    best_epoch: int
    phi_best: np.ndarray
    out: Path | None


# --- the pieces of Algorithm 1 -----------------------------------------------------------------
def probe_phi(net, x, y, W, burnin, rng, loss="cross_entropy", backend=None):
    """Algorithm 1, lines 3-4: phi (W + 1, B), phi[k, b] = ||d ell^(b)_s / d S_{s-k}|| (Eq. 18).

    Every stream b gets its own random window: ``burnin`` steps advanced from the zero state, then
    the W + 1 steps of BPTT(W, 1) (:func:`npbptt.grad_norms`).  ``x``, ``y``: (T, B, ...) streams;
    ``rng``: np.random.Generator (one draw of B start positions).
    """
    T, B = x.shape[:2]
    L = burnin + W + 1
    if L > T:
        raise ValueError(f"W, burnin: the probe window burnin + W + 1 = {L} must fit in the "
                         f"T = {T} training steps")
    start = rng.integers(0, T - L + 1, size=B)          # random window of each stream
    rows = start[None, :] + np.arange(L)[:, None]
    cols = np.arange(B)[None, :]
    xw, yw = x[rows, cols], y[rows, cols]
    state = net.init_state(B)
    if burnin:
        state = step_losses(net, xw[:burnin], yw[:burnin], state, loss, backend)[1]
    return grad_norms(net, xw[burnin:], yw[burnin:], state, loss, backend)


def sgd_step(params, grads, lr, K, weight_decay=0.0, clip=None):
    """Algorithm 1, line 11, in place: theta <- theta - lr * sqrt(K) * (clip(g) + wd * theta).

    Returns ||g|| before clipping.  The sqrt(K) scaling offsets the lower variance of
    BPTT(2K, K) as K grows (§4.1)."""
    norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    scale = clip / norm if clip is not None and norm > clip else 1.0
    step = lr * math.sqrt(K)
    for name, p in params.items():
        g = grads[name] * scale if scale != 1.0 else grads[name]
        if weight_decay:
            g = g + weight_decay * p                # gradient of (wd / 2) ||theta||^2
        p -= step * g
    return norm


def _mean_loss(net, split, loss, backend):
    x, y = split
    L, _ = step_losses(net, x, y, net.init_state(x.shape[1]), loss, backend)
    return float(L.mean())


def _finite_grads(arrays):
    """True when every array of the dict is finite (gradients, parameters)."""
    return all(np.isfinite(g).all() for g in arrays.values())


def _digest(data):
    h = hashlib.sha256()
    for split in (data.train, data.valid, data.test):
        for a in split:
            a = np.ascontiguousarray(a)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _model_info(net):
    return {"kind": net.kind, **net.config()}


# --- run files: what is read back is checked, what is overwritten is an npbptt run ---------------
_CONFIG_KEYS = ("train", "model", "info", "data_sha256")
_META_KEYS = ("config", "model", "data_sha256", "epoch", "K", "data_passes", "best", "metrics",
              "rng_train", "rng_diag")
# info of a copy-task run (train_copy): keyword -> allowed types (None: may be null)
_COPY_INFO = {"task": (str,), "name": (str,), "seed": (int,), "m": (int,), "m_min": (int, None),
              "n_symbols": (int,), "T_train": (int,), "T_eval": (int,), "batch": (int,),
              "embed": (int,), "hidden": (int,), "layers": (int,), "data_seed": (int,)}


def _kind(v):
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def read_config(out):
    """The ``config.json`` of the run directory ``out``, checked: a JSON object whose "train" is a
    valid :class:`TrainConfig` and whose "info" (of a copy-task run) holds only the keywords of
    :func:`train_copy`.  Raises :class:`RunFileError` naming the file, FileNotFoundError."""
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
    missing = [n for n in names if n not in doc["train"]]
    if missing:
        raise RunFileError(f"{path}: training setting 'train.{sorted(missing)[0]}' missing")
    try:
        TrainConfig(**doc["train"])
    except ValueError as e:
        raise RunFileError(f"{path}: train.{e}") from None
    if doc["info"].get("task") == "copy":
        for k, v in doc["info"].items():
            if k not in _COPY_INFO:
                raise RunFileError(f"{path}: unknown copy-task setting 'info.{k}'")
            ok = _COPY_INFO[k]
            if not ((v is None and None in ok) or (int in ok and is_int(v)) or
                    (str in ok and isinstance(v, str))):
                raise RunFileError(f"{path}: 'info.{k}' has the wrong type ({v!r})")
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


def _same_run(where, stored, model, data_sha256, net, cfg, digest):
    """ValueError unless the stored settings (at ``where``) are those of ``cfg``, ``net``, the data."""
    for f in fields(TrainConfig):
        if f.name not in _RESUMABLE and stored.get(f.name) != getattr(cfg, f.name):
            raise ValueError(f"config: {f.name}={getattr(cfg, f.name)!r} differs from the run's "
                             f"{stored.get(f.name)!r}; a resumed run may change only {_RESUMABLE}")
    if model != _model_info(net):
        raise ValueError(f"net: the architecture {_model_info(net)} differs from the run's {model}")
    if data_sha256 != digest:
        raise ValueError("data: differs from the data the run was trained on (sha256 mismatch)")


def _restore(path, net, cfg, digest):
    """Check the checkpoint ``path`` against the run and load it into ``net.params``: returns
    (best_params, rng_train, rng_diag, metrics, K, passes, epoch, best)."""
    arrays, meta = load_checkpoint(path)
    missing = [k for k in _META_KEYS if k not in meta]
    if missing or not isinstance(meta["config"], dict):
        raise RunFileError(f"{path}: not an npbptt training checkpoint (no {missing[0] if missing else 'config'!r})")
    _same_run(path, meta["config"], meta["model"], meta["data_sha256"], net, cfg, digest)
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
        rngs = rng_from_state(meta["rng_train"]), rng_from_state(meta["rng_diag"])
        best = dict(meta["best"])
        best["valid_ppl"], best["epoch"]                      # noqa: B018 -- present
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RunFileError(f"{path}: damaged checkpoint (random-generator state or best epoch: "
                           f"{type(e).__name__}: {e})") from None
    for k in net.params:
        net.params[k][...] = arrays[f"param/{k}"]
    best_params = {k: arrays[f"best/{k}"] for k in net.params}
    return (best_params, *rngs, meta["metrics"], meta["K"], meta["data_passes"], epoch, best)


# --- the loop ----------------------------------------------------------------------------------
def train(net, data, config, out=None, resume=False, progress=True, info=None, label=None,
          blas_threads=1):
    """Train ``net`` in place with SGD and BPTT(2K, K): fixed K, or Algorithm 1 (module docstring).

    Parameters
    ----------
    net : npbptt.RNN or npbptt.LSTM (its parameters are updated in place)
    data : an object with ``train``, ``valid``, ``test`` splits, each ``(x, y)`` of shape (T, B)
        (e.g. :func:`npbptt.data.copy_task`); the B columns are parallel streams
    config : :class:`TrainConfig`
    out : run directory or None.  With a directory: ``config.json`` (``config``, the model,
        ``info``), ``metrics.csv`` (:data:`METRIC_COLUMNS`), ``checkpoint.npz`` after every epoch
        and ``phi_best.npz`` at the end, each written atomically.
    resume : continue the run in ``out`` from its checkpoint; ``config`` must equal the stored one
        except ``epochs`` and ``backend``.  The continuation equals an uninterrupted run.
    progress : show a tqdm bar (loss and K)
    info : JSON-able dict stored in ``config.json`` (e.g. the data set's settings)
    label : the progress bar's description
    blas_threads : BLAS threads during training (None: leave as is).  The products are small
        (batch x hidden): one thread is fastest, and several fight each other on a busy machine.

    Returns
    -------
    :class:`TrainResult`.  Raises :class:`Diverged` (non-finite loss/gradient/perplexity, naming
    the epoch and chunk; the last checkpoint stays intact) and ValueError on bad input.
    """
    # Overflow on the way to divergence is detected and reported by Diverged, not warned about.
    with np.errstate(over="ignore", invalid="ignore"):
        if blas_threads is None:
            return _train(net, data, config, out, resume, progress, info, label)
        with threadpool_limits(limits=blas_threads, user_api="blas"):
            return _train(net, data, config, out, resume, progress, info, label)


def _train(net, data, config, out, resume, progress, info, label):
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
    for name in ("train", "valid", "test"):
        split = getattr(data, name, None)
        if not isinstance(split, (tuple, list)) or len(split) != 2:
            raise ValueError(f"data.{name}: expected a pair (x, y) of arrays (T, B)")
    x, y, _ = check_inputs(net, data.train[0], data.train[1],
                           net.init_state(np.asarray(data.train[0]).shape[1]), config.loss)
    valid = check_inputs(net, data.valid[0], data.valid[1],
                         net.init_state(np.asarray(data.valid[0]).shape[1]), config.loss)[:2]
    test = check_inputs(net, data.test[0], data.test[1],
                        net.init_state(np.asarray(data.test[0]).shape[1]), config.loss)[:2]
    T, B = x.shape[:2]
    cfg = config
    L_probe = cfg.burnin + cfg.W + 1
    if L_probe > T:
        raise ValueError(f"W, burnin: the probe window burnin + W + 1 = {L_probe} must fit in the "
                         f"T = {T} steps of each training stream")
    if cfg.probes_per_epoch > T:
        raise ValueError(f"probes_per_epoch: expected at most T = {T}, got {cfg.probes_per_epoch}")
    out = None if out is None else Path(out)
    digest = _digest(data)
    for op in ("bptt", "step_losses", "grad_norms"):     # an unavailable backend: before any write
        resolve(op, cfg.backend)

    # --- fresh start or resume -------------------------------------------------------------------
    # Nothing is written before every check has passed.  A resumed run without a checkpoint (stopped
    # before its first epoch ended) starts again from epoch 0 with the settings of its config.json.
    restored = None
    if resume:
        if out is None or not ((out / CHECKPOINT).is_file() or (out / CONFIG).is_file()):
            raise ValueError(f"out: no checkpoint to resume in {out} ({CHECKPOINT} not found)")
        if (out / CHECKPOINT).is_file():
            restored = _restore(out / CHECKPOINT, net, cfg, digest)
        else:
            doc = read_config(out)
            _same_run(out / CONFIG, doc["train"], doc.get("model"), doc.get("data_sha256"),
                      net, cfg, digest)
    else:
        if out is not None:
            check_run_dir(out)
        if out is not None and (out / CHECKPOINT).exists():
            raise ValueError(f"out: {out} already holds a run ({CHECKPOINT}); resume it or choose "
                             "another directory")
    if restored is not None:
        best_params, rng_train, rng_diag, metrics, K, passes, first_epoch, best = restored
    else:
        seeds = np.random.SeedSequence(cfg.seed).spawn(2)     # probes of Algorithm 1 | diagnostics
        rng_train, rng_diag = np.random.default_rng(seeds[0]), np.random.default_rng(seeds[1])
        best_params = {k: v.copy() for k, v in net.params.items()}
        metrics, passes, first_epoch = [], 0.0, 0
        K = cfg.K if not cfg.adaptive else cfg.K0          # None: probe before the first segment
        best = {"valid_ppl": math.inf, "test_ppl": math.nan, "epoch": 0}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, {"train": asdict(cfg), "model": _model_info(net),
                                  "info": info or {}, "data_sha256": digest})

    def checkpoint(epoch):
        meta = {"config": asdict(cfg), "model": _model_info(net), "data_sha256": digest,
                "epoch": epoch, "K": K, "data_passes": passes, "best": best, "metrics": metrics,
                "rng_train": rng_state(rng_train), "rng_diag": rng_state(rng_diag)}
        arrays = {f"param/{k}": v for k, v in net.params.items()}
        arrays.update({f"best/{k}": v for k, v in best_params.items()})
        save_checkpoint(out / CHECKPOINT, arrays, meta)
        write_csv(out / METRICS, metrics, METRIC_COLUMNS)

    def diverged(epoch, chunk, what):
        where = f"epoch {epoch}" + (f", chunk {chunk}" if chunk is not None else "")
        if out is not None and (out / CHECKPOINT).is_file():
            keep = f"the last good checkpoint {out / CHECKPOINT} (epoch {epoch - 1}) is intact"
        else:
            keep = "no checkpoint was written" if out is None else "no epoch had finished, no checkpoint"
        return Diverged(f"training diverged in {where}: {what} (lr={cfg.lr}, K={K}); {keep}",
                        epoch, chunk)

    bopt = cfg.bounds_options()
    edges = np.linspace(0, T, cfg.probes_per_epoch + 1).round().astype(int)   # segment bounds
    bar = tqdm(total=(cfg.epochs - first_epoch) * T, unit="step", disable=not progress,
               desc=label or ("K=%d" % cfg.K if not cfg.adaptive else "delta=%g" % cfg.delta),
               leave=True, dynamic_ncols=True)
    try:
        for epoch in range(first_epoch + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            state = net.init_state(B)                      # each epoch: the streams from S_0 = 0
            loss_sum, steps, K_steps, chunk_no, probe = 0.0, 0, 0.0, 0, None
            for a, b in zip(edges[:-1], edges[1:]):
                if cfg.adaptive and (K is None or epoch > 1 or a > 0):
                    # Algorithm 1, lines 3-7: phi_k by BPTT(W, 1) (Eq. 18), K_n = kappa_hat (Eq. 25)
                    phi = probe_phi(net, x, y, cfg.W, cfg.burnin, rng_train, cfg.loss, cfg.backend)
                    if not np.all(np.isfinite(phi)):
                        raise diverged(epoch, chunk_no + 1, "non-finite gradient norms in the probe")
                    probe = bounds.kappa_hat(phi, cfg.delta, cfg.K_min, cfg.K_max, **bopt)
                    K = probe.K
                    passes += L_probe / T                  # §5: count the probe's data
                # Algorithm 1, lines 8-12: BPTT(2K, K) on the chunks S_m of Eq. (17), state carried
                for chunk, res in stream(net, x[a:b], y[a:b], state, K, 2 * K, cfg.loss, cfg.backend):
                    chunk_no += 1
                    at = f"(loss={res.loss!r}) at steps {a + chunk.start + 1}..{a + chunk.stop} of {T}"
                    if not math.isfinite(res.loss):
                        raise diverged(epoch, chunk_no, f"non-finite loss {at}")
                    if not _finite_grads(res.grads):
                        raise diverged(epoch, chunk_no, f"non-finite gradient {at}")
                    # Algorithm 1, line 11: theta <- theta - gamma sqrt(K_n) g_hat
                    sgd_step(net.params, res.grads, cfg.lr, K, cfg.weight_decay, cfg.clip)
                    if not _finite_grads(net.params):
                        raise diverged(epoch, chunk_no, f"non-finite parameters after the SGD step {at}")
                    state = res.state
                    n = chunk.stop - chunk.start
                    loss_sum += res.loss * n
                    steps += n
                    bar.update(n)
                    bar.set_postfix(loss=f"{loss_sum / steps:.4f}", K=K, refresh=False)
                K_steps += K * (b - a)
                passes += (b - a) / T
            v_loss = _mean_loss(net, valid, cfg.loss, cfg.backend)
            t_loss = _mean_loss(net, test, cfg.loss, cfg.backend)
            v_ppl, t_ppl = float(np.exp(v_loss)), float(np.exp(t_loss))     # PPL = exp(mean L_t)
            if not (math.isfinite(v_ppl) and math.isfinite(t_ppl)):
                raise diverged(epoch, None, "non-finite validation/test perplexity (mean losses "
                               f"{v_loss!r}, {t_loss!r})")
            if v_ppl < best["valid_ppl"]:                  # §5: report test PPL at the best valid PPL
                best = {"valid_ppl": v_ppl, "test_ppl": t_ppl, "epoch": epoch}
                best_params = {k: v.copy() for k, v in net.params.items()}
            d_est, b_est = _delta_estimates(net, x, y, K, cfg, rng_diag, bopt)
            row = {
                "epoch": epoch, "data_passes": passes, "K": int(K),
                "delta_hat": _q(d_est, 50), "beta_hat": _q(b_est, 50),
                "train_loss": loss_sum / T, "valid_ppl": v_ppl, "test_ppl": t_ppl,
                "seconds": time.perf_counter() - t0, "valid_loss": v_loss, "test_loss": t_loss,
                "best_valid_ppl": best["valid_ppl"], "test_ppl_at_best": best["test_ppl"],
                "best_epoch": best["epoch"], "K_mean": K_steps / T,
                "delta_hat_lo": _q(d_est, 2.5), "delta_hat_hi": _q(d_est, 97.5),
                "probe_beta_hat": None if probe is None else float(probe.beta_hat),
                "probe_delta_hat": None if probe is None else float(probe.delta_hat),
                "probe_flag": None if probe is None else probe.flag,
                "lr": cfg.lr * math.sqrt(K),
            }
            metrics.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", K=K, valid_ppl=f"{v_ppl:.4f}")
            if out is not None:
                checkpoint(epoch)
    finally:
        bar.close()

    # Figure 3: phi_k at the best parameters (after the last epoch; deterministic on resume)
    best_net = net.copy()
    for k in best_net.params:
        best_net.params[k][...] = best_params[k]
    phi_best = probe_phi(best_net, x, y, cfg.W, cfg.burnin, rng_diag, cfg.loss, cfg.backend)
    if out is not None:
        save_checkpoint(out / PHI_BEST, {"phi": phi_best}, {"best_epoch": best["epoch"]})
    return TrainResult(metrics, {k: v.copy() for k, v in net.params.items()}, best_params,
                       best["epoch"], phi_best, out)


def _q(a, pct):
    """The pct-th percentile without interpolation (estimates may be inf: beta_hat >= 1)."""
    return float(np.percentile(a, pct, method="inverted_cdf")) if len(a) else math.nan


def _delta_estimates(net, x, y, K, cfg, rng, bopt):
    """delta_hat(K) (Eq. 24) and beta_hat (Eq. 21/22) on ``cfg.delta_probes`` fresh probes."""
    d, b = [], []
    for _ in range(cfg.delta_probes):
        phi = probe_phi(net, x, y, cfg.W, cfg.burnin, rng, cfg.loss, cfg.backend)
        if not np.all(np.isfinite(phi)):
            return [math.nan], [math.nan]
        p = bounds.P_hat(phi)                                                        # Eq. (20)
        b.append(bounds.beta_hat(p, bopt["tau_hat"], bopt["method"], bopt["alpha"],  # Eq. (21)/(22)
                                 bopt["variant"]))
        d.append(float(bounds.delta_hat(phi, K, **bopt)))                             # Eq. (24)
    return d, b


# --- the copy task of §5.1 ---------------------------------------------------------------------
COPY_DEFAULTS = dict(m=10, m_min=None, n_symbols=6, T_train=256_000, T_eval=64_000, batch=64,
                     embed=6, hidden=50, layers=2, data_seed=0)


def train_copy(out=None, *, K=None, delta=None, m=10, m_min=None, n_symbols=6, T_train=256_000,
               T_eval=64_000, batch=64, embed=6, hidden=50, layers=2, data_seed=0, seed=0,
               resume=False, progress=True, label=None, **options):
    """The synthetic copy experiment of §5.1: a 2-layer LSTM (embedding 6, hidden 50, linear
    read-out) trained on :func:`npbptt.data.copy_task` streams by :func:`train`.

    ``T_train``/``T_eval``: total steps of the train and of the valid/test streams (split into
    ``batch`` parallel streams); ``data_seed`` seeds the data, ``seed`` the initial parameters and
    the run's random choices; other keyword arguments are :class:`TrainConfig` fields.
    """
    from .data import copy_task
    from .model import LSTM
    config = TrainConfig(K=K, delta=delta, seed=seed, **options)
    data = copy_task(T_train, T_eval, T_eval, m=m, m_min=m_min, n_symbols=n_symbols, batch=batch,
                     seed=data_seed)
    net = LSTM(embed, hidden, layers, data.n_outputs, vocab_size=data.vocab_size, seed=seed)
    info = {"task": "copy", "m": m, "m_min": m_min, "n_symbols": n_symbols, "T_train": T_train,
            "T_eval": T_eval, "batch": batch, "embed": embed, "hidden": hidden, "layers": layers,
            "data_seed": data_seed, "seed": seed, "name": data.name}
    return train(net, data, config, out=out, resume=resume, progress=progress, info=info,
                 label=label)


_TASKS = {"copy": train_copy}
_INFO_ONLY = ("task", "name", "seed")


def resume_run(out, epochs=None, backend=None, progress=True, label=None):
    """Continue the run in ``out`` from its checkpoint (``config.json`` rebuilds the task),
    optionally with more ``epochs`` or another ``backend``; a run stopped before its first
    checkpoint starts again from epoch 0 with its settings.  Returns :class:`TrainResult`."""
    out = Path(out)
    if not (out / CONFIG).is_file():
        raise ValueError(f"out: {out} holds no run to resume ({CONFIG} not found)")
    cfg = read_config(out)
    info, tc = dict(cfg["info"]), dict(cfg["train"])
    task = info.get("task")
    if task not in _TASKS:
        raise ValueError(f"out: {out}/{CONFIG} names an unknown task {task!r}")
    if epochs is not None:
        tc["epochs"] = epochs
    if backend is not None:
        tc["backend"] = backend
    seed = tc.pop("seed")
    kw = {k: v for k, v in info.items() if k not in _INFO_ONLY}
    return _TASKS[task](out, seed=seed, resume=True, progress=progress, label=label, **kw, **tc)


def load_metrics(out):
    """The rows of ``out/metrics.csv`` (numbers parsed), [] when absent.  Raises
    :class:`RunFileError` naming the file when it is not a complete metrics file of
    :data:`METRIC_COLUMNS` with epochs 1, 2, ... and numeric perplexities."""
    path = Path(out) / METRICS
    if not path.is_file():
        return []
    rows = read_csv(path, METRIC_COLUMNS)
    for i, r in enumerate(rows, start=1):
        if r["epoch"] != i:
            raise RunFileError(f"{path}: line {i + 1}: epoch {r['epoch']!r}, expected {i}")
        for c in ("data_passes", "K", "valid_ppl", "test_ppl"):
            if not _is_real(r[c]):
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


def format_metrics(metrics, columns=("epoch", "data_passes", "K", "delta_hat", "beta_hat",
                                     "train_loss", "valid_ppl", "test_ppl", "seconds")):
    """A Markdown table of per-epoch metrics, then the best epoch (lowest validation PPL)."""
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---:" for _ in columns) + "|"
    nd = {"data_passes": 3, "seconds": 1, "delta_hat": 3, "beta_hat": 3}
    lines = [head, rule] + ["| " + " | ".join(_fmt(r.get(c), nd.get(c, 4)) for c in columns) + " |"
                            for r in metrics]
    if metrics:
        r = min(metrics, key=lambda r: r["valid_ppl"])
        lines.append("")
        lines.append(f"best valid PPL {_fmt(r['valid_ppl'])} at epoch {r['epoch']} "
                     f"(data passes {_fmt(r['data_passes'], 3)}): test PPL {_fmt(r['test_ppl'])}")
    return "\n".join(lines)
