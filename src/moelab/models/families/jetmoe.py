"""JetMoE: experts as two ``[E, out, in]`` parallel linears, top-k softmax gating, an output bias.

Storage: ``input_linear.weight [E, 2I, H]`` (gate rows then up rows), ``output_linear.weight
[E, H, I]``, and a bias ``[H]`` added to the block's output. Router (``JetMoeTopKGating``):
top-k on the logits, softmax over the k, i.e. renormalised top-k of the full softmax.
``experts_module`` is ``input_linear`` (the experts have no single module).

Not covered: JetMoE's attention is a mixture too (``JetMoeMoA``); only the MLP blocks are viewed.
"""

from __future__ import annotations

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
    fused_gate_up,
)
from moelab.models.families._config import write_counts
from moelab.models.families._experts import fused_weights
from moelab.models.registry import FamilyAdapter
from moelab.models.view import MoEBlockView


def _install(block: MoEBlockView, run) -> list:
    """Rebuild ``ids_TK``/``weights_TK`` from the gating's expert-sorted outputs: it returns the
    sort permutation of the flattened ``[T*K]`` choices, the sorted gates and tokens per expert. An
    edited routing goes back in the same expert-sorted form."""

    def on_router(_mod, args, out):
        index_sorted, _batch_index, batch_gates, expert_size, logits = out
        T, K = logits.shape[0], block.top_k
        dev = logits.device
        sorted_ids = torch.repeat_interleave(
            torch.arange(len(expert_size), device=dev), torch.tensor(expert_size, device=dev)
        )
        ids = torch.empty(T * K, dtype=torch.int64, device=dev).scatter_(0, index_sorted, sorted_ids)
        gates = torch.zeros(T * K, dtype=batch_gates.dtype, device=dev).index_put(
            (index_sorted,), batch_gates
        )
        new = run(args[0], flat_routing(logits, ids.view(T, K), gates.view(T, K)))
        if new is None:
            return None
        return _sorted_form(new, block.num_experts, batch_gates.dtype, logits)

    return [block.router_module.register_forward_hook(on_router)]


def _sorted_form(routing, num_experts: int, dtype, logits):
    """JetMoE's gating outputs for a routing: (sort permutation, token of each sorted slot, sorted
    gates, tokens per expert, logits), as ``JetMoeTopKGating`` builds them."""
    ids_TK, w_TK = for_experts(routing, num_experts)
    K = ids_TK.shape[1]
    _, index_sorted = ids_TK.flatten().sort(0)
    batch_index = index_sorted.div(K, rounding_mode="trunc")
    batch_gates = w_TK.flatten().to(dtype)[index_sorted]
    expert_size = torch.bincount(ids_TK.flatten(), minlength=num_experts).tolist()
    return index_sorted, batch_index, batch_gates, expert_size, logits


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


_PARAMS = ("input_linear.weight", "output_linear.weight")


def experts_from_params(block: MoEBlockView, t: dict[str, Tensor]) -> ExpertWeights:
    return fused_weights(t["input_linear.weight"], t["output_linear.weight"])


def experts_weights(block: MoEBlockView) -> ExpertWeights:
    return experts_from_params(block, own_params(block, _PARAMS))


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
        write_config=write_counts,
        fixed_routing="JetMoE's config shares num_local_experts and num_experts_per_tok with its "
                      "attention experts (MoA)",
        experts_backend=ExpertsSpec(
            experts_weights, swap="block", forward=block_forward, params=_PARAMS,
            from_params=experts_from_params,
        ),
    ),
)
