"""JetMoE: experts as two ``[E, out, in]`` parallel linears, top-k softmax gating, an output bias.

Storage: ``input_linear.weight [E, 2I, H]`` (gate rows then up rows), ``output_linear.weight
[E, H, I]``, and a bias ``[H]`` added to the block's output. Router (``JetMoeTopKGating``):
top-k on the logits, softmax over the k, i.e. renormalised top-k of the full softmax.
``experts_module`` is ``input_linear`` (the experts have no single module).

Not covered: JetMoE's attention is a mixture too (``JetMoeMoA``); only the MLP blocks are viewed.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.models.backend import ExpertsSpec, ExpertWeights
from moelab.models.families._common import (
    act_name,
    check_experts,
    config_num_experts,
    d,
    emit,
    fused_gate_up,
)
from moelab.models.families._experts import fused_weights
from moelab.models.registry import FamilyAdapter
from moelab.models.view import MoEBlockView


def _install(block: MoEBlockView, fn) -> list:
    """Rebuild ``ids_TK``/``weights_TK`` from the gating's expert-sorted outputs: it returns the
    sort permutation of the flattened ``[T*K]`` choices, the sorted gates and tokens per expert."""

    def on_router(_mod, args, out):
        index_sorted, _batch_index, batch_gates, expert_size, logits = out
        T, K = logits.shape[0], block.top_k
        sorted_ids = torch.repeat_interleave(
            torch.arange(len(expert_size), device=logits.device),
            torch.tensor(expert_size, device=logits.device),
        )
        ids = torch.empty(T * K, dtype=torch.int64, device=logits.device).scatter_(
            0, index_sorted, sorted_ids
        )
        gates = torch.empty(T * K, dtype=batch_gates.dtype, device=logits.device)
        gates = gates.scatter_(0, index_sorted, batch_gates)
        emit(block, fn, args[0], ids.view(T, K), gates.view(T, K), logits)

    return [block.router_module.register_forward_hook(on_router)]


def read(model: nn.Module, module: nn.Module, path: str, layer: int) -> MoEBlockView:
    config = model.config
    gate, up, down = fused_gate_up(module.input_linear.weight, module.output_linear.weight, path)
    view = MoEBlockView(
        family="JetMoE",
        path=path,
        layer=layer,
        module=module,
        router_module=module.router,
        experts_module=module.input_linear,
        top_k=int(module.router.top_k),
        router_weight=d(module.router.layer.weight),
        scoring="softmax",
        norm_topk_prob=True,
        gate=gate,
        up=up,
        down=down,
        act=act_name(config.activation_function, f"{path} config.activation_function"),
        layout="jetmoe_parallel",
        output_bias=d(module.bias),
        hook_installer=_install,
    )
    return check_experts(view, config_num_experts(config), config.intermediate_size)


def experts_weights(block: MoEBlockView) -> ExpertWeights:
    m = block.module
    return fused_weights(m.input_linear.weight, m.output_linear.weight)


def _unsorted(out, top_k: int):
    """``(ids_TK, gates_TK)`` from the gating's expert-sorted outputs (differentiable in gates)."""
    index_sorted, _batch_index, batch_gates, expert_size, logits = out
    T, dev = logits.shape[0], logits.device
    sorted_ids = torch.repeat_interleave(
        torch.arange(len(expert_size), device=dev), torch.tensor(expert_size, device=dev)
    )
    ids = torch.empty(T * top_k, dtype=torch.int64, device=dev).scatter_(
        0, index_sorted, sorted_ids
    )
    gates = batch_gates.new_zeros(T * top_k).scatter(0, index_sorted, batch_gates)
    return ids.view(T, top_k), gates.view(T, top_k)


def block_forward(backend, layer_input):
    """``JetMoeMoE.forward`` on moelab's backend: the gating runs as before (its hooks see it);
    returns ``[batch, seq, H]`` plus the block's output bias, as JetMoE does."""
    block = backend.block
    x_TH = layer_input.reshape(-1, block.hidden_size)
    ids_TK, gates_TK = _unsorted(block.router_module(x_TH), block.top_k)
    y_TH = backend(x_TH, ids_TK, gates_TK)
    return y_TH.view(layer_input.shape) + block.module.bias


ADAPTERS = (
    FamilyAdapter(
        "JetMoE",
        ("jetmoe",),
        ("JetMoeMoE",),
        read,
        "JetMoeConfig",
        experts_backend=ExpertsSpec(experts_weights, swap="block", forward=block_forward),
    ),
)
