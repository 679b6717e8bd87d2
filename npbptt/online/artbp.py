"""ARTBP: Anticipated Reweighted Truncated Backpropagation (Tallec & Ollivier 2017, "Unbiasing
Truncated Backpropagation Through Time", arXiv:1705.08209, §3 and its Algorithm).

Truncated BPTT cuts the backward pass at fixed points, so every path longer than the window is
dropped: the estimate is biased.  ARTBP cuts at *random* points, drawn forward in time, and
multiplies the backpropagated vector by a compensation factor 1/(1 - c_t) each time it crosses a
link that could have been cut but was not, so every path is counted with weight 1 on average.

Notation (npbptt's, 0-based): S_t = F(S_{t-1}, x_t; theta) after step t (Eq. 1 of Aicher, Foti &
Fox 2019), S_{-1} the entering state (a constant), L_t the batch-mean loss read from S_t.  Link t
(t = 1..T-1) is the dependence of S_t on S_{t-1}.  Before step t a truncation X_t in {0, 1} is
drawn with P(X_t = 1 | the draws before) = c_t (the "anticipated" draw: c_t may depend on what
was drawn so far, e.g. on the length of the current segment, never on what comes after).  The
backward sweep (ARTBP's backpropagation rule, Tallec & Ollivier 2017 §3):

    b_{T-1} = dL_{T-1}/dS_{T-1}
    b_{t-1} = dL_{t-1}/dS_{t-1} + (1 - X_t) / (1 - c_t) . b_t . dS_t/dS_{t-1}          (A1)
    g       = (1/T) sum_t  b_t . d^+S_t/dtheta   (+ the read-out's direct terms)        (A2)

i.e. recursion (16) of Aicher et al. with b set to 0 at a truncation and divided by (1 - c_t)
where none was drawn.  Expanding (A1), the path from L_s back to S_r (r <= s) carries the weight
W(s, r) = prod_{t=r+1}^{s} (1 - X_t) / (1 - c_t).  Conditionally on the draws before link r+1,
the c_t along the uncut path are determined, so E[W(s, r)] = prod (1 - c_t)/(1 - c_t) = 1 (the
unbiasedness proposition of Tallec & Ollivier 2017, §3): E[g] is the full-BPTT gradient
``npbptt.bptt(net, x, y, state, K1=T-1, K2=T)`` (= ``npbptt.online.rtrl``) as long as every
c_t < 1.  With c = 0 it *is* full BPTT; uncompensated random truncation (factor 1) is biased.

Notes
-----
* The paper's text could not be consulted while writing this module (offline); the rule above
  is the one of its §3 (truncation probabilities c_t, compensation 1/(1 - c_t) on the links not
  truncated), rederived and checked here by the unbiasedness test of tests/test_online.py.  The
  equation labels (A1)-(A2) are this module's, not the paper's numbering.
* A batch is one dynamical system (as in :mod:`npbptt.online.uoro`): one truncation pattern is
  shared by the B examples.
* Cost: one forward and one backward step per step, as BPTT; memory: the caches of the current
  segment (its length is random: geometric with mean 1/c for a constant c).
"""
import numpy as np

from ..validate import check_inputs, is_int
from .common import OnlineResult, readout_term

__all__ = ["artbp", "artbp_draw", "artbp_estimate", "artbp_stream", "min_length"]


def min_length(K_min, c):
    """A truncation distribution for ``c=``: never cut a segment shorter than ``K_min`` steps,
    then cut with probability ``c`` at each step (segment lengths K_min - 1 + Geometric(c))."""
    if not is_int(K_min) or K_min < 1:
        raise ValueError(f"K_min must be an integer >= 1, got {K_min!r}")
    _check_prob(c, "c")
    return lambda k: 0.0 if k < K_min else float(c)


def _check_prob(p, name):
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)) \
            or not np.isfinite(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a truncation probability in [0, 1), got {p!r}")
    return float(p)


def _prob_fn(c, T):
    """c (a number, a (T,) array, or a callable of the segment length k) -> f(t, k)."""
    if callable(c):
        def f(t, k):
            return _check_prob(c(k), f"c({k})")
        return f
    if isinstance(c, (list, tuple, np.ndarray)):
        a = np.asarray(c, dtype=float)
        if a.shape != (T,):
            raise ValueError(f"c as an array must have shape (T,) = ({T},) (c[t] the probability "
                             f"of a truncation just before step t), got {a.shape}")
        if not (np.isfinite(a).all() and (a >= 0).all() and (a[1:] < 1).all()):
            raise ValueError("c must hold truncation probabilities in [0, 1), got "
                             f"min {a.min()!r}, max {a[1:].max() if T > 1 else a.max()!r}")
        return lambda t, k: float(a[t])
    p = _check_prob(c, "c")
    return lambda t, k: p


def artbp_draw(rng, c, T, k0=0):
    """Draw the truncation pattern of T steps, forward in time (one ``rng.random()`` per link
    t = 1..T-1, in order).

    c : a number in [0, 1) (the same c_t at every link), an array (T,) (``c[t]`` for link t;
        ``c[0]`` unused), or a callable ``c(k)`` of the current segment's length k >= 1 (steps
        since the last truncation), e.g. :func:`min_length`.
    k0 : the length of the segment already running when step 0 is reached (0: none).
    Returns (cuts, probs), each (T,): ``cuts[t]`` X_t (``cuts[0]`` True: the entering state is a
    constant), ``probs[t]`` the c_t it was drawn with (``probs[0]`` = 1.0).
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    f = _prob_fn(c, T)
    cuts, probs = np.zeros(T, bool), np.ones(T)
    cuts[0] = True
    k = k0 + 1
    for t in range(1, T):
        probs[t] = f(t, k)
        cuts[t] = rng.random() < probs[t]
        k = 1 if cuts[t] else k + 1
    return cuts, probs


def _check_pattern(cuts, probs, T):
    cuts, probs = np.asarray(cuts), np.asarray(probs, dtype=float)
    if cuts.shape != (T,) or cuts.dtype != bool:
        raise ValueError(f"cuts must be a boolean array of shape (T,) = ({T},), got "
                         f"{cuts.dtype} {cuts.shape}")
    if probs.shape != (T,):
        raise ValueError(f"probs must have shape (T,) = ({T},), got {probs.shape}")
    keep = ~cuts[1:]
    if not (np.isfinite(probs[1:][keep]).all() and (probs[1:][keep] >= 0).all()
            and (probs[1:][keep] < 1).all()):
        raise ValueError("probs must be in [0, 1) at every link not cut")
    return cuts, probs


def _estimate(net, x, y, S, cuts, probs, loss):
    """(A1)-(A2) on checked inputs: returns (sum_t L_t, sum-gradient dict, S_T)."""
    caches = []
    for t in range(x.shape[0]):
        S, cache = net.step(S, x[t])
        caches.append((cache, S[0][-1]))
    grads = net.zero_grads()
    total = 0.0
    b = None
    for t in range(x.shape[0] - 1, -1, -1):
        cache, h_top = caches[t]
        ell, dh_top = readout_term(net, h_top, y[t], loss, grads)
        total += ell
        if b is None:
            b = tuple(np.zeros_like(s) for s in S)
        b[0][-1] += dh_top                                 # + dL_t/dS_t (L_t reads h_t^(L))
        dtheta, b_prev, dx = net.step_vjp(cache, b)        # b_t . dS_t/dtheta, b_t . dS_t/dS_{t-1}
        for k, v in dtheta.items():
            grads[k] += v
        net.input_vjp(cache[0], dx, grads)
        if t > 0:                                          # (A1): link t cut, or compensated
            b = None if cuts[t] else tuple(v / (1.0 - probs[t]) for v in b_prev)
    return total, grads, S


def artbp_estimate(net, x, y, state, cuts, probs, loss="cross_entropy"):
    """The ARTBP estimate (A1)-(A2) for a *given* truncation pattern: deterministic.

    cuts, probs : (T,) as returned by :func:`artbp_draw` (``cuts[t]`` whether link t is cut,
        ``probs[t]`` its truncation probability c_t; ``probs`` is read only where not cut).
    Returns an OnlineResult (``carry`` None): ``loss`` (1/T) sum_t L_t and ``grads`` the
    compensated gradient of it.  ``probs`` all 0 gives plain truncation at ``cuts`` (biased).
    """
    x, y, S = _check(net, x, y, state, loss)
    T = x.shape[0]
    cuts, probs = _check_pattern(cuts, probs, T)
    total, grads, S = _estimate(net, x, y, S, cuts, probs, loss)
    for v in grads.values():
        v /= T
    return OnlineResult(total / T, grads, net.to_public(S), None)


def _check(net, x, y, state, loss):
    if y is None:
        raise ValueError("y must be given: the targets (T, B) or (T, B, output_size), got None")
    return check_inputs(net, x, y, state, loss)


def artbp(net, x, y, state, rng, c=0.1, loss="cross_entropy"):
    """ARTBP on one chunk (Tallec & Ollivier 2017, §3): an unbiased estimate of the gradient of
    (1/T) sum_t L_t with the entering state held constant, i.e. of
    ``npbptt.bptt(net, x, y, state, K1=T-1, K2=T)`` and ``npbptt.online.rtrl``.

    Parameters
    ----------
    net, x, y, state, loss : as :func:`npbptt.bptt` (same checks and errors; y required; the
        stock network, no dropout masks).
    rng : an ``np.random.Generator``: the truncations (:func:`artbp_draw`).
    c : the truncation distribution: a probability c_t = c in [0, 1) per link, an array (T,)
        (``c[t]`` for the link into step t, ``c[0]`` unused), or a callable ``c(k)`` of the
        current segment's length k (e.g. ``min_length(K_min, p)``).  Mean segment length 1/c for
        a constant c; c = 0 is full BPTT.

    Returns
    -------
    OnlineResult: ``loss``, ``grads`` the estimate (dict like ``net.params``), ``state`` after
    step T, ``carry`` None (the backward pass ends inside the chunk: nothing to carry but the
    state; :func:`artbp_stream` streams a long sequence).
    """
    x, y, S = _check(net, x, y, state, loss)
    cuts, probs = artbp_draw(rng, c, x.shape[0])
    return artbp_estimate(net, x, y, state, cuts, probs, loss)


def artbp_stream(net, x, y, state, rng, c=0.1, loss="cross_entropy", norm=None):
    """Stream ARTBP over a long sequence: the segments between drawn truncations, in order
    (Tallec & Ollivier's online use: the parameters updated at each truncation).

    Yields ``(segment, result)``: ``segment`` the slice of x from one truncation to the next
    (the last one ends at T), ``result`` an OnlineResult whose ``grads`` is the compensated
    gradient (A1)-(A2) of ``(1/norm) sum_{t in segment} L_t`` (backpropagated within the
    segment: the state entering it is where the truncation was drawn), ``loss`` the segment's
    mean loss, ``state`` after it, ``carry`` the segment's (cuts, probs) pattern.
    The truncation before step t is drawn when the stream reaches step t, with ``c`` as in
    :func:`artbp` (a callable sees the running segment's length; an array is indexed over the
    whole sequence), one ``rng.random()`` per link: the pattern equals :func:`artbp_draw`'s on
    the whole sequence.  Summed over the segments the gradients are the whole sequence's ARTBP
    estimate times T / norm, so their mean is the gradient of (1/norm) sum_t L_t.

    norm : the fixed normalisation (> 0); None: the mean segment length 1/c of a constant
        c > 0 (for an array or callable c, or c = 0, give it).  A fixed norm keeps the updates
        unbiased; dividing by each segment's own length would not.

    The parameters are read segment by segment, so a training loop may update ``net.params``
    between segments::

        for seg, res in npbptt.online.artbp_stream(net, x, y, state, rng, c=0.1):
            for k in net.params:
                net.params[k] -= lr * res.grads[k]
    """
    x, y, S = _check(net, x, y, state, loss)
    T = x.shape[0]
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    f = _prob_fn(c, T)
    if norm is None:
        if callable(c) or isinstance(c, (list, tuple, np.ndarray)) or c == 0:
            raise ValueError("norm must be given (a number > 0) unless c is a constant > 0 "
                             f"(then norm = 1/c), got c={c!r}")
        norm = 1.0 / float(c)
    if isinstance(norm, bool) or not isinstance(norm, (int, float, np.integer, np.floating)) \
            or not np.isfinite(norm) or not norm > 0:
        raise ValueError(f"norm must be a finite number > 0, got {norm!r}")
    start, probs = 0, [1.0]
    for t in range(1, T + 1):
        if t < T:
            p = f(t, t - start)
            if not rng.random() < p:
                probs.append(p)
                continue
        seg = slice(start, t)
        n = t - start
        cuts = np.zeros(n, bool)
        cuts[0] = True
        pr = np.asarray(probs)
        total, grads, S = _estimate(net, x[seg], y[seg], S, cuts, pr, loss)
        for v in grads.values():
            v /= norm
        yield seg, OnlineResult(total / n, grads, net.to_public(S), (cuts, pr))
        start, probs = t, [1.0]
