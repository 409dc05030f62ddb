"""HC-SMoE: merge each layer's experts by hierarchical clustering of their outputs.

Chen et al. 2025, "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering" (ICML 2025,
arXiv:2410.08589; wazenmai/HC-SMoE, ``hcsmoe/merging/clustering.py``). Per MoE layer:

1. Expert representation: every expert is run on *all* calibration tokens entering the layer,
   ``o_e = mean_t E_e(x_t)`` (``[E, H]``, :func:`moelab.analysis.similarity.mean_expert_outputs`).
2. Agglomerative clustering of the ``o_e`` under Euclidean distance into ``kept`` clusters, with
   average linkage (the paper's default; single and complete are options):

       d(A, B) = mean_{a in A, b in B} ||o_a - o_b||_2         (average)
       d(A, B) = min ... (single),  max ... (complete)

   merging the closest pair until ``kept`` clusters remain (ties: the pair of lowest indices).
3. Frequency-weighted merge within each cluster C: ``W = sum_{e in C} f_e W_e / sum_{e in C} f_e``
   for gate, up and down (and biases), where ``f_e`` is the number of calibration top-k selections
   of expert e (uniform weights when the whole cluster was never selected).

The merged expert takes the router row of the cluster's most frequent member (a compressed layer
has one router row per expert; the paper's code aliases experts and keeps the router). Optionally
(``align=True``, not in the paper) each member's neurons are first permuted onto that member's
with :func:`moelab.analysis.similarity.align_neurons`.

Shape legend: E experts, H hidden, T tokens, C clusters.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moelab.analysis.similarity import align_neurons, mean_expert_outputs
from moelab.compress.calib import Calibration
from moelab.compress.common import planner_inputs
from moelab.compress.plan import LayerPlan, Member, OutExpert, Plan
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView

LINKAGES = ("average", "single", "complete")


def pairwise_distances(points_EH: np.ndarray) -> np.ndarray:
    """Euclidean distances ``[E, E]`` (float64, exact zeros on the diagonal)."""
    p = np.asarray(points_EH, dtype=np.float64)
    d_EE = np.sqrt(np.maximum(((p[:, None, :] - p[None, :, :]) ** 2).sum(-1), 0.0))
    np.fill_diagonal(d_EE, 0.0)
    return d_EE


def agglomerative(points_EH: np.ndarray, num_clusters: int, linkage: str = "average") -> list[list[int]]:
    """Bottom-up clustering of the rows of ``points_EH`` into ``num_clusters`` clusters.

    Linkage distances are updated with the Lance-Williams formulas (average: size-weighted mean;
    single: min; complete: max). Returns clusters as sorted member lists, ordered by first member.
    """
    if linkage not in LINKAGES:
        raise MoelabError(f"linkage: expected one of {LINKAGES}, got {linkage!r}")
    E = len(points_EH)
    if not 1 <= num_clusters <= E:
        raise MoelabError(f"num_clusters: expected 1..{E}, got {num_clusters}")
    d = pairwise_distances(points_EH)
    members = {i: [i] for i in range(E)}
    alive = list(range(E))
    while len(alive) > num_clusters:
        sub = d[np.ix_(alive, alive)] + np.diag(np.full(len(alive), np.inf))
        flat = int(np.argmin(sub))  # row-major: the first minimum is the lowest (i, j) pair
        i, j = alive[flat // len(alive)], alive[flat % len(alive)]
        i, j = min(i, j), max(i, j)
        ni, nj = len(members[i]), len(members[j])
        if linkage == "average":
            merged = (ni * d[i] + nj * d[j]) / (ni + nj)
        elif linkage == "single":
            merged = np.minimum(d[i], d[j])
        else:
            merged = np.maximum(d[i], d[j])
        d[i, :], d[:, i] = merged, merged
        d[i, i] = 0.0
        members[i] = sorted(members[i] + members.pop(j))
        alive.remove(j)
    return sorted((members[a] for a in alive), key=lambda m: m[0])


def merge_cluster(block: MoEBlockView, cluster: list[int], freq_E: torch.Tensor, align: bool) -> OutExpert:
    """The frequency-weighted merge of one cluster (router row of its most frequent member)."""
    f = np.array([float(freq_E[e]) for e in cluster])
    coef = f / f.sum() if f.sum() > 0 else np.full(len(cluster), 1.0 / len(cluster))
    lead = cluster[int(np.argmax(f))]  # first on ties
    members = []
    for e, c in zip(cluster, coef, strict=True):
        perm = None
        if align and e != lead:
            perm = torch.as_tensor(np.asarray(align_neurons(block, lead, e)), dtype=torch.long)
        members.append(Member(int(e), float(c), perm))
    return OutExpert(members, router_from=int(lead))


def plan_hcsmoe(view: ModelView, calib: Calibration | None, spec: CompressSpec, *, linkage: str = "average",
                align: bool = False, kept: int | dict[int, int] | None = None, min_tokens: int = 32) -> Plan:
    """HC-SMoE merging plan (see the module docstring).

    Options: ``linkage`` 'average' (default), 'single' or 'complete'; ``align`` permutes members'
    neurons onto the lead member before merging; ``kept`` overrides the clusters per layer (an int
    or ``{layer: n}``); ``min_tokens`` least calibration tokens accepted.
    """
    start = time.perf_counter()
    if linkage not in LINKAGES:
        raise MoelabError(f"linkage: expected one of {LINKAGES}, got {linkage!r}")
    calib, counts, inputs = planner_inputs(view, calib, spec, kept, "hc-smoe", min_tokens)
    layers, clusters = {}, {}
    for b in view.blocks:
        li = inputs[b.layer]
        o_EH = mean_expert_outputs(b, li.hidden_TH)
        groups = agglomerative(o_EH, counts[b.layer], linkage)
        layers[b.layer] = LayerPlan(b.layer, [merge_cluster(b, g, li.freq_E, align) for g in groups])
        clusters[str(b.layer)] = groups
    meta = {"method": "hc-smoe", "ratio": spec.ratio, "seed": spec.seed, "linkage": linkage, "align": align,
            "calibration": calib.describe(), "clusters": clusters,
            "frequency": {str(layer): li.freq_E.tolist() for layer, li in inputs.items()},
            "seconds": time.perf_counter() - start}
    return Plan("hc-smoe", layers, meta=meta)


__all__ = ["LINKAGES", "agglomerative", "merge_cluster", "pairwise_distances", "plan_hcsmoe"]
