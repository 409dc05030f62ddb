"""open_model on checkpoint directories: the good case and each kind of bad input."""

import json

import pytest
import torch

from moelab.errors import CheckpointError, MoelabError, UnsupportedModelError
from moelab.models import SUPPORTED_FAMILIES, open_model, reference_forward
from moelab.models.tiny import tiny_model


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    tiny_model("Mixtral").save_pretrained(path)
    return path


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_open_saved_directory_roundtrip(saved_dir):
    original = open_model(tiny_model("Mixtral"))
    view = open_model(saved_dir, dtype=torch.float64, experts_implementation="eager")
    assert view.family == "Mixtral" and len(view.blocks) == 2
    for a, b in zip(original.blocks, view.blocks, strict=True):
        assert torch.equal(a.down, b.down) and torch.equal(a.router_weight, b.router_weight)
    b = view.blocks[0]
    x = torch.randn(4, b.hidden_size, dtype=torch.float64)
    assert torch.allclose(reference_forward(b, x), b.module(x[None])[0], rtol=1e-6, atol=1e-9)


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        open_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        open_model(tmp_path)


def test_pickle_checkpoint_refused(saved_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((saved_dir / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickle.*safetensors"):
        open_model(d)
    with pytest.raises(CheckpointError, match="pickle"):
        open_model(d / "pytorch_model.bin")


def test_dense_model_has_no_moe_block():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*dense.*Mixtral"):
        open_model(LlamaForCausalLM(cfg))


def test_moe_family_with_only_dense_layers():
    model = tiny_model("Qwen3-MoE", mlp_only_layers=[0, 1])
    with pytest.raises(UnsupportedModelError, match="no MoE block"):
        open_model(model)


def test_unsupported_architecture_names_class_and_families():
    class Strange(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.Linear(2, 2)

    with pytest.raises(UnsupportedModelError) as err:
        open_model(Strange())
    assert "Strange" in str(err.value)
    assert all(name in str(err.value) for name in SUPPORTED_FAMILIES)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_local_experts", 3, r"gate_up_proj is \[4, 16, 16\].*implies \[3, 16, 16\]"),
        ("intermediate_size", 6, "down_proj"),
    ],
)
def test_config_contradicting_weights(saved_dir, tmp_path, field, value, match):
    d = _copy(saved_dir, tmp_path / "edited")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        open_model(d)


def test_loaded_model_contradicting_config():
    model = tiny_model("Mixtral")
    model.config.num_local_experts = 6
    with pytest.raises(CheckpointError, match="config says 6 experts but the weights hold 4"):
        open_model(model)


def test_bad_argument_type():
    with pytest.raises(MoelabError, match="expected a transformers model or a directory"):
        open_model(42)


@pytest.mark.parametrize("keep", [0.5, 0.999, 5 / 1e9])
def test_truncated_safetensors_is_named(saved_dir, tmp_path, keep):
    d = _copy(saved_dir, tmp_path / "truncated")
    weights = d / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(int(len(data) * keep), 5)])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt safetensors file"):
        open_model(d)


def test_corrupt_safetensors_header_is_named(saved_dir, tmp_path):
    d = _copy(saved_dir, tmp_path / "corrupt")
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # the header JSON no longer parses
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt.*header"):
        open_model(d)
