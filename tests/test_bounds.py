"""Tests for npbptt.bounds: Eqs. (20)-(25) of Aicher, Foti & Fox (2019)."""
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npbptt.bounds import (P_hat, Truncation, beta_hat, cumulative_norm, delta_hat, Delta_hat,
                           E_hat, kappa_hat)

FAST = settings(max_examples=40, deadline=None)


def geometric(R, beta, c=1.0):
    return c * beta ** np.arange(R + 1, dtype=float)


def noisy_phi(R, S, beta, sigma, seed, c=3.0):
    """phi[k, s] = c beta^k noise, noise log-normal with mean 1; returns phi and the relative
    standard deviation of P_hat[phi_k]."""
    rng = np.random.default_rng(seed)
    noise = np.exp(sigma * rng.standard_normal((R + 1, S)) - sigma ** 2 / 2)
    return geometric(R, beta, c)[:, None] * noise, math.sqrt(math.expm1(sigma ** 2) / S)


def pair_slopes(y, lo, hi):
    """All slopes (y_k' - y_k)/(k' - k), lo <= k < k' <= hi, by a double loop."""
    return [(y[j] - y[i]) / (j - i) for i in range(lo, hi + 1) for j in range(i + 1, hi + 1)]


# --- Eq. (20) ---------------------------------------------------------------------------------
def test_P_hat_is_the_minibatch_mean():
    phi = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(P_hat(phi), [1.0, 4.0, 7.0, 10.0])


# --- Eqs. (21), (22): beta_hat -------------------------------------------------------------------
@FAST
@given(beta=st.floats(0.05, 0.995), c=st.floats(1e-100, 1e100), R=st.integers(2, 120),
       method=st.sampled_from(["max", "quantile", "ols"]),
       variant=st.sampled_from(["paper", "authors"]))
def test_beta_recovered_exactly_without_noise(beta, c, R, method, variant):
    p = geometric(R, beta, c)
    assert beta_hat(p, method=method, variant=variant) == pytest.approx(beta, rel=1e-9)


@pytest.mark.parametrize("sigma,S", [(0.3, 4000), (1.0, 4000), (0.5, 200)])
def test_beta_recovered_within_noise_tolerance(sigma, S):
    beta, R = 0.9, 60
    phi, rel = noisy_phi(R, S, beta, sigma, seed=1)
    p = P_hat(phi)
    b_max, b_q, b_ols = (beta_hat(p, method=m) for m in ("max", "quantile", "ols"))
    # Eq. (19): every slope error is at most 2 max_k |rel. error of P_hat[phi_k]| / (k' - k)
    assert abs(math.log(b_max) - math.log(beta)) < 10 * rel
    assert abs(math.log(b_q) - math.log(beta)) < 6 * rel
    # least squares over 7 points averages the noise: about rel * sqrt(12 / 7^3) ~ rel / 5
    assert abs(math.log(b_ols) - math.log(beta)) < 2 * rel
    assert b_ols <= b_max and b_q <= b_max


def test_max_and_quantile_match_brute_force_pairs():
    rng = np.random.default_rng(2)
    p = np.exp(rng.normal(size=41) - 0.1 * np.arange(41))
    y, tau = np.log(p), 30
    slopes = pair_slopes(y, tau, 40)
    assert beta_hat(p, tau, "max") == pytest.approx(math.exp(max(slopes)), rel=1e-12)
    q = np.quantile(slopes, 0.8, method="higher")
    assert beta_hat(p, tau, "quantile", alpha=0.2) == pytest.approx(math.exp(q), rel=1e-12)
    assert beta_hat(p, tau, "quantile", alpha=0.0) == beta_hat(p, tau, "max")
    authors = max((y[j] - y[tau]) / (j - tau) for j in range(tau + 1, 41))
    assert beta_hat(p, tau, "max", variant="authors") == pytest.approx(math.exp(authors), rel=1e-12)


def test_ols_is_the_pairwise_ratio_of_eq_22():
    rng = np.random.default_rng(3)
    p = np.exp(rng.normal(size=31) - 0.2 * np.arange(31))
    y, tau = np.log(p), 20
    pairs = [(y[i] - y[j], i - j) for i in range(tau, 31) for j in range(tau, 31)]
    ratio = sum(dy * dk for dy, dk in pairs) / sum(dk * dk for _, dk in pairs)
    assert beta_hat(p, tau, "ols") == pytest.approx(math.exp(ratio), rel=1e-12)
    whole = np.polyfit(np.arange(31), y, 1)[0]
    assert beta_hat(p, tau, "ols", variant="authors") == pytest.approx(math.exp(whole), rel=1e-10)


def test_default_tau_hat_is_nine_tenths_of_R():
    p = np.ones(31)
    p[27:] = [1.0, 0.5, 0.25, 0.125]          # decays only from k = 27 = floor(0.9 * 30)
    assert beta_hat(p) == pytest.approx(0.5)
    assert kappa_hat(p[:, None], 0.5, 1, 5).tau_hat == 27


def test_authors_beta_variants_differ_from_paper():
    # window [3, 6]: y = 0, -1, -1.1, -3; the steepest-rising pair is (4, 5), not from tau
    p = np.exp([5.0, 5.0, 5.0, 0.0, -1.0, -1.1, -3.0])
    assert beta_hat(p, 3, "max") == pytest.approx(math.exp(-0.1))
    assert beta_hat(p, 3, "max", variant="authors") == pytest.approx(math.exp(-1.1 / 2))
    # authors' least squares fits [0, R], including the flat head
    assert beta_hat(p, 3, "ols", variant="authors") < beta_hat(p, 3, "ols") - 0.1


def test_zeros_give_no_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = np.array([1.0, 0.5, 0.25, 0.0, 0.0])
        for m in ("max", "quantile", "ols"):
            assert beta_hat(p, 1, m) == pytest.approx(0.5)
            assert beta_hat(np.zeros(5), 1, m) == 0.0
            assert beta_hat(p, 3, m) == 0.0             # window all zero
            assert beta_hat(p, 2, m) == 0.0             # one positive point on the window


# --- Eq. (23): E_hat ---------------------------------------------------------------------------
@FAST
@given(beta=st.floats(0.1, 0.97), M=st.floats(0.1, 10.0), R=st.integers(5, 60),
       tau_frac=st.floats(0.0, 0.99))
def test_E_hat_equals_direct_tail_sum_on_geometric_curve(beta, M, R, tau_frac):
    tau = min(int(tau_frac * R), R - 1)
    c = 2.5
    p = geometric(R, beta, c)
    tail = lambda lo: M * math.fsum(c * beta ** k for k in range(lo, 6000))  # noqa: E731
    for K in sorted({0, max(tau - 1, 0), tau, tau + 1, R, R + 7}):
        if K < tau:   # Eq. (23), K < tau: exactly M sum_{k > K} P[phi_k]
            assert E_hat(p, K, beta, tau, M) == pytest.approx(tail(K + 1), rel=1e-9)
        else:         # Eq. (23), K >= tau, as printed: M sum_{k >= K}, >= the true tail sum
            assert E_hat(p, K, beta, tau, M) == pytest.approx(tail(K), rel=1e-9)
            assert E_hat(p, K, beta, tau, M) * beta == pytest.approx(tail(K + 1), rel=1e-9)


def test_E_hat_shapes_and_beta_ge_1():
    p = geometric(10, 0.5)
    assert E_hat(p, np.arange(6).reshape(2, 3), 0.5, 8).shape == (2, 3)
    assert isinstance(E_hat(p, 3, 0.5, 8), float)
    assert np.all(np.isinf(E_hat(p, [0, 9, 50], 1.0, 8)))
    assert np.isinf(E_hat(p, 2, 1.5, 8))


def test_authors_E_hat_adds_phi_K_and_phi_tau_below_tau():
    rng = np.random.default_rng(4)
    p, tau, beta = rng.uniform(0.1, 1.0, size=21), 15, 0.7
    K = np.arange(0, 30)
    diff = E_hat(p, K, beta, tau, 2.0, variant="authors") - E_hat(p, K, beta, tau, 2.0)
    below = K < tau
    np.testing.assert_allclose(diff[below], 2.0 * (p[K[below]] + p[tau]), rtol=1e-10)
    np.testing.assert_allclose(diff[~below], 0.0, atol=0)


# --- C(K) and Eq. (24) ---------------------------------------------------------------------------
def test_cumulative_norm_inside_and_beyond_window():
    rng = np.random.default_rng(5)
    p, tau, beta, R = rng.uniform(0.0, 1.0, size=11), 8, 0.6, 10
    np.testing.assert_allclose(cumulative_norm(p, np.arange(11), beta, tau), np.cumsum(p))
    for K in (11, 12, 40):
        direct = p.sum() + math.fsum(p[tau] * beta ** (k - tau) for k in range(R + 1, K + 1))
        assert cumulative_norm(p, K, beta, tau) == pytest.approx(direct, rel=1e-12)
    assert cumulative_norm(p, 13, 1.0, tau) == pytest.approx(p.sum() + 3 * p[tau])


def brute_Delta(p, K, beta, tau, variant="paper"):
    """Eq. (24) by loops: E(K) / max_{k<=K} (C(k) - E(k)), E of Eq. (23) with M = 1."""
    def E(k):
        if k >= tau:
            return p[tau] * beta ** (k - tau) / (1 - beta)
        lo, hi = (k + 1, tau - 1) if variant == "paper" else (k, tau)
        return math.fsum(p[lo:hi + 1]) + p[tau] / (1 - beta)

    def C(k):
        return math.fsum(p[:k + 1]) + math.fsum(p[tau] * beta ** (j - tau)
                                                 for j in range(len(p), k + 1))
    ks = range(K + 1) if variant == "paper" else range(len(p))
    den = max(C(k) - E(k) for k in ks)
    return E(K) / den if den > 0 else math.inf


@pytest.mark.parametrize("variant", ["paper", "authors"])
def test_Delta_hat_matches_brute_force(variant):
    rng = np.random.default_rng(6)
    p = rng.uniform(0.2, 1.0, size=26) * 0.85 ** np.arange(26)
    tau, beta = 20, 0.85
    K = np.arange(0, 40)
    expected = [brute_Delta(p, int(k), beta, tau, variant) for k in K]
    np.testing.assert_allclose(Delta_hat(p, K, beta, tau, variant), expected, rtol=1e-10)


def test_authors_Delta_differs_from_paper():
    p = geometric(30, 0.8)
    paper, authors = Delta_hat(p, [1, 2], 0.8, 27), Delta_hat(p, [1, 2], 0.8, 27, "authors")
    assert np.all(np.isinf(paper)) and np.all(np.isfinite(authors))


@FAST
@given(beta=st.floats(0.3, 0.95), seed=st.integers(0, 10 ** 6), R=st.integers(5, 60))
def test_Delta_hat_non_increasing_in_K(beta, seed, R):
    p = geometric(R, beta) * np.random.default_rng(seed).uniform(0.5, 1.5, size=R + 1)
    d = Delta_hat(p, np.r_[0:2 * R, 10 ** 4, 10 ** 5], beta, (9 * R) // 10)
    finite = np.isfinite(d)
    assert finite[-1] and np.all(finite[np.argmax(finite):])     # inf only on a prefix
    f = d[finite]
    assert np.all(f[1:] <= f[:-1] * (1 + 1e-12))


# --- Eq. (25): kappa_hat -----------------------------------------------------------------------
@FAST
@given(beta=st.floats(0.3, 0.97), sigma=st.floats(0.0, 1.0), seed=st.integers(0, 10 ** 6),
       R=st.integers(3, 50), d1=st.floats(0.01, 0.99), d2=st.floats(0.01, 0.99),
       method=st.sampled_from(["max", "quantile", "ols"]),
       variant=st.sampled_from(["paper", "authors"]))
def test_kappa_non_increasing_in_delta(beta, sigma, seed, R, d1, d2, method, variant):
    phi, _ = noisy_phi(R, 8, beta, sigma, seed)
    lo, hi = min(d1, d2), max(d1, d2)
    a = kappa_hat(phi, lo, 1, 200, method=method, variant=variant)
    b = kappa_hat(phi, hi, 1, 200, method=method, variant=variant)
    assert b.K <= a.K


def test_kappa_is_smallest_K_meeting_delta():
    phi, _ = noisy_phi(40, 16, 0.85, 0.3, seed=7)
    t = kappa_hat(phi, 0.1, 2, 300)
    assert isinstance(t, Truncation) and t.flag == "ok"
    assert t.delta_hat < 0.1 and t.delta_hat == delta_hat(phi, t.K)
    assert delta_hat(phi, t.K - 1) >= 0.1
    assert t.beta_hat == beta_hat(P_hat(phi), 36, "ols") and t.tau_hat == 36


def test_kappa_flags():
    rising = geometric(20, 1.1)[:, None]
    t = kappa_hat(rising, 0.1, 2, 77)
    assert (t.K, t.flag) == (77, "beta_ge_1") and t.beta_hat >= 1 and math.isinf(t.delta_hat)
    t = kappa_hat(np.ones((21, 2)), 0.1, 2, 77)                 # flat: beta_hat == 1 exactly
    assert (t.K, t.flag, t.beta_hat) == (77, "beta_ge_1", 1.0)
    t = kappa_hat(np.zeros((21, 4)), 0.1, 3, 77)
    assert (t.K, t.flag) == (3, "underflow")
    slow = geometric(20, 0.99)[:, None]
    t = kappa_hat(slow, 0.01, 1, 10)
    assert (t.K, t.flag) == (10, "no_K_meets_delta") and t.delta_hat >= 0.01
    assert kappa_hat(slow, 0.01, 1, 10_000).flag == "ok"
    t = kappa_hat(geometric(20, 0.5)[:, None], 0.5, 5, 9)      # already met at K_min
    assert (t.K, t.flag) == (5, "ok")


# --- log space ---------------------------------------------------------------------------------
def test_tiny_norms_and_large_K_stay_finite():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = geometric(50, 0.8)
        tiny = 1e-300 * p
        assert beta_hat(tiny, method="ols") == pytest.approx(0.8, rel=1e-9)
        K = np.array([0, 10, 45, 10 ** 6, 10 ** 12])
        e = E_hat(tiny, K, 0.8, 45, M=1e300)
        assert np.all(np.isfinite(e)) and np.all(e >= 0) and e[-1] == 0.0
        np.testing.assert_allclose(e[:3], E_hat(p, K[:3], 0.8, 45), rtol=1e-9)
        np.testing.assert_allclose(Delta_hat(tiny, K, 0.8, 45), Delta_hat(p, K, 0.8, 45),
                                   rtol=1e-9)
        assert kappa_hat(tiny[:, None], 0.1, 1, 100).K == kappa_hat(p[:, None], 0.1, 1, 100).K
        slow = geometric(50, 0.999)
        np.testing.assert_allclose(Delta_hat(1e306 * slow, K, 0.999, 45),
                                   Delta_hat(slow, K, 0.999, 45), rtol=1e-9)
        assert np.isfinite(cumulative_norm(p, 10 ** 12, 0.8, 45))
        assert np.isinf(cumulative_norm(p, 10 ** 6, 1.5, 45))
        under = p.copy()
        under[30:] = 0.0                                     # partial underflow
        assert not np.any(np.isnan(Delta_hat(under, K, beta_hat(under), 45)))
        assert E_hat(p, 45, 0.0, 45) == pytest.approx(p[45])   # beta^0 = 1 even for beta = 0


# --- validation --------------------------------------------------------------------------------
GOOD = geometric(20, 0.8)[:, None] * np.ones((1, 3))


@pytest.mark.parametrize("call,name", [
    (lambda: kappa_hat(GOOD, 0.0, 1, 10), "delta"),
    (lambda: kappa_hat(GOOD, 1.0, 1, 10), "delta"),
    (lambda: kappa_hat(GOOD, float("nan"), 1, 10), "delta"),
    (lambda: kappa_hat(GOOD, 0.1, 0, 10), "K_min"),
    (lambda: kappa_hat(GOOD, 0.1, 5, 4), "K_min"),
    (lambda: kappa_hat(GOOD, 0.1, 1.5, 4), "K_min"),
    (lambda: kappa_hat(GOOD[0], 0.1, 1, 10), "phi"),
    (lambda: kappa_hat(GOOD[:1], 0.1, 1, 10), "phi"),
    (lambda: kappa_hat(-GOOD, 0.1, 1, 10), "phi"),
    (lambda: kappa_hat(np.where(GOOD > 0.5, np.nan, GOOD), 0.1, 1, 10), "phi"),
    (lambda: kappa_hat(GOOD + np.inf, 0.1, 1, 10), "phi"),
    (lambda: kappa_hat(GOOD, 0.1, 1, 10, tau_hat=20), "tau_hat"),
    (lambda: kappa_hat(GOOD, 0.1, 1, 10, tau_hat=-1), "tau_hat"),
    (lambda: kappa_hat(GOOD, 0.1, 1, 10, method="median"), "method"),
    (lambda: kappa_hat(GOOD, 0.1, 1, 10, method="quantile", alpha=1.0), "alpha"),
    (lambda: kappa_hat(GOOD, 0.1, 1, 10, variant="pytorch"), "variant"),
    (lambda: delta_hat(GOOD, -1), "K"),
    (lambda: beta_hat(np.array([1.0]), 0), "phi_mean"),
    (lambda: E_hat(GOOD[:, 0], 2, 0.5, 10, M=0.0), "M"),
    (lambda: E_hat(GOOD[:, 0], 2.5, 0.5, 10), "K"),
    (lambda: E_hat(GOOD[:, 0], 2, -0.5, 10), "beta"),
    (lambda: E_hat(GOOD[:, 0], 2, 0.5, None), "tau_hat"),
    (lambda: Delta_hat(GOOD[:, 0], 2, float("nan"), 10), "beta"),
    (lambda: cumulative_norm(GOOD[:, 0], 2, 0.5, 10.0), "tau_hat"),
    (lambda: P_hat(np.ones((3, 0))), "phi"),
])
def test_bad_arguments_raise_value_error(call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        call()


# --- the authors' denominator of Eq. (24): the norm of the summed gradient vector ---------------
from npbptt.bounds import summed_gradient_norm  # noqa: E402

_EPS = 1e-100


def _authors_adaptive_K(grad_norm, cum_grad_norm, tau, delta):
    """A transcription of aicherc/adaptive_tbptt tbptt/adaptive_truncation.py at 1bab866:
    adaptive_K_estimate(..., beta_estimate_method='ols') with estimate_logbeta_ols,
    log_abs_error_estimate, log_lower_total_grad_norm_estimate, log_rel_error_estimate.
    Returns (K_est, rel_error over trun_range = 1..seq_len)."""
    seq_len = grad_norm.shape[0]
    trun_range = np.arange(seq_len) + 1
    lg = np.log(np.mean(grad_norm, axis=1) + _EPS)
    lcum = np.log(cum_grad_norm + _EPS)
    Y, X = lg.copy(), np.arange(seq_len, dtype=float)              # estimate_logbeta_ols
    X[Y < -50], Y[Y < -50] = np.nan, np.nan
    logbeta = np.nansum((X - np.nanmean(X)) * (Y - np.nanmean(Y))) / np.nansum((X - np.nanmean(X)) ** 2)

    def abs_err(tr):                                                # log_abs_error_estimate
        lse = np.zeros(tau + 1)
        lse[tau] = lg[tau]
        for t in reversed(range(tau)):
            lse[t] = np.logaddexp(lse[t + 1], lg[t])
        out = np.zeros_like(tr, dtype=float)
        assert logbeta < 0
        out[tr < tau] = np.logaddexp(lse[tr[tr < tau]], lg[tau] - np.log(1 - np.exp(logbeta)))
        out[tr >= tau] = lg[tau] + (tr[tr >= tau] - tau) * logbeta - np.log(1 - np.exp(logbeta))
        return out

    lo_range = np.arange(0, seq_len)                                # log_lower_total_grad_norm
    ae = abs_err(lo_range)
    bound = lcum > ae
    lows = np.full(seq_len, -np.inf)
    lows[bound] = lcum[bound] + np.log(1.0 - np.exp(ae[bound] - lcum[bound]))
    rel = abs_err(trun_range) - np.max(lows)
    if np.all(rel > np.log(delta + _EPS)):
        return trun_range[-1], np.exp(rel)
    return trun_range[np.argmax(rel < np.log(delta + _EPS))], np.exp(rel)


def _state_grads(R, S, D, beta, seed):
    """grads[k, s] (R+1, S, D): random directions, norms c beta^k with noise; a shared mean
    direction so that the summed vector does not cancel entirely."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((R + 1, S, D)) + 0.7 * rng.standard_normal(D)
    g /= np.linalg.norm(g, axis=2, keepdims=True)
    scale = 2.0 * beta ** np.arange(R + 1)[:, None] * np.exp(0.3 * rng.standard_normal((R + 1, S)))
    return g * scale[:, :, None]


def test_summed_gradient_norm_is_the_norm_of_the_summed_mean_vector():
    g = _state_grads(12, 5, 7, 0.8, 0)
    want = [np.linalg.norm(sum(g[j, s] for j in range(k + 1) for s in range(5)) / 5)
            for k in range(13)]
    np.testing.assert_allclose(summed_gradient_norm(g), want, rtol=1e-12)
    phi = np.linalg.norm(g, axis=2)                                  # triangle inequality
    assert np.all(summed_gradient_norm(g) <= np.cumsum(phi.mean(axis=1)) * (1 + 1e-12))
    assert summed_gradient_norm(g)[-1] < 0.9 * np.cumsum(phi.mean(axis=1))[-1]
    with pytest.raises(ValueError, match="^grads"):
        summed_gradient_norm(g[:, :, 0])


@pytest.mark.parametrize("seed, beta, delta", [(0, 0.8, 0.1), (1, 0.9, 0.5), (2, 0.85, 0.05),
                                               (3, 0.7, 0.01)])
def test_authors_variant_with_summed_vector_norm_matches_the_authors_code(seed, beta, delta):
    R, tau = 40, 30
    g = _state_grads(R, 8, 6, beta, seed)
    phi = np.linalg.norm(g, axis=2)
    cum = summed_gradient_norm(g)
    K_auth, rel_auth = _authors_adaptive_K(phi, cum, tau, delta)
    t = kappa_hat(phi, delta, 1, R + 1, tau_hat=tau, method="ols", variant="authors", cum=cum)
    assert t.K == K_auth
    Ks = np.arange(1, R + 2)
    got = delta_hat(phi, Ks, tau_hat=tau, method="ols", variant="authors", cum=cum)
    np.testing.assert_allclose(got, rel_auth, rtol=1e-9)
    # without cum the denominator is P[sum phi_k] >= theirs: Delta_hat smaller, K no larger
    plain = delta_hat(phi, Ks, tau_hat=tau, method="ols", variant="authors")
    assert np.all(plain <= got * (1 + 1e-12)) and np.any(plain < 0.95 * got)
    assert kappa_hat(phi, delta, 1, R + 1, tau_hat=tau, variant="authors").K <= t.K


def test_cum_is_checked_and_defaults_to_the_cumulative_phi():
    phi = np.linalg.norm(_state_grads(20, 4, 5, 0.8, 5), axis=2)
    p = phi.mean(axis=1)
    b = beta_hat(p, 15, "ols")
    for variant in ("paper", "authors"):                            # within the window K <= R
        np.testing.assert_allclose(
            Delta_hat(p, np.arange(1, 21), b, 15, variant),
            Delta_hat(p, np.arange(1, 21), b, 15, variant, cum=np.cumsum(p)), rtol=1e-12)
    # beyond it, a given cum is not extrapolated: the denominator stays the window's maximum
    E = E_hat(p, 29, b, 15)
    den = max(np.cumsum(p)[k] - E_hat(p, k, b, 15) for k in range(21))
    assert Delta_hat(p, 29, b, 15, cum=np.cumsum(p)) == pytest.approx(E / den, rel=1e-12)
    assert Delta_hat(p, 29, b, 15) < Delta_hat(p, 29, b, 15, cum=np.cumsum(p))
    with pytest.raises(ValueError, match="^cum"):
        Delta_hat(p, 3, b, 15, cum=np.cumsum(p)[:-1])
    with pytest.raises(ValueError, match="^cum"):
        kappa_hat(phi, 0.1, 1, 30, cum=-np.cumsum(p))
