"""Two Gloo processes on the CPU give the single-process numbers (float64, 1e-8 relative)."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flatlens import Objective
from flatlens.landscape import plane, random_direction
from flatlens.measures._density import hessian_density
from flatlens.measures._flatness import first_order_flatness
from flatlens.measures._sharpness import zeroth_order_sharpness
from flatlens.measures._spectrum import hessian_eigenvalues, hessian_trace

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


def _measures(objective: Objective) -> dict:
    g = objective.gradient()
    v = torch.linspace(-1, 1, objective.num_params, dtype=torch.float64)
    eig = hessian_eigenvalues(objective, 3, tol=1e-10)
    trace = hessian_trace(objective, num_probes=9)
    density = hessian_density(objective, num_runs=1, lanczos_steps=10)
    out = {
        "loss": objective.loss(),
        "gradient": g.tolist(),
        "hvp": objective.hvp(v).tolist(),
        "eigenvalues": eig.eigenvalues.tolist(),
        "trace": trace.value,
        "density_nodes": density.nodes[0].tolist(),
    }
    out.update(_extra_measures(objective))
    return out


def _extra_measures(objective: Objective) -> dict:
    """R0, R1 and a small plane (each rank evaluating every point on its shard)."""
    out = {}
    out["r0"] = zeroth_order_sharpness(objective, 0.05, steps=5).value
    out["r1"] = first_order_flatness(objective, 0.05, steps=5).value
    d1, d2 = random_direction(objective, seed=0), random_direction(objective, seed=1)
    plane_ = plane(objective, d1, d2, span=(-0.5, 0.5), num_points=(5, 4))
    out["plane_loss"] = plane_.values["loss"].tolist()
    out["plane_accuracy"] = plane_.values["accuracy"].tolist()
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
        assert objective.distributed
        result = _measures(objective)
        if rank == 0:
            with open(path, "w") as fh:
                json.dump(result, fh)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a, b, rtol=1e-8):
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    scale = tb.abs().max().clamp_min(1e-12)
    assert ((ta - tb).abs().max() / scale).item() <= rtol, (a, b)


def test_two_processes_match_one(tmp_path):
    path = str(tmp_path / "rank0.json")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    with open(path) as fh:
        distributed = json.load(fh)
    model, x, y = _problem()
    single = _measures(Objective(model, nn.CrossEntropyLoss(), _batches(x, y)))
    assert set(distributed) == set(single)
    for key in single:
        _close(distributed[key], single[key])
