"""Prefetch on a background thread: outputs unchanged, budget kept, thread shut down on close."""

from __future__ import annotations

import threading

import torch

from moelab.data import default_model
from moelab.models import open_model
from moelab.offload import min_budget_bytes, offload_model


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("moelab-prefetch")]


def test_prefetch_keeps_outputs_and_budget_and_stops_cleanly():
    path = default_model()
    resident = open_model(path, experts_implementation="moelab").model
    _, probe = offload_model(path, budget=1.0)
    budget = 2 * min_budget_bytes(probe.store, probe.view) * len(probe.view.blocks)
    probe.close()
    ids = torch.randint(5, 4000, (2, 16), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        want_logits, want = resident(ids).logits, resident.generate(ids, **kw)
    before = len(_prefetch_threads())
    model, experts = offload_model(path, budget=budget, prefetch=True)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want_logits)
        assert torch.equal(model.generate(ids, **kw), want)
    s = experts.stats()
    assert s.prefetched > 0 and 0 < s.prefetch_used <= s.prefetched
    assert s.peak_resident_bytes <= budget
    q = experts.prefetcher.quality
    assert 0 < q.precision <= 1 and 0 < q.recall <= 1
    assert len(_prefetch_threads()) > before  # the worker ran
    experts.close()
    assert len(_prefetch_threads()) == before
    with torch.no_grad():  # still runs, without prefetch
        assert torch.equal(model(ids).logits, want_logits)
    assert experts.stats().prefetched == s.prefetched


def test_prefetch_at_the_smallest_budget_is_still_exact(tiny_dirs):
    path = tiny_dirs["Qwen3-MoE"]
    resident = open_model(path, experts_implementation="moelab").model
    _, probe = offload_model(path, budget=1.0)
    budget = min_budget_bytes(probe.store, probe.view)
    probe.close()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(4))
    with offload_model(path, budget=budget, prefetch=True)[1] as experts:
        model = experts.view.model
        with torch.no_grad():
            assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                               resident.generate(ids, max_new_tokens=8, do_sample=False))
        assert experts.stats().peak_resident_bytes <= budget
