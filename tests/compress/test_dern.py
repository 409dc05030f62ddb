"""DERN: experts dropped by router statistics, segments assigned as a slow per-neuron loop says, the
merged weights equal the formula written out by hand; identity at ratio 0; errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.compress.apply import apply_plan, save_compressed
from moelab.compress.calib import calibration_batches
from moelab.compress.common import layer_inputs
from moelab.compress.dern import keep_by_importance, plan_dern
from moelab.compress.simulate import simulated
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.tiny import tiny_model


def _setup(family="OLMoE", tokens=128):
    view = open_model(tiny_model(family))
    ids = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(1))
    return view, calibration_batches(view, ids, tokens=tokens, seq_len=16, batch_size=4, seed=0)


def _neuron(block, e, n):
    parts = [block.gate[e][n], block.up[e][n], block.down[e][:, n]]
    parts += [b[e][n:n + 1] for b in (block.gate_bias, block.up_bias) if b is not None]
    return torch.cat([p.detach().double() for p in parts])


def slow_assignment(block, keep, alpha):
    """``(d, n) -> (r, m)`` by looping over every kept neuron (first maximum wins)."""
    out = {}
    for d in range(block.num_experts):
        if d in keep:
            continue
        for n in range(block.intermediate_size):
            f = _neuron(block, d, n)
            best = (-2.0, None)
            for r in keep:
                for m in range(block.intermediate_size):
                    g = _neuron(block, r, m)
                    cos = float(f @ g / (f.norm() * g.norm()))
                    if cos > best[0]:
                        best = (cos, (r, m))
            if best[0] >= alpha:
                out[(d, n)] = best[1]
    return out


def plan_assignment(lp):
    out = {}
    for o in lp.experts:
        for mem in o.members[1:]:
            for pos in torch.nonzero(mem.coef > 0).flatten().tolist():
                out[(mem.expert, int(mem.perm[pos]))] = (o.router_from, pos)
    return out


@pytest.mark.parametrize("family,alpha", [("OLMoE", -1.0), ("Qwen2-MoE", 0.2), ("GPT-OSS", 0.0)])
def test_drop_assign_and_merge_follow_the_definition(family, alpha):
    view, calib = _setup(family)
    spec = CompressSpec(ratio=0.5)
    plan = plan_dern(view, calib, spec, alpha=alpha)
    inputs = layer_inputs(view, calib)
    for b in view.blocks:
        lp, s_E = plan.layers[b.layer], inputs[b.layer].weight_E
        keep = sorted(sorted(range(b.num_experts), key=lambda e: (-float(s_E[e]), e))[:spec.kept_per_layer(b.num_experts)])
        assert lp.sources() == keep == plan.meta["layers"][str(b.layer)]["kept"]
        want = slow_assignment(b, keep, alpha)
        assert plan_assignment(lp) == want
        assert plan.meta["layers"][str(b.layer)]["segments"] == len(want)
        for o in lp.experts:  # merged gate rows written out: weighted mean of own neuron and its segments
            r = o.router_from
            for m in range(b.intermediate_size):
                pairs = [(r, m, float(s_E[r]))] + [(d, n, float(s_E[d])) for (d, n), t in want.items() if t == (r, m)]
                total = sum(w for *_, w in pairs)
                expect = sum(w * b.gate[e][n].double() for e, n, w in pairs) / total
                got = sum((mem.coef[m] if isinstance(mem.coef, torch.Tensor) else mem.coef)
                          * b.gate[mem.expert][m if mem.perm is None else int(mem.perm[m])].double()
                          for mem in o.members)
                torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
            for mem in o.members:
                if mem.perm is not None:
                    assert sorted(mem.perm.tolist()) == list(range(b.intermediate_size))


def test_high_alpha_is_plain_pruning_by_frequency():
    view, calib = _setup("Mixtral")
    plan = plan_dern(view, calib, CompressSpec(ratio=0.5), alpha=1.1, score="frequency")
    inputs = layer_inputs(view, calib)
    for b in view.blocks:
        assert plan.layers[b.layer].is_pruning()
        assert plan.layers[b.layer].sources() == keep_by_importance(inputs[b.layer].freq_E, 2)


def test_deterministic_and_ratio_zero_is_identity():
    view, calib = _setup("Qwen2-MoE")
    a = plan_dern(view, calib, CompressSpec(ratio=0.5, seed=2), alpha=0.0)
    b = plan_dern(view, calib, CompressSpec(ratio=0.5, seed=2), alpha=0.0)
    a.meta.pop("seconds"), b.meta.pop("seconds")
    assert a.to_json() == b.to_json()
    ident = plan_dern(view, calib, CompressSpec(ratio=0.0), alpha=-1.0)
    for blk in view.blocks:
        lp = ident.layers[blk.layer]
        assert lp.is_pruning() and lp.sources() == list(range(blk.num_experts))


def test_keep_by_importance_ties_go_to_lower_index():
    assert keep_by_importance(torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0]), 2) == [1, 2]
    assert keep_by_importance(torch.tensor(np.zeros(4)), 3) == [0, 1, 2]


def test_bad_input_names_the_argument():
    view, calib = _setup("Mixtral")
    spec = CompressSpec(ratio=0.5)
    with pytest.raises(MoelabError, match="calib: dern needs calibration data"):
        plan_dern(view, None, spec)
    with pytest.raises(MoelabError, match=r"calib: dern got 128 .*min_tokens"):
        plan_dern(view, calib, spec, min_tokens=500)
    with pytest.raises(MoelabError, match="kept: layer 0 would keep 5 of its 4 experts"):
        plan_dern(view, calib, spec, kept=5)
    with pytest.raises(MoelabError, match="score: expected"):
        plan_dern(view, calib, spec, score="ean")
    with pytest.raises(MoelabError, match="alpha: expected"):
        plan_dern(view, calib, spec, alpha=float("nan"))


@pytest.mark.parametrize("family", ["Mixtral", "Qwen2-MoE", "GPT-OSS"])
def test_applied_checkpoint_equals_simulation_and_loads_in_transformers(family, strong_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = strong_model(family)
    view = open_model(model)
    ids = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(1))
    calib = calibration_batches(view, ids, tokens=128, seq_len=16, batch_size=4, seed=0)
    plan = plan_dern(view, calib, CompressSpec(ratio=0.5), alpha=0.0)
    assert any(len(o.members) > 2 for lp in plan.layers.values() for o in lp.experts)
    new = apply_plan(model, plan)
    loaded = AutoModelForCausalLM.from_pretrained(save_compressed(new, plan, tmp_path / "out"),
                                                  dtype=torch.float64, experts_implementation="eager")
    batch = calib.batches[0]
    with torch.no_grad():
        got, back = new(input_ids=batch).logits, loaded(input_ids=batch).logits
        with simulated(view, plan):
            sim = model(input_ids=batch).logits
    scale = sim.abs().max().item()
    assert (got - sim).abs().max().item() <= 1e-6 * scale
    assert (back - got).abs().max().item() <= 1e-9 * scale
