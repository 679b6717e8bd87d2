"""Per-step losses L_t (§2.1) on the read-out, with their gradients.

Each function takes the read-out ``out`` (B, O) and targets, and returns the per-example losses
``ell`` (B,) and ``d ell[b] / d out[b]`` (B, O) -- *not* divided by the batch size.  The batch
loss of a step is L_t = mean_b ell[b] (PyTorch's ``reduction="mean"``), so its gradient is
``dout / B``.

``rmtpp`` is the time part of the RMTPP loss (Du et al. 2016, Eq. 12) as a function of its own
arguments; ``rmtpp_loss`` is the per-event loss of the Book Order network
(:mod:`npbptt.point_process`): the mark's cross-entropy plus ``rmtpp`` on the read-out
``out = [mark logits, u, w]``.
"""
import numpy as np

__all__ = ["LOSSES", "cross_entropy", "mse", "rmtpp", "rmtpp_loss"]


def cross_entropy(out, y):
    """Softmax cross-entropy: ell[b] = logsumexp(out[b]) - out[b, y[b]]; y: (B,) integers."""
    z = out - out.max(axis=1, keepdims=True)
    ez = np.exp(z)
    se = ez.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    ell = np.log(se[:, 0]) - z[rows, y]
    d = ez / se
    d[rows, y] -= 1.0
    return ell, d


def mse(out, y):
    """Squared error averaged over outputs: ell[b] = mean_o (out[b,o] - y[b,o])^2; y: (B, O)."""
    r = out - y
    return (r * r).mean(axis=1), (2.0 / out.shape[1]) * r


# --- the RMTPP time loss (Du et al. 2016, Eq. 12) ---------------------------------------------
# Series of phi(z) = expm1(z)/z = sum_k z^k/(k+1)! and of phi'(z) = sum_k k z^(k-1)/(k+1)!, used
# for |z| < _SMALL: 13 terms leave a remainder below 1e-16 relative at |z| = 0.1.
_SMALL = 0.1
_K = np.arange(13)
_PHI = np.array([1.0 / np.prod(np.arange(1, k + 2, dtype=float)) for k in _K])      # 1/(k+1)!
_DPHI = np.array([(k + 1) / np.prod(np.arange(1, k + 3, dtype=float)) for k in _K])  # (k+1)/(k+2)!


def _log_phi(z):
    """log(expm1(z) / z), 0 at z = 0, without cancellation or overflow (z float64 array)."""
    small = np.abs(z) < _SMALL
    zs = np.where(small, z, 0.0)
    zb = np.where(small, 1.0, z)                     # |zb| >= 0.1 on the lanes that use it
    series = np.log(np.polynomial.polynomial.polyval(zs, _PHI))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        pos = zb + np.log(-np.expm1(-zb)) - np.log(np.abs(zb))      # z > 0: e^z (1 - e^-z) / z
        neg = np.log(-np.expm1(zb)) - np.log(np.abs(zb))            # z < 0: (1 - e^z) / (-z)
    return np.where(small, series, np.where(zb > 0, pos, neg))


def _log_dphi(z):
    """log(phi'(z)), phi'(z) = ((z - 1) e^z + 1) / z^2 > 0 (1/2 at z = 0), stably."""
    small = np.abs(z) < _SMALL
    zs = np.where(small, z, 0.0)
    zb = np.where(small, 1.0, z)
    series = np.log(np.polynomial.polynomial.polyval(zs, _DPHI))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        pos = zb + np.log(zb - 1.0 + np.exp(-zb)) - 2.0 * np.log(np.abs(zb))
        neg = np.log1p((zb - 1.0) * np.exp(zb)) - 2.0 * np.log(np.abs(zb))
    return np.where(small, series, np.where(zb > 0, pos, neg))


def rmtpp(u, w, dt):
    """The RMTPP time negative log-likelihood of a gap, elementwise (Du et al. 2016, Eq. 12).

    With the conditional intensity lambda*(t_j + s) = exp(u + w s) after event j, the density of
    the next gap dt = t_{j+1} - t_j is f*(dt) = lambda*(t_j + dt) exp(-int_0^dt lambda*), so

        nll = -log f*(dt) = -u - w dt - (1/w) e^u + (1/w) e^(u + w dt)          (Eq. 12)
            = -u - w dt + e^u dt phi(w dt),          phi(z) = expm1(z)/z, phi(0) = 1
        du  = d nll/du = e^u dt phi(w dt) - 1
        dw  = d nll/dw = -dt + e^u dt^2 phi'(w dt),  phi'(z) = ((z - 1) e^z + 1)/z^2, phi'(0) = 1/2

    Parameters
    ----------
    u : (B,) the read-out's log-intensity at the event, u_j = v^T h_j + b
    w : scalar or (B,) the learned rate of change of the log-intensity
    dt : (B,) gaps >= 0

    Returns
    -------
    (nll, du, dw), each (B,), in the result dtype of (u, w, dt) (computed in float64).

    Notes
    -----
    Stable for every |w|: phi and phi' are power series for |w dt| < 0.1 (no 1/w: w = 0 is
    the exponential-gap model, nll = -u + e^u dt), and the terms e^u dt phi and
    e^u dt^2 phi' are formed as exp(u + log dt + log phi(w dt)), so they are finite whenever
    their value is (u up to ~709 - log dt; e.g. u = 700, dt = 1e-3 gives 1e301).  Beyond the
    float64 range they are inf, so nll, du and dw are +inf (the true values exceed 1.8e308);
    dt = 0 gives nll = -u, du = -1, dw = 0 exactly.
    """
    u, w, dt = np.broadcast_arrays(*(np.asarray(a) for a in (u, w, dt)))
    dtype = np.result_type(u, w, dt, np.float32)
    u, w, dt = (np.asarray(a, dtype=np.float64) for a in (u, w, dt))
    z = w * dt
    pos = dt > 0
    with np.errstate(divide="ignore", over="ignore"):
        logdt = np.log(np.where(pos, dt, 1.0))
        a = np.where(pos, np.exp(u + logdt + _log_phi(z)), 0.0)          # e^u dt phi(w dt)
        b = np.where(pos, np.exp(u + 2.0 * logdt + _log_dphi(z)), 0.0)   # e^u dt^2 phi'(w dt)
    nll = -u - z + a                          # Eq. (12), -log f*(dt)
    du = a - 1.0
    dw = -dt + b
    return nll.astype(dtype), du.astype(dtype), dw.astype(dtype)


def rmtpp_loss(out, y):
    """Per-event RMTPP loss of the Book Order network (Du et al. 2016, Eqs. 12-14).

    out : (B, M + 2) the read-out [mark logits (M), u, w] of
          :class:`npbptt.point_process.RMTPPLSTM` (w repeated on every row)
    y   : (B, 2) floats (next mark in 0..M-1, next gap dt >= 0)

    ell[b] = cross_entropy(out[b, :M], mark[b]) + rmtpp(u[b], w[b], dt[b]); dout (B, M + 2)
    holds d ell[b] / d out[b] (the w column the per-row dw; the read-out sums it into w).
    """
    M = out.shape[1] - 2
    marks = y[:, 0].astype(np.int64)
    ell, d = cross_entropy(out[:, :M], marks)
    nll, du, dw = rmtpp(out[:, M], out[:, M + 1], y[:, 1])
    dout = np.empty_like(out)
    dout[:, :M] = d
    dout[:, M] = du
    dout[:, M + 1] = dw
    return ell + nll, dout


LOSSES = {"cross_entropy": cross_entropy, "mse": mse, "rmtpp": rmtpp_loss}
