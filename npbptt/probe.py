"""The gradient-norm probe of Eq. (18): phi_k = ||d ell_s / d S_{s-k}|| for k = 0..R.

Computed, as the paper says, "using the same architecture as BPTT(R, 1)": recursion (16) with
K2 = 1 in one O(T) backward sweep.  The examples of a batch do not interact, so the rows of
b_k = d(sum_b ell_T^(b)) / dS_{T-k} are the per-example gradients d ell_T^(b) / dS_{T-k}.
"""
from dataclasses import dataclass

import numpy as np

from . import backends
from .bptt import _accumulate
from .losses import LOSSES
from .validate import check_inputs

__all__ = ["grad_norms", "grad_norms_reference", "probe", "Probe"]


def _backward_sweep(net, x, y, S, loss, with_params):
    """Yield (k, b_k, G_k) for k = 0..T-1: b_k = d(sum_b ell_T^(b))/dS_{T-k} (tuple of (L, B, H)),
    G_k the batch-mean BPTT(k, 1) gradient (a dict) when ``with_params``, else None."""
    T, B = x.shape[:2]
    caches = []
    for t in range(T):
        S, cache = net.step(S, x[t])
        caches.append(cache)
    h_top = S[0][-1]
    ell, dout = LOSSES[loss](net.readout(h_top), y[T - 1])
    d_readout, dh_top = net.readout_vjp(h_top, dout)
    G = None
    if with_params:
        G = net.zero_grads()
        # direct term of Eq. (2); tied: keyed "embedding.weight" (net.decoder_weight_name)
        _accumulate(G, {k: v / B for k, v in d_readout.items()})
    b = tuple(np.zeros_like(s) for s in S)
    b[0][-1] += dh_top                          # Eq. (16), k = 0: b_0 = d ell_T / dS_T
    for k in range(T):
        t = T - 1 - k
        if with_params or k + 1 < T:
            dtheta, b_next, dx = net.step_vjp(caches[t], b)
        if with_params:                         # Eq. (3): g_k adds b_k . dS_{T-k}/dtheta
            _accumulate(G, {n: v / B for n, v in dtheta.items()})
            net.input_vjp(x[t], dx / B, G)
        yield k, b, G
        if k + 1 < T:
            b = b_next                          # Eq. (16), k >= K2 = 1: b_{k+1} = b_k dS_{T-k}/dS_{T-k-1}


def _row_norms(b):
    """||S^(b)|| over the concatenated state (all layers' h, plus c): tuple of (L, B, H) -> (B,)."""
    return np.sqrt(sum((s * s).sum(axis=(0, 2)) for s in b))


def grad_norms_reference(net, x, y, S, loss):
    """phi (T, B), phi[k, b] = ||d ell_T^(b) / d S_{T-k}|| (Eq. 18) on validated inputs.

    Every fast backend's ``grad_norms`` must equal this function."""
    phi = np.empty(x.shape[:2])
    for k, b, _ in _backward_sweep(net, x, y, S, loss, with_params=False):
        phi[k] = _row_norms(b)
    return phi


def grad_norms(net, x, y, state, loss="cross_entropy", backend=None):
    """The probe of Eq. (18) on one window: per-example gradient norms of the last step's loss
    with respect to the state k steps back.

    Parameters
    ----------
    x, y : the window, (T, B) tokens/targets (or dense (T, B, input_size), mse targets)
    state : the state entering the window's first step

    Returns
    -------
    phi : (T, B) array, phi[k, b] = ||d ell_T^(b) / d S_{T-k}|| for k = 0..T-1, where ell_T^(b)
        is example b's loss at the last step (not divided by the batch size) and S_j the full
        state after step j (all layers' h, plus c for an LSTM, concatenated).  Lags 0..R need
        a window of R + 1 steps; the window's initial state is a constant, as in BPTT(R, 1).
    """
    x, y, S = check_inputs(net, x, y, state, loss)
    return backends.resolve("grad_norms", backend, net)(net, x, y, S, loss)


@dataclass
class Probe:
    """Everything one BPTT(T-1, 1) sweep tells about gradient decay.

    phi        : (T, B) the probe of Eq. (18), as :func:`grad_norms`
    components : dict name -> (T, B): the norm restricted to one part of the state,
                 ``"h_l{l}"`` and (LSTM) ``"c_l{l}"``
    g_norm     : (T,) g_norm[K] = ||P_S[g_K]||, the norm of the batch-mean truncated gradient
                 BPTT(K, 1) of the last step's loss (Eq. 3) -- the left side of Eq. (24)'s
                 simplifying assumption ||P_S[g_K / M]|| ~ P_S[sum_{k<=K} phi_k]
    phi_cum    : (T,) P_S[sum_{k=0}^{K} phi_k], the right side of that assumption
    """
    phi: np.ndarray
    components: dict
    g_norm: np.ndarray
    phi_cum: np.ndarray


def probe(net, x, y, state, loss="cross_entropy"):
    """The NumPy probe with per-component norms and the cumulative-gradient quantity of Eq. (24)
    (see :class:`Probe`); ``phi`` equals :func:`grad_norms`."""
    x, y, S = check_inputs(net, x, y, state, loss)
    T, B = x.shape[:2]
    names = [f"{p}_l{l}" for p in ("h", "c")[:net.n_state] for l in range(net.num_layers)]
    phi = np.empty((T, B))
    comps = {n: np.empty((T, B)) for n in names}
    g_norm = np.empty(T)
    for k, b, G in _backward_sweep(net, x, y, S, loss, with_params=True):
        phi[k] = _row_norms(b)
        for n in names:
            part = b[0 if n[0] == "h" else 1][int(n.split("_l")[1])]
            comps[n][k] = np.sqrt((part * part).sum(axis=1))
        g_norm[k] = np.sqrt(sum(float((v * v).sum()) for v in G.values()))
    return Probe(phi, comps, g_norm, np.cumsum(phi.mean(axis=1)))
