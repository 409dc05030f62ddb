"""Dynamic top-p routing: "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
(Huang et al. 2024, arXiv:2403.07652).

    p_t = softmax(z_t);  sort descending p_(1) >= p_(2) >= ...
    S_t = the smallest prefix {(1) .. (j)} with  p_(1) + ... + p_(j) >= p
    w_{t,e} = p_{t,e}   (not renormalised, as in the authors' code; ``normalize=True`` renormalises)

Tokens get a variable number of experts; the `Routing` pads to the largest count with masked
slots. ``max_k`` caps the experts per token.

Shape legend: T tokens, H hidden, E experts, K = most experts any token got.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.nn.routers.base import Router, RouterConfig
from moelab.nn.routing import Routing, RoutingError, check_top_k, pad_selection


@dataclass(kw_only=True)
class TopPConfig(RouterConfig):
    p: float = 0.4
    max_k: int | None = None
    normalize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.p, int | float) and 0 < self.p <= 1):
            raise RoutingError(f"TopPConfig.p must lie in (0, 1], got {self.p!r}")
        if self.max_k is not None:
            check_top_k(self.max_k, self.num_experts, "TopPConfig.max_k")


def top_p_select(probs_TE: Tensor, p: float, max_k: int | None = None) -> Tensor:
    """[T,E] bool: the smallest highest-probability set whose mass reaches p (at most max_k)."""
    sorted_TE, order_TE = probs_TE.sort(dim=-1, descending=True)
    before_TE = sorted_TE.cumsum(-1) - sorted_TE  # mass strictly before each expert
    keep_sorted = before_TE < p
    keep_sorted[:, 0] = True
    if max_k is not None:
        keep_sorted[:, max_k:] = False
    return torch.zeros_like(keep_sorted).scatter(1, order_TE, keep_sorted)


class TopPRouter(Router):
    config: TopPConfig

    def route(self, logits_TE: Tensor) -> Routing:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = top_p_select(probs_TE, self.config.p, self.config.max_k)
        ids_TK, weights_TK, mask_TK = pad_selection(select_TE, probs_TE)
        if self.config.normalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return Routing(logits_TE, ids_TK, weights_TK, mask_TK, {"probs_TE": probs_TE})
