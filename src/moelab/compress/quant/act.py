"""Activation fake-quantisation of the routed experts' linears (W4A4 / W3A4 / W4A8 simulation).

Shape legend: N rows (tokens, or routed slots for the down projection), C channels of a row.

Per-token (per-row) symmetric quantisation with the row's absolute maximum as its range, the
dynamic scheme EAQuant (Fu et al. 2025, arXiv 2506.13329) and its baselines report as "A4"/"A8"::

    qmax  = 2^(b-1) - 1
    scale = max_c |x_nc| / qmax              (a row of zeros: scale 1, it stays 0)
    x'    = clamp(round(x / scale), -qmax, qmax) * scale

computed in float32 (float64 inputs in float64) and returned in the input's dtype. An element is off
by at most ``scale / 2``; the row's largest element is kept (up to rounding). At 16 bits the error is below
``max|x| / 65534``: practically the identity.

Where: the inputs of the quantised expert linears, i.e. the rows the gate/up projections read and the
down projection's input ``act(gate x) * up x``, through the experts backend's inputs transform
(:func:`moelab.models.backend.enable_experts_backend`). Attention, routers, the shared expert and
dense MLPs keep full-precision activations (moelab quantises routed experts only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, open_model
from moelab.models.backend import disable_experts_backend, enable_experts_backend, experts_backend

ACT_BITS = (4, 8, 16)
WHERE = ("gate_up", "down")


@dataclass(frozen=True)
class ActQuantConfig:
    """Per-token symmetric fake quantisation of the experts' linear inputs: ``bits`` 4, 8 or 16;
    ``where``: which inputs (the gate/up input rows, the down projection's input)."""

    bits: int = 8
    where: tuple[str, ...] = WHERE

    def __post_init__(self) -> None:
        if self.bits not in ACT_BITS:
            raise MoelabError(f"act_bits: {self.bits} is not supported; expected one of {ACT_BITS}")
        bad = [w for w in self.where if w not in WHERE]
        if bad or not self.where:
            raise MoelabError(f"act where: {list(self.where)}; expected a non-empty subset of {WHERE}")

    def describe(self) -> str:
        return f"A{self.bits} per-token"


def fake_quant_per_token(x_NC: Tensor, bits: int) -> Tensor:
    """``x_NC`` quantised per row to ``bits`` symmetric integers and back (see the module docstring)."""
    work = torch.float64 if x_NC.dtype == torch.float64 else torch.float32
    x = x_NC.to(work)
    qmax = float((1 << (bits - 1)) - 1)
    scale_N1 = x.abs().amax(dim=-1, keepdim=True) / qmax
    scale_N1 = torch.where(scale_N1 > 0, scale_N1, torch.ones_like(scale_N1))
    q = torch.clamp(torch.round(x / scale_N1), -qmax, qmax)
    return (q * scale_N1).to(x_NC.dtype)


class ActQuant:
    """The experts backend's inputs transform for :class:`ActQuantConfig`."""

    def __init__(self, config: ActQuantConfig) -> None:
        self.config = config

    def __call__(self, rows: Tensor, where: str) -> Tensor:
        if where not in self.config.where or rows.numel() == 0:
            return rows
        return fake_quant_per_token(rows, self.config.bits)


class ActQuantHandle:
    """Undoes :func:`install_act_quant` (``remove()``, or a ``with`` block): the inputs transform
    each backend had before, or moelab's backend off where it installed it."""

    def __init__(self, view: ModelView, previous: list | None = None) -> None:
        self.view = view
        self.previous = previous  # [(backend, its earlier inputs)], or None: it enabled the backend

    def remove(self) -> None:
        if self.previous is None:
            disable_experts_backend(self.view)
        else:
            for backend, inputs in self.previous:
                backend.inputs = inputs

    def __enter__(self) -> ActQuantHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def install_act_quant(model: nn.Module | ModelView, config: ActQuantConfig) -> ActQuantHandle:
    """Run every MoE block's routed experts through moelab's experts backend with per-token fake
    quantised inputs; ``handle.remove()`` undoes it. Where moelab's backend already runs every
    block (e.g. an offloading provider), only its inputs transform is set, so the provider stays."""
    view = model if isinstance(model, ModelView) else open_model(model)
    backends = [experts_backend(b) for b in view.blocks]
    if backends and all(b is not None for b in backends):
        previous = [(b, b.inputs) for b in backends]
        for b in backends:
            b.inputs = ActQuant(config)
        return ActQuantHandle(view, previous)
    enable_experts_backend(view, inputs=ActQuant(config))
    return ActQuantHandle(view)


__all__ = ["ACT_BITS", "ActQuant", "ActQuantConfig", "ActQuantHandle", "fake_quant_per_token", "install_act_quant"]
