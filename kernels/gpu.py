"""CUDA kernels (``numba.cuda``) for BPTT(K1, K2), the forward losses and the probe of Eq. (18).

Selected by ``backend="cuda"``.  Same three functions, signatures and return values (host NumPy
arrays) as the references they must equal, and as :mod:`npbptt.kernels.cpu`:

    bptt(net, x, y, S, K1, K2, loss)  -> (loss, grads, S_T)   npbptt.bptt.bptt_reference
    step_losses(net, x, y, S, loss)   -> (L (T,), S_T)        npbptt.bptt.step_losses_reference
    grad_norms(net, x, y, S, loss)    -> phi (T, B)           npbptt.probe.grad_norms_reference

plus :func:`is_available`.  The parameters are copied to the device in one piece on every call
and the gradients back in one piece (the API takes and returns host arrays: with W2's 12 M
parameters, copies and host-side work are ~30 ms of its 82 ms step on an H100, which is more
than torch's whole step).  Networks
:func:`npbptt.kernels.shared.supports` rejects are handed to the NumPy reference by
``npbptt.backends.resolve``.

Layout: a layer at a time; input projections, read-out and weight gradients as GEMMs
(register-tiled; a sum over steps on few tiles of C split into runs of whole steps, added in
order); the recurrence either in one launch per layer with a thread block per batch row
(small H: no launch per step) or in a launch per step over every row (H >= _STEP_MIN_H), with
the same arithmetic in the same order.  The host-side cost of a numba.cuda launch (~20-45 us
of Python) bounds small problems: W1 makes ~35 launches and ~10 copies a call.

Status: tested against the references under numba's CUDA simulator (in CI, tiny shapes) and on
an NVIDIA H100 (numba-cuda 0.30.4, realistic shapes up to H = 300, B = 65, T = 40, every path
forced; validation/gpu_check.sh).  Timings: validation/bench_gpu.py, validation/results/gpu/.
"""
import numpy as np

from .shared import BLOCK_ELEMENTS as _BLOCK_ELEMENTS, carve as _carve, supports  # noqa: F401
from .shared import untied as _untied

__all__ = ["bptt", "step_losses", "grad_norms", "is_available"]

# Layers with at least this many hidden units run one launch per step over every batch row
# (forward_step / backward_step); smaller ones one launch per layer with a block per row
# (forward_layer / backward_layer), which avoids a launch per step (~30-45 us of Python each).
_STEP_MIN_H = 128
# A weight-gradient GEMM (a sum over steps) with fewer C tiles than this splits its steps across
# blocks (partial sums, then added in order: deterministic), so that a long sum over a small
# matrix does not run on a handful of blocks.
_SPLIT_BELOW_BLOCKS = 128


def is_available():
    """True when numba.cuda can run kernels here (an NVIDIA GPU and driver, or the simulator)."""
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:                                    # no CUDA driver / toolkit
        return False


def _k(dt):
    from . import _cuda_jit
    return _cuda_jit.KERNELS[np.dtype(dt).name]


def _cuda():
    from numba import cuda
    return cuda


def _dev(a):
    return _cuda().to_device(np.ascontiguousarray(a))


def _empty(shape, dt):
    return _cuda().device_array(shape, dtype=dt)


def _fill(X, value):
    """X[...] = value on the device (X contiguous)."""
    if X.size:
        F = X.reshape(X.size)
        _k(X.dtype)["fill"][_grid1(F.size)](F, X.dtype.type(value))
    return X


def _zeros(shape, dt):
    return _fill(_empty(shape, dt), 0)


def _grid1(n):
    from ._cuda_jit import SIM
    threads = 4 if SIM else 256
    return max(1, min(-(-n // threads), 1024)), threads


def _gemm(dn, A, B, C, ta=0, tb=0, step=0, accumulate=False):
    """C (+)= op(A) op(B) on the device (see _cuda_jit.make: gemm).  A step-structured sum
    (step > 0) over few tiles of C is split into runs of whole steps, one block row per run along
    the grid's z, the partial sums added in order by sum_splits (deterministic)."""
    from ._cuda_jit import BM, TILE
    M, N = C.shape
    if M == 0 or N == 0:                                 # nothing to write (a launch needs a block)
        return
    K = A.shape[0] if ta else A.shape[1]
    grid = (-(-N // BM), -(-M // BM))
    steps = -(-K // step) if step > 0 else 1
    splits = 1
    if grid[0] * grid[1] < _SPLIT_BELOW_BLOCKS:
        splits = min(steps, -(-_SPLIT_BELOW_BLOCKS // (grid[0] * grid[1])))
    k = _k(dn.dt)
    if splits <= 1:
        k["gemm"][grid, (TILE, TILE)](A, B, C, dn.none3, ta, tb, step, accumulate, max(K, 1))
        return
    per = -(-steps // splits) * step                     # k-rows per run: whole steps
    Pk = _empty((-(-K // per), M, N), dn.dt)
    k["gemm"][(grid[0], grid[1], Pk.shape[0]), (TILE, TILE)](A, B, C, Pk, ta, tb, step, False, per)
    k["sum_splits"][_grid1(M * N)](Pk, C, accumulate)


class _Net:
    """The network's parameters on the device (one host-to-device copy) and its sizes."""

    def __init__(self, net):
        self.net = net
        self.dt = np.dtype(net.dtype)
        self.kind = 1 if net.kind == "lstm" else 0
        from ._cpu_jit import ACT
        self.act = ACT[net.activation]
        self.L, self.H, self.GH = net.num_layers, net.hidden_size, net.gates * net.hidden_size
        p = {k: np.asarray(v, self.dt) for k, v in net.params.items()}
        host = []                                         # (name, array), in the order carved
        for l in range(self.L):
            W_hh = p[f"weight_hh_l{l}"]
            host += [(f"W_ih{l}", p[f"weight_ih_l{l}"]), (f"W_hh{l}", W_hh), (f"WhhT{l}", W_hh.T)]
            if f"bias_ih_l{l}" in p:
                host.append((f"bias{l}", p[f"bias_ih_l{l}"] + p[f"bias_hh_l{l}"]))
        host += [("W_dec", p["decoder.weight"]), ("b_dec", p["decoder.bias"])]
        if net.embedding:
            host.append(("E", p["embedding.weight"]))
        flat = np.concatenate([a.ravel() for _, a in host])
        d = dict(zip([n for n, _ in host], _carve(_dev(flat), [a.shape for _, a in host])))
        self.layers = [dict(W_ih=d[f"W_ih{l}"], W_hh=d[f"W_hh{l}"], WhhT=d[f"WhhT{l}"],
                            bias=d.get(f"bias{l}"), has_bias=f"bias{l}" in d)
                       for l in range(self.L)]
        self.W_dec, self.b_dec, self.E = d["W_dec"], d["b_dec"], d.get("E")
        self.O = p["decoder.weight"].shape[0]
        self._ones = None
        self.none3, self.none2 = _empty((0, 0, 0), self.dt), _empty((0, 0), self.dt)

    def ones(self, n):
        """A device column of n ones, (n, 1) (bias gradients as GEMMs)."""
        if self._ones is None or self._ones.shape[0] < n:
            self._ones = _fill(_empty(n, self.dt), 1)
        return self._ones[:n].reshape(n, 1)

    def grad_buffers(self):
        """(device flat array, {name: device view}) of every gradient but bias_hh (equal to
        bias_ih), biases as (G*H, 1) columns, so that one copy brings them all back; the
        embedding's is zeroed (its rows are scatter-added)."""
        shapes = {k: (v.shape[0], 1) if v.ndim == 1 else v.shape
                  for k, v in self.net.params.items() if not k.startswith("bias_hh")}
        G = _empty(sum(int(np.prod(sh)) for sh in shapes.values()), self.dt)
        views = dict(zip(shapes, _carve(G, list(shapes.values()))))
        if "embedding.weight" in views:
            _fill(views["embedding.weight"], 0)
        return G, views, shapes


def _layer0_input(dn, x):
    """Layer 0's input on the device, (T*B, in): E[x_t] gathered, or the dense x_t."""
    T, B = x.shape[:2]
    if dn.E is None:
        return _dev(np.asarray(x, dn.dt).reshape(T * B, -1))
    X = _empty((T * B, dn.E.shape[1]), dn.dt)
    _k(dn.dt)["gather_rows"][_grid1(X.size)](dn.E, _dev(np.asarray(x, np.int64).reshape(-1)), X)
    return X


def _forward(dn, x, S):
    """Every layer over the steps of x from the host state tuple S; returns (layers, S_T host)."""
    k = _k(dn.dt)
    T, B = x.shape[:2]
    H, GH = dn.H, dn.GH
    X = _layer0_input(dn, x)
    none3, none2 = dn.none3, dn.none2
    S0 = _dev(np.stack(S).astype(dn.dt, copy=False))     # the entering state, (1 or 2, L, B, H)
    layers = []
    S_T = tuple(np.empty_like(s) for s in S)
    from ._cuda_jit import SB, SJ, block_threads
    for l, p in enumerate(dn.layers):
        D = _empty((T, B, GH), dn.dt)
        D2 = D.reshape(T * B, GH)
        _gemm(dn, X, p["W_ih"], D2, tb=1)              # W_ih x_t for every step at once
        if p["has_bias"]:
            k["add_bias"][_grid1(D2.size)](D2, p["bias"])
        Hs = _empty((T + 1, B, H), dn.dt)
        if dn.kind == 1:
            Cs, TC = _empty((T + 1, B, H), dn.dt), _empty((T, B, H), dn.dt)
        else:
            Cs = TC = none3
        h0, c0 = S0[0, l], S0[1, l] if dn.kind == 1 else none2
        if H >= _STEP_MIN_H:                             # a launch per step, all rows at once
            grid = (-(-H // SJ), -(-B // SB))
            for t in range(T):
                k["forward_step"][grid, (SJ, SB)](dn.kind, dn.act, D, p["WhhT"], h0, c0, Hs, Cs, TC, t)
        else:                                            # one launch, a block per row
            k["forward_layer"][B, block_threads(H)](dn.kind, dn.act, D, p["WhhT"], h0, c0, Hs, Cs, TC)
        layers.append(dict(X=X, D=D, Hs=Hs, Cs=Cs, TC=TC))
        S_T[0][l] = Hs[T].copy_to_host()
        if dn.kind == 1:
            S_T[1][l] = Cs[T].copy_to_host()
        X = Hs[1:].reshape(T * B, H)                     # h_t^(l) is the input of layer l+1
    return layers, S_T


def _targets(dn, loss, y):
    if loss == "cross_entropy":
        return _dev(np.asarray(y, np.int64).reshape(-1)), _empty((0, 0), dn.dt)
    return _empty(0, np.int64), _dev(np.asarray(y, dn.dt).reshape(-1, y.shape[-1]))


def _loss(dn, loss, out, yi, yf, scale, want_grad, ell):
    from ._cuda_jit import LOSS_THREADS
    code = 0 if loss == "cross_entropy" else 1
    _k(dn.dt)["loss_rows"][out.shape[0], LOSS_THREADS](code, out, dn.b_dec, yi, yf,
                                                        dn.dt.type(scale), want_grad, ell)


def _readout_backward(dn, Htop, y, loss, scale, dH, gv=None):
    """Losses on the read-out of Htop (K*B, H) device rows and the gradients of scale * sum ell:
    dH (K*B, H) device, and, when the gradient views ``gv`` are given, the read-out's weight and
    bias gradients into them; returns ell (host, (K*B,))."""
    K, B = y.shape[:2]
    N = K * B
    out = _empty((N, dn.O), dn.dt)
    _gemm(dn, Htop, dn.W_dec, out, tb=1)
    yi, yf = _targets(dn, loss, y)
    ell = _empty(N, dn.dt)
    _loss(dn, loss, out, yi, yf, scale, True, ell)
    if gv is not None:                                   # read-out's direct term of Eq. (2)
        _gemm(dn, out, Htop, gv["decoder.weight"], ta=1, step=B)
        _gemm(dn, out, dn.ones(N), gv["decoder.bias"], ta=1, step=B)
    _gemm(dn, out, dn.W_dec, dH)
    return ell.copy_to_host()


def _backward(dn, x, layers, dH, t_stop, sq, gv=None):
    """Recursion (16) down the layers (as npbptt.kernels.cpu_layers._backward); the parameter gradients
    into the device views ``gv`` when given."""
    k = _k(dn.dt)
    from ._cuda_jit import SB, SJ, block_threads
    B = x.shape[1]
    H, GH = dn.H, dn.GH
    DCR = _empty((B, H), dn.dt)
    DHR = _empty((B, H), dn.dt) if H < _STEP_MIN_H else dn.none2   # backward_layer's scratch
    for l in reversed(range(dn.L)):
        p, Lr = dn.layers[l], layers[l]
        T = Lr["D"].shape[0]
        if H >= _STEP_MIN_H:                             # a launch per step, all rows at once
            grid = (-(-H // SJ), -(-B // SB))
            _fill(DCR, 0)
            for t in range(T - 1, t_stop - 1, -1):
                k["backward_step"][grid, (SJ, SB)](dn.kind, dn.act, Lr["D"], Lr["Cs"], Lr["TC"], dH,
                                                   p["W_hh"], DCR, sq, t, True)
            if sq.shape[0] and t_stop >= 1:              # ||b_{t_stop-1}||^2 of the probe
                k["backward_step"][grid, (SJ, SB)](dn.kind, dn.act, Lr["D"], Lr["Cs"], Lr["TC"], dH,
                                                   p["W_hh"], DCR, sq, t_stop - 1, False)
        else:                                            # one launch, a block per row
            k["backward_layer"][B, block_threads(H)](dn.kind, dn.act, Lr["D"], Lr["Hs"], Lr["Cs"],
                                                      Lr["TC"], dH, p["W_hh"], t_stop, sq, DHR, DCR)
        n = (T - t_stop) * B
        DA = Lr["D"][t_stop:].reshape(n, GH)
        X = Lr["X"][t_stop * B:]
        if gv is not None:                               # sums over steps of da_t^T x_t etc.
            _gemm(dn, DA, X, gv[f"weight_ih_l{l}"], ta=1, step=B)
            _gemm(dn, DA, Lr["Hs"][t_stop:T].reshape(n, H), gv[f"weight_hh_l{l}"], ta=1, step=B)
            if p["has_bias"]:
                _gemm(dn, DA, dn.ones(n), gv[f"bias_ih_l{l}"], ta=1, step=B)
        if l > 0:
            _gemm(dn, DA, p["W_ih"], dH[t_stop:].reshape(n, H))   # into h_t of layer l-1
        elif gv is not None and dn.E is not None:
            dX = _empty((n, dn.E.shape[1]), dn.dt)
            _gemm(dn, DA, p["W_ih"], dX)
            idx = _dev(np.asarray(x[t_stop:], np.int64).reshape(-1))
            k["scatter_add_rows"][_grid1(dX.size)](idx, dX, gv["embedding.weight"])


def bptt(net, x, y, S, K1, K2, loss):
    """BPTT(K1, K2) on the GPU; must equal ``npbptt.bptt.bptt_reference`` (a tied network as its
    untied view, ``shared.untied``)."""
    net, fold = _untied(net)
    dn = _Net(net)
    T, B = x.shape[:2]
    K1 = min(K1, T - 1)
    t0 = T - 1 - K1
    if t0 > 0:
        Tb = max(1, _BLOCK_ELEMENTS // (B * dn.GH))
        for a in range(0, t0, Tb):                       # the steps before the window
            S = _forward(dn, x[a:min(a + Tb, t0)], S)[1]
    layers, S_T = _forward(dn, x[t0:], S)
    Tw, H = K1 + 1, dn.H
    dH = _zeros((Tw, B, H), dn.dt)
    G, gv, shapes = dn.grad_buffers()
    top = layers[-1]["Hs"][Tw - K2 + 1:].reshape(K2 * B, H)
    ell = _readout_backward(dn, top, y[T - K2:], loss, 1.0 / (B * K2),
                            dH[Tw - K2:].reshape(K2 * B, H), gv)
    value = float(np.sum(ell.reshape(K2, B).mean(axis=1))) / K2
    _backward(dn, x[t0:], layers, dH, 0, _empty((0, B), dn.dt), gv)
    host = dict(zip(shapes, _carve(G.copy_to_host(), list(shapes.values()))))
    grads = {}
    for name, v in net.params.items():
        if name.startswith("bias_hh"):
            grads[name] = grads[name.replace("bias_hh", "bias_ih")].copy()
        else:
            grads[name] = host[name].reshape(v.shape)
    return value, (grads if fold is None else fold(grads)), S_T


def step_losses(net, x, y, S, loss):
    """Forward losses on the GPU; must equal ``npbptt.bptt.step_losses_reference``."""
    dn = _Net(_untied(net)[0])
    T, B = x.shape[:2]
    Tb = max(1, _BLOCK_ELEMENTS // (B * max(dn.O, dn.GH)))
    L = np.empty(T)
    for a in range(0, T, Tb):
        b = min(a + Tb, T)
        layers, S = _forward(dn, x[a:b], S)
        N = (b - a) * B
        out = _empty((N, dn.O), dn.dt)
        _gemm(dn, layers[-1]["Hs"][1:].reshape(N, dn.H), dn.W_dec, out, tb=1)
        yi, yf = _targets(dn, loss, y[a:b])
        ell = _empty(N, dn.dt)
        _loss(dn, loss, out, yi, yf, 1.0, False, ell)
        L[a:b] = ell.copy_to_host().reshape(b - a, B).mean(axis=1)
    return L, S


def grad_norms(net, x, y, S, loss):
    """phi (T, B) of Eq. (18) on the GPU; must equal ``npbptt.probe.grad_norms_reference``."""
    dn = _Net(_untied(net)[0])
    T, B = x.shape[:2]
    H = dn.H
    layers, _ = _forward(dn, x, S)
    dH = _zeros((T, B, H), dn.dt)
    _readout_backward(dn, layers[-1]["Hs"][T:].reshape(B, H), y[T - 1:], loss, 1.0,
                      dH[T - 1:].reshape(B, H))
    last = dH[T - 1].copy_to_host()
    sq0 = np.zeros((T, B), dn.dt)
    sq0[T - 1] = (last * last).sum(axis=1)
    sq = _dev(sq0)
    _backward(dn, x, layers, dH, 1, sq)
    return np.sqrt(sq.copy_to_host()[::-1]).astype(np.float64)
