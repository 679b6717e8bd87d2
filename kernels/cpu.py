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
* within a chunk the stacked network runs layer by layer over all steps (layer l at step t only
  needs layer l-1 at step t).  Small networks (every layer's W_ih and W_hh within _FUSE_BYTES,
  :func:`_small_call`) do everything step by step in two kernel calls, feature-major (a_t^T
  (G*H, B)): the input projection, the weight gradients ``da_t^T h_{t-1}``, ``da_t^T x_t``
  (each step's product formed, then added, as the reference sums them) and the input gradients,
  while the step's rows are in cache; the calling thread's backward kernel, once the other
  chunks are done, sums the chunks' gradients and losses (:class:`_SmallCall`);
* for large layers only the recurrence -- ``W_hh h_{t-1}`` with the cell nonlinearity, and
  backwards recursion (16)'s ``b_k dS_{s-k}/dS_{s-k-1}`` -- is a sequential loop, jitted in
  :mod:`._cpu_jit`; ``W_ih x_t`` of every step and the input gradients ``da_t W_ih`` are single
  GEMMs, and the weight gradients ``sum_t da_t^T x_t`` per-step GEMMs summed over the steps (the
  reference's summation order, so float32 errors match the reference's);
* with an embedding and a small vocabulary, layer 0's input projection is read from the table
  ``W_ih E + b`` (V, G*H) inside the recurrence;
* the read-out's losses and their gradients are one fused kernel, in blocks of steps that bound
  memory for large vocabularies, with the 1/B of the batch mean and the 1/K2 of Eq. (15) folded
  into the loss gradient (everything after it is linear in it);
* scratch arrays are reused between calls (``runtime.Workspace``).

The first call compiles the kernels (a few seconds per float type) and stores them in numba's
on-disk cache; later processes load them (:func:`warmup` forces both).
"""
import math

import numba
import numpy as np

from . import _cpu_jit as jit
from .shared import BLOCK_ELEMENTS as _BLOCK_ELEMENTS, carve as _carve, supports
from .shared import untied as _untied
from .runtime import NO_FLAGS as _NO_FLAGS, SPINS as _SPINS, blas_single_thread, release_workspace
from .runtime import caller_workspaces as _caller_workspaces, parallel as _parallel
from .runtime import run_tasks as _run_tasks, ws as _ws

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
    2 x 16, 64 gives 2 x 32, 128 gives 4 x 32.  (Smaller chunks leave more threads busy on a
    many-core machine but cost the GEMMs: W1 (B = 64) in 4 chunks of 16 ran 8% (float64) and 14%
    (float32) slower on 2 threads than in 2 of 32.)  Every chunk uses a single-threaded BLAS,
    also for large layers where a multi-threaded BLAS on the whole batch would halve the traffic
    of W_hh: its threads spin-wait for each other at every small GEMM of the recurrence, which is
    up to 10x slower when the cores are shared."""
    n = min(_MAX_CHUNKS, max(B // _CHUNK_ROWS, min(2, B // _MIN_ROWS_PER_CHUNK)))
    if n <= 1:
        return [(0, B)]
    return [(c * B // n, (c + 1) * B // n) for c in range(n)]


def _rows(a, r0, r1):
    """Batch rows r0:r1 of a (T, B, ...) input or target array, C-contiguous."""
    return np.ascontiguousarray(a[:, r0:r1])


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


# --- network pieces -------------------------------------------------------------------------------
class _Layer:
    """What the backward sweep needs of one layer's forward pass over a chunk: its input X (None for
    layer 0 when the input projection came from the embedding table), the activations D, and the
    states Hs (T+1, B, H), Cs (T+1, B, H), TC = tanh(c) (T, B, H) (the last two LSTM only)."""
    __slots__ = ("X", "D", "Hs", "Cs", "TC")

    def __init__(self, X, D, Hs, Cs, TC):
        self.X, self.D, self.Hs, self.Cs, self.TC = X, D, Hs, Cs, TC


def _codes(net):
    return (jit.LSTM if net.kind == "lstm" else jit.RNN), jit.ACT[net.activation]


def _use_table(net, n_tokens):
    """Whether layer 0's input projection goes through the table E W_ih^T (V, G*H): cheaper than
    the (n_tokens, input_size) GEMMs when the vocabulary is small compared with the tokens."""
    return net.embedding and 2 * net.vocab_size <= n_tokens


def _fused(net, l):
    """Whether layer l is small: its W_ih and W_hh fit in _FUSE_BYTES, so that it can compute its
    input projection W_ih x_t, its weight gradients and its input gradient step by step while
    the step's rows are in cache (a large layer would stream its weights and their gradients
    from memory at every step; it does them as GEMMs over all steps instead)."""
    n_in = net.input_size if l == 0 else net.hidden_size
    G, H = net.gates, net.hidden_size
    return G * H * (n_in + H) * net.dtype.itemsize <= _FUSE_BYTES


def _layer0_input(net, x, D, m_in=None):
    """Layer 0's input projection.  Returns (mode, X, tab, tok): through the embedding table,
    FROM_TABLE with tab (V, G*H) = W_ih E[v] + b_ih + b_hh and the tokens (X None); else the input
    X (T, B, in) -- E[x_t] or the dense x_t, times the input dropout mask ``m_in`` (T, B, in)
    when there is one (never through the table then) -- and FROM_P with D (T, B, G*H) <- W_ih x_t
    for every step at once."""
    p = net.layer(0)
    T, B = x.shape[:2]
    if m_in is None and _use_table(net, T * B):
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
    kind, act = _codes(net)
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


def _advance(net, x, S, m_in=None):
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
    kind, act = _codes(net)
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


# --- small networks: one kernel call per chunk, feature-major ---------------------------------------
def _small_path(net, chunks):
    """Whether to run the small path (:func:`_small_call`): every layer small (:func:`_fused`)
    and, for float32, every chunk at least _SMALL_MIN_ROWS32 rows wide.  (Feature-major, the
    batch is the GEMMs' N dimension, which BLAS's float32 kernels process 16 columns at a time:
    narrower chunks waste lanes, and W1-sized networks with 2-15 rows ran 8-19% slower than
    layer by layer.)"""
    if np.dtype(net.dtype) == np.float32 and min(r1 - r0 for r0, r1 in chunks) < _SMALL_MIN_ROWS32:
        return False
    return all(_fused(net, l) for l in range(net.num_layers))


class _SmallParams:
    """The parameters of a small network stacked over layers as jit.small_forward / small_backward
    take them, shared read-only by the chunks of a call and refreshed once per call: views of one
    buffer, filled by one concatenation of the parameters (then b_ih + b_hh and the table)."""

    def __init__(self, net, table):
        dt, L, H, O = net.dtype, net.num_layers, net.hidden_size, net.output_size
        GH, n_in = net.gates * H, net.input_size
        V = net.vocab_size if net.embedding else 0
        biases = "bias_ih_l0" in net.params
        nb = L if biases else 0
        self.names = ([f"weight_hh_l{l}" for l in range(L)] + [f"weight_ih_l{l}" for l in range(1, L)]
                      + ["weight_ih_l0", "decoder.weight", "decoder.bias"]
                      + (["embedding.weight"] if net.embedding else [])
                      + [f"bias_ih_l{l}" for l in range(nb)] + [f"bias_hh_l{l}" for l in range(nb)])
        shapes = [(L, GH, H), (L - 1, GH, H), (GH, n_in), (O, H), (O,), (V, n_in), (nb, GH), (nb, GH)]
        self.flat = np.empty(sum(math.prod(shape) for shape in shapes), dt)
        (self.Whh, self.Wih, self.Wih0, self.Wdec, self.bdec, self.E, self.b_ih,
         self.b_hh) = _carve(self.flat, shapes)  # W_hh of each layer, W_ih of layers 1.., of layer 0
        self.bias = np.zeros((L, GH), dt)                                      # b_ih + b_hh
        self.tabT = np.empty((GH, V if table else 0), dt)   # column v: W_ih E[v] + b_ih + b_hh

    def refresh(self, net):
        """Copy the current parameters in."""
        P = net.params
        np.concatenate([P[name] for name in self.names], axis=None, out=self.flat)
        if self.b_ih.shape[0]:
            np.add(self.b_ih, self.b_hh, out=self.bias)
        if self.tabT.shape[1]:
            np.matmul(self.Wih0, self.E.T, out=self.tabT)
            self.tabT += self.bias[0][:, None]


class _SmallPlan:
    """What one chunk of rows (r0, r0 + Bc) of a small network needs for calls of one shape: its
    buffers and the two kernels' argument tuples over them, over the parameters ``prm``
    (:class:`_SmallParams`) and over the call's shared arrays ``call`` (:class:`_SmallCall`).
    The calling thread loads the inputs (:meth:`load`) in place; :meth:`run` runs the kernels,
    which write the chunk's rows of the final state: no Python beyond the two kernel calls runs
    in the worker threads, which matters because it runs under one GIL.  (Loading inside
    small_forward would save ~25 us a call but cost ~1 s more compile time per float type.)
    The accumulators are zeroed by the kernels themselves; the gradients are views of row c of
    ``call.G``."""

    def __init__(self, net, prm, call, c, r0, Bc):
        kind, act = _codes(net)
        dt, L, H, O = net.dtype, net.num_layers, net.hidden_size, net.output_size
        GH, n_in, lstm = net.gates * H, net.input_size, kind == jit.LSTM
        T, K2, probe = call.T, call.K2, call.probe
        table = prm.tabT.shape[1] > 0
        e2, e3 = np.empty((0, 0), dt), np.empty((0, 0, 0), dt)
        self.call, self.c, self.r0, self.r1 = call, c, r0, r0 + Bc
        self._entries = None      # the two kernels' compiled entry points for these arguments
        tok = np.empty((T, Bc) if net.embedding else (0, 0), np.int64)
        X0 = np.empty((T, Bc, n_in), dt) if not table else e3                 # x_t, and transposed
        X0T = np.empty((T, n_in, Bc), dt) if not table else e3
        PT = np.empty((L, T, GH, Bc), dt)
        HT = np.empty((L, T + 1, H, Bc), dt)
        Hrm = np.empty((L, T + 1, Bc, H), dt)
        CT = np.empty((L, T + 1, H, Bc) if lstm else (L, 0, 0, 0), dt)
        TCT = np.empty((L, T, H, Bc) if lstm else (L, 0, 0, 0), dt)
        dHT = np.empty((T, H, Bc), dt)
        ell = np.empty(K2 * Bc, np.float64)
        yi = np.empty(K2 * Bc if call.loss == "cross_entropy" else 0, np.int64)
        yf = np.empty((K2 * Bc, O) if call.loss != "cross_entropy" else (0, 0), dt)
        if probe:
            g = (e2, e3, np.empty((L, 0, 0), dt), np.empty((L, 0), dt), e2)
            dec = (e2, np.empty(0, dt))
        else:                     # dWih0, dWih, dWhh, db, dE, then dWdec, dbdec: views of G[c]
            views = _carve(call.G[c], call.gshapes)
            g, dec = tuple(views[:5]), tuple(views[5:])
        mode0 = jit.FROM_TABLE if table else jit.FROM_X
        out = np.empty((K2, Bc, O), dt)                  # logits, then the loss gradients
        self.fwd = (kind, act, mode0, X0T, prm.tabT, tok, prm.Wih0, prm.Wih, prm.Whh, prm.bias,
                    PT, HT, CT, TCT, Hrm, prm.Wdec, out)
        # where load() puts the inputs: views, made once
        self._tok, self._X0, self._X0T, self._E = tok, X0, X0T, prm.E
        self._y = yi.reshape(K2, Bc) if call.loss == "cross_entropy" else yf.reshape(K2, Bc, O)
        self._h0, self._h0T = Hrm[:, 0], HT[:, 0].transpose(0, 2, 1)
        self._c0T = CT[:, 0].transpose(0, 2, 1) if lstm else None
        self.bwd = (kind, act, PT, Hrm, CT, TCT, dHT, prm.Whh, prm.Wih, prm.Wih0, X0, tok, prm.E,
                    1 if probe else 0, call.sq, g[2], g[1], g[0], g[3], g[4],
                    jit.DOWN_EMBED if net.embedding and not probe else jit.DOWN_NONE, prm.Wdec,
                    out, *dec, jit.XENT if call.loss == "cross_entropy" else jit.MSE, prm.bdec,
                    yi, yf, dt.type(call.scale), ell, r0, c, call.ELL,
                    call.G if c == 0 else call.e2, call.db_at)

    def load(self, x, y, S):
        """The chunk's rows of the call's inputs: x (T, Bc) tokens or (T, Bc, in), the targets y
        of the last K2 steps and the state S."""
        if self._tok.shape[0]:
            self._tok[...] = x
        if self._X0.shape[0]:
            if self._tok.shape[0]:
                np.take(self._E, self._tok, axis=0, out=self._X0)    # e_t = E[x_t]
            else:
                self._X0[...] = x
            self._X0T[...] = self._X0.transpose(0, 2, 1)
        self._y[...] = y
        self._h0[...] = S[0]
        self._h0T[...] = S[0]
        if self._c0T is not None:
            self._c0T[...] = S[1]

    def run(self, flags=_NO_FLAGS, posted=_NO_FLAGS):
        """The chunk's two kernel calls on the call's current outputs (``call.now``); for the
        chunk of the calling thread in :func:`_run_tasks`, the first sets ``posted``, the second
        then waits for ``flags`` and gathers the call's results."""
        hout, cout, gout = self.call.now
        if self.c:
            gout = self.call.e1
        if self._entries is None:
            self._entries = (
                _entry(jit.small_forward, self.fwd + (self.r0, hout, cout, posted)),
                _entry(jit.small_backward, self.bwd + (gout, self.call.val, flags, _SPINS)))
        self._entries[0](*self.fwd, self.r0, hout, cout, posted)
        self._entries[1](*self.bwd, gout, self.call.val, flags, _SPINS)


class _SmallCall:
    """The arrays a call of one shape on a small network shares between its chunks, and the
    chunks' plans (:class:`_SmallPlan`): every chunk's gradients as the rows of G (n_chunks, n_g),
    its per-step loss sums as the rows of ELL (n_chunks, K2), the probe's squared norms sq (T, B)
    (columns by chunk), and ``val`` (the mean loss, 1 once gathered); the calling thread's kernel
    gathers the sums once every chunk is done (``npbptt.kernels._cpu_jit._gather``).  ``names``
    says where each parameter's gradient lies in the gathered vector."""

    def __init__(self, net, prm, T, chunks, K2, loss, scale, probe):
        dt, L, GH = net.dtype, net.num_layers, net.gates * net.hidden_size
        B = chunks[-1][1]
        self.T, self.K2, self.loss, self.scale, self.probe = T, K2, loss, scale, probe
        self.lstm = net.kind == "lstm"
        self.state_shape = (L, B, net.hidden_size)
        self.e1, self.e2, self.e3 = np.empty(0, dt), np.empty((0, 0), dt), np.empty((0, 0, 0), dt)
        nb = GH if "bias_ih_l0" in net.params else 0
        self.gshapes = [prm.Wih0.shape, prm.Wih.shape, prm.Whh.shape, (L, nb), prm.E.shape,
                        prm.Wdec.shape, prm.bdec.shape]
        sizes = [math.prod(shape) for shape in self.gshapes]
        n_g = sum(sizes)
        self.G = np.empty((len(chunks), 0 if probe else n_g), dt)
        self.db_at = sum(sizes[:3])
        self.n_out = n_g + L * nb                        # and a copy of db: the second bias
        self.ELL = np.empty((len(chunks), K2), np.float64)
        self.val = np.zeros(2, np.float64)               # the mean loss, and 1 once gathered
        self.sq = np.empty((T if probe else 0, B), dt)
        self.names = None if probe else self._names(net, sizes, nb)
        self.now = None
        self.plans = [_SmallPlan(net, prm, self, c, r0, r1 - r0) for c, (r0, r1) in enumerate(chunks)]

    def _names(self, net, sizes, nb):
        """[(name, start, shape)] of each parameter's gradient in the gathered vector, in the
        order of ``net.params``."""
        at = np.cumsum([0] + sizes).tolist()
        GH, H = net.gates * net.hidden_size, net.hidden_size
        out = []
        for name, p in net.params.items():
            if name in ("embedding.weight", "decoder.weight", "decoder.bias"):
                start = at[{"embedding.weight": 4, "decoder.weight": 5, "decoder.bias": 6}[name]]
            else:
                key, l = name.rsplit("_l", 1)
                l = int(l)
                start = {"weight_ih": at[0] if l == 0 else at[1] + (l - 1) * GH * H,
                         "weight_hh": at[2] + l * GH * H, "bias_ih": at[3] + l * nb,
                         "bias_hh": at[7] + l * nb}[key]
            out.append((name, start, p.shape))
        return out

    def __call__(self, x, y, S):
        """Run every chunk on x (T, B) tokens or (T, B, in) inputs, y the targets of the last K2
        steps and S the internal state.  Returns (gout, S_T): the gathered gradient vector (fresh;
        empty for the probe) and the final state (fresh)."""
        dt = self.G.dtype
        for plan in self.plans:
            r0, r1 = plan.r0, plan.r1
            plan.load(x[:, r0:r1], y[:, r0:r1], [s[:, r0:r1] for s in S])
        hout = np.empty(self.state_shape, dt)
        cout = np.empty(self.state_shape, dt) if self.lstm else self.e3
        gout = self.e1 if self.probe else np.empty(self.n_out, dt)
        self.now = (hout, cout, gout)
        self.val[1] = 0.0
        try:
            _run_tasks([plan.run for plan in self.plans], first_waits=True)
        finally:
            self.now = None
        if not self.probe and self.val[1] == 0.0:     # the kernel's wait for the workers ran out
            jit.gather(self.G, gout, self.db_at, self.ELL, self.val, self.state_shape[1])
        return gout, ((hout, cout) if self.lstm else (hout,))

    def grads(self, gout):
        """The gradients as a dict in the order of ``net.params``: views of ``gout``."""
        return {name: gout[a:a + math.prod(shape)].reshape(shape) for name, a, shape in self.names}


def _entry(dispatcher, args):
    """The compiled entry point of numba ``dispatcher`` for arguments of the types of ``args``
    (compiled, or loaded from numba's cache, if need be): calling it directly skips numba's type
    dispatch, which for the small kernels' ~30 arguments holds the GIL ~2.5 us a call, and a
    second thread wanting the GIL meanwhile sleeps and wakes (20-100 us here)."""
    return dispatcher.compile(tuple(numba.typeof(a) for a in args))


_PLANS_KEPT = 4                  # per calling thread: the most recent call shapes


def _small_call(net, x, y, S, chunks, K2, loss, scale, probe, n_tokens):
    """A small network over the rows of every chunk, in parallel (x (T, B) tokens or (T, B, in)
    inputs, y the targets of the last K2 steps, S the internal state): per chunk jit.small_forward
    and jit.small_backward (the read-out's losses and their gradients on the last K2 steps,
    scaled by ``scale``, then recursion (16); with ``probe`` only the squared state-gradient norms
    sq (T, B), no parameter gradients).  The parameters are copied in and the chunks' inputs
    loaded by the calling thread.  Returns (call, gout, S_T): the call's
    :class:`_SmallCall` (``call.val[0]`` the mean loss, ``call.sq`` the probe's squared norms:
    scratch of the calling thread, valid until its next call), the gathered gradient vector
    (fresh, see ``call.grads``) and the final state (fresh).

    (Two kernel calls rather than one kernel calling both: numba re-optimises every jitted
    function a kernel calls as part of it, which cost 2 s more compile time per float type.)"""
    T = x.shape[0]
    table = _use_table(net, n_tokens)
    # The plan is keyed on everything its buffers are sized by -- the parameters' names, shapes
    # and dtypes included, not only the architecture -- and kept only once the call succeeded,
    # so that a call that fails (bad input, KeyboardInterrupt) never leaves a plan for the next.
    key = (type(net), net.kind, net.activation, net.num_layers, net.hidden_size, net.input_size,
           net.output_size, net.vocab_size, net.dtype,
           tuple((n, p.shape, p.dtype.str) for n, p in net.params.items()),
           T, tuple(chunks), K2, loss, scale, probe, table)
    plans = _caller_workspaces(1)[0].plans
    entry = plans.pop(key, None)
    if entry is None:
        prm = _SmallParams(net, table)
        entry = prm, _SmallCall(net, prm, T, chunks, K2, loss, scale, probe)
    prm, call = entry
    prm.refresh(net)
    gout, S_out = call(x, y, S)
    plans[key] = entry                                   # most recent last
    while len(plans) > _PLANS_KEPT:
        del plans[next(iter(plans))]
    return call, gout, S_out


# --- the three operations -----------------------------------------------------------------------
def takes_masks(op, net):
    """Whether this module's ``op`` takes dropout masks (the keyword ``masks``, as the reference)
    for ``net``: ``bptt`` and ``step_losses`` of every network :func:`supports` accepts (a masked
    call runs layer by layer, :func:`_masked_rows`); never the probe, which has no dropout.
    Asked by ``npbptt.backends.resolve``."""
    return op in ("bptt", "step_losses") and supports(net)


def _masked_rows(masks, r0, r1):
    """(input, output) dropout masks of batch rows r0:r1, C-contiguous; (None, None) without."""
    if masks is None:
        return None, None
    return _rows(masks.input, r0, r1), _rows(masks.output, r0, r1)


def _dropped(Htop, m_out):
    """The read-out's input: Htop (K, B, H) times the output dropout mask m_out (K, B, H) in a
    scratch array, or Htop itself without a mask."""
    if m_out is None:
        return Htop
    return np.multiply(Htop, m_out, out=_ws().get("Hdrop", Htop.shape, Htop.dtype))


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
    Tw, H = K1 + 1, net.hidden_size
    chunks = _chunks(net, B)
    if masks is None and _small_path(net, chunks):
        if t0 > 0:                                       # the state entering the window
            S = _combine_states(_parallel(
                lambda r0, r1: _advance(net, _rows(x[:t0], r0, r1), tuple(s[:, r0:r1] for s in S)),
                chunks))
        call, gout, S_out = _small_call(net, x[t0:], y[T - K2:], S, chunks, K2, loss,
                                        1.0 / (B * K2), False, Tw * B)
        return float(call.val[0]), call.grads(gout), S_out

    def rows(r0, r1):
        Bc = r1 - r0
        xc, Sc = _rows(x, r0, r1), tuple(s[:, r0:r1] for s in S)
        m_in, m_out = _masked_rows(masks, r0, r1)
        if t0 > 0:
            Sc = _advance(net, xc[:t0], Sc, None if m_in is None else m_in[:t0])
        m_in = None if m_in is None else m_in[t0:]
        layers, S_T = _forward(net, xc[t0:], Sc, m_in)
        dH = _ws().get("dH", (Tw, Bc, H), net.dtype)
        dH[:Tw - K2] = 0
        # Eq. (16), k < K2: the losses' gradients dL_{s-k}/dS_{s-k}, with the 1/B of the batch
        # mean and the 1/K2 of Eq. (15) folded in (through the output dropout mask, if any)
        grads = {}
        m_top = None if m_out is None else m_out[T - K2:]
        ell = _readout_backward(net, _dropped(layers[-1].Hs[Tw - K2 + 1:], m_top),
                                _rows(y[T - K2:], r0, r1), loss, 1.0 / (B * K2), dH[Tw - K2:], grads)
        if m_top is not None:
            dH[Tw - K2:] *= m_top                        # VJP of the output mask
        _backward(net, xc[t0:], layers, dH, 0, np.empty((0, Bc), net.dtype), grads, m_in)
        return ell.sum(axis=1), grads, S_T

    parts = _parallel(rows, chunks)
    ell_sum = sum(p[0] for p in parts)                   # per step, over the whole batch
    value = float(np.sum(ell_sum / B)) / K2
    grads = _combine_grads([p[1] for p in parts], list(net.params))
    return value, grads, _combine_states([p[2] for p in parts])


def step_losses(net, x, y, S, loss, masks=None):
    """Forward pass only: the batch-mean loss of every step (T,) and the final state; must equal
    ``npbptt.bptt.step_losses_reference`` (with ``masks``: of the masked network)."""
    net, _ = _untied(net)
    T, B = x.shape[:2]
    H, O = net.hidden_size, net.output_size
    W = net.params["decoder.weight"]

    def rows(r0, r1):
        Bc = r1 - r0
        xc, yc, Sc = _rows(x, r0, r1), _rows(y, r0, r1), tuple(s[:, r0:r1] for s in S)
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

    parts = _parallel(rows, _chunks(net, B))
    L = (sum(p[0] for p in parts) / B).astype(np.float64)  # L_t = mean_b ell_t^(b)
    return L, _combine_states([p[1] for p in parts])


def grad_norms(net, x, y, S, loss):
    """phi (T, B), phi[k, b] = ||d ell_T^(b) / d S_{T-k}|| (Eq. 18) by BPTT(T-1, 1); must equal
    ``npbptt.probe.grad_norms_reference`` (no dropout: the probe measures the stock network)."""
    net, _ = _untied(net)
    T, B = x.shape[:2]
    H = net.hidden_size
    chunks = _chunks(net, B)
    if _small_path(net, chunks):
        call, _, _ = _small_call(net, x, y[T - 1:], S, chunks, 1, loss, 1.0, True, T * B)
        return np.sqrt(call.sq[::-1]).astype(np.float64)   # sq[t] = ||b for S_t||^2; phi[k]: S_{T-k}

    def rows(r0, r1):
        Bc = r1 - r0
        xc = _rows(x, r0, r1)
        layers, _ = _forward(net, xc, tuple(s[:, r0:r1] for s in S))
        dH = _ws().get("dH", (T, Bc, H), net.dtype)
        dH[:T - 1] = 0
        # b_0 = d ell_T / dS_T: the read-out's gradient at the last step, not divided by B
        _readout_backward(net, layers[-1].Hs[T:], _rows(y[T - 1:], r0, r1), loss, 1.0, dH[T - 1:])
        sq = np.zeros((T, Bc), net.dtype)                # sq[t] = ||b for S_t||^2, S_t after step t
        sq[T - 1] = (dH[T - 1] * dH[T - 1]).sum(axis=1)
        _backward(net, xc, layers, dH, 1, sq)            # Eq. (16) with K2 = 1: no more losses
        return sq

    sq = np.concatenate(_parallel(rows, chunks), axis=1)
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
