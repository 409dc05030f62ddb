import numpy as np
import pytest

from moelab.analysis._inputs import EmptySelectionError
from moelab.analysis.coactivation import (
    coactivation,
    coactivation_reference,
    conditional_rate,
    layer_transitions,
    layer_transitions_reference,
    stable_partners,
)


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference(random_ids, seed):
    rng = np.random.default_rng(seed)
    ids_a = random_ids(rng, 80, 7, 3, drop=0.15)
    ids_b = random_ids(rng, 80, 5, 2, drop=0.15)
    np.testing.assert_array_equal(coactivation(ids_a, 7), coactivation_reference(ids_a, 7))
    np.testing.assert_array_equal(layer_transitions(ids_a, ids_b, 7, 5), layer_transitions_reference(ids_a, ids_b, 7, 5))


def test_uniform_random_conditional_rate(random_ids):
    rng = np.random.default_rng(0)
    ids = random_ids(rng, 100_000, 8, 3)
    rate = conditional_rate(coactivation(ids, 8))
    off = rate[~np.eye(8, dtype=bool)]
    np.testing.assert_allclose(off, 2 / 7, atol=0.01)  # P(j | i) = (K - 1) / (E - 1)
    np.testing.assert_allclose(np.diag(rate), 1)


def test_fixed_pairs_are_stable_partners():
    # experts come in fixed pairs (2i, 2i+1): each expert's only partner is its twin
    rng = np.random.default_rng(0)
    pair = rng.integers(0, 4, 400)
    ids = np.stack([2 * pair, 2 * pair + 1], axis=1)
    summary = stable_partners(ids, 8, num_partners=1, num_chunks=4)
    np.testing.assert_array_equal(summary.partners_EP[:, 0], np.arange(8) ^ 1)
    np.testing.assert_allclose(summary.rate_EP[:, 0], 1)
    np.testing.assert_allclose(summary.partner_share_E, 1)
    np.testing.assert_allclose(summary.stability_E, 1)
    assert summary.chance_share == pytest.approx(1 / 7)


def test_random_routing_partners_are_unstable(random_ids):
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 4000, 32, 2)
    summary = stable_partners(ids, 32, num_partners=3, num_chunks=8)
    assert summary.stability_E.mean() < 0.5  # chance level is about 3 / 31
    assert summary.partner_share_E.mean() < 3 * summary.chance_share


def test_transitions_of_a_deterministic_chain():
    ids_a = np.array([[0], [1], [2], [0]])
    ids_b = (ids_a + 1) % 3
    t = layer_transitions(ids_a, ids_b, 3)
    np.testing.assert_array_equal(t, [[0, 2, 0], [0, 0, 1], [1, 0, 0]])
    np.testing.assert_allclose(conditional_rate(t, np.array([2, 1, 1])).sum(axis=1), 1)


def test_bad_input():
    with pytest.raises(ValueError, match="ids_a_NK has 2 tokens but ids_b_NK has 3"):
        layer_transitions(np.zeros((2, 1), int), np.zeros((3, 1), int), 2)
    with pytest.raises(EmptySelectionError):
        stable_partners(np.zeros((2, 2), int), 4, num_chunks=5)
    with pytest.raises(ValueError, match="num_partners"):
        stable_partners(np.zeros((2, 2), int), 4, num_partners=4)
