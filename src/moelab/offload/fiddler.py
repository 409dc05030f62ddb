"""Fiddler: run a missed expert where its weights are (the CPU) instead of moving the weights.

Shape legend: T tokens, K top-k, n experts one block needs in one forward.

Kamahori, Tang, Gu, Zhu and Kasikci 2024, "Fiddler: CPU-GPU Orchestration for Fast
Inference of Mixture-of-Experts Models" (arXiv 2402.07033): all experts stay in host memory; the
fast tier (GPU) caches some; when a forward needs an expert the fast tier lacks, either its
weights are copied over (then it runs there) or its few input rows are sent to the CPU, which runs
the expert on its own copy, and the output rows come back. A latency model decides, per missed
expert, from the number of its tokens in this forward:

    transfer_s = expert_bytes / bandwidth + transfer_fixed_s
    cpu_s      = tokens * flops_per_token / cpu_flops_per_s + cpu_fixed_s
    run on the CPU  iff  cpu_s < transfer_s

with ``flops_per_token = 2 * (parameters of one expert)`` (one multiply-add per weight, GLU:
``6 H I``). Decoding (one token per forward) then computes misses on the CPU; a long prefill moves
them. :class:`FiddlerProvider` is a weights provider of moelab's experts backend
(:mod:`moelab.models.backend`) over the offloading cache: hits and moved experts come from the
:class:`~moelab.offload.cache.ExpertCache` (on its ``device``, the fast tier), CPU runs from the
host copy (:class:`HostExperts`, read once from the store), and the backend runs each expert on
its device (``PlacedWeights``). Only where the two tiers are different devices does this pay;
on a CPU-only machine the path is exercised with a fake fast tier (the CPU itself, with a given
bandwidth) and its outputs equal the resident model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.errors import MoelabError
from moelab.models.backend import PlacedWeights, spec_for
from moelab.models.view import ModelView, MoEBlockView, RoutingEvent
from moelab.offload.cache import ExpertCache
from moelab.offload.model import rows_to_weights
from moelab.offload.store import ExpertStore


@dataclass(frozen=True)
class LatencyModel:
    """Fiddler's latency model (module docstring): ``bandwidth`` bytes/s from host to the fast tier,
    ``cpu_flops_per_s`` of the CPU's expert compute, fixed costs per transfer / per CPU run."""

    bandwidth: float
    cpu_flops_per_s: float
    transfer_fixed_s: float = 0.0
    cpu_fixed_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth > 0 or not self.cpu_flops_per_s > 0:
            raise MoelabError(f"LatencyModel: bandwidth and cpu_flops_per_s must be > 0, got "
                              f"{self.bandwidth}, {self.cpu_flops_per_s}")
        if self.transfer_fixed_s < 0 or self.cpu_fixed_s < 0:
            raise MoelabError("LatencyModel: the fixed costs must be >= 0")

    def transfer_s(self, expert_bytes: int) -> float:
        return expert_bytes / self.bandwidth + self.transfer_fixed_s

    def cpu_s(self, tokens: int, flops_per_token: float) -> float:
        return tokens * flops_per_token / self.cpu_flops_per_s + self.cpu_fixed_s

    def run_on_cpu(self, tokens: int, expert_bytes: int, flops_per_token: float) -> bool:
        """True where computing ``tokens`` rows on the CPU beats moving the expert."""
        return self.cpu_s(tokens, flops_per_token) < self.transfer_s(expert_bytes)


def measure_cpu_flops(hidden: int, inner: int, tokens: int = 4, dtype: torch.dtype = torch.float32,
                      reps: int = 20) -> float:
    """FLOP/s of one expert's GEMMs on the CPU for ``tokens`` rows (median of ``reps``)."""
    x = torch.randn(tokens, hidden, dtype=dtype)
    w1, w2 = torch.randn(2 * inner, hidden, dtype=dtype), torch.randn(hidden, inner, dtype=dtype)
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        h = x @ w1.T
        (h[:, :inner] * h[:, inner:]) @ w2.T
        times.append(time.perf_counter() - t0)
    return 6 * hidden * inner * tokens / sorted(times[2:])[len(times[2:]) // 2]


class HostExperts:
    """The CPU copy of every expert: ``rows(layer, e)`` read from the store once, then kept."""

    def __init__(self, store: ExpertStore) -> None:
        self.store = store
        self._rows: dict[tuple[int, int], dict[str, Tensor]] = {}

    def rows(self, layer: int, expert: int) -> dict[str, Tensor]:
        key = (layer, expert)
        if key not in self._rows:
            self._rows[key] = self.store.read(layer, expert)
        return self._rows[key]


@dataclass
class FiddlerStats:
    """Per-expert decisions so far: hits (resident in the fast tier), moved (misses brought in),
    CPU runs and the rows they computed."""

    hits: int = 0
    moved: int = 0
    cpu_runs: int = 0
    cpu_tokens: int = 0
    decisions: dict[tuple[int, bool], int] = field(default_factory=dict)  # (tokens, on CPU) -> misses


class FiddlerProvider:
    """Weights provider: cache hits on the fast tier, each miss moved or run on the CPU copy as
    ``latency`` decides. :meth:`attach` adds the routing hooks that count each expert's tokens."""

    def __init__(self, cache: ExpertCache, host: HostExperts, latency: LatencyModel) -> None:
        self.cache, self.host, self.latency = cache, host, latency
        self.stats = FiddlerStats()
        self._tokens: dict[int, dict[int, int]] = {}  # layer -> expert -> slots this forward

    def attach(self, view: ModelView) -> list:
        def hook(event: RoutingEvent) -> None:
            ids = event.ids_TK if event.mask_TK is None else event.ids_TK[event.mask_TK]
            e, n = ids.reshape(-1).unique(return_counts=True)
            self._tokens[event.block.layer] = dict(zip(e.tolist(), n.tolist(), strict=True))

        return [b.register_routing_hook(hook) for b in view.blocks]

    def __call__(self, block: MoEBlockView, expert_ids_n: Tensor) -> PlacedWeights:
        layer, ids = block.layer, expert_ids_n.tolist()
        tokens = self._tokens.pop(layer, None)
        if tokens is None:
            raise MoelabError(f"{block.path}: FiddlerProvider saw no routing for this forward; "
                              f"call provider.attach(view) first")
        size = self.cache.store.expert_bytes(layer)
        flops = 2 * size / _element_size(block)
        fast, cpu = [], []
        for p, e in enumerate(ids):
            if (layer, e) in self.cache.keys:
                fast.append(p)
                self.stats.hits += 1
                continue
            on_cpu = self.latency.run_on_cpu(tokens.get(e, 0), size, flops)
            (cpu if on_cpu else fast).append(p)
            d = self.stats.decisions
            d[(tokens.get(e, 0), on_cpu)] = d.get((tokens.get(e, 0), on_cpu), 0) + 1
            if on_cpu:
                self.stats.cpu_runs += 1
                self.stats.cpu_tokens += tokens.get(e, 0)
            else:
                self.stats.moved += 1
        parts = []
        if fast:
            rows = self.cache.fetch(layer, [ids[p] for p in fast])
            parts.append((rows_to_weights(block, rows), fast))
        if cpu:
            parts.append((rows_to_weights(block, [self.host.rows(layer, ids[p]) for p in cpu]), cpu))
        return PlacedWeights(parts)


def _element_size(block: MoEBlockView) -> int:
    return block.module.get_parameter(spec_for(block).params[0]).element_size()


__all__ = ["FiddlerProvider", "FiddlerStats", "HostExperts", "LatencyModel", "measure_cpu_flops"]
