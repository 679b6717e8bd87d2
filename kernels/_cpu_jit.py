"""The jitted CPU code behind :mod:`npbptt.kernels.cpu` (private).

Everything numba compiles for the CPU lives in this one file, so that numba's on-disk cache
(``cache=True``, keyed on this file) is invalidated by any change to it.

Two paths, chosen per network by ``npbptt.kernels.cpu._small_path``:

* small networks (every layer's W_ih and W_hh within 256 KiB: the copy task's, the probe's) run a
  chunk of batch rows through two kernel calls, feature-major (per-step quantities stored
  transposed, units by rows, so that each gate's block is one long vectorised loop):
  :func:`small_forward` -- every layer over every step, the input projection W_ih x_t formed
  step by step while the step's rows are in cache, the read-out's logits and the chunk's rows
  of the final state;
  :func:`small_backward` -- the read-out's losses and their gradients (:func:`_loss_rows`), then
  recursion (16) down every layer with the weight gradients of Eq. (15) and the input
  gradients, step by step; in the calling thread's chunk, once the other chunks are done, the
  sum of every chunk's gradients and losses (:func:`_gather`);
* large layers run one layer at a time over a whole chunk of T steps, so that the input
  projections ``W_ih x_t + b`` of all steps and the weight gradients of all steps are GEMMs done
  by the caller in NumPy; only the recurrence itself is sequential and lives here:
  :func:`forward_rows` (h_t = H(h_{t-1}, x_t) for rows r0:r1, the cells of §2,
  ``npbptt.cells.rnn_step`` / ``lstm_step``) and :func:`backward_rows` (recursion (16) restricted
  to one layer: the pre-activation gradients da_t, ``npbptt.cells.rnn_step_vjp`` /
  ``lstm_step_vjp``, and for the probe of Eq. (18) the squared norms of the state gradients b_k);
  :func:`loss_rows` -- the read-out losses of ``npbptt.losses`` and their gradients, fused.

Every kernel releases the GIL (``nogil``): the examples of a batch never interact, so the caller
runs chunks of rows on several threads for a whole sweep.

Activations are passed as int codes (``ACT``) and the cell kind as ``kind`` (0 RNN, 1 LSTM), so
each kernel is compiled once per float type.  exp, sigmoid and tanh use the vectorisable
implementations below (numba has no vector libm without Intel's SVML): float64 to 1-3 ulp; for
float32, exp and tanh are evaluated in float64 and rounded once (within about half an ulp; tanh
as a rational function, :func:`_tanh32`), sigmoid
in float32 lanes, twice as many per instruction (within 2.5 ulp, RMS 0.51; the reference's
float32 sigmoid: 3.5 ulp, RMS 0.59).

Speed rules for every inner loop here: it touches at most four arrays, through separate views
(offsets into one array, ``a[3 * n + k]``, keep LLVM from vectorising), and holds no running sum,
so that LLVM vectorises it (more arrays need more run-time overlap checks than LLVM allows, and a
floating-point running sum cannot be reordered; either keeps the loop scalar, 3-5x slower).
Reductions use several interleaved partial sums in float64 instead (``_sum64``, ``_max4``).
A kernel calls no other jitted kernel of this file's entry points: numba re-optimises a callee
as part of every caller (2 s of compile time per float type for a driver of the small path's
kernels; 1.5 s for loading a chunk's inputs inside small_forward instead of in NumPy).
"""
import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

__all__ = ["ACT", "RNN", "LSTM", "XENT", "MSE", "forward_rows", "backward_rows", "loss_rows",
           "small_forward", "small_backward", "gather", "scatter_add_rows", "wait_flags"]

ACT = {"tanh": 0, "relu": 1, "sigmoid": 2, "linear": 3}
RNN, LSTM = 0, 1
XENT, MSE = 0, 1

_JIT = dict(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
_NOCACHE = {k: v for k, v in _JIT.items() if k != "cache"}   # helpers: compiled inside callers


# --- vectorisable elementary functions ---------------------------------------------------------
@intrinsic
def _pow2(typingctx, n):
    """2**n for a float n holding an integer in the normal exponent range (same float type),
    built from the exponent bits so that loops calling it vectorise."""
    if not isinstance(n, types.Float):
        return None

    def codegen(context, builder, signature, args):
        it = ir.IntType(n.bitwidth)
        bias, shift = (1023, 52) if n.bitwidth == 64 else (127, 23)
        i = builder.add(builder.fptosi(args[0], it), ir.Constant(it, bias))
        return builder.bitcast(builder.shl(i, ir.Constant(it, shift)), context.get_value_type(n))

    return n(n), codegen


# Cody-Waite split of ln 2 (n * _LN2HI is exact for the exponents used) and the smallest
# argument whose exponential is a normal double.
_LOG2E, _LN2HI, _LN2LO, _VMIN = 1.4426950408889634, 0.693147180369123816490, 1.90821492927058770002e-10, -708.0
_ELEM = dict(error_model="numpy", fastmath={"contract"})


def _taylor(deg):
    """Coefficients c_0..c_{deg-1} of (e^r - 1)/r = sum_k c_k r^k cut after degree deg - 1 (so that
    e^r - 1 = r q(r) has degree ``deg``): c_k = 1/(k+1)!; remainder of e^r - 1 on |r| <= ln(2)/2
    below 0.35^(deg+1)/(deg+1)!."""
    return tuple(1.0 / math.factorial(k) for k in range(1, deg + 1))


# (e^r - 1)/r on |r| <= ln(2)/2 to float64 accuracy with degree 10 (e^r - 1 of degree 11): the
# near-minimax polynomial of Chebyshev interpolation (mpmath.chebyfit at 50 digits, coefficients
# rounded to float64): relative error 2.4e-17, a ninth of float64's epsilon, where the Taylor
# polynomial needs degree 13 for 5e-18 (two more multiply-adds per exponential: ~7% of a float64
# sigma or tanh).
_EXPM1_64 = (1.0, 0.5000000000000006, 0.1666666666666667, 0.04166666666657314,
             0.008333333333326141, 0.0013888888932488599, 0.00019841269874800493,
             2.4801504346997686e-05, 2.7557255425746435e-06, 2.7626357241447223e-07,
             2.510520637395701e-08)


def _make_exp_neg(C):
    """exp(v) for v <= 0 in float64 arithmetic (0 below the smallest normal double), with e^r - 1
    on |r| <= ln(2)/2 as r q(r), q's coefficients ``C`` (_EXPM1_64 for float64 results, the
    Taylor polynomial of degree 8 for results rounded to float32)."""
    nc = len(C)

    @njit(**_ELEM)
    def exp_neg(v):
        w = max(v, _VMIN)
        n = np.floor(w * _LOG2E + 0.5)
        r = (w - n * _LN2HI) - n * _LN2LO
        q = C[nc - 1]
        for k in range(nc - 2, -1, -1):
            q = q * r + C[k]
        return (q * r + 1.0) * _pow2(n) if v >= _VMIN else 0.0

    return exp_neg


_EXP64, _EXP32 = _make_exp_neg(_EXPM1_64), _make_exp_neg(_taylor(8))


def _make_gate_fn(f, coeffs, ln2hi, ln2lo, vmin):
    """sigma(z), or tanh(z) when ``is_tanh``, in the arithmetic of float type ``f`` (float32 lanes
    are twice as many as float64's: a float32 LSTM's gates cost half as much).  One formula for
    both, from m = expm1(-w) and e = exp(-w), w = |z| (sigma) or 2|z| (tanh):
        sigma(z) = 1/(1+e) for z >= 0, e/(1+e) for z < 0;   tanh(z) = -m/(1+e) sign(z),
    with e^r - 1 on |r| <= ln(2)/2 as r q(r), q's coefficients ``coeffs``, and a Cody-Waite
    split ln2hi + ln2lo of ln 2; exp(-w) is taken as 0 below exp(vmin), the smallest normal
    number.  Relatively accurate near 0 (m is exact there), no overflow; within 3 ulp of the true
    values (tests/test_kernels.py; measured over 3e7 arguments: float64 sigma 2.4, tanh 2.9 ulp
    (2.9 with the Taylor polynomial of degree 13 as well); float32 2.1-2.4 ulp, where NumPy's
    float32 sigmoid and tanh are within 3.2 and 1.4)."""
    C = tuple(f(c) for c in coeffs)
    log2e, ln2hi, ln2lo, vmin = f(_LOG2E), f(ln2hi), f(ln2lo), f(vmin)
    half, one, nc = f(0.5), f(1), len(C)

    @njit(**_ELEM)
    def gate(z, is_tanh):
        w = abs(z + z if is_tanh else z)
        v = max(-w, vmin)
        zero = v > -w                         # exp(-w) below the normal range: taken as 0
        n = np.floor(v * log2e + half)
        r = (v - n * ln2hi) - n * ln2lo
        q = C[nc - 1]
        for k in range(nc - 2, -1, -1):
            q = q * r + C[k]
        q = q * r                             # e^r - 1
        s = _pow2(n)
        e = s * q + s if not zero else one - one              # exp(-w)
        m = s * q + (s - one) if not zero else -one           # expm1(-w), exact near w = 0
        if is_tanh:
            num = -m if z >= 0 else m
        else:
            num = one if z >= 0 else e
        return num / (one + e)

    return gate


_gate64 = _make_gate_fn(np.float64, _EXPM1_64, _LN2HI, _LN2LO, _VMIN)
_gate32 = _make_gate_fn(np.float32, _taylor(7), 0.693359375, -2.12194440e-4, -87.0)
# float32 tanh: x P(x^2) / Q(x^2) in float64, |x| clamped to 9.1 (beyond it tanh rounds to +-1 in
# float32), rounded once.  P and Q of degree 5 (Q(0) = 1) minimise the relative error on (0, 9.1]
# (linearised least squares on 6000 Chebyshev points, reweighted by 1/Q ten times; coefficients
# rounded to float64): max relative error 4.4e-11 on a grid of 4e6 points, far below float32's
# half ulp (3e-8); over every 16th float32 in [1e-7, 9.1], max 0.5007 ulp, RMS 0.22 ulp.  Cheaper
# than the exponential form in float64 (2.6 against 3.8 cycles an element here: no range
# reduction, one division).  In float32 lanes tanh was within 2.5 ulp, RMS 0.60 ulp against
# NumPy's 0.46, and through an exploding tanh RNN that extra error compounded past twice the
# float32 reference's error (hypothesis found it in the probe).  sigma stays in float32 lanes:
# RMS 0.51 ulp, the reference's 0.59.
_TANH32_X = 9.1
_TANH32_P = (0.9999999999854043, 0.14098105814652606, 0.00442446328379954, 4.2234181427239974e-05,
             1.1093454248821818e-07, 3.658041041473105e-11)
_TANH32_Q = (1.0, 0.47431439118916197, 0.029195927616894858, 0.0005005446858021627,
             2.6000780200789708e-06, 2.9418571719094906e-09)


@njit(**_ELEM)
def _tanh32(z):
    """tanh of a float32 z (see _TANH32_P); NaN for NaN."""
    p0, p1, p2, p3, p4, p5 = _TANH32_P
    q0, q1, q2, q3, q4, q5 = _TANH32_Q
    x = np.float64(z)
    x = math.copysign(_TANH32_X, x) if abs(x) > _TANH32_X else x
    u = x * x
    num = x * (((((p5 * u + p4) * u + p3) * u + p2) * u + p1) * u + p0)
    den = ((((q5 * u + q4) * u + q3) * u + q2) * u + q1) * u + q0
    return np.float32(num / den)


def exp_neg(v):
    raise NotImplementedError


@overload(exp_neg, jit_options=_ELEM)
def _exp_neg_ov(v):
    """e^v for v <= 0: float64 directly; float32 evaluated in float64 and rounded once (within
    about half an ulp, like a correctly rounded libm)."""
    if isinstance(v, types.Float) and v.bitwidth == 64:
        return lambda v: _EXP64(v)
    if isinstance(v, types.Float) and v.bitwidth == 32:
        return lambda v: np.float32(_EXP32(np.float64(v)))
    return None


def _gate(z, is_tanh):
    raise NotImplementedError


@overload(_gate, jit_options=_ELEM)
def _gate_ov(z, is_tanh):
    """sigma(z), or tanh(z) when ``is_tanh`` (:func:`_make_gate_fn`): float64 in float64; float32
    sigma in float32 lanes and float32 tanh in float64, rounded once (:func:`_tanh32`).  Behind
    every sigmoid and tanh of the kernels; called with a constant ``is_tanh`` (a flag varying per
    lane would evaluate both ways)."""
    if isinstance(z, types.Float) and z.bitwidth == 64:
        return lambda z, is_tanh: _gate64(z, is_tanh)
    if isinstance(z, types.Float) and z.bitwidth == 32:
        return lambda z, is_tanh: _tanh32(z) if is_tanh else _gate32(z, False)
    return None


@njit(inline="always", **_ELEM)
def sigmoid(z):
    """1/(1+e^-z), as npbptt.cells.sigmoid (no overflow)."""
    return _gate(z, False)


@njit(inline="always", **_ELEM)
def tanh(z):
    """tanh z, relatively accurate near 0 as well."""
    return _gate(z, True)


@njit(inline="always", **_NOCACHE)
def _activate(act, z):
    """rho(z) of the simple RNN (npbptt.cells.ACTIVATIONS) for code ``act``."""
    if act == 0:
        return tanh(z)
    if act == 1:
        return max(z, z - z)                 # np.maximum(z, 0), in z's type
    if act == 2:
        return sigmoid(z)
    return z


@njit(inline="always", **_NOCACHE)
def _activate_grad(act, a, one):
    """rho'(z) written in terms of the output a = rho(z) (npbptt.cells.ACTIVATIONS); ``one`` is
    1 in a's type."""
    if act == 0:
        return one - a * a
    if act == 1:
        return one if a > 0 else a - a
    if act == 2:
        return a * (one - a)
    return one


# --- reductions in float64 ---------------------------------------------------------------------
@njit(**_NOCACHE)
def _max4(v):
    """max(v) with four interleaved partial maxima (exact: max does not round)."""
    n = v.shape[0]
    m0 = m1 = m2 = m3 = v[0]
    for k in range(0, n - 3, 4):
        m0 = max(m0, v[k])
        m1 = max(m1, v[k + 1])
        m2 = max(m2, v[k + 2])
        m3 = max(m3, v[k + 3])
    for k in range(n - n % 4, n):
        m0 = max(m0, v[k])
    return max(max(m0, m1), max(m2, m3))


@njit(**_NOCACHE)
def _sum64(v, squares):
    """sum(v), or sum(v * v) when ``squares``, in float64 with four interleaved partial sums (a
    single running sum is bound by the latency of one addition per element)."""
    n = v.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    for k in range(0, n - 3, 4):
        a0, a1, a2, a3 = np.float64(v[k]), np.float64(v[k + 1]), np.float64(v[k + 2]), np.float64(v[k + 3])
        if squares:
            a0, a1, a2, a3 = a0 * a0, a1 * a1, a2 * a2, a3 * a3
        s0 += a0
        s1 += a1
        s2 += a2
        s3 += a3
    for k in range(n - n % 4, n):
        a0 = np.float64(v[k])
        s0 += a0 * a0 if squares else a0
    return (s0 + s1) + (s2 + s3)


# --- GEMM with accumulation -----------------------------------------------------------------------
_XXGEMM = {}


@njit(inline="always", **_NOCACHE)
def _ld(X):
    """BLAS's leading dimension of a row-major 2-D array whose rows are contiguous (a C-contiguous
    array or a block of its columns): the distance between rows, in elements."""
    return max(X.strides[0] // X.itemsize if X.shape[0] > 1 else X.shape[1], X.shape[1], 1)


def _mm(A, B, C, trans_a, trans_b, coef, accumulate):
    raise NotImplementedError


@overload(_mm, jit_options=_ELEM)
def _mm_ov(A, B, C, trans_a, trans_b, coef, accumulate):
    """C (M, N) <- op(A) @ op(B), or C += op(A) @ op(B) when ``accumulate`` (BLAS beta = 1: the
    product is formed and then added, the reference's ``C + A @ B``); op(A) = A (M, K), or A.T
    for A (K, M) when ``trans_a``; op(B) = B (K, N), or B.T for B (N, K) when ``trans_b``.  All
    three 2-D arrays of one float type with contiguous rows (C-contiguous, or a block of columns
    of a C-contiguous array: BLAS's leading dimension, :func:`_ld`); ``coef`` = [1, 0, 1] in that
    type (alpha and the two betas, passed by pointer).  Calls the same BLAS as numba's np.dot (numba's
    ``numba_xxgemm`` helper, resolved by name, so callers stay cacheable), which np.dot cannot
    do: accumulate into C without a temporary."""
    if not isinstance(A, types.Array) or not isinstance(A.dtype, types.Float):
        return None
    bits = A.dtype.bitwidth
    if bits not in _XXGEMM:
        from numba.np.linalg import _BLAS
        _XXGEMM[bits] = _BLAS().numba_xxgemm(A.dtype)
    gemm, kind = _XXGEMM[bits], ord("d" if bits == 64 else "s")
    n_, t_ = ord("n"), ord("t")

    def impl(A, B, C, trans_a, trans_b, coef, accumulate):
        M, N = C.shape
        K = B.shape[1] if trans_b else B.shape[0]
        # row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T
        gemm(kind, t_ if trans_b else n_, t_ if trans_a else n_, N, M, K, coef.ctypes, B.ctypes,
             _ld(B), A.ctypes, _ld(A), coef[2:].ctypes if accumulate else coef[1:].ctypes,
             C.ctypes, _ld(C))
    return impl


# --- one layer over a chunk, rows r0:r1 of the batch (large layers) ------------------------------
# How a layer's input projection W_ih x_t (+ b) reaches the forward kernels (``mode``):
FROM_P, FROM_TABLE, FROM_X = 0, 1, 2


@njit(inline="always", **_NOCACHE)
def _small_block(M, H, GH, faster):
    """Gates per block of a chunk's recurrent product with W_hh (G*H, H): M rows times a block
    of 64 gates times H is within OpenBLAS's small-matrix path (M*H*64 <= 1e6), which multiplies
    without packing W_hh first (else all of it is packed at every step).  64 when that holds, the
    product is larger and the blocks are ``faster``; else G*H, one product.  Measured one thread,
    M = 16, H = 512, G*H = 2048:
    forward, W_hh h_{t-1} in blocks of outputs: float32 blocks of 64 403 us against 786 us for
    the whole (48, 80, 112 or 128 gates: 720-1300 us, other shapes of the small kernels' register
    blocking); float64 gained nothing reliable (831-1094 against 930-973 us): float32 only;
    backward, da_t W_hh summed over blocks of gates: 322 against 406 us (float32), 639 against
    946 us (float64); blocks of 128 or 256: no faster than one product."""
    if faster and GH > 64 and M * H * 64 <= 1000000:
        return 64
    return GH


@njit(**_JIT)
def forward_rows(kind, act, mode, P, bias, tab, tok, WhhT, Hs, Cs, TC, r0, r1):
    """Forward pass of one layer over T steps for batch rows r0:r1; equals the layer's part of
    ``npbptt.model._Network.step`` (``npbptt.cells.rnn_step`` / ``lstm_step``) step after step.

    mode: where W_ih x_t comes from -- FROM_P: P[t] holds it on entry (one GEMM over all steps by
          the caller); FROM_TABLE: the table row tab[tok[t, b]] = W_ih E[v] + b
    P   : (T, B, G*H) on exit the activations (LSTM: the gates i, f, g(=z), o of each step; RNN:
          h_t itself); on entry W_ih x_t for FROM_P
    bias: (G*H,) b_ih + b_hh (zeros without biases; unused for FROM_TABLE)
    tab, tok : (V, G*H) and (T, B) for FROM_TABLE
    WhhT: (H, G*H) = W_hh^T, C-contiguous
    Hs  : (T+1, B, H), Hs[0] the entering h; Hs[t+1] <- h_t
    Cs  : (T+1, B, H), Cs[0] the entering c; Cs[t+1] <- c_t  (LSTM; unused for the RNN)
    TC  : (T, B, H) <- tanh(c_t)                              (LSTM; unused for the RNN)
    """
    T, GH = P.shape[0], P.shape[2]
    H = Hs.shape[2]
    A = np.empty((r1 - r0, GH), P.dtype)
    coef = np.zeros(3, P.dtype)                               # alpha 1, beta 0, beta 1
    coef[0] = coef[2] = 1
    H2, H3 = 2 * H, 3 * H
    # (each loop touches at most four arrays: see the module's speed rule)
    # W_hh h_{t-1} in blocks of NB of the G*H outputs: OpenBLAS multiplies such small products
    # without packing W_hh first (one packing of all of it per step otherwise)
    NB = _small_block(r1 - r0, H, GH, P.itemsize == 4)
    for t in range(T):
        for j0 in range(0, GH, NB):
            j1 = min(j0 + NB, GH)
            _mm(Hs[t, r0:r1], WhhT[:, j0:j1], A[:, j0:j1], False, False, coef, False)
        for r in range(r1 - r0):
            b = r0 + r
            p, h = P[t, b], Hs[t + 1, b]
            a = A[r]
            # the pre-activation W_hh h_{t-1} + W_ih x_t + b_ih + b_hh, W_ih x_t (+ b) from the
            # table or from P[t]
            if mode == FROM_TABLE:
                src = tab[tok[t, b]]
                for j in range(GH):
                    a[j] += src[j]
            else:
                for j in range(GH):
                    a[j] += p[j] + bias[j]
            if kind == LSTM:
                # i_t, f_t, o_t = sigma(W h_{t-1} + U x_t); z_t = tanh(W_z h_{t-1} + U_z x_t),
                # one loop per kind of gate, through separate views (see the speed rules)
                p_if, a_if, p_z, a_z, p_o, a_o = p[:H2], a[:H2], p[H2:H3], a[H2:H3], p[H3:], a[H3:]
                for j in range(H2):
                    p_if[j] = sigmoid(a_if[j])
                for j in range(H):
                    p_z[j] = tanh(a_z[j])
                for j in range(H):
                    p_o[j] = sigmoid(a_o[j])
                c_prev, c = Cs[t, b], Cs[t + 1, b]
                for j in range(H):
                    c[j] = p[j] * p[2 * H + j] + p[H + j] * c_prev[j]  # c_t = i o z + f o c_{t-1}
            else:
                for j in range(H):                            # h_t = rho(W_hh h_{t-1} + W_ih x_t + b)
                    p[j] = _activate(act, a[j])
                for j in range(H):
                    h[j] = p[j]
        if kind == LSTM:
            c_all = Cs[t + 1, r0:r1].reshape(-1)              # all rows at once: one long loop
            tc_all = TC[t, r0:r1].reshape(-1)
            for j in range(c_all.shape[0]):
                tc_all[j] = tanh(c_all[j])
            for r in range(r1 - r0):
                o, tc, h = P[t, r0 + r, 3 * H:], TC[t, r0 + r], Hs[t + 1, r0 + r]
                for j in range(H):
                    h[j] = o[j] * tc[j]                       # h_t = o_t o tanh(c_t)


# Where the gradient reaching layer 0's input goes (``down0`` of small_backward):
DOWN_NONE, DOWN_EMBED = 0, 1


@njit(**_JIT)
def backward_rows(kind, act, D, Hs, Cs, TC, dHext, Whh, t_stop, sq, r0, r1):
    """Backward recursion (16) through one layer for batch rows r0:r1, steps T-1 down to t_stop;
    equals ``npbptt.cells.rnn_step_vjp`` / ``lstm_step_vjp`` applied step after step as in
    ``npbptt.model._Network.step_vjp`` (the weight and input gradients are GEMMs over all steps
    by the caller).

    D     : (T, B, G*H) the activations left by :func:`forward_rows`; for t >= t_stop overwritten
            by da_t, the gradient w.r.t. the pre-activations W_ih x_t + W_hh h_{t-1} + b
    Hs, Cs, TC : as left by :func:`forward_rows`
    dHext : (T, B, H) gradient reaching h_t from outside the recurrence at step t (the layer
            above's input gradient and, for the top layer, the read-out)
    Whh   : (G*H, H) = W_hh, C-contiguous
    sq    : (T, B) or (0, B); when it has rows, sq[t-1, b] += ||b^(layer)_{t-1}||^2 for
            t >= max(t_stop, 1), where b_{t-1} = (dh, dc) is the gradient w.r.t. this layer's
            part of S_{t-1} as the input of step t -- the b_k of recursion (16), k = T-t
    """
    T, GH = D.shape[0], D.shape[2]
    H = Hs.shape[2]
    R = r1 - r0
    want_sq = sq.shape[0] > 0
    KB = _small_block(R, H, GH, True)
    dh_rec = np.zeros((R, H), D.dtype)                        # b_{t}, h part, from step t+1
    dc_rec = np.zeros((R, H), D.dtype)                        # b_{t}, c part (LSTM)
    coef = np.zeros(3, D.dtype)                               # alpha 1, beta 0, beta 1
    coef[0] = coef[2] = 1
    one = D.dtype.type(1)
    dh_all = dh_rec.reshape(-1)
    for t in range(T - 1, t_stop - 1, -1):
        de_all = dHext[t, r0:r1].reshape(-1)                  # all rows at once: one long loop
        for j in range(de_all.shape[0]):
            dh_all[j] += de_all[j]                            # dh_t: from step t+1 and from above
        for r in range(R):                                    # (the module's speed rule)
            b = r0 + r
            d, dh = D[t, b], dh_rec[r]
            if kind == LSTM:
                dc, c_prev, tc = dc_rec[r], Cs[t, b], TC[t, b]
                for j in range(H):
                    o, tcj = d[3 * H + j], tc[j]
                    dc[j] = dc[j] + dh[j] * o * (one - tcj * tcj)  # dc_t, adding h_t = o_t tanh(c_t)
                    d[3 * H + j] = dh[j] * tcj * o * (one - o)      # d/d(pre-activation of o)
                for j in range(H):
                    i, f, g, dcj = d[j], d[H + j], d[2 * H + j], dc[j]
                    d[j] = dcj * g * i * (one - i)                  # i
                    d[H + j] = dcj * c_prev[j] * f * (one - f)      # f
                    d[2 * H + j] = dcj * i * (one - g * g)          # g (z)
                    dc[j] = dcj * f                                 # dc_{t-1} = dc_t f_t
            else:
                for j in range(H):
                    d[j] = dh[j] * _activate_grad(act, d[j], one)             # dz = dh rho'(z)
        if t > t_stop or want_sq:
            # dh_{t-1} = da_t W_hh, summed over blocks of KB of the G*H gates (each block's
            # product formed, then added): OpenBLAS's small-matrix path, no packing of W_hh
            for k0 in range(0, GH, KB):
                k1 = min(k0 + KB, GH)
                _mm(D[t, r0:r1, k0:k1], Whh[k0:k1], dh_rec, False, False, coef, k0 > 0)
            if want_sq and t >= 1:
                for r in range(R):
                    s = _sum64(dh_rec[r], True)
                    if kind == LSTM:
                        s += _sum64(dc_rec[r], True)
                    sq[t - 1, r0 + r] += s


# --- read-out losses -----------------------------------------------------------------------------
@njit(**_JIT)
def loss_rows(code, out, bias, yi, yf, scale, want_grad, ell, r0, r1):
    """:func:`_loss_rows` as an entry point (the large path's)."""
    _loss_rows(code, out, bias, yi, yf, scale, want_grad, ell, r0, r1)


@njit(**_NOCACHE)
def _loss_rows(code, out, bias, yi, yf, scale, want_grad, ell, r0, r1):
    """Per-example losses of ``npbptt.losses`` on the read-out, rows r0:r1, fused with their
    gradients; equals ``cross_entropy`` (code 0) or ``mse`` (code 1) of ``npbptt.losses``.

    out  : (N, O) on entry h W_dec^T (the bias is added here); on exit, when ``want_grad``,
           ``scale * d ell / d out`` (else the logits)
    yi   : (N,) int targets (cross-entropy) ;  yf : (N, O) targets (mse)
    ell  : (N,) float64 <- per-example losses (accumulated in float64 for any dtype)
    """
    O = out.shape[1]
    one = out.dtype.type(1)
    for r in range(r0, r1):
        z = out[r]
        for o in range(O):
            z[o] += bias[o]
        if code == XENT:
            m = _max4(z)
            zy = z[yi[r]] - m
            # separate passes, each vectorisable (a sum in the same loop would keep it scalar)
            for o in range(O):
                z[o] = exp_neg(z[o] - m)                      # exp(z - max z)
            se = _sum64(z, False)                             # sum_o exp(z - max z), in float64
            ell[r] = math.log(se) - np.float64(zy)            # logsumexp(z) - z_y, in float64
            if want_grad:                                     # d ell/dz = softmax(z) - onehot(y),
                yr = yi[r]                                    # scaled after the subtraction
                ey = z[yr]
                sez = z.dtype.type(se)
                for o in range(O):
                    z[o] = (z[o] / sez) * scale
                z[yr] = (ey / sez - one) * scale
        else:
            s = 0.0                                           # accumulated in float64
            two = z.dtype.type(2 * scale / O)
            for o in range(O):
                d = z[o] - yf[r, o]
                s += d * d
                if want_grad:
                    z[o] = two * d                            # d/dout mean_o (out - y)^2
            ell[r] = s / O


@njit(**_JIT)
def scatter_add_rows(idx, src, dst):
    """dst[idx[n]] += src[n] for every row n, in order (``np.add.at(dst, idx, src)``); idx (N,),
    src (N, C), dst (V, C)."""
    for n in range(idx.shape[0]):
        d, s = dst[idx[n]], src[n]
        for c in range(s.shape[0]):
            d[c] += s[c]


# --- thread hand-off ------------------------------------------------------------------------------
@intrinsic
def _load_acquire(typingctx, flags, k):
    """flags[k] for a 1-D int64 array, an atomic load with acquire ordering: another thread's
    store is seen (a plain load could be hoisted out of a waiting loop), and so is everything
    that thread wrote before it."""
    if not (isinstance(flags, types.Array) and flags.dtype == types.int64 and flags.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        from numba.core import cgutils
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(flags, types.intp), codegen


@intrinsic
def _store_release(typingctx, flags, k):
    """flags[k] = 1 for a 1-D int64 array, an atomic store with release ordering: a thread that
    sees it (:func:`_load_acquire`) also sees everything this thread wrote before it (x86 orders
    stores anyway; weaker memory models do not)."""
    if not (isinstance(flags, types.Array) and flags.dtype == types.int64 and flags.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        from numba.core import cgutils
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]])
        builder.store_atomic(ir.Constant(ir.IntType(64), 1), ptr, "release", 8)
        return context.get_dummy_value()

    return types.none(flags, types.intp), codegen


@njit(**_NOCACHE)
def _wait_flags(flags, spins):
    """Spin until every one of ``flags`` (int64) is set or ``spins`` rounds have passed (~1 ns a
    round); returns whether they were.  Once they are, spin a little longer (~2 us) so that the
    thread that set the last one has let go of the GIL before this one wants it back."""
    n = flags.shape[0]
    for _ in range(spins):
        s = 0
        for k in range(n):
            s += _load_acquire(flags, k)
        if s >= n:
            for _ in range(2048):                    # settle: a load that cannot be hoisted
                s += _load_acquire(flags, 0)
            return s >= n
    return False


@njit(**_JIT)
def wait_flags(flags, spins, signal, k):
    """Sets signal[k] = 1 (when ``signal`` has any), then :func:`_wait_flags`, all without the GIL:
    a worker thread, its task handed in, signals the caller so and waits for the next task (the
    caller then never finds the GIL held by the worker it waited for).  Blocking instead costs
    the wake-up of an idle virtual CPU, 30-150 us here (1-5% of a W1 step)."""
    if signal.shape[0] > 0:
        _store_release(signal, k)
    return _wait_flags(flags, spins)


# --- small networks: a whole chunk in two calls, feature-major ----------------------------------
# For networks whose layers are all small (``npbptt.kernels.cpu._fused``) a chunk of rows runs
# through small_forward and small_backward, every per-step quantity stored
# transposed, units by rows: a^T (G*H, B), h^T and c^T (H, B).  The recurrent products become
# W_hh h^T (the GEMMs are the same size), and each gate's block of the step is H*B contiguous
# numbers, so that each nonlinearity is one long vectorised loop over its whole block (in the
# row-major layout a row holds all four gates of one example: loops of H with a remainder each,
# or one loop choosing sigma or tanh per lane, which costs a third more).

@njit(**_NOCACHE)
def _zero(a):
    """a[:] = 0 for a 1-D array (an explicit loop: slice assignment compiles to a large generic
    copy routine)."""
    for k in range(a.shape[0]):
        a[k] = 0


@njit(**_NOCACHE)
def _col_sq(M, acc, add):
    """acc[b] (=, or += when ``add``) sum_j M[j, b]^2 in float64, for M (H, B)."""
    if not add:
        for b in range(acc.shape[0]):
            acc[b] = 0.0
    for j in range(M.shape[0]):
        mj = M[j]
        for b in range(acc.shape[0]):
            v = np.float64(mj[b])
            acc[b] += v * v


# Vocabularies up to this size add their table columns W_ih E[x_t] + b by a GEMM with the one-hot
# matrix of the step's tokens (exact: every other term is a product with 0); larger ones gather
# (three times slower per element on this machine, but fewer elements).
_ONE_HOT_MAX = 32


@njit(**_JIT)
def small_forward(kind, act, mode0, X0T, tabT, tok, Wih0, Wih, Whh, bias, PT, HT, CT, TCT, Hrm,
                  Wdec, out, r0, hout, cout, posted):
    """Forward pass of every layer over T steps, feature-major; equals
    ``npbptt.model._Network.step`` (``npbptt.cells.rnn_step`` / ``lstm_step``) step after step.

    mode0 : layer 0's input projection W_ih x_t (+ b): FROM_X, Wih0 X0T[t] (X0T (T, in0, B) the
            inputs transposed); FROM_TABLE, column tabT[:, tok[t, b]] of the table
            tabT (G*H, V) = (W_ih E + b_ih + b_hh)^T, tok (T, B) (see _ONE_HOT_MAX)
    Wih0 (G*H, in0), Wih (L-1, G*H, H), Whh (L, G*H, H): W_ih of layer 0, of layers 1.., W_hh
    bias (L, G*H) : b_ih + b_hh (zeros without biases)
    PT  (L, T, G*H, B) <- the activations (LSTM: gates i, f, g(=z), o; RNN: h_t)
    HT, CT (L, T+1, H, B) : h^T, c^T; [:, 0] the entering state on entry (CT: LSTM only)
    TCT (L, T, H, B) <- tanh(c_t)^T (LSTM only)
    Hrm (L, T+1, B, H) : h row-major as well ([:, 0] on entry): the weight gradients' GEMMs
          da^T h are 25% faster with it than with h^T (BLAS's NN case, not NT)
    Wdec (O, H), out (K2, B, O) : out[k] <- h_t W_dec^T for the last K2 steps, the read-out
          without its bias (for the losses of :func:`small_backward`)
    r0, hout, cout (L, B_call, H) : rows r0:r0+B <- the chunk's h_T and c_T (cout LSTM only):
          its part of the call's final state
    posted (int64) <- 1 on entry: tells idle worker threads spinning on it that their chunks are
          queued (set here, once the calling thread has let go of the GIL, so that a worker
          waking up to take it does not have to wait for it)
    """
    for w in range(posted.shape[0]):
        _store_release(posted, w)
    L, T, GH, B = PT.shape
    H = HT.shape[2]
    n = H * B
    coef = np.zeros(3, PT.dtype)                              # alpha 1, beta 0, beta 1
    coef[0] = coef[2] = 1
    V = tabT.shape[1]
    oh = np.empty((V if V <= _ONE_HOT_MAX else 0, B), PT.dtype)  # one-hot tokens (V, B)
    ohf = oh.reshape(-1)
    for l in range(L):                                        # layer l-1's h_t is layer l's x_t
        for t in range(T):
            A = PT[l, t]
            # a_t^T = W_ih x_t^T + W_hh h_{t-1}^T + b_ih + b_hh (the reference's order)
            if l == 0 and mode0 == FROM_TABLE:
                _mm(Whh[0], HT[0, t], A, False, False, coef, False)
                tk = tok[t]
                if V <= _ONE_HOT_MAX:                     # + tabT onehot(x_t): a GEMM, not a gather
                    _zero(ohf)
                    for b in range(B):
                        oh[tk[b], b] = 1
                    _mm(tabT, oh, A, False, False, coef, True)
                else:
                    for j in range(GH):
                        a, src = A[j], tabT[j]
                        for b in range(B):
                            a[b] += src[tk[b]]
            else:
                if l == 0:
                    _mm(Wih0, X0T[t], A, False, False, coef, False)
                else:
                    _mm(Wih[l - 1], HT[l - 1, t + 1], A, False, False, coef, False)
                _mm(Whh[l], HT[l, t], A, False, False, coef, True)
                bl = bias[l]
                for j in range(GH):
                    a, bj = A[j], bl[j]
                    for b in range(B):
                        a[b] += bj
            af, h = A.reshape(-1), HT[l, t + 1].reshape(-1)
            if kind == LSTM:
                # i_t, f_t, o_t = sigma(.), z_t = tanh(.): one loop per block of H*B
                # (separate views of the gate blocks: offsets into one array keep LLVM from
                # vectorising these loops)
                i_f, i, f, z, o = af[:2 * n], af[:n], af[n:2 * n], af[2 * n:3 * n], af[3 * n:]
                for k in range(2 * n):
                    i_f[k] = _gate(i_f[k], False)
                for k in range(n):
                    z[k] = _gate(z[k], True)
                for k in range(n):
                    o[k] = _gate(o[k], False)
                c, c_prev = CT[l, t + 1].reshape(-1), CT[l, t].reshape(-1)
                tc = TCT[l, t].reshape(-1)
                for k in range(n):
                    c[k] = i[k] * z[k]                            # c_t = i o z + f o c_{t-1}
                for k in range(n):
                    c[k] += f[k] * c_prev[k]
                for k in range(n):
                    tc[k] = _gate(c[k], True)
                for k in range(n):
                    h[k] = o[k] * tc[k]                           # h_t = o_t o tanh(c_t)
            else:
                for k in range(n):                                # h_t = rho(a_t)
                    af[k] = _activate(act, af[k])
                for k in range(n):
                    h[k] = af[k]
            h2, hr = HT[l, t + 1], Hrm[l, t + 1]
            for b in range(B):
                hb = hr[b]
                for j in range(H):
                    hb[j] = h2[j, b]
    K2 = out.shape[0]
    for k in range(K2):
        _mm(Hrm[L - 1, T - K2 + 1 + k], Wdec, out[k], False, True, coef, False)
    for l in range(L):                                        # S_T of the chunk's rows
        for b in range(B):
            ho, hs = hout[l, r0 + b], Hrm[l, T, b]
            for j in range(H):
                ho[j] = hs[j]
            if kind == LSTM:
                co = cout[l, r0 + b]
                for j in range(H):
                    co[j] = CT[l, T, j, b]


@njit(**_NOCACHE)
def _gather(G, gout, db_at, ELL, val, B):
    """A call's results from its chunks': gout[:n_g] <- the sum of the rows of G (n_chunks, n_g),
    the chunks' gradients, in chunk order, (g_0 + g_1) + g_2 ...; gout[n_g:] <- a copy of
    gout[db_at:db_at + len(gout) - n_g] (the second bias's gradient is the first's); val[0] <-
    the mean loss (1/K2) sum_k (1/B) sum_c ELL[c, k], ELL (n_chunks, K2) the chunks' sums of the
    per-example losses of step k, B the call's batch (the batch mean of each step, then the 1/K2
    of Eq. (15), as ``npbptt.bptt.bptt_reference``); val[1] <- 1 (gathered)."""
    nc, ng = G.shape
    g0 = G[0]
    for k in range(ng):
        gout[k] = g0[k]
    for c in range(1, nc):
        gc = G[c]
        for k in range(ng):
            gout[k] += gc[k]
    for k in range(gout.shape[0] - ng):
        gout[ng + k] = gout[db_at + k]
    K2 = ELL.shape[1]
    tot = 0.0
    for k in range(K2):
        s = 0.0
        for c in range(nc):
            s += ELL[c, k]
        tot += s / B
    val[0] = tot / K2
    val[1] = 1.0


@njit(**_JIT)
def gather(G, gout, db_at, ELL, val, B):
    """:func:`_gather` as an entry point (when small_backward's wait for the workers ran out)."""
    _gather(G, gout, db_at, ELL, val, B)


@njit(**_JIT)
def small_backward(kind, act, PT, Hrm, CT, TCT, dHT, Whh, Wih, Wih0, X0, tok, E, t_stop, sq,
                   dWhh, dWih, dWih0, db, dE, down0, Wdec, out, dWdec, dbdec, code, bdec, yi, yf,
                   scale, ell, r0, c, ELL, G, db_at, gout, val, flags, spins):
    """Backward recursion (16) down every layer, feature-major, steps T-1 down to t_stop; equals
    ``npbptt.cells.rnn_step_vjp`` / ``lstm_step_vjp`` step after step as in
    ``npbptt.model._Network.step_vjp`` and the terms of Eq. (15) accumulated as
    ``npbptt.bptt.bptt_reference`` does (each step's product formed, then added, t descending).
    It starts from the read-out ``out`` (K2, B, O) left by :func:`small_forward` (h_t W_dec^T of
    the last K2 steps): :func:`_loss_rows` (code, bias bdec, targets yi (K2 * B,) or yf
    (K2 * B, O)) puts the losses in ell (K2 * B,) float64 and their gradients times ``scale`` in
    ``out``, g = scale d ell / d logits; then Eq. (16), k < K2, dL_{s-k}/dh_{s-k} = g W_dec, and
    the read-out's own term of Eq. (2), dWdec (O, H) and dbdec (O,) <- sum_t g_t^T h_t and the
    sum of g (or, empty, none: the probe).  (The losses here rather than in a third call: each
    call costs a worker thread a hand-off of the GIL, and two threads handing it over at the same
    moment wait for each other's wake-up, 20-100 us on this machine's virtual CPUs.)

    PT, Hrm, CT, TCT : as left by :func:`small_forward`; PT[l, t] is overwritten by da_t^T, the
          gradient w.r.t. the pre-activations (t >= t_stop)
    dHT (T, H, B) : scratch: the read-out's gradient reaching the top layer's h_t; then, layer
          by layer, the gradient reaching the layer below (da_t W_ih)
    Whh, Wih, Wih0 : as for :func:`small_forward`
    X0, tok, E : layer 0's inputs, row-major: X0 (T, B, in0), or (X0 without rows) E[tok[t, b]]
    sq  : (T, B_call) or (0, B_call); when it has rows, for the chunk's rows b (columns r0 + b)
          sq[T-1, b] <- ||b_0||^2 = ||d ell/dh_{T-1}||^2 and sq[t-1, b] <- sum over layers of
          ||b_{t-1}||^2 (the layer's (dh, dc) for S_{t-1}, as the input of step t),
          t >= max(t_stop, 1), 0 below: the probe of Eq. (18)
    dWhh (L, G*H, H), dWih (L-1, G*H, H), dWih0 (G*H, in0), db (L, G*H) or (L, 0): <- the
          sums of Eq. (15); dWhh of shape (L, 0, 0): no parameter gradients (the probe)
    dE (V, in0), down0 : with down0 = DOWN_EMBED, dE <- sum over steps and rows of
          dE[tok[t, b]] += (da_t W_ih)[b], in order (for a vocabulary of at most _ONE_HOT_MAX
          without X0 rows: summed per token first, see ``by_token``)
    ell (K2 * B,) float64 <- the per-example losses
    r0, c : the chunk's first row in the call's batch, and its index among the call's chunks
    ELL (n_chunks, K2) float64 : ELL[c, k] <- the sum of ell over the chunk's rows at step k
    flags, spins : when ``flags`` has any (the chunk of the calling thread), wait at the end for
          the worker threads' chunks (:func:`_wait_flags`), without the GIL
    G, db_at, gout, val : when ``gout`` has any elements (the calling thread's chunk, after the
          wait), gather the call's results (:func:`_gather`) from G (n_chunks, n_g), every
          chunk's gradients (dWih0 .. dbdec of chunk c are views of G[c]), and ELL: gout
          <- the summed gradients, val (2,) float64 <- (the mean loss, 1); only when the wait
          for the workers succeeded (val[1] is left as it was otherwise: the caller, having
          waited for them itself, calls :func:`gather`)
    """
    L, T, GH, B = PT.shape
    H = Hrm.shape[3]
    n = H * B
    dt = PT.dtype
    one = dt.type(1)
    coef = np.zeros(3, dt)
    coef[0] = coef[2] = 1
    want_sq = sq.shape[0] > 0
    grads = dWhh.shape[1] > 0
    n_in = Wih0.shape[1]
    dh2 = np.empty((H, B), dt)                                # b_t, h part, from step t+1
    dc2 = np.empty((H, B), dt)                                # b_t, c part (LSTM)
    xr = np.empty((B, n_in), dt)                              # x_t of layer 0 (rows)
    xT = np.empty((n_in, B), dt)                              # (da_t W_ih)^T of layer 0
    # An embedding with a small vocabulary (layer 0 through the table): layer 0's input terms
    # sum_t da_t^T E[x_t] and E's gradient depend on da_t only through its sums per token,
    # dTab[:, v] = sum of da_t[:, b] over the (t, b) with x_t^(b) = v, one GEMM per step with the
    # tokens' one-hot rows; then dW_ih = dTab E, dE = dTab^T W_ih and layer 0's bias gradient
    # sum_v dTab[:, v] once.
    V = E.shape[0]
    by_token = grads and X0.shape[0] == 0 and V <= _ONE_HOT_MAX
    dTab = np.zeros((GH, V if by_token else 0), dt)
    ohT = np.empty((B, V if by_token else 0), dt)
    ones = np.ones((B, 1), dt)
    acc = np.empty(B, np.float64)
    dh, dc = dh2.reshape(-1), dc2.reshape(-1)
    # the read-out: dh_t^T = (g_t W_dec)^T for the last K2 steps, 0 before
    K2, O = out.shape[0], out.shape[2]
    _loss_rows(code, out.reshape(K2 * B, O), bdec, yi, yf, scale, True, ell, 0, K2 * B)
    for k in range(K2):
        s = 0.0
        for b in range(B):
            s += ell[k * B + b]
        ELL[c, k] = s
    _zero(dHT[:T - K2].reshape(-1))
    _zero(dWdec.reshape(-1))                                  # the accumulators start at 0
    _zero(dbdec)
    for t in range(sq.shape[0]):
        st = sq[t]
        for b in range(B):
            st[r0 + b] = 0
    dhr = np.empty((B, Wdec.shape[1]), dt)
    for k in range(K2):
        g = out[k]
        # g W_dec row-major, then transposed: the reference's product (dout @ W_dec), so that a
        # sum with cancellation over the outputs rounds as the reference's does
        _mm(g, Wdec, dhr, False, False, coef, False)
        dT = dHT[T - K2 + k]
        for j in range(dT.shape[0]):
            dTj = dT[j]
            for b in range(B):
                dTj[b] = dhr[b, j]
        if dWdec.shape[0] > 0:
            _mm(g, Hrm[L - 1, T - K2 + 1 + k], dWdec, True, False, coef, True)  # += g^T h_t
            for b in range(B):
                gb = g[b]
                for o in range(O):
                    dbdec[o] += gb[o]
    if want_sq:
        _col_sq(dHT[T - 1], acc, False)
        for b in range(B):
            sq[T - 1, r0 + b] = acc[b]
    if grads:
        _zero(dWhh.reshape(-1))
        _zero(dWih.reshape(-1))
        _zero(dWih0.reshape(-1))
        _zero(db.reshape(-1))
    if down0 == DOWN_EMBED:
        _zero(dE.reshape(-1))
    for l in range(L - 1, -1, -1):
        for k in range(n):
            dh[k] = 0
            dc[k] = 0
        for t in range(T - 1, t_stop - 1, -1):
            A = PT[l, t]
            af, de = A.reshape(-1), dHT[t].reshape(-1)
            for k in range(n):
                dh[k] += de[k]                                # dh_t: from step t+1 and from above
            if kind == LSTM:
                # (separate views of the gate blocks: offsets into one array keep LLVM from
                # vectorising these loops)
                ai, af_, az, ao = af[:n], af[n:2 * n], af[2 * n:3 * n], af[3 * n:]
                tc, c_prev = TCT[l, t].reshape(-1), CT[l, t].reshape(-1)
                for k in range(n):                            # dc_t, adding h_t = o_t tanh(c_t)
                    o, tck = ao[k], tc[k]
                    dc[k] = dc[k] + dh[k] * o * (one - tck * tck)
                    ao[k] = dh[k] * tck * o * (one - o)           # d/d(pre-activation of o)
                for k in range(n):
                    i, g, dck = ai[k], az[k], dc[k]
                    ai[k] = dck * g * i * (one - i)                  # i
                    az[k] = dck * i * (one - g * g)                  # g (z)
                for k in range(n):
                    f, dck = af_[k], dc[k]
                    af_[k] = dck * c_prev[k] * f * (one - f)         # f
                    dc[k] = dck * f                                  # dc_{t-1} = dc_t f_t
            else:
                for k in range(n):
                    af[k] = dh[k] * _activate_grad(act, af[k], one)  # dz = dh rho'(z)
            if t > t_stop or want_sq:
                _mm(Whh[l], A, dh2, True, False, coef, False)    # dh_{t-1}^T = W_hh^T da_t^T
                if want_sq and t >= 1:
                    _col_sq(dh2, acc, False)                  # column sums of squares
                    if kind == LSTM:
                        _col_sq(dc2, acc, True)
                    for b in range(B):
                        sq[t - 1, r0 + b] += acc[b]
            if grads:                                         # Eq. (15): b_k . dS_{s-k}/dtheta
                _mm(A, Hrm[l, t], dWhh[l], False, False, coef, True)  # dW_hh += da_t^T h_{t-1}
                if l > 0:
                    _mm(A, Hrm[l - 1, t + 1], dWih[l - 1], False, False, coef, True)  # += da^T x_t
                elif X0.shape[0] > 0:
                    _mm(A, X0[t], dWih0, False, False, coef, True)
                elif by_token:
                    tk = tok[t]
                    for b in range(B):
                        oh = ohT[b]
                        for v in range(V):
                            oh[v] = 0
                        oh[tk[b]] = 1
                    _mm(A, ohT, dTab, False, False, coef, True)  # dTab += da_t^T onehot(x_t)
                else:
                    tk = tok[t]
                    for b in range(B):                        # x_t = E[token]
                        src, dst = E[tk[b]], xr[b]
                        for c in range(n_in):
                            dst[c] = src[c]
                    _mm(A, xr, dWih0, False, False, coef, True)
                if db.shape[1] > 0 and not (l == 0 and by_token):  # the batch sum of da_t, added
                    _mm(A, ones, db[l].reshape(GH, 1), False, False, coef, True)
            if l > 0:                                         # into h_t of the layer below
                _mm(Wih[l - 1], A, dHT[t], True, False, coef, False)
            elif down0 == DOWN_EMBED and not by_token:
                _mm(Wih0, A, xT, True, False, coef, False)
                tk = tok[t]
                for b in range(B):
                    dst = dE[tk[b]]
                    for c in range(n_in):
                        dst[c] += xT[c, b]
    if by_token:
        _mm(dTab, E, dWih0, False, False, coef, False)        # dW_ih = sum_v dTab[:, v] E[v]^T
        if db.shape[1] > 0:
            # Eq. (15), layer 0's bias term: every (t, b) has one token, so sum_t sum_b da_t[:, b] =
            # sum_v dTab[:, v] (its batch sums per step, a GEMM each, are not needed)
            for j in range(GH):
                dbj = dTab[j, 0]
                for v in range(1, V):
                    dbj += dTab[j, v]
                db[0, j] = dbj
        if down0 == DOWN_EMBED:
            _mm(dTab, Wih0, dE, True, False, coef, False)     # dE[v] = W_ih^T dTab[:, v]
    done = _wait_flags(flags, spins) if flags.shape[0] > 0 else True
    if gout.shape[0] > 0 and done:                            # (else the caller calls gather)
        _gather(G, gout, db_at, ELL, val, sq.shape[1])   # sq: (T or 0, B_call)
