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
from docs_pages import (
    DEPRECATED,
    SHELLS,
    compare,
    failures,
    parse,
    round_numbers,
    run_page,
    run_pages,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]

# Pages that may name what no longer exists: the benchmark pages, which report measurements
# of code that was removed since (CHANGELOG.md holds the rest of the history).
HISTORY = {*DOCS.glob("benchmarks*.md")}


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
    assert DEPRECATED not in proc.stderr, proc.stderr[-3000:]


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
    allowed = HISTORY
    failures = [
        f"{_rel(page)}: {word}"
        for page in PAGES
        if page not in allowed
        for word in REMOVED
        if word in page.read_text()
    ]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------- pages that print what they show
@pytest.mark.parametrize("page", run_pages(), ids=lambda p: _rel(p))
def test_page_runs_and_prints_what_it_shows(page, tmp_path):
    """Every Python block of the page, and every command whose output it shows, runs in a
    fresh process and prints what the page shows (to the digits shown; docs_pages.py)."""
    problems = failures(page, run_page(page, tmp_path))
    assert not problems, "\n\n".join(problems)


PEER_PAGES = [p for p in run_pages() if any(b.marker == "needs" for b in parse(p.read_text()))]


@pytest.mark.parametrize("page", PEER_PAGES, ids=lambda p: _rel(p))
def test_page_prints_the_same_without_the_peer_libraries(page, tmp_path, monkeypatch):
    """Where PyHessian or loss-landscapes is missing (CI installs neither), their blocks are
    skipped and the rest of the page prints what it shows all the same."""
    peers = {b.argument for b in parse(page.read_text()) if b.marker == "needs"}
    monkeypatch.setenv("FLATLENS_DOCS_WITHOUT", ",".join(sorted(peers)))
    results = run_page(page, tmp_path)
    assert any(r.status == "skipped" and "not installed" in r.error for r in results)
    problems = failures(page, results)
    assert not problems, "\n\n".join(problems)


def test_run_pages_are_the_quickstart_and_every_howto():
    assert DOCS / "quickstart.md" in run_pages()
    assert set((DOCS / "howto").glob("*.md")) <= set(run_pages())


@pytest.mark.parametrize("page", run_pages(), ids=lambda p: _rel(p))
def test_page_markers_are_valid_and_exceptions_say_why(page):
    blocks = parse(page.read_text())  # raises on an unknown marker or a reason left out
    for block in blocks:
        if block.marker == "not-run":
            assert len(block.argument.split()) >= 3, f"{_rel(page)}:{block.line}: say why"
        if block.marker == "file":
            assert block.lang == "python" and re.fullmatch(r"[\w.-]+\.py", block.argument)
        if block.marker == "run":
            assert block.lang in SHELLS, f"{_rel(page)}:{block.line}: run marks shell blocks"
        if block.lang in SHELLS and block.output is not None:
            assert block.runs or block.marker == "not-run"
    assert any(block.runs for block in blocks), f"{_rel(page)} runs nothing"


def test_few_blocks_are_not_run():
    """Blocks shown but not run are exceptions: a GPU, data on disk, torchrun, long runs."""
    not_run = [
        f"{_rel(page)}:{block.line}: {block.argument}"
        for page in run_pages()
        for block in parse(page.read_text())
        if block.marker == "not-run"
    ]
    assert len(not_run) <= 6, "\n".join(not_run)


def test_shown_output_is_compared_to_the_digits_shown():
    assert compare("pi is 3.14", "pi is 3.1416") is None
    assert "3.15" in compare("pi is 3.14", "pi is 3.15")
    assert compare("n = 18", "n = 18") is None and compare("n = 18", "n = 19")
    assert compare("1.107e-06", "1.1067e-06") is None
    assert compare("1.107e-06", "1.2e-06")
    assert compare("tensor([1.3156, 1.0247])", "tensor([1.3156, 1.0248])")
    assert compare("a   b 0.5", "a b 0.5") is None  # runs of spaces are one space
    assert compare("loss 0.5", "gain 0.5")  # the words must match
    assert compare("x\n...\nz 1.0", "x\ny\nw\nz 1.0") is None  # ... stands for lines
    assert compare("x\nz", "x\ny\nz")  # without ..., every printed line is shown
    assert compare("peak_memory_bytes=123, v=1.0", "peak_memory_bytes=999, v=1.04") is None
    assert compare("x 1", "")  # a shown line not printed


def test_page_parser_reads_markers_and_outputs():
    text = (
        "<!-- not-run: needs CIFAR-10 on disk -->\n```python\nimport x\n```\n\n"
        "```python\nprint(1)\n```\n\n```text\n1\n```\n\n"
        "<!-- file: mod.py -->\n```python\nA = 1\n```\n\n"
        "```bash\nflatlens --help\n```\n\n<!-- run -->\n```bash\nls\n```\n"
    )
    blocks = parse(text)
    assert [b.lang for b in blocks] == ["python", "python", "text", "python", "bash", "bash"]
    assert blocks[0].marker == "not-run" and not blocks[0].runs
    assert blocks[1].runs and blocks[1].output.code == "1\n"
    assert blocks[3].marker == "file" and blocks[3].argument == "mod.py"
    assert not blocks[4].runs and blocks[5].runs
    with pytest.raises(ValueError, match="needs its text"):
        parse("<!-- not-run -->\n```python\nx\n```\n")
    with pytest.raises(ValueError, match="unknown marker"):
        parse("<!-- norun: x -->\n```python\nx\n```\n")


def test_updates_cut_numbers_to_the_digits_asked():
    assert round_numbers("0.9888724035608308 18 1.10672e-06 float64", 4) == (
        "0.9889 18 1.107e-06 float64"
    )


# ------------------------------------------------------------------- history and vocabulary
def test_no_page_cites_an_internal_work_item():
    """History lives in CHANGELOG.md; pages describe the code as it is."""
    pattern = re.compile(r"\b(issues? #?\d+|this round|previous round|PR #?\d+)", re.I)
    failures = [
        f"{_rel(page)}: {match.group(0)!r}"
        for page in PAGES
        for match in pattern.finditer(page.read_text())
    ]
    assert not failures, "\n".join(failures)


def test_no_page_points_to_a_private_module():
    failures = [
        f"{_rel(page)}: {name}"
        for page in PAGES
        if page not in HISTORY
        for name in re.findall(r"`(flatlens(?:\.\w+)*\._(?!_)\w+[\w.]*)`", page.read_text())
    ]
    assert not failures, "\n".join(failures)


HOWTO_LISTS = [ROOT / "README.md", DOCS / "index.md", DOCS / "quickstart.md"]


@pytest.mark.parametrize("page", HOWTO_LISTS, ids=lambda p: _rel(p))
def test_guide_lists_name_every_howto(page):
    text = page.read_text()
    missing = [
        h.name for h in sorted((DOCS / "howto").glob("*.md")) if f"howto/{h.name}" not in text
    ]
    assert not missing, f"{_rel(page)} does not link {missing}"


def _code_blocks(lang: str):
    for page in PAGES:
        for block in parse(page.read_text()):
            if block.lang == lang or (lang == "shell" and block.lang in SHELLS):
                yield page, block


def _call_name(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def test_documented_python_uses_no_deprecated_name():
    """No python block of any page passes a keyword that was renamed (flatlens' RENAMES),
    or calls R0, R1 or the average sharpness without their radius."""
    from flatlens.core._renames import RENAMES

    for package in PUBLIC:  # the renames are recorded as the modules are imported
        importlib.import_module(package)
    assert ("hessian_trace", "num_samples") in RENAMES and ("plane", "steps") in RENAMES
    renamed: dict[str, dict[str, str]] = {}
    for (owner, old), new in RENAMES.items():
        renamed.setdefault(owner.split(".")[-1], {})[old] = new
    needs_rho = {"zeroth_order_sharpness", "first_order_flatness", "average_sharpness"}
    failures = []
    for page, block in _code_blocks("python"):
        for node in ast.walk(ast.parse(block.code)):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            for kw in node.keywords:
                if kw.arg in renamed.get(name, {}):
                    failures.append(
                        f"{_rel(page)}:{block.line}: {name}({kw.arg}=) is now "
                        f"{renamed[name][kw.arg]}"
                    )
            if (
                name in needs_rho
                and len(node.args) < 2
                and "rho" not in {kw.arg for kw in node.keywords}
            ):
                failures.append(f"{_rel(page)}:{block.line}: {name} needs its radius rho")
    assert not failures, "\n".join(failures)


def _deprecated_flags() -> dict[str, set[str]]:
    """{subcommand: its deprecated flags}, read from the command's parser."""
    import argparse

    from flatlens.cli._parser import _Deprecated, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {
        name: {o for a in p._actions if isinstance(a, _Deprecated) for o in a.option_strings}
        for name, p in sub.choices.items()
    }


def test_documented_commands_use_no_deprecated_flag():
    """Shell blocks and main([...]) calls use the current flags; the deprecated ones appear
    only in cli.md's table of deprecated flags."""
    deprecated = _deprecated_flags()
    assert deprecated["diagnose"] == {"--rho"} and deprecated["landscape"] == {"--steps"}
    failures = []
    for page, block in _code_blocks("shell"):
        text = block.code.replace("\\\n", " ")
        for command in re.split(r"[;\n|&]", text):
            words = command.split()
            if "flatlens" not in words:
                continue
            args = words[words.index("flatlens") + 1 :]
            if args and args[0] in deprecated:
                failures += [
                    f"{_rel(page)}:{block.line}: flatlens {args[0]} {w}"
                    for w in args
                    if w.split("=")[0] in deprecated[args[0]]
                ]
    for page, block in _code_blocks("python"):
        for node in ast.walk(ast.parse(block.code)):
            if isinstance(node, ast.List) and node.elts:
                words = [e.value for e in node.elts if isinstance(e, ast.Constant)]
                if words and words[0] in deprecated:
                    failures += [
                        f"{_rel(page)}:{block.line}: {words[0]} {w}"
                        for w in words
                        if w in deprecated[words[0]]
                    ]
    assert not failures, "\n".join(failures)


def test_cli_reference_lists_every_flag_with_the_defaults_of_help():
    """docs/cli.md names every flag of every subcommand (the deprecated ones in their
    table), and the defaults its diagnose tables give are those of ``--help``."""
    import argparse

    from flatlens.cli._parser import build_parser

    text = (DOCS / "cli.md").read_text()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {option}"
        for name, parser in sub.choices.items()
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help" and f"`{option}" not in text
    ]
    assert not missing, "not in docs/cli.md: " + ", ".join(missing)
    diagnose = sub.choices["diagnose"]
    section = text[text.index("## diagnose") : text.index("## train")]
    rows = {
        flag: [cell.strip().strip("`") for cell in cells.split("|")]
        for flag, cells in re.findall(r"^\| `(--[\w-]+)[^`]*` \|(.*)\|$", section, re.M)
    }
    settings = next(g for g in diagnose._action_groups if g.title.startswith("measure settings"))
    checked = 0
    for action in diagnose._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if action in settings._group_actions:
            assert flag in rows, f"docs/cli.md has no row for diagnose {flag}"
        if flag not in rows:
            continue
        default = action.default
        if default is None:  # resolved later; --help says it: "(default: 10; --quick: 4)"
            found = re.search(r"default: ([^;)]+)(?:; --quick: ([^;)]+))?", action.help or "")
            if not found:
                continue
            default, quick = found.groups()
            if quick is not None:
                assert rows[flag][1] == quick.strip(), (flag, rows[flag], quick)
        if default in (False, "", argparse.SUPPRESS):
            continue
        if isinstance(default, tuple):
            default = ",".join(f"{v:g}" for v in default)
        shown = rows[flag][0]
        assert shown == str(default).strip() or _float_equal(shown, default), (flag, shown, default)
        checked += 1
    assert checked >= 10


def _float_equal(shown: str, default: object) -> bool:
    try:
        return float(shown) == float(default)
    except (TypeError, ValueError):
        return False
