"""Routing edits on every family: the stock edits of moelab.steer against the float64 reference.

Tolerance: relative error (Frobenius) <= 1e-6 between the family's block under an edit (float64
model) and ``reference_forward`` of a view whose router bias carries the edit; several families
route in float32, which bounds agreement near 1e-7 (as in tests/models/test_families.py).
"""

from dataclasses import replace

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models import open_model, reference_forward, reference_route
from moelab.models.tiny import TINY_CONFIGS, native_block_output, tiny_model
from moelab.routing import Routing
from moelab.steer import experts_off, experts_on, logit_offsets, scale_weights, skip_below

TOL = 1e-6


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def with_logit_bias(block, bias_E):
    """The block's view with ``bias_E`` added to its router logits (for the reference forward)."""
    base = block.router_bias if block.router_bias is not None else 0.0
    return replace(block, router_bias=base + bias_E)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def view(request):
    return open_model(tiny_model(request.param))


def _tokens(view, shape=(2, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, view.model.config.vocab_size, shape, generator=g)


def test_identity_edit_leaves_outputs_identical(view):
    ids = _tokens(view)
    with torch.no_grad():
        plain = view.model(ids).logits
        handles = [b.register_routing_edit(lambda b, h, r: r) for b in view.blocks]
        edited = view.model(ids).logits
        for h in handles:
            h.remove()
    assert torch.equal(plain, edited)


def test_experts_off_equals_reference_with_masked_logits(view):
    torch.manual_seed(3)
    b = view.blocks[-1]
    off = [0, b.num_experts - 1]
    x = torch.randn(3, 5, b.hidden_size, dtype=torch.float64)
    bias = torch.zeros(b.num_experts, dtype=torch.float64)
    bias[off] = float("-inf")
    seen = []
    with torch.no_grad(), experts_off(view, {b.layer: off}) as h, b.register_routing_hook(seen.append):
        got = native_block_output(b, x)
    want = reference_forward(with_logit_bias(b, bias), x)
    assert rel_err(got, want) <= TOL, b.family
    ev = seen[0]
    real = ev.ids_TK if ev.mask_TK is None else ev.ids_TK[ev.mask_TK]
    assert not torch.isin(real, torch.tensor(off)).any(), "an observer saw a switched-off expert"
    plain_ids = reference_route(b, x.reshape(-1, b.hidden_size))[1]
    touched = torch.isin(plain_ids, torch.tensor(off)).any(-1).sum()
    c = h.counts[b.layer]
    assert c["tokens"] == 15
    if b.n_group:  # removing an unchosen expert can change which groups win
        assert c["affected"] >= int(touched)
    else:
        assert c["affected"] == int(touched)


def test_experts_on_puts_experts_in_every_token(view):
    b = view.blocks[0]
    on = [1] if b.top_k == 1 else [1, 2]
    seen = []
    with torch.no_grad(), experts_on(view, {b.layer: on}), b.register_routing_hook(seen.append):
        view.model(_tokens(view))
    ev = seen[0]
    for e in on:
        assert (ev.ids_TK == e).any(-1).all(), f"{b.family}: expert {e} missing from some token"
    assert torch.isfinite(ev.weights_TK).all()


def test_logit_offsets_equal_reference_and_gradients_match_finite_differences(view):
    torch.manual_seed(4)
    b = view.blocks[0]
    x = torch.randn(2, 3, b.hidden_size, dtype=torch.float64)
    off = (0.3 * torch.randn(b.num_experts, dtype=torch.float64)).requires_grad_()
    with logit_offsets(view, {b.layer: off}):
        with torch.no_grad():
            got = native_block_output(b, x)
        assert rel_err(got, reference_forward(with_logit_bias(b, off.detach()), x)) <= TOL

        def f(o):
            with torch.no_grad():
                off.copy_(o)
                return native_block_output(b, x).pow(2).sum()

        loss = native_block_output(b, x).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, off)
        eps = 1e-6
        base = off.detach().clone()
        for e in range(b.num_experts):
            step = torch.zeros_like(base)
            step[e] = eps
            fd = (f(base + step) - f(base - step)) / (2 * eps)
            assert abs(float(fd) - float(grad[e])) <= 1e-5 * max(1.0, abs(float(fd))), (b.family, e)
        f(base)


def test_gradients_flow_through_an_edit_to_router_and_experts(view):
    b = view.blocks[0]
    view.model.zero_grad()
    with experts_off(view, {b.layer: [0]}), logit_offsets(view, {b.layer: torch.zeros(b.num_experts, dtype=torch.float64)}):
        view.model(_tokens(view)).logits.pow(2).mean().backward()

    def param_of(t):
        ptr = t.untyped_storage().data_ptr()
        return next(p for p in view.model.parameters() if p.untyped_storage().data_ptr() == ptr)

    for name, t in (("router", b.router_weight), ("experts", b.down)):
        grad = param_of(t).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_scale_weights_multiplies_combine_weights(view, assert_scaled):
    b = view.blocks[0]
    plain, scaled = [], []
    ids = _tokens(view)
    with torch.no_grad():
        with b.register_routing_hook(plain.append):
            view.model(ids)
        with scale_weights(view, {b.layer: {1: 2.5}}), b.register_routing_hook(scaled.append):
            view.model(ids)
    assert_scaled(plain[0], scaled[0], 1, 2.5, rtol=TOL)


def test_skip_below_masks_weak_slots_and_counts():
    view = open_model(tiny_model("Mixtral"))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = view.model(ids).logits
        with skip_below(view, {b.layer: 0.0 for b in view.blocks}) as h:
            assert torch.equal(view.model(ids).logits, plain), "beta=0 must skip nothing"
        seen = []
        with skip_below(view, {b.layer: 1.0 for b in view.blocks}) as h, \
                view.blocks[0].register_routing_hook(seen.append):
            view.model(ids)
    c = h.counts[view.blocks[0].layer]
    assert c["candidates"] == 16 and c["skipped"] == 16  # top-2: every second slot is weaker
    ev = seen[0]
    assert ev.mask_TK is not None and (ev.mask_TK.sum(-1) == 1).all()
    assert torch.allclose(ev.weights_TK.sum(-1), torch.ones(16, dtype=ev.weights_TK.dtype))


def test_edits_compose_in_registration_order_and_remove_restores():
    view = open_model(tiny_model("Qwen3-MoE"))
    b = view.blocks[0]
    order = []

    def tag(name):
        def edit(block, hidden, routing):
            order.append(name)
            return routing.replace(weights_TK=routing.weights_TK * 2 if name == "a" else routing.weights_TK + 1)
        return edit

    seen, ids = [], _tokens(view)
    with torch.no_grad():
        plain = view.model(ids).logits
        with b.register_routing_hook(seen.append):
            view.model(ids)
        ha, hb = b.register_routing_edit(tag("a")), b.register_routing_edit(tag("b"))
        with b.register_routing_hook(seen.append):
            view.model(ids)
        ha.remove()
        hb.remove()
        assert torch.equal(view.model(ids).logits, plain)
    assert order == ["a", "b"]
    torch.testing.assert_close(seen[1].weights_TK, seen[0].weights_TK * 2 + 1)


def test_new_logits_with_same_ids_reselect_by_the_family_rule():
    view = open_model(tiny_model("DeepSeek-V3"))
    b = view.blocks[0]
    seen = []

    def push_to_3(block, hidden, routing):
        boost = torch.zeros(block.num_experts, dtype=routing.logits_TE.dtype)
        boost[3] = 50.0
        return routing.replace(logits_TE=routing.logits_TE + boost)

    with torch.no_grad(), b.register_routing_edit(push_to_3), b.register_routing_hook(seen.append):
        view.model(_tokens(view))
    assert (seen[0].ids_TK == 3).any(-1).all()


def test_bad_input_is_named():
    view = open_model(tiny_model("Mixtral"))
    layer, E, k = view.blocks[0].layer, view.blocks[0].num_experts, view.blocks[0].top_k
    dense = [i for i in range(view.num_layers + 1) if i not in {b.layer for b in view.blocks}]
    with pytest.raises(MoelabError, match=r"expert 99 is not an expert id in \[0, 4\)"):
        experts_off(view, {layer: [99]})
    with pytest.raises(MoelabError, match="is not an MoE layer"):
        experts_off(view, {dense[0]: [0]})
    with pytest.raises(MoelabError, match="top_k=2 slots"):
        experts_on(view, {layer: list(range(k + 1))})
    with pytest.raises(MoelabError, match="fewer than top_k"):
        experts_off(view, {layer: list(range(E - 1))})
    with pytest.raises(MoelabError, match=r"shape \[E=4\], got \(3,\)"):
        logit_offsets(view, {layer: torch.zeros(3)})
    with pytest.raises(MoelabError, match="beta must be a number"):
        skip_below(view, {layer: 1.5})
    with pytest.raises(MoelabError, match="must return a moelab.routing.Routing"):
        with torch.no_grad(), view.blocks[0].register_routing_edit(lambda b, h, r: None):
            view.model(torch.zeros(1, 3, dtype=torch.long))
    h = experts_off(view, {layer: [0]})
    h.remove()
    with pytest.raises(MoelabError, match="already removed"):
        h.remove()


def test_routing_type_masked_ids():
    r = Routing(None, torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]))
    assert r.masked_ids().tolist() == [[0, -1]]
    assert r.tokens_per_expert(3).tolist() == [1, 0, 0]
    with pytest.raises(MoelabError, match="no logits"):
        _ = r.num_experts


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_edits_under_the_moelab_experts_backend(family):
    """The seam and the experts backend compose: experts_off on a model running moelab's experts
    equals the float64 reference with masked logits, and experts_on reaches every token."""
    view = open_model(tiny_model(family), experts_implementation="moelab")
    torch.manual_seed(5)
    b = view.blocks[-1]
    x = torch.randn(2, 5, b.hidden_size, dtype=torch.float64)
    bias = torch.zeros(b.num_experts, dtype=torch.float64)
    bias[[0]] = float("-inf")
    with torch.no_grad(), experts_off(view, {b.layer: [0]}):
        got = native_block_output(b, x)
    assert rel_err(got, reference_forward(with_logit_bias(b, bias), x)) <= TOL
    seen = []
    with torch.no_grad(), experts_on(view, {b.layer: [1]}), b.register_routing_hook(seen.append):
        view.model(_tokens(view))
    assert (seen[0].ids_TK == 1).any(-1).all()


def test_experts_off_one_token_at_a_time_equals_reference(view):
    """Token by token (as in a decode step), so tokens that chose no switched-off expert take
    experts_off's shortcut and the others the full re-selection; both equal the reference."""
    torch.manual_seed(5)
    b = view.blocks[-1]
    x = torch.randn(12, 1, b.hidden_size, dtype=torch.float64)
    ids = reference_route(b, x.reshape(-1, b.hidden_size))[1]
    chosen_by = torch.stack([(ids == e).any(-1).sum() for e in range(b.num_experts)])
    off = [int(((chosen_by - 6).abs()).argmin())]  # an expert some tokens chose and others did not
    assert 0 < int(chosen_by[off[0]]) < 12, "both paths must run"
    bias = torch.zeros(b.num_experts, dtype=torch.float64)
    bias[off] = float("-inf")
    with torch.no_grad(), experts_off(view, {b.layer: off}):
        for t in range(12):
            got = native_block_output(b, x[t:t + 1])
            want = reference_forward(with_logit_bias(b, bias), x[t:t + 1])
            assert rel_err(got, want) <= TOL, (b.family, t)
