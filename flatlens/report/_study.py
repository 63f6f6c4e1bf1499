"""Report sections of an optimizer study (:func:`flatlens.train._compare`).

The flatness-versus-gap figure and Kendall's τ between each flatness measure and each
generalization gap over all runs, τ = (concordant − discordant pairs) / pairs (τ-b).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flatlens.core._io import write_figure
from flatlens.report._html import Section

__all__ = ["kendall_rows", "mean_rows", "study_sections"]

_RUN_COLUMNS = (
    "optimizer",
    "seed",
    "train_loss",
    "test_acc",
    "gap_loss",
    "gap_acc",
    "lambda_max",
    "trace",
    "r0",
    "r1",
    "seconds",
    "measure_seconds",
    "overhead",
)


def kendall_rows(kendall: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per measure: τ and its p-value against each gap."""
    rows = []
    for measure, gaps in kendall.items():
        row: dict[str, Any] = {"measure": measure}
        for gap, stats in gaps.items():
            row[f"τ vs {gap}"] = stats.get("tau")
            row[f"p vs {gap}"] = stats.get("p_value")
        row["runs"] = max((s.get("n") or 0 for s in gaps.values()), default=0)
        rows.append(row)
    return rows


def _mean_std(mean: float, std: float | None) -> str:
    return f"{mean:.3g}" if std is None else f"{mean:.3g} ± {std:.2g}"


def mean_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per optimizer: ``mean ± standard deviation`` over seeds of each value."""
    keep = ("test_acc", "gap_loss", "gap_acc", "lambda_max", "trace", "r0", "r1")
    rows = []
    for entry in summary:
        row: dict[str, Any] = {"optimizer": entry["optimizer"], "runs": entry.get("runs")}
        for key in keep:
            if entry.get(f"{key}_mean") is not None:
                row[key] = _mean_std(entry[f"{key}_mean"], entry.get(f"{key}_std"))
        rows.append(row)
    return rows


def study_sections(study: Any, out: str | os.PathLike) -> list[Section]:
    """Draw ``out/flatness_vs_gap.png`` (atomically) and return the study's sections:
    per-optimizer means ± standard deviations over seeds, Kendall's τ with the figure, and
    every run."""
    figure = Path(out) / "flatness_vs_gap.png"
    write_figure(study.plot(), figure)
    seeds = study.settings.get("seeds", [])
    return [
        Section(
            f"Mean over seeds {seeds}",
            text="mean ± standard deviation over seeds.",
            table=mean_rows(study.summary),
        ),
        Section(
            "Flatness against the generalization gap",
            text=(
                "Kendall's τ between each measure and each gap (gap_loss = test − train loss, "
                "gap_acc = train − test accuracy) over all runs; τ > 0 means flatter networks "
                "(smaller measure) generalize better. p-values are two-sided; – means too few "
                "runs (fewer than 3) or a constant column."
            ),
            table=kendall_rows(study.kendall),
            images=[("each measure against gap_loss, one colour per optimizer", figure)],
        ),
        Section(
            "Runs",
            text=(
                "seconds: the run's wall time; measure_seconds: its flatness measures; "
                "overhead: measure seconds over training seconds."
            ),
            table=[{k: r.get(k) for k in _RUN_COLUMNS if k in r} for r in study.runs],
        ),
    ]
