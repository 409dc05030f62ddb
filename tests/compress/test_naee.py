"""NAEE: the exhaustive search equals a brute-force loop over pruned blocks, greedy beyond the limit,
identity at ratio 0, clear errors; dynamic skipping is the identity at beta=0 and reports its rate.

Tiny float64 models; the brute force builds each pruned block by slicing the view's tensors (no
masked routing) and runs the float64 reference forward, so losses agree to 1e-9 relative.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from itertools import combinations

import pytest
import torch

from moelab.compress.apply import CompressWarning, apply_plan
from moelab.compress.calib import calibration_batches
from moelab.compress.common import layer_inputs
from moelab.compress.naee import (
    calibrate_skipping,
    install_skipping,
    plan_naee,
)
from moelab.compress.simulate import keep_sets, masked_logits, simulated
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import open_model, reference_forward
from moelab.models.tiny import tiny_model


def _setup(family: str = "Mixtral", tokens: int = 128, **overrides):
    torch.manual_seed(0)
    model = tiny_model(family, **overrides)
    view = open_model(model)
    ids = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(1))
    calib = calibration_batches(view, ids, tokens=tokens, seq_len=16, batch_size=4, seed=0)
    return model, view, calib


def _pruned_block(block, keep):
    """The block with only ``keep`` experts, sliced like a pruned checkpoint."""
    k = list(keep)

    def cut(t):
        return None if t is None else t[k]

    return replace(block, router_weight=block.router_weight[k], router_bias=cut(block.router_bias),
                   correction_bias=cut(block.correction_bias), gate=block.gate[k], up=block.up[k],
                   down=block.down[k], gate_bias=cut(block.gate_bias), up_bias=cut(block.up_bias),
                   down_bias=cut(block.down_bias), top_k=min(block.top_k, len(k)))


def _brute_force(block, inputs, kept):
    x = inputs.hidden_TH
    z = reference_forward(block, x)
    losses = {}
    for keep in combinations(range(block.num_experts), kept):
        err_T = (z - reference_forward(_pruned_block(block, keep), x)).pow(2).sum(-1)
        per_seq = torch.zeros(inputs.num_seqs, dtype=torch.float64).index_add_(0, inputs.seq_T, err_T)
        losses[keep] = float(per_seq.sqrt().sum())
    return losses


@pytest.mark.parametrize("family", ["Mixtral", "Qwen2-MoE", "OLMoE", "Llama4"])
def test_exhaustive_search_equals_brute_force(family):
    _, view, calib = _setup(family)
    spec = CompressSpec(ratio=0.5)
    plan = plan_naee(view, calib, spec)
    inputs = layer_inputs(view, calib)
    for b in view.blocks:
        kept = spec.kept_per_layer(b.num_experts)
        losses = _brute_force(b, inputs[b.layer], kept)
        best = min(losses, key=losses.get)
        info = plan.meta["search"][str(b.layer)]
        assert info["mode"] == "exhaustive" and info["space"] == math.comb(b.num_experts, kept)
        assert info["evaluated"] == len(losses)
        assert plan.layers[b.layer].sources() == list(best)
        assert info["loss"] == pytest.approx(losses[best], rel=1e-9)
        assert plan.layers[b.layer].is_pruning()


def test_greedy_beyond_the_limit_is_reported_and_wide_beam_is_exact():
    _, view, calib = _setup("OLMoE")  # 8 experts, keep 4: C(8, 4) = 70 subsets
    spec = CompressSpec(ratio=0.5)
    exact = plan_naee(view, calib, spec)
    greedy = plan_naee(view, calib, spec, limit=10)
    wide = plan_naee(view, calib, spec, limit=10, beam=100)
    for b in view.blocks:
        e, g, w = (p.meta["search"][str(b.layer)] for p in (exact, greedy, wide))
        assert g["mode"] == "greedy" and g["space"] == 70
        assert g["evaluated"] == 8 + 7 + 6 + 5  # one elimination step per removed expert
        assert g["loss"] >= e["loss"] - 1e-12
        assert w["mode"] == "beam100" and w["kept"] == e["kept"]
        assert w["loss"] == pytest.approx(e["loss"], rel=1e-12)


def test_deterministic_and_ratio_zero_is_identity():
    _, view, calib = _setup("Qwen2-MoE")
    a = plan_naee(view, calib, CompressSpec(ratio=0.5, seed=3))
    b = plan_naee(view, calib, CompressSpec(ratio=0.5, seed=3))
    a.meta.pop("seconds"), b.meta.pop("seconds")
    assert a.to_json() == b.to_json()
    ident = plan_naee(view, calib, CompressSpec(ratio=0.0))
    for blk in view.blocks:
        lp = ident.layers[blk.layer]
        assert lp.is_pruning() and lp.sources() == list(range(blk.num_experts))
        assert ident.meta["search"][str(blk.layer)]["loss"] == 0.0


def test_bad_input_names_the_argument():
    _, view, calib = _setup("Mixtral")
    spec = CompressSpec(ratio=0.5)
    with pytest.raises(MoelabError, match="calib: naee needs calibration data"):
        plan_naee(view, None, spec)
    with pytest.raises(MoelabError, match=r"calib: naee got 128 .* at least 1000 \(option min_tokens\)"):
        plan_naee(view, calib, spec, min_tokens=1000)
    with pytest.raises(MoelabError, match="kept: layer 0 would keep 0 of its 4 experts"):
        plan_naee(view, calib, spec, kept=0)
    with pytest.raises(MoelabError, match="budget: naee plans each layer"):
        plan_naee(view, calib, CompressSpec(ratio=0.5, budget="global"))


# --- dynamic skipping ------------------------------------------------------------------------------

def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["Mixtral", "DeepSeek-V3", "PhiMoE", "Llama4"])
def test_skipping_beta_zero_is_the_identity(family):
    model, view, _ = _setup(family)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    before = _logits(model, ids)
    with install_skipping(model, 0.0) as handle:
        skipped = _logits(model, ids)
        assert handle.skip_rate() == 0.0 and handle.stats()[view.blocks[0].layer]["tokens"] == 32
    assert torch.equal(skipped, before)  # the family's own forward, untouched
    assert torch.equal(_logits(model, ids), before)


def test_skipping_follows_the_rule():
    model, view, _ = _setup("Mixtral")  # top-2, renormalised
    block = view.blocks[0]
    with torch.no_grad():  # tiny random routers are near uniform: spread the weights
        block.router_weight.mul_(20)
    ids = torch.randint(0, 64, (8, 25), generator=torch.Generator().manual_seed(2))
    plain, skipped = [], []
    with block.register_routing_hook(plain.append):
        _logits(model, ids)
    beta = 0.6
    with install_skipping(model, {block.layer: beta}), block.register_routing_hook(skipped.append):
        _logits(model, ids)
    r, out = plain[0], skipped[0]
    w1, w2 = r.weights_TK.max(-1).values, r.weights_TK.min(-1).values
    skip = w2 < beta * w1
    assert 0 < int(skip.sum()) < 200
    assert torch.equal(out.mask_TK, torch.stack([~skip | (r.weights_TK[:, 0] >= r.weights_TK[:, 1]),
                                                 ~skip | (r.weights_TK[:, 1] > r.weights_TK[:, 0])], 1))
    # a skipped token gives all its weight (1 after Mixtral's renormalisation) to its first expert
    torch.testing.assert_close(out.weights_TK[skip].sum(-1), torch.ones(int(skip.sum()), dtype=out.weights_TK.dtype))
    assert torch.equal(out.weights_TK[~skip], r.weights_TK[~skip])
    with pytest.raises(MoelabError, match="beta: expected"):
        install_skipping(model, 1.5)


def test_calibrated_betas_skip_about_half_of_second_experts():
    model, view, calib = _setup("Mixtral", tokens=512)
    betas = calibrate_skipping(view, calib)
    assert set(betas) == {b.layer for b in view.blocks} and all(0 < v <= 1 for v in betas.values())
    with install_skipping(model, betas) as handle:
        for batch in calib.batches:
            _logits(model, batch)
        for layer in betas:  # beta is the median of w2/w1 on exactly these tokens
            assert 0.4 <= handle.skip_rate(layer) <= 0.6
    with install_skipping(model, 1.0) as handle:
        _logits(model, calib.batches[0])
        assert handle.skip_rate() > 0.99


# --- the applied checkpoint ----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["Mixtral", "Qwen2-MoE", "DeepSeek-V3", "GPT-OSS"])
def test_applied_model_equals_simulation_and_masked_routing(family, strong_model):
    model = strong_model(family)
    view = open_model(model)
    ids = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(1))
    calib = calibration_batches(view, ids, tokens=128, seq_len=16, batch_size=4, seed=0)
    plan = plan_naee(view, calib, CompressSpec(ratio=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CompressWarning)  # DeepSeek-V3 may lose its groups
        new = apply_plan(model, plan)
    batch = calib.batches[0]
    with torch.no_grad():
        got = new(input_ids=batch).logits
        with simulated(view, plan):
            sim = model(input_ids=batch).logits
        with masked_logits(view, keep_sets(plan)):
            masked = model(input_ids=batch).logits
        base = model(input_ids=batch).logits
    scale = sim.abs().max().item()
    assert (got - sim).abs().max().item() <= 1e-6 * scale
    if not plan.meta["apply"]["changes"]:  # NOTE: switched-off groups make masked routing differ
        # masked routing is a routing edit on the model's own forward (float32 router softmax in
        # some families), so it agrees with the float64 simulation as the written model does
        assert (masked - sim).abs().max().item() <= 1e-6 * scale
    assert (got - base).abs().max().item() > 1e-3 * scale  # the pruning is visible in the logits
