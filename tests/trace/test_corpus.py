"""Corpus reading, tokenizers and packing: the documents, labels and errors a user sees."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moelab.trace import CorpusError, Document, TextTokenizer, pack, read_corpus


def test_text_file_is_one_unlabelled_document(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n", encoding="utf-8")
    assert read_corpus(tmp_path / "a.txt") == [Document("hello world\n", None, str(tmp_path / "a.txt"))]


def test_folder_labels_come_from_file_stems_and_subfolders(tmp_path):
    (tmp_path / "code.txt").write_text("x = 1", encoding="utf-8")
    (tmp_path / "poems").mkdir()
    (tmp_path / "poems" / "a.txt").write_text("roses", encoding="utf-8")
    (tmp_path / "poems" / "deep").mkdir()
    (tmp_path / "poems" / "deep" / "b.md").write_text("violets", encoding="utf-8")
    (tmp_path / ".hidden").write_text("skip me", encoding="utf-8")
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    docs = read_corpus(tmp_path)
    assert [(d.text, d.label) for d in docs] == [("x = 1", "code"), ("roses", "poems"), ("violets", "poems")]


def test_jsonl_text_and_optional_label(tmp_path):
    lines = [{"text": "a", "label": "x"}, {"text": "b"}, {"text": "c", "label": 3}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    assert [(d.text, d.label) for d in read_corpus(path)] == [("a", "x"), ("b", None), ("c", "3")]


@pytest.mark.parametrize("line, what", [("{not json", "not valid JSON"), ('{"txt": "a"}', "field 'text'"),
                                         ('{"text": "a", "label": [1]}', "'label'")])
def test_bad_jsonl_line_is_named(tmp_path, line, what):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=rf"c\.jsonl:2: .*{what}"):
        read_corpus(path)


def test_non_utf8_file_names_file_and_byte_offset(tmp_path):
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes("héllo".encode() + b"\xff\xfe tail")
    with pytest.raises(CorpusError, match=r"bad\.txt: not UTF-8 .*0xff at byte offset 6"):
        read_corpus(tmp_path)


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(CorpusError, match="empty"):
        read_corpus(tmp_path)
    (tmp_path / "a.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty"):
        read_corpus(tmp_path)
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "nope")


def test_model_dir_without_tokenizer(tmp_path):
    with pytest.raises(CorpusError, match=r"has no tokenizer \(tokenizer\.json expected\)"):
        TextTokenizer(tmp_path)


def test_tokenizer_roundtrip_and_eos(model_dir):
    tok = TextTokenizer(model_dir)
    assert tok.eos_id == 0  # config.json's eos_token_id
    ids = tok.encode(["def add(a, b):"])[0]
    assert len(ids) > 0 and 0 not in ids  # no special tokens added
    assert tok.describe()["sha256"] == TextTokenizer(model_dir).sha256


def test_pack_one_label_per_sequence_round_robin_and_separator():
    docs = [[1, 2, 3], [4, 5], [10, 11, 12, 13, 14, 15, 16], [6]]
    labels = ["a", "a", "b", "a"]
    p = pack(docs, labels, seq_len=3, separator=99)
    seqs = [p.tokens_N[p.starts_S1[s]:p.starts_S1[s + 1]].tolist() for s in range(p.num_sequences)]
    # label a's stream: 1 2 3 99 4 5 99 6 -> [1,2,3] [99,4,5] [99,6]; label b: [10,11,12] [13,14,15] [16]
    assert seqs == [[1, 2, 3], [10, 11, 12], [99, 4, 5], [13, 14, 15], [99, 6], [16]]
    assert p.label_names == ["a", "b"]
    assert p.labels_S.tolist() == [0, 1, 0, 1, 0, 1]


def test_pack_max_tokens_cuts_the_last_sequence_and_no_labels():
    p = pack([list(range(10))], [None], seq_len=4, max_tokens=6)
    assert p.num_tokens == 6 and p.starts_S1.tolist() == [0, 4, 6]
    assert p.labels_S is None and p.label_names is None
    with pytest.raises(CorpusError, match="no tokens"):
        pack([[]], [None], seq_len=4)
    with pytest.raises(CorpusError, match="seq_len"):
        pack([[1]], [None], seq_len=0)


def test_pack_random_streams_are_preserved():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, rng.integers(1, 20)).tolist() for _ in range(30)]
    labels = [str(x) for x in rng.integers(0, 3, 30)]
    p = pack(docs, labels, seq_len=7, separator=-5)
    for code, name in enumerate(p.label_names):
        got = np.concatenate([p.tokens_N[p.starts_S1[s]:p.starts_S1[s + 1]]
                              for s in range(p.num_sequences) if p.labels_S[s] == code])
        want = []
        for d, lab in zip(docs, labels, strict=True):
            if lab == name:
                want += ([-5] if want else []) + d
        assert got.tolist() == want
    lengths = np.diff(p.starts_S1)
    assert (lengths <= 7).all() and (lengths >= 1).all()


def test_corrupt_tokenizer_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CorpusError, match=r"tokenizer\.json: cannot load the tokenizer"):
        TextTokenizer(tmp_path)


@pytest.mark.parametrize("max_tokens", [1, 17, 40, 95, 300, None])
def test_prepare_input_tokenizes_only_what_packing_reaches(model_dir, max_tokens, monkeypatch):
    """Tokenizing per label until max_tokens packs exactly what tokenizing every document packs."""
    from moelab.models import open_model
    from moelab.trace.inputs import prepare_input

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "x", "yy"]
    docs = [Document(" ".join(rng.choice(words, size=int(rng.integers(1, 30)))), lab)
            for lab in ["a", "b", "c"] for _ in range(90)]
    tok = TextTokenizer(model_dir)
    want = pack([tok.encode([d.text])[0] for d in docs], [d.label for d in docs], 16, max_tokens, tok.eos_id)
    encoded = []
    real_encode = TextTokenizer.encode
    monkeypatch.setattr(TextTokenizer, "encode", lambda self, texts: encoded.extend(texts) or real_encode(self, texts))
    got = prepare_input(docs, open_model(str(model_dir)), 16, max_tokens, None, model_dir).packed
    np.testing.assert_array_equal(got.tokens_N, want.tokens_N)
    np.testing.assert_array_equal(got.starts_S1, want.starts_S1)
    np.testing.assert_array_equal(got.labels_S, want.labels_S)
    if max_tokens is not None and max_tokens <= 95:
        assert len(encoded) < len(docs)  # the rest of the corpus was never tokenized
