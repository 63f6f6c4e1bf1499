"""GPU check: the benchmarks' CUDA measurements as one short script (estimated a few minutes).

Run from the repository root on a machine with a GPU (flatlens need not be installed; PyHessian
0.1 is pure Python and imports straight from its wheel)::

    pip download --no-deps PyHessian==0.1 -d .whl          # once, where pip works
    PYTHONPATH=.:.whl/PyHessian-0.1-py3-none-any.whl python3 benchmarks/gpu_check.py

Without CUDA it prints a message and exits 0 (``--device cpu`` runs the same checks on the
CPU to try the script out; ``--quick`` makes them a smoke run). It prints a table per check
and writes ``gpu_check.json`` to ``$OUT`` when that is set, else to ``benchmarks/results/``;
the file is rewritten after every check, so a run cut short keeps what it finished. TF32 is
switched off so float32 means float32 for both tools.

Each check is one function ``check_<name>(device, *, quick) -> CheckOutput`` registered with
:func:`check`; later issues add theirs (landscape vmap vs serial, ResNet-18 optimizer step
throughput) the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from _common import Column, environment, format_table, set_threads, write_json
from bench_spectrum import measure_case, summary_lines, tables

__all__ = ["CHECKS", "CheckOutput", "check", "main", "run_checks"]


@dataclass
class CheckOutput:
    """What one check measured.

    Attributes:
        payload: JSON-ready results.
        tables: ``{title: (rows, columns)}`` to print.
        lines: Short verdicts printed after the tables.
    """

    payload: dict[str, Any]
    tables: dict[str, tuple[list[dict[str, Any]], list[Column]]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


CheckFn = Callable[..., CheckOutput]
CHECKS: dict[str, CheckFn] = {}


def check(fn: CheckFn) -> CheckFn:
    """Register ``check_<name>`` under ``<name>`` (run in registration order)."""
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def _spectrum(name: str, device: torch.device, quick: bool) -> CheckOutput:
    result = measure_case(name, device, quick=quick)
    return CheckOutput(
        payload=result,
        tables=tables(
            {name: result}, str(device), f", median over {result['settings']['repeats']} seeds"
        ),
        lines=summary_lines({name: result}),
    )


@check
def check_spectrum_mlp(device: torch.device, *, quick: bool = False) -> CheckOutput:
    """flatlens vs PyHessian top-1/top-5 and HVP costs: MLP, 1797 digits in uneven batches."""
    return _spectrum("mlp", device, quick)


@check
def check_spectrum_cnn(device: torch.device, *, quick: bool = False) -> CheckOutput:
    """flatlens vs PyHessian top-1/top-5 and HVP costs: BatchNorm CNN, one batch of 1024."""
    return _spectrum("cnn", device, quick)


@check
def check_landscape_vmap(device: torch.device, *, quick: bool = False) -> CheckOutput:
    """Landscape plane: vmap vs serial on the MLP and BN CNN, 1797 digits (target >= 5x)."""
    from bench_landscape import vmap_check

    out = vmap_check(device, quick=quick)
    return CheckOutput(payload=out["payload"], tables=out["tables"], lines=out["lines"])


@check
def check_resnet18_steps(device: torch.device, *, quick: bool = False) -> CheckOutput:
    """CIFAR-shaped ResNet-18 step throughput (random tensors): SGD, SAM, GAM, GAM-exact."""
    from bench_optim import resnet18_step_throughput

    steps, warmup = (5, 2) if quick else (20, 5)
    rows = resnet18_step_throughput(device, batch_size=128, steps=steps, warmup=warmup)
    if device.type == "cuda":
        rows += [
            {**r, "optimizer": f"{r['optimizer']} (bf16 autocast)"}
            for r in resnet18_step_throughput(
                device,
                batch_size=128,
                steps=steps,
                warmup=warmup,
                autocast_dtype=torch.bfloat16,
                optimizers=("SGD", "SAM", "GAM"),
            )
        ]
    columns = [
        Column("optimizer", "optimizer"),
        Column("passes", "passes"),
        Column("ms_per_step", "ms/step", ".1f"),
        Column("images_per_s", "images/s", ".0f"),
        Column("relative_to_sgd", "x SGD", ".2f"),
    ]
    return CheckOutput(
        payload={"rows": rows},
        tables={f"ResNet-18 step throughput on {device}": (rows, columns)},
        lines=[f"{r['optimizer']}: {r['relative_to_sgd']:.2f}x SGD per step" for r in rows],
    )


def run_checks(
    device: torch.device,
    names: Sequence[str],
    *,
    budget_s: float,
    out_dir: str | None,
    quick: bool = False,
) -> dict[str, Any]:
    """Run the named checks in order, each isolated: a failure is recorded, not fatal.

    A check that would start after ``budget_s`` seconds is skipped. The JSON file is
    rewritten after every check.

    Returns:
        The payload written (``environment`` and one entry per check with ``status``).
    """
    payload: dict[str, Any] = {"environment": environment(device), "checks": {}}
    start = time.perf_counter()
    for name in names:
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            payload["checks"][name] = {"status": "skipped", "reason": f"budget {budget_s}s"}
            print(f"\n[{name}] skipped: {elapsed:.0f}s spent of the {budget_s:.0f}s budget")
            continue
        print(f"\n[{name}] {CHECKS[name].__doc__}", flush=True)
        t0 = time.perf_counter()
        try:
            out = CHECKS[name](device, quick=quick)
        except Exception as err:  # one broken check must not lose the others' results
            payload["checks"][name] = {
                "status": "error",
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
            }
            traceback.print_exc()
        else:
            payload["checks"][name] = {"status": "ok", **out.payload}
            for title, (rows, columns) in out.tables.items():
                print(f"\n{title}\n\n{format_table(rows, columns)}")
            if out.lines:
                print("\n" + "\n".join(out.lines))
        payload["checks"][name]["seconds"] = time.perf_counter() - t0
        print(f"[{name}] {payload['checks'][name]['status']} in {time.perf_counter() - t0:.1f}s")
        write_json("gpu_check", payload, out_dir)
    payload["seconds"] = time.perf_counter() - start
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: 0 when every check ran (or there is no GPU), 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to try it out")
    parser.add_argument("--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    parser.add_argument("--budget", type=float, default=150.0, help="seconds before skipping")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run (small, one repeat)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (cpu: 1)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    set_threads(args.threads or (1 if device.type == "cpu" else None))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; nothing to check (exit 0).")
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.init()
    payload = run_checks(
        device, args.checks, budget_s=args.budget, out_dir=args.out, quick=args.quick
    )
    path = write_json("gpu_check", payload, args.out)
    print(f"\nwrote {path} ({payload['seconds']:.0f}s)")
    failed = [n for n, c in payload["checks"].items() if c["status"] != "ok"]
    if failed:
        print(f"checks not ok: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
