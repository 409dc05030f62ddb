"""Reading the built corpus: documents per domain and split, and checking it against its manifest.

Layout of a corpus folder (written by :mod:`moelab.data.build`)::

    manifest.json                  sources, per-file bytes + sha256, per-split document/char counts
    LICENSES                       where each domain comes from and under which licence
    tokenizer.json                 byte-level BPE (see moelab.data.tokenizer)
    tokenizer_config.json
    <domain>/<split>.jsonl.xz      one JSON object per line: {"id": str, "text": str}

Domains are ``code``, ``drama``, ``prose``; splits are ``train``, ``val``, ``test``.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

from moelab.data.sources import DOMAINS, Document, sha256_file
from moelab.errors import MoelabError

SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST = "manifest.json"


def split_path(corpus_dir: Path, domain: str, split: str) -> Path:
    """Path of one domain's split file."""
    if domain not in DOMAINS:
        raise MoelabError(f"domain: expected one of {', '.join(DOMAINS)}, got {domain!r}")
    if split not in SPLITS:
        raise MoelabError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    return Path(corpus_dir) / domain / f"{split}.jsonl.xz"


def read_split(corpus_dir: Path, domain: str, split: str) -> list[Document]:
    """Read the documents of one domain and split, in their stored order."""
    path = split_path(corpus_dir, domain, split)
    if not path.is_file():
        raise MoelabError(f"corpus: {path} not found (build the corpus with `moelab data build`)")
    docs = []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                docs.append(Document(domain, str(row["id"]), str(row["text"])))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise MoelabError(f"corpus: {path} line {n}: expected {{'id': str, 'text': str}} ({err})") from err
    return docs


def read_manifest(corpus_dir: Path) -> dict:
    """Load ``manifest.json`` of a corpus folder."""
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise MoelabError(f"corpus: {path} not found (not a corpus folder built by `moelab data build`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MoelabError(f"corpus: {path} is not valid JSON ({err})") from err


def verify_corpus(corpus_dir: Path) -> dict:
    """Check every file listed in the manifest against its size and sha256; return the manifest.

    Raises:
        MoelabError: naming the first file that is missing or differs.
    """
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)
    for rel, entry in sorted(manifest.get("files", {}).items()):
        path = corpus_dir / rel
        if not path.is_file():
            raise MoelabError(f"corpus: {path} is listed in {MANIFEST} but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise MoelabError(f"corpus: {path} has {size} bytes, {MANIFEST} says {entry['bytes']}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise MoelabError(f"corpus: {path} sha256 {digest[:12]}… differs from {MANIFEST} ({entry['sha256'][:12]}…)")
    return manifest
