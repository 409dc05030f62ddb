"""Expert-cache policies and the cache bookkeeping shared by the trace replay and the offload runtime.

One implementation of each policy serves both :func:`moelab.analysis.cache.cache_hit_curve_reference`
(the slow, obvious replay that the vectorised hit-rate curves are tested against),
:func:`replay` (hit rates of a routing trace at one cache size) and the offloading runtime
(:class:`moelab.offload.cache.ExpertCache`), so simulated and measured hit rates agree on the same
routing.

Time advances in **steps**: a step is one group of keys needed at once (one token's K experts in
the analysis replay; the experts one MoE block needs for one forward at runtime). Keys are
hashable (an expert id, or ``(layer, expert)``), each with a size (1, or its bytes); the capacity is
in the same unit. :meth:`KeyCache.access` looks every key of the step up against the content before
the step, then brings the missing ones in, one after another, each first evicting resident keys of
the lowest priority until it fits; every use is then told to the policy, in order. With
``protect_step`` (the runtime's rule, and :func:`replay`'s default) a key of the current step is
evicted only when nothing else is left, so a hit is never read again within its step; moe-lrc's
convention, which the vectorised curves of :mod:`moelab.analysis.cache` follow, does not protect.

Priorities (higher = kept longer), ties broken by the last use:

- ``"lru"``: last use. ``"lfu"``: uses so far (kept after eviction), then last use.
- ``"lrfu"`` (Lee et al. 2001, "LRFU: a spectrum of policies that subsumes the least recently used
  and least frequently used policies", IEEE Trans. Computers 50(12)): the combined recency and
  frequency ``CRF(key) = sum over its uses i of 2 ** (-(step - step_i) / half_life)``, then last
  use; ``half_life -> 0`` is LRU, ``half_life -> inf`` approaches LFU. ``half_life`` is in steps.
- ``"belady"`` (Belady 1966, "A study of replacement algorithms for a virtual-storage computer";
  MIN): next use farthest in the future, from the known sequence of steps (never again = farthest).
- ``"lrc"`` (Liang et al. 2025, "Not All Models Suit Expert Offloading", arXiv 2505.16056; the
  segment oracle of SCH): fewest uses in the ``seg_len`` steps from the current one; a key's own use
  in the current step no longer counts once it is brought in.

- ``"activation"`` (MoE-Infinity: Xue et al. 2024, "MoE-Infinity: Offloading-Efficient MoE Model
  Serving", arXiv 2401.14361; activation-aware caching): per request, an expert activation matrix
  ``A[key]`` (uses so far in this request); past requests' matrices are kept (the last ``history``)
  and the current one is matched against them by cosine similarity (re-matched every ``rematch``
  uses); the priority is the expected count ``A[key] + n * P[key] / |P|``, with ``P`` the matched
  past matrix and ``n`` the current request's uses so far (the pooled past when nothing matches
  yet), then last use. :meth:`CachePolicy.new_request` marks a request boundary.

- ``"predictive"`` (ExpertFlow's predictive cache: He et al. 2024, arXiv 2410.17954): the keys the
  latest :meth:`CachePolicy.hint` named (the experts an :mod:`moelab.offload.predictor` expects
  the next MoE layers to use) are kept over the others; within each group, LRFU. Without hints it
  is LRFU. A hint may instead map keys to scores (the predictor's discounted probabilities of use
  over the next steps, :func:`moelab.offload.predictor.predicted_scores`): the priority is then
  ``score(key) + crf_weight * CRF(key)`` (a key the hint does not score counts 0), then last use:
  a learned estimate of the near future mixed with LRFU's of the longer run, which stands in where
  the heads' window ends.

``belady`` and ``lrc`` look into the future: they need the steps (``future=``) and serve as bounds.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

Key = Hashable

ONLINE = ("lru", "lfu", "lrfu", "activation")
PREDICTIVE = ("predictive",)  # online, fed by a predictor's hints
ORACLES = ("belady", "lrc")
POLICIES = ("lrc", "lru", "lfu", "belady")  # the analysis curves' policies (vectorised in cache.py)
# "predictive" with scored hints: the weight of LRFU's CRF beside the predicted score, picked on the
# corpus' val split (bench/offload.py --part predictor, which prints the grid)
CRF_WEIGHT = 0.03


class CachePolicy:
    """Eviction priority: the cache evicts the resident key whose :meth:`priority` is lowest."""

    name = "lru"

    def __init__(self) -> None:
        self.clock = 0
        self.last: dict[Key, int] = {}

    def used(self, key: Key, step: int) -> None:
        """``key`` was used (or brought in) at ``step``."""
        self.clock += 1
        self.last[key] = self.clock

    def priority(self, key: Key, step: int, done: set) -> tuple[int, int]:
        """Keep-priority of resident ``key`` at ``step``; ``done``: keys already used in this step."""
        return (0, self.last.get(key, 0))

    def new_request(self) -> None:
        """A new request (prompt) starts; only request-aware policies care."""

    def hint(self, keys: Sequence[Key] | Mapping[Key, float]) -> None:
        """The keys predicted to be used next, or a score per key (replacing the previous hint);
        only predictive policies care."""


class LRU(CachePolicy):
    """Least recently used goes first."""


class LFU(CachePolicy):
    """Least frequently used goes first (uses counted since the start, not reset on eviction)."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[Key, int] = {}

    def used(self, key: Key, step: int) -> None:
        super().used(key, step)
        self.uses[key] = self.uses.get(key, 0) + 1

    def priority(self, key: Key, step: int, done: set) -> tuple[int, int]:
        return (self.uses.get(key, 0), self.last.get(key, 0))


class LRFU(CachePolicy):
    """Lowest combined recency-frequency (exponentially decayed use count) goes first."""

    name = "lrfu"

    def __init__(self, half_life: float = 24.0) -> None:
        super().__init__()
        if not half_life > 0:
            raise ValueError(f"half_life must be > 0, got {half_life}")
        self.half_life = float(half_life)
        self.crf: dict[Key, tuple[float, int]] = {}  # key -> (CRF at its last use, that step)

    def used(self, key: Key, step: int) -> None:
        super().used(key, step)
        self.crf[key] = (self._decayed(key, step) + 1.0, step)

    def _decayed(self, key: Key, step: int) -> float:
        value, at = self.crf.get(key, (0.0, step))
        return value * 2.0 ** (-(step - at) / self.half_life)

    def priority(self, key: Key, step: int, done: set) -> tuple[float, int]:
        return (self._decayed(key, step), self.last.get(key, 0))


class Predictive(LRFU):
    """Predicted keys are kept over the others, LRFU within each group (ExpertFlow); or, after a
    hint of scores, the highest ``score + crf_weight * CRF`` is kept."""

    name = "predictive"

    def __init__(self, half_life: float = 24.0, crf_weight: float = CRF_WEIGHT) -> None:
        super().__init__(half_life)
        if crf_weight < 0:
            raise ValueError(f"crf_weight must be >= 0, got {crf_weight}")
        self.crf_weight = float(crf_weight)
        self.predicted: frozenset = frozenset()
        self.scores: Mapping[Key, float] | None = None

    def hint(self, keys: Sequence[Key] | Mapping[Key, float]) -> None:
        if isinstance(keys, Mapping):
            self.scores, self.predicted = dict(keys), frozenset()
        else:
            self.scores, self.predicted = None, frozenset(keys)

    def priority(self, key: Key, step: int, done: set) -> tuple:
        crf, last = super().priority(key, step, done)
        if self.scores is not None:
            return (self.scores.get(key, 0.0) + self.crf_weight * crf, last)
        return (key in self.predicted, crf, last)


class ActivationAware(CachePolicy):
    """Highest expected activation count in the current request is kept (MoE-Infinity)."""

    name = "activation"

    def __init__(self, history: int = 128, rematch: int = 64) -> None:
        super().__init__()
        if history < 1 or rematch < 1:
            raise ValueError(f"history and rematch must be >= 1, got {history}, {rematch}")
        self.history, self.rematch = history, rematch
        self.past: list[dict[Key, int]] = []
        self.pooled: dict[Key, int] = {}  # sum of the past matrices
        self.current: dict[Key, int] = {}
        self.n = 0
        self.prior: dict[Key, float] = {}  # the matched matrix, normalised to sum 1

    def used(self, key: Key, step: int) -> None:
        super().used(key, step)
        self.current[key] = self.current.get(key, 0) + 1
        self.n += 1
        if self.n % self.rematch == 0:
            self._match()

    def priority(self, key: Key, step: int, done: set) -> tuple[float, int]:
        return (self.current.get(key, 0) + self.n * self.prior.get(key, 0.0), self.last.get(key, 0))

    def new_request(self) -> None:
        if self.current:
            self.past.append(self.current)
            for k, c in self.current.items():
                self.pooled[k] = self.pooled.get(k, 0) + c
            if len(self.past) > self.history:
                for k, c in self.past.pop(0).items():
                    self.pooled[k] -= c
        self.current, self.n = {}, 0
        self.prior = _normalised(self.pooled)

    def _match(self) -> None:
        best = max(self.past, key=lambda p: _cosine(self.current, p), default=None)
        self.prior = _normalised(best) if best is not None else _normalised(self.pooled)


def _normalised(counts: dict[Key, int] | None) -> dict[Key, float]:
    total = sum(counts.values()) if counts else 0
    return {k: c / total for k, c in counts.items()} if total else {}


def _cosine(a: dict[Key, int], b: dict[Key, int]) -> float:
    dot = sum(c * b.get(k, 0) for k, c in a.items())
    na = sum(c * c for c in a.values()) ** 0.5
    nb = sum(c * c for c in b.values()) ** 0.5
    return dot / (na * nb) if na and nb else 0.0


class _Oracle(CachePolicy):
    """A policy that knows every step: ``steps_of[key]`` is the sorted steps using ``key``."""

    def __init__(self, future: Sequence[Sequence[Key]]) -> None:
        super().__init__()
        self.num_steps = len(future)
        self.steps_of: dict[Key, list[int]] = {}
        for t, keys in enumerate(future):
            for k in keys:
                self.steps_of.setdefault(k, []).append(t)  # a key twice in a step counts twice


class Belady(_Oracle):
    """Next use farthest in the future goes first."""

    name = "belady"

    def priority(self, key: Key, step: int, done: set) -> tuple[int, int]:
        steps = self.steps_of.get(key, [])
        i = bisect.bisect_left(steps, step + (key in done))
        nxt = steps[i] if i < len(steps) else self.num_steps
        return (-nxt, self.last.get(key, 0))


class LRC(_Oracle):
    """Fewest uses in the next ``seg_len`` steps goes first."""

    name = "lrc"

    def __init__(self, future: Sequence[Sequence[Key]], seg_len: int = 16) -> None:
        super().__init__(future)
        if seg_len < 1:
            raise ValueError(f"seg_len must be >= 1, got {seg_len}")
        self.seg_len = seg_len

    def priority(self, key: Key, step: int, done: set) -> tuple[int, int]:
        steps = self.steps_of.get(key, [])
        uses = bisect.bisect_left(steps, step + self.seg_len) - bisect.bisect_left(steps, step)
        return (uses - (key in done), self.last.get(key, 0))


def make_policy(name: str, future: Sequence[Sequence[Key]] | None = None, seg_len: int = 16,
                half_life: float = 24.0, crf_weight: float = CRF_WEIGHT) -> CachePolicy:
    """The policy called ``name`` (:data:`ONLINE`, :data:`PREDICTIVE` or :data:`ORACLES`);
    ``future`` (the steps) for the oracles, ``seg_len`` for LRC, ``half_life`` (steps) for LRFU and
    predictive, ``crf_weight`` for predictive's scored hints."""
    if name not in ONLINE + PREDICTIVE + ORACLES:
        raise ValueError(f"policy must be one of {ONLINE + PREDICTIVE + ORACLES}, got {name!r}")
    if name in ORACLES:
        if future is None:
            raise ValueError(f"policy {name!r} looks into the future: it needs the steps (future=), "
                             f"from a trace; online policies: {ONLINE}")
        return Belady(future) if name == "belady" else LRC(future, seg_len)
    if name == "lrfu":
        return LRFU(half_life)
    if name == "predictive":
        return Predictive(half_life, crf_weight)
    if name == "activation":
        return ActivationAware()
    return LFU() if name == "lfu" else LRU()


@dataclass
class StepResult:
    """What one :meth:`KeyCache.access` did: a hit flag per key asked for, keys brought in and
    evicted (in order)."""

    hits: list[bool]
    brought: list[Key] = field(default_factory=list)
    evicted: list[Key] = field(default_factory=list)


class KeyCache:
    """Which keys are resident within ``capacity`` under ``policy`` (no data: the bookkeeping).

    ``size(key)``: a key's size in the capacity's unit (default 1). ``used`` and ``peak``: resident
    size now and at most so far; ``used <= capacity`` always (a key bigger than the capacity is a
    ValueError). ``on_load(key)`` / ``on_evict(key)`` are called as keys come and go, in order.
    """

    def __init__(self, capacity: int, policy: CachePolicy, size: Callable[[Key], int] | None = None,
                 on_load: Callable[[Key], None] | None = None,
                 on_evict: Callable[[Key], None] | None = None, protect_step: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.policy = capacity, policy
        self.size = size if size is not None else (lambda _k: 1)
        self.on_load, self.on_evict = on_load, on_evict
        self.protect_step = protect_step
        self._step_keys: set = set()
        self.resident: dict[Key, int] = {}
        self.used = self.peak = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.resident

    def access(self, keys: Sequence[Key], step: int) -> StepResult:
        """Look ``keys`` up (all needed at once), bring in the missing ones, record the uses."""
        res = StepResult([k in self.resident for k in keys])
        done: set = set()
        self._step_keys = set(keys) if self.protect_step else set()
        for k in keys:
            if k not in self.resident:
                self._bring_in(k, step, done, res)
            self.policy.used(k, step)
            done.add(k)
        return res

    def admit(self, key: Key, step: int) -> StepResult:
        """Bring ``key`` in ahead of its use (prefetch), evicting as :meth:`access` does; counts as
        a use for the policy. Nothing happens when it is resident already."""
        res = StepResult([key in self.resident])
        self._step_keys = set()
        if key not in self.resident:
            self._bring_in(key, step, set(), res)
            self.policy.used(key, step)
        return res

    def discard(self, key: Key) -> None:
        """Drop ``key`` without a policy decision (e.g. a prefetch that failed)."""
        self.used -= self.resident.pop(key)

    def _bring_in(self, key: Key, step: int, done: set, res: StepResult) -> None:
        s = int(self.size(key))
        if s > self.capacity:
            raise ValueError(f"{key!r} takes {s}, more than the whole capacity {self.capacity}")
        while self.used + s > self.capacity:
            pool = [y for y in self.resident if y not in self._step_keys] or self.resident
            victim = min(pool, key=lambda y: self.policy.priority(y, step, done))
            self.used -= self.resident.pop(victim)
            res.evicted.append(victim)
            if self.on_evict is not None:
                self.on_evict(victim)
        self.resident[key] = s
        self.used += s
        self.peak = max(self.peak, self.used)
        res.brought.append(key)
        if self.on_load is not None:
            self.on_load(key)


@dataclass(frozen=True)
class ReplayStats:
    """Hits and misses of a replay, per key looked up."""

    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")


def replay(steps: Sequence[Sequence[Key]], capacity: int, policy: str | CachePolicy = "lru", *,
           size: Callable[[Key], int] | None = None, seg_len: int = 16, half_life: float = 24.0,
           warm_start: bool = False, request_starts: Sequence[int] = (),
           protect_step: bool = True, hints: Sequence[Sequence[Key] | Mapping[Key, float] | None] | None = None,
           crf_weight: float = CRF_WEIGHT) -> ReplayStats:
    """Replay ``steps`` through an empty :class:`KeyCache` of ``capacity``.

    ``request_starts``: the steps where a new request begins (:meth:`CachePolicy.new_request`);
    ``protect_step``: see :class:`KeyCache` (True: the runtime's rule); ``hints[t]``: the keys
    predicted before step t (:meth:`CachePolicy.hint`; None keeps the previous hint), as a runtime
    predictor gives them; ``crf_weight``: predictive's with scored hints.

    ``warm_start`` (moe-lrc's convention): the cache is taken to start filled with the first keys
    to appear, so a first-time miss counts as a hit while fewer than ``capacity`` distinct keys
    have been seen (sizes 1). The runtime starts cold (``warm_start=False``).
    """
    pol = make_policy(policy, steps, seg_len, half_life, crf_weight) if isinstance(policy, str) else policy
    cache = KeyCache(capacity, pol, size, protect_step=protect_step)
    seen: set = set()
    hits = misses = 0
    starts = set(request_starts)
    for t, keys in enumerate(steps):
        if t in starts:
            pol.new_request()
        if hints is not None and hints[t] is not None:
            pol.hint(hints[t])
        res = cache.access(keys, t)
        for k, hit in zip(keys, res.hits, strict=True):
            warm = warm_start and k not in seen and len(seen) < capacity
            hits += hit or warm
            misses += not (hit or warm)
            seen.add(k)
    return ReplayStats(hits, misses)
