"""What the online gradient methods share: their result, the network check, the read-out term
and the flattening of the state-update parameters into one vector theta_S."""
from dataclasses import dataclass

import numpy as np

from ..losses import LOSSES
from ..model import LSTM, RNN
from ..validate import check_inputs
from .jvp import state_param_names

__all__ = ["OnlineResult", "check_online_inputs", "ParamLayout", "readout_term"]


@dataclass
class OnlineResult:
    """Result of an online gradient method (same fields as ``npbptt.BPTTResult`` plus ``carry``).

    loss  : float, (1/T) sum_{t=1}^{T} L_t over the chunk, L_t the batch-mean loss of step t
    grads : dict like ``net.params``, the method's gradient (or estimate) of that loss
    state : the state after step T (public layout), to hand to the next chunk
    carry : the method's online state after step T (the influence matrix for RTRL, the rank-one
            pair for UORO), to hand to the next chunk as ``carry=`` to continue the sequence
    """
    loss: float
    grads: dict
    state: object
    carry: object


def check_online_inputs(net, x, y, state, loss):
    """``npbptt.validate.check_inputs`` (the errors of ``npbptt.bptt``), plus: ``net`` a stock
    npbptt.RNN or npbptt.LSTM (the forward-mode products read their step's cache) and ``y``
    given.  Returns (x, y, S) with S the internal state tuple."""
    if type(net) not in (RNN, LSTM):
        raise ValueError(f"net must be an npbptt.RNN or npbptt.LSTM (the forward-mode products of "
                         f"npbptt.online.jvp are written for their step), got {type(net).__name__}")
    if y is None:
        raise ValueError("y must be given: the targets (T, B) or (T, B, output_size), got None")
    return check_inputs(net, x, y, state, loss)


class ParamLayout:
    """The state-update parameters theta_S (``jvp.state_param_names``) flattened into one
    vector, in ``net.params`` order, each C-order: ``offsets[name]`` its first column."""

    def __init__(self, net):
        shapes = net.param_shapes()
        self.names = tuple(state_param_names(net))
        self.shapes = {k: shapes[k] for k in self.names}
        self.offsets, off = {}, 0
        for k in self.names:
            self.offsets[k] = off
            off += int(np.prod(self.shapes[k]))
        self.size = off

    def cols(self, name):
        """The slice of ``name``'s columns."""
        o = self.offsets[name]
        return slice(o, o + int(np.prod(self.shapes[name])))

    def layer_cols(self, l):
        """The slice of layer l's columns (its parameters are contiguous)."""
        names = [k for k in self.names if k.endswith(f"_l{l}")]
        return slice(self.cols(names[0]).start, self.cols(names[-1]).stop)

    def unflatten(self, v):
        """A vector (P,) -> dict name -> array of the parameter's shape (views)."""
        return {k: v[self.cols(k)].reshape(self.shapes[k]) for k in self.names}

    def flatten(self, d, dtype):
        """A dict over (some of) theta_S -> vector (P,), zeros for the missing names."""
        v = np.zeros(self.size, dtype)
        for k, a in d.items():
            if k in self.offsets:
                v[self.cols(k)] = a.ravel()
        return v


def readout_term(net, h_top, y_t, loss, grads):
    """The loss L_t = mean_b ell(readout(h_top), y_t) of one step: adds the read-out's direct
    term dL_t/dtheta of Eq. (2) of Aicher et al. into ``grads`` (in place; a tied read-out's
    weight is ``embedding.weight``) and returns (L_t, dL_t/dh_top (B, H))."""
    B = h_top.shape[0]
    ell, dout = LOSSES[loss](net.readout(h_top), y_t)
    d_readout, dh_top = net.readout_vjp(h_top, dout / B)
    for k, v in d_readout.items():
        grads[k] += v
    return float(ell.mean()), dh_top
