"""The pieces of a self-contained HTML report: sections, embedded figures, tables, the page, writing.

Everything a page needs is inside the file: figures are PNGs embedded as base64 ``data:`` URIs, the
style sheet is one ``<style>`` tag, and the only script is inline (it records on ``<body>`` how many
images decoded, which the browser test reads back). Nothing is fetched from the network.

    fig = new_figure(6, 3); ax = fig.subplots(); ax.plot(x, y)
    sec = Section("Compression", table_html(["ratio", "loss"], rows, "...") + figure_html(fig, "..."))
    write_report(build_report(trace, extra_sections=[sec]), "report.html")
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from moelab.errors import MoelabError

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --band: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       color: var(--fg); background: #fff; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 40px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 24px 0 6px; }
p.meta, p.note, figcaption, .legend { color: var(--muted); }
p.note { background: var(--band); border-left: 3px solid var(--line); padding: 8px 12px; }
nav { margin: 12px 0 0; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; white-space: nowrap; }
table { border-collapse: collapse; margin: 8px 0 4px; font-size: 13.5px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: right; }
th { background: var(--band); font-weight: 600; }
td.text, th.text { text-align: left; }
tbody tr:nth-child(even) { background: #fbfcfd; }
figure { margin: 16px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { font-size: 13.5px; margin-top: 4px; }
dl.legend { font-size: 13px; display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; }
dl.legend dt { font-weight: 600; } dl.legend dd { margin: 0; }
code { background: var(--band); padding: 1px 4px; border-radius: 4px; font-size: 90%; }
"""

# records "decoded/total" images on <body data-images=...> once the page has loaded
_IMAGE_CHECK = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", ok + "/" + imgs.length);
});
"""


@dataclass(frozen=True)
class Section:
    """One ``<section>`` of the report: an ``<h2>`` title and a body of trusted HTML."""

    title: str
    html: str
    anchor: str = ""  # id for the table of contents; default: derived from the title

    @property
    def id(self) -> str:
        return self.anchor or (re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "section")


def esc(text: object) -> str:
    """HTML-escape any value's ``str``."""
    return html.escape(str(text), quote=True)


def new_figure(width: float = 8.0, height: float = 3.5) -> Figure:
    """A matplotlib figure not registered with pyplot (no global state, no display needed)."""
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def png_base64(fig: Figure, dpi: int = 110) -> str:
    buf = io.BytesIO()
    # bbox "tight": the image grows to every title and label, so no layout slip can clip one
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white", bbox_inches="tight", pad_inches=0.08)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure_html(fig: Figure, caption: str, alt: str | None = None, dpi: int = 110) -> str:
    """Embed ``fig`` as a base64 PNG in a ``<figure>`` with a one-line ``caption`` (how to read it)."""
    if not caption.strip():
        raise MoelabError("figure_html: caption is empty; say in one line how to read the figure")
    data = png_base64(fig, dpi)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt or caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def format_cell(value: object, digits: int) -> tuple[str, bool]:
    """(text, is_numeric) of one table cell; floats to ``digits`` significant digits, None as a dash."""
    if value is None:
        return "–", True
    if isinstance(value, bool):
        return ("yes" if value else "no"), False
    if isinstance(value, int) or (hasattr(value, "dtype") and value.dtype.kind in "iu"):
        return f"{int(value):,}", True
    if isinstance(value, float) or (hasattr(value, "dtype") and value.dtype.kind == "f"):
        v = float(value)
        return ("–" if v != v else f"{v:.{digits}g}"), True
    return str(value), False


def table_html(headers: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "",
               digits: int = 3) -> str:
    """A ``<table>``: numbers right-aligned (floats to ``digits`` significant digits), text left."""
    body, text_cols = [], set()
    for row in rows:
        if len(row) != len(headers):
            raise MoelabError(f"table_html: a row has {len(row)} cells, expected {len(headers)} (the headers)")
        cells = []
        for i, v in enumerate(row):
            text, numeric = format_cell(v, digits)
            if not numeric:
                text_cols.add(i)
            cells.append(f'<td{"" if numeric else " class=text"}>{esc(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f'<th{" class=text" if i in text_cols else ""}>{esc(h)}</th>' for i, h in enumerate(headers))
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{cap}</figure>"


def note_html(text: str) -> str:
    """A muted note, e.g. why a section is missing and which flag would add it (text is escaped;
    `backticks` become <code>)."""
    escaped = esc(text)
    return '<p class="note">' + re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped) + "</p>"


def legend_html(items: Sequence[tuple[str, str]]) -> str:
    """A definition list: what each column of a table means."""
    return '<dl class="legend">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


def render_page(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """The whole HTML document: title, table of contents, then the sections in order."""
    ids = [s.id for s in sections]
    if len(set(ids)) != len(ids):
        raise MoelabError(f"render_page: section ids must be unique, got {ids}")
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{s.html}</section>' for s in sections)
    sub = f'<p class="meta">{esc(subtitle)}</p>' if subtitle else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style><script>{_IMAGE_CHECK}</script></head>"
            f"<body><main><h1>{esc(title)}</h1>{sub}<nav>{nav}</nav>{body}</main></body></html>\n")


def write_report(page: str, path: str | os.PathLike) -> Path:
    """Write ``page`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
    out = Path(path)
    if out.is_dir():
        raise MoelabError(f"report output {out} is a directory; expected a file path such as report.html")
    if not out.parent.exists():
        raise MoelabError(f"report output: the folder {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
