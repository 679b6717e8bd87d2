"""Where a small CUDA step's time goes (issue 3; a diagnostic, not a test): the host-side costs
that bound W1-sized problems on a GPU -- one kernel launch, one small host-to-device and
device-to-host copy -- and a cProfile of W1's ``bptt(backend="cuda")``, top functions by own time.

    python validation/profile_gpu.py [--out DIR]
"""
import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_problem  # noqa: E402

import npbptt  # noqa: E402


def per_call_us(f, n=300):
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return 1e6 * (time.perf_counter() - t) / n


def kernel_times(gpu, name, dtype=np.float32):
    """GPU time per kernel (each launch synchronised and timed) in one bptt call of workload
    ``name``, against the call's total (the rest: host-side work and copies)."""
    from numba import cuda
    net, x, y, state, K1, K2 = make_problem(name, dtype, 0)
    call = lambda: npbptt.bptt(net, x, y, state, K1, K2, backend="cuda")   # noqa: E731
    call()
    t = time.perf_counter()
    call()
    total = time.perf_counter() - t
    real, spent = gpu._k, {}

    class Timed:
        def __init__(self, kernels):
            self.kernels = kernels

        def __getitem__(self, kname):
            kernel = self.kernels[kname]

            class Launch:
                def __getitem__(self, config):
                    def run(*args):
                        cuda.synchronize()
                        t0 = time.perf_counter()
                        kernel[config](*args)
                        cuda.synchronize()
                        n, s = spent.get(kname, (0, 0.0))
                        spent[kname] = (n + 1, s + time.perf_counter() - t0)
                    return run
            return Launch()

    gpu._k = lambda dt: Timed(real(dt))
    try:
        call()
    finally:
        gpu._k = real
    out = [f"{name} {np.dtype(dtype).name} bptt: {1e3 * total:.2f} ms a call; kernels, each launch "
           f"synchronised (launch overhead included):"]
    for kname, (n, s) in sorted(spent.items(), key=lambda kv: -kv[1][1]):
        out.append(f"  {kname:18s} {n:4d} launches {1e3 * s:9.2f} ms")
    out.append(f"  {'all kernels':18s} {sum(n for n, _ in spent.values()):4d} launches "
               f"{1e3 * sum(s for _, s in spent.values()):9.2f} ms")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write profile_gpu.txt here")
    args = ap.parse_args(argv)
    from numba import cuda

    from npbptt.kernels import _cuda_jit, gpu
    lines = []
    k = _cuda_jit.KERNELS["float32"]
    one = cuda.device_array(1, np.float32)
    small = np.ones(64, np.float32)
    d_small = cuda.to_device(small)
    H, B, T = 50, 64, 31
    D, Hs, Cs, TC = (cuda.device_array(s, np.float32) for s in
                     ((T, B, 4 * H), (T + 1, B, H), (T + 1, B, H), (T, B, H)))
    WhhT = cuda.device_array((H, 4 * H), np.float32)
    h0 = cuda.to_device(np.zeros((B, H), np.float32))
    D1, Hs2, Cs2, TC1 = D[:1], Hs[:2], Cs[:2], TC[:1]
    for a in (D, Hs, Cs, TC, WhhT):
        a.copy_to_device(np.zeros(a.shape, np.float32))
    rows = {
        "launch, 2 arguments (fill, 1 element)": lambda: k["fill"][1, 1](one, np.float32(0)),
        "launch, 9 arguments (forward_layer, 1 step)": lambda: k["forward_layer"][B, H](1, 0, D1, WhhT, h0, h0, Hs2, Cs2, TC1),
        "slice a device array (D[:1])": lambda: D[:1],
        "launch + synchronize (fill)": lambda: (k["fill"][1, 1](one, np.float32(0)), cuda.synchronize()),
        "host to device, 64 floats": lambda: cuda.to_device(small),
        "device to host, 64 floats": lambda: d_small.copy_to_host(),
        "device_array((64,))": lambda: cuda.device_array(64, np.float32),
    }
    for name, f in rows.items():
        lines.append(f"{name:48s} {per_call_us(f):8.1f} us")
    for dt in (np.float32, np.float64):
        net, x, y, state, K1, K2 = make_problem("W1", dt, 0)
        f = lambda: npbptt.bptt(net, x, y, state, K1, K2, backend="cuda")   # noqa: E731
        f()
        lines.append(f"W1 bptt cuda {np.dtype(dt).name}: {per_call_us(f, 30) / 1e3:.2f} ms a call")
    for name in ("W1", "W2"):
        lines += kernel_times(gpu, name)
    net, x, y, state, K1, K2 = make_problem("W1", np.float32, 0)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        npbptt.bptt(net, x, y, state, K1, K2, backend="cuda")
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    lines.append("cProfile, 20 calls of W1 bptt cuda float32, by own time:")
    lines.append(s.getvalue())
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_gpu.txt").write_text(text)
    del gpu


if __name__ == "__main__":
    main()
