"""Expert load and balance of one layer, overall and per label (domain).

Shape legend: N tokens, K top-k slots, E experts, D labels.

Definitions (as in the load-balancing literature: Switch Transformer, Fedus et al. 2021; GShard,
Lepikhin et al. 2020, and the per-domain load plots of Mixtral, Jiang et al. 2024):
- ``tokens_E[e]`` = number of routed slots that chose expert e (a token counts once per slot);
  ``share_E = tokens_E / sum(tokens_E)``; ``weight_E[e]`` = sum of the routing weights of those slots.
- coefficient of variation ``cv = std(tokens_E) / mean(tokens_E)`` (population std; 0 = perfectly
  balanced, sqrt(E - 1) = everything on one expert); ``max_over_mean = max(tokens_E) / mean(tokens_E)``.
- load entropy ``H = -sum_e share_e ln share_e`` in nats and ``H / ln E`` in [0, 1] (1 = uniform).
- mean token weight entropy: per token, the entropy of its top-k weights renormalised to sum 1,
  averaged over tokens with at least one routed slot; with router logits, :func:`router_entropy` gives the entropy of the full
  softmax instead.
- dead: ``tokens_E == 0``; near-dead: ``0 < share_E < near_dead_ratio / E`` (default: fewer than
  10 % of the tokens a perfectly balanced expert would get).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moelab.analysis._inputs import (
    AnalysisInputError,
    MissingFieldError,
    check_ids,
    check_labels,
    check_weights,
    routed,
)


@dataclass(frozen=True)
class LayerLoad:
    """Load of one layer's experts. Arrays are ``[E]``."""

    tokens_E: np.ndarray
    weight_E: np.ndarray
    share_E: np.ndarray
    cv: float
    max_over_mean: float
    entropy: float  # nats
    entropy_norm: float  # entropy / ln E
    mean_weight_entropy: float  # nats, per token over its renormalised top-k weights
    dead_E: np.ndarray
    near_dead_E: np.ndarray


def _balance(tokens_E: np.ndarray) -> tuple[float, float, float, float]:
    num_experts = tokens_E.shape[0]
    mean = tokens_E.mean()
    if mean == 0:
        raise AnalysisInputError("no slot was routed to any expert (all ids are -1)")
    share = tokens_E / tokens_E.sum()
    nz = share[share > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    entropy_norm = entropy / np.log(num_experts) if num_experts > 1 else 1.0
    return float(tokens_E.std() / mean), float(tokens_E.max() / mean), entropy, float(entropy_norm)


def _mean_weight_entropy(ids: np.ndarray, w: np.ndarray) -> float:
    w = np.clip(w, 0.0, None)
    if (ids < 0).any():
        w = np.where(ids >= 0, w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    rows = total[:, 0] > 0
    if not rows.any():
        return 0.0
    p = w[rows] / total[rows] if not rows.all() else w / total
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return float(-(p * logp).sum(axis=1).mean())


def expert_load(ids_NK: np.ndarray, weights_NK: np.ndarray | None, num_experts: int,
                near_dead_ratio: float = 0.1) -> LayerLoad:
    """Load and balance of one layer from its routing ``ids_NK`` (and ``weights_NK`` if given)."""
    ids = check_ids(ids_NK, num_experts)
    if not 0 <= near_dead_ratio < 1:
        raise AnalysisInputError(f"near_dead_ratio must be in [0, 1), got {near_dead_ratio}")
    valid = ids >= 0
    if weights_NK is None:
        (e,) = routed(ids)
        tokens_E = np.bincount(e, minlength=num_experts)
        weight_E = tokens_E.astype(np.float64)
        n_valid = valid.sum(axis=1)
        mwe = float(np.log(n_valid[n_valid > 0]).mean())  # equal weights over the chosen slots
    else:
        w = check_weights(weights_NK, ids)
        e, we = routed(ids, w)
        tokens_E = np.bincount(e, minlength=num_experts)
        weight_E = np.bincount(e, weights=we, minlength=num_experts)
        mwe = _mean_weight_entropy(ids, w)
    cv, mom, ent, ent_norm = _balance(tokens_E)
    share_E = tokens_E / tokens_E.sum()
    return LayerLoad(
        tokens_E=tokens_E, weight_E=weight_E, share_E=share_E, cv=cv, max_over_mean=mom,
        entropy=ent, entropy_norm=ent_norm, mean_weight_entropy=mwe,
        dead_E=tokens_E == 0, near_dead_E=(tokens_E > 0) & (share_E < near_dead_ratio / num_experts),
    )


def expert_load_reference(ids_NK: np.ndarray, weights_NK: np.ndarray | None, num_experts: int,
                          near_dead_ratio: float = 0.1) -> LayerLoad:
    """Slow obvious version of :func:`expert_load`: Python loops over tokens and slots."""
    n, k = np.asarray(ids_NK).reshape(len(ids_NK), -1).shape
    ids = np.asarray(ids_NK).reshape(n, k)
    w = np.ones((n, k)) if weights_NK is None else np.asarray(weights_NK, dtype=np.float64).reshape(n, k)
    tokens = [0] * num_experts
    weight = [0.0] * num_experts
    ent_sum, routed = 0.0, 0
    for t in range(n):
        chosen = [(int(ids[t, j]), float(w[t, j])) for j in range(k) if ids[t, j] >= 0]
        for e, we in chosen:
            tokens[e] += 1
            weight[e] += we
        tot = sum(max(we, 0.0) for _, we in chosen)
        if tot > 0:
            routed += 1
            ent_sum -= sum(max(we, 0) / tot * np.log(max(we, 0) / tot) for _, we in chosen if we > 0)
    total = sum(tokens)
    mean = total / num_experts
    share = [c / total for c in tokens]
    std = (sum((c - mean) ** 2 for c in tokens) / num_experts) ** 0.5
    ent = -sum(s * np.log(s) for s in share if s > 0)
    return LayerLoad(
        tokens_E=np.array(tokens), weight_E=np.array(weight), share_E=np.array(share), cv=std / mean,
        max_over_mean=max(tokens) / mean, entropy=ent,
        entropy_norm=ent / np.log(num_experts) if num_experts > 1 else 1.0,
        mean_weight_entropy=ent_sum / max(routed, 1),
        dead_E=np.array([c == 0 for c in tokens]),
        near_dead_E=np.array([0 < s < near_dead_ratio / num_experts for s in share]),
    )


def router_entropy(logits_NE: np.ndarray | None) -> np.ndarray:
    """Per-token entropy (nats) of the router softmax over all experts, ``[N]``; needs ``--logits``.

    Computed in float32 with float64 sums: absolute error below 1e-5 nats for logits within +-1e4.
    """
    if logits_NE is None:
        raise MissingFieldError("logits", "router_entropy")
    z_all = np.asarray(logits_NE)
    if z_all.ndim != 2 or z_all.shape[0] == 0:
        raise AnalysisInputError(f"logits_NE must have shape [N, E] with N > 0, got {z_all.shape}")
    out = np.empty(z_all.shape[0])
    for lo in range(0, z_all.shape[0], 1 << 16):  # blocks of tokens bound the temporaries
        # float32 exp (SIMD) is ~5x faster than float64 here; H = ln sum e^z - sum p z, z shifted
        z = z_all[lo:lo + (1 << 16)].astype(np.float32)
        z -= z.max(axis=1, keepdims=True)
        ez = np.exp(z)
        total = ez.sum(axis=1, dtype=np.float64)
        out[lo:lo + len(z)] = np.log(total) - (ez * z).sum(axis=1, dtype=np.float64) / total
    return out


@dataclass(frozen=True)
class LabelLoad:
    """Expert load split by label (domain). ``tokens_DE[d, e]``: slots of label-d tokens on expert e."""

    label_names: list[str]
    tokens_DE: np.ndarray
    share_DE: np.ndarray  # rows sum to 1 (0 for labels with no tokens)
    cv_D: np.ndarray
    dead_DE: np.ndarray


def load_by_label(ids_NK: np.ndarray, labels_N: np.ndarray | None, num_experts: int,
                  label_names: list[str] | None = None) -> LabelLoad:
    """Per-label expert load: the per-domain load plots of Mixtral/OLMoE as arrays."""
    ids = check_ids(ids_NK, num_experts)
    labels, names = check_labels(labels_N, ids.shape[0], label_names, "load_by_label")
    num_labels = len(names)
    e, lab = routed(ids, labels)
    tokens_DE = np.bincount(lab * num_experts + e, minlength=num_labels * num_experts)
    tokens_DE = tokens_DE.reshape(num_labels, num_experts)
    row = tokens_DE.sum(axis=1, keepdims=True)
    share_DE = np.divide(tokens_DE, row, out=np.zeros(tokens_DE.shape), where=row > 0)
    mean = tokens_DE.mean(axis=1)
    cv_D = np.divide(tokens_DE.std(axis=1), mean, out=np.full(num_labels, np.nan), where=mean > 0)
    return LabelLoad(label_names=names, tokens_DE=tokens_DE, share_DE=share_DE, cv_D=cv_D,
                     dead_DE=(tokens_DE == 0) & (row > 0))
