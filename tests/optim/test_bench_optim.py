"""benchmarks/bench_optim.py's GPU entry point runs (a CPU smoke run of a tiny ResNet-18)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from bench_optim import resnet18_step_throughput


def test_resnet18_step_throughput_smoke_on_cpu():
    rows = resnet18_step_throughput("cpu", batch_size=4, steps=1, warmup=1, width=4)
    assert [r["optimizer"] for r in rows] == ["SGD", "SAM", "GAM", "GAM-exact"]
    for r in rows:
        assert r["ms_per_step"] > 0 and math.isfinite(r["loss_last"])
    assert rows[0]["relative_to_sgd"] == 1.0


def test_resnet18_step_throughput_under_bf16_autocast():
    rows = resnet18_step_throughput(
        "cpu",
        batch_size=2,
        steps=1,
        warmup=1,
        width=4,
        autocast_dtype=torch.bfloat16,
        optimizers=("SAM",),
    )
    assert rows[0]["relative_to_sgd"] is None and math.isfinite(rows[0]["loss_last"])
