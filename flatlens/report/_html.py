"""One self-contained HTML report: tables, embedded PNG figures and plotly figures.

Everything is inlined (images as base64 ``data:`` URIs, plotly.js once in the head), so the
file opens offline, loads nothing from the network and can be mailed around.
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flatlens.core._io import write_text

__all__ = ["Section", "render_report", "write_report"]

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1d2330;padding:0 1rem;line-height:1.45;background:#fff}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;
border-bottom:1px solid #dde;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-variant-numeric:tabular-nums;
font-size:.92rem}td,th{padding:.25rem .6rem;border-bottom:1px solid #e6e8f0;text-align:right}
td{white-space:nowrap}
th{background:#f4f6fa;font-weight:600}tbody tr:hover{background:#fafbfd}
td:first-child,th:first-child{text-align:left}
.scroll{overflow-x:auto;max-width:100%}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top}
img{max-width:520px;width:100%;height:auto}figure.wide{display:block}
figure.wide img{max-width:100%}
figcaption{font-size:.85rem;color:#556}.note{color:#556;font-size:.9rem}
footer{margin-top:3rem;color:#889;font-size:.8rem}
"""


@dataclass
class Section:
    """A titled part of the report.

    Attributes:
        title: The heading.
        text: A paragraph of plain text (escaped).
        table: Rows of a table; the columns are the union of the rows' keys, in order.
        images: ``(caption, path)`` of PNG files, embedded as base64.
        plotly: plotly figures, embedded as interactive ``<div>`` elements.
        links: ``(label, href)`` links, e.g. to other reports next to this one.
    """

    title: str
    text: str = ""
    table: list[dict[str, Any]] | None = None
    images: list[tuple[str, str | os.PathLike]] = field(default_factory=list)
    plotly: list[Any] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
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
    return (
        f"<div class='scroll'><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        raise ValueError("report images must be PNG files")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _image(caption: str, path: str | os.PathLike) -> str:
    raw = Path(path).read_bytes()
    try:
        width, height = _png_size(raw)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    # Multi-panel figures (much wider than tall) get the full page width.
    wide = " class='wide'" if width > 2 * height else ""
    data = base64.b64encode(raw).decode("ascii")
    return (
        f'<figure{wide}><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _links(links: list[tuple[str, str]]) -> str:
    items = " · ".join(
        f'<a href="{html.escape(href, quote=True)}">{html.escape(label)}</a>'
        for label, href in links
    )
    return f"<p>{items}</p>"


def render_report(title: str, sections: list[Section], *, subtitle: str = "") -> str:
    """Render the sections as one self-contained HTML document string."""
    from flatlens import __version__

    head_js = ""
    if any(s.plotly for s in sections):
        from plotly.offline import get_plotlyjs

        head_js = f'<script type="text/javascript">{get_plotlyjs()}</script>'
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>{head_js}</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{html.escape(subtitle)}</p>" if subtitle else "",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.links:
            parts.append(_links(section.links))
        if section.table:
            parts.append(_table(section.table))
        parts.extend(_image(caption, path) for caption, path in section.images)
        for fig in section.plotly:
            parts.append(
                fig.to_html(
                    full_html=False,
                    include_plotlyjs=False,
                    config={"displaylogo": False, "responsive": True},
                )
            )
    parts.append(f"<footer>flatlens {html.escape(__version__)} · {stamp}</footer>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_report(path: str | os.PathLike, title: str, sections: list[Section], **kw: Any) -> Path:
    """Render and write the report atomically; returns the path."""
    write_text(path, render_report(title, sections, **kw))
    return Path(path)
