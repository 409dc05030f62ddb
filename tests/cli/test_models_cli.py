"""``moelab models`` and ``moelab inspect``: tables on good input, one error line and exit 2 on bad."""

import json

import pytest
import torch
from click.testing import CliRunner

from moelab.cli import main
from moelab.models import SUPPORTED_FAMILIES
from moelab.models.tiny import tiny_model


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv3")
    tiny_model("DeepSeek-V3").save_pretrained(path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"COLUMNS": "200"})


def assert_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_models_lists_every_family():
    result = run("models")
    assert result.exit_code == 0, result.output
    for family in SUPPORTED_FAMILIES:
        assert family in result.output


def test_inspect_table(deepseek_dir):
    result = run("inspect", deepseek_dir)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "DeepSeek-V3" in out and "model.layers.{layer}.mlp" in out
    assert "dense layers: 0" in out and "1 MoE block(s) in 2 layers" in out
    # the MoE row of layer 1: E=8, top-3, I=8, grouped sigmoid routing, a shared expert of width 8
    row = next(line for line in out.splitlines() if line.startswith("│     1 │"))
    assert [c.strip() for c in row.split("│")[1:5]] == ["1", "8", "3", "8"]
    assert "sigmoid" in row and "I=8" in row
    assert "routed experts 3.07 K" in out and "% in experts" in out


def test_inspect_without_path_uses_default_model(deepseek_dir, monkeypatch):
    import moelab.data

    monkeypatch.setattr(moelab.data, "default_model", lambda: deepseek_dir, raising=False)
    result = run("inspect")
    assert result.exit_code == 0, result.output
    assert "DeepSeek-V3" in result.output


def test_inspect_without_path_and_no_default_model(monkeypatch):
    import moelab.data

    monkeypatch.delattr(moelab.data, "default_model", raising=False)
    assert_error(run("inspect"), "give a PATH")


def test_inspect_nonexistent_path(tmp_path):
    assert_error(run("inspect", tmp_path / "missing"), "no such file or directory")


def test_inspect_directory_without_config(tmp_path):
    assert_error(run("inspect", tmp_path), "no config.json")


def test_inspect_pickle_checkpoint(deepseek_dir, tmp_path):
    (tmp_path / "config.json").write_text((deepseek_dir / "config.json").read_text())
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    assert_error(run("inspect", tmp_path), "pickle", "safetensors")


def test_inspect_dense_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    assert_error(run("inspect", tmp_path), "LlamaForCausalLM", "dense", "no MoE block")


def test_inspect_config_contradicting_weights(deepseek_dir, tmp_path):
    for f in deepseek_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_routed_experts"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_error(
        run("inspect", tmp_path),
        "contradicts the weights",
        "is [8, 16, 8] in the weights but config.json implies [4, 16, 8]",
    )


def test_inspect_reads_only_config_and_headers(deepseek_dir, monkeypatch):
    import transformers

    from moelab.offload.store import SafetensorsIndex

    want = run("inspect", deepseek_dir).output

    def refuse(*_a, **_k):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(SafetensorsIndex, "read", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr("os.preadv", refuse)
    result = run("inspect", deepseek_dir)
    assert result.exit_code == 0, result.output
    assert result.output == want
