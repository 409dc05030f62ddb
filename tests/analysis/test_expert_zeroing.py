"""Zeroing one expert: the view edit equals zeroing the model's own parameter, weights come back
(also on error), and the loss equals transformers' own shifted cross-entropy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moelab.analysis._inputs import AnalysisInputError, EmptySelectionError
from moelab.analysis.expert_zeroing import (
    next_token_loss,
    trace_batches,
    zeroed_expert,
    zeroing_effect,
)
from moelab.models import open_model
from moelab.models.tiny import tiny_model


@pytest.fixture
def view():
    return open_model(tiny_model("Qwen3-MoE"))


def _batches(vocab: int = 50):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (2, 8), generator=g), torch.randint(0, vocab, (1, 5), generator=g)]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["Qwen3-MoE", "GPT-OSS"])
def test_zeroed_expert_outputs_zero_and_restores(family):
    v = open_model(tiny_model(family))
    block = v.blocks[0]
    before = _state(v.model)
    ids = torch.randint(0, v.model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    seen = []
    with torch.no_grad(), zeroed_expert(block, 1), block.register_routing_hook(seen.append):
        v.model(ids)
    ev = seen[0]
    assert (ev.ids_TK == 1).any(), "expert 1 should still take routing slots"
    assert (ev.weights_TK[ev.ids_TK == 1] == 0).all() and (ev.weights_TK[ev.ids_TK != 1] != 0).all()
    after = _state(v.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(RuntimeError, match="boom"), zeroed_expert(block, 2):
        raise RuntimeError("boom")
    after = _state(v.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_next_token_loss_matches_transformers(view):
    batch = _batches()[0]
    ref = view.model(input_ids=batch, labels=batch).loss.item()
    # both take the cross-entropy of float32 logits, summed in a different order
    assert next_token_loss(view.model, [batch]) == pytest.approx(ref, rel=1e-6)
    both = _batches()
    n0, n1 = both[0][:, 1:].numel(), both[1][:, 1:].numel()
    pooled = (next_token_loss(view.model, both[:1]) * n0 + next_token_loss(view.model, both[1:]) * n1) / (n0 + n1)
    assert next_token_loss(view.model, both) == pytest.approx(pooled, rel=1e-12)


def test_zeroing_effect_equals_zeroing_the_model_parameter(view):
    batches = _batches()
    before = _state(view.model)
    eff = zeroing_effect(view, [(0, 3), (1, 5)], batches)
    assert all(torch.equal(before[k], v) for k, v in view.model.state_dict().items())
    assert eff.base_loss == pytest.approx(next_token_loss(view.model, batches), rel=1e-12)
    for n, (layer, e) in enumerate([(0, 3), (1, 5)]):
        ref_model = copy.deepcopy(view.model)
        with torch.no_grad():
            # Qwen3-MoE stores down_proj as [E, H, I]
            ref_model.model.layers[layer].mlp.experts.down_proj[e].zero_()
        assert eff.loss_S[n] == pytest.approx(next_token_loss(ref_model, batches), rel=1e-12)
    assert (eff.delta_S != 0).all()
    assert eff.tokens == sum(b[:, 1:].numel() for b in batches)


def test_zeroing_bad_input(view):
    with pytest.raises(EmptySelectionError, match="batches is empty"):
        zeroing_effect(view, [(0, 1)], [])
    with pytest.raises(AnalysisInputError, match=r"batches\[0\]: expected an int64 tensor"):
        next_token_loss(view.model, [torch.zeros(2, 3)])
    with pytest.raises(EmptySelectionError, match="no row has 2 or more tokens"):
        next_token_loss(view.model, [torch.zeros(2, 1, dtype=torch.int64)])
    with pytest.raises(AnalysisInputError, match="experts: layer 7 has no MoE block"):
        zeroing_effect(view, [(7, 0)], _batches())
    with pytest.raises(AnalysisInputError, match="expert: expected 0..7 for layer 0, got 8"):
        zeroing_effect(view, [(0, 8)], _batches())


def test_trace_batches_groups_sequences_by_length():
    tok = np.arange(10)
    seq = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    got = trace_batches(tok, seq)
    assert [b.tolist() for b in got] == [[[3, 4], [8, 9]], [[0, 1, 2], [5, 6, 7]]]
    assert sum(b.numel() for b in trace_batches(tok, seq, max_tokens=4)) == 5
    with pytest.raises(EmptySelectionError):
        trace_batches(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
