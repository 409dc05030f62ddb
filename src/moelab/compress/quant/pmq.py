"""PMQ: bits per expert by importance and quantisation loss, as an integer program (MC-MoE / MC#).

Huang et al. 2024, "MC-MoE: Mixture Compressor for Mixture-of-Experts LLMs Gains More" (arXiv
2410.06270): Pre-Loading Mixed-Precision Quantisation, kept in MC# (Huang et al. 2025, "MC#: Mixture
Compressor for Mixture-of-Experts Large Models", arXiv 2510.10962). Shape legend: E experts of a
layer, B candidate bit-widths.

Per MoE layer, with ``f_j`` expert j's activation frequency (share of calibration tokens routed to
it), ``w_j`` its mean routing weight (gate) over those tokens, and ``L_{j,b}`` its quantisation loss at
``b`` bits (GPTQ's Hessian-weighted output error summed over its projections,
:func:`moelab.compress.quant.gptq.hessian_error`), choose ``x_{j,b} in {0, 1}``::

    minimise    sum_j sum_b  f_j^alpha * w_j^beta * L_{j,b}^alpha * x_{j,b}
    subject to  sum_b x_{j,b} = 1                      (one bit-width per expert)
                sum_j sum_b b * x_{j,b} <= floor(avg_bits * E)      (the layer's bit budget)

with ``alpha = 1``, ``beta = 1.5`` as in the MC-MoE code (``precision_solver.py``, solved with Gurobi
there; here with HiGHS through SciPy's :func:`scipy.optimize.milp`). The code also asks for at least
one expert at the lowest and one at the highest bit-width; ``at_least_one`` turns that on. Baselines:
:func:`uniform_bits` (every expert at the largest bit-width within budget) and :func:`greedy_bits`
(start every expert at the lowest bit-width, then repeatedly raise the expert with the largest
importance-weighted loss reduction per extra bit, while the budget allows).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from moelab.errors import MoelabError

ALPHA, BETA = 1.0, 1.5
ALLOCATORS = ("pmq", "greedy", "uniform")


@dataclass(frozen=True)
class PMQConfig:
    """Average-bits budget, candidate bit-widths and the importance exponents."""

    avg_bits: float = 2.5
    candidates: tuple[int, ...] = (2, 3, 4)
    alpha: float = ALPHA
    beta: float = BETA
    at_least_one: bool = False

    def __post_init__(self) -> None:
        if not self.candidates or sorted(set(self.candidates)) != list(self.candidates):
            raise MoelabError(f"candidates: expected distinct increasing bit-widths, got {self.candidates}")
        if self.avg_bits < self.candidates[0]:
            raise MoelabError(f"avg_bits: {self.avg_bits} is below the smallest bit-width {self.candidates[0]} "
                              f"(candidates {self.candidates})")

    def budget(self, E: int) -> int:  # noqa: N803
        return int(math.floor(self.avg_bits * E + 1e-9))


def importance(freq_E: np.ndarray, gate_E: np.ndarray, cfg: PMQConfig) -> np.ndarray:
    """``f^alpha * w^beta`` per expert."""
    return np.power(np.asarray(freq_E, float), cfg.alpha) * np.power(np.asarray(gate_E, float), cfg.beta)


def _cost(imp_E: np.ndarray, loss_EB: np.ndarray, cfg: PMQConfig) -> np.ndarray:
    return imp_E[:, None] * np.power(np.maximum(np.asarray(loss_EB, float), 0.0), cfg.alpha)


def objective(bits_E: list[int], imp_E: np.ndarray, loss_EB: np.ndarray, cfg: PMQConfig) -> float:
    """The PMQ objective of an allocation."""
    c = _cost(imp_E, loss_EB, cfg)
    return float(sum(c[j, cfg.candidates.index(b)] for j, b in enumerate(bits_E)))


def pmq_bits(imp_E: np.ndarray, loss_EB: np.ndarray, cfg: PMQConfig) -> list[int]:
    """The optimal allocation of the integer program (HiGHS via ``scipy.optimize.milp``)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    E, B = loss_EB.shape  # noqa: N806
    bits = np.asarray(cfg.candidates, float)
    c = _cost(imp_E, loss_EB, cfg).reshape(-1)
    scale = max(float(np.abs(c).max()), 1e-300)  # HiGHS likes O(1) costs
    one = np.kron(np.eye(E), np.ones(B))  # [E, E*B]: sum_b x_{j,b}
    rows, lo, hi = [one, np.tile(bits, E)[None]], [np.ones(E), [-np.inf]], [np.ones(E), [cfg.budget(E)]]
    if cfg.at_least_one and B > 1:
        for b in (0, B - 1):
            sel = np.zeros(E * B)
            sel[b::B] = 1
            rows.append(sel[None]), lo.append([1]), hi.append([np.inf])
    res = milp(c / scale, integrality=np.ones(E * B), bounds=Bounds(0, 1),
               constraints=LinearConstraint(np.vstack(rows), np.concatenate(lo), np.concatenate(hi)))
    if res.x is None:
        raise MoelabError(f"pmq: no allocation of {cfg.candidates} bits to {E} experts fits the budget "
                          f"{cfg.budget(E)} bits ({res.message})")
    x = np.asarray(res.x).reshape(E, B).round()
    return [int(cfg.candidates[int(np.argmax(x[j]))]) for j in range(E)]


def greedy_bits(imp_E: np.ndarray, loss_EB: np.ndarray, cfg: PMQConfig) -> list[int]:
    """Raise one expert by one step at a time, best cost reduction per bit first, within the budget."""
    c = _cost(imp_E, loss_EB, cfg)
    E = c.shape[0]  # noqa: N806
    level, left = [0] * E, cfg.budget(E) - E * cfg.candidates[0]
    while True:
        best, gain = None, 0.0
        for j in range(E):
            if level[j] + 1 < len(cfg.candidates):
                step = cfg.candidates[level[j] + 1] - cfg.candidates[level[j]]
                g = (c[j, level[j]] - c[j, level[j] + 1]) / step
                if step <= left and (best is None or g > gain):
                    best, gain = j, g
        if best is None:
            return [cfg.candidates[k] for k in level]
        left -= cfg.candidates[level[best] + 1] - cfg.candidates[level[best]]
        level[best] += 1


def uniform_bits(E: int, cfg: PMQConfig) -> list[int]:  # noqa: N803
    """Every expert at the largest candidate bit-width whose total fits the budget."""
    b = max(x for x in cfg.candidates if x * E <= cfg.budget(E))
    return [b] * E


def brute_force_bits(imp_E: np.ndarray, loss_EB: np.ndarray, cfg: PMQConfig) -> tuple[list[int], float]:
    """Every allocation (``B^E`` of them; tests only): the best feasible one and its objective."""
    E = loss_EB.shape[0]  # noqa: N806
    best, val = None, math.inf
    for combo in itertools.product(cfg.candidates, repeat=E):
        if sum(combo) > cfg.budget(E):
            continue
        if cfg.at_least_one and (cfg.candidates[0] not in combo or cfg.candidates[-1] not in combo):
            continue
        v = objective(list(combo), imp_E, loss_EB, cfg)
        if v < val:
            best, val = list(combo), v
    if best is None:
        raise MoelabError("brute force: no feasible allocation")
    return best, val


def allocate(method: str, imp_E: np.ndarray, loss_EB: np.ndarray, cfg: PMQConfig) -> list[int]:
    """Bits per expert by ``method``: 'pmq', 'greedy' or 'uniform'."""
    if method == "pmq":
        return pmq_bits(imp_E, loss_EB, cfg)
    if method == "greedy":
        return greedy_bits(imp_E, loss_EB, cfg)
    if method == "uniform":
        return uniform_bits(loss_EB.shape[0], cfg)
    raise MoelabError(f"allocate: {method!r}; expected one of {ALLOCATORS}")


def mixed_precision(view, spec, hessians, cfg: PMQConfig, method: str = "pmq", progress: bool = False):
    """Quantise ``view``'s experts at bits per expert chosen by ``method`` under ``cfg``'s budget.

    Each layer's experts are quantised at every candidate bit-width (``spec.method``: GPTQ or RTN, the
    losses from ``hessians``), the allocation is solved per layer, and each expert keeps its tensors at
    its bit-width. Returns a :class:`~moelab.compress.quant.quantize.QuantResult` whose ``calibration``
    also holds, per layer, the importance and the allocation.
    """
    import time

    from moelab.compress.quant.calibrate import calibration_report
    from moelab.compress.quant.quantize import QuantResult, block_progress

    if method not in ALLOCATORS:
        raise MoelabError(f"allocate: {method!r}; expected one of {ALLOCATORS}")
    t0 = time.perf_counter()
    blocks, alloc = {}, {}
    with block_progress(f"quantising at {list(cfg.candidates)} bits", len(view.blocks), progress) as advance:
        for b in view.blocks:
            blocks[b.layer], alloc[str(b.layer)] = _allocate_block(b, spec, hessians[b.layer], cfg, method)
            advance()
    report = calibration_report(hessians) | {"allocation": {"method": method, "avg_bits": cfg.avg_bits,
                                                            "candidates": list(cfg.candidates), "layers": alloc}}
    return QuantResult(spec, blocks, report, time.perf_counter() - t0)


def _allocate_block(b, spec, hs, cfg: PMQConfig, method: str):
    """One block quantised at every candidate width, bits allocated, each expert kept at its width."""
    from moelab.compress.quant.quantize import QuantizedBlock, quantize_block

    cands = [quantize_block(b, spec, hs, [bits] * b.num_experts) for bits in cfg.candidates]
    loss_EB = np.array([c.error for c in cands], float).T
    routed = hs.routed_E.double().cpu().numpy()
    gate_E = np.where(routed > 0, hs.gate_sum_E.cpu().numpy() / np.maximum(routed, 1), 0.0)
    imp_E = importance(routed / max(hs.tokens, 1), gate_E, cfg)
    bits_E = allocate(method, imp_E, loss_EB, cfg)
    pick = [cfg.candidates.index(x) for x in bits_E]
    qb = QuantizedBlock(b.layer, [cands[k].experts[e] for e, k in enumerate(pick)], bits_E,
                        [float(loss_EB[e, k]) for e, k in enumerate(pick)])
    return qb, {"bits": bits_E, "importance": imp_E.tolist(), "loss": loss_EB.tolist(),
                "objective": objective(bits_E, imp_E, loss_EB, cfg)}


__all__ = ["ALLOCATORS", "ALPHA", "BETA", "PMQConfig", "allocate", "brute_force_bits", "greedy_bits", "importance",
           "mixed_precision", "objective", "pmq_bits", "uniform_bits"]
