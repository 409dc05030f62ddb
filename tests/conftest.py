"""Fixtures shared across stages."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A float32 Qwen3-MoE (8 experts, top-2) saved with the embedded corpus' 4096-token tokenizer."""
    from moelab.compress.apply import save_compressed
    from moelab.compress.plan import Plan
    from moelab.data import default_corpus
    from moelab.models.tiny import tiny_model

    model = tiny_model("Qwen3-MoE", dtype=torch.float32, vocab_size=4096)
    return save_compressed(model, Plan("none", {}), tmp_path_factory.mktemp("m") / "tiny",
                           tokenizer_from=default_corpus())
