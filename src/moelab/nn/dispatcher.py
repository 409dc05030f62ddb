"""Token dispatchers: the seam between a router's decision and the grouped experts.

Shape legend: T tokens, H hidden, E experts, K slots per token, M rows the experts read,
R real (routed) slots.

A dispatcher turns ``(x_TH, ids_TK, weights_TK, mask_TK)`` into a :class:`Dispatch` (rows the
experts read, one combine weight per slot, and a :class:`~moelab.nn._dispatch.Plan` sorting the
slots by expert) and, after the experts, maps their ``y_MH`` back to ``y_TH``. `MoELayer` runs

    routing = router(x_TH)
    d = dispatcher.dispatch(x_TH, routing.ids_TK, weights_TK, routing.mask_TK, E)   # permute
    y_MH = experts.run(d.x_MH, d.weights_MK, d.plan)                              # grouped experts
    y_TH = dispatcher.combine(y_MH, d)                                            # unpermute

so expert parallelism swaps the dispatcher only (as torchtitan's ``token_dispatcher``): an
all-to-all dispatcher sends each slot's row to the rank holding its expert (M = rows received,
one slot per row, plan over the local experts) and its ``combine`` sends the weighted rows back
and sums them per token.

`LocalDispatcher` keeps every row where it is: M = T and the permutation is only the plan; the
grouped experts gather each expert's rows and scatter-add its outputs themselves, expert by
expert, so no ``[R, H]`` buffer is built (see `moelab.nn._dispatch`), and ``combine`` is the
identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from moelab.nn._dispatch import Plan, make_plan


@dataclass
class Dispatch:
    """What the grouped experts receive: ``y_m = sum_k weights_MK[m, k] * expert(x_MH[m])`` over
    the slots the plan lists. ``state`` is whatever the dispatcher's ``combine`` needs."""

    x_MH: Tensor
    weights_MK: Tensor
    plan: Plan
    state: Any = None


class Dispatcher(Protocol):
    """``dispatch`` before the grouped experts and ``combine`` after them (see module docstring)."""

    def dispatch(
        self,
        x_TH: Tensor,
        ids_TK: Tensor,
        weights_TK: Tensor,
        mask_TK: Tensor | None,
        num_experts: int,
    ) -> Dispatch: ...

    def combine(self, y_MH: Tensor, dispatch: Dispatch) -> Tensor: ...


class LocalDispatcher:
    """All experts on this device: the permutation is the plan, the rows stay in place."""

    def dispatch(
        self,
        x_TH: Tensor,
        ids_TK: Tensor,
        weights_TK: Tensor,
        mask_TK: Tensor | None,
        num_experts: int,
    ) -> Dispatch:
        return Dispatch(x_TH, weights_TK, make_plan(ids_TK, mask_TK, num_experts))

    def combine(self, y_MH: Tensor, dispatch: Dispatch) -> Tensor:
        return y_MH

    def __repr__(self) -> str:
        return "LocalDispatcher()"


class PermutingDispatcher:
    """The permutation made physical: each real slot becomes its own row ``x_RH`` sorted by expert
    (one slot per row, weight carried along), and ``combine`` sums the rows back per token.

    This is what the experts see behind an all-to-all dispatcher, on one device; slower than
    `LocalDispatcher` (it builds ``[R, H]``), kept as the reference an expert-parallel dispatcher
    is tested against.
    """

    def dispatch(
        self, x_TH: Tensor, ids_TK: Tensor, weights_TK: Tensor, mask_TK: Tensor | None,
        num_experts: int,
    ) -> Dispatch:
        plan = make_plan(ids_TK, mask_TK, num_experts)
        R = plan.num_real
        x_RH = x_TH.index_select(0, plan.tok_R)
        w_R1 = weights_TK.reshape(-1).index_select(0, plan.slot_R)[:, None]
        rows = torch.arange(R, device=x_TH.device)
        return Dispatch(x_RH, w_R1, Plan(rows, rows, plan.counts, R, R, 1), (plan, x_TH.shape[0]))

    def combine(self, y_MH: Tensor, dispatch: Dispatch) -> Tensor:
        plan, T = dispatch.state
        return y_MH.new_zeros(T, y_MH.shape[1]).index_add(0, plan.tok_R, y_MH)


__all__ = ["Dispatch", "Dispatcher", "LocalDispatcher", "PermutingDispatcher"]
