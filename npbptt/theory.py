"""Section 3 made executable: every quantity of Theorem 1 computed exactly on a whole sequence.

For a sequence ``x`` of T steps and B examples from ``state`` (= S_0, a constant), s is uniform on
1..T and b uniform on the batch, and E is the average over the T*B pairs (s, b):

    phi_k(s, b) = ||d ell_s^(b) / dS_{s-k}||   for s - k >= 1, 0 otherwise     (§3.1)
    g_hat_K(s, b) = d ell_s^(b)/dtheta (read-out)
                    + sum_{k=0}^{K} d ell_s^(b)/dS_{s-k} . dH_{s-k}/dtheta        (Eq. 3)
    g = E[g_hat_{T-1}] = gradient of (1/T) sum_s L_s,  L_s = mean_b ell_s^(b)     (Eq. 2)
    bias(K) = ||E[g_hat_K] - g||,   relative_bias(K) = bias(K) / ||g||
    M = max_{t, b} ||dH(S_{t-1}, x_t; theta)/dtheta||_2                            (A-2)
    E(K), Delta(K) as printed in Theorem 1, kappa(delta) of Eq. (9).

S_j is the full state after step j (every layer's h, plus c for an LSTM, concatenated) and
dH_j/dtheta the Jacobian of the network step j with respect to every parameter the state update
uses (the recurrent layers and the embedding), at fixed S_{j-1}.

How it is computed (one forward pass, then vector-Jacobian products ``net.step_vjp`` only):

* the lag sweep: the per-example cotangents d^j_t = d ell_{t+j} / dS_t of *all* sources s = t + j
  are advanced one lag at a time, b^{j+1} = b^j . dS_t/dS_{t-1} (recursion (16), K2 = 1), for
  every t at once: lag j is ONE batched ``step_vjp`` on the caches of steps 1..T-j stacked along
  the batch axis (examples never interact, so the stacked rows are independent).  It yields
  phi_j(s, b) for every s (the row norms), and the lag-j parameter term
  G_j = E[d ell_s/dS_{s-j} . dH_{s-j}/dtheta] (the same call's parameter VJP).  Lags 0..K cost
  O(T*K); E[g_hat_K] = read-out term + sum_{j<=K} G_j.
* the tail: g - E[g_hat_K] = E[sum_{k>K} ...] = sum_t r_t . dH_t/dtheta / (T B) with
  r_t = sum_{s>t+K} d ell_s/dS_t = a_{t+K+1} . dS_{t+K+1}/dS_t, a the full adjoint
  (a_t = e_t + a_{t+1} . dS_{t+1}/dS_t); K+1 batched VJPs move every a_u back K+1 steps at
  once.  O(T*K), and the bias is summed from its own terms (no cancellation: it is exactly 0
  when the Jacobian products vanish, as for the nilpotent RNN).
* M: the Jacobian of one step with respect to the parameters, per example, row by row from
  VJPs of the state basis vectors, and its largest singular value (from the small Gram matrix).

Notes
-----
* State convention (as ``npbptt.bptt``): d/dS_j perturbs S_j as the input of step j+1 and of
  the read-out at j; for an LSTM, d/dc_j excludes the path c_j -> h_j inside step j.  Hence
  sum_{k=0}^{s-1} d ell_s/dS_{s-k} . dH_{s-k}/dtheta is the whole recurrent gradient of ell_s
  (Eq. 2's upper limit s is the lag of S_0, a constant: no term).
* Eq. (3) includes the lags k = 0..K: g_hat_K(s, b) is ``bptt(x[:s], K1=K, K2=1)`` for the
  single example b, the state entering step s-K (= S_{s-K-1}) held constant; g_hat_K = g_hat
  for K >= s-1.  The bias therefore collects the lags k = K+1..s-1:
  bias(K) <= M sum_{k >= K+1} E[phi_k]   (B.2-B.3).
* M of (A-2) covers the state-update parameters only: the read-out's direct term dL_s/dtheta
  of Eqs. (2)-(3) is never truncated and cancels in the bias.  Per example, M bounds the
  operator norm of b -> b . dH/dtheta, which is what (B.2) uses.
* Tied weights (``net.tie_weights``): the read-out's weight is ``embedding.weight``, a
  state-update parameter, so g, E[g_hat_K] and their norms add the read-out's direct term to
  that parameter's lag terms (the sum of both uses); it still cancels in the bias, and M still
  covers dH/dtheta only.
* The paper's examples with this indexing: a nilpotent linear RNN, h_t = W h_{t-1} + U x_t + b
  with W^k = 0 (W^{k-1} != 0), has d ell_s/dS_{s-j} = d ell_s/dS_s W^j, so E[phi_j] = 0 exactly
  for j >= k, the bias is exactly 0 iff K >= k-1 (it collects lags >= K+1), and (A-1) holds
  with beta = 0 from tau = k-1 (§3.1 says Theta_{0,k}: true, one lag later than needed).  For
  the resetting RNN see :class:`npbptt.variants.ResettingRNN`.
* E(K) is implemented *as printed*.  For K >= tau the printed factor beta^{K-tau}/(1-beta)
  bounds sum_{k >= K} beta^{k-tau}, one term more than the sum_{k >= K+1} the proof needs, so
  E(tau - 1) = E(tau) and the printed bound is 1/beta times the tail sum;
  ``variant="tail"`` uses beta^{K+1-tau} (still a valid bound, exact for the nilpotent RNN).
* Delta(K): the printed denominator "max_{k<=K} ||E g_hat_k|| - E(k)" leaves k unbound outside
  the max; we read it as max_{k<=K} (||E[g_hat_k]|| - E(k)).  Each term is a lower bound of ||g||
  by (B.6) when (A-1) holds, so the max is one too; (B.7) proves the k = K term alone, which the
  max only tightens.  inf where the denominator is not positive.
* decay_rate(tau) = max_{k >= tau} E[phi_{k+1}] / E[phi_k]: the smallest beta >= 0 with which
  Eq. (7) holds from tau on (0 when no lag pair is left; pairs with E[phi_k] = 0 impose nothing
  as then E[phi_{k+1}] = 0).  A value >= 1 means (A-1) fails from tau for every beta < 1.
  E[phi_k] includes the zeros of the sources s <= k (it is sum_{s>k} / T).
* kappa searches every K >= 0, including K >= T-1 where E[g_hat_K] = g and Delta(K) keeps
  decreasing (in closed form); ``None`` when no K reaches Delta < delta (g = 0).
* psi (issue 20, ``norm="param"``): psi_k(s, b) = ||d ell_s^(b)/dS_{s-k} . dH_{s-k}/dtheta||
  over the same parameters (``npbptt.probe.step_param_norms``), 0 for s - k < 1.  The bias is
  ||E[sum_{k>K} term_k]|| <= sum_{k>K} E[psi_k] (the triangle inequality alone: no M, no
  (A-1)); ||g|| >= ||E g_hat_k|| - sum_{j>k} E[psi_j] gives the relative bound
  Delta_psi(K) = sum_{k>K} E[psi_k] / max_{k<=K} (||E g_hat_k|| - sum_{j>k} E[psi_j]).
* Everything is computed in float64 (a float64 copy of a float32 network).  Memory: the stacked
  caches, O(T*B*H) per layer, and the (T, B) norms; :func:`theory_curves` also keeps the (T, P)
  lag terms G_j to sum every tail exactly.
"""
from dataclasses import dataclass
import math

import numpy as np

from .losses import LOSSES
from .bptt import vjp_step
from .probe import step_param_norms
from .trees import leading as _leading, row_norms as _row_norms, rows as _rows, stack as _stack
from .validate import check_inputs

__all__ = ["phi_mean", "phi_table", "psi_mean", "psi_table", "param_bias_bound", "jacobian_bound", "full_gradient",
           "expected_truncated_gradient", "bias", "relative_bias", "bias_bound",
           "relative_bias_bound", "decay_rate", "kappa", "theory_curves", "TheoryCurves"]


# ----------------------------------------------------------------------------- argument checks
def _int(v, name, lo=0):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _beta(beta):
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(beta) < 1.0:
        raise ValueError(f"beta must be a number in [0, 1) (the rate of (A-1)), got {beta!r}")
    return float(beta)


def _delta(delta):
    if isinstance(delta, bool) or not isinstance(delta, (int, float, np.integer, np.floating)) \
            or not float(delta) > 0.0 or not math.isfinite(float(delta)):
        raise ValueError(f"delta must be a positive finite number (the relative-bias tolerance), "
                         f"got {delta!r}")
    return float(delta)


def _M(M):
    if isinstance(M, bool) or not isinstance(M, (int, float, np.integer, np.floating)) \
            or not float(M) >= 0.0 or not math.isfinite(float(M)):
        raise ValueError(f"M must be None or a finite number >= 0 (the bound of (A-2)), got {M!r}")
    return float(M)


def _variant(variant):
    if variant not in ("paper", "tail"):
        raise ValueError("variant must be 'paper' (Theorem 1 as printed) or 'tail', "
                         f"got {variant!r}")
    return variant


# ----------------------------------------------------------------------------- helpers
def _float64(net):
    """The network itself if float64, else a float64 copy."""
    if net.dtype == np.float64:
        return net
    new = net.copy()
    new.params = {k: v.astype(np.float64) for k, v in new.params.items()}
    new.dtype = np.dtype(np.float64)
    return new


def _state_keys(net):
    """Names of the parameters the state update uses (everything but the read-out's own; a tied
    read-out's weight is ``embedding.weight``, which the state update uses too)."""
    return [k for k in net.params if not k.startswith("decoder.")]


def _flat(grads, keys, net):
    return np.concatenate([np.ravel(grads[k]) if k in grads else np.zeros(net.params[k].size)
                           for k in keys])


def _unflat(vec, keys, net):
    out, i = {}, 0
    for k in keys:
        n = net.params[k].size
        out[k] = vec[i:i + n].reshape(net.params[k].shape)
        i += n
    return out


# ----------------------------------------------------------------------------- the forward pass
@dataclass
class _Pass:
    """One forward pass: caches of steps 1..T stacked time-major (row t*B + b), the per-example
    loss gradients e_t = d ell_t^(b)/dS_t (tuple of (L, T*B, H)), and the read-out's direct term
    sum_{t,b} d ell_t^(b)/dtheta (never truncated), split into its part on the read-out's own
    parameters (``direct``, over ``rkeys``) and its part on parameters the state update uses
    too (``direct_state``, over ``keys``: the tied read-out's use of ``embedding.weight``, zero
    for an untied network).  So g (times T*B) is ``direct`` beside ``direct_state + gH``."""
    net: object
    T: int
    B: int
    cache: object
    e: tuple
    direct: np.ndarray          # flat over rkeys
    keys: list                  # state-update parameter names, the flat order of G_j
    rkeys: list                 # the read-out's own parameter names (decoder.*)
    direct_state: np.ndarray    # flat over keys


def _forward(net, x, y, state, loss):
    net = _float64(net)
    x, y, S = check_inputs(net, x, y, state, loss)
    T, B = x.shape[:2]
    loss_fn = LOSSES[loss]
    caches = []
    e = tuple(np.zeros((net.num_layers, T * B, net.hidden_size)) for _ in S)
    dec = net.zero_grads()
    for t in range(T):
        S, cache = net.step(S, x[t])
        caches.append(cache)
        top = S[0][-1]
        _, dout = loss_fn(net.readout(top), y[t])          # per example, not divided by B
        d_readout, dh = net.readout_vjp(top, dout)
        for k, v in d_readout.items():
            dec[k] += v                                    # Eq. (2)'s direct term dL_s/dtheta
        e[0][-1, t * B:(t + 1) * B] = dh                   # e_t = d ell_t / dS_t (top layer's h)
    if any(n != B for n in _leading(caches[0])):
        raise ValueError("net must have row-wise step caches (every cache array with the batch "
                         "as its first axis), as npbptt.RNN / LSTM do")
    keys = _state_keys(net)
    rkeys = [k for k in net.params if k not in keys]
    return _Pass(net, T, B, _stack(caches), e, _flat(dec, rkeys, net), keys, rkeys,
                 _flat(dec, keys, net))


def _lag_sweep(p, max_lag):
    """Yield (j, d_j, G_j) for lags j = 0..min(max_lag, T-1): d_j the cotangents
    d ell_{t+j}^(b)/dS_t for t = 1..T-j (tuple of (L, (T-j)*B, H), row (t-1)*B + b) and G_j the
    flat sum over (t, b) of d_j . dH_t/dtheta (not yet divided by T*B)."""
    T, B, net = p.T, p.B, p.net
    d = p.e                                                # lag 0: e_t = d ell_t/dS_t
    for j in range(min(max_lag, T - 1) + 1):
        n = T - j
        grads, d_prev = vjp_step(net, _rows(p.cache, 0, n * B), d)
        yield j, d, _flat(grads, p.keys, net)
        # Eq. (16) with K2 = 1, all sources at once: b_{j+1} = b_j . dS_t/dS_{t-1}; the rows of
        # step 1 reach S_0, a constant, and are dropped.
        d = tuple(a[:, B:] for a in d_prev)


def _adjoint(p):
    """Full adjoint a_t = sum_{s>=t} d ell_s/dS_t (tuple of (L, T*B, H)) by the backward
    recursion a_t = e_t + a_{t+1} . dS_{t+1}/dS_t, and the flat sum_t a_t . dH_t/dtheta."""
    T, B, net = p.T, p.B, p.net
    a = tuple(np.empty_like(v) for v in p.e)
    carry = tuple(np.zeros_like(v[:, :B]) for v in p.e)
    gH = np.zeros(sum(net.params[k].size for k in p.keys))
    for t in reversed(range(T)):
        rows = slice(t * B, (t + 1) * B)
        a_t = tuple(v[:, rows] + c for v, c in zip(p.e, carry))
        for dst, src in zip(a, a_t):
            dst[:, rows] = src
        grads, carry = vjp_step(net, _rows(p.cache, t * B, (t + 1) * B), a_t)
        gH += _flat(grads, p.keys, net)
    return a, gH


def _g_norm(p, gH):
    """||g|| times T*B: the read-out's own parameters beside the state-update ones."""
    return math.hypot(np.linalg.norm(gH + p.direct_state), np.linalg.norm(p.direct))


def _tail(p, a, K):
    """Flat sum_t r_t . dH_t/dtheta, r_t = sum_{s > t+K} d ell_s/dS_t: the part of g that
    g_hat_K truncates (times T*B)."""
    T, B, net = p.T, p.B, p.net
    if K >= T - 1:
        return np.zeros(sum(net.params[k].size for k in p.keys))
    r = tuple(v[:, (K + 1) * B:] for v in a)              # a_u for u = K+2..T (1-based)
    for i in range(K + 1):                                 # move every a_u back K+1 steps
        lo, hi = K + 1 - i, T - i                          # 0-based steps of the current rows
        _, r = vjp_step(net, _rows(p.cache, lo * B, hi * B), r)
    grads, _ = vjp_step(net, _rows(p.cache, 0, (T - 1 - K) * B), r)
    return _flat(grads, p.keys, net)


def _phi_means(p, max_lag):
    phi = np.zeros(p.T)
    for j, d, _ in _lag_sweep(p, max_lag):
        phi[j] = _row_norms(d).sum() / (p.T * p.B)
    return phi


# ----------------------------------------------------------------------------- pure formulas
def _padded(phi, n):
    out = np.zeros(max(n, len(phi)))
    out[:len(phi)] = phi
    return out


def _E(phi, M, beta, tau, K, variant="paper"):
    """Theorem 1's E(K) from E[phi_k] (phi[k], zero beyond its length)."""
    phi = _padded(phi, max(tau, K) + 2)
    if K < tau:
        return M * (phi[K + 1:tau].sum() + phi[tau] / (1.0 - beta))
    power = K - tau if variant == "paper" else K + 1 - tau
    return M * phi[tau] * beta ** power / (1.0 - beta)


def _Delta(E_k, ghat_k):
    """Delta(K) for K = 0..len-1 from E(k) and ||E g_hat_k|| (k = 0..K): E(K) over the running
    max of ||E g_hat_k|| - E(k); inf where that is not positive."""
    den = np.maximum.accumulate(np.asarray(ghat_k) - np.asarray(E_k))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, np.asarray(E_k) / np.where(den > 0, den, 1.0), np.inf)
    return out


def _decay_rate(phi, tau):
    num, den = phi[tau + 1:], phi[tau:-1]
    if num.size == 0:
        return 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(num == 0, 0.0, num / np.where(den == 0, 1.0, den))
    ratio = np.where((den == 0) & (num > 0), np.inf, ratio)
    return float(ratio.max())


def _kappa(phi, M, beta, tau, ghat, g_norm, delta, variant="paper"):
    """Smallest K >= 0 with Delta(K) < delta; ghat[k] = ||E g_hat_k|| for k = 0..T-1."""
    T = len(ghat)
    K0 = max(T - 1, tau)
    Es = np.array([_E(phi, M, beta, tau, K, variant) for K in range(K0 + 1)])
    gh = np.concatenate([ghat, np.full(K0 + 1 - T, g_norm)])
    D = _Delta(Es, gh)
    hit = np.flatnonzero(D < delta)
    if hit.size:
        return int(hit[0])
    # K > K0 >= tau, T-1: E(K) = A beta^{K-K0} with A = E(K0), ||E g_hat_K|| = ||g||; the
    # condition E(K) < delta * max(den0, ||g|| - E(K)) is monotone in K: bisect.
    den0 = float(np.max(gh - Es))
    A = Es[-1]

    def ok(K):
        EK = A * beta ** (K - K0)
        return EK < delta * max(den0, g_norm - EK)

    if beta == 0.0:
        return K0 + 1 if ok(K0 + 1) else None
    if g_norm <= 0 and den0 <= 0:
        return None
    target = delta * max(den0, g_norm) / (1 + delta)
    if A <= 0 or target <= 0:
        return K0 + 1 if ok(K0 + 1) else None
    hi = K0 + 1 + max(0, math.ceil(math.log(target / A) / math.log(beta)))
    lo = K0 + 1
    if not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


# ----------------------------------------------------------------------------- public API
def phi_table(net, x, y, state, loss="cross_entropy"):
    """Every phi_k(s, b): an array (T, T, B), ``[s-1, k, b] = ||d ell_s^(b) / dS_{s-k}||`` for
    s - k >= 1 and 0 otherwise (S_j the full state after step j, concatenated).  Row s-1 equals
    ``npbptt.grad_norms(net, x[:s], y[:s], state)`` padded with zeros.  O(T^2) VJP rows."""
    p = _forward(net, x, y, state, loss)
    T, B = p.T, p.B
    table = np.zeros((T, T, B))
    for j, d, _ in _lag_sweep(p, T - 1):
        table[j:, j, :] = _row_norms(d).reshape(T - j, B)   # source s = t + j
    return table


def psi_table(net, x, y, state, loss="cross_entropy"):
    """Every psi_k(s, b) (issue 20): (T, T, B), ``[s-1, k, b]`` = ||d ell_s^(b)/dS_{s-k} .
    dH_{s-k}/dtheta|| for s - k >= 1, else 0.  Row s-1 equals ``npbptt.grad_norms(net, x[:s],
    y[:s], state, norm="param")`` padded with zeros."""
    p = _forward(net, x, y, state, loss)
    T, B = p.T, p.B
    table = np.zeros((T, T, B))
    for j, d, _ in _lag_sweep(p, T - 1):
        table[j:, j, :] = _psi_rows(p, j, d).reshape(T - j, B)
    return table


def _psi_rows(p, j, d):
    return step_param_norms(p.net, _rows(p.cache, 0, (p.T - j) * p.B), d)


def psi_mean(net, x, y, state, loss="cross_entropy"):
    """The exact E[psi_k], k = 0..T-1 (issue 20): (T,), the mean over s in 1..T and the batch of
    ||d ell_s^(b)/dS_{s-k} . dH_{s-k}/dtheta|| (0 for s - k < 1)."""
    p = _forward(net, x, y, state, loss)
    out = np.zeros(p.T)
    for j, d, _ in _lag_sweep(p, p.T - 1):
        out[j] = _psi_rows(p, j, d).sum() / (p.T * p.B)
    return out


def param_bias_bound(net, x, y, state, K, loss="cross_entropy"):
    """sum_{k>K} E[psi_k] (issue 20): a bound on :func:`bias` with no M and no (A-1)."""
    K = _int(K, "K")
    return float(psi_mean(net, x, y, state, loss)[K + 1:].sum())


def phi_mean(net, x, y, state, loss="cross_entropy"):
    """The exact E[phi_k] for k = 0..T-1: (T,) array, the mean over s in 1..T and the batch of
    ||d ell_s^(b)/dS_{s-k}|| (0 for s - k < 1).  O(T^2) VJP rows in T batched calls."""
    p = _forward(net, x, y, state, loss)
    return _phi_means(p, p.T - 1)


def jacobian_bound(net, x, state, progress=False):
    """M of (A-2): max over steps t = 1..T and examples b of the spectral norm of
    dH(S_{t-1}, x_t; theta)/dtheta, theta = every parameter of the state update (recurrent
    weights and biases, and the embedding row read at t when there is an embedding).

    Each Jacobian (D, P), D the state size, is built row by row from the VJPs of the D state
    basis vectors (``net.step_vjp`` on that one example); its norm is its largest singular value,
    the square root of the top eigenvalue of the (D, D) Gram matrix J J^T.  T*B*D VJP calls:
    meant for small state sizes (``progress=True`` shows a bar).
    """
    net = _float64(net)
    x, _, S = check_inputs(net, x, None, state, "cross_entropy")
    T, B = x.shape[:2]
    L, H, n = net.num_layers, net.hidden_size, net.n_state
    D = n * L * H
    rec = [k for k in _state_keys(net) if k != "embedding.weight"]
    basis = []
    for i in range(D):
        u = tuple(np.zeros((L, 1, H)) for _ in range(n))
        u[i // (L * H)][(i // H) % L, 0, i % H] = 1.0
        basis.append(u)
    steps = range(T)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="jacobian_bound (A-2)", unit="step")
    M = 0.0
    for t in steps:
        S, cache = net.step(S, x[t])
        for b in range(B):
            one = _rows(cache, b, b + 1)
            J = []
            for u in basis:
                grads, _, dx = net.step_vjp(one, u)      # u . dH_t/dtheta for example b
                row = [np.ravel(grads[k]) if k in grads else np.zeros(net.params[k].size)
                       for k in rec]
                if net.embedding:
                    row.append(np.ravel(dx))             # only the row x_t of the embedding
                J.append(np.concatenate(row))
            M = max(M, _spectral_norm(np.array(J)))
    return M


def _spectral_norm(J):
    """Largest singular value of J (D, P): the square root of the largest eigenvalue of the
    smaller Gram matrix J J^T or J^T J (equal to the SVD's to round-off, and for a wide J far
    cheaper than an SVD of J itself)."""
    G = J @ J.T if J.shape[0] <= J.shape[1] else J.T @ J
    return math.sqrt(max(float(np.linalg.eigvalsh(G)[-1]), 0.0))


def full_gradient(net, x, y, state, loss="cross_entropy"):
    """g: the gradient of (1/T) sum_s L_s (L_s the batch-mean loss of step s), a dict like
    ``net.params``; equals ``bptt(net, x, y, state, T-1, T).grads``."""
    p = _forward(net, x, y, state, loss)
    _, gH = _adjoint(p)
    return _to_dict(p, gH)


def _to_dict(p, gH):
    """g or E[g_hat_K] as a dict, from gH (the lag terms, times T*B) and the read-out's direct term."""
    out = _unflat((gH + p.direct_state) / (p.T * p.B), p.keys, p.net)
    out.update(_unflat(p.direct / (p.T * p.B), p.rkeys, p.net))
    return {k: out[k] for k in p.net.params}


def expected_truncated_gradient(net, x, y, state, K, loss="cross_entropy"):
    """E[g_hat_K] (Eq. 3) over s and b, a dict like ``net.params``: the read-out term plus the
    lag terms G_0..G_K of the lag sweep, O(T*K)."""
    K = _int(K, "K")
    p = _forward(net, x, y, state, loss)
    total = sum(G for _, _, G in _lag_sweep(p, K))
    return _to_dict(p, total)


def bias(net, x, y, state, K, loss="cross_entropy"):
    """||E[g_hat_K] - g||_2 over all parameters, summed from the truncated terms themselves
    (lags K+1..s-1), O(T*K)."""
    K = _int(K, "K")
    p = _forward(net, x, y, state, loss)
    a, _ = _adjoint(p)
    return float(np.linalg.norm(_tail(p, a, K))) / (p.T * p.B)


def relative_bias(net, x, y, state, K, loss="cross_entropy"):
    """bias(K) / ||g|| (nan when g = 0)."""
    K = _int(K, "K")
    p = _forward(net, x, y, state, loss)
    a, gH = _adjoint(p)
    g_norm = _g_norm(p, gH)
    b = float(np.linalg.norm(_tail(p, a, K)))
    return b / g_norm if g_norm > 0 else math.nan


def bias_bound(net, x, y, state, K, beta, tau, loss="cross_entropy", M=None, variant="paper"):
    """E(K, theta) of Theorem 1 from the exact E[phi_k] and M (:func:`jacobian_bound`, or the
    given ``M``).  A bound on :func:`bias` whenever (A-1) holds with (beta, tau).
    ``variant="tail"``: beta^{K+1-tau} for K >= tau (see the module Notes)."""
    K, tau, beta, variant = _int(K, "K"), _int(tau, "tau"), _beta(beta), _variant(variant)
    M = jacobian_bound(net, x, state) if M is None else _M(M)
    p = _forward(net, x, y, state, loss)
    phi = _phi_means(p, max(tau, K + 1))
    return float(_E(phi, M, beta, tau, K, variant))


def relative_bias_bound(net, x, y, state, K, beta, tau, loss="cross_entropy", M=None,
                        variant="paper"):
    """Delta(K, theta) of Theorem 1: E(K) / max_{k<=K} (||E g_hat_k|| - E(k)); inf where the
    denominator is not positive.  O(T*max(K, tau))."""
    K, tau, beta, variant = _int(K, "K"), _int(tau, "tau"), _beta(beta), _variant(variant)
    M = jacobian_bound(net, x, state) if M is None else _M(M)
    p = _forward(net, x, y, state, loss)
    phi, ghat = _sweep_norms(p, max(tau, K + 1))
    ghat = np.concatenate([ghat, np.full(max(0, K + 1 - len(ghat)), ghat[-1])])[:K + 1]
    Es = np.array([_E(phi, M, beta, tau, k, variant) for k in range(K + 1)])
    return float(_Delta(Es, ghat)[K])


def _sweep_norms(p, max_lag):
    """E[phi_j] (T,) and ||E g_hat_j|| for j = 0..min(max_lag, T-1); beyond T-1 g_hat_j = g."""
    phi = np.zeros(p.T)
    prefix = p.direct_state.copy()          # the read-out's direct term on the state's parameters
    dec2 = float(p.direct @ p.direct)
    ghat = []
    for j, d, G in _lag_sweep(p, max_lag):
        phi[j] = _row_norms(d).sum() / (p.T * p.B)
        prefix += G
        ghat.append(math.sqrt(dec2 + float(prefix @ prefix)) / (p.T * p.B))
    return phi, np.array(ghat)


def decay_rate(net, x, y, state, tau, loss="cross_entropy"):
    """The smallest beta >= 0 with E[phi_{k+1}] <= beta E[phi_k] for all k >= tau (Eq. 7):
    max_{k>=tau} E[phi_{k+1}] / E[phi_k].  >= 1 means (A-1) fails from tau."""
    tau = _int(tau, "tau")
    return _decay_rate(phi_mean(net, x, y, state, loss), tau)


def kappa(net, x, y, state, delta, beta, tau, loss="cross_entropy", M=None, variant="paper"):
    """kappa(delta, theta) of Eq. (9): the smallest K >= 0 with Delta(K, theta) < delta, or None
    when no K reaches it."""
    delta, tau, beta, variant = _delta(delta), _int(tau, "tau"), _beta(beta), _variant(variant)
    M = jacobian_bound(net, x, state) if M is None else _M(M)
    p = _forward(net, x, y, state, loss)
    phi, ghat = _sweep_norms(p, p.T - 1)
    _, gH = _adjoint(p)
    g_norm = _g_norm(p, gH) / (p.T * p.B)
    return _kappa(phi, M, beta, tau, ghat, g_norm, delta, variant)


# ----------------------------------------------------------------------------- all K at once
@dataclass
class TheoryCurves:
    """Everything of Theorem 1 for one (net, x, y, state), for K = 0..T-1 (index K).

    phi_mean : (T,) E[phi_k]
    g_norm : ||g||
    g_hat_norm : (T,) ||E[g_hat_K]||
    bias : (T,) ||E[g_hat_K] - g||, each summed from its own tail of lag terms
    relative_bias : (T,) bias / ||g||
    M : the bound of (A-2) (:func:`jacobian_bound`)
    psi_mean : (T,) E[psi_k] (issue 20) with ``theory_curves(..., psi=True)``, else None
    """
    phi_mean: np.ndarray
    g_norm: float
    g_hat_norm: np.ndarray
    bias: np.ndarray
    relative_bias: np.ndarray
    M: float
    psi_mean: np.ndarray = None

    def _psi(self):
        if self.psi_mean is None:
            raise ValueError("psi_mean: computed only by theory_curves(..., psi=True)")
        return self.psi_mean

    def param_bias_bound(self):
        """(T,) sum_{k>K} E[psi_k] for K = 0..T-1: bounds ``bias`` (no M, no (A-1))."""
        psi = self._psi()
        return np.concatenate([np.cumsum(psi[::-1])[::-1][1:], [0.0]])

    def param_relative_bias_bound(self):
        """(T,) Delta_psi(K) = sum_{k>K} E psi_k / max_{k<=K} (||E g_hat_k|| - sum_{j>k} E psi_j),
        inf where the denominator is not positive: bounds ``relative_bias``."""
        return _Delta(self.param_bias_bound(), self.g_hat_norm)

    def param_kappa(self, delta):
        """The smallest K >= 0 with Delta_psi(K) < delta (K = T-1 at the latest: its bound is 0
        when ||g|| > 0), or None."""
        hit = np.flatnonzero(self.param_relative_bias_bound() < _delta(delta))
        return int(hit[0]) if hit.size else None

    def decay_rate(self, tau):
        """As :func:`decay_rate`."""
        return _decay_rate(self.phi_mean, _int(tau, "tau"))

    def bias_bound(self, beta, tau, variant="paper"):
        """(T,) E(K) for K = 0..T-1 (Theorem 1)."""
        beta, tau, variant = _beta(beta), _int(tau, "tau"), _variant(variant)
        return np.array([_E(self.phi_mean, self.M, beta, tau, K, variant)
                         for K in range(len(self.phi_mean))])

    def relative_bias_bound(self, beta, tau, variant="paper"):
        """(T,) Delta(K) for K = 0..T-1 (Theorem 1), inf where not defined."""
        return _Delta(self.bias_bound(beta, tau, variant), self.g_hat_norm)

    def kappa(self, delta, beta, tau, variant="paper"):
        """As :func:`kappa`."""
        return _kappa(self.phi_mean, self.M, _beta(beta), _int(tau, "tau"), self.g_hat_norm,
                      self.g_norm, _delta(delta), _variant(variant))


def theory_curves(net, x, y, state, loss="cross_entropy", M=None, progress=False, psi=False):
    """:class:`TheoryCurves` for K = 0..T-1 in one lag sweep (O(T^2) VJP rows, T batched
    calls) plus :func:`jacobian_bound` (unless ``M`` is given).  The bias of every K is summed
    from its own lag terms G_{K+1}, ..., G_{T-1} (kept, (T, P) floats).  ``psi=True`` also
    fills ``psi_mean`` (E[psi_k], issue 20) in the same sweep."""
    M = jacobian_bound(net, x, state, progress=progress) if M is None else _M(M)
    p = _forward(net, x, y, state, loss)
    T, B = p.T, p.B
    phi = np.zeros(T)
    psi_m = np.zeros(T) if psi else None
    G = np.zeros((T, sum(p.net.params[k].size for k in p.keys)))
    sweep = _lag_sweep(p, T - 1)
    if progress:
        from tqdm.auto import tqdm
        sweep = tqdm(sweep, total=T, desc="lag sweep", unit="lag")
    for j, d, Gj in sweep:
        phi[j] = _row_norms(d).sum() / (T * B)
        G[j] = Gj
        if psi:
            psi_m[j] = _psi_rows(p, j, d).sum() / (T * B)
    dec2 = float(p.direct @ p.direct)
    prefix = np.cumsum(G, axis=0) + p.direct_state          # sum_{j<=K} G_j (+ tied read-out)
    tails = np.zeros_like(G)
    tails[:-1] = np.cumsum(G[::-1], axis=0)[::-1][1:]        # sum_{j>K} G_j
    g_hat = np.sqrt(dec2 + (prefix * prefix).sum(axis=1)) / (T * B)
    g_norm = float(g_hat[-1])
    b = np.sqrt((tails * tails).sum(axis=1)) / (T * B)
    rel = b / g_norm if g_norm > 0 else np.full(T, np.nan)
    return TheoryCurves(phi, g_norm, g_hat, b, rel, M, psi_m)
