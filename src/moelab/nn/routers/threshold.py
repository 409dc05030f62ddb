"""Threshold (top-any) routing: each expert is used when its own gate clears a threshold, so a
token may use any number of experts, including none.

After DynMoE ("Dynamic Mixture of Experts: An Auto-Tuning Approach for Efficient Transformer
Models", Guo et al. 2024, arXiv:2405.14297), which gates each expert independently with a sigmoid
and a per-expert threshold:

    g_{t,e} = sigmoid(z_{t,e}),   S_t = { e : g_{t,e} > tau_e }
    if |S_t| < min_k: S_t = top-min_k(g_t)          (min_k = 0 lets tokens route nowhere)
    w_{t,e} = g_{t,e} / sum_{j in S_t} g_{t,j}  (normalize)   or  g_{t,e}

``tau`` is a buffer (one value per expert, set from ``threshold``); DynMoE's trainable thresholds
(straight-through estimator) are not implemented here.

Shape legend: T tokens, H hidden, E experts, K = most experts any token got.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.nn.routers.base import Router, RouterConfig
from moelab.nn.routing import Routing, RoutingError, pad_selection


@dataclass(kw_only=True)
class ThresholdConfig(RouterConfig):
    threshold: float = 0.5
    min_k: int = 1
    normalize: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold < 1:
            raise RoutingError(
                f"ThresholdConfig.threshold must lie in (0, 1) (a sigmoid gate), got {self.threshold!r}"
            )
        if self.min_k not in (0, 1):
            raise RoutingError(f"ThresholdConfig.min_k must be 0 or 1, got {self.min_k!r}")


class ThresholdRouter(Router):
    config: ThresholdConfig

    def __init__(self, config: ThresholdConfig, *, device=None, dtype=None) -> None:
        super().__init__(config, device=device, dtype=dtype)
        self.register_buffer(
            "tau", torch.full((config.num_experts,), config.threshold, device=device)
        )

    def route(self, logits_TE: Tensor) -> Routing:
        gates_TE = logits_TE.sigmoid()
        select_TE = gates_TE > self.tau
        if self.config.min_k:
            top1 = torch.zeros_like(select_TE).scatter(1, gates_TE.argmax(-1, keepdim=True), True)
            select_TE = select_TE | (top1 & ~select_TE.any(-1, keepdim=True))
        ids_TK, weights_TK, mask_TK = pad_selection(select_TE, gates_TE)
        if self.config.normalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        probs_TE = gates_TE / gates_TE.sum(-1, keepdim=True)
        return Routing(
            logits_TE, ids_TK, weights_TK, mask_TK, {"probs_TE": probs_TE, "gates_TE": gates_TE}
        )
