"""Tiny random models of every supported family, built from their transformers config classes.

For tests and examples across moelab: hidden 16, expert width 8, 4-8 experts, 2 layers, vocab 64.
Nothing is downloaded. ``tiny_model("Mixtral", num_experts_per_tok=1)`` overrides config fields.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moelab.errors import MoelabError

_COMMON = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

# multi-head latent attention (DeepSeek): needs as many kv heads as heads
_MLA = dict(
    num_key_value_heads=2,
    kv_lora_rank=8,
    q_lora_rank=None,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
)

# family -> (config class, causal-LM class, config kwargs on top of _COMMON)
TINY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "Mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=8, num_local_experts=4, num_experts_per_tok=2),
    ),
    "Qwen2-MoE": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=24,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=12,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),
    "Qwen3-MoE": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            intermediate_size=24,
            moe_intermediate_size=8,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=8,
        ),
    ),
    "OLMoE": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=8, num_experts=8, num_experts_per_tok=2),
    ),
    "FlexOlmo": (
        "FlexOlmoConfig",
        "FlexOlmoForCausalLM",
        dict(intermediate_size=8, num_experts=5, num_experts_per_tok=2),
    ),
    "MiniMax": (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        dict(
            intermediate_size=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            block_size=4,
            layer_types=["linear_attention", "full_attention"],
        ),
    ),
    "DeepSeek-V2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            _MLA,
            intermediate_size=24,
            moe_intermediate_size=8,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            first_k_dense_replace=0,
        ),
    ),
    "DeepSeek-V3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            _MLA,
            intermediate_size=24,
            moe_intermediate_size=8,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            first_k_dense_replace=1,
        ),
    ),
    "GLM4-MoE": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            intermediate_size=24,
            moe_intermediate_size=8,
            n_routed_experts=6,
            n_shared_experts=2,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            first_k_dense_replace=0,
            head_dim=8,
        ),
    ),
    "GraniteMoE": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(intermediate_size=8, num_local_experts=4, num_experts_per_tok=2),
    ),
    "GraniteMoeShared": (
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        dict(
            intermediate_size=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            shared_intermediate_size=12,
        ),
    ),
    "PhiMoE": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(
            intermediate_size=8, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.3
        ),
    ),
    "ERNIE-4.5-MoE": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        dict(
            intermediate_size=24,
            moe_intermediate_size=8,
            moe_num_experts=6,
            moe_k=2,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            head_dim=8,
        ),
    ),
    "HunYuan-MoE": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        dict(intermediate_size=8, num_experts=4, moe_topk=2, head_dim=8),
    ),
    "GPT-OSS": (
        "GptOssConfig",
        "GptOssForCausalLM",
        # a small swiglu_limit so that the clamp acts at these weight scales
        dict(
            intermediate_size=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            swiglu_limit=0.05,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=8,
            rope_parameters=dict(rope_type="default", rope_theta=1e4),
        ),
    ),
    "Llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            intermediate_size=8,
            intermediate_size_mlp=24,
            num_local_experts=4,
            num_experts_per_tok=1,
            head_dim=8,
            interleave_moe_layer_step=2,
            attention_chunk_size=16,
        ),
    ),
    "DBRX": (
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(
            d_model=16,
            n_heads=2,
            n_layers=2,
            max_seq_len=64,
            attn_config=dict(kv_n_heads=1, rope_theta=1e4, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=8, moe_num_experts=4, moe_top_k=2),
        ),
    ),
    "JetMoE": (
        "JetMoeConfig",
        "JetMoeForCausalLM",
        dict(intermediate_size=8, num_local_experts=4, num_experts_per_tok=2, kv_channels=8),
    ),
}


def tiny_config(family: str, **overrides: Any):
    """The transformers config of a tiny ``family`` model (float64-ready, eager experts by default)."""
    import transformers

    if family not in TINY_CONFIGS:
        raise MoelabError(
            f"tiny_config: unknown family {family!r}; known: {', '.join(TINY_CONFIGS)}"
        )
    cfg_name, _, kwargs = TINY_CONFIGS[family]
    merged = {**_COMMON, **kwargs, "experts_implementation": "eager", **overrides}
    return getattr(transformers, cfg_name)(**merged)


def tiny_model(
    family: str, *, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides: Any
) -> nn.Module:
    """A tiny random ``family`` causal LM in eval mode; config fields can be overridden."""
    import transformers

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, TINY_CONFIGS[family][1])(config)
    _randomise_zero_init(model)
    return model.to(dtype).eval()


def tiny_view(family: str, **kwargs: Any):
    """:func:`moelab.models.open_model` of :func:`tiny_model`, with transformers' config warnings silenced."""
    import warnings

    from moelab.models.open import open_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_model(tiny_model(family, **kwargs))


def native_block_output(block: Any, x: torch.Tensor) -> torch.Tensor:
    """The family's own output for the MoE part of a decoder layer on ``x [..., H]``: the block
    module's hidden states, plus the shared MLP where the family runs it beside the block
    (GraniteMoeShared). What :func:`moelab.models.reference_forward` is compared with in tests."""
    out = block.module(x)
    out = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)  # Llama4 returns [T, H]
    if block.shared is not None and not block.shared.inside_block:
        out = out + block.shared.module(x)
    return out


def _randomise_zero_init(model: nn.Module) -> None:
    """Give zero-initialised routing buffers/biases small random values so tests exercise them."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and ("bias" in name) and t.ndim <= 2 and not t.any():
                t.normal_(0.0, 0.05)
