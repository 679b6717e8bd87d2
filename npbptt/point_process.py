"""The Book Order marked temporal point process (Appendix C.3; Du et al. 2016, "RMTPP").

Network (:class:`RMTPPLSTM`): at event j the input is the previous mark y_j through an
embedding beside dense time features, a stacked LSTM, and two read-outs:

    e_j   = [E[y_j], f_j]                      E (n_marks, embed_size); f_j (n_features,)
    h_j   = LSTM(h_{j-1}, e_j)                 (§2, stacked; PyTorch nn.LSTM names, gate order)
    out_j = [W h_j + b, w]                     W ((n_marks + 1), H): n_marks logits, then
                                               u_j = v^T h_j + b_u; w a learned scalar
    lambda*(t_j + s) = exp(u_j + w s)          the RMTPP intensity (Du et al., Eq. 11)

and the per-event loss ``LOSSES["rmtpp"]`` (:func:`npbptt.losses.rmtpp_loss`): the next mark's
cross-entropy plus -log f*(t_{j+1} - t_j) (Du et al., Eq. 12).

Data layout (time-major, as every npbptt split):

    x : (T, B, 1 + n_features) floats, x[t, b] = [y_j (0..n_marks-1, integer-valued), f_j]
    y : (T, B, 2) floats, y[t, b] = [y_{j+1}, t_{j+1} - t_j (>= 0)]

Time unit: the files' own unit, unscaled (``time_scale=1``, as the authors' runs,
``--data_time_scale 1``), so the RMSE is in the unit of the paper's Table C.3 "RMSE(t) 10^-3"
column: an RMSE of 0.00397 here is the paper's 3.97.

Features (``book_order_streams(features=)``): ``"paper"`` (the default) is the paper's text,
f_j = [t_j - t_{j-1}, t_j] (0 for the gap of a sequence's first event); ``"authors"`` is what
the authors' script ran (``process_data_onehot``, ``--time_onehot_split``): f_j =
[1 if j is its sequence's first event else 0, t_j - t_{j-1}].

Notes
-----
The authors encode the mark by a linear layer of its one-hot vector (``nn.Linear(2, 128)``,
with a bias); here it is an embedding without a bias (the bias is absorbed by the LSTM's input
biases only up to the one-hot's sum being 1, so the models are the same family).
"""
from dataclasses import dataclass

import numpy as np

from . import backends
from .data import batchify, load_book_order
from .losses import LOSSES, rmtpp
from .model import LSTM
from .validate import check_inputs, _finite

__all__ = ["BOOK_ORDER_DEFAULTS", "PointProcessData", "RMTPPLSTM", "book_order_streams",
           "evaluate", "expected_gap"]

BOOK_ORDER_DEFAULTS = dict(
    # Appendix C.3
    optimizer="sgd", lr=0.1, batch=64, K_fixed=(3, 6, 9, 15, 21), deltas=(0.9, 0.5, 0.1),
    W=200, K0=6, K_min=1, K_max=100,
    embed_size=128, hidden_size=128, num_layers=2, n_marks=2, features="paper", time_scale=1.0,
    # the authors' scripts/book_order-lstm.sh and experiments/temporal_pp_script.py
    epochs=51, weight_decay=1e-3, clip_grad=1.0, dropout=0.0,
    scale_lr_K=True,          # adaptive runs only: --scale_lr_K (lr scaled with K)
    authors_K_min=2,          # the script's MIN_K (the paper says 1)
    authors_tbptt="original-buffer",
    authors_rmse_burnin=20,   # their RMSE/0-1 metrics skip each stream's first 20 steps
)
"""Book Order task settings.  The first group is the paper's (Appendix C.3); the second is
read from the authors' code (aicherc/adaptive_tbptt): 51 epochs, SGD weight decay 1e-3,
gradient-norm clipping at 1.0 (the script's default, not overridden), no dropout."""


# --------------------------------------------------------------------------------- the network
class RMTPPLSTM(LSTM):
    """Stacked LSTM for a marked temporal point process (Du et al. 2016), module docstring.

    Parameters: ``embedding.weight`` (n_marks, embed_size); the LSTM's layers (input size
    embed_size + n_features); ``decoder.weight`` (n_marks + 1, H) and ``decoder.bias``
    (n_marks + 1,): the mark logits and, in the last row, u = v^T h + b_u; ``decoder.w`` (1,),
    the intensity's rate w.  The read-out is (B, n_marks + 2) = [logits, u, w] and the loss
    must be ``"rmtpp"``.  The Numba/CUDA kernels do not run this network (it overrides the
    input and the read-out): every backend runs the NumPy reference.
    """

    def __init__(self, n_marks=2, embed_size=128, hidden_size=128, num_layers=2, n_features=2,
                 bias=True, dtype=np.float64, seed=None, dropout=0.0):
        for name, v in (("n_marks", n_marks), ("embed_size", embed_size),
                        ("n_features", n_features)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.n_marks, self.embed_size = int(n_marks), int(embed_size)
        self.n_features = int(n_features)
        super().__init__(self.embed_size + self.n_features, hidden_size, num_layers,
                         output_size=self.n_marks + 1, vocab_size=self.n_marks, bias=bias,
                         dtype=dtype, seed=seed, dropout=dropout)

    def param_shapes(self):
        shapes = {"embedding.weight": (self.n_marks, self.embed_size)}
        shapes.update((k, v) for k, v in super().param_shapes().items() if k != "embedding.weight")
        shapes["decoder.w"] = (1,)
        return shapes

    def config(self):
        cfg = dict(n_marks=self.n_marks, embed_size=self.embed_size,
                   hidden_size=self.hidden_size, num_layers=self.num_layers,
                   n_features=self.n_features, bias=self.bias, dtype=self.dtype.name)
        if self.dropout > 0:
            cfg["dropout"] = self.dropout
        return cfg

    def to_torch(self):
        raise ValueError(f"{type(self).__name__} has no torch counterpart in npbptt.interop")

    # -- input: an embedding of the mark beside dense features -------------------------------
    def embed(self, x_t):
        """e_t = [E[mark_t], f_t]: (B, 1 + n_features) -> (B, embed_size + n_features)."""
        E = self.params["embedding.weight"]
        return np.concatenate([E[x_t[:, 0].astype(np.int64)], x_t[:, 1:].astype(E.dtype)], axis=1)

    def input_vjp(self, x_t, dx, grads, scale=1.0):
        """VJP of :meth:`embed`: the embedding part of dx scattered into the marks' rows (the
        dense features have no parameters)."""
        g = grads.get("embedding.weight")
        if g is None:
            g = grads["embedding.weight"] = np.zeros_like(self.params["embedding.weight"])
        d = dx[:, :self.embed_size]
        np.add.at(g, x_t[:, 0].astype(np.int64), d if scale == 1.0 else d * scale)

    # -- read-out: [mark logits, u, w] ----------------------------------------------------------
    def readout(self, h_top):
        """out = [W h + b, w]: (B, H) -> (B, n_marks + 2); the last column is w on every row."""
        lin = h_top @ self.params["decoder.weight"].T + self.params["decoder.bias"]
        w = np.broadcast_to(self.params["decoder.w"], (h_top.shape[0], 1))
        return np.concatenate([lin, w], axis=1)

    def readout_vjp(self, h_top, dout):
        """VJP of :meth:`readout`: w's gradient is the sum of its column over the batch."""
        dlin = dout[:, :-1]
        return ({"decoder.weight": dlin.T @ h_top, "decoder.bias": dlin.sum(axis=0),
                 "decoder.w": dout[:, -1:].sum(axis=0)},
                dlin @ self.params["decoder.weight"])

    # -- input checks (npbptt.validate.check_inputs calls this) ------------------------------
    def check_xy(self, x, y, loss):
        """x (T, B, 1 + n_features) finite floats with integer-valued marks in [0, n_marks);
        y None or (T, B, 2) finite floats, marks as x's, gaps >= 0; loss "rmtpp" when y is
        given.  Returns (x, y) in the network's dtype; ValueError naming the argument."""
        x = np.asarray(x)
        F = 1 + self.n_features
        if x.ndim != 3 or x.shape[2] != F:
            raise ValueError(f"x must have shape (T, B, 1 + n_features) = (T, B, {F}) "
                             f"[mark, features] for {type(self).__name__}, got shape {x.shape}")
        if x.dtype.kind != "f":
            raise ValueError(f"x must be a floating-point array [mark, features], got dtype {x.dtype}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"x must have at least one step and one example, got shape {x.shape}")
        _finite("x", x)
        self._check_marks("x[..., 0]", x[..., 0])
        x = x.astype(self.dtype, copy=False)
        if y is None:
            return x, None
        if loss != "rmtpp":
            raise ValueError(f"loss must be 'rmtpp' for {type(self).__name__}, got {loss!r}")
        y = np.asarray(y)
        T, B = x.shape[:2]
        if y.shape != (T, B, 2):
            raise ValueError(f"y must have shape (T, B, 2) = {(T, B, 2)} [next mark, next gap], "
                             f"got shape {y.shape}")
        if y.dtype.kind != "f":
            raise ValueError(f"y must be a floating-point array [next mark, next gap], got dtype {y.dtype}")
        _finite("y", y)
        self._check_marks("y[..., 0]", y[..., 0])
        if (y[..., 1] < 0).any():
            raise ValueError(f"y[..., 1] (the gaps t_(j+1) - t_j) must be >= 0, "
                             f"got minimum {y[..., 1].min()}")
        return x, y.astype(self.dtype, copy=False)

    def _check_marks(self, name, m):
        if (m != np.round(m)).any() or m.min() < 0 or m.max() >= self.n_marks:
            raise ValueError(f"{name} (the marks) must be integers in [0, n_marks={self.n_marks}), "
                             f"got values in [{m.min()}, {m.max()}]")


# ---------------------------------------------------------------------- E[t_{j+1} - t_j | h_j]
_SERIES_R = 2e-3          # |r| below this: the asymptotic series (9 terms, error < 1e-18 rel.)
_FACT = np.array([(-1.0) ** k * np.prod(np.arange(1, k + 1, dtype=float)) for k in range(9)])


def _ein(c):
    """Ein(c) = int_0^c (e^v - 1)/v dv = Ei(c) - gamma - ln c for c > 0 (series for c < 1)."""
    from scipy.special import expi
    small = c < 1.0
    cs = np.where(small, c, 0.0)
    k = np.arange(1, 20)
    fk = np.cumprod(k.astype(float))
    series = (cs[..., None] ** k / (k * fk)).sum(axis=-1)
    cb = np.where(small, 1.0, c)
    return np.where(small, series, expi(cb) - np.euler_gamma - np.log(cb))


def expected_gap(u, w):
    """Mean of the next gap under the RMTPP density f*(s) = exp(u + w s - (e^u/w)(e^(ws) - 1)),
    elementwise, in closed form.

    With a = e^u / w and r = 1/a = w e^-u:

        w > 0:  E[s] = int_0^inf S(s) ds = e^a E1(a) / w                 (S the survival)
        w < 0:  the distribution is defective (P(no next event) = e^(-e^u/|w|)), E[s] = inf;
                returned is E[s | s < inf] = e^-c Ein(c) / (|w| (1 - e^-c)), c = -a
        |r| < 2e-3 (both signs, w = 0 included): e^-u sum_k (-1)^k k! r^k, the expansion
                both formulas share (w = 0: e^-u, the exponential gap)

    E1 is ``scipy.special.exp1``, Ein(c) = Ei(c) - gamma - ln c (``scipy.special.expi``; a
    power series for c < 1): accurate to about 1e-14 relative (float64 special functions;
    the series' truncation error is below 1e-18).  u, w broadcast; float64 result.
    """
    from scipy.special import exp1
    u, w = np.broadcast_arrays(np.asarray(u, dtype=np.float64), np.asarray(w, dtype=np.float64))
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        r = w * np.exp(-u)
        series = np.abs(r) < _SERIES_R
        rs = np.where(series, r, 0.0)
        out_series = np.exp(-u) * np.polynomial.polynomial.polyval(rs, _FACT)
        a = np.where(series, 1.0, 1.0 / np.where(r == 0, 1.0, r))   # |a| <= 500 on the rest
        ap = np.where(a > 0, a, 1.0)
        wp = np.where(series | (w <= 0), 1.0, w)
        out_pos = np.exp(ap) * exp1(ap) / wp
        c = np.where(a < 0, -a, 1.0)
        wn = np.where(series | (w >= 0), 1.0, -w)
        out_neg = np.exp(-c) * _ein(c) / (wn * -np.expm1(-c))
    return np.where(series, out_series, np.where(a > 0, out_pos, out_neg))


# ------------------------------------------------------------------------------------- metrics
def evaluate(net, split, backend=None, state=None):
    """Metrics of ``net`` on a split (x, y) (:func:`book_order_streams`), from the zero state
    (or ``state``), every step of every stream counted:

    nll   : mean per-event NLL, mark cross-entropy + time -log f* (``LOSSES["rmtpp"]``)
    rmse  : sqrt(mean((E[gap | h_j] - gap)^2)), E by :func:`expected_gap` (closed form),
            in the data's time unit (x 10^3 for the paper's "RMSE(t) 10^-3" column)
    error : the 0-1 loss of the argmax mark

    ``backend`` is checked as everywhere; this network runs the NumPy reference whatever it is.
    Returns a dict of Python floats.
    """
    if state is None:
        x0 = np.asarray(split[0])
        state = net.init_state(x0.shape[1] if x0.ndim == 3 and x0.shape[1] >= 1 else 1)
    x, y, S = check_inputs(net, split[0], split[1], state, "rmtpp")
    backends.resolve("step_losses", backend, net)          # validates the name only
    loss_fn = LOSSES["rmtpp"]
    M = net.n_marks
    tot_nll = tot_sq = tot_err = 0.0
    for t in range(x.shape[0]):
        S, _ = net.step(S, x[t])
        out = net.readout(S[0][-1])
        ell, _ = loss_fn(out, y[t])
        tot_nll += float(ell.sum())
        gap = expected_gap(out[:, M], out[:, M + 1])
        tot_sq += float(((gap - y[t, :, 1]) ** 2).sum())
        tot_err += float((out[:, :M].argmax(axis=1) != y[t, :, 0].astype(np.int64)).sum())
    n = x.shape[0] * x.shape[1]
    return {"nll": tot_nll / n, "rmse": float(np.sqrt(tot_sq / n)), "error": tot_err / n}


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True, eq=False)
class PointProcessData:
    """Book Order streams: ``train``/``valid``/``test`` are (x (T, B, 3), y (T, B, 2)) float64
    in the layout of :class:`RMTPPLSTM`; ``n_marks`` marks (``vocab_size``/``n_outputs`` the
    same number, for code written for :class:`npbptt.data.SequenceData`)."""
    train: tuple
    valid: tuple
    test: tuple
    n_marks: int
    name: str
    features: str
    time_scale: float

    @property
    def vocab_size(self):
        return self.n_marks

    @property
    def n_outputs(self):
        return self.n_marks


_QUICK_SEQUENCES = {"train": 2, "valid": 2, "test": 2}


def _rows(marks, times, features, scale):
    """One sequence (n,) -> x (n-1, 3), y (n-1, 2): event j's input and its successor."""
    gap = np.diff(times, prepend=times[0]) * scale          # gap[0] = 0: no previous event
    if features == "paper":
        f = np.stack([gap, times * scale], axis=1)         # [t_j - t_{j-1}, t_j]
    else:
        first = np.zeros_like(gap)
        first[0] = 1.0
        f = np.stack([first, gap], axis=1)                 # authors: [new sequence, gap]
    x = np.concatenate([marks[:-1, None].astype(np.float64), f[:-1]], axis=1)
    y = np.stack([marks[1:].astype(np.float64), gap[1:]], axis=1)
    return x, y


def book_order_streams(data_dir, batch=64, quick=False, features="paper", time_scale=1.0):
    """The Book Order data (``npbptt.data.load_book_order``: train 100 x 3319 events, the test
    file halved into valid and test, 50 x 829 each) as ``batch`` TBPTT streams per split.

    From 100 sequences to 64 streams, as the authors' script does: each sequence of n events
    gives n - 1 (input, target) pairs (event j's mark and features -> event j+1's mark and gap;
    no pair crosses two sequences), the pairs of all sequences are concatenated in file order,
    and that one stream is cut into ``batch`` contiguous streams (``npbptt.data.batchify``;
    the last len mod batch pairs dropped).  So a stream crosses sequence boundaries, carrying
    the LSTM state from one sequence into the next (the "authors" features flag a sequence's
    first event; the "paper" features show it as a gap of 0 and a small t_j).  At batch 64:
    train 331,800 pairs -> (5184, 64), valid and test 41,400 -> (646, 64).

    ``quick``: the first 2 sequences of each split (6,636 / 1,656 / 1,656 pairs), for tests.
    ``features``: "paper" or "authors" (module docstring); ``time_scale``: times and gaps are
    multiplied by it (1: the files' unit, the paper's).
    """
    if features not in ("paper", "authors"):
        raise ValueError(f"features must be 'paper' or 'authors', got {features!r}")
    if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float, np.integer, np.floating)) \
            or not np.isfinite(time_scale) or time_scale <= 0:
        raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
    if not isinstance(quick, (bool, np.bool_)):
        raise ValueError(f"quick must be True or False, got {quick!r}")
    raw = load_book_order(data_dir)
    splits = []
    for name in ("train", "valid", "test"):
        marks, times = raw[name]["marks"], raw[name]["times"]
        if quick:
            marks, times = marks[:_QUICK_SEQUENCES[name]], times[:_QUICK_SEQUENCES[name]]
        pairs = [_rows(m, t, features, float(time_scale)) for m, t in zip(marks, times)]
        x = np.concatenate([p[0] for p in pairs])
        y = np.concatenate([p[1] for p in pairs])
        splits.append((batchify(x, batch), batchify(y, batch)))
    return PointProcessData(*splits, n_marks=2, name="book_order" + ("-quick" if quick else ""),
                            features=features, time_scale=float(time_scale))
