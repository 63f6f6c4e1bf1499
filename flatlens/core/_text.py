"""Names drawn as text, not markup.

Matplotlib reads a string holding an even number of unescaped ``$`` as mathtext (LaTeX-like
markup), so a module named ``$\\notacommand{x}^$`` would fail to draw, and ``$x^2$`` would
be typeset. Every name a user chose (modules, blocks, data sets, models, optimizers,
metrics, titles) goes through :func:`literal` before it reaches a figure; flatlens's own
labels use Unicode (ρ², λ_max), never mathtext.
"""

from __future__ import annotations

__all__ = ["literal"]


_HIDDEN = "\u200b"  # a zero-width space: shown as nothing


def literal(text: object) -> str:
    """``str(text)`` drawn by matplotlib as it reads: every ``$`` escaped, and a zero-width
    space before a leading ``_`` (a legend leaves out labels that start with one).

    Matplotlib shows ``\\$`` as ``$`` and treats a string whose dollars are all escaped as
    plain text; a backslash anywhere else is drawn as it is.
    """
    out = str(text).replace("$", r"\$")
    return _HIDDEN + out if out.startswith("_") else out
