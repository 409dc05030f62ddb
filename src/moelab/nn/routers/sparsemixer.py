"""SparseMixer routing as PhiMoE runs it at inference.

Liu et al. 2023, "Sparse Backpropagation for MoE Training" (arXiv:2310.00811), used by Phi-3.5-MoE
(Abdin et al. 2024, arXiv:2404.14219). For each of k rounds, with ``m`` the largest logit among the
experts not yet taken and ``z`` the logits:

    keep_e = (m - z_e) / max(|z_e|, m) <= 2 * eps           (eps = jitter_eps)
    id_r   = argmax over experts not yet taken
    w_r    = softmax_e( z_e if keep_e and e not taken, else -inf )[id_r]

Weights are not renormalised over the k. This router is deterministic in training mode too: PhiMoE's
training-time Gumbel sampling and Heun's-method gradient estimator are not implemented, so gradients
reach the router through the softmax weights only (fine-tuning a patched PhiMoE trains a different
router than PhiMoE's own).

Shape legend: T tokens, H hidden, E experts, K = top_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from moelab.models.rule import sparsemixer_select
from moelab.nn.routers.base import Router, RouterConfig
from moelab.nn.routing import Routing, RoutingError, check_top_k


@dataclass(kw_only=True)
class SparseMixerConfig(RouterConfig):
    top_k: int = 2
    jitter_eps: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_top_k(self.top_k, self.num_experts, "SparseMixerConfig.top_k")
        if not (isinstance(self.jitter_eps, float | int) and math.isfinite(self.jitter_eps)
                and self.jitter_eps >= 0):
            raise RoutingError(
                f"SparseMixerConfig.jitter_eps must be a finite number >= 0, got {self.jitter_eps!r}"
            )


class SparseMixerRouter(Router):
    """``forward(x_TH) -> Routing`` with K = top_k (PhiMoE's inference routing, float32)."""

    config: SparseMixerConfig

    def route(self, logits_TE: Tensor) -> Routing:
        ids_TK, weights_TK = sparsemixer_select(
            logits_TE.float(), self.config.top_k, float(self.config.jitter_eps)
        )
        return Routing(logits_TE, ids_TK, weights_TK)
