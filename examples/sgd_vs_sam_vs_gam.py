"""SGD, SAM and GAM on digits: accuracy, generalization gap and flatness, over seeds.

Each optimizer trains the digits MLP with each seed (runs with one seed share the initial
weights and the batch order). After the last epoch, lambda_max, tr(H), R0 and R1 (rho = 0.05)
are measured on one fixed training subset, and Kendall's tau relates each measure to the
generalization gap across all runs. The seed-0 networks are then compared along a 1-D slice:
a filter-normalized random direction (the same Gaussian draw, scaled to each network's own
filters), so that the widths of the three valleys compare.

Outputs in ``--out``: ``study.json``, ``flatness_vs_gap.png`` and ``slices.png``.

Run: ``python examples/sgd_vs_sam_vs_gam.py`` (about 1 minute on one core) or ``--fast``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from flatlens import Objective
from flatlens import landscape as fl
from flatlens.core import to_jsonable
from flatlens.data import batches, load_digits
from flatlens.train import TrainConfig, TrainResult, compare


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--fast", action="store_true", help="smoke run (also FLATLENS_FAST=1)")
    parser.add_argument("--out", default="results/sgd_vs_sam_vs_gam", help="output folder")
    args = parser.parse_args(argv)
    args.fast = args.fast or os.environ.get("FLATLENS_FAST") == "1"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    data = load_digits(image=True)
    seeds = [0, 1] if args.fast else [int(s) for s in args.seeds.split(",")]
    base = TrainConfig(
        model="mlp",
        epochs=2 if args.fast else args.epochs,
        lr=0.05,
        measure_samples=64 if args.fast else 256,
        measure_steps=3 if args.fast else 20,
        trace_probes=9 if args.fast else 30,
    )
    optimizers = {
        "SGD": {"optimizer": "sgd"},
        "SAM": {"optimizer": "sam", "sam_rho": 0.05},
        # GAM's accelerated defaults: the released code's CIFAR-10 settings (rho = 0.2, ...).
        "GAM": {"optimizer": "gam"},
    }
    models: dict[str, nn.Module] = {}

    def keep(label: str, seed: int, result: TrainResult) -> None:
        print(f"  {label} seed {seed}: test acc {result.final['test_acc']:.4f}", flush=True)
        if seed == seeds[0]:
            models[label] = result.model

    print(f"training {len(optimizers)} optimizers x {len(seeds)} seeds, {base.epochs} epochs")
    study = compare(data, optimizers, seeds=seeds, config=base, on_run=keep)
    print()
    print(study.table())
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(to_jsonable(study), indent=1))
    study.plot(out / "flatness_vs_gap.png")

    samples = 256 if args.fast else 1024
    x, y = data.x_train[:samples], data.y_train[:samples]
    slices = {}
    for label, model in models.items():
        objective = Objective(model, nn.CrossEntropyLoss(), batches(x, y, 512))
        direction = fl.random_direction(objective, seed=0)
        slices[label] = fl.line(
            objective, direction, span=(-1.0, 1.0), num_points=11 if args.fast else 41
        )
    fl.plot_line(
        slices,
        out / "slices.png",
        metrics=["loss"],
        log=True,
        title=f"seed-{seeds[0]} networks along a filter-normalized direction",
    )
    for label, curve in slices.items():
        loss = curve.values["loss"]
        print(
            f"{label}: loss {curve.center['loss']:.4f} at a = 0, {loss[0]:.4f} at a = -1, "
            f"{loss[-1]:.4f} at a = +1"
        )
    print(f"written: {out / 'study.json'}, {out / 'flatness_vs_gap.png'}, {out / 'slices.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
