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

from moelab.analysis._inputs import (
    AnalysisInputError,
    EmptySelectionError,
    check_ids,
    check_seq_ids,
)
from moelab.analysis.cache_policy import POLICIES, replay

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
    """State of the stack replay for all sequences at once.

    ``stack[s, j]`` is the expert at depth j (E = empty); ``where[s, e]`` its depth (-1 = never seen);
    ``key[s, e]`` its priority, ``primary * 2**32 + time of last use``, higher = kept longer. Column E
    of ``where`` and ``key`` is a sentinel for the empty stack slots.
    """

    def __init__(self, ids_STK: np.ndarray, num_experts: int, policy: str, seg_len: int):
        self.ids, self.num_experts, self.policy, self.seg_len = ids_STK, num_experts, policy, seg_len
        s_dim, e = ids_STK.shape[0], num_experts
        self.rows = np.arange(s_dim)
        self.cols = np.arange(e)[None, :]
        self.stack = np.full((s_dim, e), e, dtype=np.int64)
        self.where = np.full((s_dim, e + 1), -1, dtype=np.int64)
        self.depth = np.zeros(s_dim, dtype=np.int64)
        self.clock = np.zeros(s_dim, dtype=np.int64)
        self.primary = np.zeros((s_dim, e), dtype=np.int64)
        if policy == "lrc":  # uses in the window [t, t + m) of the current token t
            self.primary = _token_counts(ids_STK[:, :seg_len].reshape(s_dim, -1), e)
        if policy == "belady":
            self.next_occ = _next_occurrence(ids_STK)
        self.key = np.zeros((s_dim, e + 1), dtype=np.int64)
        self.key[:, :e] = self.primary * _BIG
        self.key[:, e] = _KEEP

    def distances(self, row_SK: np.ndarray) -> np.ndarray:
        """Stack distance of each slot before the token; new experts take the next free depths."""
        pos = np.take_along_axis(self.where, np.clip(row_SK, 0, None), axis=1)
        new = (pos < 0) & (row_SK >= 0)
        pos = np.where(new, self.depth[:, None] + np.cumsum(new, axis=1) - 1, pos)
        return np.where(row_SK >= 0, pos, -1)

    def access(self, x_S: np.ndarray, t: int, k: int) -> None:
        """Bring expert ``x_S[s]`` to the top of each stack (Mattson's priority-stack update)."""
        act = x_S >= 0
        xs = np.where(act, x_S, 0)
        p = self.where[self.rows, xs]
        grow = act & (p < 0)
        p = np.where(grow, self.depth, p)
        top = int(p.max()) + 1  # the update never touches depths below the deepest x
        stack, cols = self.stack[:, :top], self.cols[:, :top]
        keys = np.take_along_axis(self.key, stack, axis=1)
        keys[cols >= p[:, None]] = _KEEP  # only the items above x take part
        is_min = keys == np.minimum.accumulate(keys, axis=1)
        at_min = np.maximum.accumulate(np.where(is_min, cols, 0), axis=1)  # carried item's depth
        carried = np.take_along_axis(stack, np.concatenate([at_min[:, :1], at_min[:, :-1]], axis=1), axis=1)
        new = np.where(is_min, carried, stack)  # bubble: the lower key moves down one place
        upd = act & ((p > 0) | grow)
        r = self.rows[upd]
        new[r, p[upd]] = carried[r, p[upd]]  # the lowest key above x drops into x's old place
        new[:, 0] = xs
        self.stack[r, :top] = new[r]
        self.depth += grow
        self.where[self.rows[:, None], self.stack[:, :top]] = cols
        self._after_use(xs, act, t, k)

    def _after_use(self, xs: np.ndarray, act: np.ndarray, t: int, k: int) -> None:
        r, x = self.rows[act], xs[act]
        self.clock += act
        if self.policy == "lrc":
            self.primary[r, x] -= 1
        elif self.policy == "lfu":
            self.primary[r, x] += 1
        elif self.policy == "belady":
            self.primary[r, x] = -self.next_occ[r, t, k]
        self.key[r, x] = self.primary[r, x] * _BIG + self.clock[r]

    def end_token(self, t: int) -> None:
        if self.policy == "lrc" and t + self.seg_len < self.ids.shape[1]:
            add = _token_counts(self.ids[:, t + self.seg_len], self.num_experts)
            self.primary += add
            self.key[:, : self.num_experts] += add * _BIG


def cache_hit_curve(ids_NK: np.ndarray, num_experts: int, policy: str = "lrc", seg_len: int = 16,
                    seq_ids_N: np.ndarray | None = None, sequence_stride: int = 1) -> CacheCurve:
    """Hit rate for every cache size 1..E under ``policy`` (SCH for ``"lrc"``; see module docstring)."""
    return cache_hit_curves([ids_NK], num_experts, policy, seg_len, seq_ids_N, sequence_stride)[0]


def cache_hit_curves(ids_by_layer: list[np.ndarray], num_experts: int, policy: str = "lrc", seg_len: int = 16,
                     seq_ids_N: np.ndarray | None = None, sequence_stride: int = 1) -> list[CacheCurve]:
    """:func:`cache_hit_curve` of several layers of one trace (same tokens, same E) in one replay.

    Each layer gets its own caches; replaying the layers side by side shares numpy's per-call cost.
    """
    if policy not in POLICIES:
        raise AnalysisInputError(f"policy must be one of {POLICIES}, got {policy!r}")
    if seg_len < 1:
        raise AnalysisInputError(f"seg_len must be >= 1, got {seg_len}")
    if sequence_stride < 1:
        raise AnalysisInputError(f"sequence_stride must be >= 1, got {sequence_stride}")
    if len(ids_by_layer) == 0:
        raise EmptySelectionError("cache_hit_curves: no layer given")
    layers = [check_ids(ids, num_experts, f"ids_by_layer[{i}]") for i, ids in enumerate(ids_by_layer)]
    starts = check_seq_ids(seq_ids_N, layers[0].shape[0])
    if any(ids.shape != layers[0].shape for ids in layers):
        raise AnalysisInputError(f"ids_by_layer: every layer needs the shape {layers[0].shape}")
    ids_STK = np.concatenate([_pad_sequences(ids, starts, sequence_stride) for ids in layers])
    group_S = np.repeat(np.arange(len(layers)), ids_STK.shape[0] // len(layers))
    if policy == "lru":
        hist = _lru_histogram(ids_STK, group_S, len(layers), num_experts)
    else:
        hist = _stack_histogram(ids_STK, group_S, len(layers), num_experts, policy, seg_len)
    out = []
    for h in hist:
        total = int(h.sum())
        if total == 0:
            raise EmptySelectionError("no routed slot in the selected sequences (all ids are -1)")
        out.append(CacheCurve(policy=policy, seg_len=seg_len if policy == "lrc" else None,
                              hit_rate_C=np.cumsum(h)[:num_experts] / total, num_accesses=total))
    return out


def _add_distances(hist_GE: np.ndarray, d_SK: np.ndarray, group_S: np.ndarray) -> None:
    keep = d_SK >= 0
    width = hist_GE.shape[1]
    codes = (np.broadcast_to(group_S[:, None], d_SK.shape)[keep] * width + d_SK[keep])
    hist_GE += np.bincount(codes, minlength=hist_GE.size).reshape(hist_GE.shape)


def _lru_histogram(ids_STK: np.ndarray, group_S: np.ndarray, num_groups: int, num_experts: int) -> np.ndarray:
    """LRU keeps its stack sorted by recency, so a stack distance is a rank: one step per token."""
    s_dim = ids_STK.shape[0]
    rows = np.arange(s_dim)[:, None]
    last = np.zeros((s_dim, num_experts + 1), dtype=np.int64)  # clock of last use, 0 = never
    last[:, num_experts] = -1  # sentinel column for -1 slots
    clock = np.zeros(s_dim, dtype=np.int64)
    depth = np.zeros(s_dim, dtype=np.int64)
    hist = np.zeros((num_groups, num_experts), dtype=np.int64)
    for t in range(ids_STK.shape[1]):  # sequential in time; vectorised over sequences
        row = ids_STK[:, t]
        act = row >= 0
        last_x = last[rows, row]
        new = act & (last_x == 0)
        rank = (last[:, None, :num_experts] > last_x[:, :, None]).sum(axis=2)
        d = np.where(new, depth[:, None] + np.cumsum(new, axis=1) - 1, rank)
        _add_distances(hist, np.where(act, d, -1), group_S)
        order = np.cumsum(act, axis=1)
        last[rows, np.where(act, row, num_experts)] = np.where(act, clock[:, None] + order, -1)
        clock += order[:, -1]
        depth += new.sum(axis=1)
    return hist


def _stack_histogram(ids_STK: np.ndarray, group_S: np.ndarray, num_groups: int, num_experts: int,
                     policy: str, seg_len: int) -> np.ndarray:
    replay = _Replay(ids_STK, num_experts, policy, seg_len)
    hist = np.zeros((num_groups, num_experts), dtype=np.int64)
    for t in range(ids_STK.shape[1]):  # sequential in time; vectorised over sequences
        row = ids_STK[:, t]
        d = replay.distances(row)
        _add_distances(hist, d, group_S)
        for k in range(row.shape[1]):
            replay.access(row[:, k], t, k)
        replay.end_token(t)
    return hist


def cache_hit_curve_reference(ids_NK: np.ndarray, num_experts: int, policy: str = "lrc", seg_len: int = 16,
                              seq_ids_N: np.ndarray | None = None) -> np.ndarray:
    """Slow obvious hit-rate curve ``[E]``: one explicit cache per size C, replayed token by token
    with the policies the offload runtime uses (:mod:`moelab.analysis.cache_policy`)."""
    ids = np.asarray(ids_NK).reshape(len(ids_NK), -1)
    seq = np.zeros(len(ids), dtype=np.int64) if seq_ids_N is None else np.asarray(seq_ids_N)
    seqs = [[[int(e) for e in r if e >= 0] for r in ids[seq == s]] for s in dict.fromkeys(seq.tolist())]
    hits = np.zeros(num_experts)
    total = sum(len(r) for s in seqs for r in s)
    for c in range(1, num_experts + 1):
        for rows in seqs:
            hits[c - 1] += replay(rows, c, policy, seg_len=seg_len, warm_start=True,
                                  protect_step=False).hits
    return hits / total
