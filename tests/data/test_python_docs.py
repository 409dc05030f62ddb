"""The docs prose source: python3.11-doc pages from a folder or the .deb, and a build that keeps the tokenizer."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from moelab.data import read_split
from moelab.data.build import BuildConfig, build_corpus
from moelab.data.sources import Document, read_python_docs
from moelab.errors import MoelabError

PAGES = {
    "library/json": "JSON encoder\r\n============\r\n\r\nDecode with :func:`json.loads`.\r\n",
    "tutorial/index": "The Python Tutorial\n===================\n\nPython is easy to learn.\n",
    "glossary": "Glossary\n========\n\n>>>  The default prompt.\n",
    "howto/sorting": "Sorting HOW TO\n==============\n\nUse sorted().\n",
}


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += [header, data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def _deb(path: Path) -> Path:
    """A minimal python3.11-doc package: the pages under html/_sources plus a non-page file."""
    data = {f"./usr/share/doc/python3.11/html/_sources/{k}.rst.txt": v.encode() for k, v in PAGES.items()}
    data["./usr/share/doc/python3.11/html/index.html"] = b"<html></html>"
    control = {"./control": b"Package: python3.11-doc\nVersion: 3.11.2-6+deb12u9\nArchitecture: all\n"}
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar_bytes(control),
                          "data.tar.xz": _tar_bytes(data)}))
    return path


def _folder(root: Path) -> Path:
    for key, text in PAGES.items():
        p = root / f"{key}.rst.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode())
    (root / "notes.txt").write_text("not a page")
    return root


def test_pages_read_alike_from_the_deb_and_from_a_folder(tmp_path):
    from_deb, origin = read_python_docs(_deb(tmp_path / "python3.11-doc_3.11.2-6+deb12u9_all.deb"))
    from_dir, _ = read_python_docs(_folder(tmp_path / "_sources"))
    assert origin == "Debian python3.11-doc 3.11.2-6+deb12u9"
    assert from_deb == from_dir
    assert [d.id for d in from_deb] == sorted(PAGES)  # one document per page, sorted, suffix dropped
    assert from_deb[1] == Document("prose", "howto/sorting", "Sorting HOW TO\n==============\n\nUse sorted().\n")
    assert "\r" not in "".join(d.text for d in from_deb)


def test_bad_docs_sources_are_named(tmp_path):
    (tmp_path / "junk.deb").write_bytes(b"not an ar archive")
    with pytest.raises(MoelabError, match="not a Debian package"):
        read_python_docs(tmp_path / "junk.deb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoelabError, match=r"no \*\.rst\.txt pages"):
        read_python_docs(tmp_path / "empty")
    with pytest.raises(MoelabError, match="does not exist"):
        read_python_docs(tmp_path / "missing")
    with pytest.raises(MoelabError, match="prose: expected one of"):
        BuildConfig(out_dir=tmp_path / "out", prose="wiki")


def test_docs_prose_build_keeps_the_topics_tokenizer(tmp_path):
    """The docs pages become the prose domain; the tokenizer is the one the topics build trains."""
    src = tmp_path / "src"
    for domain in ("code", "drama"):
        (src / domain).mkdir(parents=True)
        for i in range(4):
            name = f"d{i}_gut.txt" if domain == "drama" else f"d{i}.txt"
            (src / domain / name).write_text(f"{domain} document {i}\n" * (50 + 10 * i))
    pages = _folder(tmp_path / "_sources")
    common = dict(drama=src / "drama", code_dir=src / "code", vocab_size=600)
    topics = build_corpus(BuildConfig(out_dir=tmp_path / "topics", prose="topics", **common))
    docs = build_corpus(BuildConfig(out_dir=tmp_path / "docs", prose="python-docs", python_doc=pages, **common))
    assert docs["files"]["tokenizer.json"] == topics["files"]["tokenizer.json"]
    for domain in ("code", "drama"):
        assert docs["files"][f"{domain}/train.jsonl.xz"] == topics["files"][f"{domain}/train.jsonl.xz"]
    ids = sorted(d.id for split in ("train", "val", "test") for d in read_split(tmp_path / "docs", "prose", split))
    assert ids == sorted(PAGES)
    assert docs["sources"]["prose"] == str(pages) and "tokenizer_prose" in docs["sources"]
    licences = (tmp_path / "docs" / "LICENSES").read_text()
    assert "python3.11-doc" not in (tmp_path / "topics" / "LICENSES").read_text()
    assert "Python Software" in licences and "reStructuredText" in licences


# the tokenizer every shipped model was trained with: a corpus rebuild must not change it
SHIPPED_TOKENIZER_SHA256 = "9dee097f8a5e30263e668eae21da500fefab3027a89b05e19425bf3b84ed54d7"


def test_shipped_prose_is_the_python_docs_and_the_tokenizer_is_unchanged():
    from moelab.data import default_corpus, read_manifest

    manifest = read_manifest(default_corpus())
    assert manifest["sources"]["prose"].startswith("Debian python3.11-doc 3.11")
    assert manifest["files"]["tokenizer.json"]["sha256"] == SHIPPED_TOKENIZER_SHA256
    prose = manifest["splits"]["prose"]
    assert sum(s["documents"] for s in prose.values()) > 400 and prose["train"]["chars"] > 5e6
    assert any(d.id.startswith("library/") for d in read_split(default_corpus(), "prose", "val"))
