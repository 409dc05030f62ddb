"""Llama4 (text): sigmoid scores applied to the expert *inputs*, transposed experts, a shared expert.

Router (``Llama4Router``, an ``nn.Linear``): top-k on the logits, score = sigmoid(logit) for the
chosen experts and 0 for the others, no renormalisation. The block then runs every expert on
every token with its input scaled by the score (``combine='input'``): expert(0) = 0, so only the
chosen experts contribute. Storage: ``gate_up_proj [E, H, 2I]`` (gate then up, concatenated),
``down_proj [E, I, H]``; ``shared_expert`` is a gate/up/down MLP. Layers not in
``config.moe_layers`` are dense.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from moelab.models.backend import ExpertsSpec, ExpertWeights, own_params
from moelab.models.edits import for_experts
from moelab.models.families._common import (
    act_name,
    check_experts,
    config_num_experts,
    d,
    flat_routing,
    glu_mlp,
    transposed_gate_up,
)
from moelab.models.families._config import write_counts
from moelab.models.families._experts import transposed_weights
from moelab.models.registry import FamilyAdapter
from moelab.models.view import MoEBlockView


def _install(block: MoEBlockView, run) -> list:
    """Llama4's experts see ``x * score`` for every (expert, token); the router output holds the
    scores ``[T, E]`` (0 where not chosen) and the logits, from which ids and weights are read. An
    edited routing goes back as new scores: its weights scattered at its ids, 0 elsewhere."""

    def on_router(_mod, args, out):
        scores_TE, logits_TE = out
        ids_TK = logits_TE.topk(block.top_k, dim=-1).indices
        new = run(args[0], flat_routing(logits_TE, ids_TK, scores_TE.gather(-1, ids_TK)))
        if new is None:
            return None
        ids, w = for_experts(new, block.num_experts)
        # scatter_add: a switched-off slot (weight 0) may share its id with a real one
        new_scores = torch.zeros_like(scores_TE).scatter_add(-1, ids, w.to(scores_TE.dtype))
        return new_scores, logits_TE

    return [block.router_module.register_forward_hook(on_router)]


def read(model: nn.Module, module: nn.Module, path: str, layer: int) -> MoEBlockView:
    router, experts = module.router, module.experts
    act = act_name(model.config.hidden_act, f"{path} config.hidden_act")
    gate, up, down = transposed_gate_up(
        experts.gate_up_proj, experts.down_proj, interleaved=False, where=path
    )
    view = MoEBlockView(
        family="Llama4",
        path=path,
        layer=layer,
        module=module,
        router_module=router,
        experts_module=experts,
        top_k=int(router.top_k),
        router_weight=d(router.weight),
        scoring="sigmoid",
        norm_topk_prob=False,
        gate=gate,
        up=up,
        down=down,
        act=act,
        layout="llama4_transposed",
        combine="input",
        shared=glu_mlp(module.shared_expert, f"{path}.shared_expert", act),
        hook_installer=_install,
    )
    return check_experts(view, config_num_experts(model.config), model.config.intermediate_size)


def block_output(y: Tensor, routing: Any) -> tuple[Tensor, Tensor]:
    """``Llama4TextMoe`` returns ``(hidden, router_logits)``: the logits ``[T, E]``."""
    return y, routing.logits_TE.to(y.dtype)


_PARAMS = ("experts.gate_up_proj", "experts.down_proj")


def experts_from_params(block: MoEBlockView, t: dict[str, Tensor]) -> ExpertWeights:
    return transposed_weights(t["experts.gate_up_proj"], t["experts.down_proj"], interleaved=False)


def experts_weights(block: MoEBlockView) -> ExpertWeights:
    return experts_from_params(block, own_params(block, _PARAMS))


def block_forward(backend, hidden_states):
    """``Llama4TextMoe.forward`` on moelab's backend: the router runs as before (its hooks see it),
    the chosen experts (top-k of the logits) get ``score * x``; returns ``(out, router_logits)``."""
    block = backend.block
    x_TH = hidden_states.reshape(-1, block.hidden_size)
    scores_TE, logits_TE = block.router_module(x_TH)
    # the chosen experts are those with a score: a routing edit (a hook on the router) may have
    # chosen others than the top-k of the raw logits; unedited, both give the same set
    ids_TK = scores_TE.topk(block.top_k, dim=-1).indices
    out = block.module.shared_expert(x_TH)
    out.add_(backend(x_TH, ids_TK, scores_TE.gather(-1, ids_TK)))
    return out, logits_TE


ADAPTERS = (
    FamilyAdapter(
        "Llama4",
        ("llama4_text",),
        ("Llama4TextMoe",),
        read,
        "Llama4TextConfig",
        write_config=write_counts,
        block_output=block_output,
        experts_backend=ExpertsSpec(
            experts_weights, swap="block", forward=block_forward, params=_PARAMS,
            from_params=experts_from_params,
        ),
    ),
)
