"""``moelab trace``: record the routing of every MoE layer over a corpus (see :mod:`moelab.trace`)."""

from __future__ import annotations

from pathlib import Path

import click

from moelab.cli._options import (
    CORPUS_FORMATS,
    embedded_default,
    expert_budget_options,
    no_progress_option,
)
from moelab.cli.steer import steer_option


@click.command("trace")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--corpus", type=click.Path(exists=True, path_type=Path),
              help=f"{CORPUS_FORMATS} A `moelab data build` corpus gives its val split. "
                   "Default: the embedded corpus' val split.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Trace directory (Parquet shards + manifest.json); an interrupted run resumes in it.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Stop after this many tokens.")
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True,
              help="Tokens per packed sequence.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per forward.")
@click.option("--logits", is_flag=True, help="Also store the full router logits (float16, [E] per layer).")
@click.option("--expert-norms", is_flag=True, help="Also store the output L2 norm of each chosen expert.")
@click.option("--act-max", is_flag=True,
              help="Also store max |activation| at each chosen expert's down-projection input and output.")
@click.option("--hidden-norm", is_flag=True, help="Also store the norm of the hidden state entering each block.")
@click.option("--weights-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Dtype of the stored routing weights.")
@click.option("--shard-tokens", type=click.IntRange(min=1), default=1 << 16, show_default=True,
              help="About this many tokens per Parquet shard (whole sequences).")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Directory with tokenizer.json (default: MODEL).")
@click.option("--overwrite", is_flag=True, help="Replace a different trace already in --out.")
@steer_option
@expert_budget_options
@no_progress_option
def trace_command(model: Path | None, corpus: Path | None, out: Path, max_tokens: int | None, seq_len: int,
                  batch_size: int, logits: bool, expert_norms: bool, act_max: bool, hidden_norm: bool,
                  weights_dtype: str, shard_tokens: int, tokenizer: Path | None, overwrite: bool,
                  steer: Path | None, expert_budget: str | None, policy: str, no_progress: bool) -> None:
    """Record which experts every token chose, with their weights, in every MoE layer of MODEL
    (a checkpoint directory; default: the embedded model)."""
    from moelab.trace import TraceInterrupted, record

    model = model or embedded_default("default_model", "MODEL")
    corpus = corpus or embedded_default("default_corpus", "--corpus")

    def resuming(done: int, total: int) -> None:
        click.echo(f"resuming from {done:,} tokens (of {total:,}) already recorded in {out}", err=True)

    try:
        trace = record(str(model), corpus, out, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens,
                       logits=logits, expert_norms=expert_norms, act_max=act_max, hidden_norm=hidden_norm,
                       weights_dtype=weights_dtype, shard_tokens=shard_tokens, tokenizer=tokenizer,
                       overwrite=overwrite, progress=not no_progress, on_resume=resuming, steering=steer,
                       expert_budget=expert_budget, policy=policy)
    except TraceInterrupted as stop:
        click.echo(f"interrupted: {stop.tokens:,} of {stop.total:,} tokens are saved in complete shards in {out}; "
                   "rerun the same command to resume from the last complete shard", err=True)
        raise SystemExit(130) from None
    except KeyboardInterrupt:  # before recording began (reading the corpus, loading the model)
        click.echo("interrupted before any shard was recorded; rerun the same command to start", err=True)
        raise SystemExit(130) from None
    size = sum(p.stat().st_size for p in trace.shard_paths)
    labels = f", labels {', '.join(trace.label_names)}" if trace.label_names else ""
    click.echo(f"traced {trace.num_tokens:,} tokens x {len(trace.layers)} MoE layers{labels} -> {out} "
               f"({len(trace.shard_paths)} shards, {size / 1e6:.2f} MB)")


COMMANDS = [trace_command]
