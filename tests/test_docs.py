"""The documentation builds strictly, its code runs as written, and every name it cites exists."""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

# Pages that may name what no longer exists: the table of moved and removed names, and the
# benchmark pages, which report measurements of code that was removed since.
HISTORY = {DOCS / "api" / "index.md", *DOCS.glob("benchmarks*.md")}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _python_blocks(path: Path) -> list[str]:
    """The ```` ```python ```` blocks of a page, indented ones (in lists) dedented."""
    found = re.findall(r"^( *)```python\n(.*?)^\1```", path.read_text(), re.S | re.M)
    return [textwrap.dedent(block) for _, block in found]


def _resolve(dotted: str) -> object:
    """The object named ``a.b.c``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.skipif(
    shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
    reason="mkdocs is not installed (pip install '.[docs]')",
)
def test_mkdocs_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_quickstart_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensor(" in proc.stdout


def test_every_documented_import_works():
    """Each ``import``/``from ... import`` of flatlens in a python block of the docs runs."""
    statements = {}
    for page in PAGES:
        for block in _python_blocks(page):
            for node in ast.walk(ast.parse(block)):
                module = (
                    node.module
                    if isinstance(node, ast.ImportFrom)
                    else node.names[0].name
                    if isinstance(node, ast.Import)
                    else None
                )
                if module and module.split(".")[0] == "flatlens":
                    statements.setdefault(ast.unparse(node), _rel(page))
    assert statements
    failures = []
    for statement, page in sorted(statements.items()):
        try:
            exec(statement, {})
        except ImportError as err:
            failures.append(f"{page}: {statement}: {err}")
    assert not failures, "\n".join(failures)


def test_every_cited_flatlens_name_exists():
    """``flatlens.x.y`` in the prose names a module or object that exists (or is history)."""
    failures = []
    for page in PAGES:
        if page in HISTORY:
            continue
        for dotted in sorted(set(re.findall(r"`(flatlens(?:\.\w+)+)", page.read_text()))):
            try:
                _resolve(dotted)
            except (ImportError, AttributeError) as err:
                failures.append(f"{_rel(page)}: {dotted}: {err}")
    assert not failures, "\n".join(failures)


def test_every_cited_source_file_exists():
    failures = [
        f"{_rel(page)}: {path}"
        for page in PAGES
        if page not in HISTORY
        for path in sorted(
            set(
                re.findall(
                    r"`((?:flatlens|tests|examples|benchmarks)/[\w/]+\.py)`", page.read_text()
                )
            )
        )
        if not (ROOT / path).is_file()
    ]
    assert not failures, "\n".join(failures)


def test_api_pages_list_existing_public_members():
    """mkdocstrings skips a ``members:`` entry that does not exist; this test does not."""
    failures = []
    for page in sorted((DOCS / "api").glob("*.md")):
        text = page.read_text()
        for match in re.finditer(r"^::: ([\w.]+)\n((?:    .*\n)*)", text, re.M):
            target, options = match.group(1), match.group(2)
            obj = _resolve(target)
            members = re.findall(r"^        - (\w+)$", options, re.M)
            public = set(getattr(obj, "__all__", ()))
            for name in members:
                if not hasattr(obj, name) or (public and name not in public):
                    failures.append(f"{_rel(page)}: {target}.{name} is not public")
    assert not failures, "\n".join(failures)


PUBLIC = [
    "flatlens",
    "flatlens.core",
    "flatlens.measures",
    "flatlens.landscape",
    "flatlens.optim",
    "flatlens.train",
    "flatlens.report",
    "flatlens.cli",
    "flatlens.data",
    "flatlens.zoo",
    "flatlens.distributed",
]


def test_api_reference_covers_every_public_name():
    """Each name a public package exports is rendered on some API page."""
    rendered = set()
    for page in sorted((DOCS / "api").glob("*.md")):
        for match in re.finditer(r"^::: ([\w.]+)\n((?:    .*\n)*)", page.read_text(), re.M):
            target, options = match.group(1), match.group(2)
            members = re.findall(r"^        - (\w+)$", options, re.M)
            if members:
                obj = _resolve(target)
                rendered |= {id(getattr(obj, name)) for name in members if hasattr(obj, name)}
            elif "members: false" not in options:
                obj = _resolve(target)
                rendered.add(id(obj))
                rendered |= {id(getattr(obj, name)) for name in getattr(obj, "__all__", ())}
    missing = [
        f"{package}.{name}"
        for package in PUBLIC
        for name in importlib.import_module(package).__all__
        if not name.startswith("__")
        and id(getattr(importlib.import_module(package), name)) not in rendered
        and not isinstance(getattr(importlib.import_module(package), name), (dict, tuple, str))
    ]
    assert not missing, "not in the API reference: " + ", ".join(missing)


REMOVED = (
    "tune_cpu_allocator",
    "FLATLENS_TUNE_ALLOCATOR",
    "Objective.criterion",
    "affine_batchnorm",
    "fast_cross_entropy",
    "fold_batchnorm",
    "channels-last",
    "channels_last",
)


def test_removed_features_are_only_history():
    allowed = HISTORY | {DOCS / "quickstart.md"}  # the allocator's replacement says what it was
    failures = [
        f"{_rel(page)}: {word}"
        for page in PAGES
        if page not in allowed
        for word in REMOVED
        if word in page.read_text()
    ]
    assert not failures, "\n".join(failures)
