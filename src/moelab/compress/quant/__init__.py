"""moelab.compress.quant: quantise routed experts (RTN, GPTQ per expert), calibrate every expert, and write
checkpoints that stock transformers (and compressed-tensors readers) load.

Routers, shared-expert gates, shared experts, dense MLPs, attention and embeddings stay in the model's
precision; only the routed experts' gate/up/down projections are quantised.
"""

from __future__ import annotations

from moelab.compress.quant.common import QuantConfig, QuantizedTensor, dequantize, qparams
from moelab.compress.quant.gptq import gptq_quantize, gptq_reference, hessian_error
from moelab.compress.quant.rtn import rtn_quantize

__all__ = ["QuantConfig", "QuantizedTensor", "dequantize", "gptq_quantize", "gptq_reference", "hessian_error",
           "qparams", "rtn_quantize"]
