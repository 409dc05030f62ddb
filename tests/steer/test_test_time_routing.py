"""C3PO re-mixing and Rewiring: references, no-op settings, and a model built so the right routing
is known, on which both must help.

The constructed model (one MoE layer, 4 experts top-2, softmax without renormalisation, attention
output zero, one SwiGLU neuron per expert direction): token x routes to experts 0 and 1, which
write the direction of token B; expert 2 writes x's direction for x and z's for z; z routes to 2,
w to 3. Every sample repeats one token, so the right next token is that token: x-samples are
mis-routed (the model predicts B), z- and w-samples are handled well.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.tiny import tiny_model
from moelab.run.loss import next_token_nll
from moelab.steer._fit import FitConfig
from moelab.steer.c3po import C3POConfig, build_reference, profile, remixed, surrogate
from moelab.steer.rewire import RewireConfig, fit_offsets, rewire_greedy, rewired

X, Z, W, B = 0, 1, 2, 3


def _constructed() -> Qwen3MoeForCausalLM:
    cfg = Qwen3MoeConfig(vocab_size=4, hidden_size=8, moe_intermediate_size=4, intermediate_size=4, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=False, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, tie_word_embeddings=False, mlp_only_layers=[])
    model = Qwen3MoeForCausalLM(cfg).eval()
    u = torch.eye(8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(1.0) if n.endswith("norm.weight") else p.zero_()
        model.model.embed_tokens.weight[:] = torch.stack([u[0], u[0] + u[4], u[6], u[7]])
        mlp = model.model.layers[0].mlp
        mlp.gate.weight[:] = torch.stack([u[0], 0.9 * u[0], 0.5 * u[0] + 2 * u[4], 3 * u[6]])
        neurons = {0: [(u[0], u[3])], 1: [(u[0], u[3])], 2: [(u[0] - 2 * u[4], u[1]), (u[4], u[2])], 3: [(u[6], u[5])]}
        F = cfg.moe_intermediate_size
        for e, pairs in neurons.items():
            for j, (g, o) in enumerate(pairs):  # value = silu(g.x) * (g.x), written along o
                mlp.experts.gate_up_proj[e, j] = g
                mlp.experts.gate_up_proj[e, F + j] = g
                mlp.experts.down_proj[e, :, j] = o
        model.lm_head.weight[:] = 3 * torch.stack([u[1], u[2], u[5], u[3]])
    return model


def _samples(token: int, n: int = 3, length: int = 6) -> torch.Tensor:
    return torch.full((n, length), token, dtype=torch.long)


def _loss(model, ids):
    with torch.no_grad():
        return next_token_nll(model(input_ids=ids, use_cache=False).logits, ids).item()


@pytest.fixture(scope="module")
def constructed():
    view = open_model(_constructed())
    pool = torch.cat([_samples(Z), _samples(W), _samples(X)])
    cfg = C3POConfig(critical_layers=1, neighbours=3, fit=FitConfig(steps=20, lr=0.1))
    return view, build_reference(view, pool, keep=6, cfg=cfg), cfg


def test_reference_keeps_the_samples_the_model_handles_best(constructed):
    view, ref, _ = constructed
    assert sorted(ref.ids_NS[:, 0].tolist()) == [Z] * 3 + [W] * 3  # the mis-routed x-samples left out
    w = ref.weights[0]  # z-samples put most weight on expert 2, w-samples on expert 3
    assert (w[ref.ids_NS[:, 0] == Z].argmax(-1) == 2).all() and (w[ref.ids_NS[:, 0] == W].argmax(-1) == 3).all()


@pytest.mark.parametrize("method", ["kernel", "mode", "ngd", "oracle"])
def test_c3po_fixes_the_mis_routed_sample(constructed, method):
    view, ref, cfg = constructed
    x = _samples(X, n=1)
    base = _loss(view.model, x)
    targets, report = surrogate(view, ref, x, method, cfg)
    with remixed(view, targets):
        after = _loss(view.model, x)
        with torch.no_grad():
            pred = view.model(input_ids=x).logits.argmax(-1)
    assert after < 0.5 * base, (method, base, after)
    assert (pred == X).all(), method
    if report is not None:
        assert not report.diverged and report.losses[report.best_step] <= report.losses[0]


def test_remixing_to_the_samples_own_weights_is_the_identity():
    """omega = the token's own weights on every expert: the routing and the outputs are unchanged."""
    view = open_model(tiny_model("OLMoE"))
    ids = torch.randint(0, view.model.config.vocab_size, (1, 1), generator=torch.Generator().manual_seed(0))
    b = view.blocks[-1]
    _, own, _ = profile(view, ids, [b.layer])  # one token: its mean weights are its weights
    with torch.no_grad():
        plain = view.model(input_ids=ids).logits
        with remixed(view, {b.layer: (own[b.layer][0], torch.ones(b.num_experts, dtype=torch.bool))}):
            same = view.model(input_ids=ids).logits
        with remixed(view, {b.layer: (own[b.layer][0] * 0, torch.zeros(b.num_experts, dtype=torch.bool))}):
            no_core = view.model(input_ids=ids).logits
    assert torch.allclose(plain, same, rtol=1e-5, atol=1e-6) and torch.allclose(plain, no_core, rtol=1e-5, atol=1e-6)


def test_rewiring_learns_the_right_routing_from_the_context(constructed):
    view, _, _ = constructed
    x = _samples(X, n=1, length=8)
    cfg = RewireConfig(last_layers=1, fit=FitConfig(steps=40, lr=0.2))
    offsets, report = fit_offsets(view, x[:, :5], cfg)  # fitted on the first 5 tokens only
    assert not report.diverged and min(report.losses) < 0.5 * report.losses[0]
    base = _loss(view.model, x)
    with rewired(view, offsets):
        assert _loss(view.model, x) < 0.5 * base
    assert offsets[0][2] > offsets[0][0]  # expert 2 raised over expert 0
    ids, reports = rewire_greedy(view, x[:, :3], max_new_tokens=4, cfg=RewireConfig(last_layers=1, every=2,
                                                                                       fit=cfg.fit))
    assert len(reports) == 2 and ids[0, 3:].tolist() == [X] * 4
    with torch.no_grad():  # the edits are gone: the model alone still says B
        assert view.model(input_ids=x).logits[0, -1].argmax().item() == B


def test_rewiring_with_no_steps_changes_nothing():
    view = open_model(tiny_model("Qwen3-MoE"))
    ids = torch.randint(0, view.model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    offsets, report = fit_offsets(view, ids, RewireConfig(fit=FitConfig(steps=0)))
    assert all(torch.equal(d, torch.zeros_like(d)) for d in offsets.values()) and len(report.losses) == 1
    assert all(p.grad is None for p in view.model.parameters())  # the model never gets gradients


def test_bad_input(constructed):
    view, ref, cfg = constructed
    with pytest.raises(MoelabError, match="method must be one of"):
        surrogate(view, ref, _samples(X, 1), "nope", cfg)
    with pytest.raises(MoelabError, match="tokenised for a vocabulary of 4"):
        surrogate(open_model(tiny_model("Qwen3-MoE")), ref, _samples(X, 1), "kernel", cfg)
    with pytest.raises(MoelabError, match="keep must be in"):
        build_reference(view, _samples(X), keep=7, cfg=cfg)
    with pytest.raises(MoelabError, match="not MoE layers"):
        fit_offsets(view, _samples(X, 1), RewireConfig(layers=(5,)))
    with pytest.raises(MoelabError, match="at least 2 tokens"):
        fit_offsets(view, _samples(X, 1, length=1))
    for bad in ({"steps": -1}, {"lr": 0.0}, {"lr": float("inf")}):
        with pytest.raises(MoelabError):
            FitConfig(**bad)
    with pytest.raises(MoelabError, match="neighbours must be"):
        C3POConfig(neighbours=0)


def test_a_diverging_fit_is_reported_and_keeps_the_best_values():
    from moelab.steer._fit import minimise

    p = torch.tensor([0.5], requires_grad=True)
    report = minimise([p], lambda: (p ** 2).sum(), FitConfig(steps=5, lr=1e6))  # Adam jumps by ~lr
    assert report.diverged and report.best_step == 0 and p.item() == 0.5
    q = torch.tensor([0.5], requires_grad=True)
    calls = []

    def nan_after_first():
        calls.append(1)
        return (q ** 2).sum() * (1.0 if len(calls) == 1 else float("nan"))

    report = minimise([q], nan_after_first, FitConfig(steps=5, lr=0.1))
    assert report.diverged and torch.isfinite(q).all() and q.item() == 0.5
    view = open_model(_constructed())  # a diverging rewiring still generates finite, valid tokens
    ids, reports = rewire_greedy(view, _samples(X, 1, 3), 3, RewireConfig(last_layers=1, fit=FitConfig(steps=3, lr=1e6)))
    assert ids.shape == (1, 6) and int(ids.max()) < 4
