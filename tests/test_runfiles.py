"""Run files under hostile use (issue 22, items 4-5): a damaged checkpoint.npz, config.json or
metrics.csv, Ctrl-C while the command imports or trains, kill -9 at random moments, directories of
other files, a missing GPU, too few --epochs, the umask.  Each failure is one line on stderr naming
the file, exit status 2 (130 for SIGINT), and nothing written; every interruption resumes to the
bits of an uninterrupted run."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npbptt.checkpoint import load_checkpoint, read_csv
from npbptt.cli import main

TINY = ["--T-train", "480", "--T-eval", "240", "--batch", "8", "--hidden", "6", "--m", "3",
        "--n-symbols", "3", "--W", "10", "--burnin", "2", "--delta-probes", "2", "--backend",
        "numpy", "--lr", "0.5", "--no-progress"]
# long enough epochs (~0.5 s each) to be interrupted inside one; still tiny
SLOW = ["train", "copy", "--K", "3", "--epochs", "3", "--T-train", "16000", "--T-eval", "240",
        "--batch", "8", "--hidden", "6", "--m", "3", "--n-symbols", "3", "--W", "10", "--burnin", "2",
        "--delta-probes", "1", "--backend", "numpy", "--lr", "0.5", "--no-progress"]
RUN_FILES = ("config.json", "metrics.csv", "checkpoint.npz", "phi_best.npz")


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    e.update(extra)
    return e


def cli(*argv, cwd=None, timeout=120, **kw):
    """``python -m npbptt ARGV`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "npbptt", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env(), **kw)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, err


def one_line(err):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert "Traceback" not in err
    return lines[0]


def snapshot(root):
    """Every path under ``root`` with its bytes and mode: equal snapshots = nothing written."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 2-epoch run (fixed K) and a 1-run sweep, trained once for the module."""
    root = tmp_path_factory.mktemp("base")
    assert main(["train", "copy", "--K", "3", "--epochs", "2", *TINY, "--out", str(root / "run")]) == 0
    assert main(["sweep", "copy", "--K", "3", "--epochs", "2", *TINY[:-1], "--out", str(root / "sweep")]) == 0
    return root


def copy_of(base, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(base / name, dst)
    return dst


# --- item 4: damaged files give one line naming the file, exit status 2, nothing written ----------
def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p):
    p.write_bytes(b"")


def _flip(at):
    def flip(p):
        b = bytearray(p.read_bytes())
        b[int(len(b) * at)] ^= 0x10
        p.write_bytes(bytes(b))
    return flip


def _text(p):
    p.write_text("epoch 3 was fine, I promise\n")


@pytest.mark.parametrize("damage", [_truncate, _empty, _flip(0.3), _flip(0.6), _flip(0.9), _text],
                         ids=["truncated", "empty", "bitflip-30%", "bitflip-60%", "bitflip-90%", "text"])
def test_damaged_checkpoint_is_one_line_exit_2_nothing_written(capsys, base, tmp_path, damage):
    out = copy_of(base, "run", tmp_path)
    damage(out / "checkpoint.npz")
    before = snapshot(tmp_path)
    code, err = run(capsys, "train", "copy", "--K", "3", "--epochs", "3", *TINY, "--out", out, "--resume")
    line = one_line(err)
    assert code == 2
    assert str(out / "checkpoint.npz") in line
    assert "allow_pickle" not in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("doc, match", [
    ([1, 2, 3], "a JSON list, not an object"),
    (42, "a JSON number, not an object"),
    ("unknown-info", "unknown copy-task setting 'info.colour'"),
    ("unknown-train", "unknown training setting 'train.momentum'"),
    ("unknown-top", "unknown key 'notes'"),
])
def test_bad_config_json_is_one_line_exit_2_nothing_written(capsys, base, tmp_path, doc, match):
    out = copy_of(base, "run", tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    if doc == "unknown-info":
        cfg["info"]["colour"] = "blue"
    elif doc == "unknown-train":
        cfg["train"]["momentum"] = 0.9
    elif doc == "unknown-top":
        cfg["notes"] = "mine"
    else:
        cfg = doc
    (out / "config.json").write_text(json.dumps(cfg))
    before = snapshot(tmp_path)
    for argv in (["train", "copy", "--K", "3", "--epochs", "3", *TINY, "--out", out, "--resume"],
                 ["plot", out, "--out", tmp_path / "png"]):
        code, err = run(capsys, *argv)
        line = one_line(err)
        assert code == 2 and str(out / "config.json") in line and match in line, line
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("cut", [0.5, 0.97], ids=["mid-file", "last-row"])
def test_truncated_metrics_csv_under_plot_and_sweep(capsys, base, tmp_path, cut):
    sweep = copy_of(base, "sweep", tmp_path)
    metrics = sweep / "K3-seed0" / "metrics.csv"
    data = metrics.read_bytes()
    metrics.write_bytes(data[: int(len(data) * cut)])
    before = snapshot(tmp_path)
    code, err = run(capsys, "plot", sweep / "K3-seed0", "--out", tmp_path / "png")
    assert code == 2 and str(metrics) in one_line(err)
    code, err = run(capsys, "sweep", "copy", "--K", "3", "--epochs", "3", *TINY[:-1], "--out", sweep)
    assert code == 2 and str(metrics) in one_line(err)
    assert snapshot(tmp_path) == before


def test_damaged_phi_best_under_plot(capsys, base, tmp_path):
    out = copy_of(base, "run", tmp_path)
    (out / "phi_best.npz").write_bytes(b"")
    before = snapshot(tmp_path)
    code, err = run(capsys, "plot", out, "--out", tmp_path / "png")
    assert code == 2 and str(out / "phi_best.npz") in one_line(err)
    assert snapshot(tmp_path) == before


_SITECUSTOMIZE = """
import os, signal, sys
class _InterruptImport:          # Ctrl-C at the moment numpy starts to import
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, _InterruptImport())
"""


@pytest.mark.parametrize("entry", ["console-script", "-m npbptt", "-m npbptt.cli"])
def test_sigint_while_importing_is_one_line_exit_130(tmp_path, entry):
    """SIGINT while the command still imports numpy: one line, exit status 130 (128 + SIGINT, as
    a shell reports a command ended by Ctrl-C), nothing written."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    script = Path(sys.executable).parent / "npbptt"
    if entry == "console-script":
        if not script.is_file():
            pytest.skip("the npbptt console script is not installed beside this Python")
        cmd = [str(script)]
    else:
        cmd = [sys.executable, *entry.split()]
    p = subprocess.run([*cmd, "train", "copy", "--K", "3", *TINY, "--out", tmp_path / "run"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=env(PYTHONPATH=str(tmp_path / "hook")))
    assert p.returncode == 130, p.stderr
    assert p.stderr == "npbptt: interrupted\n"
    assert not (tmp_path / "run").exists()


# --- item 5: no lost file ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["", "."])
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_out_cwd_with_other_files_is_refused(capsys, tmp_path, monkeypatch, where, command):
    (tmp_path / "config.json").write_text('{"name": "my web app", "port": 8080}\n')
    (tmp_path / "metrics.csv").write_text("day,visitors\nmon,3\n")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    argv = (["train", "copy", "--K", "3", *TINY] if command == "train"
            else ["sweep", "copy", "--K", "3", *TINY[:-1]])
    code, err = run(capsys, *argv, "--out", where)
    line = one_line(err)
    assert code == 2
    assert ("empty string" in line) if where == "" else ("neither empty nor an npbptt" in line)
    if where == "." and command == "train":
        assert "config.json" in line
    assert snapshot(tmp_path) == before


def test_plot_out_empty_string_is_refused(capsys, base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(capsys, "plot", base / "run", "--out", "")
    assert code == 2 and "empty string" in one_line(err)
    assert snapshot(tmp_path) == {}


def test_empty_directory_and_npbptt_run_are_accepted(capsys, base, tmp_path):
    (tmp_path / "empty").mkdir()
    started = copy_of(base, "run", tmp_path)           # a run stopped before its first checkpoint
    for name in ("checkpoint.npz", "metrics.csv", "phi_best.npz"):
        (started / name).unlink()
    for out in (tmp_path / "empty", started, tmp_path / "new" / "deeper"):
        code, err = run(capsys, "train", "copy", "--K", "3", "--epochs", "1", *TINY, "--out", out)
        assert code == 0, err
        assert [r["epoch"] for r in read_csv(out / "metrics.csv")] == [1]


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may be present")
def test_cuda_without_gpu_writes_nothing(tmp_path):
    argv = [a if a != "numpy" else "cuda" for a in TINY]
    p = cli("train", "copy", "--K", "3", *argv, "--out", tmp_path / "run")
    assert p.returncode == 2, p.stderr
    assert "cuda" in one_line(p.stderr)
    assert not (tmp_path / "run").exists()


def test_resume_with_fewer_epochs_than_done_is_refused(capsys, base, tmp_path):
    out = copy_of(base, "run", tmp_path)
    before = snapshot(tmp_path)
    code, err = run(capsys, "train", "copy", "--K", "3", "--epochs", "1", *TINY, "--out", out, "--resume")
    line = one_line(err)
    assert code == 2 and "--epochs 1: the run in" in line and "finished 2 epochs" in line
    assert snapshot(tmp_path) == before


def test_library_resume_with_fewer_epochs_is_refused(base, tmp_path):
    from npbptt.tasks import resume_run
    out = copy_of(base, "run", tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="has finished 2 epochs; a resumed run needs epochs >= 2, got 1"):
        resume_run(out, epochs=1, progress=False)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_follow_the_umask(capsys, tmp_path, umask):
    old = os.umask(umask)
    try:
        code, err = run(capsys, "train", "copy", "--K", "3", "--epochs", "1", *TINY, "--out", tmp_path / "r")
    finally:
        os.umask(old)
    assert code == 0, err
    for name in RUN_FILES:
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o777 & ~umask


# --- interruptions: SIGINT in epoch 1, kill -9 at random moments, then --resume ------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted SLOW run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main([*SLOW, "--out", str(out)]) == 0
    return out


def _same_run(a, b):
    """Bit for bit the same run files, the wall-clock 'seconds' column aside."""
    for name in ("checkpoint.npz", "phi_best.npz"):
        (xa, ma), (xb, mb) = load_checkpoint(a / name), load_checkpoint(b / name)
        assert sorted(xa) == sorted(xb)
        for k in xa:
            assert xa[k].dtype == xb[k].dtype and xa[k].tobytes() == xb[k].tobytes(), (name, k)
        for m in (ma, mb):
            for row in m.get("metrics", []):
                row.pop("seconds")
        assert ma == mb, name
    ra, rb = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    for r in ra + rb:
        r.pop("seconds")
    assert ra == rb and len(ra) == 3
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


def _start(out):
    return subprocess.Popen([sys.executable, "-m", "npbptt", *SLOW, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())


def _wait_for(path, proc, timeout=120):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.stderr.read()}"
        assert time.monotonic() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.005)


def test_sigint_in_epoch_1_then_resume_equals_uninterrupted_run(capsys, reference, tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    try:
        _wait_for(out / "config.json", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    line = one_line(err)
    assert "before the first epoch finished" in line and f"--resume --out {out}" in line
    assert not (out / "checkpoint.npz").exists()
    code, err = run(capsys, *SLOW, "--out", out, "--resume")
    assert code == 0, err
    _same_run(out, reference)


@pytest.mark.parametrize("after, seed", [("config.json", 1), ("checkpoint.npz", 2)],
                         ids=["kill-in-epoch-1", "kill-after-a-checkpoint"])
def test_kill_9_at_a_random_moment_then_resume_equals_uninterrupted_run(capsys, reference, tmp_path,
                                                                       after, seed):
    out = tmp_path / "run"
    proc = _start(out)
    try:
        _wait_for(out / after, proc)
        time.sleep(random.Random(seed).uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL             # killed while training, not finished
    assert not (out / "phi_best.npz").exists()
    code, err = run(capsys, *SLOW, "--out", out, "--resume")
    assert code == 0, err
    _same_run(out, reference)


def test_resume_under_another_thread_count_equals_an_uninterrupted_run(tmp_path):
    """The Numba backend on a batch of 64 (two chunks): one epoch on 1 thread, resumed on 2
    threads, equals bit for bit a run of all three epochs on 3 threads (issue 22, item 6)."""
    argv = [a if a != "numpy" else "numba" for a in SLOW]
    argv[argv.index("--batch") + 1] = "64"
    three = list(argv)
    argv[argv.index("--epochs") + 1] = "1"
    a, b = tmp_path / "a", tmp_path / "b"
    for args, threads in ((argv + ["--out", a], 1), (three + ["--out", a, "--resume"], 2),
                          (three + ["--out", b], 3)):
        done = subprocess.run([sys.executable, "-m", "npbptt", *map(str, args)], capture_output=True,
                              text=True, timeout=300, env=env(NUMBA_NUM_THREADS=str(threads)))
        assert done.returncode == 0, done.stderr
    _same_run(a, b)
