"""Quantise a model's routed experts: one call from a model view to quantised tensors and a stock model.

Shape legend: E experts, I expert width, H hidden; per expert, gate/up ``[I, H]`` and down ``[H, I]``
(the view's convention: ``[out, in]``, groups along the input dim).

:func:`quantize_experts` quantises every routed expert's gate, up and down projection with RTN
(:mod:`.rtn`) or GPTQ (:mod:`.gptq`, Hessians from :mod:`.calibrate`), at one bit-width or at bits
chosen per expert (``bits``: ``layer -> [E]``, e.g. from PMQ, :mod:`.pmq`). What stays in the model's
precision: routers (weights, biases, correction biases), shared experts and their gates, dense MLPs,
attention, norms, embeddings and the LM head, and the experts' biases.
:func:`dequantized_model` writes ``(q - zero) * scale`` back into a copy of the model: a stock
transformers model that saves and loads as any other.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moelab.compress.calib import Calibration
from moelab.compress.quant.calibrate import (
    BlockHessians,
    CalibPolicy,
    calibration_report,
    collect_hessians,
)
from moelab.compress.quant.common import QuantConfig, QuantizedTensor
from moelab.compress.quant.gptq import PERCDAMP, gptq_quantize, hessian_error
from moelab.compress.quant.rtn import rtn_quantize
from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView, open_model

METHODS = ("rtn", "gptq")
PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class QuantSpec:
    """What :func:`quantize_experts` does: ``method`` 'rtn' or 'gptq', the weight format ``config``
    (its ``bits`` is the default bit-width), GPTQ's dampening, and how experts are calibrated."""

    method: str = "gptq"
    config: QuantConfig = field(default_factory=QuantConfig)
    percdamp: float = PERCDAMP
    policy: CalibPolicy = field(default_factory=CalibPolicy)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MoelabError(f"method: {self.method!r} is not a quantisation method; expected one of {METHODS}")
        if not 0 <= self.percdamp < 1:
            raise MoelabError(f"percdamp: expected a share of the mean Hessian diagonal in [0, 1), got {self.percdamp}")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    def at(self, bits: int) -> QuantConfig:
        return QuantConfig(bits, self.config.group_size, self.config.symmetric)


@dataclass(eq=False)
class QuantizedBlock:
    """One MoE block: ``experts[e][proj]`` the QuantizedTensor of projection 'gate'/'up'/'down' of
    expert ``e`` (``[out, in]``), ``bits[e]`` its bit-width, ``error[e]`` its Hessian-weighted output
    error summed over projections (GPTQ's loss; None for RTN without calibration)."""

    layer: int
    experts: list[dict[str, QuantizedTensor]]
    bits: list[int]
    error: list[float] | None = None


@dataclass(eq=False)
class QuantResult:
    """What :func:`quantize_experts` made, with the calibration report (None for RTN); ``extra``:
    what a method on top adds to :meth:`meta` (EAQuant's smoothing and alignment, activation bits)."""

    spec: QuantSpec
    blocks: dict[int, QuantizedBlock]
    calibration: dict[str, Any] | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def average_bits(self) -> float:
        """Bits per routed-expert weight (scales and zero points not counted)."""
        num = den = 0
        for qb in self.blocks.values():
            for e, b in enumerate(qb.bits):
                n = sum(t.q.numel() for t in qb.experts[e].values())
                num, den = num + b * n, den + n
        return num / max(den, 1)

    def meta(self) -> dict[str, Any]:
        c = self.spec.config
        return {"method": self.spec.method, "bits": c.bits, "group_size": c.group_size, "symmetric": c.symmetric,
                "percdamp": self.spec.percdamp, "average_bits": self.average_bits(),
                "bits_per_expert": {str(k): v.bits for k, v in self.blocks.items()},
                "calibration": self.calibration} | self.extra


def check_not_quantized(config: Any, where: str = "model") -> None:
    """Refuse a model whose config (object, or config.json's dict) already carries a ``quantization_config``."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise MoelabError(f"{where}: already quantised (config.json has quantization_config, quant_method "
                          f"{method!r}); quantise the full-precision checkpoint instead")


def block_weights(block: MoEBlockView) -> dict[str, Tensor]:
    """The block's expert weights by projection, ``[E, out, in]`` views of the model's storage."""
    if block.gate is None or block.up is None or block.down is None:
        raise MoelabError(f"{block.path}: the experts have no gate/up/down projections to quantise")
    return {"gate": block.gate, "up": block.up, "down": block.down}


def _quantize_group(w: dict[str, Tensor], hs: BlockHessians | None, idx: Tensor, cfg: QuantConfig,
                    spec: QuantSpec, block: MoEBlockView) -> tuple[dict[str, QuantizedTensor], Tensor | None]:
    """Quantise experts ``idx`` (one bit-width) of every projection; their summed output errors."""
    out, err = {}, None
    for proj, t in w.items():
        w_EOI = t.detach()[idx]
        cfg.group(w_EOI.shape[-1], f"{block.path} {proj} [{w_EOI.shape[-2]}, {w_EOI.shape[-1]}]")
        if hs is None:
            out[proj] = rtn_quantize(w_EOI, cfg)
            continue
        H = (hs.h_mid if proj == "down" else hs.h_in)[idx]
        if spec.method == "gptq":
            out[proj] = gptq_quantize(w_EOI, H.to(w_EOI.device), cfg, percdamp=spec.percdamp)
        else:
            out[proj] = rtn_quantize(w_EOI, cfg)
        e = hessian_error(w_EOI, out[proj], H.to(w_EOI.device)).cpu()
        err = e if err is None else err + e
    return out, err


def quantize_block(block: MoEBlockView, spec: QuantSpec, hs: BlockHessians | None,
                   bits_E: list[int] | None = None) -> QuantizedBlock:
    """Quantise one block's routed experts (``bits_E``: a bit-width per expert, default ``spec.config.bits``)."""
    E = block.num_experts
    bits_E = list(bits_E) if bits_E is not None else [spec.config.bits] * E
    if len(bits_E) != E:
        raise MoelabError(f"bits for layer {block.layer}: {len(bits_E)} values for {E} experts")
    w = block_weights(block)
    experts: list[dict[str, QuantizedTensor] | None] = [None] * E
    error = torch.zeros(E, dtype=torch.float64) if hs is not None else None
    for b in sorted(set(bits_E)):
        idx = torch.tensor([e for e in range(E) if bits_E[e] == b], dtype=torch.long)
        qts, err = _quantize_group(w, hs, idx.to(block.gate.device), spec.at(b), spec, block)
        for j, e in enumerate(idx.tolist()):
            experts[e] = {p: QuantizedTensor(qt.q[j], qt.scale[j], qt.zero[j], qt.config) for p, qt in qts.items()}
        if error is not None and err is not None:
            error[idx] = err.cpu()
    return QuantizedBlock(block.layer, experts, bits_E, None if error is None else error.tolist())  # type: ignore[arg-type]


@contextmanager
def block_progress(label: str, blocks: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """A bar over MoE blocks (stderr); yields ``advance()``, called as each block is done."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("MoE blocks"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=blocks)
        yield lambda: bar.advance(task)


def quantize_experts(view: ModelView, spec: QuantSpec, calib: Calibration | None = None, *,
                     hessians: dict[int, BlockHessians] | None = None,
                     bits: dict[int, list[int]] | None = None, progress: bool = False) -> QuantResult:
    """Quantise every routed expert of ``view`` (the model itself is not changed).

    GPTQ needs ``calib`` (or precomputed ``hessians`` from :func:`collect_hessians`); RTN uses
    calibration only to report errors and token counts when given. ``bits``: ``layer -> [E]`` bit-widths
    (mixed precision), default ``spec.config.bits`` everywhere.
    """
    t0 = time.perf_counter()
    check_not_quantized(view.config)
    for b in view.blocks:  # every group size checked before any work
        for proj, t in block_weights(b).items():
            spec.config.group(t.shape[-1], f"{b.path} {proj} [{t.shape[-2]}, {t.shape[-1]}]")
    if hessians is None and calib is not None:
        hessians = collect_hessians(view, calib, spec.policy, progress=progress)
    if hessians is None and spec.needs_calibration:
        raise MoelabError("calib: GPTQ needs calibration data (moelab.compress.calibration_batches)")
    blocks = {}
    with block_progress(f"quantising ({spec.method})", len(view.blocks), progress) as advance:
        for b in view.blocks:
            hs = None if hessians is None else hessians[b.layer]
            blocks[b.layer] = quantize_block(b, spec, hs, None if bits is None else bits.get(b.layer))
            advance()
    report = None if hessians is None else calibration_report(hessians)
    return QuantResult(spec, blocks, report, time.perf_counter() - t0)


@torch.no_grad()
def write_dequantized(view: ModelView, result: QuantResult) -> None:
    """Write ``(q - zero) * scale`` of every quantised expert into ``view``'s model, in place."""
    for b in view.blocks:
        qb = result.blocks[b.layer]
        w = block_weights(b)
        for e, tensors in enumerate(qb.experts):
            for proj, qt in tensors.items():
                w[proj][e].copy_(qt.dequantize(w[proj].dtype))


def dequantized_model(view: ModelView, result: QuantResult) -> nn.Module:
    """A copy of the model with every routed expert replaced by its dequantised weights."""
    model = copy.deepcopy(view.model)
    write_dequantized(open_model(model), result)
    return model


__all__ = ["METHODS", "PROJECTIONS", "QuantResult", "QuantSpec", "QuantizedBlock", "block_weights",
           "check_not_quantized", "dequantized_model", "quantize_block", "quantize_experts", "write_dequantized"]
