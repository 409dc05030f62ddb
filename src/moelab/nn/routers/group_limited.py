"""Top-k with sigmoid (or softmax) scores, group-limited selection and a routed scaling factor.

DeepSeek-V3 (DeepSeek-AI 2024, arXiv:2412.19437, eqs. 12-16; also DeepSeek-V2 arXiv:2405.04434
with softmax scores and ``group_score="max"``, and GLM4-MoE):

    s_t = sigmoid(z_t)                          (or softmax(z_t))
    c_t = s_t + b                               b: correction bias, used for *selection only*
    groups: split E into G groups; group score = sum of top-2 c in the group ("top2_sum", V3)
            or max c in the group ("max", V2); keep the best ``topk_group`` groups
    S_t = top-k of c_t over experts in kept groups
    w_{t,e} = s_{t,e} / max(||s_{t,S_t}||_p, norm_min)  (if normalize) * routed_scaling_factor
              (p = 1, the plain sum, except DBRX; norm_min > 0 for ERNIE-4.5)

``aux['probs_TE'] = s / sum_j s_j`` is the normalised affinity the sequence-wise balance loss uses.
The correction bias is the buffer ``correction_bias`` and is updated by `update_bias`
(auxiliary-loss-free balancing, see ``moelab.nn.routers.bias_balance``).

Shape legend: T tokens, H hidden, E experts, G groups, K = top_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.nn.routers.base import Router, RouterConfig
from moelab.nn.routing import Routing, RoutingError, check_top_k


@dataclass(kw_only=True)
class GroupLimitedConfig(RouterConfig):
    top_k: int = 8
    scoring: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"
    normalize: bool = True
    routed_scaling_factor: float = 1.0
    correction_bias: bool = True
    norm_p: float = 1.0
    norm_min: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        check_top_k(self.top_k, self.num_experts, f"{name}.top_k")
        if self.scoring not in ("sigmoid", "softmax"):
            raise RoutingError(
                f"{name}.scoring must be 'sigmoid' or 'softmax', got {self.scoring!r}"
            )
        if self.group_score not in ("top2_sum", "max"):
            raise RoutingError(
                f"{name}.group_score must be 'top2_sum' or 'max', got {self.group_score!r}"
            )
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise RoutingError(
                f"{name}.n_group={self.n_group} must divide num_experts={self.num_experts}"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise RoutingError(
                f"{name}.topk_group={self.topk_group} must lie in [1, n_group={self.n_group}]"
            )
        per_group = self.num_experts // self.n_group
        if self.top_k > self.topk_group * per_group:
            raise RoutingError(
                f"{name}.top_k={self.top_k} > experts in the kept groups ({self.topk_group} x {per_group})"
            )


class GroupLimitedRouter(Router):
    """DeepSeek-V3-style router; ``correction_bias [E]`` is a float32 buffer (zeros at init)."""

    config: GroupLimitedConfig

    def __init__(self, config: GroupLimitedConfig, *, device=None, dtype=None) -> None:
        super().__init__(config, device=device, dtype=dtype)
        bias = torch.zeros(config.num_experts, device=device, dtype=torch.float32)
        self.register_buffer("correction_bias", bias if config.correction_bias else None)

    def route(self, logits_TE: Tensor) -> Routing:
        c = self.config
        if c.scoring == "sigmoid":
            scores_TE = logits_TE.sigmoid()
        else:
            scores_TE = logits_TE.softmax(-1)
        choice_TE = scores_TE if self.correction_bias is None else scores_TE + self.correction_bias
        if c.n_group > 1:
            choice_TE = _mask_groups(choice_TE, c.n_group, c.topk_group, c.group_score)
        ids_TK = choice_TE.topk(c.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if c.normalize:
            weights_TK = weights_TK / _norm(weights_TK, c.norm_p, c.norm_min)
        weights_TK = weights_TK * c.routed_scaling_factor
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return Routing(
            logits_TE, ids_TK, weights_TK, None, {"probs_TE": probs_TE, "scores_TE": scores_TE}
        )

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: Tensor, rate: float = 1e-3) -> Tensor:
        """Aux-loss-free update of ``correction_bias`` in place; returns the change."""
        from moelab.nn.routers.bias_balance import bias_update

        if self.correction_bias is None:
            raise RoutingError("update_bias: this router was built with correction_bias=False")
        delta = bias_update(tokens_per_expert_E, rate)
        self.correction_bias += delta
        return delta


def _norm(w_TK: Tensor, p: float, floor: float) -> Tensor:
    """``max(||w||_p, floor)`` per token (DBRX p-norm, ERNIE clamp); 1e-20 keeps 0/0 away."""
    norm = (
        w_TK.sum(-1, keepdim=True)
        if p == 1.0
        else w_TK.abs().pow(p).sum(-1, keepdim=True).pow(1.0 / p)
    )
    return norm.clamp_min(floor) if floor > 0 else norm + 1e-20


def _mask_groups(choice_TE: Tensor, n_group: int, topk_group: int, how: str) -> Tensor:
    T, E = choice_TE.shape
    grouped = choice_TE.view(T, n_group, E // n_group)
    if how == "top2_sum":
        group_TG = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
    else:
        group_TG = grouped.max(-1).values
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_TG.topk(topk_group, dim=-1).indices, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))
