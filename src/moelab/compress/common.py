"""Helpers the calibrated planners share (NAEE, DERN, HC-SMoE): checking the calibration, the experts
each layer keeps, and one routing pass that records every block's inputs and routing statistics.

Shape legend: T tokens, H hidden, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.compress.calib import Calibration, routing_pass
from moelab.compress.spec import CompressSpec
from moelab.compress.stats import ExpertStats, accumulate, gates
from moelab.errors import MoelabError
from moelab.models import ModelView, RoutingEvent


@dataclass
class LayerInputs:
    """What one MoE block received over the calibration data: hidden states, each token's sequence,
    and its routing statistics (:class:`moelab.compress.stats.ExpertStats`, counts and gate sums)."""

    hidden_TH: Tensor  # float64
    seq_T: Tensor  # int64 index of the calibration sequence of each token
    num_seqs: int
    stats: ExpertStats

    @property
    def freq_E(self) -> Tensor:
        """Top-k selections of each expert, ``|T_e|`` (float64)."""
        return self.stats.count_E

    @property
    def weight_E(self) -> Tensor:
        """Sum of each expert's gates, ``sum_{t in T_e} g_{t,e}`` (float64; :mod:`moelab.compress.stats`)."""
        return self.stats.gate_sum_E


def check_calibration(calib: Calibration | None, method: str, min_tokens: int) -> Calibration:
    """Fail clearly when a planner that needs data got none, or too little."""
    if calib is None:
        raise MoelabError(f"calib: {method} needs calibration data (see moelab.compress.calibration_batches)")
    if calib.num_tokens < min_tokens:
        raise MoelabError(f"calib: {method} got {calib.num_tokens} calibration tokens, needs at least "
                          f"{min_tokens} (option min_tokens)")
    return calib


def kept_counts(view: ModelView, spec: CompressSpec, kept: int | dict[int, int] | None,
                method: str) -> dict[int, int]:
    """Experts each layer keeps: ``spec`` under the per-layer budget, or the ``kept`` override."""
    if spec.budget != "layer":
        raise MoelabError(f"budget: {method} plans each layer on its own; expected 'layer', got {spec.budget!r}")
    out = {}
    for b in view.blocks:
        n = spec.kept_per_layer(b.num_experts) if kept is None else (
            kept if isinstance(kept, int) else kept.get(b.layer, spec.kept_per_layer(b.num_experts)))
        if not 1 <= n <= b.num_experts:
            raise MoelabError(f"kept: layer {b.layer} would keep {n} of its {b.num_experts} experts; "
                              f"expected 1..{b.num_experts}")
        out[b.layer] = int(n)
    return out


@torch.no_grad()
def layer_inputs(view: ModelView, calib: Calibration) -> dict[int, LayerInputs]:
    """``layer -> LayerInputs`` from one routing pass over the calibration batches (float64, CPU).

    The statistics are accumulated as :func:`moelab.compress.stats.expert_statistics` does (without
    expert output norms), in the same pass that records the hidden states.
    """
    parts: dict[int, list[Tensor]] = {b.layer: [] for b in view.blocks}
    zero = {b.layer: torch.zeros(b.num_experts, dtype=torch.float64) for b in view.blocks}
    stats = {layer: ExpertStats(layer, 0, z.clone(), z.clone(), z.clone(), z.clone()) for layer, z in zero.items()}

    def collect(ev: RoutingEvent) -> None:
        parts[ev.block.layer].append(ev.hidden_TH.detach().to("cpu", torch.float64))
        accumulate(stats[ev.block.layer], ev.ids_TK, gates(ev.block, ev.weights_TK), None)

    routing_pass(view, calib, collect)
    seq_len = int(calib.batches[0].shape[1])
    out = {}
    for layer, xs in parts.items():
        hidden_TH = torch.cat(xs)
        T = hidden_TH.shape[0]
        out[layer] = LayerInputs(hidden_TH, torch.arange(T) // seq_len, -(-T // seq_len), stats[layer])
    return out


def planner_inputs(view: ModelView, calib: Calibration | None, spec: CompressSpec,
                   kept: int | dict[int, int] | None, method: str,
                   min_tokens: int) -> tuple[Calibration, dict[int, int], dict[int, LayerInputs]]:
    """The checked calibration, the experts each layer keeps, and each layer's inputs: what a
    per-layer calibrated planner starts from (:func:`check_calibration`, :func:`kept_counts`,
    :func:`layer_inputs`)."""
    calib = check_calibration(calib, method, min_tokens)
    return calib, kept_counts(view, spec, kept, method), layer_inputs(view, calib)


__all__ = ["LayerInputs", "check_calibration", "kept_counts", "layer_inputs", "planner_inputs"]
