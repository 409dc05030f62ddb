"""EAQuant on tiny models: the smoothing scales against a slow reference, folding them is the identity
(float64, several families), calibration balance, router alignment lowers the routing KL (and is a no-op
on an unquantised model), and the whole method end to end (W3A4)."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.compress.calib import Calibration
from moelab.compress.quant import QuantConfig, QuantSpec, save_quantized
from moelab.compress.quant.act import ActQuantConfig
from moelab.compress.quant.eaquant import (
    EAQuantConfig,
    align_routers,
    balanced_policy,
    collect_smoothing_stats,
    eaquant,
    input_norm,
    router_logits,
    smooth,
    smoothing_scales,
)
from moelab.errors import MoelabError, UnsupportedModelError
from moelab.models import open_model
from moelab.models.tiny import native_block_output

from .conftest import make_strong


def _calib(vocab: int = 64, seed: int = 0, batches: int = 2, B: int = 2, S: int = 12) -> Calibration:
    gen = torch.Generator().manual_seed(seed)
    bs = [torch.randint(0, vocab, (B, S), generator=gen) for _ in range(batches)]
    return Calibration(bs, [None] * (batches * B), batches * B * S, seed)


def _slow_scales(block, events, alpha):
    """Channel by channel, linear by linear: max over groups of max|X_g|^a / max|W_g|^(1-a)."""
    xs = torch.cat([ev.hidden_TH for ev in events]).double()
    ids = torch.cat([ev.ids_TK for ev in events])
    H = block.hidden_size
    s = torch.zeros(H, dtype=torch.float64)
    for j in range(H):
        def sq(a, w):
            return max(a, 1e-5) ** alpha / max(w, 1e-5) ** (1 - alpha)

        amax = float(xs[:, j].abs().max())
        cands = [sq(amax, float(block.router_weight[:, j].abs().max()))]
        for e in range(block.num_experts):
            rows = xs[(ids == e).any(-1)]
            a = float(rows[:, j].abs().max()) if rows.shape[0] else amax
            cands.append(sq(a, max(float(block.gate[e, :, j].abs().max()), float(block.up[e, :, j].abs().max()))))
        if block.shared is not None:
            sh = block.shared
            w = max(float(t[:, j].abs().max()) for t in (sh.gate, sh.up, sh.gate_weight) if t is not None)
            cands.append(sq(amax, w))
        s[j] = max(cands)
    return s


@pytest.mark.parametrize("family", ["Qwen2-MoE", "DeepSeek-V3"])
def test_smoothing_scales_match_slow_reference(family):
    view = open_model(make_strong(family))
    calib = _calib()
    events = []
    from moelab.compress.calib import routing_pass

    routing_pass(view, calib, events.append)
    stats = collect_smoothing_stats(view, calib)
    for b in view.blocks:
        evs = [ev for ev in events if ev.block.layer == b.layer]
        torch.testing.assert_close(smoothing_scales(b, stats[b.layer], 0.6), _slow_scales(b, evs, 0.6),
                                   rtol=1e-12, atol=0)
        joint = smoothing_scales(b, stats[b.layer], 0.6, "joint")
        assert (joint <= smoothing_scales(b, stats[b.layer], 0.6) + 1e-12).all()  # max over groups >= joint


# float64 models; DeepSeek-V3's router and Qwen's routing softmax run in float32, hence 1e-6 there
@pytest.mark.parametrize("family,tol", [("Qwen3-MoE", 1e-12), ("OLMoE", 1e-12), ("Qwen2-MoE", 1e-12),
                                        ("DeepSeek-V3", 1e-6), ("DBRX", 1e-12)])
@torch.no_grad()
def test_folding_the_scales_is_the_identity(family, tol):
    model = make_strong(family)
    view = open_model(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    sm = smooth(view, _calib(), EAQuantConfig())
    s = torch.cat(list(sm.scales.values()))
    assert float((s - 1).abs().max()) > 0.1  # the scales are not trivially 1
    torch.testing.assert_close(sm.view.model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=tol, atol=tol)
    h = torch.randn(1, 7, view.blocks[0].hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for b0, b1 in zip(view.blocks, sm.view.blocks, strict=True):
        x0, x1 = input_norm(view, b0)(h), input_norm(sm.view, b1)(h)
        torch.testing.assert_close(router_logits(b1, x1.reshape(-1, b1.hidden_size)),
                                   router_logits(b0, x0.reshape(-1, b0.hidden_size)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(native_block_output(b1, x1), native_block_output(b0, x0), rtol=tol, atol=tol)
        assert float((x1 - x0).abs().max()) > 1e-3  # the block really reads a rescaled input


@torch.no_grad()
def test_a_partial_fold_is_caught():
    """The identity test can fail: folding into the norm and the router but not the experts changes the logits."""
    model = make_strong("Qwen3-MoE")
    view = open_model(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    ref = model(input_ids=ids).logits
    sm = smooth(view, _calib(), EAQuantConfig())
    for b in sm.view.blocks:
        s = sm.scales[b.layer]
        b.gate.div_(s)  # undo the experts' part
    assert float((sm.view.model(input_ids=ids).logits - ref).abs().max()) > 1e-3


def test_no_norm_before_the_block_is_refused():
    view = open_model(make_strong("FlexOlmo"))
    with pytest.raises(UnsupportedModelError, match="FlexOlmo.*norm before the MoE block"):
        smooth(view, _calib(), EAQuantConfig())


def test_config_is_validated():
    for kw, msg in [(dict(alpha=1.5), "alpha"), (dict(aggregation="mean"), "aggregation"),
                    (dict(cap_ratio=0), "cap_ratio"), (dict(weights="awq"), "weights")]:
        with pytest.raises(MoelabError, match=msg):
            EAQuantConfig(**kw)


def test_calibration_balance_caps_tokens_per_expert():
    view = open_model(make_strong("Qwen3-MoE"))
    calib = _calib(batches=4)
    policy = balanced_policy(QuantSpec().policy, view, calib, 1.0)
    b = view.blocks[0]
    assert policy.cap == max(math.ceil(calib.num_tokens * b.top_k / b.num_experts), policy.min_tokens)
    run = eaquant(view, calib, QuantSpec("gptq", QuantConfig(4, 8)), EAQuantConfig(cap_ratio=1.0, align=False))
    cal = run.result.calibration
    assert cal["uncalibrated"] == 0 and run.result.meta()["cap"] == policy.cap
    for layer in cal["layers"]:
        assert max(u for u, s in zip(layer["used_tokens"], layer["source"], strict=True) if s == "routed") <= policy.cap
        assert max(layer["routed_tokens"]) > policy.cap  # the cap did bite on a hot expert


@torch.no_grad()
def test_alignment_lowers_kl_and_is_a_no_op_without_quantisation():
    view = open_model(make_strong("Qwen3-MoE"))
    calib = _calib()
    sm = smooth(view, calib, EAQuantConfig())
    routers = [b.router_weight.clone() for b in sm.view.blocks]
    same = align_routers(sm.view, sm.stats, calib, steps=50, lr=1e-2)  # nothing quantised: nothing to align
    assert all(v["kl_before"] < 1e-9 and v["kl_after"] == v["kl_before"] for v in same.values())
    assert all(torch.equal(r, b.router_weight) for r, b in zip(routers, sm.view.blocks, strict=True))
    run = eaquant(view, calib, QuantSpec("gptq", QuantConfig(2, 8)), EAQuantConfig(act=ActQuantConfig(4)),
                  smoothed=sm)
    last = run.alignment[max(run.alignment)]  # the second block reads the quantised first block's output
    assert last["kl_before"] > 1e-3 and last["kl_after"] < 0.95 * last["kl_before"]
    qrouter = open_model(run.model).blocks[-1].router_weight
    assert not torch.equal(qrouter, sm.view.blocks[-1].router_weight)


def test_eaquant_end_to_end_w3a4_writes_a_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    view = open_model(make_strong("OLMoE"))
    run = eaquant(view, _calib(), QuantSpec("gptq", QuantConfig(3, 8)), EAQuantConfig(act=ActQuantConfig(4)))
    meta = run.result.meta()
    assert meta["method"] == "eaquant" and meta["weights"] == "gptq" and meta["act_bits"] == 4
    assert meta["bits"] == 3 and set(meta["alignment"]) == {str(b.layer) for b in view.blocks[1:]}
    out = save_quantized(open_model(run.model), run.result, tmp_path / "q")
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, experts_implementation="eager")(input_ids=ids).logits
        torch.testing.assert_close(loaded, run.model(input_ids=ids).logits, rtol=1e-10, atol=1e-10)
        assert float((loaded - view.model(input_ids=ids).logits).abs().max()) > 1e-4  # it is quantised
