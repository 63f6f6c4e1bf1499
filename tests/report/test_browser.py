"""The demo's reports in a real browser.

``flatlens demo --quick`` (run once, through a subprocess) writes a comparison report and
one diagnosis report per optimizer. Its output is checked, then both kinds of page are
opened in headless Chromium (Debian's ``chromium``, installed by ``.ci/run``): no console
errors, no failed loads, the plotly figure drawn, a screenshot that is not blank, and
nothing fetched from the network.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM = next(
    (
        path
        for path in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))
        if path
    ),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (.ci/run installs it)"
)

# Injected first into <head> of a copy of the page: records console.error calls, uncaught
# errors, failed resource loads and rejected promises in <pre id="flatlens-probe">.
PROBE = """<script>(function () {
  var log = [];
  function show() {
    var el = document.getElementById("flatlens-probe");
    if (el) { el.textContent = log.join("\\n"); }
  }
  function note(kind, text) { log.push(kind + ": " + text); show(); }
  var error = console.error;
  console.error = function () {
    note("console.error", Array.prototype.map.call(arguments, String).join(" "));
    return error.apply(console, arguments);
  };
  window.addEventListener("error", function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) { note("failed load", t.src || t.href); }
    else { note("uncaught", e.message); }
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    note("unhandled rejection", String(e.reason));
  });
  document.addEventListener("DOMContentLoaded", function () {
    var el = document.createElement("pre");
    el.id = "flatlens-probe";
    el.setAttribute("data-ready", "yes");
    document.body.appendChild(el);
    show();
  });
})();</script>"""


def run_demo(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "flatlens", "demo", "--quick", "--out", str(out), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = run_demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"summary": json.loads(proc.stdout), "out": out, "stderr": proc.stderr}


def open_in_chromium(page: Path, tmp_path: Path) -> dict:
    """Open a probed copy of ``page``; returns the probe's log, the DOM and the screenshot."""
    text = page.read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text)
    assert head, "the page has no <head>"
    probed = page.with_name(f".probed-{page.name}")
    probed.write_text(text[: head.end()] + PROBE + text[head.end() :], encoding="utf-8")
    shot = tmp_path / f"{page.parent.name}-{page.stem}.png"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--enable-unsafe-swiftshader",  # software WebGL for plotly's 3-D surface
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--enable-logging=stderr",
            "--v=1",
            "--virtual-time-budget=5000",
            "--window-size=1200,2000",
            f"--screenshot={shot}",
            "--dump-dom",
            probed.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    probed.unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    match = re.search(r'<pre id="flatlens-probe"[^>]*>(.*?)</pre>', proc.stdout, re.S)
    assert match, "the probe did not run: " + proc.stdout[:500]
    console = [
        line
        for line in proc.stderr.splitlines()
        if "CONSOLE" in line and re.search(r"Uncaught|Error", line)
    ]
    return {
        "errors": html.unescape(match.group(1)).strip(),
        "console": console,
        "dom": proc.stdout,
        "screenshot": shot,
    }


def assert_not_blank(png: Path) -> None:
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, f"{png} has {len(colours)} colours"
        grey = rgb.convert("L")
        dark = sum(grey.histogram()[:128])
        assert dark > 0.002 * grey.width * grey.height, f"{png} has almost no dark pixels"


class _Loads(HTMLParser):
    """Collects the URLs a page would load: src of script/img/iframe/..., href of link."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "iframe", "embed", "source", "video", "audio", "input"):
            self.urls.append(attrs.get("src") or "")
        if tag == "link":
            self.urls.append(attrs.get("href") or "")
        if tag == "object":
            self.urls.append(attrs.get("data") or "")


def external_loads(page: Path) -> list[str]:
    parser = _Loads()
    parser.feed(page.read_text(encoding="utf-8"))
    return [u for u in parser.urls if re.match(r"\s*(https?:)?//", u, re.I)]


# ---------------------------------------------------------------------- the demo's output
def test_demo_quick_writes_a_comparison_and_three_diagnoses(demo):
    summary, out = demo["summary"], demo["out"]
    assert [r["optimizer"] for r in summary["diagnosed"]] == ["sgd", "sam", "gam"]
    runs = summary["study"]["runs"]
    assert sorted((r["optimizer"], r["seed"]) for r in runs) == sorted(
        (o, s) for o in ("sgd", "sam", "gam") for s in (0, 1)
    )
    for path in summary["files"]:
        assert Path(path).is_file(), path
    for row, name in zip(summary["diagnosed"], ("sgd", "sam", "gam"), strict=True):
        report = json.loads((out / name / "report.json").read_text())
        assert report["summary"]["λ_max"] == report["spectrum"]["eigenvalues"][0]
        assert row["λ_max"] == report["summary"]["λ_max"]
    page = (out / "report.html").read_text()
    for name in ("sgd", "sam", "gam"):
        assert f'href="{name}/report.html"' in page
    assert "Kendall" in page
    assert "runs:" in demo["stderr"]  # progress bars by default


@pytest.mark.parametrize("page", ["report.html", "sgd/report.html"])
def test_reports_are_self_contained(demo, page):
    path = demo["out"] / page
    assert external_loads(path) == []
    assert "data:image/png;base64," in path.read_text()


def test_external_loads_finds_remote_references(tmp_path):
    page = tmp_path / "remote.html"
    page.write_text(
        "<script src='https://cdn.example/x.js'></script><img src='data:image/png;base64,AA'>"
        "<link rel='stylesheet' href='//cdn.example/s.css'><a href='https://example.org'>ok</a>"
    )
    assert external_loads(page) == ["https://cdn.example/x.js", "//cdn.example/s.css"]


# ---------------------------------------------------------------------- in the browser
@needs_chromium
def test_probe_catches_errors(tmp_path):
    """The harness itself: a page with an uncaught error, a console.error and a missing
    image is reported on all three counts."""
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body><p>x</p>"
        "<script>console.error('logged'); missingFunction();</script>"
        "<img src='missing.png'></body></html>"
    )
    seen = open_in_chromium(page, tmp_path)
    assert "console.error: logged" in seen["errors"]
    assert "uncaught" in seen["errors"] and "missingFunction" in seen["errors"]
    assert "failed load" in seen["errors"] and "missing.png" in seen["errors"]
    assert any("missingFunction" in line for line in seen["console"])


@needs_chromium
def test_diagnosis_report_in_chromium(demo, tmp_path):
    seen = open_in_chromium(demo["out"] / "sgd" / "report.html", tmp_path)
    assert seen["errors"] == ""
    assert seen["console"] == []
    assert 'class="plot-container plotly"' in seen["dom"]  # plotly.js ran and drew
    assert_not_blank(seen["screenshot"])


@needs_chromium
def test_comparison_report_in_chromium(demo, tmp_path):
    seen = open_in_chromium(demo["out"] / "report.html", tmp_path)
    assert seen["errors"] == ""
    assert seen["console"] == []
    assert "Kendall" in seen["dom"]
    assert_not_blank(seen["screenshot"])
