"""The adapters' write side: every family writes a config with another expert count and top-k that
builds a model whose view has those numbers, and keeps everything else of the config."""

import pytest

from moelab.models import SUPPORTED_FAMILIES, open_model
from moelab.models.registry import adapter_named
from moelab.models.tiny import tiny_model


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_write_config_builds_the_new_counts(family):
    model = tiny_model(family)
    view = open_model(model)
    adapter = adapter_named(view.family)
    assert adapter.write_config is not None, f"{family}: an adapter needs a write side"
    first = view.blocks[0]
    E2, k2 = first.num_experts - 1, 1 if first.scoring != "sparsemixer" else 2
    before = model.config.to_dict()
    new_config = adapter.write_config(model.config, E2, k2, None)
    assert model.config.to_dict() == before  # a copy: the original config is untouched
    new_view = open_model(type(model)(new_config))
    assert {b.num_experts for b in new_view.blocks} == {E2}
    assert {b.top_k for b in new_view.blocks} == {k2}
    assert all(b.n_group is None or b.n_group == 1 for b in new_view.blocks)  # groups switched off
    changed = {k for k, v in new_config.to_dict().items() if before.get(k) != v}
    assert changed <= {"num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                       "num_experts_per_tok", "moe_k", "moe_topk", "n_group", "topk_group", "ffn_config"}


@pytest.mark.parametrize("family", ["DeepSeek-V2", "DeepSeek-V3"])
def test_groups_kept_when_asked(family):
    model = tiny_model(family)
    first = open_model(model).blocks[0]
    new_config = adapter_named(family).write_config(model.config, first.num_experts, first.top_k, first.n_group)
    assert (new_config.n_group, new_config.topk_group) == (model.config.n_group, model.config.topk_group)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_block_output_matches_what_the_block_returns(family):
    import torch

    view = open_model(tiny_model(family))
    block = view.blocks[0]
    out = block.module(torch.randn(1, 3, block.hidden_size, dtype=block.router_weight.dtype))
    returns_more = isinstance(out, tuple)
    assert returns_more == (adapter_named(family).block_output is not None)
