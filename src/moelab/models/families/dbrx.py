"""DBRX: experts flattened to 2-D ``[E*I, H]`` matrices, softmax router with a p-norm.

Storage (``DbrxExpertGLU``): ``w1`` (gate), ``v1`` (up) and ``w2`` (down, stored as ``[I, H]`` per
expert and applied as ``h @ w2``), each ``[E*I, H]``; the view reshapes and transposes (no copy).
Router: ``router.layer`` (``nn.Linear`` H -> E), softmax, top-k, then weights divided by their
``moe_normalize_expert_weights``-norm (p = 1: the usual renormalisation; None: none).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from moelab.errors import CheckpointError
from moelab.models.backend import ExpertsSpec, ExpertWeights, own_params
from moelab.models.families._common import act_name, check_experts, d, experts_prehook_installer
from moelab.models.registry import FamilyAdapter
from moelab.models.view import MoEBlockView

# DBRX's router returns the logits tensor alone (not a tuple): the standard hooks take it as is
_HOOKS = experts_prehook_installer(logits_index=0)


def read(model: nn.Module, module: nn.Module, path: str, layer: int) -> MoEBlockView:
    ffn = model.config.ffn_config
    mlp = module.experts.mlp
    E, I = int(ffn.moe_num_experts), int(ffn.ffn_hidden_size)  # noqa: E741
    H = mlp.w1.shape[1]
    for name in ("w1", "v1", "w2"):
        if tuple(getattr(mlp, name).shape) != (E * I, H):
            raise CheckpointError(
                f"{path}.experts.mlp.{name} is {list(getattr(mlp, name).shape)} but ffn_config implies "
                f"[{E} * {I}, {H}] (moe_num_experts * ffn_hidden_size, hidden)"
            )
    p = ffn.moe_normalize_expert_weights
    view = MoEBlockView(
        family="DBRX",
        path=path,
        layer=layer,
        module=module,
        router_module=module.router,
        experts_module=module.experts,
        top_k=int(module.top_k),
        router_weight=d(module.router.layer.weight),
        scoring="softmax",
        norm_topk_prob=p is not None,
        norm_p=float(p) if p is not None else 1.0,
        gate=mlp.w1.detach().view(E, I, H),
        up=mlp.v1.detach().view(E, I, H),
        down=mlp.w2.detach().view(E, I, H).transpose(1, 2),
        act=act_name(ffn.ffn_act_fn.get("name", "silu"), f"{path} ffn_config.ffn_act_fn"),
        layout="dbrx_flat",
        hook_installer=_HOOKS,
    )
    return check_experts(view, E, I)


def write_config(config: Any, num_experts: int, top_k: int, n_group: int | None = None) -> Any:
    """A copy of ``config`` with ``ffn_config.moe_num_experts`` / ``moe_top_k`` set (DBRX has no groups)."""
    new = copy.deepcopy(config)
    new.ffn_config.moe_num_experts = num_experts
    new.ffn_config.moe_top_k = top_k
    return new


_PARAMS = ("experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2")


def experts_from_params(block: MoEBlockView, t: dict[str, Tensor]) -> ExpertWeights:
    """Views ``[n, I, H]`` of w1/v1 and ``[n, H, I]`` of w2 (stored ``[n*I, H]``)."""
    w1, v1, w2 = (t[name] for name in _PARAMS)
    I, H = block.intermediate_size, block.hidden_size  # noqa: E741
    n = w1.shape[0] // I
    return ExpertWeights(w1.view(n, I, H), v1.view(n, I, H), w2.view(n, I, H).transpose(1, 2))


def experts_weights(block: MoEBlockView) -> ExpertWeights:
    """Live views ``[E, I, H]`` of w1/v1 and ``[E, H, I]`` of w2 (stored ``[E*I, H]``)."""
    return experts_from_params(block, own_params(block, _PARAMS))


def experts_forward(backend, hidden_states, top_k_index, top_k_weights):
    """``DbrxExperts.forward(hidden, top_k_index, top_k_weights)`` on moelab's backend (its
    pre-hooks still run); returns ``[batch, -1, H]`` as DBRX does."""
    H = backend.block.hidden_size
    y_TH = backend(hidden_states.reshape(-1, H), top_k_index, top_k_weights)
    return y_TH.view(hidden_states.shape[0], -1, H)


ADAPTERS = (
    FamilyAdapter(
        "DBRX",
        ("dbrx",),
        ("DbrxFFN",),
        read,
        "DbrxConfig",
        write_config=write_config,
        experts_backend=ExpertsSpec(
            experts_weights, swap="experts", forward=experts_forward, params=_PARAMS,
            from_params=experts_from_params,
        ),
        input_norm="norm_attn_norm.norm_2",
    ),
)
