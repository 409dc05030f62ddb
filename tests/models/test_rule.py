"""The selection rule's shortcuts (no mask multiply when every slot is real, the L1 norm as a sum,
no multiply by a scaling factor of 1) against a slow per-token loop written from the rule's
definition, in float64 on random logits with some -inf entries. Tolerance 1e-12 (same float64
operations in another order)."""

from dataclasses import replace

import pytest
import torch

from moelab.models import open_model
from moelab.models.rule import route_logits, select_barred, select_slots
from moelab.models.tiny import tiny_model

TOL = 1e-12


def slow_rule(block, logits_TE):
    """Per token: scores, the selection key (+ correction bias, -inf logits never chosen), the top-k
    keys, weights = chosen scores, renormalised by their p-norm, times the scaling factor."""
    T, E = logits_TE.shape
    ids, ws, masks = [], [], []
    for t in range(T):
        row = logits_TE[t]
        scores = torch.softmax(row, -1) if block.scoring == "softmax" else torch.sigmoid(row)
        key = scores + (block.correction_bias.double() if block.correction_bias is not None else 0)
        order = sorted(range(E), key=lambda e: float("inf") if torch.isneginf(row[e]) else -float(key[e]))
        chosen = order[:block.top_k]
        real = [not bool(torch.isneginf(row[e])) for e in chosen]
        w = torch.stack([scores[e] if r else scores.new_zeros(()) for e, r in zip(chosen, real, strict=True)])
        if block.norm_topk_prob:
            w = w / max(float(w.abs().pow(block.norm_p).sum() ** (1 / block.norm_p)), block.norm_min, 1e-30)
        ids.append(chosen)
        ws.append(w * block.routed_scaling_factor)
        masks.append(real)
    return torch.tensor(ids), torch.stack(ws), torch.tensor(masks)


@pytest.mark.parametrize("family,changes", [
    ("DeepSeek-V3", {}),
    ("DeepSeek-V3", {"routed_scaling_factor": 2.5}),
    ("Qwen3-MoE", {}),
    ("Qwen3-MoE", {"norm_p": 2.0}),
    ("Qwen3-MoE", {"norm_topk_prob": False, "routed_scaling_factor": 0.5}),
])
def test_rule_shortcuts_equal_slow_rule(family, changes):
    block = replace(open_model(tiny_model(family)).blocks[0], n_group=None, topk_group=None, **changes)
    g = torch.Generator().manual_seed(0)
    E, k = block.num_experts, block.top_k
    logits = torch.randn(16, E, generator=g, dtype=torch.float64)
    logits[3, :E - 1] = float("-inf")  # one finite choice: k - 1 masked slots
    logits[5, 0] = float("-inf")
    ids, w, mask = route_logits(block, logits)
    sids, sw, smask = slow_rule(block, logits)
    assert torch.equal(mask, smask) and not bool(mask[3, 1:].any())
    real = mask
    assert torch.equal(ids[real], sids[real])
    assert (w - sw).abs().max().item() <= TOL
    ids2, w2, mask2 = select_slots(block, logits)
    assert torch.equal(ids2, ids) and torch.equal(w2, w) and torch.equal(mask2, mask)
    finite = logits[6:]  # every slot real: the mask is None
    ids3, w3, mask3 = select_slots(block, finite)
    assert mask3 is None and torch.equal(w3, route_logits(block, finite)[1]) and k <= E


@pytest.mark.parametrize("family,changes", [
    ("DeepSeek-V3", {}),
    ("DeepSeek-V3", {"routed_scaling_factor": 2.5}),
    ("Qwen3-MoE", {}),
    ("Qwen3-MoE", {"norm_topk_prob": False, "routed_scaling_factor": 0.5}),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_select_barred_equals_select_slots_bit_for_bit(family, changes, dtype):
    """The selection edits' rule: barring by an additive -inf key offset gives the general rule's
    ids and weights exactly, with the barred experts' logits -inf (hard off) or finite (soft off)."""
    block = replace(open_model(tiny_model(family)).blocks[0], n_group=None, topk_group=None, **changes)
    g = torch.Generator().manual_seed(1)
    E = block.num_experts
    logits = torch.randn(32, E, generator=g, dtype=torch.float64).to(dtype)
    barred = torch.zeros(E, dtype=torch.bool)
    barred[[0, E - 2]] = True
    offset = torch.zeros(E, dtype=dtype).masked_fill(barred, float("-inf"))
    for edited in (logits + offset, logits):
        ids, w = select_barred(block, edited, offset)
        ids_ref, w_ref, mask_ref = select_slots(block, edited, None, barred)
        assert mask_ref is None and torch.equal(ids, ids_ref) and torch.equal(w, w_ref)
        assert not torch.isin(ids, torch.tensor([0, E - 2])).any()
