import numpy as np
import pytest

from moelab.analysis._inputs import EmptySelectionError, MissingFieldError
from moelab.analysis.super_experts import expert_act_max, super_experts, super_experts_reference


def test_expert_act_max():
    ids = np.array([[0, 1], [1, 2], [0, -1]])
    act = np.array([[1.0, -5.0], [2.0, 3.0], [7.0, 100.0]])
    np.testing.assert_allclose(expert_act_max(ids, act, 4), [7, 5, 3, np.nan])
    with pytest.raises(MissingFieldError, match="--act-max"):
        expert_act_max(ids, None, 4)


def test_planted_outliers_are_found():
    rng = np.random.default_rng(0)
    a = rng.uniform(1, 5, (16, 64))
    a[2, 7], a[5, 11] = 900.0, 400.0  # planted in scored layers
    a[14, 3] = 2000.0  # layer 14 >= round(0.75 * 16) = 12: not scored
    a[3, 0] = 60.0  # above P99.5 but below floor(900 / 10) = 90
    found = super_experts(a)
    assert found.include_layers == 12
    assert list(zip(found.layer_S, found.expert_S, strict=False)) == [(2, 7), (5, 11)]
    assert found.max_threshold == 90
    assert list(zip(found.layer_S, found.expert_S, strict=False)) == super_experts_reference(a)


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_heavy_tails(seed):
    rng = np.random.default_rng(seed)
    a = rng.pareto(0.8, (24, 32)) + 1
    a[rng.random(a.shape) < 0.05] = np.nan  # experts that saw no token
    found = super_experts(a)
    assert list(zip(found.layer_S.tolist(), found.expert_S.tolist(), strict=False)) == super_experts_reference(a)


def test_no_scored_layer():
    with pytest.raises(EmptySelectionError, match="no expert in the first 0"):
        super_experts(np.ones((4, 8)), include_layers=0.1)
    with pytest.raises(ValueError, match=r"\[L, E\]"):
        super_experts(np.ones(8))
