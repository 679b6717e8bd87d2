"""Atomic files for training runs: checkpoints (``.npz``), JSON and CSV.

A checkpoint is one ``.npz`` file holding named float arrays and a JSON document (the run's
counters, metrics and random-generator states), read back with ``allow_pickle=False``.  Every
write goes to a temporary file in the same directory, is flushed to disk, and then replaces the
target with :func:`os.replace` -- atomic on POSIX and Windows -- so a crash or a full disk leaves
either the old file or the new one, never a half-written one.  The temporary file is created with
mode 0o666 less the umask, as any file the user creates (not mkstemp's 0o600).

A file that cannot be read back -- truncated, empty, bit-flipped, not a checkpoint, a CSV row cut
short -- raises :class:`RunFileError` (a ValueError) whose message names the file and the fault.
"""
import csv
import io
import json
import os
import secrets
import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["RunFileError", "atomic_write_bytes", "atomic_write_text", "save_checkpoint", "load_checkpoint",
           "write_json", "read_json", "write_csv", "read_csv", "rng_state", "rng_from_state"]


class RunFileError(ValueError):
    """A run file (checkpoint, config.json, metrics.csv) that cannot be used; the message names
    the file and what is wrong with it."""


def _create_temp(path):
    """(fd, name) of a new file beside ``path``, mode 0o666 & ~umask (the kernel applies the
    umask, as for any file the user creates)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:                 # pragma: no cover -- 48 random bits collided
            continue


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically: temporary file, fsync, os.replace."""
    path = Path(path)
    fd, tmp = _create_temp(path)
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
    """Read a checkpoint written by :func:`save_checkpoint`: returns (arrays, meta).

    Raises :class:`RunFileError` naming ``path`` when it is not such a checkpoint (empty,
    truncated, a bad CRC, another kind of file) and FileNotFoundError when it is absent."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except IsADirectoryError:
        raise RunFileError(f"{path}: is a directory, not a checkpoint") from None
    if not head:
        raise RunFileError(f"{path}: empty file, not a checkpoint")
    if head != b"PK\x03\x04":                   # every .npz is a ZIP archive
        raise RunFileError(f"{path}: not a checkpoint (not an .npz archive: it starts with {head!r})")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise RunFileError(f"{path}: not an npbptt checkpoint (no 'meta' entry)")
            meta = json.loads(str(z["meta"]))
            arrays = {k[2:]: z[k].copy() for k in z.files if k.startswith("a/")}
    except RunFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, OSError,
            UnicodeDecodeError) as e:
        raise RunFileError(f"{path}: damaged checkpoint (truncated or corrupted: "
                           f"{type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise RunFileError(f"{path}: not an npbptt checkpoint (its 'meta' is not a JSON object)")
    return arrays, meta


def write_json(path, obj):
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path):
    """The JSON document in ``path``; :class:`RunFileError` naming the file when it is not JSON."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:     # json.JSONDecodeError is a ValueError
        raise RunFileError(f"{path}: not valid JSON ({e})") from None
    except IsADirectoryError:
        raise RunFileError(f"{path}: is a directory, not a JSON file") from None


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


def read_csv(path, columns=None, extra=False):
    """Rows of a CSV written by :func:`write_csv`, numbers parsed (int, then float).

    Raises :class:`RunFileError` naming ``path`` when the file has no header (empty), a row with
    another number of fields than the header (truncated), or -- ``columns`` given -- a header
    other than ``columns`` (``extra``: a header that begins with ``columns``)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
        table = list(csv.reader(io.StringIO(text, newline="")))
    except (UnicodeDecodeError, csv.Error) as e:
        raise RunFileError(f"{path}: not a readable CSV file ({e})") from None
    if not table:
        raise RunFileError(f"{path}: empty file (no header line)")
    if not text.endswith("\n"):                # write_csv ends every line, the last included
        raise RunFileError(f"{path}: truncated (the last line has no line end)")
    head = table[0]
    if columns is not None and (head[:len(columns)] if extra else head) != list(columns):
        raise RunFileError(f"{path}: unexpected header (not the {len(columns)} columns "
                           f"{columns[0]},{columns[1]},...)")
    rows = []
    for line, r in enumerate(table[1:], start=2):
        if len(r) != len(head):
            raise RunFileError(f"{path}: line {line} has {len(r)} fields, the header {len(head)} "
                               "(truncated or damaged file)")
        rows.append({k: _parse(v) for k, v in zip(head, r)})
    return rows


def rng_state(rng):
    """The JSON-able state of a ``np.random.Generator`` (its bit generator's state dict)."""
    return rng.bit_generator.state


def rng_from_state(state):
    """A ``np.random.Generator`` continuing exactly from :func:`rng_state`'s ``state``."""
    bg = getattr(np.random, state["bit_generator"])()
    bg.state = state
    return np.random.Generator(bg)

