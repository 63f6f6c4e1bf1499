"""Parameter-space plumbing: selecting parameters, flat vectors, snapshot and restore.

Every measure in flatlens works with *flat* 1-D tensors over a selected subset of a model's
parameters. :class:`ParamSpace` owns that selection (names, shapes, offsets) and converts
between the flat vector and per-parameter views. :func:`preserved` guarantees that whatever
happens inside a ``with`` block, the model's parameters, buffers and train/eval flags come
back bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ParamSpec = str | nn.Module | Tensor

__all__ = [
    "ModelState",
    "ParamSpace",
    "preserved",
    "select_parameters",
]


def select_parameters(
    model: nn.Module, params: ParamSpec | Iterable[ParamSpec] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Resolve a user's parameter selection to ``(name, parameter)`` pairs in model order.

    Args:
        model: The model that owns the parameters.
        params: ``None`` for every parameter with ``requires_grad``; otherwise one or more of
            a parameter name (``"fc.weight"``), a module-name prefix (``"layer1"`` selects
            every parameter below it), a submodule of ``model``, or a parameter tensor.

    Returns:
        The selected named parameters, deduplicated, in the order of
        ``model.named_parameters()``.

    Raises:
        ValueError: if a name or tensor does not belong to ``model``, or no selected
            parameter requires grad.
        TypeError: if an entry is of an unsupported type.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "no parameter of the model requires grad; call "
                "`p.requires_grad_(True)` on the parameters to measure or pass `params=`"
            )
        return chosen

    specs = [params] if isinstance(params, str | nn.Module | Tensor) else list(params)
    by_id = {id(p): n for n, p in named}
    wanted: set[int] = set()
    for spec in specs:
        if isinstance(spec, str):
            hits = [id(p) for n, p in named if n == spec or n.startswith(spec + ".")]
            if not hits:
                raise ValueError(
                    f"params: no parameter named {spec!r} (or below a module of that name); "
                    f"known names start with {[n for n, _ in named[:5]]}"
                )
            wanted.update(hits)
        elif isinstance(spec, nn.Module):
            hits = [id(p) for p in spec.parameters()]
            if not hits or any(h not in by_id for h in hits):
                raise ValueError(
                    f"params: module {type(spec).__name__} has no parameters of this model"
                )
            wanted.update(hits)
        elif isinstance(spec, Tensor):
            if id(spec) not in by_id:
                raise ValueError(
                    "params: a tensor passed in `params` is not a parameter of this model"
                )
            wanted.add(id(spec))
        else:
            raise TypeError(
                f"params entries must be names, modules or parameter tensors, not {type(spec)}"
            )
    chosen = [(n, p) for n, p in named if id(p) in wanted]
    frozen = [n for n, p in chosen if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"selected parameters do not require grad: {frozen[:5]}; enable "
            "`requires_grad` on them or leave them out of `params=`"
        )
    return chosen


@dataclass(frozen=True)
class ParamSpace:
    """The flat coordinate system over a fixed, ordered set of named parameters.

    A flat vector ``theta`` is the concatenation of ``p.reshape(-1)`` over ``names``.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_named(cls, named: Sequence[tuple[str, Tensor]]) -> ParamSpace:
        """Build the space of the given named tensors."""
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def numels(self) -> tuple[int, ...]:
        """Number of scalar entries of each parameter."""
        return tuple(s.numel() for s in self.shapes)

    @property
    def dim(self) -> int:
        """Total number of scalars, the length of a flat vector."""
        return sum(self.numels)

    def flatten(self, tensors: Iterable[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector (a copy)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split a flat vector into per-parameter *views* with the parameters' shapes.

        A leading batch dimension is kept: ``flat`` of shape ``(..., dim)`` gives views of
        shape ``(..., *shape)``.
        """
        if flat.shape[-1] != self.dim:
            raise ValueError(f"flat vector has length {flat.shape[-1]}, expected {self.dim}")
        lead = flat.shape[:-1]
        return [
            chunk.view((*lead, *shape))
            for chunk, shape in zip(flat.split(self.numels, dim=-1), self.shapes, strict=True)
        ]

    def as_dict(self, flat: Tensor) -> dict[str, Tensor]:
        """Map parameter names to views of ``flat`` (see :meth:`unflatten`)."""
        return dict(zip(self.names, self.unflatten(flat), strict=True))

    def segments(self) -> Iterator[tuple[str, slice, torch.Size]]:
        """Yield ``(name, slice into the flat vector, shape)`` for each parameter."""
        start = 0
        for name, shape, numel in zip(self.names, self.shapes, self.numels, strict=True):
            yield name, slice(start, start + numel), shape
            start += numel


@dataclass
class ModelState:
    """A bit-exact copy of a model's parameters, buffers and per-module training flags."""

    tensors: dict[str, Tensor]
    training: dict[str, bool]
    requires_grad: dict[str, bool]

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        """Copy everything a measurement could touch."""
        tensors = {
            n: t.detach().clone()
            for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t is not None
        }
        training = {n: m.training for n, m in model.named_modules()}
        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        return cls(tensors, training, requires_grad)

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Write the captured values back in place (storage and identity are kept)."""
        live = dict([*model.named_parameters(), *model.named_buffers()])
        for name, saved in self.tensors.items():
            target = live[name]
            if target.shape != saved.shape:
                target.data = saved.clone()
            else:
                target.copy_(saved)
        for name, module in model.named_modules():
            if name in self.training:
                module.training = self.training[name]
        for name, p in model.named_parameters():
            if name in self.requires_grad:
                p.requires_grad_(self.requires_grad[name])


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[ModelState]:
    """Run a block and restore the model bit for bit afterwards, also on error or Ctrl-C.

    Parameters, buffers (e.g. BatchNorm running statistics), per-module ``training`` flags
    and ``requires_grad`` flags are restored in place, so references held elsewhere (an
    optimizer's) stay valid.
    """
    state = ModelState.capture(model)
    try:
        yield state
    finally:
        state.restore(model)


@contextlib.contextmanager
def eval_mode(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Put every submodule in eval mode for the block, then restore each module's own flag."""
    if not enabled:
        yield
        return
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag
