"""Per-block Hessian spectra: the top eigenvalues (and density) of each diagonal block.

For blocks theta = (theta_1, ..., theta_B), the diagonal block H_bb = d^2 L / d theta_b^2 is
the Hessian with every other block held fixed. Zhang et al. (2024), "Why Transformers Need
Adam: A Hessian Perspective", find these spectra differ wildly between the embedding,
attention, MLP and normalisation blocks of a transformer ("block heterogeneity"), unlike a
CNN's. Each block is measured through a child :class:`~flatlens.Objective` restricted to its
parameters, so the eigensolvers and certificates of :mod:`flatlens.measures` carry over.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flatlens.core._checks import check_positive_int
from flatlens.core._memory import tracks_peak_memory
from flatlens.core._objective import Objective
from flatlens.core._results import MeasureResult, Result
from flatlens.measures._block_groups import GROUPS, chain, group_of
from flatlens.measures._density import DensityResult, hessian_density
from flatlens.measures._spectrum import EigenResult, hessian_eigenvalues

__all__ = ["BlockSpectraResult", "BlockSpectrum", "block_spectra", "parameter_blocks"]

SCHEMES = ("layers", "groups", "params")
"""The named block schemes (besides a mapping ``{block name: parameter spec}``)."""

ROOT = "<root>"
"""Block name of the parameters owned directly by the model itself (``blocks="layers"``)."""


# ------------------------------------------------------------------------ block resolution
def _spec_names(model: nn.Module, block: str, spec: Any) -> list[str]:
    """Parameter names of ``model`` selected by one block's spec, read as ``params=`` is
    (names, module prefixes, modules, tensors, or a list of them), in model order."""
    named = list(model.named_parameters())
    by_id = {id(p): n for n, p in named}
    entries = [spec] if isinstance(spec, str | nn.Module | Tensor) else spec
    if not isinstance(entries, Iterable):
        entries = [entries]
    chosen: set[str] = set()
    for entry in entries:
        if isinstance(entry, str):
            hits = [n for n, _ in named if n == entry or n.startswith(entry + ".")]
            what = f"no parameter named {entry!r} (or below a module of that name)"
        elif isinstance(entry, nn.Module):
            hits = [by_id.get(id(p)) for p in entry.parameters()]
            what = f"module {type(entry).__name__} has no parameters of this model"
        elif isinstance(entry, Tensor):
            hits, what = [by_id.get(id(entry))], "a tensor is not a parameter of this model"
        else:
            raise TypeError(
                f"block {block!r}: a block is given by parameter names, module prefixes, "
                f"modules or parameter tensors, not {type(entry).__name__}"
            )
        if not hits or None in hits:
            raise ValueError(f"block {block!r}: {what}")
        chosen.update(hits)
    return [n for n, _ in named if n in chosen]


_BLOCKS_HINT = "blocks must be 'layers', 'groups', 'params' or a mapping {block name: parameters}"


def _resolve(
    model: nn.Module, space: Iterable[str], blocks: Any
) -> tuple[str, dict[str, list[str]]]:
    """``(scheme, {block: parameter names})`` restricted to the names in ``space``."""
    space = list(space)
    inside = set(space)
    if isinstance(blocks, str):
        if blocks not in SCHEMES:
            raise ValueError(f"{_BLOCKS_HINT}, not {blocks!r}")
        out: dict[str, list[str]] = {}
        if blocks == "groups":
            out = {g: [] for g in GROUPS}
        for name in space:
            if blocks == "params":
                key = name
            elif blocks == "layers":
                key = name.rpartition(".")[0] or ROOT
            else:
                key = group_of(name, chain(model, name))
            out.setdefault(key, []).append(name)
        return blocks, {b: names for b, names in out.items() if names}
    if not isinstance(blocks, Mapping):
        raise TypeError(f"{_BLOCKS_HINT}, not {type(blocks).__name__}")
    if not blocks:
        raise ValueError("blocks is an empty mapping: define at least one block")
    out = {}
    for block, spec in blocks.items():
        if not isinstance(block, str) or not block:
            raise TypeError(f"block names must be non-empty strings, got {block!r}")
        names = [n for n in _spec_names(model, block, spec) if n in inside]
        if not names:
            raise ValueError(
                f"block {block!r} has no parameters to measure: all it selects are frozen "
                "(requires_grad=False) or outside the objective's params="
            )
        out[block] = names
    return "mapping", out


def parameter_blocks(
    model: nn.Module | Objective, blocks: str | Mapping[str, Any] = "layers"
) -> dict[str, list[str]]:
    """The parameter blocks :func:`block_spectra` would measure, without measuring them.

    Args:
        model: A model (its parameters that require grad are split) or an
            :class:`~flatlens.Objective` (its selected parameters are split).
        blocks: ``"layers"``, ``"groups"``, ``"params"`` or a mapping ``{block name:
            parameter spec}``; see :func:`block_spectra`.

    Returns:
        ``{block name: [parameter names in model order]}``, empty blocks left out.
    """
    if isinstance(model, Objective):
        return _resolve(model.model, model.space.names, blocks)[1]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or an Objective, not {type(model).__name__}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return _resolve(model, names, blocks)[1]


# ------------------------------------------------------------------------ child objectives
@dataclass
class BlockSpectrum(Result):
    """The spectrum of one diagonal block H_bb = d^2 L / d theta_b^2.

    Attributes:
        name: The block's name.
        params: Names of its parameters, in model order.
        num_params: Dimension n_b of the block.
        eigenvalues: Its top min(k, n_b) eigenvalues, descending (float64).
        eigenvectors: ``(k, n_b)`` unit rows over the block's flat parameters (left out of
            ``to_dict``).
        residuals: ``||H_bb u - lambda u||`` for each pair.
        error_bounds: Certified bound on each eigenvalue's error (see
            :class:`~flatlens.measures.EigenResult`).
        converged: Whether each bound is within ``tol`` relative.
        num_hvps: Block Hessian-vector products spent (eigenvalues and density).
        method: ``"lanczos"``, or ``"dense"`` for a block with n_b <= k (H_bb built from
            n_b products and diagonalized).
        start: The Lanczos start vector (``"gradient"`` or ``"random"``; ``"basis"`` for
            ``"dense"``).
        density: The block's SLQ density (``density=True``), else ``None``.
    """

    name: str
    params: list[str]
    num_params: int
    eigenvalues: Tensor
    eigenvectors: Tensor = field(metadata={"json": False})
    residuals: Tensor
    error_bounds: Tensor
    converged: Tensor
    num_hvps: int
    method: str = "lanczos"
    start: str = "gradient"
    density: DensityResult | None = None


@dataclass
class BlockSpectraResult(MeasureResult):
    """Top eigenvalues (and densities) of the diagonal Hessian blocks, one per block.

    Attributes:
        blocks: One :class:`BlockSpectrum` per block, in block order.
        scheme: ``"layers"``, ``"groups"``, ``"params"`` or ``"mapping"``.
        num_params: Dimension of the objective's whole parameter space.
        num_hvps: Block HVPs spent over all blocks.
        loss: L(theta) at the measured point.
        k, tol, max_hvps, seed, density: The settings.
    """

    blocks: list[BlockSpectrum]
    scheme: str
    num_params: int
    num_hvps: int
    loss: float
    k: int
    tol: float
    max_hvps: int | None
    seed: int | None
    density: bool

    @property
    def names(self) -> list[str]:
        """The block names, in order."""
        return [b.name for b in self.blocks]

    def __getitem__(self, name: str) -> BlockSpectrum:
        for block in self.blocks:
            if block.name == name:
                return block
        raise KeyError(f"no block named {name!r}; blocks: {self.names}")

    @property
    def top(self) -> dict[str, float]:
        """``{block: lambda_max(H_bb)}``."""
        return {b.name: float(b.eigenvalues[0]) for b in self.blocks}

    @property
    def converged(self) -> bool:
        """Whether every eigenvalue of every block met ``tol``."""
        return all(bool(b.converged.all()) for b in self.blocks)

    def table(self) -> str:
        """The blocks as an aligned plain-text table: size, top eigenvalues, worst error
        bound, convergence and HVPs."""
        k = max(b.eigenvalues.numel() for b in self.blocks)
        header = ["block", "params", *[f"lambda_{i + 1}" for i in range(k)], "bound", "ok", "HVPs"]
        rows = [
            [b.name, f"{b.num_params:,}", *[f"{float(v):.4g}" for v in b.eigenvalues]]
            + [""] * (k - b.eigenvalues.numel())
            + [f"{float(b.error_bounds.max()):.2g}", "yes" if b.converged.all() else "NO"]
            + [str(b.num_hvps)]
            for b in self.blocks
        ]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        fmt = "  ".join([f"{{:<{widths[0]}}}", *[f"{{:>{w}}}" for w in widths[1:]]])
        lines = [fmt.format(*header), *(fmt.format(*r) for r in rows)]
        lines.append(
            f"{len(self.blocks)} blocks ({self.scheme}), {self.num_params:,} parameters, "
            f"{self.num_hvps} HVPs, L = {self.loss:.6g}"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# ------------------------------------------------------------------------ the measure
def _dense_block(child: Objective, k: int) -> EigenResult:
    """The top min(k, n_b) eigenpairs of a block too small for Lanczos (n_b <= k), from
    H_bb built column by column (n_b products) and diagonalized."""
    n = child.num_params
    eye = torch.eye(n, device=child.device, dtype=child.dtype)
    h = torch.stack([child.hvp(eye[i]) for i in range(n)], dim=1).to(torch.float64)
    vals, vecs = torch.linalg.eigh((h + h.T) / 2)
    order = torch.argsort(vals, descending=True)[:k]
    vals, vecs = vals[order], vecs[:, order]
    res = torch.linalg.vector_norm(h @ vecs - vecs * vals, dim=0).cpu()
    return EigenResult(
        eigenvalues=vals.cpu(),
        eigenvectors=vecs.T.to(child.dtype),
        residuals=res,
        error_bounds=res.clone(),
        converged=torch.ones(vals.numel(), dtype=torch.bool),
        num_hvps=n,
        k=k,
        which="LA",
        method="dense",
        tol=0.0,
        max_hvps=None,
        seed=None,
        start="basis",
    )


@tracks_peak_memory
def block_spectra(
    objective: Objective,
    blocks: str | Mapping[str, Any] = "layers",
    *,
    k: int = 1,
    density: bool = False,
    tol: float = 1e-4,
    seed: int | torch.Generator = 0,
    progress: bool = False,
    density_kwargs: Mapping[str, Any] | None = None,
    max_hvps: int | None = None,
    basis_device: torch.device | str | None = None,
    basis_dtype: torch.dtype | None = None,
) -> BlockSpectraResult:
    """Top-k eigenvalues (and optionally the spectral density) of every diagonal Hessian block.

    With the parameters split into blocks theta = (theta_1, ..., theta_B), block b's Hessian
    is the principal submatrix

        H_bb = d^2 L / d theta_b^2 = [grad^2 L(theta)]_{b, b},

    the curvature along theta_b with every other block held at its value (Zhang et al.,
    2024, "Why Transformers Need Adam: A Hessian Perspective"). For each block a child
    :class:`~flatlens.Objective` over the same model, loss and data, restricted to
    theta_b, gives H_bb v by one HVP; its top-k eigenvalues come from
    :func:`~flatlens.measures.hessian_eigenvalues` (thick-restart Lanczos, certified error
    bounds) and, with ``density=True``, its density
    phi_b(t) = (1/n_b) sum_i delta(t - lambda_i(H_bb)) from
    :func:`~flatlens.measures.hessian_density`. A block with n_b <= k is diagonalized
    densely (n_b products). The model is never written to.

    Blocks:

    * ``"layers"``: one block per module that owns parameters directly (each ``Linear``,
      ``Conv``, ``LayerNorm``, ``Embedding``, ...), named by its module path; parameters of
      the model itself form the block ``"<root>"``.
    * ``"groups"``: transformer-style groups, the first rule that matches wins:
      ``norm`` (LayerNorm/BatchNorm/GroupNorm/InstanceNorm/RMSNorm, any class ending in
      "Norm", modules named ``ln*``, ``bn*``, ``*norm*``); ``embedding`` (``nn.Embedding``);
      ``attention`` (a path component containing ``attn``/``attention``, ``q/k/v/o``,
      ``q_proj``..``o_proj``, ``qkv``, ``query/key/value``, ``wq/wk/wv``; inside an
      ``nn.MultiheadAttention`` or a class named ``*Attention``); ``head`` (``head``,
      ``*_head``, ``lm_head``, ``classifier``, ``pooler``, ``heads``, ``cls``); ``mlp``
      (``mlp``, ``ffn``, ``fc``, ``fc1``.., ``c_fc``, ``intermediate``, ``output.dense``,
      ``up/down/gate_proj``, ``w1..w3``, ``wi``, ``wo``; inside a class named ``*MLP*``,
      ``*FeedForward*``, ``*FFN*``); ``embedding`` again by name (``*embed*``, ``wte``,
      ``wpe``, ``cls_token``, ``pos_embed``, ``patch_embed``...); else ``other``. So GPT-2's
      ``attn.c_proj`` is attention and ``mlp.c_proj`` MLP, BERT's
      ``attention.output.dense`` attention and ``output.dense`` MLP. See
      :func:`parameter_blocks` to preview the grouping.
    * ``"params"``: one block per parameter tensor.
    * a mapping ``{block name: spec}`` with ``spec`` anything ``params=`` of
      :class:`~flatlens.Objective` accepts (names, module prefixes, modules, tensors, or a
      list of them). Blocks may overlap.

    Only the objective's parameters are split (its ``params=``, by default those that
    require grad); others are skipped, and empty blocks are dropped (a mapping block left
    empty is an error).

    Args:
        objective: The empirical risk; its parameter selection, data, reduction, eval mode
            and HVP settings are those of every block.
        blocks: ``"layers"``, ``"groups"``, ``"params"`` or a mapping (see above).
        k: Top eigenvalues per block (a block with n_b <= k gives all n_b).
        density: Also estimate each block's spectral density by SLQ.
        tol: Relative accuracy of each eigenvalue (the Lanczos certificate), > 0.
        seed: Seed or generator of every random start (the same int seed for each block).
        progress: Show a tqdm bar over the blocks.
        density_kwargs: Keyword arguments of :func:`~flatlens.measures.hessian_density`
            (``num_runs``, ``lanczos_steps``, ``num_points``, ``kernel_width``, ``seed``).
        max_hvps: HVP budget of each block's eigenvalue solve (default: that of
            :func:`~flatlens.measures.hessian_eigenvalues`).
        basis_device: Keep each block's Lanczos basis there (eigenvalues and density; as
            for :func:`~flatlens.measures.hessian_eigenvalues`).
        basis_dtype: Store each block's Lanczos basis in this dtype.

    Returns:
        A :class:`BlockSpectraResult`.

    Raises:
        TypeError: ``objective`` is not an Objective, or ``blocks`` has the wrong type.
        ValueError: an unknown scheme, a mapping block that selects no parameter of the
            objective, or a bad ``k``, ``tol`` or ``max_hvps``.
    """
    if not isinstance(objective, Objective):
        raise TypeError(
            f"block_spectra takes an Objective, not {type(objective).__name__}; build one "
            "with flatlens.Objective(model, loss_fn, data)"
        )
    k = check_positive_int("k", k)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if max_hvps is not None:
        max_hvps = check_positive_int("max_hvps", max_hvps)
    density_kwargs = dict(density_kwargs or {})
    if "at" in density_kwargs:
        raise ValueError("density_kwargs may not hold 'at': blocks are measured at the model")
    basis = {"basis_device": basis_device, "basis_dtype": basis_dtype}
    scheme, resolved = _resolve(objective.model, objective.space.names, blocks)
    loss = objective.loss()  # runs the parent's determinism check once, if it is due
    results: list[BlockSpectrum] = []
    for name, names in tqdm(resolved.items(), desc="blocks", disable=not progress, leave=False):
        child = objective.replace(params=names)
        n = child.num_params
        if n <= k:
            eig = _dense_block(child, k)
        else:
            eig = hessian_eigenvalues(child, k, tol=tol, max_hvps=max_hvps, seed=seed, **basis)
        dens = None
        if density:
            dens = hessian_density(child, **{"seed": seed, **basis, **density_kwargs})
        results.append(
            BlockSpectrum(
                name=name,
                params=names,
                num_params=n,
                eigenvalues=eig.eigenvalues,
                eigenvectors=eig.eigenvectors,
                residuals=eig.residuals,
                error_bounds=eig.error_bounds,
                converged=eig.converged,
                num_hvps=child.counts["hvp"],
                method=eig.method,
                start=eig.start,
                density=dens,
            )
        )
        for key, value in child.counts.items():
            objective.counts[key] = objective.counts.get(key, 0) + value
        if child.hvp_method_used is not None:  # the blocks' products are the parent's
            objective.hvp_method_used = child.hvp_method_used
            objective.hvp_note = child.hvp_note or objective.hvp_note
        del child
    return BlockSpectraResult(
        blocks=results,
        scheme=scheme,
        num_params=objective.num_params,
        num_hvps=sum(b.num_hvps for b in results),
        loss=loss,
        k=k,
        tol=tol,
        max_hvps=max_hvps,
        seed=seed if isinstance(seed, int) else None,
        density=density,
    )
