"""``moelab analyze`` and ``moelab report``: tables and pages on good input, one error line and exit 2
on bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from moelab.cli import main
from moelab.models.tiny import tiny_model


def _docs():
    rng = np.random.default_rng(0)
    docs = [rng.integers(n * 20, n * 20 + 20, 40).tolist() for n in range(3) for _ in range(4)]
    return docs, [lab for lab in ("code", "drama", "prose") for _ in range(4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model("Qwen3-MoE", dtype=torch.float32).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def traces(model_dir, tmp_path_factory):
    import moelab.trace

    docs, labels = _docs()
    full = tmp_path_factory.mktemp("full")
    moelab.trace.record(str(model_dir), docs, full, seq_len=32, act_max=True, labels=labels, progress=False)
    bare = tmp_path_factory.mktemp("bare")
    moelab.trace.record(str(model_dir), docs, bare, seq_len=32, progress=False)
    return {"full": full, "bare": bare}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "200"})


def assert_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_analyze_prints_the_headline_table(traces):
    result = run("analyze", traces["full"])
    assert result.exit_code == 0, result.output
    for header in ("layer", "CV", "SRP@16", "SCH@4", "LRU@4", "domain KL", "super"):
        assert header in result.output
    rows = [line for line in result.output.splitlines() if re.match(r"\s+[01]\s+8\s+2\s", line)]
    assert len(rows) == 2, result.output
    assert "note:" not in result.output


def test_analyze_bare_trace_notes_what_is_missing(traces):
    result = run("analyze", traces["bare"])
    assert result.exit_code == 0, result.output
    assert "moelab trace --act-max" in result.output
    assert "needs a label per token" in result.output


def test_analyze_selection(traces):
    result = run("analyze", traces["full"], "--layers", "1", "--label", "code", "--seg-len", "8")
    assert result.exit_code == 0, result.output
    assert "SRP@8" in result.output and "160 tokens, 1 MoE layers" in result.output
    rows = [line for line in result.output.splitlines() if re.match(r"\s+[01]\s+8\s+2\s", line)]
    assert [r.split()[0] for r in rows] == ["1"]


def test_analyze_bad_input(traces, tmp_path):
    assert_error(run("analyze", traces["full"], "--layers", "a,b"), "--layers: expected comma-separated")
    assert_error(run("analyze", traces["full"], "--layers", ","), "--layers: no layer given")
    assert_error(run("analyze", traces["full"], "--layers", "9"), "layer 9 is not an MoE layer")
    assert_error(run("analyze", traces["full"], "--label", "poetry"), "labels ['poetry'] are not in this trace")
    assert_error(run("analyze", traces["bare"], "--label", "code"), "has no labels")
    assert_error(run("analyze", tmp_path / "nope"), "does not exist")
    assert_error(run("analyze", tmp_path), "error:")  # a folder that is not a trace


def test_report_writes_a_page(traces, model_dir, tmp_path):
    out = tmp_path / "r.html"
    result = run("report", traces["full"], "--model", model_dir, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<h2>Super experts</h2>" in page
    assert "Δ loss" in page
    bare = tmp_path / "bare.html"
    assert run("report", traces["bare"], "-o", bare, "--max-layers", "1").exit_code == 0
    assert "Showing 1 of 2 layers" in bare.read_text()


def test_report_bad_input(traces, tmp_path):
    other = tmp_path / "other"
    tiny_model("Qwen3-MoE", dtype=torch.float32, seed=3).save_pretrained(other)
    assert_error(run("report", traces["full"], "--model", other, "-o", tmp_path / "r.html"),
                 "does not match the model")
    assert_error(run("report", traces["full"], "-o", tmp_path / "missing" / "r.html"), "does not exist")
    assert not (tmp_path / "r.html").exists()
