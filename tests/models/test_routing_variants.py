"""Config variants that change routing: the view follows them and the reference still matches.

Same tolerance as test_families: relative error <= 1e-6 against the family's own block (float64).
"""

import pytest
import torch

from moelab.models import open_model, reference_forward, reference_route
from moelab.models.tiny import native_block_output, tiny_model

TOL = 1e-6

# (family, config overrides, expected view fields)
VARIANTS = [
    ("Mixtral", dict(num_experts_per_tok=1), dict(top_k=1, norm_topk_prob=True)),
    ("Qwen3-MoE", dict(norm_topk_prob=False), dict(norm_topk_prob=False)),
    (
        "Qwen3-MoE",
        dict(norm_topk_prob=True, num_experts_per_tok=3),
        dict(norm_topk_prob=True, top_k=3),
    ),
    ("OLMoE", dict(norm_topk_prob=True), dict(norm_topk_prob=True)),
    ("Qwen2-MoE", dict(norm_topk_prob=True, decoder_sparse_step=2), dict(norm_topk_prob=True)),
    ("DeepSeek-V2", dict(topk_method="greedy", n_group=None, topk_group=None), dict(n_group=None)),
    (
        "DeepSeek-V2",
        dict(n_group=2, topk_group=1),
        dict(n_group=2, topk_group=1, group_score="max"),
    ),
    (
        "DeepSeek-V3",
        dict(norm_topk_prob=False, n_group=1, topk_group=1),
        dict(norm_topk_prob=False, n_group=None),
    ),
    (
        "DeepSeek-V3",
        dict(n_group=2, topk_group=1, num_experts_per_tok=4),
        dict(n_group=2, topk_group=1),
    ),
    (
        "GLM4-MoE",
        dict(n_group=2, topk_group=1, routed_scaling_factor=1.8),
        dict(n_group=2, routed_scaling_factor=1.8),
    ),
    (
        "ERNIE-4.5-MoE",
        dict(moe_num_shared_experts=0, moe_norm_min=0.9),
        dict(shared=None, norm_min=0.9),
    ),
    (
        "DBRX",
        dict(
            ffn_config=dict(
                ffn_hidden_size=8, moe_num_experts=4, moe_top_k=2, moe_normalize_expert_weights=None
            )
        ),
        dict(norm_topk_prob=False),
    ),
    (
        "DBRX",
        dict(
            ffn_config=dict(
                ffn_hidden_size=8, moe_num_experts=4, moe_top_k=3, moe_normalize_expert_weights=2.0
            )
        ),
        dict(norm_topk_prob=True, norm_p=2.0, top_k=3),
    ),
    ("PhiMoE", dict(router_jitter_noise=0.01), dict(top_k=2, scoring="sparsemixer")),
    ("HunYuan-MoE", dict(moe_topk=[1, 3]), dict()),
    ("GraniteMoeShared", dict(shared_intermediate_size=0), dict(shared=None)),
    ("Llama4", dict(num_experts_per_tok=2, interleave_moe_layer_step=1), dict(top_k=2)),
    ("JetMoE", dict(num_experts_per_tok=3), dict(top_k=3)),
]


def _check_all_blocks(view, seed=0):
    torch.manual_seed(seed)
    for b in view.blocks:
        x = torch.randn(4, 8, b.hidden_size, dtype=torch.float64)
        with torch.no_grad():
            want, got = native_block_output(b, x), reference_forward(b, x)
        assert ((got - want).norm() / want.norm()).item() <= TOL, f"{b.family} {b.path}"


@pytest.mark.parametrize("family,overrides,expect", VARIANTS, ids=lambda v: str(v)[:40])
def test_variant_view_and_reference(family, overrides, expect):
    view = open_model(tiny_model(family, **overrides))
    for field, value in expect.items():
        assert getattr(view.blocks[0], field) == value, field
    _check_all_blocks(view)


def test_per_layer_top_k_and_sparse_step():
    hunyuan = open_model(tiny_model("HunYuan-MoE", moe_topk=[1, 3]))
    assert [b.top_k for b in hunyuan.blocks] == [1, 3]
    qwen = open_model(tiny_model("Qwen2-MoE", decoder_sparse_step=2))
    assert qwen.dense_layers == [0] and [b.layer for b in qwen.blocks] == [1]


def test_group_limited_selection_stays_in_top_groups():
    view = open_model(tiny_model("DeepSeek-V3", n_group=4, topk_group=2, num_experts_per_tok=3))
    b = view.blocks[0]
    x = torch.randn(64, b.hidden_size, dtype=torch.float64)
    _, ids, _ = reference_route(b, x)
    groups = ids // (b.num_experts // b.n_group)
    assert all(len(set(row.tolist())) <= b.topk_group for row in groups)
    ungrouped = open_model(
        tiny_model("DeepSeek-V3", n_group=1, topk_group=1, num_experts_per_tok=3)
    ).blocks[0]
    _, ids_free, _ = reference_route(ungrouped, x)
    assert not torch.equal(ids.sort(-1).values, ids_free.sort(-1).values), "group limit never bit"


@pytest.mark.parametrize(
    "family,field",
    [
        ("GPT-OSS", "router_bias"),
        ("DeepSeek-V3", "correction_bias"),
        ("ERNIE-4.5-MoE", "correction_bias"),
    ],
)
def test_router_bias_changes_selection_and_reference_follows(family, field):
    """Large biases written through the view move the selection; the reference still matches."""
    view = open_model(tiny_model(family))
    b = view.blocks[-1]
    x = torch.randn(64, b.hidden_size, dtype=torch.float64)
    ids_before = reference_route(b, x)[1].sort(-1).values
    bias = getattr(b, field)
    assert bias is not None and bias.shape == (b.num_experts,)
    with torch.no_grad():
        bias.copy_(torch.linspace(-3.0, 3.0, b.num_experts, dtype=bias.dtype))
    ids_after = reference_route(b, x)[1].sort(-1).values
    assert not torch.equal(ids_before, ids_after)
    _check_all_blocks(view, seed=3)


def test_qwen2_shared_expert_gate_is_used():
    view = open_model(tiny_model("Qwen2-MoE"))
    b = view.blocks[0]
    assert b.shared is not None and b.shared.gate_weight.shape == (1, b.hidden_size)
    with torch.no_grad():
        b.shared.gate_weight.mul_(-50.0)  # a near-closed gate: the shared expert almost vanishes
    _check_all_blocks(view, seed=4)
