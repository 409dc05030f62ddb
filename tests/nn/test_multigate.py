"""MultiGateMoE (MMoE / HoME level) and HoME against per-sample float64 reference loops.

Tolerances: vectorised vs reference 1e-10 (float64, same maths in a different order).
"""

import numpy as np
import pytest
import torch

from moelab.analysis import multitask
from moelab.nn import (
    HoME,
    HoMEConfig,
    MultiGateConfig,
    MultiGateMoE,
    RoutingError,
    multigate_reference,
)

F64 = torch.float64
D, FH, H = 5, 4, 3


def build(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MultiGateConfig(input_size=D, hidden_size=FH, output_size=H, **kw)
    moe = MultiGateMoE(cfg, dtype=F64)
    with torch.no_grad():  # non-trivial gates, self-gates, feature gates and norm affines
        for p in (moe.gate_w, moe.gate_b, moe.fg_b, moe.self_w, moe.global_w):
            if p is not None:
                p.normal_()
        for n in moe.norms:
            n.weight.uniform_(0.5, 1.5), n.bias.normal_()
    return moe


HOME_LEVEL = dict(num_tasks=3, num_shared=2, task_category=(0, 0, 1), num_category_experts=2,
                  num_task_experts=1, activation="swish", feature_gate_rank=2, self_gate=True)


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", ["mmoe", "home"])
def test_vectorised_equals_reference(norm, training, kind):
    kw = dict(num_tasks=2, num_shared=3) if kind == "mmoe" else dict(HOME_LEVEL)
    moe = build(norm=norm, **kw)
    if norm == "batch":  # running statistics that are not the identity, for eval mode
        moe.train()(torch.randn(8, D, dtype=F64))
    moe.train(training)
    x = torch.randn(6, D, dtype=F64)
    out = moe(x)
    y_ref, g_ref = multigate_reference(moe, x)
    torch.testing.assert_close(out.y_TNH, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.gates_TNE, g_ref, rtol=1e-10, atol=1e-10)
    T, E = moe.config.num_tasks, moe.num_experts
    assert out.y_TNH.shape == (T, 6, H) and out.gates_TNE.shape == (T, 6, E)
    assert out.hidden_NEF.shape == (6, E, FH) and out.outputs_NEH.shape == (6, E, H)
    torch.testing.assert_close(out.gates_TNE.sum(-1), torch.ones(T, 6, dtype=F64))


def test_per_task_and_per_category_inputs():
    moe = build(**HOME_LEVEL)
    x, xc, xt = (torch.randn(*s, 4, D, dtype=F64) for s in ((), (2,), (3,)))
    for args in ((x, xc, None), (x, xc, xt), (x, None, xt)):
        torch.testing.assert_close(moe(*args).y_TNH, multigate_reference(moe, *args)[0],
                                   rtol=1e-10, atol=1e-10)
    # default task input is the category's input
    torch.testing.assert_close(moe(x, xc).y_TNH, moe(x, xc, xc[[0, 0, 1]]).y_TNH)


def test_hierarchy_mask_hides_other_tasks_experts():
    moe = build(**HOME_LEVEL)
    owner, cat = moe.owner_E, moe.category_E
    assert list(owner) == [-1, -1, -1, -1, -1, -1, 0, 1, 2]
    assert list(cat) == [-1, -1, 0, 0, 1, 1, -1, -1, -1]
    x = torch.randn(5, D, dtype=F64)
    out = moe(x)
    hidden = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 1, 1, 1, 0, 1],
                           [0, 0, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    assert torch.all(out.gates_TNE[hidden.unsqueeze(1).expand_as(out.gates_TNE)] == 0)
    with torch.no_grad():  # task 2's own expert (8) changes; tasks 0 and 1 must not
        moe.w2[8].mul_(3.0)
    after = moe(x)
    torch.testing.assert_close(after.y_TNH[:2], out.y_TNH[:2], rtol=0, atol=0)
    assert not torch.allclose(after.y_TNH[2], out.y_TNH[2])


def test_swish_and_norm_remove_dead_relu_units():
    x = torch.randn(256, D, dtype=F64)
    relu = multitask.expert_collapse(**_collapse_inputs(build(num_tasks=2)(x)))
    home = multitask.expert_collapse(
        **_collapse_inputs(build(num_tasks=2, norm="batch", activation="swish")(x)))
    assert relu.zero_share_E.min() > 0.2 and home.zero_share_E.max() == 0.0


def _collapse_inputs(out):
    a = out.analysis_inputs()
    return {"hidden_NEF": a["hidden_NEF"], "outputs_NEH": a["outputs_NEH"]}


def test_home_two_levels_and_analysis_record():
    torch.manual_seed(0)
    home = HoME(HoMEConfig(input_size=D, hidden_size=FH, output_size=H,
                           task_category=(0, 1, 1), feature_gate_rank=2), dtype=F64)
    x = torch.randn(7, D, dtype=F64)
    out = home(x)
    assert out.y_TNH.shape == (3, 7, H) and out.meta.y_TNH.shape == (2, 7, H)
    # composition: the task level reads the meta level's global and category outputs
    m_y, _ = multigate_reference(home.meta, x)
    torch.testing.assert_close(out.meta.y_TNH, m_y, rtol=1e-10, atol=1e-10)
    t_y, _ = multigate_reference(home.task, out.meta.y_global_NH, out.meta.y_TNH)
    torch.testing.assert_close(out.y_TNH, t_y, rtol=1e-10, atol=1e-10)
    # the record is what moelab.analysis.multitask takes
    a = out.task.analysis_inputs()
    deg = multitask.shared_expert_degradation(a["gates_TNE"], a["shared_E"])
    under = multitask.task_underfitting(a["gates_TNE"], a["owner_E"])
    ref_deg, ref_lean = multitask.multitask_reference(a["gates_TNE"], a["owner_E"])
    np.testing.assert_allclose(deg.degradation_S, ref_deg, rtol=1e-12)
    np.testing.assert_allclose(under.lean_T, ref_lean, rtol=1e-12)
    assert a["gates_TNE"].shape == (3, 7, home.task.num_experts)
    out.y_TNH.sum().backward()  # gradients reach both levels
    assert home.meta.w1.grad.abs().sum() > 0 and home.task.w1.grad.abs().sum() > 0


def test_gradcheck_tiny():
    moe = build(norm="batch", **HOME_LEVEL)
    x = torch.randn(4, D, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: moe(x).y_TNH, (x,))
    moe = build(norm="layer", **HOME_LEVEL).eval()
    assert torch.autograd.gradcheck(lambda x: moe(x).y_TNH, (x,))


def test_determinism_under_seed():
    x = torch.randn(4, D, dtype=F64)
    assert torch.equal(build(seed=1, **HOME_LEVEL)(x).y_TNH, build(seed=1, **HOME_LEVEL)(x).y_TNH)
    assert not torch.equal(build(seed=1, **HOME_LEVEL)(x).y_TNH, build(seed=2, **HOME_LEVEL)(x).y_TNH)


def test_bad_input():
    base = dict(input_size=D, hidden_size=FH, output_size=H)
    with pytest.raises(RoutingError, match="task_category must give a category id"):
        MultiGateConfig(**base, num_tasks=3, task_category=(0, 1))
    with pytest.raises(RoutingError, match="without gaps"):
        MultiGateConfig(**base, num_tasks=2, task_category=(0, 2))
    with pytest.raises(RoutingError, match="num_tasks must be a positive int"):
        MultiGateConfig(**base, num_tasks=0)
    with pytest.raises(RoutingError, match="norm must be one of"):
        MultiGateConfig(**base, num_tasks=1, norm="group")
    with pytest.raises(RoutingError, match="self_gate needs num_task_experts"):
        MultiGateConfig(**base, num_tasks=1, self_gate=True)
    with pytest.raises(RoutingError, match="at least one expert"):
        MultiGateConfig(**base, num_tasks=1, num_shared=0)
    with pytest.raises(RoutingError, match="needs task_category"):
        MultiGateConfig(**base, num_tasks=1, num_category_experts=1)
    moe = build(**HOME_LEVEL)
    with pytest.raises(RoutingError, match=r"x must be \[N, D=5\]"):
        moe(torch.randn(4, D + 1, dtype=F64))
    with pytest.raises(RoutingError, match=r"x_task must be \[3, N=4"):
        moe(torch.randn(4, D, dtype=F64), None, torch.randn(2, 4, D, dtype=F64))
    with pytest.raises(RoutingError, match=r"x_category must be \[2, N=4"):
        moe(torch.randn(4, D, dtype=F64), torch.randn(3, 4, D, dtype=F64))
    with pytest.raises(RoutingError, match="at least 2 samples"):
        build(norm="batch", num_tasks=1).train()(torch.randn(1, D, dtype=F64))


def test_each_expert_reads_its_own_input():
    """Shared experts read x; category c's experts read x_category[c]; task t's experts read its
    category's input (default) — checked by perturbing one input at a time."""
    moe = build(**HOME_LEVEL)  # categories: tasks 0, 1 -> 0; task 2 -> 1
    x, xc = torch.randn(4, D, dtype=F64), torch.randn(2, 4, D, dtype=F64)
    base = moe(x, xc).outputs_NEH
    changed = {}
    for name, args in (("x", (x + 1, xc)), ("c0", (x, xc + torch.tensor([1.0, 0])[:, None, None])),
                       ("c1", (x, xc + torch.tensor([0, 1.0])[:, None, None]))):
        out = moe(*args).outputs_NEH
        changed[name] = [e for e in range(moe.num_experts) if not torch.equal(out[:, e], base[:, e])]
    assert changed == {"x": [0, 1], "c0": [2, 3, 6, 7], "c1": [4, 5, 8]}
