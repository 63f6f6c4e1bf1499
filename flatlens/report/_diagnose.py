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
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from flatlens import distributed as fd
from flatlens.core._io import write_json
from flatlens.core._objective import Objective
from flatlens.core._results import to_jsonable
from flatlens.data import Dataset, batches, model_inputs
from flatlens.measures._density import hessian_density
from flatlens.measures._spectrum import hessian_eigenvalues, hessian_trace
from flatlens.report._diagnose_config import BLOCK_PART, BLOCK_TOL, PARTS, DiagnoseConfig
from flatlens.report._html import write_report
from flatlens.report._pipeline import (
    PartStore,
    data_digest,
    fingerprint,
    landscape_part,
    loss_key,
    loss_label,
    model_digest,
)
from flatlens.report._sections import diagnose_sections, subtitle

__all__ = [
    "BLOCK_PART",
    "PARTS",
    "DiagnoseConfig",
    "data_digest",
    "diagnose",
    "measure_objective",
    "summary_row",
]


def _objective(
    model: nn.Module,
    loss_fn: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    memory_budget: float | None = None,
    hvp_method: str = "auto",
    input_names: tuple[str, ...] | None = None,
) -> Objective:
    """The risk over ``(x, y)`` in batches of ``batch_size``; under ``torchrun`` over this
    rank's shard, reduced across the ranks (see the module docstring).

    Inputs stacked from keyword columns (``input_names``, tokenized text) reach the model as
    keywords. A loss with a ``batch_weight`` attribute (a token-level loss: the number of
    targets it averages over, :func:`flatlens.core.token_count`) weights each batch by it,
    so L is the mean over every token, not over batches."""
    x, y, distributed = fd.local_split(x, y)
    parts = [(model_inputs(xb, input_names), yb) for xb, yb in batches(x, y, batch_size)]
    data = parts[0] if len(parts) == 1 else parts
    return Objective(
        model,
        loss_fn,
        data,
        distributed=distributed,
        memory_budget=memory_budget,
        hvp_method=hvp_method,
        batch_weight=getattr(loss_fn, "batch_weight", None),
    )


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
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    return _objective(
        model,
        loss_fn,
        x,
        y,
        config.batch_size,
        config.memory_budget,
        config.hvp_method,
        data.input_names,
    )


def _performance(model: nn.Module, data: Dataset, config: DiagnoseConfig, loss_fn) -> dict:
    """Loss and accuracy over the whole train and test sets (sharded under ``torchrun``)."""
    out = {}
    for split, (x, y) in (("train", data.train()), ("test", data.test())):
        obj = _objective(model, loss_fn, x, y, config.batch_size, input_names=data.input_names)
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
    common = {"steps": config.steps, "restarts": config.restarts, "seed": config.seed}
    common.update(config.basis)
    adaptive = zeroth_order_sharpness(objective, rho, adaptive=True, **common)
    bound = check_bound(objective, list(config.rhos), progress=progress, **common)
    return {"rho": rho, "adaptive_r0": adaptive.to_dict(), "bound": bound.to_dict()}


def _block_settings(config: DiagnoseConfig) -> dict[str, Any]:
    """What the ``block_spectra`` part depends on (a mapping's block order included)."""
    blocks = config.blocks
    settings: dict[str, Any] = {
        "measure_samples": config.measure_samples,
        "batch_size": config.batch_size,
        "blocks": list(blocks.items()) if isinstance(blocks, Mapping) else blocks,
        "block_k": config.block_k,
        "block_density": config.block_density,
        "tol": BLOCK_TOL,
        "seed": config.seed,
    }
    if config.block_density:
        settings["density_runs"] = config.density_runs
        settings["lanczos_steps"] = config.lanczos_steps
    return settings


def _block_spectra(objective: Objective, config: DiagnoseConfig, progress: bool) -> Any:
    """Top ``block_k`` eigenvalues (and the density) of each diagonal Hessian block."""
    from flatlens.measures._blocks import block_spectra

    return block_spectra(
        objective,
        config.blocks,
        k=config.block_k,
        density=config.block_density,
        tol=BLOCK_TOL,
        seed=config.seed,
        progress=progress,
        density_kwargs={"num_runs": config.density_runs, "lanczos_steps": config.lanczos_steps},
        **config.basis,
    )


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
                objective,
                d1,
                span=span,
                num_points=config.landscape_1d,
                store=path,
                progress=progress,
            ),
            {**common, "num_points": config.landscape_1d},
            out,
        )
    if config.landscape_2d:
        points = (config.landscape_2d, config.landscape_2d)
        info["landscape_2d"] = landscape_part(
            store,
            "landscape_2d",
            lambda path: fl.plane(
                objective, d1, d2, span=span, num_points=points, store=path, progress=progress
            ),
            {**common, "num_points": config.landscape_2d},
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
    density (SLQ); with ``config.blocks``, the top eigenvalues (and density) of each
    diagonal block H_bb = ∂²L/∂θ_b² (part ``block_spectra``, report key of the same name,
    figure ``figures/block_spectra.png``); the adaptive R0 at the middle radius and, for
    every radius ρ, R0 = max_{‖δ‖≤ρ} L(θ+δ) − L(θ), R1 = ρ·max_{‖δ‖≤ρ} ‖∇L(θ+δ)‖ and
    ρ²λ_max (the bound check); a 1-D slice L(θ + a·d1) and a 2-D plane
    L(θ + a·d1 + b·d2) along filter-normalized random directions.

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
    if config.hvp_method != "auto":  # other products: other parts (default reports resume)
        subset["hvp_method"] = config.hvp_method
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
        lambda: hessian_eigenvalues(
            objective, config.k, seed=seed, progress=progress, **config.basis
        ),
        settings={**subset, "k": config.k, "seed": seed},
    )
    report["trace"] = store.run(
        "trace",
        lambda: hessian_trace(
            objective, num_probes=config.trace_probes, seed=seed, progress=progress
        ),
        settings={**subset, "trace_probes": config.trace_probes, "seed": seed},
    )
    report["density"] = store.run(
        "density",
        lambda: hessian_density(
            objective,
            num_runs=config.density_runs,
            lanczos_steps=config.lanczos_steps,
            seed=seed,
            progress=progress,
            **config.basis,
        ),
        settings={
            **subset,
            "density_runs": config.density_runs,
            "lanczos_steps": config.lanczos_steps,
            "seed": seed,
        },
    )
    if config.blocks is not None:
        report[BLOCK_PART] = store.run(
            BLOCK_PART,
            lambda: _block_spectra(objective, config, progress),
            settings=_block_settings(config),
        )
    else:  # a folder never shows the blocks of an earlier run as this one's
        (out / "figures" / "block_spectra.png").unlink(missing_ok=True)
        if not resume:
            store.path(BLOCK_PART).unlink(missing_ok=True)
    report["sharpness"] = store.run(
        "sharpness",
        lambda: _sharpness_parts(objective, config, progress),
        settings={
            **subset,
            "rhos": config.rhos,
            "steps": config.steps,
            "restarts": config.restarts,
            "seed": seed,
        },
    )
    sharp = report["sharpness"]  # a radius below the dtype's resolution: say so
    for text in sharp["bound"].get("notes", ()):
        if text not in report["notes"]:
            report["notes"].append(text)
    report["landscape"] = _landscapes(objective, config, out, store, progress)
    report["reused_parts"] = list(store.reused)
    report["computed_parts"] = list(store.computed)
    report["summary"] = summary_row(report)
    report["seconds"] = time.perf_counter() - start

    sections = diagnose_sections(report, out)
    write_json(out / "report.json", report)
    write_report(out / "report.html", title, sections, subtitle=subtitle(report))
    return report
