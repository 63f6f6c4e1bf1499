"""Names are text, not markup (issue 23, row 2): every user-chosen name that reaches a figure
(modules and blocks, runs and optimizers, metrics, titles) is drawn as it reads, never parsed
as matplotlib mathtext, so no name can break a report."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from matplotlib.text import Text

from flatlens.core._text import literal
from flatlens.measures._bounds import plot_bound_rows
from flatlens.report._figures import plot_block_spectra, plot_eigenvalues

NAMES = st.text(alphabet="$\\^_{}x %&#", min_size=1, max_size=20)
BREAKS_MATHTEXT = "$\\notacommand{x}^$"


def test_a_name_that_breaks_mathtext_is_what_the_issue_reported():
    fig = Figure()
    fig.subplots().set_title(BREAKS_MATHTEXT)
    with pytest.raises(ValueError, match="Unknown symbol"):
        fig.savefig(io.BytesIO(), format="png")


@given(name=NAMES)
def test_literal_is_drawn_as_the_name_reads(name):
    text = Text(text=literal(name))
    drawn, math = text._preprocess_math(text.get_text())
    assert (drawn.removeprefix("\u200b"), math) == (name, False)  # not mathtext
    assert not drawn.startswith("_")  # a legend would leave the name out


def _blocks(names):
    return {
        "blocks": [
            {
                "name": n,
                "eigenvalues": [2.0 + i, 1.0],
                "density": {"grid": list(np.linspace(0, 3, 5)), "density": [0.1] * 5},
            }
            for i, n in enumerate(names)
        ]
    }


@settings(max_examples=6)  # a figure each: the literal() property above covers the strings
@given(names=st.lists(NAMES, min_size=1, max_size=3, unique=True))
def test_block_spectra_with_any_names_draw(tmp_path_factory, names):
    path = tmp_path_factory.mktemp("fig") / "blocks.png"
    plot_block_spectra(_blocks(names), path, title=names[0])
    assert path.stat().st_size > 0


def test_every_figure_takes_markup_names(tmp_path):
    plot_block_spectra(_blocks([BREAKS_MATHTEXT, "$x^2$"]), tmp_path / "b.png")
    plot_eigenvalues(
        {BREAKS_MATHTEXT: [3.0, 1.0], "$$": [2.0]}, tmp_path / "e.png", title=BREAKS_MATHTEXT
    )
    row = {"rho": 0.1, "r0": 0.01, "r1": 0.02, "lambda_max": 2.0, "holds": True}
    plot_bound_rows([row], tmp_path / "r.png", title=BREAKS_MATHTEXT)
    assert all((tmp_path / f).stat().st_size > 0 for f in ("b.png", "e.png", "r.png"))


def test_landscape_and_study_figures_take_markup_names(tmp_path):
    import torch

    from flatlens import Objective
    from flatlens.landscape import line, plot_line, random_direction

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    objective = Objective(net, torch.nn.functional.cross_entropy, data)
    result = line(objective, random_direction(objective, seed=0), num_points=3)
    plot_line({BREAKS_MATHTEXT: result, "$x$": result}, tmp_path / "l.png", title="$^$")
    assert (tmp_path / "l.png").stat().st_size > 0
