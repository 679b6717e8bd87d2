"""TBPTT bias bounds and the adaptive truncation level (Aicher, Foti & Fox, UAI 2019, Secs. 3-4).

Pure NumPy functions of the gradient norms of Eq. (18), as produced by BPTT(R, 1):

    phi[k, s] = || dL_s / dS_{s-k} ||,   k = 0..R (lag),  s = 1..S (minibatch example),

so ``phi`` has shape (R+1, S) and ``phi_mean = P_hat(phi)`` has shape (R+1,).

Notes
-----
* Eq. (21) is printed as ``beta_hat = log[max ...]``; Eq. (19) bounds *log* beta by the slopes, so
  the estimator is beta_hat = exp(max slope). Eq. (22) is printed garbled in the same way (a ``log``
  for an ``exp`` and a misplaced bracket); read as beta_tilde = exp(sum_{k,k'} (y_k - y_k')(k - k')
  / sum_{k,k'} (k - k')^2), y_k = log P[phi_k], over the window [tau_hat, R]. That pairwise ratio
  equals the ordinary least-squares slope, which is how it is computed.
* Eq. (23), K >= tau: M P[phi_tau] beta^(K - tau) / (1 - beta) equals M sum_{k >= K} P[phi_k] for an
  exactly geometric tail, i.e. it also counts lag K itself (Theorem 1's sum starts at K + 1), an
  upper bound loose by a factor 1/beta. Kept as printed (the authors' code does the same); it makes
  E_hat continuous at K = tau - 1 -> tau. For K < tau it equals M sum_{k > K} P[phi_k] exactly.
* Eq. (24) with the simplification ||P[g_K / M]|| ~= P[sum_{k<=K} phi_k] (Sec. 4.3), so M cancels.
  The cumulative norm C(K) is extended beyond the window (K > R) by the geometric tail
  P[phi_tau] beta^(k - tau), k = R+1..K, the same extrapolation Eq. (23) makes.
* Underflow: P[phi_k] = 0 gives log 0 = -inf. A slope with a zero endpoint is taken as -inf (no
  finite information, decay into underflow); OLS fits only the positive points. With fewer than
  two positive points on the window every estimator returns beta_hat = 0.0.
* norm="param" (issue 20, beyond the paper): every estimator accepts psi in place of phi,
  psi[k, s] = ||dL_s/dS_{s-k} . dS_{s-k}/dtheta|| (``npbptt.grad_norms(..., norm="param")``).
  Then sum_{k>K} E[psi_k] bounds the bias itself (triangle inequality), so M = 1 and (A-2) is
  not needed: E_hat refuses any other M.  Under an (A-1)-like geometric decay of E[psi_k] the
  same Eqs. (20)-(25) apply unchanged: beta_hat fits the decay of P[psi_k], E_hat (M = 1)
  estimates sum_{k>K} E[psi_k], and C(K) = P[sum_{k<=K} psi_k] replaces Sec. 4.3's stand-in
  for ||P[g_K]|| (by the triangle inequality C(K) bounds ||P[g_K]|| minus the read-out's direct
  term from above; like Sec. 4.3's, Delta_hat is an estimate, not a bound).  The arithmetic is
  identical for both norms; ``norm`` selects the documented meaning, M's check and the names
  in the errors ("phi" / "psi").
* variant="authors" reproduces github.com/aicherc/adaptive_tbptt (tbptt/adaptive_truncation.py)
  where it differs from the paper: see :func:`beta_hat`, :func:`E_hat`, :func:`Delta_hat`. Its
  numerical guards (adding 1e-100 before the log, OLS dropping log values < -50) are replaced by
  the exact log-space handling above and are not reproduced.
* Eq. (24)'s denominator: the authors' code (``calculate_gradient_norms`` with the default
  ``cum_grad_norm_approx=False``) does not use P[sum_{k'<=k} phi_k'] but the norm of the summed
  gradient *vector*, C_vec(k) = ||P_S[sum_{k'<=k} dl_s/dS_{s-k'}]|| (all layers' h and c
  concatenated), which :func:`summed_gradient_norm` computes from the per-lag state gradients.
  ``Delta_hat``, ``delta_hat`` and ``kappa_hat`` take it as ``cum=``; without it (the default,
  and what the trainer does: its probe returns the norms phi only) both variants use
  P[sum phi_k].  By the triangle inequality C_vec(k) <= P[sum_{k'<=k} phi_k'], so the default
  denominator is the larger: Delta_hat is smaller, and kappa_hat(delta) at most the K that the
  authors' code picks from the same probe.
"""
from dataclasses import dataclass

import numpy as np

from .validate import is_int

__all__ = ["Truncation", "P_hat", "beta_hat", "E_hat", "cumulative_norm", "summed_gradient_norm",
           "Delta_hat", "delta_hat", "kappa_hat"]

_METHODS = ("max", "quantile", "ols")
_VARIANTS = ("paper", "authors")


@dataclass(frozen=True)
class Truncation:
    """Result of Eq. (25): ``K`` the truncation, ``beta_hat`` (Eq. 21/22), ``tau_hat``,
    ``delta_hat`` = Delta_hat(K) (Eq. 24) and ``flag``: "ok", "beta_ge_1" (K = K_max),
    "no_K_meets_delta" (K = K_max) or "underflow" (all phi zero, K = K_min)."""
    K: int
    beta_hat: float
    tau_hat: int
    delta_hat: float
    flag: str


# --- validation -------------------------------------------------------------------------------
def _is_real(x):
    return is_int(x) or isinstance(x, (float, np.floating))


def _array(x, name, ndim, what):
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {what}, got {x!r}") from None
    if a.ndim != ndim or a.shape[0] < 2 or a.size < 2:
        raise ValueError(f"{name}: expected {what}, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{name}: expected finite non-negative values (no NaN or inf)")
    return a


_NORMS = ("state", "param")


def _check_norm(norm):
    if norm not in _NORMS:
        raise ValueError(f"norm: expected one of {_NORMS} ('state': phi of Eq. (18); 'param': "
                         f"psi, issue 20, M = 1), got {norm!r}")
    return "phi" if norm == "state" else "psi"


def _check_phi(phi, norm="state"):
    return _array(phi, _check_norm(norm), 2,
                  "a 2-D array (R+1, S) with R+1 >= 2 lags, S >= 1 examples")


def _check_curve(phi_mean, norm="state"):
    return _array(phi_mean, _check_norm(norm) + "_mean", 1,
                  "a 1-D array of R+1 >= 2 mean gradient norms")


def _check_tau(tau_hat, R, default=True):
    if tau_hat is None and default:
        return (9 * R) // 10            # Sec. 4.2: tau_hat = 9R/10, rounded down (exact integer)
    if not is_int(tau_hat) or not 0 <= tau_hat < R:
        raise ValueError(f"tau_hat: expected an integer in [0, R) = [0, {R}), got {tau_hat!r}")
    return int(tau_hat)


def _check_K(K):
    a = np.asarray(K)
    ok = np.issubdtype(a.dtype, np.integer) or (
        np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a)))
    if a.dtype == bool or not ok or np.any(a < 0):
        raise ValueError(f"K: expected integer truncation level(s) >= 0, got {K!r}")
    return a.astype(np.int64)


def _check_beta(beta):
    if not _is_real(beta) or np.isnan(beta) or beta < 0:
        raise ValueError(f"beta: expected a real number >= 0, got {beta!r}")
    return float(beta)


def _check_options(variant, method="max", alpha=0.0):
    if variant not in _VARIANTS:
        raise ValueError(f"variant: expected one of {_VARIANTS}, got {variant!r}")
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    if not _is_real(alpha) or not 0 <= alpha < 1:
        raise ValueError(f"alpha: expected a real number in [0, 1), got {alpha!r}")


def _log(x):
    with np.errstate(divide="ignore"):
        return np.log(x)


# --- Eq. (20)-(22): empirical mean and decay rate ------------------------------------------------
def P_hat(phi, norm="state"):
    """Eq. (20): P_S[phi_k] = (1/S) sum_s phi[k, s]. ``phi`` (R+1, S) -> (R+1,).
    ``norm="param"``: ``phi`` is psi (module Notes)."""
    return _check_phi(phi, norm).mean(axis=1)


def beta_hat(phi_mean, tau_hat=None, method="max", alpha=0.1, variant="paper", norm="state"):
    """Estimate beta of (A-1), Eq. (7), from y_k = log P[phi_k] on the window [tau_hat, R].

    ``phi_mean`` (R+1,); ``tau_hat`` int in [0, R), default floor(9R/10). Returns a float >= 0.
    method "max" (Eq. 21): exp of the largest slope (y_k' - y_k)/(k' - k), tau_hat <= k < k' <= R;
    "quantile": exp of the (1 - alpha) quantile of those slopes (the next-higher order statistic,
    so alpha = 0 gives "max"); "ols" (Eq. 22): exp of the least-squares slope of y_k on k.

    Notes
    -----
    variant="authors": the max uses only the pairs (tau_hat, k'), k' > tau_hat; the least squares
    fits the whole curve [0, R], ignoring tau_hat; the quantile is as in the paper. Slopes with a
    zero endpoint are -inf; fewer than two positive P[phi_k] on the window -> 0.0 (module Notes).
    ``norm="param"``: the decay of P[psi_k] (issue 20; module Notes).
    """
    p = _check_curve(phi_mean, norm)
    R = p.size - 1
    tau = _check_tau(tau_hat, R)
    _check_options(variant, method, alpha)
    lo = 0 if (method == "ols" and variant == "authors") else tau
    y, k = _log(p[lo:]), np.arange(lo, R + 1, dtype=float)
    fin = np.isfinite(y)
    if method == "ols":                 # Eq. (22): sum (y_k - y_k')(k - k') / sum (k - k')^2
        if fin.sum() < 2:
            return 0.0
        x, y = k[fin] - k[fin].mean(), y[fin] - y[fin].mean()
        slope = float(np.dot(x, y) / np.dot(x, x))
    else:                               # Eq. (19): log beta >= slope of every pair k < k' >= tau
        if method == "max" and variant == "authors":
            i, j = np.zeros(R - tau, dtype=int), np.arange(1, R - tau + 1)
        else:
            i, j = np.triu_indices(R + 1 - tau, k=1)
        y0 = np.where(fin, y, 0.0)
        s = np.where(fin[i] & fin[j], (y0[j] - y0[i]) / (k[j] - k[i]), -np.inf)
        slope = s.max() if method == "max" else np.quantile(s, 1 - alpha, method="higher")
    with np.errstate(over="ignore"):
        return float(np.exp(slope))


# --- Eq. (23)-(24): bias bounds ----------------------------------------------------------------
def _log_E(logp, K, beta, tau, variant):
    """log of Eq. (23) with M = 1, for beta < 1; ``K`` int64 array."""
    log_tail = logp[tau] - np.log1p(-beta)          # log(P[phi_tau] / (1 - beta))
    # Eq. (23): E_hat(K) = M P[phi_tau] beta^(K - tau) / (1 - beta), K >= tau (beta^0 = 1 always)
    out, lag = np.full(K.shape, log_tail), K - tau
    out[lag > 0] += lag[lag > 0] * _log(beta)
    small = K < tau
    if np.any(small):
        # head[j] = log sum_{k=j}^{tau-1} P[phi_k], j = 0..tau (head[tau] = log 0)
        head = np.full(tau + 1, -np.inf)
        head[:tau] = np.logaddexp.accumulate(logp[:tau][::-1])[::-1]
        Ks = K[small]
        # Eq. (23), K < tau: sum_{k=K+1}^{tau-1} + phi_tau/(1-beta); authors: sum_{k=K}^{tau} + ...
        h = head[Ks + 1] if variant == "paper" else np.logaddexp(head[Ks], logp[tau])
        out[small] = np.logaddexp(h, log_tail)
    return out


def E_hat(phi_mean, K, beta, tau_hat, M=1.0, variant="paper", norm="state"):
    """Eq. (23), the estimated absolute-bias bound, computed in log space.

    ``phi_mean`` (R+1,); ``K`` int or int array >= 0 (may exceed R: the geometric tail
    extrapolates); returns an array of K's shape (a float for scalar K). beta >= 1 gives inf.
      K <  tau_hat: M (sum_{k=K+1}^{tau-1} P[phi_k] + P[phi_tau] / (1 - beta))
      K >= tau_hat: M P[phi_tau] beta^(K - tau) / (1 - beta)

    Notes
    -----
    variant="authors" (their log_abs_error_estimate): for K < tau_hat the sum starts at k = K and
    counts phi_tau twice, M (sum_{k=K}^{tau} P[phi_k] + P[phi_tau] / (1 - beta)). Both variants
    count lag K for K >= tau_hat (module Notes).

    ``norm="param"``: ``phi_mean`` is P[psi_k] and M must be 1 (psi needs no (A-2)): the
    estimate of sum_{k>K} E[psi_k] (issue 20).
    """
    p = _check_curve(phi_mean, norm)
    tau, K, beta = _check_tau(tau_hat, p.size - 1, default=False), _check_K(K), _check_beta(beta)
    if not _is_real(M) or not 0 < M < np.inf:
        raise ValueError(f"M: expected a finite real number > 0, got {M!r}")
    if norm == "param" and M != 1:
        raise ValueError(f"M: must be 1 with norm='param' (psi bounds the bias with no M, "
                         f"no (A-2)), got {M!r}")
    _check_options(variant)
    if beta >= 1:
        return np.full(K.shape, np.inf)[()]
    with np.errstate(over="ignore"):
        return np.exp(np.log(M) + _log_E(_log(p), K, beta, tau, variant))[()]


def _cum(p, K, beta, tau):
    """C(K) = P[sum_{k=0}^{K} phi_k], geometric tail P[phi_tau] beta^(k - tau) for k > R."""
    R = p.size - 1
    out = np.cumsum(p)[np.minimum(K, R)]
    big = K > R
    if np.any(big) and p[tau] > 0:
        n = (K[big] - R).astype(float)               # lags R+1..K; sum beta^j, j < n
        with np.errstate(over="ignore", invalid="ignore"):
            if beta == 1:
                g = n
            elif beta == np.inf:
                g = np.full(n.shape, np.inf)
            else:
                g = np.expm1(n * _log(beta)) / (beta - 1)
            out[big] += p[tau] * beta ** (R + 1 - tau) * g
    return out


def cumulative_norm(phi_mean, K, beta, tau_hat, norm="state"):
    """C(K) = P[sum_{k=0}^{K} phi_k], the stand-in for ||P[g_K / M]|| in Eq. (24) (Sec. 4.3).

    ``phi_mean`` (R+1,), ``K`` int or int array >= 0 -> K's shape. For K > R the lags R+1..K are
    extrapolated by P[phi_tau] beta^(k - tau) (module Notes).  ``norm="param"``: of psi.
    """
    p = _check_curve(phi_mean, norm)
    tau, K, beta = _check_tau(tau_hat, p.size - 1, default=False), _check_K(K), _check_beta(beta)
    return _cum(p, np.atleast_1d(K), beta, tau).reshape(K.shape)[()]


def summed_gradient_norm(grads):
    """C_vec(k) = ||(1/S) sum_s sum_{k'=0}^{k} grads[k', s]||, k = 0..R: the authors' denominator
    curve of Eq. (24) (module Notes).

    ``grads`` (R+1, S, D): grads[k, s] = dl_s/dS_{s-k}, the gradient of example s's loss with
    respect to the state k steps back, flattened (all layers' h, plus c).  Returns (R+1,).
    """
    g = np.asarray(grads, dtype=float)
    if g.ndim != 3 or g.shape[0] < 2 or not np.all(np.isfinite(g)):
        raise ValueError(f"grads: expected a finite 3-D array (R+1, S, D) with R+1 >= 2, "
                         f"got shape {g.shape}")
    c = np.cumsum(g.mean(axis=1), axis=0)
    return np.sqrt((c * c).sum(axis=1))


def _check_cum(cum, R1):
    if cum is None:
        return None
    c = _array(cum, "cum", 1, f"a 1-D array of R+1 = {R1} cumulative norms")
    if c.size != R1:
        raise ValueError(f"cum: expected R+1 = {R1} values (one per lag 0..R), got {c.size}")
    return c


def Delta_hat(phi_mean, K, beta, tau_hat, variant="paper", norm="state", cum=None):
    """Eq. (24), the estimated relative-bias bound, with M cancelled (Sec. 4.3):

        Delta_hat(K) = E_hat(K) / max_{k <= K} (C(k) - E_hat(k)),   E_hat with M = 1,

    inf where the denominator is not positive (or beta >= 1). ``phi_mean`` (R+1,); ``K`` int or int
    array >= 0 -> K's shape. Scale-free: phi_mean is divided by its maximum first.

    ``cum`` (R+1,), optional: the denominator's curve C(k), k = 0..R, in place of
    P[sum_{k'<=k} phi_k'] -- the authors' code uses :func:`summed_gradient_norm`, the norm of the
    summed gradient vector (module Notes).  Beyond the window (K > R) the denominator then stays
    max_{k <= R} (C(k) - E_hat(k)) (C_vec is not extrapolated).

    Notes
    -----
    variant="authors" (their log_lower_total_grad_norm_estimate): E_hat of that variant and the
    denominator max_{0 <= k <= R} (C(k) - E_hat(k)) over the whole window, the same for every K.
    Their C(k) is C_vec(k) (``cum=summed_gradient_norm(...)``); without ``cum`` it is
    P[sum phi_k] >= C_vec(k), so Delta_hat is at most theirs.

    norm="param": of psi, M = 1 (no M to cancel), C(K) = P[sum_{k<=K} psi_k] (module Notes).
    """
    p = _check_curve(phi_mean, norm)
    tau, K, beta = _check_tau(tau_hat, p.size - 1, default=False), _check_K(K), _check_beta(beta)
    _check_options(variant)
    c = _check_cum(cum, p.size)
    K1 = np.atleast_1d(K)
    out = np.full(K1.shape, np.inf)
    if beta >= 1:
        return out.reshape(K.shape)[()]
    if p.max() > 0:
        if c is not None:
            c = c / p.max()                                          # the same scale as phi
        p = p / p.max()
    logp, R = _log(p), p.size - 1
    E = lambda k: np.exp(_log_E(logp, k, beta, tau, variant))      # noqa: E731
    k = np.arange(R + 1)
    C = _cum(p, k, beta, tau) if c is None else c
    D = C - E(k)                                                     # C(k) - E_hat(k), k = 0..R
    if variant == "paper":
        den = np.maximum.accumulate(D)[np.minimum(K1, R)]
        big = K1 > R    # beyond R, C grows and E_hat decays (K >= tau): the max is at K or <= R
        if np.any(big):
            den[big] = (D.max() if c is not None else
                        np.maximum(D.max(), _cum(p, K1[big], beta, tau) - E(K1[big])))
    else:
        den = np.full(K1.shape, D.max())
    ok = den > 0
    with np.errstate(over="ignore"):
        out[ok] = E(K1[ok]) / den[ok]
    return out.reshape(K.shape)[()]


# --- Eq. (25): adaptive truncation ------------------------------------------------------------
def delta_hat(phi, K, tau_hat=None, method="ols", alpha=0.1, variant="paper", norm="state",
              cum=None):
    """The estimated relative bias Delta_hat(K) (Eq. 24) of truncation K, from ``phi`` (R+1, S),
    beta estimated as in :func:`kappa_hat` (used to report the delta of fixed-K runs).
    ``norm="param"``: from psi (module Notes); ``cum``: as :func:`Delta_hat`."""
    p = P_hat(phi, norm)
    tau = _check_tau(tau_hat, p.size - 1)
    b = beta_hat(p, tau, method, alpha, variant)
    return Delta_hat(p, K, b, tau, variant, cum=cum)


def kappa_hat(phi, delta, K_min, K_max, tau_hat=None, method="ols", alpha=0.1, variant="paper",
              norm="state", cum=None):
    """Eq. (25): the smallest K in [K_min, K_max] with Delta_hat(K) < delta. Returns a Truncation.

    ``phi`` (R+1, S) finite, >= 0, R+1 >= 2; ``delta`` in (0, 1); 1 <= K_min <= K_max;
    ``tau_hat`` in [0, R) (default floor(9R/10)); ``method``/``alpha``/``variant`` as in beta_hat;
    ``cum`` (R+1,) as in :func:`Delta_hat` (the authors' code: :func:`summed_gradient_norm`).
    beta_hat >= 1 -> K_max, "beta_ge_1"; no K meets delta -> K_max, "no_K_meets_delta"; all phi zero
    -> K_min, "underflow" (Delta_hat is then 0/0, reported as inf). Memory O(K_max - K_min).

    Notes
    -----
    norm="param" (issue 20): ``phi`` is psi from ``npbptt.grad_norms(..., norm="param")``; M = 1
    and no (A-2); the same Eqs. (20)-(25) on P[psi_k] (module Notes).
    """
    p = P_hat(phi, norm)
    tau = _check_tau(tau_hat, p.size - 1)
    if not _is_real(delta) or not 0 < delta < 1:
        raise ValueError(f"delta: expected a real number in (0, 1), got {delta!r}")
    if not (is_int(K_min) and is_int(K_max) and 1 <= K_min <= K_max):
        raise ValueError(f"K_min, K_max: expected integers 1 <= K_min <= K_max, "
                         f"got {K_min!r}, {K_max!r}")
    b = beta_hat(p, tau, method, alpha, variant)
    if not np.any(p > 0):                   # 0 / 0: Delta_hat's "denominator not positive" -> inf
        return Truncation(int(K_min), b, tau, float(Delta_hat(p, K_min, b, tau)), "underflow")
    if b >= 1:
        return Truncation(int(K_max), b, tau, np.inf, "beta_ge_1")
    Ks = np.arange(K_min, K_max + 1)
    D = Delta_hat(p, Ks, b, tau, variant, cum=cum)
    hit = np.flatnonzero(D < delta)
    if hit.size == 0:
        return Truncation(int(K_max), b, tau, float(D[-1]), "no_K_meets_delta")
    return Truncation(int(Ks[hit[0]]), b, tau, float(D[hit[0]]), "ok")
