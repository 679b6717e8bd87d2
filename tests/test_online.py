"""npbptt.online (issue 21): exact RTRL against full BPTT, the forward-mode products against
central finite differences, UORO's rank-one update against its definition and its
unbiasedness, bad input."""
import numpy as np
import pytest
from hypothesis import given, settings

import npbptt
import npbptt.online as online
from npbptt.online.jvp import step_jvp_params
from problems import make_problem, problems


def _full_bptt(p):
    T = p.x.shape[0]
    return npbptt.bptt(p.net, p.x, p.y, p.state, K1=T - 1, K2=T, loss=p.loss, backend="numpy")


def _assert_grads_close(got, want, rtol):
    assert set(got) == set(want)
    scale = max(np.abs(v).max() for v in want.values())
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=rtol * scale, err_msg=k)


# --- RTRL == full BPTT -------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(problems())
def test_rtrl_equals_full_bptt_float64(p):
    r = online.rtrl(p.net, p.x, p.y, p.state, p.loss)
    b = _full_bptt(p)
    _assert_grads_close(r.grads, b.grads, 1e-12)
    assert abs(r.loss - b.loss) <= 1e-12 * max(1.0, abs(b.loss))
    for s, t in zip(p.net.to_internal(r.state), p.net.to_internal(b.state)):
        np.testing.assert_array_equal(s, t)


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_rtrl_float32_and_tied(kind):
    rng = np.random.default_rng(3)
    p = make_problem(rng, kind=kind, layers=2, T=5, B=2, dtype=np.float32)
    r = online.rtrl(p.net, p.x, p.y, p.state, p.loss)
    assert all(v.dtype == np.float32 for v in r.grads.values())
    _assert_grads_close(r.grads, _full_bptt(p).grads, 1e-4)
    cls = npbptt.LSTM if kind == "lstm" else npbptt.RNN
    net = cls(4, 4, 2, vocab_size=6, seed=1, tie_weights=True)
    x, y = rng.integers(0, 6, (5, 3)), rng.integers(0, 6, (5, 3))
    state = net.init_state(3)
    r = online.rtrl(net, x, y, state)
    b = npbptt.bptt(net, x, y, state, K1=4, K2=5, backend="numpy")
    _assert_grads_close(r.grads, b.grads, 1e-12)


def test_rtrl_stream_carries_the_influence_through_chunks():
    """With the parameters fixed, the last chunk's streamed gradient is the gradient of its mean
    loss through the whole sequence: BPTT(T-1, K) on the whole sequence."""
    rng = np.random.default_rng(5)
    p = make_problem(rng, kind="lstm", layers=2, T=7, B=2)
    results = list(online.rtrl_stream(p.net, p.x, p.y, p.state, K=3, loss=p.loss))
    assert [r[0] for r in results] == [slice(0, 3), slice(3, 6), slice(6, 7)]
    for chunk, res in results:
        K = chunk.stop - chunk.start
        b = npbptt.bptt(p.net, p.x[:chunk.stop], p.y[:chunk.stop], p.state, K1=chunk.stop - 1,
                        K2=K, loss=p.loss, backend="numpy")
        _assert_grads_close(res.grads, b.grads, 1e-12)


# --- the forward-mode products against central finite differences ------------------------------
@pytest.mark.parametrize("kind,activation", [("lstm", "tanh"), ("rnn", "tanh"), ("rnn", "sigmoid")])
@pytest.mark.parametrize("embedding", [True, False])
def test_step_jvp_matches_central_differences(kind, activation, embedding):
    rng = np.random.default_rng(11)
    p = make_problem(rng, kind=kind, activation=activation, layers=2, embedding=embedding, B=3)
    net, x_t = p.net, p.x[0]
    S0 = net.to_internal(p.state)
    P = 2
    dS = tuple(rng.standard_normal(s.shape + (P,)) for s in S0)
    dth = {k: rng.standard_normal(v.shape + (P,)) for k, v in net.params.items()
           if not k.startswith("decoder.")}
    _, cache = net.step(S0, x_t)
    got = step_jvp_params(net, cache, dS, dth)
    eps = 1e-6
    for j in range(P):
        out = []
        for sgn in (1.0, -1.0):
            m = net.copy()
            for k, d in dth.items():
                m.params[k] = m.params[k] + sgn * eps * d[..., j]
            out.append(m.step(tuple(s + sgn * eps * d[..., j] for s, d in zip(S0, dS)), x_t)[0])
        for g, sp, sm in zip(got, *out):
            np.testing.assert_allclose(g[..., j], (sp - sm) / (2 * eps), rtol=1e-6, atol=1e-8)


# --- bad input ----------------------------------------------------------------------------------
def test_rtrl_bad_input_names_the_argument():
    rng = np.random.default_rng(2)
    p = make_problem(rng, kind="lstm", T=3, B=2)
    with pytest.raises(ValueError, match="max_bytes=1000"):
        online.rtrl(p.net, p.x, p.y, p.state, p.loss, max_bytes=1000)
    need = online.rtrl_bytes(p.net, 2)
    with pytest.raises(ValueError, match=f"about {need} bytes"):
        online.rtrl(p.net, p.x, p.y, p.state, p.loss, max_bytes=need - 1)
    online.rtrl(p.net, p.x, p.y, p.state, p.loss, max_bytes=need)
    for bad in ([1.5], "big", 0):
        with pytest.raises(ValueError, match="max_bytes"):
            online.rtrl(p.net, p.x, p.y, p.state, p.loss, max_bytes=bad)
    # the same errors as npbptt.bptt for x, y, state, loss
    for args in ((p.x[:, :, None], p.y, p.state, p.loss), (p.x, p.y[:2], p.state, p.loss),
                 (p.x, p.y, p.state[0], p.loss), (p.x, p.y, p.state, "hinge")):
        with pytest.raises(ValueError) as want:
            npbptt.bptt(p.net, *args[:3], 2, 3, args[3])
        with pytest.raises(ValueError) as got:
            online.rtrl(p.net, *args)
        assert str(got.value) == str(want.value)
    with pytest.raises(ValueError, match="y must be given"):
        online.rtrl(p.net, p.x, None, p.state, p.loss)
    class Sub(npbptt.LSTM):                                      # its step may differ
        pass
    with pytest.raises(ValueError, match="net must be an npbptt.RNN or npbptt.LSTM"):
        online.rtrl(Sub(3, 4, output_size=5, vocab_size=7), p.x, p.y, p.state)
    with pytest.raises(ValueError, match="carry"):
        online.rtrl(p.net, p.x, p.y, p.state, p.loss, carry=(1, 2))
    res = online.rtrl(p.net, p.x, p.y, p.state, p.loss)
    with pytest.raises(ValueError, match="carry.influence"):      # a carry of another batch
        online.rtrl(p.net, p.x[:, :1], p.y[:, :1], tuple(s[:, :1] for s in p.state), p.loss,
                    carry=res.carry)
    with pytest.raises(ValueError, match="K must be"):
        next(online.rtrl_stream(p.net, p.x, p.y, p.state, K=0))


# --- UORO ---------------------------------------------------------------------------------------
def _flat_state(S):
    return np.concatenate([s.ravel() for s in S])


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_uoro_update_matches_its_definition(kind):
    """Algorithm 1, lines 7-12, with fixed signs nu, against dF/dS and dF/dtheta formed by
    central finite differences of net.step (the whole batch state as one vector)."""
    from npbptt.online.common import ParamLayout
    rng = np.random.default_rng(7)
    p = make_problem(rng, kind=kind, layers=2, embedding=False, B=2, H=2, E=2, O=2)
    net, x_t = p.net, p.x[0]
    S0 = net.to_internal(p.state)
    layout = ParamLayout(net)
    s_tilde = tuple(rng.standard_normal(s.shape) for s in S0)
    th_tilde = rng.standard_normal(layout.size)
    nu = tuple(np.where(rng.random(s.shape) < 0.5, -1.0, 1.0) for s in S0)
    eps, n = 1e-6, _flat_state(S0).size
    shapes = [s.shape for s in S0]

    def unflat(v):
        out, o = [], 0
        for sh in shapes:
            out.append(v[o:o + np.prod(sh)].reshape(sh))
            o += np.prod(sh)
        return tuple(out)

    A = np.empty((n, n))
    for j in range(n):
        e = unflat(np.eye(n)[j])
        fp = net.step(tuple(s + eps * d for s, d in zip(S0, e)), x_t)[0]
        fm = net.step(tuple(s - eps * d for s, d in zip(S0, e)), x_t)[0]
        A[:, j] = (_flat_state(fp) - _flat_state(fm)) / (2 * eps)
    Bt = np.empty((n, layout.size))
    for j in range(layout.size):
        out = []
        for sgn in (1.0, -1.0):
            m = net.copy()
            for k, d in layout.unflatten(sgn * eps * np.eye(layout.size)[j]).items():
                m.params[k] = m.params[k] + d
            out.append(_flat_state(m.step(S0, x_t)[0]))
        Bt[:, j] = (out[0] - out[1]) / (2 * eps)
    Js, nv = A @ _flat_state(s_tilde), _flat_state(nu)
    dth = nv @ Bt
    rho0 = np.sqrt((np.linalg.norm(th_tilde) + 1e-7) / (np.linalg.norm(Js) + 1e-7))
    rho1 = np.sqrt((np.linalg.norm(dth) + 1e-7) / (np.linalg.norm(nv) + 1e-7))
    _, cache = net.step(S0, x_t)
    s_new, th_new = online.uoro_update(net, cache, layout, s_tilde, th_tilde, nu, eps=1e-7)
    np.testing.assert_allclose(_flat_state(s_new), rho0 * Js + rho1 * nv, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(th_new, th_tilde / rho0 + dth / rho1, rtol=1e-6, atol=1e-8)


def test_uoro_is_unbiased():
    """Mean of N = 1000 UORO draws against the exact (RTRL) gradient, per component of the
    state-update parameters, in units of its estimated standard error: a two-sided z-test,
    Bonferroni-corrected over the m components, at family-wise false-alarm rate alpha = 1e-3
    (threshold z* = Phi^-1(1 - alpha / (2m)), about 4.3 here; the CLT approximation with N =
    1000).  The seed is fixed, so the test is deterministic.  The read-out's parameters get the
    exact direct term: equal to 1e-12.  The same test rejects the truncated gradient
    (1/T) sum_t BPTT(0, 1)_t as the mean, so it has the power to see a bias of that size."""
    from statistics import NormalDist
    rng = np.random.default_rng(0)
    p = make_problem(rng, kind="lstm", layers=2, T=4, B=2, H=3, E=2, O=3, V=4)
    exact = online.rtrl(p.net, p.x, p.y, p.state, p.loss).grads
    steps = [r.grads for _, r in npbptt.stream(p.net, p.x, p.y, p.state, K=1, K1=0,
                                               loss=p.loss, backend="numpy")]
    trunc = {k: np.mean([g[k] for g in steps], axis=0) for k in exact}   # TBPTT(0): biased
    draw = np.random.default_rng(1)
    N = 1000
    runs = [online.uoro(p.net, p.x, p.y, p.state, draw, p.loss).grads for _ in range(N)]
    z_exact, z_trunc = [], []
    for k in exact:
        a = np.stack([r[k] for r in runs])
        mean, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(N)
        if k.startswith("decoder."):
            np.testing.assert_allclose(a, np.broadcast_to(exact[k], a.shape), rtol=1e-12,
                                       atol=1e-12)
            continue
        zero = np.all(a == 0, axis=0)          # embedding rows no token uses: exactly 0
        assert np.all(exact[k][zero] == 0)
        z_exact.append((mean - exact[k])[~zero] / se[~zero])
        z_trunc.append((mean - trunc[k])[~zero] / se[~zero])
    z_exact, z_trunc = np.concatenate(z_exact), np.concatenate(z_trunc)
    z_star = NormalDist().inv_cdf(1 - 1e-3 / (2 * z_exact.size))
    assert np.abs(z_exact).max() < z_star
    assert np.abs(z_trunc).max() > z_star


def test_uoro_stream_and_bad_input():
    rng = np.random.default_rng(4)
    p = make_problem(rng, kind="rnn", layers=1, T=5, B=2)
    a = list(online.uoro_stream(p.net, p.x, p.y, p.state, 2, np.random.default_rng(9), p.loss))
    assert [c for c, _ in a] == [slice(0, 2), slice(2, 4), slice(4, 5)]
    # one call over the whole sequence draws the same signs: its state and carry agree
    whole = online.uoro(p.net, p.x, p.y, p.state, np.random.default_rng(9), p.loss)
    np.testing.assert_allclose(a[-1][1].carry.theta_tilde, whole.carry.theta_tilde, rtol=1e-12)
    np.testing.assert_array_equal(a[-1][1].state, whole.state)
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator"):
        online.uoro(p.net, p.x, p.y, p.state, 0, p.loss)
    with pytest.raises(ValueError, match="eps"):
        online.uoro(p.net, p.x, p.y, p.state, rng, p.loss, eps=0.0)
    with pytest.raises(ValueError, match="carry"):
        online.uoro(p.net, p.x, p.y, p.state, rng, p.loss, carry=whole.carry.theta_tilde)
    with pytest.raises(ValueError, match="y must have shape"):
        online.uoro(p.net, p.x, p.y[:2], p.state, rng, p.loss)
    with pytest.raises(ValueError, match="K must be"):
        next(online.uoro_stream(p.net, p.x, p.y, p.state, 0, rng))


# --- ARTBP --------------------------------------------------------------------------------------
def _lag_terms(p):
    """d[s][k] = dL_s/dS_{s-k} . dS_{s-k}/dtheta (plus, for k = 0, the read-out's direct term),
    from differences of npbptt.bptt(K1=k, K2=1) on the prefix ending at step s: the per-lag
    terms of Eq. (15) of Aicher et al., independent of npbptt.online."""
    T = p.x.shape[0]
    d = []
    for s in range(T):
        prev, row = None, []
        for k in range(s + 1):
            g = npbptt.bptt(p.net, p.x[:s + 1], p.y[:s + 1], p.state, K1=k, K2=1, loss=p.loss,
                            backend="numpy").grads
            row.append(g if prev is None else {n: g[n] - prev[n] for n in g})
            prev = g
        d.append(row)
    return d


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_artbp_fixed_pattern_is_the_compensated_sum_of_lag_terms(kind):
    """artbp_estimate(cuts, probs) = (1/T) sum_s sum_{k <= s - r(s)} W(s, k) d[s][k], r(s) the
    last cut at or before s and W(s, k) = prod_{t=s-k+1}^{s} 1/(1 - c_t) (module docstring),
    with d the per-lag terms from npbptt.bptt; and c = 0 is full BPTT."""
    rng = np.random.default_rng(12)
    p = make_problem(rng, kind=kind, layers=2, T=6, B=2)
    T = p.x.shape[0]
    cuts = np.array([True, False, False, True, False, False])
    probs = np.array([1.0, 0.3, 0.6, 0.5, 0.2, 0.45])
    got = online.artbp_estimate(p.net, p.x, p.y, p.state, cuts, probs, p.loss)
    d = _lag_terms(p)
    want = {n: np.zeros_like(v) for n, v in p.net.params.items()}
    for s in range(T):
        r = max(t for t in range(s + 1) if cuts[t])
        for k in range(s - r + 1):
            w = np.prod([1.0 / (1.0 - probs[t]) for t in range(s - k + 1, s + 1)])
            for n in want:
                want[n] += w * d[s][k][n] / T
    _assert_grads_close(got.grads, want, 1e-12)
    full = _full_bptt(p)
    assert abs(got.loss - full.loss) <= 1e-12 * abs(full.loss)
    r0 = online.artbp(p.net, p.x, p.y, p.state, np.random.default_rng(0), c=0.0, loss=p.loss)
    _assert_grads_close(r0.grads, full.grads, 1e-12)
    for a, b in zip(p.net.to_internal(r0.state), p.net.to_internal(full.state)):
        np.testing.assert_array_equal(a, b)


def test_artbp_draw_and_stream_agree():
    """The stream's segments are the pattern artbp_draw draws from the same generator, and
    their gradients sum to the whole sequence's estimate times T / norm."""
    rng = np.random.default_rng(6)
    p = make_problem(rng, kind="lstm", layers=1, T=9, B=2)
    c = online.min_length(2, 0.5)
    cuts, probs = online.artbp_draw(np.random.default_rng(3), c, 9)
    assert cuts[0] and probs[0] == 1.0
    assert not cuts[1] and probs[1] == 0.0          # the first segment is at least 2 steps long
    segs = list(online.artbp_stream(p.net, p.x, p.y, p.state, np.random.default_rng(3), c,
                                    p.loss, norm=4.0))
    starts = [s.start for s, _ in segs]
    assert starts == list(np.flatnonzero(cuts)) and segs[-1][0].stop == 9
    whole = online.artbp_estimate(p.net, p.x, p.y, p.state, cuts, probs, p.loss)
    total = {n: sum(r.grads[n] for _, r in segs) for n in whole.grads}
    _assert_grads_close(total, {n: v * 9 / 4.0 for n, v in whole.grads.items()}, 1e-12)
    np.testing.assert_array_equal(segs[-1][1].state[0], whole.state[0])


def test_artbp_float32_keeps_its_dtype():
    """float32 in, float32 out (the compensation does not promote), and the float32 estimate
    of a fixed pattern agrees with the float64 one of the same network to float32 accuracy."""
    rng = np.random.default_rng(8)
    p = make_problem(rng, kind="lstm", layers=2, T=5, B=2)
    cuts = np.array([True, False, True, False, False])
    probs = np.array([1.0, 0.25, 0.5, 0.4, 0.3])
    want = online.artbp_estimate(p.net, p.x, p.y, p.state, cuts, probs, p.loss).grads
    net32 = npbptt.LSTM(3, 4, 2, 5, vocab_size=7, dtype=np.float32)
    net32.params = {k: v.astype(np.float32) for k, v in p.net.params.items()}
    st32 = tuple(s.astype(np.float32) for s in p.state)
    got = online.artbp_estimate(net32, p.x, p.y, st32, cuts, probs, p.loss).grads
    assert all(v.dtype == np.float32 for v in got.values())
    _assert_grads_close(got, want, 1e-4)


def _z_scores(runs, exact, other):
    N = len(runs)
    z_exact, z_other = [], []
    for k in exact:
        a = np.stack([r[k] for r in runs])
        if k.startswith("decoder."):               # the read-out's direct term: exact
            np.testing.assert_allclose(a, np.broadcast_to(exact[k], a.shape), rtol=1e-12,
                                       atol=1e-12)
            continue
        mean, se = a.mean(0), a.std(0, ddof=1) / np.sqrt(N)
        const = np.all(a == a[0], axis=0)          # embedding rows no token uses: exactly 0
        np.testing.assert_array_equal(a[0][const], exact[k][const])
        z_exact.append((mean - exact[k])[~const] / se[~const])
        z_other.append((other[k] - exact[k])[~const] / se[~const])
    return np.concatenate(z_exact), np.concatenate(z_other)


@pytest.mark.parametrize("c", [0.4, "min_length"])
def test_artbp_is_unbiased(c):
    """Mean of N = 2000 ARTBP draws against the exact (full BPTT) gradient, per component, in
    units of its estimated standard error: a two-sided z-test, Bonferroni-corrected over the m
    components, at family-wise false-alarm rate alpha = 1e-3 (z* = Phi^-1(1 - alpha / (2m)); CLT
    with N = 2000; fixed seeds, so deterministic).  c: a constant probability, and a
    segment-length-dependent one (min_length(2, 0.6): the c_t depend on earlier draws).  Power:
    the same test rejects the mean of the *uncompensated* estimator (same cuts, factor 1; its
    exact mean computed from the per-lag terms), a bias within the reach of ARTBP's variance."""
    from statistics import NormalDist
    rng = np.random.default_rng(0)
    p = make_problem(rng, kind="lstm", layers=2, T=5, B=2, H=3, E=2, O=3, V=4)
    T = p.x.shape[0]
    exact = _full_bptt(p).grads
    cfun = 0.4 if c == 0.4 else online.min_length(2, 0.6)
    draw = np.random.default_rng(1)
    N = 2000
    runs = [online.artbp(p.net, p.x, p.y, p.state, draw, cfun, p.loss).grads for _ in range(N)]
    # the uncompensated estimator's exact mean: lag k of L_s survives with P = prod (1 - c_t)
    d = _lag_terms(p)
    ck = (lambda k: 0.4) if c == 0.4 else cfun
    surv = np.zeros((T, T))                   # P(no cut at links s-k+1..s), c_t by segment length
    for s in range(T):
        for k in range(s + 1):
            # enumerate patterns exactly: small T
            tot = 0.0
            for bits in range(2 ** (T - 1)):
                X = [True] + [bool(bits >> (t - 1) & 1) for t in range(1, T)]
                pr, klen = 1.0, 1
                for t in range(1, T):
                    q = ck(klen)
                    pr *= q if X[t] else 1 - q
                    klen = 1 if X[t] else klen + 1
                if not any(X[s - k + 1:s + 1]):
                    tot += pr
            surv[s, k] = tot
    biased = {n: sum(surv[s, k] * d[s][k][n] for s in range(T) for k in range(s + 1)) / T
              for n in exact}
    z_exact, z_other = _z_scores(runs, exact, biased)
    z_star = NormalDist().inv_cdf(1 - 1e-3 / (2 * z_exact.size))
    assert np.abs(z_exact).max() < z_star
    assert np.abs(z_other).max() > z_star


def test_artbp_bad_input_names_the_argument():
    rng = np.random.default_rng(4)
    p = make_problem(rng, kind="rnn", layers=1, T=5, B=2)
    for bad in (1.0, -0.1, float("nan"), "half", True):
        with pytest.raises(ValueError, match="c must be a truncation probability"):
            online.artbp(p.net, p.x, p.y, p.state, rng, c=bad, loss=p.loss)
    with pytest.raises(ValueError, match=r"c as an array must have shape \(T,\) = \(5,\)"):
        online.artbp(p.net, p.x, p.y, p.state, rng, c=np.zeros(4), loss=p.loss)
    with pytest.raises(ValueError, match="c must hold truncation probabilities"):
        online.artbp(p.net, p.x, p.y, p.state, rng, c=np.array([0, .2, 1.0, .1, .1]), loss=p.loss)
    with pytest.raises(ValueError, match=r"c\(1\) must be a truncation probability"):
        online.artbp(p.net, p.x, p.y, p.state, rng, c=lambda k: 2.0, loss=p.loss)
    with pytest.raises(ValueError, match="rng must be a numpy.random.Generator"):
        online.artbp(p.net, p.x, p.y, p.state, 0, loss=p.loss)
    with pytest.raises(ValueError, match="K_min must be"):
        online.min_length(0, 0.1)
    with pytest.raises(ValueError, match="y must be given"):
        online.artbp(p.net, p.x, None, p.state, rng)
    with pytest.raises(ValueError) as want:
        npbptt.bptt(p.net, p.x, p.y[:2], p.state, 2, 3, p.loss)
    with pytest.raises(ValueError) as got:
        online.artbp(p.net, p.x, p.y[:2], p.state, rng, loss=p.loss)
    assert str(got.value) == str(want.value)
    with pytest.raises(ValueError, match="cuts must be a boolean array"):
        online.artbp_estimate(p.net, p.x, p.y, p.state, np.zeros(5), np.zeros(5), p.loss)
    with pytest.raises(ValueError, match="probs must be in"):
        online.artbp_estimate(p.net, p.x, p.y, p.state, np.zeros(5, bool), np.ones(5), p.loss)
    with pytest.raises(ValueError, match="norm must be given"):
        next(online.artbp_stream(p.net, p.x, p.y, p.state, rng, c=online.min_length(2, .1)))
    with pytest.raises(ValueError, match="norm must be a finite number"):
        next(online.artbp_stream(p.net, p.x, p.y, p.state, rng, c=0.1, loss=p.loss, norm=0))


# --- validation/unbiased.py --smoke -------------------------------------------------------------
def test_unbiased_comparison_script_smoke(tmp_path):
    """validation/unbiased.py --smoke: the table (md, csv) and the figure are written, with one
    row per problem and estimator; RTRL's row is exact, and truncation gets the sign of the
    influence-balancing gradient wrong (the demonstration the problem is for)."""
    import csv
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "validation" / "unbiased.py"
    res = subprocess.run([sys.executable, str(script), "--smoke", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    md = (tmp_path / "unbiased.md").read_text()
    assert "SMOKE" in md and "REDUCED" in md and "## Training the copy task" in md
    assert "| TBPTT(1) |" in md.split("## Influence balancing trained online")[1]
    assert (tmp_path / "unbiased.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(tmp_path / "unbiased.csv")))
    problems = {r["problem"] for r in rows}
    assert len(problems) == 3 and any(p.startswith("influence balancing") for p in problems)
    want = {"TBPTT(1)", "TBPTT(3)", "adaptive kappa_hat(0.1)", "UORO", "ARTBP(c=0.2)", "RTRL"}
    for p in problems:
        assert {r["estimator"] for r in rows if r["problem"] == p} == want
    for r in rows:
        if r["estimator"] == "RTRL":
            assert float(r["bias"]) < 1e-10 and float(r["var"]) == 0
        if r["estimator"] in ("UORO", "ARTBP(c=0.2)"):
            assert int(r["N"]) > 1 and float(r["var"]) > 0
        if r["problem"].startswith("influence") and r["estimator"] == "TBPTT(1)":
            assert float(r["proj"]) < 0
    training = md.split("## Training the copy task")[1]
    for name in want - {"TBPTT(1)"}:                   # the smoke run trains TBPTT(3) only
        assert f"| {name}" in training
