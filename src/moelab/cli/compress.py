"""``moelab prune``, ``moelab merge`` and ``moelab eval``: compress experts into a stock checkpoint and
measure it (see :mod:`moelab.compress`)."""

from __future__ import annotations

from pathlib import Path

import click

from moelab.cli._options import (
    CORPUS_FORMATS,
    LazyHelp,
    embedded_default,
    expert_budget_options,
    max_shard_size_option,
    no_progress_option,
    planner_list,
    shard_bytes,
)
from moelab.cli.steer import steer_option


def _compress_options(command: str):
    """Options shared by ``prune`` and ``merge``; ``--method`` lists the planners ``command`` runs."""
    model_dir = click.Path(exists=True, file_okay=False, path_type=Path)
    opts = [
        click.argument("model", required=False, type=model_dir),
        click.option("--method", required=True, metavar="NAME", cls=LazyHelp,
                     help_text=lambda: f"Planner, one of: {planner_list(command)}."),
        click.option("--ratio", required=True, type=float,
                     help="Share of routed experts to remove, in [0, 1) (0 keeps every expert)."),
        click.option("--budget", type=click.Choice(["layer", "global"]), default="layer", show_default=True,
                     help="'layer': the same share in every layer; 'global': rank experts of all layers "
                          "together (a stock checkpoint needs equal counts, so it must come out even)."),
        click.option("--calib", "calib", type=click.Path(exists=True, path_type=Path), default=None,
                     help=f"Calibration corpus. {CORPUS_FORMATS} A `moelab data build` corpus gives its "
                          "train split. Default: the embedded corpus."),
        click.option("--calib-tokens", type=click.IntRange(min=1), default=16384, show_default=True,
                     help="Calibration tokens."),
        click.option("--calib-label", default=None, help="Calibrate on one label (domain) only, e.g. code."),
        click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True,
                     help="Tokens per calibration sequence."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice."),
        click.option("--out", required=True, type=click.Path(path_type=Path),
                     help="Folder for the compressed checkpoint (written atomically)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing --out folder."),
        max_shard_size_option,
        expert_budget_options,
        no_progress_option,
    ]

    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def _run(kind: str, model: Path | None, method: str, ratio: float, budget: str, calib: Path | None,
         calib_tokens: int, calib_label: str | None, seq_len: int, seed: int, out: Path, overwrite: bool,
         max_shard_size: str, expert_budget: str | None, policy: str, no_progress: bool) -> None:
    from moelab.compress.pipeline import compress
    from moelab.compress.spec import CompressSpec

    spec = CompressSpec(ratio=ratio, budget=budget, seed=seed)
    model = model or embedded_default("default_model", "MODEL")
    res = compress(model, method, spec, kind=kind, out=out, overwrite=overwrite, calib_corpus=calib,
                   calib_tokens=calib_tokens, calib_label=calib_label, seq_len=seq_len,
                   progress=not no_progress, expert_budget=expert_budget, policy=policy,
                   max_shard_size=shard_bytes(max_shard_size))
    for note in res.warnings:
        click.echo(f"warning: {note}", err=True)
    info = res.plan.meta.get("apply", {})
    click.echo(f"{method}: {info.get('num_experts')} experts per MoE layer, top-{info.get('top_k')}, "
               f"{res.params_before:,} -> {res.params_after:,} parameters "
               f"({1 - res.params_after / res.params_before:.1%} fewer) -> {res.out} ({res.seconds:.1f} s)")
    masks = [o.neuron_mask for lp in res.plan.layers.values() for o in lp.experts if o.neuron_mask is not None]
    if masks:
        zeroed = sum(int((~m.bool()).sum()) for m in masks) / sum(m.numel() for m in masks)
        click.echo(f"{zeroed:.1%} of the masked experts' neurons are zeroed (stored as zeros: a stock config "
                   f"holds one expert width, so they do not shrink the checkpoint)")


@click.command("prune")
@_compress_options("prune")
def prune_command(**kwargs) -> None:
    """Remove experts from MODEL (default: the embedded model) and write a stock checkpoint to --out."""
    _run("prune", **kwargs)


@click.command("merge")
@_compress_options("merge")
def merge_command(**kwargs) -> None:
    """Merge experts of MODEL (default: the embedded model) and write a stock checkpoint to --out."""
    _run("merge", **kwargs)


@click.command("apply-plan")
@click.argument("plan", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder of the stock checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@max_shard_size_option
@expert_budget_options
@no_progress_option
def apply_plan_command(plan: Path, model: Path | None, out: Path, overwrite: bool, max_shard_size: str,
                       expert_budget: str | None, policy: str, no_progress: bool) -> None:
    """Apply the saved PLAN (the plan.json beside a compressed checkpoint) to MODEL (default: the
    embedded model) and write a stock checkpoint to --out, without calibrating."""
    from moelab.compress.pipeline import apply_saved_plan

    model = model or embedded_default("default_model", "MODEL")
    res = apply_saved_plan(model, plan, out, overwrite=overwrite, expert_budget=expert_budget, policy=policy,
                           progress=not no_progress, max_shard_size=shard_bytes(max_shard_size))
    for note in res.warnings:
        click.echo(f"warning: {note}", err=True)
    info = res.plan.meta.get("apply", {})
    click.echo(f"{res.plan.method} plan: {info.get('num_experts')} experts per MoE layer, top-{info.get('top_k')}, "
               f"{res.params_before:,} -> {res.params_after:,} parameters -> {res.out} ({res.seconds:.1f} s)")


@click.command("eval")
@click.argument("model", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--corpus", type=click.Path(exists=True, path_type=Path), default=None,
              help=f"{CORPUS_FORMATS} A `moelab data build` corpus gives its val split; any other corpus is "
                   "evaluated whole, per label. Default: the embedded corpus.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Reference model (e.g. the uncompressed one): adds KL(ref || model) and top-1 agreement.")
@click.option("--tokens", type=click.IntRange(min=2), default=32768, show_default=True,
              help="Tokens per domain (the first ones of its val split).")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Window length.")
@steer_option
@no_progress_option
def eval_command(model: Path | None, corpus: Path | None, reference: Path | None, tokens: int,
                 seq_len: int, steer: Path | None, no_progress: bool) -> None:
    """Perplexity per domain of MODEL (default: the embedded model) and, with --reference, the mean
    KL of next-token distributions and top-1 agreement with the reference."""
    from rich.console import Console
    from rich.table import Table

    from moelab.compress.evaluate import evaluate_path

    model = model or embedded_default("default_model", "MODEL")
    corpus = corpus or embedded_default("default_corpus", "--corpus")
    res = evaluate_path(model, corpus, reference_dir=reference, tokens=tokens, seq_len=seq_len,
                        progress=not no_progress, steer=steer)
    table = Table(title=f"{model} ({res.params:,} parameters)" + (f", steered by {steer}" if steer else ""))
    for col in ("domain", "tokens", "perplexity") + (("KL (nats)", "top-1 agree") if res.kl else ()):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for d in res.loss:
        row = [d, f"{res.tokens[d]:,}", f"{res.perplexity[d]:.3f}"]
        if res.kl:
            row += [f"{res.kl[d]:.4f}", f"{res.top1[d]:.1%}"]
        table.add_row(*row)
    Console().print(table)


COMMANDS = [prune_command, merge_command, apply_plan_command, eval_command]
