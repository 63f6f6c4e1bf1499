"""``flatlens diagnose`` under ``torchrun`` (two Gloo processes on the CPU): exit code 0, one
JSON document on stdout (rank 0 alone prints), the outputs written once into ``--out``, and
the single-process numbers. (``--resume`` across ranks is tested in
``test_distributed_parallel.py``, in processes that are started anyway.)"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flatlens.cli._main import main
from flatlens.report._diagnose import PARTS
from flatlens.zoo import mlp

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed"
)

TIMEOUT_S = 120
OPTIONS = ["--model", "mlp", "--checkpoint", "model.pt", "--quick", "--samples", "64"]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 -m flatlens ARGS``
    (``--standalone`` picks a free rendezvous port)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FLATLENS_DEBUG", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "flatlens", *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def test_diagnose_under_torchrun_writes_once_and_matches_one_process(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    torch.save(mlp().double().state_dict(), tmp_path / "model.pt")  # measured in float64

    proc = torchrun("diagnose", *OPTIONS, "--out", "ranks", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # exactly one JSON document: rank 1 printed nothing
    assert report["computed_parts"] == list(PARTS)
    out = tmp_path / "ranks"
    for name in ("report.json", "report.html", "landscape_2d.npz", "parts/spectrum.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["summary"] == report["summary"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "ranks"]

    monkeypatch.chdir(tmp_path)
    code = main(["diagnose", *OPTIONS, "--out", "single", "--json", "--threads", "1"])
    single = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["model"]["dtype"] == single["model"]["dtype"] == "float64"
    for key, want in single["summary"].items():
        got = report["summary"][key]
        assert math.isclose(got, want, rel_tol=1e-8, abs_tol=1e-12), (key, got, want)
