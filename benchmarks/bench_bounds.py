"""Benchmark: do eigenvalue bounds hold against float64, and what does certifying cost?

Parts (``--parts``, default both):

* ``certificate``: float32 top-k by Lanczos, each bound checked against the float64
  Hessian's eigenvalues (flatlens Lanczos at tol 1e-10 on a float64 copy of the model and
  data; with ``--crosscheck`` also SciPy ``eigsh`` at tol 1e-10 on the float64 operator):

  - ``cnn965k``: the case of issue 22, a BatchNorm CNN (3x3 convolutions 64-128-256-256
    with BatchNorm and ReLU, max-pooling after the first two, global average pooling, a
    linear head: 964,874 parameters) trained 30 SGD steps (lr 0.05, momentum 0.9) on 64
    random 16x16 images, top-3 at tol=1e-6;
  - ``resnet18``: :func:`flatlens.zoo.resnet18` (CIFAR-shaped, random weights, BatchNorm in
    eval mode) on ``--resnet-images`` random 3x32x32 images, top-3 at tol=1e-6;
  - ``vit``: timm ``vit_tiny_patch16_224`` re-sized (32x32 images, patch 4, embed 192,
    depth 4, 3 heads) on ``--vit-images`` random images, top-3 at tol=1e-6.

  ``--warm-reference`` starts the float64 reference from the float32 Ritz vectors plus a
  random vector (fewer float64 products; used for ResNet-18 at 64 images). Each float32
  solve runs twice: ``certify=False`` (the bound covers the measured rounding
  only: ``bound_kind="estimate"``) and the default, which re-evaluates the k pairs with
  float64 products (``"certified"``).
* ``pyhessian``: the speed target of issue 22: an untrained BatchNorm CNN
  (``zoo.cnn(channels=32)``: 21,482 parameters) over the first 1,024 digits images in one
  batch, top-1. PyHessian 0.1 ``eigenvalues(top_n=1, maxIter=100, tol=1e-3)`` runs for
  seeds 0..``--seeds``-1; flatlens is then asked for the median relative error PyHessian
  achieved (its ``tol``) with the same seeds, certified (one float64 HVP) and with
  ``certify=False``; interleaved, median times, the speed-up is PyHessian's median time
  over flatlens' (target 1.5x). Then plain Lanczos over the same float32 products, step by
  step: the top Ritz value's true error and its residual (the least its residual bound
  can be), and the step where lambda_2 first shows among the Ritz values.

Run (2-core shared CPU; the float64 references dominate, about an hour at the defaults)::

    .venv/bin/python benchmarks/bench_bounds.py
    .venv/bin/python benchmarks/bench_bounds.py --parts pyhessian --seeds 7

Results: tables on stdout and ``benchmarks/results/bench_bounds.json``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from _common import Column, environment, report, set_threads
from torch import nn

from flatlens import Objective, hessian_eigenvalues, zoo

PARTS = ("certificate", "pyhessian")
CASES = ("cnn965k", "resnet18", "vit")


# ---------------------------------------------------------------------------- cases
def cnn965k() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    widths = [3, 64, 128, 256, 256]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        if i in (0, 1):
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)]
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), (x, y)


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, Any]:
    if name == "cnn965k":
        return cnn965k()
    torch.manual_seed(0)
    if name == "resnet18":
        return zoo.resnet18().eval(), _images(args.resnet_images)
    from flatlens._compat import import_torchvision

    import_torchvision()
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=4,
        num_classes=10,
        embed_dim=192,
        depth=4,
        num_heads=3,
    )
    return model.eval(), _images(args.vit_images)


def _float64_reference(
    model: nn.Module, data: Any, k: int, warm: torch.Tensor | None
) -> tuple[Any, float, Any]:
    """The float64 Hessian's top-k at tol 1e-10 (and its operator, for the cross-check).

    ``warm`` (float32 Ritz vectors, one per row) makes the start their sum plus a random
    unit vector of the same weight: Lanczos then needs far fewer float64 products, and the
    random part keeps every eigenvector in reach as a cold start does.
    """
    obj64 = Objective(copy.deepcopy(model).double(), F.cross_entropy, (data[0].double(), data[1]))
    start: Any = "gradient"
    if warm is not None:
        gen = torch.Generator().manual_seed(1)
        noise = torch.randn(warm.shape[1], generator=gen, dtype=torch.float64)
        start = warm.double().sum(0) + noise * (warm.shape[0] ** 0.5 / noise.norm())
    begin = time.perf_counter()
    ref = hessian_eigenvalues(obj64, k, tol=1e-10, max_hvps=400, start=start)
    return ref, time.perf_counter() - begin, obj64


def certificate(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model, data = build(name, args)
    n = sum(p.numel() for p in model.parameters())
    k, tol = 3, 1e-6
    runs = []
    for certify in (False, None):
        obj = Objective(model, F.cross_entropy, data)
        start = time.perf_counter()
        res = hessian_eigenvalues(obj, k, tol=tol, certify=certify)
        runs.append((certify, res, time.perf_counter() - start))
        print(f"{name} certify={certify}: {res.eigenvalues.tolist()} ({res.num_hvps} HVPs)")
    warm = runs[-1][1].eigenvectors if args.warm_reference else None
    ref, ref_s, obj64 = _float64_reference(model, data, k, warm)
    lam = ref.eigenvalues
    crosscheck = None
    if args.crosscheck:
        from scipy.sparse.linalg import eigsh

        vals = eigsh(obj64.as_linear_operator(), k=k, which="LA", tol=1e-10)[0]
        crosscheck = float((torch.tensor(sorted(vals, reverse=True)) - lam).abs().max() / lam[0])
    del obj64
    print(f"{name}: n={n} float64 {lam.tolist()} ({ref.num_hvps} HVPs, {ref_s:.0f} s)")
    rows = []
    for certify, res, secs in runs:
        err = (res.eigenvalues - lam).abs()
        for i in range(k):
            rows.append(
                {
                    "case": name,
                    "num_params": n,
                    "certify": "default" if certify is None else str(certify),
                    "bound_kind": res.bound_kind,
                    "i": i + 1,
                    "value": float(res.eigenvalues[i]),
                    "float64": float(lam[i]),
                    "error": float(err[i]),
                    "bound": float(res.error_bounds[i]),
                    "holds": bool(err[i] <= res.error_bounds[i] + ref.error_bounds[i]),
                    "ratio": float(err[i] / res.error_bounds[i]),
                    "converged": bool(res.converged[i]),
                    "num_hvps": res.num_hvps,
                    "float64_hvps": res.reference_hvps,
                    "seconds": secs,
                    "reference_hvps": ref.num_hvps,
                    "reference_seconds": ref_s,
                    "reference_start": ref.start,
                    "reference_bound": float(ref.error_bounds[i]),
                    "reference_converged": bool(ref.converged[i]),
                    "crosscheck": crosscheck,
                }
            )
            print(rows[-1])
    return rows


# ---------------------------------------------------------------------------- PyHessian
def pyhessian(args: argparse.Namespace) -> dict[str, Any]:
    from bench_spectrum import Case, digits, run_pyhessian

    x, y = digits(image=True)
    data = (x[:1024], y[:1024])
    torch.manual_seed(0)
    model = zoo.cnn(channels=32).eval()
    loss_fn = nn.CrossEntropyLoss()
    ref = hessian_eigenvalues(
        Objective(copy.deepcopy(model).double(), loss_fn, (data[0].double(), data[1])),
        2,
        tol=1e-10,
    )
    lam, lam2 = float(ref.eigenvalues[0]), float(ref.eigenvalues[1])
    case = Case("cnn", "untrained zoo.cnn(32)", model, loss_fn, data, torch.device("cpu"), 0.0)
    seeds = range(args.seeds)
    # PyHessian first: its achieved error sets flatlens' tol.
    runs: dict[str, list[dict[str, Any]]] = {"pyhessian": []}
    for seed in seeds:
        start = time.perf_counter()
        out = run_pyhessian(case, 1, seed=seed)
        out["seconds"] = time.perf_counter() - start
        out["error"] = abs(out["eigenvalues"][0] - lam) / lam
        runs["pyhessian"].append(out)
    tol = statistics.median(r["error"] for r in runs["pyhessian"])

    def flatlens_run(seed: int, certify: bool | None) -> dict[str, Any]:
        start = time.perf_counter()
        res = hessian_eigenvalues(
            Objective(model, loss_fn, data), 1, tol=tol, seed=seed, certify=certify
        )
        return {
            "seconds": time.perf_counter() - start,
            "num_hvps": res.num_hvps,
            "float64_hvps": res.reference_hvps,
            "eigenvalues": res.eigenvalues.tolist(),
            "error": abs(float(res.eigenvalues[0]) - lam) / lam,
            "bound": float(res.error_bounds[0]) / lam,
            "bound_kind": res.bound_kind,
            "holds": abs(float(res.eigenvalues[0]) - lam) <= float(res.error_bounds[0]),
        }

    contenders = {
        "pyhessian": lambda seed: run_pyhessian(case, 1, seed=seed),
        "flatlens certified": lambda seed: flatlens_run(seed, None),
        "flatlens certify=False": lambda seed: flatlens_run(seed, False),
    }
    for fn in contenders.values():  # warm-up (and the once-per-model check of products)
        fn(0)
    runs = {name: [] for name in contenders}
    for seed in seeds:
        for name, fn in contenders.items():
            start = time.perf_counter()
            out = fn(seed)
            out["seconds"] = time.perf_counter() - start
            if name == "pyhessian":
                out["error"] = abs(out["eigenvalues"][0] - lam) / lam
            runs[name].append(out)
    base = statistics.median(r["seconds"] for r in runs["pyhessian"])
    rows = []
    for name, outs in runs.items():
        secs = statistics.median(r["seconds"] for r in outs)
        rows.append(
            {
                "tool": name,
                "tol": tol if name != "pyhessian" else 1e-3,
                "seconds": secs,
                "speedup": base / secs,
                "target": 1.5 if name != "pyhessian" else None,
                "num_hvps": statistics.median(r["num_hvps"] for r in outs),
                "hvps_per_seed": [r["num_hvps"] for r in outs],
                "error_median": statistics.median(r["error"] for r in outs),
                "error_max": max(r["error"] for r in outs),
                "bound_kind": outs[0].get("bound_kind"),
                "bounds_hold": all(r.get("holds", True) for r in outs),
            }
        )
        print(rows[-1])
    steps = trajectory(Objective(model, loss_fn, data), lam, lam2, tol)
    return {"lambda_max": lam, "lambda_2": lam2, "tol": tol, "rows": rows, "runs": runs, **steps}


def trajectory(objective: Objective, lam: float, lam2: float, tol: float) -> dict[str, Any]:
    """Why a certified top-1 needs the products it takes: plain Lanczos (float64 basis,
    full reorthogonalization, the gradient start) over the float32 products, recording per
    step the top Ritz value's true error and its residual r_1 = beta_m |y_m| relative to
    lambda_1 (a residual bound cannot be below r_1), and the first step with a second Ritz
    value within tol * lambda_1 of lambda_2."""
    n = objective.num_params
    g = objective.gradient().double()
    r = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis = [r / r.norm() + g / g.norm()]
    basis[0] = basis[0] / basis[0].norm()
    alphas: list[float] = []
    betas: list[float] = []
    log = []
    first = {"error": None, "residual": None, "lambda_2 seen": None}
    for step in range(1, 31):
        w = objective.hvp(basis[-1].float()).double()
        alphas.append(float(basis[-1] @ w))
        for _ in range(2):
            for q in basis:
                w -= (q @ w) * q
        betas.append(float(w.norm()))
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        off = torch.tensor(betas[:-1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
        theta, y = torch.linalg.eigh(t)
        error = (lam - float(theta[-1])) / lam
        residual = betas[-1] * float(y[-1, -1].abs()) / lam
        log.append({"step": step, "error": error, "residual": residual})
        if first["error"] is None and error <= tol:
            first["error"] = step
        if first["residual"] is None and residual <= tol:
            first["residual"] = step
        below_top = theta[:-1]  # the top Ritz value passes lambda_2 on its way to lambda_1
        if first["lambda_2 seen"] is None and bool(((below_top - lam2).abs() <= tol * lam).any()):
            first["lambda_2 seen"] = step
        if None not in first.values():
            break
        basis.append(w / betas[-1])
    print(f"Lanczos steps to reach tol={tol:.1e}: {first}")
    return {"trajectory": log, "first_step": first}


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--resnet-images", type=int, default=16)
    parser.add_argument("--vit-images", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--crosscheck", action="store_true", help="SciPy eigsh in float64 too")
    parser.add_argument(
        "--warm-reference",
        action="store_true",
        help="start the float64 reference from the float32 Ritz vectors plus a random vector",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    payload: dict[str, Any] = {"environment": environment("cpu"), "settings": vars(args)}
    tables = {}
    if "certificate" in args.parts:
        rows = [row for name in args.cases for row in certificate(name, args)]
        payload["certificate"] = rows
        cols = [
            Column("case", "case"),
            Column("certify", "certify"),
            Column("bound_kind", "kind"),
            Column("i", "#"),
            Column("value", "float32 run", ".9g"),
            Column("float64", "float64", ".9g"),
            Column("error", "error", ".2e"),
            Column("bound", "bound", ".2e"),
            Column("holds", "holds"),
            Column("converged", "conv"),
            Column("num_hvps", "HVPs"),
            Column("float64_hvps", "f64"),
            Column("seconds", "s", ".0f"),
        ]
        tables["float32 top-3 at tol=1e-6 against float64"] = (rows, cols)
    if "pyhessian" in args.parts:
        payload["pyhessian"] = pyhessian(args)
        cols = [
            Column("tool", "tool"),
            Column("tol", "tol", ".1e"),
            Column("seconds", "median s", ".2f"),
            Column("speedup", "vs PyHessian", ".2f"),
            Column("target", "target"),
            Column("num_hvps", "HVPs"),
            Column("error_median", "error (median)", ".1e"),
            Column("error_max", "error (max)", ".1e"),
            Column("bound_kind", "kind"),
            Column("bounds_hold", "bounds hold"),
        ]
        tables["untrained zoo.cnn(32), 1024 digits, top-1 at PyHessian's error"] = (
            payload["pyhessian"]["rows"],
            cols,
        )
        steps = [
            Column("step", "Lanczos step"),
            Column("error", "top Ritz value's error / lambda_1", ".2e"),
            Column("residual", "its residual / lambda_1", ".2e"),
        ]
        tables["the same, plain Lanczos step by step (float32 products)"] = (
            payload["pyhessian"]["trajectory"],
            steps,
        )
    report("bench_bounds", tables, payload, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
