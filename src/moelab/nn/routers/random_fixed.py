"""Fixed random router with a growing k: SMoE-Dropout ("Sparse MoE as the New Dropout: Scaling
Dense and Self-Slimmable Transformers", Chen et al. 2023, arXiv:2303.01610).

The router weight is random and frozen (a buffer, never trained); the number of active experts
grows during training from ``k_start`` to ``k_end`` (linearly over ``total_steps``), and at
inference any k can be chosen ("self-slimmable"):

    z_t = W_rand x_t,  S_t = top-k(z_t),  w_{t,e} = softmax over the k selected logits
    k(step) = k_start + floor((k_end - k_start + 1) * step / total_steps), capped at k_end

Shape legend: T tokens, H hidden, E experts, K = current k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.nn.routers.base import softmax_topk
from moelab.nn.routing import Routing, RoutingError, check_num_experts, check_top_k, router_logits


@dataclass(kw_only=True)
class RandomRouterConfig:
    num_experts: int
    hidden_size: int
    k_start: int = 1
    k_end: int = 2
    total_steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_num_experts(self.num_experts, "RandomRouterConfig.num_experts")
        check_num_experts(self.hidden_size, "RandomRouterConfig.hidden_size")
        check_top_k(self.k_start, self.num_experts, "RandomRouterConfig.k_start")
        check_top_k(self.k_end, self.num_experts, "RandomRouterConfig.k_end")
        if self.k_end < self.k_start or self.total_steps < 1:
            raise RoutingError("RandomRouterConfig: need k_start <= k_end and total_steps >= 1")


def smoe_dropout_k(step: int, config: RandomRouterConfig) -> int:
    """k at a training step: grows linearly from k_start to k_end over total_steps."""
    span = config.k_end - config.k_start + 1
    return min(config.k_end, config.k_start + math.floor(span * max(step, 0) / config.total_steps))


class RandomFixedRouter(nn.Module):
    """Frozen random router; set ``router.k`` (or call ``set_step``) to change k."""

    def __init__(self, config: RandomRouterConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        g = torch.Generator().manual_seed(config.seed)
        w = torch.randn(config.num_experts, config.hidden_size, generator=g) / math.sqrt(
            config.hidden_size
        )
        self.register_buffer("weight", w.to(device=device, dtype=dtype or torch.float32))
        self.k = config.k_start

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def set_step(self, step: int) -> int:
        self.k = smoe_dropout_k(step, self.config)
        return self.k

    def forward(self, x_TH: Tensor) -> Routing:
        check_top_k(self.k, self.num_experts, "RandomFixedRouter.k")
        logits_TE = router_logits(x_TH, self.weight)
        probs_TE, ids_TK, weights_TK = softmax_topk(logits_TE, self.k, normalize=True)
        return Routing(logits_TE, ids_TK, weights_TK, None, {"probs_TE": probs_TE})
