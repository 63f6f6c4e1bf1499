"""Benchmark: the cost of SAM and GAM per step, and a digits study of flatness vs the gap.

Two parts:

* ``timing``: wall time of one optimizer step relative to plain SGD (momentum 0.9) for SAM,
  GAM (accelerated, 4 passes) and GAM (exact, 2 passes with double backward), on
  :func:`flatlens.zoo.cnn` (the BatchNorm CNN) with batches of 128 digits images. The steps
  are timed interleaved (SGD, SAM, GAM, ...) and the median of the repeats is reported.
* ``study``: :func:`flatlens.train._compare` with SGD, SAM and GAM (accelerated, the released
  code's CIFAR-10 ResNet settings) on the digits MLP, 20 epochs, 3 seeds each, plus SGD
  with 80 epochs as a control that spends as many gradients as GAM: test accuracy, the
  generalization gap (test - train loss and train - test accuracy), lambda_max, tr(H), R0
  and R1 (rho = 0.05) on a fixed subset of 256 training images, and Kendall's tau between
  each measure and the gap. The paper's claim to compare with: GAM finds flatter minima (smaller
  lambda_max and R1) that generalize better than SGD and SAM.

Run::

    .venv/bin/python benchmarks/bench_optim.py            # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_optim.py --quick    # smoke run, < 1 minute

Results: tables on stdout and ``benchmarks/results/bench_optim.json``.

:func:`resnet18_step_throughput` is the GPU check's entry point (``benchmarks/gpu_check.py``):
steps per second of SGD, SAM and GAM on a CIFAR-shaped ResNet-18 with random tensors.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _common import (
    Column,
    environment,
    format_table,
    report,
    set_threads,
    synchronize,
    time_interleaved,
)
from torch import Tensor, nn

from flatlens import zoo
from flatlens.data import load_digits
from flatlens.optim import GAM, SAM
from flatlens.train import TrainConfig, compare
from flatlens.train._compare import GAPS, kendall_tau

OPTIMIZERS = ("SGD", "SAM", "GAM", "GAM-exact")
PASSES = {"SGD": 1, "SAM": 2, "GAM": 4, "GAM-exact": 2}


def make_optimizer(name: str, model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, weight decay 5e-4), or SAM/GAM around it, with ``model=`` set."""
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    if name == "SGD":
        return base
    if name == "SAM":
        return SAM(model.parameters(), base, rho=0.05, model=model)
    if name == "GAM":
        return GAM(model.parameters(), base, model=model)
    if name == "GAM-exact":
        return GAM(model.parameters(), base, model=model, mode="exact")
    raise ValueError(f"unknown optimizer {name!r}")


def step_function(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    autocast_dtype: torch.dtype | None = None,
) -> Callable[[], float]:
    """One training step on the fixed batch ``(x, y)``; returns the loss."""
    loss_fn = nn.CrossEntropyLoss()
    device_type = x.device.type

    def closure(create_graph: bool = False) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    def step() -> float:
        loss = optimizer.step(closure)
        return loss.detach()

    return step


# ---------------------------------------------------------------------- timing
def measure_timing(*, quick: bool, repeats: int | None) -> dict[str, Any]:
    """Seconds per step on the digits BatchNorm CNN, batch 128, float32, CPU."""
    data = load_digits(image=True)
    x, y = data.x_train[:128], data.y_train[:128]
    torch.manual_seed(0)
    reference = zoo.cnn()
    steps = {}
    for name in OPTIMIZERS:
        model = copy.deepcopy(reference).train()
        steps[name] = step_function(make_optimizer(name, model), model, x, y)
    repeats = repeats or (5 if quick else 30)
    timings = time_interleaved(steps, repeats=repeats, warmup=2)
    base = timings["SGD"][0].median
    rows = []
    for name in OPTIMIZERS:
        t = timings[name][0]
        rows.append(
            {
                "optimizer": name,
                "passes": PASSES[name],
                "ms_per_step": 1e3 * t.median,
                "relative": t.median / base,
                "relative_per_pass": t.median / base / PASSES[name],
                "spread": t.spread,
            }
        )
    return {
        "settings": {"model": "zoo.cnn()", "batch_size": 128, "repeats": repeats},
        "rows": rows,
        "timings": {name: timings[name][0].to_dict() for name in OPTIMIZERS},
    }


# ---------------------------------------------------------------------- study
def study_configs(epochs: int) -> dict[str, dict[str, Any]]:
    """The optimizers of the study (everything else shared, see :func:`measure_study`).

    ``SGD-4x`` is a control: SGD with four times the epochs, so it spends as many
    gradient evaluations as GAM (SAM spends twice SGD's).
    """
    return {
        "SGD": {"optimizer": "sgd"},
        "SAM": {"optimizer": "sam", "rho": 0.05},
        "GAM": {"optimizer": "gam"},  # rho=0.2, perturb_rho=0.03, alpha=beta=0.1, gamma=0.05
        "SGD-4x": {"optimizer": "sgd", "epochs": 4 * epochs},
    }


def measure_study(*, quick: bool, seeds: Sequence[int]) -> dict[str, Any]:
    """SGD, SAM and GAM on the digits MLP, compared with :func:`flatlens.train._compare`."""
    data = load_digits(image=True)
    epochs = 3 if quick else 20
    base = TrainConfig(
        model="mlp",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        epochs=epochs,
        batch_size=64,
        scheduler="cosine",
        measure_samples=256,
        measure_rho=0.05,
        measure_steps=5 if quick else 20,
        trace_samples=30,
    )
    start = time.perf_counter()
    result = compare(data, study_configs(epochs), seeds=seeds, config=base, progress=False)
    # Kendall's tau once more without the control: SGD, SAM and GAM at equal epochs only.
    runs = [r for r in result.runs if r["optimizer"] != "SGD-4x"]
    equal_epochs = [
        {
            "measure": m,
            **{
                f"{key}_{g}": kendall_tau([r[m] for r in runs], [r[g] for r in runs])[key]
                for g in GAPS
                for key in ("tau", "p_value")
            },
        }
        for m in result.measures()
    ]
    return {
        "seconds": time.perf_counter() - start,
        "result": result,
        "kendall_equal_epochs": equal_epochs,
    }


TAU_COLUMNS = [
    Column("measure", "measure"),
    Column("tau_gap_loss", "tau vs gap_loss", "+.3f"),
    Column("tau_gap_acc", "tau vs gap_acc", "+.3f"),
    Column("p_value_gap_loss", "p vs gap_loss", ".3f"),
    Column("p_value_gap_acc", "p vs gap_acc", ".3f"),
]


# ---------------------------------------------------------------------- GPU entry point
def resnet18_step_throughput(
    device: torch.device | str,
    *,
    batch_size: int = 128,
    steps: int = 20,
    warmup: int = 5,
    width: int = 64,
    num_classes: int = 10,
    autocast_dtype: torch.dtype | None = None,
    optimizers: Sequence[str] = ("SGD", "SAM", "GAM", "GAM-exact"),
) -> list[dict[str, Any]]:
    """Steps per second of SGD, SAM and GAM on a CIFAR ResNet-18 with random 32x32 inputs.

    Each optimizer trains its own copy of one initial network on one fixed random batch
    (inputs N(0, 1), labels uniform), ``warmup`` untimed steps, then ``steps`` timed steps
    with the device synchronized before and after.

    Args:
        device: Where to run (``"cuda"`` on the GPU machine; ``"cpu"`` works for a smoke run).
        batch_size: Images per step.
        steps: Timed steps per optimizer.
        warmup: Untimed steps first (cuDNN autotuning, allocator).
        width: Base width of the ResNet (64 is the standard ResNet-18).
        num_classes: Output classes.
        autocast_dtype: ``torch.bfloat16`` to run the forward under autocast.
        optimizers: Which of ``"SGD"``, ``"SAM"``, ``"GAM"``, ``"GAM-exact"``.

    Returns:
        One row per optimizer: ``optimizer``, ``passes``, ``ms_per_step``,
        ``images_per_s``, ``relative_to_sgd`` (time per step over SGD's, when SGD ran),
        ``loss_first``/``loss_last`` (finite losses show the step works).
    """
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = zoo.resnet18(num_classes=num_classes, width=width)
    rows = []
    for name in optimizers:
        model = copy.deepcopy(reference).to(device).train()
        step = step_function(make_optimizer(name, model), model, x, y, autocast_dtype)
        first = step()
        for _ in range(max(warmup - 1, 0)):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            last = step()
        synchronize(device)
        seconds = (time.perf_counter() - start) / max(steps, 1)
        rows.append(
            {
                "optimizer": name,
                "passes": PASSES[name],
                "ms_per_step": 1e3 * seconds,
                "images_per_s": batch_size / seconds,
                "loss_first": float(first),
                "loss_last": float(last) if steps else float(first),
            }
        )
        del model, step
    sgd = next((r["ms_per_step"] for r in rows if r["optimizer"] == "SGD"), None)
    for r in rows:
        r["relative_to_sgd"] = r["ms_per_step"] / sgd if sgd else None
    return rows


# ---------------------------------------------------------------------- output
TIMING_COLUMNS = [
    Column("optimizer", "optimizer"),
    Column("passes", "passes/step"),
    Column("ms_per_step", "ms/step", ".2f"),
    Column("relative", "x SGD", ".2f"),
    Column("relative_per_pass", "x SGD per pass", ".2f"),
    Column("spread", "spread", ".2f"),
]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 1 minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="study seeds")
    parser.add_argument("--skip-study", action="store_true", help="timing only")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(cli_args)
    threads = set_threads(args.threads)
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])

    timing = measure_timing(quick=args.quick, repeats=args.repeats)
    tables = {
        f"Seconds per step, digits BatchNorm CNN, batch 128, float32, CPU, threads={threads}, "
        f"median of {timing['settings']['repeats']}": (timing["rows"], TIMING_COLUMNS),
    }
    payload: dict[str, Any] = {
        "command": " ".join(["benchmarks/bench_optim.py", *cli_args]),
        "environment": environment("cpu"),
        "timing": timing,
    }
    study = None
    if not args.skip_study:
        study = measure_study(quick=args.quick, seeds=seeds)
        payload["study"] = {
            "seconds": study["seconds"],
            **study["result"].to_dict(),
            "kendall_equal_epochs": study["kendall_equal_epochs"],
        }
    report("bench_optim", tables, payload, out_dir=args.out, markdown=args.markdown)
    if study is not None:
        print(f"\nDigits study, seeds {seeds} ({study['seconds']:.0f} s)\n")
        print(study["result"].table(markdown=args.markdown))
        print("\nKendall's tau over SGD, SAM and GAM only (equal epochs, no control)\n")
        print(format_table(study["kendall_equal_epochs"], TAU_COLUMNS, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
