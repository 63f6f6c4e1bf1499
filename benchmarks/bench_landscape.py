"""Benchmark: a 2-D loss landscape with flatlens vs loss-landscapes 3.0.6 vs the forward floor.

Same model, weights, data and grid size N = S x S for every contender, float32, eval mode,
all timed interleaved in one run (so load changes on a shared machine hit all alike):

* ``floor``: N plain ``loss_fn(model(x), y)`` calls under ``torch.no_grad`` -- the least
  work that yields N loss values (``floor (fwd)``: N bare ``model(x)`` calls, for scale).
* ``flatlens``: :func:`flatlens.landscape.plane` with two filter-normalized random directions,
  loss only (``+acc``: loss and accuracy; ``vmap``: ``method="vmap"``). Objective
  construction, the directions and the determinism check at the centre are included.
* ``loss-landscapes``: ``loss_landscapes.random_plane`` (filter normalization) with its
  ``Loss`` metric on the same single in-memory batch (it evaluates one batch and nothing else).

Cases: ``mlp`` = :func:`flatlens.zoo.mlp` over all 1797 digits in one batch; ``cnn`` =
:func:`flatlens.zoo.cnn` (BatchNorm) over the first 256 digits images in one batch (the CPU
forward of the CNN over all 1797 images takes ~0.1-0.2 s here, which would make a 41 x 41
plane take minutes per contender). Both are trained for 300 SGD steps first.

Reported: the CPU seconds of this process per plane (one intra-op thread, so this is the work
done, not the time spent waiting for cores that others' processes hold), milliseconds per grid
point, the wall time, and the median over repeats of each repeat's ratio to the floor and to
loss-landscapes. Targets on the CPU: flatlens (loss) within 10% of the floor and at least as
fast as loss-landscapes. Run::

    .venv/bin/python benchmarks/bench_landscape.py            # 41 x 41, several minutes
    .venv/bin/python benchmarks/bench_landscape.py --quick    # 11 x 11, about a minute

Results: tables on stdout and ``benchmarks/results/bench_landscape.json``.
:func:`vmap_check` is the GPU check (vmap vs serial evaluation) for ``gpu_check.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from _common import (
    Column,
    environment,
    report,
    set_threads,
    synchronize,
    time_interleaved,
)
from torch import Tensor, nn

from flatlens import Objective, zoo
from flatlens import landscape as fl
from flatlens.data import load_digits

__all__ = ["Case", "make_case", "measure_case", "vmap_check"]

CNN_SAMPLES = 256


@dataclass
class Case:
    """A trained model and the single batch every contender evaluates it on."""

    name: str
    description: str
    model: nn.Module
    loss_fn: nn.Module
    x: Tensor
    y: Tensor

    @property
    def num_params(self) -> int:
        """Trainable scalars."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def make_case(
    name: str, device: torch.device | str = "cpu", *, num_samples: int | None = None
) -> Case:
    """``mlp`` (all 1797 digits) or ``cnn`` (first ``CNN_SAMPLES`` images), trained briefly."""
    device = torch.device(device)
    image = name == "cnn"
    d = load_digits(image=image)
    x, y = torch.cat([d.x_train, d.x_test]).to(device), torch.cat([d.y_train, d.y_test]).to(device)
    torch.manual_seed(0)
    model = (zoo.cnn() if image else zoo.mlp()).to(device)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(300):
        idx = torch.randint(0, len(y), (64,), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    n = num_samples or (CNN_SAMPLES if image else len(y))
    x, y = x[:n], y[:n]
    what = "zoo.cnn (BatchNorm, eval mode)" if image else "zoo.mlp"
    return Case(name, f"{what}, one batch of {n} digits", model, nn.CrossEntropyLoss(), x, y)


def _floor(case: Case, n: int, loss_fn: Callable[[Any, Any], Any] | None) -> Callable[[], None]:
    @torch.no_grad()
    def run() -> None:
        for _ in range(n):
            out = case.model(case.x)
            if loss_fn is not None:
                loss_fn(out, case.y)

    return run


def _flatlens(
    case: Case, steps: int, *, metrics: Sequence[str] | None, method: str = "auto"
) -> Callable[[], fl.Landscape]:
    def run() -> fl.Landscape:
        obj = Objective(case.model, case.loss_fn, (case.x, case.y))
        d1, d2 = fl.random_direction(obj, seed=0), fl.random_direction(obj, seed=1)
        return fl.plane(
            obj, d1, d2, span=(-1, 1), num_points=(steps, steps), metrics=metrics, method=method
        )

    return run


def _loss_landscapes(case: Case, steps: int) -> Callable[[], np.ndarray]:
    try:
        import loss_landscapes
        from loss_landscapes.metrics import Loss
    except ImportError as err:
        raise SystemExit(
            "loss-landscapes is not installed: .venv/bin/pip install -c constraints.txt "
            "loss-landscapes==3.0.6"
        ) from err

    def run() -> np.ndarray:
        metric = Loss(case.loss_fn, case.x, case.y)
        return loss_landscapes.random_plane(
            case.model,
            metric,
            distance=1.0,
            steps=steps,
            normalization="filter",
            deepcopy_model=True,
        )

    return run


def _time_both(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> dict[str, tuple[list[float], list[float], Any]]:
    """Round-robin timing of each call: wall seconds, CPU seconds of this process, result.

    With one intra-op thread the CPU time counts the work done, not the time spent waiting
    for cores that other users' processes hold, so it is the steadier measure on a shared
    machine (it does not count GPU time: use the wall time there).
    """
    out: dict[str, tuple[list[float], list[float], Any]] = {k: ([], [], None) for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            synchronize(device)
            walls, cpus, _ = out[key]
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            out[key] = (walls, cpus, result)
    return out


def _median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


CONTENDERS = (
    "floor",
    "floor (fwd)",
    "flatlens",
    "flatlens +acc",
    "flatlens vmap",
    "loss-landscapes",
)


def measure_case(
    name: str,
    device: torch.device | str = "cpu",
    *,
    steps: int = 41,
    repeats: int = 3,
    contenders: Sequence[str] = CONTENDERS,
    fine_rounds: int = 40,
) -> dict[str, Any]:
    """Time every contender on one case, interleaved; ratios are medians of per-repeat ratios.

    Returns:
        JSON-ready ``{"case", "settings", "rows", "checks"}``.
    """
    device = torch.device(device)
    case = make_case(name, device)
    n = steps * steps
    makers: dict[str, Callable[[], Callable[[], Any]]] = {
        "floor": lambda: _floor(case, n, case.loss_fn),
        "floor (fwd)": lambda: _floor(case, n, None),
        "flatlens": lambda: _flatlens(case, steps, metrics=["loss"]),
        "flatlens +acc": lambda: _flatlens(case, steps, metrics=None),
        "flatlens vmap": lambda: _flatlens(case, steps, metrics=["loss"], method="vmap"),
        "loss-landscapes": lambda: _loss_landscapes(case, steps),
    }
    fns = {k: makers[k]() for k in contenders}
    # Warm up every code path on a tiny grid (allocator, kernels, vmap tracing).
    warm = {
        "flatlens": _flatlens(case, 3, metrics=["loss"]),
        "floor": _floor(case, 3, case.loss_fn),
    }
    if "flatlens vmap" in fns:
        warm["vmap"] = _flatlens(case, 3, metrics=["loss"], method="vmap")
    if "loss-landscapes" in fns:
        warm["ll"] = _loss_landscapes(case, 3)
    for fn in warm.values():
        fn()
    timed = _time_both(fns, repeats, device)
    rows = []
    for key, (wall, cpu, _) in timed.items():
        row: dict[str, Any] = {
            "case": name,
            "contender": key,
            "seconds": statistics.median(wall),
            "cpu_seconds": statistics.median(cpu),
            "ms_per_point": 1e3 * statistics.median(cpu) / n,
            "spread": (max(cpu) - min(cpu)) / statistics.median(cpu),
            "wall_s": wall,
            "cpu_s": cpu,
        }
        for ref, label in (("floor", "vs_floor"), ("loss-landscapes", "vs_loss_landscapes")):
            if ref in timed:
                row[label] = _median_ratio(cpu, timed[ref][1])
                row[label + "_wall"] = _median_ratio(wall, timed[ref][0])
        rows.append(row)
    checks: dict[str, Any] = {}
    if "flatlens" in timed:
        ls = timed["flatlens"][2]
        checks["flatlens_method"] = ls.settings["method"]
        checks["center_equals_objective_loss"] = bool(
            ls.center["loss"] == Objective(case.model, case.loss_fn, (case.x, case.y)).loss()
        )
        if "flatlens vmap" in timed:
            other = timed["flatlens vmap"][2].values["loss"]
            checks["vmap_vs_serial_max_rel_diff"] = float(
                np.max(np.abs(other - ls.values["loss"]) / np.abs(ls.values["loss"]))
            )
    return {
        "case": {"name": name, "description": case.description, "num_params": case.num_params},
        "settings": {"steps": steps, "grid_points": n, "repeats": repeats, "device": str(device)},
        "rows": rows,
        "per_point": per_point_overhead(case, rounds=fine_rounds, device=device),
        "checks": checks,
    }


def per_point_overhead(
    case: Case, *, rounds: int = 40, chunk: int = 16, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """CPU time per point of flatlens' evaluators relative to the floor, finely interleaved.

    Alternates one chunk of ``chunk`` points through the serial and the vmap evaluator with
    ``chunk`` floor calls, ``rounds`` times, so that machine load hits all three alike; the
    whole-plane timings above cannot be interleaved this finely. Sums of CPU seconds.
    """
    obj = Objective(case.model, case.loss_fn, (case.x, case.y))
    d = fl.random_direction(obj, seed=0).vector
    thetas = obj.theta + torch.linspace(-1, 1, chunk, device=obj.device)[:, None] * d
    fns = {
        "floor": _floor(case, chunk, case.loss_fn),
        "serial": lambda: obj.evaluate_points(thetas, method="serial", chunk_size=chunk),
        "vmap": lambda: obj.evaluate_points(thetas, method="vmap", chunk_size=chunk),
    }
    totals = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for key, fn in fns.items():
            synchronize(device)
            start = time.process_time()
            fn()
            synchronize(device)
            totals[key] += time.process_time() - start
    floor = totals["floor"]
    return {
        "floor_ms_per_point": 1e3 * floor / (rounds * chunk),
        "serial_vs_floor": totals["serial"] / floor,
        "vmap_vs_floor": totals["vmap"] / floor,
        "rounds": rounds,
        "chunk": chunk,
    }


COLUMNS = [
    Column("case", "case"),
    Column("contender", "contender"),
    Column("cpu_seconds", "CPU s", ".2f"),
    Column("ms_per_point", "CPU ms / point", ".3f"),
    Column("vs_floor", "vs floor", ".3f"),
    Column("vs_loss_landscapes", "vs loss-landscapes", ".3f"),
    Column("seconds", "wall s", ".2f"),
    Column("vs_floor_wall", "vs floor (wall)", ".3f"),
    Column("spread", "spread", ".2f"),
]


FINE_COLUMNS = [
    Column("case", "case"),
    Column("floor_ms_per_point", "floor ms / point", ".3f"),
    Column("serial_vs_floor", "serial vs floor", ".3f"),
    Column("vmap_vs_floor", "vmap vs floor", ".3f"),
    Column("rounds", "rounds"),
]


def verdicts(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per case on the CPU targets."""
    lines = []
    for name, res in results.items():
        row = next((r for r in res["rows"] if r["contender"] == "flatlens"), None)
        if row is None:
            continue
        vs_floor = row.get("vs_floor", float("nan"))
        vs_ll = row.get("vs_loss_landscapes", float("nan"))
        floor_ok, ll_ok = vs_floor <= 1.10, vs_ll <= 1.0
        lines.append(
            f"{name}: flatlens/floor = {vs_floor:.3f} ({'OK' if floor_ok else 'MISSED'} <= 1.10), "
            f"flatlens/loss-landscapes = {vs_ll:.3f} ({'OK' if ll_ok else 'MISSED'} <= 1); "
            f"per point, finely interleaved: serial/floor = "
            f"{res['per_point']['serial_vs_floor']:.3f}; checks {res['checks']}"
        )
    return lines


# ------------------------------------------------------------------------------ GPU check
def vmap_check(device: torch.device | str = "cuda", *, quick: bool = False) -> dict[str, Any]:
    """vmap vs serial plane evaluation on the MLP and the BN CNN (GPU target: >= 5x).

    Each case evaluates all 1797 digits in one batch on a 21 x 21 grid (11 x 11 with
    ``quick``), loss only, median of 3 interleaved repeats, and checks that the two methods
    agree (float32, relative difference below 1e-4).

    Returns:
        ``{"payload": ..., "tables": {title: (rows, columns)}, "lines": [...]}`` (the parts of
        ``gpu_check.CheckOutput``).
    """
    device = torch.device(device)
    steps = 11 if quick else 21
    rows, payload = [], {}
    for name in ("mlp", "cnn"):
        case = make_case(name, device, num_samples=1797)
        fns = {
            "serial": _flatlens(case, steps, metrics=["loss"], method="serial"),
            "vmap": _flatlens(case, steps, metrics=["loss"], method="vmap"),
            "floor": _floor(case, steps * steps, case.loss_fn),
        }
        for fn in fns.values():
            fn()
        synchronize(device)
        timed = time_interleaved(fns, repeats=3, warmup=0, device=device)
        serial, vmap = timed["serial"], timed["vmap"]
        a, b = serial[1].values["loss"], vmap[1].values["loss"]
        speedup = statistics.median(
            s / v for s, v in zip(serial[0].times, vmap[0].times, strict=True)
        )
        entry = {
            "case": name,
            "grid": f"{steps}x{steps}",
            "serial_s": serial[0].median,
            "vmap_s": vmap[0].median,
            "floor_s": timed["floor"][0].median,
            "speedup": speedup,
            "vmap_chunk_size": vmap[1].settings["chunk_size"],
            "max_rel_diff": float(np.max(np.abs(a - b) / np.abs(a))),
            "passed": bool(speedup >= 5.0 and np.allclose(a, b, rtol=1e-4)),
        }
        rows.append(entry)
        payload[name] = entry
    columns = [
        Column("case", "case"),
        Column("grid", "grid"),
        Column("serial_s", "serial s", ".3f"),
        Column("vmap_s", "vmap s", ".3f"),
        Column("floor_s", "floor s", ".3f"),
        Column("speedup", "vmap speedup", ".1f"),
        Column("vmap_chunk_size", "chunk"),
        Column("max_rel_diff", "max rel diff", ".1e"),
        Column("passed", "passed"),
    ]
    lines = [
        f"landscape vmap {r['case']}: {r['speedup']:.1f}x faster than serial "
        f"({'OK' if r['passed'] else 'MISSED'} >= 5x, agreement {r['max_rel_diff']:.1e})"
        for r in rows
    ]
    return {
        "payload": payload,
        "tables": {f"landscape plane, vmap vs serial ({device})": (rows, columns)},
        "lines": lines,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="11 x 11 grid, about a minute")
    parser.add_argument("--steps", type=int, default=None, help="grid points per axis (41)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (3; cnn 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cases", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(cli_args)
    threads = set_threads(args.threads)
    steps = args.steps or (11 if args.quick else 41)
    results = {}
    for name in args.cases:
        # The CNN's vmap path is ~3x slower than serial on the CPU and its full plane takes
        # minutes: time it only in quick runs.
        contenders = [c for c in CONTENDERS if not (name == "cnn" and c == "flatlens vmap")]
        if args.quick:
            contenders = list(CONTENDERS)
        repeats = args.repeats or (2 if name == "cnn" and not args.quick else 3)
        results[name] = measure_case(
            name,
            args.device,
            steps=steps,
            repeats=repeats,
            contenders=contenders,
            fine_rounds=10 if args.quick else (20 if name == "cnn" else 60),
        )
    payload = {
        "command": " ".join(["benchmarks/bench_landscape.py", *cli_args]),
        "environment": environment(args.device),
        "cases": results,
    }
    rows = [r for res in results.values() for r in res["rows"]]
    title = (
        f"2-D landscape, {steps}x{steps} grid, {args.device}, threads={threads}, "
        "default allocator (MALLOC_* settings recorded in the JSON)"
    )
    fine = [{"case": k, **v["per_point"]} for k, v in results.items()]
    fine_title = "Per-point CPU time relative to the floor, chunks of 16 finely interleaved"
    report(
        "bench_landscape",
        {title: (rows, COLUMNS), fine_title: (fine, FINE_COLUMNS)},
        payload,
        out_dir=args.out,
        markdown=args.markdown,
    )
    print()
    print("\n".join(verdicts(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
