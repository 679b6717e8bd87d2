"""Online alternatives to (truncated) BPTT on the same cells, with full BPTT as the yardstick.

* :func:`rtrl` -- exact real-time recurrent learning (Williams & Zipser 1989): the influence
  matrix dS_t/dtheta carried forward; equals ``npbptt.bptt(net, x, y, state, T-1, T)``.
* :func:`uoro` -- Unbiased Online Recurrent Optimization (Tallec & Ollivier 2017, Algorithm 1):
  a rank-one unbiased estimate of the influence matrix.
* :func:`artbp` -- Anticipated Reweighted Truncated Backpropagation (Tallec & Ollivier 2017,
  "Unbiasing Truncated BPTT"): random truncations with compensation factors 1/(1 - c_t).

Each has a ``*_stream`` that runs over a long sequence chunk by chunk with its online state
(``result.carry``) carried, for a training loop (ARTBP's streams segment by segment, between
the truncations it draws).  The forward-mode products they are written
in are in :mod:`npbptt.online.jvp`.
"""
from .common import OnlineResult
from .jvp import state_param_names, step_jvp, step_jvp_params
from .rtrl import DEFAULT_MAX_BYTES, RTRLCarry, rtrl, rtrl_bytes, rtrl_stream
from .artbp import artbp, artbp_draw, artbp_estimate, artbp_stream, min_length
from .uoro import UOROCarry, uoro, uoro_stream, uoro_update

__all__ = ["OnlineResult", "RTRLCarry", "rtrl", "rtrl_stream", "rtrl_bytes", "DEFAULT_MAX_BYTES",
           "UOROCarry", "uoro", "uoro_stream", "uoro_update", "state_param_names", "step_jvp", "step_jvp_params",
           "artbp", "artbp_draw", "artbp_estimate", "artbp_stream", "min_length"]
