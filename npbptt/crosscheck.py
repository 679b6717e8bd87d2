"""Check a framework's truncated gradients against npbptt's BPTT(K1, K2) (Eqs. 15-16).

    report = npbptt.crosscheck(net, x, y, state, K1=30, K2=15, framework="torch")
    report = npbptt.crosscheck(net, x, y, state, recipe="keras", K=20, framework="jax")
    report = npbptt.crosscheck(net, x, y, state, K1=30, K2=15, grad_fn=my_loop, framework="torch")
    print(report); report.passed; report.mismatched      # names of the parameters that differ

What is compared: a recipe (see :mod:`npbptt.recipes`) is a sequence of optimizer steps, each
equal to one BPTT call on a window of the sequence (:class:`npbptt.recipes.Window`); npbptt
computes those calls with :func:`npbptt.bptt`, and the framework computes the recipe its own way:

* ``framework="torch"``: the recipe's literal PyTorch loop (``recipe.torch_loop``: nn.LSTM /
  nn.RNN modules, ``detach()`` where the recipe detaches, autograd), so the derivation
  recipe -> windows is checked too;
* ``framework="jax"``: each window as Eq. (15) on the sequence: ``lax.scan`` with
  ``lax.stop_gradient`` on the state where the window is truncated, differentiated by
  ``jax.grad`` (the recipe -> windows derivation is npbptt's here; torch checks it);
* ``grad_fn=...``: the user's own function, called as ``grad_fn(weights, x, y, state)`` with the
  weights, data and initial state in the framework's types (torch: :class:`TorchModules`
  fresh copies and tensors; jax: a dict of ``jax.numpy`` arrays and arrays; numpy: a dict of
  arrays and arrays).  It returns one gradient dict (named as ``net.params``; values tensors or
  arrays), or a list of them, one per optimizer step, for a multi-step recipe.

Tolerance, per parameter, by dtype (``max rel err`` = max |g - g_ref| / max |g_ref|):

* float64: g_ref is npbptt's float64 gradient; pass when the relative error <= ``rtol``
  (default 1e-10).
* float32: g_ref is npbptt's gradient on the same weights and data in float64 (exact upcast),
  the truth; pass when the framework's relative error against it is at most ``factor`` (default
  2) times npbptt's own float32 relative error -- the rule "a result's error against the float64
  reference may be at most about twice the error of a float32 reference".  npbptt's error is
  taken as its largest over all parameters and steps (one round-off scale for the problem), and
  floored at ``floor_ulps`` (default 8) float32 ulps: implementations of the same float32
  computation differ by a few ulps per elementary function (measured: XLA's float32 tanh is off
  by up to 4.0 ulps, NumPy's by 1.3), so differences below that say nothing about the loop.
  Decide correctness in float64; float32 checks accuracy.

Float64 JAX runs inside ``jax.enable_x64(True)`` (a scoped context manager): the caller's JAX
configuration is unchanged afterwards.
"""
import argparse
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .bptt import bptt, step_losses
from .interop import _to_numpy, jax_network_fn, to_jax, to_torch, with_dtype, x64
from .model import LSTM, RNN
from .recipes import get_recipe
from .validate import check_inputs, check_K

__all__ = ["crosscheck", "CrossCheckReport", "Row", "npbptt_window_grads", "jax_window_grads",
           "torch_recipe_grads", "float32_tolerance", "cli_main", "DEFAULT_RTOL", "FRAMEWORKS"]

DEFAULT_RTOL = 1e-10              # float64: relative, per parameter (the 1e-10)
FRAMEWORKS = ("torch", "jax", "numpy")
PROGRESS_MIN = 100                # show a progress bar from this many optimizer steps on


@dataclass
class Row:
    """One parameter in one window: errors against the reference and the verdict."""
    window: int
    name: str
    max_abs: float
    max_rel: float
    tol: float
    passed: bool


@dataclass
class CrossCheckReport:
    """Per window and parameter, the max absolute and relative error of the framework's gradient
    against npbptt's, the tolerance (relative) and pass/fail.

    ``passed`` -- every row passed and nothing is missing; ``mismatched`` -- the parameter names
    that failed in some window (or are missing or extra); ``problems`` -- structural findings
    (wrong number of optimizer steps, missing or extra parameters, wrong shapes)."""
    framework: str
    recipe: str
    dtype: str
    windows: list
    rows: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    missing: list = field(default_factory=list)

    @property
    def passed(self):
        return not self.problems and all(r.passed for r in self.rows)

    @property
    def mismatched(self):
        bad = {r.name for r in self.rows if not r.passed} | set(self.missing)
        return sorted(bad)

    def worst(self):
        """{name: the row with the largest relative error over the windows}."""
        out = {}
        for r in self.rows:
            if r.name not in out or r.max_rel > out[r.name].max_rel or (not r.passed and out[r.name].passed):
                out[r.name] = r
        return out

    def table(self, per_window=False):
        """The per-parameter table (the worst window of each parameter unless ``per_window``)."""
        head = (f"crosscheck {self.framework} vs npbptt: recipe {self.recipe}, {self.dtype}, "
                f"{len(self.windows)} optimizer step(s)")
        lines = [head, f"{'parameter':<18} {'step':>5} {'max abs err':>12} {'max rel err':>12} "
                       f"{'tolerance':>10}  status"]
        rows = self.rows if per_window else list(self.worst().values())
        for r in rows:
            lines.append(f"{r.name:<18} {r.window:>5} {r.max_abs:>12.3e} {r.max_rel:>12.3e} "
                         f"{r.tol:>10.1e}  {'ok' if r.passed else 'MISMATCH'}")
        lines += [f"problem: {p}" for p in self.problems]
        n = len({r.name for r in self.rows} | set(self.missing))
        if self.passed:
            lines.append(f"PASS: all {n} parameters agree")
        elif self.mismatched:
            lines.append(f"FAIL: {len(self.mismatched)} of {n} parameters differ: {', '.join(self.mismatched)}")
        else:
            lines.append("FAIL: " + "; ".join(self.problems))
        return "\n".join(lines)

    def __str__(self):
        return self.table()


# --- npbptt's side: the windows as BPTT calls ---------------------------------------------------
def _progress(windows, desc):
    """tqdm over the windows when there are many (a sliding recipe makes one per step)."""
    return tqdm(windows, desc=desc, disable=len(windows) < PROGRESS_MIN, leave=False)


def _finish(g, w):
    """scale, then elementwise clip (Window semantics)."""
    g = {k: v * v.dtype.type(w.scale) for k, v in g.items()}
    if w.clip is not None:
        g = {k: np.clip(v, -w.clip, w.clip) for k, v in g.items()}
    return g


def npbptt_window_grads(net, x, y, state, windows, loss="cross_entropy", backend="numpy"):
    """npbptt's gradient for each :class:`Window`: ``bptt`` on the window, from the state a
    forward pass over x[:start] reaches (Eq. 17's carried state, weights fixed)."""
    out, S, pos = [], state, 0
    for w in _progress(windows, "npbptt windows"):
        if w.start < pos:
            S, pos = state, 0
        if w.start > pos:
            S = step_losses(net, x[pos:w.start], y[pos:w.start], S, loss, backend)[1]
            pos = w.start
        res = bptt(net, x[w.start:w.stop], y[w.start:w.stop], S, w.K1, w.K2, loss, backend)
        out.append(_finish(res.grads, w))
    return out


# --- JAX: lax.scan with stop_gradient ------------------------------------------------------------
def _jax_ctx(net):
    return x64(True) if net.dtype == np.float64 else nullcontext()


def jax_window_grads(net, x, y, state, windows, loss="cross_entropy"):
    """Each window's gradient in JAX, as Eq. (15) on the whole sequence: one ``lax.scan`` over
    x[0:T] in which the state entering the window's first backpropagated step t0 passes through
    ``lax.stop_gradient``, and the loss is the mean of L_t over the window's last K2 steps;
    differentiated by ``jax.grad``.  t0 and the loss range are traced arguments, so one compiled
    function serves every window of a recipe.  Float64 networks run inside
    ``jax.enable_x64(True)``."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    step = jax_network_fn(net)
    T = x.shape[0]

    def step_loss(out, yt):                  # L_t: the batch mean of the per-example losses
        if loss == "cross_entropy":
            logp = jax.nn.log_softmax(out, axis=-1)
            return -jnp.take_along_axis(logp, yt[:, None], axis=-1).mean()
        return ((out - yt) ** 2).mean()      # MSELoss: mean over batch and outputs

    def truncated_loss(p, S0, xs, ys, t0, lo, hi):
        def body(S, inp):
            t, xt, yt = inp
            # the state entering step t0 is a constant: BPTT backpropagates through t0..hi-1 only
            S = jax.tree_util.tree_map(lambda s: jnp.where(t == t0, lax.stop_gradient(s), s), S)
            S, out = step(p, S, xt)
            return S, step_loss(out, yt)
        _, L = lax.scan(body, S0, (jnp.arange(T), xs, ys))
        t = jnp.arange(T)
        return jnp.where((t >= lo) & (t < hi), L, 0.0).sum() / (hi - lo)   # (1/K2) sum, Eq. (15)

    grad = jax.jit(jax.grad(truncated_loss))
    with _jax_ctx(net):
        p = to_jax(net)
        xs, ys = jnp.asarray(x), jnp.asarray(y)
        S0 = tuple(jnp.asarray(s) for s in net.to_internal(state))
        out = []
        for w in _progress(windows, "jax windows"):
            t0 = w.stop - 1 - min(w.K1, w.stop - w.start - 1)   # the window's truncation point
            g = grad(p, S0, xs, ys, t0, w.stop - w.K2, w.stop)
            out.append(_finish({k: np.asarray(v) for k, v in g.items()}, w))
    return out


# --- PyTorch: the recipe's literal loop ----------------------------------------------------------
def _torch_data(net, x, y, state):
    import torch
    S = tuple(torch.from_numpy(np.array(s)) for s in net.to_internal(state))
    return torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)), net.to_public(S)


def _torch_loss(loss):
    import torch.nn.functional as F
    if loss == "cross_entropy":      # mean over steps and batch = mean of the batch-mean L_t
        return lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return lambda out, y: F.mse_loss(out, y)


def torch_recipe_grads(net, x, y, state, recipe, K=None, K1=None, K2=None, loss="cross_entropy", seed=0):
    """The recipe's literal PyTorch loop on copies of the weights: one gradient dict per
    ``optimizer.step()`` (the weights are not updated)."""
    rec = get_recipe(recipe)
    xt, yt, st = _torch_data(net, x, y, state)
    return rec.torch_loop(to_torch(net), xt, yt, st, K=K, K1=K1, K2=K2, loss_fn=_torch_loss(loss),
                          rng=np.random.default_rng(seed))


# --- the user's function -----------------------------------------------------------------------
def _call_user(grad_fn, framework, net, x, y, state):
    """Call ``grad_fn(weights, x, y, state)`` with fresh copies in the framework's types and
    return its gradients as a list of {name: NumPy array}."""
    if framework == "torch":
        xt, yt, st = _torch_data(net, x, y, state)
        got = grad_fn(to_torch(net), xt, yt, st)
    elif framework == "jax":
        import jax.numpy as jnp
        with _jax_ctx(net):
            st = net.to_public(tuple(jnp.asarray(s) for s in net.to_internal(state)))
            got = grad_fn(to_jax(net), jnp.asarray(x), jnp.asarray(y), st)
            got = [got] if isinstance(got, dict) else list(got)
            return [{k: _to_numpy(v) for k, v in g.items()} for g in got]
    else:
        got = grad_fn({k: v.copy() for k, v in net.params.items()}, x.copy(), y.copy(),
                      net.to_public(tuple(s.copy() for s in net.to_internal(state))))
    got = [got] if isinstance(got, dict) else list(got)
    return [{k: _to_numpy(v) for k, v in g.items()} for g in got]


# --- comparison ------------------------------------------------------------------------------------
def _rel_err(a, b):
    """(max |a - b|, max |a - b| / max |b|), the relative error 0 when both are zero."""
    if b.size == 0:
        return 0.0, 0.0
    err = float(np.abs(np.asarray(a, np.float64) - b).max())
    scale = float(np.abs(b).max())
    return err, (err / scale if scale > 0 else (0.0 if err == 0 else np.inf))


def float32_tolerance(ref32, ref64, factor=2.0, floor_ulps=8):
    """The float32 relative tolerance: ``factor`` x npbptt's own float32 relative error (its
    largest over parameters and steps, against the float64 truth), at least ``floor_ulps`` ulps."""
    own = max((_rel_err(g32[k], g64[k])[1] for g32, g64 in zip(ref32, ref64) for k in g64), default=0.0)
    return factor * max(own, floor_ulps * float(np.finfo(np.float32).eps))


def _compare(report, got, ref, tol):
    """Fill ``report`` with one row per step and parameter: ``got`` against ``ref``."""
    if len(got) != len(ref):
        report.problems.append(f"{len(got)} gradient(s) returned, the recipe makes {len(ref)} "
                               "optimizer step(s)")
    for i, (g, r) in enumerate(zip(got, ref)):
        missing, extra = sorted(set(r) - set(g)), sorted(set(g) - set(r))
        if missing:
            report.problems.append(f"step {i}: no gradient for {missing}")
            report.missing = sorted(set(report.missing) | set(missing))
        if extra:
            report.problems.append(f"step {i}: gradients npbptt does not have: {extra}")
        for name in r:
            if name not in g:
                continue
            a, b = np.asarray(g[name]), r[name]
            if a.shape != b.shape:
                report.problems.append(f"step {i}: {name} has shape {a.shape}, expected {b.shape}")
                report.rows.append(Row(i, name, np.inf, np.inf, tol, False))
                continue
            err, rel = _rel_err(a, b)
            report.rows.append(Row(i, name, err, rel, tol, bool(rel <= tol)))


def crosscheck(net, x, y, state, K1=None, K2=None, *, recipe=None, K=None, framework="torch",
               grad_fn=None, loss="cross_entropy", seed=0, rtol=None, factor=2.0, floor_ulps=8,
               backend="numpy"):
    """Compare a framework's (or the user's) truncated-BPTT gradients with npbptt's.

    Parameters
    ----------
    net : npbptt.RNN or npbptt.LSTM (float64 or float32); its weights are used by both sides.
    x, y, state : the sequence (T steps) and the state entering its first step, as for ``bptt``.
    K1, K2 : BPTT(K1, K2) on the whole of x (recipe "bptt", the default when ``recipe`` is None).
    recipe : a name from :data:`npbptt.recipes.RECIPES` (or an alias); all but "bptt" take ``K``.
    K : the recipe's chunk length / truncation (see :mod:`npbptt.recipes`).
    framework : "torch", "jax", or "numpy" (only with ``grad_fn``): which framework's gradient is
        computed, or which types ``grad_fn`` receives.
    grad_fn : optional ``grad_fn(weights, x, y, state) -> grads | [grads]``, the user's loop.
    loss : "cross_entropy" or "mse".
    seed : seeds the recipe's random choices (AWD-LSTM's lengths), the same for both sides.
    rtol : float64 relative tolerance (default 1e-10).
    factor, floor_ulps : float32: the tolerance is ``factor`` x npbptt's own float32 relative
        error, at least ``floor_ulps`` float32 ulps (see the module docstring).
    backend : npbptt's backend for its side (default the NumPy reference).

    Returns
    -------
    :class:`CrossCheckReport`.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    if framework == "numpy" and grad_fn is None:
        raise ValueError("framework='numpy' needs grad_fn (the numpy side is npbptt itself)")
    if grad_fn is not None and not callable(grad_fn):
        raise ValueError(f"grad_fn must be callable, got {type(grad_fn).__name__}")
    x, y, S = check_inputs(net, x, y, state, loss)
    state = net.to_public(S)
    T = x.shape[0]
    name = "bptt" if recipe is None else recipe
    rec = get_recipe(name)
    if rec.needs == ("K1", "K2"):
        if K1 is None or K2 is None:
            raise ValueError("K1 and K2 are required for BPTT(K1, K2) (recipe 'bptt')")
        if K is not None:
            raise ValueError("K is not used by recipe 'bptt'; give K1 and K2")
        K1, K2 = check_K(K1, K2, T)
        label = f"bptt (K1={K1}, K2={K2})"
    else:
        if K1 is not None or K2 is not None:
            raise ValueError(f"recipe {name!r} takes K, not K1/K2")
        if not isinstance(K, (int, np.integer)) or isinstance(K, bool) or K < 1:
            raise ValueError(f"K must be an integer >= 1 for recipe {name!r}, got {K!r}")
        K = int(K)
        label = f"{rec.name} (K={K})"
    windows = rec.windows(T, K=K, K1=K1, K2=K2, rng=np.random.default_rng(seed))
    if not windows:
        raise ValueError(f"recipe {name!r} makes no optimizer step on T={T} steps with K={K} "
                         "(give a longer x or a smaller K)")
    ref = npbptt_window_grads(net, x, y, state, windows, loss, backend)
    ref32 = None
    if net.dtype == np.float32:              # the float64 truth on the same (exactly upcast) data
        ref32 = ref
        net64 = with_dtype(net, np.float64)
        up = (lambda a: a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a)
        ref = npbptt_window_grads(net64, up(x), up(y), net64.to_public(tuple(s.astype(np.float64) for s in S)),
                                  windows, loss, backend)
    if grad_fn is not None:
        got = _call_user(grad_fn, framework, net, x, y, state)
        label += ", user's grad_fn"
    elif framework == "torch":
        got = torch_recipe_grads(net, x, y, state, rec.name, K, K1, K2, loss, seed)
    else:
        got = jax_window_grads(net, x, y, state, windows, loss)
    if ref32 is None:
        tol = DEFAULT_RTOL if rtol is None else rtol
    else:
        tol = float32_tolerance(ref32, ref, factor, floor_ulps)
    report = CrossCheckReport(framework, label, net.dtype.name, windows)
    _compare(report, got, ref, tol)
    return report


# --- command line ------------------------------------------------------------------------------------
def _parser():
    p = argparse.ArgumentParser(
        prog="npbptt crosscheck",
        description="Compare a framework's truncated-BPTT gradients with npbptt's BPTT(K1, K2) on a "
                    "random network and sequence; prints the per-parameter table and exits 1 on a "
                    "mismatch.")
    p.add_argument("--framework", choices=("torch", "jax"), default="torch")
    p.add_argument("--cell", choices=("lstm", "rnn"), default="lstm")
    p.add_argument("--activation", choices=("tanh", "relu", "sigmoid", "linear"), default="tanh",
                   help="simple RNN activation (torch: tanh or relu)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--K1", type=int, default=None, help="BPTT(K1, K2): steps backpropagated - 1")
    p.add_argument("--K2", type=int, default=None, help="BPTT(K1, K2): losses averaged")
    p.add_argument("--recipe", default=None,
                   help="bptt, keras (tensorflow, lightning), paper, sliding, min-char-rnn, awd-lstm")
    p.add_argument("--K", type=int, default=None, help="a recipe's chunk length (default: K2, else 10)")
    p.add_argument("--T", type=int, default=None,
                   help="sequence length (default: K1 + K2 + 5 for bptt, 4K + 1 for a recipe)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--input-size", type=int, default=16)
    p.add_argument("--vocab", type=int, default=20, help="tokens through an embedding; 0: dense input")
    p.add_argument("--loss", choices=("cross_entropy", "mse"), default="cross_entropy")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-window", action="store_true", help="one row per parameter and optimizer step")
    return p


def cli_main(argv=None):
    """``npbptt crosscheck ...``: returns 0 when the gradients agree, 1 on a mismatch, 2 on a usage
    error or a missing framework."""
    try:
        a = _parser().parse_args(argv)
    except SystemExit as e:                 # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    try:
        __import__(a.framework)
    except ImportError:
        print(f"npbptt crosscheck: {a.framework} is not installed (pip install 'npbptt[{a.framework}]')",
              file=sys.stderr)
        return 2
    rng = np.random.default_rng(a.seed)
    recipe = a.recipe or "bptt"
    try:
        if get_recipe(recipe).needs == ("K1", "K2"):
            K1 = 30 if a.K1 is None else a.K1
            K2 = 15 if a.K2 is None else a.K2
            K, T = None, a.T or K1 + K2 + 5
        else:
            K = a.K or a.K2 or 10
            if a.K1 is not None or (a.K is not None and a.K2 is not None):
                print(f"note: recipe {recipe!r} takes one length, K={K}; --K1/--K2 beyond that are not used")
            K1 = K2 = None
            T = a.T or 4 * K + 1
        dtype = np.dtype(a.dtype)
        emb = dict(vocab_size=a.vocab) if a.vocab else {}
        out_size = a.vocab or 10
        if a.cell == "lstm":
            net = LSTM(a.input_size, a.hidden, a.layers, out_size, dtype=dtype, seed=a.seed, **emb)
        else:
            net = RNN(a.input_size, a.hidden, a.layers, out_size, activation=a.activation, dtype=dtype,
                      seed=a.seed, **emb)
        x = (rng.integers(0, a.vocab, (T, a.batch)) if a.vocab
             else rng.standard_normal((T, a.batch, a.input_size)).astype(dtype))
        y = (rng.integers(0, out_size, (T, a.batch)) if a.loss == "cross_entropy"
             else rng.standard_normal((T, a.batch, out_size)).astype(dtype))
        shape = (a.layers, a.batch, a.hidden)
        h = [0.5 * rng.standard_normal(shape).astype(dtype) for _ in range(net.n_state)]
        state = net.to_public(tuple(h))
        report = crosscheck(net, x, y, state, K1, K2, recipe=a.recipe, K=K, framework=a.framework,
                            loss=a.loss, seed=a.seed)
    except ValueError as e:
        print(f"npbptt crosscheck: {e}", file=sys.stderr)
        return 2
    print(report.table(per_window=a.per_window))
    return 0 if report.passed else 1


if __name__ == "__main__":                  # pragma: no cover
    sys.exit(cli_main())
