"""``moelab analyze`` (the headline table of a trace) and ``moelab report`` (the HTML page)."""

from __future__ import annotations

from pathlib import Path

import click

from moelab.cli._options import no_progress_option, stage_bar
from moelab.cli.steer import steer_option
from moelab.errors import MoelabError

_TRACE = click.argument("trace_dir", metavar="TRACE",
                        type=click.Path(exists=True, file_okay=False, path_type=Path))
_LAYERS = click.option("--layers", default=None, metavar="L1,L2,...",
                       help="Only these MoE layers (decoder-layer indices, comma-separated).")
_LABEL = click.option("--label", "labels", multiple=True,
                      help="Only the tokens of this label (domain); repeat for several.")


def _parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MoelabError(f"--layers: expected comma-separated layer indices such as 0,3, got {text!r}") from None
    if not layers:
        raise MoelabError("--layers: no layer given (expected e.g. --layers 0,3)")
    return layers


def _open(trace_dir: Path, layers: str | None, labels: tuple[str, ...]):
    import moelab.trace

    trace = moelab.trace.open(trace_dir)
    chosen = _parse_layers(layers)
    if chosen is not None or labels:
        trace = trace.select(layers=chosen, labels=list(labels) or None)
    if trace.num_tokens == 0:
        raise MoelabError(f"{trace_dir}: the selection has no tokens (labels {list(labels)})")
    return trace


@click.command("analyze")
@_TRACE
@_LAYERS
@_LABEL
@click.option("--seg-len", type=click.IntRange(min=1), default=16, show_default=True,
              help="Window length (tokens) of SRP and the look-ahead of SCH.")
@click.option("--cache-factor", type=click.IntRange(min=1), default=2, show_default=True,
              help="SCH and LRU are read at a cache of this many times top-k experts.")
def analyze(trace_dir: Path, layers: str | None, labels: tuple[str, ...], seg_len: int, cache_factor: int) -> None:
    """Print the headline table of the routing trace TRACE (a `moelab trace` directory)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from moelab.analysis.headline import headline
    from moelab.report.headline_table import headline_table, missing_notes
    from moelab.report.html import format_cell

    trace = _open(trace_dir, layers, labels)
    h = headline(trace, seg_len=seg_len, cache_factor=cache_factor)
    headers, rows, legend = headline_table(h)
    cells = [[format_cell(v, 3)[0] for v in row] for row in rows]
    console = Console()
    title = f"{trace_dir.name}: {trace.num_tokens:,} tokens, {len(trace.layers)} MoE layers"
    # one table on a wide terminal; on a narrow one: load, locality, structure apart
    groups = [list(range(len(headers)))]
    if console.width < 150:
        groups = [list(range(9)), [0, 9, 10, 11], [0, *range(12, len(headers))]]
    for n, cols in enumerate(groups):
        table = Table(title=title if n == 0 else None, box=box.SIMPLE_HEAD, padding=(0, 1))
        for c in cols:
            table.add_column(headers[c], justify="right", no_wrap=True)
        for row in cells:
            table.add_row(*(row[c] for c in cols))
        console.print(table)
    if h.super_experts is not None and len(h.super_experts.layer_S):
        se = h.super_experts
        pairs = ", ".join(f"L{la}/E{e}" for la, e in zip(se.layer_S.tolist(), se.expert_S.tolist(), strict=True))
        console.print(f"super experts (largest first): {pairs}")
    for key, text in legend:
        console.print(f"[bold]{key}[/bold]: {text}", highlight=False)
    for note in missing_notes(trace):
        console.print(f"note: {note}", highlight=False)


@click.command("report")
@_TRACE
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The HTML file to write (self-contained: open it offline in any browser).")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The traced model's directory: adds the loss with each super expert zeroed.")
@_LAYERS
@_LABEL
@click.option("--max-layers", type=click.IntRange(min=1), default=8, show_default=True,
              help="Per-layer figures show at most this many layers, evenly spaced.")
@click.option("--loss-tokens", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Traced tokens used to measure the loss effect of zeroing a super expert.")
@steer_option
@click.option("--corpus", type=click.Path(exists=True, path_type=Path), default=None,
              help="With --steer: the corpus whose validation text measures perplexity with and without "
                   "steering (default: the embedded corpus).")
@no_progress_option
def report(trace_dir: Path, out: Path, model: Path | None, layers: str | None, labels: tuple[str, ...],
           max_layers: int, loss_tokens: int, steer: Path | None, corpus: Path | None, no_progress: bool) -> None:
    """Write the HTML report of the routing trace TRACE: summary table, load and co-activation
    heatmaps, SRP/SCH curves, specialisation, super and dead experts."""
    from moelab.report import build_report, write_report
    from moelab.report.build import REPORT_STAGES

    trace = _open(trace_dir, layers, labels)
    extra = [] if steer is None else [_steering(steer, model, corpus, no_progress)]
    with stage_bar("report", len(REPORT_STAGES), enabled=not no_progress) as stage:
        page = build_report(trace, model=None if model is None else str(model), max_layers=max_layers,
                            loss_tokens=loss_tokens, progress=stage, extra_sections=extra)
    path = write_report(page, out)
    click.echo(f"wrote {path} ({len(page.encode()) / 1e6:.2f} MB)")


def _steering(steer: Path, model: Path | None, corpus: Path | None, no_progress: bool):
    """The report's steering section: the file's ranking, and perplexity with and without it."""
    from moelab.compress.evaluate import evaluate_path
    from moelab.data import default_corpus
    from moelab.models import open_model
    from moelab.report.steering import steering_section
    from moelab.steer import load_steering

    if model is None:
        raise MoelabError("--steer: needs --model (the steering file is checked against the model it was made for)")
    view = open_model(model)
    spec = load_steering(steer, view)
    corpus = corpus or default_corpus()
    ppl = {key: evaluate_path(model, corpus, steer=file, progress=not no_progress).perplexity
           for key, file in (("without", None), ("with", steer))}
    return steering_section(spec, [b.layer for b in view.blocks], max(b.num_experts for b in view.blocks), ppl)


COMMANDS = [analyze, report]
