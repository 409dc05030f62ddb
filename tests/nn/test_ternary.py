"""Ternary experts (MoTE): the absmean quantiser against a per-element reference, the
straight-through gradient, and the training provider against the post-hoc ternarised model
(float64, 1e-6 relative as in tests/models/test_backend.py) on several families."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from moelab.models import open_model
from moelab.models.backend import enable_experts_backend
from moelab.models.tiny import tiny_model
from moelab.nn.ternary import (
    EPS,
    ste_ternary,
    ternarize_experts,
    ternary,
    ternary_provider,
    ternary_weights,
)

F64 = torch.float64


def test_ternary_equals_the_per_element_reference():
    w = torch.randn(3, 5, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    codes, gamma = ternary(w)
    for e in range(3):
        g = sum(abs(float(x)) for x in w[e].flatten()) / w[e].numel()
        assert gamma[e].item() == pytest.approx(g, rel=1e-12)
        for o in range(5):
            for i in range(4):
                want = max(-1.0, min(1.0, round(float(w[e, o, i]) / (g + EPS))))
                assert codes[e, o, i].item() == want
    q = ternary_weights(w)
    assert all(len(set(q[e].flatten().tolist())) <= 3 for e in range(3))
    # the codes are idempotent, the scale is not (a ternary matrix's absmean is gamma times its
    # non-zero share): ternarising an exported ternary model again changes it
    assert torch.equal(ternary(q)[0], codes)


def test_straight_through_gradient_is_the_identity():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(2, 3, 3, dtype=F64, generator=gen).requires_grad_()
    g = torch.randn(2, 3, 3, dtype=F64, generator=gen)
    (ste_ternary(w) * g).sum().backward()
    assert torch.equal(w.grad, g)
    # w + (Q(w) - w) is Q(w) up to one rounding of the addition
    torch.testing.assert_close(ste_ternary(w).detach(), ternary_weights(w), rtol=0, atol=1e-15)


@pytest.mark.parametrize("family", ["Qwen3-MoE", "DeepSeek-V3", "Mixtral", "GPT-OSS"])
def test_training_provider_equals_the_post_hoc_ternarised_model(family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        latent = tiny_model(family)
    fixed = copy.deepcopy(latent)
    n = ternarize_experts(open_model(fixed))
    assert n > 0
    enable_experts_backend(open_model(latent), ternary_provider)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, latent.config.hidden_size, dtype=F64, generator=g)
    dy = torch.randn(2, 6, latent.config.vocab_size, dtype=F64, generator=g)
    y_latent = latent(inputs_embeds=x).logits
    y_fixed = fixed(inputs_embeds=x).logits
    torch.testing.assert_close(y_latent, y_fixed, rtol=1e-6, atol=1e-9)
    y_latent.backward(dy)
    y_fixed.backward(dy)
    fixed_grads = dict(fixed.named_parameters())
    checked = 0
    for name, p in latent.named_parameters():  # STE: the latent weights get the ternary model's gradient
        q = fixed_grads[name]
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9 * float(q.grad.abs().max()) + 1e-12)
        checked += "expert" in name
    assert checked >= 2


def test_ternarize_experts_leaves_everything_but_routed_experts_alone():
    model = tiny_model("DeepSeek-V3")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    view = open_model(model)
    ternarize_experts(view)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".mlp.experts." in n), n  # routers, shared experts, dense layers unchanged
    for b in view.blocks:
        for w in (b.gate, b.up, b.down):
            for e in range(b.num_experts):
                assert len(set(w[e].flatten().tolist())) <= 3
