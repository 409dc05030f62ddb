"""A block's own selection rule, from router logits to ``(ids, weights)``, written from the view.

Shape legend: T tokens, E experts, K top-k, G groups.

One function serves both the float64 oracle (:func:`moelab.models.reference_route` calls it on
float64 logits) and routing edits that change logits (:func:`select`, differentiable, run in the
logits' own dtype, at least float32 as every family's softmax is). Because the oracle matches each
family's own block, so does this rule.

The rule, in the view's convention: ``scores = softmax|sigmoid(logits)``; selection on ``scores
(+ correction_bias)``, optionally group-limited; weights are the chosen scores, renormalised as
``w / max(||w||_p, norm_min)`` when ``norm_topk_prob``, times ``routed_scaling_factor``. PhiMoE's
SparseMixer has its own rounds (:func:`sparsemixer_select`).

Three extensions routing edits need, all no-ops on plain logits:
    * an expert whose logit is ``-inf`` is never chosen (not even through a correction bias); a slot
      left with no finite choice is masked (weight 0, ``mask`` False);
    * ``forced_E`` (bool ``[E]``) puts those experts first in every token's selection; their weight is
      still their own score;
    * ``barred_E`` (bool ``[E]``) keeps those experts out of every token's selection while their
      (finite) logits still count in the scores, e.g. in a softmax's denominator (SteerMoE's soft
      "off", :mod:`moelab.steer.switch`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from moelab.models.view import MoEBlockView

_NEG = float("-inf")


def sparsemixer_select(
    logits_TE: Tensor, top_k: int, jitter_eps: float, choice_TE: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """PhiMoE's SparseMixer routing at inference (Liu et al. 2023, "Sparse Backpropagation for MoE
    Training"): for each of k rounds pick the expert m with the largest choice key (the logit) among
    those not yet taken; its weight is a softmax over the experts whose logit lies within
    ``2 * jitter_eps`` of m's relative to ``max(|logit|, m)``, the already-taken ones excluded.
    ``choice_TE`` (default: the logits) lets forced experts come first and barred ones never.
    """
    key = (logits_TE if choice_TE is None else choice_TE).clone()
    masked = logits_TE.clone()
    ids, weights = [], []
    for _ in range(top_k):
        idx = key.argmax(dim=-1, keepdim=True)
        m = logits_TE.gather(-1, idx)
        factor = logits_TE.abs().clamp(min=m)
        drop = ((m - logits_TE) / factor) > (2 * jitter_eps)
        gated = masked.masked_fill(drop, _NEG)
        weights.append(torch.softmax(gated, dim=-1).gather(-1, idx))
        ids.append(idx)
        masked = masked.scatter(-1, idx, _NEG)
        key = key.scatter(-1, idx, _NEG)
    return torch.cat(ids, -1), torch.cat(weights, -1)


def group_mask(sel_TE: Tensor, n_group: int, topk_group: int, group_score: str) -> Tensor:
    """Keep only the experts in each token's ``topk_group`` best groups (others set to -inf)."""
    T, E = sel_TE.shape
    grouped_TGX = sel_TE.view(T, n_group, E // n_group)
    if group_score == "max":
        score_TG = grouped_TGX.max(dim=-1).values
    elif group_score == "top2_sum":
        score_TG = grouped_TGX.topk(2, dim=-1).values.sum(dim=-1)
    else:
        raise ValueError(f"unknown group_score {group_score!r}")
    keep_TG = torch.zeros_like(score_TG, dtype=torch.bool)
    keep_TG.scatter_(1, score_TG.topk(topk_group, dim=-1).indices, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    return sel_TE.masked_fill(~keep_TE, _NEG)


def route_logits(
    block: MoEBlockView, logits_TE: Tensor, forced_E: Tensor | None = None,
    barred_E: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids_TK int64, weights_TK, mask_TK bool)`` by the block's rule, in ``logits_TE``'s dtype."""
    ids_TK, w_TK, mask_TK = _route(block, logits_TE, forced_E, barred_E)
    return ids_TK, w_TK, torch.ones_like(ids_TK, dtype=torch.bool) if mask_TK is None else mask_TK


def _route(
    block: MoEBlockView, logits_TE: Tensor, forced_E: Tensor | None, barred_E: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`route_logits` with ``mask_TK`` None when every slot is real."""
    k = block.top_k
    off_TE = torch.isneginf(logits_TE)
    if barred_E is not None:
        off_TE = off_TE | barred_E
    if block.scoring == "sparsemixer":
        choice = logits_TE if forced_E is None else logits_TE.masked_fill(forced_E, float("inf"))
        choice = choice.masked_fill(off_TE, _NEG)
        ids_TK, w_TK = sparsemixer_select(logits_TE, k, block.scoring_params["jitter_eps"], choice)
        mask_TK = ~off_TE.gather(-1, ids_TK)
        return ids_TK, w_TK * block.routed_scaling_factor * mask_TK, mask_TK
    scores_TE, sel_TE = _keys(block, logits_TE, forced_E, off_TE)
    key_TK, ids_TK = sel_TE.topk(k, dim=-1)
    w_TK = scores_TE.gather(-1, ids_TK)
    # NOTE: a decode step runs this once per MoE layer, so each op saved is a visible share of it:
    # the slots are masked only when one has no finite choice, the L1 norm of the (non-negative)
    # scores is a plain sum, a scaling factor of 1 is not multiplied (the same numbers either way)
    mask_TK = key_TK != _NEG
    if bool(mask_TK.all()):
        mask_TK = None
    else:
        w_TK = torch.where(mask_TK, w_TK, 0.0)
    return ids_TK, _normalised(block, w_TK), mask_TK


def _normalised(block: MoEBlockView, w_TK: Tensor) -> Tensor:
    """The chosen scores as combine weights: ``w / max(||w||_p, norm_min)`` when ``norm_topk_prob``,
    times ``routed_scaling_factor``."""
    if block.norm_topk_prob:
        if block.norm_p == 1:
            norm = w_TK.sum(-1, keepdim=True)
        else:
            norm = w_TK.abs().pow(block.norm_p).sum(-1, keepdim=True).pow(1.0 / block.norm_p)
        w_TK = w_TK / norm.clamp(min=block.norm_min if block.norm_min > 0 else 1e-30)
    if block.routed_scaling_factor != 1:
        w_TK = w_TK * block.routed_scaling_factor
    return w_TK


def select_barred(block: MoEBlockView, logits_TE: Tensor, offset_E: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(ids_TK, weights_TK)``: :func:`select_slots` with ``barred_E = isneginf(offset_E)`` (None:
    none barred), the barring done by adding ``offset_E`` (0, or -inf where barred) to the selection key: one op where
    the general rule tests every logit and masks the key. At least float32, differentiable.

    For selection edits (:mod:`moelab.models.edits`), which guarantee what the general rule would
    otherwise check: no group-limited routing or SparseMixer, -inf logits only where barred, and at
    least ``top_k`` experts not barred (so every slot is real: no ``mask_TK``). Then the key and so
    the ids and weights are the general rule's, bit for bit (``x + 0 == x``, ``x - inf == -inf``)."""
    if logits_TE.dtype not in (torch.float32, torch.float64):
        logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
    if block.scoring == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE)
    key_TE = scores_TE
    if block.correction_bias is not None:
        key_TE = scores_TE + block.correction_bias.to(scores_TE.dtype)
    ids_TK = (key_TE if offset_E is None else key_TE + offset_E).topk(block.top_k, dim=-1).indices
    return ids_TK, _normalised(block, scores_TE.gather(-1, ids_TK))


def _keys(block: MoEBlockView, logits_TE: Tensor, forced_E: Tensor | None = None,
          off_TE: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(scores_TE, sel_TE)``: the scores weights come from, and the key experts are chosen by
    (scores + correction bias, forced experts +inf, the experts ``off_TE`` (default: -inf logits)
    and those outside the best groups -inf). Not for SparseMixer, whose rounds have no single key."""
    if block.scoring == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    elif block.scoring == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
    else:
        raise ValueError(f"unknown scoring {block.scoring!r}")
    sel_TE = scores_TE
    if block.correction_bias is not None:  # a view's tensors are detached views of the model's
        sel_TE = scores_TE + block.correction_bias.to(scores_TE.dtype)
    if forced_E is not None:
        sel_TE = torch.where(forced_E, float("inf"), sel_TE)
    sel_TE = torch.where(torch.isneginf(logits_TE) if off_TE is None else off_TE, _NEG, sel_TE)
    if block.n_group is not None and block.n_group > 1:
        sel_TE = group_mask(sel_TE, block.n_group, block.topk_group, block.group_score)
    return scores_TE, sel_TE


def selection_order(block: MoEBlockView, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
    """``(ids_TE, selectable_TE)``: every token's experts in the order the block's rule prefers them
    (its first ``top_k`` are the ones :func:`route_logits` chooses), and whether the rule could choose
    that expert at all (False past a ``-inf`` logit or outside the token's best groups)."""
    if block.scoring == "sparsemixer":  # each round takes the largest remaining logit
        key_TE, ids_TE = logits_TE.sort(dim=-1, descending=True)
    else:
        key_TE, ids_TE = _keys(block, logits_TE)[1].sort(dim=-1, descending=True)
    return ids_TE, ~torch.isneginf(key_TE)


def single_expert(block: MoEBlockView, logits_TE: Tensor, ids_T: Tensor) -> Tensor:
    """``weights_T``: the weight the block's rule gives expert ``ids_T[t]`` when it is token t's only
    expert (the rule at top-1 with that expert chosen), in ``logits_TE``'s dtype."""
    idx_T1 = ids_T.unsqueeze(-1)
    if block.scoring == "sparsemixer":
        choice_TE = logits_TE.scatter(-1, idx_T1, float("inf"))
        w_T1 = sparsemixer_select(logits_TE, 1, block.scoring_params["jitter_eps"], choice_TE)[1]
    else:
        w_T1 = _keys(block, logits_TE)[0].gather(-1, idx_T1)
        if block.norm_topk_prob:  # ||w||_p of one weight is |w|
            w_T1 = w_T1 / w_T1.abs().clamp(min=block.norm_min if block.norm_min > 0 else 1e-30)
    return w_T1.squeeze(-1) * block.routed_scaling_factor


def select(
    block: MoEBlockView, logits_TE: Tensor, forced_E: Tensor | None = None,
    barred_E: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`route_logits` at no less than float32 (every family's softmax runs in float32 at least),
    differentiable in the logits; weights come back in that compute dtype."""
    compute = torch.promote_types(logits_TE.dtype, torch.float32)
    return route_logits(block, logits_TE.to(compute), forced_E, barred_E)


def select_slots(
    block: MoEBlockView, logits_TE: Tensor, forced_E: Tensor | None = None,
    barred_E: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`select` with ``mask_TK`` None when every slot is real (a :class:`Routing`'s convention)."""
    if logits_TE.dtype not in (torch.float32, torch.float64):
        logits_TE = logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32))
    return _route(block, logits_TE, forced_E, barred_E)


__all__ = ["group_mask", "route_logits", "select", "select_barred", "select_slots", "selection_order", "single_expert", "sparsemixer_select"]
