"""Routing hooks under transformers' fast experts kernels, and hook handles as context managers."""

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models import open_model, reference_route
from moelab.models.tiny import tiny_model


def test_hooks_under_grouped_mm_float32():
    """The default fast path (grouped_mm, float32) calls the experts with the same arguments."""
    model = tiny_model("Qwen3-MoE", dtype=torch.float32)
    view = open_model(model, experts_implementation="grouped_mm")
    assert model.config._experts_implementation == "grouped_mm"
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    events = []
    with torch.no_grad():
        plain = model(ids).logits
        with view.blocks[0].register_routing_hook(events.append):
            hooked = model(ids).logits
        model(ids)
    assert torch.equal(plain, hooked)
    assert len(events) == 1
    ev = events[0]
    _, ref_ids, ref_w = reference_route(view.blocks[0], ev.hidden_TH)
    order, ref_order = ev.ids_TK.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ev.ids_TK.gather(-1, order), ref_ids.gather(-1, ref_order))
    torch.testing.assert_close(
        ev.weights_TK.gather(-1, order).double(), ref_w.gather(-1, ref_order), rtol=1e-5, atol=1e-6
    )


def test_hook_sees_every_forward_until_removed():
    view = open_model(tiny_model("Mixtral"))
    block = view.blocks[1]
    seen = []
    handle = block.register_routing_hook(lambda ev: seen.append(ev.ids_TK.shape))
    ids = torch.randint(0, 64, (1, 3))
    with torch.no_grad():
        view.model(ids)
        view.model(torch.randint(0, 64, (2, 4)))
        handle.remove()
        with pytest.raises(MoelabError, match="already removed"):
            handle.remove()  # a second removal is a mistake worth naming
        view.model(ids)
    assert seen == [(3, 2), (8, 2)]
