"""Reading any corpus path into labelled text documents (what ``trace``, ``eval``, ``prune``'s
calibration and the demo accept, through this one reader).

A corpus is one of:

- a text file (``.txt``): one document, no label;
- a JSONL file (``.jsonl``): one object per line with a ``text`` string and an optional ``label``;
- a folder of text files: each file directly in the folder is a document labelled with its file
  stem, files under a subfolder are labelled with the subfolder's name; ``.jsonl`` files in it are
  read as JSONL (their lines' own labels win), any other file as text;
- a folder built by ``moelab data build``: the documents of one split, labelled by domain.

Anything else is refused, naming the file: a ``.csv`` or a JSON-array ``.json`` read as raw text
would silently become one document with its labels lost. Inside a folder any text suffix
(``.py``, ``.md``, ...) is a text file, but data formats (CSV, JSON, Parquet, compressed files) are
refused for the same reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import MoelabError

ACCEPTED = ("a text file (.txt), a folder of text files, a JSONL file (.jsonl) with 'text' and optional "
            "'label' per line, or a `moelab data build` corpus folder")
# data formats whose structure (columns, arrays, compression) raw-text reading would silently drop
DATA_SUFFIXES = frozenset({".csv", ".tsv", ".json", ".parquet", ".arrow", ".feather", ".xlsx", ".xls",
                           ".gz", ".xz", ".bz2", ".zst", ".zip", ".tar", ".7z", ".npy", ".npz", ".pdf"})


class CorpusError(MoelabError):
    """A corpus or tokenizer that cannot be read; the message names the file (and line or offset)."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus. ``source`` names where it came from (file, or file:line)."""

    text: str
    label: str | None = None
    source: str = ""


def fingerprint_documents(docs: Sequence[Document]) -> str:
    """sha256 over the labels and texts of the documents, in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(b"\x00" if d.label is None else d.label.encode() + b"\x01")
        h.update(d.text.encode())
        h.update(b"\x02")
    return h.hexdigest()


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(
            f"{path}: not UTF-8 text (invalid byte 0x{data[err.start]:02x} at byte offset {err.start})"
        ) from None


def _read_jsonl(path: Path, default_label: str | None) -> list[Document]:
    text = _decode(path)
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CorpusError(f"{path}:{lineno}: expected an object with a string field 'text'")
        label = obj.get("label", default_label)
        if label is not None and not isinstance(label, (str, int)):
            raise CorpusError(f"{path}:{lineno}: field 'label' must be a string or integer, got {label!r}")
        docs.append(Document(obj["text"], None if label is None else str(label), f"{path}:{lineno}"))
    return docs


def _unknown_format(path: Path, where: str) -> CorpusError:
    return CorpusError(f"{path}: unknown corpus format {path.suffix or '(no suffix)'!r}{where}; expected "
                       f"{ACCEPTED}")


def _read_file(path: Path, label: str | None, in_folder: bool) -> list[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, label)
    # a lone file must say it is text; in a folder of text files any non-data suffix is text
    if suffix in DATA_SUFFIXES or (not in_folder and suffix != ".txt"):
        raise _unknown_format(path, " in a folder corpus" if in_folder else "")
    return [Document(_decode(path), label, str(path))]


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def is_moelab_corpus(path: Path) -> bool:
    """True for a corpus folder built by ``moelab data build`` (manifest + ``<domain>/<split>.jsonl.xz``)."""
    return (path / "manifest.json").is_file() and any(path.glob("*/*.jsonl.xz"))


def read_moelab_corpus(path: Path, split: str) -> list[Document]:
    """The documents of one split of a ``moelab data build`` corpus, labelled by domain."""
    from moelab.data.corpus import read_split
    from moelab.data.sources import DOMAINS

    docs = []
    for domain in DOMAINS:
        docs += [Document(d.text, domain, f"{path}/{domain}/{split}:{d.id}")
                 for d in read_split(path, domain, split)]
    return docs


def read_corpus(path: str | Path, split: str = "val") -> list[Document]:
    """Read a corpus path (see the module docstring for what is accepted) into documents.

    A folder built by ``moelab data build`` yields the documents of ``split``, labelled by domain.
    Raises :class:`CorpusError` for a missing path, a format that is not accepted, a file that is
    not UTF-8 (naming the byte offset), bad JSONL lines, or a corpus without any non-blank text.
    """
    path = Path(path)
    if path.is_dir() and is_moelab_corpus(path):
        docs = read_moelab_corpus(path, split)
    elif path.is_file():
        docs = _read_file(path, None, in_folder=False)
    elif path.is_dir():
        docs = []
        for file in _visible_files(path):
            rel = file.relative_to(path)
            label = rel.parts[0] if len(rel.parts) > 1 else file.name.split(".")[0]
            docs += _read_file(file, label, in_folder=True)
    else:
        raise CorpusError(f"corpus {path} does not exist (expected {ACCEPTED})")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CorpusError(f"corpus {path} is empty: no document with any non-blank text")
    return docs
