"""``moelab offload bench``: decode through the offloading runtime and print what the cache did
(a thin command over :func:`moelab.offload.runtime.decode_bench`); ``moelab offload
train-predictor``: train ExpertFlow's expert predictor once and save it for ``--policy predictive``
(:func:`moelab.offload.runtime.fit_predictor`, :mod:`moelab.offload.predictor_file`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moelab.cli._options import (
    CORPUS_FORMATS,
    check_predictor_option,
    no_progress_option,
    predictor_option,
)


@click.group("offload")
def offload_group() -> None:
    """Serve a model whose experts do not fit in memory (expert cache, prefetch)."""


@offload_group.command("bench")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--budget", default="25%", show_default=True,
              help="Expert bytes kept resident: bytes, a fraction of all experts (0.25), or e.g. 64MiB, 25%.")
@click.option("--policy", default="lru", show_default=True,
              help="Cache policy: lru, lfu, lrfu, activation, or predictive (uses --predictor, or trains one first).")
@click.option("--tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens of the corpus' test split decoded one at a time.")
@click.option("--corpus", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A `moelab data build` corpus (default: the shipped one).")
@click.option("--prefetch", is_flag=True, help="Prefetch the next layer's predicted experts on a background thread.")
@click.option("--resident", is_flag=True, help="Also time the fully resident model on the same tokens.")
@predictor_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the numbers to this JSON file.")
@no_progress_option
def bench_command(model: Path | None, budget: str, policy: str, tokens: int, corpus: Path | None,
                  prefetch: bool, resident: bool, predictor: Path | None, json_path: Path | None,
                  no_progress: bool) -> None:
    """Decode TOKENS tokens through MODEL (default: the embedded model) with its experts offloaded;
    print hits, misses, bytes read, peak resident expert bytes and tokens/s."""
    from rich.console import Console
    from rich.table import Table

    from moelab.cli._options import embedded_default
    from moelab.data.atomic import atomic_write_text
    from moelab.offload.cache import human_bytes
    from moelab.offload.runtime import DecodeBenchConfig, decode_bench

    model = model or embedded_default("default_model", "MODEL")
    cfg = DecodeBenchConfig(budget=_budget(budget), policy=policy, tokens=tokens, prefetch=prefetch,
                            resident=resident)
    check_predictor_option(predictor, policy, required=False)
    r = decode_bench(model, cfg, corpus=corpus, predictor=predictor, progress=not no_progress)
    t = Table(title=f"offload bench: {model.name}, policy {policy}, budget {human_bytes(r['budget_bytes'])}")
    cols = ["hits", "misses", "hit rate", "bytes read", "read/token", "peak resident", "tokens/s"]
    for col in cols + (["resident tokens/s"] if resident else []):
        t.add_column(col, justify="right")
    t.add_row(str(r["hits"]), str(r["misses"]), f"{r['hit_rate']:.3f}", human_bytes(r["bytes_read"]),
              human_bytes(r["bytes_read_per_token"]), human_bytes(r["peak_resident_bytes"]),
              f"{r['tokens_per_s']:.1f}", *([f"{r['resident_tokens_per_s']:.1f}"] if resident else []))
    Console().print(t)
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(r, indent=2))


@offload_group.command("train-predictor")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The predictor file to write (safetensors).")
@click.option("--tokens", type=click.IntRange(min=2), default=16384, show_default=True,
              help="Training tokens drawn from the corpus' train split.")
@click.option("--corpus", type=click.Path(exists=True, path_type=Path), default=None,
              help="Training text (default: the shipped corpus). " + CORPUS_FORMATS)
@click.option("--expert-budget", default="100%", show_default=True,
              help="Expert bytes resident while routing the training text (a model bigger than memory).")
@no_progress_option
def train_predictor_command(model: Path | None, out: Path, tokens: int, corpus: Path | None, expert_budget: str,
                            no_progress: bool) -> None:
    """Train ExpertFlow's expert predictor for MODEL (default: the embedded model) on TOKENS tokens
    and write it to OUT, for `moelab generate --policy predictive --predictor OUT`."""
    from moelab.cli._options import embedded_default
    from moelab.offload.predictor_file import save_predictor
    from moelab.offload.runtime import fit_predictor

    model = model or embedded_default("default_model", "MODEL")
    corpus = corpus or embedded_default("default_corpus", "--corpus")
    predictor = fit_predictor(model, corpus, tokens, budget=_budget(expert_budget), progress=not no_progress)
    save_predictor(predictor, out)
    click.echo(f"wrote {out}: {len(predictor.pairs)} heads, hint {predictor.config.hint!r}", err=True)


def _budget(text: str) -> int | float | str:
    """``--budget``: a plain number is bytes (an integer) or a fraction (with a point)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


COMMANDS = [offload_group]
