"""Stock routing edits: switch experts off or on, offset router logits, scale combine weights, skip
weak slots. Each works on every supported family through ``block.register_routing_edit``.

Shape legend: T tokens, E experts, K slots per token.

    experts_off(view, {layer: [e, ...]})      the experts receive no token: the family's routing
                                             proceeds as if their logits were -inf
    experts_on(view, {layer: [e, ...]})       forced into every token's top-k (at most top-k)
    logit_offsets(view, {layer: offset_E})    logits + offset_E, experts re-chosen by the family's
                                             rule; offset_E may require grad
    scale_weights(view, {layer: {e: f}})      w_tk *= f[ids_tk] (RICE-style reinforcement; no
                                             renormalisation)
    route_to_rank(view, {layer: r})           every token goes to one expert, the r-th the family's
                                             rule prefers (from 0), weighted as the rule weights a
                                             top-1 choice (SCMoE's weak pass)
    skip_below(view, {layer: beta})           NAEE dynamic skipping (Lu et al. 2024, section 3.2):
                                             a non-first slot is switched off when w_k < beta * w_1;
                                             with ``renormalize`` the kept weights are rescaled to
                                             the token's original total

The building blocks other steering modules use to write their own edits (:func:`install_edit`:
validate every layer's argument, then register one counting edit per layer; :func:`edit_view`,
:func:`check_expert_ids`, :func:`expert_flags`, :func:`chosen_experts`) are in
:mod:`moelab.steer.edit_kit` and re-exported here.

Each returns an :class:`EditHandle`: ``remove()`` (once) or a ``with`` block, and ``counts``: per
layer the tokens seen, the tokens ``affected``: whose set of experts the edit changed
(``scale_weights``: routed to a scaled expert), and the ``active`` real slots after the edit
(``active_experts()``: their average per token). ``weak_slots`` / ``drop_slots`` are the pieces of
``skip_below`` that the dynamic expert-count edits (``moelab.steer.mcmoe``, ``topp``, ``topany``)
build on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView
from moelab.models.edits import reselect
from moelab.models.rule import selection_order, single_expert
from moelab.routing import Routing
from moelab.steer.edit_kit import (
    EditBody,
    EditHandle,
    barred_chosen,
    check_expert_ids,
    chosen_experts,
    edit_view,
    expert_flags,
    install_edit,
    off_constants,
    plain_selection,
    selection_counts_exact,
    tokens_choosing,
    weights_ignore_unchosen,
)


def experts_off(model: ModelView | nn.Module, experts: Mapping[int, Iterable[int]]) -> EditHandle:
    """Switch experts off: ``{layer: [expert, ...]}``; routing proceeds as if their logits were -inf."""
    view = edit_view(model)

    def make(block: MoEBlockView, value) -> EditBody:
        off = check_expert_ids(block, value, "experts_off")
        if block.num_experts - len(off) < block.top_k:
            raise MoelabError(
                f"experts_off: layer {block.layer}: switching off {len(off)} of {block.num_experts} "
                f"experts leaves fewer than top_k={block.top_k}"
            )

        unchanged_if_unchosen = weights_ignore_unchosen(block)
        consts: dict = {}  # per (device, dtype) of the logits: (off_E bool, offset_E: -inf where off)

        def body(block, hidden_TH, routing):
            logits = routing.logits_TE
            off_E, offset_E = consts.get((logits.device, logits.dtype)) or off_constants(block, off, logits, consts)
            extra = {}
            if unchanged_if_unchosen:
                # NOTE: the fast path of a decode step: where the family's weights ignore unchosen
                # logits, exactly the tokens that chose a switched-off expert change, so a step where
                # none did keeps its routing (and the count needs no comparison)
                extra["affected"] = tokens_choosing(off_E, routing, block.num_experts)
                if extra["affected"] == 0:
                    return routing, extra
            # logits + offset_E is logits.masked_fill(off_E, -inf) for finite logits, in one cheap op
            return reselect(block, routing.replace(logits_TE=logits + offset_E)), extra

        def preselect(block, logits):  # the rule on logits + offset_E: the same routing as body's
            off_E, offset_E = consts.get((logits.device, logits.dtype)) or off_constants(block, off, logits, consts)
            return logits + offset_E, offset_E, off_E

        if selection_counts_exact(block):
            body.preselect = preselect
        return body

    return install_edit(view, "experts_off", experts, make)


def experts_on(model: ModelView | nn.Module, experts: Mapping[int, Iterable[int]]) -> EditHandle:
    """Force experts into every token's top-k: ``{layer: [expert, ...]}``, at most top-k per layer."""
    view = edit_view(model)

    def make(block: MoEBlockView, value) -> EditBody:
        on = check_expert_ids(block, value, "experts_on")
        if len(on) > block.top_k:
            raise MoelabError(
                f"experts_on: layer {block.layer}: {len(on)} experts forced but a token has only "
                f"top_k={block.top_k} slots"
            )

        def body(block, hidden_TH, routing):
            return reselect(block, routing, forced_E=expert_flags(block, on, routing.ids_TK)), {}

        return body

    return install_edit(view, "experts_on", experts, make)


def logit_offsets(model: ModelView | nn.Module, offsets: Mapping[int, Tensor]) -> EditHandle:
    """Add ``offset_E`` to the router logits of each layer; the experts are re-chosen by the family's
    rule. Offsets may require grad (test-time routing optimises them)."""
    view = edit_view(model)

    def make(block: MoEBlockView, offset) -> EditBody:
        if not isinstance(offset, Tensor) or offset.shape != (block.num_experts,):
            got = tuple(offset.shape) if isinstance(offset, Tensor) else type(offset).__name__
            raise MoelabError(
                f"logit_offsets: layer {block.layer}: expected a tensor of shape [E={block.num_experts}], "
                f"got {got}"
            )
        if not offset.is_floating_point() or not bool(torch.isfinite(offset.detach()).all()):
            raise MoelabError(f"logit_offsets: layer {block.layer}: offsets must be finite floats")

        def body(block, hidden_TH, routing):
            logits = routing.logits_TE
            shifted = logits + offset.to(device=logits.device, dtype=logits.dtype)
            return reselect(block, routing.replace(logits_TE=shifted)), {}

        return body

    return install_edit(view, "logit_offsets", offsets, make)


def scale_weights(model: ModelView | MoEBlockView | nn.Module,
                  factors: Mapping[int, Mapping[int, float]]) -> EditHandle:
    """Multiply experts' combine weights: ``{layer: {expert: factor}}`` (RICE reinforcement).

    As a block's first edit where the family's selection is one top-k (:func:`plain_selection`) and
    its adapter knows the router's logits, the router's selection is stood in for by the family's
    rule (:mod:`moelab.models.edits`) and the weights are scaled there: the same experts and
    weights as the family's up to its float32 routing's rounding, in the rule's slot order."""
    view = edit_view(model)

    def make(block: MoEBlockView, value) -> EditBody:
        if not isinstance(value, Mapping):
            raise MoelabError(
                f"scale_weights: layer {block.layer}: expected {{expert: factor}}, got {type(value).__name__}"
            )
        check_expert_ids(block, list(value), "scale_weights")
        for e, f in value.items():
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f):
                raise MoelabError(f"scale_weights: layer {block.layer}: factor of expert {e} is {f!r}, "
                                  "expected a finite number")
        scale = torch.ones(block.num_experts, dtype=torch.float64)
        for e, f in value.items():
            scale[e] = float(f)
        scales: dict = {}  # scale_E per (device, dtype) of the weights, made once
        flags: dict = {}  # scaled_E (bool) per device

        def scale_E(w: Tensor) -> Tensor:
            got = scales.get((w.device, w.dtype))
            if got is None:
                got = scales[(w.device, w.dtype)] = scale.to(device=w.device, dtype=w.dtype)
            return got

        def scaled_E(ids: Tensor) -> Tensor:
            got = flags.get(ids.device)
            if got is None:
                got = flags[ids.device] = (scale != 1).to(ids.device)
            return got

        def body(block, hidden_TH, routing):
            w = routing.weights_TK
            ids_TK = routing.ids_TK if routing.mask_TK is None else routing.ids_TK.clamp(0, block.num_experts - 1)
            # a switched-off slot's weight is 0, so scaling it is harmless
            return routing.replace(weights_TK=w * scale_E(w).take(ids_TK)), \
                {"affected": tokens_choosing(scaled_E(ids_TK), routing, block.num_experts)}

        if plain_selection(block):
            # a selection edit that bars nothing: the router's selection is stood in for by the
            # family's rule and the weights are scaled there (``reweight``), so the experts' pre-hook
            # has no edited routing to hand over (moelab.models.edits)
            body.preselect = lambda block, logits: (logits, None, None)
            body.reweight = lambda block, ids_TK, w_TK: w_TK * scale_E(w_TK).take(ids_TK)  # every slot real
            body.affected = lambda block, out: tokens_choosing(scaled_E(out.ids_TK), out, block.num_experts)
        return body

    return install_edit(view, "scale_weights", factors, make)


def skip_below(model: ModelView | nn.Module, beta: Mapping[int, float],
               renormalize: bool = True) -> EditHandle:
    """NAEE dynamic skipping: ``{layer: beta}``; counts add ``candidates`` (non-first slots) and
    ``skipped`` slots, so ``skipped / candidates`` is the paper's skip rate."""
    view = edit_view(model)

    def make(block: MoEBlockView, b) -> EditBody:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b <= 1:
            raise MoelabError(f"skip_below: layer {block.layer}: beta must be a number in [0, 1], got {b!r}")
        return lambda block, hidden_TH, routing: _skip(routing, float(b), renormalize)

    return install_edit(view, "skip_below", beta, make)


def _skip(r: Routing, beta: float, renormalize: bool) -> tuple[Routing, dict[str, int]]:
    weak_TK, candidates_TK = weak_slots(r, beta)
    extra = {"candidates": int(candidates_TK.sum()), "skipped": int(weak_TK.sum())}
    return drop_slots(r, r.real_mask() & ~weak_TK, renormalize), extra


def weak_slots(r: Routing, beta: float | Tensor) -> tuple[Tensor, Tensor]:
    """``(weak_TK, candidates_TK)``: the non-first real slots (``candidates``; the first is the
    token's largest weight) and those among them with ``w_k < beta * w_1`` (``beta`` a number or
    a ``[T, 1]`` tensor)."""
    real_TK = r.real_mask()
    masked_TK = r.weights_TK.detach().float().masked_fill(~real_TK, -math.inf)
    first_TK = torch.zeros_like(real_TK).scatter(1, masked_TK.argmax(-1, keepdim=True), True)
    candidates_TK = real_TK & ~first_TK
    return candidates_TK & (masked_TK < beta * masked_TK.max(-1, keepdim=True).values), candidates_TK


def drop_slots(r: Routing, keep_TK: Tensor, renormalize: bool, total_T1: Tensor | None = None) -> Routing:
    """Switch off the real slots where ``keep_TK`` is False; ``r`` itself when none is dropped.

    With ``renormalize`` the kept weights are rescaled to the token's original total
    (``w_k * sum_j w_j / sum_kept w_j``; ``total_T1`` overrides ``sum_j w_j``): for a family that
    renormalises its top-k weights (L1) this is its own renormalisation over the kept experts.
    """
    real_TK = r.real_mask()
    keep_TK = keep_TK & real_TK
    if total_T1 is None and bool((keep_TK == real_TK).all()):
        return r
    w_TK = r.weights_TK
    new_TK = w_TK.masked_fill(~keep_TK, 0)
    if renormalize:
        if total_T1 is None:
            total_T1 = w_TK.masked_fill(~real_TK, 0).sum(-1, keepdim=True)
        new_TK = new_TK * (total_T1 / new_TK.sum(-1, keepdim=True))
    return r.replace(weights_TK=new_TK, mask_TK=keep_TK)


def route_to_rank(model: ModelView | nn.Module, ranks: Mapping[int, int]) -> EditHandle:
    """Top-1 routing to each token's rank-r expert: ``{layer: r}`` (r = 0 is the rule's first choice).

    The token's slot 0 holds that expert with the weight the family's rule gives a lone choice
    (:func:`moelab.models.rule.single_expert`); its other slots are switched off. A token for which
    the rule cannot choose a rank-r expert (outside its groups, or a ``-inf`` logit) is an error.
    """
    view = edit_view(model)

    def make(block: MoEBlockView, r) -> EditBody:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < block.num_experts:
            raise MoelabError(f"route_to_rank: layer {block.layer}: rank must be an int in "
                              f"[0, {block.num_experts}) (the layer has {block.num_experts} experts), got {r!r}")

        def body(block, hidden_TH, routing):
            if routing.logits_TE is None:
                raise MoelabError(f"route_to_rank: {block.path}: the family gives no router logits")
            order_TE, ok_TE = selection_order(block, routing.logits_TE)
            if not bool(ok_TE[:, r].all()):
                raise MoelabError(f"route_to_rank: layer {block.layer}: rank {r} is outside what the "
                                  "routing rule can choose for some tokens (group-limited or -inf logits)")
            ids_TK = routing.ids_TK.clone()
            ids_TK[:, 0] = order_TE[:, r]
            logits = routing.logits_TE
            w_T = single_expert(block, logits.to(torch.promote_types(logits.dtype, torch.float32)), ids_TK[:, 0])
            w_TK = torch.zeros_like(routing.weights_TK)
            w_TK[:, 0] = w_T.to(w_TK.dtype)
            mask_TK = torch.zeros_like(ids_TK, dtype=torch.bool)
            mask_TK[:, 0] = True
            return routing.replace(ids_TK=ids_TK, weights_TK=w_TK, mask_TK=mask_TK), {}

        return body

    return install_edit(view, "route_to_rank", ranks, make)


__all__ = ["EditBody", "EditHandle", "check_expert_ids", "chosen_experts", "drop_slots", "edit_view",
           "expert_flags", "experts_off", "experts_on", "install_edit", "logit_offsets", "off_constants",
           "route_to_rank",
           "barred_chosen", "plain_selection", "scale_weights", "selection_counts_exact", "skip_below", "tokens_choosing",
           "weak_slots", "weights_ignore_unchosen"]
