"""Atomic files for training runs: checkpoints (``.npz``), JSON and CSV.

A checkpoint is one ``.npz`` file holding named float arrays and a JSON document (the run's
counters, metrics and random-generator states), read back with ``allow_pickle=False``.  Every
write goes to a temporary file in the same directory, is flushed to disk, and then replaces the
target with :func:`os.replace` -- atomic on POSIX and Windows -- so a crash or a full disk leaves
either the old file or the new one, never a half-written one.
"""
import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_write_bytes", "atomic_write_text", "save_checkpoint", "load_checkpoint",
           "write_json", "read_json", "write_csv", "read_csv", "rng_state", "rng_from_state"]


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically: temporary file, fsync, os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:                                        # make the rename itself durable (POSIX only)
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write_text(path, text):
    """Write a UTF-8 text file atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(v):
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"cannot write {type(v).__name__} to JSON")


def save_checkpoint(path, arrays, meta):
    """Atomically write ``arrays`` (dict name -> ndarray) and ``meta`` (JSON-able dict) to the
    ``.npz`` file ``path``.  Floats round-trip exactly (binary arrays; JSON uses repr)."""
    buf = io.BytesIO()
    payload = {f"a/{k}": np.asarray(v) for k, v in arrays.items()}
    payload["meta"] = np.array(json.dumps(meta, default=_json_default))
    np.savez(buf, **payload)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path):
    """Read a checkpoint written by :func:`save_checkpoint`: returns (arrays, meta)."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        arrays = {k[2:]: z[k].copy() for k in z.files if k.startswith("a/")}
    return arrays, meta


def write_json(path, obj):
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _cell(v):
    if isinstance(v, float) or isinstance(v, np.floating):
        return repr(float(v))                   # shortest exact round-trip; 'nan', 'inf'
    return "" if v is None else str(v)


def write_csv(path, rows, columns):
    """Atomically write ``rows`` (dicts) as CSV with the given column order."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    atomic_write_text(path, out.getvalue())


def _parse(s):
    if s == "":
        return None
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def read_csv(path):
    """Rows of a CSV written by :func:`write_csv`, numbers parsed (int, then float)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def rng_state(rng):
    """The JSON-able state of a ``np.random.Generator`` (its bit generator's state dict)."""
    return rng.bit_generator.state


def rng_from_state(state):
    """A ``np.random.Generator`` continuing exactly from :func:`rng_state`'s ``state``."""
    bg = getattr(np.random, state["bit_generator"])()
    bg.state = state
    return np.random.Generator(bg)

