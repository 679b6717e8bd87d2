"""Tables and figures of training runs (PNG, matplotlib's Agg backend).

* Table C.1 -- best validation PPL and the test PPL at it, mean (standard deviation) over seeds;
* Table C.3 -- (Book Order) best validation NLL and, at it, the test NLL, the test RMSE of the
  predicted time (x 10^-3, the data's time unit) and the test 0-1 loss of the predicted mark;
* Figure 1  -- test PPL (at the best validation PPL so far) against data passes, kappa_hat (the
  K in use) against epoch, and the measured relative bias delta_hat(K) against epoch;
* Figure C.1 -- validation PPL and its running minimum against data passes;
* Figure 3  -- the gradient norms phi_k against lag k at the best parameters (log scale): the
  minibatch mean P_S[phi_k] (Eq. 20) and single draws;
* Figure C.3 -- (Book Order) test NLL, kappa_hat and delta_hat against epoch (top), test RMSE of
  the time and test 0-1 loss of the mark against epoch (bottom), test metrics at the best
  validation NLL so far;
* Figure C.4 -- (Book Order) validation NLL and its running minimum against data passes.

A run whose metrics have a ``valid_nll`` column (a point-process task) is tabled and drawn by
its NLL (:func:`format_table`, :func:`plot_all` choose); every other run by its PPL.

A run is a directory written by :func:`npbptt.train.train` (``config.json``, ``metrics.csv``,
``phi_best.npz``); a sweep directory holds runs one level down.
"""
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import RunFileError, load_checkpoint

__all__ = ["Run", "collect_runs", "group_runs", "summarize_runs", "format_table_c1",
           "format_table_c3", "format_table", "figure1", "figure_c1", "figure3", "figure_c3",
           "figure_c4", "plot_all", "write_table_files"]

NLL_METRICS = ("valid_nll", "test_nll", "test_rmse", "test_error")
"""metrics.csv columns of a point-process run (the Book Order task, Table C.3)."""


@dataclass
class Run:
    """One run directory: ``config`` (config.json), ``metrics`` (rows of metrics.csv),
    ``phi_best`` (the (W + 1, B) array of phi_best.npz, None when absent)."""
    path: Path
    config: dict
    metrics: list = field(default_factory=list)
    phi_best: np.ndarray | None = None

    @property
    def train(self):
        return self.config["train"]

    @property
    def adaptive(self):
        return self.train.get("delta") is not None

    @property
    def label(self):
        return f"δ = {self.train['delta']:g}" if self.adaptive else f"K = {self.train['K']}"

    @property
    def sort_key(self):
        return (1, -self.train["delta"]) if self.adaptive else (0, self.train["K"])

    @property
    def task(self):
        info = self.config.get("info", {})
        return info.get("name") or info.get("task") or "run"

    @property
    def diverged(self):
        return (self.path / "DIVERGED").is_file()

    @property
    def nll(self):
        """True for a point-process run: its metrics have Table C.3's ``valid_nll`` column."""
        return bool(self.metrics) and self.metrics[0].get("valid_nll") is not None

    def best(self):
        """The metrics row with the lowest validation NLL (point-process runs) or PPL (None
        without rows)."""
        key = "valid_nll" if self.nll else "valid_ppl"
        return min(self.metrics, key=lambda r: r[key]) if self.metrics else None


def _is_run(d):
    return (d / "config.json").is_file() and (d / "metrics.csv").is_file()


def collect_runs(dirs):
    """The runs in ``dirs``: each a run directory, or a sweep directory with runs one level down.
    Every file is read and checked here, before anything is drawn: a damaged config.json,
    metrics.csv or phi_best.npz raises :class:`npbptt.checkpoint.RunFileError` naming it."""
    from .runfiles import PHI_BEST, load_metrics
    from .tasks import read_config
    runs = []
    for d in map(Path, dirs):
        cands = [d] if _is_run(d) else sorted(p for p in d.iterdir() if p.is_dir() and _is_run(p))
        for p in cands:
            run = Run(p, read_config(p), load_metrics(p))
            if (p / PHI_BEST).is_file():
                phi = load_checkpoint(p / PHI_BEST)[0].get("phi")
                if phi is None or phi.ndim != 2 or not np.issubdtype(phi.dtype, np.floating):
                    raise RunFileError(f"{p / PHI_BEST}: not a phi_best file (no 2-d float array 'phi')")
                run.phi_best = phi
            runs.append(run)
    return runs


def group_runs(runs):
    """{task: {label: [runs over seeds]}}, tasks in order met, labels fixed K then delta desc."""
    out = {}
    for r in sorted(runs, key=lambda r: r.sort_key):
        out.setdefault(r.task, {}).setdefault(r.label, []).append(r)
    return out


def _mean_std(v):
    """Mean and sample standard deviation, None/NaN left out; inf (a delta_hat with beta_hat >= 1)
    kept, so that the mean is inf."""
    v = np.asarray([x for x in v if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    with np.errstate(invalid="ignore"):
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def summarize_runs(runs):
    """Rows of Table C.1: per task and setting, over seeds, the best validation PPL and the test
    PPL at it (mean, sample std), the data passes at it, how many runs were still improving (best
    = last epoch), epochs run, final K and delta_hat.  Rows of point-process runs (``Run.nll``)
    also hold Table C.3's ``valid_nll``, ``test_nll``, ``test_rmse``, ``test_error`` at the best
    validation NLL, ``epoch_at_best`` and ``seconds_per_epoch`` (mean, sample std); the
    best epoch is then the one of the lowest ``valid_nll``."""
    rows = []
    for task, groups in group_runs(runs).items():
        for label, rs in groups.items():
            bests = [r.best() for r in rs if r.metrics]
            extra = {}
            if any(r.nll for r in rs):
                extra = {k: _mean_std([b.get(k) for b in bests]) for k in NLL_METRICS}
                extra["epoch_at_best"] = _mean_std([b["epoch"] for b in bests])[0]
                extra["seconds_per_epoch"] = _mean_std([m.get("seconds") for r in rs for m in r.metrics])
            rows.append({**extra,
                "task": task, "setting": label, "runs": len(rs),
                "diverged": sum(r.diverged for r in rs),
                "epochs": _mean_std([len(r.metrics) for r in rs])[0],
                "valid_ppl": _mean_std([b["valid_ppl"] for b in bests]),
                "test_ppl": _mean_std([b["test_ppl"] for b in bests]),
                "passes_at_best": _mean_std([b["data_passes"] for b in bests])[0],
                "best_is_last": sum(1 for r in rs if r.metrics and r.best() is r.metrics[-1]),
                "K_final": _mean_std([r.metrics[-1]["K"] for r in rs if r.metrics])[0],
                "delta_hat_final": _mean_std([r.metrics[-1]["delta_hat"] for r in rs if r.metrics])[0],
            })
    return rows


def _ms(m_s, nd=3):
    m, s = m_s
    if math.isnan(m):
        return "-"
    return f"{m:.{nd}f}" + (f" ({s:.{nd}f})" if not math.isnan(s) else "")


def _num(v, nd):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def format_table_c1(rows):
    """Markdown Table C.1: one table per task; PPL as mean (standard deviation over seeds)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        out += [f"**{task}**", "",
                "| setting | runs | epochs | Valid PPL | Test PPL | data passes at best | final K | final δ̂ |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["task"] != task:
                continue
            runs = f"{r['runs']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
            out.append(f"| {r['setting']} | {runs} | {_num(r['epochs'], 0)} | {_ms(r['valid_ppl'])} | "
                       f"{_ms(r['test_ppl'])} | {_num(r['passes_at_best'], 2)} | "
                       f"{_num(r['K_final'], 1)} | {_num(r['delta_hat_final'], 3)} |")
        out.append("")
    return "\n".join(out).rstrip()


def _msx(m_s, nd, scale=1.0):
    m, s = m_s
    return _ms((m * scale, s * scale), nd)


def format_table_c3(rows):
    """Markdown Table C.3 (Book Order): one table per task; at the best validation NLL the test
    NLL, the RMSE of the predicted time x 10^-3 (in the data's time unit, as the paper's column
    "RMSE(t) 10^-3") and the 0-1 loss of the predicted mark, mean (standard deviation over
    seeds); the epoch of the best validation NLL and the seconds per epoch.  No PPL column."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        out += [f"**{task}**", "",
                "| setting | runs | epochs | Valid NLL | Test NLL | Test RMSE(t) ×10⁻³ | "
                "Test 0-1 loss(y) | epoch at best | s / epoch | final K | final δ̂ |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if r["task"] != task:
                continue
            runs = f"{r['runs']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
            out.append(f"| {r['setting']} | {runs} | {_num(r['epochs'], 0)} | "
                       f"{_ms(r['valid_nll'])} | {_ms(r['test_nll'])} | "
                       f"{_msx(r['test_rmse'], 4, 1e3)} | {_ms(r['test_error'], 4)} | "
                       f"{_num(r['epoch_at_best'], 1)} | {_num(r['seconds_per_epoch'][0], 1)} | "
                       f"{_num(r['K_final'], 1)} | {_num(r['delta_hat_final'], 3)} |")
        out.append("")
    out.append("RMSE(t) is in the data files' time unit (unscaled), times 10³, as the paper's "
               "column; the test metrics are those at the best validation NLL.")
    return "\n".join(out).rstrip()


def format_table(rows):
    """Table C.3 (:func:`format_table_c3`) for the tasks whose rows hold a validation NLL,
    Table C.1 (:func:`format_table_c1`) for the others."""
    nll = [r for r in rows if "valid_nll" in r]
    ppl = [r for r in rows if "valid_nll" not in r]
    return "\n\n".join(t for t in (format_table_c1(ppl) if ppl else "",
                                    format_table_c3(nll) if nll else "") if t)


# --- figures -----------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(rs, key):
    """Mean over seeds of metrics[key] (as floats), truncated to the shortest run; x = epochs."""
    n = min(len(r.metrics) for r in rs)
    if n == 0:
        return None
    a = np.array([[np.nan if r.metrics[i][key] is None else float(r.metrics[i][key])
                   for i in range(n)] for r in rs])
    with warnings.catch_warnings():                 # an epoch where every seed has inf/NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.where(np.isfinite(a), a, np.nan), axis=0) if a.size else None


def _style(rs, i_fixed, i_adapt):
    if rs[0].adaptive:
        shades = ("black", "dimgray", "darkgray", "silver")
        return dict(color=shades[i_adapt % len(shades)], linestyle="-", linewidth=2.0,
                    marker="os^v"[i_adapt % 4], markersize=3)
    return dict(color=f"C{i_fixed % 10}", linestyle="--", linewidth=1.5)


def _each_group(groups):
    i_fixed = i_adapt = 0
    for label, rs in groups.items():
        yield label, rs, _style(rs, i_fixed, i_adapt)
        if rs[0].adaptive:
            i_adapt += 1
        else:
            i_fixed += 1


def _save(plt, fig, path):
    """Lay out, write ``path`` (PNG) and close the figure; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def figure1(runs, path):
    """Figure 1: per task a row of (test PPL at best valid vs data passes, kappa_hat vs epoch,
    delta_hat vs epoch).  Lines: mean over seeds; the band on delta_hat is the mean of the
    2.5-97.5 percentiles over the per-epoch probes."""
    plt = _plt()
    tasks = group_runs(runs)
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 4 * len(tasks)), squeeze=False)
    for row, (task, groups) in zip(axes, tasks.items()):
        top, low = 0.0, math.inf
        for label, rs, st in _each_group(groups):
            passes, ep = _series(rs, "data_passes"), _series(rs, "epoch")
            if passes is None:
                continue
            ppl = _series(rs, "test_ppl_at_best")
            row[0].plot(passes, ppl, label=label, **st)
            top = max(top, np.nanmax(ppl[1:] if len(ppl) > 1 else ppl))  # not the first epoch's
            row[1].plot(ep, _series(rs, "K_mean"), label=label, **st)
            d = _series(rs, "delta_hat")
            if np.any(d > 0):
                low = min(low, np.nanmin(d[d > 0]))
            row[2].plot(ep, d, label=label, **st)
            lo, hi = _series(rs, "delta_hat_lo"), _series(rs, "delta_hat_hi")
            if rs[0].adaptive:
                row[2].fill_between(ep, lo, hi, color=st["color"], alpha=0.12, linewidth=0)
                row[2].axhline(rs[0].train["delta"], color=st["color"], linestyle=":", linewidth=1)
        row[0].set(xlabel="data passes (epochs, probes included)", ylabel="test PPL at best valid PPL",
                   title=f"{task}: test PPL")
        if top > 0:
            row[0].set_ylim(0.98, 1.05 * top)             # perplexities are >= 1
        if math.isfinite(low):
            row[2].set_ylim(bottom=max(low, 1e-4))
        row[1].set(xlabel="epoch", ylabel=r"K  ($\hat\kappa(\delta, \theta_n)$ when adaptive)", title=f"{task}: truncation K")
        row[2].set(xlabel="epoch", ylabel=r"$\hat\delta(K)$  (Eq. 24)", yscale="log",
                   title=f"{task}: estimated relative bias")
        for ax in row:
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    return _save(plt, fig, path)


def figure_c1(runs, path):
    """Figure C.1: validation PPL and its running minimum ('best') against data passes."""
    plt = _plt()
    tasks = group_runs(runs)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for row, (task, groups) in zip(axes, tasks.items()):
        for label, rs, st in _each_group(groups):
            passes = _series(rs, "data_passes")
            if passes is None:
                continue
            row[0].plot(passes, _series(rs, "valid_ppl"), label=label, **st)
            row[1].plot(passes, _series(rs, "best_valid_ppl"), label=label, **st)
        row[0].set(xlabel="data passes", ylabel="valid PPL", title=f"{task}: valid PPL")
        row[1].set(xlabel="data passes", ylabel="best valid PPL", title=f"{task}: 'best' valid PPL")
        for ax in row:
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    return _save(plt, fig, path)


def figure3(runs, path):
    """Figure 3: phi_k against k (log scale) at the best parameters of each task's best run
    (lowest validation PPL): the mean P_S[phi_k] (Eq. 20, blue) and the single draws (gray)."""
    plt = _plt()
    panels = []
    for task, groups in group_runs(runs).items():
        cands = [r for rs in groups.values() for r in rs if r.metrics and r.phi_best is not None]
        if cands:
            panels.append((task, min(cands, key=lambda r: _best_value(r))))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (task, run) in zip(axes[0], panels):
        phi = run.phi_best
        k = np.arange(phi.shape[0])
        draws = np.where(phi > 0, phi, np.nan)
        ax.plot(k, draws, color="gray", alpha=0.15, linewidth=0.7)
        ax.plot([], [], color="gray", label="single draws")
        mean = phi.mean(axis=1)                                       # Eq. (20)
        ax.plot(k, np.where(mean > 0, mean, np.nan), color="C0", linewidth=2.5, label=r"mean $\hat P_S[\phi_k]$ (Eq. 20)")
        best = run.best()
        ax.set(yscale="log", xlabel="lag k", ylabel=r"$\phi_k = \|\partial \ell_s / \partial S_{s-k}\|$",
               title=f"{task}: {run.label}, epoch {best['epoch']} (valid "
                     f"{'NLL' if run.nll else 'PPL'} {_best_value(run):.3f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)


def _best_value(run):
    b = run.best()
    return b["valid_nll"] if run.nll else b["valid_ppl"]


def _at_best(rs, key):
    """Mean over seeds of metrics[key] at the epoch of the lowest validation NLL so far (the
    paper's test curves), truncated to the shortest run."""
    n = min(len(r.metrics) for r in rs)
    if n == 0:
        return None
    a = np.empty((len(rs), n))
    for i, r in enumerate(rs):
        best = None
        for j in range(n):
            m = r.metrics[j]
            if best is None or m["valid_nll"] < best["valid_nll"]:
                best = m
            a[i, j] = np.nan if best[key] is None else float(best[key])
    return a.mean(axis=0)


def _best_so_far(rs, key):
    """Mean over seeds of the running minimum of metrics[key]."""
    n = min(len(r.metrics) for r in rs)
    if n == 0:
        return None
    a = np.array([[float(r.metrics[j][key]) for j in range(n)] for r in rs])
    return np.minimum.accumulate(a, axis=1).mean(axis=0)


def figure_c3(runs, path):
    """Figure C.3 (Book Order): per task two rows.  Top: test NLL at the best validation NLL
    so far against data passes, kappa_hat (the K in use) and delta_hat(K) (Eq. 24) against
    epoch.  Bottom: test RMSE of the predicted time (x 10^-3, the data's unit) and test 0-1
    loss of the predicted mark at the best validation NLL so far, and the best validation NLL,
    against data passes.  Lines: mean over seeds; solid dark: adaptive, dashed: fixed K."""
    plt = _plt()
    tasks = group_runs(runs)
    fig, axes = plt.subplots(2 * len(tasks), 3, figsize=(15, 8 * len(tasks)), squeeze=False)
    for i, (task, groups) in enumerate(tasks.items()):
        top, bot = axes[2 * i], axes[2 * i + 1]
        for label, rs, st in _each_group(groups):
            passes, ep = _series(rs, "data_passes"), _series(rs, "epoch")
            if passes is None:
                continue
            top[0].plot(passes, _at_best(rs, "test_nll"), label=label, **st)
            top[1].plot(ep, _series(rs, "K_mean"), label=label, **st)
            d = _series(rs, "delta_hat")
            top[2].plot(ep, np.where(d > 0, d, np.nan), label=label, **st)
            if rs[0].adaptive:
                top[2].fill_between(ep, _series(rs, "delta_hat_lo"), _series(rs, "delta_hat_hi"),
                                    color=st["color"], alpha=0.12, linewidth=0)
                top[2].axhline(rs[0].train["delta"], color=st["color"], linestyle=":", linewidth=1)
            bot[0].plot(passes, 1e3 * _at_best(rs, "test_rmse"), label=label, **st)
            bot[1].plot(passes, _at_best(rs, "test_error"), label=label, **st)
            bot[2].plot(passes, _best_so_far(rs, "valid_nll"), label=label, **st)
        top[0].set(xlabel="data passes (epochs, probes included)", ylabel="test NLL at best valid NLL",
                   title=f"{task}: test NLL")
        top[1].set(xlabel="epoch", ylabel=r"K  ($\hat\kappa(\delta, \theta_n)$ when adaptive)",
                   title=f"{task}: truncation K")
        top[2].set(xlabel="epoch", ylabel=r"$\hat\delta(K)$  (Eq. 24)", yscale="log",
                   title=f"{task}: estimated relative bias")
        bot[0].set(xlabel="data passes", ylabel=r"test RMSE(t) $\times 10^{-3}$",
                   title=f"{task}: test RMSE of the predicted time")
        bot[1].set(xlabel="data passes", ylabel="test 0-1 loss(y)",
                   title=f"{task}: test 0-1 loss of the predicted mark")
        bot[2].set(xlabel="data passes", ylabel="best valid NLL", title=f"{task}: 'best' valid NLL")
        for ax in (*top, *bot):
            ax.grid(alpha=0.3)
        top[0].legend(fontsize=8)
    return _save(plt, fig, path)


def figure_c4(runs, path):
    """Figure C.4 (Book Order): validation NLL and its running minimum against data passes."""
    plt = _plt()
    tasks = group_runs(runs)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for row, (task, groups) in zip(axes, tasks.items()):
        for label, rs, st in _each_group(groups):
            passes = _series(rs, "data_passes")
            if passes is None:
                continue
            row[0].plot(passes, _series(rs, "valid_nll"), label=label, **st)
            row[1].plot(passes, _best_so_far(rs, "valid_nll"), label=label, **st)
        row[0].set(xlabel="data passes", ylabel="valid NLL", title=f"{task}: valid NLL")
        row[1].set(xlabel="data passes", ylabel="best valid NLL", title=f"{task}: 'best' valid NLL")
        for ax in row:
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    return _save(plt, fig, path)


def plot_all(runs, out):
    """Write into ``out`` figure1.png and figure_c1.png (runs tabled by PPL), figure_c3.png and
    figure_c4.png (point-process runs, by NLL), and figure3.png; returns the paths."""
    out = Path(out)
    ppl = [r for r in runs if not r.nll]
    nll = [r for r in runs if r.nll]
    paths = []
    if ppl:
        paths += [figure1(ppl, out / "figure1.png"), figure_c1(ppl, out / "figure_c1.png")]
    if nll:
        paths += [figure_c3(nll, out / "figure_c3.png"), figure_c4(nll, out / "figure_c4.png")]
    paths.append(figure3(runs, out / "figure3.png"))
    return [p for p in paths if p is not None]


def write_table_files(results, prefix, table, lines, csv_rows, runs):
    """A reproduction script's files in ``results``: ``{prefix}_{table}.md`` (``lines``),
    ``{prefix}_{table}.csv`` (``csv_rows``, dicts with the same keys) and the figures of
    :func:`plot_all` as ``{prefix}_figure*.png``."""
    import csv
    import tempfile
    results = Path(results)
    (results / f"{prefix}_{table}.md").write_text("\n".join(lines) + "\n")
    with open(results / f"{prefix}_{table}.csv", "w", newline="") as fh:
        if csv_rows:
            w = csv.DictWriter(fh, fieldnames=list(csv_rows[0]))
            w.writeheader()
            w.writerows(csv_rows)
    with tempfile.TemporaryDirectory() as tmp:
        for path in plot_all(runs, Path(tmp)):
            Path(path).replace(results / f"{prefix}_{Path(path).name}")
