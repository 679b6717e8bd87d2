"""What the CPU and CUDA kernels share: which networks they run, and small array helpers."""
import math

import numpy as np

from ._cpu_jit import ACT

__all__ = ["BLOCK_ELEMENTS", "carve", "supports"]

# Largest number of elements in one read-out block / one cached forward block (memory bound).
BLOCK_ELEMENTS = 1 << 22


def supports(net):
    """True when ``net`` is an npbptt RNN/LSTM whose recurrence, read-out and embedding are the
    stock ones, untied, in float32 or float64: what the kernels compute (with ``dropout > 0``
    too: calls with dropout masks never get here, ``npbptt.backends.resolve`` runs them).
    ``npbptt.backends.resolve`` runs every other network on the NumPy reference."""
    from npbptt.model import LSTM, RNN, _Network
    if not isinstance(net, (RNN, LSTM)):
        return False
    cls = type(net)
    for name in ("step", "step_vjp", "embed", "input_vjp", "readout", "readout_vjp", "layer",
                 "to_internal", "to_public"):
        if getattr(cls, name, None) is not getattr(_Network, name):
            return False
    if getattr(net, "tie_weights", False):
        return False                 # tied read-out: the reference; dropout masks: resolve (issue 18)
    expected = (LSTM.kind, LSTM.gates) if isinstance(net, LSTM) else (RNN.kind, RNN.gates)
    return ((cls.kind, cls.gates) == expected and net.activation in ACT
            and np.dtype(net.dtype) in (np.float32, np.float64))


def carve(flat, shapes):
    """Consecutive views of the 1-D array ``flat`` with the given shapes (a NumPy array, or a
    numba.cuda device array)."""
    views, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[at:at + n].reshape(shape))
        at += n
    return views
