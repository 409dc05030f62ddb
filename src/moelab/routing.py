"""The one routing type every stage shares: what a router decided for T tokens.

Shape legend: T tokens, E experts, K slots per token (top-k, or the most experts any token got
when a router picks a variable number).

``moelab.nn``'s routers return it, the model view's routing edits take and return it, routing hooks
and ``moelab trace`` see it (a masked slot is written to a trace as expert id -1). It sits at the
bottom of the package: it imports nothing of moelab but the errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from moelab.errors import MoelabError


class RoutingError(MoelabError, ValueError):
    """A router got an argument or produced logits it cannot route with."""


@dataclass
class Routing:
    """What one router decided for T tokens.

    Attributes:
        logits_TE: raw router logits (before softmax/sigmoid), one column per real expert, or None
            where a producer has none. ``moelab.nn`` routers give float32; a model's routing edits
            see the family's own logits (its dtype, with gradients).
        ids_TK: int64 chosen expert per slot. Where ``mask_TK`` is False the id must be ignored;
            null-expert routers (AdaMoE) put the null expert's index ``E + j`` there.
        weights_TK: combine weights exactly as the experts receive them (after any renormalisation
            and scaling); 0 where ``mask_TK`` is False.
        mask_TK: bool, True where the slot goes to a real expert; None means every slot is real.
        aux: statistics the losses need (e.g. ``probs_TE`` for sigmoid routers, ``null_logits_TN``).
    """

    logits_TE: Tensor | None
    ids_TK: Tensor
    weights_TK: Tensor
    mask_TK: Tensor | None = None
    aux: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        if self.logits_TE is None:
            raise RoutingError("Routing.num_experts: this routing has no logits; pass num_experts")
        return self.logits_TE.shape[-1]

    def real_mask(self) -> Tensor:
        """[T,K] bool mask of real slots (all True when ``mask_TK`` is None)."""
        if self.mask_TK is None:
            return torch.ones_like(self.ids_TK, dtype=torch.bool)
        return self.mask_TK

    def tokens_per_expert(self, num_experts: int | None = None) -> Tensor:
        """[E] int64 number of real slots routed to each expert."""
        e = self.num_experts if num_experts is None else num_experts
        keep = self.real_mask()
        return torch.bincount(self.ids_TK[keep], minlength=e)[:e]

    def dense_weights(self, num_experts: int | None = None) -> Tensor:
        """[T,E] combine weights (0 for experts a token's real slots did not pick), in the weights'
        dtype and differentiable in them."""
        e = self.num_experts if num_experts is None else num_experts
        w_TK = self.weights_TK.masked_fill(~self.real_mask(), 0)
        ids_TK = self.ids_TK.clamp(0, e - 1)  # a switched-off slot's id may be -1; its weight is 0
        return torch.zeros(ids_TK.shape[0], e, dtype=w_TK.dtype, device=w_TK.device).scatter_add(1, ids_TK, w_TK)

    def masked_ids(self) -> Tensor:
        """``ids_TK`` with -1 in switched-off slots (the trace's convention)."""
        if self.mask_TK is None:
            return self.ids_TK
        return self.ids_TK.masked_fill(~self.mask_TK, -1)

    def replace(self, **changes) -> Routing:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return replace(self, **changes)


__all__ = ["Routing", "RoutingError"]
