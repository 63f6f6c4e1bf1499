"""The demo behind ``make demo`` / ``flatlens demo``.

Trains the digits MLP with SGD, SAM and GAM over several seeds, diagnoses the first seed's
network of each optimizer (spectrum, trace, density, R0, R1, the bound check, landscapes)
and writes one comparison report with the flatness-versus-gap study and Kendall's τ.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from flatlens.core._io import write_json
from flatlens.data import load_digits
from flatlens.report._diagnose import DiagnoseConfig, diagnose, summary_row
from flatlens.report._html import Section, write_report
from flatlens.report._study import study_sections
from flatlens.train import TrainConfig, TrainResult, compare

__all__ = ["OPTIMIZERS", "run_demo"]

OPTIMIZERS = ("sgd", "sam", "gam")


def run_demo(
    out: str | Path,
    *,
    quick: bool = False,
    progress: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train, diagnose and compare; returns a summary with a printable ``text``.

    Full run: 3 seeds x 3 optimizers x 20 epochs, then a full diagnosis of each optimizer's
    first-seed network. Quick run: 2 seeds x 3 epochs and :meth:`DiagnoseConfig.quick`
    settings.

    Args:
        out: Output folder: ``report.html``, ``study.json``, ``summary.json``,
            ``flatness_vs_gap.png`` and one diagnosis folder per optimizer.
        quick: Fewer epochs, seeds and measurement steps (a smoke run).
        progress: Show tqdm bars.
        seed: First seed; the study uses ``seed, seed + 1, ...``.
        device: Torch device of the training and the measures.

    Returns:
        ``{"diagnosed": [summary row per optimizer], "study": StudyResult dict,
        "seconds": wall time, "files": written files, "text": printable summary}``.
    """
    start = time.perf_counter()
    out = Path(out)
    data = load_digits(image=True)
    seeds = [seed, seed + 1] if quick else [seed, seed + 1, seed + 2]
    base = TrainConfig(model="mlp", epochs=3 if quick else 20, lr=0.05, seed=seed, device=device)
    if quick:
        base.measure_steps = 5
        base.trace_probes = 9
    config = DiagnoseConfig(seed=seed)
    if quick:
        config = config.quick()

    models: dict[str, nn.Module] = {}

    def keep(label: str, run_seed: int, result: TrainResult) -> None:
        if run_seed == seed:
            models[label] = result.model

    study = compare(data, OPTIMIZERS, seeds=seeds, config=base, progress=progress, on_run=keep)
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
                text="The full report of each network:",
                links=[(f"{n.upper()} report", f"{n}/report.html") for n in OPTIMIZERS],
                table=rows,
            ),
            *study_sections(study, out),
        ],
        subtitle=(
            f"{len(seeds)} seeds × {len(OPTIMIZERS)} optimizers, {base.epochs} epochs each, "
            f"{elapsed:.0f} s"
        ),
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
    files = ["report.html", "study.json", "summary.json", "flatness_vs_gap.png"]
    files += [f"{n}/report.html" for n in OPTIMIZERS]
    return {
        "diagnosed": rows,
        "study": study.to_dict(),
        "seconds": elapsed,
        "files": [str(out / f) for f in files],
        "text": text,
    }
