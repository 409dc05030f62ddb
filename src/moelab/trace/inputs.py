"""Turning what ``record`` is given (a corpus path, texts, documents, token ids) into packed sequences.

Shape legend: N tokens, S sequences.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.data.texts import CorpusError, Document, fingerprint_documents, read_corpus
from moelab.trace.corpus import Packed, TextTokenizer, pack


@dataclass(frozen=True)
class CorpusInput:
    """Packed sequences plus the descriptions of tokenizer and corpus that go into the manifest."""

    packed: Packed
    tokenizer: dict[str, Any] | None
    corpus: dict[str, Any]


def tokenizer_dir(view: Any, tokenizer: str | os.PathLike | None) -> Path:
    """The folder whose ``tokenizer.json`` encodes texts for ``view``: ``tokenizer`` if given, else
    the directory the model was loaded from; a :class:`CorpusError` when neither exists."""
    if tokenizer is not None:
        return Path(tokenizer)
    name = getattr(view.config, "_name_or_path", "") or ""
    if name and Path(name).is_dir():
        return Path(name)
    raise CorpusError("texts need a tokenizer, and the model was not loaded from a directory: pass "
                      "tokenizer=<model directory with tokenizer.json>, or token ids instead of texts")


def as_token_docs(obj: Any) -> list[np.ndarray] | None:
    """Token-id documents from a 2-D/1-D array or tensor or a list of int sequences; None otherwise."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        if not np.issubdtype(obj.dtype, np.integer) or obj.ndim not in (1, 2):
            raise CorpusError(f"token ids must be an integer array of 1 or 2 dimensions, got "
                              f"{obj.dtype} with shape {obj.shape}")
        return [obj] if obj.ndim == 1 else list(obj)
    if isinstance(obj, (list, tuple)) and obj and all(
            isinstance(d, (list, tuple, np.ndarray, torch.Tensor)) for d in obj):
        docs = [np.asarray(d.cpu() if isinstance(d, torch.Tensor) else d) for d in obj]
        for i, d in enumerate(docs):
            if d.ndim != 1 or (d.size and not np.issubdtype(d.dtype, np.integer)):
                raise CorpusError(f"token-id document {i}: expected a 1-D list of ints, got {d.dtype} {d.shape}")
        return docs
    return None


def check_vocab(docs: list[np.ndarray], vocab_size: int | None) -> None:
    """A :class:`CorpusError` naming the first document with an id outside ``[0, vocab_size)``."""
    for i, d in enumerate(docs):
        if d.size and (d.min() < 0 or (vocab_size is not None and d.max() >= vocab_size)):
            raise CorpusError(f"token-id document {i}: ids must lie in [0, {vocab_size}), found "
                              f"[{d.min()}, {d.max()}]")


def _documents(obj: Any, labels: list[str | None] | None) -> tuple[list[Document], str | None]:
    if isinstance(obj, (str, bytes)):
        raise CorpusError("texts_or_token_ids: a single string is ambiguous; pass [text] for one text or "
                          "pathlib.Path(...) for a corpus file or folder")
    if isinstance(obj, os.PathLike):
        return read_corpus(obj), str(Path(obj).resolve())
    if not isinstance(obj, (list, tuple)) or not obj:
        raise CorpusError(f"texts_or_token_ids: expected a corpus path, texts, documents or token ids, got "
                          f"{type(obj).__name__}" + (" (empty)" if isinstance(obj, (list, tuple)) else ""))
    if all(isinstance(d, Document) for d in obj):
        return list(obj), None
    if all(isinstance(t, str) for t in obj):
        if labels is not None and len(labels) != len(obj):
            raise CorpusError(f"labels: {len(labels)} labels for {len(obj)} texts")
        labs = labels or [None] * len(obj)
        return [Document(t, None if lab is None else str(lab), f"text {i}")
                for i, (t, lab) in enumerate(zip(obj, labs, strict=True))], None
    raise CorpusError("texts_or_token_ids: a list must hold only texts, only Documents or only token-id lists")


_ENCODE_CHUNK = 64  # documents per tokenizer call


def _encode_needed(tok: TextTokenizer, docs: list[Document], max_tokens: int | None
                   ) -> tuple[list[Document], list[np.ndarray]]:
    """Tokenize only the documents packing can reach: per label, in order, until the label holds
    ``max_tokens`` tokens (packing interleaves labels and cuts at ``max_tokens`` in all, so no label
    contributes more). The packed result equals tokenizing every document; a large corpus traced
    with ``--max-tokens`` no longer pays for tokenizing all of it."""
    if max_tokens is None:
        return docs, [np.asarray(x, dtype=np.int64) for x in tok.encode([d.text for d in docs])]
    by_label: dict[str | None, list[int]] = {}
    for i, d in enumerate(docs):
        by_label.setdefault(d.label, []).append(i)
    encoded: dict[int, np.ndarray] = {}
    for idx in by_label.values():
        total = -1  # the stream has a separator between documents, not before the first
        for start in range(0, len(idx), _ENCODE_CHUNK):
            chunk = idx[start:start + _ENCODE_CHUNK]
            for i, ids in zip(chunk, tok.encode([docs[i].text for i in chunk]), strict=True):
                encoded[i] = np.asarray(ids, dtype=np.int64)
                total += len(ids) + 1  # + the separator
            if total >= max_tokens:
                break
    keep = sorted(encoded)
    return [docs[i] for i in keep], [encoded[i] for i in keep]


def prepare_input(obj: Any, view: Any, seq_len: int, max_tokens: int | None,
                  labels: list[str | None] | None, tokenizer: str | os.PathLike | None) -> CorpusInput:
    """Tokenize (if needed) and pack the input of :func:`moelab.trace.record`."""
    token_docs = as_token_docs(obj)
    vocab = getattr(view.config, "vocab_size", None)
    if token_docs is not None:
        if labels is not None and len(labels) != len(token_docs):
            raise CorpusError(f"labels: {len(labels)} labels for {len(token_docs)} token-id documents")
        check_vocab(token_docs, vocab)
        labs = list(labels) if labels is not None else [None] * len(token_docs)
        h = hashlib.sha256()
        for d, lab in zip(token_docs, labs, strict=True):
            h.update(f"{lab}\x00{len(d)}\x00".encode() + d.astype(np.int64).tobytes())
        corpus = {"kind": "token_ids", "source": None, "documents": len(token_docs), "sha256": h.hexdigest()}
        packed = pack(token_docs, [None if x is None else str(x) for x in labs], seq_len, max_tokens)
        return CorpusInput(packed, None, corpus)
    docs, source = _documents(obj, labels)
    tok = TextTokenizer(tokenizer_dir(view, tokenizer))
    used, token_arrays = _encode_needed(tok, docs, max_tokens)
    check_vocab(token_arrays, vocab)
    corpus = {"kind": "path" if source else "texts", "source": source, "documents": len(docs),
              "sha256": fingerprint_documents(docs)}
    packed = pack(token_arrays, [d.label for d in used], seq_len, max_tokens, tok.eos_id)
    return CorpusInput(packed, tok.describe(), corpus)
