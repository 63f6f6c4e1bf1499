"""Zeroth-order sharpness R0 against first-order flatness R1 on a trained digits MLP.

    R0_rho = max_{||delta|| <= rho} L(theta + delta) - L(theta)        (SAM)
    R1_rho = rho * max_{||delta|| <= rho} ||grad L(theta + delta)||    (GAM)

What it shows:

1. R0 <= R1 at every radius, and near a minimum R1 ~ 2 R0 ~ rho^2 lambda_max;
2. the worst case is far above the average case E[L(theta + delta)] - L(theta) over random
   directions on the sphere (random directions see mostly flat ones);
3. away from a minimum (after one epoch) both are dominated by the slope, R0 ~ R1 ~ rho ||g||;
4. rescaling a ReLU layer by c and the next by 1/c leaves the network's function, and so
   its generalization, unchanged, but changes plain R0 and R1; their adaptive versions
   (ASAM's ball ||delta / |theta| || <= rho) do not change.

Run: ``python examples/sharpness_vs_flatness.py`` (about 30 s on one core) or ``--fast``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from flatlens import (
    Objective,
    average_sharpness,
    first_order_flatness,
    hessian_eigenvalues,
    zeroth_order_sharpness,
)
from flatlens.core import to_jsonable
from flatlens.data import load_digits
from flatlens.train import TrainConfig, train


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke run (also FLATLENS_FAST=1)")
    parser.add_argument("--out", default="results/sharpness_vs_flatness", help="folder")
    args = parser.parse_args(argv)
    args.fast = args.fast or os.environ.get("FLATLENS_FAST") == "1"
    return args


def rescaled(model: nn.Module, c: float) -> nn.Module:
    """The same function with the first Linear layer scaled by c and the second by 1/c.

    zoo.mlp is Flatten, Linear, ReLU, Linear, ReLU, Linear; ReLU(c z) = c ReLU(z) for c > 0.
    """
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[1].weight.mul_(c)
        other[1].bias.mul_(c)
        other[3].weight.div_(c)
    return other


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits(image=True)
    epochs = 3 if args.fast else 20
    steps = 5 if args.fast else 20
    samples = 128 if args.fast else 512
    x, y = data.x_train[:samples], data.y_train[:samples]
    loss_fn = nn.CrossEntropyLoss()

    early = train(TrainConfig(model="mlp", epochs=1, seed=0), data).model.double()
    final = train(TrainConfig(model="mlp", epochs=epochs, seed=0), data).model.double()
    objective = Objective(final, loss_fn, (x, y))
    eig = hessian_eigenvalues(objective, 1, tol=1e-6)
    lam = float(eig.eigenvalues[0])
    print(
        f"trained {epochs} epochs: loss {objective.loss():.4f}, lambda_max {lam:.4f}, "
        f"||grad L|| {float(objective.gradient().norm()):.2e}\n"
    )

    rows = []
    print("   rho        R0        R1     R1/R0  rho^2 lam   average R0 (sphere)")
    for rho in (0.01, 0.05) if args.fast else (0.005, 0.01, 0.02, 0.05, 0.1):
        r0 = zeroth_order_sharpness(objective, rho, steps=steps, eigen=eig)
        r1 = first_order_flatness(objective, rho, steps=steps, eigen=eig, starts=[r0.delta])
        avg = average_sharpness(objective, rho, num_probes=16 if args.fast else 64)
        rows.append({"rho": rho, "r0": r0.to_dict(), "r1": r1.to_dict(), "avg": avg.to_dict()})
        print(
            f"{rho:6.3f}  {r0.value:8.2e}  {r1.value:8.2e}  {r1.value / r0.value:6.2f}  "
            f"{rho * rho * lam:8.2e}   {avg.value:8.2e} ± {avg.stderr:.1e}"
        )
        assert r0.value <= r1.value, "R0 > R1: R1's ascent stopped short; raise steps"

    rho = 0.05
    early_obj = Objective(early, loss_fn, (x, y))
    g = float(early_obj.gradient().norm())
    r0e = zeroth_order_sharpness(early_obj, rho, steps=steps)
    r1e = first_order_flatness(early_obj, rho, steps=steps)
    print(
        f"\nafter 1 epoch (not a minimum), rho = {rho}: R0 {r0e.value:.3e}, R1 {r1e.value:.3e}, "
        f"rho ||grad L|| {rho * g:.3e}"
    )

    c = 4.0
    other = rescaled(final, c)
    other_obj = Objective(other, loss_fn, (x, y))
    print(f"\nrescaled by c = {c}: loss {objective.loss():.10f} -> {other_obj.loss():.10f}")
    print("                   original   rescaled")
    invariance = {}
    for name, kw in (("R0 (l2)", {}), ("R0 (adaptive)", {"adaptive": True})):
        a = zeroth_order_sharpness(objective, rho, steps=steps, **kw).value
        b = zeroth_order_sharpness(other_obj, rho, steps=steps, **kw).value
        invariance[name] = (a, b)
        print(f"  {name:15s}  {a:9.3e}  {b:9.3e}")
    for name, kw in (("R1 (l2)", {}), ("R1 (adaptive)", {"adaptive": True})):
        a = first_order_flatness(objective, rho, steps=steps, **kw).value
        b = first_order_flatness(other_obj, rho, steps=steps, **kw).value
        invariance[name] = (a, b)
        print(f"  {name:15s}  {a:9.3e}  {b:9.3e}")

    results = {
        "lambda_max": lam,
        "radii": rows,
        "early": {"r0": r0e.value, "r1": r1e.value, "rho_grad_norm": rho * g},
        "rescaling": {"c": c, **invariance},
    }
    (out / "sharpness_vs_flatness.json").write_text(json.dumps(to_jsonable(results), indent=1))
    print(f"\nwritten: {out / 'sharpness_vs_flatness.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
