"""What every learned router shares: a config, a float32 linear gate, and input checks.

Shape legend: T tokens, H hidden, E experts, K slots per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.nn.routing import Routing, RoutingError, check_num_experts, router_logits


@dataclass(kw_only=True)
class RouterConfig:
    """E experts over hidden size H; ``bias`` adds a learned logit bias (GPT-OSS style)."""

    num_experts: int
    hidden_size: int
    bias: bool = False

    def __post_init__(self) -> None:
        check_num_experts(self.num_experts, f"{type(self).__name__}.num_experts")
        check_num_experts(self.hidden_size, f"{type(self).__name__}.hidden_size")


class Router(nn.Module):
    """Base: ``weight [E,H]`` (+ optional ``bias [E]``); subclasses implement ``route``.

    ``forward(x_TH, **kw) -> Routing``. Logits are computed in float32 whatever the input dtype
    (softmax/sigmoid in low precision skews load balancing).
    """

    def __init__(self, config: RouterConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, **kw))
        self.bias = nn.Parameter(torch.zeros(config.num_experts, **kw)) if config.bias else None
        nn.init.uniform_(
            self.weight, -1 / math.sqrt(config.hidden_size), 1 / math.sqrt(config.hidden_size)
        )

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def logits(self, x_TH: Tensor) -> Tensor:
        if x_TH.dim() != 2:
            raise RoutingError(
                f"{type(self).__name__}: x must be [T, H], got shape {tuple(x_TH.shape)}"
            )
        return router_logits(x_TH, self.weight, self.bias)

    def forward(self, x_TH: Tensor, **kwargs) -> Routing:
        return self.route(self.logits(x_TH), **kwargs)

    def route(self, logits_TE: Tensor, **kwargs) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


def softmax_topk(logits_TE: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """float32 softmax over E, top-k, optional renormalisation over the k. Returns probs, ids, weights."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, ids_TK = probs_TE.topk(top_k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return probs_TE, ids_TK, weights_TK
