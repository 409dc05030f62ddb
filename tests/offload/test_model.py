"""offload_model: outputs equal the resident model's exactly; resident expert bytes stay in budget."""

from __future__ import annotations

import pytest
import torch

from moelab.data import default_model
from moelab.errors import CheckpointError, MoelabError
from moelab.models import open_model
from moelab.offload import min_budget_bytes, offload_model

from .conftest import FAMILIES


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_equals_resident_at_the_smallest_budget(tiny_dirs, family):
    path = tiny_dirs[family]
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    backend = open_model(path, experts_implementation="moelab").model  # same kernels
    eager = open_model(path).model  # transformers' own experts
    probe, probe_ex = offload_model(path, budget=1.0)
    budget = min_budget_bytes(probe_ex.store, probe_ex.view)
    probe_ex.close()
    model, experts = offload_model(path, budget=budget)
    got = logits(model, ids)
    assert torch.equal(got, logits(backend, ids))
    torch.testing.assert_close(got, logits(eager, ids), rtol=1e-5, atol=1e-5)
    s = experts.stats()
    assert s.misses > 0 and 0 < s.peak_resident_bytes <= budget == s.budget_bytes
    offloaded = set(experts.store.params)  # exactly the experts stay unmaterialised
    assert offloaded and all(t.is_meta == (n in offloaded) for n, t in model.state_dict(keep_vars=True).items())
    assert all(not b.is_meta for b in model.buffers())
    experts.close()


@pytest.mark.parametrize("family", ["Qwen3-MoE", "Mixtral", "GPT-OSS"])
def test_one_token_forwards_equal_the_resident_model(tiny_dirs, family):
    """Decode-sized forwards (one token, the experts on the cache's slot buffers): bit for bit."""
    path = tiny_dirs[family]
    backend = open_model(path, experts_implementation="moelab").model
    model, experts = offload_model(path, budget=0.5)
    for seed in range(20):
        ids = torch.randint(0, 64, (1, 1), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(logits(model, ids), logits(backend, ids)), seed
    assert experts.stats().hits > 0
    experts.close()


def test_default_model_generates_as_the_resident_model():
    path = default_model()
    resident = open_model(path, experts_implementation="moelab").model
    probe, ex = offload_model(path, budget=1.0)
    two_x = 2 * min_budget_bytes(ex.store, ex.view) * len(ex.view.blocks)  # 2x the active experts
    ex.close()
    model, experts = offload_model(path, budget=two_x, policy="lfu")
    ids = torch.randint(5, 4000, (1, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(model, ids), logits(resident, ids))
    kw = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), resident.generate(ids, **kw))
    s = experts.stats()
    assert s.hits > 0 and s.misses > 0 and s.peak_resident_bytes <= two_x
    # exactly the missed experts were read, nothing more
    assert s.bytes_read == s.misses * experts.store.expert_bytes(experts.view.blocks[0].layer)
    experts.close()


def test_dtype_is_that_of_the_resident_model(tiny_dirs):
    path = tiny_dirs["Qwen3-MoE"]
    resident = open_model(path, dtype=torch.bfloat16, experts_implementation="moelab").model
    model, experts = offload_model(path, budget="100%", dtype=torch.bfloat16)
    ids = torch.randint(0, 64, (1, 7))
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, logits(resident, ids))
    experts.close()


def test_budget_below_one_layers_top_k_states_the_minimum(tiny_dirs):
    path = tiny_dirs["Qwen3-MoE"]
    _, ex = offload_model(path, budget=1.0)
    minimum = min_budget_bytes(ex.store, ex.view)
    ex.close()
    with pytest.raises(MoelabError, match=rf"smaller than one layer's top-k experts: the minimum is {minimum} bytes"):
        offload_model(path, budget=minimum - 1)
    with pytest.raises(MoelabError, match="policy"):
        offload_model(path, budget=1.0, policy="lur")
    with pytest.raises(MoelabError, match="budget: cannot read"):
        offload_model(path, budget="64 parsecs")


def test_truncated_checkpoint_fails_when_opened(tiny_dirs, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dirs["Mixtral"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="truncated"):
        offload_model(bad)


def test_opening_reads_the_non_expert_tensors_once_and_no_expert(tiny_dirs):
    path = tiny_dirs["Qwen3-MoE"]
    model, experts = offload_model(path, budget=1.0)
    index, store = experts.store.index, experts.store
    file_bytes = (path / "model.safetensors").stat().st_size
    assert experts.stats().bytes_read == 0
    non_expert = sum(index.entries[n].end - index.entries[n].start for n in store.resident)
    assert index.bytes_read == non_expert <= file_bytes - store.total_expert_bytes()
    logits(model, torch.randint(0, 64, (1, 3)))
    assert 0 < experts.stats().bytes_read == index.bytes_read - non_expert
    experts.close()
