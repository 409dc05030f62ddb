"""Training configuration for moelab's small MoE language model, and its transformers model config.

The model is a stock ``Qwen3MoeForCausalLM`` (transformers): every layer sparse, ``num_experts``
SwiGLU experts with top-``top_k`` softmax routing (renormalised over the chosen k), grouped-query
attention with per-head RMS q/k-norm, RoPE, tied input/output embeddings.

Sizes are functions of a preset name (``PRESETS``) with field overrides; ``tiny`` is the debug size
used by the tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError

# fields that do not change what is trained, so a run may resume with other values for them
_RUN_ONLY_FIELDS = ("corpus", "checkpoint_every_s", "checkpoint_every_steps", "log_every", "eval_every", "threads")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that determines a training run.

    Attributes (model): hidden_size, num_layers, num_heads, num_kv_heads, expert_ffn (hidden width of
        one expert), num_experts, top_k, seq_len (tokens per row, also max positions).
    Attributes (optimisation): batch_size (rows per step), steps, lr (peak), min_lr_ratio (cosine floor
        as a fraction of lr), warmup_steps, weight_decay, grad_clip, aux_coef (load-balancing loss
        weight), z_coef (router z-loss weight), domain_weights (sampling share of code/drama/prose),
        seed.
    Attributes (run): corpus (folder with manifest and tokenizer), checkpoint_every_s / _steps (save
        when either is reached), log_every (steps per JSONL line), eval_every (steps per quick
        validation, 0 = off), threads (torch intra-op threads).
    """

    corpus: Path
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    expert_ffn: int = 256
    num_experts: int = 8
    top_k: int = 2
    seq_len: int = 256
    batch_size: int = 6
    steps: int = 12000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_coef: float = 0.02
    z_coef: float = 1e-3
    domain_weights: dict[str, float] = field(default_factory=lambda: {"code": 0.45, "drama": 0.4, "prose": 0.15})
    seed: int = 0
    checkpoint_every_s: float = 240.0
    checkpoint_every_steps: int = 0
    log_every: int = 10
    eval_every: int = 500
    threads: int = 1

    def __post_init__(self) -> None:
        self.corpus = Path(self.corpus)
        positive = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "expert_ffn", "num_experts",
                    "top_k", "seq_len", "batch_size", "steps", "log_every", "threads")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise MoelabError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise MoelabError(f"hidden_size: {self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise MoelabError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.top_k > self.num_experts:
            raise MoelabError(f"top_k: {self.top_k} exceeds num_experts={self.num_experts}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1):
            raise MoelabError(f"lr/min_lr_ratio: expected lr > 0 and 0 <= min_lr_ratio <= 1, got {self.lr}, {self.min_lr_ratio}")
        for name in ("warmup_steps", "checkpoint_every_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise MoelabError(f"{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("aux_coef", "z_coef", "weight_decay", "grad_clip", "checkpoint_every_s"):
            if getattr(self, name) < 0:
                raise MoelabError(f"{name}: expected >= 0, got {getattr(self, name)}")
        bad = set(self.domain_weights) - {"code", "drama", "prose"}
        if bad or not self.domain_weights or min(self.domain_weights.values()) < 0 or sum(self.domain_weights.values()) <= 0:
            raise MoelabError(f"domain_weights: expected non-negative weights for code/drama/prose, got {self.domain_weights}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["corpus"] = str(self.corpus)
        return d

    def fingerprint(self, corpus_sha256: str) -> dict[str, Any]:
        """The fields that decide what is trained, plus the corpus checksum: a resume must match them all."""
        d = {k: v for k, v in self.to_dict().items() if k not in _RUN_ONLY_FIELDS}
        d["corpus_sha256"] = corpus_sha256
        return d


def fingerprint_hash(fp: dict[str, Any]) -> str:
    """Short stable hash of a fingerprint dict."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, dict[str, Any]] = {
    # the shipped default model (see the model card for the run that produced it)
    "default": {},
    # debug size for tests: seconds per run
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, expert_ffn=32, num_experts=4,
                 top_k=2, seq_len=32, batch_size=4, steps=8, warmup_steps=2, log_every=1, eval_every=0,
                 checkpoint_every_s=0.0),
}


def make_config(preset: str = "default", **overrides: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from a preset name and field overrides (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise MoelabError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise MoelabError(f"config: unknown field(s) {', '.join(sorted(unknown))}")
    kw = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(**kw)


def hf_config(cfg: TrainConfig, vocab_size: int, eos_token_id: int):
    """The ``transformers.Qwen3MoeConfig`` of the model ``cfg`` trains (all layers sparse, tied embeddings)."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.expert_ffn * cfg.top_k,  # unused: no dense MLP layers (mlp_only_layers=[])
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.seq_len,
        moe_intermediate_size=cfg.expert_ffn,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=cfg.aux_coef,
        tie_word_embeddings=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        use_cache=True,
    )
