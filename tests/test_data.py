"""memlab.data: real corpora (Austen from Debian's r-cran-janeaustenr), splits, tokens, batches.

The Austen tests use the real cache (``make test`` fetches it first); everything else runs
with ``MEMLAB_CACHE`` pointed at a temporary directory.
"""
import os
import shutil
import stat
import struct
import subprocess

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from memlab import data

TITLES = ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma",
          "Northanger Abbey", "Persuasion"]


@pytest.fixture(scope="module")
def real_rdb():
    """The real cache's Rdata.rdb (module scope: resolved before any monkeypatching)."""
    return data.fetch_austen()


@pytest.fixture(scope="module")
def books(real_rdb):
    return data.austen_books()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEMLAB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE trained here on a few lines of real text."""
    lines = list(data.pydoc_topics().values())[:40]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return tok


# ---------------------------------------------------------------------------- Austen

def test_austen_six_books_in_order_with_sensible_sizes(books):
    assert list(books) == TITLES
    words = {t: len(x.split()) for t, x in books.items()}
    assert all(n > 50_000 for n in words.values()), words
    assert 75_000 < words["Persuasion"] < 95_000
    assert 70_000 < words["Northanger Abbey"] < 85_000
    assert 145_000 < words["Emma"] < 175_000
    assert 680_000 <= sum(words.values()) <= 760_000


def test_austen_text_content(books):
    assert "It is a truth universally acknowledged" in books["Pride & Prejudice"]
    assert books["Emma"].strip().startswith("EMMA\n")
    assert "Emma Woodhouse, handsome, clever, and rich" in books["Emma"]
    assert books["Persuasion"].strip().splitlines()[0] == "Persuasion"
    assert "Sir Walter Elliot, of Kellynch Hall" in books["Persuasion"]
    assert "\n\n" in books["Mansfield Park"]  # empty lines kept as paragraph breaks


def test_rdx_index_names_the_variables(books):
    rdb = data.fetch_austen()
    variables = data.read_rdb(rdb)
    assert set(variables) == set(data.AUSTEN_TITLES)
    emma = variables["emma"]
    assert emma.sexptype == data.STRSXP and emma.items[0] == "EMMA"
    assert "\n".join(x or "" for x in emma.items) == books["Emma"]


def test_first_line_fallback_agrees_with_index(books):
    by_title = data._books_by_first_line(data.fetch_austen())
    assert by_title == books


def test_unreadable_index_falls_back_to_title_lines(tmp_cache, books, real_rdb):
    (tmp_cache / "janeaustenr").mkdir(parents=True)
    shutil.copy(real_rdb, tmp_cache / "janeaustenr" / "Rdata.rdb")
    (tmp_cache / "janeaustenr" / "Rdata.rdx").write_bytes(b"not an index")
    assert data.austen_books() == books


# ---------------------------------------------------------------------------- XDR reader

def _charsxp(s, levels=0x40):
    if s is None:
        return struct.pack(">Ii", 9, -1)
    raw = s.encode("latin-1" if levels & 4 else "utf-8")
    return struct.pack(">Ii", (levels << 12) | 9, len(raw)) + raw


def _header(version=3):
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    return out + (struct.pack(">i", 5) + b"UTF-8" if version == 3 else b"")


@pytest.mark.parametrize("version", [2, 3])
def test_unserialize_handbuilt_character_vector(version):
    elems = [("It is a truth", 0x40), (None, 0), ("", 0x40), ("caf\u00e9 \u00a3", 8),
             ("na\u00efve", 4)]
    blob = _header(version) + struct.pack(">Ii", 16, len(elems))
    blob += b"".join(_charsxp(s, lv) for s, lv in elems)
    value = data.unserialize(blob)
    assert value.sexptype == data.STRSXP
    assert list(value.items) == ["It is a truth", None, "", "caf\u00e9 \u00a3", "na\u00efve"]
    assert dict(value.attributes) == {}


def test_unserialize_named_list_with_symbol_reference():
    """A list like the .rdx index: list(a=1:2 pair, b=...) with a names attribute, where
    the second use of the symbol `names` is a back-reference (REFSXP)."""
    def intpair(a, b):
        return struct.pack(">Iiii", 13, 2, a, b)

    names_sym = struct.pack(">I", 1) + _charsxp("names")
    inner_attr = (struct.pack(">I", 0x402) + names_sym
                  + struct.pack(">Ii", 16, 2) + _charsxp("emma") + _charsxp("persuasion")
                  + struct.pack(">I", 254))
    inner = struct.pack(">Ii", 0x213, 2) + intpair(0, 100) + intpair(100, -2**31) + inner_attr
    outer_attr = (struct.pack(">I", 0x402) + struct.pack(">I", (1 << 8) | 255)
                  + struct.pack(">Ii", 16, 2) + _charsxp("variables") + _charsxp("compressed")
                  + struct.pack(">I", 254))
    outer = (struct.pack(">Ii", 0x213, 2) + inner + struct.pack(">Iii", 10, 1, 1)
             + outer_attr)
    value = data.unserialize(_header() + outer).to_dict()
    assert set(value) == {"variables", "compressed"}
    assert value["compressed"].items == (1,)
    variables = value["variables"].to_dict()
    assert variables["emma"].items == (0, 100)
    assert variables["persuasion"].items == (100, None)  # NA_integer_


def test_unserialize_rejects_bad_input():
    with pytest.raises(ValueError, match="XDR"):
        data.unserialize(b"A\n1\n")
    with pytest.raises(ValueError, match="SEXPTYPE 4"):
        data.unserialize(_header() + struct.pack(">I", 4))  # an environment
    with pytest.raises(ValueError, match="truncated"):
        data.unserialize(_header() + struct.pack(">Ii", 16, 3) + _charsxp("only one"))


# ---------------------------------------------------------------------------- corpora

def test_austen_corpus_splits_by_book(books):
    corpus = data.load_corpus("austen")
    assert corpus.splits["test"] == ("Persuasion",)
    assert corpus.splits["validation"] == ("Northanger Abbey",)
    assert set(corpus.splits["train"]) == set(TITLES) - {"Persuasion", "Northanger Abbey"}
    assert len(corpus.splits["train"]) == 4
    all_docs = [d for names in corpus.splits.values() for d in names]
    assert len(all_docs) == len(set(all_docs)) and set(all_docs) == set(TITLES)
    assert corpus.text("test") == books["Persuasion"]
    assert corpus.text("train") == "\n\n".join(books[t] for t in corpus.splits["train"])
    with pytest.raises(ValueError, match="'dev'.*train, validation, test"):
        corpus.text("dev")


def test_unknown_corpus_name():
    with pytest.raises(ValueError, match="'shakespeare'.*austen, pydoc"):
        data.load_corpus("shakespeare")


def test_pydoc_corpus_split_is_deterministic_and_disjoint():
    topics = data.pydoc_topics()
    assert len(topics) > 50 and "if" in topics and "while" in topics["while"]
    corpus = data.load_corpus("pydoc")
    names = sorted(topics)
    assert corpus.splits["test"] == tuple(names[0::10])
    assert corpus.splits["validation"] == tuple(names[1::10])
    parts = [set(v) for v in corpus.splits.values()]
    assert sum(map(len, parts)) == len(names) and set().union(*parts) == set(names)
    assert data.load_corpus("pydoc") == corpus
    assert corpus.text("validation").startswith(topics[names[1]])


def test_text_file_corpus_splits_90_5_5(tmp_path):
    text = "".join(f"Line {i}: the quick brown fox.\n" for i in range(700))
    path = tmp_path / "notes.txt"
    path.write_text(text, encoding="utf-8")
    assert data.text_file(path) == {"notes": text}
    corpus = data.load_corpus(str(path))
    assert corpus.name == "notes"
    assert corpus.splits == {"train": ("notes:train",), "validation": ("notes:validation",),
                             "test": ("notes:test",)}
    train, val, test = (corpus.text(s) for s in ("train", "validation", "test"))
    assert train + val + test == text
    assert len(train) == int(len(text) * 0.9)
    assert len(val) == int(len(text) * 0.95) - int(len(text) * 0.9)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.text_file(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------- tokens

def test_tokenize_round_trip_and_cache(tmp_cache, bpe):
    corpus = data.load_corpus("pydoc")
    tokens = data.tokenize(corpus, "validation", bpe)
    assert tokens.dtype == np.int32 and tokens.ndim == 1 and tokens.size > 10_000
    direct = np.concatenate([bpe.encode(corpus.documents[n], add_special_tokens=False).ids
                             for n in corpus.splits["validation"]])
    np.testing.assert_array_equal(tokens, direct)
    docs = "".join(corpus.documents[n] for n in corpus.splits["validation"])
    assert bpe.decode(tokens.tolist()) == docs
    cached = sorted((tmp_cache / "tokens").glob("pydoc-validation-*.npy"))
    assert len(cached) == 1 and len(cached[0].stem.rsplit("-", 1)[1]) == 16
    mtime = cached[0].stat().st_mtime_ns
    again = data.tokenize(corpus, "validation", bpe)
    np.testing.assert_array_equal(again, tokens)
    assert again.dtype == np.int32
    assert cached[0].stat().st_mtime_ns == mtime  # served from the .npy, not rewritten
    # a different split or tokenizer gets its own entry
    data.tokenize(corpus, "test", bpe)
    assert len(list((tmp_cache / "tokens").glob("pydoc-*.npy"))) == 2


def test_encode_text_chunks_match_direct_encode(bpe):
    text = "\n\n".join(list(data.pydoc_topics().values())[:30]) + "\n\n\n\nEnd.\n"
    direct = bpe.encode(text, add_special_tokens=False).ids
    for chunk_chars in (500, 3_000, 10**9):
        chunked = data.encode_text(text, bpe, chunk_chars=chunk_chars)
        assert chunked.dtype == np.int32
        assert chunked.tolist() == direct, chunk_chars
    assert data.encode_text("", bpe).shape == (0,)
    chunks = data._paragraph_chunks(text, 500)
    assert "".join(chunks) == text and len(chunks) > 10


def test_tokenize_word_level_ids_match_encode(tmp_cache, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(("the cat sat on the mat\n\n" * 40) + "the dog sat")
    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = data.load_corpus(str(path))
    for split in ("train", "validation", "test"):
        ids = data.tokenize(corpus, split, tok)
        assert ids.tolist() == tok.encode(corpus.text(split), add_special_tokens=False).ids
    assert data.tokenize(corpus, "test", tok).tolist()[-3:] == [1, 0, 3]


# ---------------------------------------------------------------------------- batching

def test_eval_windows_matches_naive_loop():
    tokens = np.arange(1000, 2003, dtype=np.int32)  # 1003 tokens
    for seq_len in (1, 7, 100, 1002):
        windows = data.eval_windows(tokens, seq_len)
        naive = []
        start = 0
        while start + seq_len + 1 <= len(tokens):
            naive.append(tokens[start:start + seq_len + 1])
            start += seq_len
        np.testing.assert_array_equal(windows, np.stack(naive))
        assert windows.shape == (len(naive), seq_len + 1) and windows.dtype == np.int32
        # each target token is scored exactly once
        targets = windows[:, 1:].ravel()
        assert len(set(targets.tolist())) == targets.size
    assert data.eval_windows(tokens, 10, max_windows=3).shape == (3, 11)
    np.testing.assert_array_equal(data.eval_windows(tokens, 10, max_windows=3),
                                  data.eval_windows(tokens, 10)[:3])


def test_eval_windows_errors():
    tokens = np.arange(10)
    with pytest.raises(ValueError, match="seq_len=10"):
        data.eval_windows(tokens, 10)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="seq_len"):
            data.eval_windows(tokens, bad)
    with pytest.raises(ValueError, match="max_windows"):
        data.eval_windows(tokens, 4, max_windows=0)
    with pytest.raises(ValueError, match="1-D"):
        data.eval_windows(tokens.reshape(2, 5), 2)


def test_train_batches_deterministic_contiguous_slices():
    rng = np.random.default_rng(0)
    tokens = rng.permutation(5000).astype(np.int32)  # distinct values locate each slice
    position = {int(t): i for i, t in enumerate(tokens)}
    a = data.train_batches(tokens, 4, 16, seed=3)
    b = data.train_batches(tokens, 4, 16, seed=3)
    c = data.train_batches(tokens, 4, 16, seed=4)
    batches_a = [next(a) for _ in range(20)]
    batches_b = [next(b) for _ in range(20)]
    batches_c = [next(c) for _ in range(20)]
    for x, y in zip(batches_a, batches_b):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(batches_a, batches_c))
    starts = set()
    for batch in batches_a:
        assert batch.shape == (4, 17) and batch.dtype == np.int32
        for row in batch:
            s = position[int(row[0])]
            np.testing.assert_array_equal(row, tokens[s:s + 17])
            starts.add(s)
    assert len(starts) > 60  # random offsets, not a fixed few


def test_train_batches_reaches_both_ends_and_validates():
    tokens = np.arange(6, dtype=np.int32)  # seq_len 4: starts 0 or 1 only
    it = data.train_batches(tokens, 8, 4, seed=0)
    firsts = {int(x) for _ in range(10) for x in next(it)[:, 0]}
    assert firsts == {0, 1}
    with pytest.raises(ValueError, match="batch_size"):
        data.train_batches(tokens, 0, 4, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        data.train_batches(tokens, 2, "4", seed=0)
    with pytest.raises(ValueError, match="seed"):
        data.train_batches(tokens, 2, 4, seed=-1)
    with pytest.raises(ValueError, match="seq_len=8"):
        data.train_batches(tokens, 2, 8, seed=0)


# ---------------------------------------------------------------------------- fetching

def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMLAB_CACHE", str(tmp_path / "a" / "b"))
    assert data.cache_dir() == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    monkeypatch.delenv("MEMLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "memlab"


def test_unavailable_without_apt(tmp_cache, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(data.CorpusUnavailableError) as err:
        data.fetch_austen()
    msg = str(err.value)
    assert "r-cran-janeaustenr" in msg and "apt-get download r-cran-janeaustenr" in msg
    assert "load_corpus('pydoc')" in msg
    with pytest.raises(data.CorpusUnavailableError, match="r-cran-janeaustenr"):
        data.load_corpus("austen")
    assert not (tmp_cache / "janeaustenr" / "Rdata.rdb").exists()


def test_fetch_with_fake_apt_get(tmp_cache, tmp_path, monkeypatch, books, real_rdb):
    """The whole fetch path offline: a stand-in `apt-get` hands over a real .deb built
    from the cached files, failing until `apt-get update` has run (when root)."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not available")
    src = real_rdb.parent
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: r-cran-janeaustenr\nVersion: 1.0.0-1\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: test\n")
    dst = root / data._DEB_DATA_DIR
    dst.mkdir(parents=True)
    for f in ("Rdata.rdb", "Rdata.rdx"):
        shutil.copy(src / f, dst / f)
    deb = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "-b", str(root), str(deb)], check=True,
                   capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log, marker = tmp_path / "apt.log", tmp_path / "updated"
    fake = bin_dir / "apt-get"
    fake.write_text(f"""#!/bin/sh
echo "$*" >> {log}
if [ "$1" = update ]; then touch {marker}; exit 0; fi
if [ ! -e {marker} ]; then echo "E: Unable to locate package $2" >&2; exit 100; fi
cp {deb} .
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    if os.geteuid() != 0:
        with pytest.raises(data.CorpusUnavailableError, match="Unable to locate package"):
            data.fetch_austen()
        marker.touch()
    rdb = data.fetch_austen()
    assert rdb == tmp_cache / "janeaustenr" / "Rdata.rdb"
    if os.geteuid() == 0:
        assert log.read_text().split("\n")[:3] == [
            "download r-cran-janeaustenr", "update -qq", "download r-cran-janeaustenr"]
    assert rdb.read_bytes() == (src / "Rdata.rdb").read_bytes()
    assert sorted(p.name for p in rdb.parent.iterdir()) == ["Rdata.rdb", "Rdata.rdx"]
    assert data.austen_books() == books
    calls = log.read_text()
    assert data.fetch_austen() == rdb and log.read_text() == calls  # cached: no apt-get


def test_eval_windows_with_bos_score_every_text_token_once():
    tokens = np.arange(100, 131, dtype=np.int32)        # 31 text tokens, no BOS
    w = data.eval_windows(tokens, 10, bos=7)
    assert w.shape == (3, 11) and (w[:, 0] == 7).all()
    np.testing.assert_array_equal(w[:, 1:].ravel(), tokens[:30])
    with_bos = np.concatenate([[7], tokens]).astype(np.int32)   # a stream that starts with it
    np.testing.assert_array_equal(data.eval_windows(with_bos, 10, bos=7), w)
    assert data.eval_windows(tokens, 10, max_windows=2, bos=7).shape == (2, 11)
    with pytest.raises(ValueError, match="bos"):
        data.eval_windows(tokens, 10, bos=-1)
