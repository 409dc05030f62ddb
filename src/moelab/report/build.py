"""``build_report``: a routing trace (and optionally its model) -> one self-contained HTML page.

Sections, in order: summary (trace facts and the headline table), expert load (per layer and by
domain), dead experts, co-activation, local routing consistency (SRP and SCH curves), specialisation
(domain and vocabulary), super experts (and, with the model, the loss when each is zeroed), expert
similarity (with the model: aligned weight cosine and output cosine on traced tokens), then the
caller's ``extra_sections``. A section whose input the trace lacks says which ``moelab trace`` flag
or input would add it, instead of failing.

Shape legend: L layers, E experts, D labels (domains), K top-k slots.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis.cache import cache_hit_curves
from moelab.analysis.coactivation import coactivation, conditional_rate
from moelab.analysis.consistency import segment_routing
from moelab.analysis.expert_zeroing import trace_batches, zeroing_effect
from moelab.analysis.headline import Headline, headline
from moelab.analysis.load import expert_load, load_by_label
from moelab.analysis.similarity import block_inputs, output_similarity, weight_similarity
from moelab.analysis.specialisation import domain_specialisation, vocabulary_specialisation
from moelab.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from moelab.errors import MoelabError
from moelab.report import figures
from moelab.report.headline_table import headline_table, missing_notes
from moelab.report.html import Section, figure_html, legend_html, note_html, render_page, table_html


class _Ctx:
    """What every section reads: the trace's per-token columns, read once."""

    def __init__(self, trace: Any, max_layers: int):
        self.trace = trace
        self.layers = list(trace.layers)
        if not self.layers or trace.num_tokens == 0:
            raise MoelabError(f"report: the trace selection is empty ({len(self.layers)} layers, "
                              f"{trace.num_tokens} tokens); select at least one layer and one token")
        self.shown = figures.pick_layers(self.layers, max_layers)
        seq = trace.seq_ids
        self.seq = np.zeros(trace.num_tokens, dtype=np.int64) if seq is None else np.asarray(seq)
        self.labels = trace.labels
        self.names = trace.label_names
        self.info = {x: trace.layer_info(x) for x in self.layers}
        self._ids: dict[int, np.ndarray] = {}

    def ids(self, layer: int) -> np.ndarray:
        if layer not in self._ids:
            self._ids[layer] = np.asarray(self.trace.ids(layer))
        return self._ids[layer]

    def shown_note(self) -> str:
        if len(self.shown) == len(self.layers):
            return ""
        return f" Showing {len(self.shown)} of {len(self.layers)} layers, evenly spaced."


def _summary(ctx: _Ctx, h: Headline, model_desc: str) -> Section:
    t = ctx.trace
    ident = getattr(getattr(t, "manifest", None), "identity", {}) or {}
    m = ident.get("model", {})
    ks = sorted({i.top_k for i in ctx.info.values()})
    es = sorted({i.num_experts for i in ctx.info.values()})
    facts = [
        ["model", m.get("name_or_path") or m.get("architecture") or "(not recorded)"],
        ["tokens", f"{t.num_tokens:,}"], ["sequences", f"{int(np.count_nonzero(np.diff(ctx.seq)) + 1):,}"],
        ["MoE layers", str(len(ctx.layers))], ["experts per layer", ", ".join(map(str, es))],
        ["top-k", ", ".join(map(str, ks))], ["labels", ", ".join(ctx.names) if ctx.names else "none"],
        ["optional fields", ", ".join(t.fields) or "none"], ["model for loss effects", model_desc],
    ]
    headers, rows, legend = headline_table(h)
    body = table_html(["", "value"], facts)
    body += "<h3>Headline table</h3>" + table_html(
        headers, rows, "One row per MoE layer; the legend below says how to read each column. "
        "A dash marks a value the trace cannot give.")
    body += legend_html(legend) + "".join(note_html(n) for n in missing_notes(t))
    return Section("Summary", body)


def _load(ctx: _Ctx) -> Section:
    same_e = len({i.num_experts for i in ctx.info.values()}) == 1
    share = np.stack([expert_load(ctx.ids(x), None, ctx.info[x].num_experts).share_E
                      for x in ctx.layers]) if same_e else None
    body = ""
    if share is not None:
        body += figure_html(figures.load_heatmap(share, ctx.layers),
                            "Each row is a layer, each column an expert; colour = the expert's share of the "
                            "layer's routed slots relative to a perfectly balanced share (1.0 = balanced, "
                            "dark = starved, bright = overloaded).")
    if ctx.labels is None:
        body += note_html("Load by domain needs a label per token: trace a corpus whose documents carry "
                          "labels (a folder with one file per domain, or a moelab data corpus).")
    else:
        by_layer = {x: load_by_label(ctx.ids(x), ctx.labels, ctx.info[x].num_experts, ctx.names).share_DE
                    for x in ctx.shown}
        body += figure_html(figures.domain_load_grid(by_layer, ctx.names),
                            "Each panel is a layer; a row is a domain, a column an expert; colour = the "
                            "domain's load on the expert relative to a balanced share. Bright cells mark "
                            "experts a domain favours; rows that look alike mean no domain preference."
                            + ctx.shown_note())
    return Section("Expert load", body)


def _dead(ctx: _Ctx) -> Section:
    rows = []
    for x in ctx.layers:
        load = expert_load(ctx.ids(x), None, ctx.info[x].num_experts)
        for e in np.flatnonzero(load.dead_E | load.near_dead_E):
            rows.append([x, int(e), "dead" if load.dead_E[e] else "near-dead", int(load.tokens_E[e]),
                         float(load.share_E[e] * len(load.share_E))])
    if not rows:
        return Section("Dead experts", note_html("No dead or near-dead expert in any layer: every expert "
                                                 "received at least 10% of a balanced share."))
    return Section("Dead experts", table_html(
        ["layer", "expert", "state", "slots", "load / balanced"], rows,
        "Experts that received no token (dead) or under 10% of a balanced share (near-dead): "
        "candidates for pruning, or signs of a router that collapsed."))


def _coactivation(ctx: _Ctx) -> Section:
    rate, chance = {}, {}
    for x in ctx.shown:
        e, k = ctx.info[x].num_experts, ctx.info[x].top_k
        rate[x] = conditional_rate(coactivation(ctx.ids(x), e))
        chance[x] = (k - 1) / (e - 1) if e > 1 else 0.0
    if all(ctx.info[x].top_k == 1 for x in ctx.shown):
        return Section("Co-activation", note_html("Top-1 routing: no two experts are ever chosen together."))
    return Section("Co-activation", figure_html(
        figures.coactivation_grid(rate, chance),
        "Row i, column j: how often expert j is chosen when expert i is, over the rate of random top-k "
        "routing (1 = chance); bright off-diagonal cells are pairs that fire together." + ctx.shown_note()))


def _consistency(ctx: _Ctx, seg_lens: Sequence[int]) -> Section:
    longest = int(np.max(np.bincount(np.unique(ctx.seq, return_inverse=True)[1])))
    lens = [m for m in seg_lens if m <= longest]
    if not lens:
        return Section("Local routing consistency", note_html(
            f"No sequence is as long as the shortest segment length {min(seg_lens)}; trace longer "
            "sequences (`moelab trace --seq-len`)."))
    srp = {x: [r.srp for r in segment_routing(ctx.ids(x), ctx.info[x].num_experts, tuple(lens), ctx.seq)]
           for x in ctx.shown}
    body = figure_html(figures.srp_curves(lens, srp),
                       "Segment routing best performance: how well one fixed expert set per window of m "
                       "tokens covers the window's routing (1 = every token of a window uses the same "
                       "experts); higher curves suit expert offloading." + ctx.shown_note())
    same_e = len({ctx.info[x].num_experts for x in ctx.shown}) == 1
    if same_e:
        e, k = ctx.info[ctx.shown[0]].num_experts, max(ctx.info[x].top_k for x in ctx.shown)
        ids = [ctx.ids(x) for x in ctx.shown]
        stride = max(1, int(np.ceil((np.count_nonzero(np.diff(ctx.seq)) + 1) / 128)))
        m = 16  # look-ahead of SCH, as in the headline table
        lrc = cache_hit_curves(ids, e, "lrc", m, ctx.seq, stride)
        lru = cache_hit_curves(ids, e, "lru", m, ctx.seq, stride)
        body += figure_html(
            figures.cache_curves({x: c.hit_rate_C for x, c in zip(ctx.shown, lrc, strict=True)},
                                 {x: c.hit_rate_C for x, c in zip(ctx.shown, lru, strict=True)}, k),
            f"Expert-cache hit rate against cache size: solid = SCH (evict the expert least used in the next "
            f"{m} tokens), dashed = LRU; the gap between them is what a good prefetcher could gain.")
        body += cache_size_table([c.hit_rate_C for c in lru], ctx.shown, k)
    return Section("Local routing consistency", body)


CACHE_TARGETS = (0.8, 0.9, 0.95)


def cache_size_table(hit_rate_by_layer: Sequence[np.ndarray], layers: Sequence[int], top_k: int) -> str:
    """Per layer, the smallest LRU cache (experts, and as a multiple of top-k) reaching each target
    hit rate; '-' where even all experts in cache do not."""
    rows = []
    for layer, hit_C in zip(layers, hit_rate_by_layer, strict=True):
        cells = []
        for target in CACHE_TARGETS:
            reach = np.flatnonzero(np.asarray(hit_C) >= target)
            cells.append("-" if reach.size == 0 else f"{reach[0] + 1} ({(reach[0] + 1) / top_k:.1f}× top-k)")
        rows.append([layer, *cells])
    return table_html(["layer", *[f"LRU {t:.0%} hits" for t in CACHE_TARGETS]], rows,
                      caption="Cache size an offloading runtime needs per MoE layer for a given hit rate "
                              "(LRU on this trace; `moelab.offload` runs the same policy).")


def _specialisation(ctx: _Ctx, decode: Any) -> Section:
    body = ""
    if ctx.labels is None:
        body += note_html("Domain specialisation needs a label per token: trace a corpus whose documents "
                          "carry labels (a folder with one file per domain, or a moelab data corpus).")
    else:
        ds = {x: domain_specialisation(ctx.ids(x), ctx.labels, ctx.info[x].num_experts, ctx.names)
              for x in ctx.shown}
        body += figure_html(
            figures.specialisation_bars({x: d.kl_E for x, d in ds.items()},
                                        {x: d.top_label_E for x, d in ds.items()}, ctx.names),
            "Bar height = KL divergence of the expert's domain mix from the corpus mix (0 = routes like "
            "the corpus); colour = the domain it sees most. Tall bars are domain experts." + ctx.shown_note())
    body += _vocabulary_table(ctx, decode)
    return Section("Specialisation", body)


def _vocabulary_table(ctx: _Ctx, decode: Any, top: int = 5) -> str:
    layer = ctx.shown[len(ctx.shown) // 2]
    try:
        vs = vocabulary_specialisation(ctx.ids(layer), np.asarray(ctx.trace.token_ids),
                                       ctx.info[layer].num_experts, top=top, min_count=1)
    except MoelabError as err:
        return note_html(f"Vocabulary specialisation of layer {layer}: {err}")
    rows = []
    for e in range(vs.top_tokens_ER.shape[0]):
        toks = [(t, s) for t, s in zip(vs.top_tokens_ER[e], vs.top_share_ER[e], strict=True) if t >= 0]
        rows.append([e, "  ".join(f"{decode(int(t))} {s:.0%}" for t, s in toks) or "–"])
    return "<h3>Vocabulary</h3>" + table_html(
        ["expert", f"most frequent tokens in layer {layer} (share of the expert's slots)"], rows,
        "Tokens an expert sees most; an expert dominated by a few tokens (high shares) is a token "
        "specialist, one with low shares spreads over the vocabulary.")


def _super_experts(ctx: _Ctx, h: Headline, view: Any, loss_tokens: int) -> Section:
    title = "Super experts"
    if h.super_experts is None:
        return Section(title, note_html("Super experts need the activation maxima at each expert's "
                                        "down-projection output: record them with `moelab trace --act-max`."))
    se = h.super_experts
    body = figure_html(
        figures.act_max_heatmap(se.act_max_LE, se.layer_S, se.expert_S, se.include_layers),
        "Colour = the largest |activation| an expert's down projection produced on the traced tokens "
        "(log scale); red circles = super experts (above the 99.5th percentile and a tenth of the maximum, "
        "layers above the dotted line only).")
    if len(se.layer_S) == 0:
        return Section(title, body + note_html(
            f"No super expert: no expert exceeds both thresholds (P99.5 = {se.percentile_threshold:.3g}, "
            f"max/10 = {se.max_threshold:.3g})."))
    pairs = list(zip(se.layer_S.tolist(), se.expert_S.tolist(), strict=True))
    headers = ["layer", "expert", "max |activation|", "× P99.5"]
    rows = [[la, e, float(a), float(a / se.percentile_threshold) if se.percentile_threshold > 0 else None]
            for (la, e), a in zip(pairs, se.act_max_S, strict=True)]
    if view is None:
        note = note_html("Pass the model (`moelab report TRACE --model M`) to measure the loss with each "
                         "super expert zeroed.")
    elif ctx.trace.token_ids is None:
        note = note_html("The trace has no token ids, so the loss with each super expert zeroed cannot be measured.")
    else:
        eff = zeroing_effect(view, pairs, trace_batches(ctx.trace.token_ids, ctx.seq, loss_tokens))
        headers += ["loss zeroed", "Δ loss"]
        rows = [r + [float(lo), float(d)] for r, lo, d in zip(rows, eff.loss_S, eff.delta_S, strict=True)]
        note = note_html(f"Loss = mean next-token NLL (nats) on {eff.tokens:,} traced tokens; with every "
                         f"expert in place it is {eff.base_loss:.4f}.")
    caption = "Super experts (Su et al. 2025), largest activation first; × P99.5 = how far above the threshold."
    if len(headers) > 4:
        caption += " Δ loss = the loss increase when the expert's down projection is zeroed."
    body += table_html(headers, rows, caption) + note
    return Section(title, body)


def _similarity(ctx: _Ctx, view: Any, tokens: int, max_experts: int = 64, max_width: int = 1024) -> Section:
    title = "Expert similarity"
    if view is None:
        return Section(title, note_html("Expert similarity needs the model's weights: pass the model "
                                        "(`moelab report TRACE --model M`)."))
    layers = [x for x in ctx.shown if view.block(x).num_experts <= max_experts
              and view.block(x).intermediate_size <= max_width]
    if not layers:
        return Section(title, note_html(
            f"Skipped: no layer has at most {max_experts} experts of width at most {max_width} (aligning "
            "every pair of wider or more experts is slow); use moelab.analysis.similarity on chosen pairs."))
    body = figure_html(
        figures.similarity_grid({x: weight_similarity(view.block(x)) for x in layers}, "aligned weight cosine",
                                centred=False),
        "Cosine between two experts' weights after matching their neurons (Hungarian alignment); the colour "
        "scale spans the observed range. Bright pairs compute alike: the natural candidates for merging "
        "(alignment alone lifts unrelated experts a little above 0)." + ctx.shown_note())
    if ctx.trace.token_ids is not None:
        hidden = block_inputs(view, trace_batches(ctx.trace.token_ids, ctx.seq, tokens), layers)
        body += figure_html(
            figures.similarity_grid({x: output_similarity(view.block(x), hidden[x]) for x in layers},
                                    "mean output cosine"),
            f"Mean cosine between two experts' outputs on the same {len(next(iter(hidden.values()))):,} "
            "traced hidden states (every expert run on every token): red pairs respond alike, blue ones oppositely.")
    return Section(title, body)


def _as_view(model: Any) -> Any:
    from moelab.models import ModelView, open_model

    return model if isinstance(model, ModelView) else open_model(model)


def _decoder(model: Any) -> Any:
    """Token id -> short quoted text via the model directory's tokenizer.json, else ``#id``."""
    if isinstance(model, (str, os.PathLike)) and (Path(model) / TOKENIZER_FILE).is_file():
        tok = load_tokenizer(model)
        return lambda t: repr(tok.decode([t], skip_special_tokens=False))[:24]
    return lambda t: f"#{t}"


# the steps of build_report, in order, as its ``progress`` callback names them
REPORT_STAGES = ("headline", "summary", "load", "dead experts", "co-activation", "consistency",
                 "specialisation", "super experts", "similarity")


def build_report(trace: Any, model: Any = None, extra_sections: Sequence[Section] = (), *,
                 title: str | None = None, seg_lens: Sequence[int] = (4, 16, 64, 256),
                 max_layers: int = 8, loss_tokens: int = 4096,
                 progress: Callable[[str], None] | None = None) -> str:
    """The HTML page of a routing trace (see the module docstring).

    Args:
        trace: a :class:`moelab.trace.Trace` (``moelab.trace.open(dir)``, possibly ``.select(...)``-ed)
            or anything with its reading API (:class:`moelab.analysis.headline.ArrayTrace`).
        model: the traced model (checkpoint directory, transformers model or ModelView), or None; with
            it, the super-expert table gains the loss with each super expert zeroed (on up to
            ``loss_tokens`` traced tokens), and a directory's tokenizer decodes the vocabulary table.
        extra_sections: appended after moelab's own sections (e.g. ``moelab demo``'s "Compression").
        max_layers: per-layer figures show at most this many layers, evenly spaced.
        progress: called with each name of :data:`REPORT_STAGES` before that step runs.
    Raises:
        MoelabError: an empty selection; TraceError: a model that is not the traced one.
    """
    ctx = _Ctx(trace, max_layers)
    view = None
    if model is not None:
        view = _as_view(model)
        if hasattr(trace, "check_matches"):
            trace.check_matches(view)
    say = progress or (lambda stage: None)
    say(REPORT_STAGES[0])
    h = headline(trace)
    desc = "none (pass --model)" if view is None else f"{view.family} ({type(view.model).__name__})"
    makers = [lambda: _summary(ctx, h, desc), lambda: _load(ctx), lambda: _dead(ctx), lambda: _coactivation(ctx),
              lambda: _consistency(ctx, seg_lens), lambda: _specialisation(ctx, _decoder(model)),
              lambda: _super_experts(ctx, h, view, loss_tokens),
              lambda: _similarity(ctx, view, min(loss_tokens, 1024))]
    sections = []
    for stage, make in zip(REPORT_STAGES[1:], makers, strict=True):
        say(stage)
        sections.append(make())
    sections += extra_sections
    name = title or f"moelab report: {Path(str(getattr(trace, 'directory', 'trace'))).name}"
    sub = f"{trace.num_tokens:,} tokens, {len(ctx.layers)} MoE layers" + (
        f", labels {', '.join(ctx.names)}" if ctx.names else "")
    return render_page(name, sections, sub)
