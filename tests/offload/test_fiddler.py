"""Fiddler on a fake fast tier (the CPU, with a given bandwidth): decisions as the latency model
says, outputs equal to the resident model's."""

from __future__ import annotations

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.offload import min_budget_bytes, offload_model
from moelab.offload.fiddler import LatencyModel, measure_cpu_flops


def test_latency_model_by_hand():
    lm = LatencyModel(bandwidth=1000.0, cpu_flops_per_s=100.0, transfer_fixed_s=0.5)
    assert lm.transfer_s(1000) == 1.5 and lm.cpu_s(3, 40.0) == 1.2
    assert lm.run_on_cpu(3, 1000, 40.0) and not lm.run_on_cpu(4, 1000, 40.0)  # 1.6 s > 1.5 s
    with pytest.raises(MoelabError, match="bandwidth"):
        LatencyModel(bandwidth=0.0, cpu_flops_per_s=1.0)
    assert measure_cpu_flops(32, 64, reps=3) > 0


def _budget(path):
    _, probe = offload_model(path, budget=1.0)
    b = 2 * min_budget_bytes(probe.store, probe.view)
    probe.close()
    return b


# float64: moelab's backend then runs its per-expert loop in every path (grouped_mm's few-row
# path is float32/bf16 only), so "exact" means the same floating-point operations
@pytest.mark.parametrize("family", ["Qwen3-MoE", "GPT-OSS", "Llama4", "DeepSeek-V3"])
def test_fiddler_outputs_equal_the_resident_model(tiny_dirs, family):
    path = tiny_dirs[family]
    resident = open_model(path, dtype=torch.float64, experts_implementation="moelab").model
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = resident(ids).logits
        want_gen = resident.generate(ids[:1], max_new_tokens=6, do_sample=False)
    budget = _budget(path)
    # bandwidth such that moving an expert costs as much as ~2.5 tokens on the CPU
    _, probe = offload_model(path, budget=budget, dtype=torch.float64)
    size = probe.store.expert_bytes(probe.view.blocks[0].layer)
    probe.close()
    flops = 2 * size / 8
    lm = LatencyModel(bandwidth=size / (2.5 * flops / 1e9), cpu_flops_per_s=1e9)
    model, experts = offload_model(path, budget=budget, dtype=torch.float64, fiddler=lm)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False), want_gen)
    st = experts.provider.stats
    assert st.cpu_runs > 0 and st.moved > 0  # both branches taken
    assert all(cpu == (n <= 2) for n, cpu in st.decisions)  # as the latency model says
    assert sum(c for (_, cpu), c in st.decisions.items() if cpu) == st.cpu_runs
    s = experts.stats()
    assert s.misses == st.moved and s.peak_resident_bytes <= budget
    experts.close()


def test_fiddler_extremes(tiny_dirs):
    path = tiny_dirs["Mixtral"]
    budget = _budget(path)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    slow = LatencyModel(bandwidth=1e-3, cpu_flops_per_s=1e12)  # moving never pays: all on the CPU
    model, ex = offload_model(path, budget=budget, fiddler=slow)
    plain, ex2 = offload_model(path, budget=budget)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-6, atol=1e-6)
    assert ex.stats().misses == 0 == ex.stats().hits and ex.provider.stats.cpu_runs > 0
    fast = LatencyModel(bandwidth=1e15, cpu_flops_per_s=1.0)  # always move: the plain cache
    model3, ex3 = offload_model(path, budget=budget, fiddler=fast)
    with torch.no_grad():
        model3(ids)
    plain_stats = ex2.stats()
    assert (ex3.stats().hits, ex3.stats().misses) == (plain_stats.hits, plain_stats.misses)
    assert ex3.provider.stats.cpu_runs == 0
    with pytest.raises(MoelabError, match="choose one"):
        offload_model(path, budget=budget, fiddler=fast, prefetch=True)
    for e in (ex, ex2, ex3):
        e.close()


@pytest.mark.parametrize("family", ["Mixtral", "GPT-OSS", "DBRX"])
def test_placed_weights_equal_the_backends_own_parameters(tiny_dirs, family):
    """PlacedWeights (two parts, experts alternating) == the per-expert loop on the model's own
    parameters (float64); a part missing an expert is a clear error."""
    from moelab.errors import MoelabError
    from moelab.models.backend import PlacedWeights, enable_experts_backend, own_params, spec_for

    path = tiny_dirs[family]
    ref = open_model(path, dtype=torch.float64, experts_implementation="moelab")
    view = open_model(path, dtype=torch.float64)

    def placed(block, ids_n, drop=False):
        spec = spec_for(block)
        own = own_params(block, spec.params)
        r = own[spec.params[0]].shape[0] // block.num_experts
        parts = []
        for positions in ([p for p in range(len(ids_n)) if p % 2 == 0], [p for p in range(len(ids_n)) if p % 2]):
            if positions and not (drop and positions[0] == 1):
                rows = torch.cat([torch.arange(int(ids_n[p]) * r, (int(ids_n[p]) + 1) * r) for p in positions])
                parts.append((spec.from_params(block, {n: t[rows] for n, t in own.items()}), positions))
        return PlacedWeights(parts)

    enable_experts_backend(view, placed)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(view.model(ids).logits, ref.model(ids).logits)
        enable_experts_backend(view, lambda b, n: placed(b, n, drop=True))
        with pytest.raises(MoelabError, match="PlacedWeights: the parts cover experts"):
            view.model(ids)
