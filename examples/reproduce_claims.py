"""The GAM paper's claims, checked at small scale on digits and a synthetic task.

Zhang et al. (CVPR 2023) claim that GAM (1) finds minima with a smaller top Hessian
eigenvalue lambda_max and a smaller first-order flatness R1 than SGD, (2) generalizes better,
and (3) that R1 tracks generalization better than zeroth-order sharpness R0 does. This script
measures all three on tasks a laptop CPU can train in minutes:

* **Claims 1 and 2** (``head_to_head``): the digits MLP trained with SGD, SAM and GAM at
  equal epochs over several seeds, plus SGD with four times the epochs (as many gradient
  evaluations as GAM). Runs with one seed share the initial weights and the batch order, so
  GAM - SGD is also reported per seed (paired).
* **Claim 3** (``ranking``): a grid of runs (optimizer x learning rate x batch size x seed)
  on digits and on a noisy synthetic task; Kendall's tau between each measure (lambda_max,
  tr(H), R0, R1, all at rho = 0.05 on a fixed training subset) and the generalization gap
  (test - train loss; train - test accuracy), pooled over the grid and per seed, with a
  bootstrap interval for tau(R1) - tau(R0) and tau(R1) - tau(lambda_max).

Run ``python examples/reproduce_claims.py`` (about 7 minutes of one CPU core) or with
``--fast`` (a smoke run of a few seconds, numbers meaningless). Writes
``<out>/reproduce_claims.json``, ``<out>/reproduce_claims.md`` (the tables of
docs/reproduction.md) and one scatter plot per grid.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flatlens.core import to_jsonable
from flatlens.data import Dataset, load_digits, synthetic_classification
from flatlens.train import TrainConfig, compare

MEASURES = ("lambda_max", "trace", "r0", "r1")
GAPS = ("gap_loss", "gap_acc")  # the gaps of compare()'s runs: test - train loss, train - test acc
LABELS = {"lambda_max": "λ_max", "trace": "tr(H)", "r0": "R0", "r1": "R1"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke run (also FLATLENS_FAST=1)")
    parser.add_argument("--out", default="results/reproduce_claims", help="output folder")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the head-to-head")
    args = parser.parse_args(argv)
    args.fast = args.fast or os.environ.get("FLATLENS_FAST") == "1"
    return args


# ---------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN when undefined)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan


def kendall_tau(x: Sequence[float | None], y: Sequence[float | None]) -> dict[str, Any]:
    """Kendall's tau-b and its two-sided p-value over the pairs where both values are finite,
    as ``compare()`` reports them in ``StudyResult.kendall``: ``{"tau", "p_value", "n"}``,
    tau and p None with fewer than 3 pairs or a constant side."""
    from scipy.stats import kendalltau

    pairs = [
        (float(a), float(b))
        for a, b in zip(x, y, strict=True)
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    ]
    out: dict[str, Any] = {"tau": None, "p_value": None, "n": len(pairs)}
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return out
    res = kendalltau(*zip(*pairs, strict=True))
    out["tau"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out


def fmt(mean: float, std: float, spec: str = ".4g") -> str:
    """``mean ± std`` (``-`` for NaN)."""
    if not math.isfinite(mean):
        return "-"
    plain = spec.lstrip("+")
    return f"{mean:{spec}} ± {std:{plain}}" if math.isfinite(std) else f"{mean:{spec}}"


def bootstrap_tau_difference(
    runs: list[dict[str, Any]], a: str, b: str, gap: str, *, resamples: int, seed: int = 0
) -> dict[str, float]:
    """tau(a, gap) - tau(b, gap) over the runs, and its 2.5 / 97.5 % bootstrap percentiles
    (runs resampled with replacement; resamples where a tau is undefined are skipped)."""
    rng = np.random.default_rng(seed)
    point = _tau(runs, a, gap) - _tau(runs, b, gap)
    diffs = []
    for _ in range(resamples):
        pick = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        d = _tau(pick, a, gap) - _tau(pick, b, gap)
        if math.isfinite(d):
            diffs.append(d)
    if not diffs:
        return {"difference": point, "low": math.nan, "high": math.nan}
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": point, "low": float(low), "high": float(high)}


def granulated_tau(
    runs: list[dict[str, Any]], axes: Sequence[str], measure: str, gap: str
) -> dict[str, float]:
    """Jiang et al.'s (ICLR 2020) granulated Kendall's tau: for each axis, the mean over all
    groups of runs that differ in that axis only (every other axis, the seed included, held
    fixed) of tau(measure, gap) within the group."""
    from scipy.stats import kendalltau

    out = {}
    for axis in axes:
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in runs:
            key = tuple(r[a] for a in (*axes, "seed") if a != axis)
            groups.setdefault(key, []).append(r)
        taus = []
        for members in groups.values():
            xs = [m[measure] for m in members]
            ys = [m[gap] for m in members]
            if len(members) >= 2 and len(set(xs)) > 1 and len(set(ys)) > 1:
                taus.append(float(kendalltau(xs, ys).statistic))
        out[axis] = statistics.fmean(taus) if taus else math.nan
    return out


def _tau(runs: list[dict[str, Any]], measure: str, gap: str) -> float:
    tau = kendall_tau([r[measure] for r in runs], [r[gap] for r in runs])["tau"]
    return math.nan if tau is None else tau


# ---------------------------------------------------------------------- claims 1 and 2
def head_to_head(data: Dataset, seeds: list[int], base: TrainConfig) -> dict[str, Any]:
    """SGD, SAM, GAM and SGD-4x (equal compute) on one task, compared per seed."""
    optimizers = {
        "SGD": {"optimizer": "sgd"},
        "SAM": {"optimizer": "sam", "sam_rho": 0.05},
        "GAM": {"optimizer": "gam"},
        "SGD-4x": {"optimizer": "sgd", "epochs": 4 * base.epochs},
    }
    study = compare(data, optimizers, seeds=seeds, config=base)
    keys = ("train_loss", "test_loss", "test_acc", "gap_loss", "gap_acc", *MEASURES)
    summary = {
        label: {k: mean_std([r[k] for r in study.runs if r["optimizer"] == label]) for k in keys}
        for label in optimizers
    }
    by = {(r["optimizer"], r["seed"]): r for r in study.runs}
    paired: dict[str, dict[str, Any]] = {}
    for other in ("SGD", "SGD-4x", "SAM"):
        rows = {}
        for k in ("test_acc", "gap_loss", "gap_acc", *MEASURES):
            diffs = [by["GAM", s][k] - by[other, s][k] for s in seeds]
            rows[k] = {
                "mean_std": mean_std(diffs),
                "gam_lower": sum(d < 0 for d in diffs),
                "seeds": len(diffs),
            }
        paired[other] = rows
    equal = [r for r in study.runs if r["optimizer"] != "SGD-4x"]
    kendall = {
        name: {
            m: {g: kendall_tau([r[m] for r in rs], [r[g] for r in rs]) for g in GAPS}
            for m in MEASURES
        }
        for name, rs in (("equal_epochs", equal), ("with_control", study.runs))
    }
    return {"study": study, "summary": summary, "paired": paired, "kendall": kendall}


def head_to_head_markdown(result: dict[str, Any]) -> str:
    cols = [
        ("train loss", "train_loss", ".4f"),
        ("test acc", "test_acc", ".4f"),
        ("gap (loss)", "gap_loss", ".4f"),
        ("gap (acc)", "gap_acc", ".4f"),
        ("λ_max", "lambda_max", ".3g"),
        ("tr(H)", "trace", ".3g"),
        ("R0", "r0", ".2g"),
        ("R1", "r1", ".2g"),
    ]
    lines = [
        "| optimizer | " + " | ".join(c[0] for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for label, row in result["summary"].items():
        cells = [fmt(*row[key], spec) for _, key, spec in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "GAM minus the other optimizer, paired by seed (mean ± std over seeds; "
        "in how many seeds GAM's value is lower):",
        "",
        "| GAM − | test acc | gap (loss) | gap (acc) | λ_max | tr(H) | R0 | R1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for other, rows in result["paired"].items():
        cells = []
        for key in ("test_acc", "gap_loss", "gap_acc", *MEASURES):
            entry = rows[key]
            cells.append(
                f"{fmt(*entry['mean_std'], '+.3g')} ({entry['gam_lower']}/{entry['seeds']})"
            )
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    n_equal = sum(r["optimizer"] != "SGD-4x" for r in result["study"].runs)
    lines += [
        "",
        f"Kendall's τ between each measure and the gap: over the {n_equal} runs at equal "
        f"epochs, and over all {len(result['study'].runs)} with the SGD-4x control:",
        "",
        "| measure | gap (loss), equal epochs | p | gap (loss), with control | p "
        "| gap (acc), equal epochs | p | gap (acc), with control | p |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MEASURES:
        cells = []
        for g in GAPS:
            for name in ("equal_epochs", "with_control"):
                tau = result["kendall"][name][m][g]
                cells += [
                    "-" if tau["tau"] is None else f"{tau['tau']:+.2f}",
                    "-" if tau["p_value"] is None else f"{tau['p_value']:.2g}",
                ]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- claim 3
def ranking(
    data: Dataset,
    seeds: list[int],
    base: TrainConfig,
    *,
    optimizers: Sequence[str],
    lrs: Sequence[float],
    batch_sizes: Sequence[int],
    resamples: int,
) -> dict[str, Any]:
    """A grid of runs and Kendall's tau between each measure and the gap."""
    grid: dict[str, dict[str, Any]] = {}
    for opt in optimizers:
        for lr in lrs:
            for bs in batch_sizes:
                cfg: dict[str, Any] = {"optimizer": opt, "lr": lr, "batch_size": bs}
                if opt == "sam":
                    cfg["sam_rho"] = 0.05
                grid[f"{opt} lr={lr:g} bs={bs}"] = cfg
    study = compare(data, grid, seeds=seeds, config=base)
    runs = [
        {**r, "opt": grid[r["optimizer"]]["optimizer"], **grid[r["optimizer"]]} for r in study.runs
    ]
    axes = ("opt", "lr", "batch_size")
    granulated = {m: {g: granulated_tau(runs, axes, m, g) for g in GAPS} for m in MEASURES}
    pooled = {
        m: {g: kendall_tau([r[m] for r in runs], [r[g] for r in runs]) for g in GAPS}
        for m in MEASURES
    }
    per_seed = {
        m: {
            g: mean_std(
                [_tau([r for r in runs if r["seed"] == s], m, g) for s in seeds],
            )
            for g in GAPS
        }
        for m in MEASURES
    }
    r1_wins = {
        other: {
            g: sum(
                _tau([r for r in runs if r["seed"] == s], "r1", g)
                > _tau([r for r in runs if r["seed"] == s], other, g)
                for s in seeds
            )
            for g in GAPS
        }
        for other in ("r0", "lambda_max", "trace")
    }
    boot = {
        other: {
            g: bootstrap_tau_difference(runs, "r1", other, g, resamples=resamples) for g in GAPS
        }
        for other in ("r0", "lambda_max", "trace")
    }
    gaps = {g: mean_std([r[g] for r in runs]) for g in GAPS}
    gap_range = {g: (min(r[g] for r in runs), max(r[g] for r in runs)) for g in GAPS}
    return {
        "study": study,
        "pooled": pooled,
        "per_seed": per_seed,
        "granulated": granulated,
        "r1_wins_per_seed": r1_wins,
        "bootstrap": boot,
        "gaps": gaps,
        "gap_range": gap_range,
        "num_runs": len(runs),
        "seeds": seeds,
    }


def ranking_markdown(result: dict[str, Any]) -> str:
    n_seeds = len(result["seeds"])
    lines = [
        f"{result['num_runs']} runs; gap (loss) from {result['gap_range']['gap_loss'][0]:.3g} "
        f"to {result['gap_range']['gap_loss'][1]:.3g}, gap (acc) from "
        f"{result['gap_range']['gap_acc'][0]:.3g} to {result['gap_range']['gap_acc'][1]:.3g}.",
        "",
        "| measure | τ vs gap (loss), pooled | p | per seed (mean ± std) "
        "| τ vs gap (acc), pooled | p | per seed (mean ± std) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MEASURES:
        cells = []
        for g in GAPS:
            tau = result["pooled"][m][g]
            cells += [
                "-" if tau["tau"] is None else f"{tau['tau']:+.2f}",
                "-" if tau["p_value"] is None else f"{tau['p_value']:.2g}",
                fmt(*result["per_seed"][m][g], "+.2f"),
            ]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Granulated τ (Jiang et al., 2020): mean τ within groups of runs that differ in one "
        "hyperparameter only:",
        "",
        "| measure | optimizer, gap (loss) | lr, gap (loss) | batch, gap (loss) "
        "| optimizer, gap (acc) | lr, gap (acc) | batch, gap (acc) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in MEASURES:
        values = [
            result["granulated"][m][g][axis] for g in GAPS for axis in ("opt", "lr", "batch_size")
        ]
        cells = [f"{v:+.2f}" if math.isfinite(v) else "-" for v in values]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "τ(R1) − τ(other) over the pooled runs, with a 95 % bootstrap interval over runs, "
        f"and in how many of the {n_seeds} seeds R1 ranks better:",
        "",
        "| other | vs gap (loss) | seeds R1 better | vs gap (acc) | seeds R1 better |",
        "|---|---:|---:|---:|---:|",
    ]
    for other in ("r0", "lambda_max", "trace"):
        cells = []
        for g in GAPS:
            b = result["bootstrap"][other][g]
            cells += [
                f"{b['difference']:+.2f} [{b['low']:+.2f}, {b['high']:+.2f}]",
                f"{result['r1_wins_per_seed'][other][g]}/{n_seeds}",
            ]
        lines.append(f"| {LABELS[other]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    fast = args.fast

    # The measures' settings of docs/benchmarks-optim.md, so the numbers compare.
    measure = {
        "measure_samples": 64 if fast else 256,
        "measure_rho": 0.05,
        "measure_steps": 3 if fast else 20,
        "trace_probes": 9 if fast else 30,
    }
    digits = load_digits(image=True)
    head_seeds = list(range(args.seeds or (2 if fast else 5)))
    base = TrainConfig(model="mlp", lr=0.05, epochs=2 if fast else 20, batch_size=64, **measure)
    print(f"claims 1-2: SGD, SAM, GAM, SGD-4x on digits, seeds {head_seeds}", flush=True)
    h2h = head_to_head(digits, head_seeds, base)

    grid_seeds = [0, 1] if fast else [0, 1, 2]
    grid_kw = {
        "optimizers": ("sgd", "gam") if fast else ("sgd", "sam", "gam"),
        "lrs": (0.1,) if fast else (0.02, 0.1),
        "batch_sizes": (32, 128),
        "resamples": 50 if fast else 2000,
    }
    print("claim 3: grid on digits", flush=True)
    rank_digits = ranking(digits, grid_seeds, base, **grid_kw)
    # Feature noise 3 makes the four Gaussian classes overlap: test accuracy ~0.9 and gaps
    # that vary widely with the learning rate (digits' gaps are all small).
    synthetic = synthetic_classification(
        num_train=200, num_features=20, num_classes=4, num_test=1000, noise=3.0, seed=0
    )
    syn_base = TrainConfig(model="mlp", lr=0.05, epochs=3 if fast else 40, batch_size=32, **measure)
    print("claim 3: grid on the synthetic task", flush=True)
    rank_syn = ranking(synthetic, grid_seeds, syn_base, **grid_kw)

    seconds = time.perf_counter() - start
    rank_digits["study"].plot(out / "ranking_digits.png")
    rank_syn["study"].plot(out / "ranking_synthetic.png")
    text = "\n\n".join(
        [
            f"## Claims 1 and 2: digits MLP, {len(head_seeds)} seeds "
            f"({base.epochs} epochs; SGD-4x {4 * base.epochs})",
            head_to_head_markdown(h2h),
            "## Claim 3: digits grid",
            ranking_markdown(rank_digits),
            "## Claim 3: synthetic grid",
            ranking_markdown(rank_syn),
            f"Total: {seconds:.0f} s.",
        ]
    )
    print(text)
    (out / "reproduce_claims.md").write_text(text + "\n")
    payload = {
        "fast": fast,
        "seconds": seconds,
        "torch": torch.__version__,
        "head_to_head": h2h,
        "ranking_digits": rank_digits,
        "ranking_synthetic": rank_syn,
    }
    (out / "reproduce_claims.json").write_text(json.dumps(to_jsonable(payload), indent=1))
    print(f"written: {out / 'reproduce_claims.json'}, {out / 'reproduce_claims.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
