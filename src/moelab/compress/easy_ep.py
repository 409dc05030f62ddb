"""EASY-EP: domain-specific expert pruning from a few in-domain demonstrations.

Dong et al. 2025, "Domain-Specific Pruning of Large Mixture-of-Experts Models with Few-shot
Demonstrations" (arXiv 2504.06792; official code RUCAIBox/EASYEP, ``pruning/model_new.py`` and
``pruning/expert_selection.py``). In MoE layer l, for token t routed to the expert set S_t:

    output-aware expert importance   c_{e,t} = g_{e,t} * ||E_e(x_t)||_2            for e in S_t
    token contribution               s_t     = 1 - cos(h_t, h~_t),   h~_t = h_t + sum_{e in S_t} g_{e,t} E_e(x_t)
    expert score                     I(E_e)  = sum_t c_{e,t} * s_t   (sum over every calibration token)

``g`` are the block's final combine weights (after renormalisation and scaling, as the official code
takes them from its gate), ``x_t`` the block input (after the pre-MoE norm), ``h_t`` the residual
stream entering the MoE sub-layer and ``h~_t`` the same stream after the *routed* experts only (shared
experts are excluded, as in the official code). Tokens whose representation the routed experts turn
more matter more. Like the official code, ``s_t`` is clamped at 0 (only rounding can make it negative).
Each layer keeps its ``N`` best experts (the paper's setting); ``budget='global'`` instead ranks
``I(E_e) / mean_e' I(E_e')`` across layers.

Nothing is random: the plan depends only on the model and the calibration (``spec.seed`` is recorded).

Mixed domains (``mix_domains=True``, the official ``expert_selection_mix_domain.py``): the scores of
each calibration label are normalised to sum 1 per layer and averaged over labels, so every domain
weighs the same whatever its token count. Pruning "for code" is ``calibration_batches(..., label="code")``.

Where moelab differs from the official pipeline (say so in results): the official scripts let the
model *generate* answers to the demonstrations (temperature 0.2) and score prompt + generated tokens
of the 25 longest samples; here the scores cover exactly the calibration tokens given (teacher-forced).
For ``combine='input'`` blocks (Llama4, which scales the expert input) ``c_{e,t} = ||E_e(g_{e,t} x_t)||``,
the norm of what the expert adds. Where no norm module feeds the block (post-norm layers such as
FlexOlmo) the block input itself is the residual stream, and ``h_t = x_t``; ``meta['h_source']``
records which was used per layer. Granite's ``residual_multiplier`` m enters as ``h~ = h + m * r``.

Shape legend: T tokens of one batch, H hidden, E experts, K top-k, L labels (domains) of the calibration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.compress.calib import Calibration, routing_pass
from moelab.compress.plan import LayerPlan, Plan
from moelab.compress.spec import CompressSpec, select_experts
from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView, RoutingEvent, expert_forward

METHOD = "easy-ep"


# ---------------------------------------------------------------------------------------------------
# per-token scores: the fast (per-expert batched) path and the slow reference


def token_scores(block: MoEBlockView, x_TH: Tensor, h_TH: Tensor, ids_TK: Tensor, weights_TK: Tensor,
                 residual_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """EASY-EP's two factors for one batch, in float64.

    ``x_TH`` block input, ``h_TH`` residual stream before the block, ``ids_TK``/``weights_TK`` the
    routing. Returns ``c_TK`` (importance ``g * ||E(x)||`` of every routed slot) and ``s_T`` (token
    contribution ``max(0, 1 - cos(h, h + m * r))``, ``r`` the routed experts' weighted sum).
    """
    x_TH, h_TH = x_TH.to(torch.float64), h_TH.to(torch.float64)
    w_TK = weights_TK.to(torch.float64)
    c_TK = torch.zeros_like(w_TK)
    r_TH = torch.zeros_like(x_TH)
    for e in ids_TK.unique().tolist():
        tok_N, slot_N = torch.where(ids_TK == e)
        w_N = w_TK[tok_N, slot_N]
        if block.combine == "input":  # the gate scales the input: the expert adds E(g x)
            y_NH = expert_forward(block, e, x_TH[tok_N] * w_N[:, None])
            c_TK[tok_N, slot_N] = y_NH.norm(dim=-1)
        else:
            y_NH = expert_forward(block, e, x_TH[tok_N])
            c_TK[tok_N, slot_N] = w_N * y_NH.norm(dim=-1)
            y_NH = y_NH * w_N[:, None]
        r_TH.index_add_(0, tok_N, y_NH)
    cos_T = F.cosine_similarity(h_TH, h_TH + residual_scale * r_TH, dim=-1)
    return c_TK, (1.0 - cos_T).clamp(min=0.0)


def reference_token_scores(block: MoEBlockView, x_TH: Tensor, h_TH: Tensor, ids_TK: Tensor,
                           weights_TK: Tensor, residual_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Slow obvious :func:`token_scores`: a loop over tokens and their routed slots, one token at a time."""
    T, K = ids_TK.shape
    c_TK = torch.zeros(T, K, dtype=torch.float64)
    s_T = torch.zeros(T, dtype=torch.float64)
    for t in range(T):
        x_1H = x_TH[t:t + 1].to(torch.float64)
        h_H = h_TH[t].to(torch.float64)
        r_H = torch.zeros_like(h_H)
        for k in range(K):
            e, g = int(ids_TK[t, k]), float(weights_TK[t, k])
            if block.combine == "input":
                y_H = expert_forward(block, e, x_1H * g)[0]
                c_TK[t, k] = torch.linalg.vector_norm(y_H)
                r_H = r_H + y_H
            else:
                y_H = expert_forward(block, e, x_1H)[0]
                c_TK[t, k] = g * torch.linalg.vector_norm(y_H)
                r_H = r_H + g * y_H
        after_H = h_H + residual_scale * r_H
        cos = torch.dot(h_H, after_H) / (torch.linalg.vector_norm(h_H) * torch.linalg.vector_norm(after_H))
        s_T[t] = max(0.0, 1.0 - float(cos))
    return c_TK, s_T


# ---------------------------------------------------------------------------------------------------
# the residual stream entering each MoE block


class _ResidualTap:
    """Finds ``h_t``, the residual stream the block's pre-norm turns into the block input.

    Every norm module of the block's decoder layer is watched; at a routing event the norm whose output
    *is* the block input (same values) gives its own input as ``h``. No such norm (post-norm layers):
    the block input is the residual stream itself.
    """

    def __init__(self, view: ModelView) -> None:
        self.last: dict[int, dict[str, tuple[Tensor, Tensor]]] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for block in view.blocks:
            parent = block.path.rsplit(".", 1)[0] if "." in block.path else ""
            layer_module = view.model.get_submodule(parent)
            seen = self.last.setdefault(block.layer, {})
            for name, mod in layer_module.named_modules():
                if "norm" in type(mod).__name__.lower() and not _inside(name, block.path, parent):
                    self.handles.append(mod.register_forward_hook(_recorder(seen, name, block.hidden_size)))

    def residual(self, event: RoutingEvent) -> tuple[Tensor, str]:
        x_TH = event.hidden_TH
        seen = self.last.get(event.block.layer, {})
        found = None
        for inp, out in seen.values():
            if out.numel() == x_TH.numel() and out.dtype == x_TH.dtype \
                    and torch.equal(out.reshape(x_TH.shape), x_TH):
                found = inp.reshape(x_TH.shape)
                break
        seen.clear()  # hold at most one layer's norm activations at a time
        return (found, "residual") if found is not None else (x_TH, "block_input")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _inside(name: str, block_path: str, parent: str) -> bool:
    """True when submodule ``name`` of the decoder layer lies inside the MoE block itself."""
    full = f"{parent}.{name}" if parent else name
    return full == block_path or full.startswith(block_path + ".")


def _recorder(store: dict, name: str, hidden: int) -> Callable:
    def hook(module: nn.Module, args: tuple, out: object) -> None:
        if args and isinstance(args[0], Tensor) and isinstance(out, Tensor) and out.shape == args[0].shape \
                and out.shape[-1] == hidden:
            store[name] = (args[0].detach(), out.detach())
    return hook


# ---------------------------------------------------------------------------------------------------
# scores over a calibration set


@dataclass
class EasyEPScores:
    """``scores[layer]``: ``[L, E]`` float64 sums ``I(E_e)`` per calibration label; ``labels`` names
    the L rows; ``h_source[layer]``: 'residual' or 'block_input' (see the module docstring);
    ``token_contrib[layer]``: one ``[B, S]`` tensor of ``s_t`` per calibration batch, when asked for."""

    scores: dict[int, Tensor]
    labels: list[str | None]
    h_source: dict[int, str] = field(default_factory=dict)
    token_contrib: dict[int, list[Tensor]] = field(default_factory=dict)

    def combined(self, mix_domains: bool = False) -> dict[int, Tensor]:
        """``layer -> [E]``: pooled sums, or (``mix_domains``) the mean of per-label shares."""
        if not mix_domains:
            return {layer: s_LE.sum(0) for layer, s_LE in self.scores.items()}
        out = {}
        for layer, s_LE in self.scores.items():
            total_L1 = s_LE.sum(-1, keepdim=True)
            out[layer] = torch.where(total_L1 > 0, s_LE / total_L1.clamp(min=1e-300), 0.0).mean(0)
        return out


def easy_ep_scores(view: ModelView, calib: Calibration, keep_tokens: bool = False) -> EasyEPScores:
    """Run the model over ``calib`` and sum EASY-EP's ``c_{e,t} * s_t`` per layer, expert and label.

    ``keep_tokens`` also returns every token's contribution ``s_t`` (which tokens the routed experts
    turn most), ``B*S`` floats per layer and batch.
    """
    labels = sorted({lab for lab in calib.labels}, key=lambda x: (x is not None, x or ""))
    label_S = torch.tensor([labels.index(lab) for lab in calib.labels], dtype=torch.long)
    starts = [0]
    for b in calib.batches:
        starts.append(starts[-1] + int(b.shape[0]))
    residual_scale = float(getattr(view.config, "residual_multiplier", None) or 1.0)
    scores = {b.layer: torch.zeros(len(labels), b.num_experts, dtype=torch.float64) for b in view.blocks}
    calls = {b.layer: 0 for b in view.blocks}
    h_source: dict[int, str] = {}
    token_contrib: dict[int, list[Tensor]] = {b.layer: [] for b in view.blocks} if keep_tokens else {}
    tap = _ResidualTap(view)

    def on_event(ev: RoutingEvent) -> None:
        layer, k = ev.block.layer, calls[ev.block.layer]
        calls[layer] += 1
        if k >= len(calib.batches) or ev.ids_TK.shape[0] != calib.batches[k].numel():
            raise MoelabError(f"easy-ep: block of layer {layer} saw {ev.ids_TK.shape[0]} tokens at call {k + 1}; "
                              "expected one call per calibration batch of B*S tokens")
        h_TH, src = tap.residual(ev)
        h_source[layer] = src
        c_TK, s_T = token_scores(ev.block, ev.hidden_TH, h_TH, ev.ids_TK, ev.weights_TK,
                                 residual_scale if src == "residual" else 1.0)
        seq_len = int(calib.batches[k].shape[1])
        if keep_tokens:
            token_contrib[layer].append(s_T.cpu().reshape(calib.batches[k].shape))
        seq_T = starts[k] + torch.arange(c_TK.shape[0]) // seq_len
        lab_TK = label_S[seq_T].unsqueeze(-1).expand_as(ev.ids_TK)
        scores[layer].index_put_((lab_TK.reshape(-1), ev.ids_TK.cpu().reshape(-1)),
                                 (c_TK * s_T.unsqueeze(-1)).cpu().reshape(-1), accumulate=True)

    try:
        routing_pass(view, calib, on_event)
    finally:
        tap.remove()
    return EasyEPScores(scores, labels, h_source, token_contrib)


# ---------------------------------------------------------------------------------------------------
# budgets and the planner


def plan_easy_ep(view: ModelView, calib: Calibration | None, spec: CompressSpec, *,
                 mix_domains: bool = False) -> Plan:
    """EASY-EP pruning plan: keep the experts with the highest ``I(E_e)`` (see the module docstring).

    ``mix_domains``: average per-label normalised scores (one pruned model for several domains)
    instead of summing over all calibration tokens.
    """
    if calib is None:
        raise MoelabError(f"calib: {METHOD} needs calibration data (see moelab.compress.calibration_batches)")
    if not isinstance(mix_domains, bool):
        raise MoelabError(f"mix_domains: expected True or False, got {mix_domains!r}")
    t0 = time.perf_counter()
    result = easy_ep_scores(view, calib)
    scores = result.combined(mix_domains)
    keep = select_experts(scores, spec)
    layers = {layer: LayerPlan.keep(layer, kept) for layer, kept in keep.items()}
    meta = {"method": METHOD, "ratio": spec.ratio, "budget": spec.budget, "seed": spec.seed,
            "mix_domains": mix_domains, "calibration": calib.describe(),
            "scores": {str(layer): s_E.tolist() for layer, s_E in scores.items()},
            "h_source": {str(layer): src for layer, src in result.h_source.items()},
            "seconds": round(time.perf_counter() - t0, 3)}
    return Plan(METHOD, layers, meta=meta)
