"""``moelab.data.read_corpus``: only the formats it can read faithfully; the rest is refused by name."""

from __future__ import annotations

import json

import pytest

from moelab.data import CorpusError, read_corpus


@pytest.mark.parametrize("name, content", [
    ("labels.csv", "text,label\nhello world,greeting\n"),
    ("docs.json", json.dumps([{"text": "hello world", "label": "greeting"}])),
    ("notes.md", "# hello world\n"),
])
def test_a_file_of_another_format_is_refused_naming_it_and_the_accepted_ones(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError) as err:
        read_corpus(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: unknown corpus format '{path.suffix}'")
    for accepted in ("a text file (.txt)", "a folder of text files", "a JSONL file (.jsonl)"):
        assert accepted in msg


def test_a_data_file_in_a_folder_is_refused_but_any_text_file_is_read(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text("x = 1\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("words\n", encoding="utf-8")
    (tmp_path / "more.jsonl").write_text('{"text": "t1"}\n{"text": "t2", "label": "own"}\n', encoding="utf-8")
    docs = read_corpus(tmp_path)
    assert [(d.text, d.label) for d in docs] == [("x = 1\n", "code"), ("t1", "more"), ("t2", "own"),
                                                 ("words\n", "notes")]
    (tmp_path / "code" / "table.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"table\.csv: unknown corpus format '\.csv' in a folder corpus"):
        read_corpus(tmp_path)
