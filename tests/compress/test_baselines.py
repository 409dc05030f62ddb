"""Pruning baselines, expert statistics and budgets: against slow loops over the routing, seeded."""

from __future__ import annotations

import warnings

import pytest
import torch

from moelab.compress.apply import CompressWarning, apply_plan
from moelab.compress.baselines import plan_frequency, plan_random, plan_weighted_frequency
from moelab.compress.calib import Calibration, routing_pass
from moelab.compress.registry import get_planner
from moelab.compress.simulate import keep_sets, masked_logits
from moelab.compress.spec import CompressSpec, select_experts
from moelab.compress.stats import expert_statistics
from moelab.errors import MoelabError
from moelab.models import expert_forward, open_model


def _calib(seed: int = 0, batches: int = 2) -> Calibration:
    gen = torch.Generator().manual_seed(seed)
    bs = [torch.randint(0, 64, (2, 16), generator=gen) for _ in range(batches)]
    return Calibration(bs, [None] * (2 * batches), 32 * batches, seed)


def _loop_stats(view, calib):
    """Slow reference: per token, per chosen expert, with float64 expert outputs."""
    seen = {b.layer: [] for b in view.blocks}
    routing_pass(view, calib, lambda ev: seen[ev.block.layer].append(ev))
    out = {}
    for b in view.blocks:
        E = b.num_experts
        count, gsum, reap = [0.0] * E, [0.0] * E, [0.0] * E
        for ev in seen[b.layer]:
            for t in range(ev.ids_TK.shape[0]):
                w = ev.weights_TK[t].double()
                for k in range(ev.ids_TK.shape[1]):
                    e = int(ev.ids_TK[t, k])
                    g = float(w[k] / b.routed_scaling_factor)  # the block's own gate (stats docstring)
                    x = ev.hidden_TH[t:t + 1].double()
                    if b.combine == "input":
                        x = x * float(ev.weights_TK[t, k])
                    y = expert_forward(b, e, x)
                    count[e] += 1
                    gsum[e] += g
                    reap[e] += g * float(y.norm())
        f64 = torch.float64
        out[b.layer] = (torch.tensor(count, dtype=f64), torch.tensor(gsum, dtype=f64),
                        torch.tensor([r / c if c else 0.0 for r, c in zip(reap, count, strict=True)], dtype=f64))
    return out


@pytest.mark.parametrize("family", ["Mixtral", "DeepSeek-V3", "Llama4", "GPT-OSS", "Qwen2-MoE"])
def test_statistics_match_a_token_loop(family, strong_model):
    view = open_model(strong_model(family))
    calib = _calib()
    stats = expert_statistics(view, calib)
    ref = _loop_stats(view, calib)
    for layer, (count, gsum, reap) in ref.items():
        s = stats[layer]
        assert torch.equal(s.count_E, count)
        assert s.tokens == 64 and s.count_E.sum() == 64 * view.block(layer).top_k
        torch.testing.assert_close(s.gate_sum_E, gsum, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(s.reap_E, reap, rtol=1e-5, atol=1e-9)  # norms are float32


def test_frequency_keeps_the_most_routed(strong_model):
    view = open_model(strong_model("OLMoE"))
    calib = _calib()
    spec = CompressSpec(ratio=0.5)
    plan = plan_frequency(view, calib, spec)
    stats = expert_statistics(view, calib, norms=False)
    for layer, lp in plan.layers.items():
        kept = lp.sources()
        dropped = [e for e in range(8) if e not in kept]
        assert len(kept) == 4 and kept == sorted(kept)
        assert stats[layer].count_E[kept].min() >= stats[layer].count_E[dropped].max()
    wplan = plan_weighted_frequency(view, calib, spec)
    for layer, lp in wplan.layers.items():
        g = stats[layer].gate_sum_E
        dropped = [e for e in range(8) if e not in lp.sources()]
        assert g[lp.sources()].min() >= g[dropped].max()


def test_plans_are_deterministic_under_seed(strong_model):
    view = open_model(strong_model("Qwen3-MoE"))
    spec = CompressSpec(ratio=0.5, seed=3)
    a, b = plan_random(view, None, spec), plan_random(view, None, spec)
    assert keep_sets(a) == keep_sets(b)
    others = {str(keep_sets(plan_random(view, None, CompressSpec(ratio=0.5, seed=s)))) for s in range(6)}
    assert len(others) > 1  # the seed matters
    calib = _calib(seed=1)
    assert keep_sets(plan_frequency(view, calib, spec)) == keep_sets(plan_frequency(view, _calib(seed=1), spec))


def test_layer_and_global_budgets():
    scores = {0: torch.tensor([4.0, 3.0, 2.0, 1.0]), 1: torch.tensor([1.0, 1.0, 1.0, 9.0])}
    assert select_experts(scores, CompressSpec(ratio=0.5)) == {0: [0, 1], 1: [0, 3]}  # tie: lower index
    glob = select_experts(scores, CompressSpec(ratio=0.5, budget="global"))
    # relative scores: layer 0 [1.6, 1.2, .8, .4], layer 1 [1/3, 1/3, 1/3, 3]: remove the 4 lowest
    assert glob == {0: [0, 1, 2], 1: [3]}
    assert sum(map(len, glob.values())) == 4
    floor = select_experts({0: torch.tensor([1.0, 1.0]), 1: torch.tensor([1.0, 100.0])},
                           CompressSpec(ratio=0.5, budget="global", min_keep=1))
    assert all(len(v) >= 1 for v in floor.values())
    with pytest.raises(MoelabError, match="finite"):
        select_experts({0: torch.tensor([1.0, float("nan")])}, CompressSpec(ratio=0.5))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "half"])
def test_ratio_outside_range_is_refused(ratio):
    with pytest.raises(MoelabError, match="ratio"):
        CompressSpec(ratio=ratio)


def test_prune_below_top_k_clamps_with_warning(strong_model):
    model = strong_model("Mixtral")  # 4 experts, top-2
    view = open_model(model)
    plan = plan_random(view, None, CompressSpec(ratio=0.9))
    assert all(lp.num_experts == 1 for lp in plan.layers.values())
    assert "fewer than top_k" in plan.meta["note"]
    with pytest.warns(CompressWarning, match="top_k clamped from 2 to 1"):
        new = apply_plan(model, plan)
    assert new.config.num_experts_per_tok == 1


def test_registry_and_missing_calibration(strong_model):
    view = open_model(strong_model("Mixtral"))
    for name in ("random", "frequency", "weighted-frequency", "reap"):
        kind, fn, needs = get_planner(name)
        assert kind == "prune" and needs == (name != "random")
        if needs:
            with pytest.raises(MoelabError, match="calib"):
                fn(view, None, CompressSpec(ratio=0.5))


def test_frequency_plan_applies_like_the_mask(strong_model, input_ids):
    model = strong_model("Qwen2-MoE")
    view = open_model(model)
    plan = plan_frequency(view, _calib(), CompressSpec(ratio=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompressWarning)
        new = apply_plan(model, plan)
    with torch.no_grad(), masked_logits(view, keep_sets(plan)):
        ref = model(input_ids=input_ids).logits
    torch.testing.assert_close(new(input_ids=input_ids).logits, ref, rtol=1e-6, atol=1e-7)


def test_calibration_in_another_tokenizers_ids_is_refused(strong_model):
    from moelab.compress.calib import calibration_batches

    view = open_model(strong_model("Mixtral"))  # vocabulary of 64
    with pytest.raises(MoelabError, match=r"ids must lie in \[0, 64\)"):
        calibration_batches(view, [[1, 2, 3, 99] * 20], tokens=32, seq_len=16)
