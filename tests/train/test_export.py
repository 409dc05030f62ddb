"""``moelab export``: a plain transformers folder whose card numbers are re-measurable."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from moelab.cli import main
from moelab.errors import CheckpointError, MoelabError
from moelab.run.evaluate import evaluate_model_dir
from moelab.train.card import load_shift
from moelab.train.compare import plot_curves
from moelab.train.config import make_config
from moelab.train.export import export_model
from moelab.train.log import read_log
from moelab.train.loop import train


@pytest.fixture(scope="module")
def exported(tiny_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    train(make_config("tiny", corpus=tiny_corpus, steps=6), root / "run", progress=False)
    card = export_model(root / "run", root / "model", eval_tokens=2048)
    return root, card


def test_exported_folder_loads_with_plain_transformers(exported, tiny_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, card = exported
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tok = AutoTokenizer.from_pretrained(root / "model")
    assert model.config.model_type == "qwen3_moe" and model.config.num_experts == 4
    ids = tok("def f(x):\n    return x", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)
    assert {p.name for p in (root / "model").iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md", "card.json", "loss.png"}
    assert not list((root / "model").glob("*.bin")) and not list((root / "model").glob("*.pt"))


def test_card_numbers_are_reproduced_by_evaluation(exported, tiny_corpus):
    root, card = exported
    again = evaluate_model_dir(root / "model", tiny_corpus, tokens=2048)
    for domain, ppl in card["perplexity"].items():
        assert again.perplexity[domain] == pytest.approx(ppl, rel=1e-4)
    saved = json.loads((root / "model" / "card.json").read_text())
    assert saved["tokens_seen"] == 6 * 4 * 32 and saved["step"] == 6
    readme = (root / "model" / "README.md").read_text()
    for domain, ppl in card["perplexity"].items():
        assert f"| {domain} | {card['eval_tokens'][domain]:,} | {card['val_loss'][domain]:.4f} | {ppl:.2f} |" in readme
    for layers in card["load_by_domain"].values():
        assert len(layers) == 2 and all(sum(row) == pytest.approx(1.0) for row in layers)
    res = CliRunner().invoke(main, ["perplexity", str(root / "model"), "--corpus", str(tiny_corpus),
                                    "--tokens", "2048", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["perplexity"] == pytest.approx(card["perplexity"], rel=1e-4)


def test_load_shift_is_zero_for_identical_domains_and_one_for_disjoint():
    same = {"a": [[0.5, 0.5]], "b": [[0.5, 0.5]]}
    assert load_shift(same) == [{"a": 0.0, "b": 0.0}]
    disjoint = {"a": [[1.0, 0.0]], "b": [[0.0, 1.0]]}
    assert load_shift(disjoint) == [{"a": 0.5, "b": 0.5}]  # distance to the mean, half of a-b distance


def test_export_bad_input(tmp_path, tiny_corpus):
    with pytest.raises(CheckpointError, match="no config.json"):
        export_model(tmp_path, tmp_path / "out")
    with pytest.raises(CheckpointError, match="no config.json"):
        evaluate_model_dir(tmp_path, tiny_corpus)
    (tmp_path / "config.json").write_text("{}")
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickle"):
        evaluate_model_dir(tmp_path, tiny_corpus)
    (tmp_path / "config.json").unlink()
    (tmp_path / "pytorch_model.bin").unlink()
    assert not (tmp_path / "out").exists()
    torch.manual_seed(0)


@pytest.mark.parametrize(("preset", "model_type", "load_rows"), [("tiny-fine", "deepseek_v3", 1), ("tiny-dense", "qwen3", 0)])
def test_fine_and_dense_runs_export_with_their_card(preset, model_type, load_rows, tiny_corpus, tmp_path):
    train(make_config(preset, corpus=tiny_corpus, steps=3), tmp_path / "run", progress=False)
    card = export_model(tmp_path / "run", tmp_path / "model", eval_tokens=1024)
    assert card["model_type"] == model_type and card["name"] == {"tiny-fine": "fine", "tiny-dense": "dense"}[preset]
    assert all(len(layers) == load_rows for layers in card["load_by_domain"].values())
    again = evaluate_model_dir(tmp_path / "model", tiny_corpus, tokens=1024)
    assert again.perplexity == pytest.approx(card["perplexity"], rel=1e-4)
    readme = (tmp_path / "model" / "README.md").read_text()
    if load_rows:  # the MoE layers are named by their index in the model: layer 0 is dense
        assert "**Layer 1**" in readme and "**Layer 0**" not in readme and "sigmoid routing" in readme
        assert card["params"]["active_per_token"] < card["params"]["total"]
    else:
        assert "Expert load" not in readme and card["params"]["active_per_token"] == card["params"]["total"]


def test_comparison_rows_come_from_cards_and_fresh_evaluation(tiny_corpus, tmp_path):
    from moelab.train.compare import compare_models, markdown_table

    dirs = {}
    for name, preset, steps in (("fine", "tiny-fine", 3), ("dense", "tiny-dense", 3), ("coarse", "tiny", 2)):
        train(make_config(preset, corpus=tiny_corpus, steps=steps), tmp_path / name, progress=False)
        export_model(tmp_path / name, tmp_path / f"{name}-model", eval_tokens=1024)
        dirs[name] = tmp_path / f"{name}-model"
    rows = compare_models(dirs, tiny_corpus, tokens=1024)
    by = {r.name: r for r in rows}
    assert by["fine"].architecture == "DeepseekV3ForCausalLM" and by["dense"].dead_experts is None
    assert by["fine"].experts == 8 and 0 <= by["fine"].dead_experts <= 8  # 1 MoE layer x 8
    again = evaluate_model_dir(dirs["fine"], tiny_corpus, tokens=1024).perplexity
    assert by["fine"].perplexity == pytest.approx(again, rel=1e-3)
    # the coarse run saw fewer tokens than the other two: flagged, not compared silently
    assert (by["fine"].same_budget, by["dense"].same_budget, by["coarse"].same_budget) == (True, True, False)
    table = markdown_table(rows)
    assert "(other budget)" in table and table.count("\n") == 2 + len(rows)
    # the card carries the training curve: one point per logged step here (fewer than 100 logged)
    log = [r for r in read_log(tmp_path / "fine") if r["kind"] == "train"]
    assert by["fine"].curve["tokens"] == [r["tokens"] for r in log]
    assert by["fine"].curve["train_ce"] == pytest.approx([r["ce"] for r in log], abs=1e-4)
    assert plot_curves(rows, tmp_path / "curves.png").stat().st_size > 1000
    assert all(r.flops_per_token > 2 * (r.params_active - 4 * r.params_total // 100) for r in rows)
    with pytest.raises(MoelabError, match="no card.json"):
        compare_models({"x": tmp_path}, tiny_corpus)


def test_loss_curve_averages_logged_steps_into_at_most_the_points_asked(tmp_path):
    from moelab.train.log import append_log, loss_curve

    for step in range(1, 11):
        append_log(tmp_path, {"kind": "train", "step": step, "tokens": 100 * step, "ce": float(step)})
    append_log(tmp_path, {"kind": "eval", "step": 10, "tokens": 1000, "val_loss": {"code": 2.5}})
    curve = loss_curve(tmp_path, points=4)  # buckets of ceil(10/4) = 3 steps
    assert curve["tokens"] == [300, 600, 900, 1000] and curve["train_ce"] == [2.0, 5.0, 8.0, 10.0]
    assert curve["val"] == {"code": [[1000, 2.5]]}


def test_flops_per_token_is_the_hand_count_on_a_dense_model(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from moelab.train.compare import flops_per_token

    cfg = Qwen3Config(vocab_size=100, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    # per layer: q 16->32, k 16->16, v 16->16, o 32->16, gate/up 16->48, down 48->16; lm_head 16->100
    matmul = 2 * (16 * 32 + 16 * 16 + 16 * 16 + 32 * 16 + 3 * 16 * 48) + 16 * 100
    norms = 2 * (16 + 16 + 8 + 8) + 16  # per-element scales, counted as one FLOP pair each by the formula
    attention = 2 * 2 * 64 * 4 * (8 + 8)  # 2 layers, n_ctx 64, 4 heads, d_qk = d_v = 8
    active = sum(p.numel() for p in model.parameters())  # dense: every weight is active
    assert active == matmul + norms + 100 * 16  # + the input embedding, a lookup
    assert flops_per_token(tmp_path, active_params=active, n_ctx=64) == 2 * (matmul + norms) + attention
