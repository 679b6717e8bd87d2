"""psi (issue 20): npbptt.grad_norms(..., norm="param") against an independent torch model whose
every step uses its own copy of the weights (d ell_T / d copy_{T-k} is exactly
b_k . dS_{T-k}/dtheta), the exact bound bias(K) <= sum_{k>K} E psi_k of npbptt.theory, the
probe and the bounds' norm argument."""
import math

import numpy as np
import pytest

import npbptt
from npbptt import bounds, theory
from npbptt.variants import ResettingRNN
from problems import make_problem

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------- torch per-step copies
def _torch_psi(net, x, y, state, loss):
    """psi (T, B) from torch autograd: example by example, step t has its own copy of every
    non-read-out parameter (the embedding included; tied: the read-out reads a constant copy of
    E), and psi[T-1-t, b] = ||d ell_T^(b) / d copy_t||."""
    T, B = x.shape[:2]
    P = {k: torch.tensor(v, dtype=torch.float64) for k, v in net.params.items()}
    S = net.to_internal(state)
    out = np.zeros((T, B))
    dec_w = P["embedding.weight" if net.tie_weights else "decoder.weight"]
    for b in range(B):
        copies = [{k: v.clone().requires_grad_(True) for k, v in P.items()
                   if not k.startswith("decoder.")} for _ in range(T)]
        h = [torch.tensor(S[0][l, b], dtype=torch.float64) for l in range(net.num_layers)]
        c = ([torch.tensor(S[1][l, b], dtype=torch.float64) for l in range(net.num_layers)]
             if net.kind == "lstm" else None)
        for t in range(T):
            q = copies[t]
            inp = (q["embedding.weight"][int(x[t, b])] if net.embedding
                   else torch.tensor(x[t, b], dtype=torch.float64))
            for l in range(net.num_layers):
                z = q[f"weight_ih_l{l}"] @ inp + q[f"weight_hh_l{l}"] @ h[l]
                if net.bias:
                    z = z + q[f"bias_ih_l{l}"] + q[f"bias_hh_l{l}"]
                if net.kind == "lstm":
                    H = net.hidden_size
                    i, f = torch.sigmoid(z[:H]), torch.sigmoid(z[H:2 * H])
                    g, o = torch.tanh(z[2 * H:3 * H]), torch.sigmoid(z[3 * H:])
                    c[l] = f * c[l] + i * g
                    h[l] = o * torch.tanh(c[l])
                else:
                    h[l] = {"tanh": torch.tanh, "sigmoid": torch.sigmoid}[net.activation](z)
                inp = h[l]
        logits = dec_w @ h[-1] + P["decoder.bias"]
        if loss == "cross_entropy":
            ell = torch.logsumexp(logits, 0) - logits[int(y[T - 1, b])]
        else:
            ell = ((logits - torch.tensor(y[T - 1, b], dtype=torch.float64)) ** 2).mean()
        flat = [v for q in copies for v in q.values()]
        grads = torch.autograd.grad(ell, flat, allow_unused=True)
        n = len(copies[0])
        for t in range(T):
            gs = [g for g in grads[t * n:(t + 1) * n] if g is not None]
            out[T - 1 - t, b] = math.sqrt(sum(float((g * g).sum()) for g in gs))
    return out


CASES = [dict(kind=k, layers=l, embedding=e, loss=lo, activation=a)
         for k, l, e, lo, a in [("rnn", 1, False, "mse", "tanh"), ("rnn", 2, True, "cross_entropy", "sigmoid"),
                                ("lstm", 1, True, "cross_entropy", "tanh"), ("lstm", 2, False, "mse", "tanh"),
                                ("lstm", 2, True, "mse", "tanh")]]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_psi_equals_torch_per_step_copies(case):
    p = make_problem(np.random.default_rng(len(str(case))), T=5, B=2, H=3, E=3, O=4,
                     scale=2.0, **case)
    psi = npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, backend="numpy", norm="param")
    ref = _torch_psi(p.net, p.x, p.y, p.state, p.loss)
    assert psi.shape == (5, 2) and np.all(ref > 0)
    np.testing.assert_allclose(psi, ref, rtol=1e-10)


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_psi_tied_excludes_the_readout_use(kind):
    rng = np.random.default_rng(3)
    Net = npbptt.LSTM if kind == "lstm" else npbptt.RNN
    net = Net(4, 4, 2, 6, vocab_size=6, seed=5, tie_weights=True)
    x, y = rng.integers(0, 6, (4, 3)), rng.integers(0, 6, (4, 3))
    state = net.to_public(tuple(0.3 * rng.standard_normal((2, 3, 4)) for _ in range(net.n_state)))
    psi = npbptt.grad_norms(net, x, y, state, norm="param", backend="numpy")
    np.testing.assert_allclose(psi, _torch_psi(net, x, y, state, "cross_entropy"), rtol=1e-10)


def test_bias_free_network_and_the_row_by_row_path():
    """bias=False (no bias term) on the fast path; a ResettingRNN takes the row-by-row VJP and
    must agree with the fast path where no example resets."""
    p = make_problem(np.random.default_rng(7), kind="rnn", layers=2, embedding=True, bias=False,
                     T=4, B=2, H=3, E=2, O=3)
    psi = npbptt.grad_norms(p.net, p.x, p.y, p.state, norm="param", backend="numpy")
    np.testing.assert_allclose(psi, _torch_psi(p.net, p.x, p.y, p.state, p.loss), rtol=1e-10)
    rnet = ResettingRNN(2, 3, 2, 3, vocab_size=7, seed=1, reset_tokens=[6])
    rnet.params = {k: v.copy() for k, v in p.net.params.items()}
    rnet.bias = False
    x = np.minimum(p.x, 5)                                  # no token 6: no reset
    a = npbptt.grad_norms(rnet, x, p.y, p.state, norm="param", backend="numpy")
    b = npbptt.grad_norms(p.net, x, p.y, p.state, norm="param", backend="numpy")
    np.testing.assert_allclose(a, b, rtol=1e-12)
    x2 = x.copy()
    x2[1, 0] = 6                                            # example 0 resets at step 2
    c = npbptt.grad_norms(rnet, x2, p.y, p.state, norm="param", backend="numpy")
    assert np.all(c[2:, 0] == 0) and np.all(c[:2, 0] > 0) and np.all(c[:, 1] > 0)


# ----------------------------------------------------------------------------- the exact bound
@pytest.mark.parametrize("seed", range(6))
def test_bound_holds_exactly_and_is_tight_for_one_term(seed):
    rng = np.random.default_rng(seed)
    kind = ("rnn", "lstm")[seed % 2]
    p = make_problem(rng, kind=kind, layers=1 + seed % 2, embedding=bool(seed % 3), T=6, B=3,
                     H=3, E=2, O=3, scale=(0.5, 2.0, 4.0)[seed % 3],
                     loss=("cross_entropy", "mse")[seed % 2])
    c = theory.theory_curves(p.net, p.x, p.y, p.state, p.loss, M=1.0, psi=True)
    bound = c.param_bias_bound()
    assert np.all(c.bias <= bound * (1 + 1e-12) + 1e-300)
    assert np.all(c.relative_bias <= c.param_relative_bias_bound() * (1 + 1e-12) + 1e-300)
    np.testing.assert_allclose(c.psi_mean, theory.psi_mean(p.net, p.x, p.y, p.state, p.loss),
                               rtol=1e-13)
    # T = 2, B = 1: the tail of K = 0 is the single term of (s = 2, k = 1), so the triangle
    # inequality is an equality: bias(0) = E psi_1 = psi_1(2) / 2 exactly (a wrong psi fails)
    one = make_problem(rng, kind=kind, layers=1 + seed % 2, embedding=bool(seed % 3), T=2, B=1,
                       H=3, E=2, O=3, loss=("cross_entropy", "mse")[seed % 2])
    c1 = theory.theory_curves(one.net, one.x, one.y, one.state, one.loss, M=1.0, psi=True)
    psi = npbptt.grad_norms(one.net, one.x, one.y, one.state, one.loss, norm="param",
                            backend="numpy")
    assert c1.bias[0] > 0
    np.testing.assert_allclose(c1.bias[0], psi[1, 0] / 2, rtol=1e-12)
    np.testing.assert_allclose(c1.param_bias_bound()[0], psi[1, 0] / 2, rtol=1e-12)


def test_psi_table_rows_are_grad_norms():
    p = make_problem(np.random.default_rng(11), kind="lstm", layers=2, T=5, B=2, H=3, E=2, O=3)
    table = theory.psi_table(p.net, p.x, p.y, p.state, p.loss)
    for s in range(1, 6):
        got = npbptt.grad_norms(p.net, p.x[:s], p.y[:s], p.state, p.loss, norm="param",
                                backend="numpy")
        np.testing.assert_allclose(table[s - 1, :s], got, rtol=1e-12)
        assert np.all(table[s - 1, s:] == 0)


# ----------------------------------------------------------------------------- API
def test_state_norm_is_bitwise_unchanged_and_backends_agree():
    p = make_problem(np.random.default_rng(2), kind="lstm", layers=2, T=6, B=3)
    for backend in npbptt.available_backends():
        if backend == "cuda":
            continue
        a = npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, backend=backend)
        b = npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, backend=backend, norm="state")
        assert np.array_equal(a, b)
    ref = npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, backend="numpy", norm="param")
    for backend in npbptt.available_backends():
        if backend != "cuda":
            got = npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, backend=backend,
                                    norm="param")
            assert np.array_equal(got, ref)
    pr = npbptt.probe(p.net, p.x, p.y, p.state, p.loss)
    assert np.array_equal(pr.psi, ref)
    np.testing.assert_allclose(pr.psi_cum, np.cumsum(ref.mean(axis=1)), rtol=1e-14)
    assert np.array_equal(pr.phi, npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss,
                                                    backend="numpy"))


def test_bad_norm_is_a_value_error_naming_norm():
    p = make_problem(np.random.default_rng(0), T=3, B=1)
    with pytest.raises(ValueError, match="norm"):
        npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, norm="parameter")
    phi = np.abs(np.random.default_rng(0).standard_normal((10, 4))) + 0.1
    for call in (lambda: bounds.P_hat(phi, norm="x"),
                 lambda: bounds.kappa_hat(phi, 0.1, 1, 20, norm="params")):
        with pytest.raises(ValueError, match="norm"):
            call()
    with pytest.raises(ValueError, match="M"):
        bounds.E_hat(phi.mean(axis=1), 3, 0.5, 8, M=2.0, norm="param")
    with pytest.raises(ValueError, match="psi"):
        bounds.P_hat(-phi, norm="param")


def test_bounds_with_psi_are_the_same_estimators_with_M_one():
    psi = np.exp(-0.3 * np.arange(12))[:, None] * (1 + 0.1 * np.random.default_rng(1).random((12, 5)))
    p = bounds.P_hat(psi, norm="param")
    b = bounds.beta_hat(p, method="ols", norm="param")
    assert 0 < b < 1
    K = np.arange(30)
    np.testing.assert_array_equal(bounds.E_hat(p, K, b, 9, norm="param"), bounds.E_hat(p, K, b, 9))
    np.testing.assert_array_equal(bounds.Delta_hat(p, K, b, 9, norm="param"),
                                  bounds.Delta_hat(p, K, b, 9))
    assert bounds.kappa_hat(psi, 0.1, 1, 50, norm="param") == bounds.kappa_hat(psi, 0.1, 1, 50)
