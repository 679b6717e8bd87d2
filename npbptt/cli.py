"""The ``npbptt`` command: train, sweep, plot, crosscheck.

    npbptt train copy --delta 0.1 --quick --out runs/copy-quick      # adaptive TBPTT, short copy task
    npbptt train copy --K 15 --m 10 --epochs 50 --out runs/K15       # fixed K, full-size data
    npbptt train copy --out runs/K15 --resume --epochs 80            # continue a run
    npbptt train ptb --delta 0.1 --dtype float32 --data-dir ../shared/data   # §5.2, Table C.2
    npbptt train book-order --quick --K 6 --data-dir ../shared/data  # App. C.3, Table C.3
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

__all__ = ["main", "build_parser"]

class UsageError(Exception):
    """A bad flag or value: printed as one line, exit status 2."""


class Interrupted(Exception):
    """SIGINT (Ctrl-C) with what it left on disk: printed as one line, exit status 130."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) raised as :class:`UsageError`."""

    def error(self, message):
        raise UsageError(message)


# --- flags ---------------------------------------------------------------------------------
# Every flag's default is None so that the flags a user gave can be told from the defaults (a
# resumed run compares them with its config.json, a task refuses the flags it has no setting
# for).  The defaults themselves are the tasks' tables (npbptt.tasks), shown in --help.
_TRAIN_HELP = {
    "epochs": (int, "passes over the training data"),
    "lr": (float, "SGD step gamma; the step is gamma*sqrt(K)*g (Algorithm 1)"),
    "weight_decay": (float, "L2 weight decay added to the gradient"),
    "clip": (float, "clip the gradient norm to this value (none: no clipping)"),
    "K0": (int, "adaptive: truncation of the first segment, before the first probe"),
    "K_min": (int, "adaptive: smallest K of Eq. (25)"),
    "K_max": (int, "adaptive: largest K of Eq. (25)"),
    "W": (int, "probe window: lags 0..W by BPTT(W, 1)"),
    "burnin": (int, "steps from the zero state before a probe window"),
    "probes_per_epoch": (int, "truncation updates per epoch (alpha of §4.4)"),
    "tau_hat": (int, "start of the geometric tail in the probe [0.9 W]"),
    "method": (str, "beta estimator: ols (Eq. 22), max (Eq. 21), quantile"),
    "beta_alpha": (float, "quantile level alpha of --method quantile"),
    "variant": (str, "bias bounds as printed (paper) or as the authors' code"),
    "delta_probes": (int, "probes per epoch measuring delta_hat(K) for metrics.csv"),
    "norm": (str, "probe norm: state (phi, Eq. 18, the paper) or param (psi: the bias in parameter "
                  "space, issue 20)"),
}


def _flag_of(key):
    return "--" + key.replace("_", "-")


def _tasks():
    from .tasks import TASKS
    return TASKS


def _train_default_help(key):
    """'[copy 1.0, ptb 10.0; --quick ...]': the tasks' defaults of a TrainConfig field."""
    from .config import TrainConfig
    base = TrainConfig.__dataclass_fields__[key].default
    parts, quick = [], []
    for t in _tasks().values():
        v = t.train_defaults.get(key, base)
        parts.append(f"{t.name} {v}")
        if key in t.quick_train:
            quick.append(f"{t.name} {t.quick_train[key]}")
    vals = {p.split(" ", 1)[1] for p in parts}
    text = parts[0].split(" ", 1)[1] if len(vals) == 1 else ", ".join(parts)
    return f"[{text}" + (f"; --quick: {', '.join(quick)}" if quick else "") + "]"


def _task_settings():
    """flag -> (key, Setting, [task names]) over every task's settings."""
    out = {}
    for t in _tasks().values():
        for st in t.settings:
            entry = out.setdefault(st.flag, (st.key, st, []))
            entry[2].append(t.name)
    return out


def _setting_help(flag, key, setting, names):
    tasks = _tasks()
    defaults = []
    for n in names:
        st = tasks[n].by_key[key]
        d = st.none if st.default is None else st.default
        q = "" if st.quick == st.SAME else f" (--quick {st.quick}" + (
            f" unless --{st.quick_unless[0].replace('_', '-')} {st.quick_unless[1]})"
            if st.quick_unless else ")")
        defaults.append(f"{n} {d}{q}")
    return f"{setting.help} [{', '.join(defaults)}]"


def _positive_int(name, v):
    if v is not None and v < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {v}")


def _add_common(p):
    tasks = _tasks()
    p.add_argument("task", choices=list(tasks),
                   help="; ".join(f"{t.name}: {t.title}" for t in tasks.values()))
    for flag, (key, st, names) in _task_settings().items():
        hlp = _setting_help(flag, key, st, names)
        if st.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=hlp)
        else:
            p.add_argument(flag, type=st.type, default=None, help=hlp,
                           choices=getattr(st, "choices", None))
    for key, (typ, hlp) in _TRAIN_HELP.items():
        if not hlp.endswith("]"):
            hlp = f"{hlp} {_train_default_help(key)}"
        p.add_argument(_flag_of(key), type=typ, default=None, help=hlp)
    p.add_argument("--dtype", choices=("float64", "float32"), default=None,
                   help="precision of the parameters and arithmetic [float64: the reference's, "
                        "exact to round-off, so that gradients and bias estimates are exact; "
                        "float32 runs about twice as fast]")
    p.add_argument("--data-dir", default=None,
                   help="directory of the real data (ptb, wikitext2, book-order, copy --data "
                        "authors) [the NPBPTT_DATA environment variable]")
    p.add_argument("--backend", default=None, help="numpy, numba or cuda [fastest available]")
    p.add_argument("--quick", action="store_true",
                   help="a small slice of the data and a small model: seconds to a minute "
                        "(the --quick values in brackets)")


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


def _gather(a):
    """(task keywords, TrainConfig keywords) of the flags the user gave (not None); a flag of
    another task's setting is refused, naming the task."""
    tasks = _tasks()
    task = tasks[a.task]
    task_kw, train_kw = {}, {}
    for flag, (key, _, names) in _task_settings().items():
        v = getattr(a, flag.lstrip("-").replace("-", "_"))
        if v is None:
            continue
        if a.task not in names:
            raise UsageError(f"{flag} is not a setting of task {a.task!r} (its settings: "
                             f"{' '.join(st.flag for st in task.settings)})")
        task_kw[key] = v
    for key in _TRAIN_HELP:
        v = getattr(a, key)
        if v is not None:
            train_kw[key] = v
    return task_kw, train_kw


def _check_values(train_kw):
    """One-line errors for the common bad values (the library re-checks everything)."""
    for key in ("epochs", "W", "K_min", "K_max", "K0", "probes_per_epoch"):
        _positive_int(_flag_of(key), train_kw.get(key))
    lr = train_kw.get("lr")
    if lr is not None and not (0 < lr < math.inf):
        raise UsageError(f"--lr must be a finite number > 0, got {lr}")


def _check_K(K):
    if K is not None and K < 1:
        raise UsageError(f"--K must be an integer >= 1, got {K}")


def _check_delta(d):
    if d is not None and not 0 < d < 1:
        raise UsageError(f"--delta must lie strictly between 0 and 1, got {d}")


def _check_backend(a):
    if getattr(a, "backend", None) is not None and a.backend not in ("numpy", "numba", "cuda"):
        raise UsageError(f"--backend must be numpy, numba or cuda, got {a.backend!r}")


def _flagged(e):
    """A library ValueError 'key: ...' as a one-line usage error naming the flag."""
    msg = str(e)
    key, sep, rest = msg.partition(": ")
    if sep and key.isidentifier() and key not in ("out", "net", "data", "config"):
        return UsageError(f"{_flag_of(key)}: {rest}")
    return UsageError(msg.replace("out: ", "--out ", 1) if msg.startswith("out: ") else msg)


def _settings(a):
    """(given task keywords, given TrainConfig keywords, common keywords) of the flags; the
    values the run will have are resolved and checked by npbptt.tasks.prepare."""
    task_kw, train_kw = _gather(a)
    _check_values(train_kw)
    _check_backend(a)
    common = {"quick": a.quick}
    if a.dtype is not None:
        common["dtype"] = a.dtype
    if a.data_dir is not None:
        if not a.data_dir.strip():
            raise UsageError("--data-dir must name a directory, got an empty string")
        common["data_dir"] = a.data_dir
    if a.backend is not None:
        train_kw["backend"] = a.backend
    return task_kw, train_kw, common


def _resolved(task, task_kw, train_kw, quick):
    """Every setting the run will have (defaults filled in), checked: (values, training)."""
    try:
        values = task.values(task_kw, quick)
        training = task.training(train_kw, quick)
    except ValueError as e:
        raise _flagged(e) from None
    from .config import TrainConfig
    K_min = training.get("K_min", TrainConfig.K_min)
    K_max = training.get("K_max", TrainConfig.K_max)
    if K_min > K_max:
        raise UsageError(f"--K-min ({K_min}) must not exceed --K-max ({K_max})")
    if values.get("m_min") is not None and values["m_min"] > values["m"]:
        raise UsageError(f"--m-min ({values['m_min']}) must not exceed --m ({values['m']})")
    known = task.stream_steps(values) if task.stream_steps else None
    need = training.get("W", TrainConfig.W) + training.get("burnin", TrainConfig.burnin) + 1
    if known is not None and known[0] < need:
        what = (f"each of the {values['batch']} training streams has {known[0]} steps" if "batch" in values
                else f"each training stream has {known[0]} steps")
        raise UsageError(f"{_flag_of(known[1])}: {what}, fewer than the probe's burnin + W + 1 = {need}")
    return values, training


def _precheck(task_name, task_kw, train_kw, common, K, delta):
    """Build the run (net, data: the data files are read and checked) and check every setting
    against it, before anything is written.  One-line errors."""
    from .tasks import prepare
    from .train import check_data
    try:
        net, data, config, _ = prepare(task_name, K=K, delta=delta, **common, **task_kw, **train_kw)
        check_data(net, data, config)
    except ValueError as e:
        raise _flagged(e) from None


def _run_name(K, delta, seed):
    return (f"K{K}" if K is not None else f"delta{delta:g}") + f"-seed{seed}"


# --- train -------------------------------------------------------------------------------------
def _plot_run(out):
    """Figure 1's panels (test PPL against data passes, kappa_hat and delta_hat per epoch; for a
    point-process task Figure C.3's, by NLL) of the run in ``out``, as ``out/figure1.png`` or
    ``out/figure_c3.png``: its path, or None (with one line on stderr) if it cannot be drawn."""
    from .plots import collect_runs, figure1, figure_c3
    try:
        runs = collect_runs([out])
        if not runs:
            return None
        if runs[0].nll:
            return figure_c3(runs, Path(out) / "figure_c3.png")
        return figure1(runs, Path(out) / "figure1.png")
    except Exception as e:          # a figure is a convenience: never lose a finished run for it
        print(f"npbptt train: no figure ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _cmd_train(a):
    from .runfiles import CHECKPOINT, CONFIG, check_run_dir, format_metrics
    from .tasks import TASKS, read_config, resume_run, train_task
    from .train import Diverged
    _check_K(a.K)
    _check_delta(a.delta)
    task_kw, train_kw, common = _settings(a)
    if a.out is not None and not a.out.strip():
        raise UsageError("--out must name a run directory, got an empty string")
    if a.resume:
        if a.out is None:
            raise UsageError("--resume needs --out DIR, the run to continue")
        out = Path(a.out)
        if not (out / CONFIG).is_file():
            raise UsageError(f"--resume: {out} holds no run ({CONFIG} not found)")
        stored = read_config(out)
        if stored["info"].get("task") != a.task:
            raise UsageError(f"--resume: {out} holds a run of task {stored['info'].get('task')!r}, "
                             f"not {a.task!r}")
        if train_kw.get("epochs") is not None and (out / CHECKPOINT).is_file():
            from .checkpoint import load_checkpoint
            done = load_checkpoint(out / CHECKPOINT)[1].get("epoch")
            if isinstance(done, int) and train_kw["epochs"] < done:
                raise UsageError(f"--epochs {train_kw['epochs']}: the run in {out} has finished {done} "
                                 f"epochs; a resumed run needs --epochs >= {done}")
        given = {**task_kw, **{k: v for k, v in train_kw.items() if k not in ("epochs", "backend")}}
        given.update({k: v for k, v in (("K", a.K), ("delta", a.delta), ("seed", a.seed),
                                        ("dtype", common.get("dtype"))) if v is not None})
        if a.quick:
            given["quick"] = True
        have = {"quick": False, "dtype": "float64", **stored["train"], **stored["info"]}
        for k, v in given.items():
            if k in have and have[k] != v:
                raise UsageError(f"--resume: {_flag_of(k)} {v} differs from the run in {out} "
                                 f"({k}={have[k]}); a resumed run keeps its settings except "
                                 "--epochs, --backend and --data-dir")
        run = lambda: resume_run(out, epochs=train_kw.get("epochs"), backend=a.backend,  # noqa: E731
                                 data_dir=common.get("data_dir"), progress=not a.no_progress)
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
        _resolved(TASKS[a.task], task_kw, train_kw, a.quick)
        run = lambda: train_task(a.task, out, K=a.K, delta=a.delta, seed=seed,  # noqa: E731
                                 progress=not a.no_progress, **common, **task_kw, **train_kw)
    try:
        res = run()
    except Diverged as e:
        print(f"npbptt train: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        if _is_run_file_error(e):
            raise
        raise _flagged(e) from None
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
    figure = _plot_run(out)
    if figure is not None:
        print(f"figure: {figure}")
    return 0


# --- sweep -------------------------------------------------------------------------------------
_TABLES = {"copy": "table_c1.md", "ptb": "table_c2.md", "wikitext2": "table_c2.md",
           "book-order": "table_c3.md"}


def _sweep_job(out, task, K, delta, seed, kwargs):
    """One run of a sweep: fresh, resumed, or skipped when finished.  Returns a status line."""
    from .checkpoint import atomic_write_text
    from .runfiles import CHECKPOINT, load_metrics
    from .tasks import resume_run, train_task
    from .train import Diverged
    out = Path(out)
    epochs = kwargs["epochs"]
    done = load_metrics(out)
    if (out / "DIVERGED").is_file():
        return f"{out.name}: diverged earlier (see {out / 'DIVERGED'})"
    if len(done) >= epochs and (out / "phi_best.npz").is_file():
        return f"{out.name}: finished earlier ({len(done)} epochs)"
    try:
        if (out / CHECKPOINT).is_file():
            res = resume_run(out, epochs=epochs, backend=kwargs.get("backend"),
                             data_dir=kwargs.get("data_dir"), progress=False)
        else:
            res = train_task(task, out, K=K, delta=delta, seed=seed, progress=False, **kwargs)
    except Diverged as e:
        atomic_write_text(out / "DIVERGED", f"{e}\n")
        return f"{out.name}: DIVERGED -- {e}"
    key, what = (("valid_nll", "NLL") if res.metrics[0].get("valid_nll") is not None
                 else ("valid_ppl", "PPL"))                     # Book Order: by NLL (Table C.3)
    best = min(res.metrics, key=lambda r: r[key])
    return f"{out.name}: best valid {what} {best[key]:.4f} at epoch {best['epoch']}"


def _cmd_sweep(a):
    import joblib
    from tqdm.auto import tqdm
    from .checkpoint import atomic_write_text, load_checkpoint
    from .plots import collect_runs, format_table, summarize_runs
    from .runfiles import CHECKPOINT, CONFIG, check_run_dir, load_metrics
    from .tasks import TASKS, read_config
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
    task_kw, train_kw, common = _settings(a)
    task = TASKS[a.task]
    values, training = _resolved(task, task_kw, train_kw, a.quick)
    _precheck(a.task, task_kw, train_kw, common, a.K[0] if a.K else None,
              None if a.K else a.delta[0])
    for K in a.K:
        _precheck_config(training, K, None)
    for d in a.delta:
        _precheck_config(training, None, d)
    if not a.out.strip():
        raise UsageError("--out must name a sweep directory, got an empty string")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if (out.is_dir() and any(out.iterdir()) and not any(out.glob("table_c*.md"))
            and not any((p / CONFIG).is_file() for p in out.iterdir() if p.is_dir())):
        raise UsageError(f"--out {out} is neither empty nor an npbptt sweep (no table_c*.md, no "
                         "run directories); choose a new or empty directory")
    seeds = range(a.seed0, a.seed0 + a.seeds)
    jobs = [(out / _run_name(K, None, s), K, None, s) for K in a.K for s in seeds]
    jobs += [(out / _run_name(None, d, s), None, d, s) for d in a.delta for s in seeds]
    want = {**values, **training, "dtype": common.get("dtype", "float64")}
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
            have = {"dtype": "float64", **stored["train"], **stored["info"]}
            if have.get("task", a.task) != a.task:
                raise UsageError(f"{path} holds a run of task {have.get('task')!r}, the sweep is of "
                                 f"{a.task!r}: choose another --out")
            for k, v in {**want, "K": K, "delta": d, "seed": s}.items():
                if k not in ("epochs", "backend") and k in have and have[k] != v:
                    raise UsageError(f"{path} holds a run with {k}={have[k]!r}, the sweep asks for "
                                     f"{k}={v!r}: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {**common, **task_kw, **train_kw, "epochs": training["epochs"]}
    calls = (joblib.delayed(_sweep_job)(str(p), a.task, K, d, s, kwargs) for p, K, d, s in jobs)
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
    table = format_table(summarize_runs(runs))      # Table C.1/C.2 by PPL, C.3 by NLL
    atomic_write_text(out / _TABLES[a.task], table + "\n")
    print(table)
    print(f"\nwritten: {out / _TABLES[a.task]}")
    return 0


def _precheck_config(training, K, delta):
    from .config import TrainConfig
    try:
        TrainConfig(K=K, delta=delta, **training)
    except ValueError as e:
        raise _flagged(e) from None


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
