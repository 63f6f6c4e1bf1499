"""The demo behind ``make demo`` / ``flatlens demo``.

Trains the digits MLP with SGD, SAM and GAM, diagnoses each trained network (spectrum,
trace, density, R0, R1, the bound check, landscapes) and writes one comparison report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from flatlens.data import load_digits
from flatlens.io import write_json
from flatlens.report.diagnose import DiagnoseConfig, diagnose, summary_row
from flatlens.report.html import Section, write_report

__all__ = ["run_demo"]

OPTIMIZERS = ("sgd", "sam", "gam")


def _train(name: str, data, *, epochs: int, seed: int, progress: bool):
    from flatlens.train import TrainConfig, train

    config = TrainConfig(model="mlp", optimizer=name, epochs=epochs, seed=seed, lr=0.1)
    return train(config, data, progress=progress)


def run_demo(
    out: Path, *, quick: bool = False, progress: bool = True, seed: int = 0
) -> dict[str, Any]:
    """Train, diagnose and compare; returns a summary with a printable ``text``."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    data = load_digits(image=True)
    config = DiagnoseConfig(seed=seed)
    if quick:
        from flatlens.cli import _quick

        config = _quick(config)
    rows = []
    for name in OPTIMIZERS:
        model = _train(name, data, epochs=3 if quick else 15, seed=seed, progress=progress)
        report = diagnose(
            model, data, out / name, config=config, progress=progress, title=f"digits MLP, {name}"
        )
        rows.append({"optimizer": name, **summary_row(report)})
    elapsed = time.perf_counter() - start
    write_json(out / "summary.json", {"rows": rows, "seconds": elapsed})
    write_report(
        out / "report.html",
        "flatlens demo: SGD vs SAM vs GAM on digits",
        [Section("Comparison", table=rows)],
    )
    header = " | ".join(rows[0])
    lines = [header] + [
        " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) for r in rows
    ]
    text = "\n".join(lines) + f"\n\nreports in {out}/ ({elapsed:.0f} s)"
    return {"rows": rows, "seconds": elapsed, "text": text}
