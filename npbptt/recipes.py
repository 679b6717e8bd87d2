"""Truncated-BPTT recipes people write, each stated as the BPTT(K1, K2) calls it equals (§4.1).

Conventions.  ``npbptt.bptt(net, x, y, state, K1, K2)`` on a chunk of T steps is the gradient of
(1/K2) sum of the last K2 batch-mean losses with the state entering step T-K1 (1-based) held
constant: K1 + 1 steps are backpropagated through (Eq. 15, computed by recursion 16), and K1 >= T-1
is full BPTT over the chunk.  A loop that detaches the state at the start of a K-step chunk and
backpropagates the chunk's mean loss is therefore BPTT(K-1, K) on that chunk, and, because K1 is
clamped to T-1, also ``bptt(chunk, K1=K, K2=K)``: the paper's "K1 = K2 = K" counts the K steps.
Williams & Zipser's TBPTT(h, h') and the PyTorch-forum class ``TBPTT(k1, k2)`` name the update
interval first and the backpropagation length second -- the opposite order to the paper's.

Every recipe below is a loop over the sequence that calls ``optimizer.step()`` several times.
With the weights held fixed (the cross-check records the gradient where the step would be), the
gradient held at the m-th step is one BPTT call on a window of the sequence:

    g_m = clip(scale_m * bptt(net, x[a_m:b_m], y[a_m:b_m], S_{a_m}, K1_m, K2_m).grads)

with S_{a_m} the state after a forward pass over x[:a_m] from the initial state: a
:class:`Window`.  So a recipe is honestly a *sequence* of BPTT calls, not one; with the weights
updated between steps the windows stay the same and each call sees the weights of its time
(the state carried is then the one computed with the weights of its time, as in
:func:`npbptt.stream`).  ``RECIPES[name].windows(T, ...)`` gives the windows;
``RECIPES[name].torch_loop`` is the loop as users write it in PyTorch (read its source), with
``grads.append(m.grads())`` where the loop would call ``optimizer.step()``.

======================  =======================================================================
recipe                  what each optimizer step's gradient equals
======================  =======================================================================
``bptt``                one call: BPTT(K1, K2) on x[0:T] (detach at T-1-K1, mean of last K2)
``keras``               chunks S_m of K steps (Eq. 17; the last may be shorter), state carried
(``tensorflow``,        detached: BPTT(|S_m|-1, |S_m|) on S_m -- the paper's K1 = K2 = K, which
``lightning``)          backpropagates the chunk's j-th loss through only j steps
``paper``               Algorithm 1's BPTT(2K, K): the losses of S_m backpropagated over the
                        2K+1 steps ending at S_m's end (fewer at the start): what
                        :func:`npbptt.stream` computes with K1 = 2K
``sliding``             one step per time step s: BPTT(K, 1) on the K+1 steps ending at s, the
                        estimator g_K of Eq. (3)
``min-char-rnn``        chunks of K with a SUM of the losses, clipped to [-5, 5], and the chunk
                        that would end exactly at T dropped: clip(K * BPTT(K-1, K), 5)
``awd-lstm``            random length l_m (K w.p. 0.95 else K/2, then max(5, int(N(., 5)))), the
                        learning rate scaled by l_m/K: (l_m/K) * BPTT(l'_m - 1, l'_m) on
                        l'_m = min(l_m, T - i_m) steps (the scale uses the drawn l_m); the loop
                        stops when i >= T - 1
======================  =======================================================================

What the recipes leave out: dropout, weight decay, activation regularisation and gradient *norm*
clipping (AWD-LSTM's AR/TAR and ``clip_grad_norm_``) change the gradient and are not modelled;
turn them off to cross-check.  Adagrad/SGD updates happen after the recorded gradient.
"""
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Window", "Recipe", "RECIPES", "get_recipe", "detach"]


@dataclass(frozen=True)
class Window:
    """One optimizer step of a recipe as one BPTT call (see the module docstring):
    ``clip(scale * bptt(net, x[start:stop], y[start:stop], S_start, K1, K2).grads, -clip, clip)``
    elementwise (no clipping when ``clip`` is None)."""
    start: int
    stop: int
    K1: int
    K2: int
    scale: float = 1.0
    clip: float | None = None


@dataclass(frozen=True)
class Recipe:
    """A named truncation recipe: ``windows(T, K, K1, K2, rng) -> [Window]`` derives its BPTT calls;
    ``torch_loop(m, x, y, state, K, K1, K2, loss_fn, rng) -> [grads]`` is the literal PyTorch
    loop.  ``needs`` names the arguments it takes: ("K1", "K2") or ("K",)."""
    name: str
    summary: str
    needs: tuple
    windows: Callable
    torch_loop: Callable


def detach(state):
    """``state.detach()`` for nn.RNN's h, or for each of nn.LSTM's (h, c)."""
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


# --- bptt: one BPTT(K1, K2) call --------------------------------------------------------------
def _bptt_windows(T, K=None, K1=None, K2=None, rng=None):
    """One optimizer step: the whole chunk, K1 clamped to T-1 (Eq. 15 with s = T)."""
    return [Window(0, T, min(K1, T - 1), K2)]


def _bptt_torch(m, x, y, state, K=None, K1=None, K2=None, loss_fn=None, rng=None):
    T = len(x)
    t0 = max(0, T - 1 - K1)                  # first step (0-based) that is backpropagated through
    if t0 > 0:
        _, state = m(x[:t0], state)
    state = detach(state)                    # the state entering step T-K1 (1-based) is a constant
    out, _ = m(x[t0:], state)
    loss = loss_fn(out[-K2:], y[-K2:])       # mean of the last K2 steps' batch-mean losses
    m.zero_grad()
    loss.backward()
    return [m.grads()]


# --- keras / tensorflow / lightning: chunks of K, K1 = K2 = K ---------------------------------
def _chunk_windows(T, K=None, K1=None, K2=None, rng=None):
    """TensorFlow/Keras (a stateful RNN fed chunks of K time steps; each ``train_step`` is its own
    tape) and Lightning 1.x (``truncated_bptt_steps = K``; Lightning splits the batch in time and
    detaches the returned hiddens): the loss of chunk S_m is the mean of its |S_m| losses and the
    state enters S_m detached, so the j-th loss of the chunk (1-based) reaches back j steps.  That
    is recursion (16) on the chunk with b accumulating a loss at every step (K2 = |S_m|) and no
    step before the chunk (K1 = |S_m| - 1): BPTT(|S_m|-1, |S_m|) -- the paper's "K1 = K2 = K",
    which "overweights small lags" (§4.1).  Not ``npbptt.stream(K, K1=K-1)`` on a shorter last
    chunk: stream keeps K1 and reaches into the previous chunk."""
    out = []
    for start in range(0, T, K):             # the chunks S_m of Eq. (17)
        stop = min(start + K, T)
        out.append(Window(start, stop, stop - start - 1, stop - start))
    return out


def _keras_torch(m, x, y, state, K=None, K1=None, K2=None, loss_fn=None, rng=None):
    grads, h = [], state
    for start in range(0, len(x), K):
        h = detach(h)                        # stateful RNN / Lightning hiddens: carried, detached
        out, h = m(x[start:start + K], h)
        loss = loss_fn(out, y[start:start + K])   # mean over the chunk's steps and the batch
        m.zero_grad()
        loss.backward()
        grads.append(m.grads())              # optimizer.step()
    return grads


# --- the paper's BPTT(2K, K), streaming (Algorithm 1, lines 8-12) ---------------------------
def _paper_windows(T, K=None, K1=None, K2=None, rng=None):
    """Algorithm 1, lines 8-12: for each chunk S_m of Eq. (17), the mean of S_m's losses is
    backpropagated through the 2K + 1 steps ending at S_m's end (the state entering that window
    detached), so every loss reaches back at least K steps: BPTT(2K, |S_m|) on the window
    x[max(0, stop-2K-1):stop] -- exactly :func:`npbptt.stream` with K1 = 2K."""
    out = []
    for start in range(0, T, K):             # S_m of Eq. (17)
        stop = min(start + K, T)
        a = max(0, stop - (2 * K + 1))       # the 2K+1 steps ending at S_m's end
        out.append(Window(a, stop, min(2 * K, stop - a - 1), stop - start))
    return out


def _paper_torch(m, x, y, state, K=None, K1=None, K2=None, loss_fn=None, rng=None):
    grads, lag, a = [], state, 0             # lag: the state entering step a
    for start in range(0, len(x), K):
        stop = min(start + K, len(x))
        a_new = max(0, stop - (2 * K + 1))
        if a_new > a:                        # advance the window's first step
            _, lag = m(x[a:a_new], lag)
            a = a_new
        lag = detach(lag)                    # the state entering the window is a constant
        out, _ = m(x[a:stop], lag)
        loss = loss_fn(out[start - a:], y[start:stop])   # only S_m's losses, their mean (1/K2)
        m.zero_grad()
        loss.backward()
        grads.append(m.grads())              # optimizer.step() with lr * sqrt(K) in Algorithm 1
    return grads


# --- sliding BPTT(K, 1): one step per time step ------------------------------------------------
def _sliding_windows(T, K=None, K1=None, K2=None, rng=None):
    """An update after every step s with the loss L_s alone, backpropagated through steps
    s-K..s (the state entering s-K detached): BPTT(K, 1) = g_K of Eq. (3), T optimizer steps
    per pass, O(T K) work (the paper's point: BPTT(J + K, K) gets the same gradients in
    O(J + K))."""
    out = []
    for s in range(T):
        a = max(0, s - K)                    # Eq. (3): lags k = 0..K of L_s
        out.append(Window(a, s + 1, s - a, 1))
    return out


def _sliding_torch(m, x, y, state, K=None, K1=None, K2=None, loss_fn=None, rng=None):
    grads, lag, a = [], state, 0
    for s in range(len(x)):
        a_new = max(0, s - K)
        if a_new > a:
            _, lag = m(x[a:a_new], lag)
            a = a_new
        lag = detach(lag)
        out, _ = m(x[a:s + 1], lag)
        loss = loss_fn(out[-1:], y[s:s + 1])      # the loss of step s only
        m.zero_grad()
        loss.backward()
        grads.append(m.grads())
    return grads


# --- Karpathy's min-char-rnn ----------------------------------------------------------------------
def _minchar_windows(T, K=None, K1=None, K2=None, rng=None):
    """Karpathy's min-char-rnn: ``lossFun(inputs, targets, hprev)`` sums -log p over the chunk's
    K steps (no 1/K), backpropagates to the chunk's start (hprev is a constant), clips every
    gradient entry to [-5, 5] and returns the last h for the next chunk; the loop resets (p = 0,
    h = 0) when ``p + seq_length + 1 >= len(data)``.  So each step is clip(K * BPTT(K-1, K), 5)
    on x[p:p+K] for p = 0, K, 2K, ... with p + K < T (x = data[:-1], T = len(data) - 1): the
    chunk ending exactly at T is never used.  min-char-rnn has batch 1; here L_t is a batch mean."""
    # `if p + seq_length + 1 >= len(data): reset`, with len(data) = T + 1: chunks with p + K < T.
    return [Window(p, p + K, K - 1, K, scale=float(K), clip=5.0) for p in range(0, T - K, K)]


def _minchar_torch(m, x, y, state, K=None, K1=None, K2=None, loss_fn=None, rng=None):
    import torch
    grads, h = [], state
    for p in range(0, len(x) - K, K):        # the chunk ending exactly at T is never used
        h = detach(h)                        # hprev enters lossFun as a constant
        out, h = m(x[p:p + K], h)
        loss = sum(loss_fn(out[t:t + 1], y[p + t:p + t + 1]) for t in range(K))  # a SUM over t
        m.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(m.parameters(), 5.0)   # np.clip(dparam, -5, 5, out=dparam)
        grads.append(m.grads())              # Adagrad update
    return grads


# --- AWD-LSTM (Merity et al. 2018): random length, learning rate scaled by seq_len / bptt --------
def _awd_lengths(T, K, rng):
    """(i, drawn seq_len, used seq_len) for each step of AWD-LSTM's ``train()`` loop."""
    out, i = [], 0
    while i < T - 1:                         # `while i < train_data.size(0) - 1 - 1`, size = T + 1
        bptt = K if rng.random() < 0.95 else K / 2.
        seq_len = max(5, int(rng.normal(bptt, 5)))
        out.append((i, seq_len, min(seq_len, T - i)))   # get_batch: min(seq_len, len(source) - 1 - i)
        i += seq_len
    return out


def _awd_windows(T, K=None, K1=None, K2=None, rng=None):
    """AWD-LSTM's ``train()``: chunk lengths l drawn as in :func:`_awd_lengths`, the chunk's mean
    loss backpropagated to its start (``repackage_hidden``), and the learning rate multiplied by
    l / bptt for that step.  The update is lr * (l/K) * BPTT(l'-1, l') with l' = min(l, T - i)
    the steps actually used: each loss's weight is 1/K whatever the chunk's length (for l' = l,
    (l/K) * (1/l) * sum = (1/K) * sum), so the random lengths do not reweight the losses."""
    return [Window(i, i + used, used - 1, used, scale=drawn / K) for i, drawn, used in _awd_lengths(T, K, rng)]


def _awd_torch(m, x, y, state, K=None, K1=None, K2=None, loss_fn=None, rng=None):
    grads, hidden, i = [], state, 0
    while i < len(x) - 1:
        bptt = K if rng.random() < 0.95 else K / 2.
        seq_len = max(5, int(rng.normal(bptt, 5)))
        lr_scale = seq_len / K               # optimizer.param_groups[0]['lr'] = lr2 * seq_len / args.bptt
        n = min(seq_len, len(x) - i)         # get_batch
        hidden = detach(hidden)              # repackage_hidden
        out, hidden = m(x[i:i + n], hidden)
        loss = loss_fn(out, y[i:i + n])      # mean over the chunk's steps and the batch
        m.zero_grad()
        loss.backward()
        grads.append({k: lr_scale * g for k, g in m.grads().items()})   # the step is lr2 * lr_scale * grad
        i += seq_len
    return grads


RECIPES = {r.name: r for r in [
    Recipe("bptt", "BPTT(K1, K2) on the whole chunk: one call", ("K1", "K2"), _bptt_windows, _bptt_torch),
    Recipe("keras", "chunks of K, state carried detached, mean loss per chunk: BPTT(K-1, K) per chunk "
           "(TensorFlow/Keras, Lightning 1.x truncated_bptt_steps)", ("K",), _chunk_windows, _keras_torch),
    Recipe("paper", "the paper's BPTT(2K, K) streamed over the chunks of Eq. (17) (npbptt.stream)",
           ("K",), _paper_windows, _paper_torch),
    Recipe("sliding", "BPTT(K, 1) = g_K of Eq. (3) at every step", ("K",), _sliding_windows, _sliding_torch),
    Recipe("min-char-rnn", "chunks of K, summed losses, clip to [-5, 5]: clip(K * BPTT(K-1, K)); "
           "the chunk ending at T is dropped", ("K",), _minchar_windows, _minchar_torch),
    Recipe("awd-lstm", "random length l, lr * l/K: (l/K) * BPTT(l'-1, l') per chunk", ("K",),
           _awd_windows, _awd_torch),
]}
_ALIASES = {"tensorflow": "keras", "lightning": "keras", "tf": "keras"}


def get_recipe(name):
    """The :class:`Recipe` called ``name`` (aliases: tensorflow, tf, lightning -> keras)."""
    key = _ALIASES.get(name, name)
    if key not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES) + sorted(_ALIASES)}, got {name!r}")
    return RECIPES[key]
