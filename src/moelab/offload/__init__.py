"""moelab.offload: serve MoE models whose experts do not fit in memory.

``model, experts = offload_model(path, budget="64MiB", policy="lru")`` returns a transformers
model whose expert weights are read from the checkpoint's safetensors files by offset
(:mod:`moelab.offload.store`) into a cache with a byte budget (:mod:`moelab.offload.cache`, the
policies of :mod:`moelab.analysis.cache_policy`), through moelab's experts backend;
``experts.stats()`` gives hits, misses, bytes read and peak resident expert bytes.

ExpertFlow's predictor and token scheduling (:mod:`moelab.offload.predictor`,
:mod:`moelab.offload.schedule`), Fiddler's CPU execution of missed experts
(:mod:`moelab.offload.fiddler`) and the measured decode loop of ``moelab offload bench``
(:mod:`moelab.offload.runtime`) live in their own modules.
"""

from moelab.offload.cache import CacheStats, ExpertCache, parse_budget
from moelab.offload.model import OffloadedExperts, OffloadProvider, min_budget_bytes, offload_model
from moelab.offload.store import ExpertStore, SafetensorsIndex

__all__ = [
    "CacheStats",
    "ExpertCache",
    "ExpertStore",
    "OffloadProvider",
    "OffloadedExperts",
    "SafetensorsIndex",
    "min_budget_bytes",
    "offload_model",
    "parse_budget",
]
