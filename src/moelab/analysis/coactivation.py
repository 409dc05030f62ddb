"""Expert co-activation within a layer, transitions across consecutive layers, stable partners.

Shape legend: N tokens, K top-k slots, E experts (F: experts of the next layer), P partners, C chunks.

Definitions:
- within a layer, ``C_EE[i, j]`` (i != j) = number of tokens that chose both i and j; the diagonal
  holds each expert's token count. ``P(j | i) = C[i, j] / C[i, i]`` is the conditional
  co-activation rate; with uniformly random top-k routing it is (K - 1) / (E - 1) for every pair.
- across layers, ``T_EF[i, j]`` = number of tokens that chose i in layer l and j in layer l + 1
  (the "expert transition" plots of OpenMoE, Xue et al. 2024, and of MoE-Infinity's activation
  matrices); ``P(j | i) = T[i, j] / tokens_l[i]``.
- stable partners (Dynamic-DINO, Lu et al. 2025, arXiv 2507.17436: "in the deeper layers each
  expert maintains 2-3 fixed partners"). The paper reports this qualitatively; moelab summarises it
  as: an expert's partners are the P experts with the highest ``P(j | i)``; ``partner_share`` is the
  fraction of its co-activations that go to them (P / (E - 1) under random routing); ``stability`` is
  the mean over C contiguous chunks of the trace of |partners(chunk) ∩ partners(all)| / P (about
  P / (E - 1) by chance, 1 = the same partners in every chunk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._inputs import AnalysisInputError, EmptySelectionError, check_ids


def _cross_counts(a: np.ndarray, b: np.ndarray, num_a: int, num_b: int, upper: bool = False) -> np.ndarray:
    """``counts[i, j]`` = number of (token, slot s of a, slot r of b) with a[t, s] = i and b[t, r] = j.

    With ``upper`` (a is b), only slot pairs s < r are counted. One bincount per slot of ``a``: a loop
    over the K slots, not over tokens.
    """
    out = np.zeros(num_a * num_b + 1, dtype=np.int64)  # last bin collects pairs with a -1 slot
    for s in range(a.shape[1]):
        other = b[:, s + 1:] if upper else b
        if other.shape[1] == 0:
            continue
        codes = a[:, s, None] * num_b + other
        if (a[:, s] < 0).any() or (other < 0).any():
            codes = np.where((a[:, s, None] >= 0) & (other >= 0), codes, num_a * num_b)
        out += np.bincount(codes.ravel(), minlength=out.size)
    return out[:-1].reshape(num_a, num_b)


def coactivation(ids_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """Co-activation counts ``C_EE`` of one layer (symmetric, diagonal = tokens per expert)."""
    return _coactivation(check_ids(ids_NK, num_experts), num_experts)


def _coactivation(ids: np.ndarray, num_experts: int) -> np.ndarray:
    pairs = _cross_counts(ids, ids, num_experts, num_experts, upper=True)
    c = pairs + pairs.T
    c[np.diag_indices(num_experts)] += np.bincount(ids[ids >= 0], minlength=num_experts)
    return c


def coactivation_reference(ids_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """Slow obvious :func:`coactivation`: loop over tokens and pairs of chosen experts."""
    c = np.zeros((num_experts, num_experts), dtype=np.int64)
    for row in np.asarray(ids_NK).reshape(len(ids_NK), -1):
        chosen = sorted({int(e) for e in row if e >= 0})
        for i in chosen:
            for j in chosen:
                c[i, j] += 1
    return c


def conditional_rate(counts_EF: np.ndarray, tokens_E: np.ndarray | None = None) -> np.ndarray:
    """``P(j | i) = counts[i, j] / tokens[i]`` (``tokens`` defaults to the diagonal); 0 where unused."""
    c = np.asarray(counts_EF, dtype=np.float64)
    tok = np.diag(c) if tokens_E is None else np.asarray(tokens_E, dtype=np.float64)
    return np.divide(c, tok[:, None], out=np.zeros_like(c), where=tok[:, None] > 0)


def layer_transitions(ids_a_NK: np.ndarray, ids_b_NK: np.ndarray, num_experts_a: int,
                      num_experts_b: int | None = None) -> np.ndarray:
    """Transition counts ``T_EF[i, j]``: tokens choosing i in one layer and j in the next."""
    num_experts_b = num_experts_a if num_experts_b is None else num_experts_b
    a = check_ids(ids_a_NK, num_experts_a, "ids_a_NK")
    b = check_ids(ids_b_NK, num_experts_b, "ids_b_NK")
    if a.shape[0] != b.shape[0]:
        raise AnalysisInputError(f"ids_a_NK has {a.shape[0]} tokens but ids_b_NK has {b.shape[0]}")
    return _cross_counts(a, b, num_experts_a, num_experts_b)


def layer_transitions_reference(ids_a_NK: np.ndarray, ids_b_NK: np.ndarray, num_experts_a: int,
                                num_experts_b: int | None = None) -> np.ndarray:
    """Slow obvious :func:`layer_transitions`."""
    num_experts_b = num_experts_a if num_experts_b is None else num_experts_b
    t = np.zeros((num_experts_a, num_experts_b), dtype=np.int64)
    for ra, rb in zip(np.asarray(ids_a_NK), np.asarray(ids_b_NK), strict=False):
        for i in {int(e) for e in np.atleast_1d(ra) if e >= 0}:
            for j in {int(e) for e in np.atleast_1d(rb) if e >= 0}:
                t[i, j] += 1
    return t


@dataclass(frozen=True)
class PartnerSummary:
    """Each expert's top-P co-activation partners and how stable they are across chunks."""

    partners_EP: np.ndarray  # expert ids, best first; -1 where fewer than P partners exist
    rate_EP: np.ndarray  # P(partner | expert)
    partner_share_E: np.ndarray  # share of the expert's co-activations that go to its partners
    stability_E: np.ndarray  # mean overlap of chunk partners with overall partners, in [0, 1]
    chance_share: float  # partner_share under uniformly random routing: P / (E - 1)


def _top_partners(counts_EE: np.ndarray, num_partners: int) -> tuple[np.ndarray, np.ndarray]:
    rate = conditional_rate(counts_EE)
    np.fill_diagonal(rate, -1.0)
    # stable sort on (-rate) so ties keep the lower expert id: deterministic partner lists
    order = np.argsort(-rate, axis=1, kind="stable")[:, :num_partners]
    top = np.take_along_axis(rate, order, axis=1)
    return np.where(top > 0, order, -1), np.clip(top, 0.0, None)


def stable_partners(ids_NK: np.ndarray, num_experts: int, num_partners: int = 3,
                    num_chunks: int = 8) -> PartnerSummary:
    """Dynamic-DINO's stable partner sets of one layer (see the module docstring)."""
    ids = check_ids(ids_NK, num_experts)
    if not 1 <= num_partners < num_experts:
        raise AnalysisInputError(f"num_partners must be in [1, {num_experts - 1}], got {num_partners}")
    if num_chunks < 1 or num_chunks > ids.shape[0]:
        raise EmptySelectionError(f"num_chunks must be in [1, {ids.shape[0]}] (tokens), got {num_chunks}")
    # counts per contiguous chunk, summed for the whole layer: one pass over the tokens
    chunk_counts = [_coactivation(c, num_experts) for c in np.array_split(ids, num_chunks)]
    counts = np.sum(chunk_counts, axis=0)
    partners, rate = _top_partners(counts, num_partners)
    off = counts.sum(axis=1) - np.diag(counts)
    top_counts = np.take_along_axis(counts, np.clip(partners, 0, None), axis=1) * (partners >= 0)
    share = np.divide(top_counts.sum(axis=1), off, out=np.zeros(num_experts), where=off > 0)
    overlap = np.zeros(num_experts)
    for c in chunk_counts:
        part_c, _ = _top_partners(c, num_partners)
        same = (part_c[:, :, None] == partners[:, None, :]) & (partners[:, None, :] >= 0)
        overlap += same.any(axis=2).sum(axis=1) / num_partners
    return PartnerSummary(partners_EP=partners, rate_EP=rate, partner_share_E=share,
                          stability_E=overlap / num_chunks,
                          chance_share=num_partners / (num_experts - 1))
