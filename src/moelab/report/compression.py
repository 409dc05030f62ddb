"""The "Compression" section of a report: per-domain quality of compressed models and a quality-vs-size plot.

Rows are plain dicts, one per model (the original first), as :func:`moelab.demo.run_demo` and
``bench/compress.py`` produce them: ``method``, ``kind``, ``experts``, ``top_k``, ``params``,
``perplexity`` (label -> value), ``kl`` and ``top1`` (label -> value, None for the original).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from moelab.report.html import Section, figure_html, legend_html, new_figure, table_html


def _mean(d: dict[str, float] | None) -> float | None:
    return None if not d else float(np.mean(list(d.values())))


def compression_table(rows: Sequence[dict[str, Any]]) -> str:
    """Table: one row per model, perplexity per label, mean KL and top-1 agreement."""
    labels = list(rows[0]["perplexity"])
    headers = ["method", "kind", "experts", "top-k", "params (M)", *[f"ppl {d}" for d in labels],
               "KL (nats)", "top-1"]
    body = [[r["method"], r["kind"], r["experts"], r["top_k"], r["params"] / 1e6,
             *[r["perplexity"][d] for d in labels], _mean(r["kl"]), _mean(r["top1"])] for r in rows]
    return table_html(headers, body, caption="Validation perplexity per domain (lower is better); KL and "
                      "top-1 agreement against the original model, averaged over domains.", digits=4)


def quality_vs_size_figure(rows: Sequence[dict[str, Any]]):
    """Left: mean perplexity against parameters, one point per model. Right: perplexity per domain."""
    fig = new_figure(10, 3.6)
    fig.set_layout_engine("constrained")
    ax_size, ax_dom = fig.subplots(1, 2)
    labels = list(rows[0]["perplexity"])
    for i, r in enumerate(rows):
        x, y = r["params"] / 1e6, _mean(r["perplexity"])
        ax_size.scatter([x], [y], s=40, color=f"C{i}", zorder=3)
        ax_size.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax_size.set_xlabel("parameters (M)")
    ax_size.set_ylabel("mean validation perplexity")
    ax_size.grid(alpha=0.3)
    width = 0.8 / len(rows)
    pos = np.arange(len(labels))
    for i, r in enumerate(rows):
        ax_dom.bar(pos + i * width, [r["perplexity"][d] for d in labels], width, label=r["method"], color=f"C{i}")
    ax_dom.set_xticks(pos + width * (len(rows) - 1) / 2, labels)
    ax_dom.set_ylabel("validation perplexity")
    ax_dom.legend(fontsize=7)
    ax_dom.grid(axis="y", alpha=0.3)
    return fig


def compression_section(rows: Sequence[dict[str, Any]], ratio: float) -> Section:
    """The section: legend, table and figure for models compressed at ``ratio`` of experts removed."""
    legend = legend_html([
        ("kind", "prune drops experts; merge folds them into kept ones; atomic zeroes single neurons"),
        ("experts / top-k", "routed experts per MoE layer and experts chosen per token after compression"),
        ("KL", "mean KL(original || compressed) of next-token distributions, nats per token"),
        ("top-1", "share of positions where both models predict the same next token"),
    ])
    fig = quality_vs_size_figure(rows)
    caption = (f"{ratio:.0%} of experts removed. Left: lower and further left is better; the original sits "
               "at full size. Right: perplexity per domain, where a method's losses concentrate.")
    return Section("Compression", legend + compression_table(rows) + figure_html(fig, caption))
