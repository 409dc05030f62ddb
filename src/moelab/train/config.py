"""Training configuration for moelab's small language models, and their transformers model configs.

Three stock transformers architectures (``arch``), all with SwiGLU FFNs, RoPE and tied embeddings:

- ``qwen3_moe`` (the *coarse* model, and the ``default`` preset): ``Qwen3MoeForCausalLM``, every
  layer sparse, ``num_experts`` experts with top-``top_k`` softmax routing renormalised over the
  chosen k; grouped-query attention with per-head RMS q/k-norm.
- ``deepseek_v3`` (the *fine-grained* model): ``DeepseekV3ForCausalLM``. DeepSeekMoE's two ideas
  (Dai et al. 2024, arXiv:2401.06066): fine-grained expert segmentation (many narrow experts, more
  of them per token) and shared-expert isolation (``shared_experts`` always-on experts of width
  ``expert_ffn``); DeepSeek-V3's routing (arXiv:2412.19437): sigmoid scores, top-k selection on
  score + ``e_score_correction_bias``, weights renormalised over the chosen k; the first
  ``dense_layers`` layers dense. The bias is updated after each optimizer step by the
  auxiliary-loss-free rule with rate ``bias_rate`` (transformers keeps the buffer but never updates
  it); ``aux_coef`` weighs DeepSeek-V3's sequence-wise balance loss. Multi-head latent attention
  (MLA, which the architecture requires) with ``kv_lora_rank = hidden_size // 2``, no query
  compression, and each head's dimension split half/half between its RoPE and non-RoPE parts.
- ``qwen3`` (the *dense* twin): ``Qwen3ForCausalLM`` with FFN width ``dense_ffn``; no experts.

Sizes are functions of a preset name (``PRESETS``) with field overrides; ``tiny``, ``tiny-fine`` and
``tiny-dense`` are the debug sizes the tests use.
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
# fields added after runs were started: left out of the fingerprint at these values, so those runs still resume
_LATER_FIELDS = {"arch": "qwen3_moe", "shared_experts": 0, "dense_layers": 0, "dense_ffn": 0, "bias_rate": 0.0,
                 "ternary_experts": False, "init_from": None, "experts_implementation": "transformers"}
EXPERTS_IMPLEMENTATIONS = ("transformers", "moelab")
ARCHS = ("qwen3_moe", "deepseek_v3", "qwen3")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything that determines a training run.

    Attributes (model): arch (``qwen3_moe``, ``deepseek_v3`` or ``qwen3``, see the module docstring),
        hidden_size, num_layers, num_heads, num_kv_heads, expert_ffn (hidden width of one expert),
        num_experts (routed experts per MoE layer), top_k, shared_experts (always-on experts of width
        expert_ffn, deepseek_v3), dense_layers (leading layers with a dense FFN, deepseek_v3),
        dense_ffn (width of a dense FFN; 0 = the active expert width ``expert_ffn * (top_k +
        shared_experts)``), seq_len (tokens per row, also max positions), ternary_experts (routed experts
        trained ternary through a straight-through estimator, MoTE; see :mod:`moelab.nn.ternary`),
        experts_implementation (``transformers``: the model's default experts kernel; ``moelab``: moelab's
        experts backend, :mod:`moelab.models.backend`; ternary experts always run on moelab's).
    Attributes (optimisation): batch_size (rows per step), steps, lr (peak), min_lr_ratio (cosine floor
        as a fraction of lr), warmup_steps, weight_decay, grad_clip, aux_coef (load-balancing loss
        weight: Switch loss for softmax routers, DeepSeek-V3's sequence-wise loss for sigmoid ones),
        z_coef (router z-loss weight, softmax routers), bias_rate (step size of the aux-loss-free
        correction-bias update, deepseek_v3; 0 = off), domain_weights (sampling share of code/drama/prose),
        seed, init_from (a model folder of this config's shapes to start from instead of a fresh
        initialisation: fine-tuning, e.g. quantisation-aware training of a shipped model).
    Attributes (run): corpus (folder with manifest and tokenizer), checkpoint_every_s / _steps (save
        when either is reached), log_every (steps per JSONL line), eval_every (steps per quick
        validation, 0 = off), threads (torch intra-op threads).
    """

    corpus: Path
    arch: str = "qwen3_moe"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    expert_ffn: int = 256
    num_experts: int = 8
    top_k: int = 2
    shared_experts: int = 0
    dense_layers: int = 0
    dense_ffn: int = 0
    seq_len: int = 256
    ternary_experts: bool = False
    experts_implementation: str = "transformers"
    batch_size: int = 6
    steps: int = 12000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_coef: float = 0.02
    z_coef: float = 1e-3
    bias_rate: float = 0.0
    domain_weights: dict[str, float] = field(default_factory=lambda: {"code": 0.45, "drama": 0.4, "prose": 0.15})
    seed: int = 0
    init_from: str | None = None
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
        for name in ("aux_coef", "z_coef", "weight_decay", "grad_clip", "checkpoint_every_s", "bias_rate",
                     "shared_experts", "dense_layers", "dense_ffn"):
            if getattr(self, name) < 0:
                raise MoelabError(f"{name}: expected >= 0, got {getattr(self, name)}")
        self._check_arch()
        bad = set(self.domain_weights) - {"code", "drama", "prose"}
        if bad or not self.domain_weights or min(self.domain_weights.values()) < 0 or sum(self.domain_weights.values()) <= 0:
            raise MoelabError(f"domain_weights: expected non-negative weights for code/drama/prose, got {self.domain_weights}")

    def _check_arch(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise MoelabError(f"{what} (arch={self.arch})")

        need(self.arch in ARCHS, f"arch: expected one of {', '.join(ARCHS)}, got {self.arch!r}")
        need(not (self.ternary_experts and self.arch == "qwen3"), "ternary_experts: a dense model has no experts")
        need(self.experts_implementation in EXPERTS_IMPLEMENTATIONS, "experts_implementation: expected one of "
             f"{', '.join(EXPERTS_IMPLEMENTATIONS)}, got {self.experts_implementation!r}")
        if self.arch != "deepseek_v3":
            need(self.shared_experts == 0 and self.dense_layers == 0 and self.bias_rate == 0,
                 "shared_experts, dense_layers and bias_rate: only deepseek_v3 has shared experts, "
                 f"dense first layers and a correction bias; got {self.shared_experts}, {self.dense_layers}, {self.bias_rate}")
        if self.arch == "qwen3":
            need(self.dense_ffn > 0, "dense_ffn: a dense model needs its FFN width (> 0)")
            need(self.num_experts == 1 and self.top_k == 1 and self.aux_coef == 0 and self.z_coef == 0,
                 "num_experts, top_k, aux_coef, z_coef: a dense model has no router; expected 1, 1, 0, 0, got "
                 f"{self.num_experts}, {self.top_k}, {self.aux_coef}, {self.z_coef}")
        if self.arch == "deepseek_v3":
            need(self.num_kv_heads == self.num_heads, f"num_kv_heads: MLA needs num_kv_heads == num_heads, got "
                 f"{self.num_kv_heads} and {self.num_heads}")
            need((self.hidden_size // self.num_heads) % 4 == 0, "hidden_size / num_heads: expected a multiple of 4 "
                 f"(half of each head is RoPE, in pairs), got {self.hidden_size // self.num_heads}")
            need(self.dense_layers < self.num_layers, f"dense_layers: {self.dense_layers} leaves no MoE layer of "
                 f"num_layers={self.num_layers}")
            need(self.z_coef == 0, f"z_coef: sigmoid routing has no softmax to regularise; expected 0, got {self.z_coef}")

    @property
    def model_name(self) -> str:
        """The shipped model this config trains: ``fine``, ``coarse`` or ``dense`` (by architecture)."""
        return {"deepseek_v3": "fine", "qwen3_moe": "coarse", "qwen3": "dense"}[self.arch]

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the layers with an MoE block (none for the dense model)."""
        return [] if self.arch == "qwen3" else list(range(self.dense_layers, self.num_layers))

    @property
    def dense_width(self) -> int:
        """FFN width of the dense layers (``dense_ffn``, else the active expert width)."""
        return self.dense_ffn or self.expert_ffn * (self.top_k + self.shared_experts)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["corpus"] = str(self.corpus)
        return d

    def fingerprint(self, corpus_sha256: str) -> dict[str, Any]:
        """The fields that decide what is trained, plus the corpus checksum: a resume must match them all."""
        d = {k: v for k, v in self.to_dict().items()
             if k not in _RUN_ONLY_FIELDS and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
        d["corpus_sha256"] = corpus_sha256
        return d


def fingerprint_hash(fp: dict[str, Any]) -> str:
    """Short stable hash of a fingerprint dict."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


# the fine / coarse / dense comparison (DeepSeekMoE, Dai et al. 2024, sec. 4): one token budget
# (7,000 steps of 6 x 256 tokens = 10.75 M), domain shares for the docs-prose corpus, total routed
# expert width 2,048 per layer and 512 of FFN width active per token in every model but the dense one
_COMPARE = dict(steps=7000, domain_weights={"code": 0.4, "drama": 0.3, "prose": 0.3})
_TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, expert_ffn=32, num_experts=4, top_k=2,
             seq_len=32, batch_size=4, steps=8, warmup_steps=2, log_every=1, eval_every=0, checkpoint_every_s=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    # the model shipped until the fine-grained one (12,000 steps on the topics-prose corpus)
    "default": {},
    # coarse experts (8 x 256, top-2), Qwen3-MoE; the default model's shape at the comparison budget
    "coarse": dict(_COMPARE),
    # fine-grained DeepSeek-V3: 32 routed experts of width 64 (each coarse expert cut in 4), top-7, plus
    # 1 shared expert: 8 x 64 = 512 active, as coarse top-2 x 256; layer 0 dense (width 512).
    # NOTE: bias_rate 1e-2, not DeepSeek-V3's 1e-3: at this learning rate (3e-3, ~14x theirs) the router
    # outruns a 1e-3 bias. Measured on this corpus, steps 1-120: 42 of 96 experts under 1 % of the load
    # at step 60 with 1e-3, at most 5 with 1e-2, at the same training loss (6.49 vs 6.51 at step 100).
    "fine": dict(_COMPARE, arch="deepseek_v3", num_kv_heads=4, expert_ffn=64, num_experts=32, top_k=7,
                 shared_experts=1, dense_layers=1, aux_coef=1e-4, z_coef=0.0, bias_rate=1e-2),
    # dense Qwen3 whose FFN width is the MoEs' total routed expert width (32 x 64 = 8 x 256 = 2,048)
    "dense": dict(_COMPARE, arch="qwen3", dense_ffn=2048, num_experts=1, top_k=1, aux_coef=0.0, z_coef=0.0),
    # debug sizes for tests: seconds per run
    "tiny": dict(_TINY),
    "tiny-fine": dict(_TINY, arch="deepseek_v3", num_kv_heads=2, expert_ffn=8, num_experts=8, top_k=3,
                      shared_experts=1, dense_layers=1, aux_coef=1e-4, z_coef=0.0, bias_rate=1e-3),
    "tiny-dense": dict(_TINY, arch="qwen3", dense_ffn=128, num_experts=1, top_k=1, aux_coef=0.0, z_coef=0.0),
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
    """The transformers config of the model ``cfg`` trains (see the module docstring), tied embeddings."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  max_position_embeddings=cfg.seq_len, tie_word_embeddings=True, bos_token_id=eos_token_id,
                  eos_token_id=eos_token_id, pad_token_id=eos_token_id, use_cache=True)
    head_dim = cfg.hidden_size // cfg.num_heads
    if cfg.arch == "qwen3":
        return transformers.Qwen3Config(**common, intermediate_size=cfg.dense_ffn, head_dim=head_dim)
    if cfg.arch == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **common,
            intermediate_size=cfg.dense_width,
            moe_intermediate_size=cfg.expert_ffn,
            n_routed_experts=cfg.num_experts,
            num_experts_per_tok=cfg.top_k,
            n_shared_experts=cfg.shared_experts,
            first_k_dense_replace=cfg.dense_layers,
            n_group=1, topk_group=1,  # no group-limited routing at this size
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            q_lora_rank=None,
            kv_lora_rank=cfg.hidden_size // 2,
            qk_rope_head_dim=head_dim // 2,
            qk_nope_head_dim=head_dim // 2,
            v_head_dim=head_dim,
        )
    return transformers.Qwen3MoeConfig(
        **common,
        intermediate_size=cfg.expert_ffn * cfg.top_k,  # unused: no dense MLP layers (mlp_only_layers=[])
        head_dim=head_dim,
        moe_intermediate_size=cfg.expert_ffn,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=cfg.aux_coef,
    )
