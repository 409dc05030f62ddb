"""Matplotlib figures of the report, each drawn from plain arrays (no trace, no model here).

Shape legend: L layers, E experts, D labels (domains), M segment lengths, C cache sizes.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot; embed it with
:func:`moelab.report.html.figure_html`, which also takes the one-line caption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from moelab.report.html import new_figure

# a panel holding an [E, E] matrix: imshow keeps it square, so the panel must be taller than it is
# wide by the title above and the tick labels and axis label below; constrained layout cannot
# shrink a square axes below the width it was given, and a shorter panel clipped both
_SQUARE_PANEL = (3.2, 3.5)

_LABEL_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                  "#7f7f7f", "#bcbd22", "#17becf"]


def pick_layers(layers: Sequence[int], max_layers: int = 8) -> list[int]:
    """At most ``max_layers`` of ``layers``, evenly spaced, first and last included."""
    layers = list(layers)
    if len(layers) <= max_layers:
        return layers
    idx = np.unique(np.round(np.linspace(0, len(layers) - 1, max_layers)).astype(int))
    return [layers[i] for i in idx]


def _grid(n: int, cols: int = 4, panel: tuple[float, float] = (3.2, 2.6)) -> tuple[Figure, list]:
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = new_figure(max(panel[0] * cols, 6.0), panel[1] * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _expert_ticks(ax, num_experts: int, max_ticks: int = 16) -> None:
    step = max(1, math.ceil(num_experts / max_ticks))
    ax.set_xticks(range(0, num_experts, step))
    ax.tick_params(labelsize=7)


def load_heatmap(share_LE: np.ndarray, layers: Sequence[int]) -> Figure:
    """Expert load of every layer relative to a balanced load: ``share * E`` (1 = balanced)."""
    rel = np.asarray(share_LE) * share_LE.shape[1]
    fig = new_figure(min(2.5 + 0.22 * rel.shape[1], 11.0), 1.2 + 0.32 * len(layers))
    ax = fig.subplots()
    im = ax.imshow(rel, aspect="auto", cmap="magma", vmin=0, vmax=max(2.0, float(np.nanmax(rel))),
                   interpolation="nearest")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    _expert_ticks(ax, rel.shape[1])
    fig.colorbar(im, ax=ax, label="load / balanced load", shrink=0.9)
    return fig


def domain_load_grid(share_by_layer: dict[int, np.ndarray], label_names: list[str]) -> Figure:
    """Per layer, each domain's load on each expert relative to a balanced share (``share_DE * E``)."""
    layers = list(share_by_layer)
    fig, axes = _grid(len(layers), cols=2 if len(layers) > 1 else 1, panel=(5.2, 0.9 + 0.32 * len(label_names)))
    vmax = max(2.0, max(float(np.nanmax(s * s.shape[1])) for s in share_by_layer.values()))
    im = None
    for ax, layer in zip(axes, layers, strict=True):
        s = share_by_layer[layer]
        im = ax.imshow(s * s.shape[1], aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_yticks(range(len(label_names)), label_names, fontsize=8)
        _expert_ticks(ax, s.shape[1])
        ax.set_xlabel("expert", fontsize=8)
    fig.colorbar(im, ax=axes, label="domain load / balanced", shrink=0.8)
    return fig


def coactivation_grid(rate_by_layer: dict[int, np.ndarray], chance_by_layer: dict[int, float]) -> Figure:
    """Per layer, ``P(j | i) / chance`` with the diagonal blanked (chance = (K - 1) / (E - 1))."""
    layers = list(rate_by_layer)
    fig, axes = _grid(len(layers), panel=_SQUARE_PANEL)
    rel = {x: rate_by_layer[x] / chance_by_layer[x] if chance_by_layer[x] > 0 else rate_by_layer[x]
           for x in layers}
    for r in rel.values():
        np.fill_diagonal(r, np.nan)
    vmax = max(2.0, max(float(np.nanmax(r)) if np.isfinite(r).any() else 0.0 for r in rel.values()))
    im = None
    for ax, layer in zip(axes, layers, strict=True):
        im = ax.imshow(rel[layer], cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        _expert_ticks(ax, rel[layer].shape[1], max_ticks=8)  # 16 two-digit labels overlap in a panel
        ax.set_yticks(ax.get_xticks())
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("expert i", fontsize=8)
    fig.colorbar(im, ax=axes, label="P(j | i) / chance", shrink=0.8)
    return fig


def _layer_colours(n: int):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.1 + 0.8 * i / max(n - 1, 1)) for i in range(n)]


def srp_curves(seg_lens: Sequence[int], srp_by_layer: dict[int, Sequence[float]]) -> Figure:
    """SRP against the segment length, one line per layer."""
    fig = new_figure(6.4, 3.4)
    ax = fig.subplots()
    for colour, (layer, srp) in zip(_layer_colours(len(srp_by_layer)), srp_by_layer.items(), strict=True):
        ax.plot(seg_lens, srp, marker="o", color=colour, label=f"layer {layer}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(seg_lens), [str(m) for m in seg_lens])
    ax.set_xlabel("segment length m (tokens)")
    ax.set_ylabel("SRP (best F1)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def cache_curves(lrc_by_layer: dict[int, np.ndarray], lru_by_layer: dict[int, np.ndarray], top_k: int) -> Figure:
    """Hit rate against the cache size per layer: SCH (solid) and LRU (dashed)."""
    fig = new_figure(6.4, 3.4)
    ax = fig.subplots()
    for colour, layer in zip(_layer_colours(len(lrc_by_layer)), lrc_by_layer, strict=True):
        h = lrc_by_layer[layer]
        sizes = np.arange(1, len(h) + 1)
        ax.plot(sizes, h, color=colour, label=f"layer {layer}")
        if layer in lru_by_layer:
            ax.plot(sizes, lru_by_layer[layer], color=colour, linestyle="--", linewidth=1)
    ax.axvline(top_k, color="#999", linewidth=0.8)
    ax.text(top_k, 0.02, " K", color="#666", fontsize=8)
    ax.set_xlabel("cache size (experts per layer)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, title="solid SCH, dashed LRU", title_fontsize=7)
    return fig


def specialisation_bars(kl_by_layer: dict[int, np.ndarray], top_label_by_layer: dict[int, np.ndarray],
                        label_names: list[str]) -> Figure:
    """Per layer, each expert's KL to the corpus label prior, coloured by its most frequent label."""
    layers = list(kl_by_layer)
    fig, axes = _grid(len(layers), cols=2, panel=(5.2, 2.2))
    colours = [_LABEL_COLOURS[i % len(_LABEL_COLOURS)] for i in range(len(label_names))]
    for ax, layer in zip(axes, layers, strict=True):
        kl, top = np.nan_to_num(kl_by_layer[layer]), top_label_by_layer[layer]
        ax.bar(range(len(kl)), kl, color=[colours[t] if t >= 0 else "#ccc" for t in top], width=0.8)
        ax.set_title(f"layer {layer}", fontsize=9)
        _expert_ticks(ax, len(kl))
        ax.set_ylabel("KL (nats)", fontsize=8)
        ax.set_xlabel("expert", fontsize=8)
    handles = [axes[0].bar([0], [0], color=c, label=n) for c, n in zip(colours, label_names, strict=True)]
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(label_names), 6), fontsize=8,
               title="most frequent label", title_fontsize=8)
    return fig


def act_max_heatmap(act_max_LE: np.ndarray, super_layer_S: np.ndarray, super_expert_S: np.ndarray,
                    include_layers: int) -> Figure:
    """Largest |down-projection output| per (layer, expert), log colour scale, super experts circled."""
    a = np.asarray(act_max_LE, dtype=np.float64)
    fig = new_figure(min(2.5 + 0.22 * a.shape[1], 11.0), 1.3 + 0.32 * a.shape[0])
    ax = fig.subplots()
    pos = a[np.isfinite(a) & (a > 0)]
    norm = LogNorm(vmin=float(pos.min()), vmax=float(pos.max())) if pos.size else None
    im = ax.imshow(np.where(a > 0, a, np.nan), aspect="auto", cmap="cividis", norm=norm, interpolation="nearest")
    ax.scatter(super_expert_S, super_layer_S, s=90, facecolors="none", edgecolors="#e8112d", linewidths=1.8)
    if include_layers < a.shape[0]:
        ax.axhline(include_layers - 0.5, color="#e8112d", linewidth=0.8, linestyle=":")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    _expert_ticks(ax, a.shape[1])
    step = max(1, math.ceil(a.shape[0] / 24))
    ax.set_yticks(range(0, a.shape[0], step))
    fig.colorbar(im, ax=ax, label="max |activation|", shrink=0.9)
    return fig


def similarity_grid(sim_by_layer: dict[int, np.ndarray], label: str, centred: bool = True) -> Figure:
    """Per layer, an ``[E, E]`` similarity matrix, diagonal blanked. ``centred``: a diverging colour
    scale symmetric about 0 spanning the largest off-diagonal |value| (at least 0.05); otherwise a
    sequential scale from the smallest to the largest off-diagonal value, so weak structure shows."""
    layers = list(sim_by_layer)
    fig, axes = _grid(len(layers), panel=_SQUARE_PANEL)
    mats = {}
    for layer in layers:
        mats[layer] = np.array(sim_by_layer[layer], dtype=np.float64)
        np.fill_diagonal(mats[layer], np.nan)
    values = np.concatenate([m[np.isfinite(m)] for m in mats.values()])
    if values.size == 0:  # one expert per layer: nothing off the diagonal
        values = np.zeros(1)
    if centred:
        lim = max(0.05, float(np.abs(values).max()))
        cmap, lo, hi = "RdBu_r", -lim, lim
    else:
        cmap, lo, hi = "magma", float(values.min()), max(float(values.max()), float(values.min()) + 1e-6)
    im = None
    for ax, layer in zip(axes, layers, strict=True):
        im = ax.imshow(mats[layer], cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=9)
        _expert_ticks(ax, mats[layer].shape[1], max_ticks=8)
        ax.set_yticks(ax.get_xticks())
        ax.set_xlabel("expert j", fontsize=8)
        ax.set_ylabel("expert i", fontsize=8)
    fig.colorbar(im, ax=axes, label=label, shrink=0.8)
    return fig
