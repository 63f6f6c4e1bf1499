"""Benchmark: a 2-D loss landscape with flatlens vs loss-landscapes 3.0.6 vs the forward floor.

Same model, weights, data and grid size N = S x S for every contender, float32, eval mode,
all timed interleaved in one run, the order rotated every round (so load changes on a shared
machine hit all alike):

* ``floor``: N plain ``loss_fn(model(x), y)`` calls under ``torch.no_grad`` -- the least
  work that yields N loss values (``floor (fwd)``: N bare ``model(x)`` calls, for scale).
* ``flatlens``: :func:`flatlens.landscape.plane` with two filter-normalized random directions,
  loss only, as the peer computes (``+acc``: loss and accuracy, the default for a
  classifier; ``vmap``: ``method="vmap"``). Objective construction, the directions, the
  determinism check and the centre are included.
* ``loss-landscapes``: ``loss_landscapes.random_plane`` (filter normalization) with its
  ``Loss`` metric on the same single in-memory batch (it evaluates one batch and nothing else).

Cases (the issue-24 targets in brackets):

* ``mlp``: :func:`flatlens.zoo.mlp` over all 1797 digits in one batch, 41 x 41
  [at most 1.10x the floor and at least as fast as loss-landscapes, with one and two threads];
* ``resnet18``: :func:`flatlens.zoo.resnet18` (CIFAR-shaped: 3 x 32 x 32, 10 classes) over 256
  random images in one batch, 21 x 21, floor and flatlens only [at most 1.05x the floor].
  Untrained: the time of a forward pass does not depend on the weights' values, and training
  it on a CPU takes hours. (loss-landscapes 3.0.6 cannot normalize it: its filter
  normalization scales the all-zero BatchNorm biases to zero, then divides by their zero
  filter norms.) One plane is about 30 minutes per contender on one thread;
* ``cnn``: :func:`flatlens.zoo.cnn` (BatchNorm) over the first 256 digits images, 41 x 41.

``mlp`` and ``cnn`` are trained for 300 SGD steps first. Every case runs once per ``--threads``
value. Reported: per contender the median wall and CPU seconds of this process per plane,
CPU milliseconds per grid point, and the median over rounds of each round's ratio to the
floor and to loss-landscapes, on the wall clock and in CPU seconds. With one thread the CPU
ratio is the steadier measure (it counts the work done, not the time spent waiting for a core
that another process holds); with two threads the CPU time also counts OpenMP's spin-waiting,
so the verdict lines use the wall-clock ratios there. A second, finely interleaved
measurement alternates chunks of points through flatlens' serial evaluator (the grid path)
with as many floor calls. Run::

    .venv/bin/python benchmarks/bench_landscape.py --cases mlp --threads 1 2   # ~5 minutes
    .venv/bin/python benchmarks/bench_landscape.py --cases resnet18            # ~1 hour
    .venv/bin/python benchmarks/bench_landscape.py --quick                     # ~1 minute

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
    format_table,
    report,
    set_threads,
    synchronize,
    time_interleaved,
)
from torch import Tensor, nn

from flatlens import Objective, zoo
from flatlens import landscape as fl
from flatlens.data import load_digits

__all__ = ["CASES", "Case", "make_case", "measure_case", "vmap_check"]

CNN_SAMPLES = 256
RESNET_SAMPLES = 256


@dataclass(frozen=True)
class CaseSettings:
    """A case's defaults: grid points per axis, rounds, contenders, the fine measurement."""

    steps: int
    repeats: int
    contenders: tuple[str, ...]
    fine_rounds: int
    fine_chunk: int
    floor_target: float
    peer_target: bool  # the target includes "at least as fast as loss-landscapes"


CONTENDERS = (
    "floor",
    "floor (fwd)",
    "flatlens",
    "flatlens +acc",
    "flatlens vmap",
    "loss-landscapes",
)
CASES = {
    "mlp": CaseSettings(41, 7, CONTENDERS, 60, 16, 1.10, True),
    # The CNN's vmap path is ~3x slower than serial on the CPU: timed only with --quick.
    "cnn": CaseSettings(
        41, 3, tuple(c for c in CONTENDERS if c != "flatlens vmap"), 20, 16, 1.10, True
    ),
    "resnet18": CaseSettings(21, 1, ("floor", "flatlens"), 6, 2, 1.05, False),
}


@dataclass
class Case:
    """A model and the single batch every contender evaluates it on."""

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
    """``mlp`` (all 1797 digits) or ``cnn`` (first ``CNN_SAMPLES`` images), trained briefly,
    or ``resnet18`` (``RESNET_SAMPLES`` random CIFAR-shaped images, untrained)."""
    device = torch.device(device)
    if name == "resnet18":
        torch.manual_seed(0)
        model = zoo.resnet18().to(device).eval()
        gen = torch.Generator().manual_seed(0)
        n = num_samples or RESNET_SAMPLES
        x = torch.randn(n, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (n,), generator=gen).to(device)
        what = f"zoo.resnet18 (CIFAR-shaped, untrained, eval mode), one batch of {n} images"
        return Case(name, what, model, nn.CrossEntropyLoss(), x, y)
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


def _time_rounds(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> dict[str, tuple[list[float], list[float], Any]]:
    """Round-robin timing, the order rotated by one every round: wall seconds, CPU seconds
    of this process, result, per contender (lists indexed by round)."""
    keys = list(fns)
    out: dict[str, tuple[list[float], list[float], Any]] = {k: ([], [], None) for k in keys}
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            result = fns[key]()
            synchronize(device)
            walls, cpus, _ = out[key]
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            out[key] = (walls, cpus, result)
    return out


def _median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def measure_case(
    name: str,
    device: torch.device | str = "cpu",
    *,
    threads: int = 1,
    steps: int | None = None,
    repeats: int | None = None,
    contenders: Sequence[str] | None = None,
    fine_rounds: int | None = None,
) -> dict[str, Any]:
    """Time every contender on one case with ``threads`` intra-op threads, interleaved;
    ratios are medians of per-round ratios. ``None`` takes the case's default.

    Returns:
        JSON-ready ``{"case", "settings", "rows", "per_point", "checks"}``.
    """
    device = torch.device(device)
    defaults = CASES[name]
    steps = steps or defaults.steps
    repeats = repeats or defaults.repeats
    contenders = list(contenders or defaults.contenders)
    fine_rounds = defaults.fine_rounds if fine_rounds is None else fine_rounds
    threads = set_threads(threads)
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
    warm = [_flatlens(case, 3, metrics=["loss"]), _floor(case, 3, case.loss_fn)]
    if "flatlens vmap" in fns:
        warm.append(_flatlens(case, 3, metrics=["loss"], method="vmap"))
    if "loss-landscapes" in fns:
        warm.append(_loss_landscapes(case, 3))
    for fn in warm:
        fn()
    timed = _time_rounds(fns, repeats, device)
    rows = []
    for key, (wall, cpu, _) in timed.items():
        row: dict[str, Any] = {
            "case": name,
            "threads": threads,
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
        checks["flatlens_chunk_size"] = ls.settings["chunk_size"]
        checks["center_equals_objective_loss"] = bool(
            ls.center["loss"] == Objective(case.model, case.loss_fn, (case.x, case.y)).loss()
        )
        if "flatlens vmap" in timed:
            other = timed["flatlens vmap"][2].values["loss"]
            checks["vmap_vs_serial_max_rel_diff"] = float(
                np.max(np.abs(other - ls.values["loss"]) / np.abs(ls.values["loss"]))
            )
    per_point = (
        per_point_overhead(
            case,
            rounds=fine_rounds,
            chunk=defaults.fine_chunk,
            device=device,
            vmap="flatlens vmap" in fns,
        )
        if fine_rounds
        else {}
    )
    return {
        "case": {"name": name, "description": case.description, "num_params": case.num_params},
        "settings": {
            "steps": steps,
            "grid_points": n,
            "repeats": repeats,
            "threads": threads,
            "device": str(device),
            "floor_target": defaults.floor_target,
            "peer_target": defaults.peer_target,
        },
        "rows": rows,
        "per_point": per_point,
        "checks": checks,
    }


def _grid_chunk(obj: Objective, d1: Tensor, d2: Tensor, chunk: int) -> Callable[[], Any]:
    """One chunk of ``chunk`` plane points as ``plane`` evaluates it (the points written in
    place into the working copy), or, with a flatlens that predates that, as it did then
    (the rows materialized, then ``evaluate_points``)."""
    coef = torch.stack([torch.linspace(-1, 1, chunk), torch.linspace(1, -1, chunk)], dim=1).to(
        obj.dtype
    )
    try:
        from flatlens.core._affine import AffinePoints
        from flatlens.core._points import PointSession
    except ImportError:  # an older flatlens, for before/after runs
        from flatlens.landscape._grid import grid_points

        def old() -> Any:
            pts = grid_points(obj.theta, [d1, d2], coef.double().numpy())
            return obj.evaluate_points(pts, ["loss"], method="serial", chunk_size=chunk)

        return old
    session = PointSession(obj, ["loss"], "serial")
    points = AffinePoints(obj.theta, (d1, d2), coef)
    return lambda: session.evaluate(points)


def per_point_overhead(
    case: Case,
    *,
    rounds: int = 40,
    chunk: int = 16,
    device: torch.device | str = "cpu",
    vmap: bool = True,
) -> dict[str, float]:
    """CPU time per point of flatlens' evaluators relative to the floor, finely interleaved.

    Alternates one chunk of ``chunk`` plane points through the serial grid path (and the
    vmap evaluator) with ``chunk`` floor calls, ``rounds`` times, so that machine load hits
    all alike; the whole-plane timings cannot be interleaved this finely. Sums of CPU seconds.
    """
    obj = Objective(case.model, case.loss_fn, (case.x, case.y))
    d1 = fl.random_direction(obj, seed=0).vector
    d2 = fl.random_direction(obj, seed=1).vector
    fns: dict[str, Callable[[], Any]] = {
        "floor": _floor(case, chunk, case.loss_fn),
        "serial": _grid_chunk(obj, d1, d2, chunk),
    }
    if vmap:
        thetas = obj.theta + torch.linspace(-1, 1, chunk, device=obj.device)[:, None] * d1
        fns["vmap"] = lambda: obj.evaluate_points(thetas, method="vmap", chunk_size=chunk)
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
        "vmap_vs_floor": totals["vmap"] / floor if vmap else None,
        "rounds": rounds,
        "chunk": chunk,
    }


COLUMNS = [
    Column("case", "case"),
    Column("threads", "threads"),
    Column("contender", "contender"),
    Column("seconds", "wall s", ".2f"),
    Column("vs_floor_wall", "vs floor (wall)", ".3f"),
    Column("vs_loss_landscapes_wall", "vs loss-landscapes (wall)", ".3f"),
    Column("cpu_seconds", "CPU s", ".2f"),
    Column("ms_per_point", "CPU ms / point", ".3f"),
    Column("vs_floor", "vs floor (CPU)", ".3f"),
    Column("vs_loss_landscapes", "vs loss-landscapes (CPU)", ".3f"),
    Column("spread", "spread", ".2f"),
]


FINE_COLUMNS = [
    Column("case", "case"),
    Column("threads", "threads"),
    Column("floor_ms_per_point", "floor ms / point", ".3f"),
    Column("serial_vs_floor", "serial vs floor", ".3f"),
    Column("vmap_vs_floor", "vmap vs floor", ".3f"),
    Column("chunk", "chunk"),
    Column("rounds", "rounds"),
]


def verdicts(results: Sequence[dict[str, Any]]) -> list[str]:
    """One line per case and thread count on the CPU targets (CPU-time ratios with one
    thread, wall-clock ratios with more)."""
    lines = []
    for res in results:
        row = next((r for r in res["rows"] if r["contender"] == "flatlens"), None)
        if row is None:
            continue
        st = res["settings"]
        suffix = "" if st["threads"] == 1 else "_wall"
        clock = "CPU" if st["threads"] == 1 else "wall"
        vs_floor = row.get("vs_floor" + suffix, float("nan"))
        target = st["floor_target"]
        text = (
            f"{res['case']['name']}, {st['threads']} thread(s), {clock} clock: flatlens/floor = "
            f"{vs_floor:.3f} ({'OK' if vs_floor <= target else 'MISSED'} <= {target:.2f})"
        )
        if st["peer_target"] and "vs_loss_landscapes" in row:
            speed = 1.0 / row["vs_loss_landscapes" + suffix]
            text += (
                f", speed vs loss-landscapes = {speed:.3f}x "
                f"({'OK' if speed >= 1.0 else 'MISSED'} >= 1)"
            )
        if res["per_point"]:
            fine = res["per_point"]["serial_vs_floor"]
            text += f"; per point, finely interleaved: serial/floor = {fine:.3f}"
        lines.append(text + f"; checks {res['checks']}")
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
    parser.add_argument("--quick", action="store_true", help="11 x 11 grids, a few rounds")
    parser.add_argument("--steps", type=int, default=None, help="grid points per axis")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch CPU threads (1 2)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--cases", nargs="+", default=["mlp"], choices=list(CASES))
    parser.add_argument(
        "--contenders", nargs="+", default=None, choices=CONTENDERS, help="(case defaults)"
    )
    parser.add_argument("--fine-rounds", type=int, default=None, help="(case defaults)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(cli_args)
    results = []
    for name in args.cases:
        for threads in args.threads:
            quick = {"steps": 11, "repeats": 3, "fine_rounds": 4} if args.quick else {}
            results.append(
                measure_case(
                    name,
                    args.device,
                    threads=threads,
                    steps=args.steps or quick.get("steps"),
                    repeats=args.repeats or quick.get("repeats"),
                    contenders=args.contenders
                    or (CONTENDERS if args.quick and name != "resnet18" else None),
                    fine_rounds=quick.get("fine_rounds", args.fine_rounds),
                )
            )
            # Each case as soon as it is measured (a long run may be cut short).
            print(format_table(results[-1]["rows"], COLUMNS, markdown=args.markdown), flush=True)
            print("\n".join(verdicts(results[-1:])) + "\n", flush=True)
    payload = {
        "command": " ".join(["benchmarks/bench_landscape.py", *cli_args]),
        "environment": environment(args.device),
        "results": results,
    }
    rows = [r for res in results for r in res["rows"]]
    title = (
        f"2-D landscape planes on {args.device}, medians of interleaved rounds "
        "(ratios: median of per-round ratios; default allocator)"
    )
    fine = [
        {"case": res["case"]["name"], "threads": res["settings"]["threads"], **res["per_point"]}
        for res in results
        if res["per_point"]
    ]
    fine_title = "Per-point CPU time relative to the floor, chunks finely interleaved"
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
