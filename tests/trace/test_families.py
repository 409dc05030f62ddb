"""Every supported family records routing equal to the view's float64 reference (tiny float64 models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moelab.trace
from moelab.errors import TraceError
from moelab.models import expert_forward, glu_activation, open_model, reference_route
from moelab.models.tiny import TINY_CONFIGS, tiny_model

STATS = dict(expert_norms=True, act_max=True, hidden_norm=True)


def _captured_hidden(view, ids_SL):
    seen = {b.layer: [] for b in view.blocks}
    handles = [b.register_routing_hook(lambda ev, lay=b.layer: seen[lay].append(ev.hidden_TH.clone()))
               for b in view.blocks]
    try:
        with torch.no_grad():
            view.model.base_model(input_ids=ids_SL, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {lay: torch.cat(x) for lay, x in seen.items()}


def _expected_stats(block, x_TH, ids_TK, w_TK):
    norm, a_in, a_out = (np.zeros(ids_TK.shape) for _ in range(3))
    for t in range(ids_TK.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e < 0:
                continue
            x = x_TH[t:t + 1] * (w_TK[t, k] if block.combine == "input" else 1.0)
            g, u = x @ block.gate[e].double().T, x @ block.up[e].double().T
            if block.gate_bias is not None:
                g, u = g + block.gate_bias[e].double(), u + block.up_bias[e].double()
            y = expert_forward(block, e, x)
            norm[t, k], a_out[t, k] = y.norm(), y.abs().max()
            a_in[t, k] = glu_activation(block.act, g, u, block.act_params).abs().max()
    return norm, a_in, a_out


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_family_trace_equals_reference(family, tmp_path):
    model = tiny_model(family)
    view = open_model(model)
    ids_SL = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    logits = _exposes_logits(view, ids_SL)
    trace = moelab.trace.record(view, ids_SL, tmp_path, seq_len=6, batch_size=2, progress=False,
                                logits=logits, **STATS)
    hidden = _captured_hidden(view, ids_SL)
    for block in view.blocks:
        x_TH = hidden[block.layer].double()
        ref_logits, ref_ids, ref_w = reference_route(block, x_TH)
        ids = trace.ids(block.layer).astype(np.int64)
        o, ro = np.argsort(ids, 1), torch.argsort(ref_ids, 1)
        np.testing.assert_array_equal(np.take_along_axis(ids, o, 1), ref_ids.gather(1, ro).numpy())
        np.testing.assert_allclose(np.take_along_axis(trace.weights(block.layer), o, 1),
                                   ref_w.gather(1, ro).numpy(), rtol=1e-5, atol=1e-6)
        if logits:
            np.testing.assert_allclose(trace.logits(block.layer), ref_logits.numpy(), rtol=2e-3, atol=2e-3)
        want = _expected_stats(block, x_TH, ids, trace.weights(block.layer).astype(np.float64))
        for got, exp in zip((trace.expert_norms, trace.act_in_max, trace.act_out_max), want, strict=True):
            np.testing.assert_allclose(got(block.layer), exp, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(trace.hidden_norm(block.layer), x_TH.norm(dim=-1).numpy(), rtol=1e-5)


def _exposes_logits(view, ids_SL) -> bool:
    seen = []
    handle = view.blocks[0].register_routing_hook(lambda ev: seen.append(ev.logits_TE is not None))
    try:
        with torch.no_grad():
            view.model.base_model(input_ids=ids_SL, use_cache=False)
    finally:
        handle.remove()
    return all(seen)


def test_logits_of_a_family_that_hides_them_is_a_clear_error(tmp_path):
    hidden = [f for f in sorted(TINY_CONFIGS)
              if not _exposes_logits(open_model(tiny_model(f)), torch.zeros(1, 4, dtype=torch.long))]
    if not hidden:
        pytest.skip("every family exposes router logits")
    view = open_model(tiny_model(hidden[0]))
    with pytest.raises(TraceError, match="does not expose router logits"):
        moelab.trace.record(view, torch.zeros(1, 4, dtype=torch.long), tmp_path, seq_len=4, logits=True,
                            progress=False)


def test_dense_layers_leave_gaps_in_the_layer_index(make_tiny, tmp_path):
    model = make_tiny(layers=3)
    from transformers import Qwen3MoeForCausalLM

    cfg = model.config
    cfg.mlp_only_layers = [0]
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).eval()
    t = moelab.trace.record(model, torch.randint(0, 320, (2, 8)), tmp_path, seq_len=8, progress=False)
    assert t.layers == [1, 2] and t.layer_info(1).path == "model.layers.1.mlp"
    with pytest.raises(TraceError, match=r"traced layers: \[1, 2\]"):
        t.ids(0)
