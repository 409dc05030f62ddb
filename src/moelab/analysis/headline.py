"""The headline table of a routing trace: one row per MoE layer, the numbers MoE papers lead with.

Works on anything with the reading API of :class:`moelab.trace.Trace` (``moelab.trace.open(dir)``):
``layers``, ``layer_info(l).num_experts / .top_k``, ``ids(l)``, ``weights(l)``, ``seq_ids``,
``token_ids``, ``labels``, ``label_names``, ``fields`` and ``act_out_max(l)``. :class:`ArrayTrace`
gives that API to plain numpy arrays (synthetic traces, benchmarks, tests).

Shape legend: N tokens, K top-k slots, E experts, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moelab.analysis._inputs import AnalysisInputError, EmptySelectionError, MissingFieldError
from moelab.analysis.cache import cache_hit_curve
from moelab.analysis.coactivation import stable_partners
from moelab.analysis.consistency import segment_routing
from moelab.analysis.load import expert_load
from moelab.analysis.specialisation import domain_specialisation, vocabulary_specialisation
from moelab.analysis.super_experts import SuperExperts, expert_act_max, super_experts


@dataclass(frozen=True)
class _Info:
    layer: int
    num_experts: int
    top_k: int


@dataclass
class ArrayTrace:
    """In-memory routing trace with the reading API of ``moelab.trace.Trace``.

    ``ids``/``weights``/``act_out_max``/``logits`` map a layer index to ``[N, K]`` (``[N, E]`` for
    logits) arrays; missing optional fields raise :class:`MissingFieldError` naming the trace flag.
    """

    ids_by_layer: dict[int, np.ndarray]
    num_experts: int
    weights_by_layer: dict[int, np.ndarray] | None = None
    seq_ids: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    labels: np.ndarray | None = None
    label_names: list[str] | None = None
    act_out_max_by_layer: dict[int, np.ndarray] | None = None
    logits_by_layer: dict[int, np.ndarray] | None = None
    layers: list[int] = field(init=False)

    def __post_init__(self) -> None:
        if not self.ids_by_layer:
            raise AnalysisInputError("ArrayTrace: ids_by_layer is empty")
        self.layers = sorted(self.ids_by_layer)

    @property
    def num_tokens(self) -> int:
        return len(next(iter(self.ids_by_layer.values())))

    @property
    def fields(self) -> tuple[str, ...]:
        out = []
        if self.logits_by_layer is not None:
            out.append("logits")
        if self.act_out_max_by_layer is not None:
            out.append("act_max")
        return tuple(out)

    def layer_info(self, layer: int) -> _Info:
        return _Info(layer, self.num_experts, self.ids(layer).shape[1])

    def ids(self, layer: int) -> np.ndarray:
        if layer not in self.ids_by_layer:
            raise AnalysisInputError(f"layer {layer} is not in this trace; layers: {self.layers}")
        return self.ids_by_layer[layer]

    def weights(self, layer: int) -> np.ndarray:
        if self.weights_by_layer is None:
            return np.ones(self.ids(layer).shape, dtype=np.float32)
        return self.weights_by_layer[layer]

    def act_out_max(self, layer: int) -> np.ndarray:
        if self.act_out_max_by_layer is None:
            raise MissingFieldError("act_max", "act_out_max")
        return self.act_out_max_by_layer[layer]

    def logits(self, layer: int) -> np.ndarray:
        if self.logits_by_layer is None:
            raise MissingFieldError("logits", "logits")
        return self.logits_by_layer[layer]


@dataclass(frozen=True)
class LayerHeadline:
    """One row of the headline table. None where the trace lacks what the column needs."""

    layer: int
    num_experts: int
    top_k: int
    tokens: int
    cv: float
    max_over_mean: float
    entropy_norm: float
    dead: int
    near_dead: int
    srp: float  # at seg_len
    sch: float  # "lrc" hit rate at cache_size
    lru: float  # LRU hit rate at cache_size
    cache_size: int
    partner_share: float  # mean share of co-activations going to the top-3 partners
    partner_chance: float
    partner_stability: float
    domain_kl: float | None  # mean KL of experts' label distributions vs the prior (nats)
    token_entropy_norm: float | None  # mean token-to-expert entropy / ln E
    super_experts: int | None


@dataclass(frozen=True)
class Headline:
    rows: list[LayerHeadline]
    super_experts: SuperExperts | None
    seg_len: int


def _cache_stride(seq_ids: np.ndarray | None, max_sequences: int) -> int:
    if seq_ids is None:
        return 1
    num_seq = int(np.count_nonzero(np.diff(seq_ids)) + 1) if len(seq_ids) else 0
    return max(1, math.ceil(num_seq / max_sequences))


def _super_experts(trace: Any) -> SuperExperts:
    """Su et al.'s criterion over the traced layers, indexed by decoder-layer number (layers absent
    from the trace, such as dense ones, are NaN rows; L is taken as the last traced layer + 1)."""
    num_e = max(trace.layer_info(x).num_experts for x in trace.layers)
    maxima = np.full((max(trace.layers) + 1, num_e), np.nan)
    for layer in trace.layers:
        e = trace.layer_info(layer).num_experts
        maxima[layer, :e] = expert_act_max(trace.ids(layer), trace.act_out_max(layer), e)
    return super_experts(maxima)


def headline(trace: Any, seg_len: int = 16, cache_factor: int = 2, max_cache_sequences: int = 128,
             num_partners: int = 3) -> Headline:
    """Compute the headline table of ``trace`` (see the module docstring for what it needs).

    SRP and SCH use windows of ``seg_len`` tokens; SCH and LRU are read at a cache of
    ``cache_factor * K`` experts, replaying at most about ``max_cache_sequences`` evenly spaced
    sequences (moe-lrc replays every 16th sample).
    """
    seq = trace.seq_ids
    labels, names = trace.labels, trace.label_names
    tokens = trace.token_ids
    stride = _cache_stride(seq, max_cache_sequences)
    se = _super_experts(trace) if "act_max" in trace.fields else None
    rows = []
    for layer in trace.layers:
        info = trace.layer_info(layer)
        e, k = info.num_experts, info.top_k
        ids = np.asarray(trace.ids(layer))
        load = expert_load(ids, trace.weights(layer), e)
        srp = segment_routing(ids, e, (seg_len,), seq)[0]
        size = min(cache_factor * k, e)
        sch = cache_hit_curve(ids, e, "lrc", seg_len, seq, stride).hit_rate_C[size - 1]
        lru = cache_hit_curve(ids, e, "lru", seg_len, seq, stride).hit_rate_C[size - 1]
        partners = stable_partners(ids, e, min(num_partners, e - 1))
        kl = None
        if labels is not None:
            kl = float(np.nanmean(domain_specialisation(ids, labels, e, names).kl_E))
        ent = None
        if tokens is not None:
            try:
                ent = vocabulary_specialisation(ids, tokens, e).mean_token_entropy / math.log(e)
            except EmptySelectionError:  # no token id occurs often enough to have an entropy
                ent = None
        rows.append(LayerHeadline(
            layer=layer, num_experts=e, top_k=k, tokens=len(ids), cv=load.cv, max_over_mean=load.max_over_mean,
            entropy_norm=load.entropy_norm, dead=int(load.dead_E.sum()), near_dead=int(load.near_dead_E.sum()),
            srp=srp.srp, sch=float(sch), lru=float(lru), cache_size=size,
            partner_share=float(partners.partner_share_E.mean()), partner_chance=partners.chance_share,
            partner_stability=float(partners.stability_E.mean()), domain_kl=kl, token_entropy_norm=ent,
            super_experts=None if se is None else int((se.layer_S == layer).sum()),
        ))
    return Headline(rows=rows, super_experts=se, seg_len=seg_len)
