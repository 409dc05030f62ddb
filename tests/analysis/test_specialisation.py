import numpy as np
import pytest

from moelab.analysis._inputs import EmptySelectionError, MissingFieldError, MissingLabelsError
from moelab.analysis.npmi import npmi, npmi_reference, top_experts
from moelab.analysis.specialisation import (
    domain_specialisation,
    domain_specialisation_reference,
    token_entropy_reference,
    vocabulary_specialisation,
)


@pytest.mark.parametrize("seed", range(3))
def test_domain_matches_reference(random_ids, seed):
    rng = np.random.default_rng(seed)
    ids = random_ids(rng, 120, 6, 2, drop=0.1)
    labels = rng.integers(0, 3, 120)
    fast = domain_specialisation(ids, labels, 6, ["a", "b", "c"])
    kl, mx = domain_specialisation_reference(ids, labels, 6, 3)
    np.testing.assert_allclose(fast.kl_E, kl, rtol=1e-12)
    np.testing.assert_allclose(fast.max_share_E, mx, rtol=1e-12)


def test_domain_closed_forms(random_ids):
    # labels 0/1 with prior 1/2; expert 0 serves only label 0, expert 1 only label 1 -> KL = ln 2
    labels = np.repeat([0, 1], 50)
    ids = np.where(labels == 0, 0, 1)[:, None]
    spec = domain_specialisation(ids, labels, 3, ["code", "prose"])
    np.testing.assert_allclose(spec.kl_E[:2], np.log(2))
    np.testing.assert_allclose(spec.max_share_E[:2], 1)
    assert spec.top_label_E.tolist() == [0, 1, -1] and np.isnan(spec.kl_E[2])
    np.testing.assert_allclose(spec.lift_DE[:, 0], [2, 0])
    # routing independent of the label: KL ~ 0
    rng = np.random.default_rng(0)
    indep = domain_specialisation(random_ids(rng, 50_000, 8, 2), rng.integers(0, 4, 50_000), 8)
    assert indep.kl_E.max() < 2e-3


def test_vocabulary_closed_forms(random_ids):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, 4000)
    # hash routing: token v always goes to experts {v % 8, (v + 1) % 8} -> H(v) = ln 2
    ids = np.stack([tokens % 8, (tokens + 1) % 8], axis=1)
    vocab = vocabulary_specialisation(ids, tokens, 8, vocab_size=25, top=3)
    np.testing.assert_allclose(vocab.mean_token_entropy, np.log(2))
    assert np.isnan(vocab.token_entropy_V[20:]).all()  # unseen ids
    assert set(vocab.top_tokens_ER[0]) <= {0, 8, 16, 7, 15}  # tokens that hash to expert 0
    np.testing.assert_allclose(vocab.top_precision_ER[:, 0], 0.5)  # each token id splits over 2 experts
    # routing that ignores the token: H(v) -> ln E
    rand = vocabulary_specialisation(random_ids(rng, 40_000, 8, 2), rng.integers(0, 10, 40_000), 8)
    assert rand.mean_token_entropy == pytest.approx(np.log(8), abs=5e-3)
    v = 3
    assert vocab.token_entropy_V[v] == pytest.approx(token_entropy_reference(ids, tokens, v))


def test_vocabulary_top_tokens_sorted():
    tokens = np.array([5] * 6 + [2] * 4 + [9] * 1)
    vocab = vocabulary_specialisation(np.zeros((11, 1), int), tokens, 2, top=4, min_count=1)
    assert vocab.top_tokens_ER[0].tolist() == [5, 2, 9, -1]
    np.testing.assert_allclose(vocab.top_share_ER[0, :3], [6 / 11, 4 / 11, 1 / 11])


@pytest.mark.parametrize("seed", range(3))
def test_npmi_matches_reference(random_ids, seed):
    rng = np.random.default_rng(seed)
    ids = random_ids(rng, 200, 6, 2, drop=0.1)
    labels = rng.integers(0, 3, 200)
    fast = npmi(ids, labels, 6)
    for d in range(3):
        for e in range(6):
            assert fast[d, e] == pytest.approx(npmi_reference(ids, labels == d, e), abs=1e-12)


def test_npmi_closed_forms(random_ids):
    think = np.array([True] * 10 + [False] * 30)
    ids = np.where(think, 3, 0)[:, None]  # expert 3 fires exactly on the class, expert 0 never does
    score = npmi(ids, think, 4)[0]
    assert score[3] == pytest.approx(1) and score[0] == pytest.approx(-1)
    assert top_experts(score, 1).tolist() == [[3]]
    rng = np.random.default_rng(0)
    indep = npmi(random_ids(rng, 100_000, 8, 2), rng.random(100_000) < 0.3, 8)
    assert np.abs(indep).max() < 0.01


def test_bad_input(random_ids):
    ids = np.zeros((5, 1), int)
    with pytest.raises(MissingLabelsError):
        domain_specialisation(ids, None, 2)
    with pytest.raises(MissingLabelsError):
        npmi(ids, None, 2)
    with pytest.raises(MissingFieldError, match="token_ids"):
        vocabulary_specialisation(ids, None, 2)
    with pytest.raises(EmptySelectionError, match="min_count"):
        vocabulary_specialisation(ids, np.arange(5), 2, min_count=2)
    with pytest.raises(ValueError, match="vocab_size"):
        vocabulary_specialisation(ids, np.arange(5), 2, vocab_size=3)
