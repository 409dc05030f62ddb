"""The compression plan: what every planner returns and what :func:`moelab.compress.apply_plan` consumes.

A planner (pruning, merging, atomic pruning) never edits a model: it returns a :class:`Plan`, which
says, per MoE layer, which experts the compressed layer has and how each is built from the original
ones. Pruning is the special case of groups of one; merging lists several members with coefficients
and optional neuron alignments; atomic (neuron-level) pruning adds a neuron mask.

Shape legend (moelab convention, see :mod:`moelab.models.view`):
    E  experts of the original layer      E' experts of the compressed layer
    I  intermediate size of one expert    H  hidden size

Output expert ``o`` of a layer, built from members ``m`` with coefficient ``c_m`` (a scalar or one per
output neuron, ``[I]``) and neuron permutation ``p_m`` (``[I]``, output neuron ``n`` takes the member's
neuron ``p_m[n]``; identity when None)::

    gate[o][n, :] = sum_m c_m[n] * gate[m][p_m[n], :]        (likewise up, gate_bias, up_bias)
    down[o][:, n] = sum_m c_m[n] * down[m][:, p_m[n]]        (down_bias[o] = sum_m mean(c_m) * down_bias[m])
    router row of o = router row (and router / correction bias) of ``router_from`` (default: first member)
    neurons where ``neuron_mask`` is False are zeroed in gate, up and down (atomic pruning)

Layers absent from ``Plan.layers`` are copied unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moelab.errors import MoelabError


class PlanError(MoelabError):
    """A plan that is malformed or does not fit the model it is applied to."""


@dataclass(eq=False)
class Member:
    """One source expert of an output expert: ``coef`` (float or ``[I]`` tensor) and ``perm`` (``[I]`` or None)."""

    expert: int
    coef: float | Tensor = 1.0
    perm: Tensor | None = None


@dataclass(eq=False)
class OutExpert:
    """An expert of the compressed layer: its members, whose router row it takes, and a neuron mask."""

    members: list[Member]
    router_from: int | None = None  # original expert whose router row/bias it gets; None: members[0]
    neuron_mask: Tensor | None = None  # [I] bool; False = neuron removed (zeroed)

    def __post_init__(self) -> None:
        if not self.members:
            raise PlanError("an output expert needs at least one member")
        if self.router_from is None:
            self.router_from = self.members[0].expert

    @property
    def is_plain(self) -> bool:
        """True when this output expert is an unchanged copy of one original expert."""
        m = self.members
        return (len(m) == 1 and m[0].perm is None and self.neuron_mask is None
                and not isinstance(m[0].coef, Tensor) and m[0].coef == 1.0 and self.router_from == m[0].expert)


@dataclass(eq=False)
class LayerPlan:
    """The compressed form of one MoE layer (decoder layer index ``layer``)."""

    layer: int
    experts: list[OutExpert]

    @classmethod
    def keep(cls, layer: int, experts: list[int]) -> LayerPlan:
        """Pruning: keep these original experts (in this order), drop the rest."""
        return cls(layer, [OutExpert([Member(int(e))]) for e in experts])

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def sources(self) -> list[int]:
        """Original experts whose router rows the compressed layer keeps, in output order."""
        return [int(o.router_from) for o in self.experts]

    def is_pruning(self) -> bool:
        """True when every output expert is a plain copy of a distinct original expert."""
        return all(o.is_plain for o in self.experts) and len(set(self.sources())) == len(self.experts)


@dataclass(eq=False)
class Plan:
    """Per-layer plans, the top-k of the compressed model (None: keep, clamped to E'), and metadata.

    ``meta`` holds what a reader of the result wants to know: method, ratio, seed, calibration tokens,
    seconds, per-expert scores (plain lists, JSON-serialisable).
    """

    method: str
    layers: dict[int, LayerPlan]
    top_k: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self, num_experts: dict[int, int], intermediate: dict[int, int]) -> None:
        """Check the plan against a model's layers (``layer -> E`` and ``layer -> I``); raise PlanError."""
        for layer, lp in self.layers.items():
            if layer not in num_experts:
                raise PlanError(f"plan layer {layer}: the model has no MoE block there "
                                f"(MoE layers: {sorted(num_experts)})")
            E, I = num_experts[layer], intermediate[layer]
            if not lp.experts:
                raise PlanError(f"plan layer {layer}: removes every expert")
            for o, out in enumerate(lp.experts):
                for m in out.members:
                    if not 0 <= m.expert < E:
                        raise PlanError(f"plan layer {layer} expert {o}: member {m.expert} outside [0, {E})")
                    if m.perm is not None and tuple(m.perm.shape) != (I,):
                        raise PlanError(f"plan layer {layer} expert {o}: perm shape {tuple(m.perm.shape)}, "
                                        f"expected ({I},)")
                    if isinstance(m.coef, Tensor) and tuple(m.coef.shape) != (I,):
                        raise PlanError(f"plan layer {layer} expert {o}: coef shape {tuple(m.coef.shape)}, "
                                        f"expected a scalar or ({I},)")
                if not 0 <= int(out.router_from) < E:
                    raise PlanError(f"plan layer {layer} expert {o}: router_from {out.router_from} "
                                    f"outside [0, {E})")
                if out.neuron_mask is not None and tuple(out.neuron_mask.shape) != (I,):
                    raise PlanError(f"plan layer {layer} expert {o}: neuron_mask shape "
                                    f"{tuple(out.neuron_mask.shape)}, expected ({I},)")
        if self.top_k is not None and self.top_k < 1:
            raise PlanError(f"plan top_k: expected >= 1, got {self.top_k}")

    def to_json(self) -> str:
        """JSON text of the plan (tensors as lists), for ``plan.json`` beside a compressed checkpoint."""

        def t(x: Any) -> Any:
            return x.tolist() if isinstance(x, Tensor) else x

        layers = {
            str(layer): [
                {"members": [{"expert": m.expert, "coef": t(m.coef), "perm": t(m.perm)} for m in o.members],
                 "router_from": o.router_from, "neuron_mask": t(o.neuron_mask)}
                for o in lp.experts
            ]
            for layer, lp in sorted(self.layers.items())
        }
        return json.dumps({"method": self.method, "top_k": self.top_k, "meta": self.meta, "layers": layers},
                          indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)

        def tensor(x: Any, dtype: torch.dtype) -> Any:
            return None if x is None else torch.tensor(x, dtype=dtype)

        layers = {}
        for key, outs in d["layers"].items():
            experts = []
            for o in outs:
                members = [Member(m["expert"], m["coef"] if not isinstance(m["coef"], list)
                                  else tensor(m["coef"], torch.float64), tensor(m["perm"], torch.long))
                           for m in o["members"]]
                experts.append(OutExpert(members, o["router_from"], tensor(o["neuron_mask"], torch.bool)))
            layers[int(key)] = LayerPlan(int(key), experts)
        return cls(d["method"], layers, d.get("top_k"), d.get("meta", {}))
