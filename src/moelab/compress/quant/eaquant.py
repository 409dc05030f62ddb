"""EAQuant: expert-aware post-training quantisation of MoE models.

Fu, Zhao, Ding, Yu, Li, Tang, Wang, "EAQuant: Enhancing Post-Training Quantization for MoE Models via
Expert-Aware Optimization", 2025, arXiv 2506.13329 (code: github.com/darren-fzq1/EAQuant).

Shape legend: T tokens, H hidden, E experts, I expert width, S shared-expert width, N calibration tokens.

1. **Expert-aware smoothing aggregation.** The router and every expert's gate/up projections read the
   same normed input ``x = norm(h)``, so a SmoothQuant scale (Xiao et al. 2023) must be *one* vector
   for all of them. Per linear group ``g`` (the router; each expert's gate+up; the shared expert's
   gate+up and its sigmoid gate), with ``X_g`` the rows it reads (the router and shared expert: all
   tokens; expert e: the tokens routed to it, all tokens where none were)::

       s_g[j] = max_t |X_g[t, j]|^alpha / max_o |W_g[o, j]|^(1 - alpha)

   aggregated channel-wise as the paper's default (its code's ``fc1_scale_merge max``)::

       'max'    s[j] = max_g s_g[j]
       'joint'  s[j] = max_t |X[t, j]|^alpha / max_g max_o |W_g[o, j]|^(1 - alpha)   (one SmoothQuant
                scale over all tokens and every weight read from x)

   then folded exactly: ``norm.weight /= s`` (and its bias), router, every expert's gate/up and the
   shared expert's input columns ``*= s``. Since ``(W diag(s)) (x / s) = W x`` this is the identity
   in exact arithmetic (tested in float64); after it the experts' inputs have flatter channels and
   the quantised weights absorb the outliers. (The paper's down-projection outlier scaling, IQR +
   Otsu, is not done here.)
2. **Calibration balance**: each expert's GPTQ Hessian from at most ``cap`` routed tokens,
   ``cap = ceil(cap_ratio * N K / E)`` (the code's ``expert_token_num_ratio``, 2.0 in its run
   script), experts below ``min_tokens`` recalibrated on all tokens: :class:`CalibPolicy`.
3. **Router-logit distribution alignment**: with every expert quantised (and activations
   fake-quantised, :mod:`.act`), minimise on the calibration tokens, layer by layer in order::

       KL( p_fp(t) || p_q(t) ),  p_fp = dist(W_fp x_fp(t) + b),  p_q = dist(W x_q(t) + b)

   over the router weight ``W`` (initialised at the smoothed ``W_fp``; Adam, ``align_steps``
   full-batch steps; the best weight seen is kept, never one worse than the start; a router whose
   KL is below ``ALIGNED_KL`` is left untouched), where
   ``x_fp`` / ``x_q`` are the block inputs of the full-precision / quantised model and ``dist`` the
   family's scores as a distribution (softmax; sigmoid scores normalised to sum 1). The paper
   quantises its router (W8) and picks the router weight's clipping by this KL (its
   ``per_channel_kl_top0``); moelab keeps routers in full precision (issue 16), so the KL is
   minimised over the full-precision router itself, which also undoes the routing drift that
   quantised experts of earlier layers cause. The router stays in full precision in every output.
   The first MoE block is skipped: no quantised expert precedes it, so its routing is unchanged.

Weights are then quantised by GPTQ (or RTN) on the smoothed model (:mod:`.quantize`), as the paper
applies its transformations before its weight quantiser.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.compress.calib import Calibration, routing_pass
from moelab.compress.quant.act import ActQuantConfig, install_act_quant
from moelab.compress.quant.calibrate import BlockHessians, CalibPolicy, collect_hessians
from moelab.compress.quant.quantize import (
    QuantResult,
    QuantSpec,
    dequantized_model,
    quantize_experts,
)
from moelab.errors import MoelabError, UnsupportedModelError
from moelab.models import ModelView, MoEBlockView, RoutingEvent, open_model

AGGREGATIONS = ("max", "joint")
ALIGNED_KL = 1e-9  # nats per token: a router this close to full precision is not tuned


@dataclass(frozen=True)
class EAQuantConfig:
    """EAQuant's settings (see the module docstring). ``alpha``: SmoothQuant migration strength (0.6
    in the paper's run script); ``cap_ratio``: calibration balance (None: no cap); ``align``: router
    alignment with ``align_steps`` Adam steps at ``align_lr``; ``act``: activation fake-quantisation
    used during alignment (and reported with the result); ``weights``: 'gptq' or 'rtn'."""

    alpha: float = 0.6
    aggregation: str = "max"
    cap_ratio: float | None = 2.0
    align: bool = True
    align_steps: int = 100
    align_lr: float = 1e-3
    act: ActQuantConfig | None = None
    weights: str = "gptq"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise MoelabError(f"alpha: expected a migration strength in [0, 1], got {self.alpha}")
        if self.aggregation not in AGGREGATIONS:
            raise MoelabError(f"aggregation: {self.aggregation!r}; expected one of {AGGREGATIONS}")
        if self.cap_ratio is not None and self.cap_ratio <= 0:
            raise MoelabError(f"cap_ratio: expected > 0 (times the mean routed tokens per expert), got {self.cap_ratio}")
        if self.align_steps < 0 or self.align_lr <= 0:
            raise MoelabError(f"align_steps / align_lr: expected >= 0 steps and a positive rate, got "
                              f"{self.align_steps} / {self.align_lr}")
        if self.weights not in ("gptq", "rtn"):
            raise MoelabError(f"weights: {self.weights!r}; expected 'gptq' or 'rtn'")


@dataclass(eq=False)
class SmoothingStats:
    """One block over the calibration tokens: ``amax_H`` max |x| over all tokens, ``amax_EH`` over
    each expert's routed tokens, ``routed_E`` routed rows (all float64 / int64), and ``target`` the
    full-precision routing distributions ``[N, E]`` (float32, float64 for a float64 model; in
    calibration order) for the alignment."""

    amax_H: Tensor
    amax_EH: Tensor
    routed_E: Tensor
    target: list[Tensor] = field(default_factory=list)


@dataclass(eq=False)
class Smoothed:
    """A smoothed copy of the model (``view``), its scales ``layer -> s_H`` and the statistics."""

    view: ModelView
    scales: dict[int, Tensor]
    stats: dict[int, SmoothingStats]


@dataclass(eq=False)
class EAQuantRun:
    """What :func:`eaquant` made: ``model`` the smoothed, dequantised, router-aligned model (a stock
    transformers model), ``result`` its quantised experts, ``alignment`` ``layer -> {kl_before,
    kl_after}`` (nats per calibration token; every MoE block but the first)."""

    model: nn.Module
    result: QuantResult
    alignment: dict[int, dict[str, float]]
    smoothing: dict[str, Any]


def input_norm(view: ModelView, block: MoEBlockView) -> nn.Module:
    """The norm whose output is ``block``'s input (the family adapter's ``input_norm``)."""
    from moelab.models.registry import adapter_named

    name = adapter_named(block.family).input_norm
    parent = block.path.rsplit(".", 1)[0]
    try:
        norm = view.model.get_submodule(f"{parent}.{name}") if name else None
    except AttributeError:
        norm = None
    weight = getattr(norm, "weight", None)
    if norm is None or not isinstance(weight, Tensor) or tuple(weight.shape) != (block.hidden_size,):
        raise UnsupportedModelError(f"{block.path} ({block.family}): EAQuant smoothing folds its scales into the "
                                    f"norm before the MoE block; this family has none with a [{block.hidden_size}] "
                                    f"weight (input_norm {name!r})")
    return norm


def routing_log_dist(block: MoEBlockView, logits_TE: Tensor) -> Tensor:
    """``log dist(logits)`` ``[T, E]``: log-softmax, or for sigmoid scores ``log(sigmoid / sum sigmoid)``."""
    if block.scoring == "sigmoid":
        ls = F.logsigmoid(logits_TE)
        return ls - torch.logsumexp(ls, dim=-1, keepdim=True)
    return torch.log_softmax(logits_TE, dim=-1)


def router_logits(block: MoEBlockView, x_TH: Tensor, weight_EH: Tensor | None = None) -> Tensor:
    """``x W^T + b`` in float32 (float64 for float64 inputs), as the router computes them."""
    work = torch.float64 if x_TH.dtype == torch.float64 else torch.float32
    w = block.router_weight if weight_EH is None else weight_EH
    out = x_TH.to(work) @ w.to(work).T
    return out if block.router_bias is None else out + block.router_bias.to(work)


def _check_norm_feeds_block(norm_out: dict, ev: RoutingEvent) -> None:
    got = norm_out.pop(ev.block.layer, None)
    if got is None or got.shape != ev.hidden_TH.shape or not torch.equal(got, ev.hidden_TH):
        raise UnsupportedModelError(f"{ev.block.path} ({ev.block.family}): the block's input is not the output of "
                                    f"its input_norm, so the smoothing scales cannot be folded into that norm")


def collect_smoothing_stats(view: ModelView, calib: Calibration) -> dict[int, SmoothingStats]:
    """One routing pass: per-channel maxima of each block's input (all tokens, per expert), the
    full-precision routing distributions, and a check that each block reads its ``input_norm``'s output."""
    out = {b.layer: SmoothingStats(torch.zeros(b.hidden_size, dtype=torch.float64),
                                   torch.zeros(b.num_experts, b.hidden_size, dtype=torch.float64),
                                   torch.zeros(b.num_experts, dtype=torch.int64)) for b in view.blocks}
    norm_out: dict[int, Tensor] = {}
    hooks = []
    for b in view.blocks:
        def keep(_m, _args, y, layer=b.layer, H=b.hidden_size):
            norm_out[layer] = (y[0] if isinstance(y, tuple) else y).detach().reshape(-1, H)
        hooks.append(input_norm(view, b).register_forward_hook(keep))

    def on_event(ev: RoutingEvent) -> None:
        _check_norm_feeds_block(norm_out, ev)
        st, b = out[ev.block.layer], ev.block
        xa_TH = ev.hidden_TH.abs().to("cpu", torch.float64)
        st.amax_H = torch.maximum(st.amax_H, xa_TH.amax(0))
        ids_TK = ev.ids_TK.cpu()
        real_TK = (ids_TK >= 0) & (ids_TK < b.num_experts)
        if ev.mask_TK is not None:
            real_TK &= ev.mask_TK.cpu().bool()
        for k in range(ids_TK.shape[1]):
            tok = torch.where(real_TK[:, k])[0]
            idx = ids_TK[tok, k].unsqueeze(-1).expand(-1, xa_TH.shape[1])
            st.amax_EH.scatter_reduce_(0, idx, xa_TH[tok], reduce="amax")
            st.routed_E += torch.bincount(ids_TK[tok, k], minlength=b.num_experts)
        st.target.append(routing_log_dist(b, router_logits(b, ev.hidden_TH)).exp().cpu())

    try:
        routing_pass(view, calib, on_event)
    finally:
        for h in hooks:
            h.remove()
    return out


def _colmax(*ws: Tensor | None) -> Tensor:
    """``max_o |W[o, j]|`` over every row of every weight given (``[..., H]``), float64."""
    return torch.stack([w.detach().abs().to(torch.float64).reshape(-1, w.shape[-1]).amax(0)
                        for w in ws if w is not None]).amax(0).cpu()


def smoothing_scales(block: MoEBlockView, stats: SmoothingStats, alpha: float, aggregation: str = "max") -> Tensor:
    """The block's smoothing vector ``s_H`` (float64; see the module docstring)."""
    def sq(amax, wmax):
        return (amax.clamp(min=1e-5) ** alpha / wmax.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)

    sh = block.shared
    sh_w = () if sh is None else (sh.gate, sh.up, sh.gate_weight)
    if aggregation == "joint":
        return sq(stats.amax_H, _colmax(block.router_weight, block.gate, block.up, *sh_w))
    amax_EH = torch.where((stats.routed_E > 0).unsqueeze(-1), stats.amax_EH, stats.amax_H)
    wmax_EH = torch.stack([w.detach().abs().amax(1).to("cpu", torch.float64)
                           for w in (block.gate, block.up) if w is not None]).amax(0)
    s = torch.maximum(sq(stats.amax_H, _colmax(block.router_weight)), sq(amax_EH, wmax_EH).amax(0))
    if sh is not None:
        s = torch.maximum(s, sq(stats.amax_H, _colmax(*sh_w)))
    return s


@torch.no_grad()
def fold_smoothing(view: ModelView, scales: dict[int, Tensor]) -> None:
    """Fold ``s`` into each block in place: its input norm ``/ s``; router, experts' gate/up and the
    shared expert's input columns ``* s``. Leaves every output unchanged (up to rounding)."""
    for b in view.blocks:
        s_H = scales[b.layer]
        norm = input_norm(view, b)
        for t in (norm.weight, getattr(norm, "bias", None)):
            if isinstance(t, Tensor):
                t.div_(s_H.to(t.device, t.dtype))
        sh = b.shared
        for t in (b.router_weight, b.gate, b.up, *(() if sh is None else (sh.gate, sh.up, sh.gate_weight))):
            if t is not None:
                t.mul_(s_H.to(t.device, t.dtype))


def smooth(view: ModelView, calib: Calibration, cfg: EAQuantConfig) -> Smoothed:
    """A copy of ``view``'s model with the smoothing scales folded in (``view`` is not changed)."""
    stats = collect_smoothing_stats(view, calib)
    scales = {b.layer: smoothing_scales(b, stats[b.layer], cfg.alpha, cfg.aggregation) for b in view.blocks}
    sview = open_model(copy.deepcopy(view.model))
    fold_smoothing(sview, scales)
    return Smoothed(sview, scales, stats)


def balanced_policy(policy: CalibPolicy, view: ModelView, calib: Calibration, cap_ratio: float | None) -> CalibPolicy:
    """``policy`` with EAQuant's cap ``ceil(cap_ratio * N K / E)`` (the largest over blocks), unless
    it already has a cap or ``cap_ratio`` is None."""
    if policy.cap is not None or cap_ratio is None:
        return policy
    cap = max(math.ceil(cap_ratio * calib.num_tokens * b.top_k / b.num_experts) for b in view.blocks)
    return replace(policy, cap=max(cap, policy.min_tokens))


def _block_inputs(view: ModelView, block: MoEBlockView, calib: Calibration) -> Tensor:
    """``[N, H]``: what ``block`` reads over the calibration batches (in calibration order)."""
    from moelab.run import run_batches

    rows: list[Tensor] = []
    run_batches(view.model, calib.batches, handles=[block.register_routing_hook(lambda ev: rows.append(ev.hidden_TH))])
    return torch.cat(rows)


def _kl(block: MoEBlockView, target_NE: Tensor, x_NH: Tensor, w_EH: Tensor) -> Tensor:
    logq = routing_log_dist(block, router_logits(block, x_NH, w_EH))
    p = target_NE.to(logq.dtype)
    return (torch.special.xlogy(p, p) - p * logq).sum(-1).mean()


def align_router(block: MoEBlockView, target_NE: Tensor, x_NH: Tensor, steps: int, lr: float) -> dict[str, float]:
    """Minimise ``KL(target || dist(W x + b))`` over the router weight ``W`` (in place; see the module
    docstring). Returns the KL before and after; a router already aligned (KL 0) is left untouched."""
    w0 = block.router_weight
    target_NE = target_NE.to(x_NH.device)
    with torch.no_grad():
        before = float(_kl(block, target_NE, x_NH, w0))
    if before <= ALIGNED_KL or steps == 0:
        return {"kl_before": max(before, 0.0), "kl_after": max(before, 0.0)}
    w = w0.detach().to(torch.float64 if x_NH.dtype == torch.float64 else torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best, best_w = before, None
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = _kl(block, target_NE, x_NH, w)
            if float(loss.detach()) < best:
                best, best_w = float(loss.detach()), w.detach().clone()
            loss.backward()
            opt.step()
    with torch.no_grad():
        last = float(_kl(block, target_NE, x_NH, w))
        if last < best:
            best, best_w = last, w.detach().clone()
        if best_w is not None:
            w0.copy_(best_w.to(w0.dtype))
    return {"kl_before": max(before, 0.0), "kl_after": max(best, 0.0)}  # >= 0 but for rounding


def align_routers(view: ModelView, stats: dict[int, SmoothingStats], calib: Calibration, steps: int,
                  lr: float, layers: list[int] | None = None) -> dict[int, dict[str, float]]:
    """Align the routers of the (quantised) ``view`` (``layers``, default all) to the full-precision
    routing in ``stats``, block by block in layer order, each on the inputs the already aligned earlier
    blocks produce (one calibration pass per block)."""
    out = {}
    for b in sorted(view.blocks, key=lambda b: b.layer):
        if layers is not None and b.layer not in layers:
            continue
        x_NH = _block_inputs(view, b, calib)
        out[b.layer] = align_router(b, torch.cat(stats[b.layer].target), x_NH, steps, lr)
    return out


def eaquant(view: ModelView, calib: Calibration, spec: QuantSpec | None = None, cfg: EAQuantConfig | None = None,
            *, smoothed: Smoothed | None = None, hessians: dict[int, BlockHessians] | None = None,
            progress: bool = False) -> EAQuantRun:
    """EAQuant on ``view`` (not changed): smooth, calibrate with balance, quantise the experts with
    ``cfg.weights`` at ``spec.config``, align the routers (with ``cfg.act`` fake-quantised activations).

    ``smoothed`` / ``hessians`` reuse :func:`smooth`'s model and :func:`collect_hessians` on it (with
    :func:`balanced_policy`) across bit-widths.
    """
    spec = spec or QuantSpec()
    cfg = cfg or EAQuantConfig()
    smoothed = smoothed or smooth(view, calib, cfg)
    policy = balanced_policy(spec.policy, smoothed.view, calib, cfg.cap_ratio)
    wspec = QuantSpec(cfg.weights, spec.config, spec.percdamp, policy)
    if hessians is None:
        hessians = collect_hessians(smoothed.view, calib, policy, progress=progress)
    result = quantize_experts(smoothed.view, wspec, hessians=hessians, progress=progress)
    model = dequantized_model(smoothed.view, result)
    qview = open_model(model)
    alignment: dict[int, dict[str, float]] = {}
    if cfg.align:
        handle = install_act_quant(qview, cfg.act) if cfg.act is not None else None
        try:
            # the first MoE block reads what no quantised expert has touched: nothing to align there
            later = sorted(b.layer for b in qview.blocks)[1:]
            alignment = align_routers(qview, smoothed.stats, calib, cfg.align_steps, cfg.align_lr, later)
        finally:
            if handle is not None:
                handle.remove()
    s_all = torch.cat([s for s in smoothed.scales.values()])
    smoothing = {"alpha": cfg.alpha, "aggregation": cfg.aggregation, "scale_min": float(s_all.min()),
                 "scale_max": float(s_all.max())}
    result.extra = {"method": "eaquant", "weights": cfg.weights, "cap": policy.cap, "smoothing": smoothing,
                    "act_bits": None if cfg.act is None else cfg.act.bits,
                    "alignment": {str(k): v for k, v in alignment.items()}}
    return EAQuantRun(model, result, alignment, smoothing)


__all__ = ["AGGREGATIONS", "ALIGNED_KL", "EAQuantConfig", "EAQuantRun", "Smoothed", "SmoothingStats", "align_router",
           "align_routers", "balanced_policy", "collect_smoothing_stats", "eaquant", "fold_smoothing",
           "input_norm", "router_logits", "routing_log_dist", "smooth", "smoothing_scales"]
