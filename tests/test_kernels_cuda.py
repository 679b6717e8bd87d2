"""The CUDA kernels (npbptt.kernels.gpu) equal the NumPy references, on tiny shapes.

Where no GPU is present the tests run under numba's CUDA simulator, which must be switched on
before numba.cuda is first imported: ``test_cuda_kernels_pass_under_the_simulator`` reruns this
module in a subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (so a plain ``pytest tests/`` covers it);
the other tests run in-process when a GPU (or the simulator) is available and are skipped
otherwise.  The simulator runs every GPU thread as a Python thread (~10^4 times slower than
NumPy), hence the tiny shapes and few examples.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

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


@st.composite
def tiny_problems(draw):
    kind = draw(st.sampled_from(["lstm", "rnn"]))
    act = draw(st.sampled_from(["tanh", "relu", "sigmoid", "linear"])) if kind == "rnn" else "tanh"
    T = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    prob = make_problem(rng, kind=kind, activation=act, layers=draw(st.integers(1, 2)),
                        embedding=draw(st.booleans()),
                        loss=draw(st.sampled_from(["cross_entropy", "mse"])), T=T,
                        B=draw(st.integers(1, 3)), H=draw(st.integers(1, 3)),
                        E=draw(st.integers(1, 2)), O=draw(st.integers(2, 3)),
                        bias=draw(st.booleans()))
    K1 = draw(st.integers(0, T))
    return prob, K1, draw(st.integers(1, min(T, K1 + 1)))


@needs_cuda
@SETTINGS
@given(tiny_problems())
def test_cuda_bptt_equals_reference_float64(case):
    prob, K1, K2 = case
    x, y, S = check_inputs(prob.net, prob.x, prob.y, prob.state, prob.loss)
    l_ref, g_ref, S_ref = bptt_reference(prob.net, x, y, S, K1, K2, prob.loss)
    l_got, g_got, S_got = gpu.bptt(prob.net, x, y, S, K1, K2, prob.loss)
    assert abs(l_got - l_ref) <= 1e-12 * abs(l_ref)
    for n in g_ref:
        _assert_close64(g_ref[n], g_got[n], n)
    for a, b in zip(S_ref, S_got):
        _assert_close64(a, b, "state")


@needs_cuda
@SETTINGS
@given(tiny_problems())
def test_cuda_step_losses_and_grad_norms_equal_reference_float64(case):
    prob, _, _ = case
    x, y, S = check_inputs(prob.net, prob.x, prob.y, prob.state, prob.loss)
    L_ref, S_ref = step_losses_reference(prob.net, x, y, S, prob.loss)
    L_got, S_got = gpu.step_losses(prob.net, x, y, S, prob.loss)
    _assert_close64(L_ref, L_got, "L")
    for a, b in zip(S_ref, S_got):
        _assert_close64(a, b, "state")
    _assert_close64(grad_norms_reference(prob.net, x, y, S, prob.loss),
                    gpu.grad_norms(prob.net, x, y, S, prob.loss), "phi")


@needs_cuda
@settings(max_examples=4, deadline=None)
@given(tiny_problems())
def test_cuda_float32_error_at_most_twice_the_float32_references(case):
    prob, K1, K2 = case
    p32, p64 = _as_float32(prob)
    x, y, S = check_inputs(p32.net, p32.x, p32.y, p32.state, prob.loss)
    x64, y64, S64 = check_inputs(p64.net, p64.x, p64.y, p64.state, prob.loss)
    l64, g64, _ = bptt_reference(p64.net, x64, y64, S64, K1, K2, prob.loss)
    lr, gr, _ = bptt_reference(p32.net, x, y, S, K1, K2, prob.loss)
    lk, gk, _ = gpu.bptt(p32.net, x, y, S, K1, K2, prob.loss)
    assert all(v.dtype == np.float32 for v in gk.values())
    names = list(g64)
    _assert_float32_as_good([gr[n] for n in names], [gk[n] for n in names], [g64[n] for n in names],
                            "grads")
    _assert_float32_as_good([lr], [lk], [l64], "loss")
    phi64 = grad_norms_reference(p64.net, x64, y64, S64, prob.loss)
    _assert_float32_as_good([grad_norms_reference(p32.net, x, y, S, prob.loss)],
                            [gpu.grad_norms(p32.net, x, y, S, prob.loss)], [phi64], "phi")


@needs_cuda
def test_cuda_networks_with_their_own_step_run_the_reference():
    prob = make_problem(np.random.default_rng(2), kind="rnn", layers=1, T=3, B=2, H=2)
    net = _ShiftedRNN(3, 2, 1, 5, vocab_size=7, seed=1)
    net.params = prob.net.params
    x, y, S = check_inputs(net, prob.x, prob.y, prob.state, prob.loss)
    ref = bptt_reference(net, x, y, S, 2, 2, prob.loss)
    got = gpu.bptt(net, x, y, S, 2, 2, prob.loss)
    assert got[0] == ref[0]
    for n in ref[1]:
        np.testing.assert_array_equal(got[1][n], ref[1][n])
