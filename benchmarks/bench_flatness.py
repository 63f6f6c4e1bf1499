"""Benchmark: cost of the sharpness and flatness measures, and R1 by ascent vs random search.

Two cases (the trained models of ``bench_spectrum.py``, float32):

* ``mlp``: :func:`flatlens.zoo.mlp` over all 1797 digits in 8 uneven batches.
* ``cnn``: :func:`flatlens.zoo.cnn` (BatchNorm, eval mode) on one batch of digits images.

Part 1 times each measure at one radius (rho = 0.05; rho / sqrt(n) for the l-infinity box, whose
corners then lie on the l2 sphere of radius rho) with its default settings:
value, loss evaluations, gradients, HVPs and seconds (median of repeats). Part 2 compares the
first-order flatness R1 found by projected ascent with the best rho ||grad L(theta + delta)||
over many random points delta on the sphere, which costs one gradient per point: the ascent
should match or beat it at a fraction of the cost. Run::

    .venv/bin/python benchmarks/bench_flatness.py            # full run, a few minutes
    .venv/bin/python benchmarks/bench_flatness.py --quick    # CI smoke run, < 1 minute

Results: tables on stdout and ``benchmarks/results/bench_flatness.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from _common import Column, environment, report, set_threads, time_call
from bench_spectrum import Case, cnn_case, mlp_case

from flatlens import Objective
from flatlens.measures import Ball
from flatlens.measures._flatness import first_order_flatness
from flatlens.measures._sharpness import average_sharpness, zeroth_order_sharpness
from flatlens.measures._spectrum import hessian_eigenvalues

RHO = 0.05


def measures(quick: bool) -> dict[str, Callable[[Objective], Any]]:
    """The measures timed in part 1, by label, at their defaults (``quick``: fewer steps)."""
    steps = 5 if quick else 20
    out: dict[str, Callable[[Objective], Any]] = {
        "lambda_max (Lanczos, tol 1e-3)": lambda o: hessian_eigenvalues(o, 1, tol=1e-3),
        "R0 l2": lambda o: zeroth_order_sharpness(o, RHO, steps=steps),
        "R0 linf, rho / sqrt(n)": lambda o: zeroth_order_sharpness(
            o, RHO / math.sqrt(o.num_params), norm="linf", steps=steps
        ),
        "R0 adaptive l2": lambda o: zeroth_order_sharpness(o, RHO, adaptive=True, steps=steps),
        "R0 l2, gradient start only": lambda o: zeroth_order_sharpness(
            o, RHO, steps=steps, init=("gradient",), restarts=0
        ),
        "average sharpness (64 samples)": lambda o: average_sharpness(o, RHO, samples=64),
        "R1 l2": lambda o: first_order_flatness(o, RHO, steps=steps),
        "R1 adaptive l2": lambda o: first_order_flatness(o, RHO, adaptive=True, steps=steps),
    }
    if not quick:
        out["R0 l2 per batch (m-sharpness)"] = lambda o: zeroth_order_sharpness(
            o, RHO, steps=steps, per_batch=True
        )
    return out


def _row(case: Case, label: str, result: Any, seconds: float) -> dict[str, Any]:
    if hasattr(result, "eigenvalues"):
        value, losses, grads = float(result.eigenvalues[0]), 0, 0
    else:
        value = result.value
        losses, grads = result.num_losses, result.num_gradients
    return {
        "case": case.name,
        "measure": label,
        "value": value,
        "num_losses": losses,
        "num_gradients": grads,
        "num_hvps": result.num_hvps,
        "seconds": seconds,
        "result": result.to_dict(),
    }


def cost_rows(case: Case, *, quick: bool, repeats: int) -> list[dict[str, Any]]:
    """Part 1: each measure's value, evaluation counts and median seconds (one warm-up)."""
    obj = Objective(case.model, case.loss_fn, case.data)
    rows = []
    for label, measure in measures(quick).items():
        timing, result = time_call(lambda m=measure: m(obj), repeats=repeats, warmup=1)
        rows.append(_row(case, label, result, timing.median))
    return rows


def random_search(obj: Objective, rho: float, points: int, seed: int = 0) -> dict[str, Any]:
    """max_i rho ||grad L(theta + delta_i)|| over random delta_i on the l2 sphere."""
    gen = torch.Generator().manual_seed(seed)
    theta = obj.theta
    ball = Ball(rho)
    start = time.perf_counter()
    before = obj.counts["gradient"]
    best = 0.0
    for _ in range(points):
        delta = ball.random_sphere(obj.num_params, gen, device=obj.device, dtype=obj.dtype)
        best = max(best, float(obj.gradient(theta + delta).norm()))
    return {
        "value": rho * best,
        "num_gradients": obj.counts["gradient"] - before,
        "num_hvps": 0,
        "seconds": time.perf_counter() - start,
    }


def ascent_vs_random(case: Case, *, quick: bool) -> list[dict[str, Any]]:
    """Part 2: R1 by the default ascent, by ascent from one random start, and by random
    search over many points (value, gradients, HVPs, seconds)."""
    steps = 5 if quick else 20
    points = 50 if quick else 1000
    obj = Objective(case.model, case.loss_fn, case.data)
    runs = {
        f"random search, best of {points}": lambda: random_search(obj, RHO, points),
        f"ascent from 1 random start, {steps} steps": lambda: first_order_flatness(
            obj, RHO, steps=steps, init=(), restarts=1
        ),
        f"ascent, default starts, {steps} steps": lambda: first_order_flatness(
            obj, RHO, steps=steps
        ),
    }
    rows = []
    for label, run in runs.items():
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        if not isinstance(out, dict):
            out = {
                "value": out.value,
                "num_gradients": out.num_gradients,
                "num_hvps": out.num_hvps,
                "seconds": seconds,
            }
        rows.append({"case": case.name, "method": label, **out})
    base = rows[0]
    for row in rows:
        row["vs_random"] = row["value"] / base["value"]
        row["time_fraction"] = row["seconds"] / base["seconds"]
    return rows


COST_COLUMNS = [
    Column("case", "case"),
    Column("measure", "measure"),
    Column("value", "value", ".4g"),
    Column("num_losses", "losses"),
    Column("num_gradients", "gradients"),
    Column("num_hvps", "HVPs"),
    Column("seconds", "time [s]", ".2f"),
]
SEARCH_COLUMNS = [
    Column("case", "case"),
    Column("method", "method"),
    Column("value", "R1", ".4g"),
    Column("vs_random", "/ random best", ".3f"),
    Column("num_gradients", "gradients"),
    Column("num_hvps", "HVPs"),
    Column("seconds", "time [s]", ".2f"),
    Column("time_fraction", "time / random", ".2f"),
]


def measure_case(name: str, device: str, *, quick: bool, repeats: int) -> dict[str, Any]:
    """Both parts for one case (``"mlp"`` or ``"cnn"``)."""
    start = time.perf_counter()
    steps = 100 if quick else 300
    if name == "mlp":
        case = mlp_case(device, train_steps=steps)
    elif name == "cnn":
        case = cnn_case(device, train_steps=steps, num_samples=256 if quick else 1024)
    else:
        raise ValueError(f"unknown case {name!r}; choose 'mlp' or 'cnn'")
    return {
        "case": case.summary(),
        "costs": cost_rows(case, quick=quick, repeats=repeats),
        "ascent_vs_random": ascent_vs_random(case, quick=quick),
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke run (< 1 minute)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cases", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(cli_args)
    threads = set_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    results = {
        name: measure_case(name, args.device, quick=args.quick, repeats=repeats)
        for name in args.cases
    }
    payload = {
        "command": " ".join(["benchmarks/bench_flatness.py", *cli_args]),
        "environment": environment(args.device),
        "rho": RHO,
        "quick": args.quick,
        "repeats": repeats,
        "cases": results,
    }
    costs = [r for res in results.values() for r in res["costs"]]
    search = [r for res in results.values() for r in res["ascent_vs_random"]]
    note = f"{args.device}, float32, threads={threads}, median of {repeats}"
    report(
        "bench_flatness",
        {
            f"Cost of each measure at rho={RHO} on {note}": (costs, COST_COLUMNS),
            f"R1 at rho={RHO}: projected ascent vs random search ({args.device})": (
                search,
                SEARCH_COLUMNS,
            ),
        },
        payload,
        out_dir=args.out,
        markdown=args.markdown,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
