"""A 2-D loss landscape in the PCA plane of a training trajectory, with the path drawn on it.

The digits MLP is trained for some epochs and its parameters are saved after every epoch
(plus the initial ones). The principal directions of the trajectory theta_0, ..., theta_T
around its final point (Li et al., 2018, Sec. 7) span a plane through theta_T; the loss is
evaluated on a grid in that plane and the checkpoints' coordinates are drawn on top. A 1-D
slice along the straight line from theta_0 to theta_T is drawn too.

Outputs in ``--out``: ``pca_plane.png`` (filled log-loss contours and the path),
``pca_plane.html`` (interactive surface), ``pca_plane.npz/.json`` (the grid, resumable),
``interpolation.png``.

Run: ``python examples/landscape_2d_pca.py`` (about 40 s on one core) or ``--fast``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from flatlens import Objective
from flatlens import landscape as fl
from flatlens.data import batches, load_digits
from flatlens.train import TrainConfig, Trainer, build_model, build_optimizer, build_scheduler


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", default="sgd", help="sgd, adamw, sam, gam or gam-exact")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--num-points", type=int, default=31, help="grid points per axis")
    parser.add_argument("--fast", action="store_true", help="smoke run (also FLATLENS_FAST=1)")
    parser.add_argument("--out", default="results/landscape_2d_pca", help="output folder")
    args = parser.parse_args(argv)
    args.fast = args.fast or os.environ.get("FLATLENS_FAST") == "1"
    return args


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's parameters (what the PCA needs), by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    data = load_digits(image=True)
    epochs = 3 if args.fast else args.epochs
    num_points = 7 if args.fast else args.num_points

    config = TrainConfig(model="mlp", optimizer=args.optimizer, epochs=epochs, seed=0)
    model = build_model(config, data)
    optimizer = build_optimizer(config, model)
    trainer = Trainer(
        model,
        optimizer,
        data,
        batch_size=config.batch_size,
        scheduler=build_scheduler(config, optimizer),
        seed=config.seed,
    )
    checkpoints = [parameters_of(model)]
    for epoch in range(1, epochs + 1):
        row = trainer.fit(epoch).final  # fit(n) trains until n epochs are complete
        checkpoints.append(parameters_of(model))
        print(
            f"epoch {epoch:2d}: train loss {row['train_loss']:.4f}, test acc {row['test_acc']:.4f}"
        )

    # The landscape is drawn around the final parameters, which the model holds now.
    samples = 256 if args.fast else 1024
    x, y = data.x_train[:samples], data.y_train[:samples]
    objective = Objective(model, nn.CrossEntropyLoss(), batches(x, y, 512))
    pca = fl.pca_directions(checkpoints, k=2, objective=objective)
    ratio = ", ".join(f"{r:.1%}" for r in pca.explained_variance_ratio)
    print(f"\nPCA of {pca.num_checkpoints} checkpoints: explained variance {ratio}")
    print(f"cosine of the two directions: {fl.cosine(*pca.directions):.2e}")

    plane = fl.plane(
        objective,
        *pca.directions,
        span=pca.span(margin=0.2),
        num_points=(num_points, num_points),
        trajectory=pca.coordinates,
        store=out / "pca_plane",
    )
    fl.plot_contour(
        plane,
        out / "pca_plane.png",
        filled=True,
        log=True,
        title=f"digits MLP, {args.optimizer}: loss in the PCA plane",
    )
    fl.plot_surface(plane, out / "pca_plane.html", log=True)
    loss = plane.values["loss"]
    print(
        f"plane {plane.shape}: loss from {loss.min():.4f} to {loss.max():.4f}, "
        f"{plane.num_evaluated} points evaluated in {plane.elapsed_s:.1f} s"
    )

    to_start = fl.interpolation_direction(objective, checkpoints[0])
    curve = fl.line(objective, to_start, span=(-0.25, 1.0), num_points=11 if args.fast else 51)
    fl.plot_line(
        curve,
        out / "interpolation.png",
        log=True,
        title="from the final point (a = 0) to the initial one (a = 1)",
    )
    print(
        f"loss at the initial point: {curve.values['loss'][-1]:.4f}, "
        f"at the final one: {curve.center['loss']:.4f}"
    )
    print(
        f"written: {out / 'pca_plane.png'}, {out / 'pca_plane.html'}, {out / 'interpolation.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
