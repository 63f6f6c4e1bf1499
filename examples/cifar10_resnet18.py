"""CIFAR-10 ResNet-18 with SGD, SAM or GAM on a GPU, then a full flatlens diagnosis.

The setting of the GAM paper's CIFAR experiments: ResNet-18 with a 3x3 stem, random crops
(4-pixel zero padding) and horizontal flips, SGD with momentum 0.9, weight decay 5e-4, learning
rate 0.1 with cosine decay, batch 128. SAM uses rho = 0.05; GAM the released code's CIFAR-10
settings (rho = 0.2, rho' = 0.03, alpha = beta = 0.1, gamma = 0.05). After training, the
network is diagnosed (Hessian spectrum, trace, density, R0, R1, the bound check, loss slices)
into ``<out>/diagnosis/report.html``.

flatlens never downloads: pass the folder of the extracted python version of CIFAR-10
(``cifar-10-batches-py`` from cifar-10-python.tar.gz, or a folder containing it). Without it
the script prints one line and exits with code 2.

    python examples/cifar10_resnet18.py ~/data/cifar-10-batches-py --optimizer gam --epochs 200

On one H100, an SGD epoch takes seconds and a GAM epoch about four times as long (four
forward-backward passes per step); ``--epochs 30`` gives a quicker look. ``--fast`` trains a
narrow network on 256 images for one epoch on the CPU (a smoke test of the whole path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", help="the extracted cifar-10-batches-py folder")
    parser.add_argument("--optimizer", default="gam", choices=["sgd", "sam", "gam"])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage")
    parser.add_argument("--subset", type=int, default=None, help="train on the first N images")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="smoke run (also FLATLENS_FAST=1)")
    parser.add_argument("--out", default="results/cifar10_resnet18", help="output folder")
    args = parser.parse_args(argv)
    args.fast = args.fast or os.environ.get("FLATLENS_FAST") == "1"
    return args


def cifar_folder(folder: str | None) -> Path | None:
    """The folder holding the six CIFAR-10 batch files (``folder`` or its
    ``cifar-10-batches-py``), or None."""
    if not folder:
        return None
    root = Path(folder).expanduser()
    for candidate in (root, root / "cifar-10-batches-py"):
        if all((candidate / name).is_file() for name in CIFAR10_FILES):
            return candidate
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folder = cifar_folder(args.folder)
    if folder is None:
        print(
            f"cifar10_resnet18.py: error: no CIFAR-10 batches (data_batch_1..5, test_batch) in "
            f"{args.folder or '(no folder given)'}; download cifar-10-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html, extract it and pass the "
            "cifar-10-batches-py folder (flatlens never downloads)",
            file=sys.stderr,
        )
        return 2
    # Heavy imports only once the data is known to be there.
    return train_and_diagnose(args, folder)


def augment(x, generator):
    """Random 32x32 crops of the 4-pixel zero-padded images and random horizontal flips."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 9, (b,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 8))
    out = out.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def train_and_diagnose(args: argparse.Namespace, folder: Path) -> int:
    import torch
    from torch import nn

    from flatlens import Objective
    from flatlens.core import save_torch, write_json
    from flatlens.data import Dataset, batches, load_cifar

    # The one private import of the examples: diagnose() has no public Python home yet
    # (its public entry is the command, flatlens.cli.main(["diagnose", ...])). The command
    # would reload the checkpoint and the whole CIFAR-10 folder, so with --subset its train
    # loss would count images the network never saw; diagnose() takes the trained model and
    # the very Dataset it was trained on.
    from flatlens.report._diagnose import DiagnoseConfig, diagnose
    from flatlens.train import TrainConfig, build_model, build_optimizer, build_scheduler

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and not args.fast:
        print("warning: training ResNet-18 on the CPU takes days; pass --device cuda")
    if device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 4) if not args.fast else 1)
    try:
        data = load_cifar(folder, num_classes=10)
    except (FileNotFoundError, ValueError) as err:
        print(f"cifar10_resnet18.py: error: {err}", file=sys.stderr)
        return 2
    subset = 256 if args.fast else args.subset
    if subset:
        data = Dataset(
            data.x_train[:subset],
            data.y_train[:subset],
            data.x_test[: max(subset // 2, 1)],
            data.y_test[: max(subset // 2, 1)],
            10,
            "cifar10",
        )
    epochs = 1 if args.fast else args.epochs
    config = TrainConfig(
        model="resnet18",
        model_kwargs={"width": 4 if args.fast else args.width},
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=0.9,
        weight_decay=5e-4,
        sam_rho=0.05,
        epochs=epochs,
        batch_size=64 if args.fast else args.batch_size,
        seed=args.seed,
        device=device,
    )
    model = build_model(config, data)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    loss_fn = nn.CrossEntropyLoss()
    out = Path(args.out)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    generator = torch.Generator().manual_seed(args.seed)
    # The generalization gap is measured on a fixed, unaugmented part of the training set.
    n_eval = min(len(data.y_train), 10_000)
    evaluators = {
        "train": Objective(
            model,
            loss_fn,
            batches(data.x_train[:n_eval], data.y_train[:n_eval], 1000),
            check_determinism=False,
        ),
        "test": Objective(
            model, loss_fn, batches(data.x_test, data.y_test, 1000), check_determinism=False
        ),
    }
    print(
        f"{config.optimizer.upper()} on {len(y_train)} CIFAR-10 images, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {device}, {epochs} epochs"
    )
    history = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(y_train), generator=generator).to(device)
        running, seen = 0.0, 0
        for i in range(0, len(order), config.batch_size):
            idx = order[i : i + config.batch_size]
            x, y = augment(x_train[idx], generator), y_train[idx]

            def closure(x=x, y=y) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(
                    device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16
                ):
                    loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            loss = optimizer.step(closure)
            running += float(loss) * len(y)
            seen += len(y)
        scheduler.step()
        train_eval, test_eval = evaluators["train"].evaluate(), evaluators["test"].evaluate()
        row = {
            "epoch": epoch,
            "running_loss": running / seen,
            "train_loss": train_eval["loss"],
            "train_acc": train_eval["accuracy"],
            "test_loss": test_eval["loss"],
            "test_acc": test_eval["accuracy"],
            "gap_loss": test_eval["loss"] - train_eval["loss"],
            "seconds": time.perf_counter() - start,
        }
        history.append(row)
        print(
            f"epoch {epoch:3d}: train loss {row['train_loss']:.4f}, test acc "
            f"{row['test_acc']:.4f}, gap {row['gap_loss']:.4f} ({row['seconds']:.1f} s)",
            flush=True,
        )
    save_torch(out / "model.pt", model.state_dict())
    write_json(out / "history.json", {"config": config.to_dict(), "history": history})

    diag = DiagnoseConfig(seed=args.seed)
    if args.fast:
        diag = DiagnoseConfig(
            rhos=(0.05,),
            k=2,
            measure_samples=64,
            batch_size=64,
            trace_probes=6,
            density_runs=1,
            lanczos_steps=5,
            steps=2,
            landscape_1d=5,
            landscape_2d=3,
            seed=args.seed,
        )
    report = diagnose(model, data, out / "diagnosis", config=diag, title="CIFAR-10 ResNet-18")
    print(json.dumps(report["summary"], indent=1, default=str))
    print(f"report: {out / 'diagnosis' / 'report.html'}; weights: {out / 'model.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
