"""The page pieces: embedded figures decode to PNGs, tables format and escape, writing is atomic."""

from __future__ import annotations

import base64
import re

import pytest

from moelab.errors import MoelabError
from moelab.report import (
    Section,
    figure_html,
    new_figure,
    note_html,
    render_page,
    table_html,
    write_report,
)
from moelab.report.html import format_cell


def _figure():
    fig = new_figure(3, 2)
    fig.subplots().plot([0, 1, 2], [1, 0, 1])
    return fig


def test_figure_html_embeds_a_png_with_its_caption():
    out = figure_html(_figure(), "Lines <go> up & down.")
    data = re.search(r'src="data:image/png;base64,([^"]+)"', out).group(1)
    png = base64.b64decode(data)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<figcaption>Lines &lt;go&gt; up &amp; down.</figcaption>" in out
    with pytest.raises(MoelabError, match="caption is empty"):
        figure_html(_figure(), "  ")


def test_table_html_formats_and_escapes():
    out = table_html(["name", "tokens", "share"], [["<b>", 12345, 0.123456], ["x", None, float("nan")]])
    assert "<td class=text>&lt;b&gt;</td>" in out and "<b>" not in out
    assert "<td>12,345</td>" in out and "<td>0.123</td>" in out
    assert out.count("<td>–</td>") == 2  # None and NaN
    assert "<th class=text>name</th>" in out and "<th>tokens</th>" in out
    with pytest.raises(MoelabError, match="a row has 2 cells, expected 3"):
        table_html(["a", "b", "c"], [[1, 2]])
    assert format_cell(True, 3) == ("yes", False)


def test_note_html_marks_flags_as_code():
    assert "<code>moelab trace --act-max</code>" in note_html("record with `moelab trace --act-max`")


def test_render_page_is_self_contained():
    page = render_page("T & t", [Section("Load & balance", figure_html(_figure(), "c")), Section("Other", "<p>x</p>")])
    assert page.startswith("<!DOCTYPE html>")
    assert '<section id="load-balance"><h2>Load &amp; balance</h2>' in page
    assert '<a href="#other">Other</a>' in page
    # nothing that a browser would fetch: no external src/href, no @import, no url()
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "@import" not in page and "url(" not in page
    with pytest.raises(MoelabError, match="unique"):
        render_page("t", [Section("A", ""), Section("a", "")])


def test_write_report_is_atomic(tmp_path):
    path = tmp_path / "r.html"
    path.write_text("old")
    assert write_report("<html>new</html>", path) == path
    assert path.read_text() == "<html>new</html>"
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temporary file left
    with pytest.raises(MoelabError, match="does not exist"):
        write_report("x", tmp_path / "missing" / "r.html")
    with pytest.raises(MoelabError, match="is a directory"):
        write_report("x", tmp_path)
