"""Live expert weights for moelab's experts backend (:mod:`moelab.models.backend`).

Shape legend: E experts, H hidden, I expert width.

The same reshapes as the view's (``_common.fused_gate_up`` / ``transposed_gate_up``) but without
``.detach()``: these are differentiable views of the parameters, so gradients of the backend's
output reach the model's own parameters.
"""

from __future__ import annotations

from torch import Tensor

from moelab.models.backend import ExpertsSpec, ExpertWeights
from moelab.models.view import MoEBlockView


def fused_weights(gate_up_EXH: Tensor, down_EHI: Tensor) -> ExpertWeights:
    """Standard storage ``gate_up_proj [E, 2I, H]`` (gate rows first), ``down_proj [E, H, I]``."""
    i = gate_up_EXH.shape[1] // 2
    return ExpertWeights(gate_up_EXH[:, :i], gate_up_EXH[:, i:], down_EHI)


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
        gate, up = gu[:, :i], gu[:, i:]
        if gate_up_bias_EX is not None:
            gb, ub = gate_up_bias_EX[:, :i], gate_up_bias_EX[:, i:]
    return ExpertWeights(gate, up, down_EIH.transpose(1, 2), gb, ub, down_bias_EH)


def _standard(block: MoEBlockView) -> ExpertWeights:
    return fused_weights(block.experts_module.gate_up_proj, block.experts_module.down_proj)


# decorated experts with gate_up_proj [E, 2I, H] and down_proj [E, H, I]: through ExpertsInterface
STANDARD = ExpertsSpec(weights=_standard)
