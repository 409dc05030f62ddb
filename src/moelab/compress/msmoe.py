"""M-SMoE: merge experts around the most-used ("dominant") ones, guided by the routing policy.

Li et al. 2024 (ICLR), "Merge, then Compress: Demystify Efficient SMoE with Hints from Its Routing
Policy" (arXiv 2310.01334; official code UNITES-Lab/MC-SMoE, ``mcsmoe/merging/grouping*.py``). This is
the merging stage (M-SMoE); MC-SMoE's later low-rank compression and distillation are not part of it.
Per MoE layer, over the calibration tokens:

    frequency        f_e = #{(t, k) : ids[t, k] = e} / (T * K)              (sums to 1 over the layer)
    similarity       sim(i, j) = (cos(z[:, i], z[:, j]) + 1) / 2,  z [T, E] the router logits
    dominant experts D = the n most frequent experts (ties: lower index)
    grouping         every e not in D joins argmax_{d in D} sim(e, d) (ties: lower index)
    alignment        each member m of the group of d gets the neuron permutation P_m aligning it to d
                     (weight matching, Git Re-Basin; :func:`moelab.analysis.similarity.align_neurons`)
    merge            W_d' = sum_{m in G_d} f_m P_m(W_m) / sum_{m in G_d} f_m   for gate, up and down
                     (uniform 1/|G_d| when no member was used); the router row of d is kept.

``ids`` is the block's actual selection (the official code takes top-k of the logits; the two agree
unless the family selects with a correction bias or groups). Nothing is random: the plan depends only
on the model and the calibration (``spec.seed`` is recorded, not used).

Similarity: the paper's default, and the default here, is ``'router-logits'`` (columns of router logits
over the calibration tokens, the official ``similarity_base='router-logits'`` with
``similarity_fn='cosine'``). ``'weight'`` (aligned weight cosine) and ``'output'`` (mean per-token
cosine of the expert outputs on the block inputs) are offered for comparison.

Budgets: ``budget='layer'`` keeps ``n = spec.kept_per_layer(E)`` groups in every layer. ``'global'`` is
the paper's allocation: the frequencies of all layers are ranked together (each layer's top ``min_keep``
always kept, the official code's "at least one group per layer") and the ``sum_l kept_per_layer(E_l)``
highest become dominants; moelab breaks ties by (layer, expert) so exactly that total is kept, where
the official threshold ``f > f_(total)`` keeps fewer on ties. Unequal counts per layer cannot be
written as a stock checkpoint (:func:`moelab.compress.apply.apply_plan` refuses them); evaluate them
with :mod:`moelab.compress.simulate`, or use ``alias=True``.

Where moelab differs: the official code *aliases* the members to the merged expert and leaves the
router unchanged (same parameter count); a moelab plan by default drops the members' router rows so
the compressed model really has ``n`` experts (``router_from`` = the dominant); ``alias=True`` gives the
official form (all E experts and router rows kept, each expert a copy of its group's merge). The official code releases
the permutation alignment only for Switch Transformers; here it is applied to every gated family.

Shape legend: T tokens, E experts, K top-k, I expert width.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.analysis.similarity import output_similarity, weight_similarity
from moelab.compress.calib import Calibration, routing_pass
from moelab.compress.hcsmoe import merge_cluster
from moelab.compress.plan import LayerPlan, OutExpert, Plan
from moelab.compress.spec import CompressSpec
from moelab.errors import MoelabError
from moelab.models import ModelView, MoEBlockView, RoutingEvent

METHOD = "m-smoe"
SIMILARITIES = ("router-logits", "weight", "output")


# ---------------------------------------------------------------------------------------------------
# routing statistics: frequency and router-logit similarity


def router_logits(ev: RoutingEvent) -> Tensor:
    """Router logits ``[T, E]`` (float64) of an event: the family's own, or recomputed from the view."""
    if ev.logits_TE is not None:
        return ev.logits_TE.to(torch.float64)
    block = ev.block
    z_TE = ev.hidden_TH.to(torch.float64) @ block.router_weight.to(torch.float64).T
    return z_TE if block.router_bias is None else z_TE + block.router_bias.to(torch.float64)


@dataclass
class RoutingStats:
    """Streaming sums of one layer: ``counts_E`` routed slots per expert, ``gram_EE = z^T z`` of the
    router logits, ``tokens`` seen; enough for frequency and the logit cosine without storing ``z``."""

    counts_E: Tensor
    gram_EE: Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, num_experts: int) -> RoutingStats:
        return cls(torch.zeros(num_experts, dtype=torch.float64),
                   torch.zeros(num_experts, num_experts, dtype=torch.float64))

    def add(self, ids_TK: Tensor, logits_TE: Tensor) -> None:
        E = self.counts_E.shape[0]
        self.counts_E += torch.bincount(ids_TK.reshape(-1).cpu(), minlength=E).to(torch.float64)
        z_TE = logits_TE.to(torch.float64)
        self.gram_EE += (z_TE.T @ z_TE).cpu()
        self.tokens += int(ids_TK.shape[0])

    def frequency(self) -> Tensor:
        """``f_E``: share of routed slots per expert (all zeros when nothing was routed)."""
        total = self.counts_E.sum()
        return self.counts_E / total if total > 0 else torch.zeros_like(self.counts_E)

    def logit_similarity(self) -> Tensor:
        """``(cos + 1) / 2`` between router-logit columns ``[E, E]``; cos is 0 for an all-zero column."""
        norm_E = self.gram_EE.diagonal().clamp(min=0).sqrt()
        denom_EE = norm_E[:, None] * norm_E[None, :]
        cos_EE = torch.where(denom_EE > 0, self.gram_EE / denom_EE.clamp(min=1e-300), 0.0)
        return (cos_EE.clamp(-1.0, 1.0) + 1.0) / 2.0


def reference_routing_stats(logits_TE: Tensor, ids_TK: Tensor) -> tuple[Tensor, Tensor]:
    """Slow obvious ``(f_E, sim_EE)``: counts by a loop over tokens and slots, cosine of explicit columns."""
    T, E = logits_TE.shape
    counts = [0.0] * E
    for t in range(T):
        for k in range(ids_TK.shape[1]):
            counts[int(ids_TK[t, k])] += 1.0
    f_E = torch.tensor(counts, dtype=torch.float64) / (T * ids_TK.shape[1])
    z_TE = logits_TE.to(torch.float64)
    sim_EE = torch.empty(E, E, dtype=torch.float64)
    for i in range(E):
        for j in range(E):
            a, b = z_TE[:, i], z_TE[:, j]
            cos = sum(float(a[t]) * float(b[t]) for t in range(T)) / float(a.norm() * b.norm())
            sim_EE[i, j] = (cos + 1.0) / 2.0
    return f_E, sim_EE


def collect_stats(view: ModelView, calib: Calibration, keep_hidden: bool = False
                  ) -> tuple[dict[int, RoutingStats], dict[int, Tensor]]:
    """One pass over ``calib``: per-layer :class:`RoutingStats`, and the block inputs when asked."""
    stats = {b.layer: RoutingStats.empty(b.num_experts) for b in view.blocks}
    hidden: dict[int, list[Tensor]] = {b.layer: [] for b in view.blocks}

    def on_event(ev: RoutingEvent) -> None:
        stats[ev.block.layer].add(ev.ids_TK, router_logits(ev))
        if keep_hidden:
            hidden[ev.block.layer].append(ev.hidden_TH.detach().to(torch.float64).cpu())

    routing_pass(view, calib, on_event)
    return stats, ({layer: torch.cat(xs) for layer, xs in hidden.items() if xs} if keep_hidden else {})


# ---------------------------------------------------------------------------------------------------
# dominant experts, groups and the merged layer


def _by_frequency(f_E: Tensor) -> list[int]:
    return sorted(range(len(f_E)), key=lambda e: (-float(f_E[e]), e))


def dominant_counts(freqs: dict[int, Tensor], spec: CompressSpec) -> dict[int, int]:
    """Groups per layer: ``kept_per_layer`` ('layer'), or the paper's global frequency ranking ('global')."""
    if spec.budget == "layer":
        return {layer: spec.kept_per_layer(len(f_E)) for layer, f_E in freqs.items()}
    total = sum(spec.kept_per_layer(len(f_E)) for f_E in freqs.values())
    ranked = []
    for layer, f_E in freqs.items():
        for rank, e in enumerate(_by_frequency(f_E)):
            forced = rank < spec.min_keep  # the official code sets each layer's top expert to 1.0
            ranked.append((not forced, -float(f_E[e]), layer, e))
    counts = dict.fromkeys(freqs, 0)
    for _, _, layer, _ in sorted(ranked)[:total]:
        counts[layer] += 1
    return counts


def group_experts(f_E: Tensor, sim_EE: Tensor, num_groups: int) -> dict[int, list[int]]:
    """``dominant -> members`` (dominant first, then ascending): the ``num_groups`` most frequent experts
    are dominants; every other expert joins its most similar dominant (ties: the lower index)."""
    E = len(f_E)
    if not 1 <= num_groups <= E:
        raise MoelabError(f"num_groups: expected 1..{E}, got {num_groups}")
    dominants = sorted(_by_frequency(f_E)[:num_groups])
    groups = {d: [d] for d in dominants}
    for e in range(E):
        if e in groups:
            continue
        best = max(dominants, key=lambda d: (float(sim_EE[e, d]), -d))
        groups[best].append(e)
    return groups


def merge_layer(block: MoEBlockView, groups: dict[int, list[int]], f_E: Tensor, align: bool = True,
                alias: bool = False) -> LayerPlan:
    """The layer plan of frequency-weighted merges of ``groups`` (output experts in dominant order).

    Each group is merged by :func:`moelab.compress.hcsmoe.merge_cluster` (coefficients ``f_m / sum f``,
    uniform when no member was used; router row and alignment target = the most frequent member, which
    is the dominant: it comes first and no other member is more frequent). ``alias``: the paper's form,
    every original expert (in order, own router row) becomes a copy of its group's merged expert.
    """
    merged = {}
    for dom in sorted(groups):
        out = merge_cluster(block, groups[dom], f_E, align)
        if out.router_from != dom:  # cannot happen with groups from group_experts
            raise MoelabError(f"groups: a member of dominant {dom}'s group {groups[dom]} is used more often "
                              f"than {dom}")
        merged.update({e: out for e in groups[dom]} if alias else {dom: out})
    if not alias:
        return LayerPlan(block.layer, list(merged.values()))
    return LayerPlan(block.layer, [OutExpert(merged[e].members, router_from=e) for e in sorted(merged)])


def _similarity(block: MoEBlockView, stats: RoutingStats, similarity: str, hidden_TH: Tensor | None) -> Tensor:
    if similarity == "router-logits":
        return stats.logit_similarity()
    if similarity == "weight":
        return torch.as_tensor(weight_similarity(block, align=True), dtype=torch.float64)
    return torch.as_tensor(output_similarity(block, hidden_TH), dtype=torch.float64)


def plan_msmoe(view: ModelView, calib: Calibration | None, spec: CompressSpec, *,
               similarity: str = "router-logits", align: bool = True, alias: bool = False) -> Plan:
    """M-SMoE merging plan (see the module docstring): one output expert per dominant expert.

    ``similarity``: 'router-logits' (the paper's default), 'weight' or 'output'. ``align``: permute
    each member's neurons onto its dominant before averaging (the paper's alignment); False averages
    the weights as stored. ``alias``: keep all E experts and the router, each expert replaced by its
    group's merged expert, as the official code does (no parameter saving; the paper's routing exactly).
    """
    if calib is None:
        raise MoelabError(f"calib: {METHOD} needs calibration data (see moelab.compress.calibration_batches)")
    if similarity not in SIMILARITIES:
        raise MoelabError(f"similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    for name, flag in (("align", align), ("alias", alias)):
        if not isinstance(flag, bool):
            raise MoelabError(f"{name}: expected True or False, got {flag!r}")
    t0 = time.perf_counter()
    stats, hidden = collect_stats(view, calib, keep_hidden=similarity == "output")
    freqs = {layer: s.frequency() for layer, s in stats.items()}
    counts = dominant_counts(freqs, spec)
    layers, groups_meta = {}, {}
    for block in view.blocks:
        sim_EE = _similarity(block, stats[block.layer], similarity, hidden.get(block.layer))
        groups = group_experts(freqs[block.layer], sim_EE, counts[block.layer])
        layers[block.layer] = merge_layer(block, groups, freqs[block.layer], align, alias)
        groups_meta[str(block.layer)] = [groups[d] for d in sorted(groups)]
    meta = {"method": METHOD, "ratio": spec.ratio, "budget": spec.budget, "seed": spec.seed,
            "similarity": similarity, "align": align, "alias": alias, "calibration": calib.describe(),
            "frequency": {str(layer): f_E.tolist() for layer, f_E in freqs.items()},
            "groups": groups_meta, "seconds": round(time.perf_counter() - t0, 3)}
    return Plan(METHOD, layers, meta=meta)
