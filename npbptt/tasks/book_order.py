"""The Book Order temporal point process of Appendix C.3 (Table C.3): a 2-layer LSTM 128 with a
mark embedding (128) beside the time features [t_j - t_{j-1}, t_j], two read-outs (mark logits
and the RMTPP intensity's u_j, with a learned rate w) and the RMTPP loss (Du et al. 2016,
Eq. 12): :mod:`npbptt.point_process`.

Training as the paper: SGD gamma = 0.1, batch 64, W = 200, K0 = 6, [K_min, K_max] = [1, 100];
as the authors' script (``scripts/book_order-lstm.sh``): weight decay 1e-3, gradient clipping
1.0, 51 epochs.  Metrics per epoch (``metrics.csv``): ``valid_nll``, ``test_nll`` (per event,
mark + time), ``test_rmse`` (of E[t_{j+1} | h_j], in the files' time unit: the paper's Table
C.3 column "RMSE(t) 10^-3" is this number times 1000) and ``test_error`` (0-1 loss of the
predicted mark), from :func:`npbptt.point_process.evaluate`.

Notes
-----
* How 100 sequences become 64 streams: :func:`npbptt.point_process.book_order_streams`.
* ``valid_ppl``/``test_ppl`` of ``metrics.csv`` are exp(mean per-event loss), kept for every
  task alike; the best epoch (lowest validation loss) is the one of the lowest ``valid_nll``.
* The authors' script scales the step with K only for adaptive runs and uses K_min = 2; here
  every run scales it by sqrt(K) (Algorithm 1) and K_min = 1 (the paper).
"""
from ..point_process import RMTPPLSTM, book_order_streams, evaluate
from .base import Setting, Task

__all__ = ["BOOK_ORDER"]

S = Setting
SETTINGS = (
    S("batch", int, 64, "parallel streams = minibatch size", minimum=1),
    S("embed", int, 128, "mark embedding size", quick=8, minimum=1),
    S("hidden", int, 128, "LSTM hidden and cell size", quick=8, minimum=1),
    S("layers", int, 2, "LSTM layers", minimum=1),
    S("features", str, "paper", "time features: paper ([gap, t]) or authors ([first event, gap])"),
    S("time_scale", float, 1.0, "times and gaps are multiplied by this", minimum=0.0,
      exclusive=True),
    S("few_sequences", bool, False, "the first 2 sequences of each split only", quick=True),
)
TRAIN = dict(epochs=51, lr=0.1, weight_decay=1e-3, clip=1.0, K0=6, K_min=1, K_max=100, W=200,
             burnin=20, delta_probes=3)
QUICK_TRAIN = dict(epochs=2, W=40, burnin=10, K_max=40, delta_probes=2)


def build(v, seed, dtype, data_dir):
    data = book_order_streams(data_dir, batch=v["batch"], quick=v["few_sequences"],
                              features=v["features"], time_scale=v["time_scale"])
    net = RMTPPLSTM(data.n_marks, v["embed"], v["hidden"], v["layers"], dtype=dtype, seed=seed)
    return net, data


def metrics(net, valid, test, backend):
    """Table C.3's columns after an epoch."""
    v, t = evaluate(net, valid, backend), evaluate(net, test, backend)
    return {"valid_nll": v["nll"], "test_nll": t["nll"], "test_rmse": t["rmse"],
            "test_error": t["error"]}


BOOK_ORDER = Task("book-order", "Book Order point process (App. C.3)", SETTINGS, TRAIN,
                  QUICK_TRAIN, build, needs_data=True, metrics=metrics, loss="rmtpp")
