"""The gradient-norm probe of Eq. (18): phi_k = ||d ell_s / d S_{s-k}|| for k = 0..R, and its
parameter-space counterpart psi_k = ||d ell_s / d S_{s-k} . dS_{s-k}/dtheta|| (issue 20).

Computed, as the paper says, "using the same architecture as BPTT(R, 1)": recursion (16) with
K2 = 1 in one O(T) backward sweep.  The examples of a batch do not interact, so the rows of
b_k = d(sum_b ell_T^(b)) / dS_{T-k} are the per-example gradients d ell_T^(b) / dS_{T-k}.
"""
from dataclasses import dataclass

import numpy as np

from . import backends
from .bptt import _accumulate
from .cells import ACTIVATIONS
from .losses import LOSSES
from .trees import row_norms as _row_norms, rows as _rows
from .validate import check_inputs

__all__ = ["grad_norms", "grad_norms_reference", "param_norms_reference", "step_param_norms",
           "probe", "Probe", "NORMS"]

NORMS = ("state", "param")


def check_norm(norm):
    """``norm`` checked: "state" (phi, Eq. 18, the paper) or "param" (psi, issue 20)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} ('state': phi of Eq. (18); 'param': psi, "
                         f"the lag's term in parameter space), got {norm!r}")
    return norm


def _backward_sweep(net, x, y, S, loss, with_params):
    """Yield (k, b_k, G_k, cache_k) for k = 0..T-1 (cache_k that of the step producing S_{T-k}): b_k = d(sum_b ell_T^(b))/dS_{T-k} (tuple of (L, B, H)),
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
        yield k, b, G, caches[t]
        if k + 1 < T:
            b = b_next                          # Eq. (16), k >= K2 = 1: b_{k+1} = b_k dS_{T-k}/dS_{T-k-1}


def grad_norms_reference(net, x, y, S, loss):
    """phi (T, B), phi[k, b] = ||d ell_T^(b) / d S_{T-k}|| (Eq. 18) on validated inputs.

    Every fast backend's ``grad_norms`` must equal this function."""
    phi = np.empty(x.shape[:2])
    for k, b, _, _ in _backward_sweep(net, x, y, S, loss, with_params=False):
        phi[k] = _row_norms(b)
    return phi


def _stock(net):
    """True for an RNN / LSTM whose step, its VJP and its input are the stock ones of
    npbptt.model (cells of npbptt.cells): :func:`step_param_norms` then uses their rank-one
    structure.  Anything else (e.g. ResettingRNN) takes the row-by-row VJP."""
    from .model import _Network
    return net.kind in ("rnn", "lstm") and all(
        getattr(type(net), m, None) is getattr(_Network, m)
        for m in ("step", "step_vjp", "embed", "input_vjp", "layer"))


def step_param_norms(net, cache, b):
    """psi per row: ||b^(r) . dS_t/dtheta|| over every parameter the step uses except the
    read-out's (``decoder.*``), for each row r (example) of one step's ``cache`` (from
    ``net.step``) and the cotangent ``b`` (tuple of (L, rows, H)) of S_t.  (rows,) array.

    Stock RNN / LSTM: per row and layer the step's parameter gradient is rank one per block,
    dW_ih = da x^T, dW_hh = da h_prev^T, db_ih = db_hh = da (da the pre-activation gradient,
    as in npbptt.cells), so ||.||_F^2 = |da|^2 (|x|^2 + |h_prev|^2 + 2 [bias]); the embedding
    row E[x_t] of the row's one token gets dx = da_0 W_ih_0, adding |dx|^2 (tied weights: this
    input use only; the read-out's is excluded).  Other networks (their own step): one
    ``step_vjp`` per row, the squared norms of its parameter gradient and of ``input_vjp``.
    Dropout masks in the cache scale dx as in ``step_vjp`` (the probe itself runs unmasked)."""
    if not _stock(net):
        return _step_param_norms_rows(net, cache, b)
    _, caches, *mask = cache
    sq = 0.0
    dx = None
    for l in reversed(range(net.num_layers)):
        p = net.layer(l)
        dh = b[0][l] if dx is None else b[0][l] + dx     # from step t+1 and from layer l+1
        if net.kind == "lstm":                           # as cells.lstm_step_vjp
            inp, h_prev, c_prev, i, f, g, o, tc = caches[l]
            dc = b[1][l] + dh * o * (1.0 - tc * tc)
            da = np.concatenate([dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f),
                                 dc * i * (1.0 - g * g), dh * tc * o * (1.0 - o)], axis=1)
        else:                                            # as cells.rnn_step_vjp
            inp, h_prev, h = caches[l]
            da = dh * ACTIVATIONS[net.activation][1](h)
        n_in = (inp * inp).sum(axis=1) + (h_prev * h_prev).sum(axis=1)
        if "bias_ih" in p:
            n_in = n_in + 2.0                            # bias_ih and bias_hh both get da
        sq = sq + (da * da).sum(axis=1) * n_in
        dx = da @ p["weight_ih"]
    if mask:
        dx = dx * mask[0]
    if net.embedding:
        sq = sq + (dx * dx).sum(axis=1)                  # the gathered row E[x_t^(r)]
    return np.sqrt(sq)


def _step_param_norms_rows(net, cache, b):
    """:func:`step_param_norms` for any network with row-wise caches: one VJP per row."""
    n = b[0].shape[1]
    out = np.empty(n)
    for r in range(n):
        grads, _, dx = net.step_vjp(_rows(cache, r, r + 1), tuple(a[:, r:r + 1] for a in b))
        emb = {}
        net.input_vjp(_rows(cache, r, r + 1)[0], dx, emb)
        grads.update(emb)
        out[r] = np.sqrt(sum(float((v * v).sum()) for k, v in grads.items()
                             if not k.startswith("decoder.")))
    return out


def param_norms_reference(net, x, y, S, loss):
    """psi (T, B), psi[k, b] = ||d ell_T^(b)/dS_{T-k} . dS_{T-k}/dtheta|| (issue 20) on
    validated inputs: the same sweep as :func:`grad_norms_reference`, every lag's step VJP."""
    psi = np.empty(x.shape[:2])
    for k, b, _, cache in _backward_sweep(net, x, y, S, loss, with_params=False):
        psi[k] = step_param_norms(net, cache, b)
    return psi


def grad_norms(net, x, y, state, loss="cross_entropy", backend=None, norm="state"):
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
        (``norm="state"``, the default: the paper.)
    psi : with ``norm="param"`` (issue 20), (T, B) array, psi[k, b] =
        ||d ell_T^(b)/dS_{T-k} . dS_{T-k}/dtheta||, the norm of lag k's term of the truncated
        gradient (Eq. 15) in parameter space, over every parameter except the read-out's
        (``decoder.*``); dS_{T-k}/dtheta is the derivative of step T-k alone (its use of the
        weights, biases and embedding row; tied weights: the embedding's input use).  Not
        divided by the batch size.  sum_{k>K} E[psi_k] bounds bias(K) with no M and no (A-2).

    Notes
    -----
    norm="param" runs the NumPy reference :func:`param_norms_reference` on every backend for
    now (``npbptt.backends.resolve("grad_norms_param", ...)``); the backend is still checked.
    """
    check_norm(norm)
    x, y, S = check_inputs(net, x, y, state, loss)
    op = "grad_norms" if norm == "state" else "grad_norms_param"
    return backends.resolve(op, backend, net)(net, x, y, S, loss)


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
    psi        : (T, B) the parameter-space norm, as :func:`grad_norms` with ``norm="param"``
    psi_cum    : (T,) P_S[sum_{k=0}^{K} psi_k] >= ||P_S[g_K] - direct read-out term|| (the
                 triangle inequality; the counterpart of phi_cum with M = 1)
    """
    phi: np.ndarray
    components: dict
    g_norm: np.ndarray
    phi_cum: np.ndarray
    psi: np.ndarray = None
    psi_cum: np.ndarray = None


def probe(net, x, y, state, loss="cross_entropy"):
    """The NumPy probe with per-component norms and the cumulative-gradient quantity of Eq. (24)
    (see :class:`Probe`); ``phi`` equals :func:`grad_norms`, ``psi`` its ``norm="param"``."""
    x, y, S = check_inputs(net, x, y, state, loss)
    T, B = x.shape[:2]
    names = [f"{p}_l{l}" for p in ("h", "c")[:net.n_state] for l in range(net.num_layers)]
    phi = np.empty((T, B))
    comps = {n: np.empty((T, B)) for n in names}
    g_norm = np.empty(T)
    psi = np.empty((T, B))
    for k, b, G, cache in _backward_sweep(net, x, y, S, loss, with_params=True):
        phi[k] = _row_norms(b)
        psi[k] = step_param_norms(net, cache, b)
        for n in names:
            part = b[0 if n[0] == "h" else 1][int(n.split("_l")[1])]
            comps[n][k] = np.sqrt((part * part).sum(axis=1))
        g_norm[k] = np.sqrt(sum(float((v * v).sum()) for v in G.values()))
    return Probe(phi, comps, g_norm, np.cumsum(phi.mean(axis=1)), psi, np.cumsum(psi.mean(axis=1)))
