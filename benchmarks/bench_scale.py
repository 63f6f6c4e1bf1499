"""Benchmark: flatlens at the sizes users run, on the CPU (issue 14's memory and R1 targets).

Three parts, each one model on one thread:

* ``resnet512``: ResNet-18 (CIFAR stem, trained briefly as in ``bench_models``) on 512
  synthetic images given as 8 batches of 64. The top-1 eigenvalue with the default Objective
  (which caches the first-order graph when it fits half the free memory) and with
  ``memory_budget=MEMORY_BUDGET`` (the graph does not fit, so HVPs stream batch by batch and
  the memory is one batch's graph plus the Lanczos basis). Target: peak RSS within 3 GB with
  the same answer (the two eigenvalues agree within their certified bounds).
* ``vit256``: timm ``vit_tiny_patch16_224`` at 32x32 (patch 4, depth 12, embed 192: 5.4M
  parameters, fused attention as timm sets it) on 256 images in batches of ``--vit-batch``
  (default 64): the top-1 eigenvalue streamed and cached, target peak RSS within 4 GB.
  Streaming holds one batch's second-order graph at a time, so the batch size sets the peak.
* ``r1``: R1 (rho = 0.05) on the trained ResNet-18 with the default settings (20 steps per
  start) and with ``budget=40`` HVP-equivalents (an HVP 1, a gradient 1/2, a loss 1/4).
  Target: the budgeted value within 2% of the default's. ``--r1-images`` sets the images
  (default 64; 512 is the issue's size and takes hours for the default on one thread).

Run::

    .venv/bin/python benchmarks/bench_scale.py --parts resnet512 vit256 r1

Results: a table on stdout and ``benchmarks/results/bench_scale.json`` (``--out DIR``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
from _common import Column, environment, report, set_threads, write_json
from bench_models import Sizes, measured, resnet_case, synthetic_images, vit_small
from torch import nn

from flatlens import AscentConfig, Objective, first_order_flatness, hessian_eigenvalues
from flatlens.measures._ascent import hvp_equivalents

GIB = 2**30
MEMORY_BUDGET = 1.0 * GIB  # the graph allowance of the streamed runs
TOL = 1e-3
RHO = 0.05
R1_BUDGET = 40.0
PARTS = ("resnet512", "vit256", "r1")
EIGEN_COLUMNS = [
    Column("case", "case"),
    Column("setting", "setting"),
    Column("cache_graph", "graph cached"),
    Column("time_s", "time [s]", ".0f"),
    Column("hvps", "HVPs"),
    Column("basis_vectors", "basis vectors"),
    Column("eigenvalue", "top eigenvalue", ".7g"),
    Column("bound", "bound", ".1e"),
    Column("agree_within_bounds", "same answer"),
    Column("peak_mib", "peak RSS [MiB]", ".0f"),
    Column("peak_over_entry_mib", "above entry [MiB]", ".0f"),
]
R1_COLUMNS = [
    Column("case", "case"),
    Column("setting", "setting"),
    Column("steps", "steps per start"),
    Column("time_s", "time [s]", ".0f"),
    Column("num_hvp", "HVPs"),
    Column("num_gradient", "gradients"),
    Column("num_loss", "losses"),
    Column("hvp_equivalents", "HVP-equivalents", ".1f"),
    Column("value", "R1", ".6g"),
    Column("relative_to_default", "vs default", "+.2%"),
    Column("peak_mib", "peak RSS [MiB]", ".0f"),
]


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, ...]]:
    return list(zip(x.split(size), y.split(size), strict=True))


def _top1(model: nn.Module, data: Any, label: str, **settings: Any) -> dict[str, Any]:
    def call() -> Any:
        obj = Objective(model, nn.CrossEntropyLoss(), data, **settings)
        return obj, hessian_eigenvalues(obj, 1, tol=TOL)

    (obj, res), stats = measured(call, torch.device("cpu"))
    row = {
        "case": label,
        "setting": "default Objective" if not settings else f"memory_budget={MEMORY_BUDGET:.0f}",
        "cache_graph": obj.cache_graph,
        "eigenvalue": float(res.eigenvalues[0]),
        "bound": float(res.error_bounds[0]),
        "hvps": res.num_hvps,
        "basis_vectors": res.basis_vectors,
        **stats,
    }
    print(
        f"  {label} {row['setting']}: {row['eigenvalue']:.6g} +- {row['bound']:.2g}, "
        f"{row['time_s']:.0f} s, peak {row['peak_bytes'] / GIB:.2f} GiB",
        flush=True,
    )
    return row


def _agree(rows: list[dict[str, Any]]) -> None:
    a, b = rows
    gap = abs(a["eigenvalue"] - b["eigenvalue"])
    for row in rows:
        row["agree_within_bounds"] = gap <= a["bound"] + b["bound"]
        row["difference"] = gap


def resnet512() -> list[dict[str, Any]]:
    case = resnet_case(Sizes(), torch.device("cpu"), trained=True, images=512)
    x, y = case.data
    data = _batches(x, y, 64)
    rows = [
        _top1(case.model, data, "resnet18 512 images", memory_budget=MEMORY_BUDGET),
        _top1(case.model, data, "resnet18 512 images"),
    ]
    _agree(rows)
    return rows


def vit256(batch: int = 64, cached: bool = True) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = vit_small(Sizes(vit_depth=12)).eval()
    x, y = synthetic_images(256, seed=0)
    data = _batches(x, y, batch)
    label = f"vit 5.4M 256 images in batches of {batch}"
    rows = [_top1(model, data, label, memory_budget=MEMORY_BUDGET)]
    if cached:
        rows.append(_top1(model, data, label))
        _agree(rows)
    return rows


R1_SETTINGS = {
    "default": ("default (20 steps)", AscentConfig(RHO)),
    "budget": (f"budget={R1_BUDGET:g}", AscentConfig(RHO, budget=R1_BUDGET)),
}


def r1(
    images: int, order: Sequence[str] = ("default", "budget"), out: str | None = None
) -> list[dict[str, Any]]:
    case = resnet_case(Sizes(), torch.device("cpu"), trained=True, images=images)
    rows = []
    for label, config in (R1_SETTINGS[name] for name in order):

        def call(config: AscentConfig = config) -> Any:
            return first_order_flatness(case.objective(), config.rho, config=config)

        res, stats = measured(call, case.device)
        counts = {"hvp": res.num_hvps, "gradient": res.num_gradients, "loss": res.num_losses}
        rows.append(
            {
                "case": f"resnet18 {images} images R1",
                "setting": label,
                "value": res.value,
                "steps": res.config.steps,
                "starts": res.config.init,
                "hvp_equivalents": hvp_equivalents(counts),
                **{f"num_{k}": v for k, v in counts.items()},
                **stats,
            }
        )
        print(
            f"  R1 {label}: {res.value:.6g}, {rows[-1]['hvp_equivalents']:.1f} HVP-eq, "
            f"{stats['time_s']:.0f} s",
            flush=True,
        )
        write_json(f"bench_scale_r1_{images}_partial", rows, out)  # a long run keeps its rows
    base = next((r["value"] for r in rows if r["setting"].startswith("default")), None)
    for row in rows:
        row["relative_to_default"] = None if base is None else row["value"] / base - 1
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--r1-images", type=int, default=64)
    parser.add_argument(
        "--r1-order", nargs="+", choices=list(R1_SETTINGS), default=["default", "budget"]
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vit-batch", type=int, default=64, help="images per ViT batch")
    parser.add_argument("--streamed-only", action="store_true", help="ViT: skip the cached run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for part in args.parts:
        print(f"{part} ...", flush=True)
        if part == "r1":
            rows += r1(args.r1_images, args.r1_order, args.out)
        elif part == "vit256":
            rows += vit256(args.vit_batch, cached=not args.streamed_only)
        else:
            rows += resnet512()
    for row in rows:
        for key in ("peak_bytes", "peak_over_entry_bytes"):
            if row.get(key) is not None:
                row[key.replace("bytes", "mib")] = row[key] / 2**20
    payload = {"environment": environment("cpu"), "threads": threads, "rows": rows}
    eigen = [r for r in rows if "eigenvalue" in r]
    flat = [r for r in rows if "value" in r]
    tables = {
        "Top-1 eigenvalue, cached graph vs streamed under memory_budget": (eigen, EIGEN_COLUMNS),
        "R1: default settings vs budget": (flat, R1_COLUMNS),
    }
    tables = {title: spec for title, spec in tables.items() if spec[0]}
    report("bench_scale", tables, payload, out_dir=args.out, markdown=args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
