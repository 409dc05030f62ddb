"""Super experts: the few experts whose down-projection output carries extreme activation outliers.

Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models"
(arXiv 2507.23279); criterion as coded in github.com/ZunhaiSu/Super-Experts-Profilling
(``eval_utils.py``: ``_super_experts_analysis`` and ``_identify_super_experts``).

Shape legend: N tokens, K top-k slots, L layers, E experts.

For each (layer, expert), ``a[l, e]`` = the largest |activation| at the expert's down_proj output over
all profiled tokens routed to it (the trace's ``act_max`` field, recorded by ``moelab trace
--act-max``, holds that maximum per token and chosen slot). Only layers ``l < round(0.75 * L)``
take part (``include_layers`` = 0.75; Python's round). Over the (layer, expert) pairs of those layers
that saw at least one token:

    super expert  <=>  a[l, e] > P99.5(a)  and  a[l, e] > floor(max(a) / 10)

where P99.5 is numpy's linearly interpolated 99.5th percentile and the floor reproduces the code's
``np.max(...) // times`` with ``times`` = 10. Results are sorted by ``a`` (largest first). The paper
profiles shared experts too; here only the routed experts present in the trace are scored. The
effect of zeroing each super expert on the validation loss needs the model and is not computed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._inputs import (
    AnalysisInputError,
    EmptySelectionError,
    MissingFieldError,
    check_ids,
    routed,
)


@dataclass(frozen=True)
class SuperExperts:
    """Super experts found in a trace, largest activation first."""

    layer_S: np.ndarray
    expert_S: np.ndarray
    act_max_S: np.ndarray
    percentile_threshold: float
    max_threshold: float
    include_layers: int  # layers 0 .. include_layers - 1 were scored
    act_max_LE: np.ndarray  # per (layer, expert) maximum; NaN where the expert saw no token


def expert_act_max(ids_NK: np.ndarray, act_max_NK: np.ndarray | None, num_experts: int) -> np.ndarray:
    """Per-expert maximum ``[E]`` of one layer's ``act_max`` field (NaN for experts never chosen)."""
    ids = check_ids(ids_NK, num_experts)
    if act_max_NK is None:
        raise MissingFieldError("act_max", "super-expert detection")
    a = np.asarray(act_max_NK, dtype=np.float64).reshape(ids.shape[0], -1)
    if a.shape != ids.shape:
        raise AnalysisInputError(f"act_max_NK has shape {np.shape(act_max_NK)}, expected {ids.shape}")
    e, v = routed(ids, np.abs(a))
    out = np.full(num_experts, -np.inf)
    np.maximum.at(out, e, v)
    return np.where(np.isinf(out), np.nan, out)


def super_experts(act_max_LE: np.ndarray, include_layers: float = 0.75, quantile: float = 99.5,
                  times: float = 10.0) -> SuperExperts:
    """Apply Su et al.'s criterion to per-(layer, expert) maxima ``act_max_LE`` (NaN = no token)."""
    a = np.asarray(act_max_LE, dtype=np.float64)
    if a.ndim != 2:
        raise AnalysisInputError(f"act_max_LE must have shape [L, E], got {a.shape}")
    n_incl = round(a.shape[0] * include_layers)
    scored = a[:n_incl]
    values = scored[~np.isnan(scored)]
    if values.size == 0:
        raise EmptySelectionError(
            f"no expert in the first {n_incl} of {a.shape[0]} layers saw a token (include_layers={include_layers})"
        )
    p_thr = float(np.percentile(values, quantile))
    m_thr = float(np.max(values) // times)
    with np.errstate(invalid="ignore"):
        hit = (scored > p_thr) & (scored > m_thr)
    layer, expert = np.nonzero(hit)
    order = np.argsort(-scored[layer, expert], kind="stable")
    return SuperExperts(layer_S=layer[order], expert_S=expert[order], act_max_S=scored[layer, expert][order],
                        percentile_threshold=p_thr, max_threshold=m_thr, include_layers=n_incl, act_max_LE=a)


def super_experts_reference(act_max_LE: np.ndarray, include_layers: float = 0.75) -> list[tuple[int, int]]:
    """Slow obvious criterion: a list of (layer, expert), largest activation first."""
    n_incl = round(len(act_max_LE) * include_layers)
    items = [(float(v), li, e) for li, row in enumerate(act_max_LE[:n_incl])
             for e, v in enumerate(row) if not np.isnan(v)]
    values = sorted(v for v, _, _ in items)
    rank = 0.995 * (len(values) - 1)  # linear interpolation between closest ranks
    lo = int(np.floor(rank))
    hi = min(lo + 1, len(values) - 1)
    p = values[lo] + (values[hi] - values[lo]) * (rank - lo)
    cut = np.floor(max(values) / 10)
    found = sorted(((v, li, e) for v, li, e in items if v > p and v > cut), key=lambda t: -t[0])
    return [(li, e) for _, li, e in found]
