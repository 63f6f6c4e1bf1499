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
from flatlens.core._checks import check_positive_int, check_rho, make_generator
from flatlens.core._errors import NonFiniteLossError
from flatlens.core._io import CheckpointError
from flatlens.core._objective import Objective
from flatlens.core._renames import renamed
from flatlens.core._results import Result
from flatlens.data import Dataset, batches
from flatlens.optim import PerturbationOptimizer
from flatlens.train._checkpoint import (
    load_on_main,
    load_training_checkpoint,
    save_training_checkpoint,
)
from flatlens.train._measures import MEASURES, check_measures, measure_subset, take_measures

__all__ = ["CHECKPOINT_NAME", "TrainResult", "Trainer"]

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
        trace_probes: Random probes (Hessian-vector products) of the trace estimate.
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

    @renamed("Trainer", trace_samples="trace_probes")
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
        trace_probes: int = 30,
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
            ("trace_probes", trace_probes, 3),
            ("checkpoint_every", checkpoint_every, 1),
            ("seed", seed, 0),
        ):
            check_positive_int(name, value, least)
        measures = check_measures(measures)
        measure_rho = check_rho(measure_rho, "measure_rho")
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.batch_size = batch_size
        self.scheduler = scheduler
        self.seed = seed
        self.measure_every = measure_every
        self.measures = measures
        self.measure_samples = measure_samples
        self.measure_rho = measure_rho
        self.measure_steps = measure_steps
        self.trace_probes = trace_probes
        self.eval_batch_size = eval_batch_size
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.extra_settings = dict(settings or {})
        self.progress = progress

        params = list(model.parameters())
        if not any(p.requires_grad for p in params):
            raise ValueError(
                f"the model ({type(model).__name__}) has no trainable parameters"
                + (" (every parameter has requires_grad=False)" if params else "")
                + "; training would change nothing"
            )
        param = params[0]
        self.device, self.dtype = param.device, param.dtype
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._shuffle = make_generator(seed)
        self._rng = {"torch": make_generator(seed).get_state()}
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
            "trace_probes": self.trace_probes,
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
        """Stop a diverged run with :class:`NonFiniteLossError` (exit code 1 in the CLI)."""
        if not math.isfinite(value):
            raise NonFiniteLossError(
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
        return measure_subset(self.data, self.measure_samples)

    def measure(self) -> dict[str, float]:
        """lambda_max, tr(H), R0 and R1 (those in ``measures``) on the fixed subset.

        The model is left unchanged; each measure uses its own seeded generator.
        """
        return take_measures(
            self._objective(*self.measure_subset()),
            self.measures,
            rho=self.measure_rho,
            steps=self.measure_steps,
            trace_probes=self.trace_probes,
            seed=self.seed,
        )

    def fit(self, epochs: int) -> TrainResult:
        """Train until ``epochs`` epochs are complete in total (a resumed run continues).

        Returns:
            A :class:`TrainResult` over the whole history.

        Raises:
            NonFiniteLossError: the training loss became NaN or infinite (the run diverged);
                the checkpoint of the last finished epoch is kept.
        """
        check_positive_int("epochs", epochs, 0)
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
            payload = load_on_main(path)
        else:
            payload = load_training_checkpoint(path, map_location="cpu")
        if (payload["scheduler"] is None) != (self.scheduler is None):
            raise ValueError(
                "the checkpoint and this trainer disagree on having an LR scheduler; build "
                "the trainer as the saved run was built"
            )
        try:
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
        except Exception as err:  # a state that does not fit this trainer
            text = " ".join(str(err).split()) or "(no message)"
            raise CheckpointError(
                f"checkpoint {path} does not fit this trainer ({type(err).__name__}: {text}); "
                "build the model, optimizer and scheduler as the saved run was built"
            ) from err
        self.last_checkpoint = Path(path)
