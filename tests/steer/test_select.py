"""Expert selection beyond the risk difference: the log odds ratio against a slow per-expert
reference on random routing, and the greedy calibrated selection against a plain re-implementation
of its definition on a tiny model; bad input gets named errors.

Tolerances: 1e-12 absolute for the log odds statistics; the greedy's losses are recomputed with the
same forwards, so its choices must match exactly and its ratios to 1e-12.
"""

import math

import numpy as np
import pytest
import torch

from moelab.analysis.expert_zeroing import next_token_loss
from moelab.errors import MoelabError
from moelab.models.tiny import tiny_view
from moelab.steer import experts_off
from moelab.steer.detect import Detection, ExpertScore, gather_pair, rank_risk_difference
from moelab.steer.select import (
    GreedyConfig,
    calibration_pair,
    greedy_select,
    log_odds_ratio,
    log_odds_reference,
    rank_log_odds,
)


def test_log_odds_equals_the_slow_reference_on_random_routing(random_routed):
    rng = np.random.default_rng(0)
    pos = random_routed(rng, 300, bias=[6, 1, 1, 1, 1, 0.05])
    neg = random_routed(rng, 200, bias=[1, 1, 1, 1, 1, 3])
    det = rank_log_odds(pos, neg)
    assert det.method == "log-odds" and len(det.rows) == 12
    assert [r.score for r in det.rows] == sorted((r.score for r in det.rows), reverse=True)
    for r in det.rows:
        want = log_odds_reference(pos.ids[r.layer].tolist(), neg.ids[r.layer].tolist(), r.expert)
        assert np.allclose([r.score, r.z, r.ci_low, r.ci_high], want, rtol=0, atol=1e-12), r
        assert r.ci_low < r.score < r.ci_high
    assert det.rows[0].expert == 0 and det.rows[-1].expert == 5


def test_log_odds_ranks_a_rare_negative_rate_above_a_larger_difference():
    # expert 0: 45 % vs 15 % (RD 0.30); expert 1: 30 % vs 1 % (RD 0.29): the odds ratio prefers 1
    a1, a2 = np.array([45, 30]), np.array([15, 1])
    s = log_odds_ratio(a1, 100, a2, 100)
    assert s["lor"][1] > s["lor"][0] and (a1 - a2)[0] > (a1 - a2)[1]
    empty = log_odds_ratio(np.array([0, 100]), 100, np.array([0, 0]), 100)  # empty cells stay finite
    assert np.isfinite(empty["lor"]).all() and empty["lor"][0] == 0


def test_log_odds_bad_counts_are_named():
    with pytest.raises(MoelabError, match="log odds ratio: both corpora need tokens"):
        log_odds_ratio(np.array([1]), 0, np.array([1]), 5)
    with pytest.raises(MoelabError, match=r"counts must lie in \[0, n\]"):
        log_odds_ratio(np.array([6]), 5, np.array([1]), 5)


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 0.9}, "budget: expected a perplexity ratio >= 1"),
    ({"budget": float("nan")}, "budget: expected"),
    ({"max_experts": 0}, "max_experts: expected a positive integer"),
    ({"max_per_layer": True}, "max_per_layer: expected a positive integer"),
    ({"pool": None}, "pool: expected a positive integer"),
    ({"eps": 0.0}, "eps: expected a number > 0"),
])
def test_greedy_config_names_bad_values(kwargs, match):
    with pytest.raises(MoelabError, match=match):
        GreedyConfig(**kwargs)


@pytest.fixture(scope="module")
def view():
    return tiny_view("Qwen3-MoE")


def _batches(seed, n=2, length=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (n, length), generator=g)]


def _detection(view, seed=0):
    """A detection over random tokens, with every expert scored positive (a candidate) in some order."""
    rows = [ExpertScore(b.layer, e, 0.5, 0.1, float(np.random.default_rng(seed + e + 10 * b.layer).random()) + 0.1,
                        1.0, 0.0, 1.0) for b in view.blocks for e in range(b.num_experts)]
    rows.sort(key=lambda r: -r.score)
    return Detection("test", rows, {b.layer: b.num_experts for b in view.blocks},
                     {b.layer: b.top_k for b in view.blocks}, {})


def _reference_greedy(view, det, pos, neg, budget, eps, max_per_layer=None):
    """The module docstring's loop, written out plainly: every open candidate measured every step."""
    def loss(batches, chosen):
        sel = {}
        for layer, e in chosen:
            sel.setdefault(layer, []).append(e)
        if not sel:
            return next_token_loss(view.model, batches)
        with experts_off(view, sel):
            return next_token_loss(view.model, batches)

    base_neg = loss(neg, [])
    chosen = []
    while True:
        now_p, now_n = loss(pos, chosen), loss(neg, chosen)
        best = None
        for r in det.rows:
            c = (r.layer, r.expert)
            taken = sum(1 for layer, _ in chosen if layer == r.layer)
            room = det.num_experts[r.layer] - det.top_k[r.layer]
            if max_per_layer is not None:
                room = min(room, max_per_layer)
            if r.score <= 0 or c in chosen or taken >= room:
                continue
            lp, ln_ = loss(pos, chosen + [c]), loss(neg, chosen + [c])
            ratio = (lp - now_p) / max(ln_ - now_n, eps)
            if ln_ - base_neg <= math.log(budget) and lp > now_p and (best is None or ratio > best[0]):
                best = (ratio, c)
        if best is None:
            return chosen
        chosen.append(best[1])


@pytest.mark.parametrize("overlap, budget, max_per_layer, stopped", [
    (False, 1.0001, None, "no gain"),  # unrelated texts: the gains run out first
    (True, 1.00005, None, "budget"),  # the negative side holds half the positive text: the budget binds
    (False, 1.2, 1, "no candidate left"),  # one expert per layer
])
def test_greedy_equals_the_plain_definition(view, overlap, budget, max_per_layer, stopped):
    det = _detection(view)
    pos, neg = _batches(0), _batches(1)
    if overlap:
        neg = [torch.cat([pos[0][:1], neg[0][:1]])]
    # eps far below this random model's loss steps (~1e-4 nats), so the cost, not only the gain, decides
    got = greedy_select(view, det, pos, neg, GreedyConfig(budget=budget, eps=1e-7, max_per_layer=max_per_layer))
    want = _reference_greedy(view, det, pos, neg, budget, 1e-7, max_per_layer)
    assert [(s.layer, s.expert) for s in got.steps] == want and len(want) >= 2
    assert got.stopped == stopped
    base_p, base_n = next_token_loss(view.model, pos), next_token_loss(view.model, neg)
    for n, step in enumerate(got.steps, 1):  # each step's ratios are the prefix's measured ratios
        with experts_off(view, got.prefix(n)):
            rp, rn = math.exp(next_token_loss(view.model, pos) - base_p), math.exp(next_token_loss(view.model, neg) - base_n)
        assert math.isclose(step.ratio_pos, rp, rel_tol=0, abs_tol=1e-12)
        assert math.isclose(step.ratio_neg, rn, rel_tol=0, abs_tol=1e-12) and rn <= budget
    if max_per_layer:
        assert all(len(v) <= max_per_layer for v in got.experts.values())
    assert got.experts == got.prefix(len(got.steps))


def test_greedy_stops_at_max_experts_and_names_bad_input(view):
    det = _detection(view)
    pos, neg = _batches(0), _batches(1)
    got = greedy_select(view, det, pos, neg, GreedyConfig(budget=10.0, max_experts=2))
    assert len(got.steps) == 2 and got.stopped == "max_experts"
    with pytest.raises(MoelabError, match="calibration: both sides need at least one batch"):
        greedy_select(view, det, [], neg)
    flat = Detection("risk-diff", [ExpertScore(r.layer, r.expert, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0) for r in det.rows],
                     det.num_experts, det.top_k, {})
    with pytest.raises(MoelabError, match="risk-diff: no expert has a positive score"):
        greedy_select(view, flat, pos, neg)
    with pytest.raises(MoelabError, match=r"no expert fits the budget \(negative perplexity x1\)"):
        greedy_select(view, det, pos, pos, GreedyConfig(budget=1.0, eps=1e-3))  # same text: no gain within 1.0


def test_calibration_pair_needs_corpus_paths(view, tmp_path):
    with pytest.raises(MoelabError, match="positive: the greedy selection calibrates on text"):
        calibration_pair(view, [[1, 2, 3]], tmp_path)
    with pytest.raises(MoelabError, match="positive: .*missing.txt"):
        calibration_pair(view, tmp_path / "missing.txt", tmp_path, seq_len=8, tokens=16)


def test_rank_log_odds_on_live_routing_agrees_in_sign_with_the_risk_difference(view):
    pos, neg = gather_pair(view, [b.tolist() for b in _batches(0, 4)[0]], [b.tolist() for b in _batches(1, 4)[0]])
    lo, rd = rank_log_odds(pos, neg), rank_risk_difference(pos, neg)
    by = {(r.layer, r.expert): r.score for r in rd.rows}
    assert all(np.sign(r.score) == np.sign(by[(r.layer, r.expert)]) for r in lo.rows)


def test_detect_experts_takes_the_log_odds_score(view):
    from moelab.steer.detect import detect_experts

    pos, neg = [b.tolist() for b in _batches(0, 4)[0]], [b.tolist() for b in _batches(1, 4)[0]]
    det = detect_experts(view, pos, neg, score="log-odds")
    assert det.method == "log-odds" and det.rows == rank_log_odds(*gather_pair(view, pos, neg)).rows
    with pytest.raises(MoelabError, match="score: expected one of risk-diff, log-odds, got 'odds'"):
        detect_experts(view, pos, neg, score="odds")
