"""Family adapters, one module per group of families that store their MoE blocks the same way.

``ADAPTERS`` is the registry read by :mod:`moelab.models.registry`, in display order.
"""

from __future__ import annotations

from moelab.models.families import dbrx, deepseek, gpt_oss, jetmoe, llama4, topk_softmax

ADAPTERS = (
    *topk_softmax.ADAPTERS,
    *deepseek.ADAPTERS,
    *gpt_oss.ADAPTERS,
    *llama4.ADAPTERS,
    *dbrx.ADAPTERS,
    *jetmoe.ADAPTERS,
)
