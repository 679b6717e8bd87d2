"""Stacked RNN and LSTM networks with an embedding or dense input and a linear read-out (§2).

The network is its parameter dict plus a few sizes; every computation is a function of
(params, state, input).  One network step maps the full state S_{t-1} (all layers) and the
input x_t to S_t:

    e_t = E[x_t] (embedding) or x_t (dense)
    h_t^(l) = H_l(h_{t-1}^(l), h_t^(l-1); theta_l),  h_t^(0) = e_t      (§2, stacked RNNs)
    out_t  = W_dec h_t^(L) + b_dec                                      (linear read-out)

With ``tie_weights=True`` the read-out reuses the embedding matrix, W_dec = E (V, H): logits
h_t^(L) E^T + b_dec, so ``params`` has no ``decoder.weight`` and ``grads["embedding.weight"]``
is the sum of the two uses of E (the input rows E[x_t] and the read-out).

With ``dropout=p > 0`` (§5.2, the authors' language-model scripts: torch.nn.Dropout, inverted)
a training step multiplies two masks in, drawn Bernoulli(1 - p) and scaled by 1/(1 - p):

    e_t <- m_t^in * e_t                  (the layer-0 input: the embedding output, or x_t)
    out_t = W_dec (m_t^out * h_t^(L)) + b_dec                           (before the read-out)

The masks are data, not state: :meth:`_Network.dropout_masks` draws them from a passed
generator as a :class:`DropoutMasks`, and ``npbptt.bptt(..., masks=)`` differentiates the
masked network exactly.  Without masks (evaluation, the probe, theory) the network is the
stock one whatever ``dropout`` is.

Internally a state is a tuple of arrays of shape (L, B, H): ``(h,)`` for the simple RNN and
``(h, c)`` for the LSTM.  The public state (``init_state``, ``bptt(..., state)``) is the array
``h`` for the RNN and the tuple ``(h, c)`` for the LSTM, as in PyTorch.
"""
import inspect
from dataclasses import dataclass

import numpy as np

from .cells import ACTIVATIONS, lstm_step, lstm_step_vjp, rnn_step, rnn_step_vjp

__all__ = ["RNN", "LSTM", "DropoutMasks", "check_masks"]

_LAYER_KEYS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


@dataclass(frozen=True)
class DropoutMasks:
    """Inverted-dropout masks of T steps of a batch of B (from :meth:`_Network.dropout_masks`).

    input  : (T, B, input_size)  multiplied into the layer-0 input embed(x_t) at step t
    output : (T, B, hidden_size) multiplied into the top layer's h_t before the read-out

    Values 0 or 1/(1 - p) in ``net.dtype`` when drawn; any finite arrays of these shapes and
    dtype are accepted (a masked network).  Step t of a chunk x[t] uses ``input[t]`` and
    ``output[t]``.
    """
    input: np.ndarray
    output: np.ndarray

    def steps(self, start, stop=None):
        """The masks of steps start..stop-1 (views)."""
        return DropoutMasks(self.input[start:stop], self.output[start:stop])

    def then(self, later):
        """These steps' masks followed by ``later``'s (a new record, arrays concatenated)."""
        return DropoutMasks(np.concatenate([self.input, later.input]),
                            np.concatenate([self.output, later.output]))


def check_masks(net, masks, T, B):
    """``masks`` (None or a :class:`DropoutMasks`) checked for a chunk of T steps of a batch of B:
    ``input`` (T, B, input_size) and ``output`` (T, B, hidden_size) arrays of ``net.dtype``,
    finite.  Returns ``masks``; ValueError naming ``masks`` otherwise."""
    if masks is None:
        return None
    if not isinstance(masks, DropoutMasks):
        raise ValueError("masks must be None or an npbptt.model.DropoutMasks "
                         f"(net.dropout_masks(T, B, rng)), got {type(masks).__name__}")
    if "mask" not in inspect.signature(net.step).parameters:
        raise ValueError(f"masks: {type(net).__name__}.step takes no dropout mask (its override "
                         "of step(S_prev, x_t) needs a mask=None argument, as _Network.step)")
    for field, size, n in (("input", "input_size", net.input_size),
                           ("output", "hidden_size", net.hidden_size)):
        m = getattr(masks, field)
        if not isinstance(m, np.ndarray):
            raise ValueError(f"masks.{field} must be a NumPy array, got {type(m).__name__}")
        if m.shape != (T, B, n):
            raise ValueError(f"masks.{field} must have shape (T, B, {size}) = {(T, B, n)}, "
                             f"got {m.shape}")
        if m.dtype != net.dtype:
            raise ValueError(f"masks.{field} must have the network's dtype {net.dtype}, "
                             f"got {m.dtype}")
        if not np.isfinite(m).all():
            raise ValueError(f"masks.{field} must be finite (it has NaN or inf)")
    return masks


class _Network:
    """Common part of :class:`RNN` and :class:`LSTM`; not instantiated directly."""

    kind = None
    gates = 1
    tie_weights = False                     # set per instance by __init__

    def __init__(self, input_size, hidden_size, num_layers=1, output_size=None, vocab_size=None,
                 activation="tanh", bias=True, dtype=np.float64, seed=None, tie_weights=False,
                 dropout=0.0):
        for name, v, lo in (("input_size", input_size, 1), ("hidden_size", hidden_size, 1),
                            ("num_layers", num_layers, 1)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if output_size is None:
            output_size = vocab_size
        if not isinstance(output_size, (int, np.integer)) or output_size < 1:
            raise ValueError(f"output_size must be an integer >= 1, got {output_size!r}")
        if vocab_size is not None and (not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1):
            raise ValueError(f"vocab_size must be None or an integer >= 1, got {vocab_size!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not isinstance(tie_weights, (bool, np.bool_)):
            raise ValueError(f"tie_weights must be True or False, got {tie_weights!r}")
        if tie_weights:                     # the read-out reuses E (V, input_size) as W_dec (O, H)
            if vocab_size is None:
                raise ValueError("vocab_size is required with tie_weights=True (the read-out "
                                 "reuses the embedding matrix), got None")
            if output_size != vocab_size:
                raise ValueError(f"output_size must equal vocab_size={vocab_size} with "
                                 f"tie_weights=True, got {output_size!r}")
            if input_size != hidden_size:
                raise ValueError(f"input_size must equal hidden_size={hidden_size} with "
                                 f"tie_weights=True (the embedding is the read-out), got {input_size!r}")
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(
                dropout, (int, float, np.integer, np.floating)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number p with 0 <= p < 1, got {dropout!r}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.output_size = int(output_size)
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.activation, self.bias, self.dtype = activation, bool(bias), dtype
        self.tie_weights = bool(tie_weights)
        self.dropout = float(dropout)
        self.params = self._init_params(np.random.default_rng(seed))

    # -- parameters ---------------------------------------------------------------------------
    def param_shapes(self):
        """The architecture's parameters: a dict name -> shape, in ``params`` order.  Every entry
        point checks ``params`` against it (:func:`npbptt.validate.check_params`)."""
        H, G = self.hidden_size, self.gates
        shapes = {}
        if self.vocab_size is not None:
            shapes["embedding.weight"] = (self.vocab_size, self.input_size)
        for l in range(self.num_layers):
            shapes[f"weight_ih_l{l}"] = (G * H, self.input_size if l == 0 else H)
            shapes[f"weight_hh_l{l}"] = (G * H, H)
            if self.bias:
                shapes[f"bias_ih_l{l}"] = (G * H,)
                shapes[f"bias_hh_l{l}"] = (G * H,)
        if not self.tie_weights:            # tied: the read-out's weight is embedding.weight
            shapes["decoder.weight"] = (self.output_size, H)
        shapes["decoder.bias"] = (self.output_size,)
        return shapes

    def _init_params(self, rng):
        """PyTorch's default initialisation: U(-1/sqrt(H), 1/sqrt(H)) for the recurrent layers
        and the read-out (fan-in bound), N(0, 1) for the embedding."""
        k = 1.0 / np.sqrt(self.hidden_size)
        return {name: (rng.standard_normal(shape) if name == "embedding.weight"
                       else rng.uniform(-k, k, shape)).astype(self.dtype)
                for name, shape in self.param_shapes().items()}

    def layer(self, l):
        """Parameters of layer ``l`` without the ``_l{l}`` suffix (views into ``params``)."""
        return {k: self.params[f"{k}_l{l}"] for k in _LAYER_KEYS if f"{k}_l{l}" in self.params}

    @property
    def embedding(self):
        """True when the input is integer tokens through ``embedding.weight``."""
        return self.vocab_size is not None

    @property
    def n_state(self):
        """Number of arrays in the internal state tuple: 1 (RNN) or 2 (LSTM, h and c)."""
        return 2 if self.kind == "lstm" else 1

    def init_state(self, batch):
        """Zero state: RNN an array (num_layers, B, H); LSTM a tuple (h, c) of such arrays."""
        if not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        zeros = lambda: np.zeros((self.num_layers, batch, self.hidden_size), self.dtype)
        return (zeros(), zeros()) if self.kind == "lstm" else zeros()

    def dropout_masks(self, T, B, rng):
        """Inverted-dropout masks for T steps of a batch of B, drawn from ``rng``
        (an ``np.random.Generator``; nothing else is read).  A :class:`DropoutMasks`:

            input  = where(rng.random((T, B, input_size))  >= p, 1/(1-p), 0)   drawn first
            output = where(rng.random((T, B, hidden_size)) >= p, 1/(1-p), 0)   then

        in ``self.dtype``: each entry Bernoulli(1 - p) times 1/(1 - p), p = ``self.dropout``
        (all ones when p = 0; the generator advances all the same)."""
        for name, v in (("T", T), ("B", B)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        p = self.dropout
        scale = 1.0 / (1.0 - p)
        draw = lambda n: np.where(rng.random((T, B, n)) >= p, scale, 0.0).astype(self.dtype)
        m_in = draw(self.input_size)
        return DropoutMasks(m_in, draw(self.hidden_size))

    def zero_grads(self):
        """A dict of zeros shaped like ``params``."""
        return {k: np.zeros_like(v) for k, v in self.params.items()}

    def copy(self):
        """An independent copy of the network (parameters copied)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.params = {k: v.copy() for k, v in self.params.items()}
        return new

    def config(self):
        """Constructor arguments (JSON-friendly) that rebuild this architecture."""
        cfg = dict(input_size=self.input_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                   output_size=self.output_size, vocab_size=self.vocab_size, bias=self.bias,
                   dtype=self.dtype.name)
        if self.kind == "rnn":
            cfg["activation"] = self.activation
        if self.tie_weights:
            cfg["tie_weights"] = True
        if self.dropout > 0:                # absent at 0, as tie_weights: older runs' configs hold
            cfg["dropout"] = self.dropout
        return cfg

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # -- state conversions -----------------------------------------------------------------
    def to_internal(self, state):
        """Public state -> internal tuple of (L, B, H) arrays."""
        return tuple(state) if self.kind == "lstm" else (state,)

    def to_public(self, S):
        """Internal tuple -> public state (RNN: the array h; LSTM: the tuple (h, c))."""
        return tuple(S) if self.kind == "lstm" else S[0]

    # -- one network step and its vector-Jacobian product ---------------------------------
    def embed(self, x_t):
        """Input of layer 0 at one step: E[x_t] (B, input_size) or the dense x_t itself.  The only
        place that turns x_t into the layer-0 input; its VJP is :meth:`input_vjp`."""
        return self.params["embedding.weight"][x_t] if self.embedding else x_t

    def input_vjp(self, x_t, dx, grads, scale=1.0):
        """Accumulate into ``grads`` (in place) the gradient of the layer-0 input's parameters,
        given ``dx`` (B, input_size) = d/d embed(x_t): the embedding scatter
        ``grads["embedding.weight"][x_t[b]] += scale * dx[b]`` (the entry is created as zeros
        when missing), nothing for a dense input.  The one place that differentiates
        :meth:`embed`: every caller goes through it, so a subclass with another input (e.g. an
        embedding beside dense features) overrides ``embed`` and ``input_vjp`` together."""
        if not self.embedding:
            return
        g = grads.get("embedding.weight")
        if g is None:
            g = grads["embedding.weight"] = np.zeros_like(self.params["embedding.weight"])
        np.add.at(g, x_t, dx if scale == 1.0 else dx * scale)   # repeated tokens add up

    def step(self, S_prev, x_t, mask=None):
        """S_t = H(S_{t-1}, x_t; theta), Eq. (1) for the stacked network.

        S_prev: tuple of (L, B, H); x_t: (B,) tokens or (B, input_size); mask: None or
        (B, input_size), the input dropout mask m_t^in multiplied into embed(x_t) (a
        :class:`DropoutMasks` row).  Returns (S_t, cache); the cache is (x_t, caches), plus the
        mask when one was given.
        """
        inp = self.embed(x_t)
        if mask is not None:
            inp = inp * mask                                # dropout on the layer-0 input
        S = tuple(np.empty_like(s) for s in S_prev)
        caches = []
        for l in range(self.num_layers):
            p = self.layer(l)
            if self.kind == "lstm":
                (S[0][l], S[1][l]), cache = lstm_step(p, (S_prev[0][l], S_prev[1][l]), inp)
            else:
                S[0][l], cache = rnn_step(p, S_prev[0][l], inp, self.activation)
            caches.append(cache)
            inp = S[0][l]                                   # h_t^(l) is the input of layer l+1
        return S, ((x_t, caches) if mask is None else (x_t, caches, mask))

    def step_vjp(self, cache, dS):
        """VJP of :meth:`step`. dS: tuple of (L, B, H), the gradient w.r.t. S_t as the input of
        step t+1 and of the read-out.  Returns (dtheta, dS_prev, dx): dtheta a dict over the
        recurrent layers' parameters, dS_prev = dS . dS_t/dS_{t-1}, dx (B, input_size) the
        gradient w.r.t. embed(x_t) (the embedded rows when there is an embedding), through the
        input dropout mask when :meth:`step` had one: hand it to :meth:`input_vjp`."""
        _, caches, *mask = cache
        dS_prev = tuple(np.empty_like(d) for d in dS)
        grads = {}
        dx = None
        for l in reversed(range(self.num_layers)):
            p = self.layer(l)
            dh = dS[0][l] if dx is None else dS[0][l] + dx  # from step t+1 and from layer l+1
            if self.kind == "lstm":
                dp, (dS_prev[0][l], dS_prev[1][l]), dx = lstm_step_vjp(p, caches[l], (dh, dS[1][l]))
            else:
                dp, dS_prev[0][l], dx = rnn_step_vjp(p, caches[l], dh, self.activation)
            grads.update({f"{k}_l{l}": v for k, v in dp.items()})
        if mask:
            dx = dx * mask[0]                               # VJP of inp = embed(x_t) * m_t^in
        return grads, dS_prev, dx

    # -- read-out ------------------------------------------------------------------------
    @property
    def decoder_weight_name(self):
        """Name in ``params`` of the read-out's weight W_dec (O, H): ``"embedding.weight"`` for a
        tied network, else ``"decoder.weight"``.  The one place that knows about the tie."""
        return "embedding.weight" if self.tie_weights else "decoder.weight"

    def decoder_weight(self):
        """The read-out's weight W_dec (O, H): ``params[decoder_weight_name]`` (a view)."""
        return self.params[self.decoder_weight_name]

    def readout(self, h_top):
        """Linear read-out: (B, H) -> (B, output_size), out_t = W_dec h_t + b_dec."""
        return h_top @ self.decoder_weight().T + self.params["decoder.bias"]

    def readout_vjp(self, h_top, dout):
        """VJP of :meth:`readout`: returns ({read-out grads}, dh_top (B, H)).  The weight's
        gradient is keyed by :attr:`decoder_weight_name`; for a tied network the caller adds it
        to the embedding's own gradient (Eq. (15)/(16) sum every use of a parameter)."""
        W = self.decoder_weight()
        return ({self.decoder_weight_name: dout.T @ h_top, "decoder.bias": dout.sum(axis=0)},
                dout @ W)


class RNN(_Network):
    """Stacked simple RNN, h_t = rho(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh) (§2), PyTorch's nn.RNN
    parameter names and shapes, with an embedding (``vocab_size``) or dense input and a linear
    read-out ``decoder``.  ``activation`` in {"tanh", "relu", "sigmoid", "linear"}.
    ``tie_weights=True``: the read-out's weight is ``embedding.weight`` (needs ``vocab_size``,
    ``output_size == vocab_size`` and ``input_size == hidden_size``).  ``dropout`` in [0, 1):
    the probability p of the inverted dropout on the layer-0 input and on the top layer's
    output, applied only where masks are passed (``net.dropout_masks``, ``npbptt.bptt``)."""

    kind = "rnn"
    gates = 1


class LSTM(_Network):
    """Stacked LSTM (§2), PyTorch's nn.LSTM parameter names and gate order (i, f, g, o), with an
    embedding (``vocab_size``) or dense input and a linear read-out ``decoder``.
    ``tie_weights=True``: the read-out's weight is ``embedding.weight``, ``dropout``: as
    :class:`RNN`."""

    kind = "lstm"
    gates = 4

    def __init__(self, input_size, hidden_size, num_layers=1, output_size=None, vocab_size=None,
                 bias=True, dtype=np.float64, seed=None, tie_weights=False, dropout=0.0):
        super().__init__(input_size, hidden_size, num_layers, output_size, vocab_size,
                         activation="tanh", bias=bias, dtype=dtype, seed=seed,
                         tie_weights=tie_weights, dropout=dropout)
