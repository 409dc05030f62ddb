"""The headline table as headers, rows and a legend: shared by ``moelab analyze`` and the HTML report."""

from __future__ import annotations

from typing import Any

from moelab.analysis.headline import Headline


def headline_table(h: Headline) -> tuple[list[str], list[list[Any]], list[tuple[str, str]]]:
    """``(headers, rows, legend)`` of :class:`moelab.analysis.headline.Headline`; a cell is None where
    the trace lacks what the column needs (see :func:`missing_notes`)."""
    r0 = h.rows[0]
    headers = ["layer", "E", "K", "tokens", "CV", "max/mean", "entropy", "dead", "near-dead",
               f"SRP@{h.seg_len}", f"SCH@{r0.cache_size}", f"LRU@{r0.cache_size}", "partners",
               "stability", "domain KL", "token H", "super"]
    rows = [[r.layer, r.num_experts, r.top_k, r.tokens, r.cv, r.max_over_mean, r.entropy_norm, r.dead,
             r.near_dead, r.srp, r.sch, r.lru, r.partner_share, r.partner_stability, r.domain_kl,
             r.token_entropy_norm, r.super_experts] for r in h.rows]
    chance = r0.partner_chance
    legend = [
        ("CV", "coefficient of variation of tokens per expert (0 = balanced)"),
        ("max/mean", "load of the busiest expert over the mean load"),
        ("entropy", "load entropy / ln E (1 = uniform)"),
        ("dead, near-dead", "experts with no token; with under 10% of a balanced share"),
        (f"SRP@{h.seg_len}", f"segment routing best performance for windows of {h.seg_len} tokens "
                             "(Liang et al. 2025; 1 = a window reuses one expert set)"),
        (f"SCH@{r0.cache_size}", f"segment cache best hit rate with a cache of {r0.cache_size} experts "
                                 "per layer; LRU: the same cache with least-recently-used eviction"),
        ("partners", f"share of co-activations going to each expert's top-3 partners (chance {chance:.2f})"),
        ("stability", "overlap of the partner sets across 8 chunks of the trace (1 = fixed partners)"),
        ("domain KL", "mean KL (nats) of experts' label distribution against the corpus (0 = no specialisation)"),
        ("token H", "mean token-to-expert entropy / ln E (low = the token id decides the expert)"),
        ("super", "super experts in the layer (Su et al. 2025)"),
    ]
    return headers, rows, legend


def missing_notes(trace: Any) -> list[str]:
    """One sentence per headline column the trace cannot fill, saying what would fill it."""
    notes = []
    if trace.labels is None:
        notes.append("domain KL needs a label per token: trace a corpus whose documents carry labels "
                     "(a folder with one file per domain, or a moelab data corpus)")
    if "act_max" not in trace.fields:
        notes.append("super experts need activation maxima: record them with `moelab trace --act-max`")
    return notes
