"""``route_to_rank`` (SCMoE's weak pass) on every family, against a float64 per-token reference.

The reference finds token t's rank-r expert as the one the family's rule adds when its top-k grows
from r to r+1 (``reference_route`` of the view at top_k = r and r+1: independent of
``selection_order``), and weighs it by the family formula written out per token. Tolerance as in
test_edits.py: relative (Frobenius) error <= 1e-6 against the float64 reference.
"""

from dataclasses import replace

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models import open_model, reference_route
from moelab.models.reference import _shared_forward, expert_forward, expert_input
from moelab.models.tiny import TINY_CONFIGS, native_block_output, tiny_model
from moelab.steer import route_to_rank

TOL = 1e-6


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def view(request):
    return open_model(tiny_model(request.param))


def _rank_expert(block, x_TH, r):
    """Token t's rank-r expert: the one in the rule's top-(r+1) and not in its top-r."""
    bigger = set_rows(reference_route(replace(block, top_k=r + 1), x_TH)[1])
    smaller = set_rows(reference_route(replace(block, top_k=r), x_TH)[1]) if r else [set()] * len(bigger)
    out = []
    for a, b in zip(bigger, smaller, strict=True):
        (e,) = a - b
        out.append(e)
    return out


def set_rows(ids_TK):
    return [set(row.tolist()) for row in ids_TK]


def _lone_weight(block, logits_E, e):
    """The family formula for a token whose only expert is e (softmax / sigmoid scoring)."""
    probs = torch.softmax(logits_E, -1) if block.scoring == "softmax" else torch.sigmoid(logits_E)
    w = probs[e]
    if block.norm_topk_prob:
        w = w / max(abs(float(w)), block.norm_min or 1e-30)
    return w * block.routed_scaling_factor


def _reference_output(block, x_TH, experts, weights):
    out = torch.zeros_like(x_TH)
    for t, (e, w) in enumerate(zip(experts, weights, strict=True)):
        y = expert_forward(block, e, expert_input(block, x_TH[t:t + 1], w.reshape(1)))
        out[t] = (y * w if block.combine == "output" else y)[0]
    if block.shared is not None:
        out = out + _shared_forward(block.shared, x_TH)
    if block.output_bias is not None:
        out = out + block.output_bias.to(torch.float64)
    return out


@pytest.mark.parametrize("rank", [0, 1])
def test_route_to_rank_equals_the_per_token_reference(view, rank):
    torch.manual_seed(5)
    b = view.blocks[-1]
    x_TH = torch.randn(7, b.hidden_size, dtype=torch.float64)
    logits_TE = reference_route(b, x_TH)[0]
    experts = _rank_expert(b, x_TH, rank)
    if b.scoring == "sparsemixer":  # its weight has no closed form per token: the top-1 rule's, at rank 0
        if rank:
            pytest.skip("SparseMixer: weights checked at rank 0 (the rule's own top-1)")
        weights = reference_route(replace(b, top_k=1), x_TH)[2][:, 0]
    else:
        weights = torch.stack([_lone_weight(b, logits_TE[t], e) for t, e in enumerate(experts)])
    seen = []
    with torch.no_grad(), route_to_rank(view, {b.layer: rank}) as h, b.register_routing_hook(seen.append):
        got = native_block_output(b, x_TH.unsqueeze(0))[0]
    want = _reference_output(b, x_TH, experts, weights)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= TOL, (b.family, rel)
    ev = seen[0]
    assert ev.mask_TK is not None and ev.mask_TK[:, 0].all() and not ev.mask_TK[:, 1:].any()
    assert ev.ids_TK[:, 0].tolist() == experts
    assert h.counts[b.layer]["tokens"] == 7


def test_route_to_rank_at_rank_zero_is_the_rules_top1(view):
    """At top_k = 1 the edit must change nothing: rank 0 with the lone-choice weight is the rule."""
    b = view.blocks[0]
    x_TH = torch.randn(6, b.hidden_size, dtype=torch.float64)
    one = replace(b, top_k=1)
    _, ids, w = reference_route(one, x_TH)
    from moelab.models.rule import selection_order, single_expert

    logits = reference_route(b, x_TH)[0]
    order, ok = selection_order(b, logits)
    assert ok[:, 0].all() and order[:, 0].tolist() == ids[:, 0].tolist()
    assert torch.allclose(single_expert(b, logits, order[:, 0]), w[:, 0], rtol=1e-12, atol=1e-12)


def test_route_to_rank_bad_input(view):
    b = view.blocks[0]
    for bad in (-1, b.num_experts, 1.5, True):
        with pytest.raises(MoelabError, match="route_to_rank: layer .*rank must be an int"):
            route_to_rank(view, {b.layer: bad})
    with pytest.raises(MoelabError, match="not an MoE layer"):
        route_to_rank(view, {10_000: 0})
