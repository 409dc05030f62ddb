"""from_view / patch / unpatch on tiny random models of every family the model view supports.

The router computes in float32 by design while the tiny models are float64, so patched logits
equal the original's to ~1e-7 relative; we assert atol=rtol=1e-5 (selection never flips on these
random inputs). unpatch restores the exact original (bit-equal logits). All 18 families the model
view supports are patched, PhiMoE (SparseMixer routing, eval mode) and Llama4 (input-side combine)
included.
"""

import dataclasses

import pytest
import torch

from moelab.errors import UnsupportedModelError
from moelab.models import open_model, reference_forward
from moelab.models.tiny import TINY_CONFIGS, tiny_model
from moelab.nn import MoELayer, PatchedBlock, TopPConfig, TopPRouter, from_view, patch, unpatch

FAMILIES = list(TINY_CONFIGS)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_equals_original(family):
    model = tiny_model(family).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    n_blocks = len(open_model(model).blocks)
    patch(model)
    assert sum(isinstance(m, PatchedBlock) for m in model.modules()) == n_blocks
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    unpatch(model)
    assert not any(isinstance(m, PatchedBlock) for m in model.modules())
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize(
    "family", ["Qwen2-MoE", "DeepSeek-V3", "DBRX", "GPT-OSS", "ERNIE-4.5-MoE", "PhiMoE", "Llama4"]
)
def test_from_view_equals_reference_forward(family):
    block = open_model(tiny_model(family)).blocks[0]
    layer = from_view(block)
    assert isinstance(layer, MoELayer)
    x = torch.randn(3, 5, block.hidden_size, dtype=torch.float64)
    ref = reference_forward(block, x)
    y = layer(x).y
    if block.output_bias is not None:
        y = y + block.output_bias
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_weights_are_shared_and_training_reaches_them():
    model = tiny_model("Mixtral")
    block = open_model(model).blocks[0]
    layer = from_view(block)
    assert layer.experts.up.data_ptr() == block.up.data_ptr()
    with torch.no_grad():
        block.down[1].mul_(2.0)  # an edit through the view shows in the layer
    assert torch.equal(layer.experts.down[1], block.down[1])
    patch(model)
    model.train()
    model(torch.randint(0, 64, (1, 6))).logits.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "moe.experts" in n]
    assert grads and all(g is not None for g in grads)


def test_patch_with_another_router():
    model = tiny_model("Qwen3-MoE")
    ids = torch.randint(0, 64, (1, 9))
    before = logits(model, ids)

    def top_p(block):
        r = TopPRouter(
            TopPConfig(num_experts=block.num_experts, hidden_size=block.hidden_size, p=0.9),
            dtype=block.router_weight.dtype,
        )
        with torch.no_grad():
            r.weight.copy_(block.router_weight)
        return r

    patch(model, router=top_p)
    after = logits(model, ids)
    assert after.shape == before.shape and not torch.allclose(after, before)
    unpatch(model)
    assert torch.equal(logits(model, ids), before)


def test_unsupported_block_fails_clearly_and_leaves_model_alone(monkeypatch):
    import moelab.models

    model = tiny_model("Mixtral")
    real_open = moelab.models.open_model

    def fake_open(m):  # the view of a second block claims a scoring moelab has no router for
        view = real_open(m)
        view.blocks[-1] = dataclasses.replace(view.blocks[-1], scoring="mystery")
        return view

    monkeypatch.setattr(moelab.models, "open_model", fake_open)
    with pytest.raises(UnsupportedModelError, match="Mixtral.*mystery"):
        patch(model)
    assert not any(isinstance(m, PatchedBlock) for m in model.modules())


def test_top_level_lazy_names():
    import moelab

    assert moelab.patch is patch and moelab.unpatch is unpatch


@pytest.mark.parametrize("family", ["Qwen3-MoE", "DeepSeek-V3", "Llama4"])
def test_routing_edits_and_hooks_work_under_patch(family):
    """The seam runs on moelab's router: a patched, steered model equals the steered original."""
    from moelab.steer import experts_off

    model = tiny_model(family)
    view = open_model(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    b = view.blocks[0]
    with torch.no_grad(), experts_off(view, {b.layer: [1]}):
        want = model(ids).logits
        patch(model)
        seen = []
        with b.register_routing_hook(seen.append):
            got = model(ids).logits
        unpatch(model)
    assert len(seen) == 1 and not (seen[0].ids_TK[seen[0].routing.real_mask()] == 1).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # moelab's float32 router
