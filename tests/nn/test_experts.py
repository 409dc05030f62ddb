"""Experts: the fast grouped dispatch equals the slow per-token reference.

Tolerances: float64 fast vs reference 1e-10 (same maths, different summation order);
float32 vs float64 reference 1e-4 relative.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.nn import ExpertsConfig, RoutingError, split_experts

from .conftest import F64, make


def inputs(T, K, E, H, dtype=F64, p_mask=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, dtype=dtype, generator=g)
    ids = torch.randint(0, E, (T, K), generator=g)
    w = torch.rand(T, K, dtype=dtype, generator=g)
    mask = torch.rand(T, K, generator=g) > p_mask
    return x, ids, w, mask


@pytest.mark.parametrize("act", ["swiglu", "geglu", "gelu", "relu", "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_equals_reference_and_gradients(act, bias):
    ex = make(act=act, bias=bias)
    x, ids, w, mask = inputs(7, 3, 5, 6)
    x.requires_grad_(), w.requires_grad_()
    y, r = ex(x, ids, w, mask), ex.reference(x, ids, w, mask)
    torch.testing.assert_close(y, r, rtol=1e-10, atol=1e-10)
    params = [p for p in ex.parameters()]
    g1 = torch.autograd.grad((y * y).sum(), [x, w, *params])
    g2 = torch.autograd.grad((r * r).sum(), [x, w, *params])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck(bias):
    ex = make(E=3, H=4, I=3, bias=bias)
    x, ids, w, mask = inputs(4, 2, 3, 4)
    x.requires_grad_(), w.requires_grad_()
    names = [n for n, _ in ex.named_parameters()]

    def f(x, w, *ps):
        return torch.func.functional_call(ex, dict(zip(names, ps, strict=True)), (x, ids, w, mask))

    assert torch.autograd.gradcheck(
        f, (x, w, *[p.detach().clone().requires_grad_() for p in ex.parameters()])
    )


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(0, 9),
    K=st.integers(1, 4),
    E=st.integers(1, 6),
    p_mask=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_incl_empty_experts_and_unrouted_tokens(T, K, E, p_mask, seed):
    ex = make(E=E, H=4, I=3, seed=seed)
    x, ids, w, mask = inputs(T, K, E, 4, p_mask=p_mask, seed=seed)
    x.requires_grad_()
    y, r = ex(x, ids, w, mask), ex.reference(x, ids, w, mask)
    torch.testing.assert_close(y, r, rtol=1e-10, atol=1e-10)
    if p_mask == 1.0:
        assert torch.count_nonzero(y) == 0
    if T:
        (g1,) = torch.autograd.grad(y.sum() + 0 * x.sum(), x)
        (g2,) = torch.autograd.grad(r.sum() + 0 * x.sum(), x)
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


def test_float32_close_to_float64_reference_and_grouped_mm():
    ex = make(E=4, H=8, I=8, dtype=torch.float32)
    x, ids, w, mask = inputs(16, 2, 4, 8, dtype=torch.float32)
    ref = ex.double().reference(x.double(), ids, w.double(), mask)
    ex = ex.float()
    torch.testing.assert_close(ex(x, ids, w, mask).double(), ref, rtol=1e-4, atol=1e-5)
    ex.config.impl = "grouped_mm"
    torch.testing.assert_close(ex(x, ids, w, mask).double(), ref, rtol=1e-4, atol=1e-5)


def test_permuting_expert_order_changes_nothing():
    ex = make()
    x, ids, w, mask = inputs(9, 2, 5, 6)
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3))
    ex2 = make()
    with torch.no_grad():
        for a, b in zip(ex2.parameters(), ex.parameters(), strict=True):
            a.copy_(b[perm])
    inv = torch.argsort(perm)  # expert e of ex is expert inv[e] of ex2
    torch.testing.assert_close(
        ex(x, ids, w, mask), ex2(x, inv[ids], w, mask), rtol=1e-12, atol=1e-12
    )


def test_split_experts_is_exact():
    ex = make(E=3, H=6, I=4)
    x, ids, w, _ = inputs(5, 2, 3, 6)
    fine = split_experts(ex, 2)
    assert fine.up.shape == (6, 2, 6) and fine.down.shape == (6, 6, 2)
    fids = torch.stack([ids * 2, ids * 2 + 1], -1).flatten(1)
    fw = w.repeat_interleave(2, dim=1)
    torch.testing.assert_close(fine(x, fids, fw), ex(x, ids, w), rtol=1e-12, atol=1e-12)


def test_bad_input():
    ex = make()
    x, ids, w, mask = inputs(3, 2, 5, 6)
    with pytest.raises(RoutingError, match="ids must lie in"):
        ex(x, ids + 5, w)
    ex(x, torch.where(mask, ids, 99), w, mask)  # ids under a False mask are ignored
    with pytest.raises(RoutingError, match="x must be"):
        ex(x[:, :4], ids, w)
    with pytest.raises(RoutingError, match="must both be"):
        ex(x, ids, w[:, :1])
    with pytest.raises(RoutingError, match="dtype"):
        ex(x.float(), ids, w)
    with pytest.raises(RoutingError, match="activation"):
        ExpertsConfig(num_experts=2, hidden_size=2, inner_size=2, activation="tanh")
    with pytest.raises(RoutingError, match="num_experts"):
        ExpertsConfig(num_experts=0, hidden_size=2, inner_size=2)
    with pytest.raises(RoutingError, match="fine_grained"):
        ExpertsConfig(num_experts=2, hidden_size=2, inner_size=3).fine_grained(2)


def test_non_contiguous_weights_forward_and_backward():
    """Weights stored transposed (Llama4's ``[E, H, 2I]`` layout) give the same values and grads."""
    ex = make(E=3, H=6, I=4)
    x, ids, w, mask = inputs(8, 2, 3, 6)
    ref = make(E=3, H=6, I=4)
    with torch.no_grad():
        for name in ("gate", "up", "down"):
            t = getattr(ex, name).detach()
            setattr(ex, name, torch.nn.Parameter(t.transpose(1, 2).contiguous().transpose(1, 2)))
            getattr(ref, name).copy_(t)
    assert not ex.up.is_contiguous()
    x.requires_grad_()
    y, r = ex(x, ids, w, mask), ref.reference(x, ids, w, mask)
    torch.testing.assert_close(y, r, rtol=1e-10, atol=1e-10)
    g1 = torch.autograd.grad((y * y).sum(), [x, ex.gate, ex.up, ex.down])
    g2 = torch.autograd.grad((r * r).sum(), [x, ref.gate, ref.up, ref.down])
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_decoding_path_uses_grouped_mm_and_equals_reference(monkeypatch):
    """Few rows per expert, no grad, float32, more than one token: one grouped_mm per
    projection (tolerance 1e-4 rel against the float64 reference; one token takes the decode
    path); with grad or many rows the loop runs."""
    import moelab.nn.experts as mod

    calls = []
    real = mod._grouped_mm_forward
    monkeypatch.setattr(mod, "_grouped_mm_forward", lambda *a: calls.append(1) or real(*a))
    ex = make(E=16, H=8, I=8, dtype=torch.float32)
    for T in (1, 3):
        x, ids, w, mask = inputs(T, 2, 16, 8, dtype=torch.float32)
        with torch.no_grad():
            y = ex(x, ids, w, mask if T > 1 else None)
        ref = ex.double().reference(x.double(), ids, w.double(), mask if T > 1 else None)
        ex.float()
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    assert len(calls) == 1
    x, ids, w, _ = inputs(64, 2, 16, 8, dtype=torch.float32)
    with torch.no_grad():
        ex(x, ids, w)  # 128 rows >= 4 * E: the loop
    ex(x[:3], ids[:3], w[:3])  # parameters need grad: the loop with its backward
    assert len(calls) == 1


def test_few_rows_grouped_mm_on_fused_gate_up_equals_the_reference():
    """Inference on the halves of one [E, 2I, H] tensor (transformers' fused storage) takes one
    grouped_mm for gate and up; it equals the per-slot reference (float32, rtol 1e-5)."""
    import torch.nn.functional as F

    from moelab.nn._dispatch import make_plan
    from moelab.nn.experts import make_activation, run_experts

    if not hasattr(F, "grouped_mm"):
        pytest.skip("torch without grouped_mm")
    g = torch.Generator().manual_seed(0)
    E, I, H, T, K = 8, 16, 32, 5, 2
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    gate, up = gate_up[:, :I], gate_up[:, I:]
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    with torch.no_grad():
        got = run_experts(x, w, make_plan(ids, None, E), (gate, up, down, None, None, None),
                          make_activation("swiglu"))
    want = torch.zeros(T, H)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            want[t] += w[t, k] * (F.silu(x[t] @ gate[e].T) * (x[t] @ up[e].T)) @ down[e].T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("dtype", "T", "fused"), [
    (torch.float32, 2, False),  # few rows: grouped_mm over the slot buffer, regrouped by row
    (torch.float32, 2, True),  # the same on the halves of one [S, 2I, H] buffer
    (torch.float32, 40, False),  # many rows: the per-expert loop, indexing rows
    (F64, 5, False),  # float64: the loop
])
def test_weights_at_slot_rows_equal_weights_in_expert_order(dtype, T, fused):
    """``Plan.rows`` (an offloading cache's slot buffer: expert e at row slot[e] of S > E rows)
    gives the same output bit for bit as the experts stacked in order, and the same slot
    statistics: each token's outputs are summed in expert order either way."""
    from moelab.nn._dispatch import Plan, SlotStats, make_plan
    from moelab.nn.experts import make_activation, run_experts

    g = torch.Generator().manual_seed(3)
    E, S, I, H, K = 6, 9, 16, 32, 3
    gate_up = torch.randn(E, 2 * I, H, generator=g, dtype=dtype)
    down = torch.randn(E, H, I, generator=g, dtype=dtype)
    slot = torch.randperm(S, generator=g)[:E]
    buf_gu = torch.randn(S, 2 * I, H, generator=g, dtype=dtype)  # other slots: other data
    buf_down = torch.randn(S, H, I, generator=g, dtype=dtype)
    buf_gu[slot], buf_down[slot] = gate_up, down
    x = torch.randn(T, H, generator=g, dtype=dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g, dtype=dtype)
    mask = torch.rand(T, K, generator=g) > 0.2

    def halves(gu):
        return (gu[:, :I], gu[:, I:]) if fused else (gu[:, :I].contiguous(), gu[:, I:].contiguous())

    act = make_activation("swiglu")
    plan = make_plan(ids, mask, E)
    needed = [e for e, n in enumerate(plan.counts) if n]
    at_rows = Plan(plan.slot_R, plan.tok_R, [plan.counts[e] for e in needed], plan.num_real,
                   plan.T, plan.K, rows=[int(slot[e]) for e in needed])
    with torch.no_grad():
        s_want, s_got = SlotStats.empty(plan, x), SlotStats.empty(plan, x)
        want = run_experts(x, w, plan, (*halves(gate_up), down, None, None, None), act, stats=s_want)
        got = run_experts(x, w, at_rows, (*halves(buf_gu), buf_down, None, None, None), act,
                          stats=s_got)
    assert torch.equal(got, want)
    assert all(torch.equal(getattr(s_got, f), getattr(s_want, f)) for f in s_want.__dict__)
    with pytest.raises(RoutingError, match="no gradients"):
        run_experts(x, w, at_rows, (*halves(buf_gu.requires_grad_()), buf_down, None, None, None), act)


@pytest.mark.parametrize(("dtype", "tol"), [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("T", [1, 2])
def test_decode_mv_path_equals_reference(dtype, tol, bias, act, T):
    """``decode_forward`` (``torch.mv`` per single-row expert, ``mm`` for the rest) equals the
    per-slot reference in the same dtype (rtol = atol = ``tol``: float64 1e-10, float32 1e-5),
    in expert order and on a slot buffer (``Plan.rows``: expert e at row slot[e]), bit for bit
    between the two. T=2 routes expert 1 twice, so one group has two rows."""
    from moelab.nn._dispatch import Plan, decode_forward, make_plan

    E, H, I = 6, 32, 16
    ex = make(E=E, H=H, I=I, act=act, bias=bias, dtype=dtype, seed=4)
    x, _, w, _ = inputs(T, 3, E, H, dtype=dtype, seed=5)
    ids = torch.tensor([[0, 1, 2], [1, 3, 5]][:T])
    weights = ex._weights()
    with torch.no_grad():
        got = decode_forward(x, w, make_plan(ids, None, E), *weights, ex.act)
        want = ex.reference(x, ids, w)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        plan = make_plan(ids, None, E)
        needed = [e for e, n in enumerate(plan.counts) if n]
        slot = torch.randperm(E + 3, generator=torch.Generator().manual_seed(6))[:E]
        bufs = []
        for p in weights:  # other rows of the buffer: other data
            buf = None if p is None else torch.randn(E + 3, *p.shape[1:], dtype=dtype)
            if buf is not None:
                buf[slot] = p
            bufs.append(buf)
        at_rows = Plan(plan.slot_R, plan.tok_R, [plan.counts[e] for e in needed], plan.num_real,
                       plan.T, plan.K, rows=[int(slot[e]) for e in needed])
        assert torch.equal(decode_forward(x, w, at_rows, *bufs, ex.act), got)


def test_one_token_inference_takes_the_decode_path(monkeypatch):
    """One token without grad runs ``one_token_forward`` from ``Experts``' own call and
    ``decode_forward`` from ``run`` on a plan (float32 and float64, with or without biases); two
    tokens, repeated ids or a forward that needs gradients do not."""
    import moelab.nn._dispatch as disp

    calls = []
    for name in ("decode_forward", "one_token_forward"):
        real = getattr(disp, name)
        monkeypatch.setattr(disp, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    for dtype, bias in ((torch.float32, False), (F64, True)):
        ex = make(E=8, H=16, I=8, bias=bias, dtype=dtype)
        x, _, w, _ = inputs(2, 2, 8, 16, dtype=dtype)
        ids = torch.tensor([[3, 1], [0, 5]])
        with torch.no_grad():
            ex(x[:1], ids[:1], w[:1])
            ex.run(x[:1], w[:1], disp.make_plan(ids[:1], None, 8))
            ex(x, ids, w)
            ex(x[:1], torch.tensor([[2, 2]]), w[:1])  # repeated: a group of two rows, the plan's path
        ex(x[:1], ids[:1], w[:1])  # parameters need grad: the loop with its backward
    assert calls == ["one_token_forward", "decode_forward", "decode_forward"] * 2


@pytest.mark.parametrize(("dtype", "tol"), [(F64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_one_token_call_equals_the_plan_path_and_reference(dtype, tol, bias, act):
    """``Experts``' one-token call (no plan) gives ``run`` on a plan's output bit for bit (the same
    ``torch.mv`` per expert in expert order) and the per-slot reference (``tol``); an id out of
    range is the same error as on the general path."""
    from moelab.nn._dispatch import make_plan

    ex = make(E=7, H=24, I=12, act=act, bias=bias, dtype=dtype, seed=8)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _ in range(5):
            x = torch.randn(1, 24, dtype=dtype, generator=g)
            ids = torch.randperm(7, generator=g)[:3][None]
            w = torch.rand(1, 3, dtype=dtype, generator=g)
            got = ex(x, ids, w)
            assert torch.equal(got, ex.run(x, w, make_plan(ids, None, 7)))
            torch.testing.assert_close(got, ex.reference(x, ids, w), rtol=tol, atol=tol)
        for bad in (torch.tensor([[0, 7, 1]]), torch.tensor([[-1, 2, 3]])):
            with pytest.raises(RoutingError, match=r"ids must lie in \[0, E=7\)"):
                ex(x, bad, w)


def test_one_token_plan_equals_the_general_plan(monkeypatch):
    """make_plan of one token (a decode step) is built in Python: the same slots, tokens and counts
    as the sorted plan, also with repeated ids; an out-of-range id takes the general path."""
    from moelab.nn import _dispatch

    g = torch.Generator().manual_seed(4)
    cases = [torch.randperm(16, generator=g)[:4][None] for _ in range(20)]
    cases += [torch.randint(0, 5, (1, 6), generator=g) for _ in range(20)]  # repeats
    for ids in cases:
        fast = _dispatch.make_plan(ids, None, 16)
        monkeypatch.setattr(_dispatch, "_one_token_plan", lambda *a: None)
        slow = _dispatch.make_plan(ids, None, 16)
        monkeypatch.undo()
        assert torch.equal(fast.slot_R, slow.slot_R) and torch.equal(fast.tok_R, slow.tok_R), ids
        assert fast.slot_R.dtype == slow.slot_R.dtype == torch.int64
        assert (fast.counts, fast.num_real, fast.T, fast.K) == (slow.counts, slow.num_real, slow.T, slow.K)
    assert _dispatch._one_token_plan([3, 16], 16, torch.device("cpu")) is None
    assert _dispatch._one_token_plan([-1, 2], 16, torch.device("cpu")) is None
