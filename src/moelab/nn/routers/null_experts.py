"""Null experts: "AdaMoE: Token-Adaptive Routing with Null Experts for Mixture-of-Experts Language
Models" (Zeng et al. 2024, arXiv:2406.13233).

n zero-FLOP null experts (output 0) are appended to the E real ones; the router scores E + n and
picks top-k over all of them, so a token uses between 0 and k real experts:

    p_t = softmax([z_t ; z_null_t]) over E + n,   S_t = top-k(p_t),
    w_{t,e} = p_{t,e} / sum_{j in S_t} p_{t,j}    (normalize; the null share is simply lost)

Slots that chose a null expert have ``mask=False`` and id ``E + j``. The balance loss treats the
nulls as one averaged bucket (the nulls need not balance among themselves):

    L = (E + n) * ( sum_{e real} f_e P_e  +  n * mean_j(f_null_j) * mean_j(P_null_j) )

with f, P as in the Switch loss over E + n experts (the exact normalisation of the paper was not
verified against code; none is public).

Shape legend: T tokens, H hidden, E real experts, N null experts, K = top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.nn.routers.base import Router, RouterConfig
from moelab.nn.routing import Routing, RoutingError, check_top_k, router_logits


@dataclass(kw_only=True)
class NullExpertsConfig(RouterConfig):
    num_null: int = 1
    top_k: int = 2
    normalize: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_null, int) or self.num_null < 0:
            raise RoutingError(
                f"NullExpertsConfig.num_null must be an int >= 0, got {self.num_null!r}"
            )
        check_top_k(self.top_k, self.num_experts + self.num_null, "NullExpertsConfig.top_k")


class NullExpertsRouter(Router):
    """``weight [E,H]`` for real experts, ``null_weight [N,H]`` for the null ones."""

    config: NullExpertsConfig

    def __init__(self, config: NullExpertsConfig, *, device=None, dtype=None) -> None:
        super().__init__(config, device=device, dtype=dtype)
        self.null_weight = nn.Parameter(
            torch.zeros(config.num_null, config.hidden_size, device=device, dtype=dtype)
        )

    def forward(self, x_TH: Tensor) -> Routing:
        logits_TE = self.logits(x_TH)
        null_TN = router_logits(x_TH, self.null_weight)
        E = logits_TE.shape[1]
        probs_all = torch.softmax(torch.cat([logits_TE, null_TN], -1), dim=-1)
        weights_TK, ids_TK = probs_all.topk(self.config.top_k, dim=-1)
        if self.config.normalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        mask_TK = ids_TK < E
        weights_TK = torch.where(mask_TK, weights_TK, torch.zeros_like(weights_TK))
        aux = {
            "probs_TE": probs_all[:, :E],
            "null_probs_TN": probs_all[:, E:],
            "null_logits_TN": null_TN,
        }
        return Routing(logits_TE, ids_TK, weights_TK, mask_TK, aux)


def null_balance_loss(routing: Routing) -> Tensor:
    """AdaMoE balance loss with the null experts as one averaged bucket (scalar, float32)."""
    null_p = routing.aux.get("null_probs_TN")
    if null_p is None:
        raise RoutingError(
            "null_balance_loss: routing has no 'null_probs_TN' (not from NullExpertsRouter)"
        )
    T, K = routing.ids_TK.shape
    E, N = routing.num_experts, null_p.shape[1]
    counts = torch.bincount(routing.ids_TK.reshape(-1), minlength=E + N).float() / (T * K)
    p_real = routing.aux["probs_TE"].mean(0)
    loss = (counts[:E] * p_real).sum()
    if N:
        loss = loss + N * counts[E:].mean() * null_p.mean(0).mean()
    return (E + N) * loss
