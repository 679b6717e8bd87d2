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

__all__ = ["SIM", "TILE", "BM", "LOSS_THREADS", "make", "block_threads"]

SIM = bool(config.ENABLE_CUDASIM)
TILE = 2 if SIM else 16              # GEMM: threads per block edge (TILE * TILE threads)
R = 2 if SIM else 4                  # GEMM: rows and columns of C per thread
BM = TILE * R                        # GEMM: a block's tile of C is (BM, BM)
BMP = BM + 1                         # GEMM: shared-memory row length (one column of padding)
KT = 4 if SIM else 16                # GEMM: the k-slab staged in shared memory
LOSS_THREADS = 4 if SIM else 128     # threads per read-out row in the loss kernel (power of 2)
_MAX_LAYER_THREADS = 4 if SIM else 256


def block_threads(H):
    """Threads per block of the recurrence kernels: one per hidden unit, at most a few hundred
    (each thread then takes units j, j + blockDim, ...)."""
    return max(1, min(H, _MAX_LAYER_THREADS))


def make(ft):
    """The kernels for float type ``ft`` (numba.float32 or numba.float64), as a dict.  Every
    constant is an ``ft``: a bare Python ``1`` or ``0`` would promote float32 arithmetic to float64
    (numba types int64 + float32 as float64), and the float32 kernels would then compute, slower,
    something other than the float32 reference."""
    zero, one = ft(0), ft(1)

    @cuda.jit(device=True)
    def _sigmoid(z):
        """As npbptt.cells.sigmoid: 1/(1+e^-z), or e^z/(1+e^z) for z < 0."""
        if z >= zero:
            return one / (one + math.exp(-z))
        e = math.exp(z)
        return e / (one + e)

    @cuda.jit(device=True)
    def _activate(act, z):
        """rho(z) of the simple RNN for code ``act`` (0 tanh, 1 relu, 2 sigmoid, 3 linear)."""
        if act == 0:
            return math.tanh(z)
        if act == 1:
            return max(z, zero)
        if act == 2:
            return _sigmoid(z)
        return z

    @cuda.jit(device=True)
    def _activate_grad(act, a):
        """rho'(z) in terms of the output a = rho(z) (npbptt.cells.ACTIVATIONS)."""
        if act == 0:
            return one - a * a
        if act == 1:
            return one if a > zero else zero
        if act == 2:
            return a * (one - a)
        return one

    @cuda.jit
    def gemm(A, B, C, ta, tb, step, accumulate):
        """C[i, j] (+)= sum_k op(A)[i, k] op(B)[k, j], op = transpose when ta / tb is 1.
        With step > 0 the k-sum is taken step by step (k in blocks of ``step`` rows, each block's
        sum added to the total), the summation structure of Eq. (15)'s sum over steps of
        per-step batch sums.  Each element's k-sum runs in order k = 0, 1, ..., whatever the
        tiling.  Blocks of (TILE, TILE) threads compute a (BM, BM) tile of C, each thread R x R
        elements (rows ty + TILE r, columns tx + TILE c: neighbouring threads read neighbouring
        shared-memory words), over k-slabs of KT staged in shared memory (one padding column
        against bank conflicts when a slab is stored across its rows)."""
        sA = cuda.shared.array((KT, BMP), ft)          # sA[kk, r] = op(A)[i0 + r, k0 + kk]
        sB = cuda.shared.array((KT, BMP), ft)          # sB[kk, c] = op(B)[k0 + kk, j0 + c]
        acc = cuda.local.array((R, R), ft)
        tot = cuda.local.array((R, R), ft)
        bfr = cuda.local.array(R, ft)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * TILE + tx
        i0 = cuda.blockIdx.y * BM
        j0 = cuda.blockIdx.x * BM
        M = A.shape[1] if ta else A.shape[0]
        K = A.shape[0] if ta else A.shape[1]
        N = B.shape[0] if tb else B.shape[1]
        for r in range(R):
            for c in range(R):
                acc[r, c] = zero
                tot[r, c] = zero
        nxt = step if step > 0 else K + 1                 # the next step boundary in k
        for k0 in range(0, K, KT):
            for e in range(tid, KT * BM, TILE * TILE):    # stage the slabs, reading along rows
                if ta:                                    # A is (K, M)
                    kk, r = e // BM, e % BM
                else:                                     # A is (M, K)
                    r, kk = e // KT, e % KT
                v = zero
                if i0 + r < M and k0 + kk < K:
                    v = A[k0 + kk, i0 + r] if ta else A[i0 + r, k0 + kk]
                sA[kk, r] = v
                if tb:                                    # B is (N, K)
                    c, kk = e // KT, e % KT
                else:                                     # B is (K, N)
                    kk, c = e // BM, e % BM
                v = zero
                if j0 + c < N and k0 + kk < K:
                    v = B[j0 + c, k0 + kk] if tb else B[k0 + kk, j0 + c]
                sB[kk, c] = v
            cuda.syncthreads()
            for kk in range(min(KT, K - k0)):
                if k0 + kk == nxt:                        # end of one step's batch sum
                    for r in range(R):
                        for c in range(R):
                            tot[r, c] += acc[r, c]
                            acc[r, c] = zero
                    nxt += step
                for c in range(R):
                    bfr[c] = sB[kk, tx + TILE * c]
                for r in range(R):
                    a = sA[kk, ty + TILE * r]
                    for c in range(R):
                        acc[r, c] += a * bfr[c]
            cuda.syncthreads()
        for r in range(R):
            i = i0 + ty + TILE * r
            for c in range(R):
                j = j0 + tx + TILE * c
                if i < M and j < N:
                    v = tot[r, c] + acc[r, c]
                    if accumulate:
                        C[i, j] += v
                    else:
                        C[i, j] = v

    @cuda.jit
    def fill(F, value):
        """F[:] = value (F flat; grid-stride)."""
        start = cuda.grid(1)
        for e in range(start, F.shape[0], cuda.gridsize(1)):
            F[e] = value

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
    def forward_layer(kind, act, P, WhhT, h0, c0, Hs, Cs, TC):
        """One layer over T steps, one block per batch row; equals npbptt.cells.rnn_step /
        lstm_step step after step.  P (T, B, G*H) holds W_ih x_t + b on entry and the activations
        on exit; WhhT (H, G*H) = W_hh^T; h0, c0 (B, H) the entering state (c0 LSTM only), copied
        to Hs[0], Cs[0] of Hs, Cs (T+1, B, H); TC (T, B, H) <- tanh(c_t).  (Layouts as in
        npbptt.kernels._cpu_jit.forward_rows.)"""
        b = cuda.blockIdx.x
        T = P.shape[0]
        H = Hs.shape[2]
        for j in range(cuda.threadIdx.x, H, cuda.blockDim.x):
            Hs[0, b, j] = h0[b, j]
            if kind == 1:
                Cs[0, b, j] = c0[b, j]
        cuda.syncthreads()
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
            DHR[b, j] = zero
            DCR[b, j] = zero
        for t in range(T - 1, t_stop - 1, -1):
            for j in range(cuda.threadIdx.x, H, cuda.blockDim.x):
                dh = DHR[b, j] + dHext[t, b, j]           # from step t+1 and from above
                if kind == 1:
                    i, f = D[t, b, j], D[t, b, H + j]
                    g, o = D[t, b, 2 * H + j], D[t, b, 3 * H + j]
                    tc = TC[t, b, j]
                    dc = DCR[b, j] + dh * o * (one - tc * tc)   # through h_t = o_t tanh(c_t)
                    D[t, b, j] = dc * g * i * (one - i)
                    D[t, b, H + j] = dc * Cs[t, b, j] * f * (one - f)
                    D[t, b, 2 * H + j] = dc * i * (one - g * g)
                    D[t, b, 3 * H + j] = dh * tc * o * (one - o)
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
                        v -= one
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
                ell[r] = red[0] / ft(O)                     # mean_o (out - y)^2
            if want_grad:
                two = ft(2) * scale / ft(O)
                for o in range(tid, O, LOSS_THREADS):
                    out[r, o] = two * (out[r, o] - yf[r, o])

    return dict(gemm=gemm, fill=fill, add_bias=add_bias, gather_rows=gather_rows,
                scatter_add_rows=scatter_add_rows, forward_layer=forward_layer,
                backward_layer=backward_layer, loss_rows=loss_rows)


KERNELS = {"float64": make(float64), "float32": make(float32)}
