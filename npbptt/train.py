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
* A network with dropout (``net.dropout > 0``) draws its masks chunk by chunk from the run's
  dropout generator (:func:`npbptt.stream`); probes, evaluation and Figure 3 run without dropout.
* All randomness comes from ``np.random.SeedSequence(config.seed)`` (:class:`npbptt.runfiles.RunState`):
  the generators' states are checkpointed, so a resumed run repeats an uninterrupted run bit for
  bit (same CPU and BLAS, any backend whose kernels equal the reference bitwise, any thread count).

The run directory's files are :mod:`npbptt.runfiles`'s; the experiments' models, data and
defaults are :mod:`npbptt.tasks`'s.
"""
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from . import bounds
from .backends import resolve
from .bptt import step_losses, stream
from .checkpoint import save_checkpoint, write_json
from .config import TrainConfig
from .probe import grad_norms
from .runfiles import (CHECKPOINT, CONFIG, METRIC_COLUMNS, METRICS, PHI_BEST, RunFileError,
                       RunState, check_run_dir, data_digest, format_metrics, load_metrics,
                       model_info, read_config, restore, same_run, save_state)
from .validate import check_inputs

__all__ = ["TrainConfig", "TrainResult", "Diverged", "METRIC_COLUMNS", "train", "probe_phi",
           "sgd_step", "train_epoch", "check_data", "load_metrics", "format_metrics", "read_config",
           "check_run_dir", "RunFileError", "CHECKPOINT", "METRICS", "CONFIG", "PHI_BEST"]

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
def probe_phi(net, x, y, W, burnin, rng, loss="cross_entropy", backend=None, norm="state"):
    """Algorithm 1, lines 3-4: phi (W + 1, B), phi[k, b] = ||d ell^(b)_s / d S_{s-k}|| (Eq. 18)
    (``norm="param"``: psi, :func:`npbptt.grad_norms`).

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
    return grad_norms(net, xw[burnin:], yw[burnin:], state, loss, backend, norm=norm)


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



# --- one epoch of Algorithm 1 ------------------------------------------------------------------
def train_epoch(net, x, y, cfg, st, epoch, on_chunk=None):
    """One pass of Algorithm 1 over the training streams ``x``, ``y`` (T, B), updating
    ``net.params`` in place and ``st`` (:class:`npbptt.runfiles.RunState`: K, data passes).

    For each of the ``cfg.probes_per_epoch`` segments [a, b) of the streams:

      lines 3-4   phi_k = ||d ell_s / d S_{s-k}||, k = 0..W, on random windows      (Eq. 18)
      lines 5-7   K_n = kappa_hat(delta) from phi                              (Eqs. 20-25)
      lines 8-10  for each chunk S_m of K_n steps: g_hat = BPTT(2K_n, K_n)      (Eqs. 15-17)
      line 11     theta <- theta - gamma sqrt(K_n) g_hat

    (fixed K: lines 8-11 only).  ``on_chunk(n_steps, loss)`` is called after every step of SGD.
    Returns (loss_sum, K_steps, probe): the step-weighted sum of training losses and of K, and the
    last truncation probe (None for fixed K).  Raises :class:`Diverged`.
    """
    T, B = x.shape[:2]
    edges = np.linspace(0, T, cfg.probes_per_epoch + 1).round().astype(int)
    bopt = cfg.bounds_options()
    state = net.init_state(B)                          # each epoch: the streams from S_0 = 0
    loss_sum, K_steps, chunk_no, probe = 0.0, 0.0, 0, None
    for a, b in zip(edges[:-1], edges[1:]):
        if cfg.adaptive and (st.K is None or epoch > 1 or a > 0):
            phi = probe_phi(net, x, y, cfg.W, cfg.burnin, st.rng_train, cfg.loss, cfg.backend,
                            cfg.norm)
            if not np.all(np.isfinite(phi)):
                raise _diverged(cfg, st, epoch, chunk_no + 1, "non-finite gradient norms in the probe")
            probe = bounds.kappa_hat(phi, cfg.delta, cfg.K_min, cfg.K_max, **bopt)
            st.K = probe.K
            st.passes += (cfg.burnin + cfg.W + 1) / T      # §5: count the probe's data
        K = st.K
        # dropout (net.dropout > 0): masks drawn chunk by chunk from the run's generator
        chunks = stream(net, x[a:b], y[a:b], state, K, 2 * K, cfg.loss, cfg.backend,
                        rng=st.rng_dropout)
        for chunk, res in chunks:
            chunk_no += 1
            at = f"(loss={res.loss!r}) at steps {a + chunk.start + 1}..{a + chunk.stop} of {T}"
            if not math.isfinite(res.loss):
                raise _diverged(cfg, st, epoch, chunk_no, f"non-finite loss {at}")
            if not _finite(res.grads):
                raise _diverged(cfg, st, epoch, chunk_no, f"non-finite gradient {at}")
            sgd_step(net.params, res.grads, cfg.lr, K, cfg.weight_decay, cfg.clip)
            if not _finite(net.params):
                raise _diverged(cfg, st, epoch, chunk_no, f"non-finite parameters after the SGD step {at}")
            state = res.state
            n = chunk.stop - chunk.start
            loss_sum += res.loss * n
            if on_chunk is not None:
                on_chunk(n, loss_sum, K)
        K_steps += K * (b - a)
        st.passes += (b - a) / T
    return loss_sum, K_steps, probe


def _finite(arrays):
    """True when every array of the dict is finite (gradients, parameters)."""
    return all(np.isfinite(g).all() for g in arrays.values())


def _diverged(cfg, st, epoch, chunk, what):
    where = f"epoch {epoch}" + (f", chunk {chunk}" if chunk is not None else "")
    return Diverged(f"training diverged in {where}: {what} (lr={cfg.lr}, K={st.K})", epoch, chunk)


def _mean_loss(net, split, loss, backend):
    x, y = split
    L, _ = step_losses(net, x, y, net.init_state(x.shape[1]), loss, backend)
    return float(L.mean())


# --- the loop ----------------------------------------------------------------------------------
def train(net, data, config, out=None, resume=False, progress=True, info=None, label=None,
          blas_threads=1, metrics_fn=None):
    """Train ``net`` in place with SGD and BPTT(2K, K): fixed K, or Algorithm 1 (module docstring).

    Parameters
    ----------
    net : npbptt.RNN or npbptt.LSTM (its parameters are updated in place)
    data : an object with ``train``, ``valid``, ``test`` splits, each ``(x, y)`` of shape (T, B)
        (e.g. :func:`npbptt.data.copy_task`); the B columns are parallel streams
    config : :class:`TrainConfig`
    out : run directory or None.  With a directory: ``config.json`` (``config``, the model,
        ``info``), ``metrics.csv`` (:data:`METRIC_COLUMNS`), ``checkpoint.npz`` after every epoch
        and ``phi_best.npz`` at the end, each written atomically (:mod:`npbptt.runfiles`).
    resume : continue the run in ``out`` from its checkpoint; ``config`` must equal the stored one
        except ``epochs`` and ``backend``.  The continuation equals an uninterrupted run.
    progress : show a tqdm bar (loss and K) on a terminal; one line per epoch on stderr otherwise
    info : JSON-able dict stored in ``config.json`` (the task's settings, :mod:`npbptt.tasks`)
    label : the progress bar's description
    blas_threads : BLAS threads during training (None: leave as is).  The products are small
        (batch x hidden): one thread is fastest, and several fight each other on a busy machine.
    metrics_fn : None, or ``metrics_fn(net, valid, test, backend) -> dict`` of a task's own
        metrics, added after :data:`METRIC_COLUMNS` to every row of ``metrics.csv`` (e.g. the
        Book Order task's ``valid_nll``, ``test_rmse``); the best epoch stays the one of the
        lowest validation loss.

    Returns
    -------
    :class:`TrainResult`.  Raises :class:`Diverged` (non-finite loss/gradient/perplexity, naming
    the epoch and chunk; the last checkpoint stays intact) and ValueError on bad input.
    """
    # Overflow on the way to divergence is detected and reported by Diverged, not warned about.
    with np.errstate(over="ignore", invalid="ignore"):
        if blas_threads is None:
            return _train(net, data, config, out, resume, progress, info, label, metrics_fn)
        with threadpool_limits(limits=blas_threads, user_api="blas"):
            return _train(net, data, config, out, resume, progress, info, label, metrics_fn)


def check_data(net, data, cfg):
    """The validated (x, y) of every split, and the probe window's fit."""
    splits = []
    for name in ("train", "valid", "test"):
        split = getattr(data, name, None)
        if not isinstance(split, (tuple, list)) or len(split) != 2:
            raise ValueError(f"data.{name}: expected a pair (x, y) of arrays (T, B)")
        x = np.asarray(split[0])
        if x.ndim < 2:
            raise ValueError(f"data.{name}: x must have shape (T, B, ...), got {x.shape}")
        splits.append(check_inputs(net, split[0], split[1], net.init_state(x.shape[1]), cfg.loss)[:2])
    T = splits[0][0].shape[0]
    if cfg.burnin + cfg.W + 1 > T:
        raise ValueError(f"W, burnin: the probe window burnin + W + 1 = {cfg.burnin + cfg.W + 1} "
                         f"must fit in the T = {T} steps of each training stream")
    if cfg.probes_per_epoch > T:
        raise ValueError(f"probes_per_epoch: expected at most T = {T}, got {cfg.probes_per_epoch}")
    return splits


def _start(net, cfg, out, resume, digest):
    """The run's state: fresh, or restored from ``out`` (checked before anything is written)."""
    if resume:
        if out is None or not ((out / CHECKPOINT).is_file() or (out / CONFIG).is_file()):
            raise ValueError(f"out: no checkpoint to resume in {out} ({CHECKPOINT} not found)")
        if (out / CHECKPOINT).is_file():
            return restore(out / CHECKPOINT, net, cfg, digest)
        # stopped before its first epoch ended: start again from epoch 0 with its settings
        doc = read_config(out)
        same_run(out / CONFIG, doc["train"], doc.get("model"), doc.get("data_sha256"), net, cfg, digest)
    elif out is not None:
        check_run_dir(out)
        if (out / CHECKPOINT).exists():
            raise ValueError(f"out: {out} already holds a run ({CHECKPOINT}); resume it or choose "
                             "another directory")
    return RunState.fresh(net, cfg)


def _train(net, data, config, out, resume, progress, info, label, metrics_fn):
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
    cfg = config
    (x, y), valid, test = check_data(net, data, cfg)
    T = x.shape[0]
    out = None if out is None else Path(out)
    digest = data_digest(data)
    for op in ("bptt", "step_losses", "grad_norms"):     # an unavailable backend: before any write
        resolve(op, cfg.backend)
    st = _start(net, cfg, out, resume, digest)          # nothing written before this has passed
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, {"train": asdict(cfg), "model": model_info(net),
                                  "info": info or {}, "data_sha256": digest})
    # a bar on a terminal; in a log (stderr not a terminal) one line per epoch instead
    lines = progress and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    desc = label or ("K=%d" % cfg.K if not cfg.adaptive else "delta=%g" % cfg.delta)
    bar = tqdm(total=(cfg.epochs - st.epoch) * T, unit="step", disable=not progress or lines,
               desc=desc,
               leave=True, dynamic_ncols=True)
    steps = [0]

    def on_chunk(n, loss_sum, K):
        steps[0] += n
        bar.update(n)
        bar.set_postfix(loss=f"{loss_sum / steps[0]:.4f}", K=K, refresh=False)

    try:
        for epoch in range(st.epoch + 1, cfg.epochs + 1):
            t0, steps[0] = time.perf_counter(), 0
            try:
                loss_sum, K_steps, probe = train_epoch(net, x, y, cfg, st, epoch, on_chunk)
            except Diverged as e:
                raise _where_saved(e, out, epoch) from None
            row = _epoch_metrics(net, x, y, valid, test, cfg, st, epoch, loss_sum, K_steps, probe)
            if not (math.isfinite(row["valid_ppl"]) and math.isfinite(row["test_ppl"])):
                raise _where_saved(_diverged(cfg, st, epoch, None, "non-finite validation/test "
                                   f"perplexity (mean losses {row['valid_loss']!r}, "
                                   f"{row['test_loss']!r})"), out, epoch)
            if metrics_fn is not None:
                row.update(metrics_fn(net, valid, test, cfg.backend))
            row["seconds"] = time.perf_counter() - t0
            st.metrics.append(row)
            st.epoch = epoch
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", K=st.K, valid_ppl=f"{row['valid_ppl']:.4f}")
            if lines:
                print(f"{desc}: epoch {epoch}/{cfg.epochs} K={row['K']} "
                      f"loss={row['train_loss']:.4f} valid_ppl={row['valid_ppl']:.4f} "
                      f"({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
            if out is not None:
                save_state(out, net, cfg, st, digest)
    finally:
        bar.close()

    # Figure 3: phi_k at the best parameters (after the last epoch; deterministic on resume)
    best_net = net.copy()
    for k in best_net.params:
        best_net.params[k][...] = st.best_params[k]
    phi_best = probe_phi(best_net, x, y, cfg.W, cfg.burnin, st.rng_diag, cfg.loss, cfg.backend,
                         cfg.norm)
    if out is not None:
        save_checkpoint(out / PHI_BEST, {"phi": phi_best}, {"best_epoch": st.best["epoch"]})
    return TrainResult(st.metrics, {k: v.copy() for k, v in net.params.items()}, st.best_params,
                       st.best["epoch"], phi_best, out)


def _where_saved(e, out, epoch):
    """``e`` with what is left on disk appended to its message."""
    if out is not None and (out / CHECKPOINT).is_file():
        keep = f"the last good checkpoint {out / CHECKPOINT} (epoch {epoch - 1}) is intact"
    else:
        keep = "no checkpoint was written" if out is None else "no epoch had finished, no checkpoint"
    return Diverged(f"{e}; {keep}", e.epoch, e.chunk)


def _epoch_metrics(net, x, y, valid, test, cfg, st, epoch, loss_sum, K_steps, probe):
    """The metrics row of an epoch (METRIC_COLUMNS); updates the best epoch of ``st``."""
    T = x.shape[0]
    v_loss = _mean_loss(net, valid, cfg.loss, cfg.backend)
    t_loss = _mean_loss(net, test, cfg.loss, cfg.backend)
    v_ppl, t_ppl = float(np.exp(v_loss)), float(np.exp(t_loss))     # PPL = exp(mean L_t)
    if math.isfinite(v_ppl) and math.isfinite(t_ppl) and v_ppl < st.best["valid_ppl"]:
        st.best = {"valid_ppl": v_ppl, "test_ppl": t_ppl, "epoch": epoch}   # §5: test PPL at best valid
        st.best_params = {k: v.copy() for k, v in net.params.items()}
    d_est, b_est = _delta_estimates(net, x, y, st.K, cfg, st.rng_diag, cfg.bounds_options())
    return {
        "epoch": epoch, "data_passes": st.passes, "K": int(st.K),
        "delta_hat": _q(d_est, 50), "beta_hat": _q(b_est, 50),
        "train_loss": loss_sum / T, "valid_ppl": v_ppl, "test_ppl": t_ppl,
        "seconds": None, "valid_loss": v_loss, "test_loss": t_loss,
        "best_valid_ppl": st.best["valid_ppl"], "test_ppl_at_best": st.best["test_ppl"],
        "best_epoch": st.best["epoch"], "K_mean": K_steps / T,
        "delta_hat_lo": _q(d_est, 2.5), "delta_hat_hi": _q(d_est, 97.5),
        "probe_beta_hat": None if probe is None else float(probe.beta_hat),
        "probe_delta_hat": None if probe is None else float(probe.delta_hat),
        "probe_flag": None if probe is None else probe.flag,
        "lr": cfg.lr * math.sqrt(st.K),
    }


def _q(a, pct):
    """The pct-th percentile without interpolation (estimates may be inf: beta_hat >= 1)."""
    return float(np.percentile(a, pct, method="inverted_cdf")) if len(a) else math.nan


def _delta_estimates(net, x, y, K, cfg, rng, bopt):
    """delta_hat(K) (Eq. 24) and beta_hat (Eq. 21/22) on ``cfg.delta_probes`` fresh probes."""
    d, b = [], []
    for _ in range(cfg.delta_probes):
        phi = probe_phi(net, x, y, cfg.W, cfg.burnin, rng, cfg.loss, cfg.backend, cfg.norm)
        if not np.all(np.isfinite(phi)):
            return [math.nan], [math.nan]
        p = bounds.P_hat(phi, bopt["norm"])                                          # Eq. (20)
        b.append(bounds.beta_hat(p, bopt["tau_hat"], bopt["method"], bopt["alpha"],  # Eq. (21)/(22)
                                 bopt["variant"], bopt["norm"]))
        d.append(float(bounds.delta_hat(phi, K, **bopt)))                             # Eq. (24)
    return d, b
