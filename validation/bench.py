"""Benchmark of npbptt's hot loops against PyTorch (issue 3): not a test.

Workloads, as in the paper's experiments:

    W1  copy-task training step: 2-layer LSTM, hidden 50, embedding 6, vocab 8, batch 64, BPTT(30, 15)
    W2  language-model training step: 1-layer LSTM 512, embedding 512, vocab 10,000, batch 32,
        BPTT(100, 50)
    W3  probe: BPTT(100, 1) per-example state-gradient norms phi (Eq. 18) on W1's model
    PTB language-model chunk at PTB's size as the LM task trains it (issue 18): 1-layer LSTM 900,
        embedding 900, vocab 10,000, tied weights, dropout 0.2, batch 32, BPTT(200, 100); npbptt
        draws the masks of the chunk's 100 new steps each step (``stream(rng=)`` reuses those of
        the 101 recomputed steps), torch ``nn.Dropout(0.2)`` draws all its masks each step
    BOOK Book Order chunk (issue 19): the RMTPP network (mark embedding 128 beside [gap, t],
        2-layer LSTM 128, read-out [2 mark logits, u, w]) and loss, batch 64, BPTT(12, 6);
        npbptt's "numba" backend hands this network to the NumPy reference
        (``npbptt.backends.resolve``), which bench.md's notes name

A "step" is one call on one window of K1 + 1 steps (the gradient, or phi, and the loss), from a
given state, without the optimizer update.  Contenders, all in this one process: npbptt
``backend="numpy"`` (the reference), npbptt ``backend="numba"`` (the default), torch eager
``nn.LSTM`` (torch.set_num_threads(2); W3 steps ``nn.LSTM`` one time step at a time and reads the
per-step state gradients with ``retain_grad``), and JAX ``jit(lax.scan)`` when JAX is installed.

Protocol: float64 and float32; ``--rounds`` rounds (15 by default: at 9, W1's ratios moved by
+-10% from run to run on a 2-core machine shared with others), the contenders in a rotating
order, an idle gap before each timing (spinning BLAS/OpenMP threads of the previous contender
otherwise slow the next one), then ``--warmup`` seconds (0.1) of the contender's own steps untimed
(the first steps after an idle gap run up to 1.5x slow while clocks and caches ramp up), then
``--min-time`` seconds (0.2) of steps timed, medians over the rounds.  Reported per contender: ms
per step, tokens per second (W1/W2: K2 * B new tokens a step; W3: (R + 1) * B tokens a window),
ratio to torch (of the medians: the targets' ratio), achieved GFLOP/s (the model's multiply-adds,
the same count for every contender) and its fraction of this machine's large-GEMM peak (measured
here with NumPy, 2048 x 2048); for the spread, every round's time and the median and quartiles of
the paired ratios (the contender's time over torch's in the same round).  Also the numba JIT
cost: the first call of the training path (bptt + step_losses + grad_norms, both dtypes) in a
fresh process with an empty numba cache (cold compile) and again with the cache filled (cached
first call).

Writes validation/results/bench.json, bench.md (the table) and bench.png.

    .venv/bin/python validation/bench.py            # the full protocol (~10 minutes)
    .venv/bin/python validation/bench.py --quick    # 3 rounds, W2 and PTB without NumPy
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import npbptt

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

WORKLOADS = {
    # name: (model kwargs, batch, K1, K2 or None for the probe)
    "W1": (dict(input_size=6, hidden_size=50, num_layers=2, output_size=8, vocab_size=8), 64, 30, 15),
    "W2": (dict(input_size=512, hidden_size=512, num_layers=1, output_size=10000, vocab_size=10000),
           32, 100, 50),
    "W3": (dict(input_size=6, hidden_size=50, num_layers=2, output_size=8, vocab_size=8), 64, 100, None),
    "PTB": (dict(input_size=900, hidden_size=900, num_layers=1, output_size=10000, vocab_size=10000,
                 tie_weights=True, dropout=0.2), 32, 200, 100),
}
PTB_TRAIN_TOKENS = 929_589           # PTB's training set (ptb.train.txt with <eos>): an epoch is
                                     # PTB_TRAIN_TOKENS / (B * K2) chunks of the PTB workload


# --- problems and FLOP counts ---------------------------------------------------------------------
def make_problem(name, dtype, seed):
    kw, B, K1, K2 = WORKLOADS[name]
    net = npbptt.LSTM(**kw, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 1)
    T = K1 + 1
    x = rng.integers(0, kw["vocab_size"], (T, B))
    y = rng.integers(0, kw["output_size"], (T, B))
    state = tuple(0.1 * rng.standard_normal((kw["num_layers"], B, kw["hidden_size"])).astype(dtype)
                  for _ in range(2))
    return net, x, y, state, K1, K2


def model_flops(name):
    """Multiply-adds x 2 of one step of the workload (the same for every contender): forward of
    every layer at every step (input and recurrent GEMMs), backward (input and weight gradients,
    twice the forward) over the K1 + 1 steps, and the read-out of the K2 losses; the probe
    backpropagates through the states only (no weight gradients)."""
    kw, B, K1, K2 = WORKLOADS[name]
    H, L, E, O = kw["hidden_size"], kw["num_layers"], kw["input_size"], kw["output_size"]
    T = K1 + 1
    ins = [E] + [H] * (L - 1)
    fwd = sum(2 * B * (i + H) * 4 * H for i in ins) * T
    if K2 is None:                       # probe: b_k W_hh per layer, and into the layer below
        bwd = sum(2 * B * 4 * H * H + (2 * B * 4 * H * i if l > 0 else 0)
                  for l, i in enumerate(ins)) * K1
        return fwd + bwd + 2 * B * H * O * 2
    return 3 * fwd + 3 * 2 * B * H * O * K2


def gemm_peak(dtype, n=2048, repeats=5):
    """Best GFLOP/s of an n x n NumPy matmul on this machine (all BLAS threads)."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    b = a.T.copy()
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


def _warm_up(f, seconds):
    """Run f untimed for about ``seconds`` (at least once) after an idle gap; returns the time of
    its last call.  The first calls after an idle period run slow on this machine (8 ms instead of
    5.5 for W1: clocks and caches ramp up over ~50-100 ms), which would otherwise weigh on short
    steps more than on long ones."""
    t_end = time.perf_counter() + seconds
    while True:
        t = _timed(f)
        if time.perf_counter() >= t_end:
            return t


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


# --- contenders ----------------------------------------------------------------------------------
def npbptt_contender(name, dtype, backend, seed):
    net, x, y, state, K1, K2 = make_problem(name, dtype, seed)
    if K2 is None:
        return lambda: npbptt.grad_norms(net, x, y, state, backend=backend)
    if net.dropout > 0:                  # fresh masks for the K2 new steps, as stream(rng=)
        rng = np.random.default_rng(seed + 2)
        held = net.dropout_masks(K1 + 1 - K2, x.shape[1], rng)
        return lambda: npbptt.bptt(net, x, y, state, K1, K2, backend=backend,
                                   masks=held.then(net.dropout_masks(K2, x.shape[1], rng)))
    return lambda: npbptt.bptt(net, x, y, state, K1, K2, backend=backend)


def torch_modules(net, dtype):
    import torch
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    kw = net.config()
    emb = torch.nn.Embedding(kw["vocab_size"], kw["input_size"]).to(tdt)
    lstm = torch.nn.LSTM(kw["input_size"], kw["hidden_size"], kw["num_layers"]).to(tdt)
    dec = torch.nn.Linear(kw["hidden_size"], kw["output_size"]).to(tdt)
    with torch.no_grad():                # the same parameters as npbptt's network
        emb.weight.copy_(torch.from_numpy(net.params["embedding.weight"]))
        for n, p in lstm.named_parameters():
            p.copy_(torch.from_numpy(net.params[n]))
        if net.tie_weights:              # the read-out's weight *is* the embedding's
            dec.weight = emb.weight
        else:
            dec.weight.copy_(torch.from_numpy(net.params["decoder.weight"]))
        dec.bias.copy_(torch.from_numpy(net.params["decoder.bias"]))
    return emb, lstm, dec


def torch_contender(name, dtype, seed, device="cpu"):
    """torch's step on ``device`` (validation/bench_gpu.py: "cuda", the step then ends with
    torch.cuda.synchronize())."""
    import torch
    net, x, y, state, K1, K2 = make_problem(name, dtype, seed)
    emb, lstm, dec = (m.to(device) for m in torch_modules(net, dtype))
    params = list({id(p): p for m in (emb, lstm, dec) for p in m.parameters()}.values())
    drop = torch.nn.Dropout(net.dropout) if net.dropout > 0 else (lambda a: a)   # training mode
    tx, ty = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    h0, c0 = (torch.from_numpy(s).to(device) for s in state)
    T, B = x.shape[:2]
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def train_step():
        for p in params:
            p.grad = None
        out, _ = lstm(drop(emb(tx)), (h0, c0))
        logits = dec(drop(out[T - K2:])).reshape(K2 * B, -1)
        loss = torch.nn.functional.cross_entropy(logits, ty[T - K2:].reshape(-1))
        loss.backward()
        sync()
        return loss

    def probe():
        e = emb(tx)
        h, c = h0, c0
        states = []
        for t in range(T):                # one step at a time to reach every S_t
            out, (h, c) = lstm(e[t:t + 1], (h, c))
            h.retain_grad()
            c.retain_grad()
            states.append((h, c))
        ell = torch.nn.functional.cross_entropy(dec(out[0]), ty[T - 1], reduction="sum")
        ell.backward()                    # per-example grads: the examples do not interact
        sq = torch.stack([(hh.grad ** 2).sum(dim=(0, 2)) + (cc.grad ** 2).sum(dim=(0, 2))
                          if hh.grad is not None else torch.zeros(B, dtype=hh.dtype, device=device)
                          for hh, cc in states])
        phi = torch.sqrt(sq.flip(0))      # phi[k] for S_{T-k}, k >= 1 (k = 0 reads `out`)
        sync()
        return phi

    return train_step if K2 is not None else probe


def jax_contender(name, dtype, seed):
    """JAX jit(lax.scan) of the same step, or None when JAX is not installed."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    if dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    net, x, y, state, K1, K2 = make_problem(name, dtype, seed)
    if net.tie_weights or net.dropout > 0:
        return None                       # written for the untied, dropout-free workloads
    L = net.num_layers
    p = {k: jnp.asarray(v) for k, v in net.params.items()}
    T = x.shape[0]

    def cell(pl, l, h, c, inp):
        a = inp @ pl[f"weight_ih_l{l}"].T + h @ pl[f"weight_hh_l{l}"].T + pl[f"bias_ih_l{l}"] + pl[f"bias_hh_l{l}"]
        i, f, g, o = jnp.split(a, 4, axis=1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c

    def run(pl, S, xs):
        def step(S, xt):
            h, c = S
            inp = pl["embedding.weight"][xt]
            hs, cs = [], []
            for l in range(L):
                hl, cl = cell(pl, l, h[l], c[l], inp)
                hs.append(hl)
                cs.append(cl)
                inp = hl
            S = (jnp.stack(hs), jnp.stack(cs))
            return S, S
        return jax.lax.scan(step, S, xs)

    def loss_fn(pl, S, xs, ys):
        _, (hs, _) = run(pl, S, xs)
        logits = hs[T - K2:, -1] @ pl["decoder.weight"].T + pl["decoder.bias"]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, ys[T - K2:, :, None], axis=-1)[..., 0]
        return jnp.mean(lse - picked)

    S0 = tuple(jnp.asarray(s) for s in state)
    xs, ys = jnp.asarray(x), jnp.asarray(y)
    if K2 is None:
        return None                       # the per-lag probe has no natural lax.scan form here
    g = jax.jit(jax.value_and_grad(loss_fn))
    return lambda: jax.block_until_ready(g(p, S0, xs, ys))


# --- agreement check (so that the timings compare the same computation) --------------------------
def check_agreement(seed):
    """torch and npbptt (numba) agree on W1's loss and gradient and W3's phi, float64."""
    import torch
    out = {}
    net, x, y, state, K1, K2 = make_problem("W1", np.float64, seed)
    res = npbptt.bptt(net, x, y, state, K1, K2, backend="numba")
    emb, lstm, dec = torch_modules(net, np.float64)
    T = x.shape[0]
    o, _ = lstm(emb(torch.from_numpy(x)), tuple(torch.from_numpy(s) for s in state))
    loss = torch.nn.functional.cross_entropy(dec(o[T - K2:]).reshape(-1, 8),
                                             torch.from_numpy(y[T - K2:]).reshape(-1))
    loss.backward()
    g = {**{f"embedding.{n}": p.grad for n, p in emb.named_parameters()},
         **dict((n, p.grad) for n, p in lstm.named_parameters()),
         **{f"decoder.{n}": p.grad for n, p in dec.named_parameters()}}
    out["W1 loss rel diff"] = abs(loss.item() - res.loss) / abs(res.loss)
    out["W1 grad max rel diff"] = max(float(np.abs(g[n].numpy() - v).max() / np.abs(v).max())
                                      for n, v in res.grads.items())
    net, x, y, state, _, _ = make_problem("W3", np.float64, seed)
    phi = npbptt.grad_norms(net, x, y, state, backend="numba")
    tphi = torch_contender("W3", np.float64, seed)().detach().numpy()
    out["W3 phi[1:] max rel diff"] = float(np.abs(tphi[1:] - phi[1:]).max() / np.abs(phi[1:]).max())
    return out


# --- JIT cost ---------------------------------------------------------------------------------------
_JIT_SNIPPET = """
import time
t0 = time.perf_counter()
import numpy as np, npbptt
from npbptt.kernels import cpu
t1 = time.perf_counter()
cpu.warmup((np.float64, np.float32))
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def jit_cost():
    """(cold, cached) seconds of the first call of the training path (bptt, step_losses and
    grad_norms, both dtypes; npbptt.kernels.cpu.warmup) in fresh processes, with an empty numba
    cache and then with the cache it filled; and the import time of npbptt."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        times = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", _JIT_SNIPPET], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            times.append((float(out[0]), float(out[1])))
    return {"import_s": times[1][0], "cold_first_call_s": times[0][1],
            "cached_first_call_s": times[1][1]}


# --- the Book Order chunk (issue 19) -----------------------------------------------------------
# RMTPPLSTM (npbptt.point_process): mark embedding 128 beside [gap, t], 2-layer LSTM 128, read-out
# [mark logits, u, w], the RMTPP loss; batch 64, BPTT(12, 6) (K = 6: BPTT(2K, K) as the trainer)
BOOK = dict(n_marks=2, embed_size=128, hidden_size=128, num_layers=2, batch=64, K1=12, K2=6)
WORKLOADS["BOOK"] = (dict(input_size=BOOK["embed_size"] + 2, hidden_size=BOOK["hidden_size"],
                          num_layers=BOOK["num_layers"], output_size=BOOK["n_marks"] + 1,
                          vocab_size=BOOK["n_marks"]), BOOK["batch"], BOOK["K1"], BOOK["K2"])


def book_problem(dtype, seed):
    """The Book Order network and one chunk of K1 + 1 steps: marks in {0, 1}, exponential gaps
    of mean 0.015 (the data files' mean gap), the times their running sum."""
    from npbptt.point_process import RMTPPLSTM
    b = BOOK
    net = RMTPPLSTM(b["n_marks"], b["embed_size"], b["hidden_size"], b["num_layers"], dtype=dtype,
                    seed=seed)
    rng = np.random.default_rng(seed + 1)
    T, B = b["K1"] + 2, b["batch"]
    marks = rng.integers(0, b["n_marks"], (T, B)).astype(np.float64)
    gaps = rng.exponential(0.015, (T, B))
    times = np.cumsum(gaps, axis=0)
    x = np.stack([marks[:-1], gaps[:-1], times[:-1]], axis=2)      # [y_j, t_j - t_(j-1), t_j]
    y = np.stack([marks[1:], gaps[1:]], axis=2)                    # [y_(j+1), t_(j+1) - t_j]
    state = tuple(0.1 * rng.standard_normal((b["num_layers"], B, b["hidden_size"])).astype(dtype)
                  for _ in range(2))
    return net, x, y, state


def book_contenders(dtype, seed):
    """{contender: step} of the Book Order chunk: npbptt on "numba" and "numpy" (resolve decides
    what "numba" runs for this network) and torch nn.LSTM with the same parameters and loss."""
    import torch
    b = BOOK
    net, x, y, state = book_problem(dtype, seed)
    K1, K2, M = b["K1"], b["K2"], b["n_marks"]
    out = {f"npbptt-{be}": (lambda be=be: npbptt.bptt(net, x, y, state, K1, K2, loss="rmtpp",
                                                       backend=be)) for be in ("numba", "numpy")}
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    emb = torch.nn.Embedding(M, b["embed_size"]).to(tdt)
    lstm = torch.nn.LSTM(b["embed_size"] + 2, b["hidden_size"], b["num_layers"]).to(tdt)
    dec = torch.nn.Linear(b["hidden_size"], M + 1).to(tdt)
    w = torch.nn.Parameter(torch.from_numpy(net.params["decoder.w"].copy()))
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(net.params["embedding.weight"]))
        for n, p in lstm.named_parameters():
            p.copy_(torch.from_numpy(net.params[n]))
        dec.weight.copy_(torch.from_numpy(net.params["decoder.weight"]))
        dec.bias.copy_(torch.from_numpy(net.params["decoder.bias"]))
    params = [*emb.parameters(), *lstm.parameters(), *dec.parameters(), w]
    xd = torch.from_numpy(x.astype(dtype))
    mk = torch.from_numpy(x[..., 0].astype(np.int64))
    ym, dt = torch.from_numpy(y[K1 + 1 - K2:, :, 0].astype(np.int64)), torch.from_numpy(y[K1 + 1 - K2:, :, 1].astype(dtype))
    h0, c0 = (torch.from_numpy(s) for s in state)

    def torch_step():
        for p in params:
            p.grad = None
        o, _ = lstm(torch.cat([emb(mk), xd[..., 1:]], dim=2), (h0, c0))
        r = dec(o[K1 + 1 - K2:])
        u = r[..., M]
        ce = torch.nn.functional.cross_entropy(r[..., :M].reshape(-1, M), ym.reshape(-1), reduction="none")
        nll = -u - w * dt + (torch.exp(u + w * dt) - torch.exp(u)) / w     # Du et al., Eq. 12
        loss = (ce.reshape(K2, -1) + nll).mean()
        loss.backward()
        return loss

    out["torch"] = torch_step
    return out, (net, x, y, state, params)


def book_agreement(seed):
    """torch vs npbptt on the Book Order chunk, float64: the loss and the largest gradient
    difference relative to the gradient's largest entry; and what "numba" runs for it."""
    from npbptt.backends import resolve
    cs, (net, x, y, state, params) = book_contenders(np.float64, seed)
    loss = cs["torch"]()
    res = npbptt.bptt(net, x, y, state, BOOK["K1"], BOOK["K2"], loss="rmtpp", backend="numba")
    names = (["embedding.weight"] + [n for n in net.params if n.startswith(("weight_", "bias_"))]
             + ["decoder.weight", "decoder.bias", "decoder.w"])
    diff = max(float(np.abs(p.grad.numpy() - res.grads[n]).max() / np.abs(res.grads[n]).max())
               for n, p in zip(names, params))
    fn = resolve("bptt", "numba", net)
    return {"BOOK loss rel diff": abs(loss.item() - res.loss) / abs(res.loss),
            "BOOK grad max rel diff": diff}, f"{fn.__module__}.{fn.__name__}"


# --- the protocol -------------------------------------------------------------------------------
def run(args):
    import torch
    torch.set_num_threads(2)
    contenders_for = {}
    for name in args.workloads:
        for dt in args.dtypes:
            dtype = np.dtype(dt).type
            if name == "BOOK":                   # its own network and loss (book_contenders)
                contenders_for[(name, dt)] = book_contenders(dtype, args.seed)[0]
                continue
            cs = {"npbptt-numba": npbptt_contender(name, dtype, "numba", args.seed),
                  "torch": torch_contender(name, dtype, args.seed)}
            if not (args.quick and name in ("W2", "PTB")):
                cs["npbptt-numpy"] = npbptt_contender(name, dtype, "numpy", args.seed)
            j = jax_contender(name, dtype, args.seed)
            if j is not None:
                cs["jax"] = j
            contenders_for[(name, dt)] = cs
    for cs in contenders_for.values():           # compile / warm up everything once
        for f in cs.values():
            f()
    times = time_rounds(contenders_for, args, tqdm(range(args.rounds), desc="rounds"))
    peaks = {dt: gemm_peak(np.dtype(dt).type) for dt in args.dtypes}
    return summary_rows(times, peaks, "torch"), peaks


def time_rounds(contenders_for, args, rounds):
    """{(workload, dtype): {contender: [seconds a step, one per round]}}: in each of ``rounds``
    every contender in rotating order, after an idle gap and ``args.warmup`` untimed seconds,
    its steps repeated for ``args.min_time`` seconds."""
    times = {key: {c: [] for c in cs} for key, cs in contenders_for.items()}
    for r in rounds:
        for key, cs in contenders_for.items():
            names = list(cs)
            names = names[r % len(names):] + names[:r % len(names)]   # rotating order
            for c in names:
                time.sleep(args.gap)             # idle gap: let spinning threads park
                f = cs[c]
                t = _warm_up(f, args.warmup)
                reps = max(1, int(args.min_time / max(t, 1e-9)))
                if reps > 1:                     # short steps: average several in this round
                    t = _timed(lambda: [f() for _ in range(reps)]) / reps
                times[key][c].append(t)
    return times


def summary_rows(times, peaks, baseline):
    """One row per (workload, dtype, contender): medians, tokens/s, the ratio to ``baseline``'s
    median (the targets' ratio), GFLOP/s and its fraction of ``peaks[dtype]``; and, to show how
    much of a run's ratio is noise, every round's time and the median and quartiles of the
    paired ratios, the contender's time over the baseline's in the same round."""
    rows = []
    for (name, dt), per in times.items():
        kw, B, K1, K2 = WORKLOADS[name]
        tokens = (K2 if K2 is not None else K1 + 1) * B
        t_base = float(np.median(per[baseline]))
        for c, ts in per.items():
            t = float(np.median(ts))
            gf = model_flops(name) / t / 1e9
            paired = np.asarray(ts) / np.asarray(per[baseline])
            rows.append(dict(workload=name, dtype=dt, contender=c, ms_per_step=1e3 * t,
                             ms_iqr=[1e3 * float(np.quantile(ts, 0.25)), 1e3 * float(np.quantile(ts, 0.75))],
                             tokens_per_s=tokens / t, ratio_to_torch=t / t_base,
                             gflops=gf, fraction_of_peak=gf / peaks[dt], rounds=len(ts),
                             ms_rounds=[1e3 * float(v) for v in ts],
                             paired_ratio=float(np.median(paired)),
                             paired_ratio_iqr=[float(np.quantile(paired, q)) for q in (0.25, 0.75)]))
    return rows


TARGETS = {("W1", "float64"): 0.25, ("W1", "float32"): 0.5, ("W2", "float64"): 1.0,
           ("W2", "float32"): 1.0, ("W3", "float64"): 0.15, ("PTB", "float32"): 1.0}


def table(rows):
    lines = ["| workload | dtype | contender | ms/step | tokens/s | x torch | target | GFLOP/s | % of GEMM peak |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tgt = TARGETS.get((r["workload"], r["dtype"])) if r["contender"] == "npbptt-numba" else None
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['contender']} | {r['ms_per_step']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['ratio_to_torch']:.3f} | "
                     f"{'' if tgt is None else ('<= %.2f %s' % (tgt, 'met' if r['ratio_to_torch'] <= tgt else 'MISSED'))} | "
                     f"{r['gflops']:.1f} | {100 * r['fraction_of_peak']:.1f} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["workload"], r["dtype"]) for r in rows})
    conts = sorted({r["contender"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / len(conts)
    for i, c in enumerate(conts):
        vals = [next((r["ms_per_step"] for r in rows if (r["workload"], r["dtype"]) == k
                      and r["contender"] == c), np.nan) for k in keys]
        ax.bar(np.arange(len(keys)) + i * w, vals, w, label=c)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - w / 2)
    ax.set_xticklabels([f"{k[0]}\n{k[1]}" for k in keys])
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (median)")
    ax.set_title("npbptt vs torch nn.LSTM (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ptb_chunks():
    """Chunks of the PTB workload in one epoch of PTB's training set."""
    _, B, _, K2 = WORKLOADS["PTB"]
    return PTB_TRAIN_TOKENS / (B * K2)


def split_lists(args):
    """args.workloads and args.dtypes, comma-separated strings, as checked lists."""
    args.workloads = args.workloads.split(",")
    args.dtypes = args.dtypes.split(",")
    for w in args.workloads:
        if w not in WORKLOADS:
            raise ValueError(f"--workloads must be among {sorted(WORKLOADS)}, got {w!r}")
    for d in args.dtypes:
        if d not in ("float64", "float32"):
            raise ValueError(f"--dtypes must be float64 and/or float32, got {d!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, short gaps, W2 and PTB without NumPy")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 15; 3 with --quick)")
    ap.add_argument("--gap", type=float, default=None, help="idle seconds before each timing")
    ap.add_argument("--warmup", type=float, default=0.1,
                    help="untimed seconds of a contender's steps after the idle gap, before timing")
    ap.add_argument("--min-time", type=float, default=0.2,
                    help="a contender's step is repeated within a round up to this many seconds")
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-jit-cost", action="store_true", help="skip the compile-time measurement")
    ap.add_argument("--out", default=str(RESULTS), help="directory for bench.json/.md/.png")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 15)
    args.gap = args.gap if args.gap is not None else (0.1 if args.quick else 0.5)
    split_lists(args)

    import numba
    import torch
    info = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "numba_threads": numba.get_num_threads(), "torch": torch.__version__,
            "numpy": np.__version__, "numba": numba.__version__, "rounds": args.rounds,
            "gap_s": args.gap, "warmup_s": args.warmup, "min_time_s": args.min_time,
            "load_avg_before": os.getloadavg()}
    jit = None if args.no_jit_cost else jit_cost()
    agree = check_agreement(args.seed)
    book_runs = None
    if "BOOK" in args.workloads:
        book_agree, book_runs = book_agreement(args.seed)
        agree.update(book_agree)
    rows, peaks = run(args)
    info["load_avg_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"info": info, "gemm_peak_gflops": peaks, "jit": jit, "agreement_float64": agree,
              "rows": rows}
    (out / "bench.json").write_text(json.dumps(result, indent=1))
    text = table(rows)
    notes = ["GEMM peak (NumPy 2048x2048): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items())]
    if jit:
        notes.append(f"numba JIT, first call of the training path (both dtypes): cold compile "
                     f"{jit['cold_first_call_s']:.1f} s, cached {jit['cached_first_call_s']:.2f} s "
                     f"(import npbptt {jit['import_s']:.2f} s)")
    notes.append("npbptt-numba's time over torch's in the same round, median [quartiles] over the rounds: "
                 + ", ".join(f"{r['workload']} {r['dtype']} {r['paired_ratio']:.3f} "
                             f"[{r['paired_ratio_iqr'][0]:.3f}, {r['paired_ratio_iqr'][1]:.3f}]"
                             for r in rows if r["contender"] == "npbptt-numba"))
    notes += [f"PTB epoch ({PTB_TRAIN_TOKENS:,} tokens = {ptb_chunks():.1f} chunks of "
              f"{WORKLOADS['PTB'][1]} x {WORKLOADS['PTB'][3]}) at the median step, {r['dtype']}, "
              f"{r['contender']}: {ptb_chunks() * r['ms_per_step'] / 1e3 / 60:.1f} min (the steps "
              "alone; stream's forward advance over the K1 + 1 - K steps before each window and the "
              "SGD update not counted)" for r in rows if r["workload"] == "PTB"]
    if book_runs is not None:
        notes.append(f"BOOK: npbptt's \"numba\" backend runs {book_runs} for RMTPPLSTM "
                     "(npbptt.backends.resolve: the kernels do not compute its mixed input and "
                     "two read-outs), so npbptt-numba and npbptt-numpy time the same code")
    notes.append("torch vs npbptt (float64): " + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))
    notes.append(f"load average before/after: {info['load_avg_before']} / {info['load_avg_after']}")
    md = text + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / "bench.md").write_text(md)
    plot(rows, out / "bench.png")
    print(md)
    return result


if __name__ == "__main__":
    main()
