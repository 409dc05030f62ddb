"""Per-expert routing statistics over calibration data, collected in one pass for every pruning baseline.

Shape legend: T tokens of a batch, K top-k, E experts of a layer, H hidden.

Notation (as in REAP, Lasby et al. 2025, ``src/reap/pruning_metrics.py``): ``S_t`` the experts chosen
for token t, ``T_e = {t : e in S_t}``, ``w_{t,e}`` the model's combine weight and
``g_{t,e} = w_{t,e} / routed_scaling_factor`` the gate: the router probability exactly as the block
combines with it, renormalised over the top-k only when the model does (``norm_topk_prob``). This is
REAP's rule: its ``main.py`` renormalises only when ``model.config.norm_topk_prob`` is true (and
``renormalize_router_weights``, default on), else it uses the raw softmax probability. Dividing out
the scaling factor (DeepSeek's 2.5, a constant per model) changes no ranking and keeps ``g`` a
probability. ``||E_e(x_t)||_2`` is the norm of expert e's output on the input it received, before its weight
(observed inside the experts' forward, :func:`moelab.trace.collect.observe_experts`; Llama4 scales
inputs, so there it is ``E_e(w x)``).

Per layer, float64 arrays ``[E]``::

    count_E[e]      = |T_e|                                   (routing frequency)
    gate_sum_E[e]   = sum_{t in T_e} g_{t,e}                  (router-weighted frequency)
    ean_sum_E[e]    = sum_{t in T_e} ||E_e(x_t)||_2           (expert activation norm)
    reap_E[e]       = (1/|T_e|) sum_{t in T_e} g_{t,e} ||E_e(x_t)||_2   (REAP; 0 when |T_e| = 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moelab.compress.calib import Calibration, routing_pass
from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView, RoutingEvent
from moelab.trace.collect import observe_experts, slot_stats


@dataclass
class ExpertStats:
    """Statistics of one MoE layer over ``tokens`` calibration tokens (see the module docstring)."""

    layer: int
    tokens: int
    count_E: Tensor
    gate_sum_E: Tensor
    ean_sum_E: Tensor
    reap_sum_E: Tensor  # sum_{t in T_e} g * ||E_e(x_t)||

    @property
    def reap_E(self) -> Tensor:
        return torch.where(self.count_E > 0, self.reap_sum_E / self.count_E.clamp(min=1), 0.0)

    @property
    def frequency_E(self) -> Tensor:
        """Share of tokens routed to each expert."""
        return self.count_E / max(self.tokens, 1)

    def to_dict(self) -> dict[str, list[float] | int]:
        return {"tokens": self.tokens, "count": self.count_E.tolist(), "gate_sum": self.gate_sum_E.tolist(),
                "ean_sum": self.ean_sum_E.tolist(), "reap": self.reap_E.tolist()}


def gates(block: MoEBlockView, weights_TK: Tensor) -> Tensor:
    """``g = w / routed_scaling_factor`` in float64: the block's own combine weights, renormalised
    over the top-k exactly when the family does (see the module docstring)."""
    return weights_TK.detach().to(torch.float64) / block.routed_scaling_factor


def accumulate(stats: ExpertStats, ids_TK: Tensor, gates_TK: Tensor, norm_TK: Tensor | None) -> None:
    """Add one batch's routing (gates from :func:`gates`, expert output norms if given) to ``stats``."""
    ids = ids_TK.reshape(-1).cpu()
    valid = ids >= 0
    ids = ids[valid]
    g = gates_TK.reshape(-1).cpu().to(torch.float64)[valid]
    E = stats.count_E.shape[0]
    stats.count_E += torch.bincount(ids, minlength=E).to(torch.float64)
    stats.gate_sum_E.index_add_(0, ids, g)
    stats.tokens += int(ids_TK.shape[0])
    if norm_TK is not None:
        n = norm_TK.detach().reshape(-1).cpu().to(torch.float64)[valid]
        stats.ean_sum_E.index_add_(0, ids, n)
        stats.reap_sum_E.index_add_(0, ids, g * n)


def expert_statistics(view: ModelView, calib: Calibration, *, norms: bool = True) -> dict[int, ExpertStats]:
    """``layer -> ExpertStats`` over the calibration batches (one forward pass of the model).

    ``norms``: also the expert output norms, observed inside the experts' own forward
    (:func:`moelab.trace.collect.observe_experts`: moelab's experts backend, equal to eager, with
    whatever weights provider the model has, e.g. an offloaded model's cache); ``norms=False`` needs
    routing only.
    """
    if calib is None:
        raise MoelabError("calib: these statistics need calibration data (see calibration_batches)")
    out: dict[int, ExpertStats] = {}
    for b in view.blocks:
        z = torch.zeros(b.num_experts, dtype=torch.float64)
        out[b.layer] = ExpertStats(b.layer, 0, z.clone(), z.clone(), z.clone(), z.clone())
    pending: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> this forward's (ids, gates), until observed

    def on_event(ev: RoutingEvent) -> None:
        if not norms:
            accumulate(out[ev.block.layer], ev.ids_TK, gates(ev.block, ev.weights_TK), None)
        else:
            pending[ev.block.layer] = (ev.ids_TK.detach(), gates(ev.block, ev.weights_TK))

    def on_experts(st: Any) -> None:
        layer = st.block.layer
        if layer not in pending:
            raise MoelabError(f"{st.block.path}: the experts ran without a routing event")
        ids_TK, g_TK = pending.pop(layer)
        ids_TK = ids_TK.reshape(st.ids_TK.shape).long().cpu()
        norm_TK = slot_stats(st, ids_TK, st.block.num_experts)[0]
        accumulate(out[layer], ids_TK, g_TK, norm_TK)

    handles = observe_experts(view, on_experts) if norms else []
    try:
        routing_pass(view, calib, on_event)
    finally:
        for h in handles:
            h.remove()
    if pending:
        raise MoelabError(f"layers {sorted(pending)}: routed but their experts did not run")
    return out
