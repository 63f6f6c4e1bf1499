"""Benchmark: flatlens across processes (torch.distributed, Gloo, CPU), and the per-pass costs
behind the ResNet-50 / ImageNet estimate in docs/distributed.md.

Part 1, speed-up. The same trained model, data and settings, timed as

* ``1 proc x 1 thread``: one process, one intra-op thread (the baseline);
* ``1 proc x 2 threads``: one process using both cores through intra-op threads;
* ``2 procs, data``: two Gloo processes with one thread each, each holding half the data
  (``Objective(distributed=True)``; for the plane ``distribute="data"``);
* ``2 procs, points``: (plane only) two processes each holding all the data, the grid points
  split between them (``distribute="points"``).

Tasks: the top-5 Hessian eigenvalues (thick-restart Lanczos, tol 1e-3) and a loss plane
(serial evaluator), on ``mlp`` (zoo.mlp, all 1797 digits in one batch) and ``cnn`` (zoo.cnn
with BatchNorm in eval mode, 512 digits images in one batch), both trained 300 SGD steps
(``bench_landscape.make_case``). In the processes, each timed call is bracketed by barriers
and rank 0's wall time is reported; speed-up = baseline median / median. The values are
checked against the baseline's.

Part 2, cost of one pass. For a ResNet-50 (v1.5 bottlenecks, 25.6 M parameters, written out
below: torchvision is not a dependency) on ImageNet-shaped random inputs and for the CIFAR
ResNet-18 of :mod:`flatlens.zoo`, float32, BatchNorm in eval mode, one batch: the seconds of
``Objective.loss`` (a forward), ``gradient`` (forward + backward) and ``hvp`` (double
backward, and forward-over-reverse), without the cached graph, and their ratios to the
gradient. The ratios, not the CPU seconds, carry over to a GPU estimate.

Run::

    .venv/bin/python benchmarks/bench_distributed.py --markdown      # ~12 minutes on 2 cores
    .venv/bin/python benchmarks/bench_distributed.py --quick         # a smoke run
    .venv/bin/python benchmarks/bench_distributed.py --skip speedup --device cuda --batch 64
                                         # the pass costs on your GPU, for your own estimate

Results: tables on stdout and ``benchmarks/results/bench_distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import Column, environment, report, time_call, time_interleaved
from torch import nn

from flatlens import Objective, hessian_eigenvalues, zoo
from flatlens import distributed as fd
from flatlens import landscape as fl

__all__ = ["ResNet50", "cost_ratios", "speedups"]

CONFIGS = {
    "1 proc x 1 thread": {"world": 1, "threads": 1, "mode": "auto"},
    "1 proc x 2 threads": {"world": 1, "threads": 2, "mode": "auto"},
    "2 procs, data": {"world": 2, "threads": 1, "mode": "data"},
    "2 procs, points": {"world": 2, "threads": 1, "mode": "points"},
}
BASELINE = "1 proc x 1 thread"


# ---------------------------------------------------------------------- part 1: speed-up
def _tasks(case: dict, mode: str, world: int, quick: bool) -> dict[str, Any]:
    """The timed calls of one case in one process configuration."""
    x, y = case["x"], case["y"]
    if world > 1 and mode == "data":
        x, y = fd.shard(x, y)
    objective = Objective(case["model"], nn.CrossEntropyLoss(), (x, y))
    steps = case["plane_steps_quick" if quick else "plane_steps"]
    d1 = fl.random_direction(objective, seed=0)
    d2 = fl.random_direction(objective, seed=1)
    tasks: dict[str, Any] = {
        "plane": lambda: fl.plane(
            objective, d1, d2, num_points=(steps, steps), method="serial", distribute=mode
        ).values["loss"],
    }
    if mode != "points":  # the spectrum is data parallel only
        tasks["spectrum"] = lambda: hessian_eigenvalues(objective, 5, tol=1e-3, seed=0)
    return tasks


def _worker(rank: int, world: int, port: int, spec: dict) -> None:
    if world > 1:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(spec["threads"])
        cases = torch.load(spec["cases"], weights_only=False)
        out: dict[str, Any] = {}
        for name, case in cases.items():
            for task, fn in _tasks(case, spec["mode"], world, spec["quick"]).items():

                def timed(fn=fn):
                    fd.barrier()
                    result = fn()
                    fd.barrier()
                    return result

                timing, result = time_call(timed, repeats=1, warmup=1)
                if task == "spectrum":
                    value = {"eigenvalues": result.eigenvalues.tolist(), "hvps": result.num_hvps}
                else:
                    value = {"loss": np.asarray(result).tolist()}
                out[f"{name}/{task}"] = {"timing": timing.to_dict(), "value": value}
        if rank == 0:
            Path(spec["out"]).write_text(json.dumps(out))
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(spec: dict, world: int) -> dict:
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(world, _free_port(), spec), nprocs=world, join=True)
    return json.loads(Path(spec["out"]).read_text())


def _cases(quick: bool) -> dict[str, dict]:
    from bench_landscape import make_case

    out = {}
    for name, samples, steps in (("mlp", None, 31), ("cnn", 512 if quick else 1797, 15)):
        case = make_case(name, num_samples=samples)
        out[name] = {
            "model": case.model,
            "x": case.x,
            "y": case.y,
            "description": case.description,
            "num_params": case.num_params,
            "plane_steps": steps,
            "plane_steps_quick": 7,
        }
    return out


def _median_ratio(a: list[float], b: list[float]) -> float:
    """median_i a_i / b_i (pairs timed in the same round)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _rel_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def speedups(repeats: int, quick: bool) -> dict[str, Any]:
    """Time every configuration, interleaved: in each of ``repeats`` rounds every
    configuration starts its processes, warms up once and times each task once."""
    rounds: dict[str, list[dict]] = {label: [] for label in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        cases = _cases(quick)
        path = Path(tmp) / "cases.pt"
        torch.save(cases, path)
        for r in range(repeats):
            for label, cfg in CONFIGS.items():
                spec = {**cfg, "cases": str(path), "quick": quick, "out": f"{tmp}/out.json"}
                start = time.perf_counter()
                rounds[label].append(_run(spec, cfg["world"]))
                took = time.perf_counter() - start
                print(f"  round {r + 1}, {label}: {took:.1f} s", file=sys.stderr)
    rows = []
    base = rounds[BASELINE]
    for key in base[0]:
        case, task = key.split("/")
        ref_times = [res[key]["timing"]["median_s"] for res in base]
        for label, results in rounds.items():
            if key not in results[0]:
                continue
            times = [res[key]["timing"]["median_s"] for res in results]
            cpu = [res[key]["timing"]["cpu_median_s"] for res in results]
            values = results[0][key]["value"]
            ref = base[0][key]["value"]
            rows.append(
                {
                    "case": case,
                    "task": task,
                    "config": label,
                    "seconds": statistics.median(times),
                    # the median over rounds of the ratio within a round
                    "speedup": _median_ratio(ref_times, times),
                    "cpu_seconds": statistics.median(cpu),
                    "spread": (max(times) - min(times)) / statistics.median(times),
                    "rel_diff": _rel_diff(
                        values.get("eigenvalues", values.get("loss")),
                        ref.get("eigenvalues", ref.get("loss")),
                    ),
                    "hvps": values.get("hvps"),
                    "times_s": times,
                }
            )
    settings = {
        name: {
            "description": c["description"],
            "num_params": c["num_params"],
            "plane": f"{c['plane_steps_quick' if quick else 'plane_steps']}^2 points",
        }
        for name, c in cases.items()
    }
    return {"rows": rows, "cases": settings, "raw": rounds}


# ---------------------------------------------------------------------- part 2: pass costs
class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.down(x))


class ResNet50(nn.Module):
    """ResNet-50 v1.5 for 224x224 ImageNet inputs (25,557,032 parameters, 1000 classes)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        layers, cin = [], 64
        for i, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            for j in range(blocks):
                layers.append(_Bottleneck(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * _Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def cost_ratios(
    repeats: int, quick: bool, device: str = "cpu", batch: int | None = None
) -> dict[str, Any]:
    """Seconds per forward, gradient and HVP of one batch, interleaved; ratios to the
    gradient are medians of per-repeat ratios."""
    torch.manual_seed(0)
    size, default_batch = (112, 2) if quick else (224, 4)
    batch = batch or default_batch
    specs = {
        "resnet50": (ResNet50(), (batch, 3, size, size), 1000),
        "resnet18-cifar": (zoo.resnet18(num_classes=10), (4 * batch, 3, 32, 32), 10),
    }
    out = {}
    for name, (model, shape, classes) in specs.items():
        gen = torch.Generator().manual_seed(0)
        model.to(device)
        x = torch.randn(shape, generator=gen).to(device)
        y = torch.randint(0, classes, (shape[0],), generator=gen).to(device)
        objs = {
            m: Objective(
                model,
                nn.CrossEntropyLoss(),
                (x, y),
                cache_graph=False,
                hvp_method=m,
                check_determinism=False,
            )
            for m in ("double_backward", "forward_over_reverse")
        }
        obj = objs["double_backward"]
        v = torch.randn(obj.num_params, generator=gen).to(device)
        fns = {
            "forward (loss)": obj.loss,
            "gradient": obj.gradient,
            "HVP double backward": lambda o=obj, v=v: o.hvp(v),
            "HVP forward-over-reverse": lambda o=objs["forward_over_reverse"], v=v: o.hvp(v),
        }
        timed = time_interleaved(fns, repeats=repeats, warmup=1, device=device)
        grad = timed["gradient"][0]
        rows = []
        for label, (timing, _) in timed.items():
            rows.append(
                {
                    "model": name,
                    "pass": label,
                    "seconds": timing.median,
                    "cpu_seconds": timing.cpu_median,
                    "per_sample_ms": 1e3 * timing.cpu_median / shape[0],
                    "vs_gradient": _median_ratio(timing.times, grad.times),
                    "cpu_vs_gradient": _median_ratio(timing.cpu_times, grad.cpu_times),
                    "spread": timing.spread,
                }
            )
        out[name] = {
            "num_params": obj.num_params,
            "input": list(shape),
            "threads": torch.get_num_threads(),
            "device": str(device),
            "rows": rows,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small grids and inputs")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--out", default=None, help="results folder")
    parser.add_argument("--skip", choices=["speedup", "costs"], default=None)
    parser.add_argument(
        "--device", default="cpu", help="device of the pass costs (e.g. cuda: your GPU's ratios)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="ResNet-50 batch of the pass costs (CIFAR: 4x)"
    )
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    if repeats < 1:
        parser.error("--repeats must be >= 1")
    payload: dict[str, Any] = {
        "command": " ".join(["benchmarks/bench_distributed.py", *(argv or sys.argv[1:])]),
        "environment": environment(args.device),
    }
    tables: dict[str, Any] = {}
    if args.skip != "speedup":
        speed = speedups(repeats, args.quick)
        payload["speedup"] = speed
        tables["Speed-up over one process with one thread (wall time of rank 0)"] = (
            speed["rows"],
            [
                Column("case", "case"),
                Column("task", "task"),
                Column("config", "configuration"),
                Column("seconds", "time [s]", ".3f"),
                Column("speedup", "speed-up", ".2f"),
                Column("cpu_seconds", "CPU of rank 0 [s]", ".3f"),
                Column("spread", "spread", ".2f"),
                Column("hvps", "HVPs"),
                Column("rel_diff", "rel. diff vs baseline", ".1e"),
            ],
        )
    if args.skip != "costs":
        torch.set_num_threads(1)  # CPU time then counts work, not waiting for busy cores
        costs = cost_ratios(repeats, args.quick, args.device, args.batch)
        payload["costs"] = costs
        rows = [r for c in costs.values() for r in c["rows"]]
        title = f"Cost of one pass over one batch (float32, eval-mode BatchNorm, {args.device}"
        title += ", 1 thread)" if args.device == "cpu" else ")"
        tables[title] = (
            rows,
            [
                Column("model", "model"),
                Column("pass", "pass"),
                Column("seconds", "time [s]", ".3f"),
                Column("cpu_seconds", "CPU [s]", ".3f"),
                Column("per_sample_ms", "CPU ms / sample", ".1f"),
                Column("vs_gradient", "/ gradient", ".2f"),
                Column("cpu_vs_gradient", "CPU / gradient", ".2f"),
                Column("spread", "spread", ".2f"),
            ],
        )
    payload["environment_end"] = environment(args.device)
    report("bench_distributed", tables, payload, out_dir=args.out, markdown=args.markdown)


if __name__ == "__main__":
    main()
