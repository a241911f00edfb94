"""Real text corpora for memlab: fetched, parsed, split by document, tokenized and cached.

Three sources, all plain text at the end:

* ``austen`` -- Jane Austen's six novels, taken from Debian's ``r-cran-janeaustenr``
  package.  The package is *downloaded*, never installed (installing it pulls in R): the
  ``.deb`` is unpacked with ``dpkg-deb -x`` and the two files of R's lazy-load database
  (``data/Rdata.rdb`` and ``data/Rdata.rdx``) are copied into the cache.  They are read
  here with a small pure-Python reader for R's XDR serialization format.
* ``pydoc`` -- CPython's own help topics (``pydoc_data.topics``), always available offline.
* any path to a UTF-8 text file.

Splits are by document wherever there is more than one document, so a model is never
scored on text from a book it was trained on: for Austen, *Persuasion* is the test set and
*Northanger Abbey* the validation set.

Everything written to disk lives under :func:`cache_dir` (``$MEMLAB_CACHE`` or
``~/.cache/memlab``) and is written atomically (temporary file, then ``os.replace``)::

    from memlab import data
    corpus = data.load_corpus("austen")
    tokens = data.tokenize(corpus, "test", tokenizer)        # int32, cached as .npy
    windows = data.eval_windows(tokens, seq_len=512)         # [n, 513], stride 512
    batches = data.train_batches(data.tokenize(corpus, "train", tokenizer), 8, 512, seed=0)

R serialization, as much of it as is needed here (see R's ``src/main/serialize.c``): a
header (``"X\\n"``, format version, writer R version, minimal reader R version and, for
format 3, the native encoding as a length-prefixed string), then items.  Every item starts
with a big-endian 32-bit flags word: the low 8 bits are the SEXPTYPE, bit 9 (0x200) says
attributes follow, bit 10 (0x400) says a tag follows, bits 12 and up are the "levels"
(for CHARSXP: the string's encoding).  Vectors carry a length and their elements, then
their attributes as a pairlist.
"""
from __future__ import annotations

import bz2
import codecs
import dataclasses
import functools
import gzip
import hashlib
import lzma
import os
import pathlib
import re
import shutil
import struct
import subprocess
import tempfile
import types
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

__all__ = [
    "AUSTEN_TITLES", "CORPORA", "Corpus", "CorpusUnavailableError", "RSymbol", "RVector",
    "austen_books", "cache_dir", "encode_text", "eval_windows", "fetch_austen",
    "load_corpus", "pydoc_topics", "read_rdb", "text_file", "tokenize", "train_batches",
    "unserialize",
]

CORPORA = ("austen", "pydoc")

#: R variable name in janeaustenr -> display title, in publication order.
AUSTEN_TITLES: Mapping[str, str] = types.MappingProxyType({
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
})
_AUSTEN_TEST = ("Persuasion",)
_AUSTEN_VALIDATION = ("Northanger Abbey",)

_DEB_PACKAGE = "r-cran-janeaustenr"
_DEB_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
_RDATA_FILES = ("Rdata.rdb", "Rdata.rdx")

_CHUNK_CHARS = 100_000
_TOKENS_FORMAT = "memlab-tokens-v1"


class CorpusUnavailableError(RuntimeError):
    """A corpus could not be fetched; the message says what is missing and how to fix it."""


def cache_dir() -> pathlib.Path:
    """``$MEMLAB_CACHE`` if set, else ``~/.cache/memlab``; created on demand."""
    env = os.environ.get("MEMLAB_CACHE")
    path = pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "memlab"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _atomic_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copy ``src`` to ``dst`` so that ``dst`` is either absent, old, or complete."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_npy(array: np.ndarray, dst: pathlib.Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=".npy.tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.save(out, array, allow_pickle=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------
# R XDR serialization reader
# --------------------------------------------------------------------------------------

NILSXP, SYMSXP, LISTSXP = 0, 1, 2
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 9, 10, 13, 14, 15, 16
VECSXP, EXPRSXP, RAWSXP = 19, 20, 24
NILVALUE_SXP, REFSXP = 254, 255

_NA_INTEGER = -(2 ** 31)
_LATIN1_MASK, _UTF8_MASK, _BYTES_MASK = 1 << 2, 1 << 3, 1 << 1
_TYPE_NAMES = {0: "NILSXP", 1: "SYMSXP", 2: "LISTSXP", 3: "CLOSXP", 4: "ENVSXP",
               5: "PROMSXP", 6: "LANGSXP", 7: "SPECIALSXP", 8: "BUILTINSXP", 9: "CHARSXP",
               10: "LGLSXP", 13: "INTSXP", 14: "REALSXP", 15: "CPLXSXP", 16: "STRSXP",
               17: "DOTSXP", 19: "VECSXP", 20: "EXPRSXP", 24: "RAWSXP", 25: "OBJSXP",
               238: "ALTREP_SXP", 239: "ATTRLISTSXP", 240: "ATTRLANGSXP",
               241: "BASEENV_SXP", 242: "EMPTYENV_SXP", 247: "PERSISTSXP",
               248: "PACKAGESXP", 249: "NAMESPACESXP", 250: "BASENAMESPACE_SXP",
               251: "MISSINGARG_SXP", 252: "UNBOUNDVALUE_SXP", 253: "GLOBALENV_SXP",
               254: "NILVALUE_SXP", 255: "REFSXP"}


@dataclasses.dataclass(frozen=True)
class RSymbol:
    """An R symbol (SYMSXP), e.g. the tag ``names`` of an attribute."""
    name: str


@dataclasses.dataclass(frozen=True)
class RVector:
    """An R vector or pairlist: its SEXPTYPE, elements and attributes.

    Elements are Python values: ``str`` (``None`` for NA) for character vectors, ``int``
    (``None`` for NA) for integer and logical vectors, ``float`` for doubles, nested values
    for lists.  A pairlist's tags become its ``names`` attribute.
    """
    sexptype: int
    items: tuple[Any, ...]
    attributes: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> tuple[str | None, ...] | None:
        names = self.attributes.get("names")
        return None if names is None else tuple(names.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]

    def to_dict(self) -> dict[str, Any]:
        """Named elements as a dict (requires a ``names`` attribute)."""
        if self.names is None:
            raise ValueError("R vector has no names attribute")
        return dict(zip(self.names, self.items))


class _XDRCursor:
    """Reads big-endian (XDR) primitives from a byte string, tracking the position."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = memoryview(data)
        self.pos = pos

    def read_bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"truncated R serialization: wanted {n} bytes at offset "
                             f"{self.pos}, have {len(self.data) - self.pos}")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def read_int(self) -> int:
        return struct.unpack(">i", self.read_bytes(4))[0]

    def read_uint(self) -> int:
        return struct.unpack(">I", self.read_bytes(4))[0]

    def read_ints(self, n: int) -> tuple[int, ...]:
        return struct.unpack(f">{n}i", self.read_bytes(4 * n))

    def read_doubles(self, n: int) -> tuple[float, ...]:
        return struct.unpack(f">{n}d", self.read_bytes(8 * n))

    def read_string(self) -> str:
        """An int length followed by that many bytes, decoded as UTF-8."""
        return self.read_bytes(self.read_int()).decode("utf-8", errors="replace")

    def read_length(self) -> int:
        n = self.read_int()
        if n == -1:  # long vector: two more ints, upper and lower 32 bits
            hi, lo = self.read_uint(), self.read_uint()
            return (hi << 32) | lo
        if n < 0:
            raise ValueError(f"negative vector length {n} at offset {self.pos - 4}")
        return n


class _Unserializer:
    """Reads one R object in XDR format (version 2 or 3)."""

    def __init__(self, data: bytes) -> None:
        self.cur = _XDRCursor(data)
        self.refs: list[Any] = []
        self.native_encoding = "utf-8"

    def read_header(self) -> int:
        magic = self.cur.read_bytes(2)
        if magic != b"X\n":
            raise ValueError(f"not an R XDR serialization (magic {magic!r}; only 'X\\n' "
                             "binary XDR is supported, not ASCII 'A' or native 'B')")
        version = self.cur.read_int()
        self.cur.read_int()  # R version that wrote it
        self.cur.read_int()  # minimal R version that can read it
        if version == 3:
            encoding = self.cur.read_bytes(self.cur.read_int()).decode("ascii", "replace")
            self.native_encoding = _python_codec(encoding)
        elif version != 2:
            raise ValueError(f"unsupported R serialization format version {version}")
        return version

    def read_item(self) -> Any:
        return self._read_item(self.cur.read_uint())

    def _read_item(self, flags: int) -> Any:
        sexptype = flags & 0xFF
        has_attr = bool(flags & 0x200)
        if sexptype == NILVALUE_SXP:
            return None
        if sexptype == REFSXP:
            index = flags >> 8 or self.cur.read_int()
            if not 1 <= index <= len(self.refs):
                raise ValueError(f"R serialization reference {index} out of range "
                                 f"(have {len(self.refs)})")
            return self.refs[index - 1]
        if sexptype == SYMSXP:
            name = self.read_item()
            symbol = RSymbol("" if name is None else name)
            self.refs.append(symbol)
            return symbol
        if sexptype == CHARSXP:
            return self._read_charsxp(flags)
        if sexptype == LISTSXP:
            return self._read_pairlist(flags)
        if sexptype in (LGLSXP, INTSXP):
            n = self.cur.read_length()
            items = tuple(None if v == _NA_INTEGER else v for v in self.cur.read_ints(n))
        elif sexptype == REALSXP:
            items = self.cur.read_doubles(self.cur.read_length())
        elif sexptype == CPLXSXP:
            d = self.cur.read_doubles(2 * self.cur.read_length())
            items = tuple(complex(d[i], d[i + 1]) for i in range(0, len(d), 2))
        elif sexptype == RAWSXP:
            items = (self.cur.read_bytes(self.cur.read_length()),)
        elif sexptype == STRSXP:
            n = self.cur.read_length()
            items = tuple(self._read_charsxp(self.cur.read_uint()) for _ in range(n))
        elif sexptype in (VECSXP, EXPRSXP):
            n = self.cur.read_length()
            items = tuple(self.read_item() for _ in range(n))
        else:
            name = _TYPE_NAMES.get(sexptype, "unknown")
            raise ValueError(f"unsupported R SEXPTYPE {sexptype} ({name}) at offset "
                             f"{self.cur.pos - 4}; this reader handles character, numeric, "
                             "logical, raw and list vectors, pairlists and symbols")
        attributes = self._attributes(self.read_item()) if has_attr else {}
        return RVector(sexptype, items, types.MappingProxyType(attributes))

    def _read_charsxp(self, flags: int) -> str | None:
        if flags & 0xFF != CHARSXP:
            raise ValueError(f"expected CHARSXP (9), got SEXPTYPE {flags & 0xFF} at offset "
                             f"{self.cur.pos - 4}")
        n = self.cur.read_int()
        if n == -1:
            return None  # NA_character_
        raw = self.cur.read_bytes(n)
        levels = flags >> 12
        if levels & (_LATIN1_MASK | _BYTES_MASK):
            return raw.decode("latin-1")
        codec = "utf-8" if levels & _UTF8_MASK else self.native_encoding
        return raw.decode(codec, errors="replace")

    def _read_pairlist(self, flags: int) -> RVector:
        """A pairlist, read iteratively: (attr?, tag?, CAR, CDR) with CDR the next node."""
        tags: list[str | None] = []
        values: list[Any] = []
        attributes: dict[str, Any] = {}
        first = True
        while flags & 0xFF == LISTSXP:
            attr = self.read_item() if flags & 0x200 else None
            tag = self.read_item() if flags & 0x400 else None
            if first and attr is not None:
                attributes = self._attributes(attr)
            first = False
            tags.append(tag.name if isinstance(tag, RSymbol) else None)
            values.append(self.read_item())
            flags = self.cur.read_uint()
        if flags & 0xFF != NILVALUE_SXP:  # a dotted pair: keep the final CDR as an element
            tags.append(None)
            values.append(self._read_item(flags))
        if any(t is not None for t in tags):
            attributes.setdefault("names", RVector(STRSXP, tuple(tags)))
        return RVector(LISTSXP, tuple(values), types.MappingProxyType(attributes))

    @staticmethod
    def _attributes(pairlist: Any) -> dict[str, Any]:
        if pairlist is None:
            return {}
        if not isinstance(pairlist, RVector) or pairlist.sexptype != LISTSXP:
            raise ValueError("R attributes are not a pairlist")
        return {name or "": value for name, value in zip(pairlist.names or (), pairlist.items)}


def _python_codec(r_encoding: str) -> str:
    name = r_encoding.strip().lower()
    if name in ("latin1", "iso-8859-1", "iso8859-1"):
        return "latin-1"
    try:
        return codecs.lookup(name).name
    except LookupError:
        return "utf-8"


def unserialize(data: bytes) -> Any:
    """Parse one R object serialized in XDR format (``"X\\n"`` header, version 2 or 3).

    Returns an :class:`RVector` (or ``None`` for R's ``NULL``).  Unknown SEXPTYPEs raise
    ``ValueError``.
    """
    reader = _Unserializer(data)
    reader.read_header()
    return reader.read_item()


def _decompress_file(raw: bytes) -> bytes:
    """An R index/.rds file: gzip, bzip2, xz, raw, or R's 4-byte length + zlib."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    if raw[:2] == b"X\n":
        return raw
    return _decompress_record(raw, compressed=1)


def _decompress_record(record: bytes, compressed: int) -> bytes:
    """One lazy-load DB record: big-endian *uncompressed* length, then the payload.

    ``compressed`` is the rdx's ``compressed`` field: 0 none, 1 (TRUE) zlib, 2 or 3 a
    type byte after the length ('Z' xz, '2' bzip2, '1' zlib, '0' stored).
    """
    if not compressed:
        return record
    if len(record) < 4:
        raise ValueError("truncated lazy-load record")
    out_len = struct.unpack(">I", record[:4])[0]
    payload, kind = record[4:], b"1"
    if compressed in (2, 3):
        kind, payload = record[4:5], record[5:]
    if kind == b"1":
        out = zlib.decompressobj().decompress(payload)
    elif kind == b"2":
        out = bz2.decompress(payload)
    elif kind == b"Z":
        out = lzma.decompress(payload)
    elif kind == b"0":
        out = payload
    else:
        raise ValueError(f"unknown lazy-load compression type {kind!r}")
    if len(out) != out_len:
        raise ValueError(f"lazy-load record decompressed to {len(out)} bytes, header says "
                         f"{out_len}")
    return out


def _read_rdx(rdx: bytes) -> tuple[dict[str, tuple[int, int]], int]:
    """The index: variable name -> (offset, length) into the rdb, and the compression."""
    index = unserialize(_decompress_file(rdx))
    if not isinstance(index, RVector):
        raise ValueError("R lazy-load index is not a list")
    top = index.to_dict()
    variables = top["variables"]
    compressed = top.get("compressed")
    comp = 1 if compressed is None else compressed.items[0]
    comp = int(True if comp is None else comp)
    out: dict[str, tuple[int, int]] = {}
    for name, pair in variables.to_dict().items():
        if not isinstance(pair, RVector) or len(pair) != 2:
            raise ValueError(f"bad index entry for {name!r}")
        out[name] = (int(pair[0]), int(pair[1]))
    return out, comp


def read_rdb(rdb_path: os.PathLike | str, rdx_path: os.PathLike | str | None = None
             ) -> dict[str, Any]:
    """All variables of an R lazy-load database (``.rdb`` + ``.rdx``), name -> value."""
    rdb_path = pathlib.Path(rdb_path)
    rdx_path = pathlib.Path(rdx_path) if rdx_path else rdb_path.with_suffix(".rdx")
    blob = rdb_path.read_bytes()
    index, compressed = _read_rdx(rdx_path.read_bytes())
    out = {}
    for name, (offset, length) in index.items():
        if offset < 0 or offset + length > len(blob):
            raise ValueError(f"index entry {name!r} points outside {rdb_path}")
        out[name] = unserialize(_decompress_record(blob[offset:offset + length], compressed))
    return out


def _scan_rdb(blob: bytes) -> list[Any]:
    """Without an index: every zlib record in order (4-byte length, zlib stream)."""
    out, pos = [], 0
    while pos + 4 <= len(blob):
        out_len = struct.unpack(">I", blob[pos:pos + 4])[0]
        dec = zlib.decompressobj()
        data = dec.decompress(blob[pos + 4:])
        if not dec.eof or len(data) != out_len:
            raise ValueError(f"bad zlib record at offset {pos} of the rdb")
        out.append(unserialize(data))
        pos = len(blob) - len(dec.unused_data)
    return out


# --------------------------------------------------------------------------------------
# Jane Austen
# --------------------------------------------------------------------------------------

def _austen_error(detail: str) -> CorpusUnavailableError:
    return CorpusUnavailableError(
        f"The Jane Austen corpus is not cached in {cache_dir() / 'janeaustenr'} and the "
        f"Debian package {_DEB_PACKAGE} could not be downloaded ({detail}). Run "
        f"`apt-get download {_DEB_PACKAGE}` (needs Debian/Ubuntu apt and network access to "
        "the Debian mirror; `python -m memlab fetch` does it for you), or use "
        "`load_corpus('pydoc')` or a text file (`load_corpus('/path/to/file.txt')`) instead.")


def _run(cmd: list[str], cwd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _tail(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stderr or proc.stdout or "").strip().splitlines()
    return text[-1] if text else f"exit status {proc.returncode}"


def _download_deb(workdir: str) -> pathlib.Path:
    """``apt-get download`` into ``workdir`` (after one ``apt-get update`` if root)."""
    cmd = ["apt-get", "download", _DEB_PACKAGE]
    try:
        proc = _run(cmd, workdir, timeout=600)
        if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            _run(["apt-get", "update", "-qq"], workdir, timeout=600)
            proc = _run(cmd, workdir, timeout=600)
    except FileNotFoundError:
        raise _austen_error("apt-get was not found on PATH") from None
    except subprocess.TimeoutExpired as e:
        raise _austen_error(f"`{' '.join(e.cmd)}` timed out") from None
    if proc.returncode != 0:
        raise _austen_error(f"`apt-get download {_DEB_PACKAGE}` failed: {_tail(proc)}")
    debs = sorted(pathlib.Path(workdir).glob(f"{_DEB_PACKAGE}_*.deb"))
    if not debs:
        raise _austen_error("apt-get download produced no .deb file")
    return debs[-1]


def fetch_austen(force: bool = False) -> pathlib.Path:
    """Path to the cached ``Rdata.rdb`` of janeaustenr, downloading it if needed.

    Raises :class:`CorpusUnavailableError` when the package cannot be downloaded.
    """
    dest = cache_dir() / "janeaustenr"
    rdb, rdx = (dest / f for f in _RDATA_FILES)
    if not force and rdb.is_file() and rdx.is_file():
        return rdb
    with tempfile.TemporaryDirectory(prefix="memlab-janeaustenr-") as tmp:
        os.chmod(tmp, 0o755)  # apt drops to the _apt user for the download
        deb = _download_deb(tmp)
        unpacked = os.path.join(tmp, "x")
        try:
            proc = _run(["dpkg-deb", "-x", str(deb), unpacked], tmp, timeout=300)
        except FileNotFoundError:
            raise _austen_error("dpkg-deb was not found on PATH") from None
        if proc.returncode != 0:
            raise _austen_error(f"`dpkg-deb -x` failed: {_tail(proc)}")
        src = pathlib.Path(unpacked, _DEB_DATA_DIR)
        missing = [f for f in _RDATA_FILES if not (src / f).is_file()]
        if missing:
            raise _austen_error(f"{deb.name} has no {_DEB_DATA_DIR}/{missing[0]}")
        # rdx first: the rdb's presence (checked with the rdx) marks a complete fetch.
        for name in reversed(_RDATA_FILES):
            _atomic_copy(src / name, dest / name)
    return rdb


def _title_key(line: str) -> str:
    return re.sub(r"\s+", " ", line.upper().replace("&", "AND")).strip()


_TITLE_BY_FIRST_LINE = {_title_key(t): t for t in AUSTEN_TITLES.values()}


def _book_text(lines: RVector) -> str:
    if not isinstance(lines, RVector) or lines.sexptype != STRSXP:
        raise ValueError("janeaustenr book is not a character vector")
    return "\n".join("" if line is None else line for line in lines.items)


def _books_by_first_line(rdb: pathlib.Path) -> dict[str, str]:
    """Fallback when the index cannot be parsed: name each record by its title line."""
    found = {}
    for value in _scan_rdb(rdb.read_bytes()):
        text = _book_text(value)
        first = next((ln for ln in text.splitlines() if ln.strip()), "")
        title = _TITLE_BY_FIRST_LINE.get(_title_key(first))
        if title:
            found[title] = text
    return found


@functools.lru_cache(maxsize=4)
def _parse_austen(rdb: str, _mtime_ns: int, _size: int) -> Mapping[str, str]:
    path = pathlib.Path(rdb)
    try:
        variables = read_rdb(path, path.with_suffix(".rdx"))
        books = {AUSTEN_TITLES[k]: _book_text(v) for k, v in variables.items()
                 if k in AUSTEN_TITLES}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, OSError, EOFError,
            struct.error, zlib.error, lzma.LZMAError):
        books = _books_by_first_line(path)  # index unreadable: name books by their titles
    missing = [t for t in AUSTEN_TITLES.values() if t not in books]
    if missing:
        raise ValueError(f"{path} does not contain {', '.join(missing)}; delete "
                         f"{path.parent} and run fetch_austen() again")
    return types.MappingProxyType({t: books[t] for t in AUSTEN_TITLES.values()})


def austen_books() -> dict[str, str]:
    """Display title -> full text (lines joined with newlines), in publication order."""
    rdb = fetch_austen()
    st = rdb.stat()
    return dict(_parse_austen(str(rdb), st.st_mtime_ns, st.st_size))


# --------------------------------------------------------------------------------------
# Other sources
# --------------------------------------------------------------------------------------

def pydoc_topics() -> dict[str, str]:
    """CPython's help topics (``pydoc_data.topics.topics``): topic -> text."""
    from pydoc_data.topics import topics
    return dict(topics)


def text_file(path: os.PathLike | str) -> dict[str, str]:
    """A single document named by the file's stem (read as UTF-8)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text corpus file not found: {p}")
    return {p.stem: p.read_text(encoding="utf-8", errors="replace")}


# --------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Corpus:
    """Named documents and the splits (split -> document names) that partition them."""
    name: str
    splits: Mapping[str, tuple[str, ...]]
    documents: Mapping[str, str]

    def __post_init__(self) -> None:
        for split, names in self.splits.items():
            unknown = [n for n in names if n not in self.documents]
            if unknown:
                raise ValueError(f"split {split!r} names unknown documents {unknown}")
        object.__setattr__(self, "splits", types.MappingProxyType(
            {k: tuple(v) for k, v in self.splits.items()}))
        object.__setattr__(self, "documents", types.MappingProxyType(dict(self.documents)))

    def _check_split(self, split: str) -> tuple[str, ...]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r} for corpus {self.name!r}; valid "
                             f"splits: {', '.join(self.splits)}")
        return self.splits[split]

    def split_documents(self, split: str) -> list[str]:
        """The texts of the split's documents, in order."""
        return [self.documents[n] for n in self._check_split(split)]

    def text(self, split: str) -> str:
        """The split's documents joined with blank lines."""
        return "\n\n".join(self.split_documents(split))


def _austen_corpus() -> Corpus:
    books = austen_books()
    held_out = set(_AUSTEN_TEST + _AUSTEN_VALIDATION)
    train = tuple(t for t in books if t not in held_out)
    return Corpus("austen", {"train": train, "validation": _AUSTEN_VALIDATION,
                             "test": _AUSTEN_TEST}, books)


def _pydoc_corpus() -> Corpus:
    topics = pydoc_topics()
    names = sorted(topics)
    test = tuple(n for i, n in enumerate(names) if i % 10 == 0)
    validation = tuple(n for i, n in enumerate(names) if i % 10 == 1)
    train = tuple(n for i, n in enumerate(names) if i % 10 not in (0, 1))
    return Corpus("pydoc", {"train": train, "validation": validation, "test": test}, topics)


def _file_corpus(path: os.PathLike | str) -> Corpus:
    ((stem, text),) = text_file(path).items()
    a, b = int(len(text) * 0.90), int(len(text) * 0.95)
    parts = {"train": text[:a], "validation": text[a:b], "test": text[b:]}
    docs = {f"{stem}:{split}": part for split, part in parts.items()}
    return Corpus(stem, {split: (f"{stem}:{split}",) for split in parts}, docs)


def load_corpus(name: str = "austen") -> Corpus:
    """``"austen"`` (split by book), ``"pydoc"`` (split by topic) or a text file's path
    (split 90/5/5 by characters into train/validation/test)."""
    if name == "austen":
        return _austen_corpus()
    if name == "pydoc":
        return _pydoc_corpus()
    if isinstance(name, (str, os.PathLike)) and os.path.isfile(name):
        return _file_corpus(name)
    raise ValueError(f"unknown corpus {name!r}: expected one of {', '.join(CORPORA)} or a "
                     "path to an existing text file")


# --------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------

def _paragraph_chunks(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` into pieces of about ``chunk_chars`` at paragraph breaks.

    Each cut is placed at the start of the whitespace run holding a ``"\\n\\n"``, so the
    whitespace stays with the text that follows it, as GPT-2 style pre-tokenizers split it.
    """
    chunks, start, n = [], 0, len(text)
    while n - start > chunk_chars:
        cut = text.rfind("\n\n", start + 1, start + chunk_chars)
        if cut == -1:
            cut = text.find("\n\n", start + chunk_chars)
            if cut == -1:
                break
        while cut - 1 > start and text[cut - 1].isspace():
            cut -= 1
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def encode_text(text: str, tokenizer, chunk_chars: int = _CHUNK_CHARS) -> np.ndarray:
    """Token ids (int32) of ``text``, encoded in paragraph-aligned chunks with
    ``encode_batch`` and no special tokens."""
    _check_positive_int("chunk_chars", chunk_chars)
    if not text:
        return np.zeros(0, np.int32)
    encodings = tokenizer.encode_batch(_paragraph_chunks(text, chunk_chars),
                                       add_special_tokens=False)
    ids = [np.asarray(e.ids, np.int32) for e in encodings]
    return np.concatenate(ids) if ids else np.zeros(0, np.int32)


def _token_cache_path(corpus: Corpus, split: str, tokenizer) -> pathlib.Path:
    text_hash = hashlib.sha256(corpus.text(split).encode("utf-8")).hexdigest()
    h = hashlib.sha256(_TOKENS_FORMAT.encode())
    h.update(tokenizer.to_str().encode("utf-8"))
    h.update(text_hash.encode("ascii"))
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus.name) or "corpus"
    return cache_dir() / "tokens" / f"{safe}-{split}-{h.hexdigest()[:16]}.npy"


def tokenize(corpus: Corpus, split: str, tokenizer) -> np.ndarray:
    """The split's documents encoded with a ``tokenizers.Tokenizer`` and concatenated
    (nothing inserted between documents); int32, 1-D, cached under
    ``cache_dir()/tokens``."""
    docs = corpus.split_documents(split)
    path = _token_cache_path(corpus, split, tokenizer)
    if path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.dtype == np.int32 and cached.ndim == 1:
                return cached
        except (OSError, ValueError):
            pass  # unreadable cache entry: recompute and overwrite it
    parts = [encode_text(doc, tokenizer) for doc in docs]
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    tokens = np.ascontiguousarray(tokens, np.int32)
    _atomic_save_npy(tokens, path)
    return tokens


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------

def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_tokens(tokens: Any, seq_len: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.shape[0] < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens for "
                         f"seq_len={seq_len}, got {tokens.shape[0]}")
    return tokens


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None,
                 bos: int | None = None) -> np.ndarray:
    """Non-overlapping ``[n, seq_len + 1]`` windows with stride ``seq_len``: inputs are
    ``w[:, :-1]``, targets ``w[:, 1:]``, and every target token is scored exactly once.

    ``bos``: a beginning-of-sequence id (:func:`bos_id`) put before every window, which
    then holds ``seq_len`` text tokens, all scored: models trained to see it first (Gemma)
    are scored as they run.  The windows are then ``[n, seq_len + 1]`` with ``w[:, 0] ==
    bos`` and stride ``seq_len``."""
    seq_len = _check_positive_int("seq_len", seq_len)
    if max_windows is not None:
        max_windows = _check_positive_int("max_windows", max_windows)
    tokens = _check_tokens(tokens, seq_len)
    if bos is not None:
        if isinstance(bos, bool) or not isinstance(bos, (int, np.integer)) or bos < 0:
            raise ValueError(f"bos must be a token id (a non-negative int) or None, got {bos!r}")
        text = tokens[1:] if tokens.shape[0] and tokens[0] == bos else tokens
        n = text.shape[0] // seq_len
        if max_windows is not None:
            n = min(n, max_windows)
        body = text[:n * seq_len].reshape(n, seq_len)
        return np.concatenate([np.full((n, 1), bos, tokens.dtype), body], axis=1)
    n = (tokens.shape[0] - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    index = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return tokens[index]


def bos_id(tokenizer) -> int | None:
    """The id the tokenizer puts before every text (its post-processor's BOS, as Gemma's
    ``add_bos_token``), or None when it adds nothing."""
    with_special = tokenizer.encode("a").ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    if len(with_special) > len(plain) and with_special[len(with_special) - len(plain):] == plain:
        return int(with_special[0])
    return None


def train_batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int
                  ) -> Iterator[np.ndarray]:
    """Infinite iterator of ``[batch_size, seq_len + 1]`` windows at uniformly random
    offsets, from ``np.random.default_rng(seed)``; the same seed gives the same batches."""
    batch_size = _check_positive_int("batch_size", batch_size)
    seq_len = _check_positive_int("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    tokens = _check_tokens(tokens, seq_len)
    return _random_windows(tokens, batch_size, seq_len, int(seed))


def _random_windows(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int
                    ) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)[None, :]
    n_starts = tokens.shape[0] - seq_len  # starts 0 .. len - seq_len - 1
    while True:
        starts = rng.integers(0, n_starts, size=batch_size)
        yield tokens[starts[:, None] + offsets]
