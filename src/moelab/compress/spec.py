"""What a user asks a planner for: how much to remove, with which budget, under which seed.

Every planner has the signature ``planner(view, calib, spec, **options) -> Plan`` where ``view`` is the
:class:`~moelab.models.ModelView` of the model to compress, ``calib`` a
:class:`~moelab.compress.calib.Calibration` (None for planners that need no data) and ``spec`` this
dataclass. Planners are listed by name in :data:`moelab.compress.registry.PLANNERS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.errors import MoelabError

BUDGETS = ("layer", "global")


@dataclass(frozen=True, kw_only=True)
class CompressSpec:
    """``ratio``: share of routed experts removed, in (0, 1) (0 is allowed: the identity plan).

    ``budget``: 'layer' removes ``round(ratio * E)`` experts in every layer; 'global' ranks experts of
    all layers together (scores made comparable by the planner) and removes the same total, keeping at
    least ``min_keep`` per layer. ``seed`` makes every random choice reproducible.
    """

    ratio: float
    budget: str = "layer"
    seed: int = 0
    min_keep: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and 0 <= self.ratio < 1):
            raise MoelabError(f"ratio: expected a share of experts to remove in [0, 1), got {self.ratio!r}")
        if self.budget not in BUDGETS:
            raise MoelabError(f"budget: expected one of {BUDGETS}, got {self.budget!r}")
        if self.min_keep < 1:
            raise MoelabError(f"min_keep: expected >= 1, got {self.min_keep}")

    def kept_per_layer(self, num_experts: int) -> int:
        """Experts a layer of ``num_experts`` keeps under the 'layer' budget (at least ``min_keep``)."""
        removed = math.floor(self.ratio * num_experts + 0.5)
        return max(self.min_keep, num_experts - removed)


def select_experts(scores: dict[int, Tensor], spec: CompressSpec) -> dict[int, list[int]]:
    """Experts each layer keeps (ascending indices) under ``spec``'s budget, highest scores kept.

    ``scores``: ``layer -> [E]`` importance (higher = keep). 'layer': the ``spec.kept_per_layer(E)``
    best of every layer. 'global': the same total is removed, lowest ``score / mean(layer's scores)``
    first across all layers (so layers of different scale compare), never below ``spec.min_keep``
    in a layer. Ties keep the lower expert index, so the choice is deterministic.
    """
    for layer, s_E in scores.items():
        if not torch.isfinite(torch.as_tensor(s_E, dtype=torch.float64)).all():
            raise MoelabError(f"scores of layer {layer}: expected finite numbers")
    scores = {layer: torch.as_tensor(s_E, dtype=torch.float64).cpu() for layer, s_E in scores.items()}
    if spec.budget == "layer":
        keep = {}
        for layer, s_E in scores.items():
            order = sorted(range(len(s_E)), key=lambda e: (-float(s_E[e]), e))
            keep[layer] = sorted(order[:spec.kept_per_layer(len(s_E))])
        return keep
    to_remove = sum(len(s_E) - spec.kept_per_layer(len(s_E)) for s_E in scores.values())
    rel = []
    for layer, s_E in scores.items():
        mean = float(s_E.mean())
        rel += [(float(s_E[e]) / mean if mean > 0 else float(s_E[e]), layer, e) for e in range(len(s_E))]
    left = {layer: len(s_E) for layer, s_E in scores.items()}
    removed: set[tuple[int, int]] = set()
    for _, layer, e in sorted(rel, key=lambda r: (r[0], r[1], -r[2])):  # ties: keep the lower index
        if len(removed) == to_remove:
            break
        if left[layer] > spec.min_keep:
            removed.add((layer, e))
            left[layer] -= 1
    return {layer: [e for e in range(len(s_E)) if (layer, e) not in removed] for layer, s_E in scores.items()}
