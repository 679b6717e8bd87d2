"""BPTT(K1, K2) by the paper's recursion (16), its special cases, and streaming (Eq. 17).

For a chunk of T steps t = 1..T (s = T in the paper's notation), BPTT(K1, K2) is Eq. (15):

    BPTT(K1, K2) = 1/K2 * sum_{k'=0}^{K2-1} sum_{k=0}^{K1} dL_{s-k'}/dS_{s-k} . dS_{s-k}/dtheta

computed by recursion (16) in one backward sweep of K1 + 1 steps:

    b_k = b_{k-1} . dS_{s-k+1}/dS_{s-k} + dL_{s-k}/dS_{s-k}    if k < K2
    b_k = b_{k-1} . dS_{s-k+1}/dS_{s-k}                          if k >= K2
    BPTT(K1, K2) = 1/K2 * sum_{k=0}^{K1} b_k . dS_{s-k}/dtheta   (+ the read-out's direct term)

Full BPTT over the chunk is BPTT(T-1, T); the estimator g_K of Eq. (3) is BPTT(K, 1).

Dropout (§5.2): with ``masks`` (an ``npbptt.model.DropoutMasks``) step t multiplies
``masks.input[t]`` into its layer-0 input and ``masks.output[t]`` into the top layer's h_t
before the read-out; both are part of H and of the read-out, so Eqs. (15)-(16) are unchanged and
the backward below is the exact gradient of that masked forward.
"""
from dataclasses import dataclass

import numpy as np

from . import backends
from .losses import LOSSES
from .model import check_masks
from .validate import check_inputs, check_K, is_int

__all__ = ["BPTTResult", "bptt", "bptt_reference", "vjp_state", "vjp_params", "vjp_step", "step_losses",
           "step_losses_reference", "stream"]


@dataclass
class BPTTResult:
    """Result of :func:`bptt`.

    loss  : float, (1/K2) sum_{t=T-K2+1}^{T} L_t, L_t the batch-mean loss of step t
    grads : dict like ``net.params``, the BPTT(K1, K2) gradient of that loss
    state : state after step T (same structure as the input state), to carry to the next chunk
    """
    loss: float
    grads: dict
    state: object


# --- the two products recursion (16) is written in -------------------------------------------
def vjp_state(net, cache, b):
    """b . dS_t/dS_{t-1}: the step-t vector-Jacobian product with the state (a tuple of (L, B, H)),
    ``cache`` from ``net.step``. This is the first term of recursion (16)."""
    return net.step_vjp(cache, b)[1]


def vjp_params(net, cache, b):
    """b . dS_t/dtheta as a dict over every parameter the state update uses (the recurrent layers
    and, with an embedding, ``embedding.weight``): the summand of BPTT(K1, K2) in Eq. (15)."""
    return vjp_step(net, cache, b)[0]


def vjp_step(net, cache, b):
    """Both products of one step in one call: (b . dS_t/dtheta as :func:`vjp_params`,
    b . dS_t/dS_{t-1} as :func:`vjp_state`)."""
    grads, dS_prev, dx = net.step_vjp(cache, b)
    net.input_vjp(cache[0], dx, grads)      # the embedding's rows (nothing for a dense input)
    return grads, dS_prev


def _accumulate(total, part):
    for k, v in part.items():
        total[k] += v


# --- the NumPy reference ----------------------------------------------------------------------
def _step(net, S, x, masks, t):
    """Step t of the chunk, with its input dropout mask when there are masks."""
    return net.step(S, x[t]) if masks is None else net.step(S, x[t], masks.input[t])


def _top(net, S, masks, t):
    """What the read-out reads at step t: the top layer's h_t, times the output mask if any."""
    return S[0][-1] if masks is None else S[0][-1] * masks.output[t]


def bptt_reference(net, x, y, S, K1, K2, loss, masks=None):
    """Recursion (16) on validated inputs; S is the internal state tuple, ``masks`` None or
    checked dropout masks of the T steps.

    Returns (loss, grads, S_T). Every fast backend's ``bptt`` must equal this function.
    """
    T, B = x.shape[:2]
    K1 = min(K1, T - 1)              # K1 >= T - 1 is full BPTT over the chunk
    t0 = T - 1 - K1                  # the state entering step t0 (0-based) is held constant
    for t in range(t0):
        S, _ = _step(net, S, x, masks, t)
    caches, tops = [], []
    for t in range(t0, T):
        S, cache = _step(net, S, x, masks, t)
        caches.append(cache)
        tops.append(_top(net, S, masks, t))   # h_t of the top layer (dropped out), read-out's input
    loss_fn = LOSSES[loss]
    grads = net.zero_grads()
    b = tuple(np.zeros_like(s) for s in S)   # b_{-1} = 0
    total = 0.0
    for k in range(K1 + 1):
        i, t = K1 - k, T - 1 - k     # step s - k
        if k < K2:
            # Eq. (16), k < K2: b_k = b_{k-1} dS_{s-k+1}/dS_{s-k} + dL_{s-k}/dS_{s-k};
            # L_{s-k} reads S_{s-k} through the read-out of the top layer's h.
            ell, dout = loss_fn(net.readout(tops[i]), y[t])
            total += float(ell.mean())
            d_readout, dh_top = net.readout_vjp(tops[i], dout / B)
            if masks is not None:
                dh_top = dh_top * masks.output[t]    # VJP of the output mask
            # the direct term dL_s/dtheta of Eq. (2); a tied read-out's weight is keyed
            # "embedding.weight" (net.decoder_weight_name) and adds to the embedding's gradient
            _accumulate(grads, d_readout)
            b[0][-1] += dh_top
        # Eq. (15)/(16): add b_k . dS_{s-k}/dtheta, and form b_{k+1}'s first term
        # b_k . dS_{s-k}/dS_{s-k-1} (unused after k = K1: that state is a constant).
        dtheta, b, dx = net.step_vjp(caches[i], b)
        _accumulate(grads, dtheta)
        net.input_vjp(x[t], dx, grads)   # the input use of E; tied: summed with the read-out use
    for v in grads.values():
        v /= K2                      # the 1/K2 of Eq. (15)
    return total / K2, grads, S


def step_losses_reference(net, x, y, S, loss, masks=None):
    """Forward pass only: the batch-mean loss L_t of every step (T,) and the final state tuple
    (with ``masks``: of the masked network, as :func:`bptt_reference`)."""
    loss_fn = LOSSES[loss]
    L = np.empty(x.shape[0])
    for t in range(x.shape[0]):
        S, _ = _step(net, S, x, masks, t)
        L[t] = loss_fn(net.readout(_top(net, S, masks, t)), y[t])[0].mean()
    return L, S


# --- public entry points ----------------------------------------------------------------------
def bptt(net, x, y, state, K1, K2, loss="cross_entropy", backend=None, masks=None):
    """Truncated backpropagation through time BPTT(K1, K2) on one chunk, Eqs. (15)-(16).

    Parameters
    ----------
    net : npbptt.RNN or npbptt.LSTM
    x : (T, B) int tokens (embedding input) or (T, B, input_size) floats (dense input)
    y : (T, B) int targets (``loss="cross_entropy"``) or (T, B, output_size) (``loss="mse"``)
    state : the state entering step 1: RNN (num_layers, B, H); LSTM tuple (h, c) of such
    K1 : int >= 0, backpropagate through steps T-K1..T; the state entering step T-K1 is a
         constant. K1 >= T-1 is full BPTT over the chunk.
    K2 : int, 1 <= K2 <= min(T, K1+1): the losses of the last K2 steps are used.
    loss : "cross_entropy" or "mse"
    backend : "numpy" (the reference), "numba", "cuda", or None for the default.  With ``masks``
        the numba kernels run them too (``backends.resolve``: ``takes_masks``); CUDA hands them to
        the NumPy reference.
    masks : None (evaluation: no dropout, the stock network, whatever ``net.dropout``) or an
        ``npbptt.model.DropoutMasks`` with ``input`` (T, B, input_size) and ``output``
        (T, B, hidden_size) in ``net.dtype`` (``net.dropout_masks(T, B, rng)``): step t
        multiplies ``masks.input[t]`` into its layer-0 input and ``masks.output[t]`` into the
        top layer's h_t before the read-out.

    Returns
    -------
    BPTTResult with ``loss`` = (1/K2) sum_{t=T-K2+1}^T L_t, ``grads`` its BPTT(K1, K2) gradient
    (a dict like ``net.params``) and ``state`` the state after step T.

    Notes
    -----
    * L_t is the batch-mean loss of step t (cross-entropy of the read-out, or mean squared error
      over batch and outputs as PyTorch's ``MSELoss``); the gradient is of the mean over the K2
      losses, i.e. includes the 1/K2 normalisation of Eq. (15), as the paper insists.
    * The read-out parameters get the direct term dL_s/dtheta of Eq. (2) for each of the K2
      losses; it is not truncated.  With ``net.tie_weights`` the read-out's weight is
      ``embedding.weight``: its gradient is that direct term plus the (truncated) input-side
      terms of Eq. (15), the sum of both uses.
    * S_t is the full state handed from step t to step t+1 (every layer's h, and c for the LSTM);
      b_k = dL/dS_{s-k} perturbs S_{s-k} as the input of step s-k+1 and of the read-out at s-k.
    * The paper indexes the inner sum of Eq. (15) from ``k = s - t`` (a typo); the recursion (16)
      it is computed by runs k = 0..K1, which is what is implemented.
    * Dropout: the masks are part of the step H (the input mask) and of the read-out (the output
      mask), fixed data of the chunk, so the result is the exact BPTT(K1, K2) gradient of the
      masked network: a deterministic, testable function of (theta, x, y, state, masks).  A
      training loop draws fresh masks per chunk (:func:`stream` with ``rng``); a step recomputed
      in a later window must get the masks it had (``stream`` does this).
    * Without masks the network is the deterministic one: this is what the probe
      (``npbptt.grad_norms``), ``npbptt.theory`` and evaluation compute, by design.  So the
      measured phi_k(s) = ||dL_s/dS_{s-k}|| (Eq. 18) and the delta-hat diagnostics are those of
      the deterministic network with the current theta, not an average over masks of the
      trained, dropped-out network: the truncation K chosen from them is the one of the network
      that is evaluated.
    """
    x, y, S = check_inputs(net, x, y, state, loss)
    K1, K2 = check_K(K1, K2, x.shape[0])
    masks = check_masks(net, masks, *x.shape[:2])
    impl = backends.resolve("bptt", backend, net, masked=masks is not None)
    args = (net, x, y, S, K1, K2, loss)
    value, grads, S = impl(*args) if masks is None else impl(*args, masks=masks)
    return BPTTResult(float(value), grads, net.to_public(S))


def step_losses(net, x, y, state, loss="cross_entropy", backend=None, masks=None):
    """Forward pass over a sequence: (L, state) with L (T,) the batch-mean loss of every step
    and ``state`` the final state. ``exp(L.mean())`` is the perplexity for cross-entropy.
    ``masks`` as :func:`bptt` (None: evaluation, no dropout)."""
    x, y, S = check_inputs(net, x, y, state, loss)
    masks = check_masks(net, masks, *x.shape[:2])
    impl = backends.resolve("step_losses", backend, net, masked=masks is not None)
    L, S = impl(net, x, y, S, loss) if masks is None else impl(net, x, y, S, loss, masks=masks)
    return L, net.to_public(S)


def stream(net, x, y, state, K, K1=None, loss="cross_entropy", backend=None, rng=None):
    """Stream BPTT(K1, K) over a long sequence in the chunks S_m of Eq. (17), carrying the state.

    The steps 1..T are partitioned into S_m = [(m-1)K + 1, ..., mK] (the last chunk may be
    shorter). For each chunk this yields ``(chunk, result)``: ``chunk`` the slice of S_m in x,
    ``result`` the :class:`BPTTResult` of BPTT(K1, |S_m|) for the losses of S_m, backpropagated
    over the K1 + 1 steps ending at the chunk's end (fewer at the start of the sequence), from the
    state carried from the previous chunks.  K1 defaults to 2K, the paper's BPTT(2K, K).

    The parameters are read when each chunk is computed, so a training loop may update
    ``net.params`` between chunks (Algorithm 1, lines 8-12): the carried state is then the one
    computed with the parameters of its time, as in any streaming TBPTT.

    Dropout: with ``rng`` (an ``np.random.Generator``) and ``net.dropout > 0``, each step of the
    sequence gets its masks once, when its chunk is reached: for m = 1, 2, ... in order,
    ``net.dropout_masks(|S_m|, B, rng)`` (so the generator is advanced chunk by chunk, as the
    iteration proceeds).  A step recomputed later (the K1 + 1 - K steps of a window before S_m,
    and the advance pass) reuses the masks it was first given, so the carried state is the one the
    windows' forward passes compute, and each result is ``bptt(..., masks=)`` on its window with
    those masks (see :func:`bptt` for which backend runs them).  Only the masks of the current
    window are kept.  The same generator state gives the same results bit for bit.
    ``rng=None`` or ``net.dropout == 0``: no dropout, ``rng`` is not touched.

    Notes
    -----
    The K1 + 1 - K steps of a window that precede S_m are recomputed (not kept from the previous
    chunk's forward pass), and the state entering the window is advanced by a forward pass: one
    extra forward pass over the data per epoch, in exchange for every chunk being a plain
    :func:`bptt` call on its own window.
    """
    x, y, S = check_inputs(net, x, y, state, loss)
    T = x.shape[0]
    if not is_int(K) or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    K1 = 2 * K if K1 is None else K1
    check_K(K1, min(K, T), T)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be None or a numpy.random.Generator, got {type(rng).__name__}")
    drop = rng is not None and net.dropout > 0
    advance = backends.resolve("step_losses", backend, net, masked=drop)
    a = 0                                    # S is the state entering step a (0-based)
    held = None                              # with dropout: the masks of steps a..start-1
    for start in range(0, T, K):
        stop = min(start + K, T)
        a_new = max(0, stop - K1 - 1)        # first step of the window (a_new <= start)
        if drop:                             # S_m's steps get their masks now, once
            new = net.dropout_masks(stop - start, x.shape[1], rng)
            held = new if held is None else held.then(new)         # steps a..stop-1
        if a_new > a:
            if drop:
                S = advance(net, x[a:a_new], y[a:a_new], S, loss, masks=held.steps(0, a_new - a))[1]
                held = held.steps(a_new - a)
            else:
                S = advance(net, x[a:a_new], y[a:a_new], S, loss)[1]
            a = a_new
        res = bptt(net, x[a:stop], y[a:stop], net.to_public(S), min(K1, stop - a - 1),
                   stop - start, loss, backend, masks=held)
        yield slice(start, stop), res
