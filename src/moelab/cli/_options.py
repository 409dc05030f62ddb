"""Options and checks that several ``moelab`` commands share, so that each is written once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from moelab.errors import MoelabError

# what every --corpus / --calib accepts: one reader (moelab.data.read_corpus) behind all of them
CORPUS_FORMATS = ("Text file (.txt), folder of text files (file/subfolder name = label), JSONL (.jsonl) with "
                  "'text' and optional 'label', or a `moelab data build` corpus.")

# the installed package: the shipped corpus and model live under it, and a stray --out must not
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def embedded_default(name: str, what: str) -> Path:
    """``moelab.<name>()`` (``default_model`` / ``default_corpus``): the embedded default, or an error
    naming the argument ``what`` to give instead."""
    import moelab

    try:
        return Path(getattr(moelab, name)())
    except (MoelabError, AttributeError, ImportError) as err:
        raise MoelabError(f"{what} is required: there is no embedded default ({err})") from None


def into_package_option(what: str):
    """``--into-package``: the explicit consent to replace the ``what`` shipped inside moelab."""
    return click.option("--into-package", is_flag=True,
                        help=f"Replace the {what} shipped inside the installed moelab package "
                             "(instead of giving --out).")


def output_dir(out: Path | None, into_package: bool, shipped: Path, what: str) -> Path:
    """Where a command that can regenerate a shipped asset writes: ``--out``, or ``shipped`` with
    ``--into-package``. Writing into the installed package without the flag is refused, because
    a later ``pip install`` (or every other user of this environment) silently gets the new files."""
    if into_package:
        if out is not None and out.resolve() != shipped.resolve():
            raise MoelabError(f"--out {out} and --into-package: give one (--into-package writes {shipped})")
        return shipped
    if out is None:
        raise MoelabError(f"--out is required: the folder to write the {what} to (or pass --into-package "
                          f"to replace the {what} shipped in {shipped})")
    resolved = out.resolve()
    if resolved == PACKAGE_DIR or PACKAGE_DIR in resolved.parents:
        raise MoelabError(f"--out {out} lies inside the installed moelab package ({PACKAGE_DIR}); pass "
                          f"--into-package to replace the shipped {what}, or choose a folder outside it")
    return out


class LazyHelp(click.Option):
    """An option whose help text is built only when help is shown: the text may need an import (the
    planner registry pulls in torch) that every other use of the command line should not pay for."""

    def __init__(self, *args, help_text: Callable[[], str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._help_text = help_text

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = self._help_text()
        return super().get_help_record(ctx)


def planner_list(command: str | None = None) -> str:
    """The planners ``moelab <command>`` runs (every planner when None), comma-separated."""
    from moelab.compress.registry import planners, planners_for

    return ", ".join(planners_for(command) if command is not None else planners())


def no_progress_option(f):
    """``--no-progress``: one spelling, one help text, on every command that shows a progress bar."""
    return click.option("--no-progress", is_flag=True,
                        help="Hide the progress bar (e.g. when the output goes to a log).")(f)


@contextmanager
def stage_bar(label: str, steps: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar (stderr) over ``steps`` named stages; yields ``stage(name)``, called as each
    stage starts (the library's ``progress`` callbacks), and fills the bar when the block ends."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn()]
    with Progress(*columns, disable=not enabled, console=Console(stderr=True)) as bar:
        task = bar.add_task("starting", total=steps)
        seen: list[str] = []

        def stage(name: str) -> None:
            if seen:
                bar.advance(task)
            seen.append(name)
            bar.update(task, description=name)

        yield stage
        bar.update(task, completed=steps, description="done")


def expert_budget_options(f):
    """``--expert-budget SIZE`` and ``--policy NAME``: open the checkpoint with its experts offloaded
    (see :mod:`moelab.offload.outofcore`), for a model whose experts do not fit in memory."""
    f = click.option("--policy", default="lru", show_default=True,
                     help="Expert cache policy with --expert-budget (lru, lfu, lrfu, activation).")(f)
    return click.option("--expert-budget", default=None, metavar="SIZE",
                        help="Offload the experts: read them from the checkpoint by offset into a cache of "
                             "at most SIZE bytes (e.g. 2GiB, 25%), so a model whose experts exceed memory "
                             "runs; non-expert weights stay resident.")(f)


def predictor_option(f):
    """``--predictor FILE``: a predictor file for ``--policy predictive``."""
    return click.option("--predictor", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="With --policy predictive: a predictor file from `moelab offload train-predictor`.")(f)


def check_predictor_option(path: Path | None, policy: str, *, required: bool) -> None:
    """An error naming the option when ``--predictor`` is given without ``--policy predictive`` or,
    if ``required``, ``--policy predictive`` comes without it."""
    if path is None and required and policy == "predictive":
        raise MoelabError("--policy predictive needs --predictor FILE (write one with "
                          "`moelab offload train-predictor [MODEL] --out FILE`)")
    if path is not None and policy != "predictive":
        raise MoelabError(f"--predictor is used by --policy predictive only (got --policy {policy})")


def max_shard_size_option(f):
    """``--max-shard-size SIZE``: the largest safetensors file of a written checkpoint."""
    return click.option("--max-shard-size", default="50GB", show_default=True, metavar="SIZE",
                        help="Largest safetensors file written (e.g. 5GB, 500MiB); a bigger checkpoint is "
                             "sharded with model.safetensors.index.json, as save_pretrained does.")(f)


def shard_bytes(text: str) -> int:
    """``--max-shard-size`` in bytes; an error names the option."""
    from moelab.models.writer import parse_size

    return parse_size(text, "--max-shard-size")
