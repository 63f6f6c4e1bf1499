"""A trainer that logs the generalization gap beside flatness measures taken at low cost.

Every epoch: train and test loss and accuracy (one evaluation pass each, in eval mode, never
augmented) and the generalization gap, test - train loss and train - test accuracy. Every
``measure_every`` epochs and every ``measure_every_steps`` steps: lambda_max and tr(H) of
the Hessian, zeroth-order sharpness R0 and first-order flatness R1 on one fixed subset of
the training data, through a :class:`~flatlens.train.FlatnessTracker` (lambda_max
warm-started from the previous eigenvector, R0/R1 under a budget); every
``critical_every_steps`` steps the critical sharpness lambda_c along the optimizer's update.
Each measurement's cost and the total overhead (measure seconds over training seconds) are
recorded. Checkpoints are atomic and a resumed run repeats the uninterrupted one exactly
(same seed, same device): the trainer keeps its own shuffling, augmentation and loader
generators and global-RNG state and saves them, with the tracker's warm-start state.

Data is an in-memory :class:`~flatlens.data.Dataset` (the fast path) or
:class:`~flatlens.data.Streams` read every epoch through a ``DataLoader`` with workers; see
``flatlens.train._feed``. Mixed precision (``amp``) runs the training passes under autocast
(see ``flatlens.train._steps``).

Under ``torchrun`` (an initialized ``torch.distributed`` process group) the trainer is data
parallel: the model is wrapped in ``DistributedDataParallel``, every rank draws the same
shuffled global batches and trains on its contiguous share of each, evaluations and measures
run on each rank's shard with the objectives summing over ranks, and only rank 0 writes
checkpoints and logs. Each rank's loss is weighted by W n_r / n (n_r of the batch's n
samples on this rank), so the averaged gradient is the gradient over the whole batch even
when the shares are uneven (see ``docs/distributed.md``).
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

from flatlens import distributed as fd
from flatlens._augment import Augmentation
from flatlens._streams import Streams
from flatlens.core._checks import check_positive, check_positive_int, check_rho
from flatlens.core._errors import NonFiniteLossError
from flatlens.core._io import CheckpointError
from flatlens.core._objective import Objective
from flatlens.core._renames import renamed
from flatlens.core._results import Result
from flatlens.data import Dataset
from flatlens.optim import PerturbationOptimizer
from flatlens.train._checkpoint import (
    load_on_main,
    load_training_checkpoint,
    save_training_checkpoint,
)
from flatlens.train._feed import Feed
from flatlens.train._logs import Progress, RunLog
from flatlens.train._measures import MEASURES, check_measures
from flatlens.train._steps import AMP, Stepper, UpdateProbe
from flatlens.train._tracker import FlatnessTracker

__all__ = ["AMP", "CHECKPOINT_NAME", "TrainResult", "Trainer"]

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class TrainResult(Result):
    """A finished (or resumed and finished) training run.

    Attributes:
        history: One row per epoch: ``epoch``, ``step`` (optimizer steps so far), ``lr``,
            ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``, ``gap_loss`` (test -
            train loss), ``gap_acc`` (train - test accuracy), ``train_loss_running``,
            ``seconds``, the measures (None when not measured that epoch) and ``lambda_c``
            (the epoch's last critical sharpness, None when none was taken).
        final: The last row.
        settings: The trainer's settings.
        checkpoint: Path of the last checkpoint written, if any.
        model: The trained model (left out of ``to_dict``).
        measurements: Every measurement taken within epochs (``measure_every_steps``,
            ``critical_every_steps``): step, epoch, values and costs.
        costs: Seconds of training, evaluation and measures, the overhead (measure seconds
            over training seconds), images per second, per-epoch timings and each measure's
            totals (count, products, forward passes, seconds).
    """

    history: list[dict[str, Any]]
    final: dict[str, Any]
    settings: dict[str, Any]
    checkpoint: str | None = None
    model: nn.Module | None = field(default=None, repr=False, metadata={"json": False})
    measurements: list[dict[str, Any]] = field(default_factory=list)
    costs: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Trains ``model`` with ``optimizer`` on a data set, with flatness tracked cheaply.

    Args:
        model: The network (trained in place).
        optimizer: Any ``torch.optim`` optimizer, :class:`~flatlens.optim.SAM` or
            :class:`~flatlens.optim.GAM`; it is stepped with a closure.
        data: Train and test tensors (:class:`~flatlens.data.Dataset`, the fast path) or
            data sets read every epoch (:class:`~flatlens.data.Streams`).
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced; default cross-entropy.
        batch_size: Training batch size; batches are reshuffled every epoch.
        scheduler: An LR scheduler, stepped once per epoch.
        seed: Seeds the shuffling, the augmentation, the loader workers and the global RNG
            used inside training (dropout).
        measure_every: Compute the measures every this many epochs (0: never).
        measure_every_steps: ... and every this many optimizer steps (0: never).
        measures: Which of ``"lambda_max"``, ``"trace"``, ``"r0"``, ``"r1"``.
        measure_samples: Size of the fixed training subset the measures use.
        measure_rho: Radius of R0 and R1.
        measure_steps: Ascent steps of R0 and R1 (per start, before the budget).
        measure_budget: Cap on each of R0 and R1 in HVP-equivalents (None: no cap).
        trace_probes: Random probes (Hessian-vector products) of the trace estimate.
        critical_every_steps: Measure the critical sharpness lambda_c along the update
            every this many steps (0: never); forward passes only.
        augment: An :class:`~flatlens.data.Augmentation` of the training inputs, or None.
        augment_on: ``"device"`` (per batch on the training device) or ``"workers"`` (per
            example in the ``DataLoader`` workers, torchvision.transforms.v2 when it
            imports).
        num_workers: ``DataLoader`` workers for streamed data.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` (autocast; float16 with a GradScaler).
        eval_batch_size: Batch size of the evaluation passes.
        checkpoint_dir: Write ``checkpoint.pt`` and ``checkpoint.json`` there.
        checkpoint_every: Checkpoint every this many epochs (and after the last).
        log_dir: Write ``log.jsonl`` (and TensorBoard files) there (None: no logs).
        log_every: A JSON line every this many steps (0: epochs and measures only).
        tensorboard: Also write TensorBoard event files to ``log_dir/tensorboard``.
        settings: Extra plain values stored with the checkpoints and results.
        progress: A progress bar (images per second, time left; rank 0 only).
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
        data: Dataset | Streams,
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        batch_size: int = 64,
        scheduler: Any | None = None,
        seed: int = 0,
        measure_every: int = 0,
        measure_every_steps: int = 0,
        measures: Sequence[str] = MEASURES,
        measure_samples: int = 256,
        measure_rho: float = 0.05,
        measure_steps: int = 20,
        measure_budget: float | None = 40.0,
        trace_probes: int = 30,
        critical_every_steps: int = 0,
        augment: Augmentation | None = None,
        augment_on: str = "device",
        num_workers: int = 0,
        amp: str = "none",
        eval_batch_size: int = 512,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 1,
        log_dir: str | Path | None = None,
        log_every: int = 1,
        tensorboard: bool = False,
        settings: dict[str, Any] | None = None,
        progress: bool = False,
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, not {type(optimizer)}")
        if not isinstance(data, Dataset | Streams):
            raise TypeError(
                "data must be a flatlens.data.Dataset or flatlens.data.Streams (see "
                "flatlens.data.load_* and stream_*)"
            )
        if augment is not None and not isinstance(augment, Augmentation):
            raise TypeError("augment must be a flatlens.data.Augmentation or None")
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("measure_every", measure_every, 0),
            ("measure_every_steps", measure_every_steps, 0),
            ("measure_samples", measure_samples, 1),
            ("measure_steps", measure_steps, 1),
            ("trace_probes", trace_probes, 3),
            ("critical_every_steps", critical_every_steps, 0),
            ("num_workers", num_workers, 0),
            ("checkpoint_every", checkpoint_every, 1),
            ("log_every", log_every, 0),
            ("seed", seed, 0),
        ):
            check_positive_int(name, value, least)
        if measure_budget is not None:
            check_positive("measure_budget", measure_budget)
        if amp not in AMP:
            raise ValueError(f"amp must be one of {list(AMP)}, not {amp!r}")
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
        self.measure_every_steps = measure_every_steps
        self.measures = measures
        self.measure_samples = measure_samples
        self.measure_rho = measure_rho
        self.measure_steps = measure_steps
        self.measure_budget = measure_budget
        self.trace_probes = trace_probes
        self.critical_every_steps = critical_every_steps
        self.augment = augment
        self.augment_on = augment_on
        self.num_workers = num_workers
        self.amp = amp
        self.eval_batch_size = eval_batch_size
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every = checkpoint_every
        self.log_every = log_every
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
        if amp != "none" and self.dtype != torch.float32:
            raise ValueError(
                f"amp={amp!r} trains float32 parameters in mixed precision; the model is "
                f"{self.dtype} (use dtype float32, or amp='none')"
            )
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.measurements: list[dict[str, Any]] = []
        self.clock = {"train": 0.0, "eval": 0.0, "measure": 0.0, "images": 0}
        self.epoch_costs: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._rng = {"torch": torch.Generator().manual_seed(seed).get_state()}
        if self.device.type == "cuda":
            with torch.random.fork_rng(devices=[self.device]):
                torch.cuda.manual_seed(seed)
                self._rng["cuda"] = torch.cuda.get_rng_state(self.device)
        self._evaluators: dict[str, Objective] = {}
        self.distributed = self._check_distributed(distributed)
        self.feed = Feed(
            data,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            seed=seed,
            device=self.device,
            dtype=self.dtype,
            augment=augment,
            augment_on=augment_on,
            num_workers=num_workers,
            distributed=self.distributed,
        )
        self._train_model: nn.Module = model
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._train_model = DistributedDataParallel(model, device_ids=ids)
            if isinstance(optimizer, PerturbationOptimizer):
                optimizer.model = self._train_model
        self.stepper = Stepper(optimizer, self._train_model, self.loss_fn, amp, self.device)
        self._tracker: FlatnessTracker | None = None
        self.log = RunLog(log_dir, tensorboard=tensorboard, enabled=fd.is_main())
        self._log_offset: int | None = None
        self._resumed = False

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
        n = len(self.data.y_train) if isinstance(self.data, Dataset) else self.data.size()
        last = 0 if n is None else n % self.batch_size
        if self.batch_size < world or 0 < last < world:
            raise ValueError(
                f"each of the {world} ranks needs a share of every batch, but batch_size="
                f"{self.batch_size} over {n} training samples leaves a "
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
            "measure_every_steps": self.measure_every_steps,
            "measures": list(self.measures),
            "measure_samples": self.measure_samples,
            "measure_rho": self.measure_rho,
            "measure_steps": self.measure_steps,
            "measure_budget": self.measure_budget,
            "trace_probes": self.trace_probes,
            "critical_every_steps": self.critical_every_steps,
            "augment": None if self.augment is None else self.augment.kind,
            "augment_on": self.augment_on,
            "num_workers": self.num_workers,
            "amp": self.amp,
            "data": self.data.name,
            "dtype": str(self.dtype),
            "device": str(self.device),
            **self.feed.settings(),
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
    def train_epoch(self, total_epochs: int | None = None) -> float:
        """One pass over the shuffled (augmented) training data; returns the mean
        first-pass loss."""
        self.model.train()
        world = fd.world_size() if self.distributed else 1
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count, images, inner, started = 0, 0, 0.0, time.perf_counter()
        k, n_steps = self.critical_every_steps, self.measure_every_steps
        probe = UpdateProbe(self.optimizer, self._trainable()) if k else None
        for x, y, weight in self.feed.epoch():
            critical = probe is not None and (self.step + 1) % k == 0
            if critical:
                probe.before()
            loss = self.stepper.step(x, y, weight)
            self.step += 1
            total += loss.to(torch.float64) * len(y)
            count += len(y)
            images += len(y) * world
            logged = self.log_every and self.step % self.log_every == 0
            if logged or not self.distributed:
                value = float(loss)
                if not self.distributed:
                    # (distributed: checked once per epoch on the summed loss, so that
                    # every rank raises at the same point)
                    self._check_finite(value)
            extra: dict[str, Any] = {}
            if critical or (n_steps and self.step % n_steps == 0):
                began = time.perf_counter()
                extra = self._measure_within(probe if critical else None, n_steps)
                inner += time.perf_counter() - began
            if logged:
                seconds = time.perf_counter() - started - inner
                self.log.write(
                    "step",
                    {
                        "step": self.step,
                        "epoch": self.epoch + 1,
                        "loss": value,
                        "lr": float(self.optimizer.param_groups[0]["lr"]),
                        "images_per_second": images / seconds if seconds > 0 else None,
                        **{k_: v for k_, v in extra.items() if k_ != "cost"},
                    },
                    self.step,
                )
            if self._bar is not None:
                self._bar.update(len(y) * world, epoch=f"{self.epoch + 1}/{total_epochs or '?'}")
        train_seconds = time.perf_counter() - started - inner
        self.clock["train"] += train_seconds
        self.clock["measure"] += inner
        self.clock["images"] += images
        self._epoch_timing = {"train_seconds": train_seconds, "step_measure_seconds": inner,
                              "images": images}
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64,
                                                device=self.device)])
        if self.distributed:
            sums = fd.all_reduce_mean([sums.cpu()])[0] * world
        total_loss, count = sums.tolist()
        self._check_finite(total_loss)
        if self.distributed:
            fd.broadcast_buffers(self.model)  # rank 0's BatchNorm statistics, as DDP does
        if self.scheduler is not None:
            self.scheduler.step()
        return total_loss / max(count, 1)

    def _trainable(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _measure_within(self, probe: UpdateProbe | None, every: int) -> dict[str, Any]:
        """lambda_c after a probed step, the measures every ``every`` steps; logged."""
        record: dict[str, Any] = {}
        if probe is not None:
            direction = probe.direction()
            if direction is not None:
                record.update(self.tracker.critical(direction, at=probe.point()))
        if every and self.step % every == 0:
            values = self.tracker.measure()
            cost = {**record.get("cost", {}), **values.pop("cost")}
            record.update(values)
            record["cost"] = cost
        if record:
            entry = {"step": self.step, "epoch": self.epoch + 1, **record}
            self.measurements.append(entry)
            self.log.write("measure", entry, self.step)
            if "lambda_c" in record:
                self._last_lambda_c = record["lambda_c"]
        return record

    def _check_finite(self, value: float) -> None:
        """Stop a diverged run with :class:`NonFiniteLossError` (exit code 1 in the CLI)."""
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"the training loss became {value} in epoch {self.epoch + 1}; lower the "
                "learning rate or the perturbation radius"
            )

    # ------------------------------------------------------------------ evaluation
    def _evaluator(self, split: str) -> Objective:
        if split not in self._evaluators:
            data, distributed = self.feed.eval_data(split)
            self._evaluators[split] = Objective(
                self.model,
                self.loss_fn,
                data,
                eval_mode=True,
                distributed=distributed,
                check_determinism=False,
            )
        return self._evaluators[split]

    def evaluate(self) -> dict[str, float | None]:
        """Train and test loss and accuracy (eval mode, no augmentation) and the
        generalization gaps."""
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

    # ------------------------------------------------------------------ measures
    def measure_subset(self) -> tuple[Tensor, Tensor]:
        """The fixed training subset of the measures, unaugmented: the first
        ``measure_samples`` of one permutation drawn from seed 0, the same for every run on
        the same data."""
        return self.feed.measure_subset(self.measure_samples)

    @property
    def tracker(self) -> FlatnessTracker:
        """The :class:`FlatnessTracker` of the measures (built on first use)."""
        if self._tracker is None:
            x, y = self.measure_subset()
            x, y, distributed = fd.local_split(x, y, enabled=self.distributed)
            x = x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)
            self._tracker = FlatnessTracker(
                self.model,
                self.loss_fn,
                (x, y.to(self.device)),
                measures=self.measures,
                measure_rho=self.measure_rho,
                measure_steps=self.measure_steps,
                measure_budget=self.measure_budget,
                trace_probes=self.trace_probes,
                seed=self.seed,
                batch_size=self.eval_batch_size,
                distributed=distributed,
            )
            if self._tracker_state is not None:
                self._tracker.load_state_dict(self._tracker_state)
        return self._tracker

    def measure(self) -> dict[str, float]:
        """lambda_max, tr(H), R0 and R1 (those in ``measures``) on the fixed subset, now.

        The model is left unchanged; each measure uses its own seeded generator; lambda_max
        starts from the previous measurement's eigenvector.
        """
        values = self.tracker.measure()
        values.pop("cost")
        return values

    # ------------------------------------------------------------------ the run
    _bar: Progress | None = None
    _tracker_state: dict[str, Any] | None = None
    _last_lambda_c: float | None = None
    _epoch_timing: dict[str, Any] = {}

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
        self.log.open(self._log_offset if self._resumed else None, self.step)
        n = self.feed.num_train
        self._bar = Progress(
            None if n is None else n * epochs,
            (n or 0) * self.epoch,
            enabled=self.progress and fd.is_main(),
        )
        try:
            while self.epoch < epochs:
                self._run_epoch(epochs)
        finally:
            self._bar.close()
            self._bar = None
            self.log.close()
        return self.result()

    def _run_epoch(self, epochs: int) -> None:
        start = time.perf_counter()
        self._last_lambda_c = None
        with self._own_rng():
            lr = self.optimizer.param_groups[0]["lr"]
            running = self.train_epoch(epochs)
            row: dict[str, Any] = {"epoch": self.epoch + 1, "step": self.step, "lr": float(lr)}
            began = time.perf_counter()
            row.update(self.evaluate())
            evaluated = time.perf_counter() - began
            row["train_loss_running"] = running
            measured = self.measure_every and (self.epoch + 1) % self.measure_every == 0
            began = time.perf_counter()
            values = self.tracker.measure() if measured else {}
            measure_seconds = time.perf_counter() - began if measured else 0.0
            costs = values.pop("cost", None)
            row.update({m: values.get(m) for m in MEASURES})
            row["lambda_c"] = self._last_lambda_c
        row["seconds"] = time.perf_counter() - start
        self.clock["eval"] += evaluated
        self.clock["measure"] += measure_seconds
        timing = {
            "epoch": self.epoch + 1,
            **self._epoch_timing,
            "eval_seconds": evaluated,
            "measure_seconds": measure_seconds + self._epoch_timing["step_measure_seconds"],
        }
        t = timing["train_seconds"]
        timing["images_per_second"] = timing["images"] / t if t > 0 else None
        self.epoch_costs.append(timing)
        self.history.append(row)
        self.epoch += 1
        if costs:
            self.log.write("measure", {"step": self.step, "epoch": self.epoch,
                                       **values, "cost": costs}, self.step)
        self.log.write("epoch", {**row, **timing}, self.step)
        self.log.flush()
        if self.checkpoint_dir is not None and (
            self.epoch % self.checkpoint_every == 0 or self.epoch == epochs
        ):
            self.save_checkpoint(self.checkpoint_dir / CHECKPOINT_NAME)

    def costs(self) -> dict[str, Any]:
        """What the run spent: seconds of training, evaluation and measures, the overhead
        (measure seconds / training seconds), images per second and each measure's totals."""
        c = self.clock
        totals = {} if self._tracker is None else self._tracker.totals
        if self._tracker is None and self._tracker_state:
            totals = self._tracker_state.get("totals", {})
        return {
            "train_seconds": c["train"],
            "eval_seconds": c["eval"],
            "measure_seconds": c["measure"],
            "overhead": c["measure"] / c["train"] if c["train"] > 0 else None,
            "images_per_second": c["images"] / c["train"] if c["train"] > 0 else None,
            "measures": {k: dict(v) for k, v in totals.items()},
            "per_epoch": [dict(r) for r in self.epoch_costs],
        }

    def result(self) -> TrainResult:
        """The history so far as a :class:`TrainResult`."""
        return TrainResult(
            history=[dict(r) for r in self.history],
            final=dict(self.history[-1]) if self.history else {},
            settings=self.settings(),
            checkpoint=None if self.last_checkpoint is None else str(self.last_checkpoint),
            model=self.model,
            measurements=[dict(r) for r in self.measurements],
            costs=self.costs(),
        )

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        """The trainer's own state beside model, optimizer and scheduler."""
        tracker = self._tracker.state_dict() if self._tracker else self._tracker_state
        return {
            "step": self.step,
            "log_offset": self.log.offset(),
            "tracker": tracker,
            "scaler": self.stepper.state_dict(),
            "measurements": self.measurements,
            "clock": dict(self.clock),
            "epoch_costs": self.epoch_costs,
        }

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the full training state to ``path`` (+ ``.json``), atomically (on rank 0
        only when distributed; every rank returns the path)."""
        if self.distributed and not fd.is_main():
            self.last_checkpoint = Path(path)
            return self.last_checkpoint
        rng = {**self.feed.state_dict(), **self._rng}
        self.last_checkpoint = save_training_checkpoint(
            path,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            epoch=self.epoch,
            history=self.history,
            rng=rng,
            config=self.settings(),
            extra=self._state(),
        )
        return self.last_checkpoint

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, RNG states, epoch, history and the
        measures' warm-start state from ``path``.

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
            self.feed.load_state_dict(rng)
            self._rng["torch"] = rng["torch"]
            if "cuda" in self._rng and "cuda" in rng:
                self._rng["cuda"] = rng["cuda"]
            self.epoch = int(payload["epoch"])
            self.history = [dict(r) for r in payload["history"]]
            extra = payload.get("extra") or {}
            self.step = int(extra.get("step", 0))
            self._log_offset = extra.get("log_offset")
            self._tracker_state = extra.get("tracker")
            if self._tracker is not None and self._tracker_state is not None:
                self._tracker.load_state_dict(self._tracker_state)
            self.stepper.load_state_dict(extra.get("scaler"))
            self.measurements = [dict(r) for r in extra.get("measurements", [])]
            self.clock = {**self.clock, **extra.get("clock", {})}
            self.epoch_costs = [dict(r) for r in extra.get("epoch_costs", [])]
        except Exception as err:  # a state that does not fit this trainer
            text = " ".join(str(err).split()) or "(no message)"
            raise CheckpointError(
                f"checkpoint {path} does not fit this trainer ({type(err).__name__}: {text}); "
                "build the model, optimizer and scheduler as the saved run was built"
            ) from err
        self.last_checkpoint = Path(path)
        self._resumed = True
