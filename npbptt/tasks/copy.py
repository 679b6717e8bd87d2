"""The synthetic copy task of §5.1: a 2-layer LSTM (embedding 6, hidden 50, linear read-out)
on :func:`npbptt.data.copy_task` streams, 64 in parallel."""
from ..data import copy_task
from ..model import LSTM
from .base import Setting, Task

__all__ = ["COPY"]

S = Setting
SETTINGS = (
    S("m", int, 10, "copy length m (largest m when m_min is given)", minimum=1),
    S("m_min", int, None, "smallest copy length: m uniform on [m_min, m] (variable copy task)",
      minimum=1, nullable=True),
    S("n_symbols", int, 6, "number I of data symbols", minimum=1),
    S("T_train", int, 256_000, "training steps in all (split into `batch` streams)",
      quick=64_000, minimum=1),
    S("T_eval", int, 64_000, "validation and test steps each", quick=16_000, minimum=1),
    S("batch", int, 64, "parallel streams = minibatch size S", minimum=1),
    S("embed", int, 6, "embedding size", minimum=1),
    S("hidden", int, 50, "LSTM hidden and cell size", minimum=1),
    S("layers", int, 2, "LSTM layers", minimum=1),
    S("data_seed", int, 0, "seed of the data streams", minimum=0),
)
# TrainConfig fields of the authors' copy runs (scripts/copy_fixed-lstm.sh): SGD gamma = 1 with
# the step gamma * sqrt(K), weight decay 1e-5, W = 100, K0 = 15, [K_min, K_max] = [2, 100].
TRAIN = dict(epochs=100, lr=1.0, weight_decay=1e-5, K0=15, K_min=2, K_max=100, W=100, burnin=20)
QUICK_TRAIN = dict(epochs=40, delta_probes=5)


def build(v, seed, dtype, data_dir):
    if v["m_min"] is not None and v["m_min"] > v["m"]:
        raise ValueError(f"m_min: expected at most m = {v['m']}, got {v['m_min']}")
    data = copy_task(v["T_train"], v["T_eval"], v["T_eval"], m=v["m"], m_min=v["m_min"],
                     n_symbols=v["n_symbols"], batch=v["batch"], seed=v["data_seed"])
    net = LSTM(v["embed"], v["hidden"], v["layers"], data.n_outputs, vocab_size=data.vocab_size,
               dtype=dtype, seed=seed)
    return net, data


COPY = Task("copy", "synthetic copy task (§5.1)", SETTINGS, TRAIN, QUICK_TRAIN, build,
            stream_steps=lambda v: (v["T_train"] // v["batch"], "T_train"))
