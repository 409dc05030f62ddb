"""Float64 references for compressed layers, computed from the ORIGINAL model view and a plan alone.

Shape legend: T tokens, H hidden, E experts of the original layer, E' of the compressed one,
I expert width, N tokens routed to one expert.

* :func:`simulate` — the output of a compressed layer, in *activation* space: output expert ``o``
  on tokens ``x`` is ``sum_m (c_m * h)[..] @ down[m][:, p_m].T`` with
  ``h = mask * act(sum_m c_m * (gate[m] x + gate_bias[m])[p_m], sum_m c_m * (up[m] x + up_bias[m])[p_m])``,
  which equals the weight-space formula of :mod:`moelab.compress.plan` by linearity, but never
  builds merged weights: it checks the writer (:func:`moelab.compress.apply.apply_plan`) rather
  than repeating it. Routing uses the router rows of ``router_from`` and the compressed top-k and
  groups of :func:`moelab.compress.apply.routing_settings`.
* :func:`masked_logits` — runs the original model with every other expert's router logit masked, as
  a routing edit: ``-inf`` logits, the family's own rule choosing again (never selected, also through
  a correction bias). Pruning to a set S must equal this exactly.
* :func:`simulated` — runs the original model with the compressed layers of a plan simulated.

:func:`simulated` replaces each MoE block's output by the float64 simulation through a forward hook
(removed on exit): it is the oracle that checks the merged checkpoints the writer builds, not a way
to change a model (that is a routing edit or an experts backend).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from moelab.compress.apply import check_plan, layer_plan, routing_settings
from moelab.compress.plan import LayerPlan, OutExpert, Plan, PlanError
from moelab.models import (
    ModelView,
    MoEBlockView,
    glu_activation,
    reference_forward,
    reference_route,
)
from moelab.models.edits import reselect
from moelab.routing import Routing

_f64 = torch.float64


def _t(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach().to(_f64).cpu()


def _member_coef(c: float | Tensor, I: int) -> Tensor:  # noqa: E741
    return c.detach().to(_f64).cpu() if isinstance(c, Tensor) else torch.full((I,), float(c), dtype=_f64)


def _out_expert_forward(block: MoEBlockView, out: OutExpert, x_NH: Tensor) -> Tensor:
    """Output expert ``out`` on ``x_NH`` in activation space (float64): ``[N, H]``."""
    I = block.intermediate_size  # noqa: E741
    g_NI = torch.zeros(x_NH.shape[0], I, dtype=_f64)
    u_NI = torch.zeros_like(g_NI)
    for m in out.members:
        p = torch.arange(I) if m.perm is None else m.perm.long().cpu()
        c_I = _member_coef(m.coef, I)
        gm_NI, um_NI = x_NH @ _t(block.gate[m.expert]).T, x_NH @ _t(block.up[m.expert]).T
        if block.gate_bias is not None:
            gm_NI = gm_NI + _t(block.gate_bias[m.expert])
        if block.up_bias is not None:
            um_NI = um_NI + _t(block.up_bias[m.expert])
        g_NI = g_NI + gm_NI[:, p] * c_I
        u_NI = u_NI + um_NI[:, p] * c_I
    h_NI = glu_activation(block.act, g_NI, u_NI, block.act_params)
    if out.neuron_mask is not None:
        h_NI = h_NI * out.neuron_mask.bool().cpu().to(_f64)
    y_NH = torch.zeros_like(x_NH)
    for m in out.members:
        p = torch.arange(I) if m.perm is None else m.perm.long().cpu()
        c_I = _member_coef(m.coef, I)
        y_NH = y_NH + (h_NI * c_I) @ _t(block.down[m.expert])[:, p].T
        if block.down_bias is not None:
            y_NH = y_NH + c_I.mean() * _t(block.down_bias[m.expert])
    return y_NH


def _compressed_router(block: MoEBlockView, lp: LayerPlan, top_k: int, n_group: int | None,
                       topk_group: int | None) -> MoEBlockView:
    """A copy of the block view whose router has the compressed layer's rows and settings."""
    src = torch.tensor(lp.sources(), dtype=torch.long)

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else _t(t)[src]

    return dataclasses.replace(block, router_weight=pick(block.router_weight), router_bias=pick(block.router_bias),
                               correction_bias=pick(block.correction_bias), top_k=top_k,
                               n_group=n_group, topk_group=topk_group, gate=None, up=None, down=None,
                               hook_installer=None)


def _shared_and_bias(block: MoEBlockView, x_TH: Tensor, with_shared: bool) -> Tensor:
    """What the block adds beside the routed experts (shared experts, output bias): ``[T, H]``."""
    base = dataclasses.replace(block, router_bias=None, correction_bias=None)
    zero = dataclasses.replace(base, gate=torch.zeros_like(base.gate), up=torch.zeros_like(base.up),
                               down=torch.zeros_like(base.down), gate_bias=None, up_bias=None, down_bias=None,
                               shared=base.shared if with_shared else None)
    return reference_forward(zero, x_TH)


def simulate(view: ModelView, plan: Plan, hidden_TH: Tensor, layer: int, *, with_shared: bool = True) -> Tensor:
    """Output ``[T, H]`` (float64) of ``layer`` compressed by ``plan``, for block input ``hidden_TH``.

    Computed from the original ``view`` and ``plan`` only (see the module docstring). Includes the
    shared expert(s) and output bias like :func:`moelab.models.reference_forward` (``with_shared``
    False leaves out a shared MLP that the family runs beside the block, e.g. GraniteMoeShared).
    """
    check_plan(view, plan)
    rs = routing_settings(view, plan)
    block = view.block(layer)
    lp = layer_plan(plan, block)
    x_TH = hidden_TH.reshape(-1, block.hidden_size).detach().to(_f64).cpu()
    router = _compressed_router(block, lp, rs.top_k, rs.n_group, rs.topk_group)
    _, ids_TK, w_TK = reference_route(router, x_TH)
    out_TH = torch.zeros_like(x_TH)
    for o, out in enumerate(lp.experts):
        tok, slot = torch.where(ids_TK == o)
        if tok.numel() == 0:
            continue
        w_N1 = w_TK[tok, slot].unsqueeze(-1)
        if block.combine == "input":
            y_NH = _out_expert_forward(block, out, x_TH[tok] * w_N1)
        else:
            y_NH = _out_expert_forward(block, out, x_TH[tok]) * w_N1
        out_TH.index_add_(0, tok, y_NH)
    return out_TH + _shared_and_bias(block, x_TH, with_shared)


def masked_block(block: MoEBlockView, keep: list[int]) -> MoEBlockView:
    """A float64 copy of the block view whose router can only pick the experts in ``keep``.

    Removed experts get router bias ``-inf`` (softmax / SparseMixer: zero probability, the softmax
    renormalised over ``keep``) and correction bias ``-inf`` (never selected, whatever the
    scoring); top-k is clamped to ``len(keep)`` as :func:`moelab.compress.apply.apply_plan` does.
    """
    E = block.num_experts
    removed = _removed(block, list(keep))
    ninf = torch.zeros(E, dtype=_f64).masked_fill(removed, float("-inf"))
    corr = ninf if block.correction_bias is None else _t(block.correction_bias) + ninf
    rb = _t(block.router_bias)
    if block.scoring != "sigmoid":  # sigmoid scores stay as they are; selection alone is masked
        rb = ninf if rb is None else rb + ninf
    top_k = min(block.top_k, len(keep))
    return dataclasses.replace(block, router_bias=rb, correction_bias=corr, top_k=top_k)


@contextmanager
def override_blocks(view: ModelView, fns: dict[int, Callable[[Tensor], Tensor]]) -> Iterator[ModelView]:
    """Replace the output of the MoE block of each ``layer`` in ``fns`` by ``fn(hidden_TH) -> out_TH``.

    ``fn`` sees the block input flattened to ``[T, H]`` and returns what the block module itself
    returns (for GraniteMoeShared: without the shared MLP the decoder layer adds).
    """
    handles = []

    def make_hook(fn):
        def hook(_mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            main = out[0] if isinstance(out, tuple) else out
            y = fn(x.reshape(-1, x.shape[-1])).to(main.dtype).reshape(main.shape)
            return (y, *out[1:]) if isinstance(out, tuple) else y
        return hook

    try:
        for layer, fn in fns.items():
            handles.append(view.block(layer).module.register_forward_hook(make_hook(fn), with_kwargs=True))
        yield view
    finally:
        for h in handles:
            h.remove()


@contextmanager
def masked_logits(view: ModelView, keep: dict[int, list[int]]) -> Iterator[ModelView]:
    """Run the original model with only the experts in ``keep[layer]`` routable in those layers.

    A routing edit per listed layer (:meth:`moelab.models.MoEBlockView.register_routing_edit`): the
    other experts' logits are ``-inf`` and the family's own rule chooses again, so they are never
    selected (also through a correction bias) and softmax weights renormalise over ``keep``. Where
    fewer than top-k experts are kept, the slots left over are switched off, which is the clamped
    top-k of :func:`moelab.compress.apply.apply_plan`. Other layers are untouched.
    """
    handles = []
    try:
        for layer, experts in keep.items():
            try:
                block = view.block(layer)
            except KeyError as err:
                raise PlanError(f"keep layer {layer}: the model has no MoE block there "
                                f"(MoE layers: {[b.layer for b in view.blocks]})") from err
            handles.append(block.register_routing_edit(_only(_removed(block, list(experts)))))
        yield view
    finally:
        for h in handles:
            h.remove()


def _removed(block: MoEBlockView, keep: list[int]) -> Tensor:
    """``[E]`` bool: the experts not in ``keep`` (checked: distinct ids in range, at least one)."""
    E = block.num_experts
    if not keep:
        raise PlanError(f"keep layer {block.layer}: removes every expert")
    if any(not 0 <= int(e) < E for e in keep) or len(set(keep)) != len(keep):
        raise PlanError(f"keep layer {block.layer}: expected distinct experts in [0, {E}), got {list(keep)}")
    removed = torch.ones(E, dtype=torch.bool)
    removed[torch.tensor([int(e) for e in keep])] = False
    return removed


def _only(removed_E: Tensor) -> Callable:
    def edit(block: MoEBlockView, hidden_TH: Tensor, routing: Routing) -> Routing:
        logits = routing.logits_TE.masked_fill(removed_E.to(routing.logits_TE.device), float("-inf"))
        return reselect(block, routing.replace(logits_TE=logits))

    return edit


@contextmanager
def simulated(view: ModelView, plan: Plan) -> Iterator[ModelView]:
    """Run the original model with every layer of ``plan`` replaced by :func:`simulate`."""
    check_plan(view, plan)
    fns = {}
    for layer in plan.layers:
        outside = view.block(layer).shared is not None and not view.block(layer).shared.inside_block
        fns[layer] = (lambda x, layer=layer, ws=not outside: simulate(view, plan, x, layer, with_shared=ws))
    with override_blocks(view, fns):
        yield view


def keep_sets(plan: Plan) -> dict[int, list[int]]:
    """``layer -> kept original experts`` of a pruning plan (for :func:`masked_logits`)."""
    for layer, lp in plan.layers.items():
        if not lp.is_pruning():
            raise PlanError(f"plan layer {layer}: not a pruning plan (merged, scaled or masked experts)")
    return {layer: lp.sources() for layer, lp in plan.layers.items()}
