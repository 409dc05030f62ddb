"""Calibration data for the planners: token batches from a corpus, and a pass that shows every block's routing.

Shape legend: B sequences per batch, S tokens per sequence, T = B*S tokens, H hidden, K top-k.

Every planner that needs data calls :func:`calibration_batches` once (deterministic under ``seed``:
the same corpus, model tokenizer, token count and seed give the same batches) and then
:func:`routing_pass` (or its own forward over the batches when it needs more than routing).

A corpus *path* is drawn from by :func:`calibration_documents`, as ``moelab prune``/``merge`` do: a
``moelab data build`` corpus is read from its **train** split (evaluation uses the val split, so
calibration never sees the evaluated text); other corpora (text file, folder, JSONL) are read whole.
Only what ``tokens`` needs is tokenised: documents are shuffled with the seed and a random slice of
each is taken until about 8 characters per wanted token are drawn. A labelled corpus gets an equal
share of that budget per label (domain): drawing documents uniformly would follow the document count
instead (the embedded corpus has 410 code documents, 38 plays and 70 prose topics), and
frequency-type planners would then drop the minority domains' experts. Texts, documents and token
ids are packed as given.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moelab.data.texts import Document, is_moelab_corpus, read_corpus
from moelab.errors import MoelabError
from moelab.models import ModelView, RoutingEvent
from moelab.run import run_batches
from moelab.trace.inputs import prepare_input


@dataclass(frozen=True)
class Calibration:
    """Calibration sequences ``batches`` (each ``[B, S]`` int64) with the label of every sequence."""

    batches: list[Tensor]
    labels: list[str | None]  # one per sequence, in batch order
    num_tokens: int
    seed: int

    def describe(self) -> dict[str, Any]:
        return {"tokens": self.num_tokens, "sequences": len(self.labels), "seed": self.seed,
                "labels": sorted({lab for lab in self.labels if lab is not None})}


def calibration_documents(corpus: str | os.PathLike, tokens: int, seed: int, label: str | None = None,
                          seq_len: int = 256) -> list[Document]:
    """Seeded random slices of the corpus' documents, about ``8 * tokens`` characters in all."""
    path = Path(corpus)
    docs = read_corpus(path, "train") if path.is_dir() and is_moelab_corpus(path) else read_corpus(path)
    if label is not None:
        names = sorted({d.label for d in docs if d.label is not None})
        docs = [d for d in docs if d.label == label]
        if not docs:
            raise MoelabError(f"calib label {label!r}: the corpus {path} has labels {names or 'none'}")
    rng = np.random.default_rng(seed)
    groups: dict[str | None, list[Document]] = {}
    for d in docs:
        groups.setdefault(d.label, []).append(d)
    want, out = 8 * tokens / len(groups), []
    for members in groups.values():  # in corpus order of the labels, so the draw is deterministic
        out += _slices(members, want, 8 * seq_len, rng)
    return out


def _slices(docs: list[Document], want: float, chunk: int, rng: np.random.Generator) -> list[Document]:
    """Random slices of ``chunk`` characters from shuffled documents, about ``want`` characters in all."""
    out, total = [], 0
    while total < want:
        before = total
        for i in rng.permutation(len(docs)):
            d = docs[int(i)]
            start = int(rng.integers(0, max(1, len(d.text) - chunk)))
            text = d.text[start:start + chunk]
            out.append(Document(text, d.label, d.source))
            total += len(text)
            if total >= want:
                break
        if total == before:  # only empty documents
            break
    return out


def calibration_batches(view: ModelView, corpus: Any, *, tokens: int = 16384, seq_len: int = 256,
                        batch_size: int = 8, seed: int = 0, label: str | None = None,
                        tokenizer: str | os.PathLike | None = None, shuffle: bool = True) -> Calibration:
    """Pack ``corpus`` (anything :func:`moelab.trace.record` takes) and draw ``tokens`` tokens of it.

    A corpus path (``pathlib.Path``) is first drawn from label-balanced by
    :func:`calibration_documents` (see the module docstring). Sequences are shuffled with ``seed``
    before the cut, so the draw covers the whole corpus. ``label`` keeps only the sequences of one
    label (domain), e.g. to calibrate "for code". ``shuffle=False`` keeps the corpus order (a
    stream of requests, as an offloading replay needs).
    """
    if tokens < 1:
        raise MoelabError(f"calibration tokens: expected >= 1, got {tokens}")
    if isinstance(corpus, os.PathLike):
        corpus = calibration_documents(corpus, tokens, seed, label, seq_len)
    data = prepare_input(corpus, view, seq_len, None, None, tokenizer)
    p = data.packed
    order = np.random.default_rng(seed).permutation(p.num_sequences) if shuffle else np.arange(p.num_sequences)
    names = p.label_names
    if label is not None:
        if names is None or label not in names:
            raise MoelabError(f"calibration label {label!r}: the corpus has labels {names or 'none'}")
        order = order[p.labels_S[order] == names.index(label)]
    seqs, labs, total = [], [], 0
    for s in order:
        row = p.tokens_N[p.starts_S1[s]:p.starts_S1[s + 1]]
        if len(row) < seq_len:  # a short tail: keep batches rectangular
            continue
        seqs.append(torch.from_numpy(row.astype(np.int64)))
        labs.append(None if names is None else names[int(p.labels_S[s])])
        total += len(row)
        if total >= tokens:
            break
    if not seqs:
        raise MoelabError(f"calibration: the corpus has no full sequence of {seq_len} tokens"
                          + (f" with label {label!r}" if label else ""))
    stacked = torch.stack(seqs)
    return Calibration(list(stacked.split(batch_size)), labs, total, seed)


def routing_pass(view: ModelView, calib: Calibration, on_event: Callable[[RoutingEvent], None]) -> None:
    """Run the model over the calibration batches, calling ``on_event`` for every block's routing.

    Through :func:`moelab.run.run_batches`: eval mode, no grad; the hooks are removed and the
    model's mode restored after, also on error.
    """
    run_batches(view.model, calib.batches, handles=[b.register_routing_hook(on_event) for b in view.blocks])


def per_layer(view: ModelView) -> dict[int, int]:
    """``layer -> number of experts`` of the model's MoE blocks."""
    return {b.layer: b.num_experts for b in view.blocks}


def expert_ffn(view: ModelView) -> dict[int, int]:
    """``layer -> intermediate size I`` of the model's MoE blocks."""
    return {b.layer: b.intermediate_size for b in view.blocks}

