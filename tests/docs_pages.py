"""Run the code blocks of a documentation page and compare what they print with the page.

The convention, for ``docs/quickstart.md``, ``docs/howto/*.md`` (see ``RUN_PAGES``):

* Every ```` ```python ```` block runs, in page order, in one fresh Python process per page
  (blocks share one namespace, as in a session), in an empty folder, on one thread.
* A ```` ```bash ```` block runs (``bash -e -o pipefail``, in the same folder) when a
  ```` ```text ```` block follows it or when it is marked ``<!-- run -->``; other shell blocks
  (installation, sketches of longer runs) are shown only.
* A ```` ```text ```` block right after a block that runs (only blank lines between) is what
  that block prints on stdout. Numbers are compared to the digits the page shows: a page
  showing ``3.14`` passes for ``3.1416`` but not for ``3.15`` (|printed - shown| at most half
  a unit of the last shown digit); integers exactly. Other text is compared word by word
  (runs of spaces are one space). A line ``...`` stands for any number of printed lines.
  The values of the fields in ``MASKED`` (memory, seconds) are not compared.
* An HTML comment on the line before a block changes what happens to it:

  * ``<!-- not-run: REASON -->``: shown only, for the reason given (a GPU, data on disk,
    ``torchrun``, hours); the reason is required;
  * ``<!-- file: NAME -->``: the block is written to ``NAME`` (a module or script that later
    blocks import or run), not executed;
  * ``<!-- needs: MODULE -->``: runs only where ``MODULE`` is installed (a peer library whose
    code a page shows beside flatlens'); skipped otherwise (``FLATLENS_DOCS_WITHOUT=MODULE``
    skips it where it is installed), and the page's other blocks must print the same either
    way;
  * ``<!-- run -->``: a shell block without shown output that runs (it makes what later
    blocks use).

``python tests/docs_pages.py --update PAGE...`` runs pages and rewrites each shown output
that no longer matches with what the code printed, so shown outputs are never typed by hand.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import asdict, dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

MASKED = ("peak_memory_bytes", "seconds", "rounding")
"""Fields whose values change from run to run or machine to machine (memory, time, the
measured rounding error): ``name=VALUE`` and ``'name': VALUE``."""

MARKERS = ("not-run", "file", "needs", "run")
SHELLS = ("bash", "sh", "shell", "console")
DEPRECATED = "is deprecated and stops working in flatlens"


def run_pages() -> list[Path]:
    """The pages whose blocks the test suite runs."""
    return [DOCS / "quickstart.md", *sorted((DOCS / "howto").glob("*.md"))]


# ------------------------------------------------------------------------------ parsing
@dataclass
class Block:
    """One fenced code block of a page."""

    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    indent: str = ""
    marker: str | None = None  # one of MARKERS
    argument: str = ""  # the marker's text after the colon
    output: Block | None = None  # the ```text block that shows what this one prints

    @property
    def runs(self) -> bool:
        """Whether the page runner executes (or writes) this block."""
        if self.marker == "not-run":
            return False
        if self.lang == "python":
            return True
        if self.lang in SHELLS:
            return self.marker == "run" or self.output is not None
        return False


_FENCE = re.compile(r"^( *)```(\w*)[^\n]*$")
_MARKER = re.compile(r"^\s*<!--\s*([\w-]+)\s*(?::\s*(.*?))?\s*-->\s*$")


def parse(text: str) -> list[Block]:
    """The fenced blocks of a page, each with its marker and its shown output.

    Raises:
        ValueError: an unclosed fence, an unknown marker, a ``not-run`` without a reason.
    """
    lines = text.split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, lang = match.group(1), match.group(2)
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != indent + "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"line {i + 1}: the ``` fence is never closed")
        body = "\n".join(lines[i + 1 : j])
        block = Block(lang, textwrap.dedent(body) + "\n", i + 1, j + 1, indent)
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = _MARKER.match(lines[k]) if k >= 0 else None
        if marker and marker.group(1) in MARKERS:
            block.marker, block.argument = marker.group(1), (marker.group(2) or "").strip()
            if block.marker in ("not-run", "file", "needs") and not block.argument:
                raise ValueError(f"line {k + 1}: <!-- {block.marker}: ... --> needs its text")
        elif marker and re.search(r"run|file|need|skip", marker.group(1).lower()):
            raise ValueError(f"line {k + 1}: unknown marker {marker.group(1)!r} ({MARKERS})")
        if blocks and lang == "text":
            previous = blocks[-1]
            between = lines[previous.end : i]
            if previous.lang != "text" and all(not s.strip() for s in between):
                previous.output = block
        blocks.append(block)
        i = j + 1
    return blocks


# --------------------------------------------------------------------------- comparing
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])")
_MASK = re.compile(r"((?:" + "|".join(MASKED) + r")['\"]?\s*[=:]\s*)-?[\d.]+(?:[eE][-+]?\d+)?")


def _tolerance(shown: str) -> float:
    """Half a unit of the last digit ``shown`` has: 0.005 for ``3.14``, 0.5 for ``42``."""
    mantissa, _, exponent = shown.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def _split(line: str) -> tuple[list[str], list[str]]:
    """The words between the numbers of a line, and the numbers."""
    line = _MASK.sub(r"\1<masked>", line)
    numbers = _NUMBER.findall(line)
    words = [" ".join(part.split()) for part in _NUMBER.split(line)]
    return words, numbers


def same_line(shown: str, printed: str) -> str | None:
    """None when ``printed`` matches ``shown`` (numbers to the digits shown), else why not."""
    shown_words, shown_numbers = _split(shown)
    printed_words, printed_numbers = _split(printed)
    if shown_words != printed_words or len(shown_numbers) != len(printed_numbers):
        return "the text differs"
    for a, b in zip(shown_numbers, printed_numbers, strict=True):
        if abs(float(a) - float(b)) > _tolerance(a) * (1 + 1e-9):
            return f"{b} is not {a} to the digits shown"
    return None


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.strip("\n").split("\n")]
    return [] if lines == [""] else lines


def compare(shown: str, printed: str) -> str | None:
    """None when ``printed`` matches the shown output ``shown``, else a message saying where.

    A shown line ``...`` matches any number of printed lines (none included).
    """
    want, got = _lines(shown), _lines(printed)
    failure: list[str] = []

    def match(i: int, j: int) -> bool:
        if i == len(want):
            if j == len(got):
                return True
            failure.append(f"printed more lines than shown, from: {got[j]!r}")
            return False
        if want[i].strip() == "...":
            return any(match(i + 1, k) for k in range(j, len(got) + 1))
        if j == len(got):
            failure.append(f"shown line not printed: {want[i]!r}")
            return False
        why = same_line(want[i], got[j])
        if why:
            failure.append(f"{why}:\n    shown:   {want[i]}\n    printed: {got[j]}")
            return False
        return match(i + 1, j + 1)

    return None if match(0, 0) else failure[0] if len(failure) == 1 else failure[-1]


# ----------------------------------------------------------------------------- running
@dataclass
class Ran:
    """What one block did."""

    line: int
    lang: str
    status: str  # "ok", "failed", "skipped", "written"
    stdout: str = ""
    error: str = ""
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of this process and the children it waited for
    shown: str | None = field(default=None)


def _capture_fd1(run) -> tuple[str, BaseException | None]:
    """Run ``run()`` with file descriptor 1 (Python's prints and any child's) captured."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        err = None
        try:
            run()
        except BaseException as exc:  # the page's failure, reported, never swallowed
            err = exc
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        return tmp.read().decode(errors="replace"), err


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported; ``FLATLENS_DOCS_WITHOUT=a,b`` pretends that a and b
    are not (to check a page as it runs where a peer library is missing)."""
    if module in os.environ.get("FLATLENS_DOCS_WITHOUT", "").split(","):
        return False
    return importlib.util.find_spec(module) is not None


def execute(page: Path, workdir: Path) -> list[Ran]:
    """Run the blocks of ``page`` in ``workdir`` (in this process: call it in a fresh one)."""
    import warnings

    warnings.filterwarnings("error", message=f".*{DEPRECATED}", category=FutureWarning)
    os.chdir(workdir)
    sys.path.insert(0, str(workdir))
    namespace: dict[str, object] = {"__name__": "__main__"}
    results: list[Ran] = []
    failed = False
    for block in parse(page.read_text()):
        shown = block.output.code if block.output is not None else None
        ran = Ran(block.line, block.lang, "skipped", shown=shown)
        if not block.runs:
            continue
        results.append(ran)
        if failed:
            ran.error = "not run: an earlier block failed"
            continue
        if block.marker == "needs" and not _installed(block.argument):
            ran.error = f"{block.argument} is not installed"
            continue
        if block.marker == "file":
            Path(block.argument).write_text(block.code)
            ran.status = "written"
            continue
        start, cpu = time.perf_counter(), _cpu_seconds()
        if block.lang == "python":
            code = compile(block.code, f"{page.name}, block at line {block.line}", "exec")
            ran.stdout, exc = _capture_fd1(lambda code=code: exec(code, namespace))
            if exc is not None:
                ran.error = "".join(traceback.format_exception(exc))[-4000:]
        else:
            proc = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", block.code],
                capture_output=True,
                text=True,
            )
            ran.stdout = proc.stdout
            if proc.returncode != 0:
                ran.error = f"exit code {proc.returncode}: {proc.stderr[-4000:]}"
            elif DEPRECATED in proc.stderr:
                ran.error = proc.stderr[-4000:]
        ran.seconds = time.perf_counter() - start
        ran.cpu_seconds = _cpu_seconds() - cpu
        ran.status = "failed" if ran.error else "ok"
        failed = failed or bool(ran.error)
    return results


def environment() -> dict[str, str]:
    """The environment a page runs in: one thread, this checkout first, no display."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONHASHSEED": "0",
    }


def run_page(page: Path, workdir: Path, timeout: float = 600) -> list[Ran]:
    """Run ``page`` in a fresh Python process in ``workdir``; what each block did."""
    report = workdir / ".docs_run.json"
    proc = subprocess.run(
        [sys.executable, __file__, "--execute", str(page), str(workdir), str(report)],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=timeout,
    )
    if not report.is_file():
        raise RuntimeError(f"{page.name}: the page runner failed:\n{proc.stderr[-4000:]}")
    results = [Ran(**r) for r in json.loads(report.read_text())]
    report.unlink()
    if DEPRECATED in proc.stderr:
        lines = [s for s in proc.stderr.splitlines() if DEPRECATED in s]
        results.append(Ran(0, "python", "failed", error="\n".join(lines)))
    return results


def failures(page: Path, results: list[Ran]) -> list[str]:
    """One message per block that failed or printed other than its page shows."""
    out = []
    rel = page.relative_to(ROOT)
    for ran in results:
        where = f"{rel}:{ran.line} ({ran.lang})"
        if ran.status == "failed":
            out.append(f"{where} failed:\n{ran.error}")
        elif ran.status == "ok" and ran.shown is not None:
            why = compare(ran.shown, ran.stdout)
            if why:
                out.append(f"{where} printed other than the page shows: {why}")
    return out


def round_numbers(text: str, digits: int) -> str:
    """``text`` with every decimal number cut to ``digits`` significant digits (rounded;
    integers and the notation kept): what a page shows of a long printed number."""

    def cut(match: re.Match[str]) -> str:
        token = match.group(0)
        mantissa, e, exponent = token.partition("e" if "e" in token else "E")
        if "." not in mantissa:
            return token
        value = Decimal(mantissa)
        if value == 0:
            return token
        first = value.adjusted()  # the exponent of the first significant digit
        decimals = max(0, digits - 1 - first)
        if decimals >= len(mantissa.partition(".")[2]):
            return token
        rounded = value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_EVEN)
        return f"{rounded:f}" + (e + exponent if e else "")

    return _NUMBER.sub(cut, text)


def update(page: Path, results: list[Ran], digits: int | None = None, force: bool = False) -> int:
    """Rewrite each shown output of ``page`` that its block no longer prints (numbers cut to
    ``digits`` significant digits); the count."""
    lines = page.read_text().split("\n")
    blocks = {b.line: b for b in parse(page.read_text())}
    changed = 0
    for ran in sorted(results, key=lambda r: -r.line):
        block = blocks.get(ran.line)
        if ran.status != "ok" or block is None or block.output is None:
            continue
        if not force and compare(block.output.code, ran.stdout) is None:
            continue
        indent = block.output.indent
        printed = ran.stdout if digits is None else round_numbers(ran.stdout, digits)
        new = [indent + s if s else s for s in _lines(printed)]
        lines[block.output.line : block.output.end - 1] = new
        changed += 1
    page.write_text("\n".join(lines))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--execute", nargs=3, metavar=("PAGE", "DIR", "REPORT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--update", action="store_true", help="rewrite outputs that differ")
    parser.add_argument("--force", action="store_true", help="with --update: rewrite every output")
    parser.add_argument(
        "--digits", type=int, default=None, help="with --update: significant digits shown"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="run each page in DIR/<page> and keep its files"
    )
    parser.add_argument("pages", nargs="*", type=Path, help="pages (default: every run page)")
    args = parser.parse_args(argv)
    if args.execute:
        page, workdir, report = (Path(p).resolve() for p in args.execute)
        results = execute(page, workdir)
        report.write_text(json.dumps([asdict(r) for r in results]))
        return 0
    status = 0
    for page in [p.resolve() for p in args.pages] or run_pages():
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            if args.keep is not None:  # to copy a figure the page makes into docs/img/
                workdir = args.keep.resolve() / page.stem
                workdir.mkdir(parents=True, exist_ok=False)
            start = time.perf_counter()
            results = run_page(page, workdir)
            seconds = time.perf_counter() - start
        problems = failures(page, results)
        if args.update:
            fixed = update(page, results, args.digits, args.force)
            problems = [p for p in problems if "printed other than" not in p]
            print(f"{page.relative_to(ROOT)}: {fixed} output(s) rewritten, {seconds:.1f} s")
        else:
            print(f"{page.relative_to(ROOT)}: {len(problems)} problem(s), {seconds:.1f} s")
        for ran in results:
            print(
                f"    line {ran.line:4d} {ran.lang:6s} {ran.status:8s} {ran.seconds:6.1f} s"
                f" ({ran.cpu_seconds:.1f} s CPU)"
            )
        for problem in problems:
            print(problem)
        status = status or int(bool(problems))
    return status


if __name__ == "__main__":
    sys.exit(main())
