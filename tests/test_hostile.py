"""Hostile inputs on every CPU backend: for each malformed network or input, every public entry
point either raises a ValueError naming the argument (and, for a parameter, the shape or dtype
found and the one expected) or returns what the NumPy reference returns on the corrected input
-- never a wrong result, a NumPy-internal error or a traceback of another kind (issue 22, 2-3).

After every rejected call a call on the valid network must still be right: a rejected call must
not leave anything behind (the numba backend's per-thread plans) that a later call would use.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import npbptt
from npbptt.bptt import bptt_reference, step_losses_reference
from npbptt.probe import grad_norms_reference
from npbptt.validate import check_inputs
from problems import make_problem

BACKENDS = [b for b in ("numpy", "numba") if b in npbptt.available_backends()]
OPS = ("bptt", "step_losses", "grad_norms", "stream")


def _call(op, net, x, y, state, loss, backend):
    """The public entry point ``op``; returns a flat list of result arrays."""
    if op == "bptt":
        T = np.shape(x)[0]
        r = npbptt.bptt(net, x, y, state, K1=T, K2=1, loss=loss, backend=backend)
        return [np.array(r.loss)] + [r.grads[k] for k in sorted(r.grads)] + _flat(r.state)
    if op == "step_losses":
        L, S = npbptt.step_losses(net, x, y, state, loss=loss, backend=backend)
        return [L] + _flat(S)
    if op == "grad_norms":
        return [npbptt.grad_norms(net, x, y, state, loss=loss, backend=backend)]
    out = []
    for _, r in npbptt.stream(net, x, y, state, K=2, loss=loss, backend=backend):
        out += [np.array(r.loss)] + [r.grads[k] for k in sorted(r.grads)] + _flat(r.state)
    return out


def _flat(state):
    return list(state) if isinstance(state, tuple) else [state]


def _reference(op, net, x, y, state, loss):
    """The same outputs from the NumPy references called directly on valid input."""
    xv, yv, S = check_inputs(net, x, y, state, loss)
    if op == "bptt":
        T = xv.shape[0]
        value, grads, S_T = bptt_reference(net, xv, yv, S, T, 1, loss)
        return [np.array(value)] + [grads[k] for k in sorted(grads)] + _flat(net.to_public(S_T))
    if op == "step_losses":
        L, S_T = step_losses_reference(net, xv, yv, S, loss)
        return [L] + _flat(net.to_public(S_T))
    if op == "grad_norms":
        return [grad_norms_reference(net, xv, yv, S, loss)]
    return _call(op, net, x, y, state, loss, "numpy")


def _assert_same(got, want, dtype):
    """Equal to round-off: 1e-12 of the array's scale in float64; in float32 (the kernels sum in
    another order than the reference) 1e-4, far below what a wrong parameter layout gives."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        scale = max(1.0, float(np.abs(w).max())) if w.size else 1.0
        tol = 1e-12 if dtype == np.float64 else 1e-4
        np.testing.assert_allclose(g, w, rtol=0, atol=tol * scale)


# --- malformed parameters --------------------------------------------------------------------------
def _params_cases(net, rng):
    """(description, mutate(params) -> params, expected substrings of the error or None when the
    call must succeed and equal the reference on the original parameters)."""
    names = list(net.params)
    cases = []
    for name in names:
        a = net.params[name]
        shape = a.shape
        if a.ndim == 2 and shape[0] != shape[1]:
            cases.append((f"{name} transposed", lambda p, n=name: {**p, n: np.ascontiguousarray(p[n].T)},
                          [repr(name), str(shape[::-1]), str(shape)]))
        if a.ndim == 2 or a.size > 1:
            flat = (a.size,) if a.ndim == 2 else (1, a.size)
            cases.append((f"{name} reshaped to {flat}", lambda p, n=name, f=flat: {**p, n: p[n].reshape(f)},
                          [repr(name), str(flat), str(shape)]))
        bigger = (shape[0] + 1,) + shape[1:]
        cases.append((f"{name} with a row too many",
                      lambda p, n=name, s=bigger: {**p, n: np.concatenate([p[n], p[n][:1]])},
                      [repr(name), str(bigger), str(shape)]))
        cases.append((f"{name} missing", lambda p, n=name: {k: v for k, v in p.items() if k != n},
                      ["missing", repr(name)]))
        other = np.float32 if net.dtype == np.float64 else np.float64
        cases.append((f"{name} as {np.dtype(other)}", lambda p, n=name, o=other: {**p, n: p[n].astype(o)},
                      [repr(name), np.dtype(other).name, np.dtype(net.dtype).name]))
        swapped = np.dtype(net.dtype).newbyteorder()
        cases.append((f"{name} in byte order {swapped.str}",
                      lambda p, n=name, s=swapped: {**p, n: p[n].astype(s)},
                      [repr(name), swapped.str, "native byte order"]))
        for bad in (np.nan, np.inf, -np.inf):
            cases.append((f"{name} holding {bad}", lambda p, n=name, v=bad: {**p, n: _poke(p[n], v, rng)},
                          [repr(name), "NaN or inf"]))
        cases.append((f"{name} as a list", lambda p, n=name: {**p, n: p[n].tolist()},
                       [repr(name), "NumPy array"]))
        # Layouts that are valid and must give the reference's result: strided, Fortran, read-only.
        cases.append((f"{name} strided", lambda p, n=name: {**p, n: _strided(p[n])}, None))
        cases.append((f"{name} Fortran-ordered", lambda p, n=name: {**p, n: np.asfortranarray(p[n])}, None))
        cases.append((f"{name} read-only", lambda p, n=name: {**p, n: _readonly(p[n])}, None))
    cases.append(("an unknown parameter", lambda p: {**p, "weight_hh_l9": p["decoder.bias"].copy()},
                  ["unknown", "'weight_hh_l9'"]))
    return cases


def _poke(a, v, rng):
    a = a.copy()
    a.flat[int(rng.integers(a.size))] = v
    return a


def _strided(a):
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    out = big[..., ::2]
    assert not out.flags.c_contiguous or out.size <= 1
    return out


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@st.composite
def hostile_param_problems(draw):
    kind = draw(st.sampled_from(["lstm", "rnn"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    embedding = draw(st.booleans())
    prob = make_problem(rng, kind=kind, layers=draw(st.integers(1, 2)), embedding=embedding,
                        loss=draw(st.sampled_from(["cross_entropy", "mse"])),
                        T=draw(st.integers(1, 5)), B=draw(st.integers(1, 9)),
                        H=draw(st.integers(2, 5)), E=draw(st.integers(1, 4)),
                        O=draw(st.integers(2, 5)), V=draw(st.sampled_from([3, 7])),
                        bias=draw(st.booleans()),
                        dtype=draw(st.sampled_from([np.float64, np.float32])))
    cases = _params_cases(prob.net, rng)
    case = draw(st.sampled_from(cases))
    return prob, case, draw(st.sampled_from(BACKENDS)), draw(st.sampled_from(OPS))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_param_problems())
def test_malformed_parameters_are_named_or_computed_as_the_reference(args):
    prob, (what, mutate, expected), backend, op = args
    good = prob.net
    bad = good.copy()
    bad.params = mutate(good.params)
    want = _reference(op, good, prob.x, prob.y, prob.state, prob.loss)
    if expected is None:
        got = _call(op, bad, prob.x, prob.y, prob.state, prob.loss, backend)
        _assert_same(got, want, good.dtype)
    else:
        with pytest.raises(ValueError) as e:
            _call(op, bad, prob.x, prob.y, prob.state, prob.loss, backend)
        msg = str(e.value)
        for part in expected:
            assert part in msg, f"{what}: {part!r} not in {msg!r}"
    # The rejected (or odd-layout) call left nothing behind: the valid network is right.
    _assert_same(_call(op, good, prob.x, prob.y, prob.state, prob.loss, backend), want, good.dtype)


# --- malformed inputs ------------------------------------------------------------------------------
def _input_cases(prob):
    """(description, mutate(x, y, state) -> (x, y, state), error substrings or None)."""
    net, x, y, state = prob.net, prob.x, prob.y, prob.state
    T, B = x.shape[:2]
    lstm = isinstance(state, tuple)
    cases = [
        ("x with a step axis too few", lambda x, y, s: (x[0], y, s), ["x must have shape"]),
        ("x strided", lambda x, y, s: (_strided_rows(x), y, s), None),
        ("x in swapped byte order", lambda x, y, s: (x.astype(x.dtype.newbyteorder()), y, s), None),
        ("y strided", lambda x, y, s: (x, _strided_rows(y), s), None),
        ("y of the wrong length", lambda x, y, s: (x, y[:-1] if T > 1 else np.concatenate([y, y]), s),
         ["y must have shape"]),
    ]
    if B > 1:
        cases.append(("x transposed", lambda x, y, s: (np.swapaxes(x, 0, 1), y, s),
                      ["must have shape"] if T != B else None))
    if net.embedding:
        cases += [("x as floats", lambda x, y, s: (x.astype(np.float64), y, s), ["x must hold integer tokens"]),
                  ("x out of the vocabulary", lambda x, y, s: (x + net.vocab_size, y, s), ["vocab_size"]),
                  ("x negative", lambda x, y, s: (x - net.vocab_size, y, s), ["vocab_size"])]
    else:
        cases += [("x holding NaN", lambda x, y, s: (_nan_first(x), y, s), ["x contains NaN or inf"]),
                  ("x as integers", lambda x, y, s: (x.astype(np.int64), y, s), ["x must be a floating-point"])]
    if lstm:
        cases += [("state as one array", lambda x, y, s: (x, y, s[0]), ["state must be a tuple (h, c)"]),
                  ("state c transposed", lambda x, y, s: (x, y, (s[0], np.swapaxes(s[1], 1, 2))),
                   ["state[1] (c) must have shape"] if s_shape_changes(state[1]) else None),
                  ("state h holding inf", lambda x, y, s: (x, y, (_nan_first(s[0], np.inf), s[1])),
                   ["state[0] (h) contains NaN or inf"]),
                  ("state strided", lambda x, y, s: (x, y, tuple(_strided(a) for a in s)), None)]
    else:
        cases += [("state as a tuple", lambda x, y, s: (x, y, (s, s)), ["state must be one array"]),
                  ("state batch too small", lambda x, y, s: (x, y, s[:, :0]), ["state must have shape"]),
                  ("state holding NaN", lambda x, y, s: (x, y, _nan_first(s)), ["state contains NaN or inf"]),
                  ("state in swapped byte order", lambda x, y, s: (x, y, s.astype(s.dtype.newbyteorder())), None)]
    return cases


def s_shape_changes(a):
    return a.shape[1] != a.shape[2]


def _strided_rows(a):
    big = np.zeros((2 * a.shape[0],) + a.shape[1:], a.dtype)
    big[::2] = a
    return big[::2]


def _nan_first(a, v=np.nan):
    a = a.copy()
    a.flat[0] = v
    return a


@st.composite
def hostile_input_problems(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    prob = make_problem(rng, kind=draw(st.sampled_from(["lstm", "rnn"])), layers=draw(st.integers(1, 2)),
                        embedding=draw(st.booleans()),
                        loss=draw(st.sampled_from(["cross_entropy", "mse"])),
                        T=draw(st.integers(1, 5)), B=draw(st.integers(1, 9)),
                        H=draw(st.integers(2, 5)), E=draw(st.integers(1, 4)), O=draw(st.integers(2, 5)),
                        dtype=draw(st.sampled_from([np.float64, np.float32])))
    case = draw(st.sampled_from(_input_cases(prob)))
    return prob, case, draw(st.sampled_from(BACKENDS)), draw(st.sampled_from(OPS))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_input_problems())
def test_malformed_inputs_are_named_or_computed_as_the_reference(args):
    prob, (what, mutate, expected), backend, op = args
    x, y, state = mutate(prob.x, prob.y, prob.state)
    if expected is None:
        got = _call(op, prob.net, x, y, state, prob.loss, backend)
        _assert_same(got, _reference(op, prob.net, np.ascontiguousarray(x), np.ascontiguousarray(y),
                                     _contiguous(state), prob.loss), prob.net.dtype)
    else:
        with pytest.raises(ValueError) as e:
            _call(op, prob.net, x, y, state, prob.loss, backend)
        for part in expected:
            assert part in str(e.value), f"{what}: {part!r} not in {str(e.value)!r}"
    _assert_same(_call(op, prob.net, prob.x, prob.y, prob.state, prob.loss, backend),
                 _reference(op, prob.net, prob.x, prob.y, prob.state, prob.loss), prob.net.dtype)


def _contiguous(state):
    return tuple(np.ascontiguousarray(a) for a in state) if isinstance(state, tuple) \
        else np.ascontiguousarray(state)


def test_transposed_square_weight_is_a_different_network_not_an_error():
    """A transposed square W_hh has the expected shape: it is a valid (other) network, and every
    backend must compute that network, as the reference does -- the check cannot tell, so the
    kernels must read the array by its strides, not by its buffer."""
    rng = np.random.default_rng(5)
    prob = make_problem(rng, kind="rnn", H=4, E=4, B=9, T=4)
    net = prob.net.copy()
    net.params["weight_hh_l0"] = net.params["weight_hh_l0"].T          # a view, not contiguous
    want = _reference("bptt", _contiguous_net(net), prob.x, prob.y, prob.state, prob.loss)
    for backend in BACKENDS:
        _assert_same(_call("bptt", net, prob.x, prob.y, prob.state, prob.loss, backend), want, net.dtype)


def _contiguous_net(net):
    out = net.copy()
    out.params = {k: np.ascontiguousarray(v) for k, v in net.params.items()}
    return out


def test_params_that_are_not_a_dict_are_named():
    net = npbptt.RNN(2, 3, seed=0, output_size=2)
    x = np.zeros((2, 1, 2))
    y = np.zeros((2, 1), np.int64)
    net.params = list(net.params.values())
    with pytest.raises(ValueError, match="net.params must be a dict"):
        npbptt.bptt(net, x, y, np.zeros((1, 1, 3)), 1, 1)
