"""``moelab demo`` on a tiny model saved with the embedded corpus' tokenizer (small token counts)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moelab.cli import main
from moelab.demo import DemoConfig
from moelab.errors import MoelabError

SMALL = ("--trace-tokens", 512, "--calib-tokens", 256, "--eval-tokens", 512)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "200"})


def test_demo_writes_the_report_checkpoints_and_summary(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    res = run("demo", tiny_model_dir, "--out", out, "--methods", "random,frequency", *SMALL, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and "frequency" in res.output
    summary = json.loads((out / "demo.json").read_text())
    assert summary["status"] == "complete"
    assert [r["method"] for r in summary["rows"]] == ["original", "random", "frequency"]
    original, pruned = summary["rows"][0], summary["rows"][2]
    assert (original["experts"], pruned["experts"]) == (8, 4) and pruned["params"] < original["params"]
    assert set(pruned["perplexity"]) == {"code", "drama", "prose"} and pruned["kl"]["code"] >= 0
    page = (out / "report.html").read_text()
    assert '<section id="compression">' in page and "<h2>Compression" in page
    assert page.count("data:image/png;base64,") >= 3 and "http://" not in page and "https://" not in page
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "frequency").config.num_experts == 4
    # a second run replaces the demo's own folder
    again = run("demo", tiny_model_dir, "--out", out, "--methods", "random", *SMALL, "--no-progress")
    assert again.exit_code == 0, again.output
    assert [r["method"] for r in json.loads((out / "demo.json").read_text())["rows"]] == ["original", "random"]


def test_demo_refuses_a_foreign_folder_and_bad_arguments(tiny_model_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    res = run("demo", tiny_model_dir, "--out", tmp_path / "mine", *SMALL)
    assert res.exit_code == 2 and "not written by `moelab demo`" in res.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(MoelabError, match="ratio"):
        DemoConfig(ratio=1.0)
    with pytest.raises(MoelabError, match="unknown"):
        DemoConfig(methods=("nope",))
