"""The dispatcher seam of MoELayer and the per-slot statistics of the grouped experts (float64).

A recording dispatcher and a physically permuting one (the shape an expert-parallel dispatcher
has: the experts see only the permuted rows, one slot per row) must give the layer's output and
gradients exactly as the default LocalDispatcher does (1e-12; only summation order differs).
"""

import pytest
import torch

from moelab.nn import Experts, ExpertsConfig, MoELayer, TopKConfig, TopKRouter
from moelab.nn._dispatch import SlotStats, make_plan
from moelab.nn.dispatcher import LocalDispatcher, PermutingDispatcher
from moelab.nn.experts import run_experts

F64 = torch.float64


class Recording(LocalDispatcher):
    def __init__(self):
        self.calls = []

    def dispatch(self, x_TH, ids_TK, weights_TK, mask_TK, num_experts):
        self.calls.append(("dispatch", tuple(x_TH.shape), num_experts))
        return super().dispatch(x_TH, ids_TK, weights_TK, mask_TK, num_experts)

    def combine(self, y_MH, dispatch):
        self.calls.append(("combine", tuple(y_MH.shape)))
        return super().combine(y_MH, dispatch)


def layer(dispatcher=None, combine="output", bias=False, seed=0):
    torch.manual_seed(seed)
    router = TopKRouter(TopKConfig(num_experts=5, hidden_size=6, top_k=2), dtype=F64)
    cfg = ExpertsConfig(num_experts=5, hidden_size=6, inner_size=4, bias=bias)
    experts = Experts(cfg, dtype=F64)
    if bias:
        with torch.no_grad():
            for b in (experts.gate_bias, experts.up_bias, experts.down_bias):
                b.normal_()
    return MoELayer(router, experts, combine=combine, dispatcher=dispatcher)


def grads(moe, x):
    x = x.clone().requires_grad_()
    y = moe(x).y
    y.backward(torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(1)))
    return y.detach(), [x.grad] + [p.grad for p in moe.experts.parameters()]


def test_default_dispatcher_is_local():
    assert isinstance(layer().dispatcher, LocalDispatcher)


def test_recording_dispatcher_is_called_and_changes_nothing():
    rec = Recording()
    x = torch.randn(3, 7, 6, dtype=F64)
    ref = layer()(x).y
    y = layer(rec)(x).y
    assert torch.equal(y, ref)
    assert rec.calls == [("dispatch", (21, 6), 5), ("combine", (21, 6))]


@pytest.mark.parametrize("combine", ["output", "input"])
@pytest.mark.parametrize("bias", [False, True])
def test_permuting_dispatcher_equals_local_forward_and_backward(combine, bias):
    x = torch.randn(11, 6, dtype=F64)
    y0, g0 = grads(layer(combine=combine, bias=bias), x)
    y1, g1 = grads(layer(PermutingDispatcher(), combine=combine, bias=bias), x)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("activation", ["swiglu", "gpt_oss_swiglu", "gelu"])
def test_slot_stats_equal_per_slot_reference(grad, activation):
    torch.manual_seed(0)
    cfg = ExpertsConfig(
        num_experts=4,
        hidden_size=6,
        inner_size=5,
        activation=activation,
        bias=activation == "gpt_oss_swiglu",
    )
    ex = Experts(cfg, dtype=F64)
    T, K = 9, 2
    x = torch.randn(T, 6, dtype=F64, requires_grad=grad)
    ids = torch.randint(0, 4, (T, K))
    w = torch.rand(T, K, dtype=F64)
    mask = torch.rand(T, K) > 0.3
    plan = make_plan(ids, mask, 4)
    stats = SlotStats.empty(plan, x)
    with torch.set_grad_enabled(grad):
        y = run_experts(x, w, plan, ex._weights(), ex.act, stats=stats)
    torch.testing.assert_close(y, ex.reference(x, ids, w, mask), rtol=1e-12, atol=1e-12)
    for r in range(plan.num_real):
        t, k = divmod(int(plan.slot_R[r]), K)
        e = int(ids[t, k])
        xe = x[t : t + 1].detach()
        h_up = xe @ ex.up[e].T + (0 if ex.up_bias is None else ex.up_bias[e])
        if ex.gate is None:
            a = ex.act(h_up)
        else:
            a = ex.act(xe @ ex.gate[e].T + (0 if ex.gate_bias is None else ex.gate_bias[e]), h_up)
        o = ex.expert(e, xe)
        torch.testing.assert_close(stats.act_max_R[r], a.abs().max().detach())
        torch.testing.assert_close(stats.out_norm_R[r], o.norm().detach())
