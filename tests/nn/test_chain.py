"""ChainOfExperts against a plain MoELayer (C=1) and a float64 per-token reference loop.

Tolerances: module vs float64 reference 1e-10 (same maths, different summation order); routers
compute in float32 by design, so gradcheck uses eps=1e-3 and rtol=1e-2 (as for MoELayer).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.nn import (
    ChainConfig,
    ChainOfExperts,
    DenseMLP,
    Experts,
    ExpertsConfig,
    MoELayer,
    NullExpertsConfig,
    NullExpertsRouter,
    RoutingError,
    TopKConfig,
    TopKRouter,
)

F64 = torch.float64
H = 6


def routers(C, E=4, k=2, seed=0):
    torch.manual_seed(seed)
    return [
        TopKRouter(TopKConfig(num_experts=E, hidden_size=H, top_k=k), dtype=F64) for _ in range(C)
    ]


def experts(E=4, I=5, seed=1):
    torch.manual_seed(seed)
    return Experts(ExpertsConfig(num_experts=E, hidden_size=H, inner_size=I), dtype=F64)


def shared(seed=2):
    torch.manual_seed(seed)
    return DenseMLP(H, 3, dtype=F64), torch.nn.Linear(H, 1, bias=False, dtype=F64)


def test_one_iteration_equals_moe_layer():
    (r,), ex = routers(1), experts()
    sh, gate = shared()
    x = torch.randn(2, 5, H, dtype=F64)
    plain = MoELayer(r, ex, sh, gate)(x)
    none = ChainOfExperts([r], ex, sh, gate, config=ChainConfig(residual="none"))(x)
    torch.testing.assert_close(none.y, plain.y, rtol=0, atol=0)
    assert torch.equal(none.routing.ids_TK, plain.routing.ids_TK)
    inner = ChainOfExperts([r], ex, sh, gate)(x)
    torch.testing.assert_close(inner.y, x + plain.y, rtol=0, atol=0)


def slow_chain(chain, x_TH, residual):
    """Per-token, per-iteration loop written from the paper's formula, float64."""
    x0 = x_TH.clone()
    cur = x_TH.clone()
    for i, router in enumerate(chain.routers):
        ex = chain.experts[i if chain.independent_experts else 0]
        nxt = []
        for t in range(cur.shape[0]):
            p = torch.softmax(router.weight.double() @ cur[t], -1)
            top = sorted(range(len(p)), key=lambda e: -float(p[e]))[: router.config.top_k]
            w = p[top] / p[top].sum()
            f = sum(w[j] * ex.expert(e, cur[t : t + 1])[0] for j, e in enumerate(top))
            if chain.shared_experts is not None:
                f = f + chain.shared_experts(cur[t]) * torch.sigmoid(chain.shared_gate(cur[t]))
            base = {"inner": cur[t], "add_init": x0[t], "none": 0}[residual]
            nxt.append(base + f)
        cur = torch.stack(nxt)
    return cur


@pytest.mark.parametrize("residual", ["inner", "add_init", "none"])
@pytest.mark.parametrize("independent", [False, True])
def test_module_equals_float64_reference(residual, independent):
    C = 3
    ex = [experts(seed=10 + i) for i in range(C)] if independent else experts()
    sh, gate = shared()
    chain = ChainOfExperts(routers(C), ex, sh, gate, config=ChainConfig(residual=residual))
    x = torch.randn(7, H, dtype=F64)
    out = chain(x)
    assert len(out.routings) == C and out.y.shape == x.shape
    torch.testing.assert_close(out.y, chain.reference(x), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        slow = slow_chain(chain, x, residual)
    # the slow loop's router runs in float64, the module's in float32: weights agree to ~1e-7
    torch.testing.assert_close(out.y, slow, rtol=1e-6, atol=1e-6)
    # parameters: shared experts registered once; C routers
    n_exp = sum(p.numel() for e in ([ex] if not independent else ex) for p in e.parameters())
    n_sh = sum(p.numel() for p in (*sh.parameters(), *gate.parameters()))
    n_r = sum(p.numel() for r in chain.routers for p in r.parameters())
    assert sum(p.numel() for p in chain.parameters()) == n_exp + n_sh + n_r


def test_iterations_route_differently_and_gradients_reach_every_router():
    chain = ChainOfExperts(routers(2, E=6), experts(E=6))
    x = torch.randn(16, H, dtype=F64)
    out = chain(x)
    assert not torch.equal(out.routings[0].ids_TK, out.routings[1].ids_TK)
    out.y.pow(2).sum().backward()
    for r in chain.routers:
        assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


def test_gradcheck_tiny():
    chain = ChainOfExperts(routers(2, E=3), experts(E=3, I=3), *shared())
    x = torch.randn(4, H, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: chain(x).y, (x,), eps=1e-3, atol=1e-3, rtol=1e-2)
    # the expert path alone with routing frozen: exact float64 gradcheck
    with torch.no_grad():
        routings = chain(x).routings
    ids = [r.ids_TK for r in routings]
    ws = [r.weights_TK.double() for r in routings]

    def frozen(x):
        for i in range(2):
            x = x + chain.experts[0](x, ids[i], ws[i])
        return x

    assert torch.autograd.gradcheck(frozen, (x,))


def test_determinism_under_seed():
    x = torch.randn(5, H, dtype=F64)

    def build(seed):
        return ChainOfExperts(routers(2, seed=seed), experts(seed=seed + 1))

    assert torch.equal(build(3)(x).y, build(3)(x).y)
    assert not torch.equal(build(3)(x).y, build(4)(x).y)


@settings(max_examples=20, deadline=None)
@given(
    T=st.integers(0, 9),
    C=st.integers(1, 3),
    E=st.integers(2, 5),
    cf=st.sampled_from([None, 0.5]),
    seed=st.integers(0, 999),
)
def test_random_shapes_null_experts_and_capacity(T, C, E, cf, seed):
    torch.manual_seed(seed)
    rs = [
        NullExpertsRouter(
            NullExpertsConfig(num_experts=E, hidden_size=H, num_null=2, top_k=2), dtype=F64
        )
        for _ in range(C)
    ]
    chain = ChainOfExperts(rs, experts(E=E, seed=seed), capacity_factor=cf)
    x = torch.randn(T, H, dtype=F64) * 3
    out = chain(x)
    torch.testing.assert_close(out.y, chain.reference(x), rtol=1e-10, atol=1e-10)
    if cf is None:
        assert all(int(d) == 0 for d in out.num_dropped)


def test_bad_input():
    with pytest.raises(RoutingError, match="at least one router"):
        ChainOfExperts([], experts())
    with pytest.raises(RoutingError, match="one per iteration"):
        ChainOfExperts(routers(3), [experts(), experts()])
    with pytest.raises(RoutingError, match="E=4 experts but experts has E=3"):
        ChainOfExperts(routers(2), experts(E=3))
    with pytest.raises(RoutingError, match="residual"):
        ChainConfig(residual="outer")
