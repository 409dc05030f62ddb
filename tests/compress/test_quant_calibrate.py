"""Per-expert Hessians, every expert calibrated, and quantise -> dequantise on tiny models of several families."""

from __future__ import annotations

import warnings

import pytest
import torch

from moelab.compress.calib import Calibration, routing_pass
from moelab.compress.quant import (
    CalibPolicy,
    QuantConfig,
    QuantSpec,
    collect_hessians,
    dequantized_model,
    quantize_experts,
    rtn_quantize,
)
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.reference import expert_activations

from .conftest import make_strong

FAMILIES = ["Qwen3-MoE", "DeepSeek-V3", "Mixtral", "Llama4", "GPT-OSS", "DBRX"]


def _calib(vocab: int, seed: int = 0, batches: int = 2, B: int = 2, S: int = 12) -> Calibration:
    gen = torch.Generator().manual_seed(seed)
    bs = [torch.randint(0, vocab, (B, S), generator=gen) for _ in range(batches)]
    return Calibration(bs, [None] * (batches * B), batches * B * S, seed)


def _view(family: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_model(make_strong(family))


def _slow_hessians(view, calib):
    """Token by token, slot by slot: what each expert receives, summed as 2 x x^T (float64)."""
    events = []
    routing_pass(view, calib, events.append)
    out = {}
    for b in view.blocks:
        E, H, I = b.num_experts, b.hidden_size, b.intermediate_size  # noqa: E741
        h_in, h_mid, n = torch.zeros(E, H, H, dtype=torch.float64), torch.zeros(E, I, I, dtype=torch.float64), [0] * E
        for ev in (ev for ev in events if ev.block.layer == b.layer):
            for t in range(ev.ids_TK.shape[0]):
                for k in range(ev.ids_TK.shape[1]):
                    e = int(ev.ids_TK[t, k])
                    x = ev.hidden_TH[t].double()
                    if b.combine == "input":
                        x = x * float(ev.weights_TK[t, k])
                    h_in[e] += 2 * torch.outer(x, x)
                    a = expert_activations(b, e, x[None])[0]
                    h_mid[e] += 2 * torch.outer(a, a)
                    n[e] += 1
        out[b.layer] = (h_in, h_mid, n)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_hessians_match_token_by_token(family):
    view = _view(family)
    calib = _calib(view.config.vocab_size)
    hs = collect_hessians(view, calib, CalibPolicy(min_tokens=1))
    slow = _slow_hessians(view, calib)
    for layer, (h_in, h_mid, n) in slow.items():
        got = hs[layer]
        assert got.routed_E.tolist() == n
        for e in range(len(n)):
            if n[e] == 0:  # starved: recalibrated on every token
                assert got.source[e] == "all tokens" and int(got.used_E[e]) == calib.num_tokens
                continue
            torch.testing.assert_close(got.h_in[e], h_in[e], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(got.h_mid[e], h_mid[e], rtol=1e-10, atol=1e-10)


def test_starved_experts_are_recalibrated_on_all_tokens_and_cap_balances():
    view = _view("Qwen3-MoE")
    calib = _calib(view.config.vocab_size)
    T = calib.num_tokens
    forced = collect_hessians(view, calib, CalibPolicy(min_tokens=T + 1))  # every expert starved
    events = []
    routing_pass(view, calib, events.append)
    for b in view.blocks:
        x = torch.cat([ev.hidden_TH for ev in events if ev.block.layer == b.layer]).double()
        hs = forced[b.layer]
        assert hs.used_E.tolist() == [T] * b.num_experts and set(hs.source) == {"all tokens"}
        for e in range(b.num_experts):
            torch.testing.assert_close(hs.h_in[e], 2 * x.T @ x)
            a = expert_activations(b, e, x)
            torch.testing.assert_close(hs.h_mid[e], 2 * a.T @ a)
    capped = collect_hessians(view, calib, CalibPolicy(min_tokens=2, cap=3))
    for hs in capped.values():
        for e, s in enumerate(hs.source):
            assert int(hs.used_E[e]) == (min(3, int(hs.routed_E[e])) if s == "routed" else T)
            assert s == "routed" or int(hs.routed_E[e]) < 2


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_dequantize_model(family):
    view = _view(family)
    calib = _calib(view.config.vocab_size)
    spec = QuantSpec("gptq", QuantConfig(8, 8), policy=CalibPolicy(min_tokens=4))
    res = quantize_experts(view, spec, calib)
    assert res.calibration["uncalibrated"] == 0
    new = dequantized_model(view, res)
    nv = open_model(new)
    ids = calib.batches[0]
    with torch.no_grad():
        ref, got = view.model(input_ids=ids).logits, new(input_ids=ids).logits
    assert 0 < float((ref - got).abs().max()) < 0.05 * float(ref.abs().max())  # int8: changed, and close
    for b, nb in zip(view.blocks, nv.blocks, strict=True):  # routers and shared experts untouched
        assert torch.equal(b.router_weight, nb.router_weight)
        if b.shared is not None:
            assert torch.equal(b.shared.gate, nb.shared.gate)
        for e, tensors in enumerate(res.blocks[b.layer].experts):
            torch.testing.assert_close(nb.down[e], tensors["down"].dequantize(nb.down.dtype))
    # RTN through the model equals RTN on the stacked weights
    rtn = quantize_experts(view, QuantSpec("rtn", QuantConfig(4, None, False)))
    b = view.blocks[0]
    direct = rtn_quantize(b.up.detach(), QuantConfig(4, None, False))
    for e in range(b.num_experts):
        assert torch.equal(rtn.blocks[b.layer].experts[e]["up"].q, direct.q[e])


def test_quantize_bad_input_is_named():
    view = _view("Qwen3-MoE")
    with pytest.raises(MoelabError, match="group_size: 5 does not divide the input dimension 16"):
        quantize_experts(view, QuantSpec("rtn", QuantConfig(4, 5)))
    with pytest.raises(MoelabError, match="GPTQ needs calibration"):
        quantize_experts(view, QuantSpec("gptq", QuantConfig(4, 8)))
    with pytest.raises(MoelabError, match="method: 'awq'"):
        QuantSpec("awq")
    view.config.quantization_config = {"quant_method": "compressed-tensors"}
    with pytest.raises(MoelabError, match="already quantised"):
        quantize_experts(view, QuantSpec("rtn", QuantConfig(4, 8)))
