"""moelab.models: one uniform view of the routers and experts of transformers MoE models.

    view = open_model(model_or_path)             # ModelView; view.blocks: list[MoEBlockView]
    block = view.blocks[0]                       # router_weight [E, H], gate/up [E, I, H], down [E, H, I]
    logits_TE, ids_TK, weights_TK = reference_route(block, hidden_TH)
    out_TH = reference_forward(block, hidden_TH)   # float64 oracle of the block's output

See :mod:`moelab.models.view` for the conventions and :mod:`moelab.models.families` for the adapters.
"""

from __future__ import annotations

from moelab.models.checkpoint import load_checkpoint
from moelab.models.open import open_model, view_model
from moelab.models.reference import (
    expert_forward,
    glu_activation,
    reference_forward,
    reference_route,
)
from moelab.models.registry import FamilyAdapter, supported_families
from moelab.models.view import (
    ModelView,
    MoEBlockView,
    RoutingEvent,
    RoutingHookHandle,
    SharedExpertsView,
)

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(supported_families())

__all__ = [
    "SUPPORTED_FAMILIES",
    "FamilyAdapter",
    "ModelView",
    "MoEBlockView",
    "RoutingEvent",
    "RoutingHookHandle",
    "SharedExpertsView",
    "expert_forward",
    "glu_activation",
    "load_checkpoint",
    "open_model",
    "reference_forward",
    "reference_route",
    "view_model",
]
