"""The bound R0 <= R1 and the limit R1 / rho^2 -> lambda_max, checked across radii.

1. **An exact quadratic.** Linear least squares at its minimizer: L is quadratic, so
   R1 = rho^2 lambda_max and R0 = rho^2 lambda_max / 2 exactly, at every radius. The script
   checks both to 1e-6 relative and exits with code 1 if they fail.
2. **A trained network.** The digits MLP after training: R0 <= R1 at every radius, R1/rho^2
   near lambda_max for small rho and falling below it for larger rho, where cross-entropy
   flattens out.
3. **A network early in training** (one epoch): not a minimum, so R0/rho^2 and R1/rho^2 grow
   like ||grad L|| / rho as rho -> 0.

Outputs in ``--out``: ``bound_quadratic.png``, ``bound_trained.png``, ``bound_early.png`` and
``bound.json``.

Run: ``python examples/bound_across_rho.py`` (about 1 minute on one core) or ``--fast``.
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

from flatlens import Objective, check_bound
from flatlens.core import to_jsonable
from flatlens.data import load_digits
from flatlens.train import TrainConfig, train


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke run (also FLATLENS_FAST=1)")
    parser.add_argument("--out", default="results/bound_across_rho", help="output folder")
    args = parser.parse_args(argv)
    args.fast = args.fast or os.environ.get("FLATLENS_FAST") == "1"
    return args


def least_squares_at_minimum(n: int = 200, d: int = 8, seed: int = 0) -> Objective:
    """L(w, b) = mean (x.w + b - y)^2 with (w, b) set to the least-squares solution."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2.0, d)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(solution[:d][None, :])
        model.bias.copy_(solution[d:])
    return Objective(model, nn.MSELoss(), (x, y[:, None]))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 5 if args.fast else 20
    rhos = (0.01, 0.1) if args.fast else (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    reports = {}

    print("1. linear least squares at its minimizer (L exactly quadratic)")
    quad = check_bound(least_squares_at_minimum(), rhos, steps=steps, eigen_tol=1e-10)
    print(quad.table())
    quad.plot(out / "bound_quadratic.png", title="linear least squares: R1 = ρ² λ_max exactly")
    exact = all(
        abs(r.r1 / r.rho2_lambda - 1) < 1e-6 and abs(2 * r.r0 / r.rho2_lambda - 1) < 1e-6
        for r in quad.rows
    )
    print(f"R1 = rho^2 lambda_max and R0 = rho^2 lambda_max / 2 to 1e-6: {exact}\n")
    reports["quadratic"] = quad

    data = load_digits(image=True)
    samples = 128 if args.fast else 512
    x, y = data.x_train[:samples], data.y_train[:samples]
    for number, name, epochs in ((2, "trained", 3 if args.fast else 30), (3, "early", 1)):
        model = train(TrainConfig(model="mlp", epochs=epochs, seed=0), data).model.double()
        objective = Objective(model, nn.CrossEntropyLoss(), (x, y))
        grad_norm = float(objective.gradient().norm())
        print(f"{number}. digits MLP after {epochs} epoch(s): ||grad L|| = {grad_norm:.2e}")
        report = check_bound(objective, rhos, steps=steps)
        print(report.table())
        print(f"R0 <= R1 in every row: {report.all_hold}\n")
        report.plot(out / f"bound_{name}.png", title=f"digits MLP after {epochs} epoch(s)")
        reports[name] = report

    (out / "bound.json").write_text(json.dumps(to_jsonable(reports), indent=1))
    print(f"written: {out / 'bound.json'} and bound_*.png")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
