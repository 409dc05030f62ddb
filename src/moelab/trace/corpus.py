"""Corpora for tracing: reading documents, tokenizing them, packing them into sequences.

Shape legend: N tokens (the packed stream), S sequences.

A corpus is a text file (one document, no label), a folder of text files (each file directly in the
folder is a document labelled with its file stem; files under a subfolder are labelled with the
subfolder's name), or a JSONL file (``.jsonl``) whose lines are objects with a ``text`` string and an
optional ``label``. Packing concatenates the documents of one label, a separator token between
documents, cuts the stream into sequences of ``seq_len`` tokens (the last one may be shorter), and
interleaves the labels' sequences round-robin so that any prefix of the sequences (``max_tokens``)
mixes all labels.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moelab.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from moelab.errors import MoelabError


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


def _read_file(path: Path, label: str | None) -> list[Document]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, label)
    return [Document(_decode(path), label, str(path))]


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def is_moelab_corpus(path: Path) -> bool:
    """True for a corpus folder built by ``moelab data build`` (manifest + ``<domain>/<split>.jsonl.xz``)."""
    return (path / "manifest.json").is_file() and any(path.glob("*/*.jsonl.xz"))


def read_moelab_corpus(path: Path, split: str) -> list[Document]:
    """The documents of one split of a ``moelab data build`` corpus, labelled by domain."""
    try:
        from moelab.data import DOMAINS, read_split
    except ImportError as err:
        raise CorpusError(f"{path}: reading a moelab corpus needs moelab.data ({err})") from None
    docs = []
    for domain in DOMAINS:
        docs += [Document(d.text, domain, f"{path}/{domain}/{split}:{d.id}")
                 for d in read_split(path, domain, split)]
    return docs


def read_corpus(path: str | Path, split: str = "val") -> list[Document]:
    """Read a corpus path (text file, folder of text files, or JSONL) into documents.

    A folder built by ``moelab data build`` is read through :mod:`moelab.data`: the documents of
    ``split``, labelled by domain. Raises :class:`CorpusError` for a missing path, a file that is
    not UTF-8 (naming the byte offset), bad JSONL lines, or a corpus without any non-blank text.
    """
    path = Path(path)
    if path.is_dir() and is_moelab_corpus(path):
        docs = read_moelab_corpus(path, split)
    elif path.is_file():
        docs = _read_file(path, None)
    elif path.is_dir():
        docs = []
        for file in _visible_files(path):
            rel = file.relative_to(path)
            label = rel.parts[0] if len(rel.parts) > 1 else file.name.split(".")[0]
            docs += _read_file(file, label)
    else:
        raise CorpusError(f"corpus {path} does not exist (expected a text file, a folder or a .jsonl)")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CorpusError(f"corpus {path} is empty: no document with any non-blank text")
    return docs


class TextTokenizer:
    """The tokenizer of a model directory (``tokenizer.json``), with its fingerprint and separator."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        try:
            self._tok = load_tokenizer(model_dir, "pass token ids instead of texts, or a model directory "
                                                  "that ships its tokenizer")
        except MoelabError as err:
            raise CorpusError(str(err)) from None
        self.path = path = model_dir / TOKENIZER_FILE
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        self.eos_id = _eos_id(model_dir, self._tok)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (the separator is added by packing)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def describe(self) -> dict[str, Any]:
        return {"file": TOKENIZER_FILE, "sha256": self.sha256, "separator_id": self.eos_id,
                "vocab_size": self._tok.get_vocab_size()}


def _eos_id(model_dir: Path, tok: Any) -> int | None:
    """The end-of-sequence id from ``config.json``, else ``tokenizer_config.json``'s eos token."""
    cfg = model_dir / "config.json"
    if cfg.is_file():
        eos = json.loads(cfg.read_text(encoding="utf-8")).get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if isinstance(eos, int):
            return eos
    tcfg = model_dir / "tokenizer_config.json"
    if tcfg.is_file():
        name = json.loads(tcfg.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(name, dict):
            name = name.get("content")
        if isinstance(name, str):
            return tok.token_to_id(name)
    return None


@dataclass(frozen=True)
class Packed:
    """Sequences cut from a token stream: sequence s is ``tokens_N[starts_S1[s]:starts_S1[s + 1]]``.

    ``labels_S`` holds codes into ``label_names`` (None when no document has a label).
    """

    tokens_N: np.ndarray  # int32
    starts_S1: np.ndarray  # int64, [S + 1]
    labels_S: np.ndarray | None  # int32
    label_names: list[str] | None

    @property
    def num_sequences(self) -> int:
        return len(self.starts_S1) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.starts_S1[-1])


def pack(token_docs: Sequence[Sequence[int]], labels: Sequence[str | None], seq_len: int,
         max_tokens: int | None = None, separator: int | None = None) -> Packed:
    """Pack tokenized documents into sequences of ``seq_len`` (see the module docstring)."""
    if seq_len < 1:
        raise CorpusError(f"seq_len must be >= 1, got {seq_len}")
    has_labels = any(lab is not None for lab in labels)
    names: list[str] = []
    streams: dict[str, list[np.ndarray]] = {}
    for ids, lab in zip(token_docs, labels, strict=True):
        key = "unlabelled" if lab is None else lab
        if key not in streams:
            names.append(key)
            streams[key] = []
        parts = streams[key]
        if parts and separator is not None:
            parts.append(np.array([separator], dtype=np.int32))
        parts.append(np.asarray(ids, dtype=np.int32))
    per_label = []  # per label: list of sequences
    for key in names:
        stream = np.concatenate(streams[key]) if streams[key] else np.empty(0, np.int32)
        per_label.append([stream[i:i + seq_len] for i in range(0, len(stream), seq_len)])
    seqs, codes = [], []
    for i in range(max((len(s) for s in per_label), default=0)):
        for code, label_seqs in enumerate(per_label):
            if i < len(label_seqs):
                seqs.append(label_seqs[i])
                codes.append(code)
    if max_tokens is not None:
        seqs, codes = _cut(seqs, codes, max_tokens)
    if not seqs:
        raise CorpusError("the corpus holds no tokens after tokenization")
    starts = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    return Packed(
        tokens_N=np.concatenate(seqs).astype(np.int32, copy=False),
        starts_S1=starts,
        labels_S=np.asarray(codes, dtype=np.int32) if has_labels else None,
        label_names=names if has_labels else None,
    )


def _cut(seqs: list[np.ndarray], codes: list[int], max_tokens: int) -> tuple[list, list]:
    if max_tokens < 1:
        raise CorpusError(f"max_tokens must be >= 1, got {max_tokens}")
    out, left = [], max_tokens
    for s in seqs:
        if left <= 0:
            break
        out.append(s[:left])
        left -= len(out[-1])
    return out, codes[: len(out)]
