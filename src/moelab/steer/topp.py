"""Top-p routing applied post hoc to a pretrained top-k model: "Harder Tasks Need More Experts:
Dynamic Routing in MoE Models" (Huang et al. 2024, arXiv:2403.07652).

Per token t, with router probabilities ``P_t`` over the E experts (the family's softmax; for a
sigmoid family its scores divided by their sum, :func:`moelab.steer.dyncount.router_probs`):

    sort the candidate experts descending  P_(1) >= P_(2) >= ...
    S_t = the smallest prefix {(1) .. (j)} with  P_(1) + ... + P_(j) >= p,   |S_t| <= cap

The candidates are the experts the family's own rule picks at ``cap`` experts per token (its
selection key: correction bias and groups included); ``cap`` defaults to the family's top-k, so a
token never gets more experts than the model was trained with unless the caller raises it. The
selection is :func:`moelab.nn.routers.top_p.top_p_select` (the one top-p rule, shared with the
trainable top-p router) on the candidates' probabilities.

Weights: the kept slots keep the family's own combine weights; with ``renormalize`` (default) they
are rescaled so each token's weights sum to what its k-slot routing summed to (for the families that
renormalise their top-k, L1, that is the family's own renormalisation over the kept experts); the
paper does not renormalise, which ``renormalize=False`` reproduces. ``p = 1`` with the default cap
keeps every slot: the identity.

Shape legend: T tokens, E experts, K slots per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView
from moelab.nn.routers.top_p import top_p_select
from moelab.routing import Routing
from moelab.steer.dyncount import per_layer_value, reselect_padded, router_probs
from moelab.steer.edit_kit import EditHandle, chosen_experts, edit_view, install_edit
from moelab.steer.edits import drop_slots


def top_p_keep(block: MoEBlockView, routing: Routing, p: float, cap: int) -> Tensor:
    """``[T, K]`` bool: the slots of ``routing`` (the candidates) that top-p keeps."""
    E = block.num_experts
    cand_TE = chosen_experts(routing, E)
    q_TE = router_probs(block, routing.logits_TE) * cand_TE
    keep_TE = top_p_select(q_TE, p, cap) & cand_TE
    return keep_TE.gather(1, routing.ids_TK.clamp(0, E - 1)) & routing.real_mask()


def top_p_routing(block: MoEBlockView, routing: Routing, p: float, cap: int | None = None,
                  renormalize: bool = True) -> Routing:
    """The routing top-p leaves one block's experts (see the module docstring)."""
    if routing.logits_TE is None:
        raise MoelabError(f"top_p: {block.path}: needs router logits")
    cap = block.top_k if cap is None else cap
    total_T1 = None
    if cap > block.top_k:
        total_T1 = routing.weights_TK.masked_fill(~routing.real_mask(), 0).sum(-1, keepdim=True)
        routing = reselect_padded(replace(block, top_k=cap), routing, cap)
    return drop_slots(routing, top_p_keep(block, routing, p, cap), renormalize, total_T1)


def top_p(model: ModelView | nn.Module, p: float | Mapping[int, float], *, cap: int | None = None,
          renormalize: bool = True) -> EditHandle:
    """Install top-p routing: ``p`` for every MoE layer, or ``{layer: p}``; ``cap`` (default: each
    block's top-k) bounds the experts per token. ``handle.active_experts()`` gives the average."""
    view = edit_view(model)

    def make(block: MoEBlockView, p_):
        if isinstance(p_, bool) or not isinstance(p_, (int, float)) or not 0 < p_ <= 1:
            raise MoelabError(f"top_p: layer {block.layer}: p must be a number in (0, 1], got {p_!r}")
        c = block.top_k if cap is None else cap
        if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= block.num_experts:
            raise MoelabError(f"top_p: layer {block.layer}: cap must be an integer in [1, E={block.num_experts}], "
                              f"got {c!r}")
        return lambda block, hidden_TH, routing: (top_p_routing(block, routing, float(p_), c, renormalize), {})

    return install_edit(view, "top_p", per_layer_value(view, p), make)


def top_p_reference(probs_TE: Tensor, ids_TK: Tensor, real_TK: Tensor, p: float, cap: int) -> Tensor:
    """Slow per-token reference of :func:`top_p_keep` (tests): walk each token's candidate slots in
    descending probability, keep while the mass before the slot is below ``p`` and fewer than
    ``cap`` are kept."""
    keep = torch.zeros_like(real_TK)
    for t in range(ids_TK.shape[0]):
        slots = [k for k in range(ids_TK.shape[1]) if real_TK[t, k]]
        slots.sort(key=lambda k: -float(probs_TE[t, ids_TK[t, k]]))
        mass = 0.0
        for n, k in enumerate(slots):
            if n > 0 and (mass >= p or n >= cap):
                break
            keep[t, k] = True
            mass += float(probs_TE[t, ids_TK[t, k]])
    return keep


__all__ = ["top_p", "top_p_keep", "top_p_reference", "top_p_routing"]
