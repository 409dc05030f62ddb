from math import comb

import numpy as np
import pytest

from moelab.analysis._inputs import EmptySelectionError
from moelab.analysis.consistency import segment_routing, segment_routing_reference


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference(random_ids, seed):
    rng = np.random.default_rng(seed)
    num_experts = int(rng.integers(3, 9))
    ids = random_ids(rng, 60, num_experts, min(3, num_experts), drop=0.1)
    seq = np.sort(rng.integers(0, 3, 60))
    for fast in segment_routing(ids, num_experts, (1, 2, 3, 5), seq):
        ref = segment_routing_reference(ids, num_experts, fast.seg_len, seq)
        assert fast.num_windows == ref.num_windows
        np.testing.assert_allclose(fast.f1_M, ref.f1_M, rtol=1e-12)
        np.testing.assert_allclose(fast.srp_E, ref.srp_E, rtol=1e-12)
        np.testing.assert_allclose(fast.activation_rate_E, ref.activation_rate_E, rtol=1e-12)
        assert (fast.srp, fast.best_threshold) == (ref.srp, ref.best_threshold)


def test_repeated_expert_set_is_perfectly_consistent():
    ids = np.tile([5, 1, 7], (100, 1))
    for r in segment_routing(ids, 8, (1, 4, 16)):
        assert r.srp == pytest.approx(1) and r.best_threshold == 1  # every tau >= 1 is perfect; first wins
        np.testing.assert_allclose(r.srp_E[[1, 5, 7]], 1)
        np.testing.assert_allclose(r.activation_rate_E[[1, 5, 7]], 1)


def test_single_token_windows_are_perfect(random_ids):
    ids = random_ids(np.random.default_rng(0), 500, 16, 4)
    assert segment_routing(ids, 16, (1,))[0].srp == pytest.approx(1)


def _expected_random_f1(m: int, p: float) -> np.ndarray:
    """F1(tau) when each token picks each expert independently with probability p = K/E:
    a window count c ~ Binomial(m, p); F1 = 2 E[c; c >= tau] / (m P(c >= tau) + m p)."""
    pmf = np.array([comb(m, c) * p**c * (1 - p) ** (m - c) for c in range(m + 1)])
    c = np.arange(m + 1)
    tail_c = np.cumsum((pmf * c)[::-1])[::-1]
    tail_p = np.cumsum(pmf[::-1])[::-1]
    return 2 * tail_c / (m * tail_p + m * p)


def test_uniformly_random_trace_closed_form(random_ids):
    ids = random_ids(np.random.default_rng(0), 100_000, 16, 4)
    for r in segment_routing(ids, 16, (4, 16)):
        expected = _expected_random_f1(r.seg_len, 4 / 16)
        np.testing.assert_allclose(r.f1_M, expected, atol=5e-3)
        assert r.srp == pytest.approx(expected.max(), abs=5e-3)


def test_windows_stay_inside_sequences():
    ids = np.arange(10)[:, None] % 4
    seq = np.repeat([0, 1], 5)
    assert segment_routing(ids, 4, (3,), seq)[0].num_windows == 6  # 3 per sequence of 5
    with pytest.raises(EmptySelectionError, match="no sequence has 6 tokens"):
        segment_routing(ids, 4, (6,), seq)
    with pytest.raises(ValueError, match="contiguous"):
        segment_routing(ids, 4, (2,), np.array([0, 1] * 5))
    with pytest.raises(ValueError, match="seg_lens"):
        segment_routing(ids, 4, (0,))
