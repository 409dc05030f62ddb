"""Round-to-nearest (RTN) weight quantisation of stacked expert weights: the calibration-free baseline.

Shape legend: E experts, O output features, I input features, G groups along the input dim.

Each group of ``group_size`` input features of each output row gets its own scale (and zero point when
asymmetric) from its min/max, and every weight is rounded to the nearest level (see
:mod:`moelab.compress.quant.common` for the formulas)::

    q = clamp(round(w / s) + z, qmin, qmax),    w' = (q - z) s,    |w - w'| <= s / 2

The baseline of GPTQ (Frantar et al. 2023) and of every MoE quantisation paper.
"""

from __future__ import annotations

from torch import Tensor

from moelab.compress.quant.common import QuantConfig, QuantizedTensor, qparams, quantize_grouped


def rtn_quantize(w_EOI: Tensor, cfg: QuantConfig) -> QuantizedTensor:
    """Round ``w [..., O, I]`` (e.g. ``[E, O, I]``) to the nearest level, per group of each row."""
    scale, zero = qparams(w_EOI, cfg)
    return QuantizedTensor(quantize_grouped(w_EOI.detach(), scale, zero, cfg), scale, zero, cfg)


__all__ = ["rtn_quantize"]
