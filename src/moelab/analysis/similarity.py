"""Expert similarity: weight-space cosine after neuron alignment, and output similarity on tokens.

These are the inputs that expert merging needs.

* **Weight similarity after neuron alignment.** An expert's intermediate neurons can be permuted
  without changing its function (permute the rows of ``gate``/``up``, their biases, and the columns
  of ``down`` together), so two experts are compared only after aligning expert j's neurons to expert
  i's. This is the weight matching of Ainsworth et al. 2023, "Git Re-Basin" (arXiv 2209.04836), which
  M-SMoE (Li et al. 2024, "Merge, Then Compress", arXiv 2310.01334; UNITES-Lab/MC-SMoE
  ``permute-model.py``) applies to experts before merging them. Neuron n of expert e is the vector

      f_e[n] = [gate[e][n, :] | up[e][n, :] | down[e][:, n] | gate_bias[e][n] | up_bias[e][n]]  (length 3H(+2))

  and the alignment is the permutation ``perm`` maximising ``sum_n <f_i[n], f_j[perm[n]]>``, an exact
  linear assignment solved here by the Hungarian algorithm (:func:`linear_assignment`; scipy is not a
  dependency of moelab). The similarity is the cosine between the two experts' whole weight vectors
  (all the neuron vectors above, plus ``down_bias``) after the alignment:

      wsim[i, j] = (sum_n <f_i[n], f_j[perm[n]]> + <down_bias[i], down_bias[j]>) / (|w_i| |w_j|)

  which is symmetric, since aligning i to j uses the inverse permutation and the same objective.

* **Output similarity.** Every expert is run (unweighted, see :func:`moelab.models.expert_forward`)
  on the same hidden states ``x_t`` entering the block, as HC-SMoE does (Chen et al. 2025,
  "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering", arXiv 2410.08589;
  wazenmai/HC-SMoE). ``reduce="token"`` gives ``mean_t cos(E_i(x_t), E_j(x_t))``; ``reduce="mean"``
  gives the cosine of the mean outputs ``o_e = mean_t E_e(x_t)`` (HC-SMoE's expert representation,
  :func:`mean_expert_outputs`).

All computation is float64 on the device of the weights; results are numpy arrays on the CPU.
Cost of :func:`aligned_weight_similarity`: E(E-1)/2 assignments of O(I^3) each (about 0.03 s at
I = 256 and 0.4 s at I = 768 on one CPU core) and the neuron vectors of all experts in memory
(E * I * 3H float64); for very wide experts (I in the thousands) use ``align=False`` or align only
the pairs a merge needs with :func:`align_neurons`.

Shape legend: E experts, I expert intermediate width, H hidden size, T tokens, F neuron feature
length (3H, +2 with gate/up biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from moelab.analysis._inputs import AnalysisInputError, EmptySelectionError
from moelab.models import ModelView, MoEBlockView, expert_forward
from moelab.run import run_batches


def _check_block(block: MoEBlockView) -> None:
    if block.gate is None or block.up is None or block.down is None:
        raise AnalysisInputError(
            f"block {block.path!r} exposes no expert weights (gate/up/down); expert similarity needs them"
        )


def _check_expert(block: MoEBlockView, e: int, name: str) -> int:
    if not 0 <= int(e) < block.num_experts:
        raise AnalysisInputError(f"{name}: expected an expert of 0..{block.num_experts - 1}, got {e}")
    return int(e)


def neuron_features(block: MoEBlockView, e: int) -> Tensor:
    """The neuron vectors ``f_e [I, F]`` of expert ``e`` (float64; see the module docstring)."""
    _check_block(block)
    e = _check_expert(block, e, "e")
    parts = [block.gate[e], block.up[e], block.down[e].T]
    parts += [b[e][:, None] for b in (block.gate_bias, block.up_bias) if b is not None]
    return torch.cat([p.detach().to(torch.float64) for p in parts], dim=1)


def linear_assignment(score_NN: np.ndarray, maximize: bool = True) -> np.ndarray:
    """Exact linear assignment of a square matrix by the Hungarian algorithm (Kuhn-Munkres with
    potentials, O(N^3); the inner scan over columns is vectorised).

    Returns ``perm_N`` with row r assigned to column ``perm[r]``, maximising (or, with
    ``maximize=False``, minimising) ``sum_r score[r, perm[r]]``.
    """
    a = np.asarray(score_NN, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise AnalysisInputError(f"score_NN must be a square matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise AnalysisInputError("score_NN holds NaN or infinite values")
    cost = -a if maximize else a
    n = cost.shape[0]
    # 1-based columns with a virtual column 0, as in the classic formulation
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    row_of = np.zeros(n + 1, dtype=np.int64)  # row_of[j]: row (1-based) matched to column j, 0 = none
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            free = ~used
            free[0] = False
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free[1:] & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free[1:], minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # augment along the alternating path
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    perm = np.empty(n, dtype=np.int64)
    perm[row_of[1:] - 1] = np.arange(n)
    return perm


def linear_assignment_reference(score_NN: np.ndarray) -> np.ndarray:
    """Slow obvious maximising assignment: try every permutation (N <= 8)."""
    import itertools

    n = len(score_NN)
    best = max(itertools.permutations(range(n)), key=lambda p: sum(score_NN[r][p[r]] for r in range(n)))
    return np.array(best, dtype=np.int64)


def align_neurons(block: MoEBlockView, i: int, j: int) -> np.ndarray:
    """The permutation ``perm [I]`` that aligns expert ``j``'s neurons to expert ``i``'s.

    Neuron n of expert i is matched with neuron ``perm[n]`` of expert j; the aligned copy of expert j
    is ``gate[j][perm]``, ``up[j][perm]``, ``down[j][:, perm]`` (and ``gate_bias[j][perm]``,
    ``up_bias[j][perm]``), which computes exactly the same function as expert j.
    """
    _check_block(block)
    i, j = _check_expert(block, i, "i"), _check_expert(block, j, "j")
    score_II = neuron_features(block, i) @ neuron_features(block, j).T
    return linear_assignment(score_II.cpu().numpy())


@dataclass(frozen=True)
class WeightSimilarity:
    """Aligned weight-space cosine of every pair of experts of one block.

    ``sim_EE[i, j]``: cosine after aligning j to i (1 on the diagonal; symmetric).
    ``perm_EEI[i, j]``: the permutation aligning expert j to expert i (see :func:`align_neurons`);
    ``perm_EEI[i, i]`` is the identity and ``perm_EEI[j, i]`` is the inverse of ``perm_EEI[i, j]``.
    """

    sim_EE: np.ndarray
    perm_EEI: np.ndarray


def aligned_weight_similarity(block: MoEBlockView, align: bool = True) -> WeightSimilarity:
    """Weight cosine of all expert pairs and their alignments (``align=False``: identity alignment,
    i.e. the plain cosine of the stored weights)."""
    _check_block(block)
    num_e, width = block.num_experts, block.intermediate_size
    feats = [neuron_features(block, e) for e in range(num_e)]
    sq = np.array([float((f * f).sum()) for f in feats])
    down_b = None if block.down_bias is None else block.down_bias.detach().to(torch.float64)
    if down_b is not None:
        sq = sq + (down_b * down_b).sum(dim=1).cpu().numpy()
    norm_E = np.sqrt(sq)
    sim = np.eye(num_e)
    perm = np.broadcast_to(np.arange(width), (num_e, num_e, width)).copy()
    for i in range(num_e):
        for j in range(i + 1, num_e):
            if align:
                score_II = (feats[i] @ feats[j].T).cpu().numpy()
                p = linear_assignment(score_II)
                dot = float(score_II[np.arange(width), p].sum())
            else:  # identity alignment: no [I, I] score matrix needed
                p = np.arange(width)
                dot = float((feats[i] * feats[j]).sum())
            if down_b is not None:
                dot += float(down_b[i] @ down_b[j])
            denom = norm_E[i] * norm_E[j]
            sim[i, j] = sim[j, i] = dot / denom if denom > 0 else 0.0
            perm[i, j] = p
            perm[j, i] = np.argsort(p)
    return WeightSimilarity(sim_EE=sim, perm_EEI=perm)


def weight_similarity(block: MoEBlockView, align: bool = True) -> np.ndarray:
    """Aligned weight-space cosine ``[E, E]`` of the block's experts (see the module docstring)."""
    return aligned_weight_similarity(block, align).sim_EE


def _check_hidden(block: MoEBlockView, hidden_TH: Tensor) -> Tensor:
    if not isinstance(hidden_TH, Tensor):
        raise AnalysisInputError(f"hidden_TH must be a torch.Tensor, got {type(hidden_TH).__name__}")
    if hidden_TH.shape[-1] != block.hidden_size:
        raise AnalysisInputError(
            f"hidden_TH has shape {tuple(hidden_TH.shape)}, expected [..., {block.hidden_size}] (the block's hidden size)"
        )
    x_TH = hidden_TH.reshape(-1, block.hidden_size)
    if x_TH.shape[0] == 0:
        raise EmptySelectionError("hidden_TH has no tokens")
    return x_TH.detach().to(device=block.gate.device, dtype=torch.float64)


def mean_expert_outputs(block: MoEBlockView, hidden_TH: Tensor, chunk: int = 1024) -> np.ndarray:
    """HC-SMoE's expert representation: ``o_e = mean_t E_e(x_t)`` over all given tokens, ``[E, H]``."""
    _check_block(block)
    x_TH = _check_hidden(block, hidden_TH)
    total_EH = torch.zeros(block.num_experts, block.hidden_size, dtype=torch.float64, device=x_TH.device)
    with torch.no_grad():
        for x_CH in x_TH.split(chunk):
            for e in range(block.num_experts):
                total_EH[e] += expert_forward(block, e, x_CH).sum(dim=0)
    return (total_EH / x_TH.shape[0]).cpu().numpy()


def _cosine_matrix(a_EH: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(a_EH, axis=1)
    safe = np.where(norm > 0, norm, 1.0)
    unit = a_EH / safe[:, None]
    return unit @ unit.T


def output_similarity(block: MoEBlockView, hidden_TH: Tensor, reduce: str = "token",
                      chunk: int = 1024) -> np.ndarray:
    """Output similarity ``[E, E]`` of the block's experts on the hidden states ``hidden_TH [T, H]``
    (or ``[..., H]``) entering the block.

    ``reduce="token"``: ``mean_t cos(E_i(x_t), E_j(x_t))`` (an output of norm 0 has cosine 0 with
    everything); ``reduce="mean"``: the cosine of the mean outputs (:func:`mean_expert_outputs`).
    """
    if reduce not in ("token", "mean"):
        raise AnalysisInputError(f"reduce: expected 'token' or 'mean', got {reduce!r}")
    if chunk < 1:
        raise AnalysisInputError(f"chunk: expected >= 1, got {chunk}")
    if reduce == "mean":
        return _cosine_matrix(mean_expert_outputs(block, hidden_TH, chunk))
    _check_block(block)
    x_TH = _check_hidden(block, hidden_TH)
    gram_EE = torch.zeros(block.num_experts, block.num_experts, dtype=torch.float64, device=x_TH.device)
    with torch.no_grad():
        for x_CH in x_TH.split(chunk):
            y_ECH = torch.stack([expert_forward(block, e, x_CH) for e in range(block.num_experts)])
            norm_EC1 = y_ECH.norm(dim=-1, keepdim=True)
            unit_ECH = y_ECH / torch.where(norm_EC1 > 0, norm_EC1, torch.ones_like(norm_EC1))
            gram_EE += torch.einsum("ech,fch->ef", unit_ECH, unit_ECH)
    return (gram_EE / x_TH.shape[0]).cpu().numpy()


def block_inputs(view: ModelView, batches: list[Tensor], layers: list[int] | None = None) -> dict[int, Tensor]:
    """The hidden states ``[T, H]`` entering each MoE block over the token ``batches`` (each
    ``[B, S]`` int64), by decoder-layer index; ``layers`` restricts to some blocks."""
    if not batches:
        raise EmptySelectionError("batches is empty: block_inputs needs at least one batch of token ids")
    blocks = view.blocks if layers is None else [view.block(x) for x in layers]
    got: dict[int, list[Tensor]] = {b.layer: [] for b in blocks}
    run_batches(view.model, batches, handles=[
        b.register_routing_hook(lambda ev: got[ev.block.layer].append(ev.hidden_TH.detach())) for b in blocks])
    return {layer: torch.cat(xs) for layer, xs in got.items()}


def model_similarity(view: ModelView, hidden_by_layer: dict[int, Tensor] | None = None,
                     align: bool = True) -> dict[str, dict[int, np.ndarray]]:
    """Per-layer ``[E, E]`` similarities of a whole model: ``{"weight": {layer: sim_EE}}``, plus
    ``"output"`` (token-averaged cosine) for the layers in ``hidden_by_layer`` (see :func:`block_inputs`)."""
    out: dict[str, dict[int, np.ndarray]] = {"weight": {}}
    for b in view.blocks:
        out["weight"][b.layer] = weight_similarity(b, align)
    if hidden_by_layer is not None:
        out["output"] = {layer: output_similarity(view.block(layer), x) for layer, x in hidden_by_layer.items()}
    return out
