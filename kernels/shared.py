"""What the CPU and CUDA kernels share: which networks they run, the view of a tied network as
the untied one they compute, and small array helpers."""
import math

import numpy as np

from ._cpu_jit import ACT

__all__ = ["BLOCK_ELEMENTS", "carve", "supports", "untied"]

# Largest number of elements in one read-out block / one cached forward block (memory bound).
BLOCK_ELEMENTS = 1 << 22


def supports(net):
    """True when ``net`` is an npbptt RNN/LSTM whose recurrence, read-out and embedding are the
    stock ones, in float32 or float64: what the kernels compute.  A tied read-out
    (``tie_weights=True``) is supported through :func:`untied`; ``dropout > 0`` too (dropout
    masks reach a kernel only where its module's ``takes_masks(op, net)`` says so, see
    ``npbptt.backends.resolve``).  ``npbptt.backends.resolve`` runs every other network on the
    NumPy reference: this is the one decision, every kernel entry point relies on it."""
    from npbptt.model import LSTM, RNN, _Network
    if not isinstance(net, (RNN, LSTM)):
        return False
    cls = type(net)
    for name in ("step", "step_vjp", "embed", "input_vjp", "readout", "readout_vjp", "layer",
                 "to_internal", "to_public"):
        if getattr(cls, name, None) is not getattr(_Network, name):
            return False
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


def untied(net):
    """(view, fold) for a network :func:`supports` accepts.  Untied: (``net``, None) -- the
    kernels run it as it is, bit for bit as before.  Tied (``net.tie_weights``): ``view`` is the
    untied network the kernels compute, whose ``params`` hold the same arrays plus
    ``"decoder.weight"``, the embedding matrix E itself (no copy), so that the read-out
    h E^T + b_dec is the stock one; ``fold(grads)`` turns the view's gradients into the tied
    network's: ``grads["embedding.weight"] + grads["decoder.weight"]`` as the embedding's
    gradient, the sum of its two uses (the input rows E[x_t] and the read-out, Eqs. (15)-(16)),
    in the order of ``net.params`` (a dict; the arrays may be the kernel's, updated in place)."""
    if not getattr(net, "tie_weights", False):
        return net, None
    view = object.__new__(type(net))
    view.__dict__.update(net.__dict__)
    view.tie_weights = False
    params = {k: v for k, v in net.params.items() if k != "decoder.bias"}
    params["decoder.weight"] = net.params["embedding.weight"]   # W_dec = E (V, H), a view
    params["decoder.bias"] = net.params["decoder.bias"]
    view.params = params
    names = list(net.params)

    def fold(grads):
        dE = grads["embedding.weight"]
        dE += grads["decoder.weight"]                # the input use, plus the read-out's
        return {k: grads[k] for k in names}

    return view, fold
