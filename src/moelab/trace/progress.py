"""A rich progress bar counting tokens, with tokens/s and ETA."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str = "tok") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"-- {self.unit}/s" if speed is None else f"{speed:,.{0 if self.unit == 'tok' else 2}f} {self.unit}/s")


@contextmanager
def token_progress(total: int, *, enabled: bool, label: str = "tracing",
                   unit: str = "tokens") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar on stderr when ``enabled``. ``unit``: what is counted
    (``"tokens"``, or e.g. ``"layers"``), shown beside the count and in the rate."""
    if not enabled:
        yield lambda n: None
        return
    short = {"tokens": "tok", "tensor groups": "groups"}.get(unit, unit)
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), _RateColumn(short),
               TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
