import numpy as np
import pytest

from moelab.analysis._inputs import EmptySelectionError
from moelab.analysis.multitask import (
    expert_collapse,
    multitask_reference,
    shared_expert_degradation,
    task_underfitting,
)


def test_collapse_closed_form():
    rng = np.random.default_rng(0)
    hidden = np.maximum(rng.normal(size=(100, 3, 16)), 0)  # ReLU: about half zeros
    hidden[:, 2] = 0
    hidden[:5, 2, 0] = 1.0  # expert 2: 1 - 5 / 1600 zeros
    out = np.ones((100, 3, 4))
    out[:, 1] *= 10  # norm 2 vs 20
    c = expert_collapse(hidden, out)
    assert c.zero_share_E[2] == pytest.approx(1 - 5 / 1600)
    assert abs(c.zero_share_E[0] - 0.5) < 0.05
    assert c.collapsed_E.tolist() == [False, False, True]
    np.testing.assert_allclose(c.output_scale_E, [2, 20, 2])
    assert c.scale_spread == pytest.approx(10)


def test_degradation_and_underfitting():
    # experts: 0, 1 shared; 2 owned by task 0; 3 owned by task 1
    owner = np.array([-1, -1, 0, 1])
    gates = np.zeros((2, 10, 4))
    gates[0, :, [0, 2]] = 0.5  # task 0: half shared expert 0, half its own
    gates[1, :, 1] = 0.9  # task 1 leans on shared expert 1 only
    gates[1, :, 3] = 0.1
    deg = shared_expert_degradation(gates, owner == -1)
    np.testing.assert_allclose(deg.degradation_S, [1, 1])  # each shared expert serves one task
    assert deg.dominant_task_S.tolist() == [0, 1] and deg.degraded_S.all()
    under = task_underfitting(gates, owner, sparse_T=np.array([False, True]))
    np.testing.assert_allclose(under.lean_T, [0.5, 0.9])
    assert under.underfit_T.tolist() == [False, True]
    ref_deg, ref_lean = multitask_reference(gates, owner)
    np.testing.assert_allclose(deg.degradation_S, ref_deg)
    np.testing.assert_allclose(under.lean_T, ref_lean)


def test_matches_reference_on_random_gates():
    rng = np.random.default_rng(1)
    gates = rng.dirichlet(np.ones(6), size=(3, 40))
    owner = np.array([-1, -1, 0, 1, 2, 2])
    ref_deg, ref_lean = multitask_reference(gates, owner)
    np.testing.assert_allclose(shared_expert_degradation(gates, owner == -1).degradation_S, ref_deg)
    np.testing.assert_allclose(task_underfitting(gates, owner).lean_T, ref_lean)


def test_bad_input():
    with pytest.raises(EmptySelectionError, match="no shared expert"):
        shared_expert_degradation(np.ones((2, 3, 4)), np.zeros(4, bool))
    with pytest.raises(ValueError, match="shared_E has shape"):
        shared_expert_degradation(np.ones((2, 3, 4)), np.zeros(3, bool))
    with pytest.raises(ValueError, match="owner_E"):
        task_underfitting(np.ones((2, 3, 4)), np.array([-1, 0, 1, 5]))
    with pytest.raises(ValueError, match="hidden_NEF"):
        expert_collapse(np.ones((2, 3, 4)), np.ones((2, 4, 4)))
