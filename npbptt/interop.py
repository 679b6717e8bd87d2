"""Weights in and out of PyTorch and JAX, and the two frameworks' versions of the network (§2).

npbptt's parameter dict already uses PyTorch's names and shapes (``weight_ih_l{k}`` (G*H, in),
``weight_hh_l{k}`` (G*H, H), ``bias_ih_l{k}``, ``bias_hh_l{k}``, LSTM gate order i, f, g, o) plus
``embedding.weight`` (V, E), ``decoder.weight`` (O, H) and ``decoder.bias`` (O,), so moving
weights is copying arrays:

    net = npbptt.from_torch(lstm, decoder=linear, embedding=emb)   # nn.LSTM/nn.RNN (+ modules)
    net = npbptt.from_torch(state_dict)                             # or a dict of tensors
    mods = npbptt.to_torch(net)          # TorchModules(rnn, decoder, embedding)
    params = npbptt.to_jax(net)          # {"weight_ih_l0": jax.Array, ...}
    net = npbptt.from_jax(params)

A float64 network stays float64 in both frameworks and the copies are exact.

Tied weights: a network with ``tie_weights=True`` has no ``decoder.weight`` (the read-out uses
``embedding.weight``).  :func:`to_torch` gives a decoder whose ``weight`` *is* the embedding's
Parameter, and :func:`from_torch` / :func:`from_state_dict` build a tied network when the
decoder's weight is the embedding's (the same object, or the same storage).

JAX and 64 bits
---------------
JAX computes in float32 unless its 64-bit mode is on.  :func:`to_jax` of a float64 network
therefore raises unless 64-bit mode is on (``jax.config.update("jax_enable_x64", True)``, or
inside ``with jax.enable_x64(True):``); it never changes JAX's global configuration itself.  The
cross-check (:mod:`npbptt.crosscheck`) runs its float64 JAX computations inside that scoped
context manager, so nothing leaks into the caller's JAX settings.

torch and jax are optional (extras ``npbptt[torch]``, ``npbptt[jax]``); they are imported only
when a function here needs them.
"""
from collections.abc import Mapping

import numpy as np

from .model import LSTM, RNN

__all__ = ["from_state_dict", "from_torch", "to_torch", "TorchModules", "from_jax", "to_jax",
           "with_dtype", "jax_network_fn", "x64"]

_TORCH_ACTIVATIONS = ("tanh", "relu")       # nn.RNN's ``nonlinearity`` choices


def _import(name):
    try:
        return __import__(name)
    except ImportError as e:                # pragma: no cover - depends on the environment
        raise ImportError(f"{name} is not installed; install the extra: pip install 'npbptt[{name}]'") from e


def _same_storage(a, b):
    """Whether two weights are one tensor: the same object, or torch tensors / NumPy arrays with
    the same data pointer, shape and strides (``decoder.weight = encoder.weight`` in PyTorch)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    if hasattr(a, "data_ptr") and hasattr(b, "data_ptr"):
        return (a.data_ptr() == b.data_ptr() and tuple(a.shape) == tuple(b.shape)
                and a.stride() == b.stride() and a.device == b.device)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
                and a.shape == b.shape and a.strides == b.strides)
    return False


def _to_numpy(v):
    """A torch tensor, a JAX array or anything array-like -> a NumPy array (copied later)."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):     # torch.Tensor / nn.Parameter
        return v.detach().cpu().numpy()
    return np.asarray(v)


# --- dict of arrays -> network ----------------------------------------------------------------
def from_state_dict(params, kind=None, activation="tanh", dtype=None, tie_weights=None):
    """Build an :class:`~npbptt.RNN` or :class:`~npbptt.LSTM` from a dict of arrays named as
    ``net.params`` (PyTorch's names; values may be NumPy arrays, torch tensors or JAX arrays).

    Parameters
    ----------
    params : mapping name -> array. Required: ``weight_ih_l{k}``, ``weight_hh_l{k}`` for
        k = 0..L-1, ``decoder.weight`` (O, H), ``decoder.bias`` (O,); optional: the biases
        ``bias_ih_l{k}``/``bias_hh_l{k}`` (all layers or none) and ``embedding.weight`` (V, E).
    kind : "lstm", "rnn" or None to infer it from the gate count G = rows/H of ``weight_hh_l0``
        (4: LSTM, 1: RNN).
    activation : the simple RNN's activation ("tanh", "relu", "sigmoid", "linear"); the arrays
        do not record it.
    dtype : float32 or float64; None takes float32 when every array is float32, else float64.
    tie_weights : True: a tied read-out (``embedding.weight`` is the decoder's weight;
        ``decoder.weight`` may be absent, or must equal ``embedding.weight``); False: untied;
        None: tied exactly when ``decoder.weight`` and ``embedding.weight`` are one tensor
        (the same object or storage, as after ``decoder.weight = encoder.weight`` in PyTorch).

    The values are copied; float64 values are copied exactly.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping name -> array, got {type(params).__name__}")
    if tie_weights is None:
        tie_weights = _same_storage(params.get("decoder.weight"), params.get("embedding.weight"))
    elif not isinstance(tie_weights, (bool, np.bool_)):
        raise ValueError(f"tie_weights must be None, True or False, got {tie_weights!r}")
    arrays = {str(k): _to_numpy(v) for k, v in params.items()}
    if tie_weights:
        if "embedding.weight" not in arrays:
            raise ValueError("params must contain embedding.weight with tie_weights=True (the "
                             "tied read-out's weight)")
        dec = arrays.pop("decoder.weight", None)
        if dec is not None and not np.array_equal(dec, arrays["embedding.weight"]):
            raise ValueError("params['decoder.weight'] differs from params['embedding.weight'] "
                             "with tie_weights=True; a tied network has one matrix")
        arrays["decoder.weight"] = arrays["embedding.weight"]     # for the shape checks below
    L = 0
    while f"weight_ih_l{L}" in arrays:
        L += 1
    if L == 0:
        raise ValueError("params must contain weight_ih_l0 (PyTorch's names); got keys "
                         f"{sorted(arrays)}")
    missing = [k for k in [f"weight_hh_l{l}" for l in range(L)] + ["decoder.weight", "decoder.bias"]
               if k not in arrays]
    if missing:
        raise ValueError(f"params is missing {missing} (a network needs every layer's weights "
                         "and the linear read-out decoder.weight, decoder.bias; pass "
                         "tie_weights=True for a read-out tied to embedding.weight)")
    whh = arrays["weight_hh_l0"]
    if whh.ndim != 2 or whh.shape[1] < 1 or whh.shape[0] % whh.shape[1]:
        raise ValueError(f"params['weight_hh_l0'] must have shape (G*H, H), got {whh.shape}")
    H, G = whh.shape[1], whh.shape[0] // whh.shape[1]
    inferred = {4: "lstm", 1: "rnn"}.get(G)
    if inferred is None:
        raise ValueError(f"params['weight_hh_l0'] has {G} gate blocks; only the LSTM (4) and the "
                         "simple RNN (1) are supported (a GRU has 3)")
    if kind is not None and kind != inferred:
        raise ValueError(f"kind={kind!r} disagrees with params, whose weight_hh_l0 shape "
                         f"{whh.shape} is that of a {inferred!r}")
    bias = "bias_ih_l0" in arrays
    known = {f"{w}_l{l}" for l in range(L) for w in ("weight_ih", "weight_hh")
             + (("bias_ih", "bias_hh") if bias else ())}
    known |= {"decoder.weight", "decoder.bias", "embedding.weight"}
    unknown = sorted(set(arrays) - known)
    if unknown:
        raise ValueError(f"params has keys npbptt does not know: {unknown} (expected "
                         "weight_ih_l{k}, weight_hh_l{k}, bias_ih_l{k}, bias_hh_l{k}, "
                         "embedding.weight, decoder.weight, decoder.bias)")
    emb = arrays.get("embedding.weight")
    wih, dec = arrays["weight_ih_l0"], arrays["decoder.weight"]
    if wih.ndim != 2 or dec.ndim != 2:
        raise ValueError("params['weight_ih_l0'] and params['decoder.weight'] must be matrices, got "
                         f"shapes {wih.shape} and {dec.shape}")
    if emb is not None and (emb.ndim != 2 or emb.shape[1] != wih.shape[1]):
        raise ValueError(f"params['embedding.weight'] must have shape (vocab_size, input_size="
                         f"{wih.shape[1]}), got {emb.shape}")
    if dtype is None:
        dtype = np.float32 if all(a.dtype == np.float32 for a in arrays.values()) else np.float64
    kw = dict(input_size=int(wih.shape[1]), hidden_size=int(H), num_layers=L,
              output_size=int(dec.shape[0]), vocab_size=None if emb is None else int(emb.shape[0]),
              bias=bias, dtype=dtype, seed=0, tie_weights=bool(tie_weights))
    if tie_weights:
        del arrays["decoder.weight"]
    net = LSTM(**kw) if inferred == "lstm" else RNN(activation=activation, **kw)
    _copy_into(net, arrays, "params")
    return net


def _copy_into(net, arrays, argname):
    """Copy ``arrays`` into ``net.params`` after checking names, shapes and finiteness."""
    if set(arrays) != set(net.params):
        raise ValueError(f"{argname} must hold exactly {sorted(net.params)}, got {sorted(arrays)}")
    for name, p in net.params.items():
        a = arrays[name]
        if a.shape != p.shape:
            raise ValueError(f"{argname}[{name!r}] must have shape {p.shape}, got {a.shape}")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{argname}[{name!r}] must hold real numbers, got dtype {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{argname}[{name!r}] contains NaN or inf")
        p[...] = a


def with_dtype(net, dtype):
    """A copy of ``net`` computing in ``dtype`` (float32 -> float64 is exact)."""
    return from_state_dict(net.params, kind=net.kind, activation=net.activation, dtype=dtype,
                           tie_weights=net.tie_weights)


# --- PyTorch ------------------------------------------------------------------------------------
class TorchModules:
    """The network as PyTorch modules: ``rnn`` (nn.RNN / nn.LSTM, sequence-first), ``decoder``
    (nn.Linear) and ``embedding`` (nn.Embedding or None for a dense input).

    ``mods(x, state) -> (out, state)`` runs embedding, recurrence and read-out on a segment
    x (T, B) tokens or (T, B, input_size); ``out`` is (T, B, output_size).  The state is the
    public state (RNN: h (L, B, H); LSTM: (h, c)), as nn.RNN / nn.LSTM take it.  Tied
    (:attr:`tie_weights`): ``decoder.weight`` is ``embedding.weight``, one Parameter, listed
    once as ``embedding.weight``.
    """

    def __init__(self, rnn, decoder, embedding=None):
        self.rnn, self.decoder, self.embedding = rnn, decoder, embedding

    def __iter__(self):
        return iter((self.rnn, self.decoder, self.embedding))

    @property
    def tie_weights(self):
        """True when the decoder's weight is the embedding's (one tensor)."""
        return self.embedding is not None and _same_storage(self.decoder.weight, self.embedding.weight)

    def __call__(self, x, state):
        inp = self.embedding(x) if self.embedding is not None else x
        h_seq, state = self.rnn(inp, state)
        return self.decoder(h_seq), state

    def named_parameters(self):
        """{npbptt name: torch Parameter}: the rnn's own names, ``decoder.*``, ``embedding.weight``."""
        out = dict(self.rnn.named_parameters())
        out.update({f"decoder.{k}": v for k, v in self.decoder.named_parameters()})
        if self.tie_weights:
            del out["decoder.weight"]           # the same Parameter as embedding.weight
        if self.embedding is not None:
            out["embedding.weight"] = self.embedding.weight
        return out

    def parameters(self):
        return list(self.named_parameters().values())

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def grads(self):
        """{npbptt name: NumPy copy of ``.grad``} (zeros for a parameter without a gradient)."""
        return {k: (np.zeros(tuple(p.shape), _to_numpy(p).dtype) if p.grad is None
                    else _to_numpy(p.grad).copy())
                for k, p in self.named_parameters().items()}


def to_torch(net):
    """The network as :class:`TorchModules` holding exact copies of ``net.params`` in the network's
    dtype.  A simple RNN needs activation "tanh" or "relu" (nn.RNN's choices).  ``net.dropout``
    is not carried: the modules compute the stock (evaluation-mode) network."""
    torch = _import("torch")
    if net.kind == "rnn" and net.activation not in _TORCH_ACTIVATIONS:
        raise ValueError(f"net.activation must be one of {_TORCH_ACTIVATIONS} for torch.nn.RNN, "
                         f"got {net.activation!r}")
    tdtype = torch.float64 if net.dtype == np.float64 else torch.float32
    kw = dict(input_size=net.input_size, hidden_size=net.hidden_size, num_layers=net.num_layers,
              bias=net.bias, dtype=tdtype)
    rnn = torch.nn.LSTM(**kw) if net.kind == "lstm" else torch.nn.RNN(nonlinearity=net.activation, **kw)
    decoder = torch.nn.Linear(net.hidden_size, net.output_size, dtype=tdtype)
    embedding = (torch.nn.Embedding(net.vocab_size, net.input_size, dtype=tdtype)
                 if net.embedding else None)
    if net.tie_weights:
        decoder.weight = embedding.weight       # one Parameter: the tie, as PyTorch LMs write it
    mods = TorchModules(rnn, decoder, embedding)
    with torch.no_grad():
        for name, p in mods.named_parameters().items():
            p.copy_(torch.from_numpy(np.ascontiguousarray(net.params[name])))
    return mods


def _module_state(obj, argname, torch):
    """nn.Module or mapping -> {name: array}."""
    if isinstance(obj, Mapping):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, torch.nn.Module):
        return {k: _to_numpy(v) for k, v in obj.state_dict().items()}
    raise ValueError(f"{argname} must be a torch module or a state dict, got {type(obj).__name__}")


def from_torch(rnn, decoder=None, embedding=None, activation=None, dtype=None):
    """Build an npbptt network from PyTorch modules or a state dict.

    Parameters
    ----------
    rnn : ``torch.nn.LSTM`` / ``torch.nn.RNN`` (unidirectional, no projection; ``batch_first``
        does not matter for the weights), a :class:`TorchModules`, or a state dict (mapping of
        tensors or arrays) with npbptt's names -- e.g. ``{**lstm.state_dict(),
        "decoder.weight": ..., "decoder.bias": ..., "embedding.weight": ...}``.
    decoder : ``torch.nn.Linear`` (hidden_size -> output_size) or its state dict ``{"weight",
        "bias"}``; required unless ``rnn`` is a state dict that holds ``decoder.*`` (npbptt
        networks end in a linear read-out).  A Linear without bias gets a zero bias (the same map).
    embedding : ``torch.nn.Embedding`` or ``{"weight": ...}``, or None for a dense input.
    activation : a simple RNN's activation; read from ``nn.RNN.nonlinearity`` when a module is given.
    dtype : None keeps the tensors' dtype (float32 stays float32, anything else float64).

    A decoder whose weight is the embedding's weight (``decoder.weight is embedding.weight``, or
    the same storage) gives a tied network (``tie_weights=True``).

    Dropout configured on the module is ignored: the weights are what is copied.
    """
    torch = _import("torch")
    if isinstance(rnn, TorchModules):
        rnn, decoder, embedding = rnn.rnn, rnn.decoder, rnn.embedding
    dec_w, emb_w = _weight(decoder), _weight(embedding)
    if isinstance(rnn, Mapping):
        dec_w = rnn.get("decoder.weight") if decoder is None else dec_w
        emb_w = rnn.get("embedding.weight") if embedding is None else emb_w
        arrays = {k: _to_numpy(v) for k, v in rnn.items()}
        kind = None
    elif isinstance(rnn, (torch.nn.LSTM, torch.nn.RNN)):
        if rnn.bidirectional:
            raise ValueError("rnn must be unidirectional (bidirectional=False)")
        if getattr(rnn, "proj_size", 0):
            raise ValueError(f"rnn must have proj_size=0, got {rnn.proj_size}")
        kind = "lstm" if isinstance(rnn, torch.nn.LSTM) else "rnn"
        if kind == "rnn":
            if activation is not None and activation != rnn.nonlinearity:
                raise ValueError(f"activation={activation!r} disagrees with the module's "
                                 f"nonlinearity={rnn.nonlinearity!r}")
            activation = rnn.nonlinearity
        arrays = {k: _to_numpy(v) for k, v in rnn.state_dict().items()}
    else:
        raise ValueError("rnn must be a torch.nn.LSTM, torch.nn.RNN, TorchModules or a state dict, "
                         f"got {type(rnn).__name__}")
    if decoder is not None:
        d = _module_state(decoder, "decoder", torch)
        if "weight" not in d:
            raise ValueError(f"decoder must have a 'weight' (output_size, hidden_size), got keys {sorted(d)}")
        arrays["decoder.weight"] = d["weight"]
        arrays["decoder.bias"] = d.get("bias", np.zeros(d["weight"].shape[0], d["weight"].dtype))
    elif "decoder.weight" not in arrays:
        raise ValueError("decoder is required: pass the nn.Linear that reads the top layer's h "
                         "(npbptt networks end in a linear read-out)")
    if embedding is not None:
        e = _module_state(embedding, "embedding", torch)
        if "weight" not in e:
            raise ValueError(f"embedding must have a 'weight' (vocab_size, input_size), got keys {sorted(e)}")
        arrays["embedding.weight"] = e["weight"]
    return from_state_dict(arrays, kind=kind, activation=activation or "tanh", dtype=dtype,
                           tie_weights=_same_storage(dec_w, emb_w))


def _weight(obj):
    """The ``weight`` of a module or a state dict, as given (not copied), or None."""
    if isinstance(obj, Mapping):
        return obj.get("weight")
    return getattr(obj, "weight", None)


# --- JAX --------------------------------------------------------------------------------------
def x64(enabled=True):
    """JAX's scoped 64-bit switch (a context manager); the global setting is left alone."""
    jax = _import("jax")
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:                          # pragma: no cover - older JAX
        from jax.experimental import enable_x64 as ctx
    return ctx(enabled)


def _jax_x64_on():
    """Whether JAX keeps float64 here (the global flag or an enclosing enable_x64 context)."""
    import jax
    return jax.dtypes.canonicalize_dtype(np.float64) == np.float64


def to_jax(net):
    """``net.params`` as a plain dict of ``jax.numpy`` arrays with the same names and dtype.

    A float64 network needs JAX's 64-bit mode on (see the module docstring); otherwise this
    raises rather than silently rounding to float32."""
    _import("jax")
    import jax.numpy as jnp
    if net.dtype == np.float64 and not _jax_x64_on():
        raise ValueError("net has dtype float64 but JAX's 64-bit mode is off: call inside "
                         "`with jax.enable_x64(True):` or set jax.config.update('jax_enable_x64', "
                         "True), or convert a float32 network (npbptt.interop.with_dtype)")
    return {k: jnp.asarray(v) for k, v in net.params.items()}


def from_jax(params, kind=None, activation="tanh", dtype=None):
    """Build an npbptt network from a dict of JAX arrays named as ``net.params``
    (see :func:`from_state_dict`)."""
    return from_state_dict(params, kind=kind, activation=activation, dtype=dtype)


def jax_network_fn(net):
    """The network's step as a pure JAX function, for ``lax.scan``.

    Returns ``step(params, S, x_t) -> (S_t, out_t)`` with ``params`` a dict as :func:`to_jax`
    gives, S the internal state tuple ((h,) or (h, c), each (L, B, H)), x_t (B,) tokens or
    (B, input_size), out_t the read-out (B, output_size).  Same equations as npbptt.cells (§2).
    """
    _import("jax")
    import jax
    import jax.numpy as jnp
    act = {"tanh": jnp.tanh, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid,
           "linear": lambda z: z}[net.activation]
    L, H, lstm, emb, bias = net.num_layers, net.hidden_size, net.kind == "lstm", net.embedding, net.bias
    dec_name = net.decoder_weight_name

    def step(p, S, x_t):
        inp = p["embedding.weight"][x_t] if emb else x_t
        hs, cs = [], []
        for l in range(L):
            z = inp @ p[f"weight_ih_l{l}"].T + S[0][l] @ p[f"weight_hh_l{l}"].T
            if bias:
                z = z + p[f"bias_ih_l{l}"] + p[f"bias_hh_l{l}"]
            if lstm:                                          # gate order i, f, g, o
                i, f = jax.nn.sigmoid(z[:, :H]), jax.nn.sigmoid(z[:, H:2 * H])
                g, o = jnp.tanh(z[:, 2 * H:3 * H]), jax.nn.sigmoid(z[:, 3 * H:])
                c = i * g + f * S[1][l]                       # c_t = i_t o z_t + f_t o c_{t-1}
                h = o * jnp.tanh(c)                           # h_t = o_t o tanh(c_t)
                cs.append(c)
            else:
                h = act(z)                                    # h_t = rho(W h_{t-1} + U x_t)
            hs.append(h)
            inp = h
        S_new = (jnp.stack(hs), jnp.stack(cs)) if lstm else (jnp.stack(hs),)
        return S_new, inp @ p[dec_name].T + p["decoder.bias"]   # tied: embedding.weight

    return step
