"""A tiny corpus built by the real build from short slices of the shipped corpus (seconds to build)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.data import default_corpus, read_split
from moelab.data.build import BuildConfig, build_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_corpus")
    for domain in ("code", "drama", "prose"):
        folder = root / "src" / domain
        folder.mkdir(parents=True)
        for i, doc in enumerate(read_split(default_corpus(), domain, "train")[:6]):
            name = f"d{i}_gut.txt" if domain == "drama" else f"d{i}.txt"
            (folder / name).write_text(doc.text[:4000], encoding="utf-8")
    cfg = BuildConfig(out_dir=root / "corpus", drama=root / "src" / "drama", code_dir=root / "src" / "code",
                      prose_dir=root / "src" / "prose", vocab_size=600)
    build_corpus(cfg)
    return root / "corpus"
