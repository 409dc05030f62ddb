"""Domain-enforced routing: a given label picks the set of experts a token may use.

As in label-routed MoE embedding / DEMix-style models (Gururangan et al. 2022, "DEMix Layers",
arXiv:2108.05036, route by the known domain): each domain d owns an expert set A_d, and

    z'_{t,e} = z_{t,e} if e in A_{d_t} else -inf,   p_t = softmax(z'_t),
    S_t = top-k(p_t) (k <= |A_d| for every d),      w = p renormalised over S_t (normalize)

With |A_d| = k every token of domain d uses exactly the experts of d; with |A_d| > k the
learned router chooses within the domain's set. The label is passed per token: ``domain_T``.

Shape legend: T tokens, H hidden, E experts, D domains, K = top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.nn.routers.base import Router, RouterConfig
from moelab.nn.routing import Routing, RoutingError, check_top_k


@dataclass(kw_only=True)
class DomainConfig(RouterConfig):
    domain_experts: list[list[int]]
    top_k: int = 1
    normalize: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.domain_experts:
            raise RoutingError(
                "DomainConfig.domain_experts must list at least one domain's expert set"
            )
        for d, experts in enumerate(self.domain_experts):
            bad = [e for e in experts if not 0 <= e < self.num_experts]
            if bad or not experts:
                raise RoutingError(
                    f"DomainConfig.domain_experts[{d}]={experts} must be a non-empty list of ids in [0, {self.num_experts})"
                )
            check_top_k(
                self.top_k,
                len(set(experts)),
                f"DomainConfig.top_k (domain {d} has {len(set(experts))} experts)",
            )


class DomainRouter(Router):
    """``forward(x_TH, domain_T) -> Routing``; ``allowed [D,E]`` bool buffer."""

    config: DomainConfig

    def __init__(self, config: DomainConfig, *, device=None, dtype=None) -> None:
        super().__init__(config, device=device, dtype=dtype)
        allowed = torch.zeros(
            len(config.domain_experts), config.num_experts, dtype=torch.bool, device=device
        )
        for d, experts in enumerate(config.domain_experts):
            allowed[d, experts] = True
        self.register_buffer("allowed", allowed, persistent=False)

    def forward(self, x_TH: Tensor, domain_T: Tensor | None = None) -> Routing:
        if domain_T is None:
            raise RoutingError("DomainRouter: pass domain_T (one domain label per token)")
        domain_T = domain_T.reshape(-1)
        if domain_T.shape[0] != x_TH.shape[0]:
            raise RoutingError(
                f"DomainRouter: domain_T has {domain_T.shape[0]} labels for {x_TH.shape[0]} tokens"
            )
        D = self.allowed.shape[0]
        if domain_T.numel() and (int(domain_T.min()) < 0 or int(domain_T.max()) >= D):
            raise RoutingError(
                f"DomainRouter: domain labels must lie in [0, {D}), got [{int(domain_T.min())}, {int(domain_T.max())}]"
            )
        logits_TE = self.logits(x_TH)
        allowed_TE = self.allowed[domain_T]
        probs_TE = torch.softmax(logits_TE.masked_fill(~allowed_TE, float("-inf")), dim=-1)
        weights_TK, ids_TK = probs_TE.topk(self.config.top_k, dim=-1)
        if self.config.normalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return Routing(logits_TE, ids_TK, weights_TK, None, {"probs_TE": probs_TE})
