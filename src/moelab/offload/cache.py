"""Expert cache with a byte budget: the fast tier of offloading.

Shape legend: r rows per expert of a stacked parameter, n experts one block needs in one forward.

:class:`ExpertCache` keeps experts' rows (``ExpertStore.read``) in memory within ``budget`` bytes.
Which experts stay is decided by the same :class:`~moelab.analysis.cache_policy.KeyCache` and
policies as the trace replay (:func:`moelab.analysis.cache_policy.replay`), over keys
``(layer, expert)`` sized by their bytes, one step per :meth:`ExpertCache.fetch` (one block's
forward). So a replay of the routing a model makes, with ``size = expert bytes`` and the same
capacity, gives the hits and misses the cache counts (tested).

Resident expert bytes (the rows held, including prefetched experts still being read, counted at
their size from the moment they are admitted) never exceed the budget; ``peak_resident_bytes``
records the most held. A forward that needs more experts than fit gets them one after another
(the rows already handed out stay valid for that forward). The smallest budget accepted holds one
layer's top-k experts: below it a decode step would evict experts it is still bringing in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.analysis.cache_policy import ONLINE, ORACLES, PREDICTIVE, KeyCache, make_policy
from moelab.errors import MoelabError
from moelab.models.writer import SIZE_UNITS, size_parts
from moelab.offload.store import ExpertStore

Key = tuple[int, int]  # (layer, expert)
LRFU_HALF_LIFE_TOKENS = 8  # picked from {2, 4, 8, 16, 32} on the default model (bench/offload.py)


def parse_budget(budget: int | float | str, total_bytes: int) -> int:
    """Bytes of a budget: an int (bytes), a float in (0, 1] (a fraction of ``total_bytes``, all the
    experts), or a string: ``"64MiB"``, ``"1.5GB"``, ``"512k"``, ``"25%"``."""
    if isinstance(budget, bool):
        raise MoelabError(f"budget: expected bytes, a fraction or a size like '64MiB', got {budget!r}")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, float):
        if not 0 < budget <= 1:
            raise MoelabError(f"budget: a float is a fraction of the experts' bytes, in (0, 1]; got {budget}")
        value = int(budget * total_bytes)
    elif isinstance(budget, str):
        parts = size_parts(budget, percent=True)
        if parts is None:
            raise MoelabError(f"budget: cannot read {budget!r}; expected e.g. '64MiB', '1.5GB', "
                              f"'25%', a number of bytes or a fraction")
        num, unit = parts
        value = int(num / 100 * total_bytes) if unit == "%" else int(num * SIZE_UNITS[unit])
    else:
        raise MoelabError(f"budget: expected bytes, a fraction or a size like '64MiB', got "
                          f"{type(budget).__name__}")
    if value < 1:
        raise MoelabError(f"budget: {budget!r} is less than one byte")
    return value


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class CacheStats:
    """Counts of an :class:`ExpertCache` so far. A hit is an expert a forward needed that was
    resident (or already being prefetched); ``bytes_read`` counts the store's expert reads (prefetches
    included)."""

    hits: int
    misses: int
    bytes_read: int
    peak_resident_bytes: int
    resident_bytes: int
    budget_bytes: int
    prefetched: int = 0  # experts admitted ahead of their use
    prefetch_used: int = 0  # of those, hit before being evicted

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["hit_rate"] = self.hit_rate
        return d


class SlotPool:
    """Fixed slots for experts' rows in the fast tier: one buffer per expert parameter,
    ``[S * r, ...]`` like the model's ``[E * r, ...]`` parameter, slot s holding one expert's rows
    ``[s r, (s + 1) r)``. A forward then runs on the buffers (``SlotWeights``) instead of a fresh
    concatenation of its experts' rows, and a miss overwrites a freed slot instead of allocating.
    Only where every MoE layer's experts have the same parameters, shapes and dtypes
    (:meth:`for_store` gives None otherwise); the buffers are allocated empty (on the CPU, pages
    are touched as slots fill)."""

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], slots: int,
                 device: torch.device) -> None:
        self.rows = {n: shape[0] for n, (shape, _) in layout.items()}
        self.buffers = {n: torch.empty((slots * shape[0], *shape[1:]), dtype=dt, device=device)
                        for n, (shape, dt) in layout.items()}
        self.free = list(range(slots - 1, -1, -1))  # pop() takes the lowest slot first

    @classmethod
    def for_store(cls, store: ExpertStore, budget_bytes: int, device: torch.device) -> SlotPool | None:
        layouts = {}
        for p in store.params.values():
            r = p.shape[0] // p.num_experts
            layouts.setdefault(p.layer, {})[p.name] = ((r, *p.shape[1:]), p.dtype)
        first = next(iter(layouts.values()), None)
        if first is None or any(lay != first for lay in layouts.values()):
            return None
        return cls(first, budget_bytes // store.expert_bytes(store.layers[0]), device)

    def take(self) -> int:
        if not self.free:
            raise MoelabError("internal: the expert cache holds more experts than its slots")
        return self.free.pop()

    def write(self, slot: int, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """Copy one expert's rows into ``slot``; its rows as views of the buffers."""
        views = self.view(slot)
        for n, v in views.items():
            v.copy_(rows[n])
        return views

    def view(self, slot: int) -> dict[str, Tensor]:
        return {n: b[slot * self.rows[n]:(slot + 1) * self.rows[n]] for n, b in self.buffers.items()}


class ExpertCache:
    """Experts of ``store`` kept within ``budget`` bytes under ``policy`` (``"lru"``, ``"lfu"``,
    ``"lrfu"``, ``"activation"``, ``"predictive"`` (fed by :meth:`hint`); ``"belady"`` / ``"lrc"``
    with ``future``, the steps, as bounds).

    ``fetch(layer, experts) -> [rows of each expert]`` is one step (:meth:`fetch_slots` also
    gives the experts' slots in :attr:`pool`, a :class:`SlotPool`, where there is one); the rows
    stay valid until the next fetch. ``min_bytes``: the smallest budget accepted (one layer's top-k
    experts), named in the error. ``device``: where rows live.
    """

    def __init__(self, store: ExpertStore, budget: int | float | str, policy: str = "lru", *,
                 min_bytes: int = 1, device: torch.device | str | None = None,
                 future: Sequence[Sequence[Key]] | None = None) -> None:
        if policy not in ONLINE + PREDICTIVE + ORACLES:
            raise MoelabError(f"policy: expected one of {ONLINE + PREDICTIVE} (or the bounds {ORACLES} "
                              f"with a trace), got {policy!r}")
        self.store = store
        self.budget_bytes = parse_budget(budget, store.total_expert_bytes())
        if self.budget_bytes < min_bytes:
            raise MoelabError(
                f"budget {budget!r} ({human_bytes(self.budget_bytes)}) is smaller than one layer's "
                f"top-k experts: the minimum is {min_bytes} bytes ({human_bytes(min_bytes)})")
        try:  # LRFU's half-life: 8 tokens of decoding, one step per MoE layer per token
            pol = make_policy(policy, future, half_life=LRFU_HALF_LIFE_TOKENS * len(store.layers))
        except ValueError as err:
            raise MoelabError(f"policy: {err}") from None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.keys = KeyCache(self.budget_bytes, pol, size=lambda k: store.expert_bytes(k[0]),
                             on_evict=self._drop, protect_step=True)
        self._rows: dict[Key, dict[str, Tensor] | Future] = {}
        self.pool = SlotPool.for_store(store, self.budget_bytes, self.device)
        self._slot: dict[Key, int] = {}  # with a pool: the slot of each key held or being read
        self._held: dict | None = None  # during a fetch: the rows it hands out
        self._prefetched: set[Key] = set()
        self._lock = threading.Lock()
        self.step = 0
        self._n = {"hits": 0, "misses": 0, "prefetched": 0, "prefetch_used": 0}
        self._resident = self._peak = 0

    def fetch(self, layer: int, experts: Sequence[int]) -> list[dict[str, Tensor]]:
        """The rows (``{param: [r, ...]}``) of each of ``experts`` of MoE ``layer``, in order, as
        one cache step: misses are read from the store (or waited for, if being prefetched)."""
        return self.fetch_slots(layer, experts)[0]

    def fetch_slots(self, layer: int, experts: Sequence[int]
                    ) -> tuple[list[dict[str, Tensor]], list[int] | None]:
        """:meth:`fetch`, and the slot of each expert in :attr:`pool` (None without a pool, or when
        a step needs more experts than fit: then some rows are copies outside the slots)."""
        keys = [(layer, int(e)) for e in experts]
        with self._lock:
            held = {k: self._rows[k] for k in keys if k in self.keys}

            def load(k: Key) -> None:  # in order: a later key may evict an earlier one
                held[k] = self._load(k)

            self.keys.on_load, self._held = load, held
            try:
                res = self.keys.access(keys, self.step)
            finally:
                self.keys.on_load, self._held = None, None
            self.step += 1
            for k, hit in zip(keys, res.hits, strict=True):
                self._n["hits" if hit else "misses"] += 1
                if hit and k in self._prefetched:
                    self._prefetched.discard(k)
                    self._n["prefetch_used"] += 1
            rows = [self._ready(k, held[k]) for k in keys]
            in_slots = self.pool is not None and all(
                k in self._slot and self._rows.get(k) is r for k, r in zip(keys, rows, strict=True))
            return rows, [self._slot[k] for k in keys] if in_slots else None

    def prefetch(self, layer: int, experts: Sequence[int],
                 submit: Callable[..., Future]) -> None:
        """Admit ``experts`` of ``layer`` ahead of their use (evicting by the policy, at their full
        size), their rows read by ``submit(store.read, layer, e)`` (a background thread)."""
        with self._lock:
            for e in experts:
                k = (layer, int(e))
                if k in self.keys:
                    continue
                reserved = []
                self.keys.on_load = reserved.append
                try:
                    self.keys.admit(k, self.step)
                finally:
                    self.keys.on_load = None
                if reserved:
                    self._rows[k] = submit(self.store.read, *k)
                    if self.pool is not None:
                        self._slot[k] = self.pool.take()  # written when the read is waited for
                    self._resident += self.store.expert_bytes(layer)
                    self._peak = max(self._peak, self._resident)
                    self._prefetched.add(k)
                    self._n["prefetched"] += 1

    def new_request(self) -> None:
        """A new request (prompt) starts: request-aware policies (``"activation"``) start its
        activation matrix; the others ignore it."""
        with self._lock:
            self.keys.policy.new_request()

    def hint(self, keys: Sequence[Key]) -> None:
        """The ``(layer, expert)`` a predictor expects next: the ``"predictive"`` policy keeps them
        over the others; other policies ignore it."""
        with self._lock:
            self.keys.policy.hint(keys)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._n["hits"], self._n["misses"], self.store.bytes_read, self._peak,
                              self._resident, self.budget_bytes, self._n["prefetched"],
                              self._n["prefetch_used"])

    def _ready(self, k: Key, v: dict[str, Tensor] | Future) -> dict[str, Tensor]:
        if not isinstance(v, Future):
            return v
        # cancelled: evicted by a later key of this same step before its read began
        got = self.store.read(*k) if v.cancelled() else v.result()
        if isinstance(self._rows.get(k), Future) and self._rows[k] is v:  # still held
            if self.pool is not None:
                rows = self.pool.write(self._slot[k], got)
            else:
                rows = {n: t.to(self.device) for n, t in got.items()}
            self._rows[k] = rows  # same bytes as reserved at admission
            return rows
        return {n: t.to(self.device) for n, t in got.items()}

    def _load(self, k: Key) -> dict[str, Tensor]:
        """Read a missed expert: into a free slot of the pool (on the CPU straight from the file,
        so a miss allocates nothing), or as new rows on the cache's device."""
        if self.pool is not None:
            self._slot[k] = self.pool.take()
            rows = self.store.read(*k, out=self.pool.view(self._slot[k]))
        else:
            rows = {n: t.to(self.device) for n, t in self.store.read(*k).items()}
        self._rows[k] = rows
        self._resident += sum(t.nbytes for t in rows.values())
        self._peak = max(self._peak, self._resident)
        return rows

    def _drop(self, k: Key) -> None:
        v = self._rows.pop(k)
        self._prefetched.discard(k)
        if isinstance(v, Future):
            v.cancel()  # a read in progress finishes and is dropped
            self._resident -= self.store.expert_bytes(k[0])
        else:
            self._resident -= sum(t.nbytes for t in v.values())
            if self._held is not None and self._held.get(k) is v and k in self._slot:
                # evicted by a later expert of the same step: what it handed out must outlive
                # the slot, which that expert is about to overwrite
                self._held[k] = {n: t.clone() for n, t in v.items()}
        if k in self._slot:
            self.pool.free.append(self._slot.pop(k))
