"""Exact real-time recurrent learning (Williams & Zipser 1989): the influence matrix carried
forward.

With S_t = H(S_{t-1}, x_t; theta) (Eq. 1 of Aicher, Foti & Fox 2019) and the influence matrix
J_t = dS_t/dtheta (per example: (|S|, |theta_S|), theta_S the parameters the state update reads),

    J_t = dS_t/dS_{t-1} . J_{t-1} + d^+S_t/dtheta,         J_0 = 0 (entering state constant)
                                        (Williams & Zipser 1989, Eq. 11-12; here Eqs. J1-J4)
    dL_t/dtheta = dL_t/dS_t . J_t + d^+L_t/dtheta          (the read-out's direct term, Eq. 2)
    grad = (1/T) sum_{t=1}^{T} dL_t/dtheta

which is the full-BPTT gradient of the chunk, BPTT(T-1, T) of Eq. (15), computed forward in
time: memory O(B |S| |theta_S|) independent of T, cost O(B |S|^2 |theta_S|) per step.
"""
from dataclasses import dataclass

import numpy as np

from ..validate import is_int
from .common import OnlineResult, ParamLayout, check_online_inputs, readout_term
from .jvp import affine_influence, step_jvp

__all__ = ["RTRLCarry", "rtrl", "rtrl_stream", "rtrl_bytes", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 2 * 2**30        # 2 GiB


@dataclass
class RTRLCarry:
    """RTRL's online state after a chunk: the influence matrix J_T = dS_T/dtheta_S.

    influence : tuple like the internal state ((h,) or (h, c)) of arrays (L, B, H, P), P the
                number of state-update parameters, columns in ``names`` order (each C-order)
    names     : the parameters of the columns (``npbptt.online.jvp.state_param_names``)
    """
    influence: tuple
    names: tuple


def rtrl_bytes(net, B):
    """Working memory of :func:`rtrl` in bytes for a batch of B: the influence matrix J_{t-1}
    and J_t (2 n_S L H columns of P per example), one layer's parameter block of the
    pre-activation's tangent (G H), the layer-0 input's tangent and the gate tangents
    (about 6 H), all of P = |theta_S| entries per example."""
    P = ParamLayout(net).size
    L, H, G = net.num_layers, net.hidden_size, net.gates
    per_col = 2 * net.n_state * L * H + 2 * G * H + net.input_size + 6 * H
    return int(B) * P * per_col * np.dtype(net.dtype).itemsize


def _check_carry(net, carry, layout, B):
    if carry is None:
        return None
    if not isinstance(carry, RTRLCarry):
        raise ValueError("carry must be None or the RTRLCarry of a previous rtrl call "
                         f"(result.carry), got {type(carry).__name__}")
    if tuple(carry.names) != layout.names:
        raise ValueError(f"carry.names {tuple(carry.names)} do not match the network's "
                         f"state-update parameters {layout.names}")
    shape = (net.num_layers, B, net.hidden_size, layout.size)
    if not isinstance(carry.influence, tuple) or len(carry.influence) != net.n_state:
        raise ValueError(f"carry.influence must be a tuple of {net.n_state} arrays of shape "
                         f"(L, B, H, P) = {shape}")
    for J in carry.influence:
        if not isinstance(J, np.ndarray) or J.shape != shape or J.dtype != net.dtype:
            raise ValueError(f"carry.influence arrays must have shape (L, B, H, P) = {shape} and "
                             f"dtype {net.dtype}, got "
                             f"{getattr(J, 'shape', type(J).__name__)} {getattr(J, 'dtype', '')}")
        if not np.isfinite(J).all():
            raise ValueError("carry.influence contains NaN or inf")
    return carry.influence


def rtrl(net, x, y, state, loss="cross_entropy", carry=None, max_bytes=DEFAULT_MAX_BYTES):
    """Exact RTRL on one chunk (Williams & Zipser 1989): the gradient of (1/T) sum_t L_t by the
    influence matrix carried forward (module docstring).

    Parameters
    ----------
    net, x, y, state, loss : as :func:`npbptt.bptt` (checked by npbptt.validate.check_inputs,
        same errors); ``net`` a stock npbptt.RNN or npbptt.LSTM (tied weights allowed: the
        embedding's columns carry its input use, the read-out's direct term its output use;
        no dropout masks: the stock network).
    carry : None (the entering state is a constant: J_0 = 0) or the ``carry`` of the previous
        chunk's result, to continue the influence matrix across chunks (streaming RTRL).
    max_bytes : refuse (ValueError naming the size) when :func:`rtrl_bytes` exceeds it.

    Returns
    -------
    OnlineResult: ``loss`` (1/T) sum_t L_t, ``grads`` its gradient (a dict like
    ``net.params``), ``state`` after step T, ``carry`` the RTRLCarry of J_T.

    With ``carry=None`` the result equals ``npbptt.bptt(net, x, y, state, K1=T-1, K2=T)``
    (full BPTT over the chunk; to rounding).  With a carry, the gradient also runs through the
    entering state into the earlier chunks (with the parameters each chunk had: exact when the
    parameters did not change, the usual RTRL approximation when a training loop updated them).
    """
    x, y, S = check_online_inputs(net, x, y, state, loss)
    if not is_int(max_bytes) or max_bytes < 1:
        raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
    T, B = x.shape[:2]
    layout = ParamLayout(net)
    need = rtrl_bytes(net, B)
    if need > max_bytes:
        raise ValueError(
            f"rtrl needs about {need} bytes ({need / 2**30:.3g} GiB) for its influence matrix "
            f"(B={B} x |S|={net.n_state * net.num_layers * net.hidden_size} x "
            f"|theta_S|={layout.size} entries, working copies included), more than "
            f"max_bytes={max_bytes}: use a smaller batch or network, or UORO")
    J = _check_carry(net, carry, layout, B)
    P, dt = layout.size, net.dtype
    if J is None:
        J = tuple(np.zeros((net.num_layers, B, net.hidden_size, P), dt) for _ in S)
    grads = net.zero_grads()
    g = np.zeros(P, dt)                        # sum_t dL_t/dS_t . J_t, over theta_S's columns
    total = 0.0
    GH = net.gates * net.hidden_size
    bx, jx = np.arange(B)[:, None], np.arange(net.input_size)[None, :]
    for t in range(T):
        S, cache = net.step(S, x[t])
        de = None
        if net.embedding:                      # (J4): de[b, j, (v, j')] = [v = x_b][j = j']
            de = np.zeros((B, net.input_size, P), dt)
            cE = layout.cols("embedding.weight")
            de[bx, jx, cE.start + x[t][:, None] * net.input_size + jx] = 1.0
        dz_theta = []
        for l in range(net.num_layers):        # (J3), layer l's own columns only
            cols = layout.layer_cols(l)
            xl, hl = cache[1][l][0], cache[1][l][1]
            block = affine_influence(np.zeros((B, GH, cols.stop - cols.start), dt), xl, hl,
                                     net.bias)
            dz_theta.append((cols, block))
        J = step_jvp(net, cache, J, de, dz_theta)     # J_t = dS_t/dS_{t-1} J_{t-1} + d+S_t/dtheta
        ell, dh_top = readout_term(net, S[0][-1], y[t], loss, grads)
        total += ell
        g += np.einsum("bh,bhp->p", dh_top, J[0][-1])    # dL_t/dS_t . J_t (L_t reads h_t^(L))
    for k, v in layout.unflatten(g).items():
        grads[k] += v
    for v in grads.values():
        v /= T
    return OnlineResult(total / T, grads, net.to_public(S), RTRLCarry(J, layout.names))


def rtrl_stream(net, x, y, state, K, loss="cross_entropy", carry=None,
                max_bytes=DEFAULT_MAX_BYTES):
    """Stream RTRL over a long sequence in chunks of K steps (the S_m of Eq. 17 of Aicher et
    al.), carrying the state and the influence matrix: yields ``(chunk, result)`` with ``chunk``
    the slice of the chunk in x and ``result`` the :func:`rtrl` result on it, its gradient that
    of the chunk's mean loss through the whole past (the influence matrix is never reset).

    The parameters are read when each chunk is computed, so a training loop may update
    ``net.params`` between chunks (online RTRL: the carried influence matrix then mixes the
    parameters of its time, as in Williams & Zipser's real-time algorithm)::

        for chunk, res in npbptt.online.rtrl_stream(net, x, y, state, K=10):
            for k in net.params:
                net.params[k] -= lr * res.grads[k]

    ``carry`` continues a previous stream (its last result's ``carry``).
    """
    if not is_int(K) or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    x, y, _ = check_online_inputs(net, x, y, state, loss)
    for start in range(0, x.shape[0], K):
        sl = slice(start, min(start + K, x.shape[0]))
        res = rtrl(net, x[sl], y[sl], state, loss, carry, max_bytes)
        state, carry = res.state, res.carry
        yield sl, res
