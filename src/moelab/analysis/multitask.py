"""Multi-task health of multi-gate MoE models (MMoE / PLE / ``MultiGateMoE``): HoME's three anomalies.

Wang et al. 2024, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at Kuaishou"
(arXiv 2408.05430). The paper describes the anomalies in words; the measures below are moelab's
direct reading of them, and the flag thresholds are moelab's defaults (HoME quotes "over 90 % zero
activations" for collapse; the other two thresholds are not from the paper).

Shape legend: T tasks, N samples, E experts (shared and task-specific), F hidden units, H output dim.

1. Expert collapse: experts' outputs differ in scale and some ReLU experts are mostly zeros.
   ``zero_share_E`` = share of exactly-zero hidden activations; ``output_scale_E`` = mean L2 norm of
   the expert's output; ``scale_spread = max / min`` of it; collapsed: ``zero_share > 0.9``.
2. Shared-expert degradation: a shared expert used by only one task. Task t's weight on expert e is
   ``W[t, e] = mean_n gate[t, n, e]``; for a shared expert, ``task_share[t] = W[t, e] / sum_t W[t, e]``
   and ``degradation = max_t task_share`` (1 / T = shared evenly, 1 = one task only); flagged at 0.9.
3. Underfitting: sparse tasks ignore their own experts and lean on shared ones.
   ``lean_T = W_shared / (W_shared + W_own)`` per task; flagged where ``lean > 0.5`` for the tasks
   marked sparse (all tasks when no sparsity is given).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._inputs import AnalysisInputError, EmptySelectionError


@dataclass(frozen=True)
class ExpertCollapse:
    zero_share_E: np.ndarray
    output_scale_E: np.ndarray
    scale_spread: float
    collapsed_E: np.ndarray


def expert_collapse(hidden_NEF: np.ndarray, outputs_NEH: np.ndarray,
                    zero_threshold: float = 0.9) -> ExpertCollapse:
    """Zero-activation share and output-scale spread of each expert (every expert sees every sample)."""
    h = np.asarray(hidden_NEF)
    y = np.asarray(outputs_NEH, dtype=np.float64)
    if h.ndim != 3 or y.ndim != 3 or h.shape[:2] != y.shape[:2]:
        raise AnalysisInputError(
            f"hidden_NEF {h.shape} and outputs_NEH {y.shape} must be [N, E, F] and [N, E, H] with equal N, E"
        )
    if h.shape[0] == 0:
        raise EmptySelectionError("expert_collapse: no samples")
    zero = (h == 0).mean(axis=(0, 2))
    scale = np.linalg.norm(y, axis=2).mean(axis=0)
    spread = float(scale.max() / scale.min()) if scale.min() > 0 else float("inf")
    return ExpertCollapse(zero_share_E=zero, output_scale_E=scale, scale_spread=spread,
                          collapsed_E=zero > zero_threshold)


def _check_gates(gates_TNE: np.ndarray, shared_E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(gates_TNE, dtype=np.float64)
    if g.ndim != 3 or g.shape[1] == 0:
        raise AnalysisInputError(f"gates_TNE must have shape [T, N, E] with N > 0, got {g.shape}")
    s = np.asarray(shared_E, dtype=bool)
    if s.shape != (g.shape[2],):
        raise AnalysisInputError(f"shared_E has shape {s.shape}, expected ({g.shape[2]},)")
    return g, s


@dataclass(frozen=True)
class SharedDegradation:
    shared_experts: np.ndarray  # expert ids of the shared experts, S of them
    task_share_TS: np.ndarray  # columns sum to 1 (0 for a shared expert no task uses)
    degradation_S: np.ndarray  # max over tasks of task_share
    dominant_task_S: np.ndarray
    degraded_S: np.ndarray


def shared_expert_degradation(gates_TNE: np.ndarray, shared_E: np.ndarray,
                              threshold: float = 0.9) -> SharedDegradation:
    """How much of each shared expert's gate weight one task takes."""
    g, shared = _check_gates(gates_TNE, shared_E)
    if not shared.any():
        raise EmptySelectionError("shared_expert_degradation: shared_E marks no shared expert")
    w = g.mean(axis=1)[:, shared]  # [T, S]
    col = w.sum(axis=0)
    share = np.divide(w, col[None, :], out=np.zeros_like(w), where=col[None, :] > 0)
    deg = share.max(axis=0)
    return SharedDegradation(shared_experts=np.flatnonzero(shared), task_share_TS=share, degradation_S=deg,
                             dominant_task_S=share.argmax(axis=0), degraded_S=deg >= threshold)


@dataclass(frozen=True)
class TaskUnderfitting:
    shared_weight_T: np.ndarray
    own_weight_T: np.ndarray
    lean_T: np.ndarray  # shared / (shared + own)
    underfit_T: np.ndarray


def task_underfitting(gates_TNE: np.ndarray, owner_E: np.ndarray, sparse_T: np.ndarray | None = None,
                      threshold: float = 0.5) -> TaskUnderfitting:
    """Share of each task's gate weight on shared experts (``owner_E == -1``) vs its own experts."""
    owner = np.asarray(owner_E)
    g, shared = _check_gates(gates_TNE, owner == -1)
    num_tasks = g.shape[0]
    if owner.min() < -1 or owner.max() >= num_tasks:
        raise AnalysisInputError(f"owner_E must hold -1 (shared) or a task index 0..{num_tasks - 1}")
    w = g.mean(axis=1)  # [T, E]
    shared_w = w[:, shared].sum(axis=1)
    own_w = np.where(owner[None, :] == np.arange(num_tasks)[:, None], w, 0.0).sum(axis=1)
    tot = shared_w + own_w
    lean = np.divide(shared_w, tot, out=np.full(num_tasks, np.nan), where=tot > 0)
    sparse = np.ones(num_tasks, bool) if sparse_T is None else np.asarray(sparse_T, dtype=bool)
    if sparse.shape != (num_tasks,):
        raise AnalysisInputError(f"sparse_T has shape {sparse.shape}, expected ({num_tasks},)")
    return TaskUnderfitting(shared_weight_T=shared_w, own_weight_T=own_w, lean_T=lean,
                            underfit_T=sparse & (np.nan_to_num(lean) > threshold))


def multitask_reference(gates_TNE: np.ndarray, owner_E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slow obvious ``(degradation of each shared expert, lean_T)``."""
    t_dim, n_dim, e_dim = np.shape(gates_TNE)
    w = [[sum(float(gates_TNE[t][n][e]) for n in range(n_dim)) / n_dim for e in range(e_dim)]
         for t in range(t_dim)]
    deg = []
    for e in range(e_dim):
        if owner_E[e] == -1:
            tot = sum(w[t][e] for t in range(t_dim))
            deg.append(max(w[t][e] / tot for t in range(t_dim)) if tot > 0 else 0.0)
    lean = []
    for t in range(t_dim):
        sh = sum(w[t][e] for e in range(e_dim) if owner_E[e] == -1)
        own = sum(w[t][e] for e in range(e_dim) if owner_E[e] == t)
        lean.append(sh / (sh + own) if sh + own > 0 else np.nan)
    return np.array(deg), np.array(lean)
