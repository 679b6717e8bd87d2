"""Forward-mode (Jacobian-vector) products of one network step, beside the VJPs of cells.py.

The online gradient methods carry a derivative of the state *forward* in time, so they need the
products of a step's Jacobians with tangent vectors (the transpose of what recursion (16) of
Aicher, Foti & Fox (2019) uses).  For one step S_t = H(S_{t-1}, x_t; theta) (Eq. 1):

    dS_t = dS_t/dS_{t-1} . dS_{t-1}  +  dS_t/dtheta . dtheta                   (JVP)

Every tangent here carries a trailing axis of P columns, so one call pushes P tangent vectors
at once (P = 1 for UORO, P = the number of parameters for the influence matrix of RTRL).
Shapes: a state tangent is a tuple of (L, B, H, P) arrays (``(dh,)`` for the RNN, ``(dh, dc)``
for the LSTM, as the internal state of npbptt.model), a layer-0 input tangent is (B, in, P),
the parameters' contribution to layer l's pre-activation is (B, G*H, P).

The formulas are the forward derivatives of npbptt.cells (PyTorch's gate order i, f, g, o):

    RNN  (§2):  z = W_ih x + W_hh h_prev + b,  h = rho(z)
                dz = W_ih dx + W_hh dh_prev + dz_theta,  dh = rho'(z) dz               (J1)
    LSTM (§2):  a = W_ih x + W_hh h_prev + b,  i, f, o = sigma(a_i, a_f, a_o), g = tanh(a_g)
                c = i g + f c_prev,  h = o tanh(c)
                da = W_ih dx + W_hh dh_prev + dz_theta
                di = i(1-i) da_i,  df = f(1-f) da_f,  dg = (1-g^2) da_g,  do = o(1-o) da_o
                dc = di g + i dg + df c_prev + f dc_prev                               (J2)
                dh = do tanh(c) + o (1 - tanh(c)^2) dc
    affine in its parameters: dz_theta = dW_ih x + dW_hh h_prev + db_ih + db_hh          (J3)
    embedding: e = E[x_t], de = dE[x_t]                                                 (J4)

Only the stock networks (npbptt.RNN, npbptt.LSTM without dropout masks) are covered: the cache
layout read here is the one of ``_Network.step``.
"""
import numpy as np

from ..cells import ACTIVATIONS

__all__ = ["layer_jvp", "step_jvp", "param_tangent_inputs", "step_jvp_params",
           "affine_influence", "state_param_names"]


def layer_jvp(kind, p, cache, dS_prev, dx, dz_theta=None, activation="tanh"):
    """One layer's JVP, Eqs. (J1)/(J2): tangents of (S_prev, x) and the parameters' part of the
    pre-activation -> tangent of the layer's new state.

    kind : "rnn" or "lstm"; p the layer's parameters (npbptt.cells naming); cache from
    ``rnn_step`` / ``lstm_step``; dS_prev a tuple ``(dh_prev,)`` or ``(dh_prev, dc_prev)`` of
    (B, H, P); dx (B, in, P) or None (zero); dz_theta (B, G*H, P) or None (zero).
    Returns ``(dh,)`` or ``(dh, dc)``, each (B, H, P).
    """
    Wih, Whh = p["weight_ih"], p["weight_hh"]
    dz = np.einsum("gh,bhp->bgp", Whh, dS_prev[0])
    if dx is not None:
        dz += np.einsum("gi,bip->bgp", Wih, dx)
    if isinstance(dz_theta, tuple):                 # (columns, block): nonzero only there
        cols, block = dz_theta
        dz[:, :, cols] += block
    elif dz_theta is not None:
        dz += dz_theta
    if kind == "rnn":
        _, drho = ACTIVATIONS[activation]
        h = cache[2]
        return (drho(h)[:, :, None] * dz,)                          # (J1)
    _, _, c_prev, i, f, g, o, tc = cache
    H = i.shape[1]
    di = (i * (1.0 - i))[:, :, None] * dz[:, :H]
    df = (f * (1.0 - f))[:, :, None] * dz[:, H:2 * H]
    dg = (1.0 - g * g)[:, :, None] * dz[:, 2 * H:3 * H]
    do = (o * (1.0 - o))[:, :, None] * dz[:, 3 * H:]
    dc = di * g[:, :, None] + i[:, :, None] * dg + df * c_prev[:, :, None] \
        + f[:, :, None] * dS_prev[1]                                # (J2)
    dh = do * tc[:, :, None] + (o * (1.0 - tc * tc))[:, :, None] * dc
    return dh, dc


def step_jvp(net, cache, dS_prev, de=None, dz_theta=None):
    """JVP of ``net.step`` (Eq. 1 for the stacked network): the tangent of S_t.

    cache : from ``net.step(S_prev, x_t)`` (no dropout mask)
    dS_prev : tuple of (L, B, H, P), the tangent of S_{t-1}
    de : (B, input_size, P) or None, the tangent of the layer-0 input embed(x_t) (Eq. J4)
    dz_theta : None or a list over layers of (B, G*H, P), a pair (cols, block) or None (see
        :func:`layer_jvp`): the parameters' part (J3) of each layer's pre-activation
    Returns the tangent of S_t, a tuple of (L, B, H, P).  The layer-l input's tangent is the
    tangent of h_t^(l-1) just computed (layers are stacked within the step).
    """
    _, caches = cache[:2]
    dS = tuple(np.empty_like(d) for d in dS_prev)
    dx = de
    for l in range(net.num_layers):
        out = layer_jvp(net.kind, net.layer(l), caches[l], tuple(d[l] for d in dS_prev), dx,
                        None if dz_theta is None else dz_theta[l], net.activation)
        for k, d in enumerate(out):
            dS[k][l] = d
        dx = dS[0][l]
    return dS


def param_tangent_inputs(net, cache, dtheta):
    """Eqs. (J3)-(J4) for given parameter tangents: ``dtheta`` a dict name -> (*shape, P) over
    any of the recurrent layers' parameters and ``embedding.weight`` (missing ones are zero).
    Returns (de, dz_theta) for :func:`step_jvp`."""
    x_t, caches = cache[:2]
    de = None
    if net.embedding and "embedding.weight" in dtheta:
        de = dtheta["embedding.weight"][x_t]                        # (B, in, P)   (J4)
    dz_theta = []
    for l in range(net.num_layers):
        x, h_prev = caches[l][0], caches[l][1]
        dz = None
        for key, rhs in (("weight_ih", x), ("weight_hh", h_prev)):
            d = dtheta.get(f"{key}_l{l}")
            if d is not None:
                term = np.einsum("gip,bi->bgp", d, rhs)
                dz = term if dz is None else dz + term
        for key in ("bias_ih", "bias_hh"):
            d = dtheta.get(f"{key}_l{l}")
            if d is not None:
                term = np.broadcast_to(d, (x.shape[0],) + d.shape)
                dz = term.copy() if dz is None else dz + term
        dz_theta.append(dz)
    return de, dz_theta


def step_jvp_params(net, cache, dS_prev, dtheta):
    """The full JVP of ``net.step``: dS_t/dS_{t-1} . dS_prev + dS_t/dtheta . dtheta, with
    ``dtheta`` a dict of parameter tangents (*shape, P) (see :func:`param_tangent_inputs`)."""
    de, dz_theta = param_tangent_inputs(net, cache, dtheta)
    return step_jvp(net, cache, dS_prev, de, dz_theta)


def state_param_names(net):
    """The parameters the state update reads, in ``net.params`` order: ``embedding.weight``
    (when there is an embedding) and every recurrent layer's; not the read-out's own
    (``decoder.*``).  These are the columns of the influence matrix dS_t/dtheta."""
    shapes = net.param_shapes()
    return [k for k in shapes if not k.startswith("decoder.")]


def affine_influence(out, x, h_prev, has_bias):
    """Write dz/dtheta_l of one layer's pre-activation z = W_ih x + W_hh h_prev + b_ih + b_hh
    (J3) into ``out`` (B, G*H, n_l), whose columns are the layer's parameters flattened in order
    (weight_ih, weight_hh[, bias_ih, bias_hh]), each C-order; x (B, in), h_prev (B, H).  Only
    the nonzero entries are written (``out`` should start as zeros); returns ``out``.

        dz[b, g, (g', i)] = delta_{g g'} x[b, i]        (weight_ih)
        dz[b, g, (g', j)] = delta_{g g'} h_prev[b, j]   (weight_hh)
        dz[b, g, g']      = delta_{g g'}                (bias_ih, and bias_hh)
    """
    GH = out.shape[1]
    rows = np.arange(GH)
    off = 0
    for rhs in (x, h_prev):
        n = rhs.shape[1]
        cols = off + rows[:, None] * n + np.arange(n)[None, :]          # (GH, n)
        out[:, rows[:, None], cols] = rhs[:, None, :]
        off += GH * n
    if has_bias:
        for _ in range(2):
            out[:, rows, off + rows] = 1.0
            off += GH
    return out
