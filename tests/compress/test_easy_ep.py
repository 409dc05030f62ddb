"""EASY-EP (moelab.compress.easy_ep): scores against slow references, hand-built cases, plans.

Tolerances: float64 throughout; fast vs. reference agree to rtol 1e-9 (different summation order).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from moelab.compress.apply import apply_plan
from moelab.compress.calib import Calibration, expert_ffn, per_layer
from moelab.compress.easy_ep import (
    EasyEPScores,
    easy_ep_scores,
    plan_easy_ep,
    reference_token_scores,
    token_scores,
)
from moelab.compress.registry import get_planner
from moelab.compress.spec import CompressSpec, select_experts
from moelab.errors import MoelabError
from moelab.models import reference_route
from moelab.models.tiny import TINY_CONFIGS, tiny_view


def _calib(num_seqs: int = 4, seq_len: int = 12, labels: list | None = None, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    tokens_BS = torch.randint(0, 64, (num_seqs, seq_len), generator=g)
    labels = labels or [None] * num_seqs
    return Calibration(list(tokens_BS.split(2)), labels, num_seqs * seq_len, seed)


@pytest.mark.parametrize("family", ["Mixtral", "Qwen2-MoE", "DeepSeek-V3", "Llama4", "GPT-OSS"])
def test_token_scores_match_loop_reference(family):
    view = tiny_view(family)
    block = view.blocks[0]
    g = torch.Generator().manual_seed(1)
    x_TH = torch.randn(20, block.hidden_size, generator=g, dtype=torch.float64)
    h_TH = torch.randn(20, block.hidden_size, generator=g, dtype=torch.float64)
    _, ids_TK, w_TK = reference_route(block, x_TH)
    c_TK, s_T = token_scores(block, x_TH, h_TH, ids_TK, w_TK, residual_scale=0.7)
    c_ref, s_ref = reference_token_scores(block, x_TH, h_TH, ids_TK, w_TK, residual_scale=0.7)
    torch.testing.assert_close(c_TK, c_ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s_T, s_ref, rtol=1e-9, atol=1e-12)
    assert (s_T >= 0).all() and (c_TK > 0).all()


def test_scores_over_calibration_match_reference():
    """End to end on Mixtral: h is the input of post_attention_layernorm, scores are sum_t c * s."""
    view = tiny_view("Mixtral")
    calib = _calib()
    got = easy_ep_scores(view, calib)
    assert got.h_source == {0: "residual", 1: "residual"}
    events, residuals = [], {b.layer: [] for b in view.blocks}
    handles = [b.register_routing_hook(events.append) for b in view.blocks]
    for b in view.blocks:
        norm = view.model.model.layers[b.layer].post_attention_layernorm
        handles.append(norm.register_forward_pre_hook(
            lambda m, args, layer=b.layer: residuals[layer].append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for batch in calib.batches:
            view.model(input_ids=batch)
    for h in handles:
        h.remove()
    want = {b.layer: torch.zeros(b.num_experts, dtype=torch.float64) for b in view.blocks}
    seen = {b.layer: 0 for b in view.blocks}
    for ev in events:
        layer = ev.block.layer
        h_TH = residuals[layer][seen[layer]]
        seen[layer] += 1
        c_TK, s_T = reference_token_scores(ev.block, ev.hidden_TH, h_TH, ev.ids_TK, ev.weights_TK)
        for t in range(c_TK.shape[0]):
            for k in range(c_TK.shape[1]):
                want[layer][int(ev.ids_TK[t, k])] += c_TK[t, k] * s_T[t]
    for layer, s_E in got.combined().items():
        torch.testing.assert_close(s_E, want[layer], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family,norm,overrides", [
    ("Mixtral", "post_attention_layernorm", {}),
    ("GraniteMoE", "post_attention_layernorm", {"residual_multiplier": 0.5}),
    ("DBRX", "norm_attn_norm.norm_2", {}),
])
def test_token_contribution_is_the_real_residual_update(family, norm, overrides):
    """Without shared experts the decoder layer's output is h~ = h + m * routed, so s_t must equal
    1 - cos(input of the pre-MoE norm, output of the decoder layer), read from the model by hooks."""
    view = tiny_view(family, **overrides)
    calib = _calib()
    got = easy_ep_scores(view, calib, keep_tokens=True)
    before, after = {}, {}
    handles = []
    for b in view.blocks:
        layer_module = view.model.get_submodule(b.path.rsplit(".", 1)[0])
        handles.append(layer_module.get_submodule(norm).register_forward_pre_hook(
            lambda m, args, layer=b.layer: before.setdefault(layer, []).append(args[0])))
        handles.append(layer_module.register_forward_hook(
            lambda m, args, out, layer=b.layer: after.setdefault(layer, []).append(
                out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        for batch in calib.batches:
            view.model(input_ids=batch)
    for h in handles:
        h.remove()
    for b in view.blocks:
        assert got.h_source[b.layer] == "residual"
        for k, s_BS in enumerate(got.token_contrib[b.layer]):
            want_BS = 1 - torch.nn.functional.cosine_similarity(before[b.layer][k], after[b.layer][k], dim=-1)
            torch.testing.assert_close(s_BS, want_BS.clamp(min=0).to(torch.float64), rtol=1e-7, atol=1e-10)


def test_zeroed_expert_is_pruned_first():
    view = tiny_view("Mixtral")
    view.blocks[0].down[2].zero_()  # expert 2 of layer 0 now outputs nothing: c = 0 on every token
    calib = _calib()
    scores = easy_ep_scores(view, calib).combined()
    assert scores[0][2] == 0 and (scores[0][[0, 1, 3]] > 0).all()
    plan = plan_easy_ep(view, calib, CompressSpec(ratio=0.25))
    assert plan.layers[0].sources() == [0, 1, 3]
    assert all(len(lp.experts) == 3 for lp in plan.layers.values())
    plan_g = plan_easy_ep(view, calib, CompressSpec(ratio=0.25, budget="global"))
    assert 2 not in plan_g.layers[0].sources()
    assert sum(lp.num_experts for lp in plan_g.layers.values()) == 6


def test_ratio_zero_is_identity_plan():
    view = tiny_view("Qwen2-MoE")
    plan = plan_easy_ep(view, _calib(), CompressSpec(ratio=0.0))
    for b in view.blocks:
        lp = plan.layers[b.layer]
        assert lp.is_pruning() and lp.sources() == list(range(b.num_experts))
    tokens = _calib(seed=9).batches[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = apply_plan(view, plan)
        torch.testing.assert_close(same(input_ids=tokens).logits, view.model(input_ids=tokens).logits,
                                   rtol=0, atol=0)


def test_deterministic():
    view = tiny_view("OLMoE")
    calib = _calib(seed=3)
    a = plan_easy_ep(view, calib, CompressSpec(ratio=0.5, seed=7))
    b = plan_easy_ep(view, calib, CompressSpec(ratio=0.5, seed=7))
    assert a.meta["scores"] == b.meta["scores"]
    assert {k: v.sources() for k, v in a.layers.items()} == {k: v.sources() for k, v in b.layers.items()}


def test_labels_are_scored_per_sequence():
    """Per-label rows equal the scores of a calibration of that label's sequences alone."""
    view = tiny_view("Mixtral")
    tokens_BS = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(5))
    labels = ["code", "math", "code", "math"]
    mixed = easy_ep_scores(view, Calibration(list(tokens_BS.split(2)), labels, 40, 0))
    assert mixed.labels == ["code", "math"]
    for row, lab in enumerate(mixed.labels):
        idx = [i for i, x in enumerate(labels) if x == lab]
        alone = easy_ep_scores(view, Calibration([tokens_BS[idx]], [lab] * 2, 20, 0)).combined()
        for layer, s_LE in mixed.scores.items():
            torch.testing.assert_close(s_LE[row], alone[layer], rtol=1e-9, atol=1e-12)


def test_mix_domains_averages_normalised_scores():
    s = EasyEPScores({0: torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 3.0]], dtype=torch.float64)},
                     ["a", "b"])
    torch.testing.assert_close(s.combined()[0], torch.tensor([2.0, 2.0, 1.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(s.combined(mix_domains=True)[0],
                               torch.tensor([0.25, 0.25, 0.125, 0.375], dtype=torch.float64))


def test_select_experts_budgets():
    scores = {0: torch.tensor([4.0, 3.0, 2.0, 1.0]), 1: torch.tensor([1.0, 1.0, 1.0, 100.0])}
    assert select_experts(scores, CompressSpec(ratio=0.5)) == {0: [0, 1], 1: [0, 3]}  # tie: lower index
    # relative scores: layer 0 = [1.6, 1.2, 0.8, 0.4], layer 1 ~ [0.04, 0.04, 0.04, 3.88]
    glob = select_experts(scores, CompressSpec(ratio=0.5, budget="global", min_keep=2))
    assert glob == {0: [0, 1], 1: [0, 3]}
    glob1 = select_experts(scores, CompressSpec(ratio=0.5, budget="global", min_keep=1))
    assert glob1 == {0: [0, 1, 2], 1: [3]}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_plans_are_valid_for_every_family(family):
    view = tiny_view(family)
    plan = plan_easy_ep(view, _calib(num_seqs=2, seq_len=8), CompressSpec(ratio=0.5))
    plan.validate(per_layer(view), expert_ffn(view))
    assert set(plan.layers) == {b.layer for b in view.blocks}
    assert plan.meta["h_source"] and all(v in ("residual", "block_input") for v in plan.meta["h_source"].values())


def test_errors_and_registry():
    view = tiny_view("Mixtral")
    with pytest.raises(MoelabError, match="calib"):
        plan_easy_ep(view, None, CompressSpec(ratio=0.5))
    with pytest.raises(MoelabError, match="mix_domains"):
        plan_easy_ep(view, _calib(), CompressSpec(ratio=0.5), mix_domains="yes")
    kind, fn, needs = get_planner("easy-ep")
    assert (kind, fn, needs) == ("prune", plan_easy_ep, True)
