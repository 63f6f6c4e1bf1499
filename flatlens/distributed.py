"""Small helpers for running flatlens under ``torchrun`` with :mod:`torch.distributed`.

flatlens has no launcher of its own: start the processes with ``torchrun`` (or
``python -m torch.distributed.run``), call :func:`init_from_env` (or
``torch.distributed.init_process_group`` yourself), and give each rank its shard of the data
(:func:`shard`). :class:`~flatlens.Objective` then sums the size-weighted per-rank losses,
gradients and HVPs, so every measure equals the single-process one (see
``docs/distributed.md``).

Every helper here also works without an initialized process group, as the one-process case:
``rank() == 0``, ``world_size() == 1``, broadcasts return their input.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn

from flatlens.core._checks import check_positive_int

__all__ = [
    "all_gather_object",
    "all_gather_tensor",
    "all_reduce_mean",
    "barrier",
    "broadcast_buffers",
    "broadcast_object",
    "init_from_env",
    "is_distributed",
    "is_main",
    "launched_by_torchrun",
    "local_rank",
    "local_split",
    "rank",
    "shard",
    "shard_range",
    "world_size",
]


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether a default process group is initialized (any world size)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (the default group), 0 without a process group."""
    return _dist().get_rank(group) if is_distributed() else 0


def world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (the default group), 1 without a process group."""
    return _dist().get_world_size(group) if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (the rank that writes files and prints), and without a process group."""
    return rank() == 0


def local_rank() -> int:
    """The rank within this node, from ``LOCAL_RANK`` (set by ``torchrun``), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (its ``RANK``/``WORLD_SIZE``/
    ``MASTER_ADDR`` environment is present)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        _dist().barrier()


def _comm_device() -> torch.device:
    """The device collectives of this backend need tensors on (NCCL: the current GPU)."""
    dist = _dist()
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(device: str | torch.device = "cpu", *, timeout_s: float | None = None) -> bool:
    """Initialize the default process group from ``torchrun``'s environment.

    The backend is NCCL for a CUDA ``device`` (whose index is set as the current device) and
    Gloo otherwise. A group created here is destroyed when the interpreter exits.

    Args:
        device: The device the model runs on.
        timeout_s: Collective timeout in seconds (torch's default when None).

    Returns:
        True when this call created the process group; False when one already existed or
        the process was not started by ``torchrun`` (nothing is done then).
    """
    if is_distributed() or not launched_by_torchrun():
        return False
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev.index if dev.index is not None else local_rank())
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    _dist().init_process_group(backend, **kwargs)
    # Destroyed before the interpreter tears down: Gloo's threads left to the C++ destructors
    # at exit can abort a rank ("terminate called without an active exception").
    atexit.register(_destroy_at_exit)
    return True


def _destroy_at_exit() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, *, rank_id: int | None = None, world: int | None = None) -> slice:
    """The contiguous block of ``range(n)`` owned by rank ``rank_id`` of ``world`` ranks
    (default: this process in the default group).

    Blocks are ``[floor(r n / W), floor((r + 1) n / W))``: in order, covering every index once,
    sizes differing by at most one.
    """
    check_positive_int("n", n, 0)
    w = world_size() if world is None else world
    r = rank() if rank_id is None else rank_id
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside a world of size {w}")
    return slice(r * n // w, (r + 1) * n // w)


def shard(*tensors: Tensor, rank_id: int | None = None, world: int | None = None) -> tuple:
    """The same :func:`shard_range` block (along dim 0) of each tensor, for this rank.

    Example::

        x, y = shard(x, y)          # this rank's part of the data set
        objective = Objective(model, loss_fn, batches(x, y, 256))
    """
    if not tensors:
        raise ValueError("pass at least one tensor")
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError(
            f"tensors must share their first dimension, got {[len(t) for t in tensors]}"
        )
    block = shard_range(n, rank_id=rank_id, world=world)
    return tuple(t[block] for t in tensors)


def local_split(x: Tensor, y: Tensor, *, enabled: bool = True) -> tuple[Tensor, Tensor, bool]:
    """This rank's part of a data split and whether an objective over it sums across ranks.

    Under a process group of W > 1 ranks (and ``enabled``), a split with at least W examples
    is :func:`shard`-ed: returns the rank's block and ``True`` (pass it as the Objective's
    ``distributed=``). Otherwise, in one process or for a split too small to give every rank
    an example, returns ``(x, y, False)``: every rank evaluates all of it on its own.
    """
    if not enabled or world_size() == 1 or len(y) < world_size():
        return x, y, False
    xs, ys = shard(x, y)
    return xs, ys, True


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``src``'s ``obj`` on every rank (pickled; for small values such as decisions or a
    store's contents). Without a process group, ``obj`` itself."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_tensor(tensor: Tensor) -> list[Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), in rank order, on
    ``tensor``'s device."""
    if not is_distributed():
        return [tensor]
    device = _comm_device()
    if device.type == "cpu" and tensor.device.type != "cpu":
        device = tensor.device  # Gloo with accelerator tensors: leave them where they are
    sent = tensor.detach().to(device).contiguous()
    parts = [torch.empty_like(sent) for _ in range(world_size())]
    _dist().all_gather(parts, sent)
    return [p.to(tensor.device) for p in parts]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (pickled), in rank order; ``[obj]`` without a process group."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def all_reduce_mean(
    tensors: Sequence[Tensor | None],
    *,
    like: Sequence[Tensor] | None = None,
    group: Any = None,
) -> list[Tensor | None]:
    """(1/W) sum over the W ranks of each tensor, in one all-reduce of one flat buffer.

    ``None`` counts as zero. An entry is ``None`` in the result only when it is ``None`` on
    every rank (a parameter no rank's loss reaches). The inputs are not modified.

    Args:
        tensors: Per-parameter tensors, the same shapes on every rank.
        like: Tensors giving the shape, dtype and device of each entry, needed when an entry
            may be ``None`` on some ranks only (pass the parameters).
        group: Process group (the default group when None).
    """
    if not is_distributed():
        return list(tensors)
    if like is not None and len(like) != len(tensors):
        raise ValueError(f"like has {len(like)} entries, tensors {len(tensors)}")
    shaped = []
    for i, t in enumerate(tensors):
        if t is None and like is None:
            raise ValueError("an entry is None: pass like= (the parameters) to give its shape")
        shaped.append(t if t is not None else like[i])
    dtype = (
        torch.float64
        if any(t.dtype == torch.float64 for t in shaped)
        else (shaped[0].dtype if shaped else torch.float32)
    )
    device = shaped[0].device if shaped else _comm_device()
    if _dist().get_backend(group) == "nccl" and device.type != "cuda":
        device = _comm_device()
    parts = [
        torch.zeros(ref.numel(), dtype=dtype, device=device)
        if t is None
        else t.detach().reshape(-1).to(device, dtype)
        for t, ref in zip(tensors, shaped, strict=True)
    ]
    flags = torch.tensor([0.0 if t is None else 1.0 for t in tensors], dtype=dtype, device=device)
    flat = torch.cat([*parts, flags])
    _dist().all_reduce(flat, group=group)
    flat.div_(world_size(group))
    seen = flat[flat.numel() - len(tensors) :].tolist()
    out: list[Tensor | None] = []
    offset = 0
    for ref, flag in zip(shaped, seen, strict=True):
        size = ref.numel()
        chunk = flat[offset : offset + size]
        offset += size
        out.append(None if flag == 0 else chunk.view(ref.shape).to(ref.device, ref.dtype))
    return out


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank, in place."""
    if not is_distributed():
        return
    device = _comm_device()
    for b in module.buffers():
        if b.device.type == device.type or device.type == "cpu":
            _dist().broadcast(b.data, src=src)
        else:
            tmp = b.detach().to(device)
            _dist().broadcast(tmp, src=src)
            b.data.copy_(tmp)
