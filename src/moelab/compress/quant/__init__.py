"""moelab.compress.quant: quantise routed experts (RTN, GPTQ per expert), calibrate every expert, and write
checkpoints that stock transformers (and compressed-tensors readers) load.

Modules: :mod:`.common` (format, scales, zero points), :mod:`.rtn`, :mod:`.gptq` (Frantar et al. 2023),
:mod:`.calibrate` (per-expert Hessians, every expert calibrated), :mod:`.pmq` (MC-MoE's mixed precision),
:mod:`.quantize` (a model's experts), :mod:`.checkpoint` (dequantised / compressed-tensors output),
:mod:`.pipeline` (``moelab quantize``), :mod:`.eaquant` (Fu et al. 2025: smoothing shared by router and
experts, calibration balance, router-logit alignment) and :mod:`.act` (per-token activation fake-quantisation
of the expert linears, W4A4 / W3A4). MoTE ternary experts live in :mod:`moelab.nn.ternary`.

Routers, shared-expert gates, shared experts, dense MLPs, attention and embeddings stay in the model's
precision; only the routed experts' gate/up/down projections are quantised.
"""

from __future__ import annotations

from moelab.compress.quant.act import ActQuantConfig, fake_quant_per_token, install_act_quant
from moelab.compress.quant.calibrate import (
    BlockHessians,
    CalibPolicy,
    calibration_report,
    check_calibrated,
    collect_hessians,
)
from moelab.compress.quant.checkpoint import save_quantized
from moelab.compress.quant.common import QuantConfig, QuantizedTensor, dequantize, qparams
from moelab.compress.quant.eaquant import EAQuantConfig, EAQuantRun, eaquant
from moelab.compress.quant.gptq import gptq_quantize, gptq_reference, hessian_error
from moelab.compress.quant.pipeline import quantize_checkpoint
from moelab.compress.quant.pmq import PMQConfig, mixed_precision
from moelab.compress.quant.quantize import (
    QuantizedBlock,
    QuantResult,
    QuantSpec,
    dequantized_model,
    quantize_block,
    quantize_experts,
    write_dequantized,
)
from moelab.compress.quant.rtn import rtn_quantize

__all__ = ["ActQuantConfig", "BlockHessians", "CalibPolicy", "EAQuantConfig", "EAQuantRun", "PMQConfig", "QuantConfig", "QuantResult", "QuantSpec", "QuantizedBlock",
           "QuantizedTensor", "calibration_report", "check_calibrated", "collect_hessians", "dequantize",
           "dequantized_model", "eaquant", "fake_quant_per_token", "gptq_quantize", "gptq_reference", "hessian_error", "install_act_quant", "mixed_precision", "qparams",
           "quantize_block", "quantize_checkpoint", "quantize_experts", "rtn_quantize", "save_quantized",
           "write_dequantized"]
