"""CUDA kernels (``numba.cuda``) for BPTT(K1, K2), the forward losses and the probe of Eq. (18).

Selected by ``backend="cuda"``.  Same three functions, signatures and return values (host NumPy
arrays) as the references they must equal, and as :mod:`npbptt.kernels.cpu`:

    bptt(net, x, y, S, K1, K2, loss)  -> (loss, grads, S_T)   npbptt.bptt.bptt_reference
    step_losses(net, x, y, S, loss)   -> (L (T,), S_T)        npbptt.bptt.step_losses_reference
    grad_norms(net, x, y, S, loss)    -> phi (T, B)           npbptt.probe.grad_norms_reference

plus :func:`is_available`.  Parameters and inputs are copied to the device on every call and the
results copied back.  Networks :func:`npbptt.kernels.cpu.supports` rejects are handed to the
NumPy reference.

Status: verified against the references only under numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, tiny shapes); the kernels are straightforward (tiled GEMM, one thread
block per example for the recurrence) and have not been tuned or timed on a GPU.
"""
import numpy as np

from .cpu import _BLOCK_ELEMENTS, _reference, supports

__all__ = ["bptt", "step_losses", "grad_norms", "is_available"]


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


def _zeros(shape, dt):
    return _dev(np.zeros(shape, dt))


def _grid1(n):
    from ._cuda_jit import SIM
    threads = 4 if SIM else 256
    return max(1, min(-(-n // threads), 1024)), threads


def _gemm(dt, A, B, C, ta=0, tb=0, step=0, accumulate=False):
    """C (+)= op(A) op(B) on the device (see _cuda_jit.make: gemm)."""
    from ._cuda_jit import TILE
    M, N = C.shape
    grid = (-(-N // TILE), -(-M // TILE))
    _k(dt)["gemm"][grid, (TILE, TILE)](A, B, C, ta, tb, step, accumulate)


class _Net:
    """The network's parameters on the device and its sizes."""

    def __init__(self, net):
        self.net = net
        self.dt = np.dtype(net.dtype)
        self.kind = 1 if net.kind == "lstm" else 0
        from ._cpu_jit import ACT
        self.act = ACT[net.activation]
        self.L, self.H, self.GH = net.num_layers, net.hidden_size, net.gates * net.hidden_size
        p = {k: np.asarray(v, self.dt) for k, v in net.params.items()}
        self.layers = []
        for l in range(self.L):
            W_ih, W_hh = p[f"weight_ih_l{l}"], p[f"weight_hh_l{l}"]
            bias = p[f"bias_ih_l{l}"] + p[f"bias_hh_l{l}"] if f"bias_ih_l{l}" in p else None
            self.layers.append(dict(W_ih=_dev(W_ih), W_hh=_dev(W_hh), WhhT=_dev(W_hh.T),
                                    bias=None if bias is None else _dev(bias), has_bias=bias is not None))
        self.W_dec, self.b_dec = _dev(p["decoder.weight"]), _dev(p["decoder.bias"])
        self.E = _dev(p["embedding.weight"]) if net.embedding else None
        self.O = p["decoder.weight"].shape[0]


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
    none3 = _empty((0, 0, 0), dn.dt)
    layers = []
    S_T = tuple(np.empty_like(s) for s in S)
    from ._cuda_jit import block_threads
    for l, p in enumerate(dn.layers):
        D = _empty((T, B, GH), dn.dt)
        D2 = D.reshape(T * B, GH)
        _gemm(dn.dt, X, p["W_ih"], D2, tb=1)              # W_ih x_t for every step at once
        if p["has_bias"]:
            k["add_bias"][_grid1(D2.size)](D2, p["bias"])
        Hs0 = np.empty((T + 1, B, H), dn.dt)
        Hs0[0] = S[0][l]
        Hs = _dev(Hs0)
        if dn.kind == 1:
            Cs0 = np.empty((T + 1, B, H), dn.dt)
            Cs0[0] = S[1][l]
            Cs, TC = _dev(Cs0), _empty((T, B, H), dn.dt)
        else:
            Cs = TC = none3
        k["forward_layer"][B, block_threads(H)](dn.kind, dn.act, D, p["WhhT"], Hs, Cs, TC)
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


def _readout_backward(dn, Htop, y, loss, scale, dH):
    """Losses on the read-out of Htop (K*B, H) device rows and the gradients of scale * sum ell:
    dH (K*B, H) device; returns (ell host (K*B,), dW_dec device, db_dec device)."""
    K, B = y.shape[:2]
    N = K * B
    out = _empty((N, dn.O), dn.dt)
    _gemm(dn.dt, Htop, dn.W_dec, out, tb=1)
    yi, yf = _targets(dn, loss, y)
    ell = _empty(N, dn.dt)
    _loss(dn, loss, out, yi, yf, scale, True, ell)
    dW = _empty(dn.W_dec.shape, dn.dt)
    _gemm(dn.dt, out, Htop, dW, ta=1, step=B)            # read-out's direct term of Eq. (2)
    db = _empty((dn.O, 1), dn.dt)
    _gemm(dn.dt, out, _dev(np.ones((N, 1), dn.dt)), db, ta=1, step=B)
    _gemm(dn.dt, out, dn.W_dec, dH)
    return ell.copy_to_host(), dW, db


def _backward(dn, x, layers, dH, t_stop, sq, want_grads):
    """Recursion (16) down the layers (as npbptt.kernels.cpu._backward); returns host grads."""
    k = _k(dn.dt)
    from ._cuda_jit import block_threads
    grads = {}
    B = x.shape[1]
    H, GH = dn.H, dn.GH
    DHR, DCR = _empty((B, H), dn.dt), _empty((B, H), dn.dt)
    for l in reversed(range(dn.L)):
        p, Lr = dn.layers[l], layers[l]
        T = Lr["D"].shape[0]
        k["backward_layer"][B, block_threads(H)](dn.kind, dn.act, Lr["D"], Lr["Hs"], Lr["Cs"],
                                                  Lr["TC"], dH, p["W_hh"], t_stop, sq, DHR, DCR)
        n = (T - t_stop) * B
        DA = Lr["D"][t_stop:].reshape(n, GH)
        X = Lr["X"][t_stop * B:]
        if want_grads:
            for name, rhs in ((f"weight_ih_l{l}", X), (f"weight_hh_l{l}", Lr["Hs"][t_stop:T].reshape(n, H))):
                g = _empty((GH, rhs.shape[1]), dn.dt)
                _gemm(dn.dt, DA, rhs, g, ta=1, step=B)   # sum over steps of da_t^T x_t
                grads[name] = g.copy_to_host()
            if p["has_bias"]:
                g = _empty((GH, 1), dn.dt)
                _gemm(dn.dt, DA, _dev(np.ones((n, 1), dn.dt)), g, ta=1, step=B)
                grads[f"bias_ih_l{l}"] = g.copy_to_host()[:, 0]
                grads[f"bias_hh_l{l}"] = grads[f"bias_ih_l{l}"].copy()
        if l > 0:
            _gemm(dn.dt, DA, p["W_ih"], dH[t_stop:].reshape(n, H))   # into h_t of layer l-1
        elif want_grads and dn.E is not None:
            dX = _empty((n, dn.E.shape[1]), dn.dt)
            _gemm(dn.dt, DA, p["W_ih"], dX)
            dE = _zeros(dn.E.shape, dn.dt)
            idx = _dev(np.asarray(x[t_stop:], np.int64).reshape(-1))
            k["scatter_add_rows"][_grid1(dX.size)](idx, dX, dE)
            grads["embedding.weight"] = dE.copy_to_host()
    return grads


def bptt(net, x, y, S, K1, K2, loss):
    """BPTT(K1, K2) on the GPU; must equal ``npbptt.bptt.bptt_reference``."""
    if not supports(net):
        return _reference("bptt")(net, x, y, S, K1, K2, loss)
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
    top = layers[-1]["Hs"][Tw - K2 + 1:].reshape(K2 * B, H)
    ell, dWd, dbd = _readout_backward(dn, top, y[T - K2:], loss, 1.0 / (B * K2),
                                      dH[Tw - K2:].reshape(K2 * B, H))
    value = float(np.sum(ell.reshape(K2, B).mean(axis=1))) / K2
    grads = _backward(dn, x[t0:], layers, dH, 0, _empty((0, B), dn.dt), True)
    grads["decoder.weight"], grads["decoder.bias"] = dWd.copy_to_host(), dbd.copy_to_host()[:, 0]
    return value, {k: grads[k] for k in net.params}, S_T


def step_losses(net, x, y, S, loss):
    """Forward losses on the GPU; must equal ``npbptt.bptt.step_losses_reference``."""
    if not supports(net):
        return _reference("step_losses")(net, x, y, S, loss)
    dn = _Net(net)
    T, B = x.shape[:2]
    Tb = max(1, _BLOCK_ELEMENTS // (B * max(dn.O, dn.GH)))
    L = np.empty(T)
    for a in range(0, T, Tb):
        b = min(a + Tb, T)
        layers, S = _forward(dn, x[a:b], S)
        N = (b - a) * B
        out = _empty((N, dn.O), dn.dt)
        _gemm(dn.dt, layers[-1]["Hs"][1:].reshape(N, dn.H), dn.W_dec, out, tb=1)
        yi, yf = _targets(dn, loss, y[a:b])
        ell = _empty(N, dn.dt)
        _loss(dn, loss, out, yi, yf, 1.0, False, ell)
        L[a:b] = ell.copy_to_host().reshape(b - a, B).mean(axis=1)
    return L, S


def grad_norms(net, x, y, S, loss):
    """phi (T, B) of Eq. (18) on the GPU; must equal ``npbptt.probe.grad_norms_reference``."""
    if not supports(net):
        return _reference("grad_norms")(net, x, y, S, loss)
    dn = _Net(net)
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
    _backward(dn, x, layers, dH, 1, sq, False)
    return np.sqrt(sq.copy_to_host()[::-1]).astype(np.float64)
