"""moelab.nn: MoE layers, routers, losses and fast dropless dispatch.

Contracts: every router returns a `Routing` (float32 ``logits_TE``, ``ids_TK``, ``weights_TK``,
``mask_TK``); `Experts` stores ``gate [E,I,H]``, ``up [E,I,H]``, ``down [E,H,I]`` and is called as
``experts(x_TH, ids_TK, weights_TK, mask_TK=None) -> y_TH``.
"""

from __future__ import annotations

import importlib
from typing import Any

from moelab.nn.chain import ChainConfig, ChainOfExperts, ChainOutput
from moelab.nn.dispatcher import Dispatch, Dispatcher, LocalDispatcher, PermutingDispatcher
from moelab.nn.experts import ACTIVATIONS, Experts, ExpertsConfig, split_experts
from moelab.nn.hf import (
    PatchedBlock,
    experts_from_view,
    from_view,
    patch,
    router_from_view,
    unpatch,
)
from moelab.nn.layer import DenseMLP, MoELayer, MoEOutput, apply_capacity
from moelab.nn.losses import expert_load, load_balancing_loss, sequence_balance_loss, z_loss
from moelab.nn.multigate import (
    HoME,
    HoMEConfig,
    HoMEOutput,
    MultiGateConfig,
    MultiGateMoE,
    MultiGateOutput,
    multigate_reference,
)
from moelab.nn.routers.base import Router, RouterConfig
from moelab.nn.routers.bias_balance import bias_update
from moelab.nn.routers.domain import DomainConfig, DomainRouter
from moelab.nn.routers.expert_choice import ExpertChoiceConfig, ExpertChoiceRouter
from moelab.nn.routers.group_limited import GroupLimitedConfig, GroupLimitedRouter
from moelab.nn.routers.null_experts import NullExpertsConfig, NullExpertsRouter, null_balance_loss
from moelab.nn.routers.random_fixed import RandomFixedRouter, RandomRouterConfig, smoe_dropout_k
from moelab.nn.routers.sparsemixer import SparseMixerConfig, SparseMixerRouter
from moelab.nn.routers.thor import ThorConfig, ThorRouter, consistency_loss
from moelab.nn.routers.threshold import ThresholdConfig, ThresholdRouter
from moelab.nn.routers.top_p import TopPConfig, TopPRouter, top_p_select
from moelab.nn.routers.topk import TopKConfig, TopKRouter
from moelab.nn.routing import Routing, RoutingError

__all__ = [
    "PatchedBlock",
    "experts_from_view",
    "from_view",
    "patch",
    "router_from_view",
    "unpatch",
    "ACTIVATIONS",
    "ChainConfig",
    "ChainOfExperts",
    "ChainOutput",
    "DenseMLP",
    "Dispatch",
    "Dispatcher",
    "LocalDispatcher",
    "PermutingDispatcher",
    "DomainConfig",
    "DomainRouter",
    "ExpertChoiceConfig",
    "ExpertChoiceRouter",
    "Experts",
    "ExpertsConfig",
    "GroupLimitedConfig",
    "HoME",
    "HoMEConfig",
    "HoMEOutput",
    "GroupLimitedRouter",
    "MoELayer",
    "MoEOutput",
    "MultiGateConfig",
    "MultiGateMoE",
    "MultiGateOutput",
    "NullExpertsConfig",
    "NullExpertsRouter",
    "RandomFixedRouter",
    "RandomRouterConfig",
    "Router",
    "RouterConfig",
    "Routing",
    "RoutingError",
    "SparseMixerConfig",
    "SparseMixerRouter",
    "ThorConfig",
    "ThorRouter",
    "ThresholdConfig",
    "ThresholdRouter",
    "TopKConfig",
    "TopKRouter",
    "TopPConfig",
    "TopPRouter",
    "apply_capacity",
    "bias_update",
    "consistency_loss",
    "expert_load",
    "load_balancing_loss",
    "multigate_reference",
    "null_balance_loss",
    "sequence_balance_loss",
    "smoe_dropout_k",
    "split_experts",
    "top_p_select",
    "z_loss",
]

# Names defined in modules that are imported on first use.
_LAZY: dict[str, str] = {}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moelab.nn' has no attribute {name!r}")
