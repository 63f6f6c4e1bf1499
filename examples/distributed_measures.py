"""Measures over data sharded across torch.distributed ranks, checked against one process.

Launch with torchrun, one process per GPU (NCCL) or several on the CPU (Gloo)::

    torchrun --standalone --nproc_per_node=2 examples/distributed_measures.py --check
    torchrun --standalone --nproc_per_node=8 examples/distributed_measures.py --device cuda

Every rank first trains the network with ``flatlens.train``: under torchrun the trainer
wraps it in ``DistributedDataParallel`` and trains data parallel, so all ranks end with the
same weights (run without torchrun, it trains in one process). Every rank then takes its
own contiguous shard of the measured training subset (shards may be uneven). ``Objective``
detects the initialized process group and all-reduces the size-weighted per-rank loss sums,
gradients and Hessian-vector products, so every rank sees the loss over *all* ranks' data;
random vectors are drawn on the CPU from the same seed on every rank, so every rank runs the
same Lanczos, trace, ascent and landscape iterations and ends with the same numbers. Rank 0
prints them.

With ``--check`` rank 0 then recomputes everything in one process over the whole subset
(``distributed=False``) and exits with code 1 if any value differs by more than 1e-8
relative (float64; only the order of the sums differs).

Run without torchrun, the script is a one-process run (world size 1).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from flatlens import (
    Objective,
    first_order_flatness,
    hessian_eigenvalues,
    hessian_trace,
    zeroth_order_sharpness,
)
from flatlens import landscape as fl
from flatlens.data import batches, load_digits
from flatlens.train import TrainConfig, train


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (Gloo) or cuda (NCCL)")
    parser.add_argument("--samples", type=int, default=512, help="training examples measured")
    parser.add_argument("--check", action="store_true", help="compare with one process")
    parser.add_argument("--fast", action="store_true", help="smoke run (also FLATLENS_FAST=1)")
    args = parser.parse_args(argv)
    args.fast = args.fast or os.environ.get("FLATLENS_FAST") == "1"
    return args


def measures(objective: Objective, fast: bool) -> dict[str, float]:
    """The same measures on any objective, distributed or not."""
    steps = 3 if fast else 20
    eig = hessian_eigenvalues(objective, 2, tol=1e-8)
    direction = fl.random_direction(objective, seed=0)
    curve = fl.line(objective, direction, span=(-0.5, 0.5), num_points=5, metrics=["loss"])
    return {
        "loss": objective.loss(),
        "gradient norm": float(objective.gradient().norm()),
        "lambda_1": float(eig.eigenvalues[0]),
        "lambda_2": float(eig.eigenvalues[1]),
        "trace (Hutch++)": hessian_trace(objective, num_probes=9 if fast else 30).value,
        "R0 (rho 0.05)": zeroth_order_sharpness(objective, 0.05, steps=steps).value,
        "R1 (rho 0.05)": first_order_flatness(objective, 0.05, steps=steps).value,
        "loss at a = 0.5 (line)": float(curve.values["loss"][-1]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    launched = "WORLD_SIZE" in os.environ
    cuda = args.device.startswith("cuda")
    if launched:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if launched else 0
    world = dist.get_world_size() if launched else 1
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)

    data = load_digits(image=True)
    # Every rank trains: with the process group initialized, the trainer is data parallel
    # (DistributedDataParallel is a collective, so all ranks must enter it; training on
    # rank 0 alone would block the job), and all ranks end with the same weights.
    config = TrainConfig(model="mlp", epochs=2 if args.fast else 20, device=str(device))
    model = train(config, data).model.to(device, torch.float64)

    samples = 97 if args.fast else args.samples
    x, y = data.x_train[:samples], data.y_train[:samples]
    bounds = torch.linspace(0, samples, world + 1).round().long().tolist()
    mine = slice(bounds[rank], bounds[rank + 1])
    # Batches stay on the CPU; the Objective moves each one to the model's device.
    objective = Objective(model, nn.CrossEntropyLoss(), batches(x[mine], y[mine], 64))
    values = measures(objective, args.fast)
    if rank == 0:
        sizes = [b - a for a, b in itertools.pairwise(bounds)]
        print(f"{world} rank(s), shard sizes {sizes}, distributed={objective.distributed}")
        for name, value in values.items():
            print(f"  {name:24s} {value:.12g}")

    status = 0
    if args.check and rank == 0:
        single = Objective(model, nn.CrossEntropyLoss(), batches(x, y, 64), distributed=False)
        reference = measures(single, args.fast)
        print("one process, whole subset:")
        for name, value in reference.items():
            rel = abs(values[name] - value) / max(abs(value), 1e-12)
            ok = math.isfinite(rel) and rel <= 1e-8
            status = status or (0 if ok else 1)
            print(f"  {name:24s} {value:.12g}  relative difference {rel:.1e}")
        print("agree to 1e-8: " + ("yes" if status == 0 else "NO"))
    if launched:
        dist.barrier()
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
