"""The "Steering" section of a report: the detection ranking of a steering file as a heatmap over
(layer, expert), the experts it switches, and per-domain perplexity with and without it.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moelab.report.html import Section, figure_html, legend_html, new_figure, table_html


def score_grid(ranking: Sequence[Mapping[str, Any]], layers: Sequence[int], num_experts: int) -> np.ndarray:
    """``[L, E]`` detection scores (NaN where the ranking has no row for that expert)."""
    grid = np.full((len(layers), num_experts), np.nan)
    row_of = {layer: i for i, layer in enumerate(layers)}
    for r in ranking:
        if r["layer"] in row_of and 0 <= r["expert"] < num_experts:
            grid[row_of[r["layer"]], r["expert"]] = r["score"]
    return grid


def score_heatmap(grid_LE: np.ndarray, layers: Sequence[int], switched: Mapping[int, Sequence[int]]):
    """Scores per (layer, expert), diverging around 0; the switched experts boxed."""
    fig = new_figure(min(2.5 + 0.22 * grid_LE.shape[1], 11.0), 1.3 + 0.34 * len(layers))
    ax = fig.subplots()
    lim = float(np.nanmax(np.abs(grid_LE))) if np.isfinite(grid_LE).any() else 1.0
    im = ax.imshow(grid_LE, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    for i, layer in enumerate(layers):
        for e in switched.get(layer, ()):
            ax.add_patch(_box(e, i))
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="score (positive: the behaviour's side)", shrink=0.9)
    return fig


def _box(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.4)


def steering_section(spec: Any, layers: Sequence[int], num_experts: int,
                     perplexity: Mapping[str, Mapping[str, float]] | None = None) -> Section:
    """The section for a loaded steering file ``spec`` (:class:`moelab.steer.SteeringSpec`);
    ``perplexity``: ``{"without": {domain: ppl}, "with": {domain: ppl}}`` if measured."""
    switched: dict[int, list[int]] = {}
    for edit in spec.edits:
        for layer, experts in edit.experts.items():
            switched.setdefault(int(layer), []).extend(int(e) for e in experts)
    made = spec.made or {}
    modes = ", ".join(sorted({e.mode for e in spec.edits}))
    legend = legend_html([
        ("score", f"the detection score ({made.get('method', 'method not recorded')}): for the risk difference, "
                  "the expert's activation rate on the positive text minus on the negative"),
        ("boxed", f"the experts the file switches ({modes})"),
    ])
    parts = [legend]
    if spec.ranking:
        grid = score_grid(spec.ranking, layers, num_experts)
        parts.append(figure_html(score_heatmap(grid, layers, switched),
                                 f"Detection scores per MoE layer and expert ({len(spec.ranking)} ranked rows)."))
    else:
        parts.append("<p>The steering file holds no detection ranking.</p>")
    if perplexity:
        domains = list(perplexity["without"])
        rows = [[name, *[perplexity[key][d] for d in domains]] for name, key in
                (("without steering", "without"), ("with steering", "with"))]
        rows.append(["ratio", *[perplexity["with"][d] / perplexity["without"][d] for d in domains]])
        parts.append(table_html(["model", *[f"ppl {d}" for d in domains]], rows,
                                caption="Validation perplexity per domain with and without the steering file.",
                                digits=4))
    return Section("Steering", "".join(parts))


__all__ = ["score_grid", "score_heatmap", "steering_section"]
