"""Domain and vocabulary specialisation of experts.

Shape legend: N tokens, K top-k slots, E experts, D labels (domains), V vocabulary, R top tokens.

Domain specialisation (the per-domain routing analyses of Mixtral, Jiang et al. 2024, and OLMoE,
Muennighoff et al. 2024, §5 "domain specialization"): each expert's label distribution
``q_e(d) = tokens_DE[d, e] / sum_d tokens_DE[d, e]`` is compared with the corpus prior
``pi(d)`` = the label distribution of all routed slots:

    KL_e = sum_d q_e(d) ln(q_e(d) / pi(d))    (nats; 0 = routes like the corpus)
    max_share_e = max_d q_e(d),  lift_DE[d, e] = q_e(d) / pi(d)

Vocabulary specialisation (OLMoE §5 "vocabulary specialization"; moe-lrc ``20_vocab_calc.py``):
``counts_VE[v, e]`` = slots of token id v routed to e. Per expert, its most frequent token ids with
their share of the expert's slots and the share of the token's slots that went to the expert.
Token-to-expert entropy ``H(v) = -sum_e p(e|v) ln p(e|v)`` with ``p(e|v) = counts[v, e] / sum_e
counts[v, e]``: ln K when every occurrence of v goes to the same K experts, ln E when routing ignores
the token id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._inputs import (
    AnalysisInputError,
    EmptySelectionError,
    MissingFieldError,
    check_ids,
)
from moelab.analysis.load import load_by_label


@dataclass(frozen=True)
class DomainSpecialisation:
    """Each expert's label distribution against the corpus prior."""

    label_names: list[str]
    prior_D: np.ndarray
    share_DE: np.ndarray  # q_e(d): columns sum to 1 for experts with tokens
    kl_E: np.ndarray  # nats; NaN for experts never chosen
    max_share_E: np.ndarray
    top_label_E: np.ndarray  # -1 for experts never chosen
    lift_DE: np.ndarray


def domain_specialisation(ids_NK: np.ndarray, labels_N: np.ndarray | None, num_experts: int,
                          label_names: list[str] | None = None) -> DomainSpecialisation:
    """KL and max share of each expert's label distribution against the corpus prior."""
    by = load_by_label(ids_NK, labels_N, num_experts, label_names)
    return _from_counts(by.tokens_DE, by.label_names)


def _from_counts(tokens_DE: np.ndarray, names: list[str]) -> DomainSpecialisation:
    total = tokens_DE.sum()
    prior = tokens_DE.sum(axis=1) / total
    col = tokens_DE.sum(axis=0)
    used = col > 0
    q = np.divide(tokens_DE, col[None, :], out=np.zeros(tokens_DE.shape), where=used[None, :])
    ratio = np.divide(q, prior[:, None], out=np.zeros_like(q), where=prior[:, None] > 0)
    terms = np.where(q > 0, q * np.log(np.where(q > 0, ratio, 1.0)), 0.0)
    return DomainSpecialisation(
        label_names=names, prior_D=prior, share_DE=q,
        kl_E=np.where(used, terms.sum(axis=0), np.nan), max_share_E=q.max(axis=0),
        top_label_E=np.where(used, q.argmax(axis=0), -1), lift_DE=ratio,
    )


def domain_specialisation_reference(ids_NK: np.ndarray, labels_N: np.ndarray, num_experts: int,
                                    num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Slow obvious ``(kl_E, max_share_E)`` from Python counts."""
    counts = [[0] * num_labels for _ in range(num_experts)]
    for row, lab in zip(np.asarray(ids_NK), np.asarray(labels_N), strict=False):
        for e in np.atleast_1d(row):
            if e >= 0:
                counts[int(e)][int(lab)] += 1
    total = sum(map(sum, counts))
    prior = [sum(counts[e][d] for e in range(num_experts)) / total for d in range(num_labels)]
    kl, mx = [], []
    for e in range(num_experts):
        n = sum(counts[e])
        if n == 0:
            kl.append(np.nan)
            mx.append(0.0)
            continue
        q = [c / n for c in counts[e]]
        kl.append(sum(qd * np.log(qd / pd) for qd, pd in zip(q, prior, strict=False) if qd > 0))
        mx.append(max(q))
    return np.array(kl), np.array(mx)


@dataclass(frozen=True)
class VocabularySpecialisation:
    """Top token ids per expert and how spread each token id is over experts."""

    top_tokens_ER: np.ndarray  # token ids, most frequent first (-1 padding)
    top_share_ER: np.ndarray  # share of the expert's slots taken by that token id
    top_precision_ER: np.ndarray  # share of that token id's slots routed to the expert
    token_entropy_V: np.ndarray  # nats; NaN for token ids seen fewer than min_count times
    token_count_V: np.ndarray
    mean_token_entropy: float  # frequency-weighted over token ids with >= min_count occurrences


def token_expert_counts(ids_NK: np.ndarray, token_ids_N: np.ndarray | None, num_experts: int,
                        vocab_size: int | None = None) -> np.ndarray:
    """``counts_VE[v, e]``: routed slots of token id v that chose expert e."""
    ids = check_ids(ids_NK, num_experts)
    if token_ids_N is None:
        raise MissingFieldError("token_ids", "vocabulary specialisation")
    tok = np.asarray(token_ids_N)
    if tok.shape != (ids.shape[0],) or not np.issubdtype(tok.dtype, np.integer) or tok.min() < 0:
        raise AnalysisInputError(f"token_ids_N must be non-negative integers of shape ({ids.shape[0]},)")
    vocab_size = int(tok.max()) + 1 if vocab_size is None else vocab_size
    if tok.max() >= vocab_size:
        raise AnalysisInputError(f"token_ids_N holds id {int(tok.max())} >= vocab_size {vocab_size}")
    valid = ids >= 0
    flat = np.broadcast_to(tok[:, None], ids.shape)[valid] * num_experts + ids[valid]
    return np.bincount(flat, minlength=vocab_size * num_experts).reshape(vocab_size, num_experts)


def vocabulary_specialisation(ids_NK: np.ndarray, token_ids_N: np.ndarray | None, num_experts: int,
                              vocab_size: int | None = None, top: int = 10,
                              min_count: int = 20) -> VocabularySpecialisation:
    """Top ``top`` token ids per expert and token-to-expert entropy (see the module docstring).

    ``min_count`` (moe-lrc's ``vocab_min_freq`` = 20) keeps rare token ids out of the entropy.
    """
    counts = token_expert_counts(ids_NK, token_ids_N, num_experts, vocab_size)
    if top < 1:
        raise AnalysisInputError(f"top must be >= 1, got {top}")
    top = min(top, counts.shape[0])
    per_token = counts.sum(axis=1)
    per_expert = counts.sum(axis=0)
    # argpartition then sort the R winners: O(V E) instead of a full sort of V per expert
    cand = np.argpartition(-counts, top - 1, axis=0)[:top].T  # [E, R]
    cand_counts = np.take_along_axis(counts.T, cand, axis=1)
    order = np.lexsort((cand, -cand_counts), axis=1)
    tokens = np.take_along_axis(cand, order, axis=1)
    tc = np.take_along_axis(cand_counts, order, axis=1)
    share = np.divide(tc, per_expert[:, None], out=np.zeros(tc.shape), where=per_expert[:, None] > 0)
    precision = np.divide(tc, per_token[tokens], out=np.zeros(tc.shape), where=per_token[tokens] > 0)
    p = np.divide(counts, per_token[:, None], out=np.zeros(counts.shape), where=per_token[:, None] > 0)
    ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
    keep = per_token >= min_count
    if not keep.any():
        raise EmptySelectionError(f"no token id occurs at least min_count={min_count} times")
    ent = np.where(keep, ent, np.nan)
    mean = float((ent[keep] * per_token[keep]).sum() / per_token[keep].sum())
    return VocabularySpecialisation(
        top_tokens_ER=np.where(tc > 0, tokens, -1), top_share_ER=share, top_precision_ER=precision,
        token_entropy_V=ent, token_count_V=per_token, mean_token_entropy=mean,
    )


def token_entropy_reference(ids_NK: np.ndarray, token_ids_N: np.ndarray, token: int) -> float:
    """Slow obvious H(v) for one token id."""
    counts: dict[int, int] = {}
    for row, v in zip(np.asarray(ids_NK), np.asarray(token_ids_N), strict=False):
        if v == token:
            for e in np.atleast_1d(row):
                if e >= 0:
                    counts[int(e)] = counts.get(int(e), 0) + 1
    n = sum(counts.values())
    return float(-sum(c / n * np.log(c / n) for c in counts.values()))

