"""The byte-budget cache: budgets, the shared bookkeeping, and replayed == measured hit rates."""

from __future__ import annotations

import pytest
import torch

from moelab.analysis.cache_policy import KeyCache, make_policy, replay
from moelab.errors import MoelabError
from moelab.models import open_model
from moelab.offload import offload_model, parse_budget


def test_parse_budget():
    assert parse_budget(1000, 10) == 1000
    assert parse_budget("64MiB", 1) == 64 * 2**20
    assert parse_budget("1.5GB", 1) == 1_500_000_000
    assert parse_budget("512k", 1) == 512_000
    assert parse_budget(0.25, 4000) == 1000 == parse_budget("25%", 4000)
    for bad in ("lots", 1.5, 0.0, True, "0", None):
        with pytest.raises(MoelabError, match="budget"):
            parse_budget(bad, 4000)


def test_key_cache_keeps_sizes_within_capacity():
    sizes = {"a": 3, "b": 2, "c": 2, "d": 4}
    cache = KeyCache(6, make_policy("lru"), size=sizes.__getitem__)
    assert cache.access(["a", "b"], 0).hits == [False, False]
    res = cache.access(["c"], 1)  # 3 + 2 + 2 > 6: the least recently used, a, goes
    assert res.evicted == ["a"] and cache.used == 4
    res = cache.access(["b", "d"], 2)  # d needs 4: c goes (b was just used)
    assert res.hits == [True, False] and res.evicted == ["c"] and cache.used == 6 == cache.peak
    assert cache.admit("b", 3).hits == [True]
    with pytest.raises(ValueError, match="more than the whole capacity"):
        KeyCache(3, make_policy("lru"), size=sizes.__getitem__).access(["d"], 0)


def test_belady_is_the_bound_of_online_policies():
    rng = torch.Generator().manual_seed(0)
    steps = [torch.randint(0, 12, (3,), generator=rng).unique().tolist() for _ in range(300)]
    best = replay(steps, 5, "belady").hit_rate
    for policy in ("lru", "lfu"):
        assert replay(steps, 5, policy).hit_rate <= best
    with pytest.raises(ValueError, match="needs the steps"):
        make_policy("belady")


def _recorded(view):
    """Routing hooks recording the cache steps a run implies: per forward and block, the sorted
    distinct experts it routes to, as (layer, expert) keys."""
    steps = []

    def hook(event):
        steps.append([(event.block.layer, int(e)) for e in event.ids_TK.unique().tolist()])

    return steps, [b.register_routing_hook(hook) for b in view.blocks]


@pytest.mark.parametrize(("family", "policy"), [
    ("Qwen3-MoE", "lru"), ("DeepSeek-V3", "lfu"), ("GPT-OSS", "lrfu"), ("Mixtral", "activation"),
])
def test_replayed_hit_rate_equals_the_measured_one(tiny_dirs, family, policy):
    path = tiny_dirs[family]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 64, (1, 6), generator=gen) for _ in range(3)]

    def run(model, new_request):  # three requests
        outs = []
        for p in prompts:
            new_request()
            with torch.no_grad():
                outs.append(model.generate(p, max_new_tokens=12, do_sample=False, min_new_tokens=12))
        return outs

    resident = open_model(path, experts_implementation="moelab")
    steps, hooks = _recorded(resident)
    starts = []
    want = run(resident.model, lambda: starts.append(len(steps)))
    for h in hooks:
        h.remove()
    _, probe = offload_model(path, budget=1.0)  # to read the sizes
    size = probe.store.expert_bytes
    probe.close()
    budget = (max(b.top_k for b in resident.blocks) + 2) * max(size(b.layer) for b in resident.blocks)
    simulated = replay(steps, budget, policy, size=lambda k: size(k[0]), request_starts=starts,
                       half_life=8 * len(resident.blocks))
    model, experts = offload_model(path, budget=budget, policy=policy)
    got = run(model, experts.new_request)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    s = experts.stats()
    assert 0 < s.hits and 0 < s.misses
    assert (s.hits, s.misses) == (simulated.hits, simulated.misses)
    assert s.peak_resident_bytes <= budget
    experts.close()


def test_activation_aware_keeps_what_the_matched_request_used():
    # two kinds of request; after seeing one of each, a request of the first kind keeps its experts
    a, b = [[0, 1], [2, 3]] * 20, [[4, 5], [6, 7]] * 20
    steps = a + b + a[:10]
    pol = make_policy("activation")
    aware = replay(steps, 4, pol, request_starts=[0, 40, 80])
    assert aware.hit_rate > replay(steps, 4, "lfu").hit_rate
    assert pol.past and pol.prior


def test_lrfu_spans_lru_and_lfu():
    rng = torch.Generator().manual_seed(5)
    steps = [torch.randint(0, 10, (3,), generator=rng).unique().tolist() for _ in range(400)]
    lru, lfu = replay(steps, 4, "lru"), replay(steps, 4, "lfu")
    assert replay(steps, 4, "lrfu", half_life=1e-3) == lru  # recency alone
    far = replay(steps, 4, "lrfu", half_life=1e9).hit_rate  # counts alone (ties aside)
    assert abs(far - lfu.hit_rate) < 0.02
    with pytest.raises(ValueError, match="half_life"):
        make_policy("lrfu", half_life=0)


def test_a_hit_is_not_evicted_within_its_step():
    loads = []
    for protect in (False, True):
        loads.clear()
        cache = KeyCache(2, make_policy("lru"), on_load=loads.append, protect_step=protect)
        cache.access(["a"], 0)
        cache.access(["c"], 1)
        res = cache.access(["b", "a"], 2)  # a is the least recent: b would evict it
        assert res.hits == [False, True]
        assert loads == (["a", "c", "b"] if protect else ["a", "c", "b", "a"])


def test_the_slot_pool_holds_the_experts_and_a_step_that_overflows_it_gets_copies(tiny_dirs):
    """The cache keeps experts in slot buffers; a step needing more experts than there are slots
    hands out copies of the ones it had to evict again, equal to the store's rows."""
    from moelab.offload.model import min_budget_bytes

    _, probe = offload_model(tiny_dirs["Qwen3-MoE"], budget=1.0)
    budget = min_budget_bytes(probe.store, probe.view)
    probe.close()
    _, ex = offload_model(tiny_dirs["Qwen3-MoE"], budget=budget)
    cache, store = ex.cache, ex.store
    layer, slots_n = store.layers[0], len(cache.pool.free)
    assert slots_n == budget // store.expert_bytes(layer) >= 2

    def same(rows, e):
        return all(torch.equal(rows[n], t) for n, t in store.read(layer, e).items())

    rows, slots = cache.fetch_slots(layer, [0, 1])
    assert slots is not None and len(set(slots)) == 2
    assert all(same(cache.pool.view(s), e) for s, e in zip(slots, [0, 1], strict=True))
    many = list(range(slots_n + 2))  # more than fit: some are evicted within the step
    rows, slots = cache.fetch_slots(layer, many)
    assert slots is None and all(same(r, e) for r, e in zip(rows, many, strict=True))
    rows, slots = cache.fetch_slots(layer, many[-2:])  # slots freed and reused, still right
    assert slots is not None and all(same(cache.pool.view(s), e) for s, e in zip(slots, many[-2:],
                                                                                  strict=True))
    assert cache.stats().peak_resident_bytes <= budget
    ex.close()


def test_no_slot_pool_where_layers_differ():
    """Experts of different shapes in different layers: no pool, the rows are concatenated."""
    from types import SimpleNamespace

    from moelab.offload.cache import SlotPool
    from moelab.offload.store import ExpertParam

    params = {f"l{i}": ExpertParam(f"l{i}", i, "up", 4, (4 * w, 8), torch.float32)
              for i, w in ((1, 16), (2, 32))}
    store = SimpleNamespace(params=params, layers=[1, 2], expert_bytes=lambda layer: 16 * 8 * 4)
    assert SlotPool.for_store(store, 10_000, torch.device("cpu")) is None
    store.params = {k: p for k, p in params.items() if p.layer == 1}
    pool = SlotPool.for_store(store, 10_000, torch.device("cpu"))
    assert pool.buffers["up"].shape == (19 * 16, 8) and len(pool.free) == 19
