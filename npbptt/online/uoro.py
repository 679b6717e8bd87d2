"""UORO: Unbiased Online Recurrent Optimization (Tallec & Ollivier 2017, Algorithm 1).

The influence matrix J_t = dS_t/dtheta of RTRL (npbptt.online.rtrl) is replaced by a rank-one
random estimate s~_t (x) theta~_t with E[s~_t (x) theta~_t] = J_t.  With S_t = F(S_{t-1}, x_t;
theta) (Eq. 1 of Aicher, Foti & Fox 2019) and nu a vector of independent random signs, one
step is (Tallec & Ollivier 2017, Algorithm 1, lines 5-12; their Eqs. 6-7 for the scaling):

    nu ~ {-1, +1}^|S| uniform
    dtheta_g = nu^T . dF/dtheta                          (a vector-Jacobian product, vjp_params)
    Js       = dF/dS_{t-1} . s~_{t-1}                    (a Jacobian-vector product, jvp.step_jvp)
    rho0 = sqrt((|theta~_{t-1}| + eps) / (|Js| + eps)),  rho1 = sqrt((|dtheta_g| + eps) / (|nu| + eps))
    s~_t     = rho0 Js + rho1 nu
    theta~_t = theta~_{t-1} / rho0 + dtheta_g / rho1
    g_t      = (dL_t/dS_t . s~_t) theta~_t + d^+L_t/dtheta          (the read-out's direct term)

rho0, rho1 are the variance-minimising scalings (Tallec & Ollivier 2017, Prop. 1 / §4: they
equalise the norms of the two factors of each rank-one term); every sign-odd cross term has
mean zero, so E[s~_t (x) theta~_t | past] = Js (x) theta~_{t-1} + dF/dtheta and by induction
E[g_t] is the RTRL gradient.  Here the time index follows npbptt: L_t reads S_t.

A batch of B examples is treated as one dynamical system whose state is the B states side by
side (the batch loss is the mean of the examples'): s~ has the batch's shape (L, B, H) and one
theta~ (|theta_S|,) is shared by the batch, so nu^T dF/dtheta is the batch-summed VJP of
``npbptt.vjp_params``.  Memory O(B |S| + |theta|), cost of about two extra steps per step.
"""
from dataclasses import dataclass

import numpy as np

from ..bptt import vjp_params
from ..validate import is_int
from .common import OnlineResult, ParamLayout, check_online_inputs, readout_term
from .jvp import step_jvp

__all__ = ["UOROCarry", "uoro", "uoro_stream", "uoro_update", "rademacher"]


@dataclass
class UOROCarry:
    """UORO's online state: the rank-one factors of the influence matrix estimate.

    s_tilde     : tuple like the internal state ((h,) or (h, c)) of arrays (L, B, H)
    theta_tilde : (P,) over the state-update parameters flattened in ``names`` order
    names       : those parameters (``npbptt.online.jvp.state_param_names``)
    """
    s_tilde: tuple
    theta_tilde: np.ndarray
    names: tuple


def rademacher(rng, S):
    """Independent random signs nu shaped like the state tuple ``S``, drawn in one call
    ``rng.integers(0, 2, (n_S, L, B, H))``."""
    signs = 2.0 * rng.integers(0, 2, (len(S),) + S[0].shape) - 1.0
    return tuple(signs.astype(S[0].dtype))


def uoro_update(net, cache, layout, s_tilde, theta_tilde, nu, eps=1e-7):
    """One rank-one update of Algorithm 1 (lines 7-12) at a step whose ``cache`` is from
    ``net.step(S_{t-1}, x_t)``: (s~_{t-1}, theta~_{t-1}, nu) -> (s~_t, theta~_t) (module
    docstring).  ``layout`` an ``npbptt.online.common.ParamLayout`` of ``net``."""
    dt = net.dtype
    Js = tuple(d[..., 0] for d in step_jvp(net, cache, tuple(s[..., None] for s in s_tilde)))
    dth = layout.flatten(vjp_params(net, cache, nu), dt)            # nu^T dF/dtheta
    norm = lambda parts: float(np.sqrt(sum(float(np.vdot(a, a)) for a in parts)))
    rho0 = np.sqrt((np.linalg.norm(theta_tilde) + eps) / (norm(Js) + eps))
    rho1 = np.sqrt((np.linalg.norm(dth) + eps) / (norm(nu) + eps))
    s_new = tuple((rho0 * a + rho1 * n).astype(dt) for a, n in zip(Js, nu))
    th_new = (theta_tilde / rho0 + dth / rho1).astype(dt)
    return s_new, th_new


def _check_carry(net, carry, layout, S):
    if carry is None:
        return tuple(np.zeros_like(s) for s in S), np.zeros(layout.size, net.dtype)
    if not isinstance(carry, UOROCarry):
        raise ValueError("carry must be None or the UOROCarry of a previous uoro call "
                         f"(result.carry), got {type(carry).__name__}")
    if tuple(carry.names) != layout.names:
        raise ValueError(f"carry.names {tuple(carry.names)} do not match the network's "
                         f"state-update parameters {layout.names}")
    st = carry.s_tilde
    if (not isinstance(st, tuple) or len(st) != len(S)
            or any(not isinstance(a, np.ndarray) or a.shape != s.shape or a.dtype != s.dtype
                   for a, s in zip(st, S))):
        raise ValueError(f"carry.s_tilde must be a tuple of {len(S)} arrays of the state's shape "
                         f"{S[0].shape} and dtype {net.dtype}")
    th = carry.theta_tilde
    if not isinstance(th, np.ndarray) or th.shape != (layout.size,) or th.dtype != net.dtype:
        raise ValueError(f"carry.theta_tilde must be an array of shape ({layout.size},) and "
                         f"dtype {net.dtype}")
    if not all(np.isfinite(a).all() for a in st + (th,)):
        raise ValueError("carry contains NaN or inf")
    return st, th


def uoro(net, x, y, state, rng, loss="cross_entropy", carry=None, eps=1e-7):
    """UORO on one chunk (Tallec & Ollivier 2017, Algorithm 1): an unbiased estimate of the
    gradient of (1/T) sum_t L_t, i.e. of RTRL's / full BPTT's gradient.

    Parameters
    ----------
    net, x, y, state, loss : as :func:`npbptt.bptt` (same checks and errors); ``net`` a stock
        npbptt.RNN or npbptt.LSTM (tied weights allowed, no dropout masks).
    rng : an ``np.random.Generator``: the signs nu of each step, one
        ``rng.integers(0, 2, (n_S, L, B, H))`` per step in order (see :func:`rademacher`).
    carry : None (the entering state is a constant: s~_0 = 0, theta~_0 = 0) or the previous
        chunk's ``result.carry`` (a :class:`UOROCarry`), to continue the sequence.
    eps : the epsilon of rho0, rho1 (Algorithm 1), > 0.

    Returns
    -------
    OnlineResult: ``loss``, ``grads`` the estimate (a dict like ``net.params``; the read-out's
    own parameters get their exact direct term), ``state`` after step T, ``carry`` the
    UOROCarry after step T.  With ``carry=None`` its mean over draws of ``rng`` equals
    ``npbptt.online.rtrl(net, x, y, state, loss).grads``.
    """
    x, y, S = check_online_inputs(net, x, y, state, loss)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) \
            or not eps > 0 or not np.isfinite(eps):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    layout = ParamLayout(net)
    s_t, th_t = _check_carry(net, carry, layout, S)
    grads = net.zero_grads()
    g = np.zeros(layout.size, net.dtype)
    total = 0.0
    for t in range(x.shape[0]):
        S_new, cache = net.step(S, x[t])
        s_t, th_t = uoro_update(net, cache, layout, s_t, th_t, rademacher(rng, S), eps)
        S = S_new
        ell, dh_top = readout_term(net, S[0][-1], y[t], loss, grads)
        total += ell
        g += float(np.vdot(dh_top, s_t[0][-1])) * th_t          # (dL_t/dS_t . s~_t) theta~_t
    for k, v in layout.unflatten(g).items():
        grads[k] += v
    T = x.shape[0]
    for v in grads.values():
        v /= T
    return OnlineResult(total / T, grads, net.to_public(S), UOROCarry(s_t, th_t, layout.names))


def uoro_stream(net, x, y, state, K, rng, loss="cross_entropy", carry=None, eps=1e-7):
    """Stream UORO over a long sequence in chunks of K steps, carrying the state and the
    rank-one pair: yields ``(chunk, result)`` as :func:`npbptt.online.rtrl_stream`; the
    parameters are read chunk by chunk, so a training loop may update ``net.params`` between
    chunks (Tallec & Ollivier's online use: theta updated every step is K = 1)::

        rng = np.random.default_rng(seed)
        for chunk, res in npbptt.online.uoro_stream(net, x, y, state, K=1, rng=rng):
            for k in net.params:
                net.params[k] -= lr * res.grads[k]
    """
    if not is_int(K) or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    x, y, _ = check_online_inputs(net, x, y, state, loss)
    for start in range(0, x.shape[0], K):
        sl = slice(start, min(start + K, x.shape[0]))
        res = uoro(net, x[sl], y[sl], state, rng, loss, carry, eps)
        state, carry = res.state, res.carry
        yield sl, res
