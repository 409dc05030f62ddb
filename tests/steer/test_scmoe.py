"""SCMoE self-contrast: the score against a per-element reference, the cached decoder against full
recomputation, a constructed model on which it must help, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.tiny import tiny_model
from moelab.steer.scmoe import SCMoEConfig, SCMoEDecoder, contrast, scmoe_greedy, scmoe_scores


def test_contrast_equals_the_per_element_reference():
    g = torch.Generator().manual_seed(0)
    s, w = torch.randn(5, 11, generator=g, dtype=torch.float64) * 3, torch.randn(5, 11, generator=g, dtype=torch.float64)
    alpha, beta = 0.2, 0.7
    got = contrast(s, w, alpha, beta)
    for i in range(5):
        zs = [float(x) - math.log(sum(math.exp(float(y)) for y in s[i])) for x in s[i]]
        zw = [float(x) - math.log(sum(math.exp(float(y)) for y in w[i])) for x in w[i]]
        for v in range(11):
            want = (1 + beta) * zs[v] - beta * zw[v] if zs[v] >= math.log(alpha) + max(zs) else -math.inf
            assert got[i, v].item() == pytest.approx(want, abs=1e-12)
    # beta = 0 is the strong pass restricted to its plausible set; alpha = 1 keeps only its argmax
    assert torch.equal(contrast(s, w, 1.0, 0.5).isfinite(), s == s.max(-1, keepdim=True).values)
    z = torch.log_softmax(s, -1)
    assert torch.equal(contrast(s, w, 1e-9, 0.0), z)


@pytest.mark.parametrize("family", ["Mixtral", "DeepSeek-V3", "Qwen2-MoE"])
def test_cached_decoder_equals_full_recomputation(family):
    view = open_model(tiny_model(family))
    ids = torch.randint(0, view.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    full, strong, weak = scmoe_scores(view, ids)
    assert not torch.equal(strong, weak)  # the weak pass routes differently
    dec = SCMoEDecoder(view)
    steps = [dec.step(ids[:, :4])] + [dec.step(ids[:, s:s + 1]) for s in range(4, 9)]
    for pos, got in zip(range(3, 9), steps, strict=True):
        want = full[:, pos]
        assert torch.equal(got.isfinite(), want.isfinite()), (family, pos)
        fin = want.isfinite()
        assert torch.allclose(got[fin], want[fin], rtol=1e-4, atol=1e-4), (family, pos)


def _constructed_model() -> Qwen3MoeForCausalLM:
    """One MoE layer, 4 experts top-2, vocabulary {A, B, C, D}; attention's output is zero, so every
    position sees the same hidden state and routes alike: experts 0 and 1 (the strong pass) write
    1.0·u_A + 0.9·u_B, expert 2 (rank 2, the weak pass) writes 2·u_A. The data always continue
    with B: the strong model says A by a little, its weak self says A by a lot, so the contrast
    says B."""
    cfg = Qwen3MoeConfig(vocab_size=4, hidden_size=8, moe_intermediate_size=4, intermediate_size=4, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=4, tie_word_embeddings=False, decoder_sparse_step=1,
                         mlp_only_layers=[])
    model = Qwen3MoeForCausalLM(cfg).eval()
    u = torch.eye(8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
        model.model.embed_tokens.weight[:] = u[0]  # every token: the same residual direction u_0
        layer = model.model.layers[0]
        layer.mlp.gate.weight[:] = torch.tensor([4.0, 3.0, 2.0, 1.0]).unsqueeze(1) * u[0]  # ranks 0,1,2,3
        ex = layer.mlp.experts
        ex.gate_up_proj[:, 0] = 4 * u[0]  # one neuron per expert; gate: silu(4·|x|) ~ linear
        ex.gate_up_proj[:, 4] = u[0]  # its up row (rows 4..7 are the up half)
        direction = {0: u[1] + 0.9 * u[2], 1: u[1] + 0.9 * u[2], 2: 2 * u[1], 3: -u[1]}
        for e, v in direction.items():
            ex.down_proj[e, :, 0] = 2 * v
        model.lm_head.weight[0] = 3 * u[1]  # A
        model.lm_head.weight[1] = 3 * u[2]  # B
    return model


def test_scmoe_fixes_the_answer_on_a_model_built_for_it():
    model = _constructed_model()
    ids = torch.zeros(1, 6, dtype=torch.long)
    score, strong, weak = scmoe_scores(model, ids, SCMoEConfig(alpha=0.1, beta=0.5, rank=2))
    assert (strong.argmax(-1) == 0).all() and (weak.argmax(-1) == 0).all()  # both say A
    assert (score.argmax(-1) == 1).all()  # the contrast says B
    assert score[..., 2:].isinf().all()  # C, D are outside the plausible set
    out = scmoe_greedy(model, ids[:, :2], max_new_tokens=3, cfg=SCMoEConfig(rank=2))
    assert out[0, 2:].tolist() == [1, 1, 1]
    with torch.no_grad():
        assert model(ids).logits[0, -1].argmax().item() == 0  # greedy on the model alone: A


def test_scmoe_bad_input():
    for kw, msg in (({"alpha": 0.0}, "alpha must be in"), ({"alpha": 1.5}, "alpha must be in"),
                    ({"beta": -0.1}, "beta must be"), ({"beta": float("nan")}, "beta must be"),
                    ({"rank": -1}, "rank must be")):
        with pytest.raises(MoelabError, match=msg):
            SCMoEConfig(**kw)
    view = open_model(tiny_model("Mixtral"))
    E = view.blocks[0].num_experts
    with pytest.raises(MoelabError, match=f"rank {E} needs more experts"):
        SCMoEDecoder(view, SCMoEConfig(rank=E))
    with pytest.raises(MoelabError, match="max_new_tokens"):
        scmoe_greedy(view, torch.zeros(1, 2, dtype=torch.long), 0)
