"""Tiny random models and tokenizers for the trace tests (built from config classes, no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEXTS = {
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n",
    "drama": "ROMEO. But soft, what light through yonder window breaks?\nJULIET. Ay me!\n",
    "prose": "The quick brown fox jumps over the lazy dog. It was a bright cold day in April.\n",
}


def make_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE trained on TEXTS, saved as ``tokenizer.json`` (eos ``<|endoftext|>`` = id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(TEXTS.values()) * 4, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))


def tiny_qwen3_moe(seed: int = 0, layers: int = 2, experts: int = 8, top_k: int = 2, vocab: int = 320):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, eos_token_id=0,
        max_position_embeddings=256,
    )
    return Qwen3MoeForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny Qwen3-MoE (2 layers, 8 experts, top-2) with a tokenizer.json beside it."""
    folder = tmp_path_factory.mktemp("tiny_qwen3_moe")
    tiny_qwen3_moe().save_pretrained(folder)
    make_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder corpus: one file per label (code, drama, prose)."""
    folder = tmp_path_factory.mktemp("corpus")
    for name, text in TEXTS.items():
        (folder / f"{name}.txt").write_text(text * 6, encoding="utf-8")
    return folder


ALL_FIELDS = dict(logits=True, expert_norms=True, act_max=True, hidden_norm=True)


@pytest.fixture(scope="session")
def full_trace(model_dir, corpus_dir, tmp_path_factory):
    """A labelled trace with every optional field, in several shards (do not modify; copy it)."""
    import moelab.trace

    out = tmp_path_factory.mktemp("full_trace")
    return moelab.trace.record(str(model_dir), corpus_dir, out, seq_len=16, batch_size=4,
                               max_tokens=300, shard_tokens=64, progress=False, **ALL_FIELDS)


@pytest.fixture(scope="session")
def make_tiny():
    """The tiny Qwen3-MoE factory: ``make_tiny(seed=0, layers=2, experts=8, top_k=2, vocab=320)``."""
    return tiny_qwen3_moe
