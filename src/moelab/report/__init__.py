"""moelab.report: one self-contained HTML page of a routing trace (figures embedded, no network).

    from moelab.report import Section, build_report, figure_html, new_figure, table_html, write_report
    fig = new_figure(6, 3); fig.subplots().plot(ratios, losses)
    extra = Section("Compression", table_html(["ratio", "loss"], rows) + figure_html(fig, "how to read it"))
    write_report(build_report(moelab.trace.open("trace/"), model="model/", extra_sections=[extra]),
                 "report.html")
"""

from __future__ import annotations

from moelab.report.build import build_report
from moelab.report.html import (
    Section,
    figure_html,
    legend_html,
    new_figure,
    note_html,
    render_page,
    table_html,
    write_report,
)

__all__ = ["Section", "build_report", "figure_html", "legend_html", "new_figure", "note_html",
           "render_page", "table_html", "write_report"]
