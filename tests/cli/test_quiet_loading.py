"""transformers' own loading bars ("Loading weights ...") never reach moelab's output."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from transformers.utils import logging as hf_logging

from moelab.cli import main


def _assert_no_bar(output: str) -> None:
    assert "Loading weights" not in output and "it/s" not in output, output


@pytest.fixture
def bars_on():
    """transformers' bars enabled (its default), whatever the environment says, so a leak would show."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    if not was:
        hf_logging.disable_progress_bar()


def test_inspect_and_perplexity_print_no_transformers_bar(tiny_model_dir, bars_on):
    res = CliRunner().invoke(main, ["inspect", str(tiny_model_dir)])
    assert res.exit_code == 0 and "MoE blocks" in res.output, res.output
    _assert_no_bar(res.output)
    res = CliRunner().invoke(main, ["perplexity", str(tiny_model_dir), "--tokens", "256", "--no-progress"])
    assert res.exit_code == 0 and "perplexity" in res.output, res.output
    _assert_no_bar(res.output)
    assert hf_logging.is_progress_bar_enabled()  # scoped to the loading: the user's setting is back
