"""The slow, obvious reference forward of an MoE block, written from the view alone.

Shape legend: T tokens, H hidden, E experts, K top-k, I expert width, S shared-expert width, G groups.

Everything runs in float64 with plain PyTorch ops and a loop over experts. This is the oracle that
every fast path in moelab is checked against, and the proof that a family adapter reads its model
right (tests compare it with each family's own block output).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.models.rule import route_logits
from moelab.models.view import MoEBlockView, SharedExpertsView


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def glu_activation(
    name: str, gate: Tensor, up: Tensor, params: dict[str, float] | None = None
) -> Tensor:
    """``act(gate, up)`` of a gated MLP by the view's name, from the one activation registry
    (:data:`moelab.nn.experts.ACTIVATIONS` via ``VIEW_ACTIVATIONS``).

    'silu', 'gelu' (erf), 'gelu_tanh' (tanh approximation; transformers' gelu_new / gelu_pytorch_tanh),
    'relu': ``f(gate) * up``. 'gpt_oss_swiglu' (GPT-OSS, parameters alpha and limit):
    ``g = min(gate, limit); u = clamp(up, -limit, limit); (u + 1) * g * sigmoid(alpha * g)``.
    """
    from moelab.nn.experts import VIEW_ACTIVATIONS, make_activation

    if name not in VIEW_ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} (known: {sorted(VIEW_ACTIVATIONS)})")
    return make_activation(VIEW_ACTIVATIONS[name], params or None)(gate, up)


def expert_input(block: MoEBlockView, x_NH: Tensor, w_N: Tensor) -> Tensor:
    """What expert ``e`` receives for tokens ``x_NH`` with combine weights ``w_N``: ``x`` where
    the weight scales the output (``combine='output'``), ``w * x`` where it scales the input (Llama4)."""
    if block.combine == "input":
        return x_NH * w_N.unsqueeze(-1).to(x_NH.dtype)
    if block.combine == "output":
        return x_NH
    raise ValueError(f"unknown combine {block.combine!r}")


def expert_activations(block: MoEBlockView, e: int, x_NH: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``a [N, I]`` = ``act(gate[e] x + gate_bias[e], up[e] x + up_bias[e])`` in ``dtype``: the
    down projection's input of expert ``e``."""
    x_NH = x_NH.to(dtype)

    def t(w: Tensor) -> Tensor:
        return w.detach().to(dtype)

    g_NI = x_NH @ t(block.gate[e]).T
    u_NI = x_NH @ t(block.up[e]).T
    if block.gate_bias is not None:
        g_NI = g_NI + t(block.gate_bias[e])
    if block.up_bias is not None:
        u_NI = u_NI + t(block.up_bias[e])
    return glu_activation(block.act, g_NI, u_NI, block.act_params)


def expert_down(block: MoEBlockView, e: int, a_NI: Tensor) -> Tensor:
    """``down[e] a + down_bias[e]`` in ``a``'s dtype: ``[N, H]``."""
    y_NH = a_NI @ block.down[e].detach().to(a_NI.dtype).T
    if block.down_bias is not None:
        y_NH = y_NH + block.down_bias[e].detach().to(a_NI.dtype)
    return y_NH


def reference_route(block: MoEBlockView, hidden_TH: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Route ``hidden_TH [T, H]`` with the block's settings only, in float64.

    Returns ``(logits_TE [T, E] float64, ids_TK [T, K] int64, weights_TK [T, K] float64)``; weights are
    the final combine weights (renormalised and scaled as the family does). The selection rule is
    :func:`moelab.models.rule.route_logits`, the one routing edits re-select with.
    """
    x_TH = hidden_TH.reshape(-1, block.hidden_size).to(torch.float64)
    logits_TE = x_TH @ _f64(block.router_weight).T
    if block.router_bias is not None:
        logits_TE = logits_TE + _f64(block.router_bias)
    ids_TK, w_TK, _ = route_logits(block, logits_TE)
    return logits_TE, ids_TK, w_TK


def _shared_forward(shared: SharedExpertsView, x_TH: Tensor) -> Tensor:
    h_TS = glu_activation(shared.act, x_TH @ _f64(shared.gate).T, x_TH @ _f64(shared.up).T)
    y_TH = h_TS @ _f64(shared.down).T
    if shared.gate_weight is not None:
        y_TH = y_TH * torch.sigmoid(x_TH @ _f64(shared.gate_weight).T)
    return y_TH


def expert_forward(block: MoEBlockView, e: int, x_NH: Tensor) -> Tensor:
    """Expert ``e`` of the block on ``x_NH [N, H]`` (float64), no routing weight: ``[N, H]``."""
    return expert_down(block, e, expert_activations(block, e, x_NH))


def reference_forward(block: MoEBlockView, hidden_TH: Tensor) -> Tensor:
    """The block's output for ``hidden_TH [..., H]``, computed from the view in float64.

    Steps: route (:func:`reference_route`); for each expert, run it on its tokens and add
    ``weight * expert(x)`` (or ``expert(weight * x)`` for ``combine='input'``); add the shared
    expert(s) (times their sigmoid gate) and any output bias. Returns hidden's shape and dtype.
    """
    shape, dtype = hidden_TH.shape, hidden_TH.dtype
    x_TH = hidden_TH.reshape(-1, shape[-1]).to(torch.float64)
    _, ids_TK, w_TK = reference_route(block, x_TH)
    out_TH = torch.zeros_like(x_TH)
    for e in range(block.num_experts):
        tok, slot = torch.where(ids_TK == e)
        if tok.numel() == 0:
            continue
        w_N = w_TK[tok, slot]
        y_NH = expert_forward(block, e, expert_input(block, x_TH[tok], w_N))
        if block.combine == "output":
            y_NH = y_NH * w_N.unsqueeze(-1)
        out_TH.index_add_(0, tok, y_NH)
    if block.shared is not None:
        out_TH = out_TH + _shared_forward(block.shared, x_TH)
    if block.output_bias is not None:
        out_TH = out_TH + _f64(block.output_bias)
    return out_TH.reshape(shape).to(dtype)


__all__ = ["expert_activations", "expert_down", "expert_forward", "expert_input", "glu_activation",
           "reference_forward", "reference_route"]
