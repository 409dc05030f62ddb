"""M-SMoE (moelab.compress.msmoe): routing statistics against slow references, grouping and merging.

Tolerances: float64 throughout; streamed statistics vs. the loop reference agree to rtol 1e-9; a merge of
experts identical up to a neuron permutation reproduces the original block to atol 1e-12.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moelab.compress.apply import apply_plan
from moelab.compress.calib import Calibration, expert_ffn, per_layer
from moelab.compress.msmoe import (
    RoutingStats,
    collect_stats,
    dominant_counts,
    group_experts,
    merge_layer,
    plan_msmoe,
    reference_routing_stats,
)
from moelab.compress.registry import get_planner
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import expert_forward, open_model, reference_forward, reference_route
from moelab.models.tiny import TINY_CONFIGS, tiny_view


def _calib(num_seqs: int = 4, seq_len: int = 12, seed: int = 0) -> Calibration:
    tokens_BS = torch.randint(0, 64, (num_seqs, seq_len), generator=torch.Generator().manual_seed(seed))
    return Calibration(list(tokens_BS.split(2)), [None] * num_seqs, num_seqs * seq_len, seed)


def test_streamed_stats_match_loop_reference():
    g = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(30, 5, generator=g, dtype=torch.float64)
    ids_TK = logits_TE.topk(2, dim=-1).indices
    stats = RoutingStats.empty(5)
    for part in (slice(0, 11), slice(11, 30)):  # streamed in two chunks
        stats.add(ids_TK[part], logits_TE[part])
    f_ref, sim_ref = reference_routing_stats(logits_TE, ids_TK)
    torch.testing.assert_close(stats.frequency(), f_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.logit_similarity(), sim_ref, rtol=1e-9, atol=1e-12)
    assert stats.tokens == 30 and abs(float(stats.frequency().sum()) - 1) < 1e-12


def test_collected_stats_match_reference_on_model():
    view = tiny_view("Qwen3-MoE")
    calib = _calib()
    stats, _ = collect_stats(view, calib)
    events = []
    handles = [b.register_routing_hook(events.append) for b in view.blocks]
    with torch.no_grad():
        for batch in calib.batches:
            view.model(input_ids=batch)
    for h in handles:
        h.remove()
    for b in view.blocks:
        evs = [ev for ev in events if ev.block.layer == b.layer]
        logits_TE = torch.cat([reference_route(b, ev.hidden_TH)[0] for ev in evs])
        f_ref, sim_ref = reference_routing_stats(logits_TE, torch.cat([ev.ids_TK for ev in evs]))
        torch.testing.assert_close(stats[b.layer].frequency(), f_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(stats[b.layer].logit_similarity(), sim_ref, rtol=1e-6, atol=1e-6)  # fp32 logits


def test_group_experts_hand_built():
    f_E = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    sim_EE = torch.tensor([[1.0, 0.2, 0.9, 0.5],
                           [0.2, 1.0, 0.3, 0.8],
                           [0.9, 0.3, 1.0, 0.4],
                           [0.5, 0.8, 0.4, 1.0]], dtype=torch.float64)
    assert group_experts(f_E, sim_EE, 2) == {1: [1, 3], 2: [2, 0]}
    assert group_experts(f_E, sim_EE, 4) == {0: [0], 1: [1], 2: [2], 3: [3]}
    assert group_experts(f_E, sim_EE, 1) == {1: [1, 0, 2, 3]}
    tie = torch.full((4, 4), 0.5, dtype=torch.float64)
    assert group_experts(f_E, tie, 2) == {1: [1, 0, 3], 2: [2]}  # equal similarity: the lower dominant
    with pytest.raises(MoelabError, match="num_groups"):
        group_experts(f_E, sim_EE, 0)


def test_dominant_counts_budgets():
    freqs = {0: torch.tensor([0.7, 0.1, 0.1, 0.1]), 1: torch.tensor([0.3, 0.3, 0.2, 0.2])}
    assert dominant_counts(freqs, CompressSpec(ratio=0.5)) == {0: 2, 1: 2}
    # global: total 4 dominants; layer 0's top is forced, then 0.3, 0.3, 0.2 (layer 1 before layer 0's 0.1)
    assert dominant_counts(freqs, CompressSpec(ratio=0.5, budget="global")) == {0: 1, 1: 3}
    freqs[1] = torch.tensor([0.97, 0.01, 0.01, 0.01])
    freqs[0] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    assert dominant_counts(freqs, CompressSpec(ratio=0.5, budget="global")) == {0: 3, 1: 1}


def test_merge_coefficients_follow_frequency():
    view = tiny_view("Mixtral")
    block = view.blocks[0]
    f_E = torch.tensor([0.5, 0.25, 0.0, 0.25], dtype=torch.float64)
    lp = merge_layer(block, {0: [0, 1, 3], 2: [2]}, f_E, align=False)
    assert lp.sources() == [0, 2]
    assert [m.expert for m in lp.experts[0].members] == [0, 1, 3]
    assert [m.coef for m in lp.experts[0].members] == [0.5, 0.25, 0.25]
    assert lp.experts[1].is_plain
    unused = merge_layer(block, {1: [1, 2]}, torch.zeros(4, dtype=torch.float64), align=False)
    assert [m.coef for m in unused.experts[0].members] == [0.5, 0.5]  # no usage: plain average


def test_ratio_zero_is_identity_plan():
    view = tiny_view("DeepSeek-V2")
    plan = plan_msmoe(view, _calib(), CompressSpec(ratio=0.0))
    for b in view.blocks:
        lp = plan.layers[b.layer]
        assert lp.is_pruning() and lp.sources() == list(range(b.num_experts))
    tokens = _calib(seed=9).batches[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = apply_plan(view, plan)
        torch.testing.assert_close(same(input_ids=tokens).logits, view.model(input_ids=tokens).logits,
                                   rtol=0, atol=0)


def _permuted_twin_model():
    """Mixtral, 8 experts, top-1: in every layer expert 1 is expert 0 with its neurons permuted, and its
    router row is 0.01 x expert 0's (router-logit cosine 1; chosen only when all 7 other logits are < 0)."""
    view = tiny_view("Mixtral", num_experts_per_tok=1, num_local_experts=8)
    perm_I = torch.randperm(view.blocks[0].intermediate_size, generator=torch.Generator().manual_seed(3))
    for b in view.blocks:
        b.gate[1].copy_(b.gate[0][perm_I])
        b.up[1].copy_(b.up[0][perm_I])
        b.down[1].copy_(b.down[0][:, perm_I])
        b.router_weight[1].copy_(0.01 * b.router_weight[0])
    return view, perm_I


def _merged_expert(block, out):
    """Test oracle of the plan semantics: sum_m c_m * (permuted member weights)."""
    gate = sum(m.coef * block.gate[m.expert][m.perm if m.perm is not None else slice(None)] for m in out.members)
    up = sum(m.coef * block.up[m.expert][m.perm if m.perm is not None else slice(None)] for m in out.members)
    down = sum(m.coef * block.down[m.expert][:, m.perm if m.perm is not None else slice(None)]
               for m in out.members)
    return gate, up, down


@pytest.mark.parametrize("similarity", ["router-logits", "weight", "output"])
def test_permuted_twins_merge_into_the_same_function(similarity):
    view, perm_I = _permuted_twin_model()
    b = view.blocks[0]
    plan = plan_msmoe(view, _calib(num_seqs=8), CompressSpec(ratio=0.125), similarity=similarity)
    assert [0, 1] in [g[:2] for g in plan.meta["groups"]["0"]] and [1] not in plan.meta["groups"]["0"]
    out = plan.layers[0].experts[plan.layers[0].sources().index(0)]
    assert [m.expert for m in out.members] == [0, 1] and out.router_from == 0
    member = out.members[1]
    assert torch.equal(b.gate[1][member.perm], b.gate[0])  # the alignment undoes the permutation
    gate, up, down = _merged_expert(b, out)
    torch.testing.assert_close(gate, b.gate[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(up, b.up[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(down, b.down[0], rtol=0, atol=1e-12)
    x_NH = torch.randn(7, b.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(expert_forward(b, 1, x_NH), expert_forward(b, 0, x_NH), rtol=1e-12, atol=1e-12)


def test_merged_model_equals_original_on_tokens_routed_to_the_group():
    view, _ = _permuted_twin_model()
    plan = plan_msmoe(view, _calib(num_seqs=8), CompressSpec(ratio=0.125))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new_view = open_model(apply_plan(view, plan))
    old_b, new_b = view.blocks[0], new_view.blocks[0]
    assert new_b.num_experts == 7
    x_TH = torch.randn(400, old_b.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ids_T = reference_route(old_b, x_TH)[1][:, 0]
    to_group = ids_T == 0  # top-1 tokens of the dominant; its router row and function are unchanged
    assert to_group.sum() > 10
    torch.testing.assert_close(reference_forward(new_b, x_TH[to_group]), reference_forward(old_b, x_TH[to_group]),
                               rtol=1e-10, atol=1e-12)


def test_aliased_merge_of_permuted_twins_is_the_original_model():
    """The paper's form (router kept, members aliased): merging exact twins changes nothing at all."""
    view, _ = _permuted_twin_model()
    plan = plan_msmoe(view, _calib(num_seqs=8), CompressSpec(ratio=0.125), alias=True)
    for lp in plan.layers.values():
        assert lp.sources() == list(range(8)) and not lp.is_pruning()
        assert [m.expert for m in lp.experts[1].members] == [0, 1]  # expert 1 is now the merge of its group
    tokens = _calib(num_seqs=4, seed=11).batches[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = apply_plan(view, plan)
        torch.testing.assert_close(merged(input_ids=tokens).logits, view.model(input_ids=tokens).logits,
                                   rtol=1e-9, atol=1e-10)


def test_deterministic():
    view = tiny_view("OLMoE")
    a = plan_msmoe(view, _calib(seed=4), CompressSpec(ratio=0.5, seed=1))
    b = plan_msmoe(view, _calib(seed=4), CompressSpec(ratio=0.5, seed=1))
    assert a.meta["groups"] == b.meta["groups"] and a.meta["frequency"] == b.meta["frequency"]
    for layer in a.layers:
        for oa, ob in zip(a.layers[layer].experts, b.layers[layer].experts, strict=True):
            assert [(m.expert, m.coef) for m in oa.members] == [(m.expert, m.coef) for m in ob.members]
            assert all((ma.perm is None and mb.perm is None) or torch.equal(ma.perm, mb.perm)
                       for ma, mb in zip(oa.members, ob.members, strict=True))


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_plans_are_valid_for_every_family(family):
    view = tiny_view(family)
    plan = plan_msmoe(view, _calib(num_seqs=2, seq_len=8), CompressSpec(ratio=0.5))
    plan.validate(per_layer(view), expert_ffn(view))
    for b in view.blocks:
        lp = plan.layers[b.layer]
        assert lp.num_experts == CompressSpec(ratio=0.5).kept_per_layer(b.num_experts)
        assert sorted(m.expert for o in lp.experts for m in o.members) == list(range(b.num_experts))
        for o in lp.experts:
            assert abs(sum(m.coef for m in o.members) - 1) < 1e-12


def test_errors_and_registry():
    view = tiny_view("Mixtral")
    with pytest.raises(MoelabError, match="calib"):
        plan_msmoe(view, None, CompressSpec(ratio=0.5))
    with pytest.raises(MoelabError, match="similarity"):
        plan_msmoe(view, _calib(), CompressSpec(ratio=0.5), similarity="cosine")
    with pytest.raises(MoelabError, match="align"):
        plan_msmoe(view, _calib(), CompressSpec(ratio=0.5), align=1)
    with pytest.raises(MoelabError, match="alias"):
        plan_msmoe(view, _calib(), CompressSpec(ratio=0.5), alias="no")
    kind, fn, needs = get_planner("m-smoe")
    assert (kind, fn, needs) == ("merge", plan_msmoe, True)
