"""The settings of one training run (:class:`TrainConfig`), checked when made.

The values of each experiment of the paper are the defaults tables of its task
(:mod:`npbptt.tasks`); the dataclass defaults below are those of the copy task (§5.1).
"""
import math
from dataclasses import dataclass

import numpy as np

from .backends import BACKENDS
from .losses import LOSSES
from .validate import is_int

__all__ = ["TrainConfig", "RESUMABLE", "ADDED_LATER", "is_real"]

RESUMABLE = ("epochs", "backend")      # the only settings a resumed run may change
# fields added after runs were first written: a config.json without them holds these values
ADDED_LATER = {"norm": "state"}


def is_real(v):
    """A Python or NumPy real number, not a bool."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (the copy-task values of §5.1 in brackets).

    K : fixed truncation (BPTT(2K, K) chunks), or None for adaptive   [5, 10, 15, 20, 30]
    delta : relative-bias tolerance in (0, 1) of Algorithm 1, or None [0.9, 0.5, 0.1]
    epochs : number of passes over the training streams
    lr : gamma, the step is gamma * sqrt(K_n) * g_hat (Algorithm 1, line 11)          [1.0]
    weight_decay : L2 coefficient added to g_hat; clip : None or max ||g_hat|| (Notes)
    K0, K_min, K_max : Algorithm 1's initial truncation and the range of Eq. (25) [15, 2, 100]
    W : probe window: lags 0..W, by BPTT(W, 1) on W + 1 steps (R = W in §4.2)      [100]
    burnin : steps run from the zero state before a probe window, to warm its state
    probes_per_epoch : truncation updates per epoch (alpha of §4.4)                   [1]
    tau_hat, method, beta_alpha, variant : as :func:`npbptt.bounds.kappa_hat` (``beta_alpha``
        is its ``alpha``, the quantile level)
    delta_probes : probes per epoch measuring Delta_hat(K) for the metrics (0: none)
    norm : "state" (the paper: phi_k of Eq. 18, ||dL/dS_{s-k}||) or "param" (issue 20, beyond the
        paper: psi_k = ||dL/dS_{s-k} . dS_{s-k}/dtheta||, bounds with M = 1); every probe of the
        run -- kappa_hat, delta_hat, Figure 3 -- uses it
    loss : "cross_entropy" or "mse"; backend : as :func:`npbptt.bptt`
    seed : seeds every random choice of the run (probe windows)
    """
    K: int | None = None
    delta: float | None = None
    epochs: int = 1
    lr: float = 1.0
    weight_decay: float = 0.0
    clip: float | None = None
    K0: int | None = 15
    K_min: int = 2
    K_max: int = 100
    W: int = 100
    burnin: int = 20
    probes_per_epoch: int = 1
    tau_hat: int | None = None
    method: str = "ols"
    beta_alpha: float = 0.1
    variant: str = "paper"
    delta_probes: int = 10
    norm: str = "state"
    loss: str = "cross_entropy"
    backend: str | None = None
    seed: int = 0

    def __post_init__(self):
        if (self.K is None) == (self.delta is None):
            raise ValueError("K, delta: give exactly one -- a fixed truncation K or a relative-bias "
                             f"tolerance delta for adaptive truncation; got K={self.K!r}, delta={self.delta!r}")
        if self.K is not None and (not is_int(self.K) or self.K < 1):
            raise ValueError(f"K: expected an integer >= 1, got {self.K!r}")
        if self.delta is not None and (not is_real(self.delta) or not 0 < self.delta < 1):
            raise ValueError(f"delta: expected a real number in (0, 1), got {self.delta!r}")
        for name, lo in (("epochs", 1), ("W", 1), ("burnin", 0), ("probes_per_epoch", 1),
                         ("delta_probes", 0), ("seed", 0)):
            v = getattr(self, name)
            if not is_int(v) or v < lo:
                raise ValueError(f"{name}: expected an integer >= {lo}, got {v!r}")
        if not (is_int(self.K_min) and is_int(self.K_max) and 1 <= self.K_min <= self.K_max):
            raise ValueError(f"K_min, K_max: expected integers with 1 <= K_min <= K_max, "
                             f"got K_min={self.K_min!r}, K_max={self.K_max!r}")
        if self.K0 is not None and (not is_int(self.K0) or self.K0 < 1):
            raise ValueError(f"K0: expected None or an integer >= 1, got {self.K0!r}")
        if not is_real(self.lr) or not 0 < self.lr < math.inf:
            raise ValueError(f"lr: expected a finite real number > 0, got {self.lr!r}")
        if not is_real(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay: expected a finite real number >= 0, got {self.weight_decay!r}")
        if self.clip is not None and (not is_real(self.clip) or not 0 < self.clip < math.inf):
            raise ValueError(f"clip: expected None or a finite real number > 0, got {self.clip!r}")
        if self.tau_hat is not None and (not is_int(self.tau_hat) or not 0 <= self.tau_hat < self.W):
            raise ValueError(f"tau_hat: expected None or an integer in [0, W) = [0, {self.W}), "
                             f"got {self.tau_hat!r}")
        if self.method not in ("max", "quantile", "ols"):
            raise ValueError(f"method: expected 'max', 'quantile' or 'ols', got {self.method!r}")
        if not is_real(self.beta_alpha) or not 0 <= self.beta_alpha < 1:
            raise ValueError(f"beta_alpha: expected a real number in [0, 1), got {self.beta_alpha!r}")
        if self.norm not in ("state", "param"):
            raise ValueError(f"norm: expected 'state' or 'param', got {self.norm!r}")
        if self.variant not in ("paper", "authors"):
            raise ValueError(f"variant: expected 'paper' or 'authors', got {self.variant!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {self.backend!r}")

    @property
    def adaptive(self):
        return self.delta is not None

    def bounds_options(self):
        """Keyword arguments of :func:`npbptt.bounds.kappa_hat` / ``delta_hat``."""
        return dict(tau_hat=self.tau_hat, method=self.method, alpha=self.beta_alpha,
                    variant=self.variant, norm=self.norm)
