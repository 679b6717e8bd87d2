"""GPU benchmark of npbptt's CUDA kernels (``backend="cuda"``) against PyTorch on the same GPU
(issue 3): not a test.  The workloads W1-W3 and their FLOP counts are those of
``validation/bench.py``:

    W1  copy-task training step: 2-layer LSTM, hidden 50, embedding 6, vocab 8, batch 64, BPTT(30, 15)
    W2  language-model training step: 1-layer LSTM 512, embedding 512, vocab 10,000, batch 32,
        BPTT(100, 50)
    W3  probe: BPTT(100, 1) per-example state-gradient norms phi (Eq. 18) on W1's model

Contenders, all in one process: npbptt ``backend="cuda"`` (host arrays in, host arrays out: the
parameters are copied to the GPU and the gradients back on every call, and that is in its time),
torch ``nn.LSTM`` on the GPU (cuDNN; parameters, data and gradients stay on the GPU; the step ends
with ``torch.cuda.synchronize()``), and JAX ``jit(lax.scan)`` on the GPU when JAX finds one.
Float32 is float32 everywhere: TF32 is switched off for torch's matmuls and cuDNN and JAX's
default matmul precision is "highest" (left on, cuDNN's float32 LSTM would round its inputs to
10-bit mantissas).

Protocol as in bench.py: ``--rounds`` rounds in rotating order, an idle gap, ``--warmup`` seconds
of untimed steps, then ``--min-time`` seconds timed; medians.  Also: each contender's first call
(for npbptt-cuda, the numba.cuda JIT compile of its kernels), the GPU's matmul rate (torch, 8192^2,
float64 and float32 without TF32) as the peak, and the agreement of the cuda backend with the NumPy
reference (float64: W1 loss and gradients, W2 loss and gradients, W3 phi) and with torch (W1).

    python validation/bench_gpu.py --out DIR        # writes DIR/bench_gpu.{json,md}
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (_timed, jax_contender, make_problem, split_lists, summary_rows,  # noqa: E402
                   time_rounds, torch_contender)

import npbptt  # noqa: E402

HERE = Path(__file__).resolve().parent
DEVICE = "cuda"                          # torch's device (a dry run of this script elsewhere: "cpu")


def torch_gpu_contender(name, dtype, seed):
    return torch_contender(name, dtype, seed, device=DEVICE)


def npbptt_cuda_contender(name, dtype, seed):
    net, x, y, state, K1, K2 = make_problem(name, dtype, seed)
    if K2 is None:
        return lambda: npbptt.grad_norms(net, x, y, state, backend="cuda")
    return lambda: npbptt.bptt(net, x, y, state, K1, K2, backend="cuda")


def gpu_peak(torch, dtype, n=8192, repeats=5):
    a = torch.randn(n, n, dtype=dtype, device=DEVICE)
    b = torch.randn(n, n, dtype=dtype, device=DEVICE)
    a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def agreement(seed):
    """float64: the cuda backend against the NumPy reference (max abs difference over max abs) and
    against torch on the GPU (W1)."""
    out = {}
    for name in ("W1", "W2"):
        net, x, y, state, K1, K2 = make_problem(name, np.float64, seed)
        ref = npbptt.bptt(net, x, y, state, K1, K2, backend="numpy")
        got = npbptt.bptt(net, x, y, state, K1, K2, backend="cuda")
        out[f"{name} loss vs numpy"] = abs(got.loss - ref.loss) / abs(ref.loss)
        out[f"{name} grads vs numpy"] = max(float(np.abs(got.grads[n] - v).max() / np.abs(v).max())
                                            for n, v in ref.grads.items())
        if name == "W1":
            step = torch_gpu_contender(name, np.float64, seed)
            loss = step()
            out["W1 loss vs torch"] = abs(loss.item() - got.loss) / abs(got.loss)
    net, x, y, state, _, _ = make_problem("W3", np.float64, seed)
    ref = npbptt.grad_norms(net, x, y, state, backend="numpy")
    got = npbptt.grad_norms(net, x, y, state, backend="cuda")
    out["W3 phi vs numpy"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    tphi = torch_gpu_contender("W3", np.float64, seed)().cpu().numpy()
    out["W3 phi[1:] vs torch"] = float(np.abs(tphi[1:] - got[1:]).max() / np.abs(got[1:]).max())
    return out


def run(args):
    import torch
    contenders_for, first_call = {}, {}
    for name in args.workloads:
        for dt in args.dtypes:
            dtype = np.dtype(dt).type
            cs = {"npbptt-cuda": npbptt_cuda_contender(name, dtype, args.seed),
                  "torch-cuda": torch_gpu_contender(name, dtype, args.seed)}
            j = None if args.no_jax else jax_contender(name, dtype, args.seed)
            if j is not None:
                cs["jax-gpu"] = j
            contenders_for[(name, dt)] = cs
    for key, cs in contenders_for.items():       # first calls: compile / warm up everything once
        for c, f in cs.items():
            first_call[f"{key[0]} {key[1]} {c}"] = _timed(f)
    times = time_rounds(contenders_for, args, _rounds_printed(args.rounds))
    peaks = {dt: gpu_peak(torch, getattr(torch, dt)) for dt in args.dtypes}
    return summary_rows(times, peaks, "torch-cuda"), peaks, first_call


def _rounds_printed(n):
    for r in range(n):
        yield r
        print(f"round {r + 1}/{n}", flush=True)


def table(rows):
    lines = ["| workload | dtype | contender | ms/step | tokens/s | x torch | GFLOP/s | % of GPU matmul peak |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['contender']} | {r['ms_per_step']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['ratio_to_torch']:.3f} | {r['gflops']:.1f} | "
                     f"{100 * r['fraction_of_peak']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--gap", type=float, default=0.05, help="idle seconds before each timing")
    ap.add_argument("--warmup", type=float, default=0.1)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--workloads", default="W1,W2,W3")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    split_lists(args)
    import numba
    import torch
    from npbptt.kernels import gpu
    if not torch.cuda.is_available() or not gpu.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU visible to both torch and numba.cuda")
    torch.backends.cuda.matmul.allow_tf32 = False   # float32 means float32 (see the docstring)
    torch.backends.cudnn.allow_tf32 = False
    if not args.no_jax:
        try:
            import jax
            jax.config.update("jax_default_matmul_precision", "highest")
        except ImportError:
            pass
    from numba import cuda
    info = {"gpu": torch.cuda.get_device_name(0), "cc": list(torch.cuda.get_device_capability(0)),
            "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "numpy": np.__version__,
            "numba": numba.__version__, "numba_cuda": getattr(cuda, "implementation", "?"),
            "rounds": args.rounds, "gap_s": args.gap, "warmup_s": args.warmup,
            "min_time_s": args.min_time}
    try:
        import jax
        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:
        pass
    rows, peaks, first_call = run(args)          # first calls (the JIT compile) come first
    agree = agreement(args.seed)
    print("agreement (float64):", agree, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"info": info, "gpu_matmul_peak_gflops": peaks, "first_call_s": first_call,
              "agreement_float64": agree, "rows": rows}
    (out / "bench_gpu.json").write_text(json.dumps(result, indent=1))
    notes = [f"GPU: {info['gpu']}; torch {info['torch']} (cuDNN {info['cudnn']}), numba {info['numba']}"
             f" ({info['numba_cuda']} numba.cuda), NumPy {info['numpy']}; TF32 off",
             "GPU matmul peak (torch, 8192^2): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()),
             "first call (s; npbptt-cuda: JIT compile included): "
             + ", ".join(f"{k} {v:.2f}" for k, v in first_call.items()),
             "cuda backend vs reference / torch (float64): "
             + ", ".join(f"{k} {v:.1e}" for k, v in agree.items())]
    md = table(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / "bench_gpu.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
