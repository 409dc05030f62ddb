"""What a user asks a planner for: how much to remove, with which budget, under which seed.

Every planner has the signature ``planner(view, calib, spec, **options) -> Plan`` where ``view`` is the
:class:`~moelab.models.ModelView` of the model to compress, ``calib`` a
:class:`~moelab.compress.calib.Calibration` (None for planners that need no data) and ``spec`` this
dataclass. Planners are listed by name in :data:`moelab.compress.registry.PLANNERS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
