"""Choosing which detected experts to switch off: a code-aware score, and a greedy selection that
measures the loss on held-out calibration text under a budget on the negative side.

SteerMoE's risk difference (:mod:`moelab.steer.detect`) ranks an expert by ``RD = p1 - p2`` alone, so
an expert that fires on 45 % of the positive text and 15 % of the negative one (RD 0.30) ranks above
one at 30 % / 1 % (RD 0.29), though switching the first off costs the negative text far more. Two
ways to take the negative side's cost into account (``moelab steer detect --select``):

``log-odds``: the log odds ratio of the 2x2 table (a_i tokens routed to the expert, d_i not; i = 1
positive, 2 negative), with Haldane's and Anscombe's 1/2 added to every cell so an empty cell stays
finite (Haldane 1956, "The estimation and significance of the logarithm of a ratio of frequencies";
Anscombe 1956), its standard error by Woolf (1955), the keyword ranking of Monroe, Colaresi & Quinn
2008 ("Fightin' Words", Political Analysis 16(4), section 3.3, with a flat prior)::

    LOR = ln((a1 + 1/2) / (d1 + 1/2)) - ln((a2 + 1/2) / (d2 + 1/2))
    se  = sqrt(1/(a1 + 1/2) + 1/(d1 + 1/2) + 1/(a2 + 1/2) + 1/(d2 + 1/2)),   z = LOR / se
    [lo, hi] = LOR -/+ 1.96 se

An odds ratio weighs a rate near 0 on the negative side more than a difference does.

``greedy``: forward selection measured on calibration text of both sides (the budgeted cost-benefit
greedy of Khuller, Moss & Naor 1999, "The budgeted maximum coverage problem", and of Leskovec et al.
2007's CELF; measuring the loss of an expert subset as Lu et al. 2024, "Not All Experts are Equal",
do to prune). With ``L_pos(S)`` and ``L_neg(S)`` the mean next-token NLL (nats/token) of each side's
calibration batches with the experts ``S`` switched off (hard mask, :func:`moelab.steer.experts_off`)::

    S = {}
    repeat:   for every candidate e not in S (positive score, among the ranking's top ``pool``,
              the layer still able to take it):
                  gain(e) = L_pos(S + e) - L_pos(S),    cost(e) = max(L_neg(S + e) - L_neg(S), eps)
              feasible: L_neg(S + e) - L_neg({}) <= ln(budget)   (negative perplexity x budget at most)
              S = S + argmax_{feasible, gain > 0} gain(e) / cost(e);  stop when none is left

The calibration text must be held out from the text the selection is judged on: the bench and
``moelab steer detect`` draw it from the train split with another seed than the detection's, never
from the test split. Cost: about ``pool x |S|`` forwards of both calibration sets.

Shape legend: N tokens, E experts, B sequences per batch, S tokens per sequence.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from moelab.analysis.expert_zeroing import next_token_loss
from moelab.errors import MoelabError
from moelab.steer.detect import Z95, Detection, capacity, rank_by
from moelab.steer.edits import experts_off
from moelab.steer.gather import Routed, _is_trace_dir

SELECTIONS = ("score", "log-odds", "greedy")  # moelab steer detect --select


def log_odds_ratio(a1: np.ndarray, n1: int, a2: np.ndarray, n2: int) -> dict[str, np.ndarray]:
    """``rate_pos, rate_neg, lor, z, ci_low, ci_high`` (float64 ``[E]``) from the counts ``a_i`` of
    tokens routed to each expert out of ``n_i`` (see the module docstring)."""
    if n1 < 1 or n2 < 1:
        raise MoelabError(f"log odds ratio: both corpora need tokens (got {n1} and {n2})")
    a1, a2 = np.asarray(a1, dtype=np.float64), np.asarray(a2, dtype=np.float64)
    if (a1 < 0).any() or (a1 > n1).any() or (a2 < 0).any() or (a2 > n2).any():
        raise MoelabError(f"log odds ratio: counts must lie in [0, n] (n = {n1} and {n2})")
    c1, e1, c2, e2 = a1 + 0.5, n1 - a1 + 0.5, a2 + 0.5, n2 - a2 + 0.5
    lor = np.log(c1 / e1) - np.log(c2 / e2)
    se = np.sqrt(1 / c1 + 1 / e1 + 1 / c2 + 1 / e2)
    return {"rate_pos": a1 / n1, "rate_neg": a2 / n2, "lor": lor, "z": lor / se,
            "ci_low": lor - Z95 * se, "ci_high": lor + Z95 * se}


def log_odds_reference(ids_pos: list[list[int]], ids_neg: list[list[int]], expert: int
                       ) -> tuple[float, float, float, float]:
    """Slow, obvious ``(lor, z, ci_low, ci_high)`` of one expert from per-token id lists (-1 ignored)."""
    def cells(rows):
        a = sum(1 for r in rows if expert in [e for e in r if e >= 0])
        return a + 0.5, len(rows) - a + 0.5

    (a1, d1), (a2, d2) = cells(ids_pos), cells(ids_neg)
    lor = math.log(a1 * d2 / (d1 * a2))
    se = math.sqrt(1 / a1 + 1 / d1 + 1 / a2 + 1 / d2)
    return lor, lor / se, lor - Z95 * se, lor + Z95 * se


def rank_log_odds(pos: Routed, neg: Routed) -> Detection:
    """Every (layer, expert) ranked by the log odds ratio between ``pos`` and ``neg`` (highest first;
    ties by z, then layer and expert; :func:`moelab.steer.detect.rank_by`)."""
    return rank_by("log-odds", log_odds_ratio, "lor", pos, neg)


@dataclass(frozen=True, kw_only=True)
class GreedyConfig:
    """The greedy selection's limits (see the module docstring)."""

    budget: float = 1.03  # most the negative side's calibration perplexity may be multiplied by
    max_experts: int | None = None  # stop after this many (None: only the budget stops it)
    max_per_layer: int | None = None  # a per-layer budget (None: the layer's capacity, E - top_k)
    pool: int = 64  # candidates: the ranking's top rows with a positive score
    eps: float = 0.002  # floor of a step's cost, nats/token (a cost of 0 or below is noise)

    def __post_init__(self) -> None:
        if not _number(self.budget) or self.budget < 1:
            raise MoelabError(f"budget: expected a perplexity ratio >= 1 (e.g. 1.03), got {self.budget!r}")
        for name in ("max_experts", "max_per_layer", "pool"):
            v = getattr(self, name)
            if (v is not None or name == "pool") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise MoelabError(f"{name}: expected a positive integer, got {v!r}")
        if not _number(self.eps) or self.eps <= 0:
            raise MoelabError(f"eps: expected a number > 0, got {self.eps!r}")


def _number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


@dataclass
class GreedyStep:
    """The set after a step: the expert added and both sides' calibration perplexity ratios."""

    layer: int
    expert: int
    ratio_pos: float
    ratio_neg: float
    evaluated: int  # candidates measured in this step

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class GreedySelection:
    """The experts chosen (``{layer: [e]}``), the path (one step per expert, in order), the losses
    without an edit and why it stopped."""

    experts: dict[int, list[int]]
    steps: list[GreedyStep]
    base_loss: dict[str, float]
    tokens: dict[str, int]
    stopped: str
    config: dict[str, Any] = field(default_factory=dict)

    def prefix(self, n: int) -> dict[int, list[int]]:
        """The first ``n`` experts chosen, as ``{layer: [e]}``."""
        return _as_selection([(s.layer, s.expert) for s in self.steps[:n]])


def _as_selection(pairs: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, e in pairs:
        out.setdefault(layer, []).append(e)
    return {layer: sorted(v) for layer, v in sorted(out.items())}


def _tokens(batches: Sequence[Tensor]) -> int:
    return int(sum(b.shape[0] * (b.shape[1] - 1) for b in batches))


def greedy_select(view: Any, detection: Detection, calib_pos: Sequence[Tensor], calib_neg: Sequence[Tensor],
                  config: GreedyConfig | None = None, *, progress: Callable[[GreedyStep], None] | None = None
                  ) -> GreedySelection:
    """The greedy selection of the module docstring over ``detection``'s candidates, measured on
    ``calib_pos`` / ``calib_neg`` (``[B, S]`` token batches, held out from what is judged later);
    ``progress(step)`` is called after each step."""
    config = config or GreedyConfig()
    if not calib_pos or not calib_neg:
        raise MoelabError("calibration: both sides need at least one batch of token ids")
    pool = [(r.layer, r.expert) for r in detection.rows if r.score > 0][:config.pool]
    if not pool:
        raise MoelabError(f"{detection.method}: no expert has a positive score; the two sides route alike")

    def loss(batches, pairs):
        if not pairs:
            return next_token_loss(view.model, batches)
        with experts_off(view, _as_selection(pairs)):
            return next_token_loss(view.model, batches)

    base = {"positive": loss(calib_pos, []), "negative": loss(calib_neg, [])}
    limit = base["negative"] + math.log(config.budget)
    chosen: list[tuple[int, int]] = []
    now_pos, now_neg, steps, stopped = base["positive"], base["negative"], [], "no candidate left"
    while True:
        if config.max_experts is not None and len(chosen) >= config.max_experts:
            stopped = "max_experts"
            break
        best, evaluated, over = None, 0, False
        for cand in _open_candidates(pool, chosen, detection, config):
            lp, ln_ = loss(calib_pos, chosen + [cand]), loss(calib_neg, chosen + [cand])
            evaluated += 1
            gain, ratio = lp - now_pos, (lp - now_pos) / max(ln_ - now_neg, config.eps)
            over |= gain > 0 and ln_ > limit
            if ln_ <= limit and gain > 0 and (best is None or ratio > best[0]):
                best = (ratio, cand, lp, ln_)
        if best is None:
            stopped = "budget" if over else ("no gain" if evaluated else stopped)
            break
        _, cand, now_pos, now_neg = best
        chosen.append(cand)
        steps.append(GreedyStep(cand[0], cand[1], math.exp(now_pos - base["positive"]),
                                math.exp(now_neg - base["negative"]), evaluated))
        if progress is not None:
            progress(steps[-1])
    if not chosen:
        raise MoelabError(f"greedy: no expert fits the budget (negative perplexity x{config.budget:g}) and raises "
                          "the positive side's loss; raise the budget")
    return GreedySelection(_as_selection(chosen), steps, base, {"positive": _tokens(calib_pos),
                           "negative": _tokens(calib_neg)}, stopped, {**vars(config), "method": detection.method})


def calibration_pair(view: Any, positive: Any, negative: Any, *, positive_label: str | None = None,
                     negative_label: str | None = None, tokens: int = 4096, seq_len: int = 256,
                     batch_size: int = 8, seed: int = 1) -> tuple[list[Tensor], list[Tensor]]:
    """Calibration batches ``[B, S]`` of both sides from corpus paths (a ``moelab data build`` corpus
    gives its train split), drawn by :func:`moelab.compress.calib.calibration_batches` with ``seed``:
    pass another seed than the detection's so the selection is measured on another draw."""
    from moelab.compress.calib import calibration_batches

    out = []
    for side, source, label in (("positive", positive, positive_label), ("negative", negative, negative_label)):
        if not isinstance(source, os.PathLike) or _is_trace_dir(Path(source)):
            raise MoelabError(f"{side}: the greedy selection calibrates on text; expected a corpus path, got "
                              f"{type(source).__name__} (a trace holds no text)")
        try:
            out.append(calibration_batches(view, source, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                                           seed=seed, label=label).batches)
        except MoelabError as err:
            raise MoelabError(f"{side}: {err}") from None
    return out[0], out[1]


def greedy_from_sources(view: Any, detection: Detection, positive: Any, negative: Any, *,
                        positive_label: str | None = None, negative_label: str | None = None,
                        config: GreedyConfig | None = None, tokens: int = 4096, seq_len: int = 256,
                        seed: int = 1, progress: Callable[[GreedyStep], None] | None = None) -> GreedySelection:
    """:func:`greedy_select` on ``tokens`` calibration tokens per side drawn from corpus paths with
    ``seed`` (:func:`calibration_pair`; give another seed than the detection's)."""
    calib_pos, calib_neg = calibration_pair(view, positive, negative, positive_label=positive_label,
                                            negative_label=negative_label, tokens=tokens, seq_len=seq_len,
                                            seed=seed)
    got = greedy_select(view, detection, calib_pos, calib_neg, config, progress=progress)
    got.config.update(calibration_seed=seed, calibration_tokens=tokens)
    return got


def _open_candidates(pool: list[tuple[int, int]], chosen: list[tuple[int, int]], detection: Detection,
                     config: GreedyConfig) -> list[tuple[int, int]]:
    """Candidates not chosen yet whose layer can take one more expert off."""
    per_layer: dict[int, int] = {}
    for layer, _ in chosen:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    out = []
    for layer, e in pool:
        room = capacity("off", detection.num_experts[layer], detection.top_k[layer])
        if config.max_per_layer is not None:
            room = min(room, config.max_per_layer)
        if (layer, e) not in chosen and per_layer.get(layer, 0) < room:
            out.append((layer, e))
    return out


__all__ = ["SELECTIONS", "GreedyConfig", "GreedySelection", "GreedyStep", "calibration_pair", "greedy_from_sources", "greedy_select", "log_odds_ratio",
           "log_odds_reference", "rank_log_odds"]
