"""The ``npbptt`` command: train, sweep, plot, crosscheck.

    npbptt train copy --delta 0.1 --quick --out runs/copy-quick      # adaptive TBPTT, short copy task
    npbptt train copy --K 15 --m 10 --epochs 50 --out runs/K15       # fixed K, full-size data
    npbptt train copy --out runs/K15 --resume --epochs 80            # continue a run
    npbptt sweep copy --K 5 10 15 20 30 --delta 0.9 0.5 0.1 --seeds 3 --jobs 2 --out runs/copy
    npbptt plot runs/copy                                           # Figure 1, C.1 and 3 as PNG
    npbptt crosscheck ...                                           # see npbptt.crosscheck

Every error ends with one line on stderr and a non-zero exit status, never a traceback: 2 for bad
flags or values and for a damaged run file (the line names the file), 1 for a run that failed
(diverged), 130 for Ctrl-C (SIGINT), also while the command is still importing numpy/numba.
Nothing is written before every check has passed, and a new run writes only into a directory
that does not exist, is empty, or holds an npbptt run (a readable config.json): never into a
directory of other files such as the current one.  ``--resume`` continues a run stopped at any
moment: from its last checkpoint, or from epoch 0 when none was written yet.
"""
import argparse
import math
import sys
from pathlib import Path

__all__ = ["main", "build_parser", "QUICK"]

# --quick: a short copy task that runs in minutes on 2 cores (numpy backend)
QUICK = dict(T_train=64_000, T_eval=16_000, epochs=40, delta_probes=5)
TASKS = ("copy",)


class UsageError(Exception):
    """A bad flag or value: printed as one line, exit status 2."""


class Interrupted(Exception):
    """SIGINT (Ctrl-C) with what it left on disk: printed as one line, exit status 130."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) raised as :class:`UsageError`."""

    def error(self, message):
        raise UsageError(message)


# --- flags -------------------------------------------------------------------------------------
# name -> (TrainConfig/task keyword, type, help).  Every default is None so that the flags a user
# gave can be told from the defaults (a resumed run compares them with its config.json).
_TASK_FLAGS = {
    "--m": ("m", int, "copy length m (largest m when --m-min is given) [10]"),
    "--m-min": ("m_min", int, "smallest copy length: m uniform on [m-min, m] (variable copy task)"),
    "--n-symbols": ("n_symbols", int, "number I of data symbols [6]"),
    "--T-train": ("T_train", int, "training steps in all (split into --batch streams) [256000]"),
    "--T-eval": ("T_eval", int, "validation and test steps each [64000]"),
    "--batch": ("batch", int, "parallel streams = minibatch size S [64]"),
    "--embed": ("embed", int, "embedding size [6]"),
    "--hidden": ("hidden", int, "LSTM hidden and cell size [50]"),
    "--layers": ("layers", int, "LSTM layers [2]"),
    "--data-seed": ("data_seed", int, "seed of the data streams [0]"),
}
_TRAIN_FLAGS = {
    "--epochs": ("epochs", int, "passes over the training data [100; --quick: 40]"),
    "--lr": ("lr", float, "SGD step gamma; the step is gamma*sqrt(K)*g (Algorithm 1) [1.0]"),
    "--weight-decay": ("weight_decay", float, "L2 weight decay [1e-5, as the authors' copy runs]"),
    "--clip": ("clip", float, "clip the gradient norm to this value [no clipping]"),
    "--K0": ("K0", int, "adaptive: truncation of the first epoch, before the first probe [15]"),
    "--K-min": ("K_min", int, "adaptive: smallest K of Eq. (25) [2]"),
    "--K-max": ("K_max", int, "adaptive: largest K of Eq. (25) [100]"),
    "--W": ("W", int, "probe window: lags 0..W by BPTT(W, 1) [100]"),
    "--burnin": ("burnin", int, "steps from the zero state before a probe window [20]"),
    "--probes-per-epoch": ("probes_per_epoch", int, "truncation updates per epoch (alpha) [1]"),
    "--tau-hat": ("tau_hat", int, "start of the geometric tail in the probe [0.9 W]"),
    "--method": ("method", str, "beta estimator: ols (Eq. 22), max (Eq. 21), quantile [ols]"),
    "--beta-alpha": ("beta_alpha", float, "quantile level alpha of --method quantile [0.1]"),
    "--variant": ("variant", str, "bias bounds as printed (paper) or as the authors' code [paper]"),
    "--delta-probes": ("delta_probes", int, "probes per epoch measuring delta_hat(K) [10]"),
}
COPY_CLI_DEFAULTS = dict(epochs=100, weight_decay=1e-5)


def _positive_int(name, v):
    if v is not None and v < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {v}")


def _add_common(p):
    p.add_argument("task", choices=TASKS, help="the experiment (copy: §5.1)")
    for flag, (_, typ, hlp) in {**_TASK_FLAGS, **_TRAIN_FLAGS}.items():
        p.add_argument(flag, type=typ, default=None, help=hlp)
    p.add_argument("--backend", default=None, help="numpy, numba or cuda [fastest available]")
    p.add_argument("--quick", action="store_true",
                   help="short version: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))


def build_parser():
    p = _Parser(prog="npbptt", description="BPTT, truncated BPTT and adaptive truncation "
                                           "(Aicher, Foti & Fox, UAI 2019).")
    sub = p.add_subparsers(dest="command", metavar="{train,sweep,plot,crosscheck}", parser_class=_Parser)

    t = sub.add_parser("train", help="train one run (fixed --K or adaptive --delta)")
    _add_common(t)
    g = t.add_mutually_exclusive_group()
    g.add_argument("--K", type=int, default=None, help="fixed truncation: BPTT(2K, K)")
    g.add_argument("--delta", type=float, default=None, help="adaptive truncation: tolerance in (0, 1)")
    t.add_argument("--seed", type=int, default=None, help="seed of the initial parameters and probes [0]")
    t.add_argument("--out", default=None, help="run directory [runs/<task>-<K or delta>-seed<seed>]")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sweep", help="a grid of runs (Table C.1), in parallel")
    _add_common(s)
    s.add_argument("--K", type=int, nargs="*", default=[], help="fixed truncations")
    s.add_argument("--delta", type=float, nargs="*", default=[], help="adaptive tolerances")
    s.add_argument("--seeds", type=int, default=1, help="seeds per setting (0..seeds-1) [1]")
    s.add_argument("--seed0", type=int, default=0, help="first seed [0]")
    s.add_argument("--jobs", type=int, default=1, help="runs in parallel (joblib) [1]")
    s.add_argument("--scheduler", default=None,
                   help="Dask scheduler ADDRESS: run through joblib's dask backend (npbptt[dask])")
    s.add_argument("--out", required=True, help="sweep directory (one sub-directory per run)")

    pl = sub.add_parser("plot", help="Figure 1, Figure C.1 and Figure 3 as PNG files")
    pl.add_argument("dirs", nargs="+", help="run or sweep directories")
    pl.add_argument("--out", default=None, help="where to write the PNGs [the first directory]")

    sub.add_parser("crosscheck", help="compare gradients with PyTorch/JAX (npbptt.crosscheck)",
                   add_help=False)
    return p


def _gather(a, flags):
    """{keyword: value} of the flags the user gave (not None)."""
    out = {}
    for flag, (key, _, _) in flags.items():
        v = getattr(a, flag.lstrip("-").replace("-", "_"))
        if v is not None:
            out[key] = v
    return out


def _check_values(a, task_kw, train_kw):
    """One-line errors for the common bad values (the library re-checks everything)."""
    for key in ("epochs", "W", "K_min", "K_max", "K0", "probes_per_epoch"):
        _positive_int("--" + key.replace("_", "-"), train_kw.get(key))
    for key in ("m", "m_min", "n_symbols", "T_train", "T_eval", "batch", "embed", "hidden", "layers"):
        _positive_int("--" + key.replace("_", "-"), task_kw.get(key))
    if train_kw.get("K_min", 2) > train_kw.get("K_max", 100):
        raise UsageError(f"--K-min ({train_kw.get('K_min', 2)}) must not exceed --K-max "
                         f"({train_kw.get('K_max', 100)})")
    if task_kw.get("m_min") is not None and task_kw["m_min"] > task_kw.get("m", 10):
        raise UsageError(f"--m-min ({task_kw['m_min']}) must not exceed --m ({task_kw.get('m', 10)})")
    lr = train_kw.get("lr")
    if lr is not None and not (0 < lr < math.inf):
        raise UsageError(f"--lr must be a finite number > 0, got {lr}")
    if getattr(a, "backend", None) is not None and a.backend not in ("numpy", "numba", "cuda"):
        raise UsageError(f"--backend must be numpy, numba or cuda, got {a.backend!r}")


def _check_K(K):
    if K is not None and K < 1:
        raise UsageError(f"--K must be an integer >= 1, got {K}")


def _check_delta(d):
    if d is not None and not 0 < d < 1:
        raise UsageError(f"--delta must lie strictly between 0 and 1, got {d}")


def _settings(a):
    """Task and training keywords from the flags: (given_task, given_train, full_kwargs)."""
    task_kw, train_kw = _gather(a, _TASK_FLAGS), _gather(a, _TRAIN_FLAGS)
    if a.quick:
        task_kw.setdefault("T_train", QUICK["T_train"])
        task_kw.setdefault("T_eval", QUICK["T_eval"])
        train_kw.setdefault("epochs", QUICK["epochs"])
        train_kw.setdefault("delta_probes", QUICK["delta_probes"])
    _check_values(a, task_kw, train_kw)
    full = {**COPY_CLI_DEFAULTS, **task_kw, **train_kw}
    if a.backend is not None:
        full["backend"] = a.backend
    return task_kw, train_kw, full


def _precheck(full, K, delta):
    """Settings the library would refuse, refused before any run starts (one-line errors)."""
    from .train import TrainConfig
    task_keys = {k for k, _, _ in _TASK_FLAGS.values()}
    try:
        TrainConfig(K=K, delta=delta, **{k: v for k, v in full.items() if k not in task_keys})
    except ValueError as e:
        raise UsageError(str(e)) from None
    steps = full.get("T_train", 256_000) // full.get("batch", 64)
    need = full.get("W", 100) + full.get("burnin", 20) + 1
    if steps < need:
        raise UsageError(f"--T-train: each of the {full.get('batch', 64)} training streams has "
                         f"{steps} steps, fewer than the probe's burnin + W + 1 = {need}")


def _run_name(K, delta, seed):
    return (f"K{K}" if K is not None else f"delta{delta:g}") + f"-seed{seed}"


# --- train -------------------------------------------------------------------------------------
def _cmd_train(a):
    from .train import (CHECKPOINT, CONFIG, Diverged, check_run_dir, format_metrics, read_config,
                        resume_run, train_copy)
    _check_K(a.K)
    _check_delta(a.delta)
    task_kw, train_kw, full = _settings(a)
    if a.out is not None and not a.out.strip():
        raise UsageError("--out must name a run directory, got an empty string")
    if a.resume:
        if a.out is None:
            raise UsageError("--resume needs --out DIR, the run to continue")
        out = Path(a.out)
        if not (out / CONFIG).is_file():
            raise UsageError(f"--resume: {out} holds no run ({CONFIG} not found)")
        stored = read_config(out)
        if train_kw.get("epochs") is not None and (out / CHECKPOINT).is_file():
            from .checkpoint import load_checkpoint
            done = load_checkpoint(out / CHECKPOINT)[1].get("epoch")
            if isinstance(done, int) and train_kw["epochs"] < done:
                raise UsageError(f"--epochs {train_kw['epochs']}: the run in {out} has finished {done} "
                                 f"epochs; a resumed run needs --epochs >= {done}")
        given = {**task_kw, **{k: v for k, v in train_kw.items() if k != "epochs"}}
        if a.K is not None:
            given["K"] = a.K
        if a.delta is not None:
            given["delta"] = a.delta
        if a.seed is not None:
            given["seed"] = a.seed
        have = {**stored["train"], **stored["info"]}
        for k, v in given.items():
            if k in have and have[k] != v:
                raise UsageError(f"--resume: {_flag(k)} {v} differs from the run in {out} ({k}={have[k]}); "
                                 "a resumed run keeps its settings except --epochs and --backend")
        run = lambda: resume_run(out, epochs=train_kw.get("epochs"), backend=a.backend,  # noqa: E731
                                 progress=not a.no_progress)
    else:
        if a.K is None and a.delta is None:
            raise UsageError("give --K K (fixed truncation) or --delta D (adaptive truncation)")
        seed = 0 if a.seed is None else a.seed
        if seed < 0:
            raise UsageError(f"--seed must be an integer >= 0, got {seed}")
        out = Path(a.out) if a.out is not None else Path("runs") / f"{a.task}-{_run_name(a.K, a.delta, seed)}"
        try:
            check_run_dir(out)
        except ValueError as e:
            raise UsageError(str(e).replace("out: ", "--out ", 1)) from None
        if (out / CHECKPOINT).exists():
            raise UsageError(f"--out {out} already holds a run: add --resume to continue it, or "
                             "choose another --out")
        _precheck(full, a.K, a.delta)
        run = lambda: train_copy(out, K=a.K, delta=a.delta, seed=seed,  # noqa: E731
                                 progress=not a.no_progress, **full)
    try:
        res = run()
    except Diverged as e:
        print(f"npbptt train: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        if (out / CHECKPOINT).is_file():
            raise Interrupted(f"interrupted; {out / CHECKPOINT} holds the last finished epoch: "
                              f"--resume --out {out} continues the run") from None
        if (out / CONFIG).is_file():
            raise Interrupted(f"interrupted before the first epoch finished; --resume --out {out} "
                              "starts the run again from epoch 0") from None
        raise Interrupted("interrupted before the run started; nothing was written") from None
    print(format_metrics(res.metrics))
    print(f"\nrun directory: {out} (config.json, metrics.csv, checkpoint.npz, phi_best.npz)")
    return 0


def _flag(key):
    for flag, (k, _, _) in {**_TASK_FLAGS, **_TRAIN_FLAGS}.items():
        if k == key:
            return flag
    return "--" + key.replace("_", "-")


# --- sweep -------------------------------------------------------------------------------------
def _sweep_job(out, K, delta, seed, kwargs):
    """One run of a sweep: fresh, resumed, or skipped when finished.  Returns a status line."""
    from .train import CHECKPOINT, Diverged, load_metrics, resume_run, train_copy
    out = Path(out)
    epochs = kwargs["epochs"]
    done = load_metrics(out)
    if (out / "DIVERGED").is_file():
        return f"{out.name}: diverged earlier (see {out / 'DIVERGED'})"
    if len(done) >= epochs and (out / "phi_best.npz").is_file():
        return f"{out.name}: finished earlier ({len(done)} epochs)"
    try:
        if (out / CHECKPOINT).is_file():
            res = resume_run(out, epochs=epochs, backend=kwargs.get("backend"), progress=False)
        else:
            res = train_copy(out, K=K, delta=delta, seed=seed, progress=False, **kwargs)
    except Diverged as e:
        from .checkpoint import atomic_write_text
        atomic_write_text(out / "DIVERGED", f"{e}\n")
        return f"{out.name}: DIVERGED -- {e}"
    best = min(res.metrics, key=lambda r: r["valid_ppl"])
    return f"{out.name}: best valid PPL {best['valid_ppl']:.4f} at epoch {best['epoch']}"


def _cmd_sweep(a):
    import joblib
    from tqdm.auto import tqdm
    from .plots import collect_runs, format_table_c1, summarize_runs
    from .checkpoint import atomic_write_text, load_checkpoint
    from .train import CHECKPOINT, CONFIG, check_run_dir, load_metrics, read_config
    for K in a.K:
        _check_K(K)
    for d in a.delta:
        _check_delta(d)
    if not a.K and not a.delta:
        raise UsageError("give at least one --K or --delta value")
    if a.seeds < 1:
        raise UsageError(f"--seeds must be an integer >= 1, got {a.seeds}")
    if a.seed0 < 0:
        raise UsageError(f"--seed0 must be an integer >= 0, got {a.seed0}")
    if a.jobs == 0 or a.jobs < -1:
        raise UsageError(f"--jobs must be >= 1 (or -1 for all cores), got {a.jobs}")
    _, _, full = _settings(a)
    for K in a.K:
        _precheck(full, K, None)
    for d in a.delta:
        _precheck(full, None, d)
    if not a.out.strip():
        raise UsageError("--out must name a sweep directory, got an empty string")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if (out.is_dir() and any(out.iterdir()) and not (out / "table_c1.md").is_file()
            and not any((p / CONFIG).is_file() for p in out.iterdir() if p.is_dir())):
        raise UsageError(f"--out {out} is neither empty nor an npbptt sweep (no table_c1.md, no "
                         "run directories); choose a new or empty directory")
    jobs = [(out / _run_name(K, None, s), K, None, s) for K in a.K for s in range(a.seed0, a.seed0 + a.seeds)]
    jobs += [(out / _run_name(None, d, s), None, d, s) for d in a.delta for s in range(a.seed0, a.seed0 + a.seeds)]
    for path, K, d, s in jobs:                   # a run on disk must be the run asked for, undamaged
        try:
            check_run_dir(path)
        except ValueError as e:
            raise UsageError(str(e).replace("out: ", "", 1)) from None
        if (path / CONFIG).is_file():
            stored = read_config(path)
            load_metrics(path)
            if (path / CHECKPOINT).is_file():
                load_checkpoint(path / CHECKPOINT)
            have = {**stored["train"], **stored["info"]}
            for k, v in {**full, "K": K, "delta": d, "seed": s}.items():
                if k not in ("epochs", "backend") and k in have and have[k] != v:
                    raise UsageError(f"{path} holds a run with {k}={have[k]!r}, the sweep asks for "
                                     f"{k}={v!r}: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    calls = (joblib.delayed(_sweep_job)(str(p), K, d, s, full) for p, K, d, s in jobs)
    if a.scheduler is not None:
        try:
            from dask.distributed import Client
        except ImportError:
            raise UsageError("--scheduler needs dask.distributed, which is not installed "
                             "(pip install 'npbptt[dask]')") from None
        try:
            client = Client(a.scheduler, timeout="10s")
        except Exception as e:          # noqa: BLE001 -- any connection failure is a one-line error
            raise UsageError(f"--scheduler {a.scheduler}: cannot connect ({type(e).__name__}: {e})") from None
        ctx = joblib.parallel_config(backend="dask", n_jobs=-1)
    else:
        client, ctx = None, joblib.parallel_config(backend="loky", n_jobs=a.jobs)
    print(f"npbptt sweep: {len(jobs)} runs into {out}", file=sys.stderr)
    try:
        with ctx:
            par = joblib.Parallel(return_as="generator_unordered")
            for line in tqdm(par(calls), total=len(jobs), unit="run", desc="sweep"):
                tqdm.write(line, file=sys.stderr)
    finally:
        if client is not None:
            client.close()
    runs = collect_runs([out])
    table = format_table_c1(summarize_runs(runs))
    atomic_write_text(out / "table_c1.md", table + "\n")
    print(table)
    print(f"\nwritten: {out / 'table_c1.md'}")
    return 0


# --- plot --------------------------------------------------------------------------------------
def _cmd_plot(a):
    from .plots import collect_runs, plot_all
    if a.out is not None and not a.out.strip():
        raise UsageError("--out must name a directory for the PNGs, got an empty string")
    for d in a.dirs:
        if not Path(d).is_dir():
            raise UsageError(f"run directory {d} not found")
    runs = collect_runs(a.dirs)
    if not runs:
        raise UsageError(f"no runs (metrics.csv) found in {' '.join(a.dirs)}")
    out = Path(a.out) if a.out is not None else Path(a.dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    for path in plot_all(runs, out):
        print(path)
    return 0


# --- crosscheck --------------------------------------------------------------------------------
def _cmd_crosscheck(argv):
    try:
        from .crosscheck import cli_main
    except ImportError as e:
        print(f"npbptt crosscheck: unavailable ({e})", file=sys.stderr)
        return 2
    return cli_main(argv)


def main(argv=None):
    """Entry point of the ``npbptt`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in ("train", "sweep", "plot", "crosscheck") else None
    prog = f"npbptt {cmd}" if cmd else "npbptt"
    try:
        if cmd == "crosscheck":
            return _cmd_crosscheck(argv[1:])
        parser = build_parser()
        try:
            a = parser.parse_args(argv)
        except SystemExit as e:             # --help
            return int(e.code or 0)
        if a.command is None:
            parser.print_help(sys.stderr)
            return 2
        return {"train": _cmd_train, "sweep": _cmd_sweep, "plot": _cmd_plot}[a.command](a)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:               # also while numpy/numba are still being imported
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2 if _is_run_file_error(e) else 1


def _is_run_file_error(e):
    """True for npbptt.checkpoint.RunFileError (a damaged run file: exit status 2), without
    importing numpy to find out (if npbptt.checkpoint was never imported, it is not one)."""
    cls = getattr(sys.modules.get("npbptt.checkpoint"), "RunFileError", None)
    return cls is not None and isinstance(e, cls)


if __name__ == "__main__":
    sys.exit(main())
