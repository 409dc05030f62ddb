"""Live expert weights for moelab's experts backend (:mod:`moelab.models.backend`).

Shape legend: E experts, H hidden, I expert width.

The same reshapes as the view's (``_common.fused_gate_up`` / ``transposed_gate_up``) but without
``.detach()``: these are differentiable views of the parameters, so gradients of the backend's
output reach the model's own parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.models.backend import ExpertsSpec, ExpertWeights, own_params
from moelab.models.view import MoEBlockView
from moelab.nn._dispatch import halves_of_one


class _SplitGateUp(torch.autograd.Function):
    """``gate_up [E, 2I, H] -> (gate, up)`` views whose backward is one ``cat`` of the two
    gradients (none where moelab's backward already wrote them into one buffer); autograd's own
    slice backward would zero-fill and add two ``[E, 2I, H]`` buffers, which cost ~10-20 % of a
    fine-grained block's training step on CPU."""

    @staticmethod
    def forward(ctx, gate_up_EXH):  # noqa: D102
        i = gate_up_EXH.shape[1] // 2
        return gate_up_EXH[:, :i], gate_up_EXH[:, i:]

    @staticmethod
    def backward(ctx, d_gate, d_up):  # noqa: D102
        if halves_of_one(d_gate, d_up):  # moelab's backward wrote both into one buffer
            E, i, h = d_gate.shape
            return d_gate.as_strided((E, 2 * i, h), (2 * i * h, h, 1), d_gate.storage_offset())
        if d_gate is None:
            d_gate = torch.zeros_like(d_up)
        if d_up is None:
            d_up = torch.zeros_like(d_gate)
        return torch.cat((d_gate, d_up), dim=1)


def split_gate_up(gate_up_EXH: Tensor) -> tuple[Tensor, Tensor]:
    """``gate [E, I, H]``, ``up [E, I, H]`` views of ``gate_up [E, 2I, H]`` (gate rows first)."""
    if torch.is_grad_enabled() and gate_up_EXH.requires_grad:
        return _SplitGateUp.apply(gate_up_EXH)
    i = gate_up_EXH.shape[1] // 2
    return gate_up_EXH[:, :i], gate_up_EXH[:, i:]


def fused_weights(gate_up_EXH: Tensor, down_EHI: Tensor) -> ExpertWeights:
    """Standard storage ``gate_up_proj [E, 2I, H]`` (gate rows first), ``down_proj [E, H, I]``."""
    return ExpertWeights(*split_gate_up(gate_up_EXH), down_EHI)


def transposed_weights(
    gate_up_EHX: Tensor,
    down_EIH: Tensor,
    interleaved: bool,
    gate_up_bias_EX: Tensor | None = None,
    down_bias_EH: Tensor | None = None,
) -> ExpertWeights:
    """Transposed storage ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``: gate then up
    (Llama4) or interleaved, gate = even columns (GPT-OSS, with its interleaved bias)."""
    i = gate_up_EHX.shape[2] // 2
    gu = gate_up_EHX.transpose(1, 2)
    gb = ub = None
    if interleaved:
        gate, up = gu[:, 0::2], gu[:, 1::2]
        if gate_up_bias_EX is not None:
            gb, ub = gate_up_bias_EX[:, 0::2], gate_up_bias_EX[:, 1::2]
    else:
        gate, up = split_gate_up(gu)
        if gate_up_bias_EX is not None:
            gb, ub = gate_up_bias_EX[:, :i], gate_up_bias_EX[:, i:]
    return ExpertWeights(gate, up, down_EIH.transpose(1, 2), gb, ub, down_bias_EH)


_STANDARD_PARAMS = ("experts.gate_up_proj", "experts.down_proj")


def standard_from_params(block: MoEBlockView, t: dict[str, Tensor]) -> ExpertWeights:
    return fused_weights(t["experts.gate_up_proj"], t["experts.down_proj"])


def _standard(block: MoEBlockView) -> ExpertWeights:
    return standard_from_params(block, own_params(block, _STANDARD_PARAMS))


# decorated experts with gate_up_proj [E, 2I, H] and down_proj [E, H, I]: through ExpertsInterface
STANDARD = ExpertsSpec(
    weights=_standard, params=_STANDARD_PARAMS, from_params=standard_from_params
)
