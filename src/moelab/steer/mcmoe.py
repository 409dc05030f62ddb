"""MC-MoE's online dynamic pruning (ODP): "Mixture Compressor for Mixture-of-Experts LLMs Gains More"
(Huang et al. 2024, arXiv:2410.06270), section on online dynamic pruning.

Per token t and MoE layer l, with the token's combine weights ``w_(1) >= w_(2) >= ...`` over its
top-k slots:

    drop slot j >= 2   when   w_(j) < beta_l * w_(1)     unless t is important:  I_t >= tau_l

(the paper prunes Mixtral's second expert, k = 2; with top-k > 2 every non-first slot is tested
against the first, as NAEE's dynamic skipping does: :func:`moelab.steer.skip_below` is the same rule
without the important-token exemption, and this module reuses its pieces, ``weak_slots`` and
``drop_slots``). Kept weights are rescaled to the token's original total (``renormalize``).

Token importance. The paper scores a token by the attention it receives times the L1 norm of its
hidden state and lets the top 2 % keep all their experts. Attention probabilities are not available
under SDPA (and a routing edit sees only the block's input), so moelab uses the L1 norm of the
block's input hidden state, ``I_t = ||h_t||_1``, alone. A per-batch top 2 % would make a token's
routing depend on its batch (and every token "important" when generating one token at a time), so
the cut is a per-layer threshold ``tau_l`` calibrated once: the ``1 - protect`` quantile of ``I`` on
the calibration tokens.

Calibration rule (ours; the paper's per-layer beta_l lie between 0.402 and 0.618): for a target of
``k_bar`` active experts per token, each layer drops ``D = k - k_bar`` slots per token on average.
Only the ``(1 - protect)`` unimportant tokens' ``k - 1`` non-first slots can drop, so
``beta_l = quantile_q(w_(j) / w_(1))`` over those calibration slots with
``q = D / ((1 - protect) (k - 1))``: the layer-specific ratio below which that share of slots falls.
``q = 1/2`` is the median ratio.

Shape legend: T tokens, H hidden, K slots per token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView, RoutingEvent
from moelab.routing import Routing
from moelab.steer.edit_kit import EditHandle, edit_view, install_edit
from moelab.steer.edits import drop_slots, weak_slots


@dataclass(frozen=True)
class ODPCalibration:
    """Per-layer thresholds of online dynamic pruning: ``beta[layer]`` and ``tau[layer]`` (importance
    cut; ``inf`` protects no token)."""

    beta: dict[int, float]
    tau: dict[int, float]

    def __post_init__(self) -> None:
        if set(self.beta) != set(self.tau):
            raise MoelabError(f"ODPCalibration: beta layers {sorted(self.beta)} != tau layers {sorted(self.tau)}")
        for layer, b in self.beta.items():
            if not 0 <= b <= 1:
                raise MoelabError(f"ODPCalibration: layer {layer}: beta must lie in [0, 1], got {b!r}")


def token_importance(hidden_TH: Tensor) -> Tensor:
    """``[T]`` float32 ``||h_t||_1`` of the block's input (the stand-in for attention x L1 norm)."""
    return hidden_TH.detach().float().abs().sum(-1)


def odp_routing(routing: Routing, hidden_TH: Tensor, beta: float, tau: float,
                renormalize: bool = True) -> tuple[Routing, dict[str, int]]:
    """One block's routing after ODP, and counts: ``candidates`` (non-first slots), ``skipped`` and
    ``protected`` (important tokens)."""
    weak_TK, candidates_TK = weak_slots(routing, beta)
    important_T = token_importance(hidden_TH.reshape(-1, hidden_TH.shape[-1])) >= tau
    weak_TK = weak_TK & ~important_T[:, None]
    extra = {"candidates": int(candidates_TK.sum()), "skipped": int(weak_TK.sum()),
             "protected": int(important_T.sum())}
    return drop_slots(routing, routing.real_mask() & ~weak_TK, renormalize), extra


def online_dynamic_pruning(model: ModelView | nn.Module, calibration: ODPCalibration | Mapping[int, float],
                           renormalize: bool = True) -> EditHandle:
    """Install ODP on the calibrated layers (or ``{layer: beta}`` with no protected tokens)."""
    view = edit_view(model)
    if not isinstance(calibration, ODPCalibration):
        calibration = ODPCalibration(dict(calibration), {layer: float("inf") for layer in calibration})
    per_layer = {layer: (b, calibration.tau[layer]) for layer, b in calibration.beta.items()}

    def make(block: MoEBlockView, value):
        beta, tau = value
        return lambda block, hidden_TH, routing: odp_routing(routing, hidden_TH, beta, tau, renormalize)

    return install_edit(view, "online_dynamic_pruning", per_layer, make)


def calibrate_odp(view: ModelView, batches, target_active: float, protect: float = 0.02) -> ODPCalibration:
    """Per-layer ``beta`` and ``tau`` for ``target_active`` experts per token on ``batches``
    (``[B, S]`` token ids, e.g. :func:`moelab.compress.calib.calibration_batches`' ``.batches``);
    the rule is in the module docstring."""
    from moelab.run import run_batches

    if not 0 <= protect < 1:
        raise MoelabError(f"calibrate_odp: protect must lie in [0, 1), got {protect!r}")
    ratios: dict[int, list[Tensor]] = {b.layer: [] for b in view.blocks}
    norms: dict[int, list[Tensor]] = {b.layer: [] for b in view.blocks}

    def collect(ev: RoutingEvent) -> None:
        norms[ev.block.layer].append(token_importance(ev.hidden_TH))
        ratios[ev.block.layer].append(_ratios_TK(ev.routing))

    hooks = [b.register_routing_hook(collect) for b in view.blocks]
    run_batches(view.model, batches, handles=hooks, use_cache=False)
    beta, tau = {}, {}
    for b in view.blocks:
        if not norms[b.layer]:
            raise MoelabError("calibrate_odp: the calibration batches reached no MoE layer")
        beta[b.layer], tau[b.layer] = _layer_thresholds(b, torch.cat(norms[b.layer]), torch.cat(ratios[b.layer]),
                                                        target_active, protect)
    return ODPCalibration(beta, tau)


def _ratios_TK(r: Routing) -> Tensor:
    """``[T, K]`` ``w_j / w_(1)`` of the non-first real slots; NaN elsewhere."""
    _, candidates_TK = weak_slots(r, 0.0)
    w_TK = r.weights_TK.float()
    ratio_TK = w_TK / w_TK.masked_fill(~r.real_mask(), float("-inf")).max(-1, keepdim=True).values
    return ratio_TK.masked_fill(~candidates_TK, float("nan"))


def _layer_thresholds(block: MoEBlockView, norm_T: Tensor, ratio_TK: Tensor, target: float,
                      protect: float) -> tuple[float, float]:
    k = block.top_k
    if not 1 <= target <= k:
        raise MoelabError(f"calibrate_odp: target_active must lie in [1, top_k={k}], got {target!r}")
    tau = float(torch.quantile(norm_T, 1 - protect)) if protect > 0 else float("inf")
    q = (k - target) / ((1 - protect) * (k - 1)) if k > 1 else 0.0
    if q > 1:
        raise MoelabError(f"calibrate_odp: layer {block.layer}: {target} experts per token needs more slots "
                          f"dropped than the unprotected tokens have (lower protect or raise target_active)")
    ratios = ratio_TK[(norm_T < tau)[:, None].expand_as(ratio_TK)]
    ratios = ratios[~ratios.isnan()]
    if q == 0 or ratios.numel() == 0:
        return 0.0, tau
    return min(1.0, float(torch.quantile(ratios, q))), tau


def odp_reference(weights_TK: Tensor, real_TK: Tensor, importance_T: Tensor, beta: float, tau: float) -> Tensor:
    """Slow per-token reference of ODP's keep mask (tests)."""
    keep = real_TK.clone()
    for t in range(weights_TK.shape[0]):
        if float(importance_T[t]) >= tau:
            continue
        slots = [k for k in range(weights_TK.shape[1]) if real_TK[t, k]]
        first = max(slots, key=lambda k: float(weights_TK[t, k]))
        for k in slots:
            if k != first and float(weights_TK[t, k]) < beta * float(weights_TK[t, first]):
                keep[t, k] = False
    return keep


__all__ = ["ODPCalibration", "calibrate_odp", "odp_reference", "odp_routing", "online_dynamic_pruning",
           "token_importance"]
