"""Token scheduling for batched requests: group sequences so that each batch needs fewer experts.

Shape legend: S sequences, L MoE layers, E experts, B sequences per batch.

ExpertFlow (He et al. 2024, "ExpertFlow: Efficient Mixture-of-Experts Inference via Predictive
Expert Caching and Token Scheduling", arXiv 2410.17954) groups tokens with similar routes into the
same batch, so that a batch activates fewer distinct experts and the expert cache serves more of
them. Here a request is a sequence; its routes are summarised by its **activation vector**
``p_SLE[s, l, e]``: the fraction of its tokens (e.g. its prompt, seen in the prefill's routing
pass) that chose expert e in MoE layer l. When a batch decodes one token of every sequence, each
sequence's token is taken to choose its experts independently with these frequencies, so the
expected number of distinct experts the step needs is

    D(batch) = sum_l sum_e (1 - prod_{s in batch} (1 - p_SLE[s, l, e]))

:func:`schedule_batches` is a greedy clustering: the oldest waiting request opens the next batch
and the waiting requests that raise D the least fill it; then swaps of two requests between
batches that lower the total D are made until none is left (``swaps=False`` skips them), and the
batches run in the order of their oldest request. :func:`best_batches` is the slow
obvious optimum (every partition into batches of B, for a handful of sequences) it is tested
against; :func:`arrival_batches` is the unscheduled baseline. :func:`batch_steps` turns batches
into the cache steps of a batched decode (one step per position and layer: the union of the
batch's experts), to measure distinct experts per step and hit rates by replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch
from torch import Tensor

from moelab.errors import MoelabError
from moelab.offload.predictor import Routes, multi_hot

Batches = list[list[int]]


def activation_vectors(routes: Routes, positions: slice = slice(None)) -> Tensor:
    """``p_SLE``: per sequence of ``routes`` (of ``seq_len`` tokens each), the fraction of its
    tokens at ``positions`` (within the sequence) that chose each expert, per MoE layer (layers
    with fewer experts than the largest are padded with zeros)."""
    S, n = routes.num_tokens // routes.seq_len, routes.seq_len
    E = max(routes.num_experts.values())
    out = torch.zeros(S, len(routes.layers), E)
    for i, layer in enumerate(routes.layers):
        hot_TE = multi_hot(routes.ids[layer][:S * n], routes.num_experts[layer])
        out[:, i, :hot_TE.shape[1]] = hot_TE.view(S, n, -1)[:, positions].mean(1)
    return out


def expected_distinct(p_BLE: Tensor) -> float:
    """``D``: expected distinct experts one decode step of these sequences needs (module docstring)."""
    return float((1 - (1 - p_BLE.double()).prod(0)).sum())


def _check(p_SLE: Tensor, batch_size: int) -> int:
    if p_SLE.dim() != 3:
        raise MoelabError(f"activation vectors: expected [S, L, E], got shape {list(p_SLE.shape)}")
    if batch_size < 1:
        raise MoelabError(f"batch_size: expected >= 1, got {batch_size}")
    return p_SLE.shape[0]


def arrival_batches(num_sequences: int, batch_size: int) -> Batches:
    """Batches in arrival order: ``[[0, .., B-1], [B, ..], ...]``."""
    if batch_size < 1:
        raise MoelabError(f"batch_size: expected >= 1, got {batch_size}")
    return [list(range(i, min(i + batch_size, num_sequences))) for i in range(0, num_sequences, batch_size)]


def schedule_batches(p_SLE: Tensor, batch_size: int, swaps: bool = True) -> Batches:
    """Greedy grouping: the oldest waiting sequence opens a batch, then the waiting sequence that
    raises the batch's ``D`` the least joins (ties: the oldest), until it holds ``batch_size``;
    then improving swaps (:func:`_swap_pass`) until none is left."""
    S = _check(p_SLE, batch_size)
    miss_SF = (1 - p_SLE.double()).reshape(S, -1)  # prod over the batch of (1 - p)
    waiting = list(range(S))
    out: Batches = []
    while waiting:
        batch = [waiting.pop(0)]
        miss_F = miss_SF[batch[0]].clone()
        while len(batch) < batch_size and waiting:
            cand = torch.tensor(waiting)
            # D(batch + s) - D(batch) = sum_f miss_F (1 - miss_SF[s]), smallest first
            raise_C = (miss_F * (1 - miss_SF[cand])).sum(1)
            j = int(torch.argmin(raise_C))  # first minimum: the oldest among ties
            s = waiting.pop(j)
            batch.append(s)
            miss_F *= miss_SF[s]
        out.append(batch)
    while swaps and _swap_pass(p_SLE, out):
        pass
    return sorted((sorted(b) for b in out), key=lambda b: b[0])


def _swap_pass(p_SLE: Tensor, batches: Batches) -> bool:
    """Swap two sequences of different batches wherever that lowers the sum of ``D``; True if any."""
    cost = [expected_distinct(p_SLE[b]) for b in batches]
    improved = False
    for i in range(len(batches)):
        for j in range(i + 1, len(batches)):
            for a in range(len(batches[i])):
                for b in range(len(batches[j])):
                    bi, bj = list(batches[i]), list(batches[j])
                    bi[a], bj[b] = bj[b], bi[a]
                    ci, cj = expected_distinct(p_SLE[bi]), expected_distinct(p_SLE[bj])
                    if ci + cj < cost[i] + cost[j] - 1e-9:
                        batches[i], batches[j], cost[i], cost[j] = bi, bj, ci, cj
                        improved = True
    return improved


def total_distinct(p_SLE: Tensor, batches: Sequence[Sequence[int]]) -> float:
    """Sum of ``D`` over the batches (each sequence in exactly one batch)."""
    seen = sorted(s for b in batches for s in b)
    if seen != list(range(p_SLE.shape[0])):
        raise MoelabError(f"batches: every one of the {p_SLE.shape[0]} sequences must be in exactly one batch")
    return sum(expected_distinct(p_SLE[list(b)]) for b in batches)


def best_batches(p_SLE: Tensor, batch_size: int, max_sequences: int = 10) -> Batches:
    """The partition into batches of ``batch_size`` (one smaller last batch when S is not a
    multiple) with the smallest total ``D``, by enumeration: the slow obvious reference."""
    S = _check(p_SLE, batch_size)
    if S > max_sequences:
        raise MoelabError(f"best_batches enumerates every partition: {S} sequences is more than "
                          f"max_sequences={max_sequences}")
    sizes = [batch_size] * (S // batch_size) + ([S % batch_size] if S % batch_size else [])
    best: tuple[float, Batches] = (float("inf"), [])

    def rec(left: list[int], sizes_left: list[int], acc: Batches, cost: float) -> None:
        nonlocal best
        if not left:
            if cost < best[0] - 1e-12:
                best = (cost, [list(b) for b in acc])
            return
        first, rest = left[0], left[1:]  # the batch holding the lowest index left: no duplicates
        for size in dict.fromkeys(sizes_left):
            sl = list(sizes_left)
            sl.remove(size)
            for others in combinations(rest, size - 1):
                b = [first, *others]
                rec([s for s in rest if s not in others], sl, [*acc, b],
                    cost + expected_distinct(p_SLE[b]))

    rec(list(range(S)), sizes, [], 0.0)
    return best[1]


def batch_steps(routes: Routes, batches: Sequence[Sequence[int]], positions: range) -> list[list[tuple[int, int]]]:
    """The cache steps of decoding ``batches`` one after another, all sequences of a batch at each
    position of ``positions`` (within the sequence): per position and MoE layer, the distinct
    ``(layer, expert)`` the batch's tokens chose."""
    n = routes.seq_len
    steps = []
    for b in batches:
        for t in positions:
            rows = [s * n + t for s in b]
            for layer in routes.layers:
                ids = routes.ids[layer][rows]
                steps.append([(layer, int(e)) for e in ids.unique().tolist() if e >= 0])
    return steps


__all__ = ["activation_vectors", "arrival_batches", "batch_steps", "best_batches", "expected_distinct",
           "schedule_batches", "total_distinct"]
