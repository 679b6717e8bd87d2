"""Tests of npbptt.data: copy task (§5.1), PTB / WikiText-2 (§5.2), Book Order (App. C.3)."""
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npbptt import data as D

DATA = Path(os.environ.get("NPBPTT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real data directory {DATA} absent "
    "(set NPBPTT_DATA to the folder holding ptb/, wikitext2/, book_order/)")

# README table: (lines, words without <eos>); each line adds one <eos>.
PTB_COUNTS = {"train": (42_068, 887_521), "valid": (3_370, 70_390), "test": (3_761, 78_669)}
WIKI_COUNTS = {"train": (36_718, 2_051_910), "valid": (3_760, 213_886), "test": (4_358, 241_211)}


# ----------------------------------------------------------------------------------- copy task
@settings(max_examples=50, deadline=None)
@given(m=st.integers(1, 30), n_symbols=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
def test_copy_example_structure(m, n_symbols, seed):
    x, y = D.copy_example(m, n_symbols, np.random.default_rng(seed))
    blank, start = n_symbols, n_symbols + 1
    assert x.shape == y.shape == (2 * m,) and x.dtype == y.dtype == np.int64
    assert ((x[:m] >= 0) & (x[:m] < n_symbols)).all()
    assert x[m] == start and (x[m + 1:] == blank).all()
    assert (y[:m] == blank).all()
    np.testing.assert_array_equal(y[m:], x[:m])          # target = data symbols shifted by m


def test_copy_example_symbols_are_random():
    x, _ = D.copy_example(200, 6, 1)
    assert set(np.unique(x[:200])) == set(range(6))
    np.testing.assert_array_equal(D.copy_example(200, 6, 1)[0], x)
    assert not np.array_equal(D.copy_example(200, 6, 2)[0], x)


def _split_examples(x, y, n_symbols):
    """Cut a stream at its start_recall symbols; yields (m, x_example, y_example)."""
    starts = np.flatnonzero(x == n_symbols + 1)
    begin = 0
    for s in starts:
        m = s - begin
        yield m, x[begin:begin + 2 * m], y[begin:begin + 2 * m]
        begin += 2 * m


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 400), m=st.integers(2, 12), dm=st.integers(0, 10),
       variable=st.booleans(), seed=st.integers(0, 1000))
def test_copy_stream_length_and_examples(T, m, dm, variable, seed):
    m_min = max(1, m - dm) if variable else None
    x, y = D.copy_stream(T, m, m_min, 4, rng=seed)
    assert x.shape == y.shape == (T,)
    full = 0
    for mk, xe, ye in _split_examples(x, y, 4):
        assert (m_min or m) <= mk <= m
        if len(xe) == 2 * mk:                             # complete example
            full += 2 * mk
            np.testing.assert_array_equal(ye[mk:], xe[:mk])
            assert (xe[mk + 1:] == 4).all() and (ye[:mk] == 4).all()
    assert T - full < 2 * m                               # only the last example is cut


def test_copy_stream_variable_m_covers_range():
    x, y = D.copy_stream(20_000, 10, 5, rng=np.random.default_rng(3))
    ms = [mk for mk, _, _ in _split_examples(x, y, 6)]
    assert set(ms) == set(range(5, 11))                   # uniform on [m_min, m] inclusive
    assert abs(np.mean(ms) - 7.5) < 0.2


def test_copy_stream_bad_input():
    with pytest.raises(ValueError, match="m_min"):
        D.copy_stream(100, 5, 6, rng=0)
    with pytest.raises(ValueError, match="T"):
        D.copy_stream(0, 5, rng=0)
    with pytest.raises(ValueError, match="rng"):
        D.copy_stream(10, 5, rng=None)
    with pytest.raises(ValueError, match="m must"):
        D.copy_example(2.5, 6, 0)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 200), batch=st.integers(1, 10), d=st.integers(0, 3))
def test_batchify_layout(T, batch, d):
    seq = np.arange(T * max(d, 1)).reshape((T, d) if d else (T,))
    if T < batch:
        with pytest.raises(ValueError, match="batch"):
            D.batchify(seq, batch)
        return
    out = D.batchify(seq, batch)
    n = T // batch
    assert out.shape == (n, batch) + seq.shape[1:]
    for b in range(batch):                                # stream b is contiguous
        np.testing.assert_array_equal(out[:, b], seq[b * n:(b + 1) * n])


def test_copy_task_shapes_determinism_and_split_independence():
    a = D.copy_task(T_train=6_400, T_valid=1_280, T_test=1_280, batch=64, seed=5)
    assert a.vocab_size == a.n_outputs == 8
    for (x, y), T in zip((a.train, a.valid, a.test), (6_400, 1_280, 1_280)):
        assert x.shape == y.shape == (T // 64, 64)
    b = D.copy_task(T_train=6_400, T_valid=1_280, T_test=1_280, batch=64, seed=5)
    c = D.copy_task(T_train=3_200, T_valid=1_280, T_test=1_280, batch=64, seed=5)
    e = D.copy_task(T_train=6_400, T_valid=1_280, T_test=1_280, batch=64, seed=6)
    for s in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(a, s)[0], getattr(b, s)[0])
        assert not np.array_equal(getattr(a, s)[0], getattr(e, s)[0])
    np.testing.assert_array_equal(a.valid[0], c.valid[0])  # T_train does not move valid/test
    np.testing.assert_array_equal(a.test[1], c.test[1])
    assert not np.array_equal(a.train[0][:50], a.valid[0][:50])
    # column 0 of train is the start of the unbatched stream (first example intact)
    x0 = a.train[0][:, 0]
    assert x0[10] == 7 and (x0[11:20] == 6).all()
    np.testing.assert_array_equal(a.train[1][10:20, 0], x0[:10])


def test_copy_task_variable_m_name():
    d = D.copy_task(T_train=640, T_valid=640, T_test=640, m=10, m_min=5, batch=8, seed=0)
    assert "5" in d.name and "10" in d.name and d.train[0].shape == (80, 8)


# ------------------------------------------------------------------------ file checks (synthetic)
def test_missing_directory_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        D.load_ptb(tmp_path / "nowhere")
    (tmp_path / "ptb").mkdir()
    with pytest.raises(FileNotFoundError, match=r"ptb\.train\.txt\.gz.*gzip"):
        D.load_ptb(tmp_path)
    (tmp_path / "wikitext2").mkdir()
    with pytest.raises(FileNotFoundError, match=r"wiki\.train\.tokens\.gz"):
        D.load_wikitext2(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"event-1-train\.txt\.gz"):
        D.load_book_order(tmp_path)


def test_checksum_mismatch_names_file_and_sums(tmp_path):
    (tmp_path / "ptb").mkdir()
    for s in ("train", "valid", "test"):
        with gzip.open(tmp_path / "ptb" / f"ptb.{s}.txt.gz", "wt") as fh:
            fh.write(" the cat sat \n")
    expected = D.SHA256["ptb/ptb.train.txt"]
    with pytest.raises(ValueError, match=r"ptb\.train\.txt\.gz") as err:
        D.load_ptb(tmp_path)
    assert expected in str(err.value)
    assert hashlib.sha256(b" the cat sat \n").hexdigest() in str(err.value)


def test_verify_file(tmp_path):
    p = tmp_path / "f.txt.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(b"hello\n")
    good = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
    assert D.verify_file(p, good) == b"hello\n"
    with pytest.raises(ValueError, match="f.txt.gz"):
        D.verify_file(p, "0" * 64)
    (tmp_path / "plain.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="plain.gz"):
        D.verify_file(tmp_path / "plain.gz", good)
    with pytest.raises(ValueError, match="sha256"):
        D.verify_file(p, "abc")
    with pytest.raises(FileNotFoundError, match="gzip"):
        D.verify_file(tmp_path / "absent.gz", good)


def test_encode_unknown_words():
    index = {"<unk>": 0, "a": 1, "<eos>": 2}
    np.testing.assert_array_equal(D._encode(["a", "zz", "<eos>"], index, "<unk>"), [1, 0, 2])
    with pytest.raises(ValueError, match="zz"):
        D._encode(["a", "zz"], index, None)


# ----------------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def ptb():
    return D.load_ptb(DATA, batch=1)


@pytest.fixture(scope="module")
def wiki():
    return D.load_wikitext2(DATA, batch=1)


def _check_corpus(d, counts, vocab_size):
    assert d.vocab_size == d.n_outputs == len(d.vocab) == vocab_size
    assert "<eos>" in d.vocab and "<unk>" in d.vocab
    eos = d.vocab.index("<eos>")
    for s, (lines, words) in counts.items():
        x, y = getattr(d, s)
        n_tokens = lines + words                          # one <eos> per line
        assert x.shape == y.shape == (n_tokens - 1, 1)
        assert x.dtype == np.int64 and 0 <= x.min() and x.max() < vocab_size
        assert int((x == eos).sum()) + int(y[-1, 0] == eos) == lines
        np.testing.assert_array_equal(y[:-1], x[1:])      # y is the next token


@needs_data
def test_ptb_counts(ptb):
    _check_corpus(ptb, PTB_COUNTS, 10_000)
    x = ptb.train[0][:, 0]
    assert [ptb.vocab[i] for i in x[:3]] == ["aer", "banknote", "berlitz"]
    assert set(np.unique(ptb.test[0])) <= set(range(10_000))


@needs_data
def test_ptb_batched(ptb):
    d = D.load_ptb(DATA, batch=32)
    assert d.vocab == ptb.vocab
    n = (PTB_COUNTS["valid"][0] + PTB_COUNTS["valid"][1] - 1) // 32
    assert d.valid[0].shape == (n, 32)
    np.testing.assert_array_equal(d.valid[0], D.batchify(ptb.valid[0][:, 0], 32))
    np.testing.assert_array_equal(d.valid[1][:-1], d.valid[0][1:])


@needs_data
def test_wikitext2_counts(wiki):
    _check_corpus(wiki, WIKI_COUNTS, 33_278)
    first = [wiki.vocab[i] for i in wiki.train[0][:6, 0]]
    assert first == ["<eos>", "=", "Valkyria", "Chronicles", "III", "="]


@needs_data
def test_book_order():
    b = D.load_book_order(DATA)
    shapes = {"train": (100, 3_319), "valid": (50, 829), "test": (50, 829)}
    for s, shape in shapes.items():
        m, t = b[s]["marks"], b[s]["times"]
        assert m.shape == t.shape == shape
        assert m.dtype == np.int64 and t.dtype == np.float64
        assert set(np.unique(m)) == {0, 1}
        assert np.isfinite(t).all() and (np.diff(t, axis=1) >= 0).all()
    assert not np.array_equal(b["valid"]["times"], b["test"]["times"])
    assert sum(b[s]["marks"].size for s in shapes) == 414_800


def _write_book(tmp_path, monkeypatch, content):
    """Small Book Order files in tmp_path/book_order, with their sums patched into D.SHA256."""
    d = tmp_path / "book_order"
    d.mkdir(exist_ok=True)
    for name, text in content.items():
        with gzip.open(d / f"{name}.gz", "wt") as fh:
            fh.write(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        monkeypatch.setitem(D.SHA256, f"book_order/{name}", digest)


BOOK = {"event-1-train.txt": "1 2 2\n2 1 1\n", "time-1-train.txt": "0 1 2\n0 2 2.5\n",
        "event-1-test.txt": "1 2\n2 2\n1 1\n", "time-1-test.txt": "0 1\n0 1\n5 6\n"}


def test_book_order_small_files(tmp_path, monkeypatch):
    _write_book(tmp_path, monkeypatch, BOOK)
    b = D.load_book_order(tmp_path)
    np.testing.assert_array_equal(b["train"]["marks"], [[0, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(b["valid"]["marks"], [[0, 1]])   # first half of test file
    np.testing.assert_array_equal(b["test"]["times"], [[0, 1], [5, 6]])


@pytest.mark.parametrize("name, text, match", [
    ("time-1-train.txt", "0 1 2\n0 3 2.5\n", "non-decreasing"),
    ("time-1-train.txt", "0 1 2\n0 nan 3\n", "finite"),
    ("time-1-test.txt", "0 1\n-1 1\n5 6\n", "non-negative"),
    ("event-1-train.txt", "1 2 3\n2 1 1\n", "marks"),
    ("event-1-test.txt", "1 2\n2 2 1\n1 1\n", "equally long"),
    ("event-1-test.txt", "1 2\n2 2\n", "shape"),
])
def test_book_order_rejects_bad_values(tmp_path, monkeypatch, name, text, match):
    _write_book(tmp_path, monkeypatch, {**BOOK, name: text})
    with pytest.raises(ValueError, match=match):
        D.load_book_order(tmp_path)


# ------------------------------------------------------- the authors' copy files (copy_authors/)
needs_authors = pytest.mark.skipif(not (DATA / "copy_authors").is_dir(),
                                   reason=f"{DATA / 'copy_authors'} absent")
# shared/data/README.md, "The authors' copy-task files"
AUTHORS_SHA = {"fixed": "104cb6b29f776c193a187330a1ea1c631ff1c549e12c0851948c13b965d2de2c",
               "variable": "c9801318d4e2e53bbebfe9169bec01b5c6e8f2c31f02aa5b2dc00308771be1e0"}


def test_copy_authors_checksums_are_the_readme_s():
    for variant, sha in AUTHORS_SHA.items():
        assert D.SHA256_STORED[f"copy_authors/copy_{variant}.npz"] == sha
        if (DATA / "copy_authors").is_dir():
            raw = (DATA / "copy_authors" / f"copy_{variant}.npz").read_bytes()
            assert hashlib.sha256(raw).hexdigest() == sha


@needs_authors
@pytest.mark.parametrize("variant, name", [("fixed", "copy-authors(m=10)"),
                                           ("variable", "copy-authors(m=5..10)")])
def test_copy_authors_shapes_dtypes_vocab(variant, name):
    d = D.load_copy_authors(DATA, variant)
    assert isinstance(d, D.SequenceData) and d.name == name
    assert d.vocab_size == 6 and d.n_outputs == 6
    for split, T in (("train", 4000), ("valid", 1000), ("test", 1000)):
        x, y = getattr(d, split)
        assert x.shape == y.shape == (T, 64) and x.dtype == y.dtype == np.int64
        assert set(np.unique(x)) == set(range(6)) == set(np.unique(y))
    # the authors' format: every marker opens an example of data symbols (2..5) -- in the first
    # half of a stream; the spliced ends hold fragments as short as one marker
    x = d.train[0][:2000, 0]
    after = x[np.flatnonzero(x[:-1] == 1) + 1]
    assert np.all(after >= 2)
    with pytest.raises(ValueError, match="variant"):
        D.load_copy_authors(DATA, "both")


@needs_authors
def test_copy_authors_missing_and_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        D.load_copy_authors(tmp_path, "variable")
    msg = str(err.value)
    assert "copy_variable.npz" in msg and str(tmp_path / "copy_authors") in msg
    assert AUTHORS_SHA["variable"] in msg and "\n" not in msg
    (tmp_path / "copy_authors").mkdir()
    good = (DATA / "copy_authors" / "copy_fixed.npz").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "copy_authors" / "copy_fixed.npz").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum mismatch") as err:
        D.load_copy_authors(tmp_path, "fixed")
    msg = str(err.value)
    assert "copy_fixed.npz" in msg and AUTHORS_SHA["fixed"] in msg and "\n" not in msg
    assert hashlib.sha256(bytes(bad)).hexdigest() in msg
    (tmp_path / "copy_authors" / "copy_fixed.npz").write_bytes(good)      # a good copy loads
    assert D.load_copy_authors(tmp_path, "fixed").train[0].shape == (4000, 64)


def _unreadable_recalls(x, y, m_min, m_max):
    """Non-blank targets that no copy length m in [m_min, m_max] reads from the input, the recall
    segment so far included (segments: runs of non-blank targets, a new one at each marker), and
    whose segment starts at r >= m_max (later than the first steps of a stream).  Vectorised,
    an independent method from validation/copy_authors_data.py's loops."""
    T, B = y.shape
    nz = y != 0
    start = nz & (~np.vstack([np.zeros((1, B), bool), nz[:-1]]) | (y == 1))
    t = np.arange(T)[:, None]
    r = np.maximum.accumulate(np.where(start, t, -1), axis=0)       # start of the segment of t
    readable = np.zeros((T, B), bool)
    for m in range(m_min, m_max + 1):
        src = t - m
        match = np.zeros((T, B), bool)
        match[m:] = x[:-m] == y[m:]
        mis = np.cumsum(nz & ~match, axis=0)                        # mismatches so far
        # mismatches since the segment's start: subtract the count before r
        base = np.take_along_axis(np.vstack([np.zeros((1, B), int), mis]), np.maximum(r, 0), 0)
        readable |= nz & (mis - base == 0) & (r - m >= 0) & (src >= 0)
    return int((nz & ~readable & (r >= m_max)).sum())


@needs_authors
def test_copy_authors_unpredictable_targets():
    """The generator defect (shared/data/README.md): recall targets whose input was shifted away.
    Counts as validation/results/copy_authors_data.md reports them (measured by its loops)."""
    expected = {"fixed": {"train": 0, "valid": 0, "test": 0},
                "variable": {"train": 7351, "valid": 5578, "test": 6854}}
    for variant, (m_min, m_max) in (("fixed", (10, 10)), ("variable", (5, 10))):
        d = D.load_copy_authors(DATA, variant)
        for split, n in expected[variant].items():
            x, y = getattr(d, split)
            assert _unreadable_recalls(x, y, m_min, m_max) == n, (variant, split)
    # the check can fail: a correctly generated stream in the authors' format has none, a
    # corrupted recall is found
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for m in rng.integers(5, 11, size=400):
        ex = np.concatenate([[1], rng.integers(2, 6, size=m - 1)])
        xs += [ex, np.zeros(m, int)]
        ys += [np.zeros(m, int), ex]
    x, y = np.concatenate(xs)[:, None], np.concatenate(ys)[:, None]
    assert _unreadable_recalls(x, y, 5, 10) == 0
    y2 = y.copy()
    k = np.flatnonzero(y2[:, 0] >= 2)[100]
    y2[k, 0] = 2 + (y2[k, 0] - 1) % 4                              # another data symbol
    assert _unreadable_recalls(x, y2, 5, 10) >= 1


@needs_authors
def test_copy_authors_data_script_agrees_with_the_vectorised_count():
    """validation/copy_authors_data.py's loops (labels, ideal copier) against the method above."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "validation" / "copy_authors_data.py"
    spec = importlib.util.spec_from_file_location("copy_authors_data", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, y = D.load_copy_authors(DATA, "variable").valid
    lab = mod.split_labels(x, y, 5, 10)
    assert int((lab == mod.BAD).sum()) == _unreadable_recalls(x, y, 5, 10) == 5578
    assert int((lab == mod.BLANK).sum()) == int((y == 0).sum())
    # the ideal copier is exact on a correctly generated stream of the authors' format
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for m in rng.integers(5, 11, size=50):
        ex = np.concatenate([[1], rng.integers(2, 6, size=m - 1)])
        xs += [ex, np.zeros(m, int)]
        ys += [np.zeros(m, int), ex]
    np.testing.assert_array_equal(mod.ideal_copier(np.concatenate(xs)), np.concatenate(ys))
