"""Training losses of a token-choice top-k MoE language model, returned explicitly (no globals).

Legend: T tokens (batch x sequence, flattened), E experts, K experts per token, L MoE layers, V vocab.

- Load balancing (Switch Transformer, Fedus et al. 2021, https://arxiv.org/abs/2101.03961, eq. 4-6),
  per layer and averaged over layers:  ``balance = E * sum_e f_e * P_e`` with ``f_e`` the share of the
  T*K top-k assignments that go to expert e and ``P_e`` the mean router probability of e. It is 1.0
  when routing is uniform and grows towards E as it collapses. (transformers' ``load_balancing_loss_func``
  pools all layers into one count and does not divide by K; per-layer balance is what we want here.)
- Router z-loss (ST-MoE, Zoph et al. 2022, https://arxiv.org/abs/2202.08906, eq. 5):
  ``z = mean_t (logsumexp_e logits_te)^2``, averaged over layers; it keeps router logits small so
  the float32 softmax stays well conditioned.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class MoeLosses(NamedTuple):
    """Losses of one batch. ``total = ce + aux_coef * balance + z_coef * z``; ``load_LE`` counts top-k picks."""

    total: Tensor
    ce: Tensor
    balance: Tensor
    z: Tensor
    load_LE: Tensor


def balance_loss(logits_TE: Tensor, top_k: int) -> Tensor:
    """Switch load-balancing loss of one layer (1.0 when balanced). Returns a float32 scalar."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    num_experts = probs_TE.shape[-1]
    ids_TK = probs_TE.topk(top_k, dim=-1).indices
    frac_E = torch.zeros(num_experts, device=probs_TE.device).scatter_add_(
        0, ids_TK.reshape(-1), torch.ones(ids_TK.numel(), device=probs_TE.device)
    ) / ids_TK.numel()
    return num_experts * (frac_E * probs_TE.mean(dim=0)).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss of one layer. Returns a float32 scalar."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def expert_load(logits_TE: Tensor, top_k: int) -> Tensor:
    """Top-k assignment counts per expert ``[E]`` (float32), as the model routes (softmax then top-k)."""
    ids_TK = logits_TE.float().topk(top_k, dim=-1).indices  # softmax is monotone: same top-k as on probs
    return torch.bincount(ids_TK.reshape(-1), minlength=logits_TE.shape[-1]).float()


def lm_losses(
    logits_BSV: Tensor,
    input_ids_BS: Tensor,
    router_logits: tuple[Tensor, ...],
    top_k: int,
    aux_coef: float,
    z_coef: float,
) -> MoeLosses:
    """Next-token cross-entropy plus the router losses of every MoE layer.

    Args:
        logits_BSV: LM logits for each position.
        input_ids_BS: the tokens; position s predicts token s+1.
        router_logits: one ``[T, E]`` tensor per layer, T = B*S (transformers' ``output_router_logits``).
    """
    ce = F.cross_entropy(logits_BSV[:, :-1].reshape(-1, logits_BSV.shape[-1]).float(), input_ids_BS[:, 1:].reshape(-1))
    balance = torch.stack([balance_loss(lg, top_k) for lg in router_logits]).mean()
    z = torch.stack([router_z_loss(lg) for lg in router_logits]).mean()
    with torch.no_grad():
        load_LE = torch.stack([expert_load(lg, top_k) for lg in router_logits])
    return MoeLosses(ce + aux_coef * balance + z_coef * z, ce, balance, z, load_LE)
