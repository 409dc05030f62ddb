"""Pruning baselines: random, routing frequency, router-weighted frequency.

The reference points every expert-pruning method must beat (REAP's baselines, Lasby et al. 2025,
``src/reap/pruning_metrics.py``; frequency pruning as in Muzio et al. 2024, "SEER-MoE"). Notation of
:mod:`moelab.compress.stats` (``T_e`` tokens routed to expert e, ``g`` the gate as the block combines
with it: renormalised over the top-k only where the model renormalises, as in REAP)::

    random:             score_e ~ U(0, 1), drawn from ``spec.seed`` (no calibration)
    frequency:          score_e = |T_e|
    weighted-frequency: score_e = sum_{t in T_e} g_{t,e}

Each layer keeps its highest-scoring experts (ties: lower index) under ``spec``'s budget
(:func:`moelab.compress.spec.select_experts`). A prune that leaves fewer experts than top-k is planned
as asked; :func:`moelab.compress.apply.apply_plan` clamps top-k to the experts left and warns.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from moelab.compress.calib import Calibration
from moelab.compress.plan import LayerPlan, Plan
from moelab.compress.spec import CompressSpec, select_experts
from moelab.compress.stats import expert_statistics
from moelab.errors import MoelabError
from moelab.models import ModelView


def plan_from_scores(method: str, view: ModelView, scores: dict[int, Tensor], spec: CompressSpec,
                     calib: Calibration | None, t0: float, **extra: Any) -> Plan:
    """A pruning plan keeping the best-scored experts; ``meta`` records the scores and settings."""
    if not isinstance(spec, CompressSpec):
        raise MoelabError(f"spec: expected a CompressSpec, got {type(spec).__name__}")
    keep = select_experts(scores, spec)
    meta = {"method": method, "ratio": spec.ratio, "budget": spec.budget, "seed": spec.seed,
            "calibration": None if calib is None else calib.describe(),
            "kept": {str(layer): kept for layer, kept in keep.items()},
            "scores": {str(layer): s_E.tolist() for layer, s_E in scores.items()}, **extra}
    top_k = min(b.top_k for b in view.blocks)
    fewest = min(len(k) for k in keep.values())
    if fewest < top_k:
        meta["note"] = f"{fewest} experts left in some layer, fewer than top_k={top_k}: apply_plan clamps top-k"
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return Plan(method, {layer: LayerPlan.keep(layer, kept) for layer, kept in keep.items()}, meta=meta)


def _need_calib(calib: Calibration | None, method: str) -> Calibration:
    if calib is None:
        raise MoelabError(f"calib: {method} pruning needs calibration data (see calibration_batches)")
    return calib


def plan_random(view: ModelView, calib: Calibration | None, spec: CompressSpec) -> Plan:
    """Random pruning: uniform scores from ``spec.seed`` (one draw per layer, in layer order)."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(spec.seed)
    scores = {b.layer: torch.rand(b.num_experts, generator=gen, dtype=torch.float64) for b in view.blocks}
    return plan_from_scores("random", view, scores, spec, None, t0)


def plan_frequency(view: ModelView, calib: Calibration | None, spec: CompressSpec) -> Plan:
    """Frequency pruning: keep the experts chosen for the most calibration tokens."""
    t0 = time.perf_counter()
    stats = expert_statistics(view, _need_calib(calib, "frequency"), norms=False)
    scores = {layer: s.count_E for layer, s in stats.items()}
    return plan_from_scores("frequency", view, scores, spec, calib, t0)


def plan_weighted_frequency(view: ModelView, calib: Calibration | None, spec: CompressSpec) -> Plan:
    """Router-weighted frequency pruning: keep the experts with the largest sum of gates."""
    t0 = time.perf_counter()
    stats = expert_statistics(view, _need_calib(calib, "weighted-frequency"), norms=False)
    scores = {layer: s.gate_sum_E for layer, s in stats.items()}
    return plan_from_scores("weighted-frequency", view, scores, spec, calib, t0)
