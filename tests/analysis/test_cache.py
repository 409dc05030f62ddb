import numpy as np
import pytest

from moelab.analysis.cache import POLICIES, cache_hit_curve, cache_hit_curve_reference


@pytest.mark.parametrize("policy", POLICIES)
def test_stack_replay_matches_explicit_caches(random_ids, policy):
    rng = np.random.default_rng(sum(map(ord, policy)))
    for _ in range(4):
        num_experts = int(rng.integers(3, 8))
        ids = random_ids(rng, int(rng.integers(10, 40)), num_experts, int(rng.integers(1, 4)), drop=0.1)
        seq = np.sort(rng.integers(0, 3, len(ids)))
        seg_len = int(rng.integers(1, 6))
        fast = cache_hit_curve(ids, num_experts, policy, seg_len, seq)
        np.testing.assert_allclose(fast.hit_rate_C, cache_hit_curve_reference(ids, num_experts, policy, seg_len, seq))
        assert fast.hit_rate_C[-1] == pytest.approx(1)


@pytest.mark.parametrize("policy", POLICIES)
def test_repeated_expert_set(policy):
    # every token needs the same 3 experts: a cache of C >= 3 always hits, C < 3 hits C of 3
    curve = cache_hit_curve(np.tile([2, 6, 4], (50, 1)), 8, policy, seg_len=4).hit_rate_C
    np.testing.assert_allclose(curve, [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1])


def test_lru_on_uniformly_random_trace(random_ids):
    # requests independent of the cache content: each slot hits with probability C / E
    ids = random_ids(np.random.default_rng(0), 20_000, 16, 2)
    curve = cache_hit_curve(ids, 16, "lru", seq_ids_N=np.repeat(np.arange(20), 1000)).hit_rate_C
    np.testing.assert_allclose(curve, np.arange(1, 17) / 16, atol=0.015)


def test_look_ahead_beats_lru_on_random_trace(random_ids):
    ids = random_ids(np.random.default_rng(1), 5_000, 16, 2)
    seq = np.repeat(np.arange(10), 500)
    lru = cache_hit_curve(ids, 16, "lru", seq_ids_N=seq).hit_rate_C
    lrc = cache_hit_curve(ids, 16, "lrc", 16, seq).hit_rate_C
    belady = cache_hit_curve(ids, 16, "belady", seq_ids_N=seq).hit_rate_C
    assert (lrc[1:-1] > lru[1:-1] + 0.02).all()
    assert (belady[1:-1] >= lrc[1:-1] - 1e-12).all()


def test_lru_thrashes_on_a_cycle():
    ids = (np.arange(30) % 3)[:, None]  # 0 1 2 0 1 2 ...
    curve = cache_hit_curve(ids, 3, "lru").hit_rate_C
    assert curve[1] == pytest.approx(2 / 30)  # only the two pre-filled first accesses hit
    assert cache_hit_curve(ids, 3, "belady").hit_rate_C[1] > 0.4


def test_sequence_stride_and_errors(random_ids):
    ids = random_ids(np.random.default_rng(2), 40, 6, 2)
    seq = np.repeat(np.arange(4), 10)
    every_other = cache_hit_curve(ids, 6, "lru", seq_ids_N=seq, sequence_stride=2)
    keep = np.isin(seq, [0, 2])
    np.testing.assert_allclose(every_other.hit_rate_C, cache_hit_curve(ids[keep], 6, "lru", seq_ids_N=seq[keep]).hit_rate_C)
    with pytest.raises(ValueError, match="policy must be one of"):
        cache_hit_curve(ids, 6, "fifo")
    with pytest.raises(ValueError, match="sequence_stride"):
        cache_hit_curve(ids, 6, sequence_stride=0)
