"""Llama4 (text): sigmoid scores applied to the expert *inputs*, transposed experts, a shared expert.

Router (``Llama4Router``, an ``nn.Linear``): top-k on the logits, score = sigmoid(logit) for the
chosen experts and 0 for the others, no renormalisation. The block then runs every expert on
every token with its input scaled by the score (``combine='input'``): expert(0) = 0, so only the
chosen experts contribute. Storage: ``gate_up_proj [E, H, 2I]`` (gate then up, concatenated),
``down_proj [E, I, H]``; ``shared_expert`` is a gate/up/down MLP. Layers not in
``config.moe_layers`` are dense.
"""

from __future__ import annotations

from torch import nn

from moelab.models.backend import ExpertsSpec, ExpertWeights
from moelab.models.families._common import (
    act_name,
    check_experts,
    config_num_experts,
    d,
    emit,
    glu_mlp,
    transposed_gate_up,
)
from moelab.models.families._experts import transposed_weights
from moelab.models.registry import FamilyAdapter
from moelab.models.view import MoEBlockView


def _install(block: MoEBlockView, fn) -> list:
    """Llama4's experts see ``x * score`` for every (expert, token); the router output holds the
    scores ``[T, E]`` (0 where not chosen) and the logits, from which ids and weights are read."""

    def on_router(_mod, args, out):
        scores_TE, logits_TE = out
        ids_TK = logits_TE.topk(block.top_k, dim=-1).indices
        emit(block, fn, args[0], ids_TK, scores_TE.gather(-1, ids_TK), logits_TE)

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


def experts_weights(block: MoEBlockView) -> ExpertWeights:
    ex = block.experts_module
    return transposed_weights(ex.gate_up_proj, ex.down_proj, interleaved=False)


def block_forward(backend, hidden_states):
    """``Llama4TextMoe.forward`` on moelab's backend: the router runs as before (its hooks see it),
    the chosen experts (top-k of the logits) get ``score * x``; returns ``(out, router_logits)``."""
    block = backend.block
    x_TH = hidden_states.reshape(-1, block.hidden_size)
    scores_TE, logits_TE = block.router_module(x_TH)
    ids_TK = logits_TE.topk(block.top_k, dim=-1).indices
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
        experts_backend=ExpertsSpec(experts_weights, swap="block", forward=block_forward),
    ),
)
