"""psi, the parameter-space probe of issue 20, as a Numba CPU kernel (``npbptt.kernels.psi``).

    grad_norms_param(net, x, y, S, loss) -> psi (T, B)     npbptt.probe.param_norms_reference

must equal the NumPy reference :func:`npbptt.probe.param_norms_reference` (float64 to ~1e-12
relative; float32 networks are computed in float64 here, so their error against a float64
evaluation is below the float32 reference's own).  ``npbptt.backends.resolve`` hands it the
operation "grad_norms_param" on backend "numba" for the networks :func:`supports` accepts
(stock RNN / LSTM, embedding or dense input, untied); every other network runs the reference.

The quantity (issue 20): psi[k, b] = ||b_k^(b) . dS_{T-k}/dtheta||, over every parameter except
the read-out's (``decoder.*``), where b_k^(b) = d ell_T^(b) / dS_{T-k} is the state gradient of
the probe of Eq. (18) (phi[k, b] = ||b_k^(b)||, recursion (16) with K2 = 1) and dS_{T-k}/dtheta
the derivative of the step producing S_{T-k} alone.  Per example, lag and layer l that step's
parameter gradient is rank one per block (as ``npbptt.cells``):

    dW_ih = da inp^T,  dW_hh = da h_prev^T,  db_ih = db_hh = da
    ||.||_F^2 = |da|^2 (|inp|^2 + |h_prev|^2 + 2 [biases])

with da the pre-activation gradient of the layer (LSTM: the four gates' blocks), inp the
layer's input (the embedding row E[x_t], the dense x_t, or h_t of the layer below) and h_prev
its h_{t-1}; with an embedding the one gathered row E[x_t^(b)] gets dx = da_0 W_ih_0, adding
|dx|^2.  psi[k, b] is the square root of the sum over layers.

How: layer by layer (the examples of a batch never interact, and a layer's step needs only the
layer below at the same step): the input projections W_ih inp_t + b of all T steps and the
input gradients da_t W_ih of all steps are one GEMM each, in NumPy; only the recurrences are
sequential and jitted -- :func:`_forward_layer` (the cells of section 2 step after step, storing
the activations the backward needs) and :func:`_backward_layer` (recursion (16) restricted to
the layer, from T down, with per-row squared norms accumulated).  Single-threaded (the BLAS
of the GEMMs aside).  sigmoid and tanh are the vectorisable ones of ``kernels/_cpu_jit.py``
(float64 within 3 ulp), inlined here: numba's on-disk cache of this file is keyed on this file
only, so a change to those two functions reaches these kernels once this file changes too (or
numba's cache, ``__pycache__/psi.*.nbi|nbc``, is removed).
"""
import numpy as np
from numba import njit

from npbptt.losses import LOSSES
from ._cpu_jit import sigmoid, tanh
from .shared import supports

__all__ = ["grad_norms_param", "supports"]

_RNN, _LSTM = 0, 1
_ACT = {"tanh": 0, "relu": 1, "sigmoid": 2, "linear": 3}
_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
_INLINE = dict(inline="always", error_model="numpy", fastmath={"contract"})


@njit(**_INLINE)
def _act(code, z):
    """rho(z) of the simple RNN (npbptt.cells.ACTIVATIONS)."""
    if code == 0:
        return tanh(z)
    if code == 1:
        return max(z, 0.0)
    if code == 2:
        return sigmoid(z)
    return z


@njit(**_INLINE)
def _act_grad(code, a):
    """rho'(z) in terms of the output a = rho(z) (npbptt.cells.ACTIVATIONS)."""
    if code == 0:
        return 1.0 - a * a
    if code == 1:
        return 1.0 if a > 0 else 0.0
    if code == 2:
        return a * (1.0 - a)
    return 1.0


@njit(**_INLINE)
def _sumsq(v):
    """sum(v * v) with four interleaved partial sums (a single running sum keeps the loop
    scalar and latency-bound)."""
    n = v.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    for k in range(0, n - 3, 4):
        s0 += v[k] * v[k]
        s1 += v[k + 1] * v[k + 1]
        s2 += v[k + 2] * v[k + 2]
        s3 += v[k + 3] * v[k + 3]
    for k in range(n - n % 4, n):
        s0 += v[k] * v[k]
    return (s0 + s1) + (s2 + s3)


# Every inner loop below touches few arrays, through separate views, and holds no running sum,
# so that LLVM vectorises it (the speed rule of kernels/_cpu_jit.py, whose vectorisable sigmoid
# and tanh are used: float64 within 3 ulp of the true values).
@njit(**_JIT)
def _forward_layer(kind, act, P, WhhT, Hs, Cs, TC):
    """One layer over T steps (``npbptt.cells.rnn_step`` / ``lstm_step``, Eq. (1)), all rows.

    P    : (T, B, G*H) float64, W_ih inp_t + b_ih + b_hh on entry; on exit the activations
           (LSTM: the gates i, f, g, o of each step; RNN: h_t)
    WhhT : (H, G*H) = W_hh^T, C-contiguous
    Hs   : (T+1, B, H), Hs[0] the entering h; Hs[t+1] <- h_t
    Cs   : (T+1, B, H), Cs[0] the entering c; Cs[t+1] <- c_t    (LSTM; unused for the RNN)
    TC   : (T, B, H) <- tanh(c_t)                               (LSTM; unused for the RNN)
    """
    T, B, GH = P.shape
    H = Hs.shape[2]
    H2, H3 = 2 * H, 3 * H
    A = np.empty((B, GH))
    for t in range(T):
        np.dot(Hs[t], WhhT, A)                         # W_hh h_{t-1}, all rows
        for b in range(B):
            p, a = P[t, b], A[b]
            for j in range(GH):
                a[j] += p[j]                           # + W_ih inp_t + b_ih + b_hh
            if kind == _LSTM:
                p_if, a_if, p_z, a_z, p_o, a_o = p[:H2], a[:H2], p[H2:H3], a[H2:H3], p[H3:], a[H3:]
                for j in range(H2):
                    p_if[j] = sigmoid(a_if[j])         # i_t, f_t
                for j in range(H):
                    p_z[j] = tanh(a_z[j])              # z_t (g)
                for j in range(H):
                    p_o[j] = sigmoid(a_o[j])           # o_t
                c_prev, c = Cs[t, b], Cs[t + 1, b]
                for j in range(H):
                    c[j] = p[j] * p[H2 + j] + p[H + j] * c_prev[j]   # c_t = i o z + f o c_{t-1}
                tc = TC[t, b]
                for j in range(H):
                    tc[j] = tanh(c[j])
                o, h = p[H3:], Hs[t + 1, b]
                for j in range(H):
                    h[j] = o[j] * tc[j]                # h_t = o o tanh(c_t)
            else:
                h = Hs[t + 1, b]
                for j in range(H):
                    p[j] = _act(act, a[j])
                for j in range(H):
                    h[j] = p[j]


@njit(**_JIT)
def _backward_layer(kind, act, P, Cs, TC, Whh, dX, dh_last, NIN, sq):
    """Recursion (16) with K2 = 1 restricted to one layer, from step T down to 1, with the
    step-alone parameter norms of issue 20 (``npbptt.probe.step_param_norms``).

    P, Cs, TC : the layer's forward (:func:`_forward_layer`); P is overwritten by da_t, the
              pre-activation gradients (``cells.*_step_vjp``'s dz / da)
    Whh     : (G*H, H) W_hh, C-contiguous
    dX      : (T, B, H) d ell_T / d h_t through the layer above at the same step (zeros for the
              top layer)
    dh_last : (B, H) d ell_T / d h_T from the read-out (top layer), else zeros
    NIN     : (T, B) |inp_t|^2 + |h_{t-1}|^2 (+ 2 with biases): the rank-one factor
    sq      : (T, B) += |da_t|^2 NIN_t, the layer's share of psi^2 at lag T-1-t
    """
    T, B, GH = P.shape
    H = Cs.shape[2]
    H2, H3 = 2 * H, 3 * H
    bh = dh_last.copy()                                # b_k's h part of this layer
    bc = np.zeros((B, H))                              # b_k's c part (LSTM)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            d, dh, dx = P[t, b], bh[b], dX[t, b]
            for j in range(H):
                dh[j] += dx[j]                         # from step t+1 and from the layer above
            if kind == _LSTM:
                dc, tc = bc[b], TC[t, b]
                for j in range(H):
                    o, tcj = d[H3 + j], tc[j]
                    dc[j] = dc[j] + dh[j] * o * (1.0 - tcj * tcj)   # through h_t = o tanh(c_t)
                    d[H3 + j] = dh[j] * tcj * o * (1.0 - o)         # o
                c_prev = Cs[t, b]
                for j in range(H):
                    i, f, g, dcj = d[j], d[H + j], d[H2 + j], dc[j]
                    d[j] = dcj * g * i * (1.0 - i)                  # i
                    d[H + j] = dcj * c_prev[j] * f * (1.0 - f)      # f
                    d[H2 + j] = dcj * i * (1.0 - g * g)             # g (z)
                    dc[j] = dcj * f                    # Eq. (16): the c part of b_{k+1}
            else:
                for j in range(H):
                    d[j] = dh[j] * _act_grad(act, d[j])             # dz = dh rho'(z)
            sq[t, b] += _sumsq(d) * NIN[t, b]          # ||da inp^T||^2 + ||da h_prev^T||^2 + biases
        np.dot(P[t], Whh, bh)                          # Eq. (16): the h part of b_{k+1}


def _f64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


def grad_norms_param(net, x, y, S, loss):
    """psi (T, B), psi[k, b] = ||d ell_T^(b)/dS_{T-k} . dS_{T-k}/dtheta|| on validated inputs
    (``npbptt.grad_norms(..., norm="param")``); equals
    :func:`npbptt.probe.param_norms_reference`.  Computed in float64 for either float type."""
    T, B = x.shape[:2]
    L, H, G = net.num_layers, net.hidden_size, net.gates
    kind = _LSTM if net.kind == "lstm" else _RNN
    act = _ACT[net.activation]
    W = {k: _f64(v) for k, v in net.params.items()}
    inp = W["embedding.weight"][x] if net.embedding else _f64(x)       # (T, B, in): gathered rows
    Hs = np.empty((L, T + 1, B, H))
    Cs = np.zeros((L, T + 1, B, H))
    TC = np.zeros((L, T, B, H))
    Ps = np.empty((L, T, B, G * H))
    NIN = np.empty((L, T, B))
    for l in range(L):
        p = {k: W[f"{k}_l{l}"] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
             if f"{k}_l{l}" in W}
        Hs[l, 0] = S[0][l]
        if kind == _LSTM:
            Cs[l, 0] = S[1][l]
        P = Ps[l]
        np.dot(inp.reshape(T * B, -1), p["weight_ih"].T, P.reshape(T * B, G * H))
        if "bias_ih" in p:
            P += p["bias_ih"] + p["bias_hh"]
        _forward_layer(kind, act, P, np.ascontiguousarray(p["weight_hh"].T), Hs[l], Cs[l], TC[l])
        NIN[l] = (inp * inp).sum(axis=2) + (Hs[l, :T] * Hs[l, :T]).sum(axis=2)
        if "bias_ih" in p:
            NIN[l] += 2.0
        inp = Hs[l, 1:]
    # the read-out of the last step (float64): b_0 = d ell_T / dh_T of the top layer
    h_top = Hs[L - 1, T]
    W_dec = W[net.decoder_weight_name]
    yT = y[T - 1] if np.issubdtype(y.dtype, np.integer) else _f64(y[T - 1])
    _, dout = LOSSES[loss](h_top @ W_dec.T + W["decoder.bias"], yT)
    dh_top = np.ascontiguousarray(dout @ W_dec)
    sq = np.zeros((T, B))
    dX = np.zeros((T, B, H))
    zeros = np.zeros((B, H))
    for l in reversed(range(L)):
        _backward_layer(kind, act, Ps[l], Cs[l], TC[l], W[f"weight_hh_l{l}"], dX,
                        dh_top if l == L - 1 else zeros, NIN[l], sq)
        W_ih = W[f"weight_ih_l{l}"]
        dX = (Ps[l].reshape(T * B, G * H) @ W_ih).reshape(T, B, W_ih.shape[1])  # da_t W_ih, all t
    if net.embedding:
        sq += (dX * dX).sum(axis=2)                    # the gathered row E[x_t^(b)] gets dx
    return np.sqrt(sq[::-1])                           # row k: the step producing S_{T-k}
