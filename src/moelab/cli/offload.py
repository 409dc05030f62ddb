"""``moelab offload bench``: decode through the offloading runtime and print what the cache did
(a thin command over :func:`moelab.offload.runtime.decode_bench`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from moelab.cli._options import no_progress_option


@click.group("offload")
def offload_group() -> None:
    """Serve a model whose experts do not fit in memory (expert cache, prefetch)."""


@offload_group.command("bench")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--budget", default="25%", show_default=True,
              help="Expert bytes kept resident: bytes, a fraction of all experts (0.25), or e.g. 64MiB, 25%.")
@click.option("--policy", default="lru", show_default=True,
              help="Cache policy: lru, lfu, lrfu, activation, or predictive (trains a predictor first).")
@click.option("--tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens of the corpus' test split decoded one at a time.")
@click.option("--corpus", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A `moelab data build` corpus (default: the shipped one).")
@click.option("--prefetch", is_flag=True, help="Prefetch the next layer's predicted experts on a background thread.")
@click.option("--resident", is_flag=True, help="Also time the fully resident model on the same tokens.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the numbers to this JSON file.")
@no_progress_option
def bench_command(model: Path | None, budget: str, policy: str, tokens: int, corpus: Path | None,
                  prefetch: bool, resident: bool, json_path: Path | None, no_progress: bool) -> None:
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
    r = decode_bench(model, cfg, corpus=corpus, progress=not no_progress)
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
