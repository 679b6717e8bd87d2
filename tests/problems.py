"""Random small BPTT problems for the tests: networks with non-zero biases, random initial
states, embedding or dense input, either loss (hypothesis strategies and a plain builder)."""
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

import npbptt


@dataclass
class Problem:
    net: object
    x: np.ndarray
    y: np.ndarray
    state: object
    loss: str


def make_problem(rng, kind="lstm", activation="tanh", layers=1, embedding=True,
                 loss="cross_entropy", T=6, B=3, H=4, E=3, O=5, V=7, bias=True,
                 dtype=np.float64, scale=1.0):
    """A random problem; ``scale`` multiplies the recurrent weights (larger -> slower decay)."""
    seed = int(rng.integers(2**31))
    kw = dict(vocab_size=V) if embedding else {}
    if kind == "lstm":
        net = npbptt.LSTM(E, H, layers, O, bias=bias, dtype=dtype, seed=seed, **kw)
    else:
        net = npbptt.RNN(E, H, layers, O, activation=activation, bias=bias, dtype=dtype,
                         seed=seed, **kw)
    for name, p in net.params.items():
        if name.startswith("weight_hh"):
            p *= scale
    x = rng.integers(0, V, (T, B)) if embedding else rng.standard_normal((T, B, E)).astype(dtype)
    if loss == "cross_entropy":
        y = rng.integers(0, O, (T, B))
    else:
        y = rng.standard_normal((T, B, O)).astype(dtype)
    shape = (layers, B, H)
    if kind == "lstm":
        state = (0.5 * rng.standard_normal(shape).astype(dtype),
                 0.5 * rng.standard_normal(shape).astype(dtype))
    else:
        state = 0.5 * rng.standard_normal(shape).astype(dtype)
        if activation == "relu":
            state = np.abs(state)
    return Problem(net, x, y, state, loss)


@st.composite
def problems(draw, kinds=("lstm", "rnn"), max_layers=3, max_T=7, dtype=np.float64):
    """Hypothesis strategy over small problems (all cells, activations, inputs and losses)."""
    kind = draw(st.sampled_from(kinds))
    activation = draw(st.sampled_from(["tanh", "relu", "sigmoid", "linear"])) if kind == "rnn" else "tanh"
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    return make_problem(
        rng, kind=kind, activation=activation,
        layers=draw(st.integers(1, max_layers)),
        embedding=draw(st.booleans()),
        loss=draw(st.sampled_from(["cross_entropy", "mse"])),
        T=draw(st.integers(1, max_T)), B=draw(st.integers(1, 3)), H=draw(st.integers(1, 4)),
        E=draw(st.integers(1, 3)), O=draw(st.integers(2, 4)), bias=draw(st.booleans()),
        dtype=dtype)


@st.composite
def problems_with_K(draw, **kw):
    """A problem and a valid (K1, K2): K1 >= 0, 1 <= K2 <= min(T, K1 + 1)."""
    prob = draw(problems(**kw))
    T = prob.x.shape[0]
    K1 = draw(st.integers(0, T + 1))
    K2 = draw(st.integers(1, min(T, K1 + 1)))
    return prob, K1, K2
