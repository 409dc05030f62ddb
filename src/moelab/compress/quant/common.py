"""Integer weight quantisation: the configuration, per-group scales and zero points, quantise and dequantise.

Shape legend: O output features, I input features, G groups along the input dim (``I / group_size``),
g the group size, ``...`` leading dims (e.g. E experts of a stacked ``[E, O, I]`` weight).

The convention is the one compressed-tensors (the format llm-compressor writes and vLLM reads) uses,
so a weight quantised here dequantises to the same values there::

    signed range   q in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]
    symmetric      scale = max|w_group| / ((qmax - qmin) / 2),       zero = 0
    asymmetric     scale = (max(w_group, 0) - min(w_group, 0)) / (qmax - qmin),
                   zero = clamp(round(qmin - min(w_group, 0) / scale), qmin, qmax)
    quantise       q = clamp(round(w / scale) + zero, qmin, qmax)
    dequantise     w' = (q - zero) * scale

A group whose weights are all 0 gets the smallest positive scale of its dtype (compressed-tensors'
rule), so it quantises to 0 and never divides by zero. With ``round`` to nearest, an element inside
the clamp range is off by at most ``scale / 2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.errors import MoelabError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantisation settings.

    bits: 2, 3, 4 or 8; group_size: input features sharing one scale (None: one group per output
    row, i.e. per channel); symmetric: zero point 0 (else one integer zero point per group).
    """

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise MoelabError(f"bits: {self.bits} is not supported; expected one of {SUPPORTED_BITS}")
        if self.group_size is not None and self.group_size < 1:
            raise MoelabError(f"group_size: expected a positive number of input features, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def group(self, in_features: int, what: str = "weight") -> int:
        """The group size for ``in_features`` inputs; MoelabError if it does not divide them."""
        g = in_features if self.group_size is None else self.group_size
        if in_features % g:
            raise MoelabError(f"group_size: {g} does not divide the input dimension {in_features} of {what}; "
                              f"choose a divisor of {in_features}")
        return g

    def describe(self) -> str:
        grp = "per-channel" if self.group_size is None else f"group {self.group_size}"
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {grp}"


@dataclass(eq=False)
class QuantizedTensor:
    """A quantised weight ``[..., O, I]``: ``q`` int8 ``[..., O, I]``, ``scale`` ``[..., O, G]`` (the
    weight's dtype), ``zero`` int8 ``[..., O, G]`` (all 0 when symmetric)."""

    q: Tensor
    scale: Tensor
    zero: Tensor
    config: QuantConfig

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``(q - zero) * scale`` per group, in ``dtype`` (default: the scale's)."""
        return dequantize(self.q, self.scale, self.zero, dtype)

    @property
    def group_size(self) -> int:
        return self.q.shape[-1] // self.scale.shape[-1]


def _grouped(w: Tensor, g: int) -> Tensor:
    """``[..., O, I] -> [..., O, G, g]`` (a view)."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // g, g)


def _expand(p_OG: Tensor, g: int) -> Tensor:
    """``[..., O, G] -> [..., O, G*g]``: one value per element of its group."""
    return p_OG.repeat_interleave(g, dim=-1)


def qparams_from_range(wmin: Tensor, wmax: Tensor, cfg: QuantConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scale (in ``dtype``) and int8 zero point for groups with minimum ``wmin`` and maximum ``wmax``."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    wmin = torch.clamp(wmin.to(work), max=0.0)
    wmax = torch.clamp(wmax.to(work), min=0.0)
    span = float(cfg.qmax - cfg.qmin)
    if cfg.symmetric:
        scale = torch.maximum(-wmin, wmax) / (span / 2)
    else:
        scale = (wmax - wmin) / span
    scale = scale.to(dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=scale.device), scale)
    if cfg.symmetric:
        zero = torch.zeros(scale.shape, dtype=torch.int8, device=scale.device)
    else:
        zero = torch.clamp(torch.round(cfg.qmin - wmin / scale.to(work)), cfg.qmin, cfg.qmax)
        zero = zero.to(torch.int8)
    return scale, zero


def qparams(w: Tensor, cfg: QuantConfig) -> tuple[Tensor, Tensor]:
    """Per-group ``scale [..., O, G]`` and ``zero [..., O, G]`` of ``w [..., O, I]`` (min/max of each group)."""
    g = cfg.group(w.shape[-1])
    wg = _grouped(w.detach(), g)
    return qparams_from_range(wg.amin(-1), wg.amax(-1), cfg, w.dtype)


def quantize_values(w: Tensor, scale: Tensor, zero: Tensor, cfg: QuantConfig) -> Tensor:
    """``clamp(round(w / scale) + zero, qmin, qmax)`` as int8; ``scale``/``zero`` broadcast to ``w``
    (same shape, or expanded per group by :func:`quantize_grouped`)."""
    s = scale.to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    q = torch.round(w.to(s.dtype) / s) + zero.to(s.dtype)
    return torch.clamp(q, cfg.qmin, cfg.qmax).to(torch.int8)


def quantize_grouped(w: Tensor, scale: Tensor, zero: Tensor, cfg: QuantConfig) -> Tensor:
    """int8 ``q [..., O, I]`` of ``w`` with group parameters ``[..., O, G]``."""
    g = w.shape[-1] // scale.shape[-1]
    return quantize_values(w, _expand(scale, g), _expand(zero, g), cfg)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``(q - zero) * scale`` with group parameters ``[..., O, G]``: ``[..., O, I]`` in ``dtype``."""
    dtype = dtype or scale.dtype
    g = q.shape[-1] // scale.shape[-1]
    return ((q.to(dtype) - _expand(zero, g).to(dtype)) * _expand(scale, g).to(dtype))


__all__ = ["SUPPORTED_BITS", "QuantConfig", "QuantizedTensor", "dequantize", "qparams", "qparams_from_range",
           "quantize_grouped", "quantize_values"]
