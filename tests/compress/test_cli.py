"""``moelab prune`` / ``merge`` / ``eval`` on a tiny model saved with the embedded corpus' tokenizer."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from moelab.cli import main
from moelab.compress.apply import save_compressed
from moelab.compress.plan import Plan
from moelab.models import open_model
from moelab.models.tiny import tiny_model


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "200"})


def assert_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


CALIB = ("--calib-tokens", 256, "--seq-len", 32)


def test_prune_reap_writes_a_stock_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    res = run("prune", tiny_model_dir, "--method", "reap", "--ratio", 0.5, "--calib-label", "code", *CALIB,
              "--out", out)
    assert res.exit_code == 0, res.output
    assert "reap: 4 experts per MoE layer, top-2" in res.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 4 and open_model(model).blocks[0].num_experts == 4
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "reap" and plan["meta"]["calibration"]["labels"] == ["code"]
    assert (out / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    again = run("prune", tiny_model_dir, "--method", "reap", "--ratio", 0.5, "--calib-label", "code", *CALIB,
                "--out", tmp_path / "again")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "plan.json").read_text())["layers"] == plan["layers"]  # seeded


def test_prune_refusals(tiny_model_dir, tmp_path):
    (tmp_path / "exists").mkdir()
    assert_error(run("prune", tiny_model_dir, "--method", "random", "--ratio", 0.5, "--out", tmp_path / "exists"),
                 "already exists", "--overwrite")
    assert_error(run("prune", tiny_model_dir, "--method", "random", "--ratio", 1.5, "--out", tmp_path / "o"),
                 "ratio", "[0, 1)")
    assert_error(run("prune", tiny_model_dir, "--method", "nope", "--ratio", 0.5, "--out", tmp_path / "o"),
                 "unknown planner 'nope'")
    assert_error(run("merge", tiny_model_dir, "--method", "reap", "--ratio", 0.5, "--out", tmp_path / "o"),
                 "'reap' is a prune method", "moelab prune")
    assert_error(run("prune", tiny_model_dir, "--method", "frequency", "--ratio", 0.5, "--calib-label", "poetry",
                     *CALIB, "--out", tmp_path / "o"), "calib label 'poetry'")
    assert not (tmp_path / "o").exists()


def test_prune_random_overwrite_and_clamp_warning(tiny_model_dir, tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    res = run("prune", tiny_model_dir, "--method", "random", "--ratio", 0.9, "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert "warning: random: top_k clamped from 2 to 1" in res.output
    assert json.loads((out / "config.json").read_text())["num_experts_per_tok"] == 1


def test_eval_table_with_reference(tiny_model_dir, tmp_path):
    out = tmp_path / "p"
    assert run("prune", tiny_model_dir, "--method", "random", "--ratio", 0.5, "--out", out).exit_code == 0
    res = run("eval", out, "--reference", tiny_model_dir, "--tokens", 64, "--seq-len", 32)
    assert res.exit_code == 0, res.output
    for needle in ("perplexity", "KL (nats)", "top-1 agree", "code", "drama", "prose"):
        assert needle in res.output
    plain = run("eval", tiny_model_dir, "--tokens", 64, "--seq-len", 32)
    assert plain.exit_code == 0 and "KL" not in plain.output


def test_eval_refuses_another_tokenizer(tmp_path):
    model = tiny_model("Qwen3-MoE", dtype=torch.float32)  # vocabulary of 64: the corpus ids go beyond
    path = save_compressed(model, Plan("none", {}), tmp_path / "small")
    assert_error(run("eval", path, "--tokens", 64, "--seq-len", 32), "vocabulary has 64 tokens",
                 "another tokenizer")


def test_compress_a_loaded_model_keeps_its_tokenizer(tiny_model_dir, tmp_path):
    from moelab.compress.pipeline import compress
    from moelab.compress.spec import CompressSpec
    from moelab.models import load_checkpoint

    model = load_checkpoint(tiny_model_dir)
    res = compress(model, "random", CompressSpec(ratio=0.5), kind="prune", out=tmp_path / "o")
    assert (res.out / "tokenizer.json").is_file() and res.params_after < res.params_before
    assert res.plan.meta["apply"]["num_experts"] == 4


def test_help_lists_every_planner_and_a_wrong_method_fails_before_loading(monkeypatch, tmp_path):
    import moelab.compress.pipeline as pipeline
    from moelab.compress.registry import PLANNERS, planners_for

    for command in ("prune", "merge"):
        res = run(command, "--help")
        assert res.exit_code == 0, res.output
        assert all(name in res.output for name in planners_for(command)), res.output
    assert set(planners_for("prune")) | set(planners_for("merge")) == set(PLANNERS)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was opened before the method was checked")

    monkeypatch.setattr(pipeline, "analysis_view", no_loading)
    model = tmp_path / "model"  # never read: the method is refused first
    model.mkdir()
    assert_error(run("prune", model, "--method", "reapp", "--ratio", 0.5, "--out", tmp_path / "o"),
                 "unknown planner 'reapp'", ", ".join(planners_for("prune")))
    assert_error(run("merge", model, "--method", "heapr", "--ratio", 0.5, "--out", tmp_path / "o"),
                 "'heapr' is an atomic method", "moelab prune", ", ".join(planners_for("merge")))


def test_eval_reads_every_corpus_trace_reads_and_refuses_the_same(tiny_model_dir, tmp_path):
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_text("".join(json.dumps({"text": "def f(x):\n    return x\n" * 20, "label": lab}) + "\n"
                              for lab in ("alpha", "beta")), encoding="utf-8")
    res = run("eval", tiny_model_dir, "--corpus", corpus, "--tokens", 64, "--seq-len", 32)
    assert res.exit_code == 0, res.output
    assert "alpha" in res.output and "beta" in res.output
    bad = tmp_path / "rows.csv"
    bad.write_text("text,label\nhello,x\n", encoding="utf-8")
    lines = []
    for args in (("eval", tiny_model_dir), ("trace", tiny_model_dir, "--out", tmp_path / "t")):
        res = run(*args, "--corpus", bad)
        assert_error(res, f"{bad}: unknown corpus format '.csv'", "a JSONL file (.jsonl)")
        lines.append(res.output.strip().splitlines()[-1])
    assert lines[0] == lines[1]
