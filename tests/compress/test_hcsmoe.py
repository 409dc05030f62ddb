"""HC-SMoE: the clustering equals a slow from-scratch implementation on random points; the plan is a
frequency-weighted merge of the clusters of the experts' mean outputs; identity at ratio 0; errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.analysis.similarity import mean_expert_outputs
from moelab.compress.apply import apply_plan
from moelab.compress.calib import calibration_batches
from moelab.compress.common import layer_inputs
from moelab.compress.hcsmoe import agglomerative, plan_hcsmoe
from moelab.compress.simulate import simulated
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.models.tiny import tiny_model


def slow_agglomerative(points, k, linkage):
    """Recompute every cluster-pair linkage from the point distances at every step."""
    reduce = {"average": np.mean, "single": np.min, "complete": np.max}[linkage]
    clusters = [[i] for i in range(len(points))]
    while len(clusters) > k:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                dist = reduce([np.linalg.norm(points[i] - points[j]) for i in clusters[a] for j in clusters[b]])
                if best is None or dist < best[0]:
                    best = (dist, a, b)
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters, key=lambda c: c[0])


@pytest.mark.parametrize("linkage", ["average", "single", "complete"])
@pytest.mark.parametrize("seed", range(5))
def test_clustering_equals_slow_reference(linkage, seed):
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(12, 5)) * rng.uniform(0.2, 3.0, size=(12, 1))  # uneven spreads
    for k in (1, 3, 6, 11, 12):
        assert agglomerative(points, k, linkage) == slow_agglomerative(points, k, linkage)


def test_clustering_finds_obvious_groups():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([c + 0.1 * rng.normal(size=(3, 2)) for c in centres])[[0, 3, 6, 1, 4, 7, 2, 5, 8]]
    assert agglomerative(points, 3) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    with pytest.raises(MoelabError, match="linkage: expected"):
        agglomerative(points, 3, "ward")


def _setup(family="OLMoE", tokens=128):
    model = tiny_model(family)
    view = open_model(model)
    ids = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(1))
    return view, calibration_batches(view, ids, tokens=tokens, seq_len=16, batch_size=4, seed=0)


@pytest.mark.parametrize("family", ["OLMoE", "Qwen2-MoE", "DeepSeek-V3"])
def test_plan_merges_clusters_by_frequency(family):
    view, calib = _setup(family)
    spec = CompressSpec(ratio=0.5)
    plan = plan_hcsmoe(view, calib, spec)
    inputs = layer_inputs(view, calib)
    for b in view.blocks:
        lp, li = plan.layers[b.layer], inputs[b.layer]
        clusters = agglomerative(mean_expert_outputs(b, li.hidden_TH), spec.kept_per_layer(b.num_experts))
        assert plan.meta["clusters"][str(b.layer)] == clusters
        assert lp.num_experts == len(clusters) == spec.kept_per_layer(b.num_experts)
        assert float(li.freq_E.sum()) == calib.num_tokens * b.top_k
        for out, cluster in zip(lp.experts, clusters, strict=True):
            assert [m.expert for m in out.members] == cluster
            f = li.freq_E[cluster].numpy()
            want = f / f.sum() if f.sum() > 0 else np.full(len(f), 1 / len(f))  # never selected: uniform
            np.testing.assert_allclose([m.coef for m in out.members], want, rtol=1e-12)
            assert out.router_from == cluster[int(np.argmax(f))]


def test_deterministic_identity_and_alignment():
    view, calib = _setup("Mixtral")
    a = plan_hcsmoe(view, calib, CompressSpec(ratio=0.5, seed=1))
    b = plan_hcsmoe(view, calib, CompressSpec(ratio=0.5, seed=1))
    a.meta.pop("seconds"), b.meta.pop("seconds")
    assert a.to_json() == b.to_json()
    ident = plan_hcsmoe(view, calib, CompressSpec(ratio=0.0))
    for blk in view.blocks:
        lp = ident.layers[blk.layer]
        assert lp.is_pruning() and lp.sources() == list(range(blk.num_experts))
    aligned = plan_hcsmoe(view, calib, CompressSpec(ratio=0.5), align=True)
    for lp in aligned.layers.values():
        for out in lp.experts:
            for m in out.members:
                assert (m.perm is None) == (m.expert == out.router_from)
                if m.perm is not None:
                    assert sorted(m.perm.tolist()) == list(range(view.blocks[0].intermediate_size))


def test_bad_input_names_the_argument():
    view, calib = _setup("Mixtral")
    spec = CompressSpec(ratio=0.5)
    with pytest.raises(MoelabError, match="calib: hc-smoe needs calibration data"):
        plan_hcsmoe(view, None, spec)
    with pytest.raises(MoelabError, match=r"calib: hc-smoe got 128 .*min_tokens"):
        plan_hcsmoe(view, calib, spec, min_tokens=129)
    with pytest.raises(MoelabError, match="kept: layer 1 would keep 0 of its 4 experts"):
        plan_hcsmoe(view, calib, spec, kept={1: 0})
    with pytest.raises(MoelabError, match="linkage: expected"):
        plan_hcsmoe(view, calib, spec, linkage="ward")


@pytest.mark.parametrize("family,align", [("Mixtral", False), ("Qwen2-MoE", True), ("GPT-OSS", False)])
def test_applied_model_equals_simulation(family, align, strong_model):
    model = strong_model(family)
    view = open_model(model)
    ids = torch.randint(0, 64, (16, 32), generator=torch.Generator().manual_seed(1))
    calib = calibration_batches(view, ids, tokens=128, seq_len=16, batch_size=4, seed=0)
    plan = plan_hcsmoe(view, calib, CompressSpec(ratio=0.5), align=align)
    assert any(len(o.members) > 1 for lp in plan.layers.values() for o in lp.experts)
    new = apply_plan(model, plan)
    batch = calib.batches[0]
    with torch.no_grad():
        got = new(input_ids=batch).logits
        with simulated(view, plan):
            sim = model(input_ids=batch).logits
    assert (got - sim).abs().max().item() <= 1e-6 * sim.abs().max().item()
