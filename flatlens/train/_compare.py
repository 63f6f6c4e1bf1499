"""Optimizers x seeds on one task: does flatness track the generalization gap?

:func:`compare` trains every (optimizer, seed) pair, measures lambda_max, tr(H), R0 and R1
of each final network on the same fixed training subset, and reports Kendall's tau between
each measure and the generalization gap across all runs: tau = (concordant - discordant
pairs) / (number of pairs), with ties handled as in ``scipy.stats.kendalltau`` (tau-b).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flatlens.core._checks import check_positive_int
from flatlens.core._io import write_figure
from flatlens.core._renames import renamed
from flatlens.core._results import Result
from flatlens.core._text import literal
from flatlens.data import Dataset
from flatlens.train._config import TrainConfig, current_names, train
from flatlens.train._measures import MEASURES, check_measures
from flatlens.train._trainer import TrainResult

__all__ = ["GAPS", "StudyResult", "compare", "kendall_tau"]

GAPS = ("gap_loss", "gap_acc")
_RUN_KEYS = (
    "train_loss",
    "test_loss",
    "train_acc",
    "test_acc",
    "gap_loss",
    "gap_acc",
    *MEASURES,
)


def kendall_tau(x: Sequence[float | None], y: Sequence[float | None]) -> dict[str, float | None]:
    """Kendall's tau-b and its two-sided p-value over the pairs where both are finite.

    Returns ``{"tau": None, "p_value": None, "n": n}`` when fewer than 3 pairs remain or
    either side is constant.
    """
    from scipy.stats import kendalltau

    pairs = [
        (float(a), float(b))
        for a, b in zip(x, y, strict=True)
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    ]
    out: dict[str, float | None] = {"tau": None, "p_value": None, "n": len(pairs)}
    if len(pairs) < 3:
        return out
    xs, ys = zip(*pairs, strict=True)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return out
    res = kendalltau(xs, ys)
    out["tau"], out["p_value"] = float(res.statistic), float(res.pvalue)
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def _render(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts)

    rule = (
        "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        if markdown
        else "  ".join("-" * w for w in widths)
    )
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


@dataclass
class StudyResult(Result):
    """Runs of a :func:`compare` study.

    Attributes:
        runs: One row per (optimizer, seed): ``optimizer``, ``seed``, train/test loss and
            accuracy, ``gap_loss``, ``gap_acc``, the measures, ``seconds``.
        summary: Per optimizer, mean and standard deviation over seeds of each value
            (``<key>_mean``, ``<key>_std``).
        kendall: ``kendall[measure][gap]`` = ``{"tau", "p_value", "n"}`` across all runs.
        settings: The shared configuration and the seeds.
    """

    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    kendall: dict[str, dict[str, dict[str, float | None]]]
    settings: dict[str, Any]

    def measures(self) -> list[str]:
        """The measures the study computed."""
        return [m for m in MEASURES if any(r.get(m) is not None for r in self.runs)]

    def table(self, *, markdown: bool = False) -> str:
        """Per-run rows, per-optimizer means and Kendall's tau, as aligned text."""
        measures = self.measures()
        headers = [
            "optimizer",
            "seed",
            "train loss",
            "test loss",
            "test acc",
            "gap (loss)",
            "gap (acc)",
            *measures,
        ]
        rows = [
            [
                str(r["optimizer"]),
                str(r["seed"]),
                _fmt(r["train_loss"], ".4f"),
                _fmt(r["test_loss"], ".4f"),
                _fmt(r["test_acc"], ".4f"),
                _fmt(r["gap_loss"], ".4f"),
                _fmt(r["gap_acc"], ".4f"),
                *(_fmt(r.get(m), ".4g") for m in measures),
            ]
            for r in self.runs
        ]
        rows += [
            [
                str(s["optimizer"]),
                "mean",
                _fmt(s.get("train_loss_mean"), ".4f"),
                _fmt(s.get("test_loss_mean"), ".4f"),
                _fmt(s.get("test_acc_mean"), ".4f"),
                _fmt(s.get("gap_loss_mean"), ".4f"),
                _fmt(s.get("gap_acc_mean"), ".4f"),
                *(_fmt(s.get(f"{m}_mean"), ".4g") for m in measures),
            ]
            for s in self.summary
        ]
        tau_headers = ["measure", *(f"tau vs {g}" for g in GAPS), *(f"p vs {g}" for g in GAPS)]
        tau_rows = [
            [
                m,
                *(_fmt(self.kendall[m][g]["tau"], "+.3f") for g in GAPS),
                *(_fmt(self.kendall[m][g]["p_value"], ".3f") for g in GAPS),
            ]
            for m in measures
        ]
        return (
            _render(headers, rows, markdown)
            + "\n\nKendall's tau across all runs\n\n"
            + _render(tau_headers, tau_rows, markdown)
        )

    def plot(self, path: str | Path | None = None, *, gap: str = "gap_loss"):
        """Scatter of each measure against ``gap``, one color per optimizer.

        Returns:
            The matplotlib figure (also saved to ``path``, folders created, when given). It
            is not registered with pyplot, so no GUI backend is needed.
        """
        from matplotlib.figure import Figure

        if gap not in GAPS:
            raise ValueError(f"gap must be one of {list(GAPS)}, not {gap!r}")
        measures = self.measures() or ["test_acc"]
        fig = Figure(figsize=(3.6 * len(measures), 3.2))
        axes = fig.subplots(1, len(measures), squeeze=False)[0]
        names = list(dict.fromkeys(r["optimizer"] for r in self.runs))
        for ax, m in zip(axes, measures, strict=True):
            for name in names:
                pts = [
                    (r[m], r[gap])
                    for r in self.runs
                    if r["optimizer"] == name and r.get(m) is not None and r[gap] is not None
                ]
                if pts:
                    ax.scatter(*zip(*pts, strict=True), label=literal(name))
            tau = self.kendall.get(m, {}).get(gap, {}).get("tau")
            ax.set_xlabel(m)
            ax.set_ylabel(gap)
            ax.set_title(f"tau = {tau:+.2f}" if tau is not None else "tau = -")
        axes[0].legend()
        fig.tight_layout()
        if path is not None:
            write_figure(fig, path, dpi=120)
        return fig


def _configs(
    optimizers: Sequence[str] | Mapping[str, TrainConfig | Mapping[str, Any]],
    base: TrainConfig,
) -> dict[str, TrainConfig]:
    if isinstance(optimizers, str):
        raise TypeError("optimizers must be a list of names or a mapping, not one string")
    if isinstance(optimizers, Mapping):
        out = {}
        for label, cfg in optimizers.items():
            if isinstance(cfg, TrainConfig):
                out[str(label)] = cfg
            elif isinstance(cfg, Mapping):
                out[str(label)] = dataclasses.replace(base, **current_names(cfg))
            else:
                raise TypeError(
                    f"optimizers[{label!r}] must be a TrainConfig or a dict of its fields"
                )
        return out
    return {name: dataclasses.replace(base, optimizer=name) for name in optimizers}


@renamed(base="config")
def compare(
    data: Dataset,
    optimizers: Sequence[str] | Mapping[str, TrainConfig | Mapping[str, Any]] = (
        "sgd",
        "sam",
        "gam",
    ),
    *,
    seeds: Sequence[int] = (0, 1, 2),
    config: TrainConfig | None = None,
    measures: Sequence[str] = MEASURES,
    progress: bool = False,
    on_run: Callable[[str, int, TrainResult], None] | None = None,
) -> StudyResult:
    """Train each optimizer with each seed and relate flatness to the generalization gap.

    Runs with the same seed start from the same initial weights and see the same batches.
    The measures are taken once, after the last epoch, on the same fixed training subset
    for every run.

    Args:
        data: The task.
        optimizers: Optimizer names (``TrainConfig.optimizer`` values) applied to
            ``config``, or ``{label: TrainConfig or dict of TrainConfig fields overriding
            config}``.
        seeds: One run per seed and optimizer.
        config: The settings every run shares (model, epochs, lr, measure radius, ...).
            Default ``TrainConfig()``.
        measures: Subset of ``("lambda_max", "trace", "r0", "r1")``.
        progress: A tqdm bar over the runs.
        on_run: Called as ``on_run(label, seed, result)`` after each run, e.g. to keep or
            diagnose the trained model (``result.model``).

    Returns:
        A :class:`StudyResult` with ``table()`` and ``plot()``.
    """
    config = config or TrainConfig()
    configs = _configs(optimizers, config)
    if not configs:
        raise ValueError("optimizers is empty")
    seeds = [check_positive_int("seed", seed, 0) for seed in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers >= 0, got {seeds}")
    measures = check_measures(measures)

    runs: list[dict[str, Any]] = []
    bar = tqdm(total=len(configs) * len(seeds), desc="runs", disable=not progress)
    for label, cfg in configs.items():
        for seed in seeds:
            run_cfg = dataclasses.replace(
                cfg,
                seed=seed,
                measure_every=cfg.epochs if measures else 0,
                measures=tuple(measures),
                checkpoint_dir=None,
            )
            result = train(run_cfg, data, progress=False)
            if on_run is not None:
                on_run(label, seed, result)
            final = result.final
            row = {"optimizer": label, "seed": seed}
            row.update({k: final.get(k) for k in _RUN_KEYS})
            row["seconds"] = sum(r["seconds"] for r in result.history)
            row["measure_seconds"] = result.costs.get("measure_seconds")
            row["overhead"] = result.costs.get("overhead")
            runs.append(row)
            bar.update(1)
    bar.close()

    summary = []
    for label in configs:
        mine = [r for r in runs if r["optimizer"] == label]
        entry: dict[str, Any] = {"optimizer": label, "runs": len(mine)}
        for key in _RUN_KEYS:
            values = [r[key] for r in mine if r[key] is not None]
            entry[f"{key}_mean"] = statistics.fmean(values) if values else None
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(entry)

    kendall = {
        m: {g: kendall_tau([r[m] for r in runs], [r[g] for r in runs]) for g in GAPS}
        for m in measures
    }
    settings = {
        "config": config.to_dict(),
        "optimizers": {k: v.to_dict() for k, v in configs.items()},
        "seeds": seeds,
        "measures": list(measures),
        "data": data.name,
    }
    return StudyResult(runs=runs, summary=summary, kendall=kendall, settings=settings)
