"""The sections and figures of a diagnosis report (:func:`flatlens.report._diagnose.diagnose`).

Every function here reads only the JSON report (``report.json``'s dictionary) and the files
next to it, so a report can be redrawn from what a run stored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from flatlens.report._figures import plot_block_spectra, plot_density, plot_eigenvalues
from flatlens.report._html import Section

__all__ = ["block_rows", "diagnose_sections", "subtitle"]


def subtitle(report: dict) -> str:
    """The line under the report's title: data, model, loss, measured subset and seed."""
    s = report["settings"]
    samples = s["measure_samples"] or "all"
    return (
        f"data: {report['data']} · model: {report['model']['class']} with "
        f"{report['model']['num_params']:,} {report['model']['dtype']} parameters on "
        f"{report['model']['device']} · loss {report.get('loss')} · curvature on {samples} "
        "training examples · "
        f"seed {s['seed']}"
    )


def block_rows(blocks: dict) -> list[dict[str, Any]]:
    """One table row per block of a stored ``block_spectra`` part: ``block``, ``params``,
    ``λ_max`` (top eigenvalue of H_bb), ``bound`` (its certified error bound), ``HVPs``."""
    return [
        {
            "block": b["name"],
            "params": b["num_params"],
            "λ_max": b["eigenvalues"][0],
            "bound": b["error_bounds"][0],
            "HVPs": b["num_hvps"],
        }
        for b in blocks["blocks"]
    ]


def _block_section(blocks: dict, figs: Path) -> Section:
    """The "Per-block spectra" section, its figure drawn into ``figs``."""
    path = figs / "block_spectra.png"
    plot_block_spectra(blocks, path, title=f"Per-block Hessian spectra ({blocks['scheme']})")
    tops = [b["eigenvalues"][0] for b in blocks["blocks"]]
    positive = [t for t in tops if math.isfinite(t) and t > 0]
    spread = (
        f" The largest block λ_max is {max(positive) / min(positive):.3g}× the smallest "
        "positive one."
        if len(positive) > 1
        else ""
    )
    unconverged = [b["name"] for b in blocks["blocks"] if not all(b["converged"])]
    warn = (
        f" Not converged to {blocks['tol']:g} relative: {', '.join(unconverged)}."
        if unconverged
        else ""
    )
    density = " and, right, each block's SLQ density" if blocks.get("density") else ""
    return Section(
        "Per-block spectra",
        text=(
            "λ_max of each diagonal Hessian block H_bb = ∂²L/∂θ_b², the curvature along one "
            f"block's parameters with the others held fixed (blocks: {blocks['scheme']}; "
            f"{len(tops)} blocks, {blocks['num_hvps']} block HVPs), by Lanczos with a "
            "certified error bound. Transformers' blocks (embedding, attention, MLP, norms) "
            "typically differ by orders of magnitude, CNNs' much less (Zhang et al., 2024)."
            + spread
            + warn
        ),
        table=block_rows(blocks),
        images=[(f"Top eigenvalues of each block{density}", path)],
    )


def diagnose_sections(report: dict, out: Path) -> list[Section]:
    """Draw the figures of a diagnosis into ``out/figures`` and return its sections."""
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
    if report.get("block_spectra"):
        sections.append(_block_section(report["block_spectra"], figs))
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
                    + "".join(f" Note: {n}." for n in sharp["bound"].get("notes", ()))
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
        sections.append(_landscape_section(land, out, figs))
    settings = {k: v for k, v in report["settings"].items() if k != "extra"}
    sections.append(
        Section(
            "Settings",
            table=[{"setting": k, "value": _plain(v)} for k, v in settings.items()],
        )
    )
    return sections


def _landscape_section(land: dict, out: Path, figs: Path) -> Section:
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
    return section


def _plain(value: Any) -> Any:
    """A setting as one table cell: sequences joined by commas, mappings as ``k: v``."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return value
