"""The synthetic copy experiment of §5.1 reproduced: Table C.1, Figure 1, Figure C.1, Figure 3.

For each task -- fixed copy length m = 10 and variable m uniform on [5, 10] -- it runs the sweep
of the paper (a 2-layer LSTM, embedding 6, hidden 50, SGD gamma = 1.0, batch 64, T = 256,000
training and 64,000 validation/test steps; fixed K in {5, 10, 15, 20, 30}; adaptive
delta in {0.9, 0.5, 0.1} with W = 100, K0 = 15, [K_min, K_max] = [2, 100]) with
``npbptt sweep`` (finished runs are skipped, interrupted ones resumed from their checkpoints),
then writes

    validation/results/copy_table_c1.md     the obtained table beside the paper's Table C.1
    validation/results/copy_table_c1.csv    the obtained numbers
    validation/results/copy_figure1.png     Figure 1 (test PPL, kappa_hat, delta_hat)
    validation/results/copy_figure_c1.png   Figure C.1 (validation PPL)
    validation/results/copy_figure3.png     Figure 3 (phi_k at the best parameters)

Run (resumable; the runs' checkpoints go to --runs, default runs/copy-repro, not committed):

    .venv/bin/python validation/copy_task.py                       # the full grid: 3 seeds, 100 epochs
    .venv/bin/python validation/copy_task.py --seeds 1 --epochs 30 # a reduced reproduction
    .venv/bin/python validation/copy_task.py --tasks fixed --seeds 1 --epochs 60  # ... extended
    .venv/bin/python validation/copy_task.py --report-only         # tables and figures of what ran
    .venv/bin/python validation/copy_task.py --smoke               # seconds: tiny data, scratch dirs
    .venv/bin/python validation/copy_task.py --data authors --tasks variable --K 5 10 30 \
        --delta 0.1 --seeds 1 --epochs 25 --runs /work/runs/copy-authors   # the authors' files

``--data authors`` trains on the files the paper's own runs loaded (``$NPBPTT_DATA/copy_authors``,
``npbptt train copy --data authors``; see ``validation/copy_authors_data.py`` for their defect)
and writes ``validation/results/copy_authors_table_c1.md`` / ``.csv`` and ``copy_authors_*.png``.

The paper does not state the number of epochs; the authors' scripts stop at 210 epochs or 3 hours.
Their runs also used weight decay 1e-5 (the npbptt CLI default for the copy task) and clipped the
gradient; clipping is off here (``--clip`` to turn it on).
"""
import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np

from npbptt.cli import main as npbptt_main
from npbptt.plots import collect_runs, plot_all, summarize_runs

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TASKS = {"fixed": ["--m", "10"], "variable": ["--m", "10", "--m-min", "5"]}
TASK_NAMES = {"fixed": "copy(m=10)", "variable": "copy(m=5..10)"}

# Table C.1 of the paper: (valid PPL, std), (test PPL, std) at the best validation PPL.
PAPER_C1 = {
    "fixed": {
        "K = 5": ((1.655, 0.012), (1.646, 0.012)), "K = 10": ((1.035, 0.007), (1.036, 0.005)),
        "K = 15": ((1.038, 0.005), (1.039, 0.003)), "K = 20": ((1.045, 0.009), (1.040, 0.006)),
        "K = 30": ((1.044, 0.007), (1.043, 0.004)), "δ = 0.9": ((1.018, 0.005), (1.022, 0.006)),
        "δ = 0.5": ((1.024, 0.003), (1.027, 0.002)), "δ = 0.1": ((1.029, 0.004), (1.030, 0.005)),
    },
    "variable": {
        "K = 5": ((1.46, 0.01), (1.47, 0.01)), "K = 10": ((1.41, 0.02), (1.39, 0.02)),
        "K = 15": ((1.39, 0.03), (1.37, 0.03)), "K = 20": ((1.39, 0.03), (1.35, 0.03)),
        "K = 30": ((1.33, 0.02), (1.31, 0.01)), "δ = 0.9": ((1.37, 0.02), (1.35, 0.02)),
        "δ = 0.5": ((1.33, 0.01), (1.32, 0.02)), "δ = 0.1": ((1.31, 0.01), (1.29, 0.01)),
    },
}


# Known differences between this setup and the paper's runs (facts, not results).
DIFFERENCES = [
    "The paper does not give the number of epochs; the authors' scripts stop at 210 epochs or "
    "3 hours.",
    "Gradient clipping: the authors' scripts clip the norm of the mean-loss gradient at 1/K "
    "(clip_grad = 1.0 divided by the K losses); here no clipping unless `--clip` is given. "
    "Weight decay 1e-5 as their scripts.",
    "The data follow the paper's text (m data symbols, 'start recall', m - 1 blanks; "
    "`npbptt.data.copy_task`). The authors' generator differs: each example starts with a "
    "marker symbol followed by m - 1 data symbols, has no 'start recall' symbol (the recall starts "
    "when the blanks start), uses 4 data symbols, and shifts every stream by a random offset. "
    "The paper's variable-length task ends near PPL 1.3, while with the paper's printed format "
    "it reaches PPL ~1.02 here within 30 epochs. The format is not the cause "
    "(`validation/copy_layout.py`: a correct generator in the authors' format also reaches "
    "~1.02-1.03, `validation/results/copy_layout.md`); the authors' *files* are: their generator "
    "shifts all columns on every pass of its loop over the columns, so the ends of the streams are "
    "spliced from fragments, and in the variable-m file 2.9% of the training and 8.7% / 10.7% of "
    "the validation / test targets cannot be copied from the input "
    "(`validation/results/copy_authors_data.md`). Trained on those files "
    "(`--data authors`), npbptt's variable-m PPLs are in the paper's range "
    "(`validation/results/copy_authors_table_c1.md`). The variable-m columns here (generated "
    "data) measure a different, correctly generated task and are not comparable one-to-one.",
    "Model: the authors feed the one-hot input through Linear(6 -> 50) into LSTM(50); npbptt uses "
    "an embedding of size 6 (the same function class for one-hot inputs, another "
    "parametrisation).",
    "The probe: per stream a random window of W + 1 = 101 steps after 20 burn-in steps from the "
    "zero state, as the authors' code (which uses tau_hat = 80 = W - 20; here tau_hat = 0.9 W = 90 "
    "as the paper).",
]


def _ms(m, s, nd=3):
    if m is None or math.isnan(m):
        return "-"
    return f"{m:.{nd}f}" + ("" if s is None or math.isnan(s) else f" ({s:.{nd}f})")


def findings(task, rows, reach=None):
    """Sentences comparing the obtained numbers with the paper's claims (§5.1)."""
    out = []
    fixed = [r for r in rows if r["setting"].startswith("K")]
    adapt = [r for r in rows if r["setting"].startswith("δ")]
    ok = [r for r in fixed if not math.isnan(r["test_ppl"][0])]
    if not ok:
        return ["no finished fixed-K run"]
    best = min(ok, key=lambda r: r["test_ppl"][0])
    still = [r["setting"] for r in rows if r["best_is_last"]]
    if still:
        out.append("still improving at the last epoch (best = last): " + ", ".join(still)
                   + " -- their PPL and 'data passes at best' are not final.")
    out.append(f"best fixed truncation: {best['setting']} with test PPL {_ms(*best['test_ppl'])} "
               f"at {best['passes_at_best']:.1f} data passes.")
    k5 = next((r for r in fixed if r["setting"] == "K = 5"), None)
    if k5 is not None and task == "fixed" and k5 is not best:
        gap = k5["test_ppl"][0] - best["test_ppl"][0]
        out.append(f"K = 5 (< m = 10): test PPL {_ms(*k5['test_ppl'])}, {gap:+.3f} from the best fixed K "
                   f"(paper: 1.646 vs 1.036) -- " + ("it does not learn the task, as in the paper."
                                                     if gap > 0.1 else "it is NOT clearly worse here."))
    for r in adapt:
        d = float(r["setting"].split("=")[1])
        verdict = ("as good as or better than" if r["test_ppl"][0] <= best["test_ppl"][0] + 0.005
                   else "worse than")
        fastest = min(f["passes_to_reach"] for f in fixed)
        passes = ("no more" if r["passes_to_reach"] <= fastest + 1e-9 else "MORE")
        out.append(f"{r['setting']}: test PPL {_ms(*r['test_ppl'])}, {verdict} the best fixed K; "
                   f"{passes} data passes to reach test PPL <= {reach or PPL_REACHED} than the fastest fixed K "
                   f"({_passes(r['passes_to_reach'])} vs {_passes(fastest)}); "
                   f"measured δ̂ (epochs 2..): median {r['delta_hat_median']:.3g}, <= δ in "
                   f"{100 * r['delta_hat_under']:.0f}% of the epochs; at the end {r['delta_hat_final']:.3g} "
                   + ("<= target." if r["delta_hat_final"] <= d else "ABOVE the target.")
                   + f" Final K {r['K_final']:.0f}.")
    return out


PPL_REACHED = 1.1     # "data passes to reach" threshold of the tables (test PPL at best valid)
PPL_REACHED_AUTHORS = 1.5   # the authors' variable-m file: its unpredictable targets keep PPL > 1.3


def _passes(v):
    return "not reached" if math.isinf(v) else f"{v:.2f}"


def passes_to_reach(runs, threshold=PPL_REACHED):
    """Mean over the runs of the data passes at the first epoch whose test PPL (at the best
    validation PPL so far) is <= threshold; inf when a run never reaches it."""
    out = []
    for r in runs:
        hit = [m["data_passes"] for m in r.metrics if m["test_ppl_at_best"] <= threshold]
        out.append(hit[0] if hit else math.inf)
    return float(np.mean(out)) if out else math.nan


AUTHORS_NOTES = [
    "Data: the two files of the paper's own runs (`--data authors`: `copy_authors/copy_fixed.npz`, "
    "`copy_variable.npz`, 4,000 + 1,000 + 1,000 steps x 64 streams, the authors' format: a marker, "
    "m - 1 of 4 data symbols, m blanks). Their generator splices the ends of the streams from "
    "fragments (`validation/results/copy_authors_data.md`): in copy_variable.npz 2.9% of the "
    "training targets and 8.7% / 10.7% of the validation / test targets cannot be copied from the "
    "input (none in copy_fixed.npz, apart from the first steps of each stream).",
    "Scope (REDUCED): the variable-m file only (the fixed-m file has no unpredictable targets), "
    "K = 10, K = 30 and δ = 0.1, one seed, 20 epochs; `nice`d on 2 shared cores.",
    "Reading: on the authors' variable-m file npbptt's test PPLs are in the paper's range, while the "
    "same settings on correctly generated data reach 1.02-1.03 (`copy_table_c1.md`). The "
    "unpredictable targets carry about half to three quarters of these runs' validation/test loss "
    "(`copy_authors_data.md`, 'Where a trained network's loss goes'); on the predictable targets "
    "the runs are at PPL 1.08-1.20 after 20 epochs, still above the generated-data runs.",
    "Model: npbptt's 2 x 50 LSTM reads an embedding of size 6; the authors' model feeds the one-hot "
    "input through Linear(6 -> 50) into LSTM(50) (`experiments/synth_model.py`). For one-hot "
    "inputs both are affine maps of the token (the same function class); the parametrisation, "
    "initialisation and weight decay differ.",
]


def write_report(runs_by_task, args, results, prefix="copy_", notes=(), reach=PPL_REACHED):
    all_runs = [r for rs in runs_by_task.values() for r in rs]
    rows_by_task = {t: summarize_runs(rs) for t, rs in runs_by_task.items()}
    for t, rows in rows_by_task.items():
        for r in rows:
            group = [x for x in runs_by_task[t] if x.label == r["setting"]]
            r["passes_to_reach"] = passes_to_reach(group, reach)
            d = [m["delta_hat"] for x in group for m in x.metrics[1:]]     # after the K0 epoch
            d = np.array([v for v in d if v is not None and not math.isnan(v)], dtype=float)
            r["delta_hat_median"] = float(np.median(d)) if d.size else math.nan
            r["delta_hat_under"] = (float(np.mean(d <= float(r["setting"].split("=")[1])))
                                    if d.size and r["setting"].startswith("δ") else math.nan)
    results.mkdir(parents=True, exist_ok=True)
    lines = ["# The copy experiment (§5.1): Table C.1 reproduced"
             + (" on the authors' data files" if prefix != "copy_" else ""), "",
             "Generated by `validation/copy_task.py` (do not edit by hand).", ""]
    cfg = all_runs[0].config if all_runs else {}
    info, train = cfg.get("info", {}), cfg.get("train", {})
    epochs = sorted({len(r.metrics) for r in all_runs})
    seeds = sorted({r.config["info"].get("seed") for r in all_runs})
    lines += [f"Settings: T_train = {info.get('T_train')}, T_eval = {info.get('T_eval')} "
              f"({info.get('batch')} streams), LSTM {info.get('layers')} x {info.get('hidden')}, "
              f"embedding {info.get('embed')}, lr = {train.get('lr')}, weight decay = "
              f"{train.get('weight_decay')}, clip = {train.get('clip')}, W = {train.get('W')}, "
              f"K0 = {train.get('K0')}, [K_min, K_max] = [{train.get('K_min')}, {train.get('K_max')}], "
              f"beta estimator {train.get('method')} ({train.get('variant')}); epochs run: {epochs}; "
              f"seeds: {seeds}.", ""]
    def full(runs):
        ep = [len(r.metrics) for r in runs]
        sd = {r.config["info"].get("seed") for r in runs}
        return (info.get("T_train") == 256_000 and info.get("T_eval") == 64_000 and len(sd) >= 3
                and bool(ep) and min(ep) >= 100)

    by_task = {t: rs for t, rs in runs_by_task.items() if rs}
    scope = {t: (f"seeds {sorted({r.config['info'].get('seed') for r in rs})}, "
                 f"{min(len(r.metrics) for r in rs)}-{max(len(r.metrics) for r in rs)} epochs, "
                 f"{'full' if full(rs) else 'REDUCED'}") for t, rs in by_task.items()}
    lines += ["Per task: " + "; ".join(f"{TASK_NAMES.get(t, t)}: {v}" for t, v in scope.items()) + ".", ""]
    if not all(full(rs) for rs in by_task.values()):
        lines += ["**Parts of this reproduction are REDUCED** (fewer seeds, epochs or data than the "
                  "full grid: 3 seeds x 100 epochs at full size): those numbers are not comparable "
                  "one-to-one with the paper's; rerun `validation/copy_task.py` without reductions "
                  "to complete them (it resumes).", ""]
    csv_rows = []
    for task, rows in rows_by_task.items():
        paper = PAPER_C1.get(task, {})
        lines += [f"## {TASK_NAMES[task]}", "",
                  "| setting | paper valid PPL | paper test PPL | valid PPL | test PPL | runs | epochs "
                  f"| data passes at best | data passes to test PPL ≤ {reach} | final K | final δ̂ |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            p = paper.get(r["setting"])
            pv, pt = (_ms(*p[0]), _ms(*p[1])) if p else ("-", "-")
            runs = f"{r['runs']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
            lines.append(f"| {r['setting']} | {pv} | {pt} | {_ms(*r['valid_ppl'])} | {_ms(*r['test_ppl'])} "
                         f"| {runs} | {r['epochs']:.0f} | {r['passes_at_best']:.2f} "
                         f"| {_passes(r['passes_to_reach'])} | {r['K_final']:.1f} "
                         f"| {r['delta_hat_final']:.3g} |")
            csv_rows.append({"task": task, "setting": r["setting"], "runs": r["runs"],
                             "epochs": r["epochs"], "valid_ppl": r["valid_ppl"][0],
                             "valid_ppl_std": r["valid_ppl"][1], "test_ppl": r["test_ppl"][0],
                             "test_ppl_std": r["test_ppl"][1], "passes_at_best": r["passes_at_best"],
                             "passes_to_reach": r["passes_to_reach"],
                             "K_final": r["K_final"], "delta_hat_final": r["delta_hat_final"],
                             "paper_valid_ppl": p[0][0] if p else "", "paper_test_ppl": p[1][0] if p else ""})
        lines += ["", "Findings (computed from the numbers above):", ""]
        lines += [f"- {s}" for s in findings(task, rows, reach)] + [""]
    diffs = [d for d in DIFFERENCES if not (notes and d.startswith("The data follow"))]
    lines += ["## Known differences from the paper's setup", ""] + [f"- {d}" for d in
                                                                   [*notes, *diffs]] + [""]
    figs = plot_all(all_runs, results)
    rename = {}
    for f in figs:
        target = results / f"{prefix}{f.name}"
        f.replace(target)
        rename[f.name] = target.name
    lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in rename.items()] + [""]
    lines += ["Figure 1: test PPL at the best validation PPL against data passes (probes counted), "
              "the truncation K in use against epoch, and the measured δ̂(K) (Eq. 24; median of "
              f"{train.get('delta_probes')} probes per epoch; band: 2.5-97.5 percentiles, adaptive "
              "runs; dotted: the target δ). Figure 3: φ_k at the best parameters of the best run, "
              "the mean over the minibatch (blue) and the single examples (gray).", ""]
    (results / f"{prefix}table_c1.md").write_text("\n".join(lines), encoding="utf-8")
    if csv_rows:
        with open(results / f"{prefix}table_c1.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(csv_rows[0]))
            w.writeheader()
            w.writerows(csv_rows)
    return results / f"{prefix}table_c1.md"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    p.add_argument("--K", nargs="*", default=["5", "10", "15", "20", "30"])
    p.add_argument("--delta", nargs="*", default=["0.9", "0.5", "0.1"])
    p.add_argument("--seeds", default="3")
    p.add_argument("--epochs", default="100")
    p.add_argument("--jobs", default="1")
    p.add_argument("--T-train", default="256000")
    p.add_argument("--T-eval", default="64000")
    p.add_argument("--backend", default=None)
    p.add_argument("--clip", default=None)
    p.add_argument("--data", choices=("generated", "authors"), default="generated",
                   help="generated streams (the paper's text) or the authors' files")
    p.add_argument("--data-dir", default=None, help="with --data authors [$NPBPTT_DATA]")
    p.add_argument("--runs", default=None,
                   help="run directories (checkpoints) [runs/copy-repro, --data authors: "
                        "runs/copy-repro-authors]")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--report-only", action="store_true", help="no training: tables and figures only")
    p.add_argument("--smoke", action="store_true", help="tiny data into scratch directories")
    a = p.parse_args(argv)
    authors = a.data == "authors"
    if a.runs is None:
        a.runs = "runs/copy-repro-authors" if authors else "runs/copy-repro"
    extra = ["--data", "authors"] + (["--data-dir", a.data_dir] if a.data_dir else []) if authors else []
    if a.smoke:
        a.T_train, a.T_eval, a.epochs, a.seeds, a.K, a.delta = "12800", "3200", "2", "1", ["5", "15"], ["0.5"]
        a.runs, a.results = "runs/copy-repro-smoke", "runs/copy-repro-smoke/results"
        extra += ["--delta-probes", "2"]
    if a.backend:
        extra += ["--backend", a.backend]
    if a.clip:
        extra += ["--clip", a.clip]
    for task in ([] if a.report_only else a.tasks):
        argv = ["sweep", "copy", *TASKS[task], "--K", *a.K, "--delta", *a.delta,
                "--seeds", a.seeds, "--epochs", a.epochs, "--jobs", a.jobs,
                "--T-train", a.T_train, "--T-eval", a.T_eval, *extra, "--out", str(Path(a.runs) / task)]
        print("npbptt " + " ".join(argv), file=sys.stderr)
        code = npbptt_main(argv)
        if code != 0:
            return code
    runs_by_task = {}                 # the report covers every task run so far, not only --tasks
    for task in TASKS:
        out = Path(a.runs) / task
        if out.is_dir():
            runs_by_task[task] = collect_runs([out])
    if not any(runs_by_task.values()):
        print("copy_task.py: no runs to report", file=sys.stderr)
        return 1
    path = write_report({t: r for t, r in runs_by_task.items() if r}, a, Path(a.results),
                        prefix="copy_authors_" if authors else "copy_",
                        notes=AUTHORS_NOTES if authors else (),
                        reach=PPL_REACHED_AUTHORS if authors else PPL_REACHED)
    print(path.read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
