"""Expert-choice routing: "Mixture-of-Experts with Expert Choice Routing" (Zhou et al. 2022,
arXiv:2202.09368).

Experts pick tokens instead of tokens picking experts:

    S = softmax(X W^T) in [T, E] (over experts),   C = ceil(T * c / E) tokens per expert
    expert e takes the C tokens with the largest S[:, e];  w_{t,e} = S[t, e] for the chosen pairs

Perfect load balance by construction; a token may get 0 .. E experts, so the `Routing` pads to the
largest count with masked slots. NOTE: a token's routing depends on the other tokens in the batch
(non-causal), which is why the paper uses it for encoders / training, not decoding.

Shape legend: T tokens, H hidden, E experts, C capacity, K = most experts any token got.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.nn.routers.base import Router, RouterConfig
from moelab.nn.routing import Routing, RoutingError, pad_selection


@dataclass(kw_only=True)
class ExpertChoiceConfig(RouterConfig):
    capacity_factor: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise RoutingError(
                f"ExpertChoiceConfig.capacity_factor must be > 0, got {self.capacity_factor!r}"
            )


class ExpertChoiceRouter(Router):
    config: ExpertChoiceConfig

    def route(self, logits_TE: Tensor) -> Routing:
        T, E = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        cap = min(T, math.ceil(T * self.config.capacity_factor / E))
        select_TE = torch.zeros_like(probs_TE, dtype=torch.bool)
        if T:
            select_TE.scatter_(0, probs_TE.topk(cap, dim=0).indices, True)
        ids_TK, weights_TK, mask_TK = pad_selection(select_TE, probs_TE)
        return Routing(
            logits_TE,
            ids_TK,
            weights_TK,
            mask_TK,
            {"probs_TE": probs_TE, "capacity": torch.tensor(cap)},
        )
