"""The Hessian spectrum of a saved checkpoint: top eigenvalues, trace and density.

Without ``--checkpoint`` the script first trains the digits MLP for a few seconds and saves
its state dict, so it runs as is; with ``--checkpoint model.pt --model mlp`` it measures your
own weights (a state dict of a zoo model, loaded with ``weights_only=True``).

What it shows:

* top-k eigenvalues by thick-restart Lanczos, each with a *certified* error bound
  min(||r||, ||r||^2 / gap), r = H u - lambda u, and the HVPs spent; power iteration on the
  same problem for comparison (no certificate, usually more HVPs);
* the smallest eigenvalue (negative: the checkpoint is not an exact minimum);
* tr(H) by Hutch++ and by Hutchinson with the same budget, with standard errors;
* the spectral density by stochastic Lanczos quadrature, saved as a figure;
* that the model is bit-for-bit unchanged afterwards.

Run: ``python examples/spectrum_of_a_checkpoint.py`` (about 20 s on one core) or ``--fast``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from flatlens import Objective, hessian_density, hessian_eigenvalues, hessian_trace
from flatlens.core import load_checkpoint, save_torch, to_jsonable, write_figure
from flatlens.data import batches, load_digits
from flatlens.train import TrainConfig, train
from flatlens.zoo import build


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a state dict (.pt); default: train one first")
    parser.add_argument("--model", default="mlp", help="zoo model of the checkpoint")
    parser.add_argument("--k", type=int, default=5, help="number of top eigenvalues")
    parser.add_argument("--samples", type=int, default=512, help="training examples measured")
    parser.add_argument("--fast", action="store_true", help="smoke run (also FLATLENS_FAST=1)")
    parser.add_argument("--out", default="results/spectrum_of_a_checkpoint", help="folder")
    args = parser.parse_args(argv)
    args.fast = args.fast or os.environ.get("FLATLENS_FAST") == "1"
    return args


def plot_spectrum(top, density, path: Path) -> None:
    """Left: the top eigenvalues with their certified error bounds; right: the SLQ density
    on a log scale (almost all mass in a bulk near zero, a few outliers)."""
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    index = np.arange(1, top.eigenvalues.numel() + 1)
    left.bar(index, top.eigenvalues.numpy(), yerr=top.error_bounds.numpy(), color="#2b6cb0")
    left.set(xlabel="index i", ylabel="lambda_i", title="Top Hessian eigenvalues (Lanczos)")
    left.set_xticks(index)
    values = np.maximum(np.asarray(density.density), 1e-12)
    right.plot(density.grid, values, color="#2b6cb0")
    right.set_yscale("log")
    right.set_ylim(values.max() * 1e-8, values.max() * 3)
    right.set(xlabel="eigenvalue", ylabel="density", title="Spectral density (SLQ)")
    fig.tight_layout()
    write_figure(fig, path)  # atomic; no pyplot, so no GUI backend is needed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    data = load_digits(image=True)

    checkpoint = args.checkpoint
    if checkpoint is None:
        epochs = 2 if args.fast else 20
        result = train(TrainConfig(model=args.model, epochs=epochs, seed=0), data)
        checkpoint = out / "model.pt"
        save_torch(checkpoint, result.model.state_dict())
        print(f"trained {args.model} for {epochs} epochs, saved {checkpoint}")

    # A fresh model (shapes from the data, as the trainer and the command build it), the
    # weights loaded safely (weights_only=True), in float64 so the eigenvalues are accurate
    # far below the Lanczos tolerance.
    model = build(args.model, data)
    model.load_state_dict(load_checkpoint(checkpoint))
    model.double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    samples = 128 if args.fast else args.samples
    x, y = data.x_train[:samples], data.y_train[:samples]
    objective = Objective(model, nn.CrossEntropyLoss(), batches(x, y, 256))
    print(objective, f"on {samples} training examples, loss {objective.loss():.5f}")

    k = min(args.k, 3) if args.fast else args.k
    top = hessian_eigenvalues(objective, k, tol=1e-6)
    print(f"\nLanczos, top {k} ({top.num_hvps} HVPs, {top.num_restarts} restarts):")
    for i, (lam, err, ok) in enumerate(
        zip(top.eigenvalues, top.error_bounds, top.converged, strict=True)
    ):
        print(f"  lambda_{i + 1} = {lam:.8f}  certified |error| <= {err:.1e}  converged {bool(ok)}")

    power = hessian_eigenvalues(objective, 1, method="power", tol=1e-6, max_hvps=500)
    print(
        f"power iteration, top 1: {float(power.eigenvalues[0]):.8f} ({power.num_hvps} HVPs, "
        "no certificate)"
    )
    bottom = hessian_eigenvalues(objective, 1, which="SA", tol=1e-4)
    print(f"smallest eigenvalue: {float(bottom.eigenvalues[0]):.5f} ({bottom.num_hvps} HVPs)")

    budget = 15 if args.fast else 60
    hpp = hessian_trace(objective, num_probes=budget, method="hutch++")
    hutch = hessian_trace(objective, num_probes=budget, method="hutchinson")
    print(
        f"\ntr(H) with {budget} HVPs: Hutch++ {hpp.value:.4f} ± {hpp.stderr:.2g}, "
        f"Hutchinson {hutch.value:.4f} ± {hutch.stderr:.2g}"
    )

    density = hessian_density(
        objective, num_runs=1 if args.fast else 4, lanczos_steps=20 if args.fast else 60
    )
    plot_spectrum(top, density, out / "spectrum.png")
    print(f"\nspectral density: {density.num_runs} SLQ runs, {density.num_hvps} HVPs")

    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    print(f"model unchanged: {unchanged}; total HVPs spent: {objective.counts['hvp']}")
    results = {
        "checkpoint": str(checkpoint),
        "top": top.to_dict(),
        "power": power.to_dict(),
        "smallest": bottom.to_dict(),
        "trace_hutchpp": hpp.to_dict(),
        "trace_hutchinson": hutch.to_dict(),
        "density": {k: v for k, v in density.to_dict().items() if k not in ("grid", "density")},
    }
    (out / "spectrum.json").write_text(json.dumps(to_jsonable(results), indent=1))
    print(f"written: {out / 'spectrum.json'}, {out / 'spectrum.png'}")
    return 0 if unchanged else 1


if __name__ == "__main__":
    sys.exit(main())
