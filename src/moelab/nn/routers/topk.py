"""Top-k softmax token-choice router (Switch, GShard, Mixtral).

Switch Transformer (Fedus et al. 2021, arXiv:2101.03961) with k=1; GShard (Lepikhin et al. 2020,
arXiv:2006.16668) and Mixtral (Jiang et al. 2024, arXiv:2401.04088) with k=2:

    p_t = softmax(W x_t + b),   S_t = top-k(p_t),   w_{t,e} = p_{t,e} / sum_{j in S_t} p_{t,j}  (normalize)
                                                    w_{t,e} = p_{t,e}                           (otherwise)

Normalising over the k is the same as a softmax over the k selected logits (Granite, GPT-OSS).

Shape legend: T tokens, H hidden, E experts, K = top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from moelab.nn.routers.base import Router, RouterConfig, softmax_topk
from moelab.nn.routing import Routing, check_top_k


@dataclass(kw_only=True)
class TopKConfig(RouterConfig):
    top_k: int = 2
    normalize: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_top_k(self.top_k, self.num_experts, "TopKConfig.top_k")


class TopKRouter(Router):
    """``forward(x_TH) -> Routing`` with K = top_k; ``aux['probs_TE']`` is the full softmax."""

    config: TopKConfig

    def route(self, logits_TE: Tensor) -> Routing:
        probs_TE, ids_TK, weights_TK = softmax_topk(
            logits_TE, self.config.top_k, self.config.normalize
        )
        return Routing(logits_TE, ids_TK, weights_TK, None, {"probs_TE": probs_TE})
