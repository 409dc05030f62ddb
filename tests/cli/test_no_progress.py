"""Every long command takes ``--no-progress``, and with it prints no progress bar."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from moelab.cli import main

LONG_COMMANDS = [["trace"], ["train"], ["prune"], ["merge"], ["eval"], ["demo"], ["perplexity"], ["export"],
                 ["report"]]


@pytest.mark.parametrize("command", LONG_COMMANDS, ids=lambda c: c[0])
def test_each_long_command_accepts_no_progress(command):
    # click parses every argument before it acts on --help: an unknown option fails with exit code 2
    res = CliRunner().invoke(main, [*command, "--no-progress", "--help"])
    assert res.exit_code == 0, res.output
    assert "--no-progress" in res.output


def test_eval_shows_its_bar_unless_no_progress(tiny_model_dir):
    args = ["eval", str(tiny_model_dir), "--tokens", "64", "--seq-len", "32"]
    shown = CliRunner().invoke(main, args)
    hidden = CliRunner().invoke(main, [*args, "--no-progress"])
    assert shown.exit_code == 0 and hidden.exit_code == 0, shown.output + hidden.output
    assert "evaluating" in shown.output and "tok/s" in shown.output
    assert "evaluating" not in hidden.output and "tok/s" not in hidden.output
    assert "perplexity" in hidden.output
