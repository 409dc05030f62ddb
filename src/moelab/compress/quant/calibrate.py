"""Per-expert Hessians for GPTQ, with every expert calibrated.

Shape legend: T tokens of a batch, K top-k, E experts, H hidden, I expert width, N rows of one expert.

Each expert's inputs are the rows the model routes to it, read at the routing seam
(:meth:`moelab.models.MoEBlockView.register_routing_hook`: the block input and the final routing,
after every routing edit) and turned into what the expert receives by
:func:`moelab.models.reference.expert_input` (``x``, or ``w x`` where the weight scales the input).
Per expert, in float64::

    H_in[e]  = 2 sum_{t in T_e} x_t x_t^T               (gate and up projections, [H, H])
    H_mid[e] = 2 sum_{t in T_e} a_t a_t^T,  a_t = act(gate[e] x_t, up[e] x_t)     (down, [I, I])

with the full-precision weights (one pass over the full-precision model; GPTQ's sequential variant,
which feeds each layer the quantised layers' outputs, is not done here).

**Every expert calibrated** (llm-compressor issues #2826 / GPTQModel #2271: experts no token reached
keep no scales): an expert with fewer than ``min_tokens`` routed rows is *starved*; a second pass
recalibrates each starved expert on all calibration tokens (all tokens forced through it, only
routed outputs kept: the model's output is untouched, the forced rows only feed its Hessian).
``all_experts=True`` calibrates every expert on all tokens (calibrate-all-experts). ``cap`` keeps at
most ``cap`` routed rows per expert, EAQuant's calibration balance (Fu et al. 2025, arXiv 2506.13329): a few hot
experts no longer dominate, the starved ones are recalibrated as above. After the passes every
expert has rows; :func:`check_calibrated` proves it, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.compress.calib import Calibration, routing_pass
from moelab.compress.stats import gates
from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView, RoutingEvent
from moelab.models.reference import expert_activations, expert_input


@dataclass(frozen=True)
class CalibPolicy:
    """How experts are calibrated (see the module docstring)."""

    min_tokens: int = 16
    cap: int | None = None
    all_experts: bool = False

    def __post_init__(self) -> None:
        if self.min_tokens < 1:
            raise MoelabError(f"min_tokens: expected >= 1 calibration token per expert, got {self.min_tokens}")
        if self.cap is not None and self.cap < self.min_tokens:
            raise MoelabError(f"cap: {self.cap} routed tokens per expert is below min_tokens {self.min_tokens}")


@dataclass(eq=False)
class BlockHessians:
    """One MoE block: ``h_in [E, H, H]``, ``h_mid [E, I, I]`` (float64), routed rows per expert
    ``routed_E``, rows in each Hessian ``used_E``, ``source[e]``: 'routed' or 'all tokens', the routed
    tokens ``tokens`` and the sum of each expert's gates ``gate_sum_E`` (combine weight / routed scaling
    factor, as :func:`moelab.compress.stats.gates`) for importance scores."""

    layer: int
    h_in: Tensor
    h_mid: Tensor
    routed_E: Tensor
    used_E: Tensor
    source: list[str] = field(default_factory=list)
    gate_sum_E: Tensor | None = None
    tokens: int = 0

    def report(self) -> dict:
        return {"layer": self.layer, "routed_tokens": self.routed_E.tolist(), "used_tokens": self.used_E.tolist(),
                "source": self.source, "recalibrated": [e for e, s in enumerate(self.source) if s != "routed"]}


def _empty(block: MoEBlockView) -> BlockHessians:
    E, H, I = block.num_experts, block.hidden_size, block.intermediate_size  # noqa: E741

    def z(*shape, dtype=torch.float64):  # on the experts' device: the Hessians are summed where the rows are
        return torch.zeros(*shape, dtype=dtype, device=block.gate.device)

    return BlockHessians(block.layer, z(E, H, H), z(E, I, I), z(E, dtype=torch.int64), z(E, dtype=torch.int64),
                         ["routed"] * E, z(E))


def _add(hs: BlockHessians, block: MoEBlockView, e: int, x_NH: Tensor) -> None:
    """Add the rows ``x_NH`` (what expert ``e`` receives) to its two Hessians."""
    hs.h_in[e] += 2 * x_NH.T @ x_NH
    a_NI = expert_activations(block, e, x_NH)
    hs.h_mid[e] += 2 * a_NI.T @ a_NI
    hs.used_E[e] += x_NH.shape[0]


def _routed(hs: BlockHessians, ev: RoutingEvent, cap: int | None) -> None:
    block = ev.block
    x_TH = ev.hidden_TH.to(hs.h_in.device, torch.float64)
    real_TK = ev.ids_TK >= 0 if ev.mask_TK is None else ev.mask_TK.bool() & (ev.ids_TK >= 0)
    hs.tokens += int(ev.ids_TK.shape[0])
    g_TK = gates(block, ev.weights_TK)
    dev = hs.gate_sum_E.device
    hs.gate_sum_E.index_add_(0, ev.ids_TK[real_TK].to(dev), g_TK[real_TK].to(dev))
    for e in range(block.num_experts):
        tok, slot = torch.where((ev.ids_TK == e) & real_TK)
        hs.routed_E[e] += tok.numel()
        if cap is not None:
            room = max(0, cap - int(hs.used_E[e]))
            tok, slot = tok[:room], slot[:room]
        if tok.numel():
            x_NH = expert_input(block, x_TH[tok], ev.weights_TK[tok, slot].to(x_TH.device, torch.float64))
            _add(hs, block, e, x_NH)


def _forced(hs: BlockHessians, ev: RoutingEvent, experts: list[int]) -> None:
    """All tokens through ``experts`` (weight 1 where the weight scales the input)."""
    x_TH = ev.hidden_TH.to(hs.h_in.device, torch.float64)
    x_NH = expert_input(ev.block, x_TH, torch.ones(x_TH.shape[0], dtype=torch.float64, device=x_TH.device))
    for e in experts:
        _add(hs, ev.block, e, x_NH)


def _pass(view: ModelView, calib: Calibration, on_event, label: str, progress: bool) -> None:
    """One routing pass with a token progress bar."""
    from moelab.compress.pipeline import _count_tokens
    from moelab.trace.progress import token_progress

    with token_progress(calib.num_tokens, enabled=progress, label=label) as advance, \
            _count_tokens(view.model, advance):
        routing_pass(view, calib, on_event)


def collect_hessians(view: ModelView, calib: Calibration, policy: CalibPolicy | None = None, *,
                     progress: bool = False) -> dict[int, BlockHessians]:
    """``layer -> BlockHessians`` over the calibration batches, every expert calibrated (see the module
    docstring): one routed pass, and a second pass only when some expert is starved (or ``all_experts``)."""
    policy = policy or CalibPolicy()
    out = {b.layer: _empty(b) for b in view.blocks}
    _pass(view, calib, lambda ev: _routed(out[ev.block.layer], ev, policy.cap), "calibrating", progress)
    forced: dict[int, list[int]] = {}
    for layer, hs in out.items():
        E = hs.routed_E.shape[0]
        need = list(range(E)) if policy.all_experts else [e for e in range(E) if int(hs.used_E[e]) < policy.min_tokens]
        if need:
            forced[layer] = need
            for e in need:  # recalibrate from scratch on all tokens
                hs.h_in[e].zero_()
                hs.h_mid[e].zero_()
                hs.used_E[e] = 0
                hs.source[e] = "all tokens"
    if forced:
        def on_event(ev: RoutingEvent) -> None:
            if ev.block.layer in forced:
                _forced(out[ev.block.layer], ev, forced[ev.block.layer])

        n = sum(len(v) for v in forced.values())
        _pass(view, calib, on_event, f"recalibrating {n} experts on all tokens", progress)
    check_calibrated(out)
    return out


def check_calibrated(hessians: dict[int, BlockHessians]) -> None:
    """Raise MoelabError naming every expert without calibration rows or with a non-finite Hessian."""
    bad = []
    for layer, hs in hessians.items():
        finite = torch.isfinite(hs.h_in).flatten(1).all(1) & torch.isfinite(hs.h_mid).flatten(1).all(1)
        bad += [(layer, e) for e in range(hs.used_E.shape[0]) if int(hs.used_E[e]) == 0 or not bool(finite[e])]
    if bad:
        raise MoelabError(f"calibration: {len(bad)} experts (layer, expert) have no calibration rows or a "
                          f"non-finite Hessian: {bad[:10]}{' ...' if len(bad) > 10 else ''}")


def calibration_report(hessians: dict[int, BlockHessians]) -> dict:
    """Tokens per expert: routed counts, rows used, recalibrated experts, and the uncalibrated count (0)."""
    layers = [hs.report() for hs in hessians.values()]
    used = torch.cat([hs.used_E.cpu() for hs in hessians.values()])
    routed = torch.cat([hs.routed_E.cpu() for hs in hessians.values()])
    return {"layers": layers, "experts": int(used.numel()),
            "uncalibrated": int((used == 0).sum()),
            "recalibrated_on_all_tokens": sum(len(r["recalibrated"]) for r in layers),
            "routed_tokens_min": int(routed.min()), "routed_tokens_median": float(routed.double().median()),
            "routed_tokens_max": int(routed.max())}


__all__ = ["BlockHessians", "CalibPolicy", "calibration_report", "check_calibrated", "collect_hessians"]
