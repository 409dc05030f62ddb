"""Ternary experts: weights in {-1, 0, +1} times one scale per expert matrix, trained through a
straight-through estimator, or applied post hoc.

MoTE (Wang et al. 2025, "MoTE: Mixture of Ternary Experts for Memory-efficient Large Multimodal
Models", arXiv:2506.14435) trains the routed experts ternary while the shared expert (and
everything outside the experts) stays in full precision. The quantiser is BitNet b1.58's absmean
(Ma et al. 2024, arXiv:2402.17764), per expert matrix ``W_e`` (gate, up and down separately):

    gamma_e = mean(|W_e|)
    Q(W_e)  = clip(round(W_e / (gamma_e + eps)), -1, 1) * gamma_e

Training keeps latent full-precision weights and runs the forward on ``Q(W)``; the backward treats
``Q`` as the identity (straight-through): ``W_ste = W + (Q(W) - W).detach()``. Here that is a
weights provider of the experts backend (:func:`ternary_provider`), so it works on every family the
backend supports, and :func:`ternarize_experts` writes ``Q(W)`` into a model in place (the
post-hoc baseline, and what an exported QAT model holds, so stock transformers runs it exactly).
Activations stay in full precision (MoTE's weight-only setting).

Shape legend: E experts, O output features, I input features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.models import ModelView
from moelab.models.backend import ExpertWeights, own_parameters

EPS = 1e-8


def ternary(w_EOI: Tensor, eps: float = EPS) -> tuple[Tensor, Tensor]:
    """``(codes_EOI in {-1, 0, 1}, gamma_E)``: the absmean ternary code of each matrix ``w_EOI[e]``."""
    gamma_E = w_EOI.abs().mean(dim=(-2, -1))
    codes = (w_EOI / (gamma_E[:, None, None] + eps)).round().clamp(-1, 1)
    return codes, gamma_E


def ternary_weights(w_EOI: Tensor, eps: float = EPS) -> Tensor:
    """``Q(w)`` (formula above), in ``w``'s dtype."""
    codes, gamma_E = ternary(w_EOI.detach(), eps)
    return (codes * gamma_E[:, None, None]).to(w_EOI.dtype)


def ste_ternary(w_EOI: Tensor) -> Tensor:
    """``Q(w)`` in the forward, identity in the backward (straight-through estimator)."""
    return w_EOI + (ternary_weights(w_EOI) - w_EOI).detach()


def ternary_provider(block, expert_ids_n: Tensor) -> ExpertWeights:
    """Weights provider for :func:`moelab.models.backend.enable_experts_backend`: the block's own
    expert matrices through :func:`ste_ternary` (biases stay in full precision)."""
    own = own_parameters(block, expert_ids_n)
    return ExpertWeights(ste_ternary(own.gate), ste_ternary(own.up), ste_ternary(own.down),
                         own.gate_bias, own.up_bias, own.down_bias)


def ternarize_experts(view: ModelView) -> int:
    """Replace every routed expert matrix of ``view`` by ``Q(W)`` in place (shared experts, routers and
    dense layers untouched); returns the number of weights changed to ternary codes."""
    n = 0
    with torch.no_grad():
        for block in view.blocks:
            for w in (block.gate, block.up, block.down):
                if w is not None:  # views of the model's own storage, in every family's layout
                    w.copy_(ternary_weights(w))
                    n += w.numel()
    return n


__all__ = ["ste_ternary", "ternarize_experts", "ternary", "ternary_provider", "ternary_weights"]
