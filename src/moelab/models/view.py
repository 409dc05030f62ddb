"""The uniform view of a transformers MoE model: one object per MoE block, one convention for all families.

Shape legend:
    T  tokens (batch * sequence, flattened)
    H  hidden size of the model
    E  routed experts in the block
    K  experts chosen per token (top-k)
    I  intermediate size of one routed expert
    S  intermediate size of the shared expert(s)

Conventions, whatever the family stores:
    * router: ``logits_TE = x_TH @ router_weight.T (+ router_bias)``; ``scores = softmax|sigmoid(logits)``;
      selection on ``scores (+ correction_bias)`` (optionally group-limited); combine weights are the
      selected ``scores``, renormalised when ``norm_topk_prob`` and multiplied by ``routed_scaling_factor``.
    * experts: ``y = down[e] @ act(gate[e] @ x + gate_bias[e], up[e] @ x + up_bias[e]) + down_bias[e]``,
      with ``gate``/``up`` as ``[E, I, H]`` and ``down`` as ``[E, H, I]``.
    * the tensors are views (``.detach()``-ed, same storage) of the model's own parameters: editing them
      in place edits the model. This holds for every supported family, since each stores its experts
      as 2-D or 3-D tensors that reshape/transpose/slice into this convention without a copy. Replacing
      a parameter object (e.g. pruning to fewer experts) needs a fresh :func:`moelab.models.open_model`.

:func:`moelab.models.reference_forward` turns exactly these fields into the block's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moelab.models.edits import Handle, RoutingEdit, seam_of
from moelab.routing import Routing


@dataclass(eq=False)
class SharedExpertsView:
    """The always-on shared expert(s) of a block, merged into one GLU MLP of width S.

    ``gate_weight`` is the ``[1, H]`` weight of a sigmoid gate (Qwen2-MoE ``shared_expert_gate``) or None.
    ``inside_block`` is False where the family runs the shared MLP beside the block in the decoder layer
    (GraniteMoeShared): the block module's own output then excludes it.
    """

    path: str
    module: nn.Module
    gate: Tensor  # [S, H]
    up: Tensor  # [S, H]
    down: Tensor  # [H, S]
    act: str
    gate_weight: Tensor | None = None  # [1, H]
    inside_block: bool = True

    @property
    def intermediate_size(self) -> int:
        return int(self.gate.shape[0])


@dataclass(eq=False)
class RoutingEvent:
    """What the experts of one block received in one forward, after every routing edit.

    hidden_TH: block input flattened to ``[T, H]``; ids_TK: chosen experts (int64);
    weights_TK: final combine weights (after renormalisation and scaling); logits_TE: raw router
    logits in float32, or None where the family does not expose them; mask_TK: bool, False where
    an edit switched a slot off (its weight is 0; the trace writes its id as -1), or None.
    All tensors are detached.
    """

    block: MoEBlockView
    hidden_TH: Tensor
    ids_TK: Tensor
    weights_TK: Tensor
    logits_TE: Tensor | None
    mask_TK: Tensor | None = None

    @classmethod
    def from_routing(cls, block: MoEBlockView, hidden_TH: Tensor, routing: Routing) -> RoutingEvent:
        """Detached, flattened event of a routing (ids int64, logits float32)."""
        logits = routing.logits_TE
        K = routing.ids_TK.shape[-1]
        return cls(
            block=block,
            hidden_TH=hidden_TH.detach().reshape(-1, hidden_TH.shape[-1]),
            ids_TK=routing.ids_TK.detach().reshape(-1, K).to(torch.int64),
            weights_TK=routing.weights_TK.detach().reshape(-1, K),
            logits_TE=None if logits is None else logits.detach().reshape(-1, logits.shape[-1]).float(),
            mask_TK=None if routing.mask_TK is None else routing.mask_TK.detach().reshape(-1, K),
        )

    @property
    def routing(self) -> Routing:
        return Routing(self.logits_TE, self.ids_TK, self.weights_TK, self.mask_TK)


# Removing a routing hook or edit; ``remove()`` once, or a ``with`` block.
RoutingHookHandle = Handle

# installs a block's routing seam: ``install(block, run) -> torch hook handles``, where
# ``run(hidden_TH, routing) -> Routing | None`` applies the edits and hooks (see models/edits.py)
HookInstaller = Callable[["MoEBlockView", Callable[[Tensor, Routing], "Routing | None"]], list]


@dataclass(eq=False)
class MoEBlockView:
    """One MoE block of a model, in moelab's convention (see the module docstring).

    Routing variants beyond the common ones are named, never hidden:
        scoring: 'softmax' | 'sigmoid' | 'sparsemixer' (PhiMoE, parameters in ``scoring_params``)
        group_score: how a group is scored for group-limited top-k: 'max' (DeepSeek-V2) or 'top2_sum'
        norm_p / norm_min: renormalise as ``w / max(||w||_p, norm_min)`` (DBRX p-norm, ERNIE's clamp)
        combine: 'output' (weights scale expert outputs) or 'input' (Llama4 scales expert inputs)
        output_bias: ``[H]`` bias added to the block's output (JetMoE) or None
    """

    family: str
    path: str
    layer: int
    module: nn.Module
    router_module: nn.Module
    experts_module: nn.Module
    top_k: int
    # routing
    router_weight: Tensor  # [E, H]
    scoring: str
    norm_topk_prob: bool
    router_bias: Tensor | None = None  # [E]
    correction_bias: Tensor | None = None  # [E], selection only
    n_group: int | None = None
    topk_group: int | None = None
    group_score: str = "top2_sum"
    routed_scaling_factor: float = 1.0
    norm_p: float = 1.0
    norm_min: float = 0.0
    scoring_params: dict[str, float] = field(default_factory=dict)
    # experts
    gate: Tensor | None = None  # [E, I, H]
    up: Tensor | None = None  # [E, I, H]
    down: Tensor | None = None  # [E, H, I]
    gate_bias: Tensor | None = None  # [E, I]
    up_bias: Tensor | None = None  # [E, I]
    down_bias: Tensor | None = None  # [E, H]
    act: str = "silu"
    act_params: dict[str, float] = field(default_factory=dict)
    layout: str = "fused_gate_up"
    combine: str = "output"
    output_bias: Tensor | None = None  # [H]
    shared: SharedExpertsView | None = None
    hook_installer: HookInstaller | None = field(default=None, repr=False)

    @property
    def num_experts(self) -> int:
        return int(self.router_weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.router_weight.shape[1])

    @property
    def intermediate_size(self) -> int:
        return int(self.gate.shape[1])

    def expert_params(self) -> int:
        """Number of parameters in the routed experts (weights and biases)."""
        ts = (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)
        return sum(t.numel() for t in ts if t is not None)

    def shared_params(self) -> int:
        """Number of parameters in the shared expert(s) and their gate."""
        s = self.shared
        if s is None:
            return 0
        return sum(t.numel() for t in (s.gate, s.up, s.down, s.gate_weight) if t is not None)

    def register_routing_hook(self, fn: Callable[[RoutingEvent], None]) -> Handle:
        """Call ``fn(event)`` on every forward of this block with what its experts received, after
        every routing edit (:class:`RoutingEvent`).

        The hook never changes the model's outputs. ``handle.remove()`` (or using the handle as a
        context manager) removes it.
        """
        return seam_of(self).add("hook", self, fn)

    def register_routing_edit(self, fn: RoutingEdit) -> Handle:
        """Change this block's routing: ``fn(block, hidden_TH, routing) -> routing`` on every forward.

        Edits compose in registration order; returning new ``logits_TE`` with the same ``ids_TK``
        re-selects the experts by the family's own rule (see :mod:`moelab.models.edits`). Gradients
        flow through the edit to the router and experts. ``handle.remove()`` undoes it.
        """
        return seam_of(self).add("edit", self, fn)


@dataclass(eq=False)
class ModelView:
    """A model and its MoE blocks. ``dense_layers`` lists decoder layers without an MoE block."""

    model: nn.Module
    config: Any
    family: str
    blocks: list[MoEBlockView]
    dense_layers: list[int]
    num_layers: int

    def block(self, layer: int) -> MoEBlockView:
        """The MoE block of decoder layer ``layer``."""
        for b in self.blocks:
            if b.layer == layer:
                return b
        raise KeyError(
            f"layer {layer} has no MoE block (MoE layers: {[b.layer for b in self.blocks]})"
        )

    def param_counts(self) -> dict[str, int]:
        """Parameters by part: ``routed`` experts, ``shared`` experts (with their gates), the
        ``rest`` (attention, routers, embeddings, dense MLPs, norms) and the ``total`` (tied
        parameters counted once)."""
        routed = sum(b.expert_params() for b in self.blocks)
        shared = sum(b.shared_params() for b in self.blocks)
        total = sum(p.numel() for p in self.model.parameters())
        return {"routed": routed, "shared": shared, "rest": total - routed - shared, "total": total}
