"""One self-contained HTML report: tables, embedded PNG figures and plotly figures.

Everything is inlined (images as base64, plotly.js once in the head), so the file opens
offline and can be mailed around.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatlens.io import write_text

__all__ = ["Section", "render_report", "write_report"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #dde;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0}td,th{padding:.25rem .7rem;
border-bottom:1px solid #eef;text-align:right}th{background:#f4f6fa}
td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5rem 1rem .5rem 0}img{max-width:520px}
figcaption{font-size:.85rem;color:#556}.note{color:#556;font-size:.9rem}
"""


@dataclass
class Section:
    """A titled part of the report."""

    title: str
    text: str = ""
    table: list[dict[str, Any]] | None = None
    images: list[tuple[str, str | os.PathLike]] = field(default_factory=list)
    plotly: list[Any] = field(default_factory=list)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "–"
    return html.escape(str(value))


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(row.get(c))}</td>" for c in cols) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(caption: str, path: str | os.PathLike) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_report(title: str, sections: list[Section], *, subtitle: str = "") -> str:
    """Render the sections as one HTML document string."""
    needs_plotly = any(s.plotly for s in sections)
    head_js = ""
    if needs_plotly:
        from plotly.offline import get_plotlyjs

        head_js = f'<script type="text/javascript">{get_plotlyjs()}</script>'
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>{head_js}</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{html.escape(subtitle)}</p>" if subtitle else "",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.table:
            parts.append(_table(section.table))
        parts.extend(_image(caption, path) for caption, path in section.images)
        for fig in section.plotly:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, title: str, sections: list[Section], **kw) -> Path:
    """Render and write the report atomically; returns the path."""
    write_text(path, render_report(title, sections, **kw))
    return Path(path)
