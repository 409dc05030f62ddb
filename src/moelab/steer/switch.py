"""SteerMoE switching: force experts on or off by moving their router logits to the edge of the row.

SteerMoE (Fayyaz et al. 2025, "Steering MoE LLMs via Expert (De)Activation", arXiv 2509.09660;
adobe-research/SteerMoE, ``src/modeling_vllm/qwen3_moe.py``) edits the log-softmax of the router
logits of every token before top-k selection::

    s_TE = log_softmax(logits_TE)
    s[t, e] = max_e' s[t, e'] + delta     for an "on" expert e   (the paper: delta = 0.01)
    s[t, e] = min_e' s[t, e'] - delta     for an "off" expert e

then routes with the model's own rule on ``s``. ``log_softmax`` shifts a row by a constant, so for a
softmax router the edit on ``s`` equals the same edit on the logits themselves; moelab applies it to
the logits, which keeps it meaningful for sigmoid routers (DeepSeek-V3, GLM4-MoE: the score is
monotone in the logit, and a shifted row would change every score). The maximum and minimum are over
the token's unedited logits. ``strength`` is delta (>= 0, in logit units / nats).

The edit goes through the routing seam (:mod:`moelab.models.edits`): the family's own rule
(:func:`moelab.models.rule.select`) chooses again from the edited logits, with the "on" experts forced
into every token's selection and the "off" ones barred from it, so a correction bias, group-limited
selection or SparseMixer cannot overrule the switch. What the weights then do, family by family:

    on, softmax scoring      the on expert's score is the row's largest: ``p_on = e^delta p_max / Z'``;
                             as delta grows, it takes all of the token's weight (``-> routed_scaling``)
    on, sigmoid scoring      the on expert's score is ``sigmoid(max + delta)`` (``-> 1``); the others
                             keep theirs (renormalised with it when ``norm_topk_prob``)
    off, softmax scoring     the expert keeps ``e^(min - delta) / Z`` of the softmax mass, so without
                             ``norm_topk_prob`` the kept weights shrink by that share; as delta grows
                             this equals the hard mask :func:`moelab.steer.experts_off`
    off, sigmoid scoring     not chosen; the other weights are unchanged: equal to ``experts_off``

Hard masks (:func:`moelab.steer.experts_off` / :func:`moelab.steer.experts_on`) are the other mode:
off removes the expert from the softmax entirely, on forces it in with its own score.

Shape legend: T tokens, E experts, K slots per token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView
from moelab.models.edits import reselect
from moelab.routing import Routing
from moelab.steer.edit_kit import (
    EditBody,
    EditHandle,
    check_expert_ids,
    edit_view,
    expert_flags,
    install_edit,
    off_constants,
    selection_counts_exact,
    tokens_choosing,
    weights_ignore_unchosen,
)

STEERMOE_DELTA = 0.01  # the delta of SteerMoE's released vLLM patches


def switched_logits(logits_TE: Tensor, on_E: Tensor | None, off_E: Tensor | None, strength: float) -> Tensor:
    """SteerMoE's edited logits: ``on`` columns at the row max + strength, ``off`` at the row min -
    strength (max and min over the unedited row); other columns unchanged. ``on_E``/``off_E``: bool
    ``[E]`` or None for none."""
    out = logits_TE
    if on_E is not None:
        top_T1 = logits_TE.amax(dim=-1, keepdim=True)  # amax: no indices, a quarter of max's time
        out = torch.where(on_E, top_T1 + strength, out)
    if off_E is not None:
        low_T1 = logits_TE.amin(dim=-1, keepdim=True)
        out = torch.where(off_E, low_T1 - strength, out)
    return out


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength < 0:
        raise MoelabError(f"switch_experts: strength must be a finite number >= 0, got {strength!r}")
    return float(strength)


def switch_experts(model: ModelView | MoEBlockView | nn.Module,
                   on: Mapping[int, Iterable[int]] | None = None,
                   off: Mapping[int, Iterable[int]] | None = None,
                   strength: float = STEERMOE_DELTA) -> EditHandle:
    """SteerMoE soft switching (see the module docstring): ``on``/``off`` map a layer to expert ids.

    At most ``top_k`` experts on per layer, and at least ``top_k`` left after switching some off;
    an expert may not be both. Returns an :class:`EditHandle` (``remove()``, ``with``, ``counts``).
    """
    view = edit_view(model)
    strength = _check_strength(strength)
    on, off = dict(on or {}), dict(off or {})
    if not on and not off:
        raise MoelabError("switch_experts: give experts to switch on or off (on={layer: [e]}, off=...)")
    layers = sorted(set(on) | set(off), key=lambda x: (not isinstance(x, int), str(x)))

    def make(block: MoEBlockView, layer) -> EditBody:
        ons = check_expert_ids(block, on.get(layer, []), "switch_experts (on)")
        offs = check_expert_ids(block, off.get(layer, []), "switch_experts (off)")
        both = sorted(set(ons) & set(offs))
        if both:
            raise MoelabError(f"switch_experts: layer {block.layer}: experts {both} are both on and off")
        if len(ons) > block.top_k:
            raise MoelabError(f"switch_experts: layer {block.layer}: {len(ons)} experts on but a token has "
                              f"only top_k={block.top_k} slots")
        if block.num_experts - len(offs) < block.top_k:
            raise MoelabError(f"switch_experts: layer {block.layer}: switching off {len(offs)} of "
                              f"{block.num_experts} experts leaves fewer than top_k={block.top_k}")

        flags: dict[torch.device, tuple[Tensor | None, Tensor | None]] = {}  # per device, made once
        # off only, where the family's weights ignore unchosen logits: a token that chose no switched-off
        # expert keeps its routing (as with experts_off), so a decode step usually skips the re-selection
        shortcut = not ons and weights_ignore_unchosen(block)

        def body(block: MoEBlockView, hidden_TH: Tensor, routing: Routing):
            logits = routing.logits_TE
            if logits is None:
                raise MoelabError(f"{block.path}: switch_experts needs router logits")
            if logits.device not in flags:
                flags[logits.device] = (expert_flags(block, ons, logits) if ons else None,
                                        expert_flags(block, offs, logits) if offs else None)
            on_E, off_E = flags[logits.device]
            extra = {}
            if shortcut:
                extra["affected"] = tokens_choosing(off_E, routing, block.num_experts)
                if extra["affected"] == 0:
                    return routing, extra
            edited = switched_logits(logits, on_E, off_E, strength)
            return reselect(block, routing.replace(logits_TE=edited), forced_E=on_E, barred_E=off_E), extra

        bars: dict = {}  # per (device, dtype) of the logits: (off_E, offset_E), made once

        def preselect(block: MoEBlockView, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            off_E, offset_E = bars.get((logits.device, logits.dtype)) or off_constants(block, offs, logits, bars)
            return switched_logits(logits, None, off_E, strength), offset_E, off_E

        if not ons and selection_counts_exact(block):  # off only: a selection edit
            body.preselect = preselect
        return body

    return install_edit(view, "switch_experts", {layer: layer for layer in layers}, make)


def switched_logits_reference(logits_TE: Tensor, on: list[int], off: list[int], strength: float) -> Tensor:
    """Slow, obvious :func:`switched_logits`: one token at a time, in Python floats (float64)."""
    out = logits_TE.detach().to(torch.float64).clone()
    for t in range(out.shape[0]):
        row = [float(v) for v in logits_TE[t].tolist()]
        hi, lo = max(row), min(row)
        for e in on:
            out[t, e] = hi + strength
        for e in off:
            out[t, e] = lo - strength
    return out


__all__ = ["STEERMOE_DELTA", "switch_experts", "switched_logits", "switched_logits_reference"]
