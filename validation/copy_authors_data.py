"""The authors' copy-task files (shared/data/copy_authors/): which targets can be predicted?

The files are the data the paper's copy runs loaded (aicherc/adaptive_tbptt at 1bab866,
``data/copy_{fixed,variable}/copy_10_6.p.gz``), made by ``tbptt/generate_data.py``,
``generate_copy_sequence``.  That generator applies its random stream shift inside the loop over
the columns (``for batch in range(batch_size)``) but to *all* columns at once::

    random_shift = np.random.randint(0, 2*lag)
    input_seq[:seq_len,:] = input_seq[random_shift:seq_len+random_shift,:]
    output_seq[:seq_len,:] = output_seq[random_shift:seq_len+random_shift,:]

so column b is shifted 64 - b times, and rows seq_len .. seq_len + 4*lag (never shifted) are
pulled in again and again: the end of a column is a splice of fragments, each a prefix of the
stored tail.  A recall target whose input was shifted away cannot be predicted from the input.

This script checks that on the stored files, independently of the generator:

* an example is a marker (1) then m - 1 data symbols (2..5), then m blanks; its recall, m steps
  later, repeats it.  A *recall segment* of the targets is a maximal run of non-blank targets,
  a new one starting at every marker target (a recall opens with the marker).
* the non-blank target at t = r + j (segment start r, offset j) is **predictable** when some copy
  length m in [m_min, m_max] reads the whole segment so far from the input:
  x[r - m + i] == y[r + i] for i = 0..j, with r - m >= 0.  For the fixed task m_min = m_max = 10,
  i.e. x[t - 10] == y[t]; for the variable task any consistent m is accepted (lenient: a
  reading that exists is enough, so the count is a lower bound of what a copier cannot know).
* a target whose reading would need inputs before the first step (r < m_max and no reading) is
  counted apart as *stream start*: a correct generator that shifts the stream produces those too.

Writes validation/results/copy_authors_data.md (do not edit by hand):

    python validation/copy_authors_data.py [--data-dir DIR]     # DIR default: $NPBPTT_DATA
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FILES = {"fixed": ("copy_fixed.npz", 10, 10), "variable": ("copy_variable.npz", 5, 10)}
SPLITS = ("train", "valid", "test")


BLANK, OK, START, BAD = 0, 1, 2, 3          # labels of the targets


def labels(x, y, m_min, m_max):
    """The label of every target of one column: BLANK, OK (predictable), START (needs inputs
    before step 0) or BAD (no copy length reads it).  ``x``, ``y`` int arrays (T,), tokens
    0 = blank, 1 = marker, 2.. = data.  Plain loops, written for clarity (the tests check the
    counts by a vectorised method)."""
    T = len(y)
    out = np.empty(T, dtype=np.int64)
    r = None                                     # start of the current recall segment
    for t in range(T):
        if y[t] == 0:
            out[t] = BLANK
            r = None
            continue
        if r is None or y[t] == 1:
            r = t
        j = t - r
        good = any(r - m >= 0 and all(x[r - m + i] == y[r + i] for i in range(j + 1))
                   for m in range(m_min, m_max + 1))
        out[t] = OK if good else (START if r < m_max else BAD)
    return out


def ideal_copier(x):
    """A second, independent measure: the causal copier that knows the generator's format.

    At step t it has seen x[0..t]; after the last marker u, the example length L is the run of
    non-blank inputs from u (known once the first blank arrives), and it predicts
    y_hat[t] = x[t - L] for u + L <= t < u + 2L, else blank.  On a correctly generated stream it
    errs only before the first complete example of a column.  Returns y_hat (T,).
    """
    y_hat = np.zeros(len(x), dtype=np.int64)
    u = L = None
    for t in range(len(x)):
        if x[t] == 1:
            u, L = t, None
        if u is not None and L is None and x[t] == 0:
            L = t - u
        if L is not None and u + L <= t < u + 2 * L:
            y_hat[t] = x[t - L]
    return y_hat


def split_labels(x, y, m_min, m_max):
    """:func:`labels` of every column of a split (T, B)."""
    return np.stack([labels(x[:, b], y[:, b], m_min, m_max) for b in range(x.shape[1])], axis=1)


def check_split(x, y, m_min, m_max, lab=None):
    """Counts over all columns of a split (T, B), and the ideal copier's errors."""
    lab = split_labels(x, y, m_min, m_max) if lab is None else lab
    c = np.bincount(lab.ravel(), minlength=4)
    total = dict(zip(("blank", "ok", "start", "bad"), (int(v) for v in c)))
    total["targets"] = int(y.size)
    errs = np.stack([ideal_copier(x[:, b]) != y[:, b] for b in range(x.shape[1])], axis=1)
    total["copier_errors"] = int(errs.sum())
    total["copier_errors_after_20"] = int(errs[2 * m_max:].sum())
    return total


def column_profile(lab, parts=4):
    """Unpredictable (BAD) targets per column of a split's labels (T, B), and how many fall in
    each of ``parts`` equal time blocks of the columns, to show where the splices are."""
    bad = lab == BAD
    block = np.minimum(parts - 1, np.arange(len(lab)) * parts // len(lab))
    return bad.sum(axis=0), np.bincount(block, weights=bad.sum(axis=1), minlength=parts).astype(int)


def target_losses(net, x, y):
    """Per-target cross-entropy (T, B) of ``net`` from the zero state over the split, as the
    trainer's evaluation (NumPy reference forward)."""
    S = net.init_state(x.shape[1])
    L = np.empty(x.shape)
    for t in range(len(x)):
        S, _ = net.step(S, x[t])
        z = net.readout(S[0][-1])
        z = z - z.max(axis=1, keepdims=True)
        L[t] = np.log(np.exp(z).sum(axis=1)) - z[np.arange(x.shape[1]), y[t]]
    return L


def loss_breakdown(run_dir, data_dir, cache=None):
    """For a trained run on the authors' variable-m file: PPL over all targets, the predictable
    ones (blank and OK) and the unpredictable ones (BAD), with the best parameters."""
    from npbptt.checkpoint import load_checkpoint
    from npbptt.tasks import prepare, read_config
    info = read_config(run_dir)["info"]
    kw = {k: info[k] for k in ("m", "m_min", "T_train", "T_eval", "embed", "hidden", "layers")}
    net, data, _, _ = prepare("copy", K=1, data="authors", data_dir=data_dir, **kw)
    arrays, meta = load_checkpoint(Path(run_dir) / "checkpoint.npz")
    for k in net.params:
        net.params[k][...] = arrays["best/" + k]
    m_min = info["m_min"] or info["m"]
    out = {"epoch": meta["best"]["epoch"]}
    for split in ("valid", "test"):
        x, y = getattr(data, split)
        L = target_losses(net, x, y)
        key = (m_min, info["m"], split, x.shape)
        if cache is None or key not in cache:
            lab = split_labels(x, y, m_min, info["m"])
            if cache is not None:
                cache[key] = lab
        lab = cache[key] if cache is not None else lab
        pred = (lab == BLANK) | (lab == OK)
        bad = lab == BAD                  # clean part: before the first BAD of a column, - 2m
        first = np.where(bad.any(axis=0), bad.argmax(axis=0), len(x)) - 2 * info["m"]
        clean = np.arange(len(x))[:, None] < first[None, :]
        out[split] = {"all": float(np.exp(L.mean())), "predictable": float(np.exp(L[pred].mean())),
                      "clean": float(np.exp(L[clean].mean())), "clean_share": float(clean.mean()),
                      "unpredictable": float(np.exp(L[lab == BAD].mean())),
                      "share_of_loss": float(L[lab == BAD].sum() / L.sum())}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("NPBPTT_DATA"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--runs", nargs="*", default=[],
                   help="run directories trained with --data authors --m-min 5: the loss of "
                        "their best parameters on the predictable and unpredictable targets")
    a = p.parse_args(argv)
    if not a.data_dir:
        print("copy_authors_data.py: give --data-dir or set NPBPTT_DATA", file=sys.stderr)
        return 2
    from npbptt.data import load_copy_authors        # checks the sha256 of each file
    lines = ["# The authors' copy-task files: targets that cannot be predicted from the input", "",
             "Generated by `validation/copy_authors_data.py` (do not edit by hand); method in its "
             "docstring. Counts over all 64 columns; 'unpredictable' = a non-blank target that no "
             "copy length m in [m_min, m_max] reads from the input stream (the segment so far must "
             "match), excluding the first steps of each column ('stream start': inputs before "
             "step 0).", "",
             "| file | split | targets | non-blank | unpredictable | % of targets | % of non-blank "
             "| stream start | unpredictable in the last quarter of the columns "
             "| ideal copier: % errors (all steps) | ... from step 20 on |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    cache = {}
    for task, (fname, m_min, m_max) in FILES.items():
        data = load_copy_authors(a.data_dir, task)
        for split in SPLITS:
            x, y = getattr(data, split)
            lab = cache[(m_min, m_max, split, x.shape)] = split_labels(x, y, m_min, m_max)
            c = check_split(x, y, m_min, m_max, lab)
            per_col, blocks = column_profile(lab)
            nb = c["targets"] - c["blank"]
            lines.append(f"| {fname} (m = {m_min}..{m_max}) | {split} | {c['targets']} | {nb} "
                         f"| {c['bad']} | {100 * c['bad'] / c['targets']:.2f} "
                         f"| {100 * c['bad'] / nb:.2f} | {c['start']} "
                         f"| {100 * blocks[-1] / max(1, blocks.sum()):.0f}% "
                         f"| {100 * c['copier_errors'] / c['targets']:.2f} "
                         f"| {100 * c['copier_errors_after_20'] / (c['targets'] - 2 * m_max * x.shape[1]):.2f} |")
            print(task, split, c, "per column (first 8):", per_col[:8].tolist(),
                  "by quarter:", blocks.tolist(), file=sys.stderr)
    lines += ["", "The ideal copier (`ideal_copier`, a second measure independent of the reading "
              "above) knows the format and copies the last example it saw; on a correct stream it "
              "errs only before the first complete example of each column (the 'all steps' column "
              "for the fixed file: 0.2-0.7%, all of it in the first 20 steps).", "",
              "Caveat: the fragments spliced at the end of a column are prefixes of one stored tail, "
              "so a symbol that is not in the stream m steps back may have appeared in an earlier "
              "repeat of the same fragment, tens to hundreds of steps earlier; 'unpredictable' here "
              "means: not by copying (what the task asks), not by any model.", "",
              "Reading: with fixed m every spliced fragment starts at an example boundary "
              "(the stored tail starts at a multiple of 2m = 20), so a recall stays next to its own "
              "input; with variable m the fragments cut examples, and the recalls after a cut refer "
              "to inputs that were shifted away. The unpredictable targets sit at the ends of the "
              "columns (last column of the table), where the repeated shifts splice the fragments.",
              ""]
    if a.runs:
        lines += ["## Where a trained network's loss goes (variable m)", "",
                  "The best parameters (by validation PPL) of runs on copy_variable.npz; PPL over all "
                  "targets (the table's number), over the predictable ones (blank or copyable) and "
                  "over the unpredictable ones, and the unpredictable targets' share of the "
                  "summed loss; the clean part of a column is its steps before the first "
                  "unpredictable target, less 2m = 20 (no splice yet).", "",
                  "| run | best epoch | split | PPL, all | PPL, predictable | PPL, unpredictable "
                  "| share of the loss | PPL, clean part (share of steps) |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for run in a.runs:
            b = loss_breakdown(run, a.data_dir, cache)
            for split in ("valid", "test"):
                r = b[split]
                lines.append(f"| {Path(run).name} | {b['epoch']} | {split} | {r['all']:.3f} "
                             f"| {r['predictable']:.3f} | {r['unpredictable']:.2f} "
                             f"| {100 * r['share_of_loss']:.0f}% "
                             f"| {r['clean']:.3f} ({100 * r['clean_share']:.0f}%) |")
        lines.append("")
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "copy_authors_data.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
