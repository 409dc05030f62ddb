"""Family adapters, one module per group of families that store their MoE blocks the same way.

``ADAPTERS`` is the registry read by :mod:`moelab.models.registry`, in display order.
"""

from __future__ import annotations

from moelab.models.families import deepseek, topk_softmax

ADAPTERS = (*topk_softmax.ADAPTERS, *deepseek.ADAPTERS)
