"""The ``numba.cuda`` kernels behind :mod:`npbptt.kernels.gpu` (private).

The work is laid out as on the CPU (see :mod:`npbptt.kernels.cpu`): a layer at a time over the
whole chunk, the input projections and weight gradients as GEMMs, and only the recurrence
sequential.  The recurrence kernels give each batch example its own thread block for the whole
sweep (the examples never interact), so one launch runs all T steps of a layer with a
``syncthreads`` per step and no grid-wide synchronisation.

Kernels specialise on the float type through :func:`make` (shared-memory arrays need a constant
dtype).  Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the tiles and blocks are small,
since every simulated thread is a Python thread.
"""
import math

from numba import config, cuda, float32, float64

__all__ = ["SIM", "TILE", "LOSS_THREADS", "make", "block_threads"]

SIM = bool(config.ENABLE_CUDASIM)
TILE = 4 if SIM else 16              # GEMM tile edge (threads per block: TILE * TILE)
LOSS_THREADS = 4 if SIM else 128     # threads per read-out row in the loss kernel (power of 2)
_MAX_LAYER_THREADS = 4 if SIM else 256


def block_threads(H):
    """Threads per block of the recurrence kernels: one per hidden unit, at most a few hundred
    (each thread then takes units j, j + blockDim, ...)."""
    return max(1, min(H, _MAX_LAYER_THREADS))


@cuda.jit(device=True)
def _sigmoid(z):
    """As npbptt.cells.sigmoid: 1/(1+e^-z), or e^z/(1+e^z) for z < 0."""
    if z >= 0:
        return 1 / (1 + math.exp(-z))
    e = math.exp(z)
    return e / (1 + e)


@cuda.jit(device=True)
def _activate(act, z):
    """rho(z) of the simple RNN for code ``act`` (0 tanh, 1 relu, 2 sigmoid, 3 linear)."""
    if act == 0:
        return math.tanh(z)
    if act == 1:
        return max(z, z - z)
    if act == 2:
        return _sigmoid(z)
    return z


@cuda.jit(device=True)
def _activate_grad(act, a):
    """rho'(z) in terms of the output a = rho(z) (npbptt.cells.ACTIVATIONS)."""
    if act == 0:
        return 1 - a * a
    if act == 1:
        return 1 if a > 0 else 0
    if act == 2:
        return a * (1 - a)
    return 1


def make(ft):
    """The kernels for float type ``ft`` (numba.float32 or numba.float64), as a dict."""

    @cuda.jit
    def gemm(A, B, C, ta, tb, step, accumulate):
        """C[i, j] (+)= sum_k op(A)[i, k] op(B)[k, j], op = transpose when ta / tb is 1.
        With step > 0 the k-sum is taken step by step (k in blocks of ``step`` rows, each block's
        sum added to the total), the summation structure of Eq. (15)'s sum over steps of
        per-step batch sums.  Blocks of (TILE, TILE) threads, one C tile each."""
        sA = cuda.shared.array((TILE, TILE), ft)
        sB = cuda.shared.array((TILE, TILE), ft)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        i = cuda.blockIdx.y * TILE + ty
        j = cuda.blockIdx.x * TILE + tx
        M = A.shape[1] if ta else A.shape[0]
        K = A.shape[0] if ta else A.shape[1]
        N = B.shape[0] if tb else B.shape[1]
        acc = ft(0)
        total = ft(0)
        for k0 in range(0, K, TILE):
            ka, kb = k0 + tx, k0 + ty
            if i < M and ka < K:
                sA[ty, tx] = A[ka, i] if ta else A[i, ka]
            else:
                sA[ty, tx] = 0
            if j < N and kb < K:
                sB[ty, tx] = B[j, kb] if tb else B[kb, j]
            else:
                sB[ty, tx] = 0
            cuda.syncthreads()
            for kk in range(TILE):
                if step > 0 and (k0 + kk) % step == 0 and k0 + kk > 0:
                    total += acc                          # end of one step's batch sum
                    acc = 0
                acc += sA[ty, kk] * sB[kk, tx]
            cuda.syncthreads()
        total += acc
        if i < M and j < N:
            if accumulate:
                C[i, j] += total
            else:
                C[i, j] = total

    @cuda.jit
    def add_bias(D, bias):
        """D[n, g] += bias[g] for every row n (grid-stride over the elements)."""
        N, G = D.shape
        start = cuda.grid(1)
        for e in range(start, N * G, cuda.gridsize(1)):
            D[e // G, e % G] += bias[e % G]

    @cuda.jit
    def gather_rows(table, idx, out):
        """out[n, :] = table[idx[n], :] (the embedding lookup e_t = E[x_t])."""
        N, C = out.shape
        start = cuda.grid(1)
        for e in range(start, N * C, cuda.gridsize(1)):
            out[e // C, e % C] = table[idx[e // C], e % C]

    @cuda.jit
    def scatter_add_rows(idx, src, dst):
        """dst[idx[n], :] += src[n, :] (atomically: tokens repeat)."""
        N, C = src.shape
        start = cuda.grid(1)
        for e in range(start, N * C, cuda.gridsize(1)):
            cuda.atomic.add(dst, (idx[e // C], e % C), src[e // C, e % C])

    @cuda.jit
    def forward_layer(kind, act, P, WhhT, Hs, Cs, TC):
        """One layer over T steps, one block per batch row; equals npbptt.cells.rnn_step /
        lstm_step step after step.  P (T, B, G*H) holds W_ih x_t + b on entry and the activations
        on exit; WhhT (H, G*H) = W_hh^T; Hs, Cs (T+1, B, H) with Hs[0], Cs[0] the entering state;
        TC (T, B, H) <- tanh(c_t).  (Layouts as in npbptt.kernels._cpu_jit.forward_rows.)"""
        b = cuda.blockIdx.x
        T = P.shape[0]
        H = Hs.shape[2]
        for t in range(T):
            for j in range(cuda.threadIdx.x, H, cuda.blockDim.x):
                if kind == 1:
                    ai, af = P[t, b, j], P[t, b, H + j]
                    ag, ao = P[t, b, 2 * H + j], P[t, b, 3 * H + j]
                    for k in range(H):                    # + W_hh h_{t-1}
                        hk = Hs[t, b, k]
                        ai += hk * WhhT[k, j]
                        af += hk * WhhT[k, H + j]
                        ag += hk * WhhT[k, 2 * H + j]
                        ao += hk * WhhT[k, 3 * H + j]
                    i, f, g, o = _sigmoid(ai), _sigmoid(af), math.tanh(ag), _sigmoid(ao)
                    c = i * g + f * Cs[t, b, j]           # c_t = i_t o z_t + f_t o c_{t-1}
                    tc = math.tanh(c)
                    P[t, b, j], P[t, b, H + j], P[t, b, 2 * H + j], P[t, b, 3 * H + j] = i, f, g, o
                    Cs[t + 1, b, j] = c
                    TC[t, b, j] = tc
                    Hs[t + 1, b, j] = o * tc              # h_t = o_t o tanh(c_t)
                else:
                    a = P[t, b, j]
                    for k in range(H):
                        a += Hs[t, b, k] * WhhT[k, j]
                    v = _activate(act, a)                 # h_t = rho(W_hh h_{t-1} + W_ih x_t + b)
                    P[t, b, j] = v
                    Hs[t + 1, b, j] = v
            cuda.syncthreads()                            # h_t complete before step t+1 reads it

    @cuda.jit
    def backward_layer(kind, act, D, Hs, Cs, TC, dHext, Whh, t_stop, sq, DHR, DCR):
        """Recursion (16) through one layer, one block per batch row, steps T-1 down to t_stop;
        equals npbptt.cells.rnn_step_vjp / lstm_step_vjp step after step.  D is overwritten by
        the pre-activation gradients da_t; DHR, DCR (B, H) are scratch for b's h and c parts;
        when sq has rows, sq[t-1, b] += ||b_{t-1}||^2 for t >= max(t_stop, 1).  (As
        npbptt.kernels._cpu_jit.backward_rows.)"""
        b = cuda.blockIdx.x
        T, GH = D.shape[0], D.shape[2]
        H = Hs.shape[2]
        want_sq = sq.shape[0] > 0
        for j in range(cuda.threadIdx.x, H, cuda.blockDim.x):
            DHR[b, j] = 0
            DCR[b, j] = 0
        for t in range(T - 1, t_stop - 1, -1):
            for j in range(cuda.threadIdx.x, H, cuda.blockDim.x):
                dh = DHR[b, j] + dHext[t, b, j]           # from step t+1 and from above
                if kind == 1:
                    i, f = D[t, b, j], D[t, b, H + j]
                    g, o = D[t, b, 2 * H + j], D[t, b, 3 * H + j]
                    tc = TC[t, b, j]
                    dc = DCR[b, j] + dh * o * (1 - tc * tc)   # through h_t = o_t tanh(c_t)
                    D[t, b, j] = dc * g * i * (1 - i)
                    D[t, b, H + j] = dc * Cs[t, b, j] * f * (1 - f)
                    D[t, b, 2 * H + j] = dc * i * (1 - g * g)
                    D[t, b, 3 * H + j] = dh * tc * o * (1 - o)
                    DCR[b, j] = dc * f                    # dc_{t-1} = dc_t f_t
                else:
                    D[t, b, j] = dh * _activate_grad(act, D[t, b, j])
            cuda.syncthreads()                            # da_t complete before the W_hh product
            if t > t_stop or want_sq:
                for j in range(cuda.threadIdx.x, H, cuda.blockDim.x):
                    s = ft(0)
                    for m in range(GH):                   # dh_{t-1} = da_t W_hh
                        s += D[t, b, m] * Whh[m, j]
                    DHR[b, j] = s
                    if want_sq and t >= 1:
                        v = s * s
                        if kind == 1:
                            v += DCR[b, j] * DCR[b, j]
                        cuda.atomic.add(sq, (t - 1, b), v)

    @cuda.jit
    def loss_rows(code, out, bias, yi, yf, scale, want_grad, ell):
        """npbptt.losses.cross_entropy (code 0) / mse (code 1) on the read-out, one block per row,
        fused with the gradient: out (N, O) holds h W_dec^T on entry (the bias is added here) and
        ``scale * d ell/d out`` on exit when ``want_grad``; ell (N,) <- per-example losses."""
        red = cuda.shared.array(LOSS_THREADS, ft)
        r = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        O = out.shape[1]
        for o in range(tid, O, LOSS_THREADS):
            out[r, o] += bias[o]
        cuda.syncthreads()
        if code == 0:
            m = out[r, 0]
            for o in range(tid, O, LOSS_THREADS):
                m = max(m, out[r, o])
            red[tid] = m
            cuda.syncthreads()
            w = LOSS_THREADS // 2
            while w > 0:
                if tid < w:
                    red[tid] = max(red[tid], red[tid + w])
                cuda.syncthreads()
                w //= 2
            m = red[0]
            cuda.syncthreads()
            s = ft(0)
            for o in range(tid, O, LOSS_THREADS):
                s += math.exp(out[r, o] - m)
            red[tid] = s
            cuda.syncthreads()
            w = LOSS_THREADS // 2
            while w > 0:
                if tid < w:
                    red[tid] += red[tid + w]
                cuda.syncthreads()
                w //= 2
            se = red[0]
            y = yi[r]
            if tid == 0:
                ell[r] = math.log(se) - (out[r, y] - m)   # logsumexp(z) - z_y
            cuda.syncthreads()
            if want_grad:
                for o in range(tid, O, LOSS_THREADS):     # softmax - onehot, then scaled
                    v = math.exp(out[r, o] - m) / se
                    if o == y:
                        v -= 1
                    out[r, o] = v * scale
        else:
            s = ft(0)
            for o in range(tid, O, LOSS_THREADS):
                d = out[r, o] - yf[r, o]
                s += d * d
            red[tid] = s
            cuda.syncthreads()
            w = LOSS_THREADS // 2
            while w > 0:
                if tid < w:
                    red[tid] += red[tid + w]
                cuda.syncthreads()
                w //= 2
            if tid == 0:
                ell[r] = red[0] / O                      # mean_o (out - y)^2
            if want_grad:
                two = 2 * scale / O
                for o in range(tid, O, LOSS_THREADS):
                    out[r, o] = two * (out[r, o] - yf[r, o])

    return dict(gemm=gemm, add_bias=add_bias, gather_rows=gather_rows,
                scatter_add_rows=scatter_add_rows, forward_layer=forward_layer,
                backward_layer=backward_layer, loss_rows=loss_rows)


KERNELS = {"float64": make(float64), "float32": make(float32)}
