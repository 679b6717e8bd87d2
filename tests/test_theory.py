"""npbptt.theory: Theorem 1's quantities computed exactly, checked against npbptt.bptt, the probe,
finite differences, and the paper's examples (§3.1): nilpotent, resetting and lambda-stable RNNs.
npbptt.variants.ResettingRNN: its VJP against finite differences."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npbptt
from npbptt import theory
from npbptt.losses import LOSSES
from npbptt.variants import ResettingRNN
from problems import make_problem

FEW = settings(max_examples=25, deadline=None)
ROUND = 1e-12            # relative round-off slack of a float64 inequality


@st.composite
def small_problems(draw, kinds=("rnn", "lstm"), max_T=7, max_B=3):
    """RNN (tanh/sigmoid) or LSTM, 1-2 layers, embedding or dense input, non-zero biases,
    random initial state, either loss; ``scale`` spreads the recurrent weights' size."""
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return make_problem(rng, kind=kind, activation=draw(st.sampled_from(["tanh", "sigmoid"])),
                        layers=draw(st.integers(1, 2)), embedding=draw(st.booleans()),
                        loss=draw(st.sampled_from(["cross_entropy", "mse"])),
                        T=draw(st.integers(2, max_T)), B=draw(st.integers(1, max_B)),
                        H=draw(st.integers(1, 4)), E=draw(st.integers(1, 3)), O=3,
                        scale=draw(st.sampled_from([0.5, 1.0, 3.0])))


def _a(p):
    return p.net, p.x, p.y, p.state


def _norm(d):
    return math.sqrt(sum(float((v * v).sum()) for v in d.values()))


def _single(p, s, b):
    """(x, y, state) of example b restricted to steps 1..s."""
    S = p.net.to_internal(p.state)
    return (p.x[:s, b:b + 1], p.y[:s, b:b + 1],
            p.net.to_public(tuple(a[:, b:b + 1] for a in S)))


# ----------------------------------------------------------------------------- g, g_hat_K, bias
@FEW
@given(small_problems())
def test_full_gradient_is_bptt_over_the_whole_sequence(p):
    T = p.x.shape[0]
    g = theory.full_gradient(*_a(p), loss=p.loss)
    ref = npbptt.bptt(p.net, p.x, p.y, p.state, T - 1, T, p.loss, backend="numpy").grads
    for k in ref:
        np.testing.assert_allclose(g[k], ref[k], rtol=1e-12, atol=1e-15 * (1 + _norm(ref)))


@FEW
@given(small_problems(max_T=5, max_B=2), st.integers(0, 5))
def test_expected_g_hat_K_is_the_mean_of_single_example_bptt_K_1(p, K):
    """E[g_hat_K] = mean over s, b of bptt(x[:s], K1=K, K2=1) on example b alone (Eq. 3)."""
    T, B = p.x.shape[:2]
    mean = {k: np.zeros_like(v) for k, v in p.net.params.items()}
    for s in range(1, T + 1):
        for b in range(B):
            xs, ys, st_b = _single(p, s, b)
            r = npbptt.bptt(p.net, xs, ys, st_b, K, 1, p.loss, backend="numpy")
            for k in mean:
                mean[k] += r.grads[k] / (T * B)
    got = theory.expected_truncated_gradient(*_a(p), K, loss=p.loss)
    for k in mean:
        np.testing.assert_allclose(got[k], mean[k], rtol=1e-11, atol=1e-15 * (1 + _norm(mean)))


@FEW
@given(small_problems(), st.integers(0, 7))
def test_bias_from_tail_equals_curve_from_lag_terms_and_definition(p, K):
    """Three routes to ||E g_hat_K - g||: the tail sweep, the sums of lag terms G_{K+1..T-1},
    and the difference of the two gradients."""
    g = theory.full_gradient(*_a(p), loss=p.loss)
    eg = theory.expected_truncated_gradient(*_a(p), K, loss=p.loss)
    direct = math.sqrt(sum(float(((eg[k] - g[k]) ** 2).sum()) for k in g))
    tail = theory.bias(*_a(p), K, loss=p.loss)
    curves = theory.theory_curves(*_a(p), M=1.0, loss=p.loss)
    T = p.x.shape[0]
    assert tail == pytest.approx(direct, rel=1e-9, abs=1e-15 * _norm(g))
    assert tail == pytest.approx(curves.bias[min(K, T - 1)], rel=1e-9, abs=1e-15 * _norm(g))
    assert curves.g_norm == pytest.approx(_norm(g), rel=1e-13)
    assert curves.g_hat_norm[min(K, T - 1)] == pytest.approx(_norm(eg), rel=1e-12)
    assert theory.relative_bias(*_a(p), K, loss=p.loss) == pytest.approx(tail / _norm(g),
                                                                         rel=1e-12)
    if K >= T - 1:
        assert tail == 0.0


# ----------------------------------------------------------------------------- phi and M
@FEW
@given(small_problems())
def test_phi_table_rows_are_the_probe_on_prefixes_and_phi_mean_their_average(p):
    T = p.x.shape[0]
    table = theory.phi_table(*_a(p), loss=p.loss)
    for s in range(1, T + 1):
        probe = npbptt.grad_norms(p.net, p.x[:s], p.y[:s], p.state, p.loss, backend="numpy")
        np.testing.assert_allclose(table[s - 1, :s], probe, rtol=1e-13, atol=1e-300)
        assert not table[s - 1, s:].any()                   # phi_k(s) = 0 for s - k < 1
    np.testing.assert_allclose(theory.phi_mean(*_a(p), loss=p.loss),
                               table.mean(axis=(0, 2)), rtol=1e-13)


def _fd_param_jacobians(net, x, state, eps=1e-6):
    """Per step and example, the Jacobian of H(S_{t-1}, x_t; theta) in theta by central
    differences of ``net.step`` at the frozen S_{t-1}; the columns of the embedding are its
    entries.  Returns the largest spectral norm."""
    S = net.to_internal(state)
    T, B = x.shape[:2]
    names = [k for k in net.params if not k.startswith("decoder.")]
    M = 0.0
    for t in range(T):
        cols = []
        for name in names:
            flat = net.params[name].reshape(-1)
            for i in range(flat.size):
                old = flat[i]
                flat[i] = old + eps
                Sp, _ = net.step(S, x[t])
                flat[i] = old - eps
                Sm, _ = net.step(S, x[t])
                flat[i] = old
                cols.append(np.concatenate([(a - c).transpose(1, 0, 2).reshape(B, -1)
                                            for a, c in zip(Sp, Sm)], axis=1) / (2 * eps))
        J = np.stack(cols, axis=2)                           # (B, D, P)
        M = max(M, max(np.linalg.norm(J[b], 2) for b in range(B)))
        S, _ = net.step(S, x[t])
    return M


@settings(max_examples=8, deadline=None)
@given(small_problems(max_T=4, max_B=2))
def test_jacobian_bound_is_the_largest_spectral_norm_of_finite_difference_jacobians(p):
    M = theory.jacobian_bound(p.net, p.x, p.state)
    assert M == pytest.approx(_fd_param_jacobians(p.net, p.x, p.state), rel=1e-7)


# ----------------------------------------------------------------------------- Theorem 1
def _check_theorem1(curves, beta, tau):
    for variant in ("paper", "tail"):
        E = curves.bias_bound(beta, tau, variant)
        scale = curves.g_norm + E
        assert np.all(curves.bias <= E + ROUND * scale), (variant, curves.bias, E)
        Delta = curves.relative_bias_bound(beta, tau, variant)
        finite = np.isfinite(Delta)
        assert np.all(curves.relative_bias[finite] <= Delta[finite] * (1 + ROUND) + ROUND)


@FEW
@given(small_problems(max_T=8), st.floats(0.0, 0.99))
def test_theorem1_bias_below_E_and_relative_bias_below_Delta_whenever_A1_holds(p, u):
    """For every tau from which (A-1) holds with some beta < 1: with beta = decay_rate(tau) and
    with a larger beta < 1, bias <= E(K) and relative bias <= Delta(K) for every K."""
    curves = theory.theory_curves(*_a(p), loss=p.loss)
    T = p.x.shape[0]
    taus = [tau for tau in range(T) if curves.decay_rate(tau) < 1]
    assert taus and taus[-1] == T - 1                      # from tau = T-1 on is vacuous
    for tau in taus:
        beta = curves.decay_rate(tau)
        for b in (beta, beta + u * (1 - beta)):
            _check_theorem1(curves, b, tau)


@FEW
@given(small_problems(max_T=6), st.integers(0, 7), st.integers(0, 7), st.floats(0.0, 0.95))
def test_public_bound_functions_equal_the_curves(p, K, tau, beta):
    curves = theory.theory_curves(*_a(p), loss=p.loss)
    T = p.x.shape[0]
    M = curves.M
    E = theory.bias_bound(*_a(p), K, beta, tau, loss=p.loss)          # computes M itself
    if K <= T - 1:
        assert E == pytest.approx(curves.bias_bound(beta, tau)[K], rel=1e-12)
        D = theory.relative_bias_bound(*_a(p), K, beta, tau, loss=p.loss, M=M)
        assert D == pytest.approx(curves.relative_bias_bound(beta, tau)[K], rel=1e-12)
    assert theory.decay_rate(*_a(p), tau, loss=p.loss) == curves.decay_rate(tau)
    assert theory.phi_mean(*_a(p), loss=p.loss) == pytest.approx(curves.phi_mean, rel=1e-13)
    assert theory.kappa(*_a(p), 0.5, beta, tau, loss=p.loss, M=M) == curves.kappa(0.5, beta, tau)


def test_E_follows_the_printed_formula_on_both_sides_of_tau():
    """E(K) written out by hand from Theorem 1 for a given E[phi] and M."""
    curves = theory.TheoryCurves(phi_mean=np.array([4.0, 2.0, 1.5, 0.5, 0.25, 0.0]), g_norm=10.0,
                                 g_hat_norm=np.array([5.0, 8.0, 9.0, 9.5, 9.9, 10.0]),
                                 bias=np.zeros(6), relative_bias=np.zeros(6), M=2.0)
    beta, tau = 0.5, 2
    E = curves.bias_bound(beta, tau)
    expect = [2.0 * (2.0 + 1.5 / 0.5), 2.0 * (1.5 / 0.5),      # K < tau: sum_{K+1}^{tau-1} + phi_tau/(1-beta)
              2.0 * 1.5 * 0.5 ** 0 / 0.5, 2.0 * 1.5 * 0.5 ** 1 / 0.5,
              2.0 * 1.5 * 0.5 ** 2 / 0.5, 2.0 * 1.5 * 0.5 ** 3 / 0.5]
    np.testing.assert_allclose(E, expect, rtol=1e-15)
    np.testing.assert_allclose(curves.bias_bound(beta, tau, "tail")[tau:],
                               np.array(expect[tau:]) * beta, rtol=1e-15)
    D = curves.relative_bias_bound(beta, tau)
    den = np.maximum.accumulate(curves.g_hat_norm - np.array(expect))
    np.testing.assert_array_equal(np.isinf(D), den <= 0)
    np.testing.assert_allclose(D[den > 0], np.array(expect)[den > 0] / den[den > 0], rtol=1e-15)


@FEW
@given(small_problems(max_T=6), st.floats(0.05, 0.9))
def test_kappa_is_the_first_K_with_Delta_below_delta(p, delta):
    curves = theory.theory_curves(*_a(p), loss=p.loss)
    T = p.x.shape[0]
    tau = min(t for t in range(T) if curves.decay_rate(t) < 1)
    beta = max(curves.decay_rate(tau), 0.3)
    K = curves.kappa(delta, beta, tau)
    # Delta(K) for any K >= 0 from the printed formulas, E[g_hat_K] = g beyond T-1
    E = lambda k: theory._E(curves.phi_mean, curves.M, beta, tau, k)
    gh = lambda k: curves.g_hat_norm[min(k, T - 1)]

    def Delta(k):
        den = max(gh(j) - E(j) for j in range(k + 1))
        return E(k) / den if den > 0 else math.inf
    assert K is not None and Delta(K) < delta
    assert all(Delta(k) >= delta for k in range(K))


# ----------------------------------------------------------------------------- finite differences
def _truncated_objective(net, x, y, state, K, loss):
    """(1/TB) sum_{s,b} ell_s^(b) with the state entering step s-K frozen at its value for the
    parameters at call time of ``freeze`` (Eq. 3's truncated objective), as a closure."""
    T, B = x.shape[:2]
    S = net.to_internal(state)
    frozen = [S]
    for t in range(T):
        S, _ = net.step(S, x[t])
        frozen.append(S)                                     # frozen[j] = S_j

    def f():
        total = 0.0
        for s in range(1, T + 1):
            start = max(1, s - K)                            # steps start..s recomputed
            S = frozen[start - 1]
            for t in range(start, s + 1):
                S, _ = net.step(S, x[t - 1])
            total += LOSSES[loss](net.readout(S[0][-1]), y[s - 1])[0].sum()
        return total / (T * B)
    return f


@settings(max_examples=6, deadline=None)
@given(small_problems(max_T=6), st.integers(0, 4), st.integers(0, 2**31 - 1))
def test_bound_against_finite_differences_of_the_truncated_objective(p, K, seed):
    """Along a random unit direction v: the central difference of the truncated objective is
    <E g_hat_K, v>, that of the full one <g, v>, and their gap is at most bias(K) <= E(K)."""
    net, T = p.net, p.x.shape[0]
    rng = np.random.default_rng(seed)
    v = {k: rng.standard_normal(a.shape) for k, a in net.params.items()}
    nv = _norm(v)
    v = {k: a / nv for k, a in v.items()}
    eps = 1e-5

    def central(f):
        for k in net.params:
            net.params[k] += eps * v[k]
        fp = f()
        for k in net.params:
            net.params[k] -= 2 * eps * v[k]
        fm = f()
        for k in net.params:
            net.params[k] += eps * v[k]
        return (fp - fm) / (2 * eps)

    fd_K = central(_truncated_objective(net, p.x, p.y, p.state, K, p.loss))
    fd_full = central(_truncated_objective(net, p.x, p.y, p.state, T, p.loss))
    eg = theory.expected_truncated_gradient(*_a(p), K, loss=p.loss)
    g = theory.full_gradient(*_a(p), loss=p.loss)
    tol = 1e-7 * (1 + _norm(g))
    assert fd_K == pytest.approx(sum(float((eg[k] * v[k]).sum()) for k in v), abs=tol)
    assert fd_full == pytest.approx(sum(float((g[k] * v[k]).sum()) for k in v), abs=tol)
    curves = theory.theory_curves(*_a(p), loss=p.loss)
    tau = min(t for t in range(T) if curves.decay_rate(t) < 1)
    E = curves.bias_bound(curves.decay_rate(tau), tau)[min(K, T - 1)]
    assert abs(fd_K - fd_full) <= theory.bias(*_a(p), K, loss=p.loss) + tol
    assert abs(fd_K - fd_full) <= E + tol


# ----------------------------------------------------------------------------- §3.1 examples
def _nilpotent(rng, k, H):
    """Strictly upper triangular W (H, H) of index exactly k: unit i has level i*k//H and
    W[i, j] != 0 only when level(j) > level(i), so a product of k factors has no path."""
    level = np.arange(H) * k // H
    W = rng.uniform(0.5, 1.5, (H, H)) * rng.choice([-1, 1], (H, H))
    W[level[None, :] <= level[:, None]] = 0.0
    return W


@FEW
@given(st.integers(2, 4), st.integers(0, 2), st.integers(1, 4), st.integers(1, 3),
       st.floats(1.5, 3.0), st.integers(0, 2**31 - 1))
def test_nilpotent_linear_rnn_phi_and_bias_vanish_exactly_from_the_index(k, extra_H, extra_T, B,
                                                                         norm, seed):
    """h_t = W h_{t-1} + U x_t + b with W^k = 0, ||W|| > 1 (not lambda-stable).
    d ell_s/dS_{s-j} = d ell_s/dS_s W^j, so E[phi_j] = 0 exactly for j >= k (> 0 below), and the
    bias, which collects the lags j >= K+1, is exactly 0 iff K + 1 >= k, i.e. K >= k-1; (A-1)
    holds with beta = 0 from tau = k-1, where the 'tail' form of E(K) is exact."""
    rng = np.random.default_rng(seed)
    H, T = k + extra_H, k + extra_T
    net = npbptt.RNN(2, H, 1, 3, activation="linear", seed=seed)
    W = _nilpotent(rng, k, H)
    W *= norm / np.linalg.norm(W, 2)
    net.params["weight_hh_l0"][...] = W
    assert np.linalg.norm(W, 2) > 1
    assert not np.linalg.matrix_power(W, k).any() and np.linalg.matrix_power(W, k - 1).any()
    x = rng.standard_normal((T, B, 2))
    y = rng.standard_normal((T, B, 3))
    state = rng.standard_normal((1, B, H))
    c = theory.theory_curves(net, x, y, state, "mse")
    j = np.arange(T)
    assert np.all(c.phi_mean[j >= k] == 0.0) and np.all(c.phi_mean[j < k] > 0)
    assert np.all(c.bias[j >= k - 1] == 0.0) and np.all(c.bias[j < k - 1] > 0)
    assert theory.bias(net, x, y, state, k - 1, "mse") == 0.0
    if k >= 2:
        assert theory.bias(net, x, y, state, k - 2, "mse") > 0
        assert c.decay_rate(k - 2) > 0
    assert c.decay_rate(k - 1) == 0.0
    E_tail = c.bias_bound(0.0, k - 1, "tail")
    assert np.all(E_tail[k - 1:] == 0.0) and np.all(c.bias <= E_tail + ROUND * c.g_norm)
    assert c.bias_bound(0.0, k - 1)[k - 1] > 0             # as printed: one lag late


def _resetting(rng, T, B, H, norm, p_reset, activation, embedding):
    V, E = 5, 3
    if embedding:
        net = ResettingRNN(E, H, 1, 3, vocab_size=V, activation=activation,
                           seed=int(rng.integers(2**31)), reset_tokens=[0])
        x = np.where(rng.random((T, B)) < p_reset, 0, rng.integers(1, V, (T, B)))
        reset = x == 0
    else:
        net = ResettingRNN(E, H, 1, 3, activation=activation, seed=int(rng.integers(2**31)),
                           reset_feature=0)
        x = rng.standard_normal((T, B, E))
        reset = rng.random((T, B)) < p_reset
        x[:, :, 0] = np.where(reset, 1.0, -1.0)
    W = rng.standard_normal((H, H))
    net.params["weight_hh_l0"][...] = W * norm / np.linalg.norm(W, 2)
    y = rng.integers(0, 3, (T, B))
    state = rng.standard_normal((1, B, H))
    return net, x, y, state, reset


@FEW
@given(st.integers(2, 8), st.integers(1, 3), st.integers(1, 4), st.floats(1.2, 2.5),
       st.floats(0.2, 0.6), st.sampled_from(["tanh", "linear"]), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_resetting_rnn_gradients_stop_at_the_last_reset(T, B, H, norm, p_reset, activation,
                                                        embedding, seed):
    """phi_k(s) = 0 for every lag k > s - r(s) (r the last reset step <= s), > 0 up to it;
    phi_{k+1}(s) <= lambda 1{x_{s-k} not in X0} phi_k(s) pointwise with lambda = ||W_hh|| > 1
    (the Lipschitz constant of tanh/linear RNN steps), hence
    E[phi_{k+1}] <= lambda E[phi_k 1{no reset in s-k..s}]."""
    rng = np.random.default_rng(seed)
    net, x, y, state, reset = _resetting(rng, T, B, H, norm, p_reset, activation, embedding)
    assert np.array_equal(net.reset_mask(x[0]), reset[0])
    table = theory.phi_table(net, x, y, state)                # [s-1, k, b]
    lam = np.linalg.norm(net.params["weight_hh_l0"], 2)
    for s in range(1, T + 1):
        for b in range(B):
            hits = np.flatnonzero(reset[:s, b]) + 1             # 1-based reset steps <= s
            reach = s - hits[-1] if hits.size else s - 1        # deepest lag with a path
            assert not table[s - 1, reach + 1:, b].any()
            assert np.all(table[s - 1, :reach + 1, b] > 0)
    no_reset = np.zeros_like(table, dtype=bool)                # 1{x_{s-k} .. x_s not in X0}
    for s in range(1, T + 1):
        for k in range(s):
            no_reset[s - 1, k] = ~reset[s - k - 1:s].any(axis=0)
    lhs, rhs = table[:, 1:], lam * table[:, :-1] * no_reset[:, :-1]
    assert np.all(lhs <= rhs * (1 + ROUND))
    assert np.all(lhs.mean(axis=(0, 2)) <= rhs.mean(axis=(0, 2)) * (1 + ROUND))


def test_resetting_rnn_satisfies_A1_with_beta_below_one_though_unstable():
    """Every pattern of resets over T steps, each once (B = 2^T: the expectation over b is the
    exact one for i.i.d. resets of probability 1/2), linear RNN with W = lambda Q, Q orthogonal,
    lambda = 1.5, and targets y = out + u so that d ell_s/dS_s = e is the same for every (s, b):
    phi_k(s) = lambda^k ||e|| 1{no reset at steps s-k+1..s} and
        E[phi_k] = ||e|| (lambda/2)^k (T-k)/T,
    decay_rate(tau) = (lambda/2) (T-tau-1)/(T-tau) < 1, while the same weights without resets
    give lambda (T-tau-1)/(T-tau) > 1.  The rate is Pr(x_{s-k} not in X0) lambda = lambda/2 per
    lag: §3.1's factor Pr(x_s..x_{s-k+1} not in X0) = 2^-k is not a bound for k >= 2."""
    T, H, lam, O = 10, 3, 1.5, 2
    B = 2 ** T
    rng = np.random.default_rng(7)
    pattern = (np.arange(B)[None, :] >> np.arange(T)[:, None]) & 1          # (T, B) bits
    x = np.empty((T, B, 2))
    x[:, :, 0] = np.where(pattern == 1, 1.0, -1.0)                          # reset channel
    x[:, :, 1] = rng.standard_normal((T, 1))
    Q = np.linalg.qr(rng.standard_normal((H, H)))[0]
    state = np.broadcast_to(rng.standard_normal((1, 1, H)), (1, B, H)).copy()
    u = np.array([0.7, -0.4])
    rates = {}
    for cls, kw in ((ResettingRNN, dict(reset_feature=0)), (npbptt.RNN, {})):
        net = cls(2, H, 1, O, activation="linear", seed=3, **kw)
        net.params["weight_hh_l0"][...] = lam * Q
        S, out = net.to_internal(state), []
        for t in range(T):
            S, _ = net.step(S, x[t])
            out.append(net.readout(S[0][-1]))
        y = np.array(out) + u                                                # d ell/d out = -(2/O) u
        e = np.linalg.norm((2.0 / O) * u @ net.params["decoder.weight"])
        c = theory.theory_curves(net, x, y, state, "mse", M=1.0)
        k = np.arange(T)
        rate = lam / 2 if cls is ResettingRNN else lam
        np.testing.assert_allclose(c.phi_mean, e * rate ** k * (T - k) / T, rtol=1e-12)
        rates[cls] = [c.decay_rate(tau) for tau in range(T - 1)]
        np.testing.assert_allclose(rates[cls], [rate * (T - tau - 1) / (T - tau)
                                                for tau in range(T - 1)], rtol=1e-12)
        if cls is ResettingRNN:
            ratio = c.phi_mean[1:] / c.phi_mean[:-1]
            assert np.all(ratio[2:] > lam * 0.5 ** k[2:-1])           # the k-input window fails
    assert max(rates[ResettingRNN]) < 1 < lam
    assert rates[npbptt.RNN][0] > 1


@FEW
@given(st.integers(0, 2**31 - 1), st.booleans(), st.sampled_from(["cross_entropy", "mse"]),
       st.integers(2, 8), st.integers(1, 3), st.integers(1, 4), st.floats(0.2, 0.95))
def test_lambda_stable_rnn_phi_decays_uniformly_and_A1_holds_with_tau_0(seed, embedding, loss, T,
                                                                         B, H, lam):
    """tanh RNN (1 layer) with ||W_hh|| = lambda < 1: ||dH/dh|| <= lambda sup|tanh'| <= lambda,
    so phi_{k+1}(s, b) <= lambda phi_k(s, b) for all s, b, k (Eq. 8), decay_rate(0) <= lambda,
    and Theorem 1 holds with (beta, tau) = (lambda, 0)."""
    p = make_problem(np.random.default_rng(seed), kind="rnn", activation="tanh", layers=1,
                     embedding=embedding, loss=loss, T=T, B=B, H=H)
    net, state = p.net, p.state
    W = net.params["weight_hh_l0"]
    W *= lam / np.linalg.norm(W, 2)
    table = theory.phi_table(net, p.x, p.y, state, p.loss)
    assert np.all(table[:, 1:] <= lam * table[:, :-1] * (1 + ROUND))
    curves = theory.theory_curves(net, p.x, p.y, state, p.loss)
    assert curves.decay_rate(0) <= lam * (1 + ROUND)
    _check_theorem1(curves, lam, 0)


# ----------------------------------------------------------------------------- the variant
@FEW
@given(st.integers(1, 6), st.integers(1, 3), st.booleans(), st.integers(0, 2**31 - 1))
def test_resetting_rnn_bptt_equals_finite_differences(T, B, embedding, seed):
    """The variant's step_vjp (the mask) is the derivative of its step: full BPTT against
    central differences of the mean loss, parameters and initial state."""
    rng = np.random.default_rng(seed)
    net, x, y, state, _ = _resetting(rng, T, B, 3, 1.5, 0.4, "tanh", embedding)
    res = npbptt.bptt(net, x, y, state, T - 1, T, backend="numpy")
    f = lambda: npbptt.step_losses(net, x, y, state, backend="numpy")[0].mean()
    eps = 1e-6
    for name, a in net.params.items():
        flat = a.reshape(-1)
        for i in rng.choice(flat.size, min(4, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + eps
            fp = f()
            flat[i] = old - eps
            fm = f()
            flat[i] = old
            assert (fp - fm) / (2 * eps) == pytest.approx(res.grads[name].reshape(-1)[i],
                                                          abs=1e-8)


def test_resetting_rnn_runs_as_the_reference_on_every_backend():
    """The default backend must not run the variant as a stock RNN (it would ignore resets)."""
    net, x, y, state, reset = _resetting(np.random.default_rng(5), 9, 3, 3, 1.5, 0.4, "tanh", True)
    assert reset.any()
    ref = npbptt.bptt(net, x, y, state, 4, 3, backend="numpy")
    got = npbptt.bptt(net, x, y, state, 4, 3)
    assert got.loss == ref.loss
    for k in ref.grads:
        np.testing.assert_array_equal(got.grads[k], ref.grads[k])
    np.testing.assert_array_equal(npbptt.grad_norms(net, x, y, state),
                                  npbptt.grad_norms(net, x, y, state, backend="numpy"))


def test_resetting_rnn_bad_reset_sets_raise_naming_the_argument():
    with pytest.raises(ValueError, match="reset_tokens"):
        ResettingRNN(2, 3, vocab_size=4)
    with pytest.raises(ValueError, match="reset_tokens"):
        ResettingRNN(2, 3, vocab_size=4, reset_tokens=[4])
    with pytest.raises(ValueError, match="reset_feature"):
        ResettingRNN(2, 3, output_size=2, reset_feature=2)
    with pytest.raises(ValueError, match="reset_feature"):
        ResettingRNN(2, 3, vocab_size=4, reset_tokens=[1], reset_feature=0)
    net = ResettingRNN(2, 3, vocab_size=4, reset_tokens=[1, 3])
    assert net.config()["reset_tokens"] == [1, 3] and net.kind == "rnn"


# ----------------------------------------------------------------------------- input checks
def test_bad_arguments_raise_naming_them():
    p = make_problem(np.random.default_rng(0), kind="lstm", T=4, B=2)
    a = _a(p)
    for fn, args, name in [
            (theory.bias, (a + (-1,)), "K"),
            (theory.bias, (a + (1.5,)), "K"),
            (theory.bias_bound, (a + (1, 1.0, 0)), "beta"),
            (theory.bias_bound, (a + (1, -0.1, 0)), "beta"),
            (theory.bias_bound, (a + (1, 0.5, -1)), "tau"),
            (theory.relative_bias_bound, (a + (1, 0.5, 0.5)), "tau"),
            (theory.decay_rate, (a + (True,)), "tau"),
            (theory.kappa, (a + (0.0, 0.5, 0)), "delta"),
            (theory.kappa, (a + (0.5, 0.5, 0)) + ("cross_entropy", -1.0), "M"),
            (theory.bias_bound, (a + (1, 0.5, 0)), "variant")]:
        kw = {"variant": "tight"} if name == "variant" else {}
        with pytest.raises(ValueError, match=name):
            fn(*args, **kw)
    with pytest.raises(ValueError, match="x must"):
        theory.phi_mean(p.net, p.x[:, :, None], p.y, p.state)
    with pytest.raises(ValueError, match="state"):
        theory.jacobian_bound(p.net, p.x, p.state[0])


def test_float32_network_is_evaluated_in_float64():
    p = make_problem(np.random.default_rng(3), kind="lstm", T=5, B=2, dtype=np.float32)
    p64 = p.net.copy()
    p64.params = {k: v.astype(np.float64) for k, v in p.net.params.items()}
    p64.dtype = np.dtype(np.float64)
    s64 = tuple(s.astype(np.float64) for s in p.state)
    c32 = theory.theory_curves(p.net, p.x, p.y, p.state, p.loss)
    c64 = theory.theory_curves(p64, p.x, p.y, s64, p.loss)
    np.testing.assert_array_equal(c32.bias, c64.bias)
    np.testing.assert_array_equal(c32.phi_mean, c64.phi_mean)
    assert c32.M == c64.M and p.net.dtype == np.float32
