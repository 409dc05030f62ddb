"""The ``moelab`` command line: a thin layer over library functions.

Each stage keeps its commands in its own module here (``cli/models.py``, ``cli/trace.py``, ...), which
defines click commands; they are registered on the group below. Library errors
(:class:`moelab.errors.MoelabError`) are printed as one message with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from moelab import __version__
from moelab.errors import MoelabError

# modules under moelab.cli whose `COMMANDS` list is added to the group, in help order
_COMMAND_MODULES: list[str] = [
    "moelab.cli.demo",
    "moelab.cli.models",
    "moelab.cli.data",
    "moelab.cli.train",
    "moelab.cli.trace",
    "moelab.cli.compress",
    "moelab.cli.quant",
    "moelab.cli.analysis",
    "moelab.cli.steer",
    "moelab.cli.generate",
    "moelab.cli.offload",
]


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoelabError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moelab")
def main() -> None:
    """moelab: build, open, trace, analyse and compress Mixture-of-Experts models."""


for _name in _COMMAND_MODULES:
    for _cmd in importlib.import_module(_name).COMMANDS:
        main.add_command(_cmd)
