"""The `Routing` record every router returns, and the helpers routers share.

Shape legend: T tokens, H hidden size, E experts, K slots per token (top-k, or the largest number of
experts any token got when a router picks a variable number).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.errors import MoelabError


class RoutingError(MoelabError, ValueError):
    """A router got an argument or produced logits it cannot route with."""


@dataclass
class Routing:
    """What one router decided for T tokens.

    Attributes:
        logits_TE: float32 raw router logits (before softmax/sigmoid), one column per real expert.
        ids_TK: int64 chosen expert per slot. Where ``mask_TK`` is False the id must be ignored;
            null-expert routers (AdaMoE) put the null expert's index ``E + j`` there.
        weights_TK: combine weights exactly as the experts receive them (after any renormalisation
            and scaling); 0 where ``mask_TK`` is False.
        mask_TK: bool, True where the slot goes to a real expert; None means every slot is real.
        aux: statistics the losses need (e.g. ``probs_TE`` for sigmoid routers, ``null_logits_TN``).
    """

    logits_TE: Tensor
    ids_TK: Tensor
    weights_TK: Tensor
    mask_TK: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.logits_TE.shape[-1]

    def real_mask(self) -> Tensor:
        """[T,K] bool mask of real slots (all True when ``mask_TK`` is None)."""
        if self.mask_TK is None:
            return torch.ones_like(self.ids_TK, dtype=torch.bool)
        return self.mask_TK

    def tokens_per_expert(self) -> Tensor:
        """[E] int64 number of real slots routed to each expert."""
        keep = self.real_mask()
        return torch.bincount(self.ids_TK[keep], minlength=self.num_experts)[: self.num_experts]


def router_logits(x_TH: Tensor, weight_EH: Tensor, bias_E: Tensor | None = None) -> Tensor:
    """float32 logits ``x W^T + b``, checked finite (a NaN here would silently mis-route)."""
    if x_TH.shape[-1] != weight_EH.shape[-1]:
        raise RoutingError(
            f"router: hidden size of x ({x_TH.shape[-1]}) != router weight's ({weight_EH.shape[-1]})"
        )
    b = None if bias_E is None else bias_E.float()
    logits_TE = torch.nn.functional.linear(x_TH.float(), weight_EH.float(), b)
    check_finite(logits_TE)
    return logits_TE


def check_finite(logits_TE: Tensor) -> None:
    if not bool(torch.isfinite(logits_TE).all()):
        bad = int((~torch.isfinite(logits_TE)).any(-1).sum())
        raise RoutingError(f"router logits: {bad} token(s) have non-finite logits (NaN or inf)")


def check_top_k(top_k: int, num_experts: int, what: str = "top_k") -> None:
    if not isinstance(top_k, int) or top_k < 1:
        raise RoutingError(f"{what} must be a positive int, got {top_k!r}")
    if top_k > num_experts:
        raise RoutingError(f"{what}={top_k} > number of experts E={num_experts}")


def check_num_experts(num_experts: int, what: str = "num_experts") -> None:
    if not isinstance(num_experts, int) or num_experts < 1:
        raise RoutingError(f"{what} must be a positive int, got {num_experts!r}")


def pad_selection(select_TE: Tensor, gates_TE: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Turn a variable per-token selection into fixed K slots padded with masked entries.

    Args:
        select_TE: bool, True where token t goes to expert e.
        gates_TE: combine weight of each (t, e); only read where selected.
    Returns:
        ids_TK, weights_TK (0 on padding), mask_TK with K = max(1, most experts any token got).
        Chosen experts come first in each row, in descending gate order.
    """
    k = max(1, int(select_TE.sum(-1).max())) if select_TE.numel() else 1
    key_TE = torch.where(
        select_TE, gates_TE.float(), torch.full_like(gates_TE, -torch.inf, dtype=torch.float32)
    )
    _, ids_TK = key_TE.topk(k, dim=-1)
    mask_TK = select_TE.gather(1, ids_TK)
    weights_TK = torch.where(
        mask_TK, gates_TE.gather(1, ids_TK), torch.zeros((), dtype=gates_TE.dtype)
    )
    return ids_TK, weights_TK, mask_TK
