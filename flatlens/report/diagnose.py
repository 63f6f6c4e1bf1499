"""Diagnose a trained network: performance, Hessian spectrum, sharpness, flatness, landscapes.

:func:`diagnose` runs every measure on one model and data set, stores each part as JSON
(resumable), draws the figures and writes ``report.json`` and a self-contained
``report.html``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from flatlens.data import Dataset, batches
from flatlens.io import write_json
from flatlens.objective import Objective
from flatlens.report.figures import plot_density, plot_eigenvalues
from flatlens.report.html import Section, write_report
from flatlens.report.pipeline import PartStore, fingerprint, model_digest
from flatlens.spectrum import hessian_density, hessian_eigenvalues, hessian_trace

__all__ = ["DiagnoseConfig", "diagnose", "measure_objective", "summary_row"]


@dataclass
class DiagnoseConfig:
    """Settings of :func:`diagnose` (the defaults suit small models on a laptop CPU).

    Attributes:
        rhos: Radii for sharpness, flatness and the bound check.
        k: Number of top Hessian eigenvalues.
        measure_samples: Training examples used for curvature measures (``None``: all).
        batch_size: Batch size of the data passes.
        trace_samples: HVPs for the Hutch++ trace.
        density_runs, density_steps: Stochastic Lanczos quadrature settings.
        ascent_steps: Projected-ascent steps for R0 and R1.
        landscape_1d, landscape_2d: Grid sizes of the loss slices (0 skips them).
        seed: Seed of every random choice.
    """

    rhos: tuple[float, ...] = (0.01, 0.02, 0.05)
    k: int = 5
    measure_samples: int | None = 512
    batch_size: int = 512
    trace_samples: int = 30
    density_runs: int = 2
    density_steps: int = 40
    ascent_steps: int = 10
    landscape_1d: int = 41
    landscape_2d: int = 21
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def measure_objective(
    model: nn.Module, data: Dataset, config: DiagnoseConfig, loss_fn: nn.Module | None = None
) -> Objective:
    """The objective the curvature measures use: a fixed subset of the training data."""
    x, y = data.train()
    if config.measure_samples is not None:
        x, y = x[: config.measure_samples], y[: config.measure_samples]
    parts = batches(x, y, config.batch_size)
    return Objective(
        model, loss_fn or nn.CrossEntropyLoss(), parts[0] if len(parts) == 1 else parts
    )


def _performance(model: nn.Module, data: Dataset, config: DiagnoseConfig, loss_fn) -> dict:
    out = {}
    for split, (x, y) in (("train", data.train()), ("test", data.test())):
        obj = Objective(model, loss_fn, batches(x, y, config.batch_size))
        for key, value in obj.evaluate().items():
            out[f"{split}_{key}"] = value
    out["gap_loss"] = out["test_loss"] - out["train_loss"]
    if "train_accuracy" in out:
        out["gap_accuracy"] = out["train_accuracy"] - out["test_accuracy"]
    return out


def _sharpness_parts(objective: Objective, config: DiagnoseConfig) -> dict:
    from flatlens.bounds import check_bound
    from flatlens.sharpness import zeroth_order_sharpness

    rho = config.rhos[len(config.rhos) // 2]
    adaptive = zeroth_order_sharpness(
        objective, rho, adaptive=True, steps=config.ascent_steps, seed=config.seed
    )
    bound = check_bound(objective, list(config.rhos), steps=config.ascent_steps, seed=config.seed)
    return {"rho": rho, "adaptive_r0": adaptive.to_dict(), "bound": bound.to_dict()}


def _landscapes(
    objective: Objective, config: DiagnoseConfig, out: Path, *, resume: bool, progress: bool
) -> dict[str, Any]:
    """A 1-D slice and a 2-D plane along filter-normalized random directions (stored as npz)."""
    from flatlens import landscape as fl

    d1 = fl.random_direction(objective, seed=config.seed)
    d2 = fl.random_direction(objective, seed=config.seed + 1)
    info: dict[str, Any] = {"cosine_d1_d2": fl.cosine(d1, d2)}
    for name, steps in (
        ("landscape_1d", config.landscape_1d),
        ("landscape_2d", config.landscape_2d),
    ):
        if not steps:
            continue
        path = out / f"{name}.npz"
        if not resume:
            for stale in out.glob(f"{name}.*"):
                stale.unlink()
        if name == "landscape_1d":
            result = fl.line(objective, d1, steps=steps, store=path, progress=progress)
        else:
            result = fl.plane(
                objective, d1, d2, steps=(steps, steps), store=path, progress=progress
            )
        values = result.values["loss"]
        info[name] = {
            "path": path.name,
            "steps": steps,
            "loss_min": float(values.min()),
            "loss_max": float(values.max()),
        }
    return info


def summary_row(report: dict) -> dict[str, Any]:
    """The headline numbers of a diagnosis, as one flat row."""
    perf = report["performance"]
    row = {
        "train acc": perf.get("train_accuracy"),
        "test acc": perf.get("test_accuracy"),
        "gap (loss)": perf["gap_loss"],
        "λ_max": report["spectrum"]["eigenvalues"][0],
        "trace": report["trace"]["value"],
    }
    sharp = report.get("sharpness")
    if sharp:
        rows = sharp["bound"]["rows"]
        mid = rows[len(rows) // 2]
        row.update({"ρ": mid["rho"], "R0": mid["r0"], "R1": mid["r1"]})
        row["adaptive R0"] = sharp["adaptive_r0"]["value"]
    return row


def diagnose(
    model: nn.Module,
    data: Dataset,
    out_dir: str | Path,
    *,
    config: DiagnoseConfig | None = None,
    loss_fn: nn.Module | None = None,
    resume: bool = False,
    progress: bool = False,
    title: str = "flatlens diagnosis",
) -> dict[str, Any]:
    """Measure everything about ``model`` on ``data`` and write a report to ``out_dir``.

    Writes ``parts/*.json`` (one per measure, reused by ``resume=True`` when the weights and
    settings match), PNG figures, ``report.json`` and ``report.html``. The model is left
    unchanged.

    Returns:
        The report as a JSON-ready dictionary.
    """
    config = config or DiagnoseConfig()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = fingerprint(asdict(config), model_digest(model), data.name, len(data.y_train))
    store = PartStore(out / "parts", key, resume=resume)
    objective = measure_objective(model, data, config, loss_fn)
    seed = config.seed
    report: dict[str, Any] = {"settings": asdict(config), "data": data.name}
    report["performance"] = store.run(
        "performance", lambda: _performance(model, data, config, loss_fn)
    )
    report["spectrum"] = store.run(
        "spectrum",
        lambda: hessian_eigenvalues(objective, config.k, seed=seed, progress=progress),
    )
    report["trace"] = store.run(
        "trace",
        lambda: hessian_trace(
            objective, num_samples=config.trace_samples, seed=seed, progress=progress
        ),
    )
    report["density"] = store.run(
        "density",
        lambda: hessian_density(
            objective,
            num_runs=config.density_runs,
            lanczos_steps=config.density_steps,
            seed=seed,
            progress=progress,
        ),
    )
    report["sharpness"] = store.run("sharpness", lambda: _sharpness_parts(objective, config))
    report["landscape"] = _landscapes(objective, config, out, resume=resume, progress=progress)
    report["reused_parts"] = list(store.reused)
    report["summary"] = summary_row(report)

    sections = _figures(report, out)
    write_json(out / "report.json", report)
    write_report(out / "report.html", title, sections, subtitle=f"data: {data.name}")
    return report


def _figures(report: dict, out: Path) -> list[Section]:
    """Draw the figures and return the report's sections."""
    from types import SimpleNamespace

    figs = out / "figures"
    density = SimpleNamespace(**report["density"])
    plot_density(density, figs / "density.png")
    plot_eigenvalues({"λ": report["spectrum"]["eigenvalues"]}, figs / "spectrum.png")
    sections = [
        Section("Summary", table=[report["summary"]]),
        Section(
            "Performance",
            table=[{k: v for k, v in report["performance"].items()}],
        ),
        Section(
            "Hessian spectrum",
            text=(
                f"Top-{len(report['spectrum']['eigenvalues'])} eigenvalues by Lanczos "
                f"({report['spectrum']['num_hvps']} HVPs); trace by Hutch++ "
                f"{report['trace']['value']:.4g} ± {report['trace']['stderr']:.2g}."
            ),
            table=[
                {"i": i + 1, "λ_i": lam, "residual": res}
                for i, (lam, res) in enumerate(
                    zip(
                        report["spectrum"]["eigenvalues"],
                        report["spectrum"]["residuals"],
                        strict=True,
                    )
                )
            ],
            images=[
                ("Top eigenvalues", figs / "spectrum.png"),
                ("Spectral density", figs / "density.png"),
            ],
        ),
    ]
    sharp = report.get("sharpness")
    if sharp:
        from flatlens.bounds import plot_bound_rows

        plot_bound_rows(sharp["bound"]["rows"], figs / "bound.png")
        sections.append(
            Section(
                "Sharpness, flatness and the bound",
                text=(
                    "R0 = max L(θ+δ) − L(θ) and R1 = ρ·max ‖∇L(θ+δ)‖ over the ρ-ball; the "
                    "bound says R0 ≤ R1 and R1/ρ² → λ_max at a minimum."
                ),
                table=[
                    {
                        "ρ": r["rho"],
                        "R0": r["r0"],
                        "R1": r["r1"],
                        "ρ²λ_max": r["rho2_lambda"],
                        "R1/(ρ²λ_max)": r["r1_ratio"],
                        "R0 ≤ R1": r["holds"],
                    }
                    for r in sharp["bound"]["rows"]
                ],
                images=[("R0/ρ², R1/ρ² and λ_max against ρ", figs / "bound.png")],
            )
        )
    land = report.get("landscape", {})
    if land.get("landscape_1d") or land.get("landscape_2d"):
        from flatlens import landscape as fl

        section = Section(
            "Loss landscape",
            text=(
                "Slices along filter-normalized Gaussian directions d1, d2 (Li et al., 2018); "
                f"cosine(d1, d2) = {land['cosine_d1_d2']:.3f}."
            ),
        )
        if land.get("landscape_1d"):
            line = fl.load(out / land["landscape_1d"]["path"])
            fl.plot_line(line, figs / "landscape_1d.png")
            section.images.append(("1-D slice θ + a·d1", figs / "landscape_1d.png"))
        if land.get("landscape_2d"):
            plane = fl.load(out / land["landscape_2d"]["path"])
            fl.plot_contour(plane, figs / "landscape_2d.png", filled=True)
            section.images.append(("2-D plane θ + a·d1 + b·d2", figs / "landscape_2d.png"))
            section.plotly.append(fl.plot_surface(plane, title="loss surface"))
        sections.append(section)
    return sections
