"""Issue 21: truncated BPTT beside its unbiased and online alternatives on the same cells --
bias, variance, mean squared error and cost against the exact gradient, then training at equal
compute.

Estimators (all NumPy, ``backend="numpy"`` for the TBPTT ones, so the times compare like with
like):

* TBPTT(K): the paper's streaming BPTT(2K, K) (``npbptt.stream``) over the chunk, its chunk
  gradients weighted by their lengths: an estimate of the gradient of (1/T) sum_t L_t;
* adaptive kappa_hat(delta): the same with K = kappa_hat(delta) (Eq. 25, ``npbptt.bounds``) from
  a probe (``npbptt.grad_norms``) of the chunk's last R+1 steps;
* UORO (``npbptt.online.uoro``), ARTBP (``npbptt.online.artbp``, constant truncation probability
  c, mean segment 1/c), exact RTRL (``npbptt.online.rtrl``).

The yardstick is the full gradient of the chunk, ``npbptt.bptt(net, x, y, state, K1=T-1,
K2=T)`` (= RTRL).  Bias = ||E g - g|| / ||g|| (for the random estimators E g is the mean of N
draws, its noise floor sqrt(tr Var / N) / ||g|| is printed beside it), relative variance
tr Var(g) / ||g||^2 over the method's own draws (the data fixed), relative MSE
E||g_i - g||^2 / ||g||^2, proj = <E g, g> / ||g||^2 (1 = right size and direction; < 0 = the
wrong sign), time per step (one call over the chunk / T) and the peak memory of one streaming
pass over the chunk (tracemalloc; ARTBP by ``artbp_stream``, which keeps one segment).
Times are CPU time of this process (``time.process_time``), so other work on a shared machine
does not count against an estimator.

Problems:

* influence balancing (Tallec & Ollivier 2017, the synthetic task of "Unbiased Online Recurrent Optimization" and
  of "Unbiasing Truncated BPTT"; rebuilt here from its description): the linear recurrence s_t = A s_{t-1} + theta u, A_ii = 1/2,
  A_{i,i+1} = 1/2, u = (1, ..., 1, -1, ..., -1) with p ones in n units, loss (s^1_t - 1)^2,
  written as an npbptt.RNN (linear activation, dense input x_t = 1, no bias, read-out e_1); the
  parameter is the scalar theta (the gradient reported is u . dL/dW_ih).  Short lags see only the
  positive units, the long ones the negative: truncation gets the sign of dL/dtheta wrong.
  The chunk starts from the stationary state of theta.
* the copy-task LSTM (§5.1; REDUCED: 2 layers of 16 instead of 50, copy length m = 5, a window
  of B streams) at initialisation and after a short SGD training with BPTT(2K, K), K = 15.

Influence balancing trained online: theta from 0 by SGD with each estimator over one stream
(the same step size per step of data), the final theta against theta* -- truncation walks the
wrong way.

Training at equal compute (REDUCED): the copy task from the same initialisation, each estimator
given the same wall-clock budget of SGD steps theta <- theta - lr sqrt(K) g (Algorithm 1, line 11;
K the chunk length, 1/c for ARTBP), validation perplexity against data passes.

Outputs: validation/results/unbiased.md, unbiased.csv, unbiased.png
Run: nice -n 10 python validation/unbiased.py            (about 10 minutes on 2 shared cores)
     python validation/unbiased.py --smoke [--results DIR]   (seconds; a tiny version)
"""
import argparse
import csv
import math
import os
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # one thread: CPU times compare, 2 shared cores
import numpy as np  # noqa: E402

import npbptt  # noqa: E402
from npbptt import bounds, online  # noqa: E402
from npbptt.data import copy_task  # noqa: E402

HERE = Path(__file__).resolve().parent

FULL = dict(
    ib=dict(n=23, p=10, theta=0.0, T=200),
    copy=dict(m=5, n_symbols=6, batch=32, T_train=32 * 4000, embed=6, hidden=16, layers=2,
              K=15, lr=1.0, seed=0, snapshots=(0, 400), T=100, B=4, burn=50),
    Ks=(1, 3, 10, 30, 60), deltas=(0.1,), cs=(0.1, 0.03), N=200, R=40,
    train=dict(budget=35.0, eval_every=5.0, eval_T=300, K=15, Ks=(5, 15), delta=0.1,
               c=1 / 15, probe_every=20, R=40),
    ib_train=dict(steps=6000, lrs=(5e-5, 5e-6), Ks=(1, 10, 30)),
    paper=dict(embed=6, hidden=50, layers=2, batch=64, vocab=8),
)
SMOKE = dict(
    ib=dict(n=5, p=2, theta=0.0, T=20),
    copy=dict(m=3, n_symbols=4, batch=4, T_train=4 * 300, embed=3, hidden=3, layers=1,
              K=5, lr=1.0, seed=0, snapshots=(0, 10), T=12, B=2, burn=5),
    Ks=(1, 3), deltas=(0.1,), cs=(0.2,), N=8, R=6,
    train=dict(budget=0.4, eval_every=0.2, eval_T=20, K=5, Ks=(3,), delta=0.1, c=0.2,
               probe_every=5, R=6),
    ib_train=dict(steps=60, lrs=(5e-5,), Ks=(1,)),
    paper=dict(embed=6, hidden=50, layers=2, batch=64, vocab=8),
)


# --- the problems -------------------------------------------------------------------------------
def influence_balancing(n, p, theta, T):
    """The influence-balancing network and a chunk of T steps from theta's stationary state;
    returns (net, x, y, state, u), the scalar parameter's direction u in weight_ih_l0."""
    net = npbptt.RNN(1, n, 1, 1, activation="linear", bias=False, seed=0)
    A = 0.5 * (np.eye(n) + np.eye(n, k=1))
    u = np.where(np.arange(n) < p, 1.0, -1.0)
    net.params["weight_hh_l0"] = A
    net.params["weight_ih_l0"] = theta * u[:, None]
    net.params["decoder.weight"] = np.eye(1, n)
    net.params["decoder.bias"] = np.zeros(1)
    s = np.linalg.solve(np.eye(n) - A, theta * u)            # s = A s + theta u
    x, y = np.ones((T, 1, 1)), np.ones((T, 1, 1))
    return net, x, y, s.reshape(1, 1, n), u


def ib_project(u):
    return lambda grads: np.array([u @ grads["weight_ih_l0"][:, 0]])


def flat_all(grads):
    return np.concatenate([v.ravel() for _, v in sorted(grads.items())])


def copy_net(cfg, data):
    return npbptt.LSTM(cfg["embed"], cfg["hidden"], cfg["layers"], data.n_outputs,
                       vocab_size=data.vocab_size, seed=cfg["seed"])


def sgd_stream(net, x, y, state, K, lr, chunks):
    """``chunks`` SGD steps of BPTT(2K, K) (Algorithm 1, line 11): the state after them."""
    for i, (_, res) in enumerate(npbptt.stream(net, x, y, state, K, backend="numpy"), 1):
        for k, g in res.grads.items():
            net.params[k] -= lr * math.sqrt(K) * g
        state = res.state
        if i >= chunks:
            break
    return state


def copy_snapshots(cfg, T_valid):
    """{chunks: net} after the given numbers of SGD chunks of BPTT(2K, K), and the data (its
    validation streams ``T_valid`` steps long)."""
    data = copy_task(cfg["T_train"], T_valid * cfg["batch"], T_valid * cfg["batch"], m=cfg["m"],
                     n_symbols=cfg["n_symbols"], batch=cfg["batch"], seed=0)
    net = copy_net(cfg, data)
    x, y = data.train
    out, done, state = {}, 0, net.init_state(x.shape[1])
    for n in sorted(cfg["snapshots"]):
        if n > done:
            state = sgd_stream(net, x[done * cfg["K"]:], y[done * cfg["K"]:], state, cfg["K"],
                               cfg["lr"], n - done)
            done = n
        out[n] = net.copy()
    return out, data


def copy_window(net, data, T, B, burn):
    x, y = data.valid
    if burn + T > x.shape[0] or B > x.shape[1]:
        raise ValueError(f"T, B, burn: the validation streams {x.shape} are too short for "
                         f"burn + T = {burn + T} steps of B = {B} streams")
    state = npbptt.step_losses(net, x[:burn, :B], y[:burn, :B], net.init_state(B),
                               backend="numpy")[1]
    return x[burn:burn + T, :B], y[burn:burn + T, :B], state


# --- the estimators -----------------------------------------------------------------------------
def tbptt_grads(net, x, y, state, K, loss):
    T = x.shape[0]
    out = {k: np.zeros_like(v) for k, v in net.params.items()}
    for sl, res in npbptt.stream(net, x, y, state, K, loss=loss, backend="numpy"):
        for k, g in res.grads.items():
            out[k] += (sl.stop - sl.start) / T * g
    return out


def kappa_of(net, x, y, state, delta, R, loss):
    """kappa_hat(delta) (Eq. 25) from the probe of the chunk's last R+1 steps."""
    T = x.shape[0]
    R = min(R, T - 1)
    st = state if T - R - 1 == 0 else npbptt.step_losses(
        net, x[:T - R - 1], y[:T - R - 1], state, loss=loss, backend="numpy")[1]
    phi = npbptt.grad_norms(net, x[T - R - 1:], y[T - R - 1:], st, loss=loss, backend="numpy")
    return bounds.kappa_hat(phi, delta, 1, T, method="ols").K


def estimators(cfg, net, x, y, state, loss):
    """[(name, setting, draw(rng) -> grads, stream_pass(rng) for the memory, random?)]."""
    out = []
    for K in cfg["Ks"]:
        f = lambda rng, K=K: tbptt_grads(net, x, y, state, K, loss)  # noqa: E731
        out.append((f"TBPTT({K})", f"BPTT({2 * K},{K})", f, f, False))
    for d in cfg["deltas"]:
        K = kappa_of(net, x, y, state, d, cfg["R"], loss)
        f = lambda rng, K=K: tbptt_grads(net, x, y, state, K, loss)  # noqa: E731
        out.append((f"adaptive kappa_hat({d})", f"K = {K}", f, f, False))
    out.append(("UORO", "eps = 1e-7",
                lambda rng: online.uoro(net, x, y, state, rng, loss).grads,
                lambda rng: online.uoro(net, x, y, state, rng, loss).grads, True))
    for c in cfg["cs"]:
        out.append((f"ARTBP(c={c:g})", f"mean segment {1 / c:.0f}",
                    lambda rng, c=c: online.artbp(net, x, y, state, rng, c, loss).grads,
                    lambda rng, c=c: [r for _, r in online.artbp_stream(net, x, y, state, rng, c,
                                                                         loss)], True))
    out.append(("RTRL", "exact",
                lambda rng: online.rtrl(net, x, y, state, loss).grads,
                lambda rng: online.rtrl(net, x, y, state, loss).grads, False))
    return out


def compare(problem, cfg, net, x, y, state, loss, project, seed):
    """One row per estimator: bias, variance, MSE, proj, time and memory (module docstring)."""
    T = x.shape[0]
    g = project(npbptt.bptt(net, x, y, state, T - 1, T, loss, backend="numpy").grads)
    gn2 = float(g @ g)
    rows = []
    for name, setting, draw, stream_pass, random in estimators(cfg, net, x, y, state, loss):
        rng = np.random.default_rng(seed)
        N = cfg["N"] if random else 1
        t0 = time.process_time()
        G = np.stack([project(draw(rng)) for _ in range(N)])
        sec = (time.process_time() - t0) / N
        tracemalloc.start()
        stream_pass(np.random.default_rng(seed + 1))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        mean = G.mean(0)
        var = float(((G - mean) ** 2).sum(1).mean()) * N / max(N - 1, 1) if N > 1 else 0.0
        rows.append(dict(problem=problem, estimator=name, setting=setting, N=N,
                         bias=float(np.linalg.norm(mean - g)) / math.sqrt(gn2),
                         floor=math.sqrt(var / N / gn2) if N > 1 else 0.0,
                         var=var / gn2, mse=float(((G - g) ** 2).sum(1).mean()) / gn2,
                         proj=float(mean @ g) / gn2, ms_per_step=1e3 * sec / T,
                         peak_kib=peak / 1024, g_norm=math.sqrt(gn2)))
    return rows


# --- training at equal compute ------------------------------------------------------------------
def perplexity(net, data, T_eval):
    x, y = data.valid
    if T_eval > x.shape[0]:
        raise ValueError(f"T_eval = {T_eval} exceeds the validation streams' {x.shape[0]} steps")
    L, _ = npbptt.step_losses(net, x[:T_eval], y[:T_eval], net.init_state(x.shape[1]),
                              backend="numpy")
    return float(np.exp(L.mean()))


def train_runs(cfg, tcfg, data, seed):
    """Each method from the same initialisation for ``budget`` seconds of estimator + update
    time (evaluation and probes' bookkeeping excluded, the adaptive probe included):
    [(name, [(data passes, perplexity)], status, Ks)]."""
    x, y = data.train
    Tn, B = x.shape[:2]
    K, lr, block = tcfg["K"], cfg["lr"], tcfg["probe_every"] * tcfg["K"]

    def chunks(method, net, xs, ys, state, rng, carry):
        """(steps, state, grads, sqrt(K)) per update over the block; ``carry`` a dict."""
        kind = method[0]
        if kind in ("tbptt", "adaptive"):
            for sl, r in npbptt.stream(net, xs, ys, state, method[1], backend="numpy"):
                yield sl.stop - sl.start, r.state, r.grads, math.sqrt(method[1])
        elif kind == "artbp":
            for sl, r in online.artbp_stream(net, xs, ys, state, rng, method[1]):
                yield sl.stop - sl.start, r.state, r.grads, math.sqrt(1 / method[1])
        else:
            gen = (online.uoro_stream(net, xs, ys, state, K, rng, carry=carry.get("c"))
                   if kind == "uoro" else
                   online.rtrl_stream(net, xs, ys, state, K, carry=carry.get("c")))
            for sl, r in gen:
                carry["c"] = r.carry
                yield sl.stop - sl.start, r.state, r.grads, math.sqrt(K)

    methods = [(f"TBPTT({k})", ("tbptt", k)) for k in tcfg["Ks"]]
    methods += [(f"adaptive kappa_hat({tcfg['delta']})", ("adaptive", K)), ("UORO", ("uoro",)),
                ("UORO, lr / 10", ("uoro",)),
                (f"ARTBP(c={tcfg['c']:.3g})", ("artbp", tcfg["c"])), ("RTRL", ("rtrl",))]
    runs = []
    for name, method in methods:
        lr = cfg["lr"] / 10 if name.endswith("lr / 10") else cfg["lr"]
        net = copy_net(cfg, data)
        rng = np.random.default_rng(seed)
        curve, status, Ks = [(0.0, perplexity(net, data, tcfg["eval_T"]))], "ok", []
        pos, done, state, used, next_eval, carry = 0, 0, net.init_state(B), 0.0, \
            tcfg["eval_every"], {}
        while used < tcfg["budget"] and status == "ok":
            t0 = time.process_time()
            if method[0] == "adaptive":    # kappa_hat(delta) from a probe of the next R+1 steps
                R = tcfg["R"]
                if pos + R + 1 <= Tn:
                    phi = npbptt.grad_norms(net, x[pos:pos + R + 1], y[pos:pos + R + 1], state,
                                            backend="numpy")
                    method = ("adaptive", bounds.kappa_hat(phi, tcfg["delta"], 2, 100).K)
                Ks.append(method[1])
            stop = min(pos + block, Tn)
            for n, state_new, grads, scale in chunks(method, net, x[pos:stop], y[pos:stop],
                                                     state, rng, carry):
                if not all(np.isfinite(v).all() for v in grads.values()):
                    status = "diverged (non-finite gradient)"
                    break
                for k, v in grads.items():
                    net.params[k] -= lr * scale * v
                pos, done, state = pos + n, done + n, state_new
                now = used + time.process_time() - t0
                if now >= tcfg["budget"] or now >= next_eval:
                    break
            used += time.process_time() - t0
            if used >= next_eval or used >= tcfg["budget"] or status != "ok":
                ppl = perplexity(net, data, tcfg["eval_T"])
                curve.append((done / Tn, ppl))
                next_eval = used + tcfg["eval_every"]
                if status == "ok" and (not np.isfinite(ppl) or ppl > 1e6):
                    status = "diverged (perplexity)"
            if pos >= Tn:                          # another pass over the training streams
                pos, state, carry = 0, net.init_state(B), {}
        if curve[-1][0] != done / Tn:
            curve.append((done / Tn, perplexity(net, data, tcfg["eval_T"])))
        runs.append((name, curve, status, Ks))
        print(f"  {name}: {done / Tn:.3g} passes, perplexity {curve[-1][1]:.3g}, {status}",
              flush=True)
    return runs


def ib_train(ib, tcfg, seed):
    """Influence balancing trained online from theta = 0 for ``steps`` steps, each estimator's
    update theta <- theta - lr (sum of its chunk's losses' gradient) / 10 (the same step size
    per step of data for every method; TBPTT(K) updates every K steps, UORO and RTRL every 10,
    ARTBP at its truncations with norm = 10 for c = 0.1).  theta* = 1 / (2 (2p - n)) makes the
    stationary s^1 = 1.  Returns [(name, [(step, theta)], final stationary loss)]."""
    n, p, steps = ib["n"], ib["p"], tcfg["steps"]
    theta_star = 1.0 / (2 * (2 * p - n))
    out = []
    methods = [(f"TBPTT({k})", ("tbptt", k), tcfg["lrs"][0]) for k in tcfg["Ks"]]
    for lr in tcfg["lrs"]:
        methods += [(f"UORO, lr {lr:g}", ("uoro", 10), lr),
                    (f"ARTBP(c=0.1), lr {lr:g}", ("artbp", 0.1), lr),
                    (f"RTRL, lr {lr:g}", ("rtrl", 10), lr)]
    for name, (kind, K), lr in methods:
        net, x, y, state, u = influence_balancing(n, p, 0.0, steps)
        rng = np.random.default_rng(seed)
        theta, traj = 0.0, [(0, 0.0)]
        if kind == "artbp":
            gen = online.artbp_stream(net, x, y, state, rng, K, "mse", norm=10.0)
        elif kind == "tbptt":
            gen = npbptt.stream(net, x, y, state, K, loss="mse", backend="numpy")
        elif kind == "uoro":
            gen = online.uoro_stream(net, x, y, state, K, rng, "mse")
        else:
            gen = online.rtrl_stream(net, x, y, state, K, "mse")
        for sl, r in gen:                     # the streams read net.params chunk by chunk
            m = sl.stop - sl.start
            g = float(u @ r.grads["weight_ih_l0"][:, 0]) * (1.0 if kind == "artbp" else m / 10)
            theta -= lr * g
            net.params["weight_ih_l0"] = theta * u[:, None]
            traj.append((sl.stop, theta))
            if not abs(theta) < 1e3:
                break
        s1 = 2 * theta * (2 * p - n)
        out.append((name, traj, (s1 - 1) ** 2, theta_star))
        print(f"  {name}: theta {theta:.4g} (theta* {theta_star:.4g})", flush=True)
    return out


# --- report -------------------------------------------------------------------------------------
def fmt(v):
    if v == 0:
        return "0"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def report(rows, runs, ib_runs, extra, res_dir, smoke, seconds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res_dir.mkdir(parents=True, exist_ok=True)
    keys = ["problem", "estimator", "setting", "N", "bias", "floor", "proj", "var", "mse",
            "ms_per_step", "peak_kib", "g_norm"]
    with open(res_dir / "unbiased.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in keys})
    L = ["# Unbiased and online gradients beside (adaptive) TBPTT (issue 21)", ""]
    if smoke:
        L += ["**SMOKE RUN** (tiny sizes, a few draws): the numbers only show that the script "
              "runs.", ""]
    L += [f"**REDUCED** settings throughout: copy-task LSTM {extra['size']} (paper 2x50), "
          f"windows of B = {extra['B']} streams, N = {extra['N']} draws per random estimator, training "
          f"budget {extra['budget']:g} CPU s per estimator on a shared 2-core CPU (all times are "
          "process CPU time).", "",
          "Columns: bias = ||E g - g|| / ||g|| (random estimators: E g = mean of N draws; "
          "'floor' = sqrt(tr Var / N) / ||g||, the bias a perfectly unbiased estimator would "
          "show), proj = <E g, g> / ||g||^2 (1: right; < 0: wrong sign), var = tr Var(g) / "
          "||g||^2 (the method's own randomness, data fixed), mse = E||g_i - g||^2 / ||g||^2, "
          "ms/step = one call over the chunk / T, peak = tracemalloc peak of one streaming pass "
          "(KiB).  Yardstick g: npbptt.bptt(K1=T-1, K2=T) on the chunk.", "",
          "| problem | estimator | setting | bias | floor | proj | var | mse | ms/step | peak KiB |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['problem']} | {r['estimator']} | {r['setting']} | {fmt(r['bias'])} | "
                 f"{fmt(r['floor'])} | {fmt(r['proj'])} | {fmt(r['var'])} | {fmt(r['mse'])} | "
                 f"{r['ms_per_step']:.3g} | {r['peak_kib']:.0f} |")
    ibc = extra["ib"]
    L += ["", "## Influence balancing trained online", "",
          f"theta from 0, {ibc['steps']} steps of one stream (n = {ibc['n']}, p = {ibc['p']}), "
          "update theta <- theta - lr x (gradient of the chunk's summed loss) / 10 "
          f"(lr {ibc['lrs'][0]:g} for TBPTT; the others at lr {' and '.join(f'{v:g}' for v in ibc['lrs'])}) "
          "after each chunk (TBPTT(K): BPTT(2K, K) chunks of K; UORO, RTRL: chunks of 10; "
          "ARTBP: at its truncations, norm 10), the parameters changing under the running "
          "streams.  theta* makes the stationary s^1 = 1; the stationary loss (s^1(theta) - 1)^2 "
          "at the final theta.  The noise of UORO and ARTBP is proportional to s^1 - 1, which "
          "vanishes at theta*: under SGD such multiplicative noise itself drifts theta toward "
          "theta* (an effect of order lr^2), so converging faster than exact RTRL at the larger "
          "lr is not a better mean direction; at the smaller lr the three move alike.", "",
          "| estimator | final theta | theta* | stationary loss | |",
          "|---|---|---|---|---|"]
    for name, traj, loss, ts in ib_runs:
        th = traj[-1][1]
        verdict = ("diverged" if not abs(th) < 1e3 else
                   "wrong direction" if th * ts < 0 else
                   "converged" if abs(th - ts) < 0.01 * abs(ts) else "on the way")
        L.append(f"| {name} | {th:.4g} | {ts:.4g} | {fmt(loss)} | {verdict} |")
    L += ["", "## Training the copy task at equal compute (REDUCED)", "",
          f"Each estimator from the same initialisation, {extra['budget']:g} CPU s of estimator and "
          "update time (evaluation excluded), SGD theta <- theta - lr sqrt(K) g, lr = 1 (UORO "
          "also at 0.1); "
          f"validation perplexity on {extra['eval_T']} steps of {extra['valid_B']} streams "
          "(chance: the number of symbols + 2).", "",
          "| estimator | data passes | final perplexity | best perplexity | status |",
          "|---|---|---|---|---|"]
    for name, curve, status, Ks in runs:
        ks = f" (K: {min(Ks)}..{max(Ks)})" if Ks else ""
        L.append(f"| {name}{ks} | {curve[-1][0]:.3g} | {curve[-1][1]:.3g} | "
                 f"{min(p for _, p in curve):.3g} | {status} |")
    L += ["", "## Where an estimator is unusable", ""] + extra["findings"]
    L += ["", f"Run time {seconds:.0f} s.  Produced by validation/unbiased.py"
          f"{' --smoke' if smoke else ''}."]
    (res_dir / "unbiased.md").write_text("\n".join(L) + "\n", encoding="utf-8")

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems) + 2, figsize=(4.6 * (len(problems) + 2), 4.4))
    for ax, pb in zip(axes, problems):
        rs = [r for r in rows if r["problem"] == pb]
        xs = np.arange(len(rs))
        ax.bar(xs - 0.2, [max(r["bias"], 1e-16) for r in rs], 0.4, label="bias")
        ax.bar(xs + 0.2, [max(math.sqrt(r["mse"]), 1e-16) for r in rs], 0.4, label="sqrt(mse)")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([r["estimator"].replace("adaptive kappa_hat", "κ̂") for r in rs],
                           rotation=60, ha="right", fontsize=7)
        ax.set_title(pb, fontsize=9)
        ax.set_ylabel("relative to ||g||")
        ax.legend(fontsize=7)
    ax = axes[-2]
    for name, traj, _, ts in ib_runs:
        if "lr" in name and not name.endswith(f"lr {extra['ib']['lrs'][0]:g}"):
            continue
        ax.plot([t for t, _ in traj], [th for _, th in traj], label=name)
    ax.axhline(ib_runs[0][3], color="k", lw=0.8, ls="--", label="theta*")
    ax.set_ylim(-0.5, 0.5)
    ax.set_xlabel("steps")
    ax.set_ylabel("theta")
    ax.set_title("influence balancing, online SGD", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[-1]
    for name, curve, status, _ in runs:
        ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=".",
                label=name + ("" if status == "ok" else " (diverged)"))
    ax.set_xlabel("data passes")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title("copy task, equal compute" + (" (SMOKE)" if smoke else " (REDUCED)"), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(res_dir / "unbiased.png", dpi=110)
    plt.close(fig)


def findings(rows, runs, paper_bytes, paper, cfg):
    out = []
    most = max(c[-1][0] for _, c, _, _ in runs)
    for name, curve, status, _ in runs:
        if status != "ok":
            out.append(f"* training, {name}: {status}.")
        if curve[-1][1] > curve[0][1]:
            out.append(f"* training, {name}: the perplexity rose from {curve[0][1]:.3g} at "
                       f"initialisation to {curve[-1][1]:.3g} (best {min(p for _, p in curve):.3g})"
                       ": with the common step size its noise undoes the progress.")
        if curve[-1][0] < 0.1 * most:
            out.append(f"* training, {name}: only {curve[-1][0]:.3g} data passes in the budget "
                       f"(the most: {most:.3g}): too slow per step at this size.")
    for r in rows:
        if r["var"] > 1:
            out.append(f"* {r['problem']}, {r['estimator']}: variance {fmt(r['var'])} x ||g||^2 "
                       f"(noise {math.sqrt(r['var']):.3g} times the gradient's norm): one draw is "
                       "mostly noise; about "
                       f"{math.ceil(r['var'] / 0.25)} draws (or steps) must be averaged to bring "
                       "the noise to half the gradient's norm.")
        if r["proj"] < 0 and (r["N"] == 1 or 1 - r["proj"] > 3 * r["floor"]):
            out.append(f"* {r['problem']}, {r['estimator']}: the gradient has the wrong sign "
                       f"(proj {fmt(r['proj'])}): descent along it increases the loss.")
    cp = cfg["copy"]
    out.append(f"* RTRL at the paper's copy-task size (LSTM {paper['layers']}x{paper['hidden']}, "
               f"batch {paper['batch']}): its influence matrix needs about "
               f"{paper_bytes / 2**30:.3g} GiB (npbptt.online.rtrl_bytes), more than the 2 GiB "
               "default max_bytes -- unusable there; at the REDUCED size here "
               f"({cp['layers']}x{cp['hidden']}, batch {cp['batch']}) "
               f"{online.rtrl_bytes(_paper_like(cp), cp['batch']) / 2**20:.3g} MiB.")
    return out


def _paper_like(p):
    return npbptt.LSTM(p["embed"], p["hidden"], p["layers"], p.get("vocab", p.get("n_symbols", 6) + 2),
                       vocab_size=p.get("vocab", p.get("n_symbols", 6) + 2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny run of seconds")
    ap.add_argument("--results", default=str(HERE / "results"), help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    t0 = time.time()
    rows = []
    ib = cfg["ib"]
    net, x, y, state, u = influence_balancing(ib["n"], ib["p"], ib["theta"], ib["T"])
    name = f"influence balancing n={ib['n']} p={ib['p']} T={ib['T']}"
    print(name, flush=True)
    rows += compare(name, cfg, net, x, y, state, "mse", ib_project(u), args.seed)
    cp = cfg["copy"]
    snaps, data = copy_snapshots(cp, max(cp["burn"] + cp["T"], cfg["train"]["eval_T"]))
    for n, net in snaps.items():
        xw, yw, st = copy_window(net, data, cp["T"], cp["B"], cp["burn"])
        name = (f"copy LSTM {cp['layers']}x{cp['hidden']} after {n} chunks, "
                f"T={xw.shape[0]} B={xw.shape[1]}")
        print(name, flush=True)
        rows += compare(name, cfg, net, xw, yw, st, "cross_entropy", flat_all, args.seed)
    print("influence balancing, online training", flush=True)
    ib_runs = ib_train(ib, cfg["ib_train"], args.seed)
    print("training at equal compute", flush=True)
    runs = train_runs(cp, cfg["train"], data, args.seed)
    paper = cfg["paper"]
    pb = online.rtrl_bytes(_paper_like(paper), paper["batch"])
    extra = dict(size=f"{cp['layers']}x{cp['hidden']}, copy length m = {cp['m']}", B=cp["B"], N=cfg["N"], budget=cfg["train"]["budget"],
                 eval_T=cfg["train"]["eval_T"], valid_B=cp["batch"],
                 findings=findings(rows, runs, pb, paper, cfg))
    extra["ib"] = dict(ib, **cfg["ib_train"])
    report(rows, runs, ib_runs, extra, Path(args.results), args.smoke, time.time() - t0)
    print((Path(args.results) / "unbiased.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
