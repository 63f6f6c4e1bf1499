"""The demo behind ``make demo`` / ``flatlens demo``.

Trains the digits MLP with SGD, SAM and GAM over several seeds, diagnoses the seed-0 network
of each optimizer (spectrum, trace, density, R0, R1, the bound check, landscapes) and writes
one comparison report with the flatness-versus-gap study and Kendall's tau.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from flatlens.data import load_digits
from flatlens.io import write_json
from flatlens.report.diagnose import DiagnoseConfig, diagnose, summary_row
from flatlens.report.html import Section, write_report
from flatlens.train import TrainConfig, TrainResult, compare

__all__ = ["run_demo"]

OPTIMIZERS = ("sgd", "sam", "gam")


def run_demo(
    out: Path, *, quick: bool = False, progress: bool = True, seed: int = 0
) -> dict[str, Any]:
    """Train, diagnose and compare; returns a summary with a printable ``text``.

    Args:
        out: Output folder (``report.html``, ``study.json``, one folder per optimizer).
        quick: Fewer epochs, seeds and measurement steps (a smoke run).
        progress: Show tqdm bars.
        seed: First seed; the study uses ``seed, seed + 1, ...``.
    """
    start = time.perf_counter()
    out = Path(out)
    data = load_digits(image=True)
    seeds = [seed, seed + 1] if quick else [seed, seed + 1, seed + 2]
    base = TrainConfig(model="mlp", epochs=3 if quick else 20, lr=0.05, seed=seed)
    if quick:
        base.measure_steps = 5
    config = DiagnoseConfig(seed=seed)
    if quick:
        from flatlens.cli import _quick

        config = _quick(config)

    models: dict[str, nn.Module] = {}

    def keep(label: str, run_seed: int, result: TrainResult) -> None:
        if run_seed == seed:
            models[label] = result.model

    study = compare(data, OPTIMIZERS, seeds=seeds, base=base, progress=progress, on_run=keep)
    study.plot(out / "flatness_vs_gap.png")
    write_json(out / "study.json", study)

    rows = []
    for name in OPTIMIZERS:
        report = diagnose(
            models[name],
            data,
            out / name,
            config=config,
            progress=progress,
            title=f"digits MLP trained with {name.upper()} (seed {seed})",
        )
        rows.append({"optimizer": name, **summary_row(report)})
    elapsed = time.perf_counter() - start
    write_json(out / "summary.json", {"diagnosed": rows, "seconds": elapsed})
    write_report(
        out / "report.html",
        "flatlens demo: SGD vs SAM vs GAM on digits",
        [
            Section(
                f"Diagnosis of the seed-{seed} networks",
                text="Full reports: sgd/report.html, sam/report.html, gam/report.html.",
                table=rows,
            ),
            Section(
                f"Study over seeds {seeds} (mean over seeds)",
                table=study.summary,
            ),
            Section(
                "Flatness against the generalization gap",
                text="Kendall's τ between each measure and each gap, over all runs.",
                table=[
                    {"measure": m, **{g: v["tau"] for g, v in gaps.items()}}
                    for m, gaps in study.kendall.items()
                ],
                images=[("measures vs gap", out / "flatness_vs_gap.png")],
            ),
        ],
        subtitle=f"{len(seeds)} seeds × {len(OPTIMIZERS)} optimizers, {base.epochs} epochs each",
    )
    text = (
        study.table()
        + "\n\n"
        + "\n".join(
            f"{r['optimizer']:>4}: λ_max {r['λ_max']:.4g}  R0 {r['R0']:.4g}  R1 {r['R1']:.4g}  "
            f"test acc {r['test acc']:.4f}"
            for r in rows
        )
        + f"\n\nreport: {out / 'report.html'} ({elapsed:.0f} s)"
    )
    return {"diagnosed": rows, "study": study.to_dict(), "seconds": elapsed, "text": text}
