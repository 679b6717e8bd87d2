"""Documented variants of the networks, built for the paper's examples (§3.1).

:class:`ResettingRNN` is the "unstable RNN with resetting" of §3.1: a simple RNN whose step is
set to zero whenever the input lies in a reset set X0,

    S_t = H(S_{t-1}, x_t; theta) = 1{x_t not in X0} * RNN(S_{t-1}, x_t; theta)     (§3.1)

The reset is a mask computed from the input inside the network's own ``step`` / ``step_vjp``
pair, so ``npbptt.bptt``, ``npbptt.grad_norms`` and ``npbptt.theory`` run it unchanged (by the
NumPy reference); nothing in BPTT knows about resets.
"""
import numpy as np

from .model import RNN

__all__ = ["ResettingRNN"]


class ResettingRNN(RNN):
    """Simple stacked RNN whose whole state is reset to zero at every step whose input is in X0.

    Parameters
    ----------
    input_size, hidden_size, num_layers, output_size, vocab_size, activation, bias, dtype, seed :
        as :class:`npbptt.RNN`.
    reset_tokens : iterable of ints, required with an embedding (``vocab_size``) and forbidden
        without: X0 = this set of tokens.
    reset_feature : int, required with a dense input and forbidden with an embedding:
        X0 = {x : x[reset_feature] > 0}, i.e. one input channel is a reset indicator.

    Notes
    -----
    * The step is ``S_t = m_t * RNN(S_{t-1}, x_t)`` with ``m_t = 1{x_t not in X0}`` per example,
      for every layer's h; the read-out at a reset step reads h = 0 (the decoder bias).  Its
      vector-Jacobian product masks the incoming gradient: d/dS_{t-1}, d/dtheta and d/dx are zero
      for a reset example, so dS_t/dS_{t-1} = 0 there and every gradient path through a reset
      step is cut.
    * Consequence (tested in ``tests/test_theory.py``): with r(s) the last reset step <= s,
      phi_k(s) = ||d ell_s / dS_{s-k}|| = 0 for every lag k > s - r(s); the lag k = s - r(s)
      (the reset state itself, as the input of step r+1) is in general non-zero.
    * The step that maps S_{s-k-1} to S_{s-k} reads x_{s-k}, so
      phi_{k+1}(s) <= lambda * 1{x_{s-k} not in X0} * phi_k(s) with lambda the Lipschitz
      constant of H off X0.  §3.1 prints the factor as Pr(x_s, ..., x_{s-k+1} not in X0): that
      window is the k inputs phi_k already depends on (phi_k(s) = 0 unless they are all off X0),
      so it cannot factor out of E[phi_k]; the factor that does (when the reset at s-k is
      independent of the gradient) is the single input x_{s-k}: Pr(x_{s-k} not in X0) * lambda.
      With i.i.d. resets of probability p this gives the per-lag rate beta = lambda (1 - p), not
      a rate that improves with k.
    * The compiled kernels implement the stock RNN; they detect the overridden ``step`` and hand
      this network to the NumPy reference, so every ``backend`` gives the reference's result.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, output_size=None, vocab_size=None,
                 activation="tanh", bias=True, dtype=np.float64, seed=None, reset_tokens=None,
                 reset_feature=None):
        super().__init__(input_size, hidden_size, num_layers, output_size, vocab_size,
                         activation=activation, bias=bias, dtype=dtype, seed=seed)
        if self.embedding:
            if reset_feature is not None:
                raise ValueError("reset_feature must be None for a network with an embedding "
                                 "(use reset_tokens)")
            if reset_tokens is None:
                raise ValueError("reset_tokens must be given (a set of tokens in [0, vocab_size="
                                 f"{self.vocab_size})) for a network with an embedding")
            tokens = np.unique(np.asarray(list(reset_tokens)))
            if tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer) \
                    or tokens.min() < 0 or tokens.max() >= self.vocab_size:
                raise ValueError("reset_tokens must be a non-empty set of integer tokens in "
                                 f"[0, vocab_size={self.vocab_size}), got {reset_tokens!r}")
            self.reset_tokens, self.reset_feature = tuple(int(v) for v in tokens), None
        else:
            if reset_tokens is not None:
                raise ValueError("reset_tokens must be None for a dense input (use reset_feature)")
            if not isinstance(reset_feature, (int, np.integer)) or isinstance(reset_feature, bool) \
                    or not 0 <= reset_feature < self.input_size:
                raise ValueError("reset_feature must be an integer in "
                                 f"[0, input_size={self.input_size}), got {reset_feature!r}")
            self.reset_tokens, self.reset_feature = None, int(reset_feature)

    def reset_mask(self, x_t):
        """(B,) bool, True where x_t is in X0 (the state is reset at this step)."""
        if self.embedding:
            return np.isin(x_t, self.reset_tokens)
        return x_t[:, self.reset_feature] > 0

    def step(self, S_prev, x_t):
        """S_t = 1{x_t not in X0} * RNN(S_{t-1}, x_t)  (§3.1, resetting). Returns (S_t, cache)."""
        S, (x_t, caches) = super().step(S_prev, x_t)
        keep = ~self.reset_mask(x_t)
        S = tuple(np.where(keep[None, :, None], s, 0.0) for s in S)   # H(h, x) = 0 for x in X0
        return S, (x_t, caches, keep)

    def step_vjp(self, cache, dS):
        """VJP of :meth:`step`: the mask cuts every path through a reset example."""
        x_t, caches, keep = cache
        dS = tuple(np.where(keep[None, :, None], d, 0.0) for d in dS)
        return super().step_vjp((x_t, caches), dS)

    def config(self):
        cfg = super().config()
        cfg.update(reset_tokens=None if self.reset_tokens is None else list(self.reset_tokens),
                   reset_feature=self.reset_feature)
        return cfg
