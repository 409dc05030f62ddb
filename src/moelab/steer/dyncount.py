"""What the dynamic expert-count edits share: fixed top-k' baselines, router probabilities, and
counting the active experts per token.

Shape legend: T tokens, E experts, K slots per token.

    fixed_top_k(view, k')          the family's own rule at k' experts per token (k' <= top_k; the
                                   top-(k-1) baseline): ids/weights re-selected from the logits
                                   (renormalised as the family renormalises), padded to K with
                                   switched-off slots so every family's experts take it unchanged
    router_probs(block, logits)    a probability distribution over the E experts: the family's
                                   softmax, or its sigmoid scores divided by their sum
    active_per_token(view, ...)    average real (routed) slots per token, per layer, from routing
                                   hooks: what any edit, or none, left the experts

The methods themselves are :mod:`moelab.steer.mcmoe`, :mod:`moelab.steer.topp` and
:mod:`moelab.steer.topany`; each is a routing edit returning a :class:`moelab.steer.EditHandle`
whose ``active_experts()`` reports the same average.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView
from moelab.models.rule import select
from moelab.routing import Routing
from moelab.run import run_batches
from moelab.steer.edit_kit import EditHandle, edit_view, install_edit


def per_layer_value(view: ModelView, value) -> dict:
    """``value`` for every MoE layer when it is not already a ``{layer: value}`` mapping."""
    if isinstance(value, Mapping):
        return dict(value)
    return {b.layer: value for b in view.blocks}


def fixed_top_k(model: ModelView | nn.Module, k: int | Mapping[int, int]) -> EditHandle:
    """Route every token of the given layers to ``k`` experts by the family's own rule (``k <= top_k``);
    ``k == top_k`` leaves the routing as it is."""
    view = edit_view(model)

    def make(block: MoEBlockView, k_):
        if isinstance(k_, bool) or not isinstance(k_, int) or not 1 <= k_ <= block.top_k:
            raise MoelabError(f"fixed_top_k: layer {block.layer}: k must be an integer in "
                              f"[1, top_k={block.top_k}], got {k_!r}")
        fewer = replace(block, top_k=k_)

        def body(block, hidden_TH, routing):
            if k_ == block.top_k:
                return routing, {}
            return reselect_padded(fewer, routing, block.top_k), {}

        return body

    return install_edit(view, "fixed_top_k", per_layer_value(view, k), make)


def reselect_padded(block: MoEBlockView, routing: Routing, slots: int) -> Routing:
    """The experts chosen again by ``block``'s rule at ``block.top_k`` experts, padded (or not) to
    ``slots`` columns with switched-off slots of weight 0."""
    if routing.logits_TE is None:
        raise MoelabError(f"{block.path}: re-selecting experts needs router logits")
    ids_TK, w_TK, mask_TK = select(block, routing.logits_TE)
    pad = slots - ids_TK.shape[1]
    if pad > 0:
        ids_TK = torch.cat([ids_TK, ids_TK[:, :1].expand(-1, pad)], dim=1)
        w_TK = torch.cat([w_TK, w_TK.new_zeros(w_TK.shape[0], pad)], dim=1)
        mask_TK = torch.cat([mask_TK, mask_TK.new_zeros(mask_TK.shape[0], pad)], dim=1)
    return Routing(routing.logits_TE, ids_TK, w_TK.to(routing.weights_TK.dtype), mask_TK, routing.aux)


def router_probs(block: MoEBlockView, logits_TE: Tensor) -> Tensor:
    """``[T, E]`` float32 probabilities: softmax (softmax and SparseMixer families) or the sigmoid
    scores normalised to sum 1 (sigmoid families); a ``-inf`` logit gets probability 0."""
    z_TE = logits_TE.detach().float()
    if block.scoring == "sigmoid":
        s_TE = torch.sigmoid(z_TE)
        return s_TE / s_TE.sum(-1, keepdim=True)
    return torch.softmax(z_TE, dim=-1)


def active_per_token(view: ModelView, batches: Iterable[Tensor]) -> dict[int, float]:
    """Average real slots per token in every MoE layer over ``batches`` (``[B, S]`` token ids),
    counted from routing hooks, i.e. after every installed routing edit."""
    sums = {b.layer: [0, 0] for b in view.blocks}

    def count(ev) -> None:
        s = sums[ev.block.layer]
        s[0] += int(ev.routing.real_mask().sum())
        s[1] += int(ev.ids_TK.shape[0])

    hooks = [b.register_routing_hook(count) for b in view.blocks]
    run_batches(view.model, batches, handles=hooks, use_cache=False)
    return {layer: a / t for layer, (a, t) in sums.items() if t}


def mean_over_layers(per_layer: Mapping[int, float]) -> float:
    """The plain mean of a per-layer figure (every MoE layer sees every token once)."""
    if not per_layer:
        raise MoelabError("no MoE layer was counted")
    return sum(per_layer.values()) / len(per_layer)


__all__ = ["active_per_token", "fixed_top_k", "mean_over_layers", "per_layer_value", "reselect_padded",
           "router_probs"]
