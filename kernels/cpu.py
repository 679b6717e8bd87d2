"""CPU kernels (Numba ``@njit``) for BPTT(K1, K2), the forward losses and the probe of Eq. (18).

Selected by ``backend="numba"`` (the default where numba imports).  The three public functions have
exactly the signatures and return values of the NumPy references they must equal:

    bptt(net, x, y, S, K1, K2, loss, masks=None) -> (loss, grads, S_T)   npbptt.bptt.bptt_reference
    step_losses(net, x, y, S, loss, masks=None)  -> (L (T,), S_T)        npbptt.bptt.step_losses_reference
    grad_norms(net, x, y, S, loss)               -> phi (T, B)           npbptt.probe.grad_norms_reference

Inputs are the validated ones (``npbptt.validate.check_inputs``; ``S`` the internal state tuple)
and the network one that :func:`npbptt.kernels.shared.supports` accepts: ``npbptt.backends.resolve``
hands every other network (a subclass that changes the recurrence) to the reference, so none is
ever silently run as the stock one.  A tied read-out runs as its untied view
(:func:`npbptt.kernels.shared.untied`, the embedding's gradient the sum of both uses).
``bptt`` and ``step_losses`` also take the reference's keyword ``masks`` (dropout,
:func:`takes_masks`): a masked call runs the layer-by-layer path.

How the work is laid out (the algorithm is the reference's; only the order of independent
operations changes, so results agree to round-off; the measurements behind each choice are in
docs/kernels.md):

* the batch is split into chunks of rows fixed by the batch size alone (:func:`_chunks`), and a
  chunk is one task of the thread runtime (:mod:`.runtime`: which thread runs it never changes
  a bit of the result): a task runs the whole call -- forward, read-out, backward, its part of
  every gradient -- on its rows, since the examples of a batch never interact; the per-chunk
  gradients are summed in chunk order.  BLAS is single-threaded meanwhile;
* small networks (every layer's W_ih and W_hh within _FUSE_BYTES, :func:`_small_path`) run the
  small path, :mod:`.cpu_small`: each chunk in two kernel calls, feature-major, step by step;
* every other network, and every call with dropout masks, runs layer by layer over all steps,
  :mod:`.cpu_layers`: only the recurrences are jitted loops, the rest GEMMs over all steps.

The first call compiles the kernels (a few seconds per float type) and stores them in numba's
on-disk cache; later processes load them (:func:`warmup` forces both).
"""
import numpy as np

from .cpu_layers import advance as _advance, batch_rows as _rows, bptt_rows as _bptt_rows
from .cpu_layers import grad_norms_rows as _grad_norms_rows, step_losses_rows as _step_losses_rows
from .cpu_small import small_call as _small_call
from .shared import supports
from .shared import untied as _untied
from .runtime import blas_single_thread, release_workspace
from .runtime import parallel as _parallel

__all__ = ["bptt", "step_losses", "grad_norms", "supports", "takes_masks", "blas_single_thread", "release_workspace",
           "warmup"]

# The batch is split into chunks of about _CHUNK_ROWS rows, of at least _MIN_ROWS_PER_CHUNK, at
# most _MAX_CHUNKS of them (see _chunks): 16 rows keep the float32 small path (_SMALL_MIN_ROWS32).
_CHUNK_ROWS = 32
_MIN_ROWS_PER_CHUNK = 16
_MAX_CHUNKS = 16
# Networks whose every layer's W_ih and W_hh take at most this many bytes run the small path
# (see _fused): a quarter of a core's L2 cache here, so that weights, their gradients and a step's
# rows stay in it.
_FUSE_BYTES = 1 << 18
# float32 chunks narrower than this run layer by layer even when the network is small (_small_path).
_SMALL_MIN_ROWS32 = 16


def _chunks(net, B):
    """The batch's row ranges, each computed as one task (``npbptt.kernels.runtime``): fixed by the
    batch size B alone, never by the thread count, so that every result is bitwise the same on 1
    or 64 threads (runtime contract 1).  Chunks of about _CHUNK_ROWS rows, but two once the batch
    has 2 * _MIN_ROWS_PER_CHUNK rows, at most _MAX_CHUNKS, the rows spread evenly: B = 32 gives
    2 x 16, 64 gives 2 x 32, 128 gives 4 x 32.  Every chunk uses a single-threaded BLAS, also for
    large layers.  Why these sizes (measurements): docs/kernels.md, "Timings behind the choices"."""
    n = min(_MAX_CHUNKS, max(B // _CHUNK_ROWS, min(2, B // _MIN_ROWS_PER_CHUNK)))
    if n <= 1:
        return [(0, B)]
    return [(c * B // n, (c + 1) * B // n) for c in range(n)]


def _combine_states(parts):
    """Concatenate per-chunk internal states (tuples of (L, Bc, H)) along the batch."""
    return tuple(np.concatenate([p[i] for p in parts], axis=1) for i in range(len(parts[0])))


def _combine_grads(parts, names):
    """Sum the per-chunk gradients (the chunks' examples are disjoint terms of the batch sum) into
    fresh arrays, in the order of ``names``."""
    out = {}
    for n in names:
        out[n] = parts[0][n].copy() if len(parts) == 1 else np.add(parts[0][n], parts[1][n])
        for g in parts[2:]:
            out[n] += g[n]
    return out


# --- which path: small networks or layer by layer ------------------------------------------------
def _fused(net, l):
    """Whether layer l is small: its W_ih and W_hh fit in _FUSE_BYTES, so that it can compute its
    input projection W_ih x_t, its weight gradients and its input gradient step by step while
    the step's rows are in cache (a large layer would stream its weights and their gradients
    from memory at every step; it does them as GEMMs over all steps instead)."""
    n_in = net.input_size if l == 0 else net.hidden_size
    G, H = net.gates, net.hidden_size
    return G * H * (n_in + H) * net.dtype.itemsize <= _FUSE_BYTES


def _small_path(net, chunks):
    """Whether to run the small path (:func:`.cpu_small.small_call`): every layer small
    (:func:`_fused`) and, for float32, every chunk at least _SMALL_MIN_ROWS32 rows wide
    (feature-major, the batch is the GEMMs' N dimension, which BLAS's float32 kernels process 16
    columns at a time; measurements: docs/kernels.md, "Timings behind the choices")."""
    if np.dtype(net.dtype) == np.float32 and min(r1 - r0 for r0, r1 in chunks) < _SMALL_MIN_ROWS32:
        return False
    return all(_fused(net, l) for l in range(net.num_layers))


# --- the three operations ------------------------------------------------------------------------
def takes_masks(op, net):
    """Whether this module's ``op`` takes dropout masks (the keyword ``masks``, as the reference)
    for ``net``: ``bptt`` and ``step_losses`` of every network :func:`supports` accepts (a masked
    call runs layer by layer, :mod:`.cpu_layers`); never the probe, which has no dropout.
    Asked by ``npbptt.backends.resolve``."""
    return op in ("bptt", "step_losses") and supports(net)


def bptt(net, x, y, S, K1, K2, loss, masks=None):
    """BPTT(K1, K2) on one chunk by recursion (16); must equal ``npbptt.bptt.bptt_reference``
    (same arguments, same (loss, grads, S_T)).  A tied network runs as its untied view
    (``shared.untied``); with dropout ``masks`` the layer-by-layer path runs, whatever the
    network's size (the small path's kernels take no masks)."""
    net, fold = _untied(net)
    value, grads, S_T = _bptt(net, x, y, S, K1, K2, loss, masks)
    return value, (grads if fold is None else fold(grads)), S_T


def _bptt(net, x, y, S, K1, K2, loss, masks):
    T, B = x.shape[:2]
    K1 = min(K1, T - 1)
    t0 = T - 1 - K1                                      # the state entering step t0 is constant
    Tw = K1 + 1
    chunks = _chunks(net, B)
    if masks is None and _small_path(net, chunks):
        if t0 > 0:                                       # the state entering the window
            S = _combine_states(_parallel(
                lambda r0, r1: _advance(net, _rows(x[:t0], r0, r1), tuple(s[:, r0:r1] for s in S)),
                chunks))
        call, gout, S_out = _small_call(net, x[t0:], y[T - K2:], S, chunks, K2, loss,
                                        1.0 / (B * K2), False, Tw * B)
        return float(call.val[0]), call.grads(gout), S_out

    parts = _parallel(lambda r0, r1: _bptt_rows(net, x, y, S, t0, K2, loss, masks, B, r0, r1),
                      chunks)
    ell_sum = sum(p[0] for p in parts)                   # per step, over the whole batch
    value = float(np.sum(ell_sum / B)) / K2
    grads = _combine_grads([p[1] for p in parts], list(net.params))
    return value, grads, _combine_states([p[2] for p in parts])


def step_losses(net, x, y, S, loss, masks=None):
    """Forward pass only: the batch-mean loss of every step (T,) and the final state; must equal
    ``npbptt.bptt.step_losses_reference`` (with ``masks``: of the masked network)."""
    net, _ = _untied(net)
    B = x.shape[1]
    parts = _parallel(lambda r0, r1: _step_losses_rows(net, x, y, S, loss, masks, r0, r1),
                      _chunks(net, B))
    L = (sum(p[0] for p in parts) / B).astype(np.float64)  # L_t = mean_b ell_t^(b)
    return L, _combine_states([p[1] for p in parts])


def grad_norms(net, x, y, S, loss):
    """phi (T, B), phi[k, b] = ||d ell_T^(b) / d S_{T-k}|| (Eq. 18) by BPTT(T-1, 1); must equal
    ``npbptt.probe.grad_norms_reference`` (no dropout: the probe measures the stock network)."""
    net, _ = _untied(net)
    T, B = x.shape[:2]
    chunks = _chunks(net, B)
    if _small_path(net, chunks):
        call, _, _ = _small_call(net, x, y[T - 1:], S, chunks, 1, loss, 1.0, True, T * B)
        return np.sqrt(call.sq[::-1]).astype(np.float64)   # sq[t] = ||b for S_t||^2; phi[k]: S_{T-k}

    sq = np.concatenate(_parallel(lambda r0, r1: _grad_norms_rows(net, x, y, S, loss, r0, r1), chunks),
                        axis=1)
    return np.sqrt(sq[::-1]).astype(np.float64)          # phi[k] for S_{T-k}: k = T-1-t


def warmup(dtypes=(np.float64, np.float32)):
    """Compile (or load from numba's cache) every CPU kernel for ``dtypes`` on tiny problems:
    small networks (the small path, :func:`_small_path`) and networks with a large layer (the
    layer-by-layer path), RNN and LSTM, both losses."""
    from npbptt.model import LSTM, RNN
    rng = np.random.default_rng(0)
    B = 2 * max(_MIN_ROWS_PER_CHUNK, _SMALL_MIN_ROWS32)
    for dt in dtypes:
        for net in (LSTM(2, 2, 1, 3, vocab_size=3, dtype=dt, seed=0), RNN(2, 2, 1, 3, dtype=dt, seed=0),
                    LSTM(2, 128, 1, 3, vocab_size=3, dtype=dt, seed=0),     # > _FUSE_BYTES
                    RNN(2, 256, 1, 3, dtype=dt, seed=0)):
            x = rng.integers(0, 3, (3, B)) if net.embedding else rng.standard_normal((3, B, 2)).astype(dt)
            S = net.to_internal(net.init_state(B))
            for loss, y in (("cross_entropy", rng.integers(0, 3, (3, B))),
                            ("mse", rng.standard_normal((3, B, 3)).astype(dt))):
                bptt(net, x, y, S, 2, 2, loss)
                step_losses(net, x, y, S, loss)
                grad_norms(net, x, y, S, loss)
