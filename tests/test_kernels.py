"""The Numba CPU kernels (npbptt.kernels.cpu) equal the NumPy references they name:
bptt_reference, step_losses_reference and grad_norms_reference.

float64: to 1e-12 relative to the max-abs of each output array (a gradient formed by cancellation
across the batch: relative to the sum of the absolute per-example contributions, see
_assert_grads_close64).  float32: the kernel's error against the float64 reference (run on the
same float32-rounded parameters and inputs) is at most twice the float32 reference's own error,
both measured as the relative 2-norm error of the whole output (all gradient arrays together),
as the root mean square over the problem and three copies perturbed at the 2^-18 level (see
_float32_check); an error below 4 float32 epsilons counts as that (a result cannot be
meaningfully closer than a few roundings of its largest entries).
"""
import contextlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npbptt
from npbptt import backends
from npbptt.bptt import bptt_reference, step_losses_reference
from npbptt.kernels import cpu, cpu_layers, cpu_small
from npbptt.model import RNN, DropoutMasks
from npbptt.probe import grad_norms_reference
from npbptt.validate import check_inputs
from problems import Problem, make_problem

EPS32 = float(np.finfo(np.float32).eps)
# Floor of the float32 rule: a value formed by a sum with cancellation (c_t = i g + f c_{t-1} of
# one unit, a logit difference) carries a few ulps of rounding relative to itself however it is
# computed; on tiny problems (B = H = 1) the float32 reference can round luckily to ~0.3 ulp, so
# "twice the reference's error" alone would demand luck.  Found by hypothesis: a (1, 1, 1) LSTM
# state with 8 ulps in the kernel against 0.6 in the reference.
FLOOR32 = 4 * EPS32


@st.composite
def kernel_problems(draw, max_T=9):
    """Problems over every supported configuration: cells, activations, 1-3 layers, embedding
    (small and large vocabularies, i.e. both layer-0 paths) or dense input, biases or not, both
    losses, batch 1..65, odd sizes; and a valid (K1, K2)."""
    kind = draw(st.sampled_from(["lstm", "rnn"]))
    act = draw(st.sampled_from(["tanh", "relu", "sigmoid", "linear"])) if kind == "rnn" else "tanh"
    T = draw(st.integers(1, max_T))
    B = draw(st.integers(1, 65))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    prob = make_problem(rng, kind=kind, activation=act, layers=draw(st.integers(1, 3)),
                        embedding=draw(st.booleans()),
                        loss=draw(st.sampled_from(["cross_entropy", "mse"])), T=T, B=B,
                        H=draw(st.integers(1, 9)), E=draw(st.integers(1, 5)),
                        O=draw(st.integers(2, 6)), V=draw(st.sampled_from([2, 7, 300])),
                        bias=draw(st.booleans()), scale=draw(st.sampled_from([0.5, 1.0, 2.5])))
    K1 = draw(st.integers(0, T + 1))
    K2 = draw(st.integers(1, min(T, K1 + 1)))
    return prob, K1, K2


def _validated(prob):
    return check_inputs(prob.net, prob.x, prob.y, prob.state, prob.loss)


def _assert_close64(ref, got, what):
    """Every array of ``ref`` equals ``got`` to 1e-12 relative to its own max-abs."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert got.shape == ref.shape, what
    scale = np.abs(ref).max() if ref.size else 0.0
    assert np.abs(got - ref).max(initial=0.0) <= 1e-12 * scale, (what, np.abs(got - ref).max(), scale)


def _assert_grads_close64(prob, K1, K2, g_ref, g_got):
    """Every gradient array equals the reference's to 1e-12 relative to its own max-abs -- or, for
    an array formed by cancellation across the batch, to 1e-12 relative to the sum of the absolute
    per-example contributions (the scale of its rounding: a sum of terms whose result is 1000x
    smaller than the terms carries 1000x their relative rounding; found by hypothesis: a 1 x 1
    weight_ih_l1 of 1.2e-5 summed from 14 examples with sum |g_b| = 1.3e-2, off by 4.9e-17)."""
    per_example = None
    for n in g_ref:
        ref, got = g_ref[n], g_got[n]
        assert got.dtype == ref.dtype == np.float64 and got.shape == ref.shape, n
        err = np.abs(got - ref).max(initial=0.0)
        if err <= 1e-12 * np.abs(ref).max(initial=0.0):
            continue
        if per_example is None:                          # sum_b |g_b|, elementwise
            x, y, S = _validated(prob)
            B = x.shape[1]
            per_example = {}
            for b in range(B):
                g_b = bptt_reference(prob.net, x[:, b:b + 1], y[:, b:b + 1],
                                     tuple(s[:, b:b + 1] for s in S), K1, K2, prob.loss)[1]
                for k, v in g_b.items():
                    per_example[k] = per_example.get(k, 0) + np.abs(v) / B
        assert err <= 1e-12 * per_example[n].max(), (n, err, np.abs(ref).max(), per_example[n].max())


def _bptt_both(prob, K1, K2):
    x, y, S = _validated(prob)
    ref = bptt_reference(prob.net, x, y, S, K1, K2, prob.loss)
    got = cpu.bptt(prob.net, x, y, S, K1, K2, prob.loss)
    return ref, got


PATHS = st.sampled_from(["small", "large"])


@contextlib.contextmanager
def _layers_path(path):
    """A context in which the kernels take one of their two paths: "small", every layer small
    (the one-call feature-major kernel jit.small_chunk: every problem here is small enough) or
    "large", layer by layer with GEMMs over all steps (as when any layer is large)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "_FUSE_BYTES", 1 << 62 if path == "small" else 0)
        mp.setattr(cpu, "_SMALL_MIN_ROWS32", 0)          # float32 batches of any width too
        yield


@settings(max_examples=80, deadline=None)
@given(kernel_problems(), PATHS)
def test_bptt_kernel_equals_reference_float64(case, path):
    prob, K1, K2 = case
    with _layers_path(path):
        (l_ref, g_ref, S_ref), (l_got, g_got, S_got) = _bptt_both(prob, K1, K2)
    assert abs(l_got - l_ref) <= 1e-12 * abs(l_ref)
    assert list(g_got) == list(g_ref)
    _assert_grads_close64(prob, K1, K2, g_ref, g_got)
    for a, b in zip(S_ref, S_got):
        _assert_close64(a, b, "state")


@settings(max_examples=30, deadline=None)
@given(kernel_problems(max_T=12))
def test_step_losses_kernel_equals_reference_float64(case):
    prob, _, _ = case
    x, y, S = _validated(prob)
    L_ref, S_ref = step_losses_reference(prob.net, x, y, S, prob.loss)
    L_got, S_got = cpu.step_losses(prob.net, x, y, S, prob.loss)
    _assert_close64(L_ref, L_got, "L")
    for a, b in zip(S_ref, S_got):
        _assert_close64(a, b, "state")


@settings(max_examples=30, deadline=None)
@given(kernel_problems(max_T=12), PATHS)
def test_grad_norms_kernel_equals_reference_float64(case, path):
    prob, _, _ = case
    x, y, S = _validated(prob)
    phi_ref = grad_norms_reference(prob.net, x, y, S, prob.loss)
    with _layers_path(path):
        phi_got = cpu.grad_norms(prob.net, x, y, S, prob.loss)
    assert phi_got.dtype == np.float64
    _assert_close64(phi_ref, phi_got, "phi")


# --- float32 ------------------------------------------------------------------------------------
def _as_float32(prob):
    """(float32 problem, float64 problem with exactly the float32-rounded values)."""
    def cast(net, dt):
        new = net.copy()
        new.dtype = np.dtype(dt)
        new.params = {k: v.astype(np.float32).astype(dt) for k, v in net.params.items()}
        return new

    def vals(a, dt):
        return a if np.issubdtype(np.asarray(a).dtype, np.integer) else np.asarray(a).astype(np.float32).astype(dt)

    out = []
    for dt in (np.float32, np.float64):
        state = tuple(vals(s, dt) for s in prob.state) if prob.net.kind == "lstm" else vals(prob.state, dt)
        p = type(prob)(cast(prob.net, dt), vals(prob.x, dt), vals(prob.y, dt), state, prob.loss)
        out.append(p)
    return out


def _rel_err(arrays, exact):
    """Relative 2-norm error of the concatenation of ``arrays`` against ``exact``."""
    a = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in arrays])
    e = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in exact])
    return np.linalg.norm(a - e) / max(np.linalg.norm(e), np.finfo(np.float64).tiny)


def _assert_float32_as_good(ref32, got32, exact, what):
    """One problem's float32 check (the CUDA tests' fixed problems; see _float32_check)."""
    e_ref, e_got = _rel_err(ref32, exact), _rel_err(got32, exact)
    assert e_got <= 2 * max(e_ref, FLOOR32), (what, e_got, e_ref)


def _perturbed(prob, rng, rel=2.0 ** -18):
    """The same problem with every float parameter, input and state multiplied by (1 + rel u),
    u ~ U(-1, 1) elementwise: the same computation with other roundings."""
    def jiggle(a):
        a = np.asarray(a)
        return a if np.issubdtype(a.dtype, np.integer) else a * (1 + rel * rng.uniform(-1, 1, a.shape))

    net = prob.net.copy()
    net.params = {k: jiggle(v) for k, v in net.params.items()}
    state = tuple(jiggle(s) for s in prob.state) if prob.net.kind == "lstm" else jiggle(prob.state)
    return type(prob)(net, jiggle(prob.x), jiggle(prob.y), state, prob.loss)


N_ROUNDINGS = 8


def _float32_errors(prob, K1, K2, masks=None):
    """{quantity: (reference's error, kernel's error)} of the float32 reference and kernels against
    the float64 reference (on the same float32-rounded values), for one problem; with dropout
    ``masks`` (float32-rounded as well) for bptt and step_losses."""
    p32, p64 = _as_float32(prob)
    x, y, S = _validated(p32)
    x64, y64, S64 = _validated(p64)
    loss = prob.loss
    kw32 = kw64 = {}
    if masks is not None:
        kw32 = dict(masks=DropoutMasks(masks.input.astype(np.float32), masks.output.astype(np.float32)))
        kw64 = dict(masks=DropoutMasks(kw32["masks"].input.astype(np.float64),
                                       kw32["masks"].output.astype(np.float64)))
    out = {}
    l64, g64, _ = bptt_reference(p64.net, x64, y64, S64, K1, K2, loss, **kw64)
    lr, gr, _ = bptt_reference(p32.net, x, y, S, K1, K2, loss, **kw32)
    lk, gk, Sk = cpu.bptt(p32.net, x, y, S, K1, K2, loss, **kw32)
    assert all(v.dtype == np.float32 for v in gk.values()) and all(s.dtype == np.float32 for s in Sk)
    names = list(g64)
    out["grads"] = (_rel_err([gr[n] for n in names], [g64[n] for n in names]),
                    _rel_err([gk[n] for n in names], [g64[n] for n in names]))
    out["loss"] = _rel_err([lr], [l64]), _rel_err([lk], [l64])
    L64, S64_T = step_losses_reference(p64.net, x64, y64, S64, loss, **kw64)
    Lr, Sr_T = step_losses_reference(p32.net, x, y, S, loss, **kw32)
    Lk, Sk_T = cpu.step_losses(p32.net, x, y, S, loss, **kw32)
    out["step losses"] = _rel_err([Lr], [L64]), _rel_err([Lk], [L64])
    out["state"] = _rel_err(Sr_T, S64_T), _rel_err(Sk_T, S64_T)
    phi64 = grad_norms_reference(p64.net, x64, y64, S64, loss)
    out["phi"] = (_rel_err([grad_norms_reference(p32.net, x, y, S, loss)], [phi64]),
                  _rel_err([cpu.grad_norms(p32.net, x, y, S, loss)], [phi64]))
    return out


@settings(max_examples=50, deadline=None)
@given(kernel_problems(), PATHS)
def test_float32_kernels_error_at_most_twice_the_float32_references(case, path):
    with _layers_path(path):
        _float32_check(*case)


def _float32_check(prob, K1, K2, masks=None):
    """Each quantity's float32 error, as the root mean square over N_ROUNDINGS versions of the
    problem (itself and perturbations at the 2^-18 level, _perturbed), is at most twice the
    float32 reference's, floored at FLOOR32.  A single problem is not enough: where the result is
    a sum with cancellation (a state c = i z + f c_prev near 0, an output gradient summing to ~0
    over the outputs), any two orders of the same arithmetic differ by many ulps of the result,
    and which of them lands closer is luck (hypothesis found a B = H = 1 probe where the reference
    rounded to 0.2 ulp and the kernel to 35; over perturbed copies both average a few ulps)."""
    rng = np.random.default_rng(12345)
    runs = [_float32_errors(prob, K1, K2, masks)]
    runs += [_float32_errors(_perturbed(prob, rng), K1, K2, masks) for _ in range(N_ROUNDINGS - 1)]
    for what in runs[0]:
        e_ref = np.sqrt(np.mean([r[what][0] ** 2 for r in runs]))
        e_got = np.sqrt(np.mean([r[what][1] ** 2 for r in runs]))
        assert e_got <= 2 * max(e_ref, FLOOR32), (what, e_got, e_ref, [r[what] for r in runs])


@pytest.mark.parametrize("kind,H", [("lstm", 17), ("lstm", 40), ("rnn", 70)])
def test_recurrence_in_blocks_of_the_gates(kind, H):
    """The large path multiplies W_hh h_{t-1} in blocks of 64 of the G*H outputs (float32,
    jit._small_block) and da_t W_hh in blocks of 64 of the G*H gates, summed (the same rule);
    here G*H = 68, 160 and 70: whole blocks and a remainder.  float64 still equals the references
    to 1e-12; float32's errors stay within twice the float32 reference's, as everywhere."""
    prob = make_problem(np.random.default_rng(H), kind=kind, layers=2, T=6, B=20, H=H)
    with _layers_path("large"):
        (l_ref, g_ref, S_ref), (l_got, g_got, S_got) = _bptt_both(prob, 5, 3)
        x, y, S = _validated(prob)
        phi = cpu.grad_norms(prob.net, x, y, S, prob.loss)
        _float32_check(prob, 5, 3)
    assert abs(l_got - l_ref) <= 1e-12 * abs(l_ref)
    _assert_grads_close64(prob, 5, 3, g_ref, g_got)
    for a, b in zip(S_ref, S_got):
        _assert_close64(a, b, "state")
    _assert_close64(grad_norms_reference(prob.net, x, y, S, prob.loss), phi, "phi")


# --- the large-problem code paths on small problems -----------------------------------------------
@settings(max_examples=25, deadline=None)
@given(kernel_problems(max_T=9), PATHS)
def test_blocked_paths_equal_reference(case, path):
    """With tiny memory blocks (read-out blocks of one step, step groups in the weight-gradient
    GEMMs, forward blocks in step_losses and in the steps before the window), no layer fused (the
    large-layer path) or all (the one-call small path), and up to five uneven batch chunks (more
    chunks than pool threads), the kernels still equal the references."""
    prob, K1, K2 = case

    def five_chunks(net, B):
        cuts = sorted({0, B, *(B * c * c // 25 for c in range(1, 5))})
        return list(zip(cuts[:-1], cuts[1:]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_layers, "_BLOCK_ELEMENTS", 8)
        mp.setattr(cpu, "_FUSE_BYTES", 1 << 62 if path == "small" else 0)
        mp.setattr(cpu, "_SMALL_MIN_ROWS32", 0)
        mp.setattr(cpu, "_chunks", five_chunks)
        (l_ref, g_ref, S_ref), (l_got, g_got, S_got) = _bptt_both(prob, K1, K2)
        x, y, S = _validated(prob)
        L_ref, _ = step_losses_reference(prob.net, x, y, S, prob.loss)
        L_got, _ = cpu.step_losses(prob.net, x, y, S, prob.loss)
        phi_got = cpu.grad_norms(prob.net, x, y, S, prob.loss)
    assert abs(l_got - l_ref) <= 1e-12 * abs(l_ref)
    _assert_grads_close64(prob, K1, K2, g_ref, g_got)
    _assert_close64(L_ref, L_got, "L")
    _assert_close64(grad_norms_reference(prob.net, x, y, S, prob.loss), phi_got, "phi")


@pytest.mark.skipif(np.finfo(np.longdouble).nmant < 60, reason="needs x87 extended precision")
def test_elementary_functions_within_3_ulp():
    """The kernels' vectorisable sigmoid and tanh (standalone and through _gate) are within 3 ulp
    of the truth (computed in extended precision) for float64 and float32 (float32 tanh within
    1 ulp), over
    arguments from 1e-7 to hundreds in magnitude whose results are normal numbers; 0, 1 and +-1
    exactly far out."""
    from numba import njit

    from npbptt.kernels._cpu_jit import _gate, sigmoid, tanh

    @njit
    def evaluate(z, out, which):
        for j in range(z.shape[0]):
            if which == 0:
                out[j] = sigmoid(z[j])
            elif which == 1:
                out[j] = tanh(z[j])
            else:
                out[j] = _gate(z[j], which == 3)

    rng = np.random.default_rng(7)
    for dt, lim in ((np.float64, 700.0), (np.float32, 80.0)):
        z = np.concatenate([rng.standard_normal(20000) * s for s in (1e-7, 1e-3, 0.1, 1, 3, 10, 40, 300)])
        z = z[np.abs(z) <= lim].astype(dt)
        zl = z.astype(np.longdouble)
        sig, th = 1 / (1 + np.exp(-zl)), np.tanh(zl)
        for which, truth in ((0, sig), (1, th), (2, sig), (3, th)):
            out = np.empty_like(z)
            evaluate(z, out, which)
            ulp = np.abs(out.astype(np.longdouble) - truth) / np.spacing(np.abs(truth.astype(dt))).astype(np.longdouble)
            # float32 tanh is rounded once from float64: within 1 ulp (NumPy's: 1.4)
            bound = 1.0 if dt == np.float32 and which in (1, 3) else 3.0
            assert ulp.max() <= bound, (dt, which, float(ulp.max()), z[np.argmax(ulp)])
        if dt == np.float32:
            # float32 tanh is a rational function clamped at |z| = 9.1: every float32 from 8.5 to
            # 9.6 (where tanh rounds to 1 and the clamp acts) and a dense grid of the whole range
            lo, hi = np.array([8.5, 9.6], np.float32).view(np.int32)
            z = np.arange(lo, hi, dtype=np.int32).view(np.float32)
            z = np.concatenate([z, -z, np.linspace(-9.6, 9.6, 400001, dtype=np.float32)])
            truth = np.tanh(z.astype(np.longdouble))
            out = np.empty_like(z)
            evaluate(z, out, 1)
            ulp = np.abs(out.astype(np.longdouble) - truth) / np.spacing(np.abs(truth.astype(dt))).astype(np.longdouble)
            assert ulp.max() <= 1.0, (float(ulp.max()), z[np.argmax(ulp)])
        far = np.array([-1000, -150, -100, 100, 150, 1000], dt)
        out = np.empty_like(far)
        for which, expect in ((0, [0, 0, 0, 1, 1, 1]), (1, [-1, -1, -1, 1, 1, 1]),
                              (2, [0, 0, 0, 1, 1, 1]), (3, [-1, -1, -1, 1, 1, 1])):
            evaluate(far, out, which)
            np.testing.assert_allclose(out, np.array(expect, dt), rtol=0, atol=1e-30)


def test_workspace_reuse_does_not_leak_between_calls():
    """Results of one call are not overwritten by a later call that reuses the scratch buffers."""
    rng = np.random.default_rng(11)
    p1 = make_problem(rng, kind="lstm", layers=2, T=6, B=20, H=5)
    p2 = make_problem(rng, kind="lstm", layers=2, T=6, B=20, H=5)
    first = _bptt_both(p1, 5, 3)[1]
    kept = ({k: v.copy() for k, v in first[1].items()}, tuple(s.copy() for s in first[2]))
    _bptt_both(p2, 5, 3)
    for n in kept[0]:
        np.testing.assert_array_equal(first[1][n], kept[0][n])
    for a, b in zip(first[2], kept[1]):
        np.testing.assert_array_equal(a, b)


# --- dispatch -------------------------------------------------------------------------------------
class _ShiftedRNN(RNN):
    """An RNN whose step differs from the stock one (it adds 1 to the state): the kernels must not
    run it as a plain RNN."""

    def step(self, S_prev, x_t):
        S, cache = super().step(S_prev, x_t)
        return tuple(s + 1.0 for s in S), cache


def test_networks_with_their_own_step_run_the_reference():
    rng = np.random.default_rng(2)
    prob = make_problem(rng, kind="rnn", layers=2, T=5, B=16, H=4)
    net = _ShiftedRNN(3, 4, 2, 5, vocab_size=7, seed=1)
    net.params = prob.net.params
    assert not cpu.supports(net) and cpu.supports(prob.net)
    assert backends.resolve("bptt", "numba", net) is bptt_reference      # decided in one place
    assert backends.resolve("bptt", "numba", prob.net) is cpu.bptt
    x, y, S = check_inputs(net, prob.x, prob.y, prob.state, prob.loss)
    ref = bptt_reference(net, x, y, S, 4, 2, prob.loss)
    got = npbptt.bptt(net, prob.x, prob.y, prob.state, 4, 2, prob.loss, backend="numba")
    plain = cpu.bptt(prob.net, x, y, S, 4, 2, prob.loss)
    assert got.loss == ref[0] != plain[0]
    np.testing.assert_array_equal(got.state, ref[2][0])
    np.testing.assert_array_equal(npbptt.grad_norms(net, prob.x, prob.y, prob.state, prob.loss,
                                                    backend="numba"),
                                  grad_norms_reference(net, x, y, S, prob.loss))


def test_default_backend_is_numba_and_public_entry_points_use_it():
    assert backends.default_backend() == "numba"
    assert backends.resolve("bptt", None, None) is cpu.bptt
    assert backends.resolve("grad_norms", "numba", None) is cpu.grad_norms
    prob = make_problem(np.random.default_rng(4), kind="lstm", layers=2, T=6, B=3)
    a = npbptt.bptt(prob.net, prob.x, prob.y, prob.state, 4, 2, prob.loss)
    b = npbptt.bptt(prob.net, prob.x, prob.y, prob.state, 4, 2, prob.loss, backend="numpy")
    for n in b.grads:
        _assert_close64(b.grads[n], a.grads[n], n)


def test_results_gathered_by_the_caller_when_the_kernels_wait_runs_out():
    """The calling thread's kernel sums the chunks' gradients and losses once the worker threads
    are done; when its bounded wait for them runs out (here: a wait of one round), the caller
    gathers them itself after the workers have handed in (jit.gather).  Both ways give exactly
    the same loss, gradients, state and probe norms, for several chunks, and agree with the
    reference."""
    prob = make_problem(np.random.default_rng(21), kind="lstm", layers=2, T=7, B=24, H=5)
    x, y, S = _validated(prob)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "_chunks", lambda net, B: [(0, 7), (7, 15), (15, B)])
        normal = cpu.bptt(prob.net, x, y, S, 6, 3, prob.loss)
        phi = cpu.grad_norms(prob.net, x, y, S, prob.loss)
        mp.setattr(cpu_small, "_SPINS", 1)
        for _ in range(3):
            waited = cpu.bptt(prob.net, x, y, S, 6, 3, prob.loss)
            assert waited[0] == normal[0]
            assert all(np.array_equal(waited[1][n], normal[1][n]) for n in normal[1])
            assert all(np.array_equal(a, b) for a, b in zip(waited[2], normal[2]))
            assert np.array_equal(cpu.grad_norms(prob.net, x, y, S, prob.loss), phi)
    ref = bptt_reference(prob.net, x, y, S, 6, 3, prob.loss)
    assert abs(normal[0] - ref[0]) <= 1e-12 * abs(ref[0])
    _assert_grads_close64(prob, 6, 3, ref[1], normal[1])
    _assert_close64(grad_norms_reference(prob.net, x, y, S, prob.loss), phi, "phi")


# --- tied read-out and dropout masks (issue 18) -------------------------------------------------
@st.composite
def lm_problems(draw, max_T=9):
    """Problems of the language models' features over every supported configuration: a tied
    read-out (``tie_weights``: logits h E^T + b_dec, input_size = hidden_size, output_size =
    vocab_size) or not, dropout masks (drawn by ``net.dropout_masks`` at p = 0.2 or 0.5, or
    arbitrary positive masks) or none, with embedding or dense input, cells, activations, 1-3
    layers, both losses, batch 1..40; and a valid (K1, K2).  Returns (problem, K1, K2, masks)."""
    kind = draw(st.sampled_from(["lstm", "rnn"]))
    act = draw(st.sampled_from(["tanh", "relu", "sigmoid", "linear"])) if kind == "rnn" else "tanh"
    T, B = draw(st.integers(1, max_T)), draw(st.integers(1, 40))
    L, H = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    tied = draw(st.booleans())
    embedding = tied or draw(st.booleans())
    V = draw(st.sampled_from([2, 7, 300]))
    O = V if tied else draw(st.integers(2, 6))
    E = H if tied else draw(st.integers(1, 5))
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    p = draw(st.sampled_from([0.2, 0.5]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    cls = npbptt.LSTM if kind == "lstm" else npbptt.RNN
    kw = dict(activation=act) if kind == "rnn" else {}
    net = cls(E, H, L, O, vocab_size=V if embedding else None, bias=draw(st.booleans()),
              seed=int(rng.integers(2**31)), tie_weights=tied, dropout=p, **kw)
    x = rng.integers(0, V, (T, B)) if embedding else rng.standard_normal((T, B, E))
    y = rng.integers(0, O, (T, B)) if loss == "cross_entropy" else rng.standard_normal((T, B, O))
    state = 0.5 * rng.standard_normal((L, B, H))
    if act == "relu":
        state = np.abs(state)
    state = (state, 0.5 * rng.standard_normal((L, B, H))) if kind == "lstm" else state
    masks = draw(st.sampled_from(["none", "drawn", "arbitrary"]))
    if masks == "drawn":
        masks = net.dropout_masks(T, B, rng)
    elif masks == "arbitrary":
        masks = DropoutMasks(rng.uniform(0, 2, (T, B, E)), rng.uniform(0, 2, (T, B, H)))
    else:
        masks = None
    K1 = draw(st.integers(0, T + 1))
    K2 = draw(st.integers(1, min(T, K1 + 1)))
    return Problem(net, x, y, state, loss), K1, K2, masks


def _per_example_masked(prob, K1, K2, masks, name):
    """sum_b |g_b| / B of gradient ``name`` (the rounding scale of a batch sum, as
    _assert_grads_close64), with the masks' rows."""
    x, y, S = _validated(prob)
    B = x.shape[1]
    total = 0
    for b in range(B):
        kw = {} if masks is None else dict(masks=DropoutMasks(masks.input[:, b:b + 1],
                                                              masks.output[:, b:b + 1]))
        g_b = bptt_reference(prob.net, x[:, b:b + 1], y[:, b:b + 1], tuple(s[:, b:b + 1] for s in S),
                             K1, K2, prob.loss, **kw)[1]
        total = total + np.abs(g_b[name]) / B
    return total


@settings(max_examples=60, deadline=None)
@given(lm_problems(), PATHS)
def test_tied_and_masked_kernels_equal_reference_float64(case, path):
    """bptt and step_losses with a tied read-out and/or dropout masks, and the probe (no masks)
    of the tied network, equal the NumPy reference to 1e-12; the gradient has the tied network's
    names (``embedding.weight`` the sum of both uses, no ``decoder.weight``)."""
    prob, K1, K2, masks = case
    x, y, S = _validated(prob)
    kw = {} if masks is None else dict(masks=masks)
    with _layers_path(path):
        l_ref, g_ref, S_ref = bptt_reference(prob.net, x, y, S, K1, K2, prob.loss, **kw)
        l_got, g_got, S_got = cpu.bptt(prob.net, x, y, S, K1, K2, prob.loss, **kw)
        L_ref, SL_ref = step_losses_reference(prob.net, x, y, S, prob.loss, **kw)
        L_got, SL_got = cpu.step_losses(prob.net, x, y, S, prob.loss, **kw)
        phi = cpu.grad_norms(prob.net, x, y, S, prob.loss)
    assert abs(l_got - l_ref) <= 1e-12 * abs(l_ref)
    assert list(g_got) == list(g_ref) == list(prob.net.params)
    for n in g_ref:
        assert g_got[n].dtype == np.float64 and g_got[n].shape == g_ref[n].shape, n
        err = np.abs(g_got[n] - g_ref[n]).max(initial=0.0)
        if err > 1e-12 * np.abs(g_ref[n]).max(initial=0.0):
            assert err <= 1e-12 * _per_example_masked(prob, K1, K2, masks, n).max(), (n, err)
    for a, b in zip(S_ref + SL_ref, S_got + SL_got):
        _assert_close64(a, b, "state")
    _assert_close64(L_ref, L_got, "L")
    _assert_close64(grad_norms_reference(prob.net, x, y, S, prob.loss), phi, "phi")


@settings(max_examples=25, deadline=None)
@given(lm_problems(max_T=7), PATHS)
def test_tied_and_masked_float32_error_at_most_twice_the_float32_references(case, path):
    prob, K1, K2, masks = case
    with _layers_path(path):
        _float32_check(prob, K1, K2, masks)


def test_masks_and_tied_reach_the_kernels_decided_in_one_place():
    """backends.resolve hands masked bptt / step_losses calls and tied networks to these kernels
    (``takes_masks``, ``supports``), the probe's masked calls (there are none) and networks with
    their own step to the reference; a masked call of a small network runs layer by layer, and
    with all-ones masks it equals the unmasked call to round-off."""
    net = npbptt.LSTM(6, 6, 1, 9, vocab_size=9, tie_weights=True, dropout=0.2, seed=3)
    assert cpu.supports(net) and cpu.takes_masks("bptt", net) and cpu.takes_masks("step_losses", net)
    assert not cpu.takes_masks("grad_norms", net)
    assert backends.resolve("bptt", "numba", net, masked=True) is cpu.bptt
    assert backends.resolve("step_losses", "numba", net, masked=True) is cpu.step_losses
    assert backends.resolve("grad_norms", "numba", net) is cpu.grad_norms
    assert backends.resolve("grad_norms", "numba", net, masked=True) is grad_norms_reference
    own = _ShiftedRNN(3, 4, 2, 5, vocab_size=7, seed=1)
    assert not cpu.takes_masks("bptt", own)
    assert backends.resolve("bptt", "numba", own, masked=True) is bptt_reference
    rng = np.random.default_rng(0)
    T, B = 5, 32
    x, y = rng.integers(0, 9, (T, B)), rng.integers(0, 9, (T, B))
    ones = DropoutMasks(np.ones((T, B, 6)), np.ones((T, B, 6)))
    a = npbptt.bptt(net, x, y, net.init_state(B), 4, 2, backend="numba", masks=ones)
    b = npbptt.bptt(net, x, y, net.init_state(B), 4, 2, backend="numba")
    assert "decoder.weight" not in a.grads and list(a.grads) == list(net.params)
    for n in b.grads:
        _assert_close64(b.grads[n], a.grads[n], n)
    masks = net.dropout_masks(T, B, rng)
    c = npbptt.bptt(net, x, y, net.init_state(B), 4, 2, backend="numba", masks=masks)
    d = npbptt.bptt(net, x, y, net.init_state(B), 4, 2, backend="numpy", masks=masks)
    assert c.loss != b.loss and abs(c.loss - d.loss) <= 1e-12 * abs(d.loss)
    for n in d.grads:
        _assert_close64(d.grads[n], c.grads[n], n)


@settings(max_examples=20, deadline=None)
@given(lm_problems(max_T=9))
def test_tied_and_masked_blocked_paths_equal_reference(case):
    """With tiny memory blocks (step_losses' forward blocks and the steps before the window in
    blocks of one step, the read-out in blocks of one step) and five uneven batch chunks, the
    masks of each block and chunk are the right ones: bptt and step_losses still equal the
    reference."""
    prob, K1, K2, masks = case
    x, y, S = _validated(prob)
    kw = {} if masks is None else dict(masks=masks)

    def five_chunks(net, B):
        cuts = sorted({0, B, *(B * c * c // 25 for c in range(1, 5))})
        return list(zip(cuts[:-1], cuts[1:]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_layers, "_BLOCK_ELEMENTS", 8)
        mp.setattr(cpu, "_FUSE_BYTES", 0)
        mp.setattr(cpu, "_chunks", five_chunks)
        l_ref, g_ref, _ = bptt_reference(prob.net, x, y, S, K1, K2, prob.loss, **kw)
        l_got, g_got, _ = cpu.bptt(prob.net, x, y, S, K1, K2, prob.loss, **kw)
        L_ref, _ = step_losses_reference(prob.net, x, y, S, prob.loss, **kw)
        L_got, _ = cpu.step_losses(prob.net, x, y, S, prob.loss, **kw)
    assert abs(l_got - l_ref) <= 1e-12 * abs(l_ref)
    for n in g_ref:
        err = np.abs(g_got[n] - g_ref[n]).max(initial=0.0)
        if err > 1e-12 * np.abs(g_ref[n]).max(initial=0.0):
            assert err <= 1e-12 * _per_example_masked(prob, K1, K2, masks, n).max(), (n, err)
    _assert_close64(L_ref, L_got, "L")


def test_tied_and_masked_at_a_wider_layer_float32_and_float64():
    """A tied LSTM of 96 units (beyond _FUSE_BYTES in float32 and float64: the layer-by-layer
    path without monkeypatching, W_hh in blocks of 64 gates) with drawn dropout masks, the steps
    before the window included: float64 equals the reference to 1e-12, float32's error is at most
    twice the float32 reference's."""
    rng = np.random.default_rng(96)
    net = npbptt.LSTM(96, 96, 1, 20, vocab_size=20, tie_weights=True, dropout=0.2, seed=1)
    T, B = 7, 16
    x, y = rng.integers(0, 20, (T, B)), rng.integers(0, 20, (T, B))
    state = tuple(0.5 * rng.standard_normal((1, B, 96)) for _ in range(2))
    masks = net.dropout_masks(T, B, rng)
    prob = Problem(net, x, y, state, "cross_entropy")
    assert not cpu._fused(net, 0) and 32 * 96 ** 2 > cpu._FUSE_BYTES       # float32 too
    xx, yy, S = _validated(prob)
    l_ref, g_ref, _ = bptt_reference(net, xx, yy, S, 5, 3, "cross_entropy", masks=masks)
    l_got, g_got, _ = cpu.bptt(net, xx, yy, S, 5, 3, "cross_entropy", masks=masks)
    assert abs(l_got - l_ref) <= 1e-12 * abs(l_ref)
    for n in g_ref:
        _assert_close64(g_ref[n], g_got[n], n)
    _float32_check(prob, 5, 3, masks)


def test_small_path_records_name_the_jitted_parameters_in_order():
    """The small path's argument records (cpu_small.SmallForward / SmallBackward) are the leading
    parameters of jit.small_forward / small_backward by name and in order, so that ``*record``
    passes each array where the kernel expects it; the call adds exactly the remaining ones."""
    import inspect
    from npbptt.kernels import _cpu_jit as jit
    for record, kernel, rest in ((cpu_small.SmallForward, jit.small_forward, ("hout", "cout", "posted")),
                                 (cpu_small.SmallBackward, jit.small_backward,
                                  ("gout", "val", "flags", "spins"))):
        params = tuple(inspect.signature(kernel.py_func).parameters)
        assert params == record._fields + rest, (record.__name__, params)
