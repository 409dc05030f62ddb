"""Families with a softmax top-k router ``[E, H]`` and standard fused experts.

Experts store ``gate_up_proj [E, 2I, H]`` (gate rows first) and ``down_proj [E, H, I]`` and are
called as ``experts(hidden_TH, ids_TK, weights_TK)``. The families differ only in names and small
routing rules, which a :class:`SoftmaxFamily` record states:

* Mixtral, MiniMax, HunYuan-MoE: top-k of softmax, always renormalised.
* Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo: renormalised when ``norm_topk_prob``; Qwen2-MoE adds a
  shared expert behind a sigmoid gate ``shared_expert_gate [1, H]``.
* GraniteMoE, GraniteMoeShared: softmax over the top-k logits, which equals renormalised top-k of
  the full softmax; GraniteMoeShared runs ``shared_mlp`` (fused ``input_linear [2S, H]``) beside
  the block in the decoder layer.
* ERNIE-4.5-MoE: selection on ``softmax + e_score_correction_bias``; weights renormalised as
  ``w / max(sum w, moe_norm_min)``; optional shared experts.
* PhiMoE: SparseMixer routing (see :func:`moelab.models.rule.sparsemixer_select`), always 2
  experts per token whatever ``num_experts_per_tok`` says.
* HunYuan-MoE: always-on ``shared_mlp`` of width ``intermediate_size``.

Input jitter (Mixtral, MiniMax, PhiMoE) acts only in training mode and is not part of the view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from moelab.models.families._common import (
    act_name,
    check_experts,
    config_field,
    config_num_experts,
    d,
    experts_prehook_installer,
    fused_gate_up,
    glu_mlp,
    linear_logits,
)
from moelab.models.families._config import write_counts
from moelab.models.families._experts import STANDARD
from moelab.models.registry import FamilyAdapter
from moelab.models.view import MoEBlockView, SharedExpertsView

_HOOKS = experts_prehook_installer(logits_index=0)
# routers whose forward starts with logits = F.linear(hidden.reshape(-1, H), weight) and returns
# (logits, weights, ids): the seam may stand in for their selection (see models/edits.py)
_LINEAR_HOOKS = {
    w32: experts_prehook_installer(logits_index=0, router_logits=linear_logits(), weights_float32=w32)
    for w32 in (False, True)
}


@dataclass(frozen=True)
class SoftmaxFamily:
    """Where one family keeps its router and shared expert, and its renormalisation rule."""

    name: str
    router: str = "gate"  # attribute of the block
    router_weight: str = "weight"  # dotted path under the router
    renorm: str = "config"  # 'always' | 'config' (router.norm_topk_prob)
    scoring: str = "softmax"  # or 'sparsemixer'
    shared: str | None = None  # attribute of the block holding a gate/up/down_proj MLP
    shared_gate: str | None = None  # attribute of the block: Linear(H, 1) sigmoid gate
    correction_bias: str | None = None  # dotted path under the router
    outside_shared: bool = False  # GraniteMoeShared: decoder layer's shared_mlp
    # the router is F.linear(hidden, weight) then the selection, weights in the logits' dtype
    # ("logits") or float32 ("float32"); None: the seam never stands in for it
    linear_router: str | None = None


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _granite_shared(model: nn.Module, path: str, act: str) -> SharedExpertsView | None:
    """The decoder layer's fused ``shared_mlp`` (``input_linear [2S, H]``, ``output_linear [H, S]``)."""
    parent = path.rsplit(".", 1)[0]
    mlp = getattr(model.get_submodule(parent), "shared_mlp", None)
    if mlp is None:
        return None
    w = mlp.input_linear.weight.detach()
    s = w.shape[0] // 2
    return SharedExpertsView(
        path=f"{parent}.shared_mlp",
        module=mlp,
        gate=w[:s],
        up=w[s:],
        down=d(mlp.output_linear.weight),
        act=act,
        inside_block=False,
    )


def _shared(fam: SoftmaxFamily, model, module, path: str, act: str) -> SharedExpertsView | None:
    if fam.outside_shared:
        return _granite_shared(model, path, act)
    mlp = getattr(module, fam.shared, None) if fam.shared else None
    if mlp is None:
        return None
    gate_w = d(getattr(module, fam.shared_gate).weight) if fam.shared_gate else None
    return glu_mlp(mlp, f"{path}.{fam.shared}", act, gate_weight=gate_w)


def read_softmax_block(
    fam: SoftmaxFamily, model: nn.Module, module: nn.Module, path: str, layer: int
):
    """View of one block of a :class:`SoftmaxFamily` family."""
    config = model.config
    router, experts = getattr(module, fam.router), module.experts
    act = act_name(config.hidden_act, f"{path} config.hidden_act")
    gate, up, down = fused_gate_up(experts.gate_up_proj, experts.down_proj, path)
    routing: dict[str, Any] = dict(scoring=fam.scoring, norm_topk_prob=True)
    if fam.renorm == "config":
        routing["norm_topk_prob"] = bool(router.norm_topk_prob)
    if fam.scoring == "sparsemixer":
        routing.update(
            norm_topk_prob=False, scoring_params={"jitter_eps": float(router.router_jitter_noise)}
        )
    if fam.correction_bias:
        routing["correction_bias"] = d(_get(router, fam.correction_bias)).reshape(-1)
        routing["norm_min"] = float(router.norm_min)
    view = MoEBlockView(
        family=fam.name,
        path=path,
        layer=layer,
        module=module,
        router_module=router,
        experts_module=experts,
        top_k=2 if fam.scoring == "sparsemixer" else int(router.top_k),
        router_weight=d(_get(router, fam.router_weight)),
        gate=gate,
        up=up,
        down=down,
        act=act,
        layout="fused_gate_up",
        shared=_shared(fam, model, module, path, act),
        hook_installer=_HOOKS if fam.linear_router is None else _LINEAR_HOOKS[fam.linear_router == "float32"],
        **routing,
    )
    n_experts = config_num_experts(config)
    if isinstance(n_experts, (list, tuple)):  # HunYuan allows one count per layer
        n_experts = n_experts[layer]
    return check_experts(
        view, n_experts, config_field(config, "moe_intermediate_size", "intermediate_size")
    )


def _adapter(fam: SoftmaxFamily, model_type: str, block: str, config_cls: str,
             input_norm: str = "post_attention_layernorm") -> FamilyAdapter:
    def read(model: nn.Module, module: nn.Module, path: str, layer: int) -> MoEBlockView:
        return read_softmax_block(fam, model, module, path, layer)

    return FamilyAdapter(
        fam.name, (model_type,), (block,), read, config_cls, write_config=write_counts,
        experts_backend=STANDARD, input_norm=input_norm,
    )


ADAPTERS = (
    _adapter(
        SoftmaxFamily("Mixtral", renorm="always", linear_router="float32"),
        "mixtral",
        "MixtralSparseMoeBlock",
        "MixtralConfig",
    ),
    _adapter(
        SoftmaxFamily("Qwen2-MoE", shared="shared_expert", shared_gate="shared_expert_gate",
                      linear_router="logits"),
        "qwen2_moe",
        "Qwen2MoeSparseMoeBlock",
        "Qwen2MoeConfig",
    ),
    _adapter(SoftmaxFamily("Qwen3-MoE", linear_router="logits"), "qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig"),
    _adapter(SoftmaxFamily("OLMoE", linear_router="logits"), "olmoe", "OlmoeSparseMoeBlock", "OlmoeConfig"),
    # FlexOlmo normalises after the MLP: the block reads the residual stream, no norm to fold into
    _adapter(SoftmaxFamily("FlexOlmo", linear_router="logits"), "flex_olmo", "FlexOlmoSparseMoeBlock", "FlexOlmoConfig", input_norm=""),
    _adapter(
        SoftmaxFamily("MiniMax", renorm="always", linear_router="float32"),
        "minimax",
        "MiniMaxSparseMoeBlock",
        "MiniMaxConfig",
    ),
    _adapter(
        SoftmaxFamily("GraniteMoE", router="router", renorm="always"),
        "granitemoe",
        "GraniteMoeMoE",
        "GraniteMoeConfig",
    ),
    _adapter(
        SoftmaxFamily("GraniteMoeShared", router="router", renorm="always", outside_shared=True),
        "granitemoeshared",
        "GraniteMoeSharedMoE",
        "GraniteMoeSharedConfig",
    ),
    _adapter(
        SoftmaxFamily("PhiMoE", router="router", renorm="always", scoring="sparsemixer"),
        "phimoe",
        "PhimoeSparseMoeBlock",
        "PhimoeConfig",
    ),
    _adapter(
        SoftmaxFamily(
            "ERNIE-4.5-MoE",
            renorm="always",
            shared="shared_experts",
            correction_bias="moe_statics.e_score_correction_bias",
        ),
        "ernie4_5_moe",
        "Ernie4_5_MoeSparseMoeBlock",
        "Ernie4_5_MoeConfig",
    ),
    _adapter(
        SoftmaxFamily(
            "HunYuan-MoE", router_weight="wg.weight", renorm="always", shared="shared_mlp"
        ),
        "hunyuan_v1_moe",
        "HunYuanMoEV1Moe",
        "HunYuanMoEV1Config",
    ),
)
