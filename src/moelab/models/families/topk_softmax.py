"""Families with a softmax top-k router (``gate.weight [E, H]``) and standard fused experts.

Mixtral, MiniMax (top-k weights always renormalised), Qwen2-MoE (plus a shared expert behind a
sigmoid gate), Qwen3-MoE, OLMoE and FlexOlmo (renormalised when ``norm_topk_prob``). Their experts
store ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` and are called as
``experts(hidden_TH, ids_TK, weights_TK)``.

Input jitter (Mixtral, MiniMax) only acts in training mode and is not part of the view.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moelab.models.families._common import (
    act_name,
    check_experts,
    d,
    experts_prehook_installer,
    fused_gate_up,
    glu_mlp,
)
from moelab.models.registry import FamilyAdapter
from moelab.models.view import MoEBlockView

_HOOKS = experts_prehook_installer(logits_index=0)


def read_softmax_block(
    family: str, module: nn.Module, config: Any, path: str, layer: int, *, always_norm: bool
) -> MoEBlockView:
    """View of a block with ``module.gate`` (softmax top-k router) and ``module.experts`` (fused)."""
    router, experts = module.gate, module.experts
    act = act_name(config.hidden_act, f"{path} config.hidden_act")
    gate, up, down = fused_gate_up(experts.gate_up_proj, experts.down_proj, path)
    shared = None
    if hasattr(module, "shared_expert"):  # Qwen2-MoE
        shared = glu_mlp(
            module.shared_expert,
            f"{path}.shared_expert",
            act,
            gate_weight=d(module.shared_expert_gate.weight),
        )
    view = MoEBlockView(
        family=family,
        path=path,
        layer=layer,
        module=module,
        router_module=router,
        experts_module=experts,
        top_k=int(router.top_k),
        router_weight=d(router.weight),
        scoring="softmax",
        norm_topk_prob=always_norm or bool(router.norm_topk_prob),
        gate=gate,
        up=up,
        down=down,
        act=act,
        layout="fused_gate_up",
        shared=shared,
        hook_installer=_HOOKS,
    )
    n_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return check_experts(view, n_experts, width)


def _reader(family: str, always_norm: bool):
    def read(module: nn.Module, config: Any, path: str, layer: int) -> MoEBlockView:
        return read_softmax_block(family, module, config, path, layer, always_norm=always_norm)

    return read


ADAPTERS = (
    FamilyAdapter(
        "Mixtral",
        ("mixtral",),
        ("MixtralSparseMoeBlock",),
        _reader("Mixtral", True),
        "MixtralConfig",
    ),
    FamilyAdapter(
        "Qwen2-MoE",
        ("qwen2_moe",),
        ("Qwen2MoeSparseMoeBlock",),
        _reader("Qwen2-MoE", False),
        "Qwen2MoeConfig",
    ),
    FamilyAdapter(
        "Qwen3-MoE",
        ("qwen3_moe",),
        ("Qwen3MoeSparseMoeBlock",),
        _reader("Qwen3-MoE", False),
        "Qwen3MoeConfig",
    ),
    FamilyAdapter(
        "OLMoE", ("olmoe",), ("OlmoeSparseMoeBlock",), _reader("OLMoE", False), "OlmoeConfig"
    ),
    FamilyAdapter(
        "FlexOlmo",
        ("flex_olmo",),
        ("FlexOlmoSparseMoeBlock",),
        _reader("FlexOlmo", False),
        "FlexOlmoConfig",
    ),
    FamilyAdapter(
        "MiniMax",
        ("minimax",),
        ("MiniMaxSparseMoeBlock",),
        _reader("MiniMax", True),
        "MiniMaxConfig",
    ),
)
