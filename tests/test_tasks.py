"""One trainer for every task (issue 18): the task table, the command line for every task, the
real data end to end (--quick), --dtype, --data-dir, and what a missing or corrupt file does."""
import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from npbptt import data as D
from npbptt.checkpoint import load_checkpoint, read_csv
from npbptt.cli import main
from npbptt.config import TrainConfig
from npbptt.tasks import TASKS, prepare, train_task

DATA = Path(os.environ.get("NPBPTT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "ptb" / "ptb.train.txt.gz").is_file(),
                                reason="the real data (shared/data) are not here")
# a small slice of PTB for tests: 200 steps of 32 streams, 30 of valid/test
TINY = ["--train-steps", "200", "--eval-steps", "30", "--epochs", "1", "--no-progress"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# --- the table: one source of defaults for the API and the command line --------------------------
def test_every_task_setting_has_a_checked_default():
    for task in TASKS.values():
        for s in task.settings:
            assert s.check(s.default) == s.default or s.default is None
            if s.quick != s.SAME:
                s.check(s.quick)
        TrainConfig(K=5, **task.train_defaults)
        TrainConfig(K=5, **task.training({}, quick=True))


def test_api_and_cli_share_the_copy_defaults(tmp_path, capsys):
    """The API's train_copy used weight decay 0.0 and the CLI 1e-5 (issue 17): one table now."""
    _, _, cfg, _ = prepare("copy", K=3, T_train=64 * 130, T_eval=64 * 10)
    assert cfg.weight_decay == 1e-5 and cfg.epochs == 100 and cfg.lr == 1.0
    code, _, err = run(capsys, "train", "copy", "--K", "3", "--T-train", str(64 * 130),
                       "--T-eval", "640", "--epochs", "1", "--hidden", "4", "--no-progress",
                       "--out", str(tmp_path / "r"))
    assert code == 0, err
    stored = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert stored["weight_decay"] == 1e-5 and stored["lr"] == 1.0


def test_the_paper_settings_of_the_language_tasks():
    """§5.2 / the authors' scripts: the values the issue names."""
    for name, size in (("ptb", 900), ("wikitext2", 512)):
        t = TASKS[name]
        v = {s.key: s.default for s in t.settings}
        assert (v["embed"], v["hidden"], v["layers"], v["batch"]) == (size, size, 1, 32)
        assert v["tie_weights"] is True and v["dropout"] == 0.2
        d = t.train_defaults
        assert (d["lr"], d["clip"], d["weight_decay"], d["W"], d["K0"], d["K_min"], d["K_max"]) == \
            (10.0, 1.0, 1e-7, 400, 100, 10, 400)


def test_unknown_setting_for_a_task_is_refused_naming_it():
    with pytest.raises(ValueError, match="m: not a setting of task 'ptb'"):
        prepare("ptb", K=3, m=5, data_dir=str(DATA))
    with pytest.raises(ValueError, match="dtype: expected one of"):
        prepare("copy", K=3, dtype="float16")


def test_flag_of_another_task_is_refused_with_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "train", "ptb", "--K", "3", "--m", "5", "--out", str(tmp_path / "x"))
    assert code == 2
    assert "--m is not a setting of task 'ptb'" in one_line(err)
    code, _, err = run(capsys, "train", "copy", "--K", "3", "--dropout", "0.1",
                       "--out", str(tmp_path / "x"))
    assert code == 2 and "--dropout is not a setting of task 'copy'" in one_line(err)
    assert not (tmp_path / "x").exists()


# --- data files: missing, corrupt, no directory ------------------------------------------------------
def test_no_data_directory_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("NPBPTT_DATA", raising=False)
    code, _, err = run(capsys, "train", "ptb", "--K", "3", "--out", str(tmp_path / "r"))
    assert code == 2
    assert "--data-dir" in one_line(err) and "NPBPTT_DATA" in err
    assert not (tmp_path / "r").exists()


@needs_data
def test_missing_file_names_file_directory_and_sha256(capsys, tmp_path):
    d = tmp_path / "data"
    (d / "ptb").mkdir(parents=True)
    for s in ("train", "valid"):
        shutil.copy(DATA / "ptb" / f"ptb.{s}.txt.gz", d / "ptb")
    code, _, err = run(capsys, "train", "ptb", "--K", "3", "--data-dir", str(d), "--quick",
                       "--out", str(tmp_path / "r"), *TINY)
    line = one_line(err)
    assert code == 2
    assert str(d / "ptb" / "ptb.test.txt.gz") in line and str(d / "ptb") in line
    assert D.SHA256["ptb/ptb.test.txt"] in line
    assert not (tmp_path / "r").exists()


@needs_data
def test_corrupt_file_names_file_and_both_sums(capsys, tmp_path):
    d = tmp_path / "data"
    (d / "ptb").mkdir(parents=True)
    for s in ("train", "test"):
        shutil.copy(DATA / "ptb" / f"ptb.{s}.txt.gz", d / "ptb")
    with gzip.open(DATA / "ptb" / "ptb.valid.txt.gz", "rb") as f:
        raw = bytearray(f.read())
    raw[100] ^= 1                                     # one bit flipped in the text
    with gzip.open(d / "ptb" / "ptb.valid.txt.gz", "wb") as f:
        f.write(bytes(raw))
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", "ptb", "--K", "3", "--data-dir", str(d), "--quick",
                       "--out", str(out), *TINY)
    line = one_line(err)
    assert code == 2
    assert "ptb.valid.txt.gz" in line and D.SHA256["ptb/ptb.valid.txt"] in line
    assert not out.exists()


# --- every task end to end on the real files -------------------------------------------------------
@needs_data
def test_ptb_quick_end_to_end_and_bit_exact_resume(capsys, tmp_path):
    common = ["--delta", "0.5", "--data-dir", str(DATA), "--quick", "--train-steps", "200",
              "--eval-steps", "30", "--no-progress"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    code, out, err = run(capsys, "train", "ptb", *common, "--epochs", "2", "--out", str(whole))
    assert code == 0, err
    assert "best valid PPL" in out
    code, _, err = run(capsys, "train", "ptb", *common, "--epochs", "1", "--out", str(part))
    assert code == 0, err
    code, _, err = run(capsys, "train", "ptb", "--out", str(part), "--resume", "--epochs", "2",
                       "--no-progress")
    assert code == 0, err
    a, b = load_checkpoint(whole / "checkpoint.npz")[0], load_checkpoint(part / "checkpoint.npz")[0]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    rows = read_csv(whole / "metrics.csv")
    assert len(rows) == 2 and rows[1]["valid_ppl"] < 10_000   # learned something: V = 10,000
    cfg = json.loads((whole / "config.json").read_text())
    assert cfg["info"]["task"] == "ptb" and cfg["info"]["tie_weights"] is True
    assert cfg["model"]["vocab_size"] == 10_000
    assert "decoder.weight" not in a and "param/decoder.weight" not in a     # tied


@needs_data
def test_wikitext2_quick_end_to_end_float32(capsys, tmp_path):
    out = tmp_path / "wt2"
    code, text, err = run(capsys, "train", "wikitext2", "--K", "5", "--dtype", "float32",
                          "--data-dir", str(DATA), "--quick", "--out", str(out), *TINY[:4],
                          "--epochs", "1", "--no-progress")
    assert code == 0, err
    arrays, _ = load_checkpoint(out / "checkpoint.npz")
    assert all(v.dtype == np.float32 for v in arrays.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["info"]["dtype"] == "float32" and cfg["model"]["vocab_size"] == 33_278
    assert np.isfinite(read_csv(out / "metrics.csv")[0]["test_ppl"])


def test_float32_copy_run_trains_and_resumes(tmp_path):
    kw = dict(K=4, T_train=64 * 140, T_eval=64 * 20, hidden=8, epochs=2, dtype="float32",
              progress=False)
    whole = train_task("copy", tmp_path / "a", **kw)
    assert all(v.dtype == np.float32 for v in whole.params.values())
    train_task("copy", tmp_path / "b", **{**kw, "epochs": 1})
    from npbptt.tasks import resume_run
    resumed = resume_run(tmp_path / "b", epochs=2, progress=False)
    assert all(np.array_equal(whole.params[k], resumed.params[k]) for k in whole.params)


def test_resume_refuses_another_dtype(capsys, tmp_path):
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", "copy", "--K", "3", "--T-train", str(64 * 130),
                       "--T-eval", "640", "--epochs", "1", "--hidden", "4", "--no-progress",
                       "--out", str(out))
    assert code == 0, err
    code, _, err = run(capsys, "train", "copy", "--out", str(out), "--resume", "--dtype",
                       "float32", "--epochs", "2")
    assert code == 2 and "--dtype float32 differs" in one_line(err)


@needs_data
def test_language_model_reproduction_script_smoke(tmp_path):
    """validation/language_model.py --smoke: a tiny sweep, its Table C.2 beside the paper's."""
    import subprocess
    import sys
    script = Path(__file__).resolve().parents[1] / "validation" / "language_model.py"
    res = subprocess.run([sys.executable, str(script), "--smoke", "--runs", str(tmp_path / "runs"),
                          "--results", str(tmp_path / "res")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "NPBPTT_DATA": str(DATA)})
    assert res.returncode == 0, res.stderr[-2000:]
    table = (tmp_path / "res" / "lm_ptb_table_c2.md").read_text()
    assert "REDUCED" in table and "| δ = 0.5 | 90.1 (0.4) | 89.5 (0.3) |" in table and "| K = 5 |" in table
    assert (tmp_path / "res" / "lm_ptb_figure1.png").stat().st_size > 1000


def test_a_task_s_own_metrics_are_columns_of_metrics_csv(tmp_path):
    """metrics_fn adds columns after METRIC_COLUMNS; they survive resume and load_metrics."""
    from npbptt.runfiles import METRIC_COLUMNS, load_metrics
    from npbptt.train import train
    calls = []

    def extra(net, valid, test, backend):
        calls.append(backend)
        return {"valid_tokens": int(valid[0].size), "test_mean_target": float(test[1].mean())}

    kw = dict(K=3, T_train=64 * 130, T_eval=640, hidden=4, epochs=1)
    net, data, cfg, info = prepare("copy", **kw)
    train(net, data, cfg, out=tmp_path / "r", progress=False, info=info, metrics_fn=extra)
    net, data, cfg, info = prepare("copy", **{**kw, "epochs": 2})
    train(net, data, cfg, out=tmp_path / "r", resume=True, progress=False, info=info, metrics_fn=extra)
    rows = load_metrics(tmp_path / "r")
    header = (tmp_path / "r" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == list(METRIC_COLUMNS) + ["valid_tokens", "test_mean_target"]
    assert len(calls) == 2 and [r["valid_tokens"] for r in rows] == [640, 640]
    assert rows[0]["test_mean_target"] == pytest.approx(float(data.test[1].mean()), rel=1e-12)


@needs_data
def test_book_order_quick_end_to_end_metrics_and_resume(capsys, tmp_path):
    """npbptt train book-order --quick: Table C.3's columns in metrics.csv, bit-exact resume."""
    common = ["--delta", "0.5", "--data-dir", str(DATA), "--quick", "--no-progress"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    code, out, err = run(capsys, "train", "book-order", *common, "--epochs", "2", "--out", str(whole))
    assert code == 0, err
    assert "best valid NLL" in out and "RMSE(t)" in out
    code, _, err = run(capsys, "train", "book-order", *common, "--epochs", "1", "--out", str(part))
    assert code == 0, err
    code, _, err = run(capsys, "train", "book-order", "--out", str(part), "--resume", "--epochs",
                       "2", "--no-progress")
    assert code == 0, err
    a, b = load_checkpoint(whole / "checkpoint.npz")[0], load_checkpoint(part / "checkpoint.npz")[0]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    rows = read_csv(whole / "metrics.csv")
    for r in rows:
        assert r["valid_nll"] == pytest.approx(r["valid_loss"], rel=1e-9)    # same per-event NLL
        assert 0 <= r["test_error"] <= 1 and r["test_rmse"] > 0
    assert json.loads((whole / "config.json").read_text())["train"]["loss"] == "rmtpp"


def test_norm_param_trains_on_psi_and_old_runs_without_norm_resume(capsys, tmp_path):
    """--norm param (issue 20): the run's probes are psi; a config.json written before the
    field existed resumes as norm="state"."""
    out = tmp_path / "r"
    argv = ["--T-train", str(64 * 140), "--T-eval", "640", "--hidden", "4", "--no-progress"]
    code, _, err = run(capsys, "train", "copy", "--delta", "0.5", "--norm", "param", "--epochs",
                       "1", *argv, "--out", str(out))
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["train"]["norm"] == "param"
    code, _, err = run(capsys, "train", "copy", "--K", "3", "--norm", "frobenius", *argv,
                       "--out", str(tmp_path / "bad"))
    assert code == 2 and "--norm: expected 'state' or 'param'" in one_line(err)
    # phi_best.npz holds the probe (psi) at the best parameters
    phi_best = load_checkpoint(out / "phi_best.npz")[0]["phi"]
    assert phi_best.shape == (101, 64) and np.all(np.isfinite(phi_best))
    old = tmp_path / "old"
    code, _, err = run(capsys, "train", "copy", "--K", "3", "--epochs", "1", *argv, "--out", str(old))
    assert code == 0, err
    doc = json.loads((old / "config.json").read_text())
    del doc["train"]["norm"]
    (old / "config.json").write_text(json.dumps(doc))
    from npbptt.checkpoint import save_checkpoint
    arrays, meta = load_checkpoint(old / "checkpoint.npz")
    del meta["config"]["norm"]
    save_checkpoint(old / "checkpoint.npz", arrays, meta)
    code, _, err = run(capsys, "train", "copy", "--out", str(old), "--resume", "--epochs", "2",
                       "--no-progress")
    assert code == 0, err
    assert len(read_csv(old / "metrics.csv")) == 2


@needs_data
def test_book_order_sweep_writes_table_c3_by_nll_and_its_figures(capsys, tmp_path):
    """npbptt sweep book-order: Table C.3's columns (valid/test NLL, RMSE x 10^-3, 0-1 loss at
    the best validation NLL, mean (std) over seeds), no PPL column; npbptt plot draws C.3/C.4."""
    out = tmp_path / "sweep"
    code, stdout, err = run(capsys, "sweep", "book-order", "--K", "3", "--delta", "0.5",
                            "--seeds", "2", "--epochs", "2", "--quick", "--data-dir", str(DATA),
                            "--jobs", "1", "--out", str(out))
    assert code == 0, err
    assert "best valid NLL" in err
    table = (out / "table_c3.md").read_text()
    assert "PPL" not in table and "PPL" not in stdout
    head = next(l for l in table.splitlines() if l.startswith("| setting |"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    for name in ("Valid NLL", "Test NLL", "Test RMSE(t) ×10⁻³", "Test 0-1 loss(y)", "s / epoch"):
        assert name in cols, cols
    bests = [min(read_csv(out / f"K3-seed{s}" / "metrics.csv"), key=lambda r: r["valid_nll"])
             for s in (0, 1)]
    line = next(l for l in table.splitlines() if l.startswith("| K = 3 |"))
    cells = dict(zip(cols, (c.strip() for c in line.strip("|").split("|"))))
    for col, key, scale, nd in (("Valid NLL", "valid_nll", 1, 3), ("Test NLL", "test_nll", 1, 3),
                                ("Test RMSE(t) ×10⁻³", "test_rmse", 1e3, 4),
                                ("Test 0-1 loss(y)", "test_error", 1, 4)):
        v = [b[key] * scale for b in bests]
        assert cells[col] == f"{np.mean(v):.{nd}f} ({np.std(v, ddof=1):.{nd}f})", (col, cells[col])
    assert cells["runs"] == "2" and cells["epochs"] == "2"
    assert next(l for l in table.splitlines() if l.startswith("| δ = 0.5 |"))

    code, _, err = run(capsys, "plot", str(out), "--out", str(tmp_path / "png"))
    assert code == 0, err
    import matplotlib.image as mpimg
    for name in ("figure_c3.png", "figure_c4.png", "figure3.png"):
        img = mpimg.imread(tmp_path / "png" / name)
        assert img.shape[0] > 100 and img[..., :3].std() > 0
    assert not (tmp_path / "png" / "figure1.png").exists()      # PPL figures: not for this task


# --- copy --data authors: the files of the paper's own copy runs (issue 18) ----------------------
needs_authors = pytest.mark.skipif(not (DATA / "copy_authors").is_dir(),
                                   reason="shared/data/copy_authors is not here")
AUTHORS_TINY = ["--T-train", str(64 * 300), "--T-eval", str(64 * 20), "--hidden", "4",
                "--epochs", "1", "--no-progress"]


@needs_authors
def test_copy_data_authors_end_to_end_variable_file(capsys, tmp_path):
    """--data authors --m-min 5 trains on copy_variable.npz (the first T/64 steps of each
    stream), stores data and data_dir in config.json and resumes."""
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", "copy", "--data", "authors", "--m-min", "5", "--K", "5",
                       "--data-dir", str(DATA), *AUTHORS_TINY, "--out", str(out))
    assert code == 0, err
    info = json.loads((out / "config.json").read_text())["info"]
    assert info["data"] == "authors" and info["data_dir"] == str(DATA)
    assert info["name"] == "copy-authors(m=5..10)"
    net, data, _, _ = prepare("copy", K=5, data="authors", m_min=5, data_dir=str(DATA),
                              T_train=64 * 300, T_eval=64 * 20)
    with np.load(DATA / "copy_authors" / "copy_variable.npz") as z:
        np.testing.assert_array_equal(data.train[0], z["train_x"][:300])
        np.testing.assert_array_equal(data.test[1], z["test_y"][:20])
    assert net.params["embedding.weight"].shape[0] == 6 and data.n_outputs == 6
    fixed = prepare("copy", K=5, data="authors", data_dir=str(DATA), T_train=64 * 300,
                    T_eval=64 * 20)[1]
    with np.load(DATA / "copy_authors" / "copy_fixed.npz") as z:
        np.testing.assert_array_equal(fixed.valid[0], z["valid_x"][:20])
    code, _, err = run(capsys, "train", "copy", "--out", str(out), "--resume", "--epochs", "2",
                       "--no-progress")
    assert code == 0, err
    assert len(read_csv(out / "metrics.csv")) == 2


@needs_authors
@pytest.mark.parametrize("flags, names", [
    (["--m-min", "6"], "--m-min"), (["--m", "12"], "--m"), (["--batch", "32"], "--batch"),
    (["--n-symbols", "4"], "--n-symbols"), (["--T-train", str(64 * 5000)], "--T-train"),
])
def test_copy_data_authors_refuses_flags_that_do_not_fit(capsys, tmp_path, flags, names):
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", "copy", "--data", "authors", "--K", "5", *flags,
                       "--data-dir", str(DATA), "--no-progress", "--out", str(out))
    assert code == 2 and one_line(err).startswith(f"npbptt train: error: {names}:")
    assert not out.exists()


def test_copy_data_authors_needs_a_data_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("NPBPTT_DATA", raising=False)
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", "copy", "--data", "authors", "--K", "5", "--out", str(out))
    assert code == 2 and "--data-dir" in one_line(err) and "data='authors'" in err
    code, _, err = run(capsys, "train", "copy", "--data", "author", "--K", "5", "--out", str(out))
    assert code == 2 and "--data" in one_line(err) and "authors" in err
    missing = tmp_path / "empty"
    missing.mkdir()
    code, _, err = run(capsys, "train", "copy", "--data", "authors", "--K", "5", "--data-dir",
                       str(missing), "--out", str(out))
    line = one_line(err)
    assert code == 2 and "copy_fixed.npz" in line and str(missing / "copy_authors") in line
    assert D.SHA256_STORED["copy_authors/copy_fixed.npz"] in line
    assert not out.exists()
    # the generated data need no directory, as before
    assert prepare("copy", K=5, T_train=64 * 300, T_eval=640)[3]["data_dir"] is None


@needs_data
def test_book_order_reproduction_script_smoke(tmp_path):
    """validation/book_order.py --smoke: a tiny sweep, its Table C.3 beside the paper's, Figure C.3."""
    import csv
    import subprocess
    import sys
    script = Path(__file__).resolve().parents[1] / "validation" / "book_order.py"
    res = subprocess.run([sys.executable, str(script), "--smoke", "--runs", str(tmp_path / "runs"),
                          "--results", str(tmp_path / "res")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "NPBPTT_DATA": str(DATA)})
    assert res.returncode == 0, res.stderr[-2000:]
    table = (tmp_path / "res" / "book_order_table_c3.md").read_text()
    assert "REDUCED" in table and "PPL" not in table
    assert "| δ = 0.1 |" not in table                      # only the settings that ran
    line = next(l for l in table.splitlines() if l.startswith("| δ = 0.5 |"))
    assert line.startswith("| δ = 0.5 | -4.890 (0.003) | -4.733 (0.013) | 3.9662 (0.0043) | 0.3953 (0.0002) |")
    rows = list(csv.DictReader(open(tmp_path / "res" / "book_order_table_c3.csv")))
    assert [r["setting"] for r in rows] == ["K = 3", "δ = 0.5"]
    best = min(read_csv(tmp_path / "runs" / "K3-seed0" / "metrics.csv"), key=lambda r: r["valid_nll"])
    assert float(rows[0]["test_nll"]) == pytest.approx(best["test_nll"], rel=1e-12)
    assert float(rows[0]["test_rmse_e3"]) == pytest.approx(1e3 * best["test_rmse"], rel=1e-12)
    assert f"| {best['test_nll']:.3f} |" in next(l for l in table.splitlines() if l.startswith("| K = 3 |"))
    for name in ("figure_c3", "figure_c4", "figure3"):
        assert (tmp_path / "res" / f"book_order_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_copy_data_setting_is_checked_by_the_api(monkeypatch):
    with pytest.raises(ValueError, match=r"^data: expected one of 'generated', 'authors'"):
        prepare("copy", K=5, data="authorz")
    monkeypatch.delenv("NPBPTT_DATA", raising=False)
    with pytest.raises(ValueError, match=r"^data_dir: task 'copy' with data='authors'"):
        prepare("copy", K=5, data="authors")


def test_copy_quick_m_does_not_apply_to_the_authors_files():
    """--quick shortens the copy to m = 4 on generated data; the authors' files have m = 10, so
    --data authors --quick keeps m = 10 (an explicit --m still wins and is checked)."""
    copy = TASKS["copy"]
    assert copy.values({}, quick=True)["m"] == 4
    assert copy.values({"data": "authors"}, quick=True)["m"] == 10
    assert copy.values({"data": "authors", "m": 7}, quick=True)["m"] == 7
    assert copy.values({}, quick=False)["m"] == 10
