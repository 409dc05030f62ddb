"""Stochastic experts: THOR ("Taming Sparsely Activated Transformer with Stochastic Experts",
Zuo et al. 2022, arXiv:2110.04260).

No learned router: each token (``level="token"``) or each sequence (``level="sequence"``) goes to
one expert drawn uniformly at random, with weight 1. Training runs the model twice with two
independent draws and adds a consistency regulariser between the two output distributions:

    L = CE(p1, y) + CE(p2, y) + alpha * (KL(p1 || p2) + KL(p2 || p1)) / 2     (alpha = 1 in the paper)

``consistency_loss`` is the symmetric-KL term (the paper's code averages the two KLs).
Logits in the `Routing` are zeros: every expert is equally likely.

Shape legend: T tokens, E experts, V vocabulary (or classes), K = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.routing import Routing, RoutingError, check_num_experts


@dataclass(kw_only=True)
class ThorConfig:
    num_experts: int
    level: str = "token"

    def __post_init__(self) -> None:
        check_num_experts(self.num_experts, "ThorConfig.num_experts")
        if self.level not in ("token", "sequence"):
            raise RoutingError(
                f"ThorConfig.level must be 'token' or 'sequence', got {self.level!r}"
            )


class ThorRouter(nn.Module):
    """``forward(x_TH, num_sequences=1, generator=None) -> Routing`` with one random expert per unit."""

    def __init__(self, config: ThorConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def forward(
        self, x_TH: Tensor, num_sequences: int = 1, generator: torch.Generator | None = None
    ) -> Routing:
        T, E = x_TH.shape[0], self.config.num_experts
        if self.config.level == "token":
            ids_T = torch.randint(0, E, (T,), generator=generator).to(x_TH.device)
        else:
            if num_sequences < 1 or T % num_sequences:
                raise RoutingError(f"ThorRouter: num_sequences={num_sequences} must divide T={T}")
            ids_B = torch.randint(0, E, (num_sequences,), generator=generator).to(x_TH.device)
            ids_T = ids_B.repeat_interleave(T // num_sequences)
        logits_TE = torch.zeros(T, E, device=x_TH.device)
        weights_TK = torch.ones(T, 1, device=x_TH.device)
        return Routing(logits_TE, ids_T.unsqueeze(1), weights_TK, None, {})


def consistency_loss(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Symmetric KL ``(KL(p_a||p_b) + KL(p_b||p_a)) / 2`` between two passes, mean over rows."""
    if logits_a.shape != logits_b.shape:
        raise RoutingError(
            f"consistency_loss: shapes differ, {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}"
        )
    la = F.log_softmax(logits_a.float(), -1).reshape(-1, logits_a.shape[-1])
    lb = F.log_softmax(logits_b.float(), -1).reshape(-1, logits_b.shape[-1])
    kl_ab = F.kl_div(lb, la, log_target=True, reduction="batchmean")  # KL(p_a || p_b)
    kl_ba = F.kl_div(la, lb, log_target=True, reduction="batchmean")
    return (kl_ab + kl_ba) / 2
