"""`ChainOfExperts`: C sequential routing iterations over the experts of one layer.

Chain-of-Experts (Wang et al. 2025, "Chain-of-Experts: Unlocking the Communication Power of
Mixture-of-Experts Models", code github.com/ZihanWang314/CoE). Within one layer, tokens pass through
the experts C times; iteration i has its own router g_i and sees the previous iteration's output:

    x^(0) = x
    x^(i) = x^(i-1) + sum_{e in topK(g_i(x^(i-1)))} g_{i,e}(x^(i-1)) E_e(x^(i-1)) + S(x^(i-1)),  i = 1..C
    y     = x^(C)

S is the optional shared expert (applied at every iteration, as in CoE's ``CoeMoE.forward``). The
residual between iterations is ``residual="inner"`` above (CoE's default); ``"add_init"`` uses
x^(i) = x^(0) + f_i(x^(i-1)) and ``"none"`` uses x^(i) = f_i(x^(i-1)) (then C=1 is a plain
`MoELayer`). With ``"inner"``/``"add_init"`` the output already contains the input, so a block using
this layer must not add its own residual around it (CoE's decoder layer does not).

Experts are the same E experts at every iteration (the paper's setting) or, with one `Experts` per
iteration, independent experts per iteration (the paper's ablation).

Shape legend: T tokens, H hidden, E experts, K slots per token, C iterations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moelab.nn.layer import MoELayer, apply_capacity
from moelab.nn.routing import Routing, RoutingError

RESIDUALS = ("inner", "add_init", "none")


@dataclass(kw_only=True)
class ChainConfig:
    """``residual``: how iteration outputs are combined, one of ``RESIDUALS``."""

    residual: str = "inner"

    def __post_init__(self) -> None:
        if self.residual not in RESIDUALS:
            raise RoutingError(
                f"ChainConfig.residual must be one of {RESIDUALS}, got {self.residual!r}"
            )


@dataclass
class ChainOutput:
    """``y`` has the input's shape; one `Routing` and one dropped-slot count per iteration."""

    y: Tensor
    routings: list[Routing] = field(default_factory=list)
    num_dropped: list[Tensor] = field(default_factory=list)

    @property
    def routing(self) -> Routing:
        """The last iteration's routing (what a caller expecting a `MoELayer` output reads)."""
        return self.routings[-1]


class ChainOfExperts(nn.Module):
    """``ChainOfExperts(routers, experts, shared_experts=None, shared_gate=None, ...)``.

    ``routers``: C routers (C = number of iterations). ``experts``: one `Experts` shared by all
    iterations, or a sequence of C (independent experts per iteration).
    ``forward(x[..., H], **router_kwargs) -> ChainOutput``.
    """

    def __init__(
        self,
        routers: Sequence[nn.Module],
        experts: nn.Module | Sequence[nn.Module],
        shared_experts: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        capacity_factor: float | None = None,
        config: ChainConfig | None = None,
    ) -> None:
        super().__init__()
        routers = list(routers)
        if not routers:
            raise RoutingError("ChainOfExperts: routers must hold at least one router (C >= 1)")
        experts_list = [experts] if isinstance(experts, nn.Module) else list(experts)
        if len(experts_list) not in (1, len(routers)):
            raise RoutingError(
                f"ChainOfExperts: experts must be one module or one per iteration "
                f"(C={len(routers)}), got {len(experts_list)}"
            )
        self.config = config or ChainConfig()
        self.routers = nn.ModuleList(routers)
        self.experts = nn.ModuleList(experts_list)
        self.shared_experts, self.shared_gate = shared_experts, shared_gate
        # One MoELayer view per iteration over the registered modules (a plain list, so the shared
        # experts' parameters are registered once; MoELayer checks router E == experts E).
        self._steps = [
            MoELayer(
                r,
                self.experts[i if len(self.experts) > 1 else 0],
                shared_experts,
                shared_gate,
                capacity_factor,
            )
            for i, r in enumerate(self.routers)
        ]

    @property
    def iterations(self) -> int:
        return len(self.routers)

    @property
    def independent_experts(self) -> bool:
        return len(self.experts) > 1

    def forward(self, x: Tensor, **router_kwargs) -> ChainOutput:
        shape = x.shape
        x0_TH = x.reshape(-1, shape[-1])
        x_TH = x0_TH
        out = ChainOutput(x)
        for step in self._steps:
            f_TH, routing, dropped = step.step(x_TH, **router_kwargs)
            out.routings.append(routing)
            out.num_dropped.append(dropped)
            x_TH = self._combine(x0_TH, x_TH, f_TH)
        out.y = x_TH.reshape(shape)
        return out

    def _combine(self, x0_TH: Tensor, prev_TH: Tensor, f_TH: Tensor) -> Tensor:
        if self.config.residual == "inner":
            return prev_TH + f_TH
        if self.config.residual == "add_init":
            return x0_TH + f_TH
        return f_TH

    def reference(self, x: Tensor, **router_kwargs) -> Tensor:
        """Slow, obvious loop: each iteration's routing (and capacity), then the experts' per-token reference."""
        shape = x.shape
        x0_TH = x.reshape(-1, shape[-1])
        x_TH = x0_TH
        for i, router in enumerate(self.routers):
            r = router(x_TH, **router_kwargs)
            cf = self._steps[i].capacity_factor
            if cf is not None:
                r, _ = apply_capacity(r, r.num_experts, cf)
            experts = self.experts[i if self.independent_experts else 0]
            f_TH = experts.reference(x_TH, r.ids_TK, r.weights_TK.to(x.dtype), r.mask_TK)
            if self.shared_experts is not None:
                s_TH = self.shared_experts(x_TH)
                if self.shared_gate is not None:
                    s_TH = s_TH * torch.sigmoid(self.shared_gate(x_TH))
                f_TH = f_TH + s_TH
            x_TH = self._combine(x0_TH, x_TH, f_TH)
        return x_TH.reshape(shape)
