"""Two Gloo processes, each with a shard of the data, give the single-process landscape."""

from __future__ import annotations

import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flatlens import Objective
from flatlens.landscape import line, plane, random_direction

pytestmark = pytest.mark.skipif(
    not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed"
)

SHARDS = (slice(0, 37), slice(37, 90))


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(90, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (90,))
    return model, x, y


def _batches(x, y, size=16):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def margin(outputs, targets):
    """Mean over the batch of the target logit minus the mean logit (a custom metric)."""
    return (outputs.gather(1, targets[:, None]).squeeze(1) - outputs.mean(-1)).mean()


def _landscapes(objective: Objective, full: Objective, distribute: str = "auto") -> dict:
    """Planes and lines on ``objective`` (a shard per rank) and, split by points, on ``full``
    (all the data on every rank)."""
    d1, d2 = random_direction(objective, seed=0), random_direction(objective, seed=1)
    out = {}
    for method in ("serial", "vmap"):
        ls = plane(objective, d1, d2, num_points=(5, 4), method=method, chunk_size=6)
        out[f"plane_{method}_loss"] = ls.values["loss"]
        out[f"plane_{method}_accuracy"] = ls.values["accuracy"]
        by_points = plane(
            full,
            d1,
            d2,
            num_points=(5, 4),
            metrics=[margin],
            method=method,
            chunk_size=3,
            distribute=distribute,
        )
        out[f"points_{method}_loss"] = by_points.values["loss"]
        out[f"points_{method}_margin"] = by_points.values["margin"]
    out["line_loss"] = line(objective, d1, num_points=7).values["loss"]
    out["line_margin"] = line(objective, d1, num_points=7, metrics=[margin]).values["margin"]
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, x, y = _problem()
        shard = SHARDS[rank]
        objective = Objective(model, nn.CrossEntropyLoss(), _batches(x[shard], y[shard]))
        full = Objective(model, nn.CrossEntropyLoss(), _batches(x, y))
        assert objective.distributed
        result = _landscapes(objective, full, distribute="points")
        assert full.distributed and objective.distributed  # not switched off behind our back
        if rank == 0:
            np.savez(path, **result)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    path = str(tmp_path / "rank0.npz")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    model, x, y = _problem()
    objective = Objective(model, nn.CrossEntropyLoss(), _batches(x, y))
    single = _landscapes(objective, objective)
    with np.load(path) as distributed:
        assert set(distributed.files) == set(single)
        for key, value in single.items():
            if key.startswith("points_serial"):  # the same points on the same data
                np.testing.assert_array_equal(distributed[key], value, err_msg=key)
            else:
                np.testing.assert_allclose(distributed[key], value, rtol=1e-12, err_msg=key)
