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
        if backend != "cuda":                   # numba: its own kernel (npbptt.kernels.psi)
            got = npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, backend=backend,
                                    norm="param")
            np.testing.assert_allclose(got, ref, rtol=1e-12)
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


# ----------------------------------------------------------------------------- the numba kernel
psi_kernel = pytest.importorskip("npbptt.kernels.psi")
from hypothesis import given, settings, strategies as st  # noqa: E402

from npbptt import backends  # noqa: E402
from npbptt.probe import param_norms_reference  # noqa: E402
from npbptt.validate import check_inputs  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
FLOOR32 = 4 * EPS32                 # as tests/test_kernels.py: a few roundings of the largest entries


@st.composite
def psi_problems(draw):
    """Every configuration the kernel takes (kernels.shared.supports): cells, activations, 1-3
    layers, embedding or dense input, biases or not, both losses, odd sizes."""
    kind = draw(st.sampled_from(["lstm", "rnn"]))
    act = draw(st.sampled_from(["tanh", "relu", "sigmoid", "linear"])) if kind == "rnn" else "tanh"
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return make_problem(rng, kind=kind, activation=act, layers=draw(st.integers(1, 3)),
                        embedding=draw(st.booleans()),
                        loss=draw(st.sampled_from(["cross_entropy", "mse"])),
                        T=draw(st.integers(1, 12)), B=draw(st.integers(1, 9)),
                        H=draw(st.integers(1, 9)), E=draw(st.integers(1, 5)),
                        O=draw(st.integers(2, 6)), bias=draw(st.booleans()),
                        scale=draw(st.sampled_from([0.5, 1.0, 2.5])))


@settings(max_examples=40, deadline=None)
@given(psi_problems())
def test_numba_psi_equals_numpy_float64(p):
    ref = npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, norm="param", backend="numpy")
    got = npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, norm="param", backend="numba")
    assert got.shape == ref.shape == p.x.shape[:2] and got.dtype == np.float64
    assert np.abs(got - ref).max() <= 1e-12 * np.abs(ref).max()


def _float32_pair(p):
    """(float32 problem, float64 problem holding exactly the float32-rounded values)."""
    def vals(a, dt):
        a = np.asarray(a)
        return a if np.issubdtype(a.dtype, np.integer) else a.astype(np.float32).astype(dt)

    out = []
    for dt in (np.float32, np.float64):
        net = p.net.copy()
        net.dtype = np.dtype(dt)
        net.params = {k: vals(v, dt) for k, v in p.net.params.items()}
        state = tuple(vals(s, dt) for s in p.state) if net.kind == "lstm" else vals(p.state, dt)
        out.append(type(p)(net, vals(p.x, dt), vals(p.y, dt), state, p.loss))
    return out


@settings(max_examples=25, deadline=None)
@given(psi_problems())
def test_numba_psi_float32_error_at_most_twice_the_references(p):
    """float32 (tests/test_kernels.py's rule): the kernel's relative 2-norm error against the
    float64 reference on the same float32-rounded values is at most twice the float32
    reference's own, floored at 4 float32 epsilons."""
    p32, p64 = _float32_pair(p)
    exact = npbptt.grad_norms(p64.net, p64.x, p64.y, p64.state, p.loss, norm="param",
                              backend="numpy")
    ref = npbptt.grad_norms(p32.net, p32.x, p32.y, p32.state, p.loss, norm="param",
                            backend="numpy")
    got = npbptt.grad_norms(p32.net, p32.x, p32.y, p32.state, p.loss, norm="param",
                            backend="numba")
    scale = max(np.linalg.norm(exact), np.finfo(np.float64).tiny)
    e_ref, e_got = np.linalg.norm(ref - exact) / scale, np.linalg.norm(got - exact) / scale
    assert e_got <= 2 * max(e_ref, FLOOR32), (e_got, e_ref)


def test_resolve_gives_the_kernel_for_stock_networks_and_the_reference_otherwise():
    stock = npbptt.LSTM(3, 4, 2, 5, vocab_size=5, seed=0)
    assert backends.resolve("grad_norms_param", "numba", stock) is psi_kernel.grad_norms_param
    assert backends.resolve("grad_norms_param", "numba", npbptt.RNN(3, 4, 1, 2, seed=0)) \
        is psi_kernel.grad_norms_param
    resetting = ResettingRNN(2, 3, 2, 3, vocab_size=7, seed=1, reset_tokens=[6])
    assert backends.resolve("grad_norms_param", "numba", resetting) is param_norms_reference
    # tied weights: the kernel where kernels.shared.supports takes them (its read-out reads
    # embedding.weight, psi keeps the input use only), else the reference; equal either way
    tied = npbptt.LSTM(4, 4, 2, 6, vocab_size=6, seed=5, tie_weights=True)
    want = psi_kernel.grad_norms_param if psi_kernel.supports(tied) else param_norms_reference
    assert backends.resolve("grad_norms_param", "numba", tied) is want
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 6, (4, 3)), rng.integers(0, 6, (4, 3))
    state = tied.to_public(tuple(0.3 * rng.standard_normal((2, 3, 4)) for _ in range(2)))
    a = npbptt.grad_norms(tied, x, y, state, norm="param", backend="numba")
    b = npbptt.grad_norms(tied, x, y, state, norm="param", backend="numpy")
    assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()
    x, y, S = check_inputs(tied, x, y, state, "cross_entropy")
    c = psi_kernel.grad_norms_param(tied, x, y, S, "cross_entropy")      # the kernel itself
    assert np.abs(c - b).max() <= 1e-12 * np.abs(b).max()
    # the row-by-row reference on a ResettingRNN that never resets is the stock network's psi
    xr = rng.integers(0, 6, (5, 2))
    st = 0.3 * rng.standard_normal((2, 2, 3))
    plain = npbptt.RNN(2, 3, 2, 3, vocab_size=7, seed=1)
    plain.params = {k: v.copy() for k, v in resetting.params.items()}
    np.testing.assert_allclose(
        npbptt.grad_norms(resetting, xr, xr % 3, st, norm="param", backend="numba"),
        npbptt.grad_norms(plain, xr, xr % 3, st, norm="param", backend="numba"), rtol=1e-12)


def test_numba_psi_on_a_long_window():
    """A window of 60 steps, batch 16, 2-layer LSTM 20 (the kernels' loops over many steps and
    rows; float64 to 1e-12 of the reference)."""
    p = make_problem(np.random.default_rng(21), kind="lstm", layers=2, T=60, B=16, H=20, E=6,
                     O=8, V=8, scale=1.5)
    ref = npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, norm="param", backend="numpy")
    got = npbptt.grad_norms(p.net, p.x, p.y, p.state, p.loss, norm="param", backend="numba")
    assert np.all(ref[:5] > 0)
    assert np.abs(got - ref).max() <= 1e-12 * np.abs(ref).max()


# ----------------------------------------------------------------------------- validation script
def test_validation_script_quick_smoke(tmp_path, monkeypatch):
    """validation/param_norm.py --quick end to end (the language model skipped: no
    NPBPTT_DATA), its report written to a temporary directory: the bound held everywhere and
    both copy-task runs (phi, psi) are in the training table."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "validation" / "param_norm.py"
    spec = importlib.util.spec_from_file_location("param_norm_validation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    monkeypatch.delenv("NPBPTT_DATA", raising=False)
    mod.main(["--quick"])
    md = (tmp_path / "param_norm.md").read_text(encoding="utf-8")
    assert (tmp_path / "param_norm.png").stat().st_size > 0
    assert "The ψ bound held in 100% of the cases" in md
    assert "Not run here: PTB LSTM 1x8 (tied) (no NPBPTT_DATA)" in md
    rows = [l for l in md.splitlines() if l.startswith("| copy LSTM 2x8 (m = 5) | ")]
    assert [r.split(" | ")[1] for r in rows] == ["φ", "ψ"]
