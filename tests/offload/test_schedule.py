"""Token scheduling: the expected-distinct objective by hand, greedy against brute force."""

from __future__ import annotations

from itertools import permutations

import pytest
import torch

from moelab.errors import MoelabError
from moelab.offload.predictor import Routes
from moelab.offload.schedule import (
    activation_vectors,
    arrival_batches,
    batch_steps,
    best_batches,
    expected_distinct,
    schedule_batches,
    total_distinct,
)


def test_expected_distinct_by_hand():
    p = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])  # 2 sequences, 1 layer, 2 experts
    assert expected_distinct(p) == pytest.approx(1.5)  # expert 0 surely, expert 1 half the time
    assert expected_distinct(p[:1]) == 1.0 and expected_distinct(p[1:]) == 1.0


def _clustered():
    a, b = torch.tensor([0.9, 0.9, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.9, 0.9])
    return torch.stack([a, b, a, b, a, b]).unsqueeze(1)  # types alternate in arrival order


def test_planted_clusters():
    p = _clustered()
    assert arrival_batches(6, 2) == [[0, 1], [2, 3], [4, 5]]
    assert schedule_batches(p, 2) == [[0, 2], [1, 3], [4, 5]]  # 3 + 3: one batch must mix
    assert total_distinct(p, schedule_batches(p, 2)) == pytest.approx(total_distinct(p, best_batches(p, 2)))
    assert schedule_batches(p, 3) == [[0, 2, 4], [1, 3, 5]] == best_batches(p, 3)
    assert total_distinct(p, schedule_batches(p, 3)) < total_distinct(p, arrival_batches(6, 3))


def _by_permutation(p, batch_size):
    """The slowest, most obvious optimum: every order of the sequences, cut into batches."""
    S = p.shape[0]
    return min(total_distinct(p, arrival_batches_of(list(order), batch_size)) for order in permutations(range(S)))


def arrival_batches_of(order, batch_size):
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.parametrize("S,B,seed", [(5, 2, 0), (6, 2, 1), (6, 3, 2), (7, 3, 3), (6, 4, 4)])
def test_greedy_against_brute_force(S, B, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(S, 2, 6, generator=g) ** 3  # sparse-ish activation frequencies
    best = best_batches(p, B)
    opt = total_distinct(p, best)
    assert opt == pytest.approx(_by_permutation(p, B))
    assert sorted(len(b) for b in best) == sorted(len(b) for b in arrival_batches(S, B))
    greedy = total_distinct(p, schedule_batches(p, B, swaps=False))
    scheduled = total_distinct(p, schedule_batches(p, B))
    assert opt <= scheduled + 1e-9 <= greedy + 2e-9
    assert scheduled <= 1.01 * opt  # swaps bring greedy within 1 % of the optimum on these cases
    assert opt <= total_distinct(p, arrival_batches(S, B)) + 1e-9


def test_bad_input():
    with pytest.raises(MoelabError, match="batch_size"):
        schedule_batches(torch.rand(3, 1, 2), 0)
    with pytest.raises(MoelabError, match=r"\[S, L, E\]"):
        schedule_batches(torch.rand(3, 2), 2)
    with pytest.raises(MoelabError, match="max_sequences"):
        best_batches(torch.rand(11, 1, 2), 2)
    with pytest.raises(MoelabError, match="exactly one batch"):
        total_distinct(torch.rand(3, 1, 2), [[0, 1], [1, 2]])


def test_activation_vectors_and_batch_steps_by_hand():
    ids0 = torch.tensor([[0], [1], [2], [2]])  # 2 sequences of 2 tokens, top-1, 3 experts
    ids1 = torch.tensor([[1], [1], [0], [-1]])
    r = Routes((0, 1), {}, {0: ids0, 1: ids1}, {0: 1, 1: 1}, {0: 3, 1: 3}, 2)
    p = activation_vectors(r)
    assert p.tolist() == [[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [0.5, 0.0, 0.0]]]
    assert activation_vectors(r, slice(0, 1))[1].tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    assert batch_steps(r, [[0, 1]], range(2)) == [[(0, 0), (0, 2)], [(1, 0), (1, 1)], [(0, 1), (0, 2)], [(1, 1)]]
    assert batch_steps(r, [[1], [0]], range(1, 2)) == [[(0, 2)], [], [(0, 1)], [(1, 1)]]
