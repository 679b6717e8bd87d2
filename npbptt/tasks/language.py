"""The language-modelling experiments of §5.2 (Table C.2): Penn Treebank and WikiText-2.

As the authors' scripts (``scripts/ptb-lstm.sh``, ``scripts/wiki2-lstm.sh`` of
aicherc/adaptive_tbptt, a PyTorch word_language_model): a 1-layer LSTM with a word embedding, a
tied linear read-out (logits = h E^T + b) and dropout 0.2 on the embedding output and on the LSTM
output; embedding = hidden = 900 (PTB) or 512 (WikiText-2); 32 parallel streams; SGD gamma = 10
with the step gamma sqrt(K), gradient clipping 1.0, weight decay 1e-7; W = 400, K0 = 100,
[K_min, K_max] = [10, 400].

Notes
-----
* Initialisation as word_language_model's ``init_weights``: the embedding (and an untied
  read-out weight) U(-0.1, 0.1), the read-out bias 0, drawn from
  ``np.random.default_rng([seed, 1])``; the LSTM weights as :class:`npbptt.LSTM` (PyTorch's
  U(-1/sqrt(H), 1/sqrt(H)), from ``seed``).
* The authors' WikiText-2 script scales the step by K (``--linear_scale``), their PTB script by
  sqrt(K); here both use sqrt(K), as the paper's Algorithm 1.
* The authors re-estimate K every ~5,000 steps (``TP_SEQ_LEN``); here ``probes_per_epoch``
  spreads probes as evenly: 6 per epoch on PTB (29,049 steps), 13 on WikiText-2 (65,196).
* ``train_steps`` / ``eval_steps`` keep the first steps of every stream (all by default); the
  vocabulary is always the full one, so a quick run's perplexities are comparable in kind, not
  in value, with a full run's.
"""

import numpy as np

from ..data import SequenceData, load_ptb, load_wikitext2
from ..model import LSTM
from .base import Setting, Task

__all__ = ["PTB", "WIKITEXT2", "language_task"]

S = Setting


def _settings(size):
    return (
        S("batch", int, 32, "parallel streams = minibatch size", minimum=1),
        S("embed", int, size, "word embedding size (= hidden with tied weights)", quick=32, minimum=1),
        S("hidden", int, size, "LSTM hidden and cell size", quick=32, minimum=1),
        S("layers", int, 1, "LSTM layers", minimum=1),
        S("tie_weights", bool, True, "tied read-out: logits = h E^T + b (Press & Wolf 2017)"),
        S("dropout", float, 0.2, "dropout on the embedding output and the LSTM output",
          minimum=0.0, maximum=1.0),
        S("train_steps", int, None, "keep the first steps of every training stream",
          quick=600, minimum=1, nullable=True, none="all"),
        S("eval_steps", int, None, "keep the first steps of every valid/test stream",
          quick=100, minimum=1, nullable=True, none="all"),
    )


TRAIN = dict(epochs=50, lr=10.0, weight_decay=1e-7, clip=1.0, K0=100, K_min=10, K_max=400,
             W=400, burnin=50, delta_probes=3)
QUICK_TRAIN = dict(epochs=2, lr=1.0, K0=10, K_min=5, K_max=40, W=40, burnin=10,
                   delta_probes=2, probes_per_epoch=2)


def _slice(split, steps):
    x, y = split
    return (x, y) if steps is None else (x[:steps], y[:steps])


def _init(net, seed):
    """word_language_model's init_weights (Notes)."""
    rng = np.random.default_rng([seed, 1])
    E = net.params["embedding.weight"]
    E[...] = rng.uniform(-0.1, 0.1, E.shape)
    if not net.tie_weights:
        W = net.params["decoder.weight"]
        W[...] = rng.uniform(-0.1, 0.1, W.shape)
    net.params["decoder.bias"][...] = 0.0


def language_task(name, title, loader, size, probes_per_epoch):
    def build(v, seed, dtype, data_dir):
        data = loader(data_dir, batch=v["batch"])
        data = SequenceData(_slice(data.train, v["train_steps"]), _slice(data.valid, v["eval_steps"]),
                            _slice(data.test, v["eval_steps"]), data.vocab_size, data.n_outputs,
                            data.name, data.vocab)
        V = data.vocab_size
        if v["tie_weights"] and v["embed"] != v["hidden"]:
            raise ValueError(f"embed, hidden: tied weights need embed == hidden, got "
                             f"{v['embed']} and {v['hidden']}")
        net = LSTM(v["embed"], v["hidden"], v["layers"], V, vocab_size=V,
                   tie_weights=v["tie_weights"], dropout=v["dropout"], dtype=dtype, seed=seed)
        _init(net, seed)
        return net, data
    return Task(name, title, _settings(size), {**TRAIN, "probes_per_epoch": probes_per_epoch},
                QUICK_TRAIN, build, needs_data=True,
                stream_steps=lambda v: None if v["train_steps"] is None else (v["train_steps"], "train_steps"))


PTB = language_task("ptb", "Penn Treebank language model (§5.2)", load_ptb, 900, 6)
WIKITEXT2 = language_task("wikitext2", "WikiText-2 language model (§5.2)", load_wikitext2, 512, 13)
