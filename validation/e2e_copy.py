"""End to end: one epoch of copy-task training, SGD included, three ways in one process (issue 18,
Speed): npbptt's trainer, the authors' training loop, and a plain torch detach loop.  Not a test.

Data: the authors' own fixed-m copy file (``$NPBPTT_DATA/copy_authors/copy_fixed.npz``: 64
streams of 4,000 steps, 6 symbols), one epoch = 256,000 tokens.  Model: a 2-layer LSTM of 50
units with a linear read-out, trained at a fixed K (default 15, the paper's K0) with the
authors' settings: SGD, step gamma * sqrt(K) with gamma = 1, weight decay 1e-5, gradient
clipping 1.0.  Contenders:

    npbptt        ``npbptt.train.train_epoch`` (Algorithm 1 at fixed K: ``stream`` BPTT(2K, K)
                  chunks, each with its forward advance, ``sgd_step``), backend "numba";
                  embedding 6 -> LSTM(6, 50, 2) -> Linear(50, 6)
    authors       the loop of the authors' code (tbptt/tbptt.py ``TBPTT_minibatch_helper``, style
                  "original-buffer", as scripts/copy_fixed-lstm.sh runs it; re-written here):
                  segments of 500 // K * K steps, each cut into windows of the K - 1 steps before
                  and the K steps of a chunk (the first window of a segment without the K - 1),
                  run forward as two calls of the model, the per-step cross-entropies of the K
                  steps summed by a Python loop and divided by K, backward through the window,
                  ``clip_grad_norm_`` at 1/K, ``torch.optim.SGD`` (lr sqrt(K), weight decay);
                  their model: one-hot -> Linear(6, 50) -> Dropout(0) -> LSTM(50, 50, 2) ->
                  Dropout(0) -> Linear(50, 6)
    torch-detach  the textbook loop: chunks of K steps, the state detached between them,
                  BPTT(K - 1, K) (a third of the others' backpropagated steps), one
                  cross-entropy over the chunk, ``clip_grad_norm_`` 1.0, SGD; npbptt's model

Protocol: one thread everywhere (``NUMBA_NUM_THREADS``, ``OMP``/``MKL``/``OPENBLAS`` threads and
``torch.set_num_threads(1)``, set before the imports), one untimed epoch of each (numba
compiles, torch warms up), then ``--rounds`` rounds, the contenders in a rotating order, an
epoch each from the same initial parameters; medians.  Reported: seconds per epoch, tokens per
second (per core: one thread) and the ratio to the authors' loop.  Target (issue 18): npbptt at
least 2x the authors' tokens/s in float32.

    python validation/e2e_copy.py                      # float32, K = 15, 3 rounds
    python validation/e2e_copy.py --dtype float64 --K 30 --rounds 5
"""
import os

for _v in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"                 # one thread, before numpy / numba / torch load

import argparse                          # noqa: E402
import json                              # noqa: E402
import math                              # noqa: E402
import platform                          # noqa: E402
import time                              # noqa: E402
from pathlib import Path                 # noqa: E402

import numpy as np                       # noqa: E402

import npbptt                            # noqa: E402
from npbptt.config import TrainConfig    # noqa: E402
from npbptt.data import load_copy_authors  # noqa: E402
from npbptt.runfiles import RunState     # noqa: E402
from npbptt.train import train_epoch     # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
HIDDEN, LAYERS, LR, WEIGHT_DECAY, CLIP = 50, 2, 1.0, 1e-5, 1.0
SEGMENT = 500                            # the authors' TP_SEQ_LEN: steps per call of their train()


def npbptt_epoch(net, x, y, K):
    """One epoch of npbptt's trainer at fixed K on ``net`` (updated in place)."""
    cfg = TrainConfig(K=K, lr=LR, weight_decay=WEIGHT_DECAY, clip=CLIP, backend="numba")
    loss_sum, _, _ = train_epoch(net, x, y, cfg, RunState.fresh(net, cfg), 1)
    return loss_sum / x.shape[0]


def torch_models(V, dtype, seed):
    import torch
    torch.manual_seed(seed)
    tdt = torch.float64 if dtype == np.float64 else torch.float32

    class AuthorsModel(torch.nn.Module):        # experiments/synth_model.py's RNNModel, LSTM
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.0)
            self.encoder = torch.nn.Linear(V, HIDDEN)
            self.rnn = torch.nn.LSTM(HIDDEN, HIDDEN, LAYERS, dropout=0.0)
            self.decoder = torch.nn.Linear(HIDDEN, V)

        def forward(self, inp, hidden):
            out, hidden = self.rnn(self.drop(self.encoder(inp)), hidden)
            out = self.drop(out)
            dec = self.decoder(out.view(out.size(0) * out.size(1), out.size(2)))
            return dec.view(out.size(0), out.size(1), dec.size(1)), hidden

    class DetachModel(torch.nn.Module):         # npbptt's architecture
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(V, V)
            self.rnn = torch.nn.LSTM(V, HIDDEN, LAYERS)
            self.decoder = torch.nn.Linear(HIDDEN, V)

        def forward(self, tokens, hidden):
            out, hidden = self.rnn(self.emb(tokens), hidden)
            return self.decoder(out), hidden

    return AuthorsModel().to(tdt), DetachModel().to(tdt)


def authors_epoch(model, X, Y, K, B):
    """One epoch of the authors' loop (see the module docstring): X (T, B, V) one-hot floats,
    Y (T, B) int64 tensors."""
    import torch
    opt = torch.optim.SGD(model.parameters(), lr=LR * math.sqrt(K), weight_decay=WEIGHT_DECAY)
    ce = torch.nn.CrossEntropyLoss()
    dt = next(model.parameters()).dtype
    state = (torch.zeros(LAYERS, B, HIDDEN, dtype=dt), torch.zeros(LAYERS, B, HIDDEN, dtype=dt))
    model.train()
    T, total, at = X.shape[0], 0.0, 0
    seg = SEGMENT // K * K
    while at < T:
        Xs, Ys = X[at:at + seg], Y[at:at + seg]
        at += seg
        for i in range(Xs.shape[0] // K):
            start, end = max(i * K - (K - 1), 0), i * K + K
            burnin = end - start - K
            xb, yb = Xs[start:end], Ys[start:end]
            state = tuple(s.detach() for s in state)
            if burnin > 0:                       # the K steps, then the K - 1 after them
                first, out_state = model(xb[:-burnin], state)
                second, _ = model(xb[-burnin:], out_state)
                yhat = torch.cat((first, second), dim=0)
            else:
                yhat, out_state = model(xb, state)
            loss = torch.zeros(1, dtype=dt)
            for yh, yt in zip(yhat[burnin:], yb[burnin:]):
                loss += ce(yh, yt)
            total += loss.item()
            loss = loss / yhat[burnin:].size(0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP / K)
            opt.step()
            opt.zero_grad()
            state = out_state
    return total / T


def detach_epoch(model, x, y, K, B):
    """One epoch of the plain detach loop: x, y (T, B) int64 tensors."""
    import torch
    opt = torch.optim.SGD(model.parameters(), lr=LR * math.sqrt(K), weight_decay=WEIGHT_DECAY)
    dt = next(model.parameters()).dtype
    state = (torch.zeros(LAYERS, B, HIDDEN, dtype=dt), torch.zeros(LAYERS, B, HIDDEN, dtype=dt))
    total = 0.0
    for a in range(0, x.shape[0], K):
        state = tuple(s.detach() for s in state)
        out, state = model(x[a:a + K], state)
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y[a:a + K].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        total += loss.item() * min(K, x.shape[0] - a)
    return total / x.shape[0]


def contenders(args):
    """{name: epoch()}: each call trains one epoch from the same initial parameters."""
    import torch
    torch.set_num_threads(1)
    dtype = np.dtype(args.dtype).type
    data = load_copy_authors(args.data_dir, "fixed")
    x, y = data.train
    if args.steps is not None:                   # a shorter epoch (the smoke test)
        x, y = x[:args.steps], y[:args.steps]
    T, B = x.shape
    V = data.vocab_size
    net0 = npbptt.LSTM(V, HIDDEN, LAYERS, data.n_outputs, vocab_size=V, dtype=dtype, seed=args.seed)
    authors0, detach0 = torch_models(V, dtype, args.seed)
    tdt = next(authors0.parameters()).dtype
    X1 = torch.nn.functional.one_hot(torch.from_numpy(x), V).to(tdt)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    init_a = {k: v.clone() for k, v in authors0.state_dict().items()}
    init_d = {k: v.clone() for k, v in detach0.state_dict().items()}

    def run_npbptt():
        return npbptt_epoch(net0.copy(), x, y, args.K)

    def run_authors():
        authors0.load_state_dict(init_a)
        return authors_epoch(authors0, X1, ty, args.K, B)

    def run_detach():
        detach0.load_state_dict(init_d)
        return detach_epoch(detach0, tx, ty, args.K, B)

    return {"npbptt": run_npbptt, "authors": run_authors, "torch-detach": run_detach}, T * B


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--K", type=int, default=15, help="fixed truncation (default 15, the paper's K0)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap", type=float, default=0.5, help="idle seconds before each epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="train on the first STEPS steps of each stream only (default: all 4,000)")
    ap.add_argument("--data-dir", default=os.environ.get("NPBPTT_DATA"),
                    help="the data directory (default: $NPBPTT_DATA)")
    ap.add_argument("--out", default=str(RESULTS), help="directory for e2e_copy_<dtype>.json/.md")
    args = ap.parse_args(argv)
    if args.K < 1 or args.rounds < 1 or (args.steps is not None and args.steps < args.K):
        raise ValueError(f"--K and --rounds must be >= 1 and --steps >= K, got {args.K}, "
                         f"{args.rounds}, {args.steps}")
    if not args.data_dir:
        raise ValueError("--data-dir: no data directory (set NPBPTT_DATA or pass --data-dir)")
    fns, tokens = contenders(args)
    load_before = os.getloadavg()
    warm = {c: f() for c, f in fns.items()}       # compile / warm up; the epoch's mean loss
    times = {c: [] for c in fns}
    names = list(fns)
    for r in range(args.rounds):
        for c in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(args.gap)
            t = time.perf_counter()
            fns[c]()
            times[c].append(time.perf_counter() - t)
    t_auth = float(np.median(times["authors"]))
    rows = [dict(contender=c, s_per_epoch=float(np.median(ts)), s_rounds=ts,
                 tokens_per_s=tokens / float(np.median(ts)),
                 x_authors_tokens_per_s=t_auth / float(np.median(ts)),
                 first_epoch_mean_loss=float(warm[c])) for c, ts in times.items()]
    info = dict(dtype=args.dtype, K=args.K, rounds=args.rounds, tokens_per_epoch=tokens, threads=1,
                machine=platform.machine(), cpus=os.cpu_count(), load_avg_before=load_before,
                load_avg_after=os.getloadavg())
    lines = [f"Copy task, one epoch ({tokens:,} tokens), {args.dtype}, K = {args.K}, one thread, "
             f"median of {args.rounds} rounds", "",
             "| contender | s/epoch | tokens/s | x authors' tokens/s |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['contender']} | {r['s_per_epoch']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['x_authors_tokens_per_s']:.2f} |")
    npb = next(r for r in rows if r["contender"] == "npbptt")["x_authors_tokens_per_s"]
    lines += ["", f"- target (issue 18, float32): npbptt >= 2x the authors' tokens/s: "
              f"{'met' if npb >= 2 else 'MISSED'} ({npb:.2f}x)" if args.dtype == "float32" else
              f"- npbptt / authors' tokens/s: {npb:.2f}x",
              "- every round (s): " + "; ".join(f"{c} " + ", ".join(f"{t:.2f}" for t in ts)
                                               for c, ts in times.items()),
              f"- load average before/after: {info['load_avg_before']} / {info['load_avg_after']}"]
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e_copy_{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(dict(info=info, rows=rows), indent=1))
    (out / f"{stem}.md").write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
