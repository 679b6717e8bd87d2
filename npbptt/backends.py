"""The one place that decides which implementation of a hot loop runs.

Operations and their NumPy references (every kernel has the reference's signature and must
equal it):

    "bptt"        (net, x, y, S, K1, K2, loss) -> (loss, grads, S_T)   npbptt.bptt.bptt_reference
    "step_losses" (net, x, y, S, loss)         -> (L (T,), S_T)        npbptt.bptt.step_losses_reference
    "grad_norms"  (net, x, y, S, loss)         -> phi (T, B)           npbptt.probe.grad_norms_reference
    "grad_norms_param" (net, x, y, S, loss)    -> psi (T, B)           npbptt.probe.param_norms_reference
                                                  (numba: npbptt.kernels.psi; cuda: the reference)

Dropout masks (keyword ``masks``, an ``npbptt.model.DropoutMasks``): :func:`resolve` with
``masked=True`` returns the reference unless the kernel module's ``takes_masks(op, net)`` says
its kernel takes them.

Backends: "numpy" (the reference, always available), "numba" (CPU kernels in npbptt.kernels),
"cuda" (numba.cuda kernels). ``backend=None`` picks :func:`default_backend`.
"""
import importlib

__all__ = ["BACKENDS", "available", "default_backend", "resolve"]

BACKENDS = ("numpy", "numba", "cuda")

_REFERENCE = {
    "bptt": ("npbptt.bptt", "bptt_reference"),
    "step_losses": ("npbptt.bptt", "step_losses_reference"),
    "grad_norms": ("npbptt.probe", "grad_norms_reference"),
    "grad_norms_param": ("npbptt.probe", "param_norms_reference"),
}
# no kernel for these on that backend: the checked backend runs the reference
_REFERENCE_ONLY = {"numba": (), "cuda": ("grad_norms_param",)}
_KERNEL_MODULE = {"numba": "npbptt.kernels.cpu", "cuda": "npbptt.kernels.gpu"}
# operations whose kernel lives in a module of its own (one idea per module)
_OP_MODULE = {("numba", "grad_norms_param"): "npbptt.kernels.psi"}


def _kernel_module(backend, op=None):
    try:
        return importlib.import_module(_OP_MODULE.get((backend, op), _KERNEL_MODULE[backend]))
    except ImportError:
        return None


def available():
    """The backends that can run here, in order of preference: "numba" (the CPU kernels, when
    numba imports), "numpy" (always), "cuda" (when numba.cuda finds a GPU or the simulator)."""
    out = ["numpy"]
    if _kernel_module("numba") is not None:
        out.insert(0, "numba")
    mod = _kernel_module("cuda")
    if mod is not None and mod.is_available():
        out.append("cuda")
    return out


def default_backend():
    """The fastest backend that is available and correct for every input: "numba" when the CPU
    kernels import (networks they do not support run the reference: :func:`resolve`), else "numpy".
    The CUDA kernels are never chosen implicitly: ask for ``backend="cuda"``."""
    return "numba" if _kernel_module("numba") is not None else "numpy"


def resolve(op, backend=None, net=None, masked=False):
    """The function implementing ``op`` on ``backend`` (see the module docstring) for ``net``: the
    reference when the backend's kernels do not support ``net`` (``npbptt.kernels.shared.supports``;
    ``net=None``: the kernel itself), or when ``masked`` (the call has dropout masks, keyword
    ``masks``) and the kernel module's ``takes_masks(op, net)`` is missing or False.  The backend is checked either way.  Without
    masks a network with ``dropout > 0`` is the stock network, which the kernels compute."""
    if op not in _REFERENCE:
        raise ValueError(f"unknown operation {op!r}")
    if backend is None:
        backend = default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "numpy":
        module, name = _REFERENCE[op]
        return getattr(importlib.import_module(module), name)
    mod = _kernel_module(backend, op)
    if (backend, op) in _OP_MODULE and mod is None and _kernel_module(backend) is not None:
        mod, op_only_ref = _kernel_module(backend), True     # its module is not there yet
    else:
        op_only_ref = op in _REFERENCE_ONLY[backend]
    if op_only_ref and mod is not None:
        if backend == "cuda" and not mod.is_available():
            raise ValueError("backend 'cuda' needs an NVIDIA GPU (or NUMBA_ENABLE_CUDASIM=1); none found")
        module, name = _REFERENCE[op]
        return getattr(importlib.import_module(module), name)
    if mod is None or not hasattr(mod, op):
        raise ValueError(f"backend {backend!r} is not available here for {op!r} "
                         f"(available: {available()})")
    if backend == "cuda" and not mod.is_available():
        raise ValueError("backend 'cuda' needs an NVIDIA GPU (or NUMBA_ENABLE_CUDASIM=1); none found")
    takes_masks = getattr(mod, "takes_masks", None)       # (op, net) -> bool, where kernels take masks
    masked_ref = masked and not (takes_masks is not None and net is not None and takes_masks(op, net))
    if masked_ref or (net is not None and not mod.supports(net)):
        # the one place that decides: a network the kernels do not compute (its own step) or a
        # masked call they do not take runs the reference, never silently the stock recurrence
        module, name = _REFERENCE[op]
        return getattr(importlib.import_module(module), name)
    return getattr(mod, op)
