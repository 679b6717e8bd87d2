"""Input checks shared by every public entry point: bad input raises ``ValueError`` naming the
argument and what was expected, before anything is computed."""
import numpy as np

from .losses import LOSSES

# Losses whose read-out layout only a point-process network has (its ``check_xy`` checks x, y).
_POINT_PROCESS_LOSSES = ("rmtpp",)

__all__ = ["is_int", "check_params", "check_x", "check_y", "check_state", "check_inputs", "check_K"]


def is_int(v):
    """A Python or NumPy integer, not a bool."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _finite(name, a):
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf")


def check_params(net):
    """``net.params`` against the architecture (``net.param_shapes()``): every parameter present,
    no other, each a NumPy array of exactly the expected shape and of the network's dtype in
    native byte order, and finite.  Raises ``ValueError`` naming the parameter, what was found
    and what was expected; the kernels copy parameters by size, so without this a transposed or
    flattened array would give a wrong gradient with no error."""
    params = getattr(net, "params", None)
    if not isinstance(params, dict):
        raise ValueError(f"net.params must be a dict name -> array, got {type(params).__name__}")
    shapes = net.param_shapes()
    missing = [k for k in shapes if k not in params]
    if missing:
        raise ValueError(f"net.params is missing {missing} (expected the parameters {list(shapes)})")
    unknown = [k for k in params if k not in shapes]
    if unknown:
        raise ValueError(f"net.params has unknown parameters {unknown} for {net!r} "
                         f"(expected {list(shapes)})")
    dtype = np.dtype(net.dtype)
    for name, shape in shapes.items():
        a = params[name]
        where = f"net.params[{name!r}]"
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{where} must be a NumPy array of shape {shape}, got {type(a).__name__}")
        if a.shape != shape:
            raise ValueError(f"{where} has shape {a.shape}, expected {shape}")
        if a.dtype != dtype:
            raise ValueError(f"{where} has dtype {a.dtype.str} ({a.dtype}), expected the network's "
                             f"dtype {dtype} in native byte order ({dtype.str})")
        _finite(where, a)


def check_x(net, x):
    """x: (T, B) integer tokens in [0, vocab_size) with an embedding, else (T, B, input_size)
    floats. Returns x as int64 or as the network's dtype."""
    x = np.asarray(x)
    if net.embedding:
        if x.ndim != 2:
            raise ValueError(f"x must have shape (T, B) of integer tokens, got shape {x.shape}")
        if x.dtype.kind not in "iu":
            raise ValueError(f"x must hold integer tokens for a network with an embedding, got dtype {x.dtype}")
        if x.size and (x.min() < 0 or x.max() >= net.vocab_size):
            raise ValueError(f"x tokens must lie in [0, vocab_size={net.vocab_size}), "
                             f"got range [{x.min()}, {x.max()}]")
        x = x.astype(np.int64, copy=False)
    else:
        if x.ndim != 3 or x.shape[2] != net.input_size:
            raise ValueError(f"x must have shape (T, B, input_size={net.input_size}), got shape {x.shape}")
        if x.dtype.kind != "f":
            raise ValueError(f"x must be a floating-point array for a dense input, got dtype {x.dtype}")
        _finite("x", x)
        x = x.astype(net.dtype, copy=False)
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must have at least one step and one example, got shape {x.shape}")
    return x


def check_y(net, y, loss, T, B):
    """y: (T, B) integer targets for cross-entropy, (T, B, output_size) floats for mse."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    if loss in _POINT_PROCESS_LOSSES:
        raise ValueError(f"loss={loss!r} needs a point-process network with a check_xy method "
                         f"(npbptt.point_process.RMTPPLSTM), got {net!r}")
    y = np.asarray(y)
    if loss == "cross_entropy":
        if y.shape != (T, B):
            raise ValueError(f"y must have shape (T, B) = {(T, B)} of integer targets, got shape {y.shape}")
        if y.dtype.kind not in "iu":
            raise ValueError(f"y must hold integer targets for loss='cross_entropy', got dtype {y.dtype}")
        if y.min() < 0 or y.max() >= net.output_size:
            raise ValueError(f"y targets must lie in [0, output_size={net.output_size}), "
                             f"got range [{y.min()}, {y.max()}]")
        return y.astype(np.int64, copy=False)
    if y.shape != (T, B, net.output_size):
        raise ValueError(f"y must have shape (T, B, output_size) = {(T, B, net.output_size)} "
                         f"for loss='mse', got shape {y.shape}")
    if y.dtype.kind != "f":
        raise ValueError(f"y must be floating-point for loss='mse', got dtype {y.dtype}")
    _finite("y", y)
    return y.astype(net.dtype, copy=False)


def check_state(net, state, B):
    """state: RNN (L, B, H) array; LSTM tuple (h, c) of such. Returns the internal tuple."""
    shape = (net.num_layers, B, net.hidden_size)
    if net.kind == "lstm":
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise ValueError("state must be a tuple (h, c) for an LSTM, "
                             f"each of shape (num_layers, B, H) = {shape}")
        parts = tuple(state)
    else:
        if isinstance(state, (tuple, list)):
            raise ValueError(f"state must be one array of shape (num_layers, B, H) = {shape} for an RNN")
        parts = (state,)
    out = []
    for name, s in zip(("state[0] (h)", "state[1] (c)") if net.kind == "lstm" else ("state",), parts):
        s = np.asarray(s)
        if s.shape != shape:
            raise ValueError(f"{name} must have shape (num_layers, B, H) = {shape}, got {s.shape}")
        if s.dtype.kind != "f":
            raise ValueError(f"{name} must be floating-point, got dtype {s.dtype}")
        _finite(name, s)
        out.append(s.astype(net.dtype, copy=False))
    return tuple(out)


def check_inputs(net, x, y, state, loss):
    """All of the above; returns (x, y, S) with S the internal state tuple.

    A network with its own input layout (e.g. :class:`npbptt.point_process.RMTPPLSTM`) has a
    method ``check_xy(x, y, loss) -> (x, y)`` that replaces :func:`check_x` and
    :func:`check_y` (y may be None), raising ``ValueError`` naming the argument."""
    check_params(net)
    hook = getattr(net, "check_xy", None)
    if hook is not None:
        x, y = hook(x, y, loss)
        T, B = x.shape[:2]
    else:
        x = check_x(net, x)
        T, B = x.shape[:2]
        y = check_y(net, y, loss, T, B) if y is not None else None
    return x, y, check_state(net, state, B)


def check_K(K1, K2, T):
    """1 <= K2 <= min(T, K1 + 1) and K1 >= 0 (BPTT(K1, K2) on a chunk of T steps)."""
    if not is_int(K1) or K1 < 0:
        raise ValueError(f"K1 must be an integer >= 0, got {K1!r}")
    if not is_int(K2) or not 1 <= K2 <= min(T, K1 + 1):
        raise ValueError(f"K2 must be an integer with 1 <= K2 <= min(T, K1 + 1) = {min(T, K1 + 1)} "
                         f"(T={T}, K1={K1}), got {K2!r}")
    return int(K1), int(K2)
