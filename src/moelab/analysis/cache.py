"""Expert-cache hit rates: Segment Cache best Hit rate (SCH) and LRU / LFU / Belady curves.

Liang et al. 2025, "Not All Models Suit Expert Offloading" (arXiv 2505.16056), as coded in
github.com/ljcleo/moe-lrc (``src/41_sch_calc.py`` for SCH, ``src/50_chr_calc.py`` for LRU and
Belady). Belady 1966 ("A study of replacement algorithms for a virtual-storage computer") for MIN.

Shape legend: N tokens, K top-k slots, E experts, S sequences, T positions (padded), C cache sizes.

Each sequence is replayed through a cache of C experts, emptied at the start of the sequence. A
token's K slots are looked up against the cache as it was before the token (all K are needed at
once), then brought in one after another; bringing in a missing expert into a full cache evicts the
cached expert with the lowest priority:

- ``"lrc"`` (SCH): fewest uses in the next ``seg_len`` tokens (counted from the current token; an
  expert's own current use is dropped once it is brought in), ties to the least recently used.
- ``"lru"``: least recently used.  ``"lfu"``: fewest uses so far in the sequence, ties to LRU.
- ``"belady"``: next use farthest in the future (never again = infinitely far), ties to LRU.

As in moe-lrc, the first C distinct experts of a sequence count as hits (the cache is taken to start
filled with them), so the hit rate at C = E is 1. Hit rate = hits / routed slots, pooled over
sequences (moe-lrc averages per sequence; equal for sequences of equal length).

All four are priority policies, so one replay gives every cache size at once (Mattson et al. 1970,
"Evaluation techniques for storage hierarchies"): a stack holds the experts in an order such that
the top C are the content of a cache of size C; the stack distance of each access is recorded and
``hit_rate[C - 1] = P(distance < C)``. The replay loops over token positions (the cache is
sequential in time) and is vectorised over sequences; ``sequence_stride`` subsamples sequences as
moe-lrc does (it replays every 16th sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._inputs import AnalysisInputError, EmptySelectionError, check_ids, check_seq_ids

POLICIES = ("lrc", "lru", "lfu", "belady")
_BIG = np.int64(1) << np.int64(32)  # primary key * 2**32 + last-use time: time breaks ties
_KEEP = np.iinfo(np.int64).max


@dataclass(frozen=True)
class CacheCurve:
    """Hit rate of one layer for cache sizes 1..E under one policy."""

    policy: str
    seg_len: int | None  # look-ahead of "lrc"
    hit_rate_C: np.ndarray  # [E]; entry C - 1 is the hit rate with a cache of C experts
    num_accesses: int


def _pad_sequences(ids: np.ndarray, starts: np.ndarray, stride: int) -> np.ndarray:
    """``[S, T, K]`` ids per sequence, padded with -1."""
    lo, hi = starts[:-1][::stride], starts[1:][::stride]
    lens = hi - lo
    out = np.full((len(lo), int(lens.max()), ids.shape[1]), -1, dtype=np.int64)
    seq = np.repeat(np.arange(len(lo)), lens)
    pos = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    src = np.repeat(lo, lens) + pos
    out[seq, pos] = ids[src]
    return out


def _next_occurrence(ids_STK: np.ndarray) -> np.ndarray:
    """``[S, T, K]`` position of the next token of the same sequence choosing the same expert (T if none)."""
    s_dim, t_dim, k_dim = ids_STK.shape
    s, t, k = np.nonzero(ids_STK >= 0)
    e = ids_STK[s, t, k]
    order = np.lexsort((t, e, s))
    s, t, k, e = s[order], t[order], k[order], e[order]
    nxt = np.full(len(t), t_dim, dtype=np.int64)
    same = (s[1:] == s[:-1]) & (e[1:] == e[:-1])
    nxt[:-1][same] = t[1:][same]
    out = np.full(ids_STK.shape, t_dim, dtype=np.int64)
    out[s, t, k] = nxt
    return out


def _token_counts(row_SK: np.ndarray, num_experts: int) -> np.ndarray:
    out = np.zeros((row_SK.shape[0], num_experts + 1), dtype=np.int64)
    np.add.at(out, (np.arange(row_SK.shape[0])[:, None], row_SK), 1)
    return out[:, :num_experts]


class _Replay:
    """State of the stack replay for all sequences at once."""

    def __init__(self, ids_STK: np.ndarray, num_experts: int, policy: str, seg_len: int):
        self.ids, self.num_experts, self.policy, self.seg_len = ids_STK, num_experts, policy, seg_len
        s_dim = ids_STK.shape[0]
        self.rows = np.arange(s_dim)
        self.stack = np.full((s_dim, num_experts), -1, dtype=np.int64)
        self.where = np.full((s_dim, num_experts), -1, dtype=np.int64)  # position of each expert
        self.depth = np.zeros(s_dim, dtype=np.int64)
        self.last = np.zeros((s_dim, num_experts), dtype=np.int64)  # time of last use
        self.clock = np.zeros(s_dim, dtype=np.int64)
        self.primary = np.zeros((s_dim, num_experts), dtype=np.int64)
        if policy == "lrc":  # uses in the window [t, t + m) of the current token t
            self.primary = _token_counts(ids_STK[:, :seg_len].reshape(s_dim, -1), num_experts)
        if policy == "belady":
            self.next_occ = _next_occurrence(ids_STK)

    def keys(self) -> np.ndarray:
        return self.primary * _BIG + self.last

    def distances(self, row_SK: np.ndarray) -> np.ndarray:
        """Stack distance of each slot before the token; new experts take the next free depths."""
        pos = np.take_along_axis(self.where, np.clip(row_SK, 0, None), axis=1)
        new = (pos < 0) & (row_SK >= 0)
        pos = np.where(new, self.depth[:, None] + np.cumsum(new, axis=1) - 1, pos)
        return np.where(row_SK >= 0, pos, -1)

    def access(self, x_S: np.ndarray, t: int, k: int) -> None:
        act = x_S >= 0
        xs = np.where(act, x_S, 0)
        p = self.where[self.rows, xs]
        p = np.where(p < 0, self.depth, p)
        keys = np.take_along_axis(self.keys(), np.clip(self.stack, 0, None), axis=1)
        j = np.arange(self.num_experts)[None, :]
        keys = np.where(j < p[:, None], keys, _KEEP)
        run_min = np.minimum.accumulate(keys, axis=1)
        is_min = keys == run_min
        at_min = np.maximum.accumulate(np.where(is_min, j, 0), axis=1)  # where the carried item came from
        carried = np.take_along_axis(self.stack, np.concatenate([at_min[:, :1], at_min[:, :-1]], axis=1), axis=1)
        new = np.where((j < p[:, None]) & is_min, carried, self.stack)  # bubble: the lower key moves down
        new = np.where(j == p[:, None], carried, new)
        new[:, 0] = xs
        grow = act & (self.where[self.rows, xs] < 0)
        new = np.where((act & ((p > 0) | grow))[:, None], new, self.stack)
        self.depth += grow
        self.stack = np.where(j < self.depth[:, None], new, -1)
        self.where.fill(-1)
        filled = self.stack >= 0
        self.where[np.nonzero(filled)[0], self.stack[filled]] = np.nonzero(filled)[1]
        self._after_use(xs, act, t, k)

    def _after_use(self, xs: np.ndarray, act: np.ndarray, t: int, k: int) -> None:
        r = self.rows[act]
        self.clock += act
        self.last[r, xs[act]] = self.clock[act]
        if self.policy == "lrc":
            self.primary[r, xs[act]] -= 1
        elif self.policy == "lfu":
            self.primary[r, xs[act]] += 1
        elif self.policy == "belady":
            self.primary[r, xs[act]] = -self.next_occ[r, t, k]

    def end_token(self, t: int) -> None:
        if self.policy == "lrc" and t + self.seg_len < self.ids.shape[1]:
            self.primary += _token_counts(self.ids[:, t + self.seg_len], self.num_experts)


def cache_hit_curve(ids_NK: np.ndarray, num_experts: int, policy: str = "lrc", seg_len: int = 16,
                    seq_ids_N: np.ndarray | None = None, sequence_stride: int = 1) -> CacheCurve:
    """Hit rate for every cache size 1..E under ``policy`` (SCH for ``"lrc"``; see module docstring)."""
    ids = check_ids(ids_NK, num_experts)
    if policy not in POLICIES:
        raise AnalysisInputError(f"policy must be one of {POLICIES}, got {policy!r}")
    if seg_len < 1:
        raise AnalysisInputError(f"seg_len must be >= 1, got {seg_len}")
    if sequence_stride < 1:
        raise AnalysisInputError(f"sequence_stride must be >= 1, got {sequence_stride}")
    ids_STK = _pad_sequences(ids, check_seq_ids(seq_ids_N, ids.shape[0]), sequence_stride)
    replay = _Replay(ids_STK, num_experts, policy, seg_len)
    hist = np.zeros(num_experts + 1, dtype=np.int64)
    for t in range(ids_STK.shape[1]):  # sequential in time; vectorised over sequences
        row = ids_STK[:, t]
        d = replay.distances(row)
        hist += np.bincount(d[d >= 0], minlength=num_experts + 1)[: num_experts + 1]
        for k in range(row.shape[1]):
            replay.access(row[:, k], t, k)
        replay.end_token(t)
    total = int(hist.sum())
    if total == 0:
        raise EmptySelectionError("no routed slot in the selected sequences (all ids are -1)")
    return CacheCurve(policy=policy, seg_len=seg_len if policy == "lrc" else None,
                      hit_rate_C=np.cumsum(hist)[:num_experts] / total, num_accesses=total)


def cache_hit_curve_reference(ids_NK: np.ndarray, num_experts: int, policy: str = "lrc", seg_len: int = 16,
                              seq_ids_N: np.ndarray | None = None) -> np.ndarray:
    """Slow obvious hit-rate curve ``[E]``: one explicit cache per size C, replayed token by token."""
    ids = np.asarray(ids_NK).reshape(len(ids_NK), -1)
    seq = np.zeros(len(ids), dtype=np.int64) if seq_ids_N is None else np.asarray(seq_ids_N)
    seqs = [ids[seq == s] for s in dict.fromkeys(seq.tolist())]
    hits = np.zeros(num_experts)
    total = sum(int((s >= 0).sum()) for s in seqs)
    for c in range(1, num_experts + 1):
        for s in seqs:
            hits[c - 1] += _replay_one(s, num_experts, policy, seg_len, c)
    return hits / total


def _replay_one(seq: np.ndarray, num_experts: int, policy: str, seg_len: int, size: int) -> int:
    rows = [[int(e) for e in r if e >= 0] for r in seq]
    cache: set[int] = set()
    seen: set[int] = set()
    last = [0] * num_experts
    uses = [0] * num_experts
    clock = hits = 0

    def key(e: int, t: int, done: set[int]) -> tuple[int, int]:
        if policy == "lru":
            return (0, last[e])
        if policy == "lfu":
            return (uses[e], last[e])
        if policy == "lrc":  # uses in [t, t + m), not counting a use in t already served
            fut = sum(r.count(e) for r in rows[t:t + seg_len]) - (e in done)
            return (fut, last[e])
        nxt = [u for u in range(t + (e in done), len(rows)) if e in rows[u]]  # belady
        return (-(nxt[0] if nxt else len(rows)), last[e])

    for t, row in enumerate(rows):
        for e in row:
            if e in cache:
                hits += 1
            elif e not in seen:
                hits += len(seen) < size  # the cache starts filled with the first `size` experts
                seen.add(e)
        done: set[int] = set()
        for e in row:
            if e not in cache:
                if len(cache) == size:
                    cache.remove(min(cache, key=lambda y: key(y, t, done)))
                cache.add(e)
            clock += 1
            last[e] = clock
            uses[e] += 1
            done.add(e)
    return hits
