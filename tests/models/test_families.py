"""Every supported family: the view reproduces the family's own MoE blocks, hooks and writes are right.

Tolerance: relative error (Frobenius) <= 1e-6 between ``reference_forward`` (float64) and the
family's block in float64; several families route in float32, which bounds agreement near 1e-7.
"""

import pytest
import torch

from moelab.models import SUPPORTED_FAMILIES, open_model, reference_forward, reference_route
from moelab.models.tiny import TINY_CONFIGS, native_block_output, tiny_model

TOL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def test_tiny_models_cover_all_families():
    assert set(TINY_CONFIGS) == set(SUPPORTED_FAMILIES)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def opened(request):
    model = tiny_model(request.param)
    return open_model(model)


def test_view_shapes_and_layers(opened):
    assert opened.blocks, "no MoE block found"
    assert opened.num_layers == 2
    assert sorted([b.layer for b in opened.blocks] + opened.dense_layers) == list(
        range(opened.num_layers)
    )
    for b in opened.blocks:
        E, I, H = b.num_experts, b.intermediate_size, b.hidden_size  # noqa: E741
        assert b.router_weight.shape == (E, H)
        assert b.gate.shape == b.up.shape == (E, I, H) and b.down.shape == (E, H, I)
        assert 1 <= b.top_k <= E
        assert b.scoring in ("softmax", "sigmoid", "sparsemixer")
        assert opened.model.get_submodule(b.path) is b.module
        assert b.path.split(".")[-2] == str(b.layer)


def test_reference_forward_matches_block(opened):
    torch.manual_seed(1)
    for b in opened.blocks:
        x = torch.randn(3, 7, b.hidden_size, dtype=torch.float64)
        with torch.no_grad():
            want = native_block_output(b, x)
            got = reference_forward(b, x)
        assert got.shape == want.shape and got.dtype == x.dtype
        assert rel_err(got, want) <= TOL, f"{b.family} {b.path}"


def test_views_share_storage_with_model(opened):
    storages = {t.untyped_storage().data_ptr() for t in opened.model.parameters()}
    storages |= {t.untyped_storage().data_ptr() for t in opened.model.buffers()}
    for b in opened.blocks:
        tensors = [b.router_weight, b.gate, b.up, b.down, b.router_bias, b.correction_bias]
        tensors += [b.gate_bias, b.up_bias, b.down_bias]
        if b.shared is not None:
            tensors += [b.shared.gate, b.shared.up, b.shared.down, b.shared.gate_weight]
        for t in tensors:
            if t is not None:
                assert t.untyped_storage().data_ptr() in storages


def test_write_through_changes_model_output(opened):
    b = opened.blocks[-1]
    x = torch.randn(2, 5, b.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        before = native_block_output(b, x)
        e = int(reference_route(b, x.reshape(-1, b.hidden_size))[1][0, 0])
        b.down[e].mul_(3.0)
        b.gate[e].mul_(0.5)
        try:
            after = native_block_output(b, x)
            # edits of order-1 relative size to expert e's output; 1e-9 is far above float64 noise
            assert (after - before).abs().max() > 1e-9, "editing the view did not change the model"
            assert rel_err(reference_forward(b, x), after) <= TOL
        finally:
            b.gate[e].mul_(2.0)
            b.down[e].div_(3.0)
        assert rel_err(native_block_output(b, x), before) <= 1e-12


def _sorted_by_id(ids, weights):
    order = ids.argsort(dim=-1)
    return ids.gather(-1, order), weights.gather(-1, order)


def test_routing_hook_sees_reference_routing_and_is_removed(opened):
    model = opened.model
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        plain = model(ids).logits
        events = {b.path: [] for b in opened.blocks}
        handles = [b.register_routing_hook(events[b.path].append) for b in opened.blocks]
        hooked = model(ids).logits
        for h in handles:
            h.remove()
        model(ids)
    assert torch.equal(plain, hooked), "a routing hook changed the model's output"
    for b in opened.blocks:
        assert len(events[b.path]) == 1, (
            f"{b.path}: expected one event, removed hooks must not fire"
        )
        ev = events[b.path][0]
        assert ev.hidden_TH.shape == (12, b.hidden_size)
        assert ev.ids_TK.dtype == torch.int64 and ev.ids_TK.shape == (12, b.top_k)
        _, ref_ids, ref_w = reference_route(b, ev.hidden_TH)
        got_ids, got_w = _sorted_by_id(ev.ids_TK, ev.weights_TK.double())
        want_ids, want_w = _sorted_by_id(ref_ids, ref_w)
        assert torch.equal(got_ids, want_ids)
        assert rel_err(got_w, want_w) <= TOL
        if ev.logits_TE is not None:
            assert ev.logits_TE.dtype == torch.float32 and ev.logits_TE.shape == (12, b.num_experts)
            ref_logits = reference_route(b, ev.hidden_TH)[0]
            assert rel_err(ev.logits_TE.double(), ref_logits) <= 1e-5
