"""Calibration text of the compression pipeline: seeded, from the train split, balanced across labels."""

from __future__ import annotations

from collections import Counter

import pytest

from moelab.compress.pipeline import calibration_documents
from moelab.data import default_corpus
from moelab.errors import MoelabError
from moelab.trace.corpus import read_corpus


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
