"""Training losses of a token-choice top-k MoE language model, returned explicitly (no globals).

Legend: T tokens (batch x sequence, flattened), E experts, K experts per token, L MoE layers, V vocab.

The router losses are moelab.nn's (:mod:`moelab.nn.losses`), applied per layer to the raw router
logits transformers returns with ``output_router_logits=True`` and averaged over layers:

- load balancing (Switch Transformer, Fedus et al. 2021, arXiv:2101.03961, eq. 4):
  ``E * sum_e f_e * P_e``, 1.0 when routing is uniform, growing towards E/K as it collapses. Per layer,
  unlike transformers' ``load_balancing_loss_func``, which pools the layers' counts into one.
- router z-loss (ST-MoE, Zoph et al. 2022, arXiv:2202.08906, eq. 5): ``mean_t logsumexp(z_t)^2``.

Sigmoid routers (DeepSeek-V3) get :func:`sigmoid_lm_losses` instead: DeepSeek-V3's sequence-wise
balance loss (arXiv:2412.19437, eqs. 17-20) on the normalised sigmoid scores, counted on the experts
the tokens were actually sent to (selection includes the correction bias), and no z-loss. A dense
model's losses (:func:`dense_lm_losses`) are the cross-entropy alone.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from moelab.nn.losses import load_balancing_loss, sequence_balance_loss, z_loss
from moelab.nn.routing import Routing
from moelab.run.loss import next_token_nll


class MoeLosses(NamedTuple):
    """Losses of one batch. ``total = ce + aux_coef * balance + z_coef * z``; ``load_LE`` counts top-k picks."""

    total: Tensor
    ce: Tensor
    balance: Tensor
    z: Tensor
    load_LE: Tensor


def _routing(logits_TE: Tensor, top_k: int) -> Routing:
    """The top-k routing a Qwen3-MoE router makes from its logits (softmax, top-k, renormalise)."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, ids_TK = probs_TE.topk(top_k, dim=-1)
    return Routing(logits_TE=logits_TE.float(), ids_TK=ids_TK, weights_TK=weights_TK / weights_TK.sum(-1, keepdim=True),
                   aux={"probs_TE": probs_TE})


def balance_loss(logits_TE: Tensor, top_k: int) -> Tensor:
    """Switch load-balancing loss of one layer (1.0 when balanced). Returns a float32 scalar."""
    return load_balancing_loss(_routing(logits_TE, top_k))


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss of one layer. Returns a float32 scalar."""
    return z_loss(_routing(logits_TE, 1))


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
    ce = next_token_nll(logits_BSV, input_ids_BS)
    balance = torch.stack([balance_loss(lg, top_k) for lg in router_logits]).mean()
    z = torch.stack([router_z_loss(lg) for lg in router_logits]).mean()
    with torch.no_grad():
        load_LE = torch.stack([_routing(lg, top_k).tokens_per_expert().float() for lg in router_logits])
    return MoeLosses(ce + aux_coef * balance + z_coef * z, ce, balance, z, load_LE)


def sigmoid_lm_losses(
    logits_BSV: Tensor,
    input_ids_BS: Tensor,
    router_logits: tuple[Tensor, ...],
    routings: list[Routing],
    aux_coef: float,
) -> MoeLosses:
    """Cross-entropy plus DeepSeek-V3's sequence-wise balance loss for sigmoid-scored MoE layers.

    Args:
        router_logits: one raw ``[T, E]`` logit tensor per MoE layer, with its autograd graph.
        routings: the same layers' routing as the experts received it (``RoutingRecorder``), whose
            ids decide the counts ``f``; ``P`` comes from ``sigmoid(logits)`` normalised per token.
    """
    if len(router_logits) != len(routings):
        raise ValueError(f"sigmoid_lm_losses: {len(router_logits)} router logit tensors for {len(routings)} routings")
    ce = next_token_nll(logits_BSV, input_ids_BS)
    per_layer = []
    for logits_TE, r in zip(router_logits, routings, strict=True):
        scores_TE = torch.sigmoid(logits_TE.float())
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        routing = Routing(logits_TE=logits_TE.float(), ids_TK=r.ids_TK, weights_TK=r.weights_TK, aux={"probs_TE": probs_TE})
        per_layer.append(sequence_balance_loss(routing, input_ids_BS.shape[0]))
    balance = torch.stack(per_layer).mean()
    zero = torch.zeros((), device=ce.device)
    with torch.no_grad():
        load_LE = torch.stack([r.tokens_per_expert().float() for r in routings])
    return MoeLosses(ce + aux_coef * balance, ce, balance, zero, load_LE)


def dense_lm_losses(logits_BSV: Tensor, input_ids_BS: Tensor) -> MoeLosses:
    """The cross-entropy of a dense model, in the same record (no router: zero losses, ``load_LE`` ``[0, 1]``)."""
    ce = next_token_nll(logits_BSV, input_ids_BS)
    zero = torch.zeros((), device=ce.device)
    return MoeLosses(ce, ce, zero, zero, torch.zeros(0, 1))
