"""``moelab train``, ``moelab perplexity`` and ``moelab export``: the default model's life cycle."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import click

from moelab.cli._options import into_package_option, no_progress_option, output_dir
from moelab.data import ASSETS
from moelab.train.config import PRESETS


def _corpus_default() -> Path:
    return ASSETS / "corpus"


@click.command("train")
@click.option("--out", "run_dir", type=click.Path(path_type=Path), default=Path("runs/default"), show_default=True,
              help="Run folder: checkpoint/, train.jsonl, loss.png. An existing checkpoint there is resumed.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="default", show_default=True,
              help="Model and schedule: 'fine' (DeepSeek-V3, fine-grained + shared expert), 'coarse' "
                   "(Qwen3-MoE, 8 experts), 'dense' (Qwen3) at one token budget; 'default' is the "
                   "shipped Qwen3-MoE recipe; 'tiny', 'tiny-fine', 'tiny-dense' are seconds-long debug sizes.")
@click.option("--corpus", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Corpus folder (default: the shipped corpus).")
@click.option("--steps", type=int, default=None, help="Total optimizer steps (sets the cosine schedule).")
@click.option("--stop-at", type=int, default=None, help="Stop (with a checkpoint) after this many steps.")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--batch-size", type=int, default=None, help="Rows of --seq-len tokens per step.")
@click.option("--seq-len", type=int, default=None, help="Tokens per row.")
@click.option("--hidden-size", type=int, default=None, help="Model width.")
@click.option("--num-experts", type=int, default=None, help="Experts per MoE layer.")
@click.option("--aux-coef", type=float, default=None, help="Weight of the load-balancing loss.")
@click.option("--z-coef", type=float, default=None, help="Weight of the router z-loss.")
@click.option("--bias-rate", type=float, default=None,
              help="Step of the aux-loss-free correction-bias update (DeepSeek-V3 presets).")
@click.option("--seed", type=int, default=None, help="Seed of initialisation and batch sampling.")
@click.option("--threads", type=int, default=None, help="torch intra-op threads (default 1).")
@click.option("--checkpoint-every-s", type=float, default=None, help="Seconds between checkpoints.")
@click.option("--ternary-experts", is_flag=True, default=None,
              help="Train the routed experts ternary (MoTE: {-1,0,1} x scale through a straight-through "
                   "estimator); the export holds the ternary weights.")
@click.option("--experts-implementation", type=click.Choice(["transformers", "moelab"]), default=None,
              help="Experts kernel: the model's default (transformers) or moelab's experts backend.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Start from this model folder's weights (same preset shapes), e.g. a shipped model.")
@no_progress_option
def train_cmd(run_dir: Path, preset: str, corpus: Path | None, stop_at: int | None, no_progress: bool,
              **overrides) -> None:
    """Train (or resume) one of moelab's small language models on the corpus."""
    from moelab.train.config import make_config
    from moelab.train.loop import train

    cfg = make_config(preset, corpus=corpus or _corpus_default(), **overrides)

    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:  # the loop finishes its step, checkpoints and returns when a signal arrives
        result = train(cfg, run_dir, stop_at=stop_at, progress=not no_progress, should_stop=stop.is_set)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if result.interrupted:
        click.echo(f"interrupted at step {result.state.step}; checkpoint saved in {run_dir / 'checkpoint'}; "
                   "rerun the same command to resume", err=True)
        raise SystemExit(130)
    s = result.state
    click.echo(f"step {s.step}/{cfg.steps}, {s.tokens:,} tokens, {s.elapsed_s / 60:.1f} min; "
               f"checkpoint in {run_dir / 'checkpoint'}")


@click.command("perplexity")
@click.argument("model_dir", type=click.Path(path_type=Path), required=False)
@click.option("--corpus", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Corpus folder (default: the shipped corpus).")
@click.option("--tokens", type=int, default=None, help="Validation tokens per domain (default 32768).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@no_progress_option
def perplexity_cmd(model_dir: Path | None, corpus: Path | None, tokens: int | None, as_json: bool,
                   no_progress: bool) -> None:
    """Per-domain validation perplexity of a saved model (default: the shipped default model)."""
    from moelab.data import default_model
    from moelab.run.evaluate import EVAL_TOKENS, evaluate_model_dir

    res = evaluate_model_dir(model_dir or default_model(), corpus or _corpus_default(), tokens or EVAL_TOKENS,
                             progress=not no_progress)
    if as_json:
        click.echo(json.dumps({"perplexity": res.perplexity, "loss": res.loss, "tokens": res.tokens}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("domain", "tokens", "loss (nats)", "perplexity")
    for d, v in res.perplexity.items():
        table.add_row(d, f"{res.tokens[d]:,}", f"{res.loss[d]:.4f}", f"{v:.2f}")
    Console().print(table)


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Model folder to write (replaced atomically).")
@into_package_option("model of the run's architecture (assets/models/NAME, NAME = fine, coarse or dense)")
@click.option("--command", "reproduce", default=None,
              help="The training command to name in the model card (default: derived from the run's config).")
@no_progress_option
def export_cmd(run_dir: Path, out_dir: Path | None, into_package: bool, reproduce: str | None,
               no_progress: bool) -> None:
    """Export a run's checkpoint as a transformers model folder with tokenizer and model card."""
    from moelab.train.export import export_model, load_run_config

    # the run's config names the shipped model it would replace; read it only when that is asked for
    shipped = ASSETS / "models" / load_run_config(run_dir).model_name if into_package else ASSETS / "models"
    out_dir = output_dir(out_dir, into_package, shipped, "model")
    card = export_model(run_dir, out_dir, reproduce=reproduce, progress=not no_progress)
    click.echo(f"wrote {out_dir}")
    for d, v in card["perplexity"].items():
        click.echo(f"  {d:6s} val perplexity {v:.2f}")


COMMANDS = [train_cmd, perplexity_cmd, export_cmd]
