"""The RMTPP loss (Du et al. 2016, Eq. 12) and the Book Order network (Appendix C.3): exact
gradients against high-precision values, central finite differences of a plain forward written
here, and torch autograd; the probe; input checks; backend routing; the data streams."""
import os
from pathlib import Path

import mpmath as mp
import numpy as np
import pytest

import npbptt
from npbptt.losses import LOSSES, rmtpp
from npbptt.point_process import RMTPPLSTM, book_order_streams, evaluate, expected_gap

torch = pytest.importorskip("torch")

DATA = Path(os.environ.get("NPBPTT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "book_order").is_dir(),
                                reason="Book Order files not found (set NPBPTT_DATA)")


# --------------------------------------------------------------------- the loss, elementwise
def _eq12_mp(u, w, dt):
    """-log f*(dt) of Eq. (12) in mpmath at the caller's precision (w = 0: its limit
    -u + e^u dt); callers run it under ``mp.workdps(60)``."""
    u, w, dt = mp.mpf(u), mp.mpf(w), mp.mpf(dt)
    if w == 0:
        return -u + mp.e ** u * dt
    return -u - w * dt - mp.e ** u / w + mp.e ** (u + w * dt) / w


POINTS = [(0.3, 1e-8, 0.5), (0.3, -1e-8, 0.5), (0.3, 0.0, 0.5), (-1.2, 1e-12, 2.0),
          (0.7, 0.05, 1.5), (1.0, -0.05, 1.0), (2.0, 0.3, 0.4), (2.0, -30.0, 0.4),
          (-3.0, 2.0, 4.0), (4.0, 1e-3, 1e-4), (50.0, 0.2, 1e-3), (700.0, 0.01, 1e-3),
          (700.0, -1e-8, 1e-3), (-700.0, 3.0, 2.0), (5.0, 50.0, 3.0)]


@pytest.mark.parametrize("u, w, dt", POINTS)
def test_rmtpp_equals_eq12_in_high_precision(u, w, dt):
    nll, _, _ = rmtpp(np.array([u]), np.array([w]), np.array([dt]))
    with mp.workdps(60):
        ref = float(_eq12_mp(u, w, dt))
    assert np.isfinite(nll[0])
    assert abs(nll[0] - ref) <= 1e-13 * max(1.0, abs(ref))


@pytest.mark.parametrize("u, w, dt", POINTS)
def test_rmtpp_gradients_equal_high_precision_derivatives(u, w, dt):
    _, du, dw = rmtpp(np.array([u]), np.array([w]), np.array([dt]))
    with mp.workdps(60):
        ref_du = float(mp.diff(lambda uu: _eq12_mp(uu, w, dt), mp.mpf(u)))
        # d/dw at w = 0 from the series: -dt + e^u dt^2 / 2; elsewhere mpmath's derivative
        ref_dw = float(mp.diff(lambda ww: _eq12_mp(u, ww, dt), mp.mpf(w))) if w != 0 else \
            float(-dt + mp.e ** mp.mpf(u) * mp.mpf(dt) ** 2 / 2)
    assert abs(du[0] - ref_du) <= 1e-12 * max(1.0, abs(ref_du))
    assert abs(dw[0] - ref_dw) <= 1e-12 * max(1.0, abs(ref_dw))


def test_rmtpp_central_differences_float64_including_w_near_zero_and_large_u():
    u = np.array([0.3, -0.4, 1.1, 30.0, 0.2, 600.0])
    w = np.array([1e-8, -1e-8, 0.0, 0.5, -2.0, 1e-8])
    dt = np.array([0.5, 2.0, 0.3, 1e-2, 0.7, 1e-3])
    _, du, dw = rmtpp(u, w, dt)
    # steps sized to the conditioning: nll's rounding error grows like |u| eps |nll| (the
    # exponential), and nll varies in w on the scale 1/dt; truncation (h dt)^2 ~ 1e-8
    hu, hw = 1e-4, 1e-4 / dt
    fd_u = (rmtpp(u + hu, w, dt)[0] - rmtpp(u - hu, w, dt)[0]) / (2 * hu)
    fd_w = (rmtpp(u, w + hw, dt)[0] - rmtpp(u, w - hw, dt)[0]) / (2 * hw)
    np.testing.assert_allclose(du, fd_u, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(dw, fd_w, rtol=1e-7, atol=1e-8)


def test_rmtpp_w_zero_is_the_exponential_gap_and_continuous_at_zero():
    u, dt = np.full(3, 0.8), np.full(3, 1.7)
    nll0, du0, dw0 = rmtpp(u, 0.0, dt)
    np.testing.assert_allclose(nll0, -0.8 + np.exp(0.8) * 1.7, rtol=1e-15)
    np.testing.assert_allclose(du0, np.exp(0.8) * 1.7 - 1, rtol=1e-15)
    np.testing.assert_allclose(dw0, -1.7 + np.exp(0.8) * 1.7 ** 2 / 2, rtol=1e-15)
    # either side of the series switch |w dt| = 0.1 agrees with mpmath (no jump)
    for w in (0.1 / 1.7 * (1 - 1e-9), 0.1 / 1.7 * (1 + 1e-9), -0.1 / 1.7 * (1 + 1e-9)):
        with mp.workdps(60):
            ref = float(_eq12_mp(0.8, w, 1.7))
        assert abs(rmtpp(u[:1], w, dt[:1])[0][0] - ref) < 1e-14


def test_rmtpp_large_u_stays_finite_and_beyond_float64_is_inf():
    nll, du, dw = rmtpp(np.array([700.0, 705.0]), np.array([0.0, -0.5]), np.array([1e-3, 1.0]))
    assert np.isfinite(nll).all() and np.isfinite(du).all() and np.isfinite(dw).all()
    assert nll[0] > 1e300
    with np.errstate(over="ignore"):
        nll, du, dw = rmtpp(np.array([720.0]), np.array([0.1]), np.array([1.0]))
    assert nll[0] == np.inf and du[0] == np.inf
    nll, du, dw = rmtpp(np.array([0.4]), np.array([2.0]), np.array([0.0]))
    assert (nll[0], du[0], dw[0]) == (-0.4, -1.0, 0.0)


def test_rmtpp_equals_torch_autograd_of_eq12():
    rng = np.random.default_rng(3)
    u, w, dt = rng.normal(size=20), rng.normal(size=20), rng.exponential(1.0, 20)
    tu, tw = torch.tensor(u, requires_grad=True), torch.tensor(w, requires_grad=True)
    tdt = torch.tensor(dt)
    nll_t = -tu - tw * tdt - torch.exp(tu) / tw + torch.exp(tu + tw * tdt) / tw
    nll_t.sum().backward()
    nll, du, dw = rmtpp(u, w, dt)
    np.testing.assert_allclose(nll, nll_t.detach().numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(du, tu.grad.numpy(), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dw, tw.grad.numpy(), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------ the expected gap
def _mean_gap_quad(u, w):
    from scipy.integrate import quad
    f = lambda s: np.exp(u + w * s - np.exp(u) * (np.expm1(w * s) / w if w != 0 else s))
    with np.errstate(over="ignore"):
        num = quad(lambda s: s * f(s), 0, np.inf, limit=400, epsabs=0, epsrel=1e-12)[0]
        den = quad(f, 0, np.inf, limit=400, epsabs=0, epsrel=1e-12)[0]
    return num / den        # w < 0: the mean given that a next event occurs


@pytest.mark.parametrize("u, w", [(0.0, 1.0), (0.0, -1.0), (2.0, 0.5), (-1.0, 3.0), (-1.0, -3.0),
                                  (5.0, 1e-6), (5.0, -1e-6), (0.0, 0.0), (-5.0, -0.1),
                                  (3.0, -20.0), (-3.0, 50.0),
                                  (0.5, 2e-3 * np.exp(0.5) * 0.999), (0.5, 2e-3 * np.exp(0.5) * 1.001),
                                  (0.5, -2e-3 * np.exp(0.5) * 0.999), (0.5, -2e-3 * np.exp(0.5) * 1.001)])
def test_expected_gap_equals_adaptive_quadrature(u, w):
    assert abs(expected_gap(u, w) - _mean_gap_quad(u, w)) <= 1e-11 * _mean_gap_quad(u, w)


# --------------------------------------------------------------- the network: a plain forward
def _sig(z):
    return 1 / (1 + np.exp(-z))


def _plain_losses(p, x, y, S, L, E):
    """Per-step batch-mean losses of the Book Order network, written out directly."""
    h, c = [a.copy() for a in S[0]], [a.copy() for a in S[1]]
    out = []
    for t in range(x.shape[0]):
        inp = np.concatenate([p["embedding.weight"][x[t, :, 0].astype(int)], x[t, :, 1:]], axis=1)
        for l in range(L):
            z = (inp @ p[f"weight_ih_l{l}"].T + p[f"bias_ih_l{l}"] + h[l] @ p[f"weight_hh_l{l}"].T
                 + p[f"bias_hh_l{l}"])
            i, f, g, o = np.split(z, 4, axis=1)
            c[l] = _sig(f) * c[l] + _sig(i) * np.tanh(g)
            h[l] = _sig(o) * np.tanh(c[l])
            inp = h[l]
        lin = inp @ p["decoder.weight"].T + p["decoder.bias"]
        logits, u, w = lin[:, :-1], lin[:, -1], p["decoder.w"][0]
        m = logits.max(axis=1, keepdims=True)
        ce = (np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
              - logits[np.arange(len(u)), y[t, :, 0].astype(int)])
        dt = y[t, :, 1]
        tnll = -u - w * dt - np.exp(u) / w + np.exp(u + w * dt) / w     # Eq. (12)
        out.append((ce + tnll).mean())
    return np.array(out)


def _problem(num_layers, T=5, B=3, seed=0):
    rng = np.random.default_rng(seed)
    net = RMTPPLSTM(n_marks=2, embed_size=3, hidden_size=4, num_layers=num_layers, seed=seed)
    for v in net.params.values():                      # random non-zero biases and w
        v[...] = rng.uniform(-0.8, 0.8, v.shape)
    net.params["decoder.w"][...] = 0.37
    x = np.stack([rng.integers(0, 2, (T, B)).astype(float), rng.exponential(0.5, (T, B)),
                  rng.uniform(0, 3, (T, B))], axis=-1)
    y = np.stack([rng.integers(0, 2, (T, B)).astype(float), rng.exponential(0.5, (T, B))], axis=-1)
    S = (rng.normal(size=(num_layers, B, 4)), rng.normal(size=(num_layers, B, 4)))
    return net, x, y, S


@pytest.mark.parametrize("num_layers", [1, 2])
def test_full_bptt_equals_central_differences_of_a_plain_forward(num_layers):
    net, x, y, S = _problem(num_layers)
    T = x.shape[0]
    L_plain = _plain_losses(net.params, x, y, S, num_layers, 3)
    L, _ = npbptt.step_losses(net, x, y, S, loss="rmtpp", backend="numpy")
    np.testing.assert_allclose(L, L_plain, rtol=1e-13)
    res = npbptt.bptt(net, x, y, S, T - 1, T, loss="rmtpp", backend="numpy")
    assert abs(res.loss - L_plain.mean()) < 1e-13
    h = 1e-6
    for name, v in net.params.items():
        fd = np.empty_like(v)
        for i in np.ndindex(v.shape):
            o = v[i]
            v[i] = o + h
            lp = _plain_losses(net.params, x, y, S, num_layers, 3).mean()
            v[i] = o - h
            lm = _plain_losses(net.params, x, y, S, num_layers, 3).mean()
            v[i] = o
            fd[i] = (lp - lm) / (2 * h)
        np.testing.assert_allclose(res.grads[name], fd, rtol=1e-6, atol=1e-8, err_msg=name)


def _torch_bptt(net, x, y, S, K1, K2):
    """BPTT(K1, K2) by autograd: the state entering step T-1-K1 detached, loss = mean of the
    last K2 steps' batch-mean losses."""
    P = {k: torch.tensor(v, requires_grad=True) for k, v in net.params.items()}
    X, Y = torch.tensor(x), torch.tensor(y)
    h = [torch.tensor(S[0][l]) for l in range(net.num_layers)]
    c = [torch.tensor(S[1][l]) for l in range(net.num_layers)]
    T = x.shape[0]
    t0 = T - 1 - K1
    losses = []
    for t in range(T):
        if t == t0:
            h, c = [a.detach() for a in h], [a.detach() for a in c]
        inp = torch.cat([P["embedding.weight"][X[t, :, 0].long()], X[t, :, 1:]], dim=1)
        for l in range(net.num_layers):
            z = (inp @ P[f"weight_ih_l{l}"].T + P[f"bias_ih_l{l}"] + h[l] @ P[f"weight_hh_l{l}"].T
                 + P[f"bias_hh_l{l}"])
            i, f, g, o = z.chunk(4, dim=1)
            c[l] = torch.sigmoid(f) * c[l] + torch.sigmoid(i) * torch.tanh(g)
            h[l] = torch.sigmoid(o) * torch.tanh(c[l])
            inp = h[l]
        lin = inp @ P["decoder.weight"].T + P["decoder.bias"]
        u, w = lin[:, -1], P["decoder.w"][0]
        ce = torch.nn.functional.cross_entropy(lin[:, :-1], Y[t, :, 0].long(), reduction="none")
        dt = Y[t, :, 1]
        losses.append((ce - u - w * dt - torch.exp(u) / w + torch.exp(u + w * dt) / w).mean())
    loss = torch.stack(losses[T - K2:]).mean()
    loss.backward()
    return float(loss.detach()), {k: v.grad.numpy() if v.grad is not None else np.zeros_like(net.params[k])
                         for k, v in P.items()}


@pytest.mark.parametrize("K1, K2", [(5, 6), (2, 1), (3, 2), (0, 1)])
def test_bptt_equals_torch_autograd(K1, K2):
    net, x, y, S = _problem(2, T=6, B=4, seed=1)
    loss_t, grads_t = _torch_bptt(net, x, y, S, K1, K2)
    res = npbptt.bptt(net, x, y, S, K1, K2, loss="rmtpp", backend="numpy")
    assert abs(res.loss - loss_t) < 1e-10
    assert set(res.grads) == set(grads_t)
    for k in grads_t:
        np.testing.assert_allclose(res.grads[k], grads_t[k], rtol=1e-10, atol=1e-10, err_msg=k)


def test_probe_phi_equals_torch_state_gradients_and_grad_norms():
    net, x, y, S = _problem(2, T=5, B=3, seed=2)
    T, B, L = x.shape[0], x.shape[1], net.num_layers
    P = {k: torch.tensor(v) for k, v in net.params.items()}
    X, Y = torch.tensor(x), torch.tensor(y)
    h = [torch.tensor(S[0][l], requires_grad=True) for l in range(L)]
    c = [torch.tensor(S[1][l], requires_grad=True) for l in range(L)]
    states = []
    for t in range(T):
        inp = torch.cat([P["embedding.weight"][X[t, :, 0].long()], X[t, :, 1:]], dim=1)
        for l in range(L):
            z = (inp @ P[f"weight_ih_l{l}"].T + P[f"bias_ih_l{l}"] + h[l] @ P[f"weight_hh_l{l}"].T
                 + P[f"bias_hh_l{l}"])
            i, f, g, o = z.chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c[l] + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            # S_t = (h_t, c_t) as handed to step t+1 (and, the top h, to the read-out): copies,
            # so their gradients are dL/dS_t of Eq. (18), not through layer l+1 of step t or
            # (for c) through h_t of step t
            h[l], c[l] = h_new.clone(), c_new.clone()
            h[l].retain_grad()
            c[l].retain_grad()
            inp = h[l] if l == L - 1 else h_new
        states.append((list(h), list(c)))
    lin = inp @ P["decoder.weight"].T + P["decoder.bias"]
    u, w = lin[:, -1], P["decoder.w"][0]
    ce = torch.nn.functional.cross_entropy(lin[:, :-1], Y[-1, :, 0].long(), reduction="none")
    dt = Y[-1, :, 1]
    (ce - u - w * dt - torch.exp(u) / w + torch.exp(u + w * dt) / w).sum().backward()
    phi_t = np.empty((T, B))
    for k in range(T):
        hs, cs = states[T - 1 - k]
        sq = sum((a.grad.numpy() ** 2).sum(axis=1) for a in hs + cs if a.grad is not None)
        phi_t[k] = np.sqrt(sq)
    phi = npbptt.grad_norms(net, x, y, S, loss="rmtpp", backend="numpy")
    np.testing.assert_allclose(phi, phi_t, rtol=1e-10)
    pr = npbptt.probe(net, x, y, S, loss="rmtpp")
    np.testing.assert_array_equal(pr.phi, phi)
    # g_norm[T-1] is the norm of the full gradient of the last step's batch-mean loss
    _, g_full = _torch_bptt(net, x, y, S, T - 1, 1)
    assert abs(pr.g_norm[T - 1] - np.sqrt(sum((v ** 2).sum() for v in g_full.values()))) < 1e-10


def test_numba_backend_request_runs_the_reference():
    net, x, y, S = _problem(2, T=6, B=3, seed=4)
    ref = npbptt.bptt(net, x, y, S, 3, 2, loss="rmtpp", backend="numpy")
    got = npbptt.bptt(net, x, y, S, 3, 2, loss="rmtpp", backend="numba")
    assert got.loss == ref.loss
    for k in ref.grads:
        np.testing.assert_array_equal(got.grads[k], ref.grads[k])
    np.testing.assert_array_equal(npbptt.step_losses(net, x, y, S, loss="rmtpp", backend="numba")[0],
                                  npbptt.step_losses(net, x, y, S, loss="rmtpp", backend="numpy")[0])
    np.testing.assert_array_equal(npbptt.grad_norms(net, x, y, S, loss="rmtpp", backend="numba"),
                                  npbptt.grad_norms(net, x, y, S, loss="rmtpp", backend="numpy"))
    from npbptt.kernels.shared import supports
    assert not supports(net)


def test_stream_walks_the_point_process_chunks():
    net, x, y, S = _problem(1, T=7, B=2, seed=5)
    chunks = list(npbptt.stream(net, x, y, S, K=3, loss="rmtpp", backend="numpy"))
    assert [c.start for c, _ in chunks] == [0, 3, 6]
    L, _ = npbptt.step_losses(net, x, y, S, loss="rmtpp", backend="numpy")
    np.testing.assert_allclose([r.loss for _, r in chunks], [L[0:3].mean(), L[3:6].mean(), L[6]],
                               rtol=1e-13)


# ---------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("change, match", [
    (lambda x, y: (x[..., :2], y), r"x must have shape \(T, B, 1 \+ n_features\)"),
    (lambda x, y: (x.astype(np.int64), y), "x must be a floating-point"),
    (lambda x, y: (np.where(np.arange(3) == 0, 2.0, x), y), r"x\[\.\.\., 0\] \(the marks\)"),
    (lambda x, y: (np.where(np.arange(3) == 0, 0.5, x), y), r"x\[\.\.\., 0\] \(the marks\)"),
    (lambda x, y: (np.where(np.arange(3) == 1, np.nan, x), y), "x contains NaN"),
    (lambda x, y: (x, y[..., :1]), r"y must have shape \(T, B, 2\)"),
    (lambda x, y: (x, y[:-1]), r"y must have shape \(T, B, 2\)"),
    (lambda x, y: (x, np.where(np.arange(2) == 1, -1e-3, y)), r"y\[\.\.\., 1\] \(the gaps"),
    (lambda x, y: (x, np.where(np.arange(2) == 0, -1.0, y)), r"y\[\.\.\., 0\] \(the marks\)"),
    (lambda x, y: (x, np.where(np.arange(2) == 1, np.inf, y)), "y contains NaN or inf"),
    (lambda x, y: (x, y.astype(np.int64)), "y must be a floating-point"),
])
def test_bad_x_or_y_raise_naming_the_argument(change, match):
    net, x, y, S = _problem(1, T=4, B=2)
    bx, by = change(x, y)
    with pytest.raises(ValueError, match=match):
        npbptt.bptt(net, bx, by, S, 3, 4, loss="rmtpp")
    with pytest.raises(ValueError, match=match):
        evaluate(net, (bx, by))


def test_losses_that_do_not_fit_the_network_are_refused():
    net, x, y, S = _problem(1, T=4, B=2)
    with pytest.raises(ValueError, match="loss must be 'rmtpp'"):
        npbptt.bptt(net, x, y, S, 3, 4, loss="cross_entropy")
    lm = npbptt.LSTM(3, 4, 1, vocab_size=5)
    tok = np.zeros((4, 2), dtype=np.int64)
    with pytest.raises(ValueError, match="loss='rmtpp' needs a point-process network"):
        npbptt.bptt(lm, tok, tok, lm.init_state(2), 3, 4, loss="rmtpp")
    with pytest.raises(ValueError, match="decoder.w"):
        bad = net.copy()
        del bad.params["decoder.w"]
        npbptt.bptt(bad, x, y, S, 3, 4, loss="rmtpp")


def test_rmtpp_loss_is_cross_entropy_plus_eq12():
    rng = np.random.default_rng(6)
    out = rng.normal(size=(5, 4))
    y = np.stack([rng.integers(0, 2, 5).astype(float), rng.exponential(1.0, 5)], axis=1)
    ell, dout = LOSSES["rmtpp"](out, y)
    for b in range(5):
        with mp.workdps(60):
            ce = float(mp.log(mp.exp(out[b, 0]) + mp.exp(out[b, 1]))) - out[b, int(y[b, 0])]
            tnll = float(_eq12_mp(out[b, 2], out[b, 3], y[b, 1]))
        assert abs(ell[b] - ce - tnll) < 1e-12
    h = 1e-6
    for j in range(4):
        e = np.zeros(4)
        e[j] = h
        fd = (LOSSES["rmtpp"](out + e, y)[0] - LOSSES["rmtpp"](out - e, y)[0]) / (2 * h)
        np.testing.assert_allclose(dout[:, j], fd, rtol=1e-7, atol=1e-8)


# -------------------------------------------------------------------------- data and metrics
@needs_data
def test_book_order_streams_pair_each_event_with_its_successor():
    d = book_order_streams(DATA, batch=4, quick=True)
    raw = npbptt.data.load_book_order(DATA)
    m, t = raw["train"]["marks"][0], raw["train"]["times"][0]
    x, y = d.train
    assert x.shape == (6636 // 4, 4, 3) and y.shape == (6636 // 4, 4, 2)
    first = x[:, 0]                                    # stream 0 = the first pairs in order
    np.testing.assert_array_equal(first[:10, 0], m[:10])
    np.testing.assert_allclose(first[1:10, 1], np.diff(t[:10]), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(first[:10, 2], t[:10])
    np.testing.assert_array_equal(y[:10, 0, 0], m[1:11])
    np.testing.assert_allclose(y[:10, 0, 1], np.diff(t[:11]), rtol=0, atol=1e-12)
    # pair 3317 is sequence 0's last (-> its last event); pair 3318 starts sequence 1 (gap 0)
    flat_x, flat_y = x.swapaxes(0, 1).reshape(-1, 3), y.swapaxes(0, 1).reshape(-1, 2)
    assert flat_y[3317, 0] == m[-1] and abs(flat_y[3317, 1] - (t[-1] - t[-2])) < 1e-12
    assert flat_x[3318, 1] == 0.0 and flat_x[3318, 2] == raw["train"]["times"][1, 0]
    a = book_order_streams(DATA, batch=4, quick=True, features="authors")
    np.testing.assert_array_equal(a.train[0][:3, 0, 1], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(a.train[0][:, :, 2], x[:, :, 1])
    with pytest.raises(ValueError, match="features must be"):
        book_order_streams(DATA, features="both")


def test_evaluate_nll_rmse_error_against_a_plain_computation():
    net, x, y, _ = _problem(2, T=4, B=3, seed=7)
    S0 = net.init_state(3)
    got = evaluate(net, (x, y))
    L = _plain_losses(net.params, x, y, S0, 2, 3)
    assert abs(got["nll"] - L.mean()) < 1e-13
    # the read-out of every step by the network, then the mean gap by quadrature
    S = net.to_internal(S0)
    sq, wrong = 0.0, 0
    for t in range(x.shape[0]):
        S, _ = net.step(S, x[t])
        out = net.readout(S[0][-1])
        for b in range(3):
            sq += (_mean_gap_quad(out[b, 2], out[b, 3]) - y[t, b, 1]) ** 2
            wrong += int(out[b, :2].argmax() != y[t, b, 0])
    assert abs(got["rmse"] - np.sqrt(sq / 12)) < 1e-11
    assert got["error"] == wrong / 12
