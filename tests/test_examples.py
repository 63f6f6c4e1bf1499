"""Every example runs in its fast mode; the CIFAR example explains a missing folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "cifar10_resnet18.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


@pytest.mark.parametrize("name", FAST)
def test_example_runs_fast(name, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--fast"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cifar_example_without_its_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "cifar10_resnet18.py"), str(tmp_path / "missing")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "never downloads" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
