"""DERN: drop experts by router statistics, then recombine their neurons into the experts kept.

Zhou et al. 2025, "Dropping Experts, Recombining Neurons: Retraining-Free Pruning for Sparse
Mixture-of-Experts LLMs" (EMNLP 2025 Findings, arXiv:2509.10377). No official code was found; the
three steps below are the paper's (abstract), the exact formulas are moelab's reading of them and
are stated here so that they can be checked:

1. **Drop experts by router statistics.** Importance of expert e over the calibration tokens:
   ``s_e = sum_{t : e in S_t} g_{t,e}`` (``score="weight"``, the summed gates as
   :mod:`moelab.compress.stats` and REAP define them: renormalised over the top-k where the model is) or
   ``s_e = |{t : e in S_t}|`` (``score="frequency"``). Each layer keeps its ``kept`` highest
   (ties: the lower index); the others are dropped.
2. **Split dropped experts into segments and assign each to its most compatible kept expert.** A
   segment is one intermediate neuron n of a dropped expert d, the vector
   ``f_d[n] = [gate[d][n, :] | up[d][n, :] | down[d][:, n] (| gate_bias[d][n] | up_bias[d][n])]``
   (:func:`moelab.analysis.similarity.neuron_features`). Its compatibility with a kept expert r is
   its best cosine with r's neurons, ``c(d, n; r) = max_m cos(f_d[n], f_r[m])``; the segment goes to
   ``r* = argmax_r c`` and is paired with the neuron ``m* = argmax_m cos(f_d[n], f_{r*}[m])``.
   Segments whose ``c < alpha`` are discarded (the paper tunes a similarity threshold alpha; ties
   go to the lower index).
3. **Merge the segments inside each kept expert.** Neuron m of kept expert r becomes the
   importance-weighted mean of itself and the segments paired with it:

       f'_r[m] = (s_r f_r[m] + sum_{(d, n) -> (r, m)} s_d f_d[n]) / (s_r + sum s_d)

   (gate and up rows and the down column alike), so the expert keeps its width I. This is one
   anchored k-means step with the kept expert's own neurons as centroids. In the plan it is a
   member for r with per-neuron ``coef`` plus, per dropped expert, as many members as the largest
   number of its segments paired with one neuron, each with a neuron permutation and per-neuron
   ``coef`` (0 where unused). NOTE: the plan's down-bias rule mixes the members' down biases by
   their mean coefficients (families with expert output biases only, e.g. GPT-OSS).

Router rows are the kept experts' own. Shape legend: E experts, R kept experts, I expert width,
F neuron feature length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moelab.analysis.similarity import neuron_features
from moelab.compress.calib import Calibration
from moelab.compress.common import planner_inputs
from moelab.compress.plan import LayerPlan, Member, OutExpert, Plan
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView

SCORES = ("weight", "frequency")


@dataclass(frozen=True)
class Segment:
    """Neuron ``neuron`` of dropped expert ``expert`` paired with neuron ``anchor`` of kept expert ``target``."""

    expert: int
    neuron: int
    target: int
    anchor: int
    similarity: float


def keep_by_importance(score_E: Tensor, kept: int) -> list[int]:
    """The ``kept`` experts of highest score (ties: lower index), in ascending index order."""
    order = sorted(range(len(score_E)), key=lambda e: (-float(score_E[e]), e))
    return sorted(order[:kept])


def _unit_rows(f_NF: Tensor) -> Tensor:
    norm = f_NF.norm(dim=1, keepdim=True)
    return f_NF / torch.where(norm > 0, norm, torch.ones_like(norm))


@torch.no_grad()
def assign_segments(block: MoEBlockView, keep: list[int], alpha: float) -> list[Segment]:
    """Step 2: every neuron of every dropped expert, paired with its most similar kept neuron
    (cosine of neuron features), kept when the similarity is at least ``alpha``."""
    I = block.intermediate_size  # noqa: E741
    kept_RIF = torch.stack([_unit_rows(neuron_features(block, r)) for r in keep])
    kept_FX = kept_RIF.reshape(len(keep) * I, -1).T  # X = R*I kept neurons, expert-major
    segments = []
    for d in range(block.num_experts):
        if d in keep:
            continue
        cos_IX = _unit_rows(neuron_features(block, d)) @ kept_FX
        best_I, where_I = cos_IX.max(dim=1)  # first maximum: lowest (expert, neuron) on ties
        for n in range(I):
            if float(best_I[n]) >= alpha:
                x = int(where_I[n])
                segments.append(Segment(d, n, keep[x // I], x % I, float(best_I[n])))
    return segments


def merged_expert(r: int, segments: list[Segment], score_E: Tensor, I: int) -> OutExpert:  # noqa: E741
    """Step 3 for kept expert ``r``: its members and per-neuron coefficients (see the module docstring)."""
    mine = [s for s in segments if s.target == r]
    if not mine:
        return OutExpert([Member(r)])
    w_r = max(float(score_E[r]), 0.0)
    total_I = torch.full((I,), w_r, dtype=torch.float64)
    for s in mine:
        total_I[s.anchor] += max(float(score_E[s.expert]), 0.0)
    safe_I = torch.where(total_I > 0, total_I, torch.ones_like(total_I))
    own_I = torch.where(total_I > 0, w_r / safe_I, torch.ones_like(total_I))
    members = [Member(r, own_I)]
    for d in sorted({s.expert for s in mine}):
        by_anchor: dict[int, list[int]] = {}
        for s in mine:
            if s.expert == d:
                by_anchor.setdefault(s.anchor, []).append(s.neuron)
        w_d = max(float(score_E[d]), 0.0)
        for j in range(max(len(v) for v in by_anchor.values())):
            used = {m: ns[j] for m, ns in by_anchor.items() if j < len(ns)}
            taken = set(used.values())
            rest = iter(n for n in range(I) if n not in taken)  # unused positions: a full permutation
            perm = torch.tensor([used[m] if m in used else next(rest) for m in range(I)], dtype=torch.long)
            coef = torch.zeros(I, dtype=torch.float64)
            for m in used:
                coef[m] = w_d / safe_I[m] if total_I[m] > 0 else 0.0
            members.append(Member(d, coef, perm))
    return OutExpert(members, router_from=r)


def plan_dern(view: ModelView, calib: Calibration | None, spec: CompressSpec, *, score: str = "weight",
              alpha: float = 0.4, kept: int | dict[int, int] | None = None, min_tokens: int = 32) -> Plan:
    """DERN plan (see the module docstring).

    Options: ``score`` 'weight' (summed top-k gates, default) or 'frequency'; ``alpha`` least
    cosine for a segment to be recombined (above 1: plain pruning by ``score``); ``kept`` overrides
    the experts kept (an int or ``{layer: n}``); ``min_tokens`` least calibration tokens accepted.
    """
    start = time.perf_counter()
    if score not in SCORES:
        raise MoelabError(f"score: expected one of {SCORES}, got {score!r}")
    if not isinstance(alpha, (int, float)) or np.isnan(alpha):
        raise MoelabError(f"alpha: expected a cosine threshold (a number), got {alpha!r}")
    calib, counts, inputs = planner_inputs(view, calib, spec, kept, "dern", min_tokens)
    layers, info = {}, {}
    for b in view.blocks:
        li = inputs[b.layer]
        score_E = li.weight_E if score == "weight" else li.freq_E
        keep = keep_by_importance(score_E, counts[b.layer])
        segments = assign_segments(b, keep, alpha) if len(keep) < b.num_experts else []
        layers[b.layer] = LayerPlan(b.layer, [merged_expert(r, segments, score_E, b.intermediate_size)
                                              for r in keep])
        dropped = b.num_experts - len(keep)
        info[str(b.layer)] = {"kept": keep, "scores": score_E.tolist(), "segments": len(segments),
                              "segments_total": dropped * b.intermediate_size,
                              "mean_similarity": float(np.mean([s.similarity for s in segments])) if segments else None}
    meta = {"method": "dern", "ratio": spec.ratio, "seed": spec.seed, "score": score, "alpha": alpha,
            "calibration": calib.describe(), "layers": info, "seconds": time.perf_counter() - start}
    return Plan("dern", layers, meta=meta)


__all__ = ["SCORES", "Segment", "assign_segments", "keep_by_importance", "merged_expert", "plan_dern"]
