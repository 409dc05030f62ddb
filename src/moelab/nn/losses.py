"""Router losses, computed from a `Routing` record and returned (no hidden state).

Shape legend: T tokens, E experts, K slots per token, B sequences, S tokens per sequence (T = B*S).

- Switch load-balancing loss (Fedus et al. 2021, arXiv:2101.03961, eq. 4):
      L_bal = E * sum_e f_e * P_e,  f_e = (#real slots routed to e) / (T*K),  P_e = mean_t p_{t,e}
  Equals 1 at perfect balance. (transformers' ``load_balancing_loss_func`` reports K times this.)
- Router z-loss (ST-MoE, Zoph et al. 2022, arXiv:2202.08906, eq. 5):
      L_z = mean_t (logsumexp_e z_{t,e})^2
- Sequence-wise balance loss (DeepSeek-V3, arXiv:2412.19437, eqs. 17-20), per sequence then averaged:
      f_e = E / (K*S) * sum_t 1[e in S_t],  P_e = mean_t s'_{t,e},  s' = s / sum_j s_j,  L = sum_e f_e P_e

``p`` / ``s'`` come from ``routing.aux['probs_TE']`` (each router stores its normalised scores
there) or, failing that, a float32 softmax of the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.nn.routing import Routing, RoutingError


def router_probs(routing: Routing) -> Tensor:
    """[T,E] normalised router scores used by the balance losses."""
    probs = routing.aux.get("probs_TE")
    return probs if probs is not None else torch.softmax(routing.logits_TE.float(), dim=-1)


def _slot_counts(routing: Routing, token_mask_T: Tensor | None) -> tuple[Tensor, Tensor]:
    """[T,E] float count of real slots per (token, expert), and the number of slots counted."""
    T, K = routing.ids_TK.shape
    E = routing.num_experts
    keep_TK = routing.real_mask()
    if token_mask_T is not None:
        keep_TK = keep_TK & token_mask_T.bool().unsqueeze(-1)
    ids_TK = torch.where(keep_TK, routing.ids_TK, E)  # masked slots land in a discarded column
    onehot_TE = torch.zeros(T, E + 1, device=ids_TK.device).scatter_add_(
        1, ids_TK, torch.ones_like(ids_TK, dtype=torch.float32)
    )[:, :E]
    return onehot_TE, keep_TK


def load_balancing_loss(routing: Routing, token_mask_T: Tensor | None = None) -> Tensor:
    """Switch load-balancing loss (scalar, float32); ``token_mask_T`` excludes padding tokens."""
    counts_TE, _ = _slot_counts(routing, token_mask_T)
    probs_TE = router_probs(routing)
    T, K = routing.ids_TK.shape
    if token_mask_T is None:
        n_tok = torch.tensor(float(T), device=probs_TE.device)
        p_E = probs_TE.mean(0)
    else:
        m = token_mask_T.float().unsqueeze(-1)
        n_tok = m.sum().clamp_min(1.0)
        p_E = (probs_TE * m).sum(0) / n_tok
    f_E = counts_TE.sum(0) / (n_tok * K)
    return routing.num_experts * (f_E * p_E).sum()


def z_loss(routing: Routing, token_mask_T: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss (scalar, float32)."""
    lse_T = torch.logsumexp(routing.logits_TE.float(), dim=-1) ** 2
    if token_mask_T is None:
        return lse_T.mean()
    m = token_mask_T.float()
    return (lse_T * m).sum() / m.sum().clamp_min(1.0)


def sequence_balance_loss(routing: Routing, num_sequences: int) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss (without the alpha factor), mean over B sequences."""
    T, K = routing.ids_TK.shape
    if num_sequences < 1 or T % num_sequences:
        raise RoutingError(
            f"sequence_balance_loss: num_sequences={num_sequences} must divide T={T}"
        )
    E, S = routing.num_experts, T // num_sequences
    counts_TE, _ = _slot_counts(routing, None)
    f_BE = counts_TE.view(num_sequences, S, E).sum(1) * (E / (K * S))
    p_BE = router_probs(routing).view(num_sequences, S, E).mean(1)
    return (f_BE * p_BE).sum(-1).mean()


def expert_load(routing: Routing) -> Tensor:
    """[E] fraction of real slots each expert received (sums to 1 if any slot is real)."""
    counts = routing.tokens_per_expert().float()
    return counts / counts.sum().clamp_min(1.0)
