"""``moelab trace``: the command records a trace; bad input is one `error:` line with exit code 2."""

from __future__ import annotations

import importlib

import numpy as np
from click.testing import CliRunner

import moelab.trace
from moelab.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(res) -> str:
    """The last line of the output: the one error line moelab prints."""
    assert "Traceback" not in res.output
    return res.output.strip().splitlines()[-1]


def test_trace_command_records_and_refuses_a_different_trace(model_dir, corpus_dir, tmp_path):
    out = tmp_path / "t"
    res = _run("trace", model_dir, "--corpus", corpus_dir, "--out", out, "--seq-len", 16, "--max-tokens", 100,
               "--batch-size", 3, "--act-max", "--hidden-norm", "--weights-dtype", "float16")
    assert res.exit_code == 0, res.output
    assert "traced 100 tokens x 2 MoE layers, labels code, drama, prose" in res.output
    t = moelab.trace.open(out)
    assert t.fields == ("act_max", "hidden_norm") and t.weights(0).dtype == np.float16
    assert t.manifest.identity["record"]["batch_size"] == 3
    again = _run("trace", model_dir, "--corpus", corpus_dir, "--out", out, "--seq-len", 16, "--max-tokens", 100,
                 "--batch-size", 3, "--act-max", "--hidden-norm", "--weights-dtype", "float16")
    assert again.exit_code == 0, again.output  # same identity: the complete trace is kept
    res = _run("trace", model_dir, "--corpus", corpus_dir, "--out", out, "--seq-len", 16, "--max-tokens", 50)
    assert res.exit_code == 2
    assert _error_line(res).startswith("error: out_dir")
    assert "record differs (batch_size, fields, max_tokens, weights_dtype); pass overwrite (--overwrite)" in res.output
    res = _run("trace", model_dir, "--corpus", corpus_dir, "--out", out, "--seq-len", 16, "--max-tokens", 50,
               "--overwrite")
    assert res.exit_code == 0 and moelab.trace.open(out).num_tokens == 50


def test_bad_corpus_and_model_are_one_line_errors(model_dir, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xc3\x28 no")
    res = _run("trace", model_dir, "--corpus", bad, "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert _error_line(res) == f"error: {bad}: not UTF-8 text (invalid byte 0xc3 at byte offset 3)"
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run("trace", model_dir, "--corpus", empty, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "is empty" in _error_line(res)
    no_tok = tmp_path / "model"
    no_tok.mkdir()
    for f in model_dir.iterdir():
        if f.name != "tokenizer.json":
            (no_tok / f.name).write_bytes(f.read_bytes())
    good = tmp_path / "good.txt"
    good.write_text("hello world", encoding="utf-8")
    res = _run("trace", no_tok, "--corpus", good, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "has no tokenizer" in _error_line(res)


def test_ctrl_c_says_how_to_resume_and_the_rerun_says_where_it_resumes(model_dir, corpus_dir, tmp_path,
                                                                     monkeypatch):
    rec = importlib.import_module("moelab.trace.record")  # the name moelab.trace.record is the function

    out = tmp_path / "t"
    args = ("trace", model_dir, "--corpus", corpus_dir, "--out", out, "--seq-len", 16, "--max-tokens", 96,
            "--shard-tokens", 32)
    real, calls = rec._record_sequences, {"n": 0}

    def ctrl_c_in_second_shard(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(rec, "_record_sequences", ctrl_c_in_second_shard)
    res = _run(*args)
    assert res.exit_code == 130, res.output
    assert "Aborted!" not in res.output and "Traceback" not in res.output
    assert _error_line(res) == (f"interrupted: 32 of 96 tokens are saved in complete shards in {out}; "
                                "rerun the same command to resume from the last complete shard")
    monkeypatch.setattr(rec, "_record_sequences", real)
    res = _run(*args)
    assert res.exit_code == 0, res.output
    assert f"resuming from 32 tokens (of 96) already recorded in {out}" in res.output
    assert moelab.trace.open(out).num_tokens == 96
    res = _run(*args)  # complete: nothing to resume
    assert res.exit_code == 0 and "resuming" not in res.output


def test_ctrl_c_before_recording_says_nothing_was_recorded(model_dir, corpus_dir, tmp_path, monkeypatch):
    rec = importlib.import_module("moelab.trace.record")  # the name moelab.trace.record is the function

    def ctrl_c(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(rec, "prepare_input", ctrl_c)
    res = _run("trace", model_dir, "--corpus", corpus_dir, "--out", tmp_path / "t")
    assert res.exit_code == 130 and "Aborted!" not in res.output
    assert _error_line(res) == "interrupted before any shard was recorded; rerun the same command to start"
