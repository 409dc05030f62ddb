"""ExpertFlow-style predictor: metrics by hand, a learnable synthetic task, the predictive cache."""

from __future__ import annotations

import pytest
import torch

from moelab.analysis.cache_policy import replay
from moelab.compress.calib import Calibration
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.offload import min_budget_bytes, offload_model
from moelab.offload.predictor import (
    PredictorConfig,
    Routes,
    collect_routes,
    multi_hot,
    precision_recall,
    predicted_keys,
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


def _tiny_predictor(view):
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(3))
    calib = Calibration(list(ids.split(2)), [None] * 4, ids.numel(), 0)
    return train_predictor(collect_routes(view, calib), PredictorConfig(horizon=2, next_token=True, steps=50))


@pytest.mark.parametrize("family", ["Qwen3-MoE", "Mixtral"])
def test_predictive_runtime_is_exact_and_its_hits_equal_the_replay(tiny_dirs, family):
    path = tiny_dirs[family]
    resident = open_model(path, experts_implementation="moelab")
    predictor = _tiny_predictor(resident)
    _, probe = offload_model(path, budget=1.0)
    size, budget = probe.store.expert_bytes, 2 * min_budget_bytes(probe.store, probe.view)
    probe.close()
    with pytest.raises(MoelabError, match="needs predictor="):
        offload_model(path, budget=budget, policy="predictive")
    model, experts = offload_model(path, budget=budget, policy="predictive", predictor=predictor)
    steps, hints = [], []

    def hook(ev):  # registered after the cache's hint hook: sees the same block input
        steps.append([(ev.block.layer, int(e)) for e in ev.ids_TK.unique().tolist()])
        hints.append(predicted_keys(predictor, ev.block.layer, ev.hidden_TH))

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
    assert any(hints)
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
