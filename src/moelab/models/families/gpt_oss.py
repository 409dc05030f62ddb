"""GPT-OSS: transposed, interleaved experts with biases and a clamped SwiGLU.

Storage (``GptOssExperts``): ``gate_up_proj [E, H, 2I]`` with gate and up interleaved along the
last axis (gate = even columns, up = odd), ``gate_up_proj_bias [E, 2I]`` interleaved the same way,
``down_proj [E, I, H]`` and ``down_proj_bias [E, H]``. The view transposes (no copy).

Router: ``logits = x @ W.T + b`` (router bias), top-k on the logits, softmax over the k chosen,
which equals renormalised top-k of the full softmax. Activation ``gpt_oss_swiglu``:
``g = min(gate, limit); u = clamp(up, -limit, limit); (u + 1) * g * sigmoid(alpha * g)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from moelab.models.backend import ExpertsSpec, ExpertWeights, own_params
from moelab.models.families._common import (
    check_experts,
    config_num_experts,
    d,
    experts_prehook_installer,
    linear_logits,
    transposed_gate_up,
)
from moelab.models.families._config import write_counts
from moelab.models.families._experts import transposed_weights
from moelab.models.registry import FamilyAdapter
from moelab.models.view import MoEBlockView

_HOOKS = experts_prehook_installer(
    logits_index=0, arg_names=("hidden_states", "router_indices", "routing_weights"),
    router_logits=linear_logits(bias=True),
)


def read(model: nn.Module, module: nn.Module, path: str, layer: int) -> MoEBlockView:
    router, experts = module.router, module.experts
    gate, up, down = transposed_gate_up(
        experts.gate_up_proj, experts.down_proj, interleaved=True, where=path
    )
    gu_bias = experts.gate_up_proj_bias.detach()
    view = MoEBlockView(
        family="GPT-OSS",
        path=path,
        layer=layer,
        module=module,
        router_module=router,
        experts_module=experts,
        top_k=int(router.top_k),
        router_weight=d(router.weight),
        router_bias=d(router.bias),
        scoring="softmax",
        norm_topk_prob=True,
        gate=gate,
        up=up,
        down=down,
        gate_bias=gu_bias[:, 0::2],
        up_bias=gu_bias[:, 1::2],
        down_bias=d(experts.down_proj_bias),
        act="gpt_oss_swiglu",
        act_params={"alpha": float(experts.alpha), "limit": float(experts.limit)},
        layout="gpt_oss_interleaved",
        hook_installer=_HOOKS,
    )
    return check_experts(view, config_num_experts(model.config), model.config.intermediate_size)


def block_output(y: Tensor, routing: Any) -> tuple[Tensor, Tensor]:
    """``GptOssMLP`` returns ``(hidden, router_scores)``: the top-k weights ``[T, K]``."""
    return y, routing.weights_TK.to(y.dtype)


_PARAMS = (
    "experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj", "experts.down_proj_bias"
)


def experts_from_params(block: MoEBlockView, t: dict[str, Tensor]) -> ExpertWeights:
    """Views of the interleaved experts and their biases (``ExpertsSpec.from_params``)."""
    return transposed_weights(
        t["experts.gate_up_proj"], t["experts.down_proj"], True,
        t["experts.gate_up_proj_bias"], t["experts.down_proj_bias"],
    )


def experts_weights(block: MoEBlockView) -> ExpertWeights:
    """Live (differentiable) views of the interleaved experts and their biases."""
    return experts_from_params(block, own_params(block, _PARAMS))


ADAPTERS = (
    FamilyAdapter(
        "GPT-OSS",
        ("gpt_oss",),
        ("GptOssMLP",),
        read,
        "GptOssConfig",
        write_config=write_counts,
        block_output=block_output,
        experts_backend=ExpertsSpec(
            weights=experts_weights, params=_PARAMS, from_params=experts_from_params
        ),
    ),
)
