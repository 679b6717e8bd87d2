"""The ``numba.cuda`` kernels behind :mod:`npbptt.kernels.gpu` (private).

The work is laid out as on the CPU (see :mod:`npbptt.kernels.cpu`): a layer at a time over the
whole chunk, the input projections and weight gradients as GEMMs, and only the recurrence
sequential.  The recurrence runs either in one launch per layer, each batch example in its own
thread block for the whole sweep (the examples never interact, so a ``syncthreads`` per step
suffices: ``forward_layer``, ``backward_layer``), or, for large H, in one launch per step over
every example at once (``forward_step``, ``backward_step``: W_hh is then read once per step
rather than once per example and step), with the same arithmetic in the same order.

Kernels specialise on the float type through :func:`make` (shared-memory arrays need a constant
dtype).  Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the tiles and blocks are small,
since every simulated thread is a Python thread.
"""
import math

from numba import config, cuda, float32, float64

__all__ = ["SIM", "TILE", "BM", "SJ", "SB", "LOSS_THREADS", "make", "block_threads"]

SIM = bool(config.ENABLE_CUDASIM)
TILE = 2 if SIM else 16              # GEMM: threads per block edge (TILE * TILE threads)
R = 2 if SIM else 4                  # GEMM: rows and columns of C per thread
BM = TILE * R                        # GEMM: a block's tile of C is (BM, BM)
BMP = BM + 1                         # GEMM: shared-memory row length (one column of padding)
KT = 4 if SIM else 16                # GEMM: the k-slab staged in shared memory
SJ = 2 if SIM else 16                # step kernels: units per block (threads along x)
SB = 2 if SIM else 16                # step kernels: batch rows per block (threads along y)
SKT = 3 if SIM else 16               # step kernels: the k-slab staged in shared memory
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

    @cuda.jit(device=True)
    def _slab_element(X, k_rows, e, k0, kz1, o0, n_o):
        """Element e of a GEMM operand's k-slab, staged by :func:`gemm`'s threads so that
        consecutive e read along X's rows: (kk, o, X[k0 + kk, o0 + o]) when ``k_rows`` (X is
        (K, n_o)), else (kk, o, X[o0 + o, k0 + kk]) (X is (n_o, K)); the value is 0 outside X
        or from k = kz1 on."""
        if k_rows:
            kk, o = e // BM, e % BM
        else:
            o, kk = e // KT, e % KT
        v = zero
        if o0 + o < n_o and k0 + kk < kz1:
            v = X[k0 + kk, o0 + o] if k_rows else X[o0 + o, k0 + kk]
        return kk, o, v

    @cuda.jit
    def gemm(A, B, C, Pk, ta, tb, step, accumulate, per):
        """C[i, j] (+)= sum_k op(A)[i, k] op(B)[k, j], op = transpose when ta / tb is 1.
        With step > 0 the k-sum is taken step by step (k in blocks of ``step`` rows, each block's
        sum added to the total), the summation structure of Eq. (15)'s sum over steps of
        per-step batch sums.  Each element's k-sum runs in order k = 0, 1, ..., whatever the
        tiling.  Blocks of (TILE, TILE) threads compute a (BM, BM) tile of C, each thread R x R
        elements (rows ty + TILE r, columns tx + TILE c: neighbouring threads read neighbouring
        shared-memory words), over k-slabs of KT staged in shared memory (one padding column
        against bank conflicts when a slab is stored across its rows).  When Pk has rows, block z
        (grid z) sums k in [z per, (z+1) per) only, per a multiple of step, into Pk[z] (a split
        sum, added by sum_splits); else per >= K and C is written."""
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
        kz0 = cuda.blockIdx.z * per
        kz1 = min(K, kz0 + per)
        nxt = kz0 + step if step > 0 else K + 1           # the next step boundary in k
        for k0 in range(kz0, kz1, KT):
            for e in range(tid, KT * BM, TILE * TILE):    # stage the slabs, reading along rows
                kk, r, v = _slab_element(A, ta, e, k0, kz1, i0, M)       # A: (K, M) if ta, else (M, K)
                sA[kk, r] = v
                kk, c, v = _slab_element(B, not tb, e, k0, kz1, j0, N)   # B: (N, K) if tb, else (K, N)
                sB[kk, c] = v
            cuda.syncthreads()
            for kk in range(min(KT, kz1 - k0)):
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
                    if Pk.shape[0] > 0:
                        Pk[cuda.blockIdx.z, i, j] = v
                    elif accumulate:
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

    @cuda.jit(device=True)
    def _cell_forward(kind, act, P, Hs, Cs, TC, t, b, j, H, ai, af, ag, ao, c_prev):
        """Step t's cell for unit j of row b from its pre-activations (ai alone for the simple
        RNN): the activations into P[t, b], c_t, tanh(c_t) and h_t into Cs[t+1], TC[t], Hs[t+1]
        (npbptt.cells.lstm_step / rnn_step)."""
        if kind == 1:
            i, f, g, o = _sigmoid(ai), _sigmoid(af), math.tanh(ag), _sigmoid(ao)
            c = i * g + f * c_prev                        # c_t = i_t o z_t + f_t o c_{t-1}
            tc = math.tanh(c)
            P[t, b, j], P[t, b, H + j], P[t, b, 2 * H + j], P[t, b, 3 * H + j] = i, f, g, o
            Cs[t + 1, b, j] = c
            TC[t, b, j] = tc
            Hs[t + 1, b, j] = o * tc                      # h_t = o_t o tanh(c_t)
        else:
            v = _activate(act, ai)                        # h_t = rho(W_hh h_{t-1} + W_ih x_t + b)
            P[t, b, j] = v
            Hs[t + 1, b, j] = v

    @cuda.jit(device=True)
    def _cell_backward(kind, act, D, Cs, TC, DCR, t, b, j, H, dh):
        """Step t's pre-activation gradients da_t of unit j of row b into D[t, b] (which holds the
        activations), given dh = dL/dh_t, and dc_{t-1} = dc_t f_t into DCR[b, j] (which holds
        dc_t's part from step t+1) (npbptt.cells.lstm_step_vjp / rnn_step_vjp)."""
        if kind == 1:
            i, f = D[t, b, j], D[t, b, H + j]
            g, o = D[t, b, 2 * H + j], D[t, b, 3 * H + j]
            tc = TC[t, b, j]
            dc = DCR[b, j] + dh * o * (one - tc * tc)     # through h_t = o_t tanh(c_t)
            D[t, b, j] = dc * g * i * (one - i)
            D[t, b, H + j] = dc * Cs[t, b, j] * f * (one - f)
            D[t, b, 2 * H + j] = dc * i * (one - g * g)
            D[t, b, 3 * H + j] = dh * tc * o * (one - o)
            DCR[b, j] = dc * f                            # dc_{t-1} = dc_t f_t
        else:
            D[t, b, j] = dh * _activate_grad(act, D[t, b, j])

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
                ai, af, ag, ao, c_prev = P[t, b, j], zero, zero, zero, zero
                if kind == 1:
                    af, ag, ao = P[t, b, H + j], P[t, b, 2 * H + j], P[t, b, 3 * H + j]
                    c_prev = Cs[t, b, j]
                for k in range(H):                        # + W_hh h_{t-1}, k ascending
                    hk = Hs[t, b, k]
                    ai += hk * WhhT[k, j]
                    if kind == 1:
                        af += hk * WhhT[k, H + j]
                        ag += hk * WhhT[k, 2 * H + j]
                        ao += hk * WhhT[k, 3 * H + j]
                _cell_forward(kind, act, P, Hs, Cs, TC, t, b, j, H, ai, af, ag, ao, c_prev)
            cuda.syncthreads()                            # h_t complete before step t+1 reads it

    @cuda.jit
    def forward_step(kind, act, P, WhhT, h0, c0, Hs, Cs, TC, t):
        """Step t of one layer for every row at once (large H: forward_layer's one block per row
        would stream all of W_hh from L2 once per row and step), the same arithmetic in the same
        order.  Arguments as forward_layer's; at t = 0 h_{-1}, c_{-1} are read from h0, c0 and
        copied to Hs[0], Cs[0].  Blocks of (SJ, SB) threads, unit j0 + tx of row b0 + ty, over
        k-slabs of h_{t-1} and of the unit's gate columns of W_hh^T staged in shared memory."""
        sh = cuda.shared.array((SKT, SB), ft)             # sh[kk, r] = h_{t-1}[b0 + r, k0 + kk]
        sw = cuda.shared.array((4, SKT, SJ), ft)          # sw[g, kk, c] = WhhT[k0 + kk, g H + j0 + c]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * SJ + tx
        j0, b0 = cuda.blockIdx.x * SJ, cuda.blockIdx.y * SB
        j, b = j0 + tx, b0 + ty
        B, H = P.shape[1], Hs.shape[2]
        G = 4 if kind == 1 else 1
        inside = b < B and j < H
        ai, af, ag, ao, c_prev = zero, zero, zero, zero, zero
        if inside:
            ai = P[t, b, j]
            if kind == 1:
                af, ag, ao = P[t, b, H + j], P[t, b, 2 * H + j], P[t, b, 3 * H + j]
                c_prev = c0[b, j] if t == 0 else Cs[t, b, j]
        for k0 in range(0, H, SKT):
            for e in range(tid, SKT * SB, SJ * SB):
                r, kk = e // SKT, e % SKT
                v = zero
                if b0 + r < B and k0 + kk < H:
                    v = h0[b0 + r, k0 + kk] if t == 0 else Hs[t, b0 + r, k0 + kk]
                sh[kk, r] = v
            for e in range(tid, G * SKT * SJ, SJ * SB):
                g, kk, c = e // (SKT * SJ), (e // SJ) % SKT, e % SJ
                v = zero
                if k0 + kk < H and j0 + c < H:
                    v = WhhT[k0 + kk, g * H + j0 + c]
                sw[g, kk, c] = v
            cuda.syncthreads()
            for kk in range(min(SKT, H - k0)):            # + W_hh h_{t-1}, k ascending
                hk = sh[kk, ty]
                ai += hk * sw[0, kk, tx]
                if kind == 1:
                    af += hk * sw[1, kk, tx]
                    ag += hk * sw[2, kk, tx]
                    ao += hk * sw[3, kk, tx]
            cuda.syncthreads()
        if inside:
            if t == 0:
                Hs[0, b, j] = h0[b, j]
                if kind == 1:
                    Cs[0, b, j] = c0[b, j]
            _cell_forward(kind, act, P, Hs, Cs, TC, t, b, j, H, ai, af, ag, ao, c_prev)

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
                # dh_t from step t+1 and from above
                _cell_backward(kind, act, D, Cs, TC, DCR, t, b, j, H, DHR[b, j] + dHext[t, b, j])
            cuda.syncthreads()                            # da_t complete before the W_hh product
            if t > t_stop or want_sq:
                for j in range(cuda.threadIdx.x, H, cuda.blockDim.x):
                    s = zero
                    for m in range(GH):                   # dh_{t-1} = da_t W_hh
                        s += D[t, b, m] * Whh[m, j]
                    DHR[b, j] = s
                    if want_sq and t >= 1:
                        v = s * s
                        if kind == 1:
                            v += DCR[b, j] * DCR[b, j]
                        cuda.atomic.add(sq, (t - 1, b), v)

    @cuda.jit
    def backward_step(kind, act, D, Cs, TC, dHext, Whh, DCR, sq, t, da):
        """Step t of recursion (16) for every row at once (large H; as backward_layer, the same
        arithmetic in the same order): the recurrent part of dh_t, s = da_{t+1} W_hh (zero at
        t = T-1), then, when sq has rows and t < T-1, sq[t, b] += ||(s, dc_t)||^2, and, when
        ``da``, da_t into D[t] and dc_{t-1} into DCR (zeroed before t = T-1).  With ``da`` off it
        is the product and sq only (step t_stop - 1 of the probe).  Blocks of (SJ, SB) threads,
        unit j0 + tx of row b0 + ty, over slabs of da_{t+1} and W_hh staged in shared memory."""
        sd = cuda.shared.array((SKT, SB), ft)             # sd[kk, r] = da_{t+1}[b0 + r, m0 + kk]
        sw = cuda.shared.array((SKT, SJ), ft)             # sw[kk, c] = W_hh[m0 + kk, j0 + c]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        tid = ty * SJ + tx
        j0, b0 = cuda.blockIdx.x * SJ, cuda.blockIdx.y * SB
        j, b = j0 + tx, b0 + ty
        T, B, GH = D.shape[0], D.shape[1], D.shape[2]
        H = Cs.shape[2] if kind == 1 else GH
        s = zero
        if t + 1 < T:
            for m0 in range(0, GH, SKT):
                for e in range(tid, SKT * SB, SJ * SB):
                    r, kk = e // SKT, e % SKT
                    v = zero
                    if b0 + r < B and m0 + kk < GH:
                        v = D[t + 1, b0 + r, m0 + kk]
                    sd[kk, r] = v
                for e in range(tid, SKT * SJ, SJ * SB):
                    kk, c = e // SJ, e % SJ
                    v = zero
                    if m0 + kk < GH and j0 + c < H:
                        v = Whh[m0 + kk, j0 + c]
                    sw[kk, c] = v
                cuda.syncthreads()
                for kk in range(min(SKT, GH - m0)):       # dh_t = da_{t+1} W_hh, m ascending
                    s += sd[kk, ty] * sw[kk, tx]
                cuda.syncthreads()
        if b < B and j < H:
            if sq.shape[0] > 0 and t + 1 < T:
                v = s * s
                if kind == 1:
                    v += DCR[b, j] * DCR[b, j]
                cuda.atomic.add(sq, (t, b), v)
            if da:
                _cell_backward(kind, act, D, Cs, TC, DCR, t, b, j, H, s + dHext[t, b, j])

    @cuda.jit
    def sum_splits(Pk, C, accumulate):
        """C (+)= sum over z of Pk[z] (z ascending), the partial k-sums of a split GEMM."""
        Z, M, N = Pk.shape
        start = cuda.grid(1)
        for e in range(start, M * N, cuda.gridsize(1)):
            i, j = e // N, e % N
            v = Pk[0, i, j]
            for z in range(1, Z):
                v += Pk[z, i, j]
            if accumulate:
                C[i, j] += v
            else:
                C[i, j] = v

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
                forward_step=forward_step, backward_step=backward_step, sum_splits=sum_splits,
                backward_layer=backward_layer, loss_rows=loss_rows)


KERNELS = {"float64": make(float64), "float32": make(float32)}
