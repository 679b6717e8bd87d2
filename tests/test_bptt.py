"""BPTT(K1, K2) of npbptt.bptt against finite differences, Eq. (15)'s double sum, Eq. (3)'s
g_K built from explicit Jacobian products (Eq. 4), full BPTT, and streaming (Eq. 17)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npbptt
from npbptt.losses import LOSSES
from problems import make_problem, problems, problems_with_K

SETTINGS = settings(max_examples=25, deadline=None)


def _state_before(net, x, state, t0):
    """The internal state entering step t0 (0-based), by the network's own forward step."""
    S = net.to_internal(state)
    for t in range(t0):
        S, _ = net.step(S, x[t])
    return S


def _surrogate(prob, K1, K2):
    """The truncated objective (1/K2) sum of the last K2 losses, as a function of the parameters,
    with the state entering step T-K1 frozen at its value under the current parameters."""
    net, x, y = prob.net, prob.x, prob.y
    T = x.shape[0]
    t0 = max(0, T - 1 - K1)
    S0 = net.to_public(tuple(s.copy() for s in _state_before(net, x, prob.state, t0)))
    return lambda: npbptt.step_losses(net, x[t0:], y[t0:], S0, prob.loss, backend="numpy")[0][-K2:].mean()


def _fd_check(prob, K1, K2, grads, n_coords=6, eps=1e-6, seed=0):
    """Central differences on up to ``n_coords`` random coordinates of every parameter."""
    f = _surrogate(prob, K1, K2)
    rng = np.random.default_rng(seed)
    for name, p in prob.net.params.items():
        flat = p.reshape(-1)
        scale = max(1.0, np.abs(grads[name]).max())
        for i in rng.choice(flat.size, min(n_coords, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + eps
            fp = f()
            flat[i] = old - eps
            fm = f()
            flat[i] = old
            fd = (fp - fm) / (2 * eps)
            assert abs(fd - grads[name].reshape(-1)[i]) <= 2e-7 * scale, (name, i, fd)


@SETTINGS
@given(problems_with_K())
def test_bptt_equals_central_finite_differences(case):
    prob, K1, K2 = case
    res = npbptt.bptt(prob.net, prob.x, prob.y, prob.state, K1, K2, prob.loss, backend="numpy")
    assert res.loss == pytest.approx(_surrogate(prob, K1, K2)(), rel=1e-13)
    _fd_check(prob, K1, K2, res.grads)


def _eq15_double_sum(prob, K1, K2):
    """Eq. (15) literally: for each loss L_{s-k'} separately, sum over lags k of
    dL_{s-k'}/dS_{s-k} . dS_{s-k}/dtheta, one backward pass per loss (no shared b_k)."""
    net, x, y = prob.net, prob.x, prob.y
    T, B = x.shape[:2]
    K1 = min(K1, T - 1)
    S = _state_before(net, x, prob.state, T - 1 - K1)
    caches, tops = [], []
    for t in range(T - 1 - K1, T):
        S, c = net.step(S, x[t])
        caches.append(c)
        tops.append(S[0][-1])
    total = net.zero_grads()
    for kp in range(K2):                       # loss L_{s-k'}
        i = K1 - kp
        _, dout = LOSSES[prob.loss](net.readout(tops[i]), y[T - 1 - kp])
        d_readout, dh = net.readout_vjp(tops[i], dout / B)
        for n, v in d_readout.items():
            total[n] += v / K2
        d = tuple(np.zeros_like(s) for s in S)
        d[0][-1] += dh                         # dL_{s-k'}/dS_{s-k'}
        for k in range(kp, K1 + 1):            # lags k' .. K1
            for n, v in npbptt.vjp_params(net, caches[K1 - k], d).items():
                total[n] += v / K2
            d = npbptt.vjp_state(net, caches[K1 - k], d)
    return total


@SETTINGS
@given(problems_with_K())
def test_eq16_recursion_equals_eq15_double_sum(case):
    prob, K1, K2 = case
    res = npbptt.bptt(prob.net, prob.x, prob.y, prob.state, K1, K2, prob.loss, backend="numpy")
    ref = _eq15_double_sum(prob, K1, K2)
    for n in ref:
        np.testing.assert_allclose(res.grads[n], ref[n], rtol=1e-12,
                                   atol=1e-13 * max(1.0, np.abs(ref[n]).max()))


def _jacobian(f, n_in, n_out):
    """Dense Jacobian of a linear map given by its VJP f: R^{n_out} -> R^{n_in}: J (n_out, n_in)."""
    return np.stack([f(e) for e in np.eye(n_out)])


@settings(max_examples=15, deadline=None)
@given(problems(max_T=6), st.integers(0, 6))
def test_bptt_K_1_equals_eq3_g_K_from_explicit_jacobian_products(prob, K):
    """BPTT(K, 1) = g_K of Eq. (3), where dL_s/dS_{s-k} is Eq. (4)'s product of explicit Jacobian
    matrices dS_{t}/dS_{t-1} (one example, B = 1)."""
    net = prob.net
    x, y = prob.x[:, :1], prob.y[:, :1]
    state = tuple(s[:, :1] for s in prob.state) if net.kind == "lstm" else prob.state[:, :1]
    T = x.shape[0]
    K = min(K, T - 1)
    S = net.to_internal(state)
    caches, Ss = [], []
    for t in range(T):
        S, c = net.step(S, x[t])
        caches.append(c)
    shapes = [s.shape for s in S]
    n = sum(int(np.prod(s)) for s in shapes)

    def unflat(v):
        parts, o = [], 0
        for shp in shapes:
            m = int(np.prod(shp))
            parts.append(v[o:o + m].reshape(shp))
            o += m
        return tuple(parts)

    flat = lambda tup: np.concatenate([a.reshape(-1) for a in tup])
    # Eq. (4): dL_s/dS_{s-k} = dL_s/dS_s prod_{r=1}^{k} dS_{s-r+1}/dS_{s-r}
    _, dout = LOSSES[prob.loss](net.readout(S[0][-1]), y[T - 1])
    d_readout, dh = net.readout_vjp(S[0][-1], dout)
    dS = tuple(np.zeros(shp) for shp in shapes)
    dS[0][-1] += dh
    row = flat(dS)
    g = {k: v.copy() for k, v in d_readout.items()}       # dL_s/dtheta (direct term)
    for k in range(K + 1):
        for name, v in npbptt.vjp_params(net, caches[T - 1 - k], unflat(row)).items():
            g[name] = g.get(name, 0) + v                   # Eq. (3): + dL_s/dS_{s-k} dS_{s-k}/dtheta
        J = _jacobian(lambda e: flat(npbptt.vjp_state(net, caches[T - 1 - k], unflat(e))), n, n)
        row = row @ J                                      # one more factor of Eq. (4)
    res = npbptt.bptt(net, x, y, state, K, 1, prob.loss, backend="numpy")
    for name, v in res.grads.items():
        np.testing.assert_allclose(v, g.get(name, np.zeros_like(v)), rtol=1e-12,
                                   atol=1e-13 * max(1.0, np.abs(v).max()))


@settings(max_examples=15, deadline=None)
@given(problems())
def test_full_bptt_is_K1_T_minus_1_K2_T_and_equals_finite_differences(prob):
    T = prob.x.shape[0]
    full = npbptt.bptt(prob.net, prob.x, prob.y, prob.state, T - 1, T, prob.loss, backend="numpy")
    longer = npbptt.bptt(prob.net, prob.x, prob.y, prob.state, T + 5, T, prob.loss, backend="numpy")
    L, _ = npbptt.step_losses(prob.net, prob.x, prob.y, prob.state, prob.loss, backend="numpy")
    assert full.loss == pytest.approx(L.mean(), rel=1e-13)
    for n in full.grads:
        np.testing.assert_array_equal(full.grads[n], longer.grads[n])
    _fd_check(prob, T - 1, T, full.grads)


@settings(max_examples=15, deadline=None)
@given(problems(max_T=12), st.integers(1, 5), st.integers(0, 4))
def test_streaming_chunks_carry_the_state_like_one_long_forward(prob, K, extra):
    """Eq. (17): the chunk losses and the final state equal those of one forward pass."""
    K1 = K - 1 + extra
    L, final = npbptt.step_losses(prob.net, prob.x, prob.y, prob.state, prob.loss, backend="numpy")
    seen = []
    for chunk, res in npbptt.stream(prob.net, prob.x, prob.y, prob.state, K, K1, prob.loss, backend="numpy"):
        assert chunk.stop - chunk.start <= K
        assert res.loss == pytest.approx(L[chunk].mean(), rel=1e-12)
        seen.extend(range(chunk.start, chunk.stop))
    assert seen == list(range(prob.x.shape[0]))
    for a, b in zip(prob.net.to_internal(res.state), prob.net.to_internal(final)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_streaming_chunk_gradient_is_bptt_on_its_window():
    """Each streamed gradient equals bptt(K1, K) on the window ending at the chunk's end, from
    the state of a forward pass up to the window's start."""
    prob = make_problem(np.random.default_rng(3), kind="lstm", layers=2, T=17, B=2)
    K, K1 = 4, 8
    for chunk, res in npbptt.stream(prob.net, prob.x, prob.y, prob.state, K, K1, backend="numpy"):
        a = max(0, chunk.stop - K1 - 1)
        S = prob.net.to_public(_state_before(prob.net, prob.x, prob.state, a))
        ref = npbptt.bptt(prob.net, prob.x[a:chunk.stop], prob.y[a:chunk.stop], S,
                          min(K1, chunk.stop - a - 1), chunk.stop - chunk.start, backend="numpy")
        for n in ref.grads:
            np.testing.assert_allclose(res.grads[n], ref.grads[n], rtol=1e-12, atol=1e-15)


def test_float32_networks_compute_in_float32_and_agree_with_float64():
    rng = np.random.default_rng(5)
    p64 = make_problem(rng, kind="lstm", layers=2, T=8, B=4, H=6)
    net32 = p64.net.copy()
    net32.dtype = np.dtype(np.float32)
    net32.params = {k: v.astype(np.float32) for k, v in p64.net.params.items()}
    st32 = tuple(s.astype(np.float32) for s in p64.state)
    r64 = npbptt.bptt(p64.net, p64.x, p64.y, p64.state, 5, 3, backend="numpy")
    r32 = npbptt.bptt(net32, p64.x, p64.y, st32, 5, 3, backend="numpy")
    assert all(v.dtype == np.float32 for v in r32.grads.values())
    assert all(s.dtype == np.float32 for s in r32.state)
    for n in r64.grads:
        err = np.abs(r32.grads[n] - r64.grads[n]).max() / np.abs(r64.grads[n]).max()
        assert 0 < err < 1e-5, (n, err)


def test_writing_into_params_changes_the_network():
    prob = make_problem(np.random.default_rng(6), kind="rnn", T=4)
    before = npbptt.bptt(prob.net, prob.x, prob.y, prob.state, 3, 2, backend="numpy").loss
    prob.net.params["weight_hh_l0"][...] *= 2.0
    after = npbptt.bptt(prob.net, prob.x, prob.y, prob.state, 3, 2, backend="numpy").loss
    assert before != after


def test_parameter_names_and_shapes_follow_pytorch():
    net = npbptt.LSTM(input_size=6, hidden_size=50, num_layers=2, output_size=8, vocab_size=8, seed=0)
    shapes = {k: v.shape for k, v in net.params.items()}
    assert shapes == {"embedding.weight": (8, 6), "weight_ih_l0": (200, 6), "weight_hh_l0": (200, 50),
                      "bias_ih_l0": (200,), "bias_hh_l0": (200,), "weight_ih_l1": (200, 50),
                      "weight_hh_l1": (200, 50), "bias_ih_l1": (200,), "bias_hh_l1": (200,),
                      "decoder.weight": (8, 50), "decoder.bias": (8,)}
    h, c = net.init_state(batch=64)
    assert h.shape == c.shape == (2, 64, 50) and not h.any() and not c.any()
    rnn = npbptt.RNN(3, 4, num_layers=3, output_size=2, bias=False, activation="relu")
    assert sorted(rnn.params) == sorted(["decoder.bias", "decoder.weight"] +
                                        [f"weight_{a}_l{l}" for a in ("ih", "hh") for l in range(3)])
    assert rnn.init_state(5).shape == (3, 5, 4)
    torch = pytest.importorskip("torch")
    ref = torch.nn.LSTM(6, 50, 2)
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == \
        {k: v for k, v in shapes.items() if "_l" in k}


def test_same_seed_same_network_and_seed_changes_it():
    a, b, c = (npbptt.LSTM(3, 4, 2, 5, vocab_size=6, seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not np.array_equal(a.params["weight_hh_l0"], c.params["weight_hh_l0"])
