"""Corpora for tracing: tokenizing documents and packing them into sequences.

Shape legend: N tokens (the packed stream), S sequences.

Reading a corpus path into documents is :mod:`moelab.data.texts`. Packing concatenates the documents of one label, a separator token between
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

from moelab.data.texts import CorpusError
from moelab.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from moelab.errors import MoelabError


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
