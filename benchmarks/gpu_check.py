"""GPU check: the benchmarks' CUDA measurements as one short script (estimated a few minutes).

Run from the repository root on a machine with a GPU (flatlens need not be installed; PyHessian
0.1 is pure Python and imports straight from its wheel)::

    pip download --no-deps PyHessian==0.1 -d .whl          # once, where pip works
    PYTHONPATH=.:.whl/PyHessian-0.1-py3-none-any.whl python3 benchmarks/gpu_check.py

The real-architecture checks (``models_hvp_cost``, ``resnet18_top5``, ``transformers_top1``)
also need torchvision, timm and transformers (in the lent machines' image); their
``resnet18_top5`` baselines run when PyHessian and curvlinops import (curvlinops is pure
Python too: ``pip download --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch
einconv``) and are skipped, with a line saying so, when they do not.

Without CUDA it prints a message and exits 0 (``--device cpu`` runs the same checks on the
CPU to try the script out; ``--quick`` makes them a smoke run). It prints a table per check
and writes ``gpu_check.json`` to ``$OUT`` when that is set, else to ``benchmarks/results/``;
the file is rewritten after every check, so a run cut short keeps what it finished. TF32 is
switched off so float32 means float32 for both tools.

Each check is one function ``check_<name>(device, *, quick) -> CheckOutput`` registered with
:func:`check`; later issues add theirs (landscape vmap vs serial, ResNet-18 optimizer step
throughput, the real-architecture checks of ``bench_models.py``: HVP vs gradient on ResNet-18,
ViT and GPT-2, ResNet-18 top-5 on 512 images, ViT and GPT-2 top-1, one epoch of the GAM
recipe on synthetic CIFAR-shaped data) the same way.
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


def _model_cases(device: torch.device, quick: bool, names: Sequence[str]) -> list[Any]:
    """The bench_models cases (ResNet-18 CIFAR, timm ViT, Hugging Face GPT-2) on ``device``,
    trained briefly there (a few seconds on a GPU; CPU-trained weights are not reused)."""
    import bench_models as bm

    sizes = bm.QUICK if quick else bm.GPU
    makers = {
        "resnet18": lambda: bm.resnet_case(sizes, device, trained=True),
        "vit": lambda: bm.vit_case(sizes, device),
        "gpt2": lambda: bm.gpt2_case(sizes, device),
    }
    return [makers[n]() for n in names]


@check
def check_models_hvp_cost(device: torch.device, *, quick: bool = False) -> CheckOutput:
    """ResNet-18 (512 images), ViT, GPT-2: one HVP vs one gradient (target <= 2.5)."""
    import bench_models as bm

    sizes = bm.QUICK if quick else bm.GPU
    rows: list[dict[str, Any]] = []
    cases = []
    for case in _model_cases(device, quick, ("resnet18", "vit", "gpt2")):
        cases.append({"name": case.name, **case.info})
        rows += bm.hvp_cost(case, repeats=sizes.hvp_cost_repeats, warmup=2)
        del case
    lines = [
        f"{r['case']} {r['method']}: {r['ratio']:.2f} gradients (target <= 2.5) "
        + ("ok" if r["ratio"] <= 2.5 else "MISS")
        for r in rows
        if r["method"].startswith("hvp")
    ]
    return CheckOutput(
        payload={"cases": cases, "rows": rows, "target_ratio": 2.5},
        tables={f"One HVP relative to one gradient on {device}": (rows, bm.COST_COLUMNS)},
        lines=lines,
    )


@check
def check_resnet18_top5(device: torch.device, *, quick: bool = False) -> CheckOutput:
    """ResNet-18 top-5 on 512 images, flatlens tol=1e-3 (target < 10 s), then PyHessian 0.1
    and curvlinops at the same tol for comparison (skipped when flatlens took over 60 s)."""
    import bench_models as bm

    (case,) = _model_cases(device, quick, ("resnet18",))
    k = 1 if quick else 5
    bm.warm_up(case)
    tools = {
        "flatlens": lambda: bm.flatlens_eigen(case, k),
        "pyhessian": lambda: bm.pyhessian_eigen(case, k),
        "curvlinops": lambda: bm.curvlinops_eigen(case, k),
    }
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for tool, fn in tools.items():
        if not bm.available(tool):
            skipped[tool] = "not installed"
            continue
        if rows and rows[0]["time_s"] > 60:
            skipped[tool] = "flatlens took over 60 s"
            continue
        out, stats = bm.measured(fn, device)
        row = {
            "case": case.name,
            "weights": case.weights,
            "measure": f"top-{k}",
            "tool": tool,
            "setting": bm._setting(tool, "eigen"),
            **stats,
            "num_hvps": out["num_hvps"],
            "eigenvalues": out["eigenvalues"],
            "value_text": f"{out['eigenvalues'][0]:.5g}",
        }
        if "relative_bounds" in out:
            row["relative_bound"] = max(out["relative_bounds"])
            row["converged"] = out["converged"]
        if rows:
            row["diff_vs_flatlens"] = bm.relative_difference(
                row["eigenvalues"], rows[0]["eigenvalues"]
            )
        rows.append(row)
    bm._add_speedups(rows)
    ours = rows[0]
    lines = [
        f"flatlens top-{k} on {case.info['images']} images: {ours['time_s']:.2f}s, "
        f"{ours['num_hvps']} HVPs, converged {ours.get('converged')} (target < 10 s) "
        + ("ok" if ours["time_s"] < 10 else "MISS")
    ]
    for r in rows[1:]:
        speedup = ours["speedup_" + r["tool"]]
        lines.append(
            f"{r['tool']}: {r['time_s']:.2f}s, {r['num_hvps']} HVPs, flatlens {speedup:.2f}x "
            f"faster, max rel. diff of eigenvalues vs flatlens {r['diff_vs_flatlens']:.1e}"
        )
    lines += [f"{tool} skipped: {why}" for tool, why in skipped.items()]
    return CheckOutput(
        payload={
            "case": {"name": case.name, **case.info},
            "k": k,
            "rows": rows,
            "skipped": skipped,
        },
        tables={
            f"ResNet-18 top-{k} on {device}": (bm._with_mib(rows), bm.EIGEN_COLUMNS),
        },
        lines=lines,
    )


@check
def check_transformers_top1(device: torch.device, *, quick: bool = False) -> CheckOutput:
    """ViT and GPT-2 top-1 eigenvalue, flatlens tol=1e-3, fused attention as the models set it."""
    import bench_models as bm

    rows: list[dict[str, Any]] = []
    cases = []
    for case in _model_cases(device, quick, ("vit", "gpt2")):
        cases.append({"name": case.name, **case.info})
        bm.warm_up(case)
        res, stats = bm.measured(lambda case=case: bm.flatlens_eigen(case, 1), device)
        rows.append(
            {
                "case": case.name,
                "measure": "top-1",
                "setting": bm._setting("flatlens", "eigen"),
                **stats,
                "num_hvps": res["num_hvps"],
                "value_text": f"{res['eigenvalues'][0]:.5g}",
                "eigenvalues": res["eigenvalues"],
                "relative_bound": res["relative_bounds"][0],
                "converged": res["converged"],
            }
        )
        del case
    columns = [c for c in bm.FLATLENS_COLUMNS if c.key not in ("num_gradients", "num_losses")]
    return CheckOutput(
        payload={"cases": cases, "rows": rows},
        tables={f"ViT and GPT-2 top-1 on {device}": (bm._with_mib(rows), columns)},
        lines=[
            f"{r['case']} top-1 {r['value_text']}: {r['time_s']:.2f}s, {r['num_hvps']} HVPs, "
            f"bound {r['relative_bound']:.1e}, converged {r['converged']}"
            for r in rows
        ],
    )


@check
def check_gam_recipe_epoch(device: torch.device, *, quick: bool = False) -> CheckOutput:
    """One epoch of the GAM recipe (ResNet-18, batch 128, crop-flip, 4 workers) on synthetic
    CIFAR-shaped data: images/s with augmentation in the workers and on the device, and bf16."""
    import numpy as np

    from flatlens._readers import _Images
    from flatlens._streams import Streams
    from flatlens.train import TrainConfig, train

    n = 512 if quick else 50_000
    small = {"model_kwargs": {"width": 8}} if quick else {}  # a smoke run fits a CPU
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    mean, std = (0.49139968, 0.48215827, 0.44653124), (0.2023, 0.1994, 0.2010)
    data = Streams(
        _Images(pixels, labels, mean, std),
        _Images(pixels[:1000], labels[:1000], mean, std),
        num_classes=10,
        name="synthetic-cifar10",
        mean=mean,
        std=std,
    )
    rows = []
    for label, extra in (
        ("recipe (workers, torchvision v2)", {}),
        ("augment on the device", {"augment_on": "device"}),
        ("recipe + bf16", {"amp": "bf16"}),
    ):
        config = TrainConfig.from_recipe(
            "gam-cifar10-resnet18", epochs=1, device=str(device), log_every=0, **small, **extra
        )
        result = train(config, data)
        costs = result.costs
        rows.append(
            {
                "case": label,
                "images_per_s": costs["images_per_second"],
                "train_s": costs["train_seconds"],
                "test_acc": result.final["test_acc"],
            }
        )
    columns = [
        Column("case", "case"),
        Column("images_per_s", "images/s", ".0f"),
        Column("train_s", "epoch s", ".1f"),
    ]
    return CheckOutput(
        payload={"rows": rows, "images": n},
        tables={f"GAM recipe, one epoch of {n} images on {device}": (rows, columns)},
        lines=[f"{r['case']}: {r['images_per_s']:.0f} images/s" for r in rows],
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
