"""The ``npbptt`` command: train/resume/sweep/plot on a tiny copy task, and one-line errors with
non-zero exit status for bad flags and values (never a traceback)."""
import subprocess
import sys
import types

import numpy as np
import pytest

from npbptt.checkpoint import read_csv, read_json
from npbptt.cli import main

TINY = ["--T-train", "480", "--T-eval", "240", "--batch", "8", "--hidden", "6", "--m", "3",
        "--n-symbols", "3", "--W", "10", "--burnin", "2", "--delta-probes", "2", "--backend",
        "numpy", "--lr", "0.5"]
ISSUE_COLUMNS = ["epoch", "data_passes", "K", "delta_hat", "beta_hat", "train_loss", "valid_ppl",
                 "test_ppl", "seconds"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv, code, match", [
    (["train", "copy", "--delta", "1.5"], 2, "--delta must lie strictly between 0 and 1, got 1.5"),
    (["train", "copy", "--delta", "0"], 2, "--delta must lie strictly between 0 and 1"),
    (["train", "copy", "--delta", "-0.1"], 2, "--delta must lie strictly between 0 and 1"),
    (["train", "copy", "--K", "0"], 2, "--K must be an integer >= 1, got 0"),
    (["train", "copy", "--K", "2.5"], 2, "--K: invalid int value"),
    (["train", "copy", "--K", "3", "--delta", "0.1"], 2, "not allowed with argument"),
    (["train", "copy"], 2, "give --K K"),
    (["train", "copy", "--delta", "0.1", "--K-min", "10", "--K-max", "5"], 2,
     r"--K-min \(10\) must not exceed --K-max \(5\)"),
    (["train", "copy", "--K", "3", "--m", "5", "--m-min", "6"], 2, "--m-min"),
    (["train", "copy", "--K", "3", "--epochs", "0"], 2, "--epochs must be an integer >= 1"),
    (["train", "copy", "--K", "3", "--lr", "-1"], 2, "--lr must be a finite number > 0"),
    (["train", "copy", "--K", "3", "--backend", "tpu"], 2, "--backend must be numpy, numba or cuda"),
    (["train", "copy", "--K", "3", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["train", "mnist", "--K", "3"], 2, "invalid choice: 'mnist'"),
    (["train", "copy", "--K", "3", "--resume"], 2, "--resume needs --out"),
    (["sweep", "copy", "--out", "x"], 2, "at least one --K or --delta"),
    (["sweep", "copy", "--K", "0", "--out", "x"], 2, "--K must be an integer >= 1"),
    (["sweep", "copy", "--delta", "1", "--out", "x"], 2, "--delta must lie strictly between 0 and 1"),
    (["sweep", "copy", "--K", "3"], 2, "the following arguments are required: --out"),
    (["frobnicate"], 2, "invalid choice"),
    (["sweep", "copy", "--K", "3", "--T-train", "6400", "--out", "x"], 2,
     "--T-train: each of the 64 training streams has 100 steps, fewer than the probe's"),
    (["train", "copy", "--delta", "0.5", "--W", "10", "--tau-hat", "10"], 2,
     r"--tau-hat: expected None or an integer in \[0, W\)"),
])
def test_bad_flags_and_values_give_one_line_and_exit_status(capsys, argv, code, match):
    got, out, err = run(capsys, *argv)
    assert got == code
    assert pytest.importorskip("re").search(match, one_line_error(err))


def test_missing_directories(capsys, tmp_path):
    code, _, err = run(capsys, "train", "copy", "--K", "3", "--resume", "--out", str(tmp_path / "none"))
    assert code == 2 and "holds no run" in one_line_error(err)
    code, _, err = run(capsys, "plot", str(tmp_path / "none"))
    assert code == 2 and "not found" in one_line_error(err)
    code, _, err = run(capsys, "plot", str(tmp_path))
    assert code == 2 and "no runs" in one_line_error(err)


def test_train_resume_and_refusals(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "copy", "--delta", "0.5", "--epochs", "2", *TINY,
                          "--out", str(out), "--no-progress")
    assert code == 0
    assert "| epoch | data_passes | K | delta_hat | beta_hat |" in stdout and "best valid PPL" in stdout
    rows = read_csv(out / "metrics.csv")
    assert (out / "metrics.csv").read_text().splitlines()[0].split(",")[:9] == ISSUE_COLUMNS
    assert [r["epoch"] for r in rows] == [1, 2]
    cfg = read_json(out / "config.json")
    assert cfg["train"]["delta"] == 0.5 and cfg["info"]["T_train"] == 480
    assert (out / "checkpoint.npz").is_file() and (out / "phi_best.npz").is_file()
    # Figure 1's panels, whose path the command prints
    assert f"figure: {out / 'figure1.png'}" in stdout
    assert (out / "figure1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, _, err = run(capsys, "train", "copy", "--delta", "0.5", *TINY, "--out", str(out))
    assert code == 2 and "already holds a run" in one_line_error(err)
    code, _, err = run(capsys, "train", "copy", "--delta", "0.1", *TINY, "--out", str(out), "--resume")
    assert code == 2 and "--delta 0.1 differs from the run" in one_line_error(err)

    code, stdout, _ = run(capsys, "train", "copy", "--delta", "0.5", "--epochs", "3", *TINY,
                          "--out", str(out), "--resume", "--no-progress")
    assert code == 0
    assert [r["epoch"] for r in read_csv(out / "metrics.csv")] == [1, 2, 3]


def test_divergence_is_one_line_and_exit_status_1(capsys, tmp_path):
    code, _, err = run(capsys, "train", "copy", "--K", "3", *TINY[:-2], "--lr", "1e300",
                       "--out", str(tmp_path / "r"), "--no-progress")
    assert code == 1
    assert "training diverged in epoch 1" in one_line_error(err)


def test_sweep_writes_table_c1_skips_finished_runs_and_plots(capsys, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "copy", "--K", "2", "4", "--delta", "0.5", "--seeds", "2", "--epochs", "2",
            *TINY, "--jobs", "1", "--out", str(out)]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    table = (out / "table_c1.md").read_text()
    assert stdout.startswith(table.rstrip()[:40])
    for label in ("K = 2", "K = 4", "δ = 0.5"):
        line = next(l for l in table.splitlines() if l.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == "2" and "(" in cells[3] and "(" in cells[4]      # 2 seeds: mean (std)
    ppl = [r["valid_ppl"] for r in read_csv(out / "K2-seed0" / "metrics.csv")]
    ppl1 = [r["valid_ppl"] for r in read_csv(out / "K2-seed1" / "metrics.csv")]
    mean, std = np.mean([min(ppl), min(ppl1)]), np.std([min(ppl), min(ppl1)], ddof=1)
    line = next(l for l in table.splitlines() if l.startswith("| K = 2 |"))
    assert f"{mean:.3f} ({std:.3f})" in line
    code, _, err = run(capsys, *argv)                       # everything finished: all skipped
    assert code == 0 and err.count("finished earlier") == 6
    code, _, err = run(capsys, *argv, "--weight-decay", "0.001")     # not the runs on disk
    assert code == 2 and "holds a run with weight_decay=1e-05" in one_line_error(err)

    code, stdout, _ = run(capsys, "plot", str(out), "--out", str(tmp_path / "png"))
    assert code == 0
    import matplotlib.image as mpimg
    for name in ("figure1.png", "figure_c1.png", "figure3.png"):
        path = tmp_path / "png" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0                           # not a blank canvas


def test_scheduler_without_dask_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask", None)              # as if not installed
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    code, _, err = run(capsys, "sweep", "copy", "--K", "2", *TINY, "--scheduler", "tcp://127.0.0.1:1",
                       "--out", str(tmp_path / "s"))
    assert code == 2 and "needs dask.distributed" in one_line_error(err)


def test_crosscheck_delegates_or_reports_unavailable(capsys, monkeypatch):
    seen = []
    fake = types.ModuleType("npbptt.crosscheck")
    fake.cli_main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "npbptt.crosscheck", fake)
    assert main(["crosscheck", "--framework", "torch", "--K1", "3"]) == 7
    assert seen == [["--framework", "torch", "--K1", "3"]]
    monkeypatch.setitem(sys.modules, "npbptt.crosscheck", None)
    code, _, err = run(capsys, "crosscheck", "--help")
    assert code == 2 and "npbptt crosscheck: unavailable" in one_line_error(err)


def test_console_script_exit_status_without_traceback():
    p = subprocess.run([sys.executable, "-m", "npbptt.cli", "train", "copy", "--delta", "2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == "npbptt train: error: --delta must lie strictly between 0 and 1, got 2.0"


def test_sweep_on_a_dask_cluster_equals_the_local_sweep(capsys, tmp_path):
    """--scheduler ADDRESS: the grid runs on a Dask cluster (a local one, worker processes) through
    joblib's dask backend, and its runs are the runs of a local sweep (same seeds, same metrics)."""
    distributed = pytest.importorskip("dask.distributed")
    grid = ["--K", "2", "--delta", "0.5", "--seeds", "1", "--epochs", "2", *TINY]
    code, _, err = run(capsys, "sweep", "copy", *grid, "--jobs", "1", "--out", str(tmp_path / "local"))
    assert code == 0, err
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        code, stdout, err = run(capsys, "sweep", "copy", *grid, "--scheduler", cluster.scheduler_address,
                                "--out", str(tmp_path / "dask"))
        assert code == 0, err
        # the runs went through the cluster's scheduler (joblib names the tasks after the function)
        assert any("_sweep_job" in name for name in cluster.scheduler.task_prefixes)
    assert "| K = 2 |" in stdout and (tmp_path / "dask" / "table_c1.md").is_file()
    for name in ("K2-seed0", "delta0.5-seed0"):
        here, there = (read_csv(tmp_path / d / name / "metrics.csv") for d in ("local", "dask"))
        assert len(there) == 2
        for a, b in zip(here, there):
            for col in ("K", "train_loss", "valid_ppl", "test_ppl", "delta_hat"):
                assert a[col] == b[col], (name, col)


def test_progress_in_a_log_is_one_line_per_epoch(capsys, tmp_path):
    """stderr not a terminal (a log, CI): no bar redrawn with carriage returns, one line an epoch."""
    code, _, err = run(capsys, "train", "copy", "--K", "3", "--epochs", "2", *TINY,
                       "--out", str(tmp_path / "r"))
    assert code == 0
    assert "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 2, err
    assert "epoch 1/2 K=3" in lines[0] and "epoch 2/2 K=3" in lines[1]
