"""MoELayer, capacity dropping, losses and the top-k router against slow references (float64)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.nn import (
    DenseMLP,
    Experts,
    ExpertsConfig,
    MoELayer,
    Routing,
    RoutingError,
    TopKConfig,
    TopKRouter,
    apply_capacity,
    load_balancing_loss,
    sequence_balance_loss,
    z_loss,
)

F64 = torch.float64


def layer(E=4, H=6, I=5, k=2, cf=None, shared=False, normalize=True, seed=0):
    torch.manual_seed(seed)
    router = TopKRouter(
        TopKConfig(num_experts=E, hidden_size=H, top_k=k, normalize=normalize), dtype=F64
    )
    experts = Experts(ExpertsConfig(num_experts=E, hidden_size=H, inner_size=I), dtype=F64)
    sh = DenseMLP(H, 3, dtype=F64) if shared else None
    gate = torch.nn.Linear(H, 1, bias=False, dtype=F64) if shared else None
    return MoELayer(router, experts, sh, gate, capacity_factor=cf)


def slow_topk(x_TH, W, k, normalize):
    ids, ws = [], []
    for t in range(x_TH.shape[0]):
        p = torch.softmax((W.double() @ x_TH[t].double()), -1)
        order = sorted(range(len(p)), key=lambda e: -float(p[e]))[:k]
        w = p[order]
        ids.append(order)
        ws.append(w / w.sum() if normalize else w)
    return torch.tensor(ids), torch.stack(ws)


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_layer_equals_reference(normalize):
    moe = layer(normalize=normalize, shared=True)
    x = torch.randn(2, 5, 6, dtype=F64)
    out = moe(x)
    x_TH = x.reshape(-1, 6)
    ids, ws = slow_topk(x_TH, moe.router.weight, 2, normalize)
    assert torch.equal(out.routing.ids_TK, ids)
    torch.testing.assert_close(
        out.routing.weights_TK.double(), ws, rtol=1e-6, atol=1e-7
    )  # float32 router
    ref = moe.experts.reference(x_TH, ids, out.routing.weights_TK.double())
    ref = ref + moe.shared_experts(x_TH) * torch.sigmoid(moe.shared_gate(x_TH))
    torch.testing.assert_close(out.y, ref.reshape(x.shape), rtol=1e-10, atol=1e-10)
    assert out.routing.logits_TE.dtype == torch.float32 and out.y.shape == x.shape
    assert int(out.num_dropped) == 0


def test_layer_gradcheck_and_determinism():
    # The router computes in float32 by design, so finite differences use eps=1e-3 and a 1e-2
    # relative tolerance (float32 rounding ~1e-7 / eps); the expert path alone is checked at 1e-6
    # in test_experts.py.
    moe = layer(E=3, H=4, I=3, k=2, shared=True)
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: moe(x).y, (x,), eps=1e-3, atol=1e-3, rtol=1e-2)
    x = torch.randn(3, 6, dtype=F64)
    assert torch.equal(layer(seed=7)(x).y, layer(seed=7)(x).y)
    assert not torch.equal(layer(seed=7)(x).y, layer(seed=8)(x).y)


def slow_capacity(ids, mask, E, cf):
    T, K = ids.shape
    cap = math.ceil(cf * T * K / E)
    used = [0] * E
    keep = torch.zeros(T, K, dtype=torch.bool)
    for k in range(K):
        for t in range(T):
            if mask[t, k]:
                e = int(ids[t, k])
                if used[e] < cap:
                    used[e] += 1
                    keep[t, k] = True
    return keep, int(mask.sum() - keep.sum())


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 12),
    K=st.integers(1, 3),
    E=st.integers(1, 5),
    cf=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    seed=st.integers(0, 999),
)
def test_capacity_matches_slow_reference(T, K, E, cf, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=g)
    mask = torch.rand(T, K, generator=g) > 0.2
    r = Routing(torch.zeros(T, E), ids, torch.rand(T, K, generator=g), mask)
    new, dropped = apply_capacity(r, E, cf)
    keep, n = slow_capacity(ids, mask, E, cf)
    assert torch.equal(new.mask_TK, keep) and int(dropped) == n
    assert torch.all(new.weights_TK[~keep] == 0)


def test_capacity_layer_drops_and_reports():
    moe = layer(E=4, k=2, cf=0.5)
    x = torch.randn(16, 6, dtype=F64)
    out = moe(x)
    assert int(out.num_dropped) > 0
    r = out.routing
    ref = moe.experts.reference(x, r.ids_TK, r.weights_TK.double(), r.mask_TK)
    torch.testing.assert_close(out.y, ref, rtol=1e-10, atol=1e-10)


def test_losses_against_formulas_and_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    moe = layer(E=4, k=2)
    x = torch.randn(3, 8, 6, dtype=F64)
    r = moe(x).routing
    T, E, K = 24, 4, 2
    p = torch.softmax(r.logits_TE.double(), -1)
    f = torch.tensor([float((r.ids_TK == e).sum()) / (T * K) for e in range(E)], dtype=F64)
    expect = E * float((f * p.mean(0)).sum())
    assert load_balancing_loss(r).item() == pytest.approx(expect, rel=1e-5)
    hf = load_balancing_loss_func((r.logits_TE,), num_experts=E, top_k=K)
    assert float(hf) == pytest.approx(
        K * expect, rel=1e-5
    )  # transformers reports K times Switch's value
    lse = torch.logsumexp(r.logits_TE.double(), -1)
    assert z_loss(r).item() == pytest.approx(float((lse**2).mean()), rel=1e-5)
    # sequence-wise: per sequence f = E/(K S) counts, P = mean normalised scores
    vals = []
    for b in range(3):
        sl = slice(8 * b, 8 * b + 8)
        fb = torch.tensor(
            [float((r.ids_TK[sl] == e).sum()) * E / (K * 8) for e in range(E)], dtype=F64
        )
        vals.append(float((fb * p[sl].mean(0)).sum()))
    assert sequence_balance_loss(r, 3).item() == pytest.approx(sum(vals) / 3, rel=1e-5)
    with pytest.raises(RoutingError, match="num_sequences"):
        sequence_balance_loss(r, 5)
    # token mask: masking tokens equals dropping them
    m = torch.ones(T, dtype=torch.bool)
    m[:8] = False
    sub = Routing(
        r.logits_TE[8:], r.ids_TK[8:], r.weights_TK[8:], None, {"probs_TE": r.aux["probs_TE"][8:]}
    )
    assert load_balancing_loss(r, m).item() == pytest.approx(
        load_balancing_loss(sub).item(), rel=1e-6
    )
    assert z_loss(r, m).item() == pytest.approx(z_loss(sub).item(), rel=1e-6)


def test_balanced_routing_gives_loss_one():
    T, E, K = 8, 4, 2
    ids = torch.arange(T * K).view(T, K) % E
    r = Routing(torch.zeros(T, E), ids, torch.full((T, K), 0.5))
    assert load_balancing_loss(r).item() == pytest.approx(1.0)


def test_input_side_combine_equals_loop():
    """``combine="input"`` (Llama 4): y_t = sum_k E_k(w_tk x_t), with masked slots contributing 0."""
    moe = layer(E=4, k=2)
    moe.combine = "input"
    x = torch.randn(9, 6, dtype=F64)
    out = moe(x)
    r = out.routing
    ref = torch.stack([
        sum(moe.experts.expert(int(r.ids_TK[t, k]), (r.weights_TK[t, k].double() * x[t])[None])[0]
            for k in range(2))
        for t in range(9)
    ])
    torch.testing.assert_close(out.y, ref, rtol=1e-10, atol=1e-10)
    mask = torch.rand(9, 2, generator=torch.Generator().manual_seed(0)) > 0.5
    masked = Routing(r.logits_TE, r.ids_TK, r.weights_TK, mask)
    y = moe._input_combine(x, masked)
    ref = torch.stack([
        sum((moe.experts.expert(int(r.ids_TK[t, k]), (r.weights_TK[t, k].double() * x[t])[None])[0]
             for k in range(2) if mask[t, k]), torch.zeros(6, dtype=F64))
        for t in range(9)
    ])
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_bad_input():
    with pytest.raises(RoutingError, match="top_k=5 > number of experts"):
        TopKConfig(num_experts=4, hidden_size=6, top_k=5)
    router = TopKRouter(TopKConfig(num_experts=4, hidden_size=6, top_k=2))
    with pytest.raises(RoutingError, match="E=4 experts but experts has E=3"):
        MoELayer(router, Experts(ExpertsConfig(num_experts=3, hidden_size=6, inner_size=2)))
    with pytest.raises(RoutingError, match="capacity_factor"):
        MoELayer(
            router,
            Experts(ExpertsConfig(num_experts=4, hidden_size=6, inner_size=2)),
            capacity_factor=0,
        )
    with pytest.raises(RoutingError, match="combine must be"):
        MoELayer(router, Experts(ExpertsConfig(num_experts=4, hidden_size=6, inner_size=2)),
                 combine="sideways")
    x = torch.randn(3, 6)
    x[1, 2] = float("nan")
    with pytest.raises(RoutingError, match="non-finite"):
        router(x)
    with pytest.raises(RoutingError, match="hidden size"):
        router(torch.randn(3, 5))
