"""Bad input raises ValueError naming the argument, before anything is computed."""
import numpy as np
import pytest

import npbptt
from problems import make_problem


@pytest.fixture
def lstm_prob():
    return make_problem(np.random.default_rng(0), kind="lstm", layers=2, T=5, B=3, H=4, E=3, O=5, V=7)


@pytest.fixture
def dense_prob():
    return make_problem(np.random.default_rng(1), kind="rnn", embedding=False, loss="mse", T=5, B=3)


def _raises(match, fn, *args, **kw):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kw)


def test_bad_K1_K2(lstm_prob):
    p = lstm_prob
    for K1, K2, arg in [(-1, 1, "K1"), (2.5, 1, "K1"), (3, 0, "K2"), (3, 5, "K2"), (1, 3, "K2"),
                        (10, 6, "K2"), (3, True, "K2")]:
        _raises(arg, npbptt.bptt, p.net, p.x, p.y, p.state, K1, K2)


def test_bad_x(lstm_prob, dense_prob):
    p, d = lstm_prob, dense_prob
    _raises("x must have shape", npbptt.bptt, p.net, p.x[:, :, None], p.y, p.state, 2, 1)
    _raises("integer tokens", npbptt.bptt, p.net, p.x.astype(float), p.y, p.state, 2, 1)
    bad = p.x.copy()
    bad[0, 0] = 7
    _raises(r"x tokens must lie in \[0, vocab_size=7\)", npbptt.bptt, p.net, bad, p.y, p.state, 2, 1)
    bad[0, 0] = -1
    _raises("x tokens", npbptt.bptt, p.net, bad, p.y, p.state, 2, 1)
    _raises("input_size", npbptt.bptt, d.net, d.x[:, :, :2], d.y, d.state, 2, 1, "mse")
    nan = d.x.copy()
    nan[1, 1, 0] = np.nan
    _raises("x contains NaN or inf", npbptt.bptt, d.net, nan, d.y, d.state, 2, 1, "mse")
    nan[1, 1, 0] = np.inf
    _raises("x contains NaN or inf", npbptt.bptt, d.net, nan, d.y, d.state, 2, 1, "mse")
    _raises("floating-point", npbptt.bptt, d.net, d.x.astype(int), d.y, d.state, 2, 1, "mse")
    _raises("at least one step", npbptt.bptt, p.net, p.x[:0], p.y[:0], p.state, 2, 1)


def test_bad_y(lstm_prob, dense_prob):
    p, d = lstm_prob, dense_prob
    _raises(r"y must have shape \(T, B\)", npbptt.bptt, p.net, p.x, p.y[:-1], p.state, 2, 1)
    bad = p.y.copy()
    bad[2, 1] = 5
    _raises(r"y targets must lie in \[0, output_size=5\)", npbptt.bptt, p.net, p.x, bad, p.state, 2, 1)
    _raises("integer targets", npbptt.bptt, p.net, p.x, p.y.astype(float), p.state, 2, 1)
    _raises("output_size", npbptt.bptt, d.net, d.x, d.y[:, :, :1], d.state, 2, 1, "mse")
    nan = d.y.copy()
    nan[0, 0, 0] = np.nan
    _raises("y contains NaN or inf", npbptt.bptt, d.net, d.x, nan, d.state, 2, 1, "mse")
    _raises("loss must be one of", npbptt.bptt, p.net, p.x, p.y, p.state, 2, 1, "hinge")


def test_bad_state(lstm_prob, dense_prob):
    p, d = lstm_prob, dense_prob
    _raises(r"state must be a tuple \(h, c\)", npbptt.bptt, p.net, p.x, p.y, p.state[0], 2, 1)
    _raises(r"state\[1\] \(c\) must have shape", npbptt.bptt, p.net, p.x, p.y,
            (p.state[0], p.state[1][:, :2]), 2, 1)
    _raises("state must be one array", npbptt.bptt, d.net, d.x, d.y, (d.state,), 2, 1, "mse")
    _raises(r"state must have shape \(num_layers, B, H\)", npbptt.bptt, d.net, d.x, d.y,
            d.state[:, :2], 2, 1, "mse")
    nan = d.state.copy()
    nan[0, 0, 0] = np.nan
    _raises("state contains NaN or inf", npbptt.bptt, d.net, d.x, d.y, nan, 2, 1, "mse")


def test_batch_sizes_must_agree(lstm_prob):
    p = lstm_prob
    _raises("y must have shape", npbptt.bptt, p.net, p.x, p.y[:, :2], p.state, 2, 1)
    _raises("state", npbptt.bptt, p.net, p.x[:, :2], p.y[:, :2], p.state, 2, 1)


def test_bad_backend_and_constructor_arguments(lstm_prob):
    p = lstm_prob
    _raises("backend must be one of", npbptt.bptt, p.net, p.x, p.y, p.state, 2, 1, backend="tpu")
    _raises("activation must be one of", npbptt.RNN, 3, 4, 1, 2, activation="gelu")
    _raises("hidden_size", npbptt.LSTM, 3, 0, 1, 2)
    _raises("num_layers", npbptt.LSTM, 3, 4, 0, 2)
    _raises("output_size", npbptt.LSTM, 3, 4, 1)
    _raises("dtype", npbptt.LSTM, 3, 4, 1, 2, dtype=np.int32)
    _raises("batch", p.net.init_state, 0)


def test_nothing_is_computed_on_bad_input(lstm_prob):
    """The state passed in is never modified, on good or bad input."""
    p = lstm_prob
    before = tuple(s.copy() for s in p.state)
    with pytest.raises(ValueError):
        npbptt.bptt(p.net, p.x, p.y, p.state, 2, 9)
    npbptt.bptt(p.net, p.x, p.y, p.state, 2, 1)
    assert all(np.array_equal(a, b) for a, b in zip(before, p.state))


def test_stream_and_probe_validate_too(lstm_prob):
    p = lstm_prob
    _raises("K must be an integer >= 1", lambda: list(npbptt.stream(p.net, p.x, p.y, p.state, 0)))
    _raises("K2", lambda: list(npbptt.stream(p.net, p.x, p.y, p.state, 4, K1=1)))
    bad = p.x.copy()
    bad[0, 0] = 99
    _raises("x tokens", npbptt.grad_norms, p.net, bad, p.y, p.state)
