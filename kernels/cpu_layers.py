"""The CPU backend's layer-by-layer path (:mod:`npbptt.kernels.cpu`): BPTT(K1, K2), the forward
losses and the probe of Eq. (18) on one chunk of batch rows, a layer at a time over all steps.

Each chunk function equals the chunk's rows of the NumPy reference it serves (the entry points in
:mod:`npbptt.kernels.cpu` sum or concatenate the chunks):

    bptt_rows          npbptt.bptt.bptt_reference         Eqs. (15)-(16), recursion (16) down the layers
    step_losses_rows   npbptt.bptt.step_losses_reference  the forward pass and the read-out's losses
    grad_norms_rows    npbptt.probe.grad_norms_reference  Eq. (18) by BPTT(T-1, 1)

It runs every network :func:`npbptt.kernels.shared.supports` accepts, with or without dropout
masks; :mod:`npbptt.kernels.cpu` sends it the networks with a large layer and every masked call.
Layer l at step t only needs layer l-1 at step t, so a layer runs over all steps before the next:

* only the recurrence -- ``W_hh h_{t-1}`` with the cell nonlinearity, and backwards recursion
  (16)'s ``b_k dS_{s-k}/dS_{s-k-1}`` -- is a sequential loop (``_cpu_jit.forward_rows`` and
  ``backward_rows``); ``W_ih x_t`` of every step and the input gradients ``da_t W_ih`` are single
  GEMMs, and the weight gradients ``sum_t da_t^T x_t`` of Eq. (15) per-step GEMMs summed over the
  steps (:func:`_sum_over_steps`: the reference's summation order, so float32 errors match it);
* with an embedding and a small vocabulary (:func:`use_table`), layer 0's input projection is read
  from the table ``W_ih E + b`` (V, G*H) inside the recurrence;
* the read-out's losses and their gradients are one fused kernel (``_cpu_jit.loss_rows``), in
  blocks of steps that bound memory for large vocabularies (BLOCK_ELEMENTS), with the 1/B of the
  batch mean and the 1/K2 of Eq. (15) folded into the loss gradient;
* scratch arrays are this thread's (``runtime.ws``), reused between calls: what a chunk function
  returns in them is valid until the thread's next call.

The only order that differs from the reference's is that of independent operations, so results
agree to round-off (the measurements behind each choice are in docs/kernels.md).
"""
import numpy as np

from . import _cpu_jit as jit
from .runtime import ws as _ws
from .shared import BLOCK_ELEMENTS as _BLOCK_ELEMENTS

__all__ = ["advance", "batch_rows", "bptt_rows", "codes", "grad_norms_rows", "step_losses_rows",
           "use_table"]


def batch_rows(a, r0, r1):
    """Batch rows r0:r1 of a (T, B, ...) input or target array, C-contiguous."""
    return np.ascontiguousarray(a[:, r0:r1])


# --- network pieces -------------------------------------------------------------------------------
class _Layer:
    """What the backward sweep needs of one layer's forward pass over a chunk: its input X (None for
    layer 0 when the input projection came from the embedding table), the activations D, and the
    states Hs (T+1, B, H), Cs (T+1, B, H), TC = tanh(c) (T, B, H) (the last two LSTM only)."""
    __slots__ = ("X", "D", "Hs", "Cs", "TC")

    def __init__(self, X, D, Hs, Cs, TC):
        self.X, self.D, self.Hs, self.Cs, self.TC = X, D, Hs, Cs, TC


def codes(net):
    return (jit.LSTM if net.kind == "lstm" else jit.RNN), jit.ACT[net.activation]


def use_table(net, n_tokens):
    """Whether layer 0's input projection goes through the table E W_ih^T (V, G*H): cheaper than
    the (n_tokens, input_size) GEMMs when the vocabulary is small compared with the tokens."""
    return net.embedding and 2 * net.vocab_size <= n_tokens


def _layer0_input(net, x, D, m_in=None):
    """Layer 0's input projection.  Returns (mode, X, tab, tok): through the embedding table,
    FROM_TABLE with tab (V, G*H) = W_ih E[v] + b_ih + b_hh and the tokens (X None); else the input
    X (T, B, in) -- E[x_t] or the dense x_t, times the input dropout mask ``m_in`` (T, B, in)
    when there is one (never through the table then) -- and FROM_P with D (T, B, G*H) <- W_ih x_t
    for every step at once."""
    p = net.layer(0)
    T, B = x.shape[:2]
    if m_in is None and use_table(net, T * B):
        tab = net.params["embedding.weight"] @ p["weight_ih"].T       # row v: W_ih E[v]
        if "bias_ih" in p:
            tab += p["bias_ih"] + p["bias_hh"]
        return jit.FROM_TABLE, None, tab, np.ascontiguousarray(x, dtype=np.int64)
    if net.embedding:
        X = _ws().get("X0", (T, B, net.input_size), net.dtype)
        np.take(net.params["embedding.weight"], x, axis=0, out=X)    # e_t = E[x_t]
        if m_in is not None:
            X *= m_in                                    # dropout on the layer-0 input
    elif m_in is not None:
        X = _ws().get("X0", (T, B, net.input_size), net.dtype)
        np.multiply(x, m_in, out=X)
    else:
        X = np.ascontiguousarray(x, dtype=net.dtype)
    np.matmul(X.reshape(T * B, -1), p["weight_ih"].T, out=D.reshape(T * B, D.shape[2]))
    return jit.FROM_P, X, None, None


def _forward(net, x, S, m_in=None):
    """Run every layer over the steps of x (T, B) tokens or (T, B, in) from the internal state S,
    layer 0's input times the dropout mask ``m_in`` (T, B, in) when it is given.

    Returns (layers, S_T): ``layers[l]`` a :class:`_Layer` holding the cached activations (views
    of this thread's workspace, valid until the next call), S_T the internal state after the last
    step (new arrays)."""
    kind, act = codes(net)
    T, B = x.shape[:2]
    H, GH, dt = net.hidden_size, net.gates * net.hidden_size, net.dtype
    lstm = kind == jit.LSTM
    none3 = np.empty((0, 0, 0), dt)
    no_tab, no_tok = np.empty((0, GH), dt), np.empty((0, 0), np.int64)
    layers = []
    S_T = tuple(np.empty_like(s) for s in S)
    X = None
    for l in range(net.num_layers):
        p = net.layer(l)
        D = _ws().get(("D", l), (T, B, GH), dt)
        tab, tok = no_tab, no_tok
        if l == 0:
            mode, X, tab0, tok0 = _layer0_input(net, x, D, m_in)
            if mode == jit.FROM_TABLE:
                tab, tok = tab0.astype(dt, copy=False), tok0
        else:                                            # W_ih x_t for every t at once
            mode = jit.FROM_P
            np.matmul(X.reshape(T * B, -1), p["weight_ih"].T, out=D.reshape(T * B, GH))
        bias = (p["bias_ih"] + p["bias_hh"] if "bias_ih" in p else np.zeros(GH, dt)).astype(dt, copy=False)
        Hs = _ws().get(("Hs", l), (T + 1, B, H), dt)
        Hs[0] = S[0][l]
        if lstm:
            Cs = _ws().get(("Cs", l), (T + 1, B, H), dt)
            Cs[0] = S[1][l]
            TC = _ws().get(("TC", l), (T, B, H), dt)
        else:
            Cs = TC = none3
        WhhT = np.ascontiguousarray(p["weight_hh"].T, dtype=dt)
        jit.forward_rows(kind, act, mode, D, bias, tab, tok, WhhT, Hs, Cs, TC, 0, B)
        layers.append(_Layer(X, D, Hs, Cs, TC))
        S_T[0][l] = Hs[T]
        if lstm:
            S_T[1][l] = Cs[T]
        X = Hs[1:]                                       # h_t^(l) is the input of layer l+1
    return layers, S_T


def _block_steps(net, B, width):
    """Steps per block so that a (steps, B, width) buffer holds at most _BLOCK_ELEMENTS."""
    return max(1, _BLOCK_ELEMENTS // (B * max(width, net.gates * net.hidden_size)))


def advance(net, x, S, m_in=None):
    """The state after running the steps of x from S (caches kept for one block at a time),
    with the input dropout masks ``m_in`` (T, B, in) when given."""
    Tb = _block_steps(net, x.shape[1], 1)
    for a in range(0, x.shape[0], Tb):
        S = _forward(net, x[a:a + Tb], S, None if m_in is None else m_in[a:a + Tb])[1]
    return S


def _loss_rows(net, loss, out, yi, yf, scale, want_grad, ell):
    """Fused loss (+ scaled gradient, in place in ``out``) on read-out rows; see jit.loss_rows."""
    code = jit.XENT if loss == "cross_entropy" else jit.MSE
    bias = net.params["decoder.bias"]
    jit.loss_rows(code, out, bias, yi, yf, net.dtype.type(scale), want_grad, ell, 0, out.shape[0])


def _targets(net, loss, y):
    """(yi, yf): int targets (N,) and float targets (N, O), the unused one empty."""
    if loss == "cross_entropy":
        return np.ascontiguousarray(y.reshape(-1), dtype=np.int64), np.empty((0, 0), net.dtype)
    return np.empty(0, np.int64), np.ascontiguousarray(y.reshape(-1, y.shape[-1]), dtype=net.dtype)


def _grad_buffer(name, like):
    """This thread's scratch array for (its chunk's part of) the gradient of parameter ``name``."""
    return _ws().get(("grad", name), like.shape, like.dtype)


def _sum_over_steps(A, X, out, accumulate=False):
    """out (=, or += when ``accumulate``) sum_t A_t^T X_t for A (T, B, m), X (T, B, n): the sum over
    steps of Eq. (15), with the reference's summation structure (a GEMM over the batch at each
    step, then a sum over the steps) so that float32 results have the reference's error, not that
    of one long dot product.  Steps are grouped into one GEMM each only when the per-step products
    would not fit in _BLOCK_ELEMENTS (a large read-out: adding an (m, n) product per step would
    cost more memory traffic than arithmetic)."""
    T, m, n = A.shape[0], A.shape[2], X.shape[2]
    if T * m * n <= _BLOCK_ELEMENTS:
        parts = _ws().get("steps", (T, m, n), A.dtype)
        np.matmul(A.transpose(0, 2, 1), X, out=parts)
        if accumulate:
            out += parts.sum(axis=0)
        else:
            parts.sum(axis=0, out=out)
        return out
    s = -(-T // max(1, _BLOCK_ELEMENTS // (m * n)))    # steps per group
    tmp = _ws().get("group", (m, n), A.dtype)
    for a in range(0, T, s):
        dst = out if a == 0 and not accumulate else tmp
        np.matmul(A[a:a + s].reshape(-1, m).T, X[a:a + s].reshape(-1, n), out=dst)
        if dst is tmp:
            out += tmp
    return out


def _bias_sum(A, out, accumulate=False):
    """out (=, or +=) sum_t sum_b A[t, b] for A (T, B, m): over the batch at each step, then over
    the steps."""
    per_step = A.sum(axis=1)
    if accumulate:
        out += per_step.sum(axis=0)
    else:
        per_step.sum(axis=0, out=out)
    return out


def _readout_backward(net, Htop, y, loss, scale, dH, grads=None):
    """Losses of the read-out on Htop (K, B, H) and the gradients of ``scale * sum ell``: dH
    (K, B, H) is filled in and, when ``grads`` is a dict, the decoder's gradients are put in it
    (this thread's scratch arrays).  Returns ell (K, B).  Blocks of steps of at most
    _BLOCK_ELEMENTS logits bound the memory for large vocabularies."""
    W, dt = net.params["decoder.weight"], net.dtype
    K, B, H = Htop.shape
    O = W.shape[0]
    yi, yf = _targets(net, loss, y)
    ell = np.empty((K, B), np.float64)                   # losses accumulated in float64
    if grads is not None:
        dW = grads["decoder.weight"] = _grad_buffer("decoder.weight", W)
        db = grads["decoder.bias"] = _grad_buffer("decoder.bias", net.params["decoder.bias"])
    steps = max(1, _BLOCK_ELEMENTS // (B * O))
    out = _ws().get("logits", (min(steps, K), B, O), dt)
    for a in range(0, K, steps):
        b = min(a + steps, K)
        o = out[:b - a]
        o2 = o.reshape(-1, O)
        np.matmul(Htop[a:b].reshape(-1, H), W.T, out=o2)
        _loss_rows(net, loss, o2, yi[a * B:b * B] if yi.size else yi,
                   yf[a * B:b * B] if yf.size else yf, scale, True, ell[a:b].reshape(-1))
        if grads is not None:                            # read-out's direct term of Eq. (2)
            _sum_over_steps(o, Htop[a:b], dW, accumulate=a > 0)
            _bias_sum(o, db, accumulate=a > 0)
        np.matmul(o2, W, out=dH[a:b].reshape(-1, H))
    return ell


def _backward(net, x, layers, dH, t_stop, sq, grads=None, m_in=None):
    """Recursion (16) down the layers.  ``dH`` (T, B, H) holds on entry the read-out's gradient
    reaching the top layer's h_t (it is then reused for the gradient reaching each layer below);
    each layer's pre-activation gradients da_t (t >= t_stop) give its weight gradients and, through
    W_ih, the gradient reaching the layer below, as GEMMs over all steps (:func:`_layer_grads`).
    ``x`` are the window's inputs (for the embedding).

    When ``grads`` is a dict the gradients of the recurrent layers and the embedding are put in it
    (this thread's scratch arrays); else only ``sq`` is accumulated (the probe, see
    jit.backward_rows).  ``m_in`` (T, B, in): the input dropout masks of the forward pass (the
    layers' X are the masked inputs already; the embedding's gradient goes through the mask)."""
    kind, act = codes(net)
    for l in reversed(range(net.num_layers)):
        p = net.layer(l)
        L = layers[l]
        Whh = np.ascontiguousarray(p["weight_hh"], dtype=net.dtype)
        jit.backward_rows(kind, act, L.D, L.Hs, L.Cs, L.TC, dH, Whh, t_stop, sq, 0, L.D.shape[1])
        if l > 0 or grads is not None:
            _layer_grads(net, l, p, L, x[t_stop:], L.D[t_stop:], dH[t_stop:], t_stop, grads,
                         None if m_in is None else m_in[t_stop:])


def _layer_grads(net, l, p, L, x, DA, dX, t_stop, grads, m_in=None):
    """Eq. (15)'s sum over steps of b_k . dS/dtheta for layer l's parameters (DA (T', B, G*H) the
    pre-activation gradients of steps t_stop..T-1), put in ``grads`` when it is a dict, and the
    gradient reaching the layer's input: written into dX (T', B, H) for a layer below, or
    scattered into the embedding's gradient (through the input dropout mask ``m_in`` (T', B, in)
    when given: the VJP of E[x_t] * m_t^in)."""
    T = L.D.shape[0]
    DA2 = DA.reshape(-1, DA.shape[2])
    if grads is not None:
        name = lambda k: f"{k}_l{l}"
        grads[name("weight_hh")] = _sum_over_steps(
            DA, L.Hs[t_stop:T], _grad_buffer(name("weight_hh"), p["weight_hh"]))
        if "bias_ih" in p:                               # the same sum for both biases
            db = grads[name("bias_ih")] = _bias_sum(DA, _grad_buffer(name("bias_ih"), p["bias_ih"]))
            dbh = grads[name("bias_hh")] = _grad_buffer(name("bias_hh"), p["bias_hh"])
            dbh[...] = db
        X = L.X
        if X is None:                                    # layer 0 went through the table
            X = _ws().get("X0", x.shape + (net.input_size,), net.dtype)
            np.take(net.params["embedding.weight"], x, axis=0, out=X)
        else:
            X = X[t_stop:]
        grads[name("weight_ih")] = _sum_over_steps(
            DA, X, _grad_buffer(name("weight_ih"), p["weight_ih"]))
    if l > 0:
        np.matmul(DA2, p["weight_ih"], out=dX.reshape(DA2.shape[0], dX.shape[2]))  # into h_t of layer l-1
    elif grads is not None and net.embedding:
        E = net.params["embedding.weight"]
        dE = grads["embedding.weight"] = _grad_buffer("embedding.weight", E)
        dE.fill(0)
        dX0 = _ws().get("dX0", (DA2.shape[0], E.shape[1]), net.dtype)
        np.matmul(DA2, p["weight_ih"], out=dX0)
        if m_in is not None:
            dX0 *= m_in.reshape(dX0.shape)
        jit.scatter_add_rows(np.ascontiguousarray(x.reshape(-1)), dX0, dE)


def _masked_rows(masks, r0, r1):
    """(input, output) dropout masks of batch rows r0:r1, C-contiguous; (None, None) without."""
    if masks is None:
        return None, None
    return batch_rows(masks.input, r0, r1), batch_rows(masks.output, r0, r1)


def _dropped(Htop, m_out):
    """The read-out's input: Htop (K, B, H) times the output dropout mask m_out (K, B, H) in a
    scratch array, or Htop itself without a mask."""
    if m_out is None:
        return Htop
    return np.multiply(Htop, m_out, out=_ws().get("Hdrop", Htop.shape, Htop.dtype))


# --- the three operations on one chunk of rows ---------------------------------------------------
def bptt_rows(net, x, y, S, t0, K2, loss, masks, B, r0, r1):
    """BPTT(K1, K2) by recursion (16) on batch rows r0:r1 of x (T, B) tokens or (T, B, in), y and
    the internal state S, the window starting at step t0 = T-1-K1 (the state entering it is
    constant), with the dropout ``masks`` (or None) and B the whole batch's size (for the 1/B of
    the batch mean).  Returns (ell_sum (K2,) the chunk's per-step loss sums, grads (this thread's
    scratch arrays), S_T (fresh))."""
    T = x.shape[0]
    Tw, H = T - t0, net.hidden_size
    Bc = r1 - r0
    xc, Sc = batch_rows(x, r0, r1), tuple(s[:, r0:r1] for s in S)
    m_in, m_out = _masked_rows(masks, r0, r1)
    if t0 > 0:
        Sc = advance(net, xc[:t0], Sc, None if m_in is None else m_in[:t0])
    m_in = None if m_in is None else m_in[t0:]
    layers, S_T = _forward(net, xc[t0:], Sc, m_in)
    dH = _ws().get("dH", (Tw, Bc, H), net.dtype)
    dH[:Tw - K2] = 0
    # Eq. (16), k < K2: the losses' gradients dL_{s-k}/dS_{s-k}, with the 1/B of the batch
    # mean and the 1/K2 of Eq. (15) folded in (through the output dropout mask, if any)
    grads = {}
    m_top = None if m_out is None else m_out[T - K2:]
    ell = _readout_backward(net, _dropped(layers[-1].Hs[Tw - K2 + 1:], m_top),
                            batch_rows(y[T - K2:], r0, r1), loss, 1.0 / (B * K2), dH[Tw - K2:], grads)
    if m_top is not None:
        dH[Tw - K2:] *= m_top                        # VJP of the output mask
    _backward(net, xc[t0:], layers, dH, 0, np.empty((0, Bc), net.dtype), grads, m_in)
    return ell.sum(axis=1), grads, S_T


def step_losses_rows(net, x, y, S, loss, masks, r0, r1):
    """The forward pass on batch rows r0:r1, with the dropout ``masks`` (or None): (ell_sum (T,)
    the chunk's per-step loss sums, S_T (fresh))."""
    T = x.shape[0]
    H, O = net.hidden_size, net.output_size
    W = net.params["decoder.weight"]
    Bc = r1 - r0
    xc, yc, Sc = batch_rows(x, r0, r1), batch_rows(y, r0, r1), tuple(s[:, r0:r1] for s in S)
    m_in, m_out = _masked_rows(masks, r0, r1)
    Tb = _block_steps(net, Bc, O)
    ell_sum = np.empty(T, np.float64)
    for a in range(0, T, Tb):
        b = min(a + Tb, T)
        layers, Sc = _forward(net, xc[a:b], Sc, None if m_in is None else m_in[a:b])
        Htop = _dropped(layers[-1].Hs[1:], None if m_out is None else m_out[a:b])
        out = _ws().get("logits", ((b - a) * Bc, O), net.dtype)
        np.matmul(Htop.reshape(-1, H), W.T, out=out)
        yi, yf = _targets(net, loss, yc[a:b])
        ell = np.empty(out.shape[0], np.float64)
        _loss_rows(net, loss, out, yi, yf, 1.0, False, ell)
        ell_sum[a:b] = ell.reshape(b - a, Bc).sum(axis=1)
    return ell_sum, Sc


def grad_norms_rows(net, x, y, S, loss, r0, r1):
    """Eq. (18) by BPTT(T-1, 1) on batch rows r0:r1: sq (T, Bc), sq[t] = ||b for S_t||^2 (S_t the
    state after step t; the caller takes the square roots, reversed)."""
    T = x.shape[0]
    H = net.hidden_size
    Bc = r1 - r0
    xc = batch_rows(x, r0, r1)
    layers, _ = _forward(net, xc, tuple(s[:, r0:r1] for s in S))
    dH = _ws().get("dH", (T, Bc, H), net.dtype)
    dH[:T - 1] = 0
    # b_0 = d ell_T / dS_T: the read-out's gradient at the last step, not divided by B
    _readout_backward(net, layers[-1].Hs[T:], batch_rows(y[T - 1:], r0, r1), loss, 1.0, dH[T - 1:])
    sq = np.zeros((T, Bc), net.dtype)                # sq[t] = ||b for S_t||^2, S_t after step t
    sq[T - 1] = (dH[T - 1] * dH[T - 1]).sum(axis=1)
    _backward(net, xc, layers, dH, 1, sq)            # Eq. (16) with K2 = 1: no more losses
    return sq
