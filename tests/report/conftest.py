"""A tiny saved Qwen3-MoE and labelled traces recorded from it (token-id documents, no tokenizer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.models.tiny import tiny_model

LABELS = ("code", "drama", "prose")


def _documents(vocab: int = 64, per_label: int = 6, length: int = 48):
    """Token-id documents whose ids lean on a label-specific third of the vocabulary."""
    rng = np.random.default_rng(0)
    docs, labels = [], []
    for n, label in enumerate(LABELS):
        lo = n * vocab // len(LABELS)
        for _ in range(per_label):
            own = rng.integers(lo, lo + vocab // len(LABELS), length)
            docs.append(np.where(rng.random(length) < 0.7, own, rng.integers(1, vocab, length)).tolist())
            labels.append(label)
    return docs, labels


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """tiny_model("Qwen3-MoE") (2 MoE layers, 8 experts, top-2, vocab 64), float32, as safetensors."""
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny_model("Qwen3-MoE", dtype=torch.float32).save_pretrained(folder)
    return folder


def _record(model_dir: Path, out: Path, labelled: bool, act_max: bool):
    import moelab.trace

    docs, labels = _documents()
    return moelab.trace.record(str(model_dir), docs, out, seq_len=32, batch_size=8, act_max=act_max,
                               labels=labels if labelled else None, progress=False)


@pytest.fixture(scope="session")
def full_trace(model_dir, tmp_path_factory):
    """Labelled, with activation maxima (do not modify)."""
    return _record(model_dir, tmp_path_factory.mktemp("full_trace"), labelled=True, act_max=True)


@pytest.fixture(scope="session")
def bare_trace(model_dir, tmp_path_factory):
    """No labels, no optional field (do not modify)."""
    return _record(model_dir, tmp_path_factory.mktemp("bare_trace"), labelled=False, act_max=False)
