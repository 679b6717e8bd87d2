"""Per-step losses L_t (§2.1) on the read-out, with their gradients.

Each function takes the read-out ``out`` (B, O) and targets, and returns the per-example losses
``ell`` (B,) and ``d ell[b] / d out[b]`` (B, O) -- *not* divided by the batch size.  The batch
loss of a step is L_t = mean_b ell[b] (PyTorch's ``reduction="mean"``), so its gradient is
``dout / B``.
"""
import numpy as np

__all__ = ["LOSSES", "cross_entropy", "mse"]


def cross_entropy(out, y):
    """Softmax cross-entropy: ell[b] = logsumexp(out[b]) - out[b, y[b]]; y: (B,) integers."""
    z = out - out.max(axis=1, keepdims=True)
    ez = np.exp(z)
    se = ez.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    ell = np.log(se[:, 0]) - z[rows, y]
    d = ez / se
    d[rows, y] -= 1.0
    return ell, d


def mse(out, y):
    """Squared error averaged over outputs: ell[b] = mean_o (out[b,o] - y[b,o])^2; y: (B, O)."""
    r = out - y
    return (r * r).mean(axis=1), (2.0 / out.shape[1]) * r


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}
