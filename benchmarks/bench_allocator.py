"""Effect of :func:`flatlens.tune_cpu_allocator` on a top-5 Hessian spectrum, in fresh processes.

Each repeat starts two new Python processes, one with glibc's default ``malloc`` settings and
one that first calls ``flatlens.tune_cpu_allocator()``, alternating. Each process builds the
benchmark's BatchNorm CNN case (``bench_spectrum.cnn_case``: zoo.cnn trained for 300 SGD
steps, one batch of 1024 digits, float32, one thread) and times
``hessian_eigenvalues(Objective(...), k=5, tol=1e-3)`` (Objective construction, the
determinism check and the cached graph included). Fresh processes matter: inside a
long-running process that has already done other work, glibc's adaptive thresholds have
grown and the two settings measure alike.

    .venv/bin/python benchmarks/bench_allocator.py --repeats 3 --markdown
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from _common import Column, environment, report

CHILD = """
import json, sys, time
sys.path.insert(0, {bench!r})
import torch
torch.set_num_threads(1)
if {tuned}:
    from flatlens.allocator import tune_cpu_allocator
    assert tune_cpu_allocator()
from bench_spectrum import cnn_case
from flatlens import Objective
from flatlens.measures._spectrum import hessian_eigenvalues
case = cnn_case(num_samples={samples}, train_steps={steps})
start = time.perf_counter()
cpu = time.process_time()
result = hessian_eigenvalues(Objective(case.model, case.loss_fn, case.data), k=5, tol=1e-3)
print(json.dumps({{"wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                  "hvps": result.num_hvps}}))
"""


def run_child(tuned: bool, *, samples: int, steps: int) -> dict[str, float]:
    """One fresh process; returns its wall and CPU seconds and HVP count."""
    code = CHILD.format(bench=str(Path(__file__).parent), tuned=tuned, samples=samples, steps=steps)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="process pairs (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run (small CNN batch)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(cli_args)
    samples, steps = (256, 50) if args.quick else (1024, 300)
    runs: dict[str, list[dict[str, float]]] = {"default": [], "tuned": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(run_child(name == "tuned", samples=samples, steps=steps))
    base = statistics.median(r["wall"] for r in runs["default"])
    rows = []
    for name, values in runs.items():
        wall = statistics.median(r["wall"] for r in values)
        rows.append(
            {
                "allocator": name,
                "wall": wall,
                "cpu": statistics.median(r["cpu"] for r in values),
                "all": ", ".join(f"{r['wall']:.2f}" for r in values),
                "hvps": values[0]["hvps"],
                "speedup": f"{base / wall:.2f}x",
            }
        )
    columns = [
        Column("allocator", "allocator"),
        Column("wall", "time [s]", ".3f"),
        Column("cpu", "CPU [s]", ".3f"),
        Column("all", "every run [s]"),
        Column("hvps", "HVPs"),
        Column("speedup", "speed-up"),
    ]
    payload = {
        "command": " ".join(["benchmarks/bench_allocator.py", *cli_args]),
        "environment": environment("cpu"),
        "settings": {"samples": samples, "train_steps": steps, "repeats": args.repeats},
        "runs": runs,
    }
    title = f"CNN top-5 spectrum in fresh processes (median of {args.repeats})"
    report(
        "bench_allocator",
        {title: (rows, columns)},
        payload,
        out_dir=args.out,
        markdown=args.markdown,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
