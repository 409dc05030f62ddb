"""Report figures keep every title, axis label and tick label inside the figure (nothing clipped)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from moelab.report import figures


def _outside(fig) -> list[str]:
    """Texts of the figure's axes that reach beyond its edges, drawn at the figure's own size."""
    FigureCanvasAgg(fig).draw()  # no bbox_inches="tight" here: the layout itself must fit
    box, out = fig.bbox, []
    for ax in fig.axes:
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]
        for t in texts:
            if not t.get_visible() or not t.get_text():
                continue
            e = t.get_window_extent()
            if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
                out.append(t.get_text())
    return out


@pytest.mark.parametrize("layers, experts", [(1, 8), (4, 8), (8, 64), (3, 128)])
def test_square_heatmap_grids_are_not_clipped(layers, experts):
    rng = np.random.default_rng(0)
    mats = {layer: rng.random((experts, experts)) for layer in range(layers)}
    fig = figures.coactivation_grid(mats, {layer: 1 / (experts - 1) for layer in mats})
    assert _outside(fig) == []
    assert _outside(figures.similarity_grid(mats, "cosine")) == []
