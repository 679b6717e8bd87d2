"""npbptt: the reference implementation of BPTT, truncated BPTT and adaptive truncation.

Aicher, Foti & Fox, "Adaptively Truncating Backpropagation Through Time to Control Gradient
Bias" (UAI 2019). Equation numbers in the code refer to that paper.
"""


def _importing_for_the_command():
    """True when the ``npbptt`` command (console script, ``python -m npbptt`` or ``-m npbptt.cli``)
    is importing the package: Ctrl-C then ends it with one line (npbptt.cli), not a traceback."""
    import os
    import sys
    if os.path.basename(sys.argv[0] if sys.argv else "").removesuffix(".exe") == "npbptt":
        return True
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-m" and b in ("npbptt", "npbptt.cli") for a, b in zip(argv, argv[1:]))


try:
    from .backends import available as available_backends, default_backend
    from .bptt import BPTTResult, bptt, step_losses, stream, vjp_params, vjp_state
    from .model import LSTM, RNN
    from .probe import Probe, grad_norms, probe
    from .interop import from_jax, from_torch, to_jax, to_torch
    from .crosscheck import CrossCheckReport, crosscheck
    from .train import Diverged, TrainConfig, TrainResult               # npbptt.train.train: the loop
    from .tasks import train_copy, train_task                           # the experiments of §5
    from .variants import ResettingRNN                                  # Theorem 1: npbptt.theory
except KeyboardInterrupt:
    if not _importing_for_the_command():
        raise
    import sys
    print("npbptt: interrupted", file=sys.stderr)     # as npbptt.cli.main: exit status 130
    raise SystemExit(130) from None

__version__ = "0.1.0"

__all__ = ["RNN", "LSTM", "bptt", "BPTTResult", "stream", "step_losses", "vjp_state",
           "vjp_params", "available_backends", "default_backend", "grad_norms", "probe", "Probe",
           "from_torch", "to_torch", "from_jax", "to_jax", "crosscheck", "CrossCheckReport",
           "train_copy", "train_task", "TrainConfig", "TrainResult", "Diverged", "ResettingRNN"]
