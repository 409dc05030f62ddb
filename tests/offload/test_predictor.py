"""ExpertFlow-style predictor: metrics by hand, a learnable synthetic task, the predictive cache."""

from __future__ import annotations

import pytest
import torch

from moelab.analysis.cache_policy import make_policy, replay
from moelab.compress.calib import Calibration
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.offload import min_budget_bytes, offload_model
from moelab.offload.predictor import (
    PredictorConfig,
    Routes,
    cache_hint,
    collect_routes,
    multi_hot,
    precision_recall,
    predicted_keys,
    predicted_scores,
    route_hints,
    route_steps,
    score_predictor,
    train_predictor,
)


def test_precision_recall_by_hand():
    pred = torch.tensor([[0, 1], [2, 3]])
    used = torch.tensor([[1, 0], [2, 5]])
    assert precision_recall(pred, used) == (0.75, 0.75)  # 3 right of 4 predicted, of 4 used
    # unequal sizes, an empty slot (-1) and a repeated id: 1 right of 3 predicted, of 1 used
    assert precision_recall(torch.tensor([[0, 1, 2]]), torch.tensor([[0, -1]])) == (1 / 3, 1.0)
    assert precision_recall(torch.tensor([[4, 4]]), torch.tensor([[4, 2]])) == (1.0, 0.5)
    assert multi_hot(torch.tensor([[2, -1]]), 3).tolist() == [[0.0, 0.0, 1.0]]
    with pytest.raises(MoelabError, match="2 predicted tokens vs 1 used"):
        precision_recall(pred, used[:1])


def _synthetic(T: int, seed: int, H: int = 16, E: int = 8, K: int = 2, seq_len: int = 50) -> Routes:
    """Layer 1's experts are top-K of a fixed linear map of layer 0's input; layer 0's experts of
    the next token are top-K of another map of this token's layer-0 input."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(2, H, E, generator=torch.Generator().manual_seed(99))
    x0 = torch.randn(T, H, generator=g)
    ids1 = (x0 @ maps[0]).topk(K, -1).indices
    ids0 = torch.empty(T, K, dtype=torch.int64)
    ids0[1:] = (x0[:-1] @ maps[1]).topk(K, -1).indices
    ids0[::seq_len] = torch.randint(0, E, (len(ids0[::seq_len]), K), generator=g)  # a sequence's first
    return Routes((0, 1), {0: x0, 1: torch.randn(T, H, generator=g)}, {0: ids0, 1: ids1},
                  {0: K, 1: K}, {0: E, 1: E}, seq_len)


def test_learns_a_known_function_of_the_hidden_state():
    train, test = _synthetic(3000, 0), _synthetic(1000, 1)
    p = train_predictor(train, PredictorConfig(horizon=1, next_token=True, steps=400))
    assert set(p.pairs) == {(0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1)}
    scores = {(s.src, s.target, s.method): s for s in score_predictor(p, test, train)}
    later, nxt = scores[(0, (1, 0), "predictor")], scores[(0, (0, 1), "predictor")]
    assert later.recall > 0.95 and later.precision > 0.95
    assert nxt.recall > 0.9
    # the baselines know nothing of the map; layer 1's input is noise for the next token's layer 0
    assert scores[(0, (1, 0), "frequent")].recall < 0.5 and scores[(0, (1, 0), "same")].recall < 0.5
    assert scores[(1, (0, 1), "predictor")].recall < 0.5


def test_bad_config_and_too_little_data():
    with pytest.raises(MoelabError, match="horizon"):
        PredictorConfig(horizon=0)
    with pytest.raises(MoelabError, match="hidden"):
        PredictorConfig(hidden=-1)
    one = _synthetic(20, 0)
    one = Routes((0,), {0: one.hidden[0]}, {0: one.ids[0]}, {0: 2}, {0: 8}, 50)
    with pytest.raises(MoelabError, match="one MoE layer"):
        train_predictor(one, PredictorConfig(steps=1))


def test_route_steps_and_hints_by_hand():
    r = _synthetic(4, 0)
    r = Routes(r.layers, r.hidden, {0: torch.tensor([[1, 1], [2, 0], [3, 4], [0, 1]]),
                                    1: torch.tensor([[5, -1], [6, 7], [7, 6], [0, 2]])}, r.top_k, r.num_experts, 50)
    steps = route_steps(r)
    assert steps[:4] == [[(0, 1)], [(1, 5)], [(0, 0), (0, 2)], [(1, 6), (1, 7)]] and len(steps) == 8
    p = train_predictor(_synthetic(200, 0), PredictorConfig(steps=5))
    hints = route_hints(p, r)
    assert hints[1] == [] and hints[0] == predicted_keys(p, 0, r.hidden[0][:1])
    assert len(hints[0]) == 2 and all(k[0] == 1 for k in hints[0])


def test_predictive_policy_keeps_the_hinted_key():
    steps = [["a"], ["b"], ["c"], ["a"]]
    assert replay(steps, 2, "lrfu").hits == 0 == replay(steps, 2, "predictive").hits  # no hint: LRFU
    hints = [None, None, ["a"], None]
    assert replay(steps, 2, "predictive", hints=hints).hits == 1  # b goes instead of a
    assert replay(steps, 2, "lrfu", hints=hints).hits == 0  # other policies ignore hints


def _scored_reference(steps, hints, capacity, half_life, crf_weight):
    """Hits of the scored predictive policy, the obvious way: CRF summed over each key's whole use
    history, the victim the resident key (not of this step, unless none is left) of the lowest
    ``score + crf_weight * CRF``, then the earliest last use."""
    resident, uses, order, hits = [], [], [], 0

    def keep(k, t):
        crf = sum(2.0 ** (-(t - s) / half_life) for key, s in uses if key == k)
        last = max(i for i, key in enumerate(order) if key == k)
        return (score.get(k, 0.0) + crf_weight * crf, last)

    score = {}
    for t, keys in enumerate(steps):
        score = hints[t] if hints[t] is not None else score
        hits += sum(k in resident for k in keys)
        for k in keys:
            if k not in resident:
                if len(resident) == capacity:
                    pool = [y for y in resident if y not in keys] or resident
                    resident.remove(min(pool, key=lambda y: keep(y, t)))
                resident.append(k)
            uses.append((k, t))
            order.append(k)
    return hits


@pytest.mark.parametrize("seed", range(4))
def test_scored_predictive_policy_matches_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    steps = [torch.randint(0, 10, (3,), generator=g).unique().tolist() for _ in range(120)]
    hints = [None if torch.rand(1, generator=g) < 0.3 else
             {int(k): float(v) for k, v in zip(torch.randperm(10, generator=g)[:6], torch.rand(6, generator=g), strict=True)}
             for _ in steps]  # the 4 keys left out score 0
    for half_life, w in ((1.0, 0.3), (1.0, 0.0), (4.0, 5.0)):  # half-life 1: the CRFs are exact
        got = replay(steps, 4, "predictive", hints=hints, half_life=half_life, crf_weight=w).hits
        assert got == _scored_reference(steps, hints, 4, half_life, w)
    with pytest.raises(ValueError, match="crf_weight"):
        make_policy("predictive", crf_weight=-1)


def test_scored_hint_keeps_the_likely_key_and_a_set_hint_still_works():
    steps = [["a"], ["b"], ["c"], ["a"]]
    # at c, a is scored higher than b: b goes, a hits; the other way round a goes
    assert replay(steps, 2, "predictive", hints=[None, None, {"a": 0.9, "b": 0.1}, None]).hits == 1
    assert replay(steps, 2, "predictive", hints=[None, None, {"a": 0.1, "b": 0.9}, None]).hits == 0
    # a set hint after a scored one falls back to "hinted first, then LRFU"
    assert replay(steps, 2, "predictive", hints=[{"b": 1.0}, None, ["a"], None]).hits == 1


def test_tokens_ahead_heads_and_scores_by_hand():
    train = _synthetic(400, 0)
    p = train_predictor(train, PredictorConfig(horizon=1, next_token=True, tokens_ahead=2, steps=5,
                                               hint="scores", score_discount=0.25))
    # every step of the next 2 tokens up to the source layer: 2 occurrences of each layer
    assert set(p.pairs) == {(0, 1, 0), (0, 0, 1), (0, 1, 1), (0, 0, 2),
                            (1, 0, 1), (1, 1, 1), (1, 0, 2), (1, 1, 2)}
    x = train.hidden[0][:1]
    got = predicted_scores(p, 0, x)
    sig = {t: torch.sigmoid(p.logits(0, x, t))[0] for t in p.targets(0)}
    assert got[(1, 3)] == pytest.approx(float(sig[(1, 0)][3] + 0.25 * sig[(1, 1)][3]))
    assert got[(0, 5)] == pytest.approx(float(sig[(0, 1)][5] + 0.25 * sig[(0, 2)][5]))
    assert len(got) == 16 and cache_hint(p, 0, x) == got
    x2 = train.hidden[0][:2]  # two tokens: the probability that either uses the key
    s2 = {t: torch.sigmoid(p.logits(0, x2, t)) for t in p.targets(0)}
    either = [1 - (1 - s2[t][0, 3]) * (1 - s2[t][1, 3]) for t in ((1, 0), (1, 1))]
    assert predicted_scores(p, 0, x2)[(1, 3)] == pytest.approx(float(either[0] + 0.25 * either[1]))
    assert route_hints(p, train.select(slice(0, 2)))[0] == got
    scores = {(s.src, s.target, s.method) for s in score_predictor(p, train, train)}
    assert (0, (0, 2), "same") in scores  # two tokens ahead: the same ids, 2 tokens later
    for bad in (dict(hint="sets"), dict(score_discount=0.0), dict(tokens_ahead=0)):
        with pytest.raises(MoelabError, match=next(iter(bad))):
            PredictorConfig(**bad)


def _tiny_predictor(view, hint="keys"):
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(3))
    calib = Calibration(list(ids.split(2)), [None] * 4, ids.numel(), 0)
    return train_predictor(collect_routes(view, calib), PredictorConfig(
        horizon=2, next_token=True, steps=50, hint=hint, tokens_ahead=1 if hint == "keys" else 2))


@pytest.mark.parametrize(("family", "hint"), [("Qwen3-MoE", "keys"), ("Mixtral", "keys"),
                                              ("Qwen3-MoE", "scores"), ("GPT-OSS", "scores")])
def test_predictive_runtime_is_exact_and_its_hits_equal_the_replay(tiny_dirs, family, hint):
    path = tiny_dirs[family]
    resident = open_model(path, experts_implementation="moelab")
    predictor = _tiny_predictor(resident, hint)
    _, probe = offload_model(path, budget=1.0)
    size, budget = probe.store.expert_bytes, 2 * min_budget_bytes(probe.store, probe.view)
    probe.close()
    with pytest.raises(MoelabError, match="needs predictor="):
        offload_model(path, budget=budget, policy="predictive")
    model, experts = offload_model(path, budget=budget, policy="predictive", predictor=predictor)
    steps, hints = [], []

    def hook(ev):  # registered after the cache's hint hook: sees the same block input
        steps.append([(ev.block.layer, int(e)) for e in ev.ids_TK.unique().tolist()])
        hints.append(cache_hint(predictor, ev.block.layer, ev.hidden_TH))

    handles = [b.register_routing_hook(hook) for b in experts.view.blocks]
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t in range(1, ids.shape[1]):  # growing prefixes (NOTE: from 2 tokens, see the report)
            assert torch.equal(model(ids[:, :t + 1]).logits, resident.model(ids[:, :t + 1]).logits)
    for h in handles:
        h.remove()
    s = experts.stats()
    sim = replay(steps, budget, "predictive", size=lambda k: size(k[0]), hints=hints,
                 half_life=8 * len(experts.view.blocks))
    assert (s.hits, s.misses) == (sim.hits, sim.misses) and s.peak_resident_bytes <= budget
    assert any(hints) and all(isinstance(h, dict) == (hint == "scores") for h in hints)
    experts.close()


def test_prefetch_with_the_predictor_is_exact(tiny_dirs):
    path = tiny_dirs["Qwen3-MoE"]
    resident = open_model(path, experts_implementation="moelab")
    predictor = _tiny_predictor(resident)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(6))
    with offload_model(path, budget=0.5, prefetch=True, predictor=predictor)[1] as experts:
        with torch.no_grad():
            assert torch.equal(experts.view.model.generate(ids, max_new_tokens=6, do_sample=False),
                               resident.model.generate(ids, max_new_tokens=6, do_sample=False))
        assert experts.stats().prefetched > 0 and experts.prefetcher.quality.predicted > 0


def test_hint_extra_names_more_experts():
    train = _synthetic(300, 0)
    base = train_predictor(train, PredictorConfig(steps=20))
    wide = train_predictor(train, PredictorConfig(steps=20, hint_extra=3))
    x = train.hidden[0][:1]
    narrow, more = predicted_keys(base, 0, x), predicted_keys(wide, 0, x)
    assert len(narrow) == 2 and len(more) == 5 and set(narrow) <= set(more)  # same heads (same seed)
    assert wide.predict(0, x, (1, 0), extra=100).shape == (1, 8)  # capped at E
