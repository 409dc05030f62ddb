import numpy as np
import pytest

from moelab.analysis._inputs import EmptySelectionError, MissingFieldError, MissingLabelsError
from moelab.analysis.load import expert_load, expert_load_reference, load_by_label, router_entropy


@pytest.mark.parametrize("seed", range(5))
def test_expert_load_matches_reference(random_ids, seed):
    rng = np.random.default_rng(seed)
    num_experts = int(rng.integers(2, 10))
    ids = random_ids(rng, 50, num_experts, min(3, num_experts), drop=0.2)
    w = rng.random(ids.shape)
    for weights in (w, None):
        fast, ref = expert_load(ids, weights, num_experts), expert_load_reference(ids, weights, num_experts)
        for field in fast.__dataclass_fields__:
            np.testing.assert_allclose(getattr(fast, field), getattr(ref, field), rtol=1e-12, err_msg=field)


def test_everything_on_one_expert():
    ids = np.full((100, 1), 3)
    load = expert_load(ids, np.ones((100, 1)), 8)
    assert load.cv == pytest.approx(np.sqrt(7))  # population std of (N, 0, ..., 0) over its mean
    assert load.max_over_mean == pytest.approx(8)
    assert load.entropy == 0 and load.mean_weight_entropy == 0
    assert load.dead_E.sum() == 7 and not load.dead_E[3]


def test_round_robin_is_balanced():
    ids = (np.arange(64 * 2).reshape(64, 2)) % 8
    load = expert_load(ids, np.full(ids.shape, 0.5), 8)
    assert load.cv == pytest.approx(0) and load.max_over_mean == pytest.approx(1)
    assert load.entropy_norm == pytest.approx(1)
    assert load.mean_weight_entropy == pytest.approx(np.log(2))  # two equal weights per token
    np.testing.assert_allclose(load.weight_E, 8.0)


def test_near_dead_threshold():
    # expert 0 gets 1 of 100 slots: share 0.01 < 0.1 / 4 = 0.025 -> near-dead; expert 3 none -> dead
    ids = np.array([0] + [1] * 50 + [2] * 49)[:, None]
    load = expert_load(ids, None, 4)
    assert load.near_dead_E.tolist() == [True, False, False, False]
    assert load.dead_E.tolist() == [False, False, False, True]


def test_uniform_random_load_statistics(random_ids):
    rng = np.random.default_rng(0)
    ids = random_ids(rng, 200_000, 16, 4)
    load = expert_load(ids, None, 16)
    # each expert: Binomial(N, K/E) counts, so cv ~ sqrt((1 - K/E) / (N K / E)) = 0.0043
    assert load.cv < 0.01
    assert load.entropy_norm > 0.9999


def test_load_by_label_equals_per_subset_load(random_ids):
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 300, 6, 2, drop=0.1)
    labels = rng.integers(0, 3, 300)
    by = load_by_label(ids, labels, 6, ["code", "docs", "plays"])
    for d in range(3):
        np.testing.assert_array_equal(by.tokens_DE[d], expert_load(ids[labels == d], None, 6).tokens_E)
    np.testing.assert_allclose(by.share_DE.sum(axis=1), 1)


def test_router_entropy():
    assert router_entropy(np.zeros((3, 8))) == pytest.approx(np.full(3, np.log(8)))
    assert router_entropy(np.array([[1e4, 0, 0]]))[0] == pytest.approx(0, abs=1e-9)


def test_bad_input():
    ids = np.zeros((4, 2), dtype=np.int64)
    with pytest.raises(MissingLabelsError, match="label"):
        load_by_label(ids, None, 4)
    with pytest.raises(EmptySelectionError, match="no tokens"):
        expert_load(np.zeros((0, 2), dtype=np.int64), None, 4)
    with pytest.raises(ValueError, match=r"ids_NK holds expert ids in \[0, 9\]"):
        expert_load(np.array([[0, 9]]), None, 4)
    with pytest.raises(ValueError, match="weights_NK has shape"):
        expert_load(ids, np.ones((4, 3)), 4)
    with pytest.raises(MissingFieldError, match="--logits"):
        router_entropy(None)
    with pytest.raises(ValueError, match="labels_N holds code 3"):
        load_by_label(ids, np.array([0, 1, 2, 3]), 4, ["a", "b", "c"])
