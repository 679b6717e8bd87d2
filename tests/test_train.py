"""The trainer (Algorithm 1): one SGD step, the probe, fixed-K and adaptive runs equal to the
loops they implement, resume bit for bit, divergence, atomic checkpoints, bad settings."""
import math
import os
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import npbptt
from npbptt import bounds
from npbptt.checkpoint import (load_checkpoint, read_csv, rng_from_state, rng_state,
                               save_checkpoint)
from npbptt.data import copy_task
from npbptt.train import (METRIC_COLUMNS, Diverged, TrainConfig, probe_phi, sgd_step, train)

BACKEND = "numpy"


def tiny_data(seed=0):
    """A copy task small enough for tests: 8 streams of 60 (train) and 30 (valid/test) steps."""
    return copy_task(T_train=8 * 60, T_valid=8 * 30, T_test=8 * 30, m=3, n_symbols=3, batch=8, seed=seed)


def tiny_net(data, seed=1):
    return npbptt.LSTM(3, 6, 2, data.n_outputs, vocab_size=data.vocab_size, seed=seed)


def tiny_config(**kw):
    base = dict(epochs=2, lr=0.5, W=10, burnin=3, K0=4, K_min=2, K_max=12, delta_probes=2,
                backend=BACKEND, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _same_metrics(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}


# --- the pieces ---------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(K=st.integers(1, 30), lr=st.floats(1e-3, 10.0), wd=st.sampled_from([0.0, 1e-3, 0.5]),
       clip=st.sampled_from([None, 0.05, 1.0, 100.0]), seed=st.integers(0, 2**31 - 1))
def test_sgd_step_is_algorithm1_line11(K, lr, wd, clip, seed):
    """theta <- theta - lr sqrt(K) (c g + wd theta), c = min(1, clip / ||g||) over all parameters."""
    rng = np.random.default_rng(seed)
    params = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    grads = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    before = {k: v.copy() for k, v in params.items()}
    norm = sgd_step(params, grads, lr, K, wd, clip)
    flat = np.concatenate([grads["a"].ravel(), grads["b"].ravel()])
    assert norm == pytest.approx(np.sqrt(flat @ flat), rel=1e-14)
    c = 1.0 if clip is None else min(1.0, clip / np.linalg.norm(flat))
    for k in params:
        expect = before[k] - lr * np.sqrt(K) * (c * grads[k] + wd * before[k])
        np.testing.assert_allclose(params[k], expect, rtol=1e-13, atol=1e-13)
    if clip is not None and np.linalg.norm(flat) > clip and wd == 0.0:
        step = np.concatenate([(before[k] - params[k]).ravel() for k in ("a", "b")])
        assert np.linalg.norm(step) == pytest.approx(lr * np.sqrt(K) * clip, rel=1e-12)


def test_probe_is_grad_norms_on_random_windows_after_burnin():
    """Algorithm 1, lines 3-4: each stream's window starts at the generator's draw; its state is
    the zero state advanced through the burn-in by net.step; phi = grad_norms on the window."""
    data = tiny_data()
    net = tiny_net(data)
    x, y = data.train
    W, burnin = 7, 4
    phi = probe_phi(net, x, y, W, burnin, np.random.default_rng(11), backend=BACKEND)
    assert phi.shape == (W + 1, x.shape[1])
    start = np.random.default_rng(11).integers(0, x.shape[0] - (burnin + W + 1) + 1, size=x.shape[1])
    for b in range(x.shape[1]):
        s = start[b]
        S = net.to_internal(net.init_state(1))
        for t in range(s, s + burnin):
            S, _ = net.step(S, x[t:t + 1, b])
        expect = npbptt.grad_norms(net, x[s + burnin:s + burnin + W + 1, b:b + 1],
                                   y[s + burnin:s + burnin + W + 1, b:b + 1], net.to_public(S),
                                   backend=BACKEND)
        np.testing.assert_allclose(phi[:, b], expect[:, 0], rtol=1e-12, atol=1e-300)


# --- whole runs equal the loops they implement -----------------------------------------------
def test_fixed_K_run_is_streamed_bptt_2K_K_with_sgd():
    """One fixed-K epoch equals npbptt.stream(K, 2K) with theta -= lr sqrt(K)(g + wd theta) after
    every chunk (Algorithm 1, lines 8-12); validation/test PPL are exp(mean step loss)."""
    data = tiny_data()
    cfg = tiny_config(K=4, epochs=1, weight_decay=1e-3)
    net = tiny_net(data)
    ref = net.copy()
    res = train(net, data, cfg, progress=False)
    x, y = data.train
    losses = []
    for chunk, r in npbptt.stream(ref, x, y, ref.init_state(8), 4, 8, backend=BACKEND):
        for k, p in ref.params.items():
            p -= cfg.lr * np.sqrt(4) * (r.grads[k] + cfg.weight_decay * p)
        losses.append(r.loss * (chunk.stop - chunk.start))
    for k in ref.params:
        np.testing.assert_allclose(res.params[k], ref.params[k], rtol=1e-12, atol=1e-14)
    row = res.metrics[0]
    assert row["K"] == 4 and row["data_passes"] == 1.0 and row["probe_flag"] is None
    assert row["train_loss"] == pytest.approx(sum(losses) / x.shape[0], rel=1e-12)
    L, _ = npbptt.step_losses(ref, *data.valid, ref.init_state(8), backend=BACKEND)
    assert row["valid_ppl"] == pytest.approx(math.exp(L.mean()), rel=1e-12)
    L, _ = npbptt.step_losses(ref, *data.test, ref.init_state(8), backend=BACKEND)
    assert row["test_ppl"] == pytest.approx(math.exp(L.mean()), rel=1e-12)
    assert set(METRIC_COLUMNS) == set(row)


def test_adaptive_run_takes_K_from_kappa_hat_and_counts_probe_data():
    """Epoch 1 uses K0; epoch n >= 2 uses kappa_hat(delta) (Eq. 25) of a probe at the parameters
    after epoch n-1, drawn from the run's generator; data passes count each probe's
    burnin + W + 1 steps."""
    data = tiny_data()
    cfg = tiny_config(delta=0.5, epochs=3)
    res = train(tiny_net(data), data, cfg, progress=False)
    one = train(tiny_net(data), data, replace(cfg, epochs=1), progress=False)
    T = data.train[0].shape[0]
    probe_steps = cfg.burnin + cfg.W + 1
    assert [r["epoch"] for r in res.metrics] == [1, 2, 3]
    assert res.metrics[0]["K"] == cfg.K0
    for n, row in enumerate(res.metrics):
        assert row["data_passes"] == pytest.approx(n + 1 + n * probe_steps / T, rel=1e-12)
        assert cfg.K_min <= row["K"] <= cfg.K_max
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(2)[0])
    net = tiny_net(data)
    net.params = {k: v.copy() for k, v in one.params.items()}
    phi = probe_phi(net, *data.train, cfg.W, cfg.burnin, rng, backend=BACKEND)
    tr = bounds.kappa_hat(phi, cfg.delta, cfg.K_min, cfg.K_max)
    assert res.metrics[1]["K"] == tr.K and res.metrics[1]["probe_flag"] == tr.flag
    assert res.metrics[1]["probe_beta_hat"] == tr.beta_hat
    assert res.metrics[0]["train_loss"] == one.metrics[0]["train_loss"]


def test_best_validation_parameters_are_kept():
    data = tiny_data()
    res = train(tiny_net(data), data, tiny_config(K=3, epochs=3), progress=False)
    best = min(res.metrics, key=lambda r: r["valid_ppl"])
    assert res.best_epoch == best["epoch"]
    assert res.metrics[-1]["best_valid_ppl"] == best["valid_ppl"]
    assert res.metrics[-1]["test_ppl_at_best"] == best["test_ppl"]
    net = tiny_net(data)
    net.params = res.best_params
    L, _ = npbptt.step_losses(net, *data.valid, net.init_state(8), backend=BACKEND)
    assert math.exp(L.mean()) == pytest.approx(best["valid_ppl"], rel=1e-12)


def test_delta_hat_diagnostics_do_not_change_the_trajectory():
    """The delta_hat probes use their own generator: the parameters do not depend on them."""
    data = tiny_data()
    a = train(tiny_net(data), data, tiny_config(delta=0.5, epochs=3, delta_probes=0), progress=False)
    b = train(tiny_net(data), data, tiny_config(delta=0.5, epochs=3, delta_probes=3), progress=False)
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k])
    assert math.isnan(a.metrics[-1]["delta_hat"]) and math.isfinite(b.metrics[-1]["beta_hat"])


# --- files, resume, divergence ------------------------------------------------------------------
def test_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
    data = tiny_data()
    cfg = tiny_config(delta=0.5, epochs=3, probes_per_epoch=2)
    full = train(tiny_net(data), data, cfg, out=tmp_path / "full", progress=False)
    train(tiny_net(data), data, replace(cfg, epochs=1), out=tmp_path / "cut", progress=False)
    # a network with other initial values: the resumed run must take everything from the checkpoint
    res = train(tiny_net(data, seed=99), data, cfg, out=tmp_path / "cut", resume=True, progress=False)
    _same_metrics(full.metrics, res.metrics)
    for k in full.params:
        assert np.array_equal(full.params[k], res.params[k])
        assert np.array_equal(full.best_params[k], res.best_params[k])
    assert np.array_equal(full.phi_best, res.phi_best)
    _same_metrics(read_csv(tmp_path / "full" / "metrics.csv"), read_csv(tmp_path / "cut" / "metrics.csv"))
    a, ma = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    b, mb = load_checkpoint(tmp_path / "cut" / "checkpoint.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert ma["rng_train"] == mb["rng_train"] and ma["rng_diag"] == mb["rng_diag"]


def test_metrics_csv_round_trips_the_metrics(tmp_path):
    data = tiny_data()
    res = train(tiny_net(data), data, tiny_config(delta=0.5, epochs=2), out=tmp_path, progress=False)
    rows = read_csv(tmp_path / "metrics.csv")
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:9] == ["epoch", "data_passes", "K", "delta_hat", "beta_hat", "train_loss",
                          "valid_ppl", "test_ppl", "seconds"]
    _same_metrics(rows, res.metrics)


def test_resume_refuses_changed_settings_and_missing_runs(tmp_path):
    data = tiny_data()
    cfg = tiny_config(K=3, epochs=1)
    train(tiny_net(data), data, cfg, out=tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="lr=0.1 differs"):
        train(tiny_net(data), data, replace(cfg, lr=0.1), out=tmp_path / "r", resume=True, progress=False)
    with pytest.raises(ValueError, match="data: differs"):
        train(tiny_net(data), tiny_data(seed=5), cfg, out=tmp_path / "r", resume=True, progress=False)
    with pytest.raises(ValueError, match="architecture"):
        other = npbptt.LSTM(3, 7, 2, data.n_outputs, vocab_size=data.vocab_size)
        train(other, data, cfg, out=tmp_path / "r", resume=True, progress=False)
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        train(tiny_net(data), data, cfg, out=tmp_path / "none", resume=True, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_net(data), data, cfg, out=tmp_path / "r", progress=False)
    # what may change: more epochs, another backend
    res = train(tiny_net(data), data, replace(cfg, epochs=2, backend=None), out=tmp_path / "r",
                resume=True, progress=False)
    assert len(res.metrics) == 2


def test_huge_learning_rate_diverges_with_a_clear_error(tmp_path):
    data = tiny_data()
    with pytest.raises(Diverged, match=r"training diverged in epoch 1\b.*non-finite.*no checkpoint") as e:
        train(tiny_net(data), data, tiny_config(K=3, lr=1e300), out=tmp_path, progress=False)
    assert e.value.epoch == 1
    assert not (tmp_path / "checkpoint.npz").exists()


def test_divergence_leaves_the_last_good_checkpoint_intact(tmp_path, monkeypatch):
    """A NaN gradient in epoch 2, chunk 3: Diverged names them, and the checkpoint, metrics and
    parameters on disk are those of epoch 1."""
    import npbptt.train as tr
    data = tiny_data()
    cfg = tiny_config(K=3, epochs=3)
    good = train(tiny_net(data), data, replace(cfg, epochs=1), out=tmp_path / "good", progress=False)
    real_stream, calls = tr.stream, []

    def poisoned(*args, **kw):
        calls.append(1)
        for m, (chunk, res) in enumerate(real_stream(*args, **kw), start=1):
            if len(calls) == 2 and m == 3:
                res.grads["weight_hh_l1"][0, 0] = np.nan
            yield chunk, res

    monkeypatch.setattr(tr, "stream", poisoned)
    with pytest.raises(Diverged, match=r"epoch 2, chunk 3: non-finite gradient .* steps 7\.\.9 of 60.*"
                                       r"last good checkpoint .* \(epoch 1\) is intact") as e:
        train(tiny_net(data), data, cfg, out=tmp_path / "bad", progress=False)
    assert (e.value.epoch, e.value.chunk) == (2, 3)
    arrays, meta = load_checkpoint(tmp_path / "bad" / "checkpoint.npz")
    assert meta["epoch"] == 1
    for k, v in good.params.items():
        assert np.array_equal(arrays[f"param/{k}"], v)
    _same_metrics(read_csv(tmp_path / "bad" / "metrics.csv"), good.metrics)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A failure while writing (here: at the fsync or at the rename) leaves the previous file
    byte for byte, and no temporary file behind."""
    path = tmp_path / "checkpoint.npz"
    rng = np.random.default_rng(0)
    save_checkpoint(path, {"w": rng.standard_normal(4)}, {"epoch": 1, "rng": rng_state(rng)})
    before = path.read_bytes()
    for target in ("fsync", "replace"):
        def fail(*a, **k):
            raise OSError(f"simulated failure in os.{target}")
        with monkeypatch.context() as m:
            m.setattr(os, target, fail)
            with pytest.raises(OSError, match="simulated"):
                save_checkpoint(path, {"w": np.zeros(1000)}, {"epoch": 2})
        assert path.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]
    arrays, meta = load_checkpoint(path)
    assert meta["epoch"] == 1
    again = rng_from_state(meta["rng"])
    assert np.array_equal(again.standard_normal(5), rng.standard_normal(5))


@pytest.mark.parametrize("kw, match", [
    (dict(), "give exactly one"),
    (dict(K=3, delta=0.5), "give exactly one"),
    (dict(K=0), "K: expected an integer >= 1"),
    (dict(K=2.5), "K: expected an integer >= 1"),
    (dict(delta=1.0), r"delta: expected a real number in \(0, 1\)"),
    (dict(delta=0.0), r"delta: expected a real number in \(0, 1\)"),
    (dict(delta=0.5, K_min=10, K_max=5), "K_min <= K_max"),
    (dict(K=3, lr=0.0), "lr"),
    (dict(K=3, weight_decay=-1.0), "weight_decay"),
    (dict(K=3, clip=0.0), "clip"),
    (dict(K=3, epochs=0), "epochs"),
    (dict(K=3, W=5, tau_hat=5), "tau_hat"),
    (dict(K=3, method="median"), "method"),
    (dict(K=3, backend="tpu"), "backend"),
])
def test_bad_settings_raise_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_probe_window_must_fit_the_data():
    data = tiny_data()
    with pytest.raises(ValueError, match="probe window"):
        train(tiny_net(data), data, tiny_config(delta=0.5, W=58, burnin=2), progress=False)
