"""Helpers of the command-line tests: run ``flatlens`` in-process or in a subprocess, and
check that an error is one line on stderr."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from flatlens.cli import main

TIMEOUT = 300


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m flatlens ARGS`` with one torch thread (the test machine is shared)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    full.pop("FLATLENS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "flatlens", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def run(argv: list[str]) -> tuple[int, str, str]:
    """Run ``main`` in-process with stdout and stderr captured (usable inside hypothesis
    tests, where pytest's function-scoped capture fixtures are not)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str, command: str) -> str:
    """The one line of an error on stderr (asserting there is exactly one, no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flatlens {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]
