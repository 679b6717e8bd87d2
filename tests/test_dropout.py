"""Dropout (issue 18, §5.2): inverted dropout on the layer-0 input and on the top layer's h_t
before the read-out, with masks passed to ``bptt`` / ``step_losses`` and drawn chunk by chunk by
``stream(rng=)``.  The masked BPTT(K1, K2) gradient is checked against central finite
differences of a plain forward written here, against PyTorch autograd on the same masks, and
the routing of masked calls to the CPU kernels where they take masks (and of unmasked ones to
the kernels as the stock network)."""
import copy

import numpy as np
import pytest

import npbptt
from npbptt import backends
from npbptt.model import DropoutMasks

V, E, H, B = 5, 3, 4, 2
P = 0.4


def problem(kind="lstm", layers=1, embedding=True, T=7, seed=0, p=P, dtype=np.float64,
            loss="cross_entropy"):
    """A network with random non-zero biases, a random initial state, data, and masks drawn from
    the network (so they hold zeros and 1/(1-p))."""
    rng = np.random.default_rng(seed)
    cls = npbptt.LSTM if kind == "lstm" else npbptt.RNN
    out = V if loss == "cross_entropy" else 3
    net = cls(E, H, layers, output_size=out, vocab_size=V if embedding else None, dtype=dtype,
              seed=seed, dropout=p)
    for k, v in net.params.items():
        if "bias" in k:
            v[...] = rng.uniform(-0.5, 0.5, v.shape)
    x = rng.integers(0, V, (T, B)) if embedding else rng.standard_normal((T, B, E)).astype(dtype)
    y = rng.integers(0, V, (T, B)) if loss == "cross_entropy" else rng.standard_normal((T, B, out))
    shape = (layers, B, H)
    hs = [(0.5 * rng.standard_normal(shape)).astype(dtype) for _ in range(2 if kind == "lstm" else 1)]
    state = tuple(hs) if kind == "lstm" else hs[0]
    masks = net.dropout_masks(T, B, np.random.default_rng(seed + 100))
    return net, x, y, state, masks


# --- a plain forward, written independently of npbptt's step / readout ----------------------
def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def plain_forward(net, params, x, state, masks, steps):
    """Run ``steps`` (a range of 0-based steps) from ``state`` (public form); returns the list of
    read-out outputs of those steps and the state after them."""
    lstm = net.kind == "lstm"
    h = np.array(state[0] if lstm else state, dtype=np.float64)
    c = np.array(state[1], dtype=np.float64) if lstm else None
    outs = []
    for t in steps:
        inp = params["embedding.weight"][x[t]] if net.embedding else x[t]
        inp = inp * masks.input[t]
        h, c = h.copy(), (c.copy() if lstm else None)
        for l in range(net.num_layers):
            z = (inp @ params[f"weight_ih_l{l}"].T + params[f"bias_ih_l{l}"]
                 + h[l] @ params[f"weight_hh_l{l}"].T + params[f"bias_hh_l{l}"])
            if lstm:
                i, f, g, o = np.split(z, 4, axis=1)
                c[l] = _sigmoid(f) * c[l] + _sigmoid(i) * np.tanh(g)
                h[l] = _sigmoid(o) * np.tanh(c[l])
            else:
                h[l] = np.tanh(z)
            inp = h[l]
        top = h[-1] * masks.output[t]
        outs.append(top @ params["decoder.weight"].T + params["decoder.bias"])
    return outs, ((h, c) if lstm else h)


def step_loss(out, y_t, loss):
    if loss == "cross_entropy":
        z = out - out.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -logp[np.arange(len(y_t)), y_t].mean()
    return ((out - y_t) ** 2).mean()


def truncated_loss(net, params, x, y, state, masks, K1, K2, loss):
    """(1/K2) sum of the last K2 step losses, as a function of ``params`` with the state
    entering step T-1-K1 held at its value under ``net.params`` (what BPTT(K1, K2) differentiates)."""
    T = len(x)
    t0 = T - 1 - min(K1, T - 1)
    _, S0 = plain_forward(net, net.params, x, state, masks, range(t0))
    outs, _ = plain_forward(net, params, x, S0, masks, range(t0, T))
    return sum(step_loss(outs[t - t0], y[t], loss) for t in range(T - K2, T)) / K2


CASES = [  # kind, layers, embedding, K1, K2, loss
    ("lstm", 1, True, 6, 7, "cross_entropy"),
    ("lstm", 2, True, 3, 2, "cross_entropy"),
    ("lstm", 2, False, 4, 1, "mse"),
    ("rnn", 1, False, 6, 3, "cross_entropy"),
    ("rnn", 2, True, 2, 3, "cross_entropy"),
    ("rnn", 1, True, 4, 4, "mse"),
]


@pytest.mark.parametrize("kind,layers,embedding,K1,K2,loss", CASES)
def test_masked_bptt_equals_central_differences_of_a_plain_forward(kind, layers, embedding, K1, K2, loss):
    net, x, y, state, masks = problem(kind, layers, embedding, loss=loss, seed=layers + K1)
    assert (masks.input == 0).any() and (masks.output == 0).any()
    res = npbptt.bptt(net, x, y, state, K1, K2, loss, backend="numpy", masks=masks)
    assert res.loss == pytest.approx(truncated_loss(net, net.params, x, y, state, masks, K1, K2, loss),
                                     rel=1e-12)
    eps = 1e-6
    for name, v in net.params.items():
        fd = np.empty_like(v)
        for idx in np.ndindex(v.shape):
            plus = {k: a.copy() for k, a in net.params.items()}
            minus = {k: a.copy() for k, a in net.params.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            fd[idx] = (truncated_loss(net, plus, x, y, state, masks, K1, K2, loss)
                       - truncated_loss(net, minus, x, y, state, masks, K1, K2, loss)) / (2 * eps)
        np.testing.assert_allclose(res.grads[name], fd, rtol=1e-6, atol=1e-8, err_msg=name)
    _, S_T = plain_forward(net, net.params, x, state, masks, range(len(x)))
    for a, b in zip(net.to_internal(res.state), net.to_internal(S_T)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kind,embedding", [("lstm", True), ("rnn", False)])
def test_masked_step_losses_equal_the_plain_forward(kind, embedding):
    net, x, y, state, masks = problem(kind, 2, embedding)
    L, S = npbptt.step_losses(net, x, y, state, backend="numpy", masks=masks)
    outs, S_ref = plain_forward(net, net.params, x, state, masks, range(len(x)))
    np.testing.assert_allclose(L, [step_loss(o, y[t], "cross_entropy") for t, o in enumerate(outs)],
                               rtol=1e-13)
    for a, b in zip(net.to_internal(S), net.to_internal(S_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


# --- PyTorch autograd on the same masks -------------------------------------------------------
@pytest.mark.parametrize("kind,layers,embedding,K1,K2", [
    ("lstm", 2, True, 4, 3), ("lstm", 1, False, 6, 7), ("rnn", 2, True, 3, 1), ("rnn", 1, False, 5, 5)])
def test_masked_bptt_equals_torch_autograd(kind, layers, embedding, K1, K2):
    torch = pytest.importorskip("torch")
    net, x, y, state, masks = problem(kind, layers, embedding, seed=7 + layers)
    T = len(x)
    mod = (torch.nn.LSTM if kind == "lstm" else torch.nn.RNN)(E, H, layers).double()
    P_ = {k: torch.tensor(v, requires_grad=True) for k, v in net.params.items()}
    m_in, m_out = torch.from_numpy(masks.input), torch.from_numpy(masks.output)

    def run(steps, S):
        xs = torch.from_numpy(x[steps.start:steps.stop])
        inp = P_["embedding.weight"][xs] if embedding else xs
        inp = inp * m_in[steps]                                   # the masks applied by hand
        out, S = torch.func.functional_call(
            mod, {k: P_[k] for k, _ in mod.named_parameters()}, (inp, S))
        return out * m_out[steps], S

    S = tuple(torch.from_numpy(s) for s in state) if kind == "lstm" else torch.from_numpy(state)
    t0 = T - 1 - K1
    if t0 > 0:
        with torch.no_grad():                       # the state entering the window: a constant
            _, S = run(slice(0, t0), S)
    top, _ = run(slice(t0, T), S)
    logits = top @ P_["decoder.weight"].T + P_["decoder.bias"]
    target = torch.from_numpy(y[t0:])
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), target.reshape(-1),
                                           reduction="none").reshape(T - t0, B).mean(dim=1)
    total = ce[-K2:].mean()
    total.backward()

    res = npbptt.bptt(net, x, y, state, K1, K2, backend="numpy", masks=masks)
    assert abs(res.loss - total.item()) <= 1e-12
    for k, p in P_.items():
        g = p.grad.numpy()
        assert np.abs(res.grads[k] - g).max() <= 1e-10 * max(1.0, np.abs(g).max()), k


# --- what the masks do and do not change ------------------------------------------------------
def _same(a, b):
    assert a.loss == b.loss
    assert a.grads.keys() == b.grads.keys()
    for k in a.grads:
        assert np.array_equal(a.grads[k], b.grads[k]), k
    sa, sb = ((s if isinstance(s, tuple) else (s,)) for s in (a.state, b.state))
    assert len(sa) == len(sb) and all(np.array_equal(u, v) for u, v in zip(sa, sb))


@pytest.mark.parametrize("kind,embedding", [("lstm", True), ("rnn", False), ("lstm", False)])
def test_masks_of_ones_equal_no_masks_bitwise_and_zeros_change_the_result(kind, embedding):
    net, x, y, state, masks = problem(kind, 2, embedding)
    ones = DropoutMasks(np.ones_like(masks.input), np.ones_like(masks.output))
    plain = npbptt.bptt(net, x, y, state, 4, 2, backend="numpy")
    _same(npbptt.bptt(net, x, y, state, 4, 2, backend="numpy", masks=ones), plain)
    L0, _ = npbptt.step_losses(net, x, y, state, backend="numpy")
    L1, _ = npbptt.step_losses(net, x, y, state, backend="numpy", masks=ones)
    assert np.array_equal(L0, L1)
    dropped = npbptt.bptt(net, x, y, state, 4, 2, backend="numpy", masks=masks)
    assert dropped.loss != plain.loss
    assert not np.allclose(dropped.grads["weight_ih_l0"], plain.grads["weight_ih_l0"])
    # each mask alone matters: only the input mask, then only the output mask
    for m in (DropoutMasks(masks.input, ones.output), DropoutMasks(ones.input, masks.output)):
        assert npbptt.bptt(net, x, y, state, 4, 2, backend="numpy", masks=m).loss != plain.loss


def test_p0_network_is_the_stock_network():
    net, x, y, state, _ = problem("lstm", 2, p=0.0)
    stock = npbptt.LSTM(E, H, 2, output_size=V, vocab_size=V, seed=0)
    stock.params = {k: v.copy() for k, v in net.params.items()}
    assert net.dropout == 0.0 and "dropout" not in net.config() and "dropout" not in repr(net)
    _same(npbptt.bptt(net, x, y, state, 3, 2, backend="numpy"),
          npbptt.bptt(stock, x, y, state, 3, 2, backend="numpy"))
    m = net.dropout_masks(len(x), B, np.random.default_rng(0))
    assert (m.input == 1).all() and (m.output == 1).all()
    rng = np.random.default_rng(3)
    before = rng.bit_generator.state
    got = [r for _, r in npbptt.stream(net, x, y, state, 2, backend="numpy", rng=rng)]
    want = [r for _, r in npbptt.stream(stock, x, y, state, 2, backend="numpy")]
    for a, b in zip(got, want):
        _same(a, b)
    assert rng.bit_generator.state == before        # p = 0: the generator is not touched


def test_attribute_config_copy_repr():
    net = npbptt.RNN(E, H, 2, vocab_size=V, dropout=0.25, seed=1)
    assert net.dropout == 0.25 and net.copy().dropout == 0.25
    cfg = net.config()
    assert cfg["dropout"] == 0.25 and "dropout=0.25" in repr(net)
    assert npbptt.RNN(**cfg).dropout == 0.25
    assert npbptt.LSTM(E, H, vocab_size=V, dropout=0.5).config()["dropout"] == 0.5


def test_dropout_masks_are_bernoulli_from_the_passed_generator():
    net = npbptt.LSTM(E, H, vocab_size=V, dropout=P, dtype=np.float32)
    rng = np.random.default_rng(11)
    twin = copy.deepcopy(rng)
    m = net.dropout_masks(400, 8, rng)
    assert m.input.shape == (400, 8, E) and m.output.shape == (400, 8, H)
    assert m.input.dtype == np.float32 and m.output.dtype == np.float32
    scale = np.float32(1 / (1 - P))
    for a in (m.input, m.output):
        assert set(np.unique(a)) == {0.0, scale}
        assert abs((a == 0).mean() - P) < 0.03          # 3200+ draws: sd of the rate ~0.009
    # the documented draws: input first, then output, u >= p kept
    assert np.array_equal(m.input, np.where(twin.random((400, 8, E)) >= P, scale, 0).astype(np.float32))
    assert np.array_equal(m.output, np.where(twin.random((400, 8, H)) >= P, scale, 0).astype(np.float32))
    again = net.dropout_masks(400, 8, np.random.default_rng(11))
    assert np.array_equal(again.input, m.input) and np.array_equal(again.output, m.output)


# --- stream(rng=) ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,K,K1", [("lstm", 3, None), ("rnn", 2, 3), ("lstm", 4, 4)])
def test_stream_equals_chunk_by_chunk_bptt_with_the_documented_masks(kind, K, K1):
    net, x, y, state, _ = problem(kind, 2, T=11)
    rng = np.random.default_rng(5)
    twin = copy.deepcopy(rng)
    got = list(npbptt.stream(net, x, y, state, K, K1, backend="numpy", rng=rng))
    T, K1 = len(x), 2 * K if K1 is None else K1
    chunks = [(s, min(s + K, T)) for s in range(0, T, K)]
    draws = [net.dropout_masks(stop - start, B, twin) for start, stop in chunks]
    M = DropoutMasks(np.concatenate([d.input for d in draws]), np.concatenate([d.output for d in draws]))
    assert len(got) == len(chunks)
    for (sl, res), (start, stop) in zip(got, chunks):
        assert (sl.start, sl.stop) == (start, stop)
        a = max(0, stop - K1 - 1)
        S = npbptt.step_losses(net, x[:a], y[:a], state, backend="numpy", masks=M.steps(0, a))[1] \
            if a > 0 else state
        want = npbptt.bptt(net, x[a:stop], y[a:stop], S, min(K1, stop - a - 1), stop - start,
                           backend="numpy", masks=M.steps(a, stop))
        _same(res, want)
    assert rng.bit_generator.state == twin.bit_generator.state   # drew exactly these masks
    # reproducible from the same generator state; another state gives other masks
    again = list(npbptt.stream(net, x, y, state, K, K1, backend="numpy", rng=np.random.default_rng(5)))
    for (_, a), (_, b) in zip(got, again):
        _same(a, b)
    other = list(npbptt.stream(net, x, y, state, K, K1, backend="numpy", rng=np.random.default_rng(6)))
    assert any(a.loss != b.loss for (_, a), (_, b) in zip(got, other))
    plain = list(npbptt.stream(net, x, y, state, K, K1, backend="numpy"))
    assert all(a.loss != b.loss for (_, a), (_, b) in zip(got, plain))


# --- backends ----------------------------------------------------------------------------------
def test_masked_calls_run_the_kernels_where_they_take_masks():
    """numba: masked bptt / step_losses run the CPU kernels (``takes_masks``), equal to the
    reference to round-off (tests/test_kernels.py checks them in depth); unmasked calls of a
    dropout net are the stock network's; stream(rng=) on numba equals it on numpy."""
    pytest.importorskip("numba")
    from npbptt.kernels import cpu
    net, x, y, state, masks = problem("lstm", 2)
    assert backends.resolve("bptt", "numba", net, masked=True) is cpu.bptt
    assert backends.resolve("step_losses", "numba", net, masked=True) is cpu.step_losses
    assert backends.resolve("bptt", "numba", net) is cpu.bptt           # dropout > 0, no masks
    _close(npbptt.bptt(net, x, y, state, 4, 3, backend="numba", masks=masks),
           npbptt.bptt(net, x, y, state, 4, 3, backend="numpy", masks=masks))
    L1, _ = npbptt.step_losses(net, x, y, state, backend="numba", masks=masks)
    L2, _ = npbptt.step_losses(net, x, y, state, backend="numpy", masks=masks)
    np.testing.assert_allclose(L1, L2, rtol=1e-12)
    stock = npbptt.LSTM(E, H, 2, output_size=V, vocab_size=V)
    stock.params = {k: v.copy() for k, v in net.params.items()}
    _same(npbptt.bptt(net, x, y, state, 4, 3, backend="numba"),
          npbptt.bptt(stock, x, y, state, 4, 3, backend="numba"))
    s1 = [r for _, r in npbptt.stream(net, x, y, state, 3, backend="numba", rng=np.random.default_rng(2))]
    s2 = [r for _, r in npbptt.stream(net, x, y, state, 3, backend="numpy", rng=np.random.default_rng(2))]
    assert len(s1) == len(s2) > 1
    for a, b in zip(s1, s2):
        _close(a, b)


def _close(a, b):
    """Two BPTTResults equal to round-off (1e-12 relative to each array's max-abs)."""
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    assert list(a.grads) == list(b.grads)
    for k in b.grads:
        assert np.abs(a.grads[k] - b.grads[k]).max() <= 1e-12 * np.abs(b.grads[k]).max(), k
    sa, sb = ((s if isinstance(s, tuple) else (s,)) for s in (a.state, b.state))
    assert len(sa) == len(sb)
    for u, v in zip(sa, sb):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-14)


# --- errors name the argument ------------------------------------------------------------------
@pytest.mark.parametrize("cls", [npbptt.LSTM, npbptt.RNN])
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, "0.2", None])
def test_bad_dropout_is_named(cls, p):
    with pytest.raises(ValueError, match="dropout"):
        cls(E, H, vocab_size=V, dropout=p)


def test_bad_masks_are_named():
    net, x, y, state, masks = problem("lstm", 1)
    T = len(x)
    bad = [
        (masks.input, masks.output),                                      # a tuple, not DropoutMasks
        DropoutMasks(masks.input[:-1], masks.output),                     # T
        DropoutMasks(masks.input, masks.output[:, :1]),                   # B
        DropoutMasks(masks.input[..., :2], masks.output),                 # input_size
        DropoutMasks(masks.input, np.ones((T, B, H + 1))),                # hidden_size
        DropoutMasks(masks.input.astype(np.float32), masks.output),       # dtype
        DropoutMasks(masks.input.tolist(), masks.output),                 # not an array
        DropoutMasks(masks.input, np.where(masks.output > 0, np.nan, 0.0)),  # not finite
        DropoutMasks(np.full_like(masks.input, np.inf), masks.output),
    ]
    for m in bad:
        with pytest.raises(ValueError, match="masks"):
            npbptt.bptt(net, x, y, state, 3, 2, backend="numpy", masks=m)
        with pytest.raises(ValueError, match="masks"):
            npbptt.step_losses(net, x, y, state, backend="numpy", masks=m)
    reset = npbptt.ResettingRNN(E, H, vocab_size=V, reset_tokens=[1])   # its step takes no mask
    with pytest.raises(ValueError, match="masks"):
        npbptt.bptt(reset, x, y, reset.init_state(B), 3, 2, masks=masks)
    with pytest.raises(ValueError, match="rng"):
        net.dropout_masks(T, B, 0)
    with pytest.raises(ValueError, match="rng"):
        next(npbptt.stream(net, x, y, state, 2, rng=np.random.RandomState(0)))
    for name, args in (("T", (0, B)), ("B", (T, 1.5))):
        with pytest.raises(ValueError, match=name):
            net.dropout_masks(*args, np.random.default_rng(0))
