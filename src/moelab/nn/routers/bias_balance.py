"""Auxiliary-loss-free load balancing: the bias update rule.

Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"
(arXiv:2408.15664), used by DeepSeek-V3 (arXiv:2412.19437, sec. 2.1.2). Each expert e has a
bias b_e added to its score for top-k *selection only* (not to the combine weight). After each
training step, with c_e the tokens routed to e in the step and c̄ their mean over experts:

    b_e <- b_e + u * sign(c̄ - c_e)

(overloaded experts are pushed down, underloaded ones up; u = 1e-3 in DeepSeek-V3).
`GroupLimitedRouter.update_bias` applies it; ``bias_update`` is the rule alone.

Shape legend: E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.nn.routing import RoutingError


def bias_update(tokens_per_expert_E: Tensor, rate: float = 1e-3) -> Tensor:
    """[E] float32 change ``rate * sign(mean(c) - c)`` for the routing bias."""
    if not rate > 0:
        raise RoutingError(f"bias_update: rate must be > 0, got {rate!r}")
    c = tokens_per_expert_E.float()
    return rate * torch.sign(c.mean() - c)
