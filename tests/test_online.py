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
