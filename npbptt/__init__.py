"""npbptt: the reference implementation of BPTT, truncated BPTT and adaptive truncation.

Aicher, Foti & Fox, "Adaptively Truncating Backpropagation Through Time to Control Gradient
Bias" (UAI 2019). Equation numbers in the code refer to that paper.
"""
from .backends import available as available_backends, default_backend
from .bptt import BPTTResult, bptt, step_losses, stream, vjp_params, vjp_state
from .model import LSTM, RNN
from .probe import Probe, grad_norms, probe

__version__ = "0.1.0"

__all__ = ["RNN", "LSTM", "bptt", "BPTTResult", "stream", "step_losses", "vjp_state",
           "vjp_params", "available_backends", "default_backend", "grad_norms", "probe", "Probe"]
