"""The CUDA kernels (npbptt.kernels.gpu) equal the NumPy references, on tiny shapes.

Where no GPU is present the tests run under numba's CUDA simulator, which must be switched on
before numba.cuda is first imported: ``test_cuda_kernels_pass_under_the_simulator`` reruns this
module in a subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (so a plain ``pytest tests/`` covers it);
the other tests run in-process when a GPU (or the simulator) is available and are skipped
otherwise.  The simulator runs every GPU thread as a Python thread (~10^4 times slower than
NumPy), hence the tiny shapes and few examples.
"""
import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npbptt import backends
from npbptt.bptt import bptt_reference, step_losses_reference
from npbptt.kernels import gpu
from npbptt.probe import grad_norms_reference
from npbptt.validate import check_inputs
from problems import make_problem
from test_kernels import _as_float32, _assert_close64, _assert_float32_as_good, _ShiftedRNN

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
needs_cuda = pytest.mark.skipif(not gpu.is_available(), reason="no CUDA GPU and simulator off")
SETTINGS = settings(max_examples=5, deadline=None)


def test_cuda_kernels_pass_under_the_simulator():
    if SIMULATOR:
        pytest.skip("already running under the simulator")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    here = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", os.path.join(here, "test_kernels_cuda.py")],
                          env=env, cwd=os.path.dirname(here), capture_output=True, text=True,
                          timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "skipped" in tail, tail      # the launcher itself is skipped


@pytest.fixture(autouse=True, scope="module")
def _every_launch_has_a_block():
    """Every kernel launch has at least one block and one thread per dimension.  A real GPU
    refuses an empty grid; the simulator runs it as a no-op (a one-step probe's GEMM into the
    layer below, with no rows, passed here and failed on an H100)."""
    real = gpu._k

    class Checked:
        def __init__(self, kernels):
            self.kernels = kernels

        def __getitem__(self, name):
            kernel = self.kernels[name]

            class Launch:
                def __getitem__(self, config):
                    for dims in config[:2]:
                        dims = dims if isinstance(dims, tuple) else (dims,)
                        assert all(int(d) >= 1 for d in dims), (name, config)
                    return kernel[config]
            return Launch()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu, "_k", lambda dt: Checked(real(dt)))
        yield


# The host-side choices of npbptt.kernels.gpu, forced either way: "layer" (one launch per layer,
# a block per batch row) or "step" (a launch per step over every row) for the recurrence, and
# weight-gradient GEMMs split across blocks or not.
PATHS = st.sampled_from([("layer", False), ("layer", True), ("step", False), ("step", True)])


@contextlib.contextmanager
def _paths(path):
    recurrence, split = path
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpu, "_STEP_MIN_H", 0 if recurrence == "step" else 1 << 30)
        mp.setattr(gpu, "_SPLIT_BELOW_BLOCKS", 1 << 30 if split else 0)
        yield


@st.composite
def _problems(draw, T, layers, B, H, E, O, K1_past_T=0, **more):
    """(problem, K1, K2) for the CUDA tests: cell, activation, input kind, loss and biases drawn,
    the sizes from the strategies given (``more``: further ``make_problem`` arguments, as
    strategies), K1 in 0..T + K1_past_T and K2 in 1..min(T, K1 + 1)."""
    kind = draw(st.sampled_from(["lstm", "rnn"]))
    act = draw(st.sampled_from(["tanh", "relu", "sigmoid", "linear"])) if kind == "rnn" else "tanh"
    T = draw(T)
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    prob = make_problem(rng, kind=kind, activation=act, layers=draw(layers),
                        embedding=draw(st.booleans()),
                        loss=draw(st.sampled_from(["cross_entropy", "mse"])), T=T,
                        B=draw(B), H=draw(H), E=draw(E), O=draw(O), bias=draw(st.booleans()),
                        **{name: draw(v) for name, v in more.items()})
    K1 = draw(st.integers(0, T + K1_past_T))
    return prob, K1, draw(st.integers(1, min(T, K1 + 1)))


def tiny_problems():
    """Sizes 1-3: the simulator runs every thread in Python."""
    return _problems(T=st.integers(1, 3), layers=st.integers(1, 2), B=st.integers(1, 3),
                     H=st.integers(1, 3), E=st.integers(1, 2), O=st.integers(2, 3))


@needs_cuda
@SETTINGS
@given(tiny_problems(), PATHS)
def test_cuda_bptt_equals_reference_float64(case, path):
    _float64_check(*case, path, _assert_each_close64)


def _assert_each_close64(prob, K1, K2, g_ref, g_got):
    for n in g_ref:
        _assert_close64(g_ref[n], g_got[n], n)


def _float64_check(prob, K1, K2, path, assert_grads):
    """bptt (loss, gradients by ``assert_grads``, final state), step_losses (losses, final state)
    and grad_norms on the GPU equal the references: float64, to 1e-12 relative."""
    x, y, S = check_inputs(prob.net, prob.x, prob.y, prob.state, prob.loss)
    l_ref, g_ref, S_ref = bptt_reference(prob.net, x, y, S, K1, K2, prob.loss)
    L_ref, SL_ref = step_losses_reference(prob.net, x, y, S, prob.loss)
    with _paths(path):
        l_got, g_got, S_got = gpu.bptt(prob.net, x, y, S, K1, K2, prob.loss)
        L_got, SL_got = gpu.step_losses(prob.net, x, y, S, prob.loss)
        phi_got = gpu.grad_norms(prob.net, x, y, S, prob.loss)
    assert abs(l_got - l_ref) <= 1e-12 * abs(l_ref)
    assert list(g_got) == list(g_ref)
    assert_grads(prob, K1, K2, g_ref, g_got)
    for a, b in zip([*S_ref, *SL_ref], [*S_got, *SL_got]):
        _assert_close64(a, b, "state")
    _assert_close64(L_ref, L_got, "L")
    _assert_close64(grad_norms_reference(prob.net, x, y, S, prob.loss), phi_got, "phi")


@needs_cuda
@settings(max_examples=4, deadline=None)
@given(tiny_problems(), PATHS)
def test_cuda_float32_error_at_most_twice_the_float32_references(case, path):
    _float32_check(*case, path)


def _float32_check(prob, K1, K2, path):
    """The float32 kernels' loss, gradients and phi are as good as the float32 reference's
    (test_kernels._assert_float32_as_good), against the float64 reference on the same values."""
    p32, p64 = _as_float32(prob)
    x, y, S = check_inputs(p32.net, p32.x, p32.y, p32.state, prob.loss)
    x64, y64, S64 = check_inputs(p64.net, p64.x, p64.y, p64.state, prob.loss)
    l64, g64, _ = bptt_reference(p64.net, x64, y64, S64, K1, K2, prob.loss)
    lr, gr, _ = bptt_reference(p32.net, x, y, S, K1, K2, prob.loss)
    with _paths(path):
        lk, gk, _ = gpu.bptt(p32.net, x, y, S, K1, K2, prob.loss)
        phik = gpu.grad_norms(p32.net, x, y, S, prob.loss)
    assert all(v.dtype == np.float32 for v in gk.values())
    names = list(g64)
    _assert_float32_as_good([gr[n] for n in names], [gk[n] for n in names], [g64[n] for n in names],
                            "grads")
    _assert_float32_as_good([lr], [lk], [l64], "loss")
    phi64 = grad_norms_reference(p64.net, x64, y64, S64, prob.loss)
    _assert_float32_as_good([grad_norms_reference(p32.net, x, y, S, prob.loss)], [phik], [phi64],
                            "phi")


@needs_cuda
@pytest.mark.parametrize("recurrence", ["layer", "step"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_one_step_window_with_layers(dtype, recurrence):
    """T = 1 with two layers: the probe has no step to backpropagate (phi is the read-out's
    gradient alone) and BPTT(0, 1) one step; the layers' empty products launch nothing."""
    for kind in ("lstm", "rnn"):
        prob = make_problem(np.random.default_rng(5), kind=kind, layers=2, T=1, B=2, H=3,
                            embedding=True, dtype=dtype)
        x, y, S = check_inputs(prob.net, prob.x, prob.y, prob.state, prob.loss)
        with _paths((recurrence, True)):
            got = gpu.grad_norms(prob.net, x, y, S, prob.loss)
            l_got, g_got, _ = gpu.bptt(prob.net, x, y, S, 0, 1, prob.loss)
        ref = grad_norms_reference(prob.net, x, y, S, prob.loss)
        np.testing.assert_allclose(got, ref, rtol=1e-12 if dtype == np.float64 else 1e-5)
        l_ref, g_ref, _ = bptt_reference(prob.net, x, y, S, 0, 1, prob.loss)
        for n in g_ref:
            np.testing.assert_allclose(g_got[n], g_ref[n], rtol=1e-12 if dtype == np.float64 else 1e-4,
                                       atol=1e-14 if dtype == np.float64 else 1e-6, err_msg=n)


@needs_cuda
def test_cuda_networks_with_their_own_step_run_the_reference():
    prob = make_problem(np.random.default_rng(2), kind="rnn", layers=1, T=3, B=2, H=2)
    net = _ShiftedRNN(3, 2, 1, 5, vocab_size=7, seed=1)
    net.params = prob.net.params
    x, y, S = check_inputs(net, prob.x, prob.y, prob.state, prob.loss)
    ref = bptt_reference(net, x, y, S, 2, 2, prob.loss)
    assert not gpu.supports(net) and backends.resolve("bptt", "cuda", net) is bptt_reference
    got = backends.resolve("bptt", "cuda", net)(net, x, y, S, 2, 2, prob.loss)
    assert got[0] == ref[0]
    for n in ref[1]:
        np.testing.assert_array_equal(got[1][n], ref[1][n])


# --- a real GPU only: realistic shapes ----------------------------------------------------------
needs_real_gpu = pytest.mark.skipif(SIMULATOR or not gpu.is_available(),
                                    reason="needs a real CUDA GPU (the simulator is too slow)")


def gpu_problems():
    """Problems of the sizes the GPU kernels meet: hidden sizes over the 256 threads of a
    recurrence block (each thread then takes several units), read-outs wider than the loss
    kernel's 128 threads, batch 1..65, up to 40 steps (the steps before the window in blocks)."""
    return _problems(T=st.integers(1, 40), layers=st.integers(1, 3), B=st.integers(1, 65),
                     H=st.sampled_from([1, 5, 31, 64, 257, 300]), E=st.integers(1, 40),
                     O=st.sampled_from([2, 9, 130, 600]), K1_past_T=1,
                     V=st.sampled_from([2, 7, 300]), scale=st.sampled_from([0.5, 1.0]))


@needs_real_gpu
@settings(max_examples=30, deadline=None)
@given(gpu_problems(), PATHS)
def test_cuda_realistic_shapes_equal_reference_float64(case, path):
    from test_kernels import _assert_grads_close64
    _float64_check(*case, path, _assert_grads_close64)


@needs_real_gpu
@settings(max_examples=15, deadline=None)
@given(gpu_problems(), PATHS)
def test_cuda_realistic_shapes_float32(case, path):
    _float32_check(*case, path)


@needs_cuda
def test_cuda_hostile_parameters_are_named_or_computed_as_the_reference():
    """The hostile-input cases of tests/test_hostile.py on the CUDA backend (tiny): a transposed,
    missing, NaN or wrongly typed parameter is a ValueError naming it; strided, Fortran-ordered and
    read-only parameters and a transposed square W_hh give the reference's result."""
    import npbptt
    from test_hostile import _call, _contiguous_net, _readonly, _reference, _strided
    rng = np.random.default_rng(11)
    prob = make_problem(rng, kind="lstm", T=2, B=2, H=2, E=3, O=3, V=4)
    net = prob.net
    bad = {"weight_ih_l0": np.ascontiguousarray(net.params["weight_ih_l0"].T),
           "decoder.bias": np.array([np.nan, 0.0, 0.0])}
    for name, value in bad.items():
        broken = net.copy()
        broken.params[name] = value
        with pytest.raises(ValueError, match=repr(name)):
            npbptt.bptt(broken, prob.x, prob.y, prob.state, 1, 1, backend="cuda")
    odd = net.copy()
    odd.params["weight_ih_l0"] = _strided(net.params["weight_ih_l0"])
    odd.params["decoder.weight"] = np.asfortranarray(net.params["decoder.weight"])
    odd.params["weight_hh_l0"] = _readonly(net.params["weight_hh_l0"].T.copy().T)   # Fortran view
    want = _reference("bptt", _contiguous_net(odd), prob.x, prob.y, prob.state, prob.loss)
    got = _call("bptt", odd, prob.x, prob.y, prob.state, prob.loss, "cuda")
    for g, w in zip(got, want):
        _assert_close64(w, g, "hostile")
