"""The helpers routers share; `Routing` itself lives at the bottom of the package (`moelab.routing`).

Shape legend: T tokens, H hidden size, E experts, K slots per token (top-k, or the largest number of
experts any token got when a router picks a variable number).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.routing import Routing, RoutingError

__all__ = ["Routing", "RoutingError", "check_finite", "check_num_experts", "check_top_k",
           "pad_selection", "router_logits"]


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
