"""REAP: scores equal a slow per-token reference; kept experts are the best-scored; deterministic."""

from __future__ import annotations

import pytest
import torch

from moelab.compress.calib import Calibration, routing_pass
from moelab.compress.reap import plan_reap
from moelab.compress.simulate import keep_sets
from moelab.compress.spec import CompressSpec
from moelab.models import expert_forward, open_model


def _calib(seed: int = 0) -> Calibration:
    gen = torch.Generator().manual_seed(seed)
    return Calibration([torch.randint(0, 64, (2, 12), generator=gen) for _ in range(2)], [None] * 4, 48, seed)


def _reap_loop(view, calib, gate):
    """REAP_e = mean over tokens routed to e of ``gate(block, event, t, k) * ||E_e(x_t)||_2``, token by token."""
    seen = {b.layer: [] for b in view.blocks}
    routing_pass(view, calib, lambda ev: seen[ev.block.layer].append(ev))
    out = {}
    for b in view.blocks:
        num, cnt = torch.zeros(b.num_experts, dtype=torch.float64), torch.zeros(b.num_experts, dtype=torch.float64)
        for ev in seen[b.layer]:
            for t in range(ev.ids_TK.shape[0]):
                for k, e in enumerate(ev.ids_TK[t].tolist()):
                    x = ev.hidden_TH[t:t + 1].double()
                    if b.combine == "input":
                        x = x * ev.weights_TK[t, k].double()
                    num[e] += gate(b, ev, t, k) * expert_forward(b, e, x).norm()
                    cnt[e] += 1
        out[b.layer] = torch.where(cnt > 0, num / cnt.clamp(min=1), 0.0)
    return out


def _reap_reference(view, calib):
    """REAP with ``g`` the block's combine weight without the constant scaling factor."""
    return _reap_loop(view, calib, lambda b, ev, t, k: ev.weights_TK[t, k].double() / b.routed_scaling_factor)


@pytest.mark.parametrize("family", ["Mixtral", "DeepSeek-V2", "ERNIE-4.5-MoE", "Llama4", "DBRX", "GPT-OSS"])
def test_reap_scores_and_selection(family, strong_model):
    view = open_model(strong_model(family))
    calib = _calib()
    plan = plan_reap(view, calib, CompressSpec(ratio=0.5))
    ref = _reap_reference(view, calib)
    for layer, lp in plan.layers.items():
        scores = torch.tensor(plan.meta["scores"][str(layer)], dtype=torch.float64)
        torch.testing.assert_close(scores, ref[layer], rtol=1e-5, atol=1e-9)
        kept = lp.sources()
        dropped = [e for e in range(len(scores)) if e not in kept]
        assert len(kept) == CompressSpec(ratio=0.5).kept_per_layer(len(scores))
        assert scores[kept].min() >= scores[dropped].max()


def test_reap_deterministic_and_global_budget(strong_model):
    view = open_model(strong_model("Qwen3-MoE"))
    a = plan_reap(view, _calib(2), CompressSpec(ratio=0.5, budget="global", seed=1))
    b = plan_reap(view, _calib(2), CompressSpec(ratio=0.5, budget="global", seed=1))
    assert keep_sets(a) == keep_sets(b)
    assert sum(lp.num_experts for lp in a.layers.values()) == 8  # 16 experts in 2 layers, half removed
    assert a.meta["budget"] == "global" and a.meta["calibration"]["tokens"] == 48


def _reap_from_logits(view, calib, renormalise: bool):
    """REAP's own rule, from the router logits alone: ``p = softmax(logits)``, divided by the top-k sum
    only when ``renormalise`` (REAP's ``main.py``: iff ``config.norm_topk_prob``)."""

    def gate(b, ev, t, k):
        p_E, chosen = torch.softmax(ev.logits_TE[t].double(), dim=-1), ev.ids_TK[t]
        return p_E[chosen[k]] / (p_E[chosen].sum() if renormalise else 1.0)

    return _reap_loop(view, calib, gate)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_reap_gate_is_renormalised_only_when_the_model_renormalises(strong_model, norm_topk_prob):
    view = open_model(strong_model("OLMoE", norm_topk_prob=norm_topk_prob))
    assert view.blocks[0].norm_topk_prob is norm_topk_prob
    calib = _calib()
    plan = plan_reap(view, calib, CompressSpec(ratio=0.5))
    official = _reap_from_logits(view, calib, renormalise=norm_topk_prob)
    other = _reap_from_logits(view, calib, renormalise=not norm_topk_prob)
    for layer in plan.layers:
        scores = torch.tensor(plan.meta["scores"][str(layer)], dtype=torch.float64)
        torch.testing.assert_close(scores, official[layer], rtol=1e-5, atol=1e-9)
        # the two rules differ by far more than the tolerance: the test tells them apart
        assert (other[layer] - official[layer]).abs().max() > 1e-2 * official[layer].abs().max()
