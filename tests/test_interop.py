"""Weights in and out of PyTorch and JAX: exact round trips, and each framework's forward pass on
the converted weights equals npbptt's step_losses (the same network, §2)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npbptt
from npbptt.interop import from_state_dict, jax_network_fn, with_dtype
from problems import make_problem

SETTINGS = settings(max_examples=12, deadline=None)


@st.composite
def nets(draw, activations=("tanh", "relu")):
    """Random problems over cells, layers 1-3, embedding/dense input, bias on/off, both dtypes."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["lstm", "rnn"]))
    return make_problem(rng, kind=kind, activation=draw(st.sampled_from(activations)),
                        layers=draw(st.integers(1, 3)), embedding=draw(st.booleans()),
                        loss=draw(st.sampled_from(["cross_entropy", "mse"])), T=draw(st.integers(1, 6)),
                        B=draw(st.integers(1, 3)), H=draw(st.integers(1, 4)), bias=draw(st.booleans()),
                        dtype=draw(st.sampled_from([np.float64, np.float32])))


def _same_params(a, b):
    assert type(a) is type(b) and a.config() == b.config()
    assert set(a.params) == set(b.params)
    for k in a.params:
        assert a.params[k].dtype == b.params[k].dtype
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_from_state_dict_of_params_is_exact_and_copies():
    net = make_problem(np.random.default_rng(0), kind="rnn", activation="sigmoid", layers=2).net
    new = from_state_dict(net.params, activation="sigmoid")
    _same_params(net, new)
    new.params["weight_hh_l0"][0, 0] += 1.0
    assert new.params["weight_hh_l0"][0, 0] != net.params["weight_hh_l0"][0, 0]


def test_with_dtype_upcasts_float32_exactly():
    net = make_problem(np.random.default_rng(1), layers=2, dtype=np.float32).net
    up = with_dtype(net, np.float64)
    assert up.dtype == np.float64
    for k, v in net.params.items():
        np.testing.assert_array_equal(up.params[k], v.astype(np.float64))


def test_from_state_dict_rejects_a_gru_and_a_missing_first_layer():
    gru = {"weight_ih_l0": np.zeros((6, 3)), "weight_hh_l0": np.zeros((6, 2)),      # 3 gate blocks
           "decoder.weight": np.zeros((3, 2)), "decoder.bias": np.zeros(3)}
    with pytest.raises(ValueError, match="GRU"):
        from_state_dict(gru)
    with pytest.raises(ValueError, match="weight_ih_l0"):
        from_state_dict({"weight_hh_l0": np.zeros((4, 2))})


def test_from_state_dict_bad_inputs_name_the_problem():
    net = make_problem(np.random.default_rng(2), layers=2).net
    p = dict(net.params)
    with pytest.raises(ValueError, match="params must be a mapping"):
        from_state_dict([1, 2])
    with pytest.raises(ValueError, match="missing .*decoder.bias"):
        from_state_dict({k: v for k, v in p.items() if k != "decoder.bias"})
    with pytest.raises(ValueError, match="does not know.*rnn.weight"):
        from_state_dict(dict(p, **{"rnn.weight": np.zeros(3)}))
    with pytest.raises(ValueError, match=r"weight_hh_l1.*shape"):
        from_state_dict(dict(p, weight_hh_l1=np.zeros((4 * net.hidden_size, net.hidden_size + 1))))
    with pytest.raises(ValueError, match="NaN or inf"):
        from_state_dict(dict(p, **{"decoder.bias": np.full(net.output_size, np.nan)}))
    with pytest.raises(ValueError, match="kind='rnn' disagrees"):
        from_state_dict(p, kind="rnn")
    with pytest.raises(ValueError, match="embedding.weight"):
        from_state_dict(dict(p, **{"embedding.weight": np.zeros((5, net.input_size + 1))}))


# --- PyTorch -----------------------------------------------------------------------------------------
def _torch_step_losses(mods, prob):
    """Per-step batch-mean losses and final state by the torch modules' own forward pass."""
    import torch
    import torch.nn.functional as F
    net = prob.net
    x = torch.from_numpy(np.array(prob.x))
    S = tuple(torch.from_numpy(np.array(s)) for s in net.to_internal(prob.state))
    with torch.no_grad():
        out, S = mods(x, S if net.kind == "lstm" else S[0])
        y = torch.from_numpy(np.array(prob.y))
        if prob.loss == "cross_entropy":
            L = torch.stack([F.cross_entropy(out[t], y[t]) for t in range(len(x))])
        else:
            L = torch.stack([F.mse_loss(out[t], y[t]) for t in range(len(x))])
    S = S if net.kind == "lstm" else (S,)
    return L.numpy(), tuple(s.numpy() for s in S)


@SETTINGS
@given(nets())
def test_torch_round_trip_preserves_params_exactly(prob):
    pytest.importorskip("torch")
    net = prob.net
    mods = npbptt.to_torch(net)
    assert (mods.embedding is not None) == net.embedding
    _same_params(net, npbptt.from_torch(mods.rnn, mods.decoder, mods.embedding))
    _same_params(net, npbptt.from_torch(mods))
    state_dict = {**mods.rnn.state_dict(), **{f"decoder.{k}": v for k, v in mods.decoder.state_dict().items()}}
    if net.embedding:
        state_dict["embedding.weight"] = mods.embedding.weight
    _same_params(net, npbptt.from_torch(state_dict, activation=net.activation))


@SETTINGS
@given(nets())
def test_torch_forward_equals_step_losses(prob):
    pytest.importorskip("torch")
    net = prob.net
    L, S = npbptt.step_losses(net, prob.x, prob.y, prob.state, prob.loss, backend="numpy")
    Lt, St = _torch_step_losses(npbptt.to_torch(net), prob)
    rtol = 1e-12 if net.dtype == np.float64 else 2e-5
    np.testing.assert_allclose(Lt, L, rtol=rtol, atol=rtol)
    for a, b in zip(St, net.to_internal(S)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


def test_from_torch_reads_modules_built_by_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 5, num_layers=2, dtype=torch.float64)
    dec = torch.nn.Linear(5, 7, dtype=torch.float64)
    emb = torch.nn.Embedding(9, 3, dtype=torch.float64)
    net = npbptt.from_torch(lstm, decoder=dec, embedding=emb)
    assert isinstance(net, npbptt.LSTM) and net.dtype == np.float64
    assert (net.num_layers, net.hidden_size, net.input_size, net.output_size, net.vocab_size) == (2, 5, 3, 7, 9)
    for name, p in lstm.named_parameters():
        np.testing.assert_array_equal(net.params[name], p.detach().numpy())
    np.testing.assert_array_equal(net.params["decoder.weight"], dec.weight.detach().numpy())
    np.testing.assert_array_equal(net.params["embedding.weight"], emb.weight.detach().numpy())
    rnn32 = torch.nn.RNN(4, 6, nonlinearity="relu", bias=False)
    net32 = npbptt.from_torch(rnn32, torch.nn.Linear(6, 2, bias=False))
    assert isinstance(net32, npbptt.RNN) and net32.activation == "relu" and net32.dtype == np.float32
    assert not net32.bias and not net32.embedding
    np.testing.assert_array_equal(net32.params["decoder.bias"], np.zeros(2, np.float32))


def test_torch_bad_inputs_raise_value_error():
    torch = pytest.importorskip("torch")
    dec = torch.nn.Linear(5, 2)
    with pytest.raises(ValueError, match="rnn must be"):
        npbptt.from_torch(torch.nn.GRU(3, 5), dec)
    with pytest.raises(ValueError, match="unidirectional"):
        npbptt.from_torch(torch.nn.LSTM(3, 5, bidirectional=True), dec)
    with pytest.raises(ValueError, match="proj_size"):
        npbptt.from_torch(torch.nn.LSTM(3, 5, proj_size=2), dec)
    with pytest.raises(ValueError, match="decoder is required"):
        npbptt.from_torch(torch.nn.LSTM(3, 5))
    with pytest.raises(ValueError, match="activation='sigmoid' disagrees"):
        npbptt.from_torch(torch.nn.RNN(3, 5), dec, activation="sigmoid")
    with pytest.raises(ValueError, match="decoder.weight"):
        npbptt.from_torch(torch.nn.LSTM(3, 5), torch.nn.Linear(4, 2))      # H = 5, decoder reads 4
    net = make_problem(np.random.default_rng(3), kind="rnn", activation="sigmoid").net
    with pytest.raises(ValueError, match="net.activation"):
        npbptt.to_torch(net)


# --- JAX -----------------------------------------------------------------------------------------------
@settings(max_examples=6, deadline=None)                  # eager JAX steps are slow to dispatch
@given(nets(activations=("tanh", "relu", "sigmoid", "linear")))
def test_jax_round_trip_and_forward_equal_npbptt(prob):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    net = prob.net
    with jax.enable_x64(True):
        params = npbptt.to_jax(net)
        assert all(isinstance(v, jax.Array) and v.dtype == net.dtype for v in params.values())
        _same_params(net, npbptt.from_jax(params, activation=net.activation))
        step = jax_network_fn(net)
        S = tuple(jnp.asarray(s) for s in net.to_internal(prob.state))
        outs = []
        for t in range(prob.x.shape[0]):
            S, out = step(params, S, jnp.asarray(prob.x[t]))
            outs.append(np.asarray(out))
    L, S_np = npbptt.step_losses(net, prob.x, prob.y, prob.state, prob.loss, backend="numpy")
    lossf = npbptt.losses.LOSSES[prob.loss]
    Lj = np.array([lossf(o.astype(np.float64), prob.y[t])[0].mean() for t, o in enumerate(outs)])
    rtol = 1e-12 if net.dtype == np.float64 else 2e-5
    np.testing.assert_allclose(Lj, L, rtol=rtol, atol=rtol)
    for a, b in zip(S, net.to_internal(S_np)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=rtol)


def test_to_jax_refuses_float64_without_x64_and_leaves_config_alone():
    jax = pytest.importorskip("jax")
    net = make_problem(np.random.default_rng(4)).net
    before = jax.config.jax_enable_x64
    if not before:
        with pytest.raises(ValueError, match="64-bit mode is off"):
            npbptt.to_jax(net)
    p32 = npbptt.to_jax(with_dtype(net, np.float32))
    assert all(v.dtype == np.float32 for v in p32.values())
    with jax.enable_x64(True):
        p64 = npbptt.to_jax(net)
    assert jax.config.jax_enable_x64 == before
    np.testing.assert_array_equal(np.asarray(p64["weight_hh_l0"]), net.params["weight_hh_l0"])
