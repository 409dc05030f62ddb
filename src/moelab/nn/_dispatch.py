"""Fast dropless dispatch: sort token-slots by expert, run each expert's FFN on its contiguous rows,
un-sort and combine — with a hand-written backward.

Shape legend: T tokens, H hidden, E experts, K slots per token, I expert inner dim,
N = T*K slots, R = real (routed) slots, sorted by expert.

Why a custom autograd.Function: with plain autograd every per-expert row slice's backward
materialises a full [R, H] zero tensor and every gather's backward is a serial scatter-add, which
is what makes the transformers eager loop ~4x slower in training than in inference on CPU. Here the
backward is the same nine GEMMs as a dense SwiGLU MLP over R rows plus gathers, nothing else.

Matmuls run per expert with ``torch.mm`` on contiguous row blocks. ``torch.nn.functional.grouped_mm``
exists on CPU in torch 2.13 (``impl="grouped_mm"``) but needs 16-byte aligned strides, refuses
float64 and, with separate gate/up weights, measured 3-4x slower than the loop here
(see bench/moe_layer.py), so the loop is the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Act = Callable[[Tensor], Tensor]


@dataclass
class Plan:
    """Where each slot goes: built once per forward from the routing, no gradients."""

    order_N: Tensor  # slot indices (t*K + k) sorted by expert; real slots first
    inv_N: Tensor  # inverse permutation of order_N
    counts: list[int]  # real slots per expert, length E
    num_real: int
    T: int
    K: int


def make_plan(ids_TK: Tensor, mask_TK: Tensor | None, num_experts: int) -> Plan:
    T, K = ids_TK.shape
    key_N = ids_TK.reshape(-1)
    if mask_TK is not None:
        key_N = torch.where(mask_TK.reshape(-1), key_N, num_experts)
    order_N = torch.argsort(key_N, stable=True)
    counts_E = torch.bincount(key_N, minlength=num_experts + 1)[:num_experts]
    counts = counts_E.tolist()
    inv_N = torch.empty_like(order_N)
    inv_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    return Plan(order_N, inv_N, counts, int(sum(counts)), T, K)


def _gated(act: Act, h_gate: Tensor | None, h_up: Tensor) -> Tensor:
    return act(h_gate, h_up) if h_gate is not None else act(h_up)


def _linear_mm(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x, w, b)


def _ffn_sorted(xs_RH, plan, gate, up, down, b_gate, b_up, b_down, act, keep: bool):
    """Run expert e on rows [offset_e, offset_e + count_e). Returns o_RH and saved pre-activations."""
    outs, gs, us = [], [], []
    start = 0
    for e, n in enumerate(plan.counts):
        if n == 0:
            continue
        x_e = xs_RH[start : start + n]
        start += n
        h_up = _linear_mm(x_e, up[e], None if b_up is None else b_up[e])
        h_gate = (
            None
            if gate is None
            else _linear_mm(x_e, gate[e], None if b_gate is None else b_gate[e])
        )
        a = _gated(act, h_gate, h_up)
        outs.append(_linear_mm(a, down[e], None if b_down is None else b_down[e]))
        if keep:
            gs.append(h_gate)
            us.append(h_up)
    if not outs:
        return xs_RH.new_zeros(0, down.shape[1]), gs, us
    return torch.cat(outs) if len(outs) > 1 else outs[0], gs, us


def _combine(o_RH: Tensor, w_TK: Tensor, plan: Plan) -> tuple[Tensor, Tensor]:
    """y_TH = sum_k w_TK * o[slot]; masked slots contribute 0. Also returns o_TKH (for dw)."""
    pad = plan.T * plan.K - plan.num_real
    o_NH = torch.cat([o_RH, o_RH.new_zeros(pad, o_RH.shape[1])]) if pad else o_RH
    o_TKH = o_NH.index_select(0, plan.inv_N).view(plan.T, plan.K, o_RH.shape[1])
    y_TH = torch.bmm(w_TK.to(o_TKH.dtype).unsqueeze(1), o_TKH).squeeze(1)
    return y_TH, o_TKH


def experts_forward(x_TH, w_TK, plan, gate, up, down, b_gate, b_up, b_down, act) -> Tensor:
    """Dispatch + experts + combine without saving anything for backward."""
    tok_R = plan.order_N[: plan.num_real] // plan.K
    xs_RH = x_TH.index_select(0, tok_R)
    o_RH, _, _ = _ffn_sorted(xs_RH, plan, gate, up, down, b_gate, b_up, b_down, act, keep=False)
    return _combine(o_RH, w_TK, plan)[0]


class GroupedExperts(torch.autograd.Function):
    """Differentiable dispatch + experts + combine (see module docstring)."""

    @staticmethod
    def forward(ctx, x_TH, w_TK, gate, up, down, b_gate, b_up, b_down, plan, act):  # noqa: D102
        tok_R = plan.order_N[: plan.num_real] // plan.K
        xs_RH = x_TH.index_select(0, tok_R)
        o_RH, gs, us = _ffn_sorted(
            xs_RH, plan, gate, up, down, b_gate, b_up, b_down, act, keep=True
        )
        y_TH, o_TKH = _combine(o_RH, w_TK, plan)
        ctx.save_for_backward(xs_RH, w_TK, o_TKH, gate, up, down, b_gate, b_up, b_down)
        ctx.gs, ctx.us, ctx.plan, ctx.act = gs, us, plan, act
        return y_TH

    @staticmethod
    def backward(ctx, dy_TH):  # noqa: D102
        xs_RH, w_TK, o_TKH, gate, up, down, b_gate, b_up, b_down = ctx.saved_tensors
        plan: Plan = ctx.plan
        dy_TH = dy_TH.contiguous()
        dw_TK = torch.bmm(o_TKH, dy_TH.unsqueeze(-1)).squeeze(-1).to(w_TK.dtype)
        do_NH = (w_TK.to(dy_TH.dtype).unsqueeze(-1) * dy_TH.unsqueeze(1)).reshape(
            plan.T * plan.K, dy_TH.shape[1]
        )
        do_RH = do_NH.index_select(0, plan.order_N[: plan.num_real])
        grads = _ffn_backward(
            xs_RH, do_RH, plan, ctx.gs, ctx.us, gate, up, down, b_gate, b_up, b_down, ctx.act
        )
        dxs_RH = grads.pop("x")
        pad = plan.T * plan.K - plan.num_real
        dxs_NH = torch.cat([dxs_RH, dxs_RH.new_zeros(pad, dxs_RH.shape[1])]) if pad else dxs_RH
        dx_TH = dxs_NH.index_select(0, plan.inv_N).view(plan.T, plan.K, dxs_RH.shape[1]).sum(1)
        g = grads
        return (
            dx_TH,
            dw_TK,
            g["gate"],
            g["up"],
            g["down"],
            g["b_gate"],
            g["b_up"],
            g["b_down"],
            None,
            None,
        )


def _ffn_backward(xs_RH, do_RH, plan, gs, us, gate, up, down, b_gate, b_up, b_down, act):
    """Per-expert backward of o = down(act(gate x) * up x): six GEMMs per expert."""
    d = {
        "gate": None if gate is None else torch.zeros_like(gate),
        "up": torch.zeros_like(up),
        "down": torch.zeros_like(down),
        "b_gate": None if b_gate is None else torch.zeros_like(b_gate),
        "b_up": None if b_up is None else torch.zeros_like(b_up),
        "b_down": None if b_down is None else torch.zeros_like(b_down),
    }
    dxs, start, j = [], 0, 0
    for e, n in enumerate(plan.counts):
        if n == 0:
            continue
        x_e, do_e = xs_RH[start : start + n], do_RH[start : start + n]
        start += n
        h_gate, h_up = gs[j], us[j]
        j += 1
        with torch.enable_grad():
            hg = None if h_gate is None else h_gate.detach().requires_grad_()
            hu = h_up.detach().requires_grad_()
            a = _gated(act, hg, hu)
        da = do_e @ down[e]
        torch.mm(do_e.t(), a.detach(), out=d["down"][e])
        if hg is None:
            (du,) = torch.autograd.grad(a, (hu,), da)
        else:
            dg, du = torch.autograd.grad(a, (hg, hu), da)
            torch.mm(dg.t(), x_e, out=d["gate"][e])
        torch.mm(du.t(), x_e, out=d["up"][e])
        dx_e = du @ up[e]
        if hg is not None:
            dx_e = dx_e.addmm_(dg, gate[e])
        dxs.append(dx_e)
        if b_down is not None:
            d["b_down"][e] = do_e.sum(0)
        if b_up is not None:
            d["b_up"][e] = du.sum(0)
        if b_gate is not None and hg is not None:
            d["b_gate"][e] = dg.sum(0)
    d["x"] = torch.cat(dxs) if dxs else xs_RH.new_zeros(0, xs_RH.shape[1])
    return d
