"""Every router: formula against a slow per-token reference, layer output against the experts'
reference for the same routing, bad input. Router maths is float32 (by design), so weights are
compared at 1e-6; layer outputs given a routing are float64 and compared at 1e-10.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.nn import (
    DomainConfig,
    DomainRouter,
    ExpertChoiceConfig,
    ExpertChoiceRouter,
    Experts,
    ExpertsConfig,
    GroupLimitedConfig,
    GroupLimitedRouter,
    MoELayer,
    NullExpertsConfig,
    NullExpertsRouter,
    RandomFixedRouter,
    RandomRouterConfig,
    RoutingError,
    SparseMixerConfig,
    SparseMixerRouter,
    ThorConfig,
    ThorRouter,
    ThresholdConfig,
    ThresholdRouter,
    TopKConfig,
    TopKRouter,
    TopPConfig,
    TopPRouter,
    bias_update,
    consistency_loss,
    null_balance_loss,
    smoe_dropout_k,
)

F64 = torch.float64
H = 6


def experts(E, seed=0):
    torch.manual_seed(seed)
    return Experts(ExpertsConfig(num_experts=E, hidden_size=H, inner_size=4), dtype=F64)


def check_layer(router, E, x, **kw):
    """The layer's output equals the experts' slow reference on the router's own routing."""
    moe = MoELayer(router, experts(E))
    out = moe(x, **kw)
    r = out.routing
    assert r.logits_TE.dtype == torch.float32 and r.ids_TK.dtype == torch.int64
    assert r.ids_TK.shape == r.weights_TK.shape
    ref = moe.experts.reference(x, r.ids_TK, r.weights_TK.to(F64), r.mask_TK)
    torch.testing.assert_close(out.y, ref, rtol=1e-10, atol=1e-10)
    return r


def router_factories(E):
    return {
        "topk": lambda: TopKRouter(
            TopKConfig(num_experts=E, hidden_size=H, top_k=min(2, E)), dtype=F64
        ),
        "group": lambda: GroupLimitedRouter(
            GroupLimitedConfig(num_experts=E, hidden_size=H, top_k=1), dtype=F64
        ),
        "top_p": lambda: TopPRouter(TopPConfig(num_experts=E, hidden_size=H, p=0.5), dtype=F64),
        "null": lambda: NullExpertsRouter(
            NullExpertsConfig(num_experts=E, hidden_size=H, num_null=2, top_k=2), dtype=F64
        ),
        "expert_choice": lambda: ExpertChoiceRouter(
            ExpertChoiceConfig(num_experts=E, hidden_size=H), dtype=F64
        ),
        "random": lambda: RandomFixedRouter(
            RandomRouterConfig(num_experts=E, hidden_size=H), dtype=F64
        ),
        "thor": lambda: ThorRouter(ThorConfig(num_experts=E)),
        "threshold": lambda: ThresholdRouter(
            ThresholdConfig(num_experts=E, hidden_size=H, min_k=0), dtype=F64
        ),
        "sparsemixer": lambda: SparseMixerRouter(
            SparseMixerConfig(num_experts=E, hidden_size=H, top_k=min(2, E), jitter_eps=0.3),
            dtype=F64,
        ),
        "domain": lambda: DomainRouter(
            DomainConfig(num_experts=E, hidden_size=H, domain_experts=[[0], [E - 1]]), dtype=F64
        ),
    }


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(router_factories(2))),
    T=st.integers(0, 10),
    E=st.integers(2, 6),
    seed=st.integers(0, 999),
)
def test_every_router_through_the_layer(name, T, E, seed):
    torch.manual_seed(seed)
    router = router_factories(E)[name]()
    x = torch.randn(T, H, dtype=F64) * 3
    kw = {"domain_T": torch.randint(0, 2, (T,))} if name == "domain" else {}
    r = check_layer(router, E, x, **kw)
    real = r.real_mask()
    assert torch.all(r.weights_TK[~real] == 0)
    assert torch.all((r.ids_TK[real] >= 0) & (r.ids_TK[real] < E))


def test_group_limited_equals_transformers_deepseek_v3():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(
        hidden_size=H,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    hf = DeepseekV3TopkRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        hf.weight.normal_()
        hf.e_score_correction_bias.normal_(std=0.1)
    ours = GroupLimitedRouter(
        GroupLimitedConfig(
            num_experts=8,
            hidden_size=H,
            top_k=3,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
        )
    )
    with torch.no_grad():
        ours.weight.copy_(hf.weight)
        ours.correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(20, H)
    logits, w, ids = hf(x)
    r = ours(x)
    o1, o2 = ids.sort(-1), r.ids_TK.sort(-1)
    assert torch.equal(o1.values, o2.values)
    torch.testing.assert_close(
        w.gather(1, o1.indices), r.weights_TK.gather(1, o2.indices), rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(r.logits_TE, logits)


def test_group_limited_softmax_max_groups_slow_reference():
    E, G, TG, K = 8, 4, 2, 2
    router = GroupLimitedRouter(
        GroupLimitedConfig(
            num_experts=E,
            hidden_size=H,
            top_k=K,
            scoring="softmax",
            n_group=G,
            topk_group=TG,
            group_score="max",
            normalize=False,
            correction_bias=False,
        )
    )
    x = torch.randn(15, H)
    r = router(x)
    for t in range(15):
        s = torch.softmax(r.logits_TE[t], -1)
        groups = sorted(range(G), key=lambda g: -float(s[2 * g : 2 * g + 2].max()))[:TG]
        allowed = [e for g in groups for e in (2 * g, 2 * g + 1)]
        best = sorted(allowed, key=lambda e: -float(s[e]))[:K]
        assert set(r.ids_TK[t].tolist()) == set(best)
        torch.testing.assert_close(r.weights_TK[t].sort().values, s[best].sort().values)


def test_aux_loss_free_bias_balances_load():
    E = 4
    router = GroupLimitedRouter(GroupLimitedConfig(num_experts=E, hidden_size=H, top_k=1))
    with torch.no_grad():
        router.weight.normal_(std=0.5)
    x = torch.randn(256, H)
    x[:, 0] = x[:, 0].abs() + 1
    with torch.no_grad():
        router.weight[0, 0] = 3.0  # expert 0 wins nearly everything at the start
    start = router(x).tokens_per_expert()
    for _ in range(300):
        router.update_bias(router(x).tokens_per_expert(), rate=0.01)
    end = router(x).tokens_per_expert()
    assert int(end.max()) < int(start.max()) and int(end.max()) <= 256 // E * 2
    # the bias steers selection only: weights are still the unbiased sigmoid scores
    r = router(x)
    torch.testing.assert_close(
        r.weights_TK,
        r.aux["scores_TE"].gather(1, r.ids_TK) / r.aux["scores_TE"].gather(1, r.ids_TK),
    )
    assert torch.equal(
        bias_update(torch.tensor([5, 1, 3, 3]), 0.1), torch.tensor([-0.1, 0.1, 0.0, 0.0])
    )


@pytest.mark.parametrize("p", [0.1, 0.4, 0.75, 1.0])
def test_top_p_smallest_set_reaching_p(p):
    router = TopPRouter(TopPConfig(num_experts=6, hidden_size=H, p=p))
    r = router(torch.randn(30, H) * 2)
    probs = torch.softmax(r.logits_TE, -1)
    for t in range(30):
        order = probs[t].argsort(descending=True).tolist()
        n, mass = 0, 0.0
        while mass < p and n < 6:
            mass += float(probs[t, order[n]])
            n += 1
        chosen = set(r.ids_TK[t][r.mask_TK[t]].tolist())
        if abs(mass - p) > 1e-5:  # away from float ties the set is exact
            assert chosen == set(order[:n])
        torch.testing.assert_close(
            r.weights_TK[t][r.mask_TK[t]], probs[t, r.ids_TK[t][r.mask_TK[t]]]
        )


def test_null_experts_route_to_nothing_and_loss():
    router = NullExpertsRouter(NullExpertsConfig(num_experts=3, hidden_size=H, num_null=2, top_k=2))
    with torch.no_grad():
        router.null_weight.fill_(0.0)
        router.weight.fill_(0.0)
        router.null_weight[0, 0] = 50.0  # tokens with x0 > 0 pick the null expert first
    x = torch.randn(40, H)
    r = router(x)
    assert torch.equal(r.mask_TK, r.ids_TK < 3)
    assert bool((~r.mask_TK[x[:, 0] > 0.5, 0]).all())
    E, N, T, K = 3, 2, 40, 2
    counts = torch.bincount(r.ids_TK.reshape(-1), minlength=5).float() / (T * K)
    probs = torch.softmax(torch.cat([r.logits_TE, r.aux["null_logits_TN"]], -1), -1).mean(0)
    expect = (E + N) * (
        float((counts[:E] * probs[:E]).sum()) + N * float(counts[E:].mean() * probs[E:].mean())
    )
    assert null_balance_loss(r).item() == pytest.approx(expect, rel=1e-5)
    moe = MoELayer(
        NullExpertsRouter(
            NullExpertsConfig(num_experts=3, hidden_size=H, num_null=1, top_k=1), dtype=F64
        ),
        experts(3),
    )
    with torch.no_grad():
        moe.router.null_weight.fill_(100.0)
    xx = torch.ones(5, H, dtype=F64)
    assert torch.count_nonzero(moe(xx).y) == 0  # every token chose the null expert


def test_expert_choice_balanced_capacity():
    router = ExpertChoiceRouter(
        ExpertChoiceConfig(num_experts=4, hidden_size=H, capacity_factor=1.0)
    )
    r = router(torch.randn(12, H))
    assert r.tokens_per_expert().tolist() == [3, 3, 3, 3]
    probs = torch.softmax(r.logits_TE, -1)
    for e in range(4):
        chosen = {
            t
            for t in range(12)
            for k in range(r.ids_TK.shape[1])
            if r.mask_TK[t, k] and r.ids_TK[t, k] == e
        }
        assert chosen == set(probs[:, e].topk(3).indices.tolist())


def test_random_fixed_router_is_frozen_and_k_grows():
    cfg = RandomRouterConfig(
        num_experts=8, hidden_size=H, k_start=1, k_end=4, total_steps=100, seed=3
    )
    router = RandomFixedRouter(cfg)
    assert list(router.parameters()) == [] and "weight" in dict(router.named_buffers())
    assert [smoe_dropout_k(s, cfg) for s in (0, 24, 25, 50, 75, 99, 1000)] == [1, 1, 2, 3, 4, 4, 4]
    x = torch.randn(5, H)
    router.set_step(60)
    assert router(x).ids_TK.shape == (5, 3)
    assert torch.equal(
        RandomFixedRouter(cfg)(x).ids_TK, RandomFixedRouter(cfg)(x).ids_TK
    )  # seed-determined


def test_thor_random_experts_and_consistency_loss():
    router = ThorRouter(ThorConfig(num_experts=4, level="sequence"))
    x = torch.randn(12, H)
    r = router(x, num_sequences=3, generator=torch.Generator().manual_seed(0))
    assert r.ids_TK.shape == (12, 1) and torch.all(r.weights_TK == 1)
    assert all(len(set(r.ids_TK[4 * b : 4 * b + 4, 0].tolist())) == 1 for b in range(3))
    r2 = router(x, num_sequences=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r.ids_TK, r2.ids_TK)
    tok = ThorRouter(ThorConfig(num_experts=4))(
        torch.randn(4000, H), generator=torch.Generator().manual_seed(1)
    )
    assert tok.tokens_per_expert().min() > 850  # uniform: 1000 each
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    pa, pb = a.softmax(-1), b.softmax(-1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1).mean()  # noqa: E731
    assert consistency_loss(a, b).item() == pytest.approx(
        float((kl(pa, pb) + kl(pb, pa)) / 2), rel=1e-5
    )
    assert consistency_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)


def test_domain_router_stays_in_domain():
    router = DomainRouter(
        DomainConfig(num_experts=6, hidden_size=H, domain_experts=[[0, 1, 2], [3, 4], [5]], top_k=1)
    )
    dom = torch.tensor([0, 1, 2, 0, 1, 2])
    r = router(torch.randn(6, H), domain_T=dom)
    allowed = {0: {0, 1, 2}, 1: {3, 4}, 2: {5}}
    assert all(int(r.ids_TK[t, 0]) in allowed[int(dom[t])] for t in range(6))
    with pytest.raises(RoutingError, match="pass domain_T"):
        router(torch.randn(6, H))
    with pytest.raises(RoutingError, match="labels must lie"):
        router(torch.randn(2, H), domain_T=torch.tensor([0, 3]))
    with pytest.raises(RoutingError, match="top_k"):
        DomainConfig(num_experts=6, hidden_size=H, domain_experts=[[0, 1], [2]], top_k=2)


def test_threshold_router_any_number_of_experts():
    router = ThresholdRouter(ThresholdConfig(num_experts=5, hidden_size=H, threshold=0.6, min_k=0))
    r = router(torch.randn(50, H) * 3)
    g = torch.sigmoid(r.logits_TE)
    for t in range(50):
        assert set(r.ids_TK[t][r.mask_TK[t]].tolist()) == set(
            torch.nonzero(g[t] > 0.6).flatten().tolist()
        )
    counts = r.mask_TK.sum(-1)
    assert counts.min() == 0 and counts.max() > 1  # top-any: none and several occur
    r1 = ThresholdRouter(ThresholdConfig(num_experts=5, hidden_size=H, threshold=0.99, min_k=1))(
        torch.randn(9, H)
    )
    assert torch.all(r1.mask_TK.sum(-1) >= 1)


def test_permuting_experts_and_router_rows_changes_nothing():
    E = 5
    x = torch.randn(9, H, dtype=F64)
    perm = torch.randperm(E, generator=torch.Generator().manual_seed(2))
    for name in ("topk", "top_p", "expert_choice", "threshold"):
        torch.manual_seed(0)
        a = MoELayer(router_factories(E)[name](), experts(E))
        b = MoELayer(router_factories(E)[name](), experts(E))
        with torch.no_grad():
            b.router.weight.copy_(a.router.weight[perm])
            for pb, pa in zip(b.experts.parameters(), a.experts.parameters(), strict=True):
                pb.copy_(pa[perm])
        ya, yb = a(x), b(x)
        # the same experts are chosen (renamed by the permutation) ...
        ra, rb = ya.routing, yb.routing
        assert torch.equal(
            torch.where(ra.real_mask(), ra.ids_TK, -1).sort(-1).values,
            torch.where(rb.real_mask(), perm[rb.ids_TK], -1).sort(-1).values,
        ), name
        # ... and outputs agree up to float32 router rounding (BLAS blocking differs with row order)
        torch.testing.assert_close(ya.y, yb.y, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("eps", [0.01, 0.3, 2.0])
def test_sparsemixer_equals_transformers_phimoe_eval(eps):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    E = 6
    router = SparseMixerRouter(SparseMixerConfig(num_experts=E, hidden_size=H, top_k=2,
                                                 jitter_eps=eps))
    x = torch.randn(40, H) * 2
    r = router(x)
    w_hf, ids_hf = sparsemixer(r.logits_TE, jitter_eps=eps, training=False, top_k=2)
    assert torch.equal(r.ids_TK, ids_hf)
    torch.testing.assert_close(r.weights_TK, w_hf, rtol=1e-6, atol=1e-7)
    # slow reference of the formula, float64
    z = r.logits_TE.double()
    for t in range(z.shape[0]):
        taken = []
        for k in range(2):
            free = [e for e in range(E) if e not in taken]
            m = max(float(z[t, e]) for e in free)
            e_star = max(free, key=lambda e: float(z[t, e]))
            keep = [e for e in free if (m - float(z[t, e])) / max(abs(float(z[t, e])), m) <= 2 * eps]
            w = torch.exp(z[t, e_star]) / sum(torch.exp(z[t, e]) for e in keep)
            assert int(r.ids_TK[t, k]) == e_star
            assert float(r.weights_TK[t, k]) == pytest.approx(float(w), rel=1e-5)
            taken.append(e_star)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_bad_p(bad):
    with pytest.raises(RoutingError, match="p must lie in"):
        TopPConfig(num_experts=4, hidden_size=H, p=bad)


def test_bad_configs():
    with pytest.raises(RoutingError, match="top_k=9 > number of experts"):
        GroupLimitedConfig(num_experts=8, hidden_size=H, top_k=9)
    with pytest.raises(RoutingError, match="n_group"):
        GroupLimitedConfig(num_experts=8, hidden_size=H, top_k=2, n_group=3)
    with pytest.raises(RoutingError, match="kept groups"):
        GroupLimitedConfig(num_experts=8, hidden_size=H, top_k=3, n_group=4, topk_group=1)
    with pytest.raises(RoutingError, match="top_k=4 > number of experts E=3"):
        NullExpertsConfig(num_experts=2, hidden_size=H, num_null=1, top_k=4)
    with pytest.raises(RoutingError, match="threshold"):
        ThresholdConfig(num_experts=2, hidden_size=H, threshold=1.0)
    with pytest.raises(RoutingError, match="jitter_eps"):
        SparseMixerConfig(num_experts=4, hidden_size=H, jitter_eps=-1.0)
    with pytest.raises(RoutingError, match="top_k=5 > number of experts E=4"):
        SparseMixerConfig(num_experts=4, hidden_size=H, top_k=5)
    with pytest.raises(RoutingError, match="rate"):
        bias_update(torch.ones(3), rate=0)
    router = TopPRouter(TopPConfig(num_experts=3, hidden_size=H))
    with pytest.raises(RoutingError, match="non-finite"):
        router(torch.full((2, H), float("inf")))


@pytest.mark.parametrize("name", sorted(router_factories(4)))
def test_gradcheck_every_router_through_the_layer(name):
    """d y / d x and d y / d router weight by finite differences, float64 experts; routers compute
    in float32 by design, hence eps=1e-3 and rtol=1e-2 (selection does not flip at this eps here)."""
    E = 4
    torch.manual_seed(5)
    router = router_factories(E)[name]()
    if name == "sparsemixer":  # PhiMoE's eps: the kept set does not change within +-eps here
        router.config.jitter_eps = 0.01
    moe = MoELayer(router, experts(E))
    x = torch.randn(5, H, dtype=F64, requires_grad=True)
    kw = {"domain_T": torch.tensor([0, 1, 1, 0, 1])} if name == "domain" else {}
    if name == "thor":  # random expert per token: the same draw on every call
        def f(x):
            return moe(x, generator=torch.Generator().manual_seed(0)).y
    else:
        def f(x):
            return moe(x, **kw).y
    assert torch.autograd.gradcheck(f, (x,), eps=1e-3, atol=1e-3, rtol=1e-2)
    w = getattr(router, "weight", None)
    if isinstance(w, torch.nn.Parameter):
        def g(w_):
            return torch.func.functional_call(moe, {"router.weight": w_}, (x.detach(),), kw).y
        assert torch.autograd.gradcheck(g, (w.detach().clone().requires_grad_(),),
                                        eps=1e-3, atol=1e-3, rtol=1e-2)
