"""Selection edits (``experts_off``, SteerMoE's off-only switch, RICE's ``scale_weights``): as a
block's first edit they stand in for the router's own selection (moelab.models.edits). The fast path against the general one (the
same edit behind an identity edit: the family's selection, then the rule's re-selection) and against
the float64 reference with -inf logits.

Tolerances: the two paths of a barring edit run the same rule on the same selection key, so
routing, block outputs and counts agree exactly (float64 and float32 models); ``scale_weights``'
general path scales the family's own weights, its fast path the rule's: 1e-6, as against
``reference_forward`` in tests/steer/test_edits.py (several families route in float32).
"""

import math
from dataclasses import replace

import pytest
import torch

from moelab.models import open_model, reference_forward
from moelab.models.reference import expert_forward, reference_route
from moelab.models.tiny import native_block_output, tiny_model
from moelab.steer import experts_off, scale_weights, switch_experts

# (family, config overrides): the families whose adapters let the seam stand in for the router
CASES = [
    ("DeepSeek-V3", dict(n_group=1, topk_group=1)),  # the shipped fine model's routing
    ("DeepSeek-V2", dict(topk_method="greedy", n_group=1, topk_group=1)),  # softmax, no renormalisation
    ("GLM4-MoE", {}),
    ("Qwen3-MoE", {}),
    ("Qwen2-MoE", {}),  # norm_topk_prob False: the weights see the switched-off logits
    ("Mixtral", {}),
    ("OLMoE", {}),
    ("MiniMax", {}),
    ("GPT-OSS", {}),
]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _view(family, dtype=torch.float64, **overrides):
    return open_model(tiny_model(family, dtype=dtype, **overrides))


def _off(block):
    return [0, block.num_experts - 1] if block.num_experts - 2 >= block.top_k else [0]


def _edits(view, block, kind):
    off = {block.layer: _off(block)}
    if kind == "off":
        return experts_off(view, off)
    if kind == "scale":
        return scale_weights(view, {block.layer: dict.fromkeys(off[block.layer], 2.5)})
    return switch_experts(view, off=off, strength=0.3)


class _OwnCalls:
    """Counts calls of the router class's own forward (the family's selection)."""

    def __init__(self, monkeypatch, router):
        self.n, cls = 0, type(router)
        own = cls.forward

        def counted(mod, *args, **kwargs):
            self.n += 1
            return own(mod, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", counted)


def _run(view, block, x, kind, general: bool):
    """Block output, the routing a hook saw and the counts, under the edit: first on the block
    (fast) or behind an identity edit (general)."""
    seen = []
    ident = block.register_routing_edit(lambda b, h, r: r) if general else None
    with torch.no_grad(), _edits(view, block, kind) as h, block.register_routing_hook(seen.append):
        out = native_block_output(block, x)
    if ident is not None:
        ident.remove()
    return out, seen[0], dict(h.counts[block.layer])


def _by_id(ev):
    """The event's slots sorted by expert id."""
    ids_TK, order_TK = ev.ids_TK.sort(-1)
    return replace(ev, ids_TK=ids_TK, weights_TK=ev.weights_TK.gather(-1, order_TK))


def _scaled_reference(b, x, experts, factor):
    """The block's float64 reference output with ``experts``' combine weights times ``factor``: the
    plain reference plus ``(factor - 1) w_k E_k(x)`` for each slot that chose one (a token at a time)."""
    _, ids_TK, w_TK = reference_route(b, x)
    x_TH = x.reshape(-1, b.hidden_size).to(torch.float64)
    extra = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for e, w in zip(ids_TK[t].tolist(), w_TK[t].tolist(), strict=True):
            if e in experts:
                extra[t] += (factor - 1) * w * expert_forward(b, e, x_TH[t:t + 1])[0]
    return reference_forward(b, x) + extra.reshape(x.shape)


@pytest.mark.parametrize("kind", ["off", "soft-off", "scale"])
@pytest.mark.parametrize("family,overrides", CASES, ids=[c[0] for c in CASES])
def test_fast_path_equals_the_general_path(monkeypatch, family, overrides, kind):
    view = _view(family, **overrides)
    b = view.blocks[-1]
    torch.manual_seed(5)
    x = torch.randn(3, 6, b.hidden_size, dtype=torch.float64)
    calls = _OwnCalls(monkeypatch, b.router_module)
    fast, ev_fast, c_fast = _run(view, b, x, kind, general=False)
    assert calls.n == 0, f"{family}: the router's own selection ran under a selection edit"
    slow, ev_slow, c_slow = _run(view, b, x, kind, general=True)
    assert calls.n == 1
    assert c_fast == c_slow, family
    assert c_fast["affected"] > 0 and c_fast["tokens"] == 18, family
    torch.testing.assert_close(ev_fast.logits_TE, ev_slow.logits_TE, rtol=0, atol=0)
    if kind == "scale":
        # the general path scales the family's own weights, the fast one the rule's: the same
        # experts, in the family's slot order or the rule's, and the same weights up to the
        # family's float32 routing (1e-6)
        assert rel_err(fast, slow) <= 1e-6, family
        ev_fast, ev_slow = _by_id(ev_fast), _by_id(ev_slow)
        assert torch.equal(ev_fast.ids_TK, ev_slow.ids_TK)
        torch.testing.assert_close(ev_fast.weights_TK, ev_slow.weights_TK, rtol=1e-6, atol=0)
        assert rel_err(fast, _scaled_reference(b, x, _off(b), 2.5)) <= 1e-6, family
        return
    assert torch.equal(fast, slow), family  # the same rule on the same key: bit for bit
    assert torch.equal(ev_fast.ids_TK, ev_slow.ids_TK) and torch.equal(ev_fast.weights_TK, ev_slow.weights_TK)
    if kind == "off":
        bias = torch.zeros(b.num_experts, dtype=torch.float64)
        bias[_off(b)] = -math.inf
        base = b.router_bias if b.router_bias is not None else 0.0
        assert rel_err(fast, reference_forward(replace(b, router_bias=base + bias), x)) <= 1e-6, family


@pytest.mark.parametrize("family,overrides", CASES[:1] + CASES[3:4] + CASES[5:6],
                         ids=["DeepSeek-V3", "Qwen3-MoE", "Mixtral"])
@pytest.mark.parametrize("kind", ["off", "scale"])
def test_fast_path_in_float32_equals_the_general_path(family, overrides, kind):
    """float32 models: the weights reach the experts in the family's dtype on both paths."""
    view = _view(family, dtype=torch.float32, **overrides)
    b = view.blocks[-1]
    torch.manual_seed(6)
    x = torch.randn(2, 9, b.hidden_size)
    fast, ev_fast, c_fast = _run(view, b, x, kind, general=False)
    slow, ev_slow, c_slow = _run(view, b, x, kind, general=True)
    assert ev_fast.weights_TK.dtype == ev_slow.weights_TK.dtype and c_fast == c_slow, family
    if kind == "scale":  # the family's weights or the rule's (float32 rounding)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(fast, slow), family


@pytest.mark.parametrize("kind", ["off", "scale"])
def test_one_token_calls_equal_the_batch(monkeypatch, kind):
    """Token by token (decode steps) through the fast path: each equals the same token within one
    batch (float32 routing: DeepSeek's router runs in float32, 1e-6), with the same counts."""
    view = _view("DeepSeek-V3", n_group=1, topk_group=1)
    b = view.blocks[-1]
    torch.manual_seed(7)
    x = torch.randn(10, 1, b.hidden_size, dtype=torch.float64)
    calls = _OwnCalls(monkeypatch, b.router_module)
    with torch.no_grad(), _edits(view, b, kind) as h:
        batch = native_block_output(b, x.reshape(1, 10, -1)).reshape(10, 1, -1)
        counts = dict(h.counts[b.layer])
        h.reset()
        for t in range(10):
            torch.testing.assert_close(native_block_output(b, x[t:t + 1]), batch[t:t + 1], rtol=1e-6, atol=1e-9)
        assert calls.n == 0 and dict(h.counts[b.layer]) == counts


def test_gradients_through_the_fast_path_equal_the_general_path():
    view = _view("Qwen3-MoE")
    b = view.blocks[0]
    router_w = b.router_module.weight
    torch.manual_seed(8)
    x = torch.randn(2, 5, b.hidden_size, dtype=torch.float64)
    grads = []
    for general in (False, True):
        ident = b.register_routing_edit(lambda b, h, r: r) if general else None
        with switch_experts(view, off={b.layer: [1]}, strength=0.5):
            (g,) = torch.autograd.grad(native_block_output(b, x).pow(2).sum(), router_w)
        grads.append(g)
        if ident is not None:
            ident.remove()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)


def test_group_limited_routing_takes_the_general_path(monkeypatch):
    """DeepSeek-V3 with groups: removing an unchosen expert can change which groups win, so the
    edit is not a selection edit there (its count would not be exact) and the router runs."""
    view = _view("DeepSeek-V3")
    b = view.blocks[-1]
    assert b.n_group and b.n_group > 1
    calls = _OwnCalls(monkeypatch, b.router_module)
    x = torch.randn(2, 4, b.hidden_size, dtype=torch.float64)
    with torch.no_grad(), experts_off(view, {b.layer: [0]}):
        native_block_output(b, x)
    assert calls.n == 1


def test_removing_the_edit_restores_the_router():
    view = _view("Mixtral")
    b = view.blocks[0]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = view.model(ids).logits
        with experts_off(view, {b.layer: [1]}):
            assert "forward" in vars(b.router_module)
            assert not torch.equal(view.model(ids).logits, plain)
        assert "forward" not in vars(b.router_module)
        assert torch.equal(view.model(ids).logits, plain)


def test_a_router_call_the_experts_never_saw_leaves_nothing_behind():
    """A direct router call under a selection edit, then the edit removed: the next block call
    routes its own token with the family's selection, not the earlier call's routing."""
    view = _view("DeepSeek-V3", n_group=1, topk_group=1)
    b = view.blocks[-1]
    torch.manual_seed(9)
    x = torch.randn(1, 3, b.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        with b.register_routing_hook(lambda ev: None):  # keeps the seam installed throughout
            want = native_block_output(b, x)
            with experts_off(view, {b.layer: _off(b)}):
                b.router_module(torch.randn(6, b.hidden_size, dtype=torch.float64))
            torch.testing.assert_close(native_block_output(b, x), want, rtol=0, atol=0)


# the counting function of each edit's deferred count, and the module that calls it
_COUNTERS = [("off", "edit_kit", "barred_chosen", 2), ("scale", "edits", "tokens_choosing", 1)]


@pytest.mark.parametrize("kind,module,counter,arg", _COUNTERS, ids=[c[0] for c in _COUNTERS])
def test_deferred_affected_counts_equal_the_per_call_count(monkeypatch, kind, module, counter, arg):
    """One-token calls' ``affected`` is counted in batches (and when ``counts`` is read): the same
    total as counting each call at once, whatever the number of calls."""
    import importlib

    from moelab.steer import edit_kit as E

    view = _view(*CASES[0][:1], **CASES[0][1])
    b = view.blocks[-1]
    torch.manual_seed(7)
    xs = [torch.randn(1, 1, b.hidden_size, dtype=torch.float64) for _ in range(E._DEFER_CALLS + 9)]
    mod = importlib.import_module(f"moelab.steer.{module}")
    own, calls = getattr(mod, counter), []
    monkeypatch.setattr(mod, counter, lambda *a: calls.append(a[arg].ids_TK.shape[0]) or own(*a))

    def counts(defer: bool, upto: int) -> dict:
        old = E._DEFER_TOKENS
        E._DEFER_TOKENS = old if defer else 0
        try:
            with torch.no_grad(), _edits(view, b, kind) as h:
                for x in xs[:upto]:
                    native_block_output(b, x)
                return dict(h.counts[b.layer])
        finally:
            E._DEFER_TOKENS = old

    for upto in (1, E._DEFER_CALLS - 1, E._DEFER_CALLS, len(xs)):
        calls.clear()
        eager = counts(False, upto)
        assert calls == [1] * upto  # one count per call
        calls.clear()
        deferred = counts(True, upto)
        assert deferred == eager and eager["tokens"] == upto
        assert calls == ([E._DEFER_CALLS] if upto >= E._DEFER_CALLS else []) + ([upto % E._DEFER_CALLS] if upto % E._DEFER_CALLS else [])
    assert counts(False, len(xs))["affected"] > 0
