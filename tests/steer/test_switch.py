"""SteerMoE soft switching on every family, against slow references.

Tolerances: routing weights compared in float64 models at 1e-12 (relative); block outputs at 1e-6
(Frobenius, as tests/steer/test_edits.py: several families route in float32).
"""

import math
from dataclasses import replace

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models import open_model, reference_forward
from moelab.models.rule import route_logits
from moelab.models.tiny import TINY_CONFIGS, native_block_output, tiny_model
from moelab.steer import experts_off, switch_experts
from moelab.steer.switch import switched_logits, switched_logits_reference

TOL = 1e-6


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def view(request):
    return open_model(tiny_model(request.param))


def _tokens(view, shape=(2, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, view.model.config.vocab_size, shape, generator=g)


def _route(view, block, edit=None, seed=0):
    seen = []
    with torch.no_grad(), block.register_routing_hook(seen.append):
        if edit is None:
            view.model(_tokens(view, seed=seed))
        else:
            with edit:
                view.model(_tokens(view, seed=seed))
    return seen[0]


def test_switched_logits_equal_the_slow_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 6, generator=g, dtype=torch.float64)
    on = torch.zeros(6, dtype=torch.bool)
    off = torch.zeros(6, dtype=torch.bool)
    on[[1, 4]] = True
    off[[0]] = True
    got = switched_logits(logits, on, off, 0.25)
    want = switched_logits_reference(logits, [1, 4], [0], 0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_on_experts_in_every_token_off_never(view):
    b = view.blocks[-1]
    on = [1] if b.top_k == 1 else [1, 2]
    off = [0, b.num_experts - 1]
    ev = _route(view, b, switch_experts(view, on={b.layer: on}, off={b.layer: off}, strength=0.01))
    real = ev.routing.real_mask()
    for e in on:
        assert ((ev.ids_TK == e) & real).any(-1).all(), f"{b.family}: on expert {e} missing"
    assert not (torch.isin(ev.ids_TK, torch.tensor(off)) & real).any(), f"{b.family}: off expert chosen"
    assert torch.isfinite(ev.weights_TK).all()


def test_weights_follow_the_family_rule_on_the_edited_logits(view):
    """The routing the experts get equals the family's rule run on SteerMoE's edited logits, with
    the on experts forced and the off ones barred (float64 model)."""
    b = view.blocks[0]
    on, off = [1], [0]
    plain = _route(view, b)
    ev = _route(view, b, switch_experts(view, on={b.layer: on}, off={b.layer: off}, strength=0.3))
    edited = switched_logits_reference(plain.logits_TE, on, off, 0.3)
    flags = torch.zeros(b.num_experts, dtype=torch.bool)
    forced, barred = flags.clone(), flags.clone()
    forced[on], barred[off] = True, True
    ids, w, _ = route_logits(b, edited, forced, barred)
    want = torch.zeros(ids.shape[0], b.num_experts, dtype=torch.float64).scatter(1, ids, w)
    got = torch.zeros_like(want).scatter(1, ev.ids_TK, ev.weights_TK.double())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    if b.correction_bias is None and not b.n_group and b.scoring != "sparsemixer":
        # selection monotone in the logits: the edited logits alone give this routing, no forcing
        ids0, w0, _ = route_logits(b, edited)
        alone = torch.zeros_like(want).scatter(1, ids0, w0)
        torch.testing.assert_close(got, alone, rtol=1e-6, atol=1e-9)


def test_large_strength_off_equals_the_hard_mask(view):
    torch.manual_seed(3)
    b = view.blocks[-1]
    x = torch.randn(3, 5, b.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        with switch_experts(view, off={b.layer: [0]}, strength=80.0):
            soft = native_block_output(b, x)
        with experts_off(view, {b.layer: [0]}):
            hard = native_block_output(b, x)
    bias = torch.zeros(b.num_experts, dtype=torch.float64)
    bias[0] = -math.inf
    base = b.router_bias if b.router_bias is not None else 0.0
    want = reference_forward(replace(b, router_bias=base + bias), x)
    assert ((soft - want).norm() / want.norm()).item() <= TOL, b.family
    assert ((soft - hard).norm() / hard.norm()).item() <= TOL, b.family


def test_strength_moves_weight_to_the_on_expert(view):
    """Softmax routers: the on expert's weight grows with strength and takes the whole token's
    weight when strength is large; sigmoid routers: its score tends to 1."""
    b = view.blocks[0]
    share = []
    for strength in (0.0, 1.0, 40.0):
        ev = _route(view, b, switch_experts(view, on={b.layer: [1]}, strength=strength))
        w_on = (ev.weights_TK.double() * (ev.ids_TK == 1)).sum(-1)
        share.append((w_on / ev.weights_TK.double().sum(-1)).min().item())
    assert share[0] <= share[1] + 1e-9 <= share[2] + 2e-9, (b.family, share)
    if b.scoring == "softmax":
        assert share[2] > 1 - 1e-9, (b.family, share)
        ev = _route(view, b, switch_experts(view, on={b.layer: [1]}, strength=40.0))
        w_on = (ev.weights_TK.double() * (ev.ids_TK == 1)).sum(-1)
        torch.testing.assert_close(w_on, torch.full_like(w_on, b.routed_scaling_factor), rtol=1e-9, atol=0)


def test_strength_zero_ties_the_on_expert_with_the_top_score():
    """Softmax, renormalised top-k (Qwen3-MoE): at strength 0 the on expert's weight equals the
    token's largest weight (it shares the row maximum)."""
    view = open_model(tiny_model("Qwen3-MoE"))
    b = view.blocks[0]
    ev = _route(view, b, switch_experts(view, on={b.layer: [3]}, strength=0.0))
    w_on = (ev.weights_TK * (ev.ids_TK == 3)).sum(-1)
    torch.testing.assert_close(w_on, ev.weights_TK.max(-1).values, rtol=1e-12, atol=0)


def test_remove_restores_the_model():
    view = open_model(tiny_model("Mixtral"))
    ids = _tokens(view)
    with torch.no_grad():
        plain = view.model(ids).logits
        h = switch_experts(view, on={0: [1]}, off={0: [2]})
        assert not torch.equal(view.model(ids).logits, plain)
        h.remove()
        assert torch.equal(view.model(ids).logits, plain)
    assert h.counts[0]["tokens"] == 14


def test_bad_input_is_named():
    view = open_model(tiny_model("Mixtral"))
    layer = view.blocks[0].layer
    with pytest.raises(MoelabError, match="both on and off"):
        switch_experts(view, on={layer: [1]}, off={layer: [1]})
    with pytest.raises(MoelabError, match="only top_k=2 slots"):
        switch_experts(view, on={layer: [0, 1, 2]})
    with pytest.raises(MoelabError, match="fewer than top_k"):
        switch_experts(view, off={layer: [0, 1, 2]})
    with pytest.raises(MoelabError, match=r"expert 7 is not an expert id in \[0, 4\)"):
        switch_experts(view, off={layer: [7]})
    with pytest.raises(MoelabError, match="is not an MoE layer"):
        switch_experts(view, off={99: [0]})
    with pytest.raises(MoelabError, match="strength must be a finite number >= 0"):
        switch_experts(view, off={layer: [0]}, strength=-1)
    with pytest.raises(MoelabError, match="give experts"):
        switch_experts(view)


def test_soft_off_one_token_at_a_time_equals_the_batch(view):
    """Token by token (a decode step): tokens that chose no switched-off expert take the soft-off
    shortcut where the family's weights ignore unchosen logits, the others the re-selection; each
    equals the same token's output in one batch (float32 routing: 1e-6), and the counts agree."""
    torch.manual_seed(7)
    b = view.blocks[-1]
    x = torch.randn(12, 1, b.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        with switch_experts(view, off={b.layer: [0, 1]}, strength=0.5) as h:
            batch = native_block_output(b, x.reshape(1, 12, -1)).reshape(12, 1, -1)
            affected = h.counts[b.layer]["affected"]
            h.reset()
            for t in range(12):
                torch.testing.assert_close(native_block_output(b, x[t:t + 1]), batch[t:t + 1], rtol=1e-6, atol=1e-9)
            assert h.counts[b.layer]["affected"] == affected and h.counts[b.layer]["tokens"] == 12
