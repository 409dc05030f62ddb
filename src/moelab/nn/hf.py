"""moelab layers on real transformers models: `from_view`, `patch`, `unpatch`.

``from_view(block)`` builds a `MoELayer` whose router, experts and shared experts *share storage*
with one block of an opened model (``moelab.models.open_model``): editing either edits both.
The layer's parameters are new ``nn.Parameter`` objects over that storage, so gradients of a
patched model land on moelab's parameters.

``patch(model, router=None)`` swaps every MoE block for a `PatchedBlock` running moelab's layer;
``router=None`` keeps each block's own routing (a `GroupLimitedRouter` reproducing the family's
settings), otherwise ``router(block_view) -> router module`` supplies a new one (e.g. dynamic
top-p). ``unpatch(model)`` puts the original modules back.

PhiMoE runs `SparseMixerRouter` (its inference routing, also in training mode); Llama4 runs
``MoELayer(combine="input")``. Families the view supports but this module cannot reproduce raise
`UnsupportedModelError` before anything is changed.
While patched, the block's routing seam (``register_routing_edit`` / ``register_routing_hook`` of
the model view, :mod:`moelab.models.edits`) runs on moelab's router output, so edits and hooks
registered before or after patching keep working; transformers' ``output_router_logits`` does not
see moelab's router.

Shape legend: B batch, S sequence, T tokens, H hidden, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moelab.errors import UnsupportedModelError
from moelab.nn.experts import VIEW_ACTIVATIONS as _ACT
from moelab.nn.experts import Experts, ExpertsConfig
from moelab.nn.layer import DenseMLP, MoELayer
from moelab.nn.routers.group_limited import GroupLimitedConfig, GroupLimitedRouter
from moelab.nn.routers.sparsemixer import SparseMixerConfig, SparseMixerRouter


def _share(t: Tensor, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(t.detach(), requires_grad=requires_grad and t.is_floating_point())


def _check_supported(block) -> None:
    where = f"{block.path} ({block.family})"
    if block.scoring not in ("softmax", "sigmoid", "sparsemixer"):
        raise UnsupportedModelError(
            f"moelab.nn: {where}: scoring {block.scoring!r} has no moelab router yet"
        )
    if block.scoring == "sparsemixer" and float(block.routed_scaling_factor) != 1.0:
        raise UnsupportedModelError(
            f"moelab.nn: {where}: SparseMixer routing with a routed scaling factor is not supported"
        )
    if block.combine not in ("output", "input"):
        raise UnsupportedModelError(
            f"moelab.nn: {where}: combine={block.combine!r} is not supported"
        )
    if block.act not in _ACT:
        raise UnsupportedModelError(
            f"moelab.nn: {where}: activation {block.act!r} is not supported"
        )


def router_from_view(block) -> GroupLimitedRouter | SparseMixerRouter:
    """A router reproducing the block's own routing, sharing its weight (and biases)."""
    _check_supported(block)
    E, H = block.router_weight.shape
    if block.scoring == "sparsemixer":
        sm = SparseMixerConfig(num_experts=E, hidden_size=H, top_k=block.top_k,
                               bias=block.router_bias is not None,
                               jitter_eps=float(block.scoring_params["jitter_eps"]))
        router = SparseMixerRouter(sm, device=block.router_weight.device,
                                   dtype=block.router_weight.dtype)
        router.weight = _share(block.router_weight)
        if block.router_bias is not None:
            router.bias = _share(block.router_bias)
        return router
    n_group = block.n_group or 1
    cfg = GroupLimitedConfig(
        num_experts=E,
        hidden_size=H,
        bias=block.router_bias is not None,
        top_k=block.top_k,
        scoring=block.scoring,
        n_group=n_group,
        topk_group=block.topk_group if n_group > 1 else 1,
        group_score=block.group_score,
        normalize=block.norm_topk_prob,
        routed_scaling_factor=float(block.routed_scaling_factor),
        correction_bias=block.correction_bias is not None,
        norm_p=float(block.norm_p),
        norm_min=float(block.norm_min),
    )
    router = GroupLimitedRouter(
        cfg, device=block.router_weight.device, dtype=block.router_weight.dtype
    )
    router.weight = _share(block.router_weight)
    if block.router_bias is not None:
        router.bias = _share(block.router_bias)
    if block.correction_bias is not None:
        router.correction_bias = (
            block.correction_bias.detach()
        )  # same storage: updates reach the model
    return router


def experts_from_view(block) -> Experts:
    """`Experts` over the block's own expert tensors (same storage)."""
    _check_supported(block)
    E, I, H = block.up.shape
    cfg = ExpertsConfig(
        num_experts=E,
        hidden_size=H,
        inner_size=I,
        activation=_ACT[block.act],
        act_params=dict(block.act_params) or None,
        bias=block.up_bias is not None,
    )
    with torch.device("meta"):
        experts = Experts(cfg)
    for name, t in (
        ("gate", block.gate),
        ("up", block.up),
        ("down", block.down),
        ("gate_bias", block.gate_bias),
        ("up_bias", block.up_bias),
        ("down_bias", block.down_bias),
    ):
        if getattr(experts, name) is not None:
            setattr(experts, name, _share(t))
    return experts


def _shared_from_view(shared) -> tuple[nn.Module, nn.Module | None]:
    S, H = shared.up.shape
    with torch.device("meta"):
        mlp = DenseMLP(H, S, _ACT[shared.act])
        gate = nn.Linear(H, 1, bias=False) if shared.gate_weight is not None else None
    mlp.gate.weight, mlp.up.weight, mlp.down.weight = (
        _share(shared.gate),
        _share(shared.up),
        _share(shared.down),
    )
    if gate is not None:
        gate.weight = _share(shared.gate_weight)
    return mlp, gate


def from_view(block, router: nn.Module | None = None) -> MoELayer:
    """`MoELayer` sharing the weights of one block view; ``router=None`` keeps the block's routing."""
    _check_supported(block)
    shared, gate = (None, None)
    if block.shared is not None and block.shared.inside_block:
        shared, gate = _shared_from_view(block.shared)
    return MoELayer(
        router if router is not None else router_from_view(block),
        experts_from_view(block),
        shared,
        gate,
        combine=block.combine,
    )


class PatchedBlock(nn.Module):
    """Stands in for a transformers MoE block: same input, same output structure."""

    def __init__(
        self, layer: MoELayer, original: nn.Module, block_output: Callable | None,
        output_bias: Tensor | None
    ) -> None:
        super().__init__()
        self.moe = layer
        self.block_output = block_output  # the family adapter's: what its block returns besides y
        self.output_bias = None if output_bias is None else _share(output_bias)
        object.__setattr__(self, "_moelab_original", original)  # kept out of parameters/state_dict

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        out = self.moe(hidden_states)
        y = out.y if self.output_bias is None else out.y + self.output_bias
        return y if self.block_output is None else self.block_output(y, out.routing)


class _SeamRouter(nn.Module):
    """A router followed by the original block's routing seam (its edits, then its hooks)."""

    def __init__(self, router: nn.Module, block) -> None:
        super().__init__()
        self.inner = router
        object.__setattr__(self, "_moelab_block", block)  # the view, kept out of submodules

    @property
    def num_experts(self) -> int:
        return self.inner.num_experts

    def forward(self, x_TH: Tensor, **kwargs):
        from moelab.models.edits import seam_of

        routing = self.inner(x_TH, **kwargs)
        edited = seam_of(self._moelab_block).run(x_TH, routing)
        return routing if edited is None else edited


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def patch(model: nn.Module, router: Callable[..., nn.Module] | None = None) -> nn.Module:
    """Swap every MoE block of ``model`` for moelab's layer, in place; returns the model.

    ``router``: None keeps each block's own routing; otherwise a callable ``router(block_view)``
    returning a router module for that block (it may copy ``block_view.router_weight``).
    """
    from moelab.models import open_model
    from moelab.models.registry import adapter_named

    if any(isinstance(m, PatchedBlock) for m in model.modules()):
        unpatch(model)
    view = open_model(model)
    for block in view.blocks:
        _check_supported(block)  # all-or-nothing: fail before changing anything
    for block in view.blocks:
        layer = from_view(block, None if router is None else router(block))
        layer.router = _SeamRouter(layer.router, block)
        _set_module(
            model, block.path,
            PatchedBlock(layer, block.module, adapter_named(block.family).block_output, block.output_bias),
        )
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original blocks replaced by `patch`; returns the model."""
    paths = [(name, m) for name, m in model.named_modules() if isinstance(m, PatchedBlock)]
    for name, m in paths:
        _set_module(model, name, m._moelab_original)
    return model
