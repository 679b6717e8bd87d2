"""One recurrent layer, one time step: forward beside its vector-Jacobian product (§2).

Each cell is a stateless pair

    step(p, S_prev, x)        -> S, cache
    step_vjp(p, cache, dS)    -> dp, dS_prev, dx     (same order as the forward's arguments)

with ``p`` the layer's parameters named as in PyTorch without the layer suffix
(``weight_ih`` (G*H, in), ``weight_hh`` (G*H, H), ``bias_ih`` (G*H,), ``bias_hh`` (G*H,),
biases absent when the network has ``bias=False``), ``x`` of shape (B, in) and the state of
shape (B, H) (simple RNN) or a pair ((B, H), (B, H)) = (h, c) (LSTM).

``dS`` is the gradient with respect to the state the step hands on, *as the input of the next
step and of whatever reads it* (the layer above, the read-out).  For the LSTM this means that
``dS = (dh, dc)`` with ``dc`` not containing the path c_t -> h_t inside this step; the vjp adds
that path itself (the ``dc + dh * o * tanh'(c)`` line below).  The returned ``dS_prev`` has the
same meaning one step earlier: it is the ``b_k`` of recursion (16) restricted to this layer.
"""
import numpy as np

__all__ = ["ACTIVATIONS", "rnn_step", "rnn_step_vjp", "lstm_step", "lstm_step_vjp", "sigmoid"]


def sigmoid(z):
    """Logistic function, computed without overflow for large |z|."""
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


# Activation rho of the simple RNN, with its derivative written in terms of the output
# a = rho(z) where that is possible (it is for all four), so the cache only keeps a.
ACTIVATIONS = {
    "tanh": (np.tanh, lambda a: 1.0 - a * a),
    "relu": (lambda z: np.maximum(z, 0), lambda a: (a > 0).astype(a.dtype)),
    "sigmoid": (sigmoid, lambda a: a * (1.0 - a)),
    "linear": (lambda z: z, lambda a: np.ones_like(a)),
}


def _affine(p, h_prev, x):
    """W_ih x + b_ih + W_hh h_prev + b_hh for a batch: (B, in), (B, H) -> (B, G*H)."""
    z = x @ p["weight_ih"].T + h_prev @ p["weight_hh"].T
    if "bias_ih" in p:
        z += p["bias_ih"] + p["bias_hh"]
    return z


def _affine_vjp(p, x, h_prev, dz):
    """Gradients of :func:`_affine` given dz (B, G*H): returns (dp, dh_prev, dx)."""
    dp = {"weight_ih": dz.T @ x, "weight_hh": dz.T @ h_prev}
    if "bias_ih" in p:
        dp["bias_ih"] = dz.sum(axis=0)
        dp["bias_hh"] = dp["bias_ih"].copy()
    return dp, dz @ p["weight_hh"], dz @ p["weight_ih"]


def rnn_step(p, h_prev, x, activation="tanh"):
    """Simple RNN (§2): h_t = rho(W_hh h_{t-1} + W_ih x_t + b). Shapes (B, H), (B, in) -> (B, H)."""
    rho, _ = ACTIVATIONS[activation]
    h = rho(_affine(p, h_prev, x))
    return h, (x, h_prev, h)


def rnn_step_vjp(p, cache, dh, activation="tanh"):
    """VJP of :func:`rnn_step`: dh (B, H) -> (dp, dh_prev (B, H), dx (B, in))."""
    x, h_prev, h = cache
    _, drho = ACTIVATIONS[activation]
    dz = dh * drho(h)                       # dL/dz = dL/dh * rho'(z)
    return _affine_vjp(p, x, h_prev, dz)


def lstm_step(p, S_prev, x):
    """LSTM (§2), PyTorch gate order i, f, g(=z), o. S_prev = (h, c), each (B, H)."""
    h_prev, c_prev = S_prev
    H = h_prev.shape[1]
    a = _affine(p, h_prev, x)
    i = sigmoid(a[:, :H])                   # i_t = sigma(W_i h_{t-1} + U_i x_t)
    f = sigmoid(a[:, H:2 * H])              # f_t = sigma(W_f h_{t-1} + U_f x_t)
    g = np.tanh(a[:, 2 * H:3 * H])          # z_t = tanh(W_z h_{t-1} + U_z x_t)
    o = sigmoid(a[:, 3 * H:])               # o_t = sigma(W_o h_{t-1} + U_o x_t)
    c = i * g + f * c_prev                  # c_t = i_t o z_t + f_t o c_{t-1}
    tc = np.tanh(c)
    h = o * tc                              # h_t = o_t o tanh(c_t)
    return (h, c), (x, h_prev, c_prev, i, f, g, o, tc)


def lstm_step_vjp(p, cache, dS):
    """VJP of :func:`lstm_step`: dS = (dh, dc) -> (dp, (dh_prev, dc_prev), dx).

    ``dc`` is the gradient w.r.t. c_t as the input of step t+1 only; the path c_t -> h_t of this
    step is added here.
    """
    x, h_prev, c_prev, i, f, g, o, tc = cache
    dh, dc = dS
    dc = dc + dh * o * (1.0 - tc * tc)      # through h_t = o_t tanh(c_t)
    da = np.concatenate([
        dc * g * i * (1.0 - i),             # d/d(pre-activation of i)
        dc * c_prev * f * (1.0 - f),        # f
        dc * i * (1.0 - g * g),             # g (z)
        dh * tc * o * (1.0 - o),            # o
    ], axis=1)
    dp, dh_prev, dx = _affine_vjp(p, x, h_prev, da)
    return dp, (dh_prev, dc * f), dx
