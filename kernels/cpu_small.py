"""The CPU backend's small-network path (:mod:`npbptt.kernels.cpu`): BPTT(K1, K2) and the probe of
Eq. (18) for networks whose every layer is small, each chunk of batch rows in two kernel calls.

:func:`small_call` runs, per chunk, ``_cpu_jit.small_forward`` -- every layer over every step,
equal to ``npbptt.model._Network.step`` (``npbptt.cells.rnn_step`` / ``lstm_step``) step after
step, and the read-out's logits h_t W_dec^T of the last K2 steps -- then ``_cpu_jit.small_backward``
-- the read-out's losses and their gradients, then recursion (16) down every layer, equal to
``npbptt.cells.rnn_step_vjp`` / ``lstm_step_vjp`` as in ``npbptt.model._Network.step_vjp``, with
the terms of Eq. (15) accumulated as ``npbptt.bptt.bptt_reference`` does (each step's product
formed, then added, t descending); with ``probe``, only the squared state-gradient norms of
Eq. (18) (``npbptt.probe.grad_norms_reference``).  The entry points of :mod:`npbptt.kernels.cpu`
decide when this path runs (``_small_path``) and return its results as the references do.

Feature-major (a_t^T (G*H, B)): the input projection, the weight gradients ``da_t^T h_{t-1}``,
``da_t^T x_t`` and the input gradients are formed step by step while the step's rows are in
cache.  The kernels' arguments are kept between calls of one shape (:class:`_SmallPlan`, over
the stacked parameters :class:`_SmallParams` and the call's shared arrays :class:`_SmallCall`)
as named records, :class:`SmallForward` and :class:`SmallBackward`, whose fields are the jitted
functions' parameters in order; the calling thread's backward kernel, once the other chunks are
done, sums the chunks' gradients and losses.  The thread hand-off is :mod:`.runtime`'s.
"""
import math
from typing import NamedTuple

import numba
import numpy as np

from . import _cpu_jit as jit
from .cpu_layers import codes, use_table
from .runtime import NO_FLAGS as _NO_FLAGS, SPINS as _SPINS
from .runtime import caller_workspaces as _caller_workspaces, run_tasks as _run_tasks
from .shared import carve as _carve

__all__ = ["SmallBackward", "SmallForward", "small_call"]


class SmallForward(NamedTuple):
    """The arguments of ``_cpu_jit.small_forward`` that a chunk's plan fixes, in its parameter
    order (see its docstring for their meaning); the call adds the outputs hout, cout and the
    hand-off flag ``posted``: ``small_forward(*record, hout, cout, posted)``."""
    kind: int
    act: int
    mode0: int
    X0T: np.ndarray
    tabT: np.ndarray
    tok: np.ndarray
    Wih0: np.ndarray
    Wih: np.ndarray
    Whh: np.ndarray
    bias: np.ndarray
    PT: np.ndarray
    HT: np.ndarray
    CT: np.ndarray
    TCT: np.ndarray
    Hrm: np.ndarray
    Wdec: np.ndarray
    out: np.ndarray
    r0: int


class SmallBackward(NamedTuple):
    """The arguments of ``_cpu_jit.small_backward`` that a chunk's plan fixes, in its parameter
    order (see its docstring for their meaning); the call adds the gathered gradient gout, the
    loss ``val``, the other chunks' ``flags`` and the spin count:
    ``small_backward(*record, gout, val, flags, spins)``."""
    kind: int
    act: int
    PT: np.ndarray
    Hrm: np.ndarray
    CT: np.ndarray
    TCT: np.ndarray
    dHT: np.ndarray
    Whh: np.ndarray
    Wih: np.ndarray
    Wih0: np.ndarray
    X0: np.ndarray
    tok: np.ndarray
    E: np.ndarray
    t_stop: int
    sq: np.ndarray
    dWhh: np.ndarray
    dWih: np.ndarray
    dWih0: np.ndarray
    db: np.ndarray
    dE: np.ndarray
    down0: int
    Wdec: np.ndarray
    out: np.ndarray
    dWdec: np.ndarray
    dbdec: np.ndarray
    code: int
    bdec: np.ndarray
    yi: np.ndarray
    yf: np.ndarray
    scale: float
    ell: np.ndarray
    r0: int
    c: int
    ELL: np.ndarray
    G: np.ndarray
    db_at: int


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
    buffers and the two kernels' argument records over them (:class:`SmallForward`,
    :class:`SmallBackward`), over the parameters ``prm`` (:class:`_SmallParams`) and over the
    call's shared arrays ``call`` (:class:`_SmallCall`).
    The calling thread loads the inputs (:meth:`load`) in place; :meth:`run` runs the kernels,
    which write the chunk's rows of the final state: no Python beyond the two kernel calls runs
    in the worker threads, which matters because it runs under one GIL.
    The accumulators are zeroed by the kernels themselves; the gradients are views of row c of
    ``call.G``."""

    def __init__(self, net, prm, call, c, r0, Bc):
        kind, act = codes(net)
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
        self.fwd = SmallForward(kind=kind, act=act, mode0=mode0, X0T=X0T, tabT=prm.tabT, tok=tok,
                                Wih0=prm.Wih0, Wih=prm.Wih, Whh=prm.Whh, bias=prm.bias, PT=PT, HT=HT,
                                CT=CT, TCT=TCT, Hrm=Hrm, Wdec=prm.Wdec, out=out, r0=r0)
        # where load() puts the inputs: views, made once
        self._tok, self._X0, self._X0T, self._E = tok, X0, X0T, prm.E
        self._y = yi.reshape(K2, Bc) if call.loss == "cross_entropy" else yf.reshape(K2, Bc, O)
        self._h0, self._h0T = Hrm[:, 0], HT[:, 0].transpose(0, 2, 1)
        self._c0T = CT[:, 0].transpose(0, 2, 1) if lstm else None
        dWih0, dWih, dWhh, db, dE = g
        dWdec, dbdec = dec
        self.bwd = SmallBackward(
            kind=kind, act=act, PT=PT, Hrm=Hrm, CT=CT, TCT=TCT, dHT=dHT, Whh=prm.Whh, Wih=prm.Wih,
            Wih0=prm.Wih0, X0=X0, tok=tok, E=prm.E, t_stop=1 if probe else 0, sq=call.sq,
            dWhh=dWhh, dWih=dWih, dWih0=dWih0, db=db, dE=dE,
            down0=jit.DOWN_EMBED if net.embedding and not probe else jit.DOWN_NONE, Wdec=prm.Wdec,
            out=out, dWdec=dWdec, dbdec=dbdec,
            code=jit.XENT if call.loss == "cross_entropy" else jit.MSE, bdec=prm.bdec, yi=yi, yf=yf,
            scale=dt.type(call.scale), ell=ell, r0=r0, c=c, ELL=call.ELL,
            G=call.G if c == 0 else call.e2, db_at=call.db_at)

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
                _entry(jit.small_forward, self.fwd + (hout, cout, posted)),
                _entry(jit.small_backward, self.bwd + (gout, self.call.val, flags, _SPINS)))
        self._entries[0](*self.fwd, hout, cout, posted)
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
    dispatch, which holds the GIL while a second thread may want it (docs/kernels.md)."""
    return dispatcher.compile(tuple(numba.typeof(a) for a in args))


_PLANS_KEPT = 4                  # per calling thread: the most recent call shapes


def small_call(net, x, y, S, chunks, K2, loss, scale, probe, n_tokens):
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
    table = use_table(net, n_tokens)
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
