"""`MoELayer`: router -> dispatcher -> grouped experts -> combine (+ shared experts), dropless by
default, optional capacity.

Shape legend: T tokens, H hidden, E experts, K slots per token, M rows the experts read.

Forward, step by step:
1. flatten x to [T, H]; the router returns a `Routing` (float32 logits, ids, weights, mask);
2. optionally drop slots beyond each expert's capacity C = ceil(capacity_factor * T * K / E)
   (GShard priority: all first choices before any second choice, then token order);
3. dispatch: the dispatcher sorts the real slots by expert (`LocalDispatcher`: a plan over the
   rows in place; an expert-parallel one would send rows to other ranks), see `moelab.nn.dispatcher`;
4. grouped experts: one GEMM chain per expert on its rows, weighted (``experts.run``);
5. combine: the dispatcher maps the experts' rows back to tokens (locally the identity);
6. add the shared experts, optionally scaled by sigmoid(shared_gate(x)) (Qwen2-MoE);
7. reshape to the input's shape. Losses are computed from ``out.routing`` by `moelab.nn.losses`.

Router, dispatcher and experts are sibling attributes, so each can be swapped on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.nn.dispatcher import Dispatcher, LocalDispatcher
from moelab.nn.experts import ACTIVATIONS
from moelab.nn.routing import Routing, RoutingError


@dataclass
class MoEOutput:
    """``y`` has the input's shape; ``num_dropped`` counts slots dropped by the capacity limit."""

    y: Tensor
    routing: Routing
    num_dropped: Tensor


class DenseMLP(nn.Module):
    """A plain (shared) expert: ``down(act(gate x) * up x)``, weights ``[I,H]``/``[H,I]``."""

    def __init__(
        self,
        hidden_size: int,
        inner_size: int,
        activation: str = "swiglu",
        bias: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise RoutingError(
                f"DenseMLP.activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        self.act, gated = ACTIVATIONS[activation]
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.gate = nn.Linear(hidden_size, inner_size, **kw) if gated else None
        self.up = nn.Linear(hidden_size, inner_size, **kw)
        self.down = nn.Linear(inner_size, hidden_size, **kw)

    def forward(self, x_TH: Tensor) -> Tensor:
        h = self.up(x_TH)
        a = self.act(h) if self.gate is None else self.act(self.gate(x_TH), h)
        return self.down(a)


def apply_capacity(
    routing: Routing, num_experts: int, capacity_factor: float
) -> tuple[Routing, Tensor]:
    """Mask slots beyond each expert's capacity; returns the new routing and the number dropped."""
    T, K = routing.ids_TK.shape
    cap = math.ceil(capacity_factor * T * K / num_experts)
    keep_TK = routing.real_mask()
    # Priority order (k, t): transpose so that all first choices come before second choices.
    ids_N = torch.where(keep_TK, routing.ids_TK, num_experts).t().reshape(-1)
    order = torch.argsort(ids_N, stable=True)
    counts = torch.bincount(ids_N, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_N = torch.empty_like(order)
    rank_N[order] = torch.arange(order.numel(), device=order.device) - starts[ids_N[order]]
    fits_TK = (rank_N < cap).view(K, T).t()
    new_mask = keep_TK & fits_TK
    dropped = (keep_TK & ~fits_TK).sum()
    weights = torch.where(new_mask, routing.weights_TK, torch.zeros_like(routing.weights_TK))
    aux = dict(routing.aux, capacity=torch.tensor(cap))
    return Routing(routing.logits_TE, routing.ids_TK, weights, new_mask, aux), dropped


class MoELayer(nn.Module):
    """``MoELayer(router, experts, shared_experts=None, shared_gate=None, capacity_factor=None)``.

    ``forward(x[..., H], **router_kwargs) -> MoEOutput``; router kwargs (e.g. ``domain_T`` for
    domain routing) are passed to the router. ``capacity_factor=None`` is dropless.
    ``combine="output"`` gives ``y_t = sum_k w_tk E_k(x_t)``; ``combine="input"`` gives
    ``y_t = sum_k E_k(w_tk x_t)`` (Llama 4 scales the experts' inputs by the router scores).
    ``dispatcher`` (default `LocalDispatcher`) moves the routed rows to the experts and back;
    experts with a ``run(x_MH, weights_MK, plan)`` method go through it, other experts modules are
    called as ``experts(x_TH, ids_TK, weights_TK, mask_TK)``.
    """

    def __init__(
        self,
        router: nn.Module,
        experts: nn.Module,
        shared_experts: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        capacity_factor: float | None = None,
        combine: str = "output",
        dispatcher: Dispatcher | None = None,
    ) -> None:
        super().__init__()
        if combine not in ("output", "input"):
            raise RoutingError(f"MoELayer: combine must be 'output' or 'input', got {combine!r}")
        self.combine = combine
        r_e, x_e = getattr(router, "num_experts", None), getattr(experts, "num_experts", None)
        if r_e is not None and x_e is not None and r_e != x_e:
            raise RoutingError(
                f"MoELayer: router routes over E={r_e} experts but experts has E={x_e}"
            )
        if capacity_factor is not None and not (
            capacity_factor > 0 and math.isfinite(capacity_factor)
        ):
            raise RoutingError(
                f"MoELayer: capacity_factor must be a positive number or None, got {capacity_factor!r}"
            )
        if shared_gate is not None and shared_experts is None:
            raise RoutingError("MoELayer: shared_gate given without shared_experts")
        self.router, self.experts = router, experts
        self.shared_experts, self.shared_gate = shared_experts, shared_gate
        self.capacity_factor = capacity_factor
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, x: Tensor, **router_kwargs) -> MoEOutput:
        shape = x.shape
        y_TH, routing, dropped = self.step(x.reshape(-1, shape[-1]), **router_kwargs)
        return MoEOutput(y_TH.reshape(shape), routing, dropped)

    def step(self, x_TH: Tensor, **router_kwargs) -> tuple[Tensor, Routing, Tensor]:
        """Steps 1-6 on flat tokens: ``(y_TH, routing, num_dropped)`` (used by `ChainOfExperts`)."""
        routing = self.router(x_TH, **router_kwargs)
        if routing.num_experts != self.num_experts:
            raise RoutingError(
                f"MoELayer: router gave logits for {routing.num_experts} experts, experts has {self.num_experts}"
            )
        dropped = torch.zeros((), dtype=torch.long, device=x_TH.device)
        if self.capacity_factor is not None:
            routing, dropped = apply_capacity(routing, self.num_experts, self.capacity_factor)
        if self.combine == "output":
            y_TH = self.routed(
                x_TH, routing.ids_TK, routing.weights_TK.to(x_TH.dtype), routing.mask_TK
            )
        else:
            y_TH = self._input_combine(x_TH, routing)
        if self.shared_experts is not None:
            s_TH = self.shared_experts(x_TH)
            if self.shared_gate is not None:
                s_TH = s_TH * F.sigmoid(self.shared_gate(x_TH))
            y_TH = y_TH + s_TH
        return y_TH, routing, dropped

    def _input_combine(self, x_TH: Tensor, routing: Routing) -> Tensor:
        """``sum_k E_{ids[t,k]}(w[t,k] x_t)``: one slot per row of a [T*K, H] input, weight 1."""
        T, K = routing.ids_TK.shape
        w_TK1 = routing.weights_TK.to(x_TH.dtype).unsqueeze(-1)
        xs_NH = (x_TH.unsqueeze(1) * w_TK1).reshape(T * K, x_TH.shape[1])
        ones_N1 = torch.ones(T * K, 1, dtype=x_TH.dtype, device=x_TH.device)
        mask = None if routing.mask_TK is None else routing.mask_TK.reshape(T * K, 1)
        y_NH = self.routed(xs_NH, routing.ids_TK.reshape(T * K, 1), ones_N1, mask)
        return y_NH.view(T, K, -1).sum(1)

    def routed(
        self, x_TH: Tensor, ids_TK: Tensor, weights_TK: Tensor, mask_TK: Tensor | None
    ) -> Tensor:
        """Steps 3-5: dispatch, grouped experts, combine; ``y_TH`` (routed experts only)."""
        run = getattr(self.experts, "run", None)
        if run is None:
            return self.experts(x_TH, ids_TK, weights_TK, mask_TK)
        check = getattr(self.experts, "check", None)
        if check is not None:
            check(x_TH, ids_TK, weights_TK, mask_TK)
        d = self.dispatcher.dispatch(x_TH, ids_TK, weights_TK, mask_TK, self.num_experts)
        return self.dispatcher.combine(run(d.x_MH, d.weights_MK, d.plan), d)
