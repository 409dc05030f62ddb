"""Detecting behaviour-linked experts from contrasting text: SteerMoE's risk difference.

SteerMoE (Fayyaz et al. 2025, "Steering MoE LLMs via Expert (De)Activation", arXiv 2509.09660;
the detection of adobe-research/SteerMoE's ``custom_steering.ipynb``) counts, per (layer, expert),
over the tokens of a positive corpus (1) and a negative one (2)::

    a_i = tokens whose top-k includes the expert,  d_i = tokens whose top-k does not  (i = 1, 2)
    risk difference  RD = a1 / (a1 + d1) - a2 / (a2 + d2)

RD > 0: the expert fires more on the positive text (switch it off to suppress that behaviour, or on
to elicit it). MoTE (Dahlke et al. 2025, arXiv 2502.11096) switches off the top of such a ranking.
The routing counted is the routing the experts received, after any edit already on the model.

Two confidence measures per expert, both from the 2x2 table (n_i = a_i + d_i, p_i = a_i / n_i):

    z = RD / sqrt(p (1 - p) (1/n1 + 1/n2)),   p = (a1 + a2) / (n1 + n2)   (pooled two-proportion z;
                                                                          0 where p is 0 or 1)
    [lo, hi] = Newcombe's hybrid score interval for RD (Newcombe 1998, "Interval estimation for the
               difference between independent proportions", method 10), from the Wilson score
               intervals [l_i, u_i] of p_i at z_a = 1.96 (95 %):
               lo = RD - sqrt((p1 - l1)^2 + (u2 - p2)^2),  hi = RD + sqrt((u1 - p1)^2 + (p2 - l2)^2)

Tokens within a sequence are not independent, so read both as a ranking aid, not as exact tests.

Shape legend: N tokens, K slots per token, E experts, L MoE layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moelab.errors import MoelabError
from moelab.steer.gather import Routed, gather_routing

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval

# how many experts a steering mode can take in one layer: "on" forces into the top-k, "off" must
# leave at least top_k experts
MODES = ("off", "on", "soft-off", "soft-on", "scale")


@dataclass(frozen=True)
class ExpertScore:
    """One row of a detection's ranking. ``score`` is the risk difference (or RICE's nPMI)."""

    layer: int
    expert: int
    rate_pos: float
    rate_neg: float
    score: float
    z: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Detection:
    """Experts ranked by ``score`` (highest first) with what they were ranked on."""

    method: str
    rows: list[ExpertScore]
    num_experts: dict[int, int]
    top_k: dict[int, int]
    tokens: dict[str, int]
    sources: dict[str, Any] = field(default_factory=dict)

    def select(self, n: int, mode: str = "off", *, per_layer: bool = False) -> dict[int, list[int]]:
        """The top ``n`` experts with a positive score (overall, or ``per_layer``), as ``{layer: [e]}``,
        skipping those a layer cannot take in ``mode`` (on: at most top_k, off: leave top_k)."""
        if mode not in MODES:
            raise MoelabError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(n, int) or n < 1:
            raise MoelabError(f"top: expected a positive number of experts, got {n!r}")
        out: dict[int, list[int]] = {}
        taken = 0
        for r in self.rows:
            if r.score <= 0 or (not per_layer and taken >= n):
                continue
            got = out.setdefault(r.layer, [])
            if len(got) >= capacity(mode, self.num_experts[r.layer], self.top_k[r.layer]) or \
                    (per_layer and len(got) >= n):
                continue
            got.append(r.expert)
            taken += 1
        if not taken:
            raise MoelabError(f"{self.method}: no expert has a positive score; the two sides route alike")
        return {layer: sorted(e) for layer, e in sorted(out.items()) if e}


def capacity(mode: str, num_experts: int, top_k: int) -> int:
    """Experts one layer can take in ``mode``: top_k to force on, E - top_k to switch off."""
    if mode in ("on", "soft-on"):
        return top_k
    if mode in ("off", "soft-off"):
        return num_experts - top_k
    return num_experts


def wilson(a: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval ``(low, high)`` of the proportion ``a / n`` (Wilson 1927)."""
    p = a / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def risk_difference(a1: np.ndarray, n1: int, a2: np.ndarray, n2: int) -> dict[str, np.ndarray]:
    """``rate_pos, rate_neg, rd, z, ci_low, ci_high`` (float64 ``[E]``) from the counts ``a_i`` of
    tokens routed to each expert out of ``n_i`` (see the module docstring)."""
    if n1 < 1 or n2 < 1:
        raise MoelabError(f"risk difference: both corpora need tokens (got {n1} and {n2})")
    a1, a2 = np.asarray(a1, dtype=np.float64), np.asarray(a2, dtype=np.float64)
    p1, p2 = a1 / n1, a2 / n2
    rd = p1 - p2
    pooled = (a1 + a2) / (n1 + n2)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, rd / np.where(se > 0, se, 1), 0.0)
    l1, u1 = wilson(a1, np.float64(n1))
    l2, u2 = wilson(a2, np.float64(n2))
    lo = rd - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = rd + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return {"rate_pos": p1, "rate_neg": p2, "rd": rd, "z": z, "ci_low": lo, "ci_high": hi}


def risk_difference_reference(ids_pos: list[list[int]], ids_neg: list[list[int]], expert: int
                              ) -> tuple[float, float, float, float]:
    """Slow, obvious ``(rd, z, ci_low, ci_high)`` of one expert from per-token id lists (-1 ignored)."""
    def table(rows):
        a = sum(1 for r in rows if expert in [e for e in r if e >= 0])
        return a, len(rows) - a

    a1, d1 = table(ids_pos)
    a2, d2 = table(ids_neg)
    n1, n2 = a1 + d1, a2 + d2
    p1, p2 = a1 / n1, a2 / n2
    rd = p1 - p2
    p = (a1 + a2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    z = rd / se if se > 0 else 0.0

    def wilson1(a, n):
        q = a / n
        c = (2 * a + Z95 ** 2) / (2 * (n + Z95 ** 2))
        h = Z95 * math.sqrt(n * q * (1 - q) + Z95 ** 2 / 4) / (n + Z95 ** 2)
        return c - h, c + h

    (l1, u1), (l2, u2) = wilson1(a1, n1), wilson1(a2, n2)
    return rd, z, rd - math.hypot(p1 - l1, u2 - p2), rd + math.hypot(u1 - p1, p2 - l2)


def _check_same_model(pos: Routed, neg: Routed) -> None:
    if pos.num_experts != neg.num_experts:
        raise MoelabError(f"negative: its routing has layers/experts {neg.num_experts}, the positive's "
                          f"{pos.num_experts}: both must come from the same model")


def rank_by(method: str, stat, score: str, pos: Routed, neg: Routed) -> Detection:
    """Every (layer, expert) ranked by ``stat(a1, n1, a2, n2)[score]`` between ``pos`` and ``neg``
    (highest first; ties by z, then layer and expert); ``stat`` also gives rate_pos, rate_neg, z,
    ci_low and ci_high per expert (:func:`risk_difference`, ``select.log_odds_ratio``)."""
    _check_same_model(pos, neg)
    rows = []
    for layer, E in pos.num_experts.items():
        s = stat(pos.counts(layer), pos.num_tokens, neg.counts(layer), neg.num_tokens)
        rows += [ExpertScore(layer, e, float(s["rate_pos"][e]), float(s["rate_neg"][e]), float(s[score][e]),
                             float(s["z"][e]), float(s["ci_low"][e]), float(s["ci_high"][e])) for e in range(E)]
    rows.sort(key=lambda r: (-r.score, -r.z, r.layer, r.expert))
    return Detection(method, rows, dict(pos.num_experts), dict(pos.top_k),
                     {"positive": pos.num_tokens, "negative": neg.num_tokens},
                     {"positive": pos.source, "negative": neg.source})


def rank_risk_difference(pos: Routed, neg: Routed) -> Detection:
    """Every (layer, expert) ranked by risk difference between ``pos`` and ``neg`` (:func:`rank_by`)."""
    return rank_by("risk-diff", risk_difference, "rd", pos, neg)


def gather_pair(model: Any, positive: Any, negative: Any, *, positive_label: str | None = None,
                negative_label: str | None = None, **gather: Any) -> tuple[Routed, Routed]:
    """The routing over both sources; an error names the side (``positive`` / ``negative``)."""
    out = []
    for side, source, label in (("positive", positive, positive_label), ("negative", negative, negative_label)):
        try:
            out.append(gather_routing(model, source, label=label, **gather))
        except MoelabError as err:
            raise _named(err, side) from None
    return out[0], out[1]


def _named(err: MoelabError, side: str) -> MoelabError:
    """The same error with the argument it came from in front of its message."""
    try:
        return type(err)(f"{side}: {err}")
    except TypeError:  # an error class with its own constructor
        return MoelabError(f"{side}: {err}")


def detect_experts(model: Any, positive: Any, negative: Any, *, positive_label: str | None = None,
                   negative_label: str | None = None, tokens: int = 16384, seq_len: int = 256,
                   batch_size: int = 8, seed: int = 0, progress: bool = False,
                   score: str = "risk-diff") -> Detection:
    """SteerMoE detection: the routing of ``model`` over ``positive`` and ``negative`` (sources of
    :func:`moelab.steer.gather.gather_routing`, ``tokens`` each), ranked by risk difference
    (``score="risk-diff"``) or by the log odds ratio (``"log-odds"``, :mod:`moelab.steer.select`)."""
    from moelab.steer.select import rank_log_odds

    rankers = {"risk-diff": rank_risk_difference, "log-odds": rank_log_odds}
    if score not in rankers:
        raise MoelabError(f"score: expected one of {', '.join(rankers)}, got {score!r}")
    pos, neg = gather_pair(model, positive, negative, positive_label=positive_label,
                           negative_label=negative_label, tokens=tokens, seq_len=seq_len,
                           batch_size=batch_size, seed=seed, progress=progress)
    return rankers[score](pos, neg)


__all__ = ["MODES", "Detection", "ExpertScore", "capacity", "detect_experts", "gather_pair",
           "rank_risk_difference", "risk_difference", "risk_difference_reference", "wilson"]
