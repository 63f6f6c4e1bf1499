"""Diagnose a trained network: performance, Hessian spectrum, sharpness, flatness, landscapes.

:func:`diagnose` runs every measure on one model and data set, stores each part as JSON
under ``parts/`` (so ``resume=True`` reuses what an earlier or interrupted run finished),
draws the figures and writes ``report.json`` and a self-contained ``report.html``.

The curvature measures use a fixed subset of the training data, the first
``measure_samples`` examples: L(θ) = (1/N) Σ_i ℓ(f_θ(x_i), y_i) over that subset.

Under ``torchrun`` (an initialized ``torch.distributed`` process group of W > 1 ranks) every
data pass is split by data: each rank takes its contiguous block of the measurement subset
and of the train and test sets (:func:`flatlens.distributed.shard`) and the objectives sum
the size-weighted per-rank parts, so every number equals the one-process one (up to the
order of floating-point sums) while each rank evaluates only 1/W of the data. A split with
fewer than W examples is not sharded: every rank evaluates all of it on its own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from flatlens import distributed as fd
from flatlens.core._checks import check_positive, check_positive_int, check_rho
from flatlens.core._io import write_json
from flatlens.core._objective import Objective
from flatlens.core._results import to_jsonable
from flatlens.data import Dataset, batches
from flatlens.measures._spectrum import hessian_density, hessian_eigenvalues, hessian_trace
from flatlens.report._figures import plot_density, plot_eigenvalues
from flatlens.report._html import Section, write_report
from flatlens.report._pipeline import (
    PartStore,
    data_digest,
    fingerprint,
    landscape_part,
    loss_key,
    loss_label,
    model_digest,
)

__all__ = [
    "PARTS",
    "DiagnoseConfig",
    "data_digest",
    "diagnose",
    "measure_objective",
    "summary_row",
]

PARTS = (
    "performance",
    "spectrum",
    "trace",
    "density",
    "sharpness",
    "landscape_1d",
    "landscape_2d",
)


@dataclass
class DiagnoseConfig:
    """Settings of :func:`diagnose` (the defaults suit small models on a laptop CPU).

    Attributes:
        rhos: Radii for sharpness, flatness and the bound check (kept sorted, without
            repeats); the middle one is the headline radius of the summary.
        k: Number of top Hessian eigenvalues.
        measure_samples: Training examples used for curvature measures (``None``: all).
        batch_size: Batch size of the data passes.
        trace_samples: HVPs for the Hutch++ trace (at least 3).
        density_runs, density_steps: Stochastic Lanczos quadrature settings.
        ascent_steps: Projected-ascent steps for R0 and R1.
        landscape_1d, landscape_2d: Grid points per axis of the loss slices (0 skips one).
        landscape_span: The slices cover ``[-span, span]`` along each direction.
        seed: Seed of every random choice.
        extra: Free-form values stored with the report.
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
    landscape_span: float = 1.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rhos = tuple(self.rhos)
        if not rhos:
            raise ValueError("rhos must hold at least one radius")
        self.rhos = tuple(sorted({check_rho(r, "rhos") for r in rhos}))
        for name, least in (
            ("k", 1),
            ("batch_size", 1),
            ("trace_samples", 3),
            ("density_runs", 1),
            ("density_steps", 2),
            ("ascent_steps", 1),
            ("landscape_1d", 0),
            ("landscape_2d", 0),
            ("seed", 0),
        ):
            check_positive_int(name, getattr(self, name), least)
            if name.startswith("landscape_") and getattr(self, name) == 1:
                raise ValueError(f"{name} must be 0 (skip) or at least 2 grid points")
        if self.measure_samples is not None:
            check_positive_int("measure_samples", self.measure_samples)
        self.landscape_span = check_positive("landscape_span", self.landscape_span)

    def quick(self) -> DiagnoseConfig:
        """Small settings for a fast first look."""
        return replace(
            self,
            k=min(self.k, 3),
            measure_samples=min(self.measure_samples or 256, 256),
            trace_samples=9,
            density_runs=1,
            density_steps=20,
            ascent_steps=4,
            landscape_1d=min(self.landscape_1d, 11),
            landscape_2d=min(self.landscape_2d, 7),
        )


def _objective(
    model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, batch_size: int
) -> Objective:
    """The risk over ``(x, y)`` in batches of ``batch_size``; under ``torchrun`` over this
    rank's shard, reduced across the ranks (see the module docstring)."""
    x, y, distributed = fd.local_split(x, y)
    parts = batches(x, y, batch_size)
    data = parts[0] if len(parts) == 1 else parts
    return Objective(model, loss_fn, data, distributed=distributed)


def measure_objective(
    model: nn.Module, data: Dataset, config: DiagnoseConfig, loss_fn: nn.Module | None = None
) -> Objective:
    """The objective the curvature measures use: the first ``measure_samples`` training
    examples, in batches of ``batch_size``.

    Under ``torchrun`` (a process group of more than one rank) each rank holds its shard of
    those examples and the objective sums over the ranks.
    """
    x, y = data.train()
    if config.measure_samples is not None:
        x, y = x[: config.measure_samples], y[: config.measure_samples]
    return _objective(model, loss_fn or nn.CrossEntropyLoss(), x, y, config.batch_size)


def _performance(model: nn.Module, data: Dataset, config: DiagnoseConfig, loss_fn) -> dict:
    """Loss and accuracy over the whole train and test sets (sharded under ``torchrun``)."""
    out = {}
    for split, (x, y) in (("train", data.train()), ("test", data.test())):
        obj = _objective(model, loss_fn, x, y, config.batch_size)
        for key, value in obj.evaluate().items():
            out[f"{split}_{key}"] = value
    out["gap_loss"] = out["test_loss"] - out["train_loss"]
    if "train_accuracy" in out and "test_accuracy" in out:
        out["gap_accuracy"] = out["train_accuracy"] - out["test_accuracy"]
    return out


def _sharpness_parts(objective: Objective, config: DiagnoseConfig, progress: bool) -> dict:
    from flatlens.measures._bounds import check_bound
    from flatlens.measures._sharpness import zeroth_order_sharpness

    rho = config.rhos[len(config.rhos) // 2]
    adaptive = zeroth_order_sharpness(
        objective, rho, adaptive=True, steps=config.ascent_steps, seed=config.seed
    )
    bound = check_bound(
        objective, list(config.rhos), steps=config.ascent_steps, seed=config.seed, progress=progress
    )
    return {"rho": rho, "adaptive_r0": adaptive.to_dict(), "bound": bound.to_dict()}


def _landscapes(
    objective: Objective, config: DiagnoseConfig, out: Path, store: PartStore, progress: bool
) -> dict[str, Any]:
    """A 1-D slice and a 2-D plane along filter-normalized random directions (stored as npz)."""
    from flatlens import landscape as fl

    d1 = fl.random_direction(objective, seed=config.seed)
    d2 = fl.random_direction(objective, seed=config.seed + 1)
    span = (-config.landscape_span, config.landscape_span)
    common = {
        "measure_samples": config.measure_samples,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "span": list(span),
    }
    info: dict[str, Any] = {"cosine_d1_d2": fl.cosine(d1, d2)}
    if config.landscape_1d:
        info["landscape_1d"] = landscape_part(
            store,
            "landscape_1d",
            lambda path: fl.line(
                objective, d1, span=span, steps=config.landscape_1d, store=path, progress=progress
            ),
            {**common, "steps": config.landscape_1d},
            out,
        )
    if config.landscape_2d:
        steps = (config.landscape_2d, config.landscape_2d)
        info["landscape_2d"] = landscape_part(
            store,
            "landscape_2d",
            lambda path: fl.plane(
                objective, d1, d2, span=span, steps=steps, store=path, progress=progress
            ),
            {**common, "steps": config.landscape_2d},
            out,
        )
    return info


def summary_row(report: dict) -> dict[str, Any]:
    """The headline numbers of a diagnosis, as one flat row.

    Keys: ``train acc``, ``test acc``, ``gap (loss)`` (test − train loss), ``λ_max``,
    ``trace``, and when sharpness was measured ``ρ`` (the middle radius), ``R0``, ``R1``
    (l2 ball of radius ρ) and ``adaptive R0``.
    """
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
    loss_name: str | None = None,
    resume: bool = False,
    progress: bool = False,
    title: str = "flatlens diagnosis",
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Measure everything about ``model`` on ``data`` and write a report to ``out_dir``.

    Parts: train/test loss and accuracy and the gap (test − train loss, train − test
    accuracy); the top-k Hessian eigenvalues (Lanczos), tr(H) (Hutch++) and the spectral
    density (SLQ); the adaptive R0 at the middle radius and, for every radius ρ, R0 =
    max_{‖δ‖≤ρ} L(θ+δ) − L(θ), R1 = ρ·max_{‖δ‖≤ρ} ‖∇L(θ+δ)‖ and ρ²λ_max (the bound check);
    a 1-D slice L(θ + a·d1) and a 2-D plane L(θ + a·d1 + b·d2) along filter-normalized
    random directions.

    Writes ``parts/*.json`` (one per part; with ``resume=True`` a part is reused when the
    weights, the data and the settings it depends on match), ``landscape_*.npz``, PNG
    figures under ``figures/``, ``report.json`` and ``report.html``, each atomically. The
    model is left unchanged.

    ``loss_fn`` (default cross-entropy) is named ``loss_name`` in the report, and parts are
    reused only for the same loss. ``notes`` are sentences shown in the summary and stored
    as ``notes`` (e.g. that the weights were converted to another precision).

    Returns:
        The report as a JSON-ready dictionary; ``reused_parts`` and ``computed_parts`` name
        the parts taken from an earlier run and those computed now.
    """
    config = config or DiagnoseConfig()
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = model_digest(model)
    key = fingerprint(digest, data_digest(data), loss_key(loss_fn))
    store = PartStore(out / "parts", key, resume=resume)
    objective = measure_objective(model, data, config, loss_fn)
    seed = config.seed
    subset = {"measure_samples": config.measure_samples, "batch_size": config.batch_size}
    report: dict[str, Any] = {
        "title": title,
        "data": data.name,
        "model": {
            "class": type(model).__name__,
            "num_params": objective.num_params,
            "dtype": str(objective.dtype).removeprefix("torch."),
            "device": str(objective.device),
            "digest": digest[:16],
        },
        "loss": loss_name or loss_label(loss_fn),
        "notes": list(notes),
        "settings": to_jsonable(asdict(config)),
    }
    report["performance"] = store.run(
        "performance",
        lambda: _performance(model, data, config, loss_fn),
        settings={"batch_size": config.batch_size},
    )
    report["spectrum"] = store.run(
        "spectrum",
        lambda: hessian_eigenvalues(objective, config.k, seed=seed, progress=progress),
        settings={**subset, "k": config.k, "seed": seed},
    )
    report["trace"] = store.run(
        "trace",
        lambda: hessian_trace(
            objective, num_samples=config.trace_samples, seed=seed, progress=progress
        ),
        settings={**subset, "trace_samples": config.trace_samples, "seed": seed},
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
        settings={
            **subset,
            "density_runs": config.density_runs,
            "density_steps": config.density_steps,
            "seed": seed,
        },
    )
    report["sharpness"] = store.run(
        "sharpness",
        lambda: _sharpness_parts(objective, config, progress),
        settings={**subset, "rhos": config.rhos, "steps": config.ascent_steps, "seed": seed},
    )
    report["landscape"] = _landscapes(objective, config, out, store, progress)
    report["reused_parts"] = list(store.reused)
    report["computed_parts"] = list(store.computed)
    report["summary"] = summary_row(report)
    report["seconds"] = time.perf_counter() - start

    sections = _sections(report, out)
    write_json(out / "report.json", report)
    write_report(out / "report.html", title, sections, subtitle=_subtitle(report))
    return report


def _subtitle(report: dict) -> str:
    s = report["settings"]
    samples = s["measure_samples"] or "all"
    return (
        f"data: {report['data']} · model: {report['model']['class']} with "
        f"{report['model']['num_params']:,} {report['model']['dtype']} parameters on "
        f"{report['model']['device']} · loss {report.get('loss')} · curvature on {samples} "
        "training examples · "
        f"seed {s['seed']}"
    )


def _sections(report: dict, out: Path) -> list[Section]:
    """Draw the figures and return the report's sections."""
    from types import SimpleNamespace

    figs = out / "figures"
    plot_density(SimpleNamespace(**report["density"]), figs / "density.png")
    plot_eigenvalues({"λ": report["spectrum"]["eigenvalues"]}, figs / "spectrum.png")
    reused = report.get("reused_parts") or []
    sections = [
        Section(
            "Summary",
            text=(
                "gap = test loss − train loss; λ_max = top Hessian eigenvalue; trace = tr(H); "
                "R0 = zeroth-order sharpness and R1 = first-order flatness in the l2 ball of "
                "radius ρ (the middle radius). Smaller λ_max, R0 and R1 mean a flatter minimum."
                + (f" Reused from an earlier run: {', '.join(reused)}." if reused else "")
                + "".join(f" Note: {n}." for n in report.get("notes", ()))
            ),
            table=[report["summary"]],
        ),
        Section("Performance", table=[dict(report["performance"])]),
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
        from flatlens.measures._bounds import plot_bound_rows

        plot_bound_rows(sharp["bound"]["rows"], figs / "bound.png")
        sections.append(
            Section(
                "Sharpness, flatness and the bound",
                text=(
                    "R0 = max L(θ+δ) − L(θ) and R1 = ρ·max ‖∇L(θ+δ)‖ over the ρ-ball; the "
                    "bound says R0 ≤ R1 and R1/ρ² → λ_max at a minimum. Adaptive R0 at "
                    f"ρ = {sharp['rho']:.4g}: {sharp['adaptive_r0']['value']:.4g}."
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
                f"cosine(d1, d2) = {land['cosine_d1_d2']:.3f}. Drag the surface to rotate it."
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
    settings = {k: v for k, v in report["settings"].items() if k != "extra"}
    sections.append(
        Section(
            "Settings",
            table=[{"setting": k, "value": _plain(v)} for k, v in settings.items()],
        )
    )
    return sections


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return value
