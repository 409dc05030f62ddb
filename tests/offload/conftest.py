"""Tiny checkpoints of several families, written with save_pretrained (transformers' own naming)."""

from __future__ import annotations

import warnings

import pytest
import torch

from moelab.models.tiny import tiny_model

# per-expert w1/w3/w2 (Mixtral), per-expert gate/up/down (Qwen3, DeepSeek-V3 with a dense layer),
# stacked and renamed (GraniteMoE), stacked transposed with biases (GPT-OSS), flat [E*I, H] (DBRX),
# block-level swap (JetMoE, Llama4)
FAMILIES = ["Mixtral", "Qwen3-MoE", "DeepSeek-V3", "GraniteMoE", "GPT-OSS", "DBRX", "JetMoE", "Llama4"]


def save_tiny(family: str, path, dtype=torch.float32, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model(family, dtype=dtype, **kw).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> a saved float32 tiny checkpoint directory (written once per session)."""
    root = tmp_path_factory.mktemp("offload")
    return {f: save_tiny(f, root / f.replace("-", "_")) for f in FAMILIES}
