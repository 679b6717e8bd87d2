"""Tied weights (issue 18): ``tie_weights=True`` reads out through ``embedding.weight``,
logits = h E^T + b_dec, and the gradient of E is the sum of its two uses (Eqs. (15)/(16)).
Checked against central finite differences, PyTorch autograd on a hand-built tied LM, the
untied network with decoder.weight = E, and the NumPy reference (numba backend)."""
import numpy as np
import pytest

import npbptt
from npbptt import theory
from npbptt.interop import from_state_dict, with_dtype
from npbptt.validate import check_params

V, H, T, B = 5, 4, 5, 3


def tied_problem(kind="lstm", layers=1, seed=0, dtype=np.float64, T=T):
    """A tied network (random non-zero biases, random initial state) and a token problem."""
    rng = np.random.default_rng(seed)
    cls = npbptt.LSTM if kind == "lstm" else npbptt.RNN
    net = cls(H, H, layers, vocab_size=V, dtype=dtype, seed=seed, tie_weights=True)
    net.params["decoder.bias"][...] = rng.uniform(-0.5, 0.5, V)
    x, y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    shape = (layers, B, H)
    hs = [0.5 * rng.standard_normal(shape).astype(dtype) for _ in range(2 if kind == "lstm" else 1)]
    return net, x, y, (tuple(hs) if kind == "lstm" else hs[0])


def untied_copy(net):
    """The same map as an untied network: decoder.weight a copy of embedding.weight."""
    cls = type(net)
    kw = dict(activation=net.activation) if net.kind == "rnn" else {}
    out = cls(net.input_size, net.hidden_size, net.num_layers, vocab_size=net.vocab_size,
              dtype=net.dtype, seed=1, **kw)
    for k in out.params:
        src = "embedding.weight" if k == "decoder.weight" else k
        out.params[k][...] = net.params[src]
    return out


# --- the constructor ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [npbptt.LSTM, npbptt.RNN])
def test_constructor_errors_name_the_argument(cls):
    with pytest.raises(ValueError, match="vocab_size"):
        cls(4, 4, tie_weights=True, output_size=5)
    with pytest.raises(ValueError, match="output_size"):
        cls(4, 4, output_size=6, vocab_size=5, tie_weights=True)
    with pytest.raises(ValueError, match="input_size"):
        cls(3, 4, vocab_size=5, tie_weights=True)
    with pytest.raises(ValueError, match="tie_weights"):
        cls(4, 4, vocab_size=5, tie_weights="yes")


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_params_have_no_decoder_weight(kind):
    net = tied_problem(kind, layers=2)[0]
    gates = 4 if kind == "lstm" else 1
    assert net.tie_weights is True
    assert npbptt.LSTM(4, 4, vocab_size=5).tie_weights is False
    assert list(net.params) == ["embedding.weight"] + [
        f"{w}_l{l}" for l in range(2) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    ] + ["decoder.bias"]
    assert net.param_shapes()["embedding.weight"] == (V, H)
    assert net.param_shapes()["weight_ih_l0"] == (gates * H, H)
    assert net.decoder_weight() is net.params["embedding.weight"]
    check_params(net)
    bad = net.copy()
    bad.params["decoder.weight"] = np.zeros((V, H))
    with pytest.raises(ValueError, match="unknown parameters.*decoder.weight"):
        check_params(bad)


def test_copy_and_config_keep_the_tie():
    net = tied_problem("rnn")[0]
    cp = net.copy()
    assert cp.tie_weights and list(cp.params) == list(net.params)
    cp.params["embedding.weight"][0, 0] += 1.0
    assert cp.params["embedding.weight"][0, 0] != net.params["embedding.weight"][0, 0]
    cfg = net.config()
    assert cfg["tie_weights"] is True and "tie_weights" not in untied_copy(net).config()
    assert type(net)(**cfg).tie_weights


# --- gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,layers", [("lstm", 1), ("lstm", 2), ("rnn", 1), ("rnn", 2)])
def test_full_bptt_matches_central_finite_differences(kind, layers):
    net, x, y, state = tied_problem(kind, layers, seed=3 + layers)
    K2 = 2                                   # losses of the last 2 steps, full backpropagation
    res = npbptt.bptt(net, x, y, state, T - 1, K2, backend="numpy")
    eps = 1e-6
    for name, p in net.params.items():
        fd = np.empty_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            up = npbptt.bptt(net, x, y, state, T - 1, K2, backend="numpy").loss
            p[i] = old - eps
            down = npbptt.bptt(net, x, y, state, T - 1, K2, backend="numpy").loss
            p[i] = old
            fd[i] = (up - down) / (2 * eps)
        np.testing.assert_allclose(res.grads[name], fd, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_embedding_gradient_is_the_sum_of_both_uses(kind):
    """Eq. (15)/(16): the tied E collects the input rows' terms and the read-out's direct term,
    i.e. the untied network's embedding.weight + decoder.weight gradients."""
    net, x, y, state = tied_problem(kind, layers=2, seed=11)
    ref = untied_copy(net)
    for K1, K2 in [(T - 1, T), (2, 1), (3, 2)]:
        got = npbptt.bptt(net, x, y, state, K1, K2, backend="numpy")
        want = npbptt.bptt(ref, x, y, state, K1, K2, backend="numpy")
        assert got.loss == want.loss
        np.testing.assert_allclose(got.grads["embedding.weight"],
                                   want.grads["embedding.weight"] + want.grads["decoder.weight"],
                                   rtol=1e-12, atol=1e-14)
        for k in got.grads:
            if k != "embedding.weight":
                np.testing.assert_array_equal(got.grads[k], want.grads[k], err_msg=k)
        assert np.abs(want.grads["decoder.weight"]).max() > 1e-3     # both uses contribute


def _torch_tied_bptt(net, x, y, state, K1, K2):
    """BPTT(K1, K2) by autograd on a PyTorch LM whose decoder.weight *is* encoder.weight, the
    weights loaded by name here (not by npbptt.interop)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    t64 = torch.float64
    enc = torch.nn.Embedding(V, H, dtype=t64)
    rnn = (torch.nn.LSTM(H, H, net.num_layers, dtype=t64) if net.kind == "lstm"
           else torch.nn.RNN(H, H, net.num_layers, dtype=t64))
    dec = torch.nn.Linear(H, V, dtype=t64)
    dec.weight = enc.weight
    with torch.no_grad():
        enc.weight.copy_(torch.from_numpy(net.params["embedding.weight"]))
        dec.bias.copy_(torch.from_numpy(net.params["decoder.bias"]))
        for n, p in rnn.named_parameters():
            p.copy_(torch.from_numpy(net.params[n]))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    S = tuple(torch.from_numpy(np.array(s)) for s in net.to_internal(state))
    S = S if net.kind == "lstm" else S[0]
    t0 = max(0, T - 1 - K1)
    if t0:
        _, S = rnn(enc(xt[:t0]), S)
    S = tuple(s.detach() for s in S) if net.kind == "lstm" else S.detach()
    h, _ = rnn(enc(xt[t0:]), S)
    out = dec(h)[-K2:]
    loss = F.cross_entropy(out.reshape(-1, V), yt[-K2:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in rnn.named_parameters()}
    grads["embedding.weight"] = enc.weight.grad.numpy()
    grads["decoder.bias"] = dec.bias.grad.numpy()
    return float(loss.detach()), grads


@pytest.mark.parametrize("kind,layers", [("lstm", 1), ("lstm", 2), ("rnn", 2)])
def test_bptt_equals_torch_autograd_on_a_tied_lm(kind, layers):
    net, x, y, state = tied_problem(kind, layers, seed=20 + layers)
    for K1, K2 in [(T - 1, T), (2, 2), (1, 1)]:
        loss, want = _torch_tied_bptt(net, x, y, state, K1, K2)
        got = npbptt.bptt(net, x, y, state, K1, K2, backend="numpy")
        assert abs(got.loss - loss) <= 1e-12 * abs(loss)
        assert set(got.grads) == set(want)
        for k, v in want.items():
            np.testing.assert_allclose(got.grads[k], v, rtol=1e-10, atol=1e-12, err_msg=k)


# --- interop ----------------------------------------------------------------------------------
def test_to_torch_and_from_torch_keep_the_tie():
    torch = pytest.importorskip("torch")
    net = tied_problem("lstm", layers=2)[0]
    mods = npbptt.to_torch(net)
    assert mods.decoder.weight is mods.embedding.weight and mods.tie_weights
    assert "decoder.weight" not in mods.named_parameters()
    with torch.no_grad():
        mods.embedding.weight[1, 2] += 0.25          # one Parameter: the decoder sees it
    assert float(mods.decoder.weight.detach()[1, 2]) == net.params["embedding.weight"][1, 2] + 0.25
    back = npbptt.from_torch(mods)
    assert back.tie_weights and list(back.params) == list(net.params)
    want = net.params["embedding.weight"].copy()
    want[1, 2] += 0.25
    np.testing.assert_array_equal(back.params["embedding.weight"], want)
    for k in net.params:
        if k != "embedding.weight":
            np.testing.assert_array_equal(back.params[k], net.params[k])
    again = npbptt.to_torch(back)
    assert again.decoder.weight is again.embedding.weight


def test_from_torch_detects_the_tie_only_when_it_is_one_tensor():
    torch = pytest.importorskip("torch")
    lstm, enc = torch.nn.LSTM(H, H, dtype=torch.float64), torch.nn.Embedding(V, H, dtype=torch.float64)
    dec = torch.nn.Linear(H, V, dtype=torch.float64)
    dec.weight = enc.weight
    net = npbptt.from_torch(lstm, decoder=dec, embedding=enc)
    assert net.tie_weights and "decoder.weight" not in net.params
    state = {**lstm.state_dict(), "embedding.weight": enc.weight, "decoder.weight": dec.weight,
             "decoder.bias": dec.bias}
    assert npbptt.from_torch(state).tie_weights               # shared storage in a state dict
    copy = torch.nn.Linear(H, V, dtype=torch.float64)
    with torch.no_grad():
        copy.weight.copy_(enc.weight)                          # equal values, separate tensor
    untied = npbptt.from_torch(lstm, decoder=copy, embedding=enc)
    assert not untied.tie_weights and "decoder.weight" in untied.params


def test_from_state_dict_and_with_dtype():
    net = tied_problem("rnn", layers=2)[0]
    with pytest.raises(ValueError, match="decoder.weight.*tie_weights=True"):
        from_state_dict(net.params, activation="tanh")
    back = from_state_dict(net.params, tie_weights=True)
    assert back.tie_weights and back.kind == "rnn"
    p = dict(net.params, **{"decoder.weight": net.params["embedding.weight"] + 1.0})
    with pytest.raises(ValueError, match="differs from params\\['embedding.weight'\\]"):
        from_state_dict(p, tie_weights=True)
    net32 = with_dtype(net, np.float32)
    assert net32.tie_weights and net32.dtype == np.float32


def test_crosscheck_against_jax_and_torch_on_a_tied_net():
    """The cross-check's independent implementations (JAX lax.scan, torch) see the tie too."""
    pytest.importorskip("torch")
    net, x, y, state = tied_problem("lstm", seed=5)
    for fw in ("torch", "jax"):
        if fw == "jax":
            pytest.importorskip("jax")
        rep = npbptt.crosscheck(net, x, y, state, K1=2, K2=2, framework=fw)
        assert rep.passed and rep.rows, rep


# --- backends, probe, theory ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_numba_backend_runs_tied_nets_in_the_kernels(kind):
    """The CPU kernels compute the tied read-out (tests/test_kernels.py checks them in depth):
    the numba backend resolves to them and equals the reference to round-off."""
    if "numba" not in npbptt.available_backends():
        pytest.skip("numba is not installed")
    from npbptt import backends
    from npbptt.kernels import cpu
    net, x, y, state = tied_problem(kind, layers=2, seed=7)
    assert backends.resolve("bptt", "numba", net) is cpu.bptt
    a = npbptt.bptt(net, x, y, state, 3, 2, backend="numba")
    b = npbptt.bptt(net, x, y, state, 3, 2, backend="numpy")
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    assert list(a.grads) == list(b.grads) == list(net.params)
    for k in b.grads:
        np.testing.assert_allclose(a.grads[k], b.grads[k], rtol=1e-11, atol=1e-13, err_msg=k)
    np.testing.assert_allclose(npbptt.step_losses(net, x, y, state, backend="numba")[0],
                               npbptt.step_losses(net, x, y, state, backend="numpy")[0], rtol=1e-12)
    np.testing.assert_allclose(npbptt.grad_norms(net, x, y, state, backend="numba"),
                               npbptt.grad_norms(net, x, y, state, backend="numpy"), rtol=1e-11)


def test_probe_on_a_tied_net():
    net, x, y, state = tied_problem("lstm", layers=2, seed=8)
    pr = npbptt.probe(net, x, y, state)
    np.testing.assert_allclose(pr.phi, npbptt.grad_norms(untied_copy(net), x, y, state,
                                                         backend="numpy"), rtol=1e-12)
    for K in (0, 2, T - 1):      # g_norm[K] = ||BPTT(K, 1)|| of the last step's loss, every parameter
        g = npbptt.bptt(net, x, y, state, K, 1, backend="numpy").grads
        want = np.sqrt(sum(float((v * v).sum()) for v in g.values()))
        assert pr.g_norm[K] == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_theory_on_a_tied_net_equals_bptt(kind):
    net, x, y, state = tied_problem(kind, layers=2, seed=9)
    g = theory.full_gradient(net, x, y, state)
    full = npbptt.bptt(net, x, y, state, T - 1, T, backend="numpy").grads      # K = T
    assert list(g) == list(net.params)
    for k in full:
        np.testing.assert_allclose(g[k], full[k], rtol=1e-10, atol=1e-13, err_msg=k)
    # E[g_hat_K] = mean over s of BPTT(K, 1) on x[:s] (Eq. 3)
    K = 1
    e = theory.expected_truncated_gradient(net, x, y, state, K)
    for k in full:
        want = np.mean([npbptt.bptt(net, x[:s], y[:s], state, min(K, s - 1), 1,
                                    backend="numpy").grads[k] for s in range(1, T + 1)], axis=0)
        np.testing.assert_allclose(e[k], want, rtol=1e-10, atol=1e-13, err_msg=k)
    curves = theory.theory_curves(net, x, y, state, M=1.0)
    g_norm = np.sqrt(sum(float((v * v).sum()) for v in full.values()))
    assert curves.g_norm == pytest.approx(g_norm, rel=1e-10)
    assert curves.g_hat_norm[K] == pytest.approx(
        np.sqrt(sum(float((v * v).sum()) for v in e.values())), rel=1e-10)
    assert curves.bias[K] == pytest.approx(theory.bias(net, x, y, state, K), rel=1e-10)
    want_bias = np.sqrt(sum(float(((e[k] - full[k]) ** 2).sum()) for k in full))
    assert curves.bias[K] == pytest.approx(want_bias, rel=1e-8)
    assert theory.relative_bias(net, x, y, state, K) == pytest.approx(want_bias / g_norm, rel=1e-8)


def test_training_checkpoints_and_resumes_a_tied_net_bit_exactly(tmp_path):
    """npbptt.train saves and restores ``net.params`` by name: a tied net has no decoder.weight
    to save, and the resumed run equals the uninterrupted one."""
    from npbptt.data import copy_task
    from npbptt.train import TrainConfig, train
    data = copy_task(T_train=1024, T_valid=256, T_test=256, m=3, batch=8, seed=0)
    make = lambda: npbptt.LSTM(8, 8, vocab_size=8, seed=0, tie_weights=True)   # noqa: E731
    kw = dict(K=5, W=10, burnin=5, K0=5, K_max=10, seed=0, backend="numpy")
    whole = train(make(), data, TrainConfig(epochs=2, **kw), out=tmp_path / "a", progress=False)
    train(make(), data, TrainConfig(epochs=1, **kw), out=tmp_path / "b", progress=False)
    resumed = train(make(), data, TrainConfig(epochs=2, **kw), out=tmp_path / "b", resume=True,
                    progress=False)
    assert set(whole.params) == set(make().params) and "decoder.weight" not in whole.params
    for k in whole.params:
        np.testing.assert_array_equal(resumed.params[k], whole.params[k], err_msg=k)
    assert not np.array_equal(whole.params["embedding.weight"], make().params["embedding.weight"])
    with pytest.raises(ValueError, match="architecture"):          # untied net, tied run
        train(npbptt.LSTM(8, 8, vocab_size=8, seed=0), data, TrainConfig(epochs=3, **kw),
              out=tmp_path / "b", resume=True, progress=False)
