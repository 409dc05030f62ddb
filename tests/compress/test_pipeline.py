"""Calibration text of a corpus path: seeded, from the train split, balanced across labels; the library's
calibration_batches and the pipeline (CLI) draw the same."""

from __future__ import annotations

from collections import Counter

import pytest

from moelab.compress.calib import calibration_documents
from moelab.data import default_corpus
from moelab.data.texts import read_corpus
from moelab.errors import MoelabError


def _chars(docs) -> Counter:
    out = Counter()
    for d in docs:
        out[d.label] += len(d.text)
    return out


def test_each_domain_gets_an_equal_share_although_document_counts_differ():
    docs = read_corpus(default_corpus(), "train")
    assert Counter(d.label for d in docs)["drama"] < 0.1 * len(docs)  # why balancing matters
    chars = _chars(calibration_documents(default_corpus(), tokens=4096, seed=0))
    assert set(chars) == {"code", "drama", "prose"}
    want = 8 * 4096 / 3
    for label, n in chars.items():
        assert want <= n < want + 8 * 256, (label, n)  # reaches its share, overshoots by < one slice


def test_seeded_label_filtered_and_from_the_train_split():
    a = calibration_documents(default_corpus(), tokens=2048, seed=1)
    b = calibration_documents(default_corpus(), tokens=2048, seed=1)
    c = calibration_documents(default_corpus(), tokens=2048, seed=2)
    assert [d.text for d in a] == [d.text for d in b] != [d.text for d in c]
    code = calibration_documents(default_corpus(), tokens=2048, seed=0, label="code")
    assert {d.label for d in code} == {"code"} and sum(len(d.text) for d in code) >= 8 * 2048
    train = {d.source for d in read_corpus(default_corpus(), "train")}
    assert {d.source for d in a} <= train
    with pytest.raises(MoelabError, match="calib label 'poetry'"):
        calibration_documents(default_corpus(), tokens=64, seed=0, label="poetry")


def test_calibration_batches_of_a_path_are_the_label_balanced_draw():
    import torch

    from moelab.compress.calib import calibration_batches
    from moelab.data import default_model
    from moelab.models import open_model

    view = open_model(default_model())
    kw = dict(tokens=2048, seq_len=64, seed=3, tokenizer=default_model())
    from_path = calibration_batches(view, default_corpus(), **kw)
    docs = calibration_documents(default_corpus(), 2048, 3, None, 64)
    from_docs = calibration_batches(view, docs, **kw)
    assert from_path.labels == from_docs.labels and from_path.num_tokens == from_docs.num_tokens
    assert all(torch.equal(a, b) for a, b in zip(from_path.batches, from_docs.batches, strict=True))
    share = Counter(from_path.labels)
    assert set(share) == {"code", "drama", "prose"} and max(share.values()) <= 2 * min(share.values())
    code = calibration_batches(view, default_corpus(), label="code", **kw)
    assert set(code.labels) == {"code"} and code.num_tokens >= 2048
