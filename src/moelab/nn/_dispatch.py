"""Fast dropless dispatch: sort token-slots by expert, run each expert's FFN on its contiguous rows,
scatter-add back — with a hand-written backward.

Shape legend: T tokens, H hidden, E experts, K slots per token, I expert inner dim,
N = T*K slots, R = real (routed) slots, sorted by expert.

Expert e gathers its rows x_e = x[tok_e] and computes ``o = (w * act(x_e G^T, x_e U^T)) D^T
(+ w b_D)``, then ``y.index_add_(0, tok_e, o)``: the combine weight w of each slot is folded into the
activation ([rows, I]) rather than the output ([rows, H]), and the gather, GEMMs and scatter of one
expert touch a block that stays in cache, so no [R, H] buffer is ever materialised (forward or
backward) and nothing of size [R, H] is saved for backward: ``dw = sum_i (dy_e D)_i a_i`` is an
[rows, I] reduction, and x_e / dy_e are gathered again in the backward.

Why a custom autograd.Function: with plain autograd every per-expert row slice's backward
materialises a full [R, H] zero tensor and every gather's backward is a serial scatter-add, which
is what makes the transformers eager loop ~4x slower in training than in inference on CPU. Here the
backward is the same GEMMs as a dense SwiGLU MLP over R rows plus cache-resident gathers and
scatter-adds.

Matmuls run per expert with ``torch.mm`` on contiguous row blocks. ``torch.nn.functional.grouped_mm`` exists on CPU in torch 2.13 (``impl="grouped_mm"``) but
needs 16-byte aligned strides, refuses float64 and, with separate gate/up weights, measured slower
than the loop here (see bench/moe_layer.py), so the loop is the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.nn import _native

Act = Callable[[Tensor], Tensor]


@dataclass
class Plan:
    """Where each slot goes: built once per forward from the routing, no gradients."""

    slot_R: Tensor  # flat slot index (t*K + k) of each real slot, sorted by expert
    tok_R: Tensor  # token of each real slot (slot_R // K)
    counts: list[int]  # real slots per group (expert), in slot order; length E
    num_real: int
    T: int
    K: int
    # weight row of each group; None: group g is row g. Set when the weights are a buffer whose
    # rows are not in expert order (an offloading cache's slots): the slots stay in expert order.
    rows: list[int] | None = None


def make_plan(ids_TK: Tensor, mask_TK: Tensor | None, num_experts: int) -> Plan:
    T, K = ids_TK.shape
    # NOTE: on the CPU only: on an accelerator the Python plan costs a copy each way (not measured)
    if T == 1 and mask_TK is None and ids_TK.device.type == "cpu":
        plan = _one_token_plan(ids_TK.tolist()[0], num_experts, ids_TK.device)
        if plan is not None:
            return plan
    key_N = ids_TK.reshape(-1)
    if mask_TK is not None:
        key_N = torch.where(mask_TK.reshape(-1), key_N, num_experts)
    order_N = torch.argsort(key_N, stable=True)
    counts = torch.bincount(key_N, minlength=num_experts + 1)[:num_experts].tolist()
    R = int(sum(counts))
    slot_R = order_N[:R]
    return Plan(slot_R, slot_R // K, counts, R, T, K)


def _one_token_plan(ids_K: list[int], num_experts: int, device: torch.device) -> Plan | None:
    """:func:`make_plan` of one token (a decode step) in Python, without its five small ops (a
    stable sort of K ids, a bincount): the same plan. None where an id is out of range (the
    general path's handling of it stands)."""
    counts = [0] * num_experts
    for e in ids_K:
        if not 0 <= e < num_experts:
            return None
        counts[e] += 1
    order = sorted(range(len(ids_K)), key=ids_K.__getitem__)  # stable, as argsort(stable=True)
    slot_R = torch.tensor(order, dtype=torch.int64, device=device)
    return Plan(slot_R, torch.zeros_like(slot_R), counts, len(order), 1, len(ids_K))


def _gated(act: Act, h_gate: Tensor | None, h_up: Tensor) -> Tensor:
    return act(h_gate, h_up) if h_gate is not None else act(h_up)


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.nn.functional.linear(x, w, b)


def _rows(plan: Plan):
    """(weight row, first slot, slot count) for every group (expert) that received slots, in slot
    order; the weight row is the group's index unless ``plan.rows`` maps it."""
    start, rows = 0, plan.rows
    for g, n in enumerate(plan.counts):
        if n:
            yield (g if rows is None else rows[g]), start, n
        start += n


def slot_weights(w_TK: Tensor, plan: Plan, dtype: torch.dtype) -> Tensor:
    """[R] combine weight of each real slot, in expert order."""
    return w_TK.reshape(-1).index_select(0, plan.slot_R).to(dtype)


def scatter_tokens(v_RH: Tensor, plan: Plan) -> Tensor:
    """y_TH = sum of the rows of each token (tokens with no real slot get 0)."""
    y_TH = v_RH.new_zeros(plan.T, v_RH.shape[1])
    return y_TH.index_add_(0, plan.tok_R, v_RH) if plan.num_real else y_TH


def _at(t: Tensor | None, e: int) -> Tensor | None:
    return None if t is None else t[e]


def project_in(x_e: Tensor, e: int, gate, up, b_gate, b_up) -> tuple[Tensor | None, Tensor]:
    """``(h_gate, h_up)`` of expert ``e`` on its rows ``x_e`` ``[n, H]`` (``h_gate`` None when ungated)."""
    h_up = _linear(x_e, up[e], _at(b_up, e))
    return (None if gate is None else _linear(x_e, gate[e], _at(b_gate, e))), h_up


def weighted_out(act: Act, h_gate: Tensor | None, h_up: Tensor, w_e: Tensor, down_e: Tensor,
                 b_down_e: Tensor | None) -> Tensor:
    """``w * (down(act(h_gate, h_up)) + b_down)`` for one expert's rows; ``w_e`` ``[n, 1]``."""
    a_w = _gated(act, h_gate, h_up).mul_(w_e)
    o_e = torch.mm(a_w, down_e.t())
    if b_down_e is not None:
        o_e.addmm_(w_e, b_down_e[None])  # + w_r * b_D
    return o_e


def ffn_forward(x_TH, w_R, plan, gate, up, down, b_gate, b_up, b_down, act, keep: bool,
                stats: SlotStats | None = None):
    """y_TH = sum over real slots of w * expert(x); optionally each expert's pre-activations.

    Each expert gathers its own rows and scatter-adds its own output, so the [rows, H] blocks stay
    in cache between the gather, the GEMMs and the scatter (no [R, H] buffer is materialised).
    With ``stats``, each slot's unweighted output norm and down-projection input maximum are
    written into it; the weight is then applied to the output rows instead of the activation.
    """
    y_TH = x_TH.new_zeros(plan.T, down.shape[1])
    gs, us = [], []
    for e, s, n in _rows(plan):
        tok_e, w_e = plan.tok_R[s : s + n], w_R[s : s + n, None]
        x_e = x_TH.index_select(0, tok_e)
        h_gate, h_up = project_in(x_e, e, gate, up, b_gate, b_up)
        if stats is not None:
            o_e = _observed_expert(_gated(act, h_gate, h_up), down[e], b_down, e, s, n, stats)
            o_e.mul_(w_e)
        else:
            o_e = weighted_out(act, h_gate, h_up, w_e, down[e], _at(b_down, e))
        y_TH.index_add_(0, tok_e, o_e)
        if keep:
            gs.append(h_gate)
            us.append(h_up)
    return y_TH, gs, us


def _mv(w_OI: Tensor, x_I: Tensor, b_O: Tensor | None) -> Tensor:
    return torch.mv(w_OI, x_I) if b_O is None else torch.addmv(b_O, w_OI, x_I)


def _mv_slot(y_H, x_H, w: float, e, gate, up, down, b_gate, b_up, b_down, act) -> None:
    """``y_H += w * expert_e(x_H)`` for one row, by ``torch.mv`` on the expert's ``[out, in]``
    slices."""
    h_up = _mv(up[e], x_H, _at(b_up, e))
    h_gate = None if gate is None else _mv(gate[e], x_H, _at(b_gate, e))
    y_H.addmv_(down[e], _gated(act, h_gate, h_up).mul_(w))
    if b_down is not None:
        y_H.add_(b_down[e] * w)


def _weights_list(w_TK: Tensor, dtype: torch.dtype) -> list[float]:
    """The combine weights, flat (slot ``t*K + k``), in the inputs' dtype, as Python floats: one
    conversion where per-slot tensor indexing would cost an op each."""
    # NOTE: no reshape: at decode each torch op's code is cold and costs tens of microseconds
    return [w for row in (w_TK if w_TK.dtype == dtype else w_TK.to(dtype)).tolist() for w in row]


def one_token_forward(x_TH, ids_K: list[int], w_TK, gate, up, down, b_gate, b_up, b_down, act) -> Tensor:
    """:func:`decode_forward` of one token (``x_TH`` ``[1, H]``) whose ``K`` distinct expert ids
    come as a Python list: no plan, the same kernel in the same (expert) order, so bit for bit its
    output; ``[1, H]``. For ``Experts``' own call at decode, where building a plan costs ~10 % of
    the step (bench/decode_gemv.py --rotate)."""
    w_K = _weights_list(w_TK, x_TH.dtype)
    order = sorted(range(len(ids_K)), key=ids_K.__getitem__)
    rows_K, w_K = [ids_K[k] for k in order], [w_K[k] for k in order]
    y_TH = _native.one_token(x_TH, rows_K, w_K, gate, up, down, b_gate, b_up, b_down, act)
    if y_TH is None:
        y_TH = one_token_mv(x_TH, rows_K, w_K, gate, up, down, b_gate, b_up, b_down, act)
    return y_TH


def one_token_mv(x_TH, rows_K: list[int], w_K: list[float], gate, up, down, b_gate, b_up, b_down,
                 act) -> Tensor:
    """``sum_k w_K[k] * expert_{rows_K[k]}(x)`` ``[1, H]`` by ``torch.mv`` per expert, in the order
    given: the path where the native kernel cannot run."""
    y_TH = x_TH.new_zeros(1, down.shape[1])
    x_H, y_H = x_TH[0], y_TH[0]
    for e, w in zip(rows_K, w_K, strict=True):
        _mv_slot(y_H, x_H, w, e, gate, up, down, b_gate, b_up, b_down, act)
    return y_TH


def decode_forward(x_TH, w_TK, plan, gate, up, down, b_gate, b_up, b_down, act) -> Tensor:
    """``experts_forward`` (no stats) for decoding: each group of one row runs ``torch.mv`` on
    its expert's slices, groups of more rows ``experts_forward``'s per-expert ``mm``; ``[T, H]``.
    One token through distinct experts runs the native kernel (:mod:`moelab.nn._native`) where it
    is built, in the plan's (expert) order.

    Why: at one row, ``mm`` on ``[1, in]`` and ``grouped_mm`` read the weights ~20 % slower than
    ``mv``, whose reduction runs along the slices' contiguous rows (bench/decode_gemv.py).
    """
    # Python lists and row views made once: per-slot tensor indexing costs as much as an op; the
    # slots' weights are looked up in Python (no index_select), in the inputs' dtype as elsewhere
    w_N = _weights_list(w_TK, x_TH.dtype)
    slots = plan.slot_R.tolist()
    if plan.T == 1 and plan.num_real and max(plan.counts) == 1:
        groups = list(_rows(plan))
        y_TH = _native.one_token(x_TH, [e for e, _, _ in groups], [w_N[slots[s]] for _, s, _ in groups],
                                 gate, up, down, b_gate, b_up, b_down, act)
        if y_TH is not None:
            return y_TH
    tok_R = plan.tok_R.tolist()
    y_TH = x_TH.new_zeros(plan.T, down.shape[1])
    x_rows, y_rows = x_TH.unbind(), y_TH.unbind()
    for e, s, n in _rows(plan):
        if n == 1:
            t = tok_R[s]
            _mv_slot(y_rows[t], x_rows[t], w_N[slots[s]], e, gate, up, down, b_gate, b_up, b_down, act)
            continue
        tok_e = plan.tok_R[s : s + n]
        w_n1 = torch.tensor([[w_N[j]] for j in slots[s : s + n]], dtype=x_TH.dtype, device=x_TH.device)
        h_gate, h_up = project_in(x_TH.index_select(0, tok_e), e, gate, up, b_gate, b_up)
        y_TH.index_add_(0, tok_e, weighted_out(act, h_gate, h_up, w_n1, down[e], _at(b_down, e)))
    return y_TH


@dataclass
class SlotStats:
    """Per-slot statistics filled by the forward, in plan order (``[R]``, sorted by expert).

    out_norm_R: ``||expert_e(x_t)||_2`` of each real slot, before its combine weight;
    act_max_R: ``max_i |a_i|`` of the down projection's input ``a = act(gate x, up x)``;
    out_max_R: ``max_h |o_h|`` of the expert's output ``o`` (before its combine weight).
    """

    out_norm_R: Tensor
    act_max_R: Tensor
    out_max_R: Tensor

    @classmethod
    def empty(cls, plan: Plan, like: Tensor) -> SlotStats:
        n = plan.num_real
        return cls(like.new_zeros(n), like.new_zeros(n), like.new_zeros(n))


def _observed_expert(a, down_e, b_down, e, s, n, stats: SlotStats) -> Tensor:
    """Unweighted expert output ``a D^T (+ b_D)`` of rows s..s+n, recording their statistics."""
    stats.act_max_R[s : s + n] = a.detach().abs().amax(dim=1)
    o_e = torch.mm(a, down_e.t())
    if b_down is not None:
        o_e.add_(b_down[e])
    stats.out_norm_R[s : s + n] = torch.linalg.vector_norm(o_e.detach(), dim=1)
    stats.out_max_R[s : s + n] = o_e.detach().abs().amax(dim=1)
    return o_e


def experts_forward(x_TH, w_TK, plan, gate, up, down, b_gate, b_up, b_down, act,
                    stats: SlotStats | None = None) -> Tensor:
    """Dispatch + experts + combine without saving anything for backward."""
    w_R = slot_weights(w_TK, plan, x_TH.dtype)
    return ffn_forward(x_TH, w_R, plan, gate, up, down, b_gate, b_up, b_down, act, False, stats)[0]


class GroupedExperts(torch.autograd.Function):
    """Differentiable dispatch + experts + combine (see module docstring)."""

    @staticmethod
    def forward(ctx, x_TH, w_TK, gate, up, down, b_gate, b_up, b_down, plan, act, stats=None):  # noqa: D102
        w_R = slot_weights(w_TK, plan, x_TH.dtype)
        y_TH, gs, us = ffn_forward(
            x_TH, w_R, plan, gate, up, down, b_gate, b_up, b_down, act, True, stats
        )
        ctx.save_for_backward(x_TH, w_R, w_TK, gate, up, down, b_gate, b_up, b_down)
        ctx.gs, ctx.us, ctx.plan, ctx.act = gs, us, plan, act
        return y_TH

    @staticmethod
    def backward(ctx, dy_TH):  # noqa: D102
        x_TH, w_R, w_TK, gate, up, down, b_gate, b_up, b_down = ctx.saved_tensors
        plan: Plan = ctx.plan
        g = _ffn_backward(
            x_TH, dy_TH.contiguous(), w_R, plan, ctx.gs, ctx.us, gate, up, down, b_gate, b_up,
            b_down, ctx.act,
        )
        dw_N = w_TK.new_zeros(plan.T * plan.K)
        dw_N[plan.slot_R] = g["w"].to(w_TK.dtype)
        return (
            g["x"],
            dw_N.view(plan.T, plan.K),
            g["gate"],
            g["up"],
            g["down"],
            g["b_gate"],
            g["b_up"],
            g["b_down"],
            None,
            None,
            None,
        )


def halves_of_one(a: Tensor | None, b: Tensor | None) -> bool:
    """True when ``a``, ``b`` are rows ``[:I]`` and ``[I:]`` of one contiguous ``[E, 2I, H]``
    (transformers' fused ``gate_up_proj``)."""
    if a is None or b is None or a.dim() != 3 or a.shape != b.shape:
        return False
    _, i, h = a.shape
    want = (2 * i * h, h, 1)
    return (a.stride() == want and b.stride() == want
            and b.data_ptr() - a.data_ptr() == i * h * a.element_size())


def _grad_buffers(plan, gate, up, down, b_gate, b_up, b_down) -> dict:
    """Uninitialised gradient buffers; experts that got no rows are zeroed here. Where gate and
    up are the halves of one fused tensor, so are their gradients (one buffer, no cat later)."""
    named = {"gate": gate, "up": up, "down": down, "b_gate": b_gate, "b_up": b_up,
             "b_down": b_down}
    d = {k: None if v is None else torch.empty(v.shape, dtype=v.dtype, device=v.device)
         for k, v in named.items()}
    if halves_of_one(gate, up):
        E, i, h = up.shape
        both = torch.empty(E, 2 * i, h, dtype=up.dtype, device=up.device)
        d["gate"], d["up"] = both[:, :i], both[:, i:]
    idle = [e for e, n in enumerate(plan.counts) if n == 0]
    if idle:
        for t in d.values():
            if t is not None:
                t[idle] = 0
    return d


def _ffn_backward(x_TH, dy_TH, w_R, plan, gs, us, gate, up, down, b_gate, b_up, b_down, act):
    """Per-expert backward of o = (w * act(gate x, up x)) down^T + w b_down: six GEMMs per expert,
    with each expert's rows of x and dy gathered (and its dx scatter-added) while in cache."""
    d = _grad_buffers(plan, gate, up, down, b_gate, b_up, b_down)
    dx_TH = torch.zeros_like(x_TH)
    dw_R = w_R.new_empty(plan.num_real)
    for j, (e, s, n) in enumerate(_rows(plan)):
        tok_e, w_e = plan.tok_R[s : s + n], w_R[s : s + n]
        x_e, dy_e = x_TH.index_select(0, tok_e), dy_TH.index_select(0, tok_e)
        closed = getattr(act, "grad", None) if gs[j] is not None else None
        if closed is not None:  # closed-form derivative: no autograd graph per expert
            a_d = act(gs[j], us[j])
        else:
            with torch.enable_grad():
                hg = None if gs[j] is None else gs[j].detach().requires_grad_()
                hu = us[j].detach().requires_grad_()
                a = _gated(act, hg, hu)
            a_d = a.detach()
        torch.mm(dy_e.t(), a_d * w_e[:, None], out=d["down"][e])
        da_w = dy_e @ down[e]  # d/d(w a)
        torch.sum(da_w * a_d, dim=1, out=dw_R[s : s + n])
        if b_down is not None:
            dw_R[s : s + n] += dy_e @ b_down[e]
            torch.mv(dy_e.t(), w_e, out=d["b_down"][e])
        da = da_w.mul_(w_e[:, None])
        if closed is not None:
            grads = closed(gs[j], us[j], da)
        else:
            grads = torch.autograd.grad(a, (hu,) if hg is None else (hg, hu), da)
        du = grads[-1]
        torch.mm(du.t(), x_e, out=d["up"][e])
        dx_e = du @ up[e]
        if gs[j] is not None:
            dg = grads[0]
            torch.mm(dg.t(), x_e, out=d["gate"][e])
            dx_e.addmm_(dg, gate[e])
            if b_gate is not None:
                torch.sum(dg, 0, out=d["b_gate"][e])
        if b_up is not None:
            torch.sum(du, 0, out=d["b_up"][e])
        dx_TH.index_add_(0, tok_e, dx_e)
    d["x"], d["w"] = dx_TH, dw_R
    return d
