"""Pieces every family adapter shares: storage layouts, shared-MLP views, activation names, hooks.

Shape legend: T tokens, H hidden, E experts, K top-k, I expert width, S shared-expert width.

All tensors returned here are ``.detach()``-ed views of the model's parameters (same storage), so an
in-place edit of a view edits the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from moelab.errors import CheckpointError
from moelab.models.edits import for_experts
from moelab.models.view import MoEBlockView, SharedExpertsView
from moelab.routing import Routing

# transformers ``hidden_act`` names -> moelab's GLU activation names (see reference.glu_activation)
_ACT_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "relu": "relu",
}


def act_name(hidden_act: str, where: str) -> str:
    """moelab's name for a transformers activation, or a CheckpointError naming ``where`` it came from."""
    if hidden_act not in _ACT_NAMES:
        raise CheckpointError(
            f"{where}: activation {hidden_act!r} is not supported by moelab.models "
            f"(supported: {sorted(_ACT_NAMES)})"
        )
    return _ACT_NAMES[hidden_act]


def d(t: Tensor | None) -> Tensor | None:
    """A detached view (same storage) of a parameter or buffer, or None."""
    return None if t is None else t.detach()


def fused_gate_up(
    gate_up_EXH: Tensor, down_EHI: Tensor, where: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Split transformers' standard fused storage ``gate_up_proj [E, 2I, H]`` (gate rows first) and
    ``down_proj [E, H, I]`` into ``gate [E, I, H]``, ``up [E, I, H]``, ``down [E, H, I]`` views."""
    E, two_i, H = gate_up_EXH.shape
    if two_i % 2 or down_EHI.shape != (E, H, two_i // 2):
        raise CheckpointError(
            f"{where}: gate_up_proj {tuple(gate_up_EXH.shape)} and down_proj {tuple(down_EHI.shape)} "
            f"do not fit [E, 2I, H] and [E, H, I]"
        )
    i = two_i // 2
    gu = gate_up_EXH.detach()
    return gu[:, :i], gu[:, i:], down_EHI.detach()


def transposed_gate_up(gate_up_EHX: Tensor, down_EIH: Tensor, interleaved: bool, where: str):
    """Views of transposed storage ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``: Llama4 keeps
    gate then up (concatenated), GPT-OSS interleaves them (gate = even columns, up = odd)."""
    E, H, two_i = gate_up_EHX.shape
    if two_i % 2 or down_EIH.shape != (E, two_i // 2, H):
        raise CheckpointError(
            f"{where}: gate_up_proj {tuple(gate_up_EHX.shape)} and down_proj {tuple(down_EIH.shape)} "
            f"do not fit [E, H, 2I] and [E, I, H]"
        )
    i = two_i // 2
    gu = gate_up_EHX.detach().transpose(1, 2)  # [E, 2I, H]
    gate, up = (gu[:, 0::2], gu[:, 1::2]) if interleaved else (gu[:, :i], gu[:, i:])
    return gate, up, down_EIH.detach().transpose(1, 2)


def glu_mlp(module: nn.Module, path: str, act: str, **kw) -> SharedExpertsView:
    """View of a gated MLP with ``gate_proj``/``up_proj``/``down_proj`` ``nn.Linear`` (no biases)."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        if getattr(getattr(module, name), "bias", None) is not None:
            raise CheckpointError(f"{path}.{name}: biased shared experts are not supported")
    return SharedExpertsView(
        path=path,
        module=module,
        gate=d(module.gate_proj.weight),
        up=d(module.up_proj.weight),
        down=d(module.down_proj.weight),
        act=act,
        **kw,
    )


def config_field(config: Any, *names: str) -> Any:
    """The first of ``names`` that ``config`` sets (not None), else None."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def config_num_experts(config: Any) -> int | None:
    """Routed experts per block according to the config, whatever the family calls the field."""
    return config_field(
        config, "n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts"
    )


def check_experts(
    view: MoEBlockView, expected_e: int | None, expected_i: int | None
) -> MoEBlockView:
    """Check the view is self-consistent and agrees with the config; raise CheckpointError if not."""
    E, H = view.router_weight.shape
    where = f"{view.path} ({view.family})"
    shapes = {"gate": view.gate.shape, "up": view.up.shape, "down": view.down.shape}
    I = shapes["gate"][1]  # noqa: E741 (shape letter)
    want = {"gate": (E, I, H), "up": (E, I, H), "down": (E, H, I)}
    for name, shape in shapes.items():
        if tuple(shape) != want[name]:
            raise CheckpointError(
                f"{where}: {name} is {tuple(shape)} but the router has {E} experts of hidden size {H} "
                f"(expected {want[name]})"
            )
    if expected_e is not None and E != expected_e:
        raise CheckpointError(
            f"{where}: the config says {expected_e} experts but the weights hold {E}"
        )
    if expected_i is not None and I != expected_i:
        raise CheckpointError(
            f"{where}: the config says expert width {expected_i} but the weights have {I}"
        )
    if not 1 <= view.top_k <= E:
        raise CheckpointError(f"{where}: top_k={view.top_k} is not in [1, {E}]")
    g, tg = view.n_group, view.topk_group
    too_small = (
        view.group_score == "top2_sum" and g and E // g < 2
    )  # a group's score needs 2 experts
    if g and (E % g or not tg or tg > g or view.top_k > tg * (E // g) or too_small):
        raise CheckpointError(
            f"{where}: group-limited routing needs E % n_group == 0, 1 <= topk_group <= n_group and "
            f"top_k <= topk_group * E / n_group, with 2+ experts per group for DeepSeek-V3-style group "
            f"scores (E={E}, n_group={g}, topk_group={tg}, top_k={view.top_k})"
        )
    return view


def flat_routing(logits: Tensor | None, ids: Tensor, weights: Tensor) -> Routing:
    """A family's routing flattened to ``[T, E]`` / ``[T, K]`` (ids int64); not detached, so edits
    can differentiate through the logits and weights."""
    # NOTE: a decode step calls this once per MoE layer: tensors already [T, E] / [T, K] int64 (most
    # families' routers flatten the batch) pass through without even a reshape
    if logits is not None and logits.dim() != 2:
        logits = logits.reshape(-1, logits.shape[-1])
    if ids.dim() != 2:
        ids, weights = ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, ids.shape[-1])
    return Routing(logits, ids if ids.dtype == torch.int64 else ids.to(torch.int64), weights)


_STD_ARGS = ("hidden_states", "top_k_index", "top_k_weights")

RouterLogits = Callable[[nn.Module, Tensor], Tensor]


def linear_logits(float32: bool = False, bias: bool = False) -> RouterLogits:
    """``router_logits(router, hidden) -> logits_TE`` of a router whose first step is
    ``F.linear(hidden.reshape(-1, H), router.weight[, router.bias])``, in float32 when ``float32``
    (DeepSeek's routers cast both): the same op on the same tensors as the family's own forward."""

    def logits(router: nn.Module, hidden: Tensor) -> Tensor:
        h_TH = hidden.reshape(-1, hidden.shape[-1])
        w = router.weight
        if float32:
            h_TH, w = h_TH.type(torch.float32), w.type(torch.float32)
        return torch.nn.functional.linear(h_TH, w, router.bias if bias else None)

    return logits


def experts_prehook_installer(
    logits_index: int = 0, arg_names: tuple[str, str, str] = _STD_ARGS,
    router_logits: RouterLogits | None = None, weights_float32: bool = False,
) -> Callable[[MoEBlockView, Callable], list]:
    """The routing seam of families whose experts module is called as ``experts(hidden, ids, weights)``.

    ``arg_names`` are the experts' parameter names, for calls made with keywords. A forward hook on
    the router keeps its raw logits (output ``logits_index``, or the whole output if it is a
    tensor); a forward pre-hook on the experts module runs the seam and, when an edit changed the
    routing, calls the experts with the edited ids and weights instead (same dtypes as the family's).

    ``router_logits`` (for routers returning ``(logits_TE, weights_TK, ids_TK)``) states how the
    router computes its logits; then, while the block's first edit is a selection edit (see
    :mod:`moelab.models.edits`), the router's forward is stood in for: the same logits, the
    selection edit's routing (:func:`moelab.models.edits.preselect_route`, weights in float32 when
    ``weights_float32``, else in the logits' dtype, as the family's), and no selection of its own.
    """

    def install(block: MoEBlockView, run: Callable) -> list:
        seen: dict[str, Any] = {"logits": None, "pre": None}

        def on_router(_mod, _args, out):
            seen["logits"] = out[logits_index] if isinstance(out, tuple) else out

        def on_experts(_mod, args, kwargs):
            hidden, ids, weights = args if len(args) == 3 else _merge_args(args, kwargs, arg_names)[:3]
            logits, seen["logits"] = seen["logits"], None
            pre, seen["pre"] = seen["pre"], None
            routing = flat_routing(logits, ids, weights)
            new = run(hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1]), routing,
                      *(() if pre is None else (pre,)))
            if new is None:
                return None
            new_ids, new_w = for_experts(new, block.num_experts)
            if ids.dim() != 2:  # the family's own layout (DBRX: [T, K] beside a [B, S, H] input)
                new_ids, new_w = new_ids.reshape(*ids.shape[:-1], -1), new_w.reshape(*ids.shape[:-1], -1)
            values = (new_ids if new_ids.dtype == ids.dtype else new_ids.to(ids.dtype),
                      new_w if new_w.dtype == weights.dtype else new_w.to(weights.dtype))
            return _replace_args(args, kwargs, arg_names[1:3], values)

        handles = [
            block.router_module.register_forward_hook(on_router),
            block.experts_module.register_forward_pre_hook(on_experts, with_kwargs=True),
        ]
        if router_logits is not None and hasattr(run, "selection_edit"):  # run: the block's seam
            handles.append(_stand_in(block, run.selection_edit, router_logits, weights_float32, seen))
        return handles

    return install


class _ForwardSwap:
    """``module.forward`` replaced on the instance until ``remove()`` (a torch hook's interface)."""

    def __init__(self, module: nn.Module, forward: Callable) -> None:
        self.module, self.had = module, "forward" in module.__dict__
        self.previous = module.__dict__.get("forward")
        module.forward = forward

    def remove(self) -> None:
        if self.had:
            self.module.forward = self.previous
        else:
            del self.module.forward


def _stand_in(block: MoEBlockView, selection_edit: Callable, router_logits: RouterLogits,
              weights_float32: bool, seen: dict) -> _ForwardSwap:
    """Stand in for the router's forward while the block's first edit is a selection edit."""
    from moelab.models.edits import preselect_route

    router = block.router_module
    own = router.forward  # the bound forward of the router's class (or one installed before)

    def forward(hidden_states, *args, **kwargs):
        seen["pre"], first = None, selection_edit()  # never one left from a call the experts missed
        if first is None or args or kwargs:
            return own(hidden_states, *args, **kwargs)
        logits_TE = router_logits(router, hidden_states)
        routing = preselect_route(first[0], first[1], logits_TE,
                                  torch.float32 if weights_float32 else logits_TE.dtype)
        seen["pre"] = (first[1], routing)
        return logits_TE, routing.weights_TK, routing.ids_TK

    return _ForwardSwap(router, forward)


def _merge_args(args: tuple, kwargs: dict, names: tuple[str, ...]) -> tuple:
    """Positional view of a call made with any mix of positional and keyword arguments."""
    out = list(args)
    for name in names[len(args) :]:
        out.append(kwargs[name])
    return tuple(out)


def _replace_args(args: tuple, kwargs: dict, names: tuple[str, str], values: tuple) -> tuple:
    """``(args, kwargs)`` with the arguments ``names`` (positions 1 and 2) set to ``values``."""
    args, kwargs = list(args), dict(kwargs)
    for pos, (name, value) in enumerate(zip(names, values, strict=True), start=1):
        if pos < len(args):
            args[pos] = value
        else:
            kwargs[name] = value
    return tuple(args), kwargs
