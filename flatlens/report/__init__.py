"""Reports: figures, the self-contained HTML page, and the diagnose pipeline."""

from flatlens.report._html import Section, render_report, write_report

__all__ = ["Section", "render_report", "write_report"]
