"""CPU kernels (Numba ``@njit``) for BPTT(K1, K2), the forward losses and the probe of Eq. (18).

Selected by ``backend="numba"`` (the default where numba imports).  The three public functions have
exactly the signatures and return values of the NumPy references they must equal:

    bptt(net, x, y, S, K1, K2, loss)  -> (loss, grads, S_T)   npbptt.bptt.bptt_reference
    step_losses(net, x, y, S, loss)   -> (L (T,), S_T)        npbptt.bptt.step_losses_reference
    grad_norms(net, x, y, S, loss)    -> phi (T, B)           npbptt.probe.grad_norms_reference

Inputs are the validated ones (``npbptt.validate.check_inputs``; ``S`` the internal state tuple).
A network this module does not know how to run -- anything but an ``npbptt.RNN`` / ``npbptt.LSTM``
whose step, read-out and embedding are the stock ones (see :func:`supports`) -- is handed to the
reference itself, so a subclass that changes the recurrence is never silently run as the stock one.

How the work is laid out (the algorithm is the reference's; only the order of independent
operations changes, so results agree to round-off):

* the batch is split into one chunk of rows per thread (``numba.get_num_threads()``), and each
  thread runs the whole call -- forward, read-out, backward, its part of every gradient -- on
  its rows: the examples of a batch never interact, so the only synchronisation is the final sum
  of the per-chunk gradients.  Plain Python threads (the kernels and NumPy's BLAS release the GIL)
  rather than numba's ``prange``: no parallel-region compile time, and only two bounded spins
  per call, once per chunk rather than at every step (the hand-off, :func:`_run_tasks` and
  :func:`_worker`: waiting for the other threads without sleeping, since every sleep and wake-up
  costs 20-150 us on this machine's virtual CPUs).  BLAS is held at one thread meanwhile and
  restored afterwards
  (:func:`blas_single_thread`): a multi-threaded BLAS spin-waits at every small GEMM of the
  recurrence, which collapses when the cores are shared;
* within a chunk the stacked network runs layer by layer over all steps (layer l at step t only
  needs layer l-1 at step t).  Small networks (every layer's W_ih and W_hh within _FUSE_BYTES,
  :func:`_small_call`) do everything step by step in two kernel calls, feature-major (a_t^T
  (G*H, B): each gate's block is one long vectorised loop): the input projection, the weight
  gradients ``da_t^T h_{t-1}``, ``da_t^T x_t`` (each step's product formed, then added, as the
  reference sums them) and the input gradients, while the step's rows are in cache;
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
* scratch arrays are reused between calls (:class:`_Workspace`): first-touch page faults of
  fresh arrays otherwise cost as much as the arithmetic on W1-sized problems.

The first call compiles the kernels (a few seconds per float type) and stores them in numba's
on-disk cache; later processes load them (:func:`warmup` forces both).
"""
import contextlib
import math
import os
import queue
import threading

import numba
import numpy as np

from . import _cpu_jit as jit

__all__ = ["bptt", "step_losses", "grad_norms", "supports", "blas_single_thread", "release_workspace",
           "warmup"]

# Largest number of elements in one read-out block / one cached forward block (memory bound).
_BLOCK_ELEMENTS = 1 << 22
# The batch is split over threads only into chunks of at least this many rows.
_MIN_ROWS_PER_CHUNK = 8
# Networks whose every layer's W_ih and W_hh take at most this many bytes run the small path
# (see _fused): a quarter of a core's L2 cache here, so that weights, their gradients and a step's
# rows stay in it.
_FUSE_BYTES = 1 << 18
# float32 chunks narrower than this run layer by layer even when the network is small (_small_path).
_SMALL_MIN_ROWS32 = 16


# --- which networks this module runs --------------------------------------------------------------
def supports(net):
    """True when ``net`` is an npbptt RNN/LSTM whose recurrence, read-out and embedding are the
    stock ones (a subclass overriding any of them is run by the NumPy reference instead)."""
    from npbptt.model import LSTM, RNN, _Network
    if not isinstance(net, (RNN, LSTM)):
        return False
    cls = type(net)
    for name in ("step", "step_vjp", "embed", "readout", "readout_vjp", "layer", "to_internal",
                 "to_public"):
        if getattr(cls, name, None) is not getattr(_Network, name):
            return False
    expected = (LSTM.kind, LSTM.gates) if isinstance(net, LSTM) else (RNN.kind, RNN.gates)
    return ((cls.kind, cls.gates) == expected and net.activation in jit.ACT
            and np.dtype(net.dtype) in (np.float32, np.float64))


def _reference(op):
    import importlib

    from npbptt.backends import _REFERENCE
    module, name = _REFERENCE[op]
    return getattr(importlib.import_module(module), name)


# --- BLAS threads ---------------------------------------------------------------------------------
_controller = None
_controller_lock = threading.Lock()


def _get_controller():
    global _controller
    with _controller_lock:
        if _controller is None:
            import scipy.linalg.cython_blas  # noqa: F401  (the BLAS numba's np.dot calls)
            from threadpoolctl import ThreadpoolController
            _controller = ThreadpoolController()
        return _controller


def _blas_libs():
    """threadpoolctl's controllers of the BLAS libraries loaded when the controller was made (the
    one numba's kernels call among them), selected once: ``select`` costs ~10 us a call."""
    global _blas_selected
    if _blas_selected is None:
        _blas_selected = _get_controller().select(user_api="blas").lib_controllers
    return _blas_selected


_blas_selected = None
_blas_depth = 0                  # how many blas_single_thread regions are open (any thread)
_blas_saved = []                 # [(threadpoolctl library controller, its thread count)]


@contextlib.contextmanager
def blas_single_thread():
    """Hold every loaded BLAS at one thread for the duration (inside a parallel region each
    worker calls BLAS on its own chunk); the previous limits are restored on exit, when the last
    of any concurrently open regions closes.  Direct get/set calls on threadpoolctl's library
    controllers: ``ThreadpoolController.limit`` re-queries every library and costs ~0.5 ms a call,
    a tenth of a W1 step."""
    global _blas_depth, _blas_saved
    libs = _blas_libs()
    with _controller_lock:
        if _blas_depth == 0:
            _blas_saved = [(lc, lc.get_num_threads()) for lc in libs]
            for lc, n in _blas_saved:
                if n != 1:
                    lc.set_num_threads(1)
        _blas_depth += 1
    try:
        yield
    finally:
        with _controller_lock:
            _blas_depth -= 1
            if _blas_depth == 0:
                for lc, n in _blas_saved:
                    if n != 1:
                        lc.set_num_threads(n)
                _blas_saved = []


def _chunks(net, B):
    """Batch row ranges processed in parallel: one per thread (``numba.get_num_threads()``) as long
    as each gets at least ``_MIN_ROWS_PER_CHUNK`` rows, else the whole batch in one range.  Every
    chunk uses a single-threaded BLAS, also for large layers where a multi-threaded BLAS on the
    whole batch would halve the traffic of W_hh: its threads spin-wait for each other at every
    small GEMM of the recurrence, which is up to 10x slower when the cores are shared."""
    n = min(numba.get_num_threads(), B // _MIN_ROWS_PER_CHUNK)
    if n <= 1:
        return [(0, B)]
    return [(c * B // n, (c + 1) * B // n) for c in range(n)]


_tasks = None                    # queue.SimpleQueue of (task, index, reply queue, done flags)
_n_workers = 0


# How long the calling thread, its own task done, spins for the workers' (jit.wait_flags) before
# it blocks, and how long an idle worker spins for the next task before it blocks: ~4 ms each
# (~1 ns a round).  With ~1 ms, the float64 W1 loop's worker ran out of spin before the next call
# in half of the calls (its chunk done early, it waits for the caller's chunk, then the caller's
# Python between calls).
_SPINS = 1 << 22
_IDLE_SPINS = 1 << 22
_NO_FLAGS = np.zeros(0, np.int64)
_posted = np.zeros(256, np.int64)    # _posted[w] = 1: a task was queued since worker w looked


def _worker(w):
    """Worker thread w: runs queued tasks; between them it spins (without the GIL) for up to
    _IDLE_SPINS rounds on _posted[w] before it blocks on the queue, so that in a loop of calls
    the next task neither waits for a sleeping thread to wake up (20-50 us here) nor costs its
    poster the system call that wakes it (~15 us).  A task's caller learns that its result is in
    the reply queue from flag ``done[c - 1]``, set inside that spin once the GIL is let go."""
    flag = _posted[w:w + 1]
    signal, k = _NO_FLAGS, 0                 # the done flag still to set, and where
    while True:
        flag[0] = 0
        try:
            item = _tasks.get_nowait()
        except queue.Empty:
            item = None
        if item is None:
            try:
                posted = jit.wait_flags(flag, _IDLE_SPINS, signal, k)
            except BaseException:    # noqa: BLE001 (never: but a dead worker would hang callers)
                if signal.shape[0]:
                    signal[k] = 1
                posted = False
            signal = _NO_FLAGS
            if posted:
                continue             # something was posted: take it (or, taken, spin again)
            item = _tasks.get()
        elif signal.shape[0]:
            signal[k] = 1
            signal = _NO_FLAGS
        task, c, reply, done = item
        try:
            reply.put((c, True, task(c)))
        except BaseException as e:   # noqa: BLE001 (handed to the caller, which re-raises it)
            reply.put((c, False, e))
        signal, k = done, c - 1      # after the reply: the caller's get() then never blocks


def _run_tasks(tasks, first_waits=False):
    """[task() for task in tasks], in parallel threads: the calling thread runs the first, persistent
    daemon workers the others (the kernels and NumPy's BLAS release the GIL), BLAS held at one
    thread meanwhile.  Task c computes in workspace c of the calling thread (see
    :class:`_Workspace`).  The workers are fed through a ``queue.SimpleQueue`` (C-level;
    concurrent.futures' Python bookkeeping cost ~20 us a call, 1% of a W1 step); an exception in
    any task is re-raised.

    The calling thread waits for the workers by spinning without the GIL (jit.wait_flags on flags
    each worker sets after handing in its result), not by blocking: every sleep and wake-up of a
    thread on this machine's virtual CPUs costs 20-150 us (a thread waking up to take back the
    GIL as well).  With ``first_waits`` the first task is called as ``tasks[0](flags, posted)``:
    its first kernel call tells the idle workers that their tasks are queued (``posted``, see
    :func:`_worker`) and its last waits for ``flags``, both without the GIL, so that neither a
    worker starting nor the calling thread finishing waits for the other to let go of it."""
    global _tasks, _n_workers
    spaces = _caller_workspaces(len(tasks))

    def task(c, *flags):
        _current.ws = spaces[c]
        return tasks[c](*flags)

    if len(tasks) == 1:
        return [task(0)]
    with _controller_lock:
        if _tasks is None:
            _tasks = queue.SimpleQueue()
        while _n_workers < min(len(tasks) - 1, len(_posted)):
            threading.Thread(target=_worker, args=(_n_workers,), name=f"npbptt-kernels-{_n_workers}",
                             daemon=True).start()
            _n_workers += 1
    reply, flags = queue.SimpleQueue(), np.zeros(len(tasks) - 1, np.int64)
    with blas_single_thread():
        for c in range(1, len(tasks)):
            _tasks.put((task, c, reply, flags))
        if not first_waits:
            _posted[:_n_workers] = 1
        try:
            first = task(0, flags, _posted[:_n_workers]) if first_waits else task(0)
        finally:
            jit.wait_flags(flags, _SPINS, _NO_FLAGS, 0)
            done = sorted((reply.get() for _ in range(1, len(tasks))), key=lambda r: r[0])
    for _, ok, value in done:
        if not ok:
            raise value
    return [first] + [value for _, _, value in done]


def _parallel(fn, chunks):
    """[fn(r0, r1) for (r0, r1) in chunks], in parallel threads (:func:`_run_tasks`), each chunk
    in its own workspace."""
    return _run_tasks([(lambda r0=r0, r1=r1: fn(r0, r1)) for r0, r1 in chunks])


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
class _Workspace:
    """Scratch buffers reused from call to call.  A freshly allocated large array costs a page
    fault per page on first touch, which for W1-sized problems costs as much as the arithmetic.
    One workspace per (calling thread, batch chunk), so concurrent calls and the chunks of one call
    never share buffers; returned arrays (gradients, states, losses) are always fresh."""

    def __init__(self):
        self.bufs = {}
        self.views = {}          # key -> (shape, dtype, the view last handed out)
        self.plans = {}          # _SmallPlan by call shape, most recent last (see _small_call)

    def get(self, key, shape, dtype):
        hit = self.views.get(key)
        if hit is not None and hit[0] == shape and hit[1] == dtype:
            return hit[2]
        n = math.prod(shape)
        dtype = np.dtype(dtype)
        buf = self.bufs.get((key, dtype))
        if buf is None or buf.size < n:
            buf = np.empty(max(n, 1), dtype)
            self.bufs[(key, dtype)] = buf
        view = buf[:n].reshape(shape)
        self.views[key] = (tuple(shape), dtype, view)
        return view


_workspaces = {}                 # (calling thread ident, chunk index) -> _Workspace
_current = threading.local()     # .ws: the workspace of the chunk this thread is working on


def _after_fork_in_child():
    """A forked child has none of the parent's worker threads (a queued task would never run, and
    the caller would wait for it forever) and may hold a lock some parent thread held: start
    afresh."""
    global _tasks, _n_workers, _controller_lock, _blas_depth, _blas_saved
    _tasks, _n_workers = None, 0
    _posted[:] = 0
    _controller_lock = threading.Lock()
    _blas_depth, _blas_saved = 0, []
    _workspaces.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _caller_workspaces(n):
    """Workspaces 0..n-1 of the calling thread (one per chunk of its calls)."""
    caller = threading.get_ident()
    with _controller_lock:
        return [_workspaces.setdefault((caller, c), _Workspace()) for c in range(n)]


def _ws():
    """The workspace of the chunk the current thread is computing."""
    return _current.ws


def release_workspace():
    """Free the scratch buffers kept between calls."""
    with _controller_lock:
        _workspaces.clear()


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


def _layer0_input(net, x, D):
    """Layer 0's input projection.  Returns (mode, X, tab, tok): through the embedding table,
    FROM_TABLE with tab (V, G*H) = W_ih E[v] + b_ih + b_hh and the tokens (X None); else the input
    X (T, B, in) -- E[x_t] or the dense x_t -- and FROM_P with D (T, B, G*H) <- W_ih x_t for every
    step at once."""
    p = net.layer(0)
    T, B = x.shape[:2]
    if _use_table(net, T * B):
        tab = net.params["embedding.weight"] @ p["weight_ih"].T       # row v: W_ih E[v]
        if "bias_ih" in p:
            tab += p["bias_ih"] + p["bias_hh"]
        return jit.FROM_TABLE, None, tab, np.ascontiguousarray(x, dtype=np.int64)
    if net.embedding:
        X = _ws().get("X0", (T, B, net.input_size), net.dtype)
        np.take(net.params["embedding.weight"], x, axis=0, out=X)    # e_t = E[x_t]
    else:
        X = np.ascontiguousarray(x, dtype=net.dtype)
    np.matmul(X.reshape(T * B, -1), p["weight_ih"].T, out=D.reshape(T * B, D.shape[2]))
    return jit.FROM_P, X, None, None


def _forward(net, x, S):
    """Run every layer over the steps of x (T, B) tokens or (T, B, in) from the internal state S.

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
            mode, X, tab0, tok0 = _layer0_input(net, x, D)
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


def _advance(net, x, S):
    """The state after running the steps of x from S (caches kept for one block at a time)."""
    Tb = _block_steps(net, x.shape[1], 1)
    for a in range(0, x.shape[0], Tb):
        S = _forward(net, x[a:a + Tb], S)[1]
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


def _backward(net, x, layers, dH, t_stop, sq, grads=None):
    """Recursion (16) down the layers.  ``dH`` (T, B, H) holds on entry the read-out's gradient
    reaching the top layer's h_t (it is then reused for the gradient reaching each layer below);
    each layer's pre-activation gradients da_t (t >= t_stop) give its weight gradients and, through
    W_ih, the gradient reaching the layer below, as GEMMs over all steps (:func:`_layer_grads`).
    ``x`` are the window's inputs (for the embedding).

    When ``grads`` is a dict the gradients of the recurrent layers and the embedding are put in it
    (this thread's scratch arrays); else only ``sq`` is accumulated (the probe, see
    jit.backward_rows)."""
    kind, act = _codes(net)
    for l in reversed(range(net.num_layers)):
        p = net.layer(l)
        L = layers[l]
        Whh = np.ascontiguousarray(p["weight_hh"], dtype=net.dtype)
        jit.backward_rows(kind, act, L.D, L.Hs, L.Cs, L.TC, dH, Whh, t_stop, sq, 0, L.D.shape[1])
        if l > 0 or grads is not None:
            _layer_grads(net, l, p, L, x[t_stop:], L.D[t_stop:], dH[t_stop:], t_stop, grads)


def _layer_grads(net, l, p, L, x, DA, dX, t_stop, grads):
    """Eq. (15)'s sum over steps of b_k . dS/dtheta for layer l's parameters (DA (T', B, G*H) the
    pre-activation gradients of steps t_stop..T-1), put in ``grads`` when it is a dict, and the
    gradient reaching the layer's input: written into dX (T', B, H) for a layer below, or
    scattered into the embedding's gradient."""
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
    take them, shared read-only by the chunks of a call and refreshed once per call."""

    def __init__(self, net, table):
        dt, L, H, O = net.dtype, net.num_layers, net.hidden_size, net.output_size
        GH, n_in = net.gates * H, net.input_size
        self.embedding = net.embedding
        self.Whh = np.empty((L, GH, H), dt)                                    # W_hh of each layer
        self.Wih = np.empty((L - 1, GH, H), dt)                                # W_ih of layers 1..
        self.Wih0 = np.empty((GH, n_in), dt)                                   # W_ih of layer 0
        self.bias = np.zeros((L, GH), dt)                                      # b_ih + b_hh
        self.Wdec, self.bdec = np.empty((O, H), dt), np.empty(O, dt)
        V = net.vocab_size if net.embedding else 0
        self.E = np.empty((V, n_in), dt)
        self.tabT = np.empty((GH, V if table else 0), dt)   # column v: W_ih E[v] + b_ih + b_hh

    def refresh(self, net):
        """Copy the current parameters in."""
        P = net.params
        for l in range(self.Whh.shape[0]):
            self.Whh[l] = P[f"weight_hh_l{l}"]
            if l:
                self.Wih[l - 1] = P[f"weight_ih_l{l}"]
            if f"bias_ih_l{l}" in P:
                np.add(P[f"bias_ih_l{l}"], P[f"bias_hh_l{l}"], out=self.bias[l])
        self.Wih0[...] = P["weight_ih_l0"]
        self.Wdec[...] = P["decoder.weight"]
        self.bdec[...] = P["decoder.bias"]
        if self.embedding:
            self.E[...] = P["embedding.weight"]
        if self.tabT.shape[1]:
            np.matmul(self.Wih0, self.E.T, out=self.tabT)
            self.tabT += self.bias[0][:, None]


class _SmallPlan:
    """What one chunk of rows of a small network needs for calls of one shape: its buffers and the
    two kernels' argument tuples over them and over the call's shared parameters ``prm``
    (:class:`_SmallParams`): small_forward, small_backward.  The calling thread loads the inputs
    (:meth:`load`) in place; :meth:`run` runs the kernels: no Python beyond the two kernel calls
    runs in the worker threads, which matters because it runs under one GIL.  The accumulators
    are zeroed by the kernels themselves; the gradients are views of one array, ``gflat``, so
    that the chunks' sum is one addition."""

    def __init__(self, net, prm, T, Bc, K2, loss, scale, probe):
        kind, act = _codes(net)
        dt, L, H, O = net.dtype, net.num_layers, net.hidden_size, net.output_size
        GH, n_in, lstm = net.gates * H, net.input_size, kind == jit.LSTM
        table = prm.tabT.shape[1] > 0
        e2, e3 = np.empty((0, 0), dt), np.empty((0, 0, 0), dt)
        self.T, self.lstm, self.embedding, self.prm = T, lstm, net.embedding, prm
        self._entries = None      # the two kernels' compiled entry points for these arguments
        self._names = None
        self.tok = np.empty((T, Bc) if net.embedding else (0, 0), np.int64)
        self.X0 = np.empty((T, Bc, n_in), dt) if not table else e3            # x_t, and transposed
        self.X0T = np.empty((T, n_in, Bc), dt) if not table else e3
        self.PT = np.empty((L, T, GH, Bc), dt)
        self.HT = np.empty((L, T + 1, H, Bc), dt)
        self.Hrm = np.empty((L, T + 1, Bc, H), dt)
        self.CT = np.empty((L, T + 1, H, Bc) if lstm else (L, 0, 0, 0), dt)
        self.TCT = np.empty((L, T, H, Bc) if lstm else (L, 0, 0, 0), dt)
        self.dHT = np.empty((T, H, Bc), dt)
        self.ell = np.empty(K2 * Bc, np.float64)
        self.yi = np.empty(K2 * Bc if loss == "cross_entropy" else 0, np.int64)
        self.yf = np.empty((K2 * Bc, O) if loss != "cross_entropy" else (0, 0), dt)
        self.sq = np.empty((T, Bc) if probe else (0, Bc), dt)
        if probe:
            self.g = (e2, e3, np.empty((L, 0, 0), dt), np.empty((L, 0), dt), e2)
            self.dec = (e2, np.empty(0, dt))
            self.gflat, self.gshapes = None, None
        else:                     # dWih0, dWih, dWhh, db, dE, then dWdec, dbdec: views of one array
            self.gshapes = [prm.Wih0.shape, prm.Wih.shape, prm.Whh.shape,
                            (L, GH if "bias_ih_l0" in net.params else 0), prm.E.shape,
                            prm.Wdec.shape, prm.bdec.shape]
            self.gflat = np.empty(sum(math.prod(shape) for shape in self.gshapes), dt)
            views = _carve(self.gflat, self.gshapes)
            self.g, self.dec = tuple(views[:5]), tuple(views[5:])
        mode0 = jit.FROM_TABLE if table else jit.FROM_X
        out = np.empty((K2, Bc, O), dt)                  # logits, then the loss gradients
        self.fwd = (kind, act, mode0, self.X0T, prm.tabT, self.tok, prm.Wih0, prm.Wih, prm.Whh,
                    prm.bias, self.PT, self.HT, self.CT, self.TCT, self.Hrm, prm.Wdec, out)
        self.bwd = (kind, act, self.PT, self.Hrm, self.CT, self.TCT, self.dHT, prm.Whh, prm.Wih,
                    prm.Wih0, self.X0, self.tok, prm.E, 1 if probe else 0, self.sq, self.g[2],
                    self.g[1], self.g[0], self.g[3], self.g[4],
                    jit.DOWN_EMBED if net.embedding and not probe else jit.DOWN_NONE, prm.Wdec,
                    out, *self.dec, jit.XENT if loss == "cross_entropy" else jit.MSE, prm.bdec,
                    self.yi, self.yf, dt.type(scale), self.ell)

    def names(self, net):
        """[(name, index into g + dec, layer or None, copy)] for the gradient of each parameter of
        ``net`` (both biases get the same sum, the second as a copy)."""
        if self._names is None:
            where = {"weight_ih": (1, -1), "weight_hh": (2, 0), "bias_ih": (3, 0), "bias_hh": (3, 0)}
            names = []
            for name in net.params:
                if name in ("embedding.weight", "decoder.weight", "decoder.bias"):
                    names.append((name, {"embedding.weight": 4, "decoder.weight": 5,
                                         "decoder.bias": 6}[name], None, False))
                    continue
                key, l = name.rsplit("_l", 1)
                i, shift = where[key]
                l = int(l)
                if key == "weight_ih" and l == 0:
                    names.append((name, 0, None, False))
                else:
                    names.append((name, i, l + shift, key == "bias_hh"))
            self._names = names
        return self._names

    def load(self, x, y, S):
        """The chunk's inputs x (T, Bc) or (T, Bc, in), targets y of the last K2 steps and state S."""
        if self.embedding:
            self.tok[...] = x
        if self.X0.shape[0]:
            if self.embedding:
                np.take(self.prm.E, self.tok, axis=0, out=self.X0)    # e_t = E[x_t]
            else:
                self.X0[...] = x
            self.X0T[...] = self.X0.transpose(0, 2, 1)
        if self.yi.shape[0]:
            self.yi[...] = y.reshape(-1)
        else:
            self.yf[...] = y.reshape(self.yf.shape)
        self.Hrm[:, 0] = S[0]
        self.HT[:, 0] = S[0].transpose(0, 2, 1)
        if self.lstm:
            self.CT[:, 0] = S[1].transpose(0, 2, 1)

    def run(self, flags=_NO_FLAGS, posted=_NO_FLAGS):
        """The chunk's two kernel calls; for the chunk of the calling thread in :func:`_run_tasks`,
        the first sets ``posted`` and the second then waits for ``flags``."""
        if self._entries is None:
            self._entries = (_entry(jit.small_forward, self.fwd + (posted,)),
                             _entry(jit.small_backward, self.bwd + (flags, _SPINS)))
        self._entries[0](*self.fwd, posted)
        self._entries[1](*self.bwd, flags, _SPINS)

    def state(self):
        """S_T of the chunk's rows (views of this plan's arrays)."""
        T = self.T
        return (self.Hrm[:, T], self.CT[:, T].transpose(0, 2, 1)) if self.lstm else (self.Hrm[:, T],)


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
    sq (T, Bc), no parameter gradients).  The parameters are copied in and every chunk's inputs loaded
    by the calling thread, so that the worker threads run nothing but the kernels.  Returns the
    chunks' plans (:class:`_SmallPlan`): their gradients (plan.g, the stacked recurrent ones dWih0,
    dWih, dWhh, db, dE, and plan.dec, the read-out's), plan.ell (K2 * Bc,) float64, plan.sq and
    plan.state() are the calling thread's scratch arrays, valid until its next call.

    (Two kernel calls rather than one kernel calling both: numba re-optimises every jitted
    function a kernel calls as part of it, which cost 2 s more compile time per float type.)"""
    T = x.shape[0]
    table = _use_table(net, n_tokens)
    key = (type(net), net.kind, net.activation, net.num_layers, net.hidden_size, net.input_size,
           net.output_size, net.vocab_size, "bias_ih_l0" in net.params, net.dtype,
           T, tuple(chunks), K2, loss, scale, probe, table)
    plans = _caller_workspaces(1)[0].plans
    entry = plans.pop(key, None)
    if entry is None:
        prm = _SmallParams(net, table)
        entry = prm, [_SmallPlan(net, prm, T, r1 - r0, K2, loss, scale, probe) for r0, r1 in chunks]
    plans[key] = entry                                   # most recent last
    while len(plans) > _PLANS_KEPT:
        del plans[next(iter(plans))]
    prm, chunk_plans = entry
    prm.refresh(net)
    for (r0, r1), plan in zip(chunks, chunk_plans):
        plan.load(x[:, r0:r1], y[:, r0:r1], tuple(s[:, r0:r1] for s in S))
    _run_tasks([plan.run for plan in chunk_plans], first_waits=True)
    S_out = _combine_states([plan.state() for plan in chunk_plans])
    return chunk_plans, S_out


def _carve(flat, shapes):
    """Consecutive views of the 1-D array ``flat`` with the given shapes (a NumPy array, or a
    numba.cuda device array: npbptt.kernels.gpu)."""
    views, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[at:at + n].reshape(shape))
        at += n
    return views


def _small_grads(net, plans):
    """The gradients of the chunks' plans (see :func:`_small_call`) summed, as a dict in the order
    of ``net.params``: views of one fresh array, the sum of the plans' ``gflat`` (one addition for
    all the parameters; the second bias, the same sum, a copy)."""
    total = plans[0].gflat.copy() if len(plans) == 1 else np.add(plans[0].gflat, plans[1].gflat)
    for p in plans[2:]:
        total += p.gflat
    sums = _carve(total, plans[0].gshapes)
    out = {}
    for name, i, l, copy in plans[0].names(net):
        a = sums[i] if l is None else sums[i][l]
        out[name] = a.copy() if copy else a
    return out


# --- the three operations -----------------------------------------------------------------------
def bptt(net, x, y, S, K1, K2, loss):
    """BPTT(K1, K2) on one chunk by recursion (16); must equal ``npbptt.bptt.bptt_reference``
    (same arguments, same (loss, grads, S_T))."""
    if not supports(net):
        return _reference("bptt")(net, x, y, S, K1, K2, loss)
    T, B = x.shape[:2]
    K1 = min(K1, T - 1)
    t0 = T - 1 - K1                                      # the state entering step t0 is constant
    Tw, H = K1 + 1, net.hidden_size
    chunks = _chunks(net, B)
    if _small_path(net, chunks):
        if t0 > 0:                                       # the state entering the window
            S = _combine_states(_parallel(
                lambda r0, r1: _advance(net, _rows(x[:t0], r0, r1), tuple(s[:, r0:r1] for s in S)),
                chunks))
        plans, S_out = _small_call(net, x[t0:], y[T - K2:], S, chunks, K2, loss, 1.0 / (B * K2),
                                   False, Tw * B)
        ell = sum(p.ell.reshape(K2, -1).sum(axis=1) for p in plans)   # per step, over the batch
        value = float(np.sum(ell / B)) / K2
        return value, _small_grads(net, plans), S_out

    def rows(r0, r1):
        Bc = r1 - r0
        xc, Sc = _rows(x, r0, r1), tuple(s[:, r0:r1] for s in S)
        if t0 > 0:
            Sc = _advance(net, xc[:t0], Sc)
        layers, S_T = _forward(net, xc[t0:], Sc)
        dH = _ws().get("dH", (Tw, Bc, H), net.dtype)
        dH[:Tw - K2] = 0
        # Eq. (16), k < K2: the losses' gradients dL_{s-k}/dS_{s-k}, with the 1/B of the batch
        # mean and the 1/K2 of Eq. (15) folded in
        grads = {}
        ell = _readout_backward(net, layers[-1].Hs[Tw - K2 + 1:], _rows(y[T - K2:], r0, r1), loss,
                                1.0 / (B * K2), dH[Tw - K2:], grads)
        _backward(net, xc[t0:], layers, dH, 0, np.empty((0, Bc), net.dtype), grads)
        return ell.sum(axis=1), grads, S_T

    parts = _parallel(rows, chunks)
    ell_sum = sum(p[0] for p in parts)                   # per step, over the whole batch
    value = float(np.sum(ell_sum / B)) / K2
    grads = _combine_grads([p[1] for p in parts], list(net.params))
    return value, grads, _combine_states([p[2] for p in parts])


def step_losses(net, x, y, S, loss):
    """Forward pass only: the batch-mean loss of every step (T,) and the final state; must equal
    ``npbptt.bptt.step_losses_reference``."""
    if not supports(net):
        return _reference("step_losses")(net, x, y, S, loss)
    T, B = x.shape[:2]
    H, O = net.hidden_size, net.output_size
    W = net.params["decoder.weight"]

    def rows(r0, r1):
        Bc = r1 - r0
        xc, yc, Sc = _rows(x, r0, r1), _rows(y, r0, r1), tuple(s[:, r0:r1] for s in S)
        Tb = _block_steps(net, Bc, O)
        ell_sum = np.empty(T, np.float64)
        for a in range(0, T, Tb):
            b = min(a + Tb, T)
            layers, Sc = _forward(net, xc[a:b], Sc)
            out = _ws().get("logits", ((b - a) * Bc, O), net.dtype)
            np.matmul(layers[-1].Hs[1:].reshape(-1, H), W.T, out=out)
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
    ``npbptt.probe.grad_norms_reference``."""
    if not supports(net):
        return _reference("grad_norms")(net, x, y, S, loss)
    T, B = x.shape[:2]
    H = net.hidden_size
    chunks = _chunks(net, B)
    if _small_path(net, chunks):
        plans, _ = _small_call(net, x, y[T - 1:], S, chunks, 1, loss, 1.0, True, T * B)
        sq = np.concatenate([p.sq for p in plans], axis=1)   # sq[t] = ||b for S_t||^2
        return np.sqrt(sq[::-1]).astype(np.float64)      # phi[k] for S_{T-k}: k = T-1-t

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
