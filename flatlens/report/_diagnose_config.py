"""The settings of a diagnosis (:class:`DiagnoseConfig`) and the parts it computes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from flatlens.core._checks import check_positive, check_positive_int, check_rho, floating_dtype
from flatlens.core._derivatives import HVP_METHODS

__all__ = ["BLOCK_PART", "BLOCK_TOL", "PARTS", "DiagnoseConfig"]


PARTS = (
    "performance",
    "spectrum",
    "trace",
    "density",
    "sharpness",
    "landscape_1d",
    "landscape_2d",
)
"""The parts every diagnosis computes, in order."""

BLOCK_PART = "block_spectra"
"""The optional part of per-block spectra (``DiagnoseConfig.blocks``), computed after
``density``; it is not in :data:`PARTS` because it is off by default."""

BLOCK_TOL = 1e-3
"""Relative accuracy of each block's λ_max (the Lanczos certificate of ``block_spectra``)."""


@dataclass
class DiagnoseConfig:
    """Settings of :func:`diagnose` (the defaults suit small models on a laptop CPU).

    Attributes:
        rhos: Radii for sharpness, flatness and the bound check (kept sorted, without
            repeats); the middle one is the headline radius of the summary.
        k: Number of top Hessian eigenvalues.
        measure_samples: Training examples used for curvature measures (``None``: all).
        batch_size: Batch size of the data passes.
        memory_budget: Bytes the curvature measures' cached graph may take (``None``: half
            the free memory; see :class:`~flatlens.Objective`); over it, HVPs stream batch
            by batch and the peak is one batch's graph.
        trace_probes: HVPs for the Hutch++ trace (at least 3).
        density_runs, lanczos_steps: Stochastic Lanczos quadrature settings.
        steps: Projected-ascent steps for R0 and R1 (per start).
        restarts: Random starts of R0 and R1.
        landscape_1d, landscape_2d: Grid points per axis of the loss slices (0 skips one).
        landscape_span: The slices cover ``[-span, span]`` along each direction.
        blocks: Per-block Hessian spectra (:func:`flatlens.measures.block_spectra`), off
            with ``None``: ``"layers"`` (one block per module that owns parameters; suits
            CNNs and MLPs), ``"groups"`` (embedding, attention, MLP, norm, head, other;
            suits transformers), ``"params"`` (one block per tensor) or a mapping ``{block
            name: parameter name or module prefix, or a list of them}``.
        block_k: Top eigenvalues of each block (the first is the table's λ_max).
        block_density: Also each block's SLQ density (``density_runs`` x
            ``lanczos_steps`` HVPs per block), drawn beside the eigenvalues.
        seed: Seed of every random choice.
        extra: Free-form values stored with the report.
        hvp_method: The Objective's ``hvp_method``.
        basis_device, basis_dtype: Device and dtype (by name: ``"bfloat16"``) of every
            Lanczos basis (spectrum, density, blocks, λ_max, the eigen start of R0/R1).
    """

    rhos: tuple[float, ...] = (0.01, 0.02, 0.05)
    k: int = 5
    measure_samples: int | None = 512
    batch_size: int = 512
    memory_budget: float | None = None
    trace_probes: int = 30
    density_runs: int = 2
    lanczos_steps: int = 40
    steps: int = 10
    restarts: int = 1
    landscape_1d: int = 41
    landscape_2d: int = 21
    landscape_span: float = 1.0
    blocks: str | dict[str, str | list[str]] | None = None
    block_k: int = 1
    block_density: bool = True
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    hvp_method: str = "auto"
    basis_device: str | None = None
    basis_dtype: str | None = None

    def __post_init__(self) -> None:
        rhos = tuple(self.rhos)
        if not rhos:
            raise ValueError("rhos must hold at least one radius")
        self.rhos = tuple(sorted({check_rho(r, "rhos") for r in rhos}))
        for name, least in (
            ("k", 1),
            ("batch_size", 1),
            ("trace_probes", 3),
            ("density_runs", 1),
            ("lanczos_steps", 2),
            ("steps", 1),
            ("restarts", 0),
            ("landscape_1d", 0),
            ("landscape_2d", 0),
            ("block_k", 1),
            ("seed", 0),
        ):
            check_positive_int(name, getattr(self, name), least)
            if name.startswith("landscape_") and getattr(self, name) == 1:
                raise ValueError(f"{name} must be 0 (skip) or at least 2 grid points")
        if self.measure_samples is not None:
            check_positive_int("measure_samples", self.measure_samples)
        if self.memory_budget is not None:
            self.memory_budget = check_positive("memory_budget", self.memory_budget)
        self.landscape_span = check_positive("landscape_span", self.landscape_span)
        self.blocks = _check_blocks(self.blocks)
        if not isinstance(self.block_density, bool):
            raise TypeError(f"block_density must be True or False, not {self.block_density!r}")
        if self.hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method must be one of {HVP_METHODS}, not {self.hvp_method!r}")
        floating_dtype(self.basis_dtype, "basis_dtype")  # checks the name

    @property
    def basis(self) -> dict[str, Any]:
        """``basis_device`` and ``basis_dtype`` as the measures take them."""
        dtype = floating_dtype(self.basis_dtype, "basis_dtype")
        return {"basis_device": self.basis_device, "basis_dtype": dtype}

    def quick(self) -> DiagnoseConfig:
        """Small settings for a fast first look."""
        return replace(
            self,
            k=min(self.k, 3),
            measure_samples=min(self.measure_samples or 256, 256),
            trace_probes=9,
            density_runs=1,
            lanczos_steps=20,
            steps=4,
            landscape_1d=min(self.landscape_1d, 11),
            landscape_2d=min(self.landscape_2d, 7),
        )


def _check_blocks(blocks: Any) -> str | dict[str, str | list[str]] | None:
    """``blocks`` checked: None, a scheme name, or ``{name: parameter names/prefixes}``
    (kept JSON-able, since it is stored with the report and fingerprints the part)."""
    from flatlens.measures._blocks import SCHEMES

    if blocks is None:
        return None
    if isinstance(blocks, str):
        if blocks not in SCHEMES:
            raise ValueError(
                f"blocks must be None, one of {', '.join(SCHEMES)} or a mapping, not {blocks!r}"
            )
        return blocks
    if not isinstance(blocks, Mapping) or not blocks:
        raise TypeError(
            "blocks must be None, 'layers', 'groups', 'params' or a non-empty mapping "
            "{block name: parameter name or module prefix, or a list of them}"
        )
    out: dict[str, str | list[str]] = {}
    for name, spec in blocks.items():
        specs = [spec] if isinstance(spec, str) else spec
        if (
            not isinstance(name, str)
            or not name
            or not isinstance(specs, Sequence)
            or not specs
            or not all(isinstance(v, str) and v for v in specs)
        ):
            raise TypeError(
                f"block {name!r}: a diagnosed block is a non-empty name given parameter names "
                f"or module prefixes (strings), not {spec!r}"
            )
        out[name] = spec if isinstance(spec, str) else list(spec)
    return out
