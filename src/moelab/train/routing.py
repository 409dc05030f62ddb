"""What the routers of a model being trained decided, and the aux-loss-free bias update.

``RoutingRecorder`` puts moelab's routing hooks (``MoEBlockView.register_routing_hook``) on every
MoE block of a transformers model, so each forward leaves one :class:`moelab.nn.routing.Routing`
per MoE layer: the experts each token was actually sent to, as the experts module received them.
That is what the load statistics and the bias update count, whatever the family computes its
selection from (DeepSeek-V3 selects on sigmoid score + correction bias, which the raw router
logits that transformers returns do not show).

The update (Wang et al. 2024, arXiv:2408.15664; DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2) is
``bias_e += rate * sign(mean_e c_e - c_e)`` with ``c_e`` the assignments expert e received in the
step (:func:`moelab.nn.routers.bias_balance.bias_update`), applied after the optimizer step to the
``e_score_correction_bias`` buffer that transformers' DeepSeek-V3 router keeps but never updates.

Legend: T tokens, K experts per token, E experts, L MoE layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.nn.routers.bias_balance import bias_update
from moelab.nn.routing import Routing


class RoutingRecorder:
    """Records the routing of every MoE block on each forward; use as a context manager.

    After a forward, ``routings`` holds one ``Routing`` per MoE layer in layer order: ids and weights
    as the experts got them, raw router logits in float32 (detached: losses take the logits with
    their autograd graph from the model output). ``clear()`` before each forward.
    """

    def __init__(self, model: nn.Module) -> None:
        from moelab.models import open_model

        self.view = open_model(model)
        self._by_layer: dict[int, Routing] = {}
        self._handles = [b.register_routing_hook(self._record) for b in self.view.blocks]

    def _record(self, event) -> None:
        if event.logits_TE is None:
            raise MoelabError(f"{event.block.path}: the router's logits are not exposed; cannot record routing")
        self._by_layer[event.block.layer] = Routing(logits_TE=event.logits_TE, ids_TK=event.ids_TK,
                                                    weights_TK=event.weights_TK)

    @property
    def routings(self) -> list[Routing]:
        return [self._by_layer[b.layer] for b in self.view.blocks if b.layer in self._by_layer]

    def clear(self) -> None:
        self._by_layer.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> RoutingRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.no_grad()
def update_correction_bias(view, counts_LE: Tensor, rate: float) -> Tensor:
    """Apply the aux-loss-free update to each MoE block's ``correction_bias`` in place; returns ``[L, E]`` changes.

    Args:
        view: the model's ``ModelView``; every block must have a correction bias (DeepSeek-V3, GLM4-MoE).
        counts_LE: the step's routed assignments per block, in ``view.blocks`` order.
    """
    if counts_LE.shape[0] != len(view.blocks):
        raise MoelabError(f"update_correction_bias: {counts_LE.shape[0]} rows of counts for {len(view.blocks)} MoE blocks")
    deltas = []
    for block, counts_E in zip(view.blocks, counts_LE, strict=True):
        if block.correction_bias is None:
            raise MoelabError(f"{block.path} ({block.family}): no correction bias to update")
        delta_E = bias_update(counts_E, rate)
        block.correction_bias.add_(delta_E.to(block.correction_bias))
        deltas.append(delta_E)
    return torch.stack(deltas)
