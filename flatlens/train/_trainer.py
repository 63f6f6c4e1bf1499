"""A small trainer that logs the generalization gap beside periodic flatness measures.

Every epoch: train and test loss and accuracy (one evaluation pass each, in eval mode) and
the generalization gap, test - train loss and train - test accuracy. Every ``measure_every``
epochs: lambda_max and tr(H) of the Hessian, zeroth-order sharpness R0 and first-order
flatness R1, all on one fixed subset of the training data. Checkpoints are atomic and a
resumed run repeats the uninterrupted one exactly (same seed, same device): the trainer
keeps its own shuffling generator and global-RNG state and saves both.

Under ``torchrun`` (an initialized ``torch.distributed`` process group) the trainer is data
parallel: the model is wrapped in ``DistributedDataParallel``, every rank draws the same
shuffled global batches and trains on its contiguous share of each, evaluations and measures
run on each rank's shard with the objectives summing over ranks, and only rank 0 writes
checkpoints. Each rank's loss is weighted by W n_r / n (n_r of the batch's n samples on
this rank), so the averaged gradient is the gradient over the whole batch even when the
shares are uneven (see ``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from tqdm.auto import tqdm

from flatlens import distributed as fd
from flatlens.cli import _resolve as resolve
from flatlens.core._objective import Objective
from flatlens.core._results import Result
from flatlens.data import Dataset, batches
from flatlens.optim import GAM, SAM, PerturbationOptimizer
from flatlens.train._checkpoint import load_training_checkpoint, save_training_checkpoint

__all__ = [
    "MEASURES",
    "OPTIMIZERS",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "train",
]

MEASURES = ("lambda_max", "trace", "r0", "r1")
OPTIMIZERS = ("sgd", "adamw", "sam", "gam", "gam-exact")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHECKPOINT_NAME = "checkpoint.pt"


def _closure_for(
    optimizer: Optimizer,
    model: nn.Module,
    loss_fn: Callable,
    x: Tensor,
    y: Tensor,
    weight: float = 1.0,
) -> Callable[..., Tensor]:
    """The closure every optimizer here accepts (``create_graph`` for GAM's exact mode).

    It back-propagates ``weight * loss`` (a rank's share of the batch, see the module
    docstring) and returns the unweighted loss.
    """

    def closure(create_graph: bool = False) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        (loss if weight == 1.0 else loss * weight).backward(create_graph=create_graph)
        return loss

    return closure


@dataclass
class TrainResult(Result):
    """A finished (or resumed and finished) training run.

    Attributes:
        history: One row per epoch: ``epoch``, ``lr``, ``train_loss``, ``train_acc``,
            ``test_loss``, ``test_acc``, ``gap_loss`` (test - train loss), ``gap_acc``
            (train - test accuracy), ``seconds``, and the measures (None when not measured
            that epoch).
        final: The last row.
        settings: The trainer's settings.
        checkpoint: Path of the last checkpoint written, if any.
        model: The trained model (left out of ``to_dict``).
    """

    history: list[dict[str, Any]]
    final: dict[str, Any]
    settings: dict[str, Any]
    checkpoint: str | None = None
    model: nn.Module | None = field(default=None, repr=False, metadata={"json": False})


class Trainer:
    """Trains ``model`` with ``optimizer`` on a :class:`~flatlens.data.Dataset`.

    Args:
        model: The network (trained in place).
        optimizer: Any ``torch.optim`` optimizer, :class:`~flatlens.optim.SAM` or
            :class:`~flatlens.optim.GAM`; it is stepped with a closure.
        data: Train and test tensors.
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced; default cross-entropy.
        batch_size: Training batch size; batches are reshuffled every epoch.
        scheduler: An LR scheduler, stepped once per epoch.
        seed: Seeds the shuffling and the global RNG used inside training (dropout).
        measure_every: Compute the measures every this many epochs (0: never).
        measures: Which of ``"lambda_max"``, ``"trace"``, ``"r0"``, ``"r1"``.
        measure_samples: Size of the fixed training subset the measures use.
        measure_rho: Radius of R0 and R1.
        measure_steps: Ascent steps of R0 and R1.
        trace_samples: Hessian-vector products of the trace estimate.
        eval_batch_size: Batch size of the evaluation passes.
        checkpoint_dir: Write ``checkpoint.pt`` and ``checkpoint.json`` there.
        checkpoint_every: Checkpoint every this many epochs (and after the last).
        settings: Extra plain values stored with the checkpoints and results.
        progress: Show a tqdm bar per epoch (on rank 0 only when distributed).
        distributed: Train data parallel over the ranks of the initialized
            ``torch.distributed`` process group (see the module docstring). ``None``: when
            one with more than one rank is initialized. SAM and GAM are handed the
            ``DistributedDataParallel`` module as their ``model`` (so their passes run
            inside ``no_sync``); their ``perturbations`` setting chooses per-rank or
            synchronized perturbations.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        data: Dataset,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        batch_size: int = 64,
        scheduler: Any | None = None,
        seed: int = 0,
        measure_every: int = 0,
        measures: Sequence[str] = MEASURES,
        measure_samples: int = 256,
        measure_rho: float = 0.05,
        measure_steps: int = 20,
        trace_samples: int = 30,
        eval_batch_size: int = 512,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 1,
        settings: dict[str, Any] | None = None,
        progress: bool = False,
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer)}")
        if not isinstance(data, Dataset):
            raise TypeError("data must be a flatlens.data.Dataset (see flatlens.data.load_*)")
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("measure_every", measure_every, 0),
            ("measure_samples", measure_samples, 1),
            ("measure_steps", measure_steps, 1),
            ("trace_samples", trace_samples, 3),
            ("checkpoint_every", checkpoint_every, 1),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        unknown = [m for m in measures if m not in MEASURES]
        if unknown:
            raise ValueError(f"unknown measures {unknown}; choose from {list(MEASURES)}")
        if not (isinstance(measure_rho, int | float) and math.isfinite(measure_rho)) or not (
            measure_rho > 0
        ):
            raise ValueError(f"measure_rho must be a finite number > 0, got {measure_rho!r}")
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.batch_size = batch_size
        self.scheduler = scheduler
        self.seed = seed
        self.measure_every = measure_every
        self.measures = tuple(measures)
        self.measure_samples = measure_samples
        self.measure_rho = float(measure_rho)
        self.measure_steps = measure_steps
        self.trace_samples = trace_samples
        self.eval_batch_size = eval_batch_size
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.extra_settings = dict(settings or {})
        self.progress = progress

        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._shuffle = torch.Generator().manual_seed(seed)
        self._rng = {"torch": torch.Generator().manual_seed(seed).get_state()}
        if self.device.type == "cuda":
            with torch.random.fork_rng(devices=[self.device]):
                torch.cuda.manual_seed(seed)
                self._rng["cuda"] = torch.cuda.get_rng_state(self.device)
        self._evaluators: dict[str, Objective] = {}
        self.distributed = self._check_distributed(distributed)
        self._train_model: nn.Module = model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._train_model = DistributedDataParallel(model, device_ids=ids)
            if isinstance(optimizer, PerturbationOptimizer):
                optimizer.model = self._train_model

    def _check_distributed(self, distributed: bool | None) -> bool:
        if distributed is None:
            distributed = fd.is_distributed() and fd.world_size() > 1
        if not distributed:
            return False
        if not fd.is_distributed():
            raise ValueError(
                "distributed=True needs an initialized torch.distributed process group; "
                "start with torchrun and call flatlens.distributed.init_from_env()"
            )
        world = fd.world_size()
        last = len(self.data.y_train) % self.batch_size
        if self.batch_size < world or 0 < last < world:
            raise ValueError(
                f"each of the {world} ranks needs a share of every batch, but batch_size="
                f"{self.batch_size} over {len(self.data.y_train)} training samples leaves a "
                f"batch of {last or self.batch_size}; use a batch size of at least {world} "
                "whose last batch has at least that many samples"
            )
        return True

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        """Plain values describing this run (saved with checkpoints and results)."""
        return {
            "optimizer": repr(self.optimizer),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "measure_every": self.measure_every,
            "measures": list(self.measures),
            "measure_samples": self.measure_samples,
            "measure_rho": self.measure_rho,
            "measure_steps": self.measure_steps,
            "trace_samples": self.trace_samples,
            "data": self.data.name,
            "dtype": str(self.dtype),
            "device": str(self.device),
            **({"world_size": fd.world_size()} if self.distributed else {}),
            **self.extra_settings,
        }

    # ------------------------------------------------------------------ RNG
    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run the block on the trainer's global-RNG state; the caller's is left untouched."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self._rng["torch"])
            if devices:
                torch.cuda.set_rng_state(self._rng["cuda"], self.device)
            yield
            self._rng["torch"] = torch.get_rng_state()
            if devices:
                self._rng["cuda"] = torch.cuda.get_rng_state(self.device)

    # ------------------------------------------------------------------ training
    def _to_device(self, t: Tensor) -> Tensor:
        t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def train_epoch(self, total_epochs: int | None = None) -> float:
        """One pass over the shuffled training data; returns the mean first-pass loss."""
        self.model.train()
        loader = batches(
            self.data.x_train,
            self.data.y_train,
            self.batch_size,
            shuffle=True,
            generator=self._shuffle,
        )
        label = f"epoch {self.epoch + 1}" + (f"/{total_epochs}" if total_epochs else "")
        quiet = not self.progress or not fd.is_main()
        bar = tqdm(loader, desc=label, disable=quiet, leave=False)
        world = fd.world_size() if self.distributed else 1
        total, count = 0.0, 0
        for x, y in bar:
            weight = 1.0
            if self.distributed:
                n = len(y)
                x, y = fd.shard(x, y)
                weight = world * len(y) / n
            x, y = self._to_device(x), self._to_device(y)
            closure = _closure_for(self.optimizer, self._train_model, self.loss_fn, x, y, weight)
            loss = self.optimizer.step(closure)
            value = float(loss.detach() if isinstance(loss, Tensor) else loss)
            if not self.distributed:
                # (distributed: checked once per epoch on the summed loss, so that every
                # rank raises at the same point)
                self._check_finite(value)
            total += value * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{value:.4f}")
        bar.close()
        if self.distributed:
            sums = torch.tensor([total, float(count)], dtype=torch.float64)
            total, count = (fd.all_reduce_mean([sums])[0] * world).tolist()
            self._check_finite(total)
            fd.broadcast_buffers(self.model)  # rank 0's BatchNorm statistics, as DDP does
        if self.scheduler is not None:
            self.scheduler.step()
        return total / max(count, 1)

    def _check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training loss became {value} in epoch {self.epoch + 1}; lower the "
                "learning rate or the perturbation radius"
            )

    def _objective(self, x: Tensor, y: Tensor, **kwargs: Any) -> Objective:
        """The risk over ``(x, y)``: over this rank's shard, summed across ranks, when
        distributed."""
        x, y, distributed = fd.local_split(x, y, enabled=self.distributed)
        return Objective(
            self.model,
            self.loss_fn,
            batches(x, y, self.eval_batch_size),
            eval_mode=True,
            distributed=distributed,
            **kwargs,
        )

    def _evaluator(self, split: str) -> Objective:
        if split not in self._evaluators:
            x, y = self.data.train() if split == "train" else self.data.test()
            self._evaluators[split] = self._objective(x, y, check_determinism=False)
        return self._evaluators[split]

    def evaluate(self) -> dict[str, float | None]:
        """Train and test loss and accuracy (eval mode) and the generalization gaps."""
        train = self._evaluator("train").evaluate()
        test = self._evaluator("test").evaluate()
        row: dict[str, float | None] = {
            "train_loss": train["loss"],
            "train_acc": train.get("accuracy"),
            "test_loss": test["loss"],
            "test_acc": test.get("accuracy"),
            "gap_loss": test["loss"] - train["loss"],
            "gap_acc": None,
        }
        if "accuracy" in train and "accuracy" in test:
            row["gap_acc"] = train["accuracy"] - test["accuracy"]
        return row

    def measure_subset(self) -> tuple[Tensor, Tensor]:
        """The fixed training subset of the measures: the first ``measure_samples`` of one
        permutation drawn from seed 0, the same for every run on the same data."""
        n = len(self.data.y_train)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        keep = order[: min(self.measure_samples, n)]
        return self.data.x_train[keep], self.data.y_train[keep]

    def measure(self) -> dict[str, float]:
        """lambda_max, tr(H), R0 and R1 (those in ``measures``) on the fixed subset.

        The model is left unchanged; each measure uses its own seeded generator.
        """
        objective = self._objective(*self.measure_subset())
        out: dict[str, float] = {}
        eigen = None
        if {"lambda_max", "r0", "r1"} & set(self.measures):
            from flatlens.measures._spectrum import hessian_eigenvalues

            eigen = hessian_eigenvalues(objective, k=1, tol=1e-3, seed=self.seed)
            if "lambda_max" in self.measures:
                out["lambda_max"] = float(eigen.eigenvalues[0])
        if "trace" in self.measures:
            from flatlens.measures._spectrum import hessian_trace

            out["trace"] = float(
                hessian_trace(objective, num_samples=self.trace_samples, seed=self.seed).value
            )
        ascents: list[tuple[str, Callable[..., Any]]] = []
        if "r0" in self.measures:
            from flatlens.measures._sharpness import zeroth_order_sharpness

            ascents.append(("r0", zeroth_order_sharpness))
        if "r1" in self.measures:
            from flatlens.measures._flatness import first_order_flatness

            ascents.append(("r1", first_order_flatness))
        for name, fn in ascents:
            extra = {"eigen": eigen} if "eigen" in inspect.signature(fn).parameters else {}
            result = fn(
                objective, self.measure_rho, steps=self.measure_steps, seed=self.seed, **extra
            )
            out[name] = float(result.value)
        return out

    def fit(self, epochs: int) -> TrainResult:
        """Train until ``epochs`` epochs are complete in total (a resumed run continues).

        Returns:
            A :class:`TrainResult` over the whole history.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
        if epochs < self.epoch:
            raise ValueError(
                f"this run has already completed {self.epoch} epochs, more than epochs={epochs}"
            )
        while self.epoch < epochs:
            start = time.perf_counter()
            with self._own_rng():
                lr = self.optimizer.param_groups[0]["lr"]
                running = self.train_epoch(epochs)
                row: dict[str, Any] = {"epoch": self.epoch + 1, "lr": float(lr)}
                row.update(self.evaluate())
                row["train_loss_running"] = running
                measured = self.measure_every and (self.epoch + 1) % self.measure_every == 0
                values = self.measure() if measured else {}
                row.update({m: values.get(m) for m in MEASURES})
            row["seconds"] = time.perf_counter() - start
            self.history.append(row)
            self.epoch += 1
            if self.checkpoint_dir is not None and (
                self.epoch % self.checkpoint_every == 0 or self.epoch == epochs
            ):
                self.save_checkpoint(self.checkpoint_dir / CHECKPOINT_NAME)
        return self.result()

    def result(self) -> TrainResult:
        """The history so far as a :class:`TrainResult`."""
        return TrainResult(
            history=[dict(r) for r in self.history],
            final=dict(self.history[-1]) if self.history else {},
            settings=self.settings(),
            checkpoint=None if self.last_checkpoint is None else str(self.last_checkpoint),
            model=self.model,
        )

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the full training state to ``path`` (+ ``.json``), atomically (on rank 0
        only when distributed; every rank returns the path)."""
        if self.distributed and not fd.is_main():
            self.last_checkpoint = Path(path)
            return self.last_checkpoint
        rng = {"shuffle": self._shuffle.get_state(), **self._rng}
        self.last_checkpoint = save_training_checkpoint(
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            epoch=self.epoch,
            history=self.history,
            rng=rng,
            config=self.settings(),
        )
        return self.last_checkpoint

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, RNG states, epoch and history from ``path``.

        The trainer must have been built like the one that wrote it (same model
        architecture, optimizer type and scheduler type). When distributed, rank 0 reads
        the file and sends it to the other ranks (which need no access to it).
        """
        if self.distributed:
            payload = _read_on_main(path)
        else:
            payload = load_training_checkpoint(path, map_location="cpu")
        if (payload["scheduler"] is None) != (self.scheduler is None):
            raise ValueError(
                "the checkpoint and this trainer disagree on having an LR scheduler; build "
                "the trainer as the saved run was built"
            )
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        rng = payload["rng"]
        self._shuffle.set_state(rng["shuffle"])
        self._rng["torch"] = rng["torch"]
        if "cuda" in self._rng and "cuda" in rng:
            self._rng["cuda"] = rng["cuda"]
        self.epoch = int(payload["epoch"])
        self.history = [dict(r) for r in payload["history"]]
        self.last_checkpoint = Path(path)


def _read_on_main(path: str | Path) -> dict[str, Any]:
    """Rank 0's ``load_training_checkpoint(path)`` on every rank; its error, if it fails, is
    raised on every rank."""
    payload: Any = None
    if fd.is_main():
        try:
            payload = load_training_checkpoint(path, map_location="cpu")
        except (OSError, ValueError) as err:
            payload = err
    payload = fd.broadcast_object(payload)
    if isinstance(payload, BaseException):
        raise payload
    return payload


# ---------------------------------------------------------------------- config-driven runs
@dataclass
class TrainConfig:
    """Everything that defines one run by name: for the CLI, the demo and studies.

    Attributes:
        model: A :mod:`flatlens.zoo` name (``mlp``, ``cnn``, ``resnet18``) or
            ``package.module:factory`` (see :func:`flatlens.cli.build_model`); only its
            form is checked here, the factory is imported when the model is built.
        model_kwargs: Extra arguments of the model builder.
        optimizer: ``sgd``, ``adamw``, ``sam``, ``gam`` (accelerated) or ``gam-exact``.
        base: Base optimizer of SAM/GAM: ``sgd`` or ``adamw``.
        lr, momentum, weight_decay: Base optimizer settings (momentum only for SGD).
        rho: SAM's radius.
        gam: Keyword arguments of :class:`~flatlens.optim.GAM` (rho, perturb_rho, ...).
        epochs, batch_size, seed: The run.
        scheduler: ``cosine`` (CosineAnnealingLR over the epochs) or ``none``.
        measure_every, measures, measure_samples, measure_rho, measure_steps, trace_samples:
            Periodic flatness measures (see :class:`Trainer`).
        dtype, device: Where the model lives.
        checkpoint_dir: Where checkpoints go (None: none are written).
    """

    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"
    base: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 0.05
    gam: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    scheduler: str = "cosine"
    measure_every: int = 0
    measures: tuple[str, ...] = MEASURES
    measure_samples: int = 256
    measure_rho: float = 0.05
    measure_steps: int = 20
    trace_samples: int = 30
    dtype: str = "float32"
    device: str = "cpu"
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.base not in ("sgd", "adamw"):
            raise ValueError(f"base must be 'sgd' or 'adamw', not {self.base!r}")
        if self.scheduler not in ("cosine", "none"):
            raise ValueError(f"scheduler must be 'cosine' or 'none', not {self.scheduler!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, not {self.dtype!r}")
        resolve.check_model_spec(self.model)
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        self.measures = tuple(self.measures)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON- and ``weights_only``-safe)."""
        out = dataclasses.asdict(self)
        out["measures"] = list(self.measures)
        return out


def build_model(config: TrainConfig, data: Dataset) -> nn.Module:
    """The model ``config.model`` names, sized for ``data``, on ``config``'s device/dtype.

    A zoo name or ``package.module:factory`` is built by :func:`flatlens.cli.build_model`
    with ``config.model_kwargs`` (``num_classes``, ``in_features`` and ``in_channels`` are
    filled in from ``data`` where the factory takes them), initialized from ``config.seed``
    without touching the caller's global RNG.

    Raises:
        ValueError: the factory cannot be imported or does not take the arguments.
        TypeError: the factory did not return a ``torch.nn.Module``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = resolve.build_model(config.model, data, **config.model_kwargs)
    return model.to(device=config.device, dtype=_DTYPES[config.dtype])


def build_optimizer(config: TrainConfig, model: nn.Module) -> Optimizer:
    """The optimizer named by ``config.optimizer`` over all of ``model``'s parameters."""

    def base(name: str) -> Optimizer:
        if name == "adamw":
            return torch.optim.AdamW(
                model.parameters(), lr=config.lr, weight_decay=config.weight_decay
            )
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )

    if config.optimizer in ("sgd", "adamw"):
        return base(config.optimizer)
    if config.optimizer == "sam":
        return SAM(model.parameters(), base(config.base), rho=config.rho, model=model)
    mode = "exact" if config.optimizer == "gam-exact" else "accelerated"
    return GAM(model.parameters(), base(config.base), model=model, mode=mode, **config.gam)


def build_scheduler(config: TrainConfig, optimizer: Optimizer) -> Any | None:
    """CosineAnnealingLR over ``config.epochs`` (stepped per epoch), or None."""
    if config.scheduler == "none":
        return None
    target = getattr(optimizer, "base_optimizer", optimizer)
    return torch.optim.lr_scheduler.CosineAnnealingLR(target, T_max=max(config.epochs, 1))


def train(
    config: TrainConfig,
    data: Dataset,
    *,
    resume: bool = True,
    progress: bool = False,
) -> TrainResult:
    """Build model, optimizer and scheduler from ``config``, train, return the result.

    Args:
        config: The run.
        data: Train/test tensors.
        resume: Continue from ``config.checkpoint_dir``'s checkpoint when there is one.
        progress: tqdm bars.

    Returns:
        A :class:`TrainResult`; the trained network is ``result.model``.
    """
    model = build_model(config, data)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    trainer = Trainer(
        model,
        optimizer,
        data,
        batch_size=config.batch_size,
        scheduler=scheduler,
        seed=config.seed,
        measure_every=config.measure_every,
        measures=config.measures,
        measure_samples=config.measure_samples,
        measure_rho=config.measure_rho,
        measure_steps=config.measure_steps,
        trace_samples=config.trace_samples,
        checkpoint_dir=config.checkpoint_dir,
        settings={"config": config.to_dict()},
        progress=progress,
    )
    if resume and config.checkpoint_dir is not None:
        path = Path(config.checkpoint_dir) / CHECKPOINT_NAME
        if fd.broadcast_object(path.is_file()) if trainer.distributed else path.is_file():
            trainer.load_checkpoint(path)
    return trainer.fit(config.epochs)
