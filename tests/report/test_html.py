"""The self-contained HTML report and the sections of an optimizer study."""

from __future__ import annotations

import base64
import re

import pytest
from matplotlib.figure import Figure

from flatlens.core import write_figure
from flatlens.data import synthetic_classification
from flatlens.report._html import Section, render_report, write_report
from flatlens.report._study import kendall_rows, mean_rows, study_sections
from flatlens.train import TrainConfig, compare


def _png(path, width_in: float, height_in: float) -> None:
    fig = Figure(figsize=(width_in, height_in))
    fig.subplots().plot([0, 1], [1, 0])
    write_figure(fig, path)


def _embedded(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_tables_text_and_links_are_escaped_and_formatted():
    page = render_report(
        "<b>title</b>",
        [
            Section(
                "a & b",
                text="x < y",
                table=[{"name": "<i>", "value": 0.000123456, "ok": True}, {"extra": None}],
                links=[("the <sgd> report", "sgd/report.html?a=1&b=2")],
            )
        ],
        subtitle="sub",
    )
    assert "<title>&lt;b&gt;title&lt;/b&gt;</title>" in page
    assert "<h2>a &amp; b</h2>" in page and "<p>x &lt; y</p>" in page
    head = re.search(r"<thead><tr>(.*?)</tr></thead>", page).group(1)
    assert re.findall(r"<th>(.*?)</th>", head) == ["name", "value", "ok", "extra"]
    cells = re.findall(r"<td>(.*?)</td>", page)
    assert cells == ["&lt;i&gt;", "0.0001235", "yes", "–", "–", "–", "–", "–"]
    assert '<a href="sgd/report.html?a=1&amp;b=2">the &lt;sgd&gt; report</a>' in page
    assert "<script" not in page  # no plotly figure, no plotly.js


def test_images_are_embedded_byte_for_byte_and_wide_ones_span_the_page(tmp_path):
    _png(tmp_path / "narrow.png", 4, 3)
    _png(tmp_path / "wide.png", 12, 3)
    page = render_report(
        "t", [Section("s", images=[("n", tmp_path / "narrow.png"), ("w", tmp_path / "wide.png")])]
    )
    assert _embedded(page) == [
        (tmp_path / "narrow.png").read_bytes(),
        (tmp_path / "wide.png").read_bytes(),
    ]
    assert page.count("<figure class='wide'>") == 1
    assert re.search(r"<figure class='wide'><img alt=\"w\"", page)
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(ValueError, match="PNG"):
        render_report("t", [Section("s", images=[("x", tmp_path / "fake.png")])])


def test_plotly_is_inlined_once_and_nothing_is_loaded_from_the_network(tmp_path):
    import plotly.graph_objects as go

    figs = [go.Figure(go.Scatter(x=[0, 1], y=[1, 0])) for _ in range(2)]
    page = render_report("t", [Section("a", plotly=figs[:1]), Section("b", plotly=figs[1:])])
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()) == 1
    assert page.count('class="plotly-graph-div"') == 2
    assert not re.search(r"<(script|img|link)[^>]+(src|href)=[\"']?(https?:)?//", page)


def test_write_report_is_atomic(tmp_path):
    out = tmp_path / "sub" / "report.html"
    assert write_report(out, "t", [Section("s", text="one")]) == out
    write_report(out, "t", [Section("s", text="two")])
    assert "<p>two</p>" in out.read_text()
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


@pytest.fixture(scope="module")
def study():
    data = synthetic_classification(num_train=64, num_features=6, num_classes=3, num_test=32)
    base = TrainConfig(
        model="mlp",
        model_kwargs={"hidden": 8, "depth": 1},
        epochs=1,
        measure_samples=32,
        measure_steps=2,
        trace_probes=3,
    )
    return compare(data, ["sgd", "sam"], seeds=[0, 1], config=base)


def test_study_sections_show_the_study_numbers(study, tmp_path):
    sections = study_sections(study, tmp_path)
    assert (tmp_path / "flatness_vs_gap.png").read_bytes()[:4] == b"\x89PNG"
    means, tau, runs = sections
    assert means.table == mean_rows(study.summary)
    for row, entry in zip(means.table, study.summary, strict=True):
        assert row["optimizer"] == entry["optimizer"]
        mean, std = entry["lambda_max_mean"], entry["lambda_max_std"]
        assert row["lambda_max"] == f"{mean:.3g} ± {std:.2g}"
    assert tau.table == kendall_rows(study.kendall)
    for row in tau.table:
        stats = study.kendall[row["measure"]]
        assert row["τ vs gap_loss"] == stats["gap_loss"]["tau"]
        assert row["p vs gap_acc"] == stats["gap_acc"]["p_value"]
        assert row["runs"] == len(study.runs)
    assert [(r["optimizer"], r["seed"]) for r in runs.table] == [
        (r["optimizer"], r["seed"]) for r in study.runs
    ]
    assert all(r["r1"] == s["r1"] for r, s in zip(runs.table, study.runs, strict=True))
    page = render_report("study", sections)
    assert _embedded(page) == [(tmp_path / "flatness_vs_gap.png").read_bytes()]
    assert "<figure class='wide'>" in page  # four panels side by side
