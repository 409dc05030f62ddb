"""``moelab steer detect`` and ``--steer`` on ``eval`` and ``trace``: results on good input, one
named error line and exit 2 on bad input. Runs on the shipped fine model with few tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from moelab.cli import main
from moelab.data import default_corpus, default_model


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small labelled JSONL: a few documents of the shipped corpus' drama and code val splits."""
    from moelab.data.texts import read_corpus

    docs = read_corpus(default_corpus(), "val")
    keep = [d for lab in ("drama", "code") for d in [x for x in docs if x.label == lab][:6]]
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    path.write_text("".join(json.dumps({"text": d.text[:3000], "label": d.label}) + "\n" for d in keep))
    return path


@pytest.fixture(scope="module")
def steer_file(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("steer") / "steer.json"
    res = _run("steer", "detect", "--positive", f"{corpus}:drama", "--negative", f"{corpus}:code", "--tokens", 512,
               "--seq-len", 128, "--top", 4, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    return out, res.output


def test_detect_prints_the_ranking_and_writes_the_file(steer_file):
    out, output = steer_file
    assert "risk" in output and "wrote" in output and "off 4 experts" in output
    doc = json.loads(out.read_text())
    assert doc["edits"][0]["mode"] == "off"
    assert sum(len(v) for v in doc["edits"][0]["experts"].values()) == 4
    assert doc["made"]["method"] == "risk-diff" and doc["made"]["positive"].endswith(":drama")
    assert doc["ranking"][0]["score"] >= doc["ranking"][-1]["score"]


def test_rice_with_markers(tmp_path, corpus):
    out = tmp_path / "rice.json"
    res = _run("steer", "detect", "--positive", f"{corpus}:drama", "--negative", f"{corpus}:code", "--method", "rice",
               "--markers", "ROMEO", "--markers", "JULIET", "--markers", "thou", "--tokens", 512,
               "--seq-len", 128, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["edits"][0]["mode"] == "scale" and doc["edits"][0]["strength"] == 2.0
    assert all(len(v) <= 2 for v in doc["edits"][0]["experts"].values())


def test_eval_and_trace_accept_steer(steer_file, tmp_path):
    out, _ = steer_file
    res = _run("eval", "--tokens", 512, "--seq-len", 128, "--steer", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "steered by" in " ".join(res.output.split())  # rich wraps the title at the path's length
    trace_dir = tmp_path / "t"
    res = _run("trace", "--out", trace_dir, "--max-tokens", 256, "--seq-len", 128, "--steer", out, "--no-progress")
    assert res.exit_code == 0, res.output
    import moelab.trace

    trace = moelab.trace.open(trace_dir)
    off = json.loads(out.read_text())["edits"][0]["experts"]
    for layer, experts in off.items():
        assert not np.isin(trace.ids(int(layer)), experts).any(), layer
    assert trace.manifest.identity["record"]["steering"]["edits"][0]["mode"] == "off"


def test_bad_input_is_one_named_line(steer_file, tmp_path):
    out, _ = steer_file
    res = _run("eval", default_model("coarse"), "--tokens", 256, "--steer", out, "--no-progress")
    assert res.exit_code == 2 and "was written for another model" in res.output and str(out) in res.output
    doc = json.loads(out.read_text())
    doc["edits"][0]["experts"] = {"1": [40]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    res = _run("trace", "--out", tmp_path / "t", "--max-tokens", 64, "--steer", bad, "--no-progress")
    assert res.exit_code == 2 and "expert ids [40] must be distinct and in [0, 32)" in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    res = _run("steer", "detect", "--positive", empty, "--negative", "code", "--out", tmp_path / "x.json")
    assert res.exit_code == 2 and res.output.startswith("error: positive: ") and "empty" in res.output
    res = _run("steer", "detect", "--positive", "poetry", "--negative", "code", "--out", tmp_path / "x.json")
    assert res.exit_code == 2 and "--positive 'poetry'" in res.output
    other = tmp_path / "corpus"
    other.mkdir()
    (other / "a.txt").write_text("some text " * 50)
    (other / "tokenizer.json").write_text((default_model("coarse") / "tokenizer.json").read_text() + " ")
    res = _run("steer", "detect", "--positive", other, "--negative", "code", "--out", tmp_path / "x.json")
    assert res.exit_code == 2 and "tokenised for another model" in res.output, res.output
    res = _run("steer", "detect", "--positive", f"{default_corpus()}:poetry", "--negative", "code",
               "--out", tmp_path / "x.json")
    assert res.exit_code == 2 and "poetry" in res.output


def test_select_log_odds_and_greedy(tmp_path, corpus):
    out = tmp_path / "lo.json"
    res = _run("steer", "detect", "--positive", f"{corpus}:drama", "--negative", f"{corpus}:code", "--tokens", 512,
               "--seq-len", 128, "--top", 4, "--select", "log-odds", "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert "select log-odds" in " ".join(res.output.split()) and doc["made"]["select"] == "log-odds"
    assert sum(len(v) for v in doc["edits"][0]["experts"].values()) == 4
    assert doc["ranking"][0]["score"] >= doc["ranking"][-1]["score"]
    out = tmp_path / "greedy.json"
    res = _run("steer", "detect", "--positive", f"{corpus}:drama", "--negative", f"{corpus}:code", "--tokens", 512,
               "--seq-len", 128, "--top", 2, "--select", "greedy", "--budget", 1.5, "--calib-tokens", 256,
               "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    g = doc["made"]["greedy"]
    assert g["stopped"] == "max_experts" and len(g["steps"]) == 2 and g["config"]["calibration_seed"] == 1
    assert g["steps"][-1]["ratio_neg"] <= 1.5 and g["steps"][-1]["ratio_pos"] > 1
    assert {(s["layer"], s["expert"]) for s in g["steps"]} == {
        (int(layer), e) for layer, v in doc["edits"][0]["experts"].items() for e in v}
    assert "greedy: 2 experts" in res.output


@pytest.mark.parametrize("extra, message", [
    (["--select", "log-odds", "--method", "rice", "--markers", "thou"], "--select log-odds: re-ranks"),
    (["--select", "greedy", "--mode", "on"], "--select greedy: measures experts switched off"),
    (["--budget", "1.05"], "--budget: only --select greedy uses it"),
    (["--calib-tokens", "64"], "--calib-tokens: only --select greedy uses it"),
    (["--select", "greedy", "--budget", "0.5"], "budget: expected a perplexity ratio >= 1"),
    (["--select", "best"], "Invalid value for '--select'"),
])
def test_select_bad_combinations_are_named(tmp_path, corpus, extra, message):
    res = _run("steer", "detect", "--positive", f"{corpus}:drama", "--negative", f"{corpus}:code", "--tokens", 256,
               "--seq-len", 128, *extra, "--out", tmp_path / "x.json", "--no-progress")
    assert res.exit_code == 2 and message in res.output, res.output
