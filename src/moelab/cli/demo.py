"""``moelab demo``: the main job on the embedded defaults, or on any supported model and corpus."""

from __future__ import annotations

from pathlib import Path

import click

from moelab.cli._options import (
    CORPUS_FORMATS,
    LazyHelp,
    no_progress_option,
    planner_list,
    stage_bar,
)


@click.command("demo")
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--corpus", type=click.Path(exists=True, path_type=Path), default=None,
              help=f"{CORPUS_FORMATS} Default: the embedded corpus.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("moelab-demo"), show_default=True,
              help="Output folder (an earlier demo's folder is replaced).")
@click.option("--methods", default=None, cls=LazyHelp, help_text=lambda: "Comma-separated compression "
              f"methods (default: frequency,reap,m-smoe; any of: {planner_list()}).")
@click.option("--ratio", type=float, default=0.5, show_default=True, help="Share of experts removed.")
@click.option("--trace-tokens", type=int, default=32768, show_default=True, help="Validation tokens traced.")
@click.option("--calib-tokens", type=int, default=8192, show_default=True, help="Calibration tokens per method.")
@click.option("--eval-tokens", type=int, default=16384, show_default=True,
              help="Validation tokens per domain for perplexity and KL.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of calibration sampling and planners.")
@no_progress_option
def demo_cmd(model: Path | None, corpus: Path | None, out: Path, methods: str | None, ratio: float,
             trace_tokens: int, calib_tokens: int, eval_tokens: int, seed: int, no_progress: bool) -> None:
    """Trace, analyse, compress three ways, evaluate, and write OUT/report.html."""
    from moelab.demo import DEFAULT_METHODS, DemoConfig, run_demo

    names = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else DEFAULT_METHODS
    cfg = DemoConfig(model=model, corpus=corpus, out=out, methods=names, ratio=ratio, trace_tokens=trace_tokens,
                     calib_tokens=calib_tokens, eval_tokens=eval_tokens, seed=seed)
    steps = 3 + 2 * len(cfg.methods)  # trace, evaluate original, (compress, evaluate) per method, report
    with stage_bar("demo", steps, enabled=not no_progress) as stage:
        result = run_demo(cfg, progress=stage)
    _print_summary(result)


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    labels = list(result.rows[0]["perplexity"])
    table = Table(title="validation perplexity per domain")
    table.add_column("method", no_wrap=True)  # never truncated: it says which row is which
    for name in ("experts", "params (M)", *[f"ppl {d}" for d in labels], "KL", "top-1"):
        table.add_column(name, justify="right")
    for r in result.rows:
        kl = "-" if not r["kl"] else f"{sum(r['kl'].values()) / len(r['kl']):.3f}"
        top1 = "-" if not r["top1"] else f"{sum(r['top1'].values()) / len(r['top1']):.3f}"
        table.add_row(r["method"], str(r["experts"]), f"{r['params'] / 1e6:.2f}",
                      *[f"{r['perplexity'][d]:.2f}" for d in labels], kl, top1)
    console = Console()
    console.print(table)
    console.print(f"report: {result.report.resolve()}  ({result.seconds:.0f} s)")


COMMANDS = [demo_cmd]
