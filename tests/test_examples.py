"""Every example runs in its fast mode; the CIFAR example explains a missing folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAST = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "cifar10_resnet18.py")


def _missing(name: str) -> list[str]:
    """The packages an example's ``# requires:`` line names that are not installed."""
    import importlib.util
    import re

    found = re.search(r"^# requires: (.+)$", (EXAMPLES / name).read_text(), re.M)
    wanted = [w.strip() for w in found.group(1).split(",")] if found else []
    return [w for w in wanted if importlib.util.find_spec(w) is None]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


@pytest.mark.parametrize("name", FAST)
def test_example_runs_fast(name, tmp_path):
    missing = _missing(name)
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)} (make test installs them)")
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


def test_distributed_example_under_torchrun(tmp_path):
    """Two Gloo ranks train data parallel, measure on their shards and agree with one
    process (the script's ``--check``); the job used to hang when rank 0 trained alone."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(EXAMPLES / "distributed_measures.py"),
        "--fast",
        "--check",
    ]
    proc = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: torchrun starts each rank in its own session and stops them
        # only when it is allowed to clean up.
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"torchrun with 2 ranks did not finish in 120 s:\n{out[-2000:]}{err[-2000:]}")
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    assert "2 rank(s), shard sizes [48, 49], distributed=True" in out, out
    assert "agree to 1e-8: yes" in out, out
    assert out.count("relative difference") == 8, out
