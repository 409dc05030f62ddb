"""Learnable top-any pruning of a pretrained top-k model, after MC#'s Online Top-any Pruning
(Huang et al. 2025, "MC#: Mixture Compressor for Mixture-of-Experts Large Models").

MC#'s code is not public; this module implements the idea its abstract states: a small per-layer
gate, trained on calibration text with the model frozen, decides for every token which of its
top-k experts to keep ("top-any"). The gate's form is moelab's: for slot j of token t (expert e_j,
combine weight w_j, the token's largest weight w_(1)),

    g_tj = (h_t W_l^T + b_l)[e_j] + a_l * log(w_j / w_(1))          W_l [E, H], b_l [E], a_l scalar
    keep_tj = g_tj > 0,   the largest-weight slot always kept

(``h_t`` the block's input). Initialised as W = 0, b = 3, a = 0: every slot kept, the identity;
or (:meth:`TopAnyGates.start_from_thresholds`) as the ratio rule ``w_j / w_(1) > beta_l`` of MC-MoE's
online dynamic pruning, which training then refines per token and expert.
Training (:func:`train_top_any`) uses a straight-through Gumbel-sigmoid mask,

    m_tj = 1[s_tj > 1/2] + s_tj - sg(s_tj),   s_tj = sigmoid((g_tj + noise * (log u - log(1 - u))) / temperature)

on the combine weights (renormalised to the token's total), and minimises

    next-token NLL + penalty * ((A - target) / k)^2,   A = mean over layers and tokens of 1 + sum_{j>=2} c_tj

with ``c_tj = 1[g_tj > 0] + sigmoid(g_tj) - sg(sigmoid(g_tj))``: ``A`` is the hard active count the
gates give at inference (with the sigmoid's gradient), so training settles at the target as measured. Only the gates' parameters train. At inference the
hard mask drops slots through the routing seam (:func:`top_any`), kept weights rescaled to the
token's original total (``renormalize``).

Shape legend: T tokens, H hidden, E experts, K slots per token, B sequences, S tokens per sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView
from moelab.routing import Routing
from moelab.run import next_token_nll
from moelab.steer.edit_kit import EditHandle, edit_view, install_edit
from moelab.steer.edits import drop_slots, weak_slots


class TopAnyGates(nn.Module):
    """One keep-gate per MoE layer (``W [E, H]``, ``b [E]``, ``a``), float32. In training mode the
    installed edit uses the Gumbel straight-through mask and records the expected active counts."""

    def __init__(self, view: ModelView, init_bias: float = 3.0) -> None:
        super().__init__()
        self.layers = [b.layer for b in view.blocks]
        self.weight = nn.ParameterDict({str(b.layer): nn.Parameter(torch.zeros(b.num_experts, b.hidden_size))
                                        for b in view.blocks})
        self.bias = nn.ParameterDict({str(b.layer): nn.Parameter(torch.full((b.num_experts,), init_bias))
                                      for b in view.blocks})
        self.alpha = nn.ParameterDict({str(b.layer): nn.Parameter(torch.zeros(())) for b in view.blocks})
        self.temperature, self.noise = 0.5, 1.0
        self.expected: list[Tensor] = []  # expected active per token, one [T] per layer call (training)

    @torch.no_grad()
    def start_from_thresholds(self, beta: dict[int, float], sharpness: float = 4.0) -> TopAnyGates:
        """Start from a ratio threshold (e.g. MC-MoE ODP's calibrated ``beta``): ``a = sharpness``,
        ``b = -sharpness * log(beta_l)``, ``W = 0``, so slot j is kept iff ``w_j / w_(1) > beta_l``."""
        for layer in self.layers:
            key = str(layer)
            b = beta.get(layer, 0.0)
            self.weight[key].zero_()
            self.alpha[key].fill_(sharpness)
            self.bias[key].fill_(-sharpness * math.log(b) if b > 0 else 30.0)
        return self

    def scores(self, layer: int, hidden_TH: Tensor, routing: Routing) -> Tensor:
        """``[T, K]`` gate logits ``g`` of the routing's slots (in the gates' dtype)."""
        key = str(layer)
        w = self.weight[key]
        h_TH = hidden_TH.reshape(-1, hidden_TH.shape[-1]).to(w.device, w.dtype)
        g_TE = h_TH @ w.T + self.bias[key]
        E = g_TE.shape[-1]
        g_TK = g_TE.gather(1, routing.ids_TK.clamp(0, E - 1))
        w_TK = routing.weights_TK.detach().float().clamp(min=1e-30)
        first_T1 = w_TK.masked_fill(~routing.real_mask(), 0).max(-1, keepdim=True).values.clamp(min=1e-30)
        return g_TK + self.alpha[key] * (w_TK / first_T1).log()


def top_any_routing(gates: TopAnyGates, block: MoEBlockView, hidden_TH: Tensor, routing: Routing,
                    renormalize: bool = True) -> Routing:
    """One block's routing under the gate: hard mask in eval mode, straight-through mask in training."""
    g_TK = gates.scores(block.layer, hidden_TH, routing)
    _, candidates_TK = weak_slots(routing, 0.0)  # non-first real slots: the ones a gate may drop
    if not gates.training:
        return drop_slots(routing, routing.real_mask() & ~(candidates_TK & (g_TK <= 0)), renormalize)
    u_TK = torch.rand_like(g_TK).clamp(1e-6, 1 - 1e-6)
    soft_TK = torch.sigmoid((g_TK + gates.noise * (u_TK.log() - (-u_TK).log1p())) / gates.temperature)
    m_TK = (soft_TK > 0.5).float() + soft_TK - soft_TK.detach()
    m_TK = torch.where(candidates_TK, m_TK, routing.real_mask().float())
    hard_TK = (g_TK > 0).float() + torch.sigmoid(g_TK) - torch.sigmoid(g_TK).detach()  # straight-through count
    gates.expected.append(1 + (hard_TK * candidates_TK).sum(-1))
    w_TK = routing.weights_TK
    new_TK = w_TK * m_TK.to(w_TK.dtype)
    if renormalize:
        total_T1 = w_TK.masked_fill(~routing.real_mask(), 0).sum(-1, keepdim=True)
        new_TK = new_TK * (total_T1 / new_TK.sum(-1, keepdim=True).clamp(min=1e-30))
    return routing.replace(weights_TK=new_TK)


def top_any(model: ModelView | nn.Module, gates: TopAnyGates, renormalize: bool = True) -> EditHandle:
    """Install the gates' pruning on every layer they have (hard mask unless ``gates.training``)."""
    view = edit_view(model)

    def make(block: MoEBlockView, _):
        if str(block.layer) not in gates.weight or gates.weight[str(block.layer)].shape != block.router_weight.shape:
            raise MoelabError(f"top_any: layer {block.layer}: the gates were built for another model")
        return lambda block, hidden_TH, routing: (top_any_routing(gates, block, hidden_TH, routing, renormalize), {})

    return install_edit(view, "top_any", {layer: None for layer in gates.layers}, make)


@dataclass(frozen=True, kw_only=True)
class TopAnyConfig:
    """Training of the gates: ``target_active`` experts per token (in [1, top_k]), ``steps`` Adam
    steps at ``lr``, ``penalty`` on the squared relative gap to the target, Gumbel ``temperature``."""

    target_active: float
    steps: int = 60
    lr: float = 0.05
    penalty: float = 20.0
    temperature: float = 0.5
    noise: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("target_active", "lr", "penalty", "temperature", "noise"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise MoelabError(f"TopAnyConfig.{name}: expected a positive number, got {v!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise MoelabError(f"TopAnyConfig.steps: expected an integer >= 1, got {self.steps!r}")


def train_top_any(view: ModelView, batches: Sequence[Tensor], config: TopAnyConfig,
                  gates: TopAnyGates | None = None,
                  on_step: Callable[[int, float, float], None] | None = None) -> tuple[TopAnyGates, list[dict]]:
    """Train the keep-gates on ``batches`` (``[B, S]`` token ids) with the model frozen; returns the
    gates (in eval mode) and per step ``{"nll", "active"}`` (``on_step(step, nll, active)`` too)."""
    k = max(b.top_k for b in view.blocks)
    if not 1 <= config.target_active <= k:
        raise MoelabError(f"TopAnyConfig.target_active: expected a number in [1, top_k={k}], got {config.target_active}")
    if not batches:
        raise MoelabError("train_top_any: no calibration batches")
    model = view.model
    device = next(model.parameters()).device
    gates = (gates or TopAnyGates(view)).to(device)
    gates.temperature, gates.noise = config.temperature, config.noise
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    opt = torch.optim.Adam(gates.parameters(), lr=config.lr)
    torch.manual_seed(config.seed)
    history = []
    handle = top_any(view, gates)
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        gates.train()
        for step in range(config.steps):
            ids_BS = batches[step % len(batches)].to(device)
            gates.expected.clear()
            nll = next_token_nll(model(input_ids=ids_BS, use_cache=False).logits, ids_BS)
            active = torch.cat(gates.expected).mean()
            loss = nll + config.penalty * ((active - config.target_active) / k) ** 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"nll": float(nll.detach()), "active": float(active.detach())})
            if on_step is not None:
                on_step(step, history[-1]["nll"], history[-1]["active"])
    finally:
        handle.remove()
        gates.expected.clear()
        gates.eval()
        model.train(was_training)
        for p, flag in frozen:
            p.requires_grad_(flag)
    return gates, history


def top_any_reference(g_TK: Tensor, weights_TK: Tensor, real_TK: Tensor) -> Tensor:
    """Slow per-token reference of the hard keep mask (tests): every real slot with ``g > 0``, and
    the largest-weight slot."""
    keep = torch.zeros_like(real_TK)
    for t in range(g_TK.shape[0]):
        slots = [k for k in range(g_TK.shape[1]) if real_TK[t, k]]
        first = max(slots, key=lambda k: float(weights_TK[t, k]))
        for k in slots:
            keep[t, k] = k == first or float(g_TK[t, k].detach()) > 0
    return keep


__all__ = ["TopAnyConfig", "TopAnyGates", "top_any", "top_any_reference", "top_any_routing", "train_top_any"]
