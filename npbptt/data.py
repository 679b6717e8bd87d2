"""Data sets of the paper's experiments: the synthetic copy task (§5.1), the PTB and WikiText-2
language-model corpora (§5.2) and the Book Order point-process data (Appendix C.3).

Sequences are time-major: a split is ``(x, y)`` with arrays of shape (T, B) -- T time steps of B
parallel contiguous streams (:func:`batchify`), the layout TBPTT walks along.  Real data are read
from gzip-compressed files under ``data_dir`` (see ``shared/data/README.md``), each checked
against the sha256 of its *uncompressed* content; nothing is cached on disk.
"""
import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SHA256", "SHA256_STORED", "COPY_AUTHORS", "SequenceData", "batchify", "copy_example",
           "copy_stream", "copy_task", "load_book_order", "load_copy_authors", "load_ptb",
           "load_wikitext2", "verify_file"]

# sha256 of the *uncompressed* files, keyed by path under data_dir (stored as "<key>.gz").
SHA256 = {
    "ptb/ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb/ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb/ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    "wikitext2/wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "wikitext2/wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "wikitext2/wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    "book_order/event-1-train.txt": "c5c31cb2ebe4e768210faafd3297e990d2ed1aa9a5bc76524b73be5c7b788255",
    "book_order/time-1-train.txt": "21fdd877a96c3b0b0a4c78490f7d07549e8df2ae8518159810ac44ebe0553acb",
    "book_order/event-1-test.txt": "0e0d660ecfc9621cb4065b52d8002d622ccc4e9f479d7551d4e0a5087c18b5d4",
    "book_order/time-1-test.txt": "87192b7f4d4edb0d29644740244778dda9b87ead9e0dbf0cfbfb700b565ee642",
}
# sha256 of files stored as they are (not gzip-compressed), keyed by path under data_dir.
SHA256_STORED = {
    "copy_authors/copy_fixed.npz": "104cb6b29f776c193a187330a1ea1c631ff1c549e12c0851948c13b965d2de2c",
    "copy_authors/copy_variable.npz": "c9801318d4e2e53bbebfe9169bec01b5c6e8f2c31f02aa5b2dc00308771be1e0",
}
# The authors' copy files: variant -> (key of SHA256_STORED, m_min, m), their 6 symbols.
COPY_AUTHORS = {"fixed": ("copy_authors/copy_fixed.npz", 10, 10),
                "variable": ("copy_authors/copy_variable.npz", 5, 10)}


@dataclass(frozen=True, eq=False)
class SequenceData:
    """A data set split into train/valid/test, each ``(x, y)`` int64 arrays of shape (T, B).

    ``vocab_size``: number of distinct input tokens; ``n_outputs``: number of target classes;
    ``vocab``: the words of the token ids (language models only, else empty).
    """
    train: tuple
    valid: tuple
    test: tuple
    vocab_size: int
    n_outputs: int
    name: str
    vocab: tuple = ()


def _int(value, name, minimum):
    """``value`` as an int >= minimum, else ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _rng(rng):
    """An explicit ``np.random.Generator``, int seed or SeedSequence -> Generator."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, np.random.SeedSequence) or (
            isinstance(rng, (int, np.integer)) and not isinstance(rng, bool) and rng >= 0):
        return np.random.default_rng(rng)
    raise ValueError(f"rng must be a np.random.Generator or a non-negative int seed, got {rng!r}")


# ----------------------------------------------------------------------------- copy task (§5.1)
def _copy_examples(ms, n_symbols, rng):
    """Concatenated copy examples of lengths 2*ms[k]; returns (x, y) int64 of shape (2*sum(ms),).

    Example k: x = (m data symbols, start_recall, m-1 blanks), y = (m blanks, the m data symbols),
    with data symbols a_0..a_{I-1} = 0..I-1, blank = I, start_recall = I+1 (I = n_symbols).
    """
    ms = np.asarray(ms, dtype=np.int64)
    sym = rng.integers(0, n_symbols, size=int(ms.sum()), dtype=np.int64)
    lengths = 2 * ms
    start = np.cumsum(lengths) - lengths                     # offset of example k in the stream
    dstart = np.cumsum(ms) - ms                              # offset of its symbols in ``sym``
    k = np.repeat(np.arange(len(ms)), lengths)
    p = np.arange(int(lengths.sum())) - start[k]             # position inside the example
    m, d = ms[k], dstart[k]
    first = p < m
    blank, start_recall = n_symbols, n_symbols + 1
    x = np.where(first, sym[np.where(first, d + p, 0)], blank)
    x[p == m] = start_recall
    y = np.where(first, blank, sym[np.where(first, 0, d + p - m)])
    return x, y


def copy_example(m, n_symbols, rng):
    """One copy-task example (§5.1, after Mujika et al. 2018) with copy length ``m``.

    Returns (x, y), int64 arrays of shape (2m,): x = m random data symbols in 0..I-1, then
    start_recall = I+1, then m-1 blanks (= I); y = m blanks, then the same m data symbols.
    ``n_symbols`` = I; ``rng``: np.random.Generator or int seed.
    """
    m = _int(m, "m", 1)
    n_symbols = _int(n_symbols, "n_symbols", 1)
    return _copy_examples([m], n_symbols, _rng(rng))


def copy_stream(T, m, m_min=None, n_symbols=6, *, rng):
    """Copy examples concatenated into one stream x_{1:T}, y_{1:T} (§5.1); shapes (T,), int64.

    Copy length is ``m`` for every example, or, when ``m_min`` is given, drawn per example
    uniformly from {m_min, ..., m}.  The last example is cut so the stream has exactly T steps.
    ``rng`` (keyword): np.random.Generator or int seed.
    """
    T = _int(T, "T", 1)
    m = _int(m, "m", 1)
    n_symbols = _int(n_symbols, "n_symbols", 1)
    rng = _rng(rng)
    if m_min is None:
        ms = np.full(-(-T // (2 * m)), m, dtype=np.int64)
    else:
        m_min = _int(m_min, "m_min", 1)
        if m_min > m:
            raise ValueError(f"m_min must be <= m, got m_min={m_min}, m={m}")
        ms = rng.integers(m_min, m + 1, size=-(-T // (2 * m_min)), dtype=np.int64)
        ms = ms[:int(np.searchsorted(np.cumsum(2 * ms), T)) + 1]   # just enough to reach T
    x, y = _copy_examples(ms, n_symbols, rng)
    return x[:T], y[:T]


def batchify(seq, batch):
    """Split a stream (T, ...) into ``batch`` contiguous streams: shape (T//batch, batch, ...).

    Column b is ``seq[b*n:(b+1)*n]`` with n = T // batch; the last T mod batch steps are dropped.
    """
    seq = np.asarray(seq)
    batch = _int(batch, "batch", 1)
    if seq.ndim < 1 or len(seq) < batch:
        raise ValueError(f"seq must have at least batch={batch} steps, got shape {seq.shape}")
    n = len(seq) // batch
    return np.ascontiguousarray(seq[:n * batch].reshape(batch, n, *seq.shape[1:]).swapaxes(0, 1))


def copy_task(T_train=256_000, T_valid=64_000, T_test=64_000, m=10, m_min=None, n_symbols=6,
              batch=64, seed=0):
    """The §5.1 copy data set: three independent streams, each batchified to (T//batch, batch).

    The splits use the three children of ``np.random.SeedSequence(seed)``, so changing one
    split's length leaves the others unchanged.  Input and output vocabularies are I+2.
    """
    seed = _int(seed, "seed", 0)
    batch = _int(batch, "batch", 1)
    children = np.random.SeedSequence(seed).spawn(3)
    splits = []
    for T, name, ss in zip((T_train, T_valid, T_test), ("T_train", "T_valid", "T_test"), children):
        _int(T, name, batch)                                 # at least one step per stream
        x, y = copy_stream(T, m, m_min, n_symbols, rng=np.random.default_rng(ss))
        splits.append((batchify(x, batch), batchify(y, batch)))
    label = f"copy(m={m})" if m_min is None else f"copy(m={m_min}..{m})"
    return SequenceData(*splits, vocab_size=n_symbols + 2, n_outputs=n_symbols + 2, name=label)


# ------------------------------------------------------------------------------- real data files
def load_copy_authors(data_dir, variant="fixed"):
    """The copy-task data the paper's own runs loaded (``<data_dir>/copy_authors/``).

    ``variant``: "fixed" (copy_fixed.npz, m = 10) or "variable" (copy_variable.npz, m uniform on
    [5, 10]).  Each file (sha256 checked, see shared/data/README.md) holds train (4000, 64),
    valid and test (1000, 64) splits, int64, time-major; 6 input symbols and 6 output classes:
    0 = blank, 1 = the marker opening each example, 2..5 the data symbols (an example is the
    marker and m - 1 data symbols, then m blanks; the targets repeat it m steps later).

    Notes
    -----
    The files come from the authors' generator (``tbptt/generate_data.py``,
    ``generate_copy_sequence``), which shifts all columns on each pass of its loop over the
    columns: the ends of the columns are spliced from fragments.  In copy_variable.npz recall
    targets refer to inputs that are no longer in the stream: 2.9% of the train, 8.7% of the
    valid and 10.7% of the test targets cannot be copied from the input (none in copy_fixed.npz
    beyond the first steps of each stream; ``validation/results/copy_authors_data.md``).  Kept as
    stored: they are the data of the paper's Table C.1.
    """
    if variant not in COPY_AUTHORS:
        raise ValueError(f"variant: expected one of {tuple(COPY_AUTHORS)}, got {variant!r}")
    key, m_min, m = COPY_AUTHORS[variant]
    data_dir = Path(data_dir)
    path, sha = data_dir / key, SHA256_STORED[key]
    where = f"expected '{path.name}' in {path.parent}, sha256 {sha} (see shared/data/README.md)"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {where}")
    raw = path.read_bytes()
    got = hashlib.sha256(raw).hexdigest()
    if got != sha:
        raise ValueError(f"checksum mismatch for {path}: its sha256 is {got}; {where}")
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    splits = []
    for s in ("train", "valid", "test"):
        x, y = arrays[f"{s}_x"], arrays[f"{s}_y"]
        splits.append((np.ascontiguousarray(x, dtype=np.int64),
                       np.ascontiguousarray(y, dtype=np.int64)))
    label = f"copy-authors(m={m})" if m_min == m else f"copy-authors(m={m_min}..{m})"
    return SequenceData(*splits, vocab_size=6, n_outputs=6, name=label)



def verify_file(path, sha256):
    """Check a gzip-compressed file against the sha256 (hex) of its *uncompressed* content.

    Returns the uncompressed bytes (so callers read the file once).  Raises FileNotFoundError if
    ``path`` is missing and ValueError naming the file and both sums if they differ.
    """
    path = Path(path)
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise ValueError(f"sha256 must be a 64-character hex string, got {sha256!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a gzip-compressed file)")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable gzip file: {err}") from err
    got = hashlib.sha256(raw).hexdigest()
    if got != sha256.lower():
        raise ValueError(f"checksum mismatch for {path}: sha256 of its uncompressed content is "
                         f"{got}, expected {sha256}")
    return raw


def _read(data_dir, keys):
    """Check that all files ``<data_dir>/<key>.gz`` exist, then verify and decode them (UTF-8)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} not found; expected it to hold the "
                                f"gzip-compressed files {', '.join(k + '.gz' for k in keys)} "
                                "(see shared/data/README.md)")
    for key in keys:
        if not (data_dir / f"{key}.gz").is_file():
            raise FileNotFoundError(f"{data_dir / (key + '.gz')} not found: expected the "
                                    f"gzip-compressed '{Path(key).name}.gz' in "
                                    f"{data_dir / Path(key).parent}, sha256 of its uncompressed "
                                    f"content {SHA256[key]} (see shared/data/README.md)")
    return [verify_file(data_dir / f"{key}.gz", SHA256[key]).decode("utf-8") for key in keys]


def _tokens(text):
    """Word tokens: ``line.split() + ['<eos>']`` for every line (PyTorch word_language_model)."""
    lines = text.split("\n")
    if lines[-1] == "":                                      # final newline ends the last line
        lines.pop()
    return [w for line in lines for w in line.split() + ["<eos>"]]


def _encode(tokens, index, unk=None):
    """Token ids (int64, shape (len(tokens),)); unknown words map to ``unk`` or raise ValueError."""
    if unk is None:
        missing = [w for w in dict.fromkeys(tokens) if w not in index]
        if missing:
            raise ValueError(f"{len(missing)} words are not in the training vocabulary, "
                             f"e.g. {missing[:5]}")
        return np.fromiter((index[w] for w in tokens), dtype=np.int64, count=len(tokens))
    u = index[unk]
    return np.fromiter((index.get(w, u) for w in tokens), dtype=np.int64, count=len(tokens))


def _corpus(data_dir, keys, batch, name, unk):
    """Shared loader of §5.2: vocabulary by first occurrence in train; y = next token of x."""
    batch = _int(batch, "batch", 1)
    toks = [_tokens(text) for text in _read(data_dir, keys)]
    vocab = tuple(dict.fromkeys(toks[0]))
    index = {w: i for i, w in enumerate(vocab)}
    splits = []
    for t in toks:
        ids = _encode(t, index, unk)
        splits.append((batchify(ids[:-1], batch), batchify(ids[1:], batch)))
    return SequenceData(*splits, vocab_size=len(vocab), n_outputs=len(vocab), name=name,
                        vocab=vocab)


def load_ptb(data_dir, batch=32):
    """Penn Treebank (§5.2) from ``<data_dir>/ptb/ptb.{train,valid,test}.txt.gz``.

    Splits are (x, y) int64 of shape ((N-1)//batch, batch), N tokens with ``<eos>`` per line;
    vocabulary 10,000.  A valid/test word absent from train raises ValueError.
    """
    keys = [f"ptb/ptb.{s}.txt" for s in ("train", "valid", "test")]
    return _corpus(data_dir, keys, batch, "ptb", unk=None)


def load_wikitext2(data_dir, batch=32):
    """WikiText-2 (§5.2) from ``<data_dir>/wikitext2/wiki.{train,valid,test}.tokens.gz``.

    As :func:`load_ptb`; vocabulary 33,278.  Words unseen in train would map to ``<unk>``
    (the stored files have none).
    """
    keys = [f"wikitext2/wiki.{s}.tokens" for s in ("train", "valid", "test")]
    return _corpus(data_dir, keys, batch, "wikitext2", unk="<unk>")


def _table(text, dtype, key):
    """Whitespace table, one sequence a line -> (n_sequences, length); ragged -> ValueError."""
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{key}: expected equally long non-empty sequences, got lengths "
                         f"{sorted({len(r) for r in rows})}")
    return np.array(rows, dtype=dtype)


def load_book_order(data_dir):
    """Book Order marked point process data (Appendix C.3; Du et al. 2016, split 1).

    Returns {'train', 'valid', 'test'} -> {'marks': int64 in {0 = buy, 1 = sell},
    'times': float64 timestamps in the file's units}, each of shape (n_sequences, length):
    train 100 x 3319; the test file's 100 x 829 is halved by sequence into valid (first 50) and
    test (last 50), as in the paper.  Times must be finite, >= 0 and non-decreasing per sequence.
    """
    keys = [f"book_order/{k}-1-{s}.txt" for s in ("train", "test") for k in ("event", "time")]
    texts = _read(data_dir, keys)
    out = {}
    for s, i in (("train", 0), ("test", 2)):
        marks = _table(texts[i], np.float64, keys[i])
        times = _table(texts[i + 1], np.float64, keys[i + 1])
        if marks.shape != times.shape:
            raise ValueError(f"{keys[i]} and {keys[i + 1]} differ in shape: "
                             f"{marks.shape} vs {times.shape}")
        if not np.isin(marks, (1, 2)).all():
            raise ValueError(f"{keys[i]}: marks must be 1 (buy) or 2 (sell)")
        if not np.isfinite(times).all() or (times < 0).any():
            raise ValueError(f"{keys[i + 1]}: times must be finite and non-negative")
        if (np.diff(times, axis=1) < 0).any():
            raise ValueError(f"{keys[i + 1]}: times must be non-decreasing within each sequence")
        out[s] = {"marks": marks.astype(np.int64) - 1, "times": times}
    half = len(out["test"]["times"]) // 2
    test = out.pop("test")
    out["valid"] = {k: v[:half].copy() for k, v in test.items()}
    out["test"] = {k: v[half:].copy() for k, v in test.items()}
    return out
