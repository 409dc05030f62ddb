"""What the benchmark scripts share for their committed Markdown: the generated part of a results
page lives between two HTML-comment markers, so hand-written notes around it survive a rerun."""

from __future__ import annotations


def replace_between(old: str, begin: str, end: str, body: str) -> str | None:
    """``old`` with the text from ``begin`` to ``end`` (markers included) replaced by
    ``begin\\nbody\\nend``; None when ``old`` lacks either marker."""
    if begin not in old or end not in old:
        return None
    return old[:old.index(begin)] + f"{begin}\n{body}\n{end}" + old[old.index(end) + len(end):]
