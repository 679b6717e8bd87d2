"""npbptt.crosscheck: npbptt's BPTT(K1, K2) equals PyTorch's and JAX's truncated gradients; each
recipe's literal PyTorch loop equals the BPTT calls npbptt.recipes derives for it; deliberately
wrong user loops are caught and the report names the parameters that differ; the command line."""
import sys

import numpy as np
import pytest

import npbptt
from npbptt.crosscheck import cli_main, npbptt_window_grads
from npbptt.recipes import RECIPES, get_recipe
from problems import make_problem

DECODER = {"decoder.weight", "decoder.bias"}


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def jax():
    return pytest.importorskip("jax")


def _random_case(seed, kind, layers, dtype, T=None):
    """A random problem (embedding or dense input, either loss) and random valid K1, K2 < T."""
    rng = np.random.default_rng(seed)
    T = T or int(rng.integers(3, 10))
    prob = make_problem(rng, kind=kind, activation=("tanh", "relu")[seed % 2], layers=layers,
                        embedding=bool(seed % 3), loss=("cross_entropy", "mse")[seed % 2 == 0 and layers == 2],
                        T=T, B=int(rng.integers(1, 4)), H=int(rng.integers(2, 5)), dtype=dtype)
    K1 = int(rng.integers(0, T))
    return prob, K1, int(rng.integers(1, min(T, K1 + 1) + 1))


def _check(prob, **kw):
    return npbptt.crosscheck(prob.net, prob.x, prob.y, prob.state, loss=prob.loss, **kw)


# --- npbptt equals torch and JAX -----------------------------------------------------------------------
CASES = [(fw, kind, layers, np.float64) for fw in ("torch", "jax") for kind in ("lstm", "rnn")
         for layers in (1, 2, 3)]
CASES += [("torch", kind, layers, np.float32) for kind in ("lstm", "rnn") for layers in (1, 2, 3)]
CASES += [("jax", "lstm", 2, np.float32), ("jax", "rnn", 3, np.float32)]   # each JAX case compiles (~1 s)


@pytest.mark.parametrize("framework, kind, layers, dtype", CASES)
def test_npbptt_equals_framework_bptt(framework, kind, layers, dtype):
    pytest.importorskip(framework)
    prob, K1, K2 = _random_case(10 * layers + (kind == "rnn"), kind, layers, dtype)
    report = _check(prob, K1=K1, K2=K2, framework=framework)
    assert report.passed, report.table()
    assert {r.name for r in report.rows} == set(prob.net.params)
    worst = max(r.max_rel for r in report.rows)
    if dtype == np.float64:
        assert worst <= 1e-10                           # the float64 bar
    else:                                               # at most 2x npbptt's own float32 error (>= 8 ulps)
        assert worst <= report.rows[0].tol < 1e-4           # a round-off tolerance, not a loose one


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_torch_loop_equals_its_bptt_windows(torch, name):
    """The literal PyTorch loop of each recipe gives, at every optimizer step, the gradient of the
    BPTT call npbptt.recipes derives for that step (float64, 1e-10)."""
    for kind, seed in (("lstm", 1), ("rnn", 2)):
        prob = make_problem(np.random.default_rng(seed), kind=kind, layers=2, T=19, B=2, H=3)
        kw = dict(K1=7, K2=3) if name == "bptt" else dict(K=4 if name != "awd-lstm" else 7)
        report = _check(prob, recipe=name, framework="torch", seed=seed, **kw)
        assert report.passed, report.table(per_window=True)
        assert len(report.windows) == (1 if name == "bptt" else len(report.rows) // len(prob.net.params))
        assert name == "bptt" or len(report.windows) > 1


@pytest.mark.parametrize("name", ["paper", "awd-lstm"])            # overlapping / scaled windows
def test_recipe_windows_in_jax_equal_npbptt(jax, name):
    prob = make_problem(np.random.default_rng(3), kind="lstm", layers=2, T=13, B=2, H=3)
    report = _check(prob, recipe=name, K=4 if name != "awd-lstm" else 6, framework="jax", seed=5)
    assert report.passed, report.table(per_window=True)
    assert len(report.windows) > 1


# --- the recipes' windows against independent derivations -----------------------------------------------
def _assert_grads_equal(a, b, rtol=1e-12):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-15, err_msg=k)


@pytest.mark.parametrize("name, K1_of_K, T", [("paper", lambda K: 2 * K, 23), ("keras", lambda K: K - 1, 24)])
def test_paper_and_keras_windows_equal_npbptt_stream(name, K1_of_K, T):
    """BPTT(2K, K) and BPTT(K-1, K) streamed over the chunks of Eq. (17) by npbptt.stream.  (For
    keras, T is a multiple of K: a shorter last chunk is backpropagated only over its own steps,
    while stream keeps K1 = K-1 and reaches one step into the previous chunk.)"""
    prob = make_problem(np.random.default_rng(6), kind="lstm", layers=2, T=T, B=2, H=3)
    K = 4
    wins = get_recipe(name).windows(T, K=K)
    ours = npbptt_window_grads(prob.net, prob.x, prob.y, prob.state, wins, prob.loss)
    chunks = list(npbptt.stream(prob.net, prob.x, prob.y, prob.state, K, K1=K1_of_K(K), loss=prob.loss,
                                backend="numpy"))
    assert [w.stop for w in wins] == [c.stop for c, _ in chunks]
    for g, (_, res) in zip(ours, chunks):
        _assert_grads_equal(g, res.grads)


def test_sliding_windows_are_eq3_g_K_at_every_step():
    """Window s of the sliding recipe is BPTT(K, 1) on the prefix x[:s+1] (Eq. 3's g_K)."""
    prob = make_problem(np.random.default_rng(7), kind="rnn", layers=2, T=9, B=2, H=3)
    K = 3
    ours = npbptt_window_grads(prob.net, prob.x, prob.y, prob.state, get_recipe("sliding").windows(9, K=K),
                               prob.loss)
    assert len(ours) == 9
    for s, g in enumerate(ours):
        res = npbptt.bptt(prob.net, prob.x[:s + 1], prob.y[:s + 1], prob.state, K, 1, prob.loss, backend="numpy")
        _assert_grads_equal(g, res.grads)


def test_min_char_rnn_windows_follow_its_loop_control():
    """min-char-rnn: `if p + seq_length + 1 >= len(data): p = 0` with len(data) = T + 1, then
    p += seq_length: chunks of K with p + K < T; each a sum (scale K) clipped at 5."""
    for T, K in [(20, 5), (21, 5), (26, 5), (5, 5), (7, 3)]:
        starts, p = [], 0
        while not p + K + 1 >= T + 1:
            starts.append(p)
            p += K
        wins = get_recipe("min-char-rnn").windows(T, K=K)
        assert [w.start for w in wins] == starts
        assert all((w.stop - w.start, w.K1, w.K2, w.scale, w.clip) == (K, K - 1, K, K, 5.0) for w in wins)


def test_awd_lstm_windows_tile_the_sequence_with_scaled_steps():
    rng_w = np.random.default_rng(0)
    wins = get_recipe("awd-lstm").windows(200, K=20, rng=rng_w)
    assert wins[0].start == 0 and all(a.stop == b.start for a, b in zip(wins, wins[1:]))
    assert wins[-1].stop <= 200 and wins[-1].stop >= 199           # the loop stops once i >= T - 1
    lens = [w.stop - w.start for w in wins]
    assert min(lens[:-1]) >= 5 and len(set(lens)) > 3               # random lengths, never below 5
    assert all(w.K1 == w.stop - w.start - 1 and w.K2 == w.stop - w.start for w in wins)
    assert all(w.scale == pytest.approx((w.stop - w.start) / 20) for w in wins[:-1])


def test_min_char_rnn_clipping_is_modelled(torch):
    """With large gradients the elementwise clip at 5 is active on both sides and they agree."""
    prob = make_problem(np.random.default_rng(8), kind="rnn", layers=1, T=16, B=2, H=4)
    prob.net.params["decoder.weight"] *= 40.0
    report = _check(prob, recipe="min-char-rnn", K=5, framework="torch")
    assert report.passed, report.table(per_window=True)
    ref = npbptt_window_grads(prob.net, prob.x, prob.y, prob.state, report.windows, prob.loss)
    assert any(np.abs(g[k]).max() == 5.0 for g in ref for k in g)


# --- wrong loops are caught ----------------------------------------------------------------------------
def _torch_loop(detach_late=0, mean=True):
    """A user's BPTT(K1=4, K2=2) loop; ``detach_late`` > 0 detaches that many steps too early
    (fewer steps backpropagated), ``mean=False`` forgets the 1/K2."""
    import torch.nn.functional as F

    def grad_fn(m, x, y, state):
        t0 = max(0, len(x) - 1 - 4) + detach_late
        _, state = m(x[:t0], state)
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        out, _ = m(x[t0:], state)
        out, yy = out[-2:], y[-2:]
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), yy.reshape(-1), reduction="mean")
        loss = loss if mean else 2 * loss
        m.zero_grad()
        loss.backward()
        return m.grads()
    return grad_fn


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_user_loop_detaching_one_step_early_is_caught(torch, dtype):
    prob = make_problem(np.random.default_rng(9), kind="lstm", layers=2, T=9, B=3, H=4, dtype=dtype)
    good = _check(prob, K1=4, K2=2, framework="torch", grad_fn=_torch_loop())
    assert good.passed, good.table()
    bad = _check(prob, K1=4, K2=2, framework="torch", grad_fn=_torch_loop(detach_late=1))
    assert not bad.passed
    # the read-out's direct term does not pass through the state: only the decoder still agrees
    assert set(bad.mismatched) == set(prob.net.params) - DECODER
    assert all(name in bad.table() for name in bad.mismatched) and "MISMATCH" in bad.table()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_user_loop_missing_one_over_K2_is_caught(torch, dtype):
    prob = make_problem(np.random.default_rng(10), kind="rnn", layers=2, T=9, B=3, H=4, dtype=dtype)
    bad = _check(prob, K1=4, K2=2, framework="torch", grad_fn=_torch_loop(mean=False))
    assert set(bad.mismatched) == set(prob.net.params)
    assert all(r.max_rel == pytest.approx(1.0, rel=1e-3) for r in bad.rows)   # exactly 2x: rel err 1


def test_jax_user_loop_without_stop_gradient_is_caught(jax):
    import jax.numpy as jnp
    from jax import lax
    prob = make_problem(np.random.default_rng(11), kind="lstm", layers=1, T=8, B=2, H=3)
    step = npbptt.interop.jax_network_fn(prob.net)

    def make(stop):
        def grad_fn(params, x, y, state):
            def loss(p):
                S = state
                S, _ = lax.scan(lambda S, xt: step(p, S, xt), S, x[:4])
                S = lax.stop_gradient(S) if stop else S          # BPTT(3, 2) on T = 8
                _, out = lax.scan(lambda S, xt: step(p, S, xt), S, x[4:])
                logp = jax.nn.log_softmax(out[-2:], axis=-1)
                return -jnp.take_along_axis(logp, y[-2:, :, None], axis=-1).mean()
            return jax.jit(jax.grad(loss))(params)
        return grad_fn

    assert _check(prob, K1=3, K2=2, framework="jax", grad_fn=make(True)).passed
    bad = _check(prob, K1=3, K2=2, framework="jax", grad_fn=make(False))
    assert set(bad.mismatched) == set(prob.net.params) - DECODER


def test_numpy_user_function_and_structural_problems():
    prob = make_problem(np.random.default_rng(12), kind="lstm", layers=2, T=10, B=2, H=3)

    def right(params, x, y, state):          # BPTT(3, 4) on the whole sequence, by npbptt itself
        net = npbptt.interop.from_state_dict(params)
        return npbptt.bptt(net, x, y, state, 3, 4, prob.loss, backend="numpy").grads

    assert _check(prob, K1=3, K2=4, framework="numpy", grad_fn=right).passed
    one = _check(prob, recipe="keras", K=4, framework="numpy", grad_fn=right)   # 1 of 3 steps
    assert not one.passed and "1 gradient(s) returned, the recipe makes 3" in one.problems[0]

    def missing(params, x, y, state):
        g = npbptt.bptt(npbptt.interop.from_state_dict(params), x, y, state, 3, 4, prob.loss).grads
        del g["decoder.bias"]
        return g
    rep = _check(prob, K1=3, K2=4, framework="numpy", grad_fn=missing)
    assert not rep.passed and rep.mismatched == ["decoder.bias"]


def test_jax_crosscheck_leaves_jax_config_alone(jax):
    before = jax.config.jax_enable_x64
    prob = make_problem(np.random.default_rng(13), kind="rnn", layers=1, T=5, B=2, H=3)
    assert _check(prob, K1=2, K2=2, framework="jax").passed
    assert jax.config.jax_enable_x64 == before


def test_bad_arguments_raise_value_error_naming_them():
    prob = make_problem(np.random.default_rng(14), T=6)
    for kw, match in [(dict(K1=2, K2=2, framework="mxnet"), "framework"),
                      (dict(recipe="nope", K=2), "recipe must be one of"),
                      (dict(recipe="keras"), "K must be an integer"),
                      (dict(recipe="keras", K=2, K1=3, K2=2), "takes K, not K1/K2"),
                      (dict(K1=3), "K1 and K2 are required"),
                      (dict(K1=3, K2=2, K=2), "K is not used"),
                      (dict(K1=1, K2=3), "K2 must be"),
                      (dict(recipe="min-char-rnn", K=6), "no optimizer step"),
                      (dict(K1=2, K2=2, framework="numpy"), "needs grad_fn"),
                      (dict(K1=2, K2=2, framework="torch", grad_fn=3), "grad_fn must be callable")]:
        with pytest.raises(ValueError, match=match):
            _check(prob, **kw)


# --- command line ---------------------------------------------------------------------------------------
def test_cli_prints_the_table_and_exits_zero(torch, capsys):
    rc = cli_main(["--framework", "torch", "--cell", "lstm", "--layers", "2", "--K1", "30", "--K2", "15"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in ["embedding.weight", "weight_ih_l0", "weight_hh_l1", "bias_hh_l1", "decoder.bias"]:
        assert name in out
    assert "PASS: all 11 parameters agree" in out


def test_cli_jax_recipe_float32(jax, capsys):
    rc = cli_main(["--framework", "jax", "--cell", "rnn", "--layers", "1", "--recipe", "paper", "--K", "3",
                   "--T", "10", "--dtype", "float32", "--hidden", "8"])
    assert rc == 0, capsys.readouterr().out


def test_cli_exits_nonzero_on_mismatch_and_on_usage_errors(torch, monkeypatch, capsys):
    mod = sys.modules["npbptt.crosscheck"]
    real = mod.torch_recipe_grads
    monkeypatch.setattr(mod, "torch_recipe_grads",
                        lambda *a, **k: [{n: 2 * g for n, g in d.items()} for d in real(*a, **k)])
    assert cli_main(["--cell", "rnn", "--layers", "1", "--K1", "5", "--K2", "2", "--hidden", "4"]) == 1
    assert "FAIL: 7 of 7 parameters differ" in capsys.readouterr().out
    assert cli_main(["--cell", "gru"]) == 2
    assert cli_main(["--K1", "2", "--K2", "5"]) == 2
    assert "K2 must be" in capsys.readouterr().err


def test_readme_example_passes_and_catches_a_shifted_detach(torch):
    """The README's example, verbatim in substance, and the same loop detaching one step late."""
    lstm, dec = torch.nn.LSTM(16, 32, 2, dtype=torch.float64), torch.nn.Linear(32, 20, dtype=torch.float64)
    emb = torch.nn.Embedding(20, 16, dtype=torch.float64)
    net = npbptt.from_torch(lstm, decoder=dec, embedding=emb)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 20, (60, 8)), rng.integers(0, 20, (60, 8))
    state = (np.zeros((2, 8, 32)), np.zeros((2, 8, 32)))

    def my_step(m, x, y, state, before=29):
        _, state = m(x[:before], state)
        out, _ = m(x[before:], tuple(s.detach() for s in state))
        loss = torch.nn.functional.cross_entropy(out[-15:].reshape(-1, 20), y[-15:].reshape(-1))
        m.zero_grad(); loss.backward(); return m.grads()

    assert npbptt.crosscheck(net, x, y, state, K1=30, K2=15, framework="torch", grad_fn=my_step).passed
    late = npbptt.crosscheck(net, x, y, state, K1=30, K2=15, framework="torch",
                             grad_fn=lambda *a: my_step(*a, before=28))     # BPTT(31, 15) instead
    assert set(late.mismatched) == set(net.params) - DECODER


def test_network_methods_to_torch_and_to_jax(torch):
    if not hasattr(npbptt.LSTM, "to_torch"):
        pytest.skip("npbptt/model.py has no to_torch/to_jax methods yet (the lead adds two "
                    "one-line delegations to npbptt.interop)")
    net = make_problem(np.random.default_rng(15), layers=2).net
    _assert_grads_equal(npbptt.from_torch(npbptt.to_torch(net)).params, net.params, rtol=0)
