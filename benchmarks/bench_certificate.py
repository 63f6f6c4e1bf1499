"""Benchmark: do the eigenvalue certificates hold in float32? Claimed bound vs true error.

Two cases, both solved by :func:`flatlens.hessian_eigenvalues` (Lanczos, float32 basis and
products):

* ``diagonal``: a float32 diagonal operator of n = 11.2M (the size of a CIFAR ResNet-18)
  with known eigenvalues: 1000, 990, 985, 970, 960, a bulk uniform in [-100, 100] and a
  cluster near -500. The exact eigenvalues are the float32 entries themselves.
* ``cnn``: a BatchNorm CNN of 981,802 parameters (five 3x3 convolutions, eval mode, 8
  random 16x16 images) in float32, against its float64 copy solved to tol 1e-10.

For each returned eigenvalue it reports the value, the claimed error bound, the true
error (to the exact or float64 eigenvalue), whether the bound holds, the products spent
(the final checks included) and the wall time. Run::

    .venv/bin/python benchmarks/bench_certificate.py            # about 3 minutes
    .venv/bin/python benchmarks/bench_certificate.py --quick    # n = 1e6, < 30 s

Results: a table on stdout and ``benchmarks/results/bench_certificate.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from _common import Column, environment, report, set_threads
from torch import nn
from torch.nn import functional as F

from flatlens import Objective
from flatlens.measures import SymmetricOperator, hessian_eigenvalues

RESNET18_PARAMS = 11_173_962
DIAGONAL_CASES = [(1, 1e-4), (5, 1e-4), (1, 1e-6)]
CNN_CASES = [(1, 1e-3), (1, 1e-4), (3, 1e-5)]


def diagonal(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 diagonal and its eigenvalues in descending order (float64)."""
    gen = torch.Generator().manual_seed(seed)
    d = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 100
    d[:5] = torch.tensor([1000.0, 990.0, 985.0, 970.0, 960.0], dtype=torch.float64)
    d[5:10] = -500.0 + torch.arange(5, dtype=torch.float64)
    d32 = d.float()
    return d32, d32.double().sort(descending=True).values


def cnn(seed: int = 0) -> nn.Sequential:
    """Five 3x3 conv - BatchNorm - ReLU blocks (two max-pools), then a linear layer."""
    torch.manual_seed(seed)
    widths = [3, 32, 64, 128, 256, 256]
    layers: list[nn.Module] = []
    for i in range(5):
        layers += [nn.Conv2d(widths[i], widths[i + 1], 3, padding=1, bias=False)]
        layers += [nn.BatchNorm2d(widths[i + 1]), nn.ReLU()]
        if i in (1, 2):
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10)]
    model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed + 1)
    for bn in (m for m in model if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.copy_(0.1 * torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
    return model.eval()


def solve_rows(case: str, op: Any, n: int, exact: torch.Tensor, cases, seed: int) -> list[dict]:
    rows = []
    for k, tol in cases:
        start = time.perf_counter()
        res = hessian_eigenvalues(op, k, tol=tol, seed=seed)
        seconds = time.perf_counter() - start
        for i in range(k):
            value, bound = float(res.eigenvalues[i]), float(res.error_bounds[i])
            err = abs(value - float(exact[i]))
            rows.append(
                {
                    "case": case,
                    "n": n,
                    "k": k,
                    "tol": tol,
                    "pair": i,
                    "value": value,
                    "exact": float(exact[i]),
                    "bound": bound,
                    "rel_bound": bound / abs(value),
                    "error": err,
                    "holds": err <= bound,
                    "converged": bool(res.converged[i]),
                    "hvps": res.num_hvps,
                    "seconds": seconds,
                    "rounding": res.rounding,
                    "basis_vectors": res.basis_vectors,
                }
            )
        print(f"{case} k={k} tol={tol:g}: {res.num_hvps} products, {seconds:.1f} s", flush=True)
    return rows


def diagonal_rows(n: int, seed: int) -> list[dict]:
    d32, exact = diagonal(n)
    op = SymmetricOperator(lambda v: d32 * v, n, dtype=torch.float32)
    return solve_rows("diagonal f32", op, n, exact, DIAGONAL_CASES, seed)


def run(quick: bool, seed: int) -> tuple[list[dict], dict]:
    rows = diagonal_rows(1_000_000 if quick else RESNET18_PARAMS, seed)
    model = cnn()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    obj64 = Objective(copy.deepcopy(model).double(), F.cross_entropy, (x.double(), y))
    kmax = max(k for k, _ in CNN_CASES)
    start = time.perf_counter()
    ref = hessian_eigenvalues(obj64, kmax, tol=1e-10, seed=seed)
    reference = {
        "eigenvalues": ref.eigenvalues.tolist(),
        "error_bounds": ref.error_bounds.tolist(),
        "hvps": ref.num_hvps,
        "seconds": time.perf_counter() - start,
    }
    obj = Objective(model, F.cross_entropy, (x, y))
    cases = CNN_CASES[:2] if quick else CNN_CASES
    rows += solve_rows("cnn f32 vs f64", obj, obj.num_params, ref.eigenvalues, cases, seed)
    return rows, reference


COLUMNS = [
    Column("case", "case"),
    Column("n", "n", ","),
    Column("k", "k"),
    Column("tol", "tol", ".0e"),
    Column("pair", "pair"),
    Column("value", "value", ".9g"),
    Column("bound", "claimed bound", ".2e"),
    Column("error", "true error", ".2e"),
    Column("holds", "holds"),
    Column("converged", "conv."),
    Column("hvps", "HVPs"),
    Column("seconds", "time (s)", ".1f"),
]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n = 1e6 diagonal (< 30 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="start-vector seed")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(cli_args)
    threads = set_threads(args.threads)
    rows, reference = run(args.quick, args.seed)
    payload = {
        "command": " ".join(["benchmarks/bench_certificate.py", *cli_args]),
        "environment": environment("cpu"),
        "rows": rows,
        "cnn_float64_reference": reference,
    }
    title = f"float32 certificates: claimed bound vs true error (threads={threads})"
    report(
        "bench_certificate",
        {title: (rows, COLUMNS)},
        payload,
        out_dir=args.out,
        markdown=args.markdown,
    )
    held = sum(r["holds"] for r in rows)
    print(f"\nbounds that hold: {held}/{len(rows)}")
    return 0 if held == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
