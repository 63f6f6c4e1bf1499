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
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from flatlens import distributed as fd
from flatlens._augment import Augmentation
from flatlens._streams import Streams
from flatlens.core._checks import check_positive, check_positive_int, check_rho
from flatlens.core._objective import Objective
from flatlens.core._renames import renamed
from flatlens.data import Dataset
from flatlens.optim import PerturbationOptimizer
from flatlens.train._epoch import EpochMixin
from flatlens.train._feed import Feed, check_distributed
from flatlens.train._logs import Progress, RunLog
from flatlens.train._measures import MEASURES, check_measures
from flatlens.train._persist import CheckpointMixin
from flatlens.train._result import TrainResult
from flatlens.train._steps import AMP, Stepper
from flatlens.train._tracker import FlatnessTracker

__all__ = ["AMP", "CHECKPOINT_NAME", "TrainResult", "Trainer"]

CHECKPOINT_NAME = "checkpoint.pt"


class Trainer(EpochMixin, CheckpointMixin):
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
        self.distributed = check_distributed(distributed, data, batch_size)
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
        self._bar: Progress | None = None
        self._tracker_state: dict[str, Any] | None = None
        self._last_lambda_c: float | None = None
        self._epoch_timing: dict[str, Any] = {}

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
            "augment": None if self.augment is None else self.augment.augment,
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

    # ------------------------------------------------------------------ public steps
    def train_epoch(self, total_epochs: int | None = None) -> float:
        """One pass over the shuffled (augmented) training data, with the measurements due
        within it; returns the mean first-pass loss."""
        return self._train_epoch(total_epochs)

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the full training state to ``path`` (+ ``.json``), atomically (on rank 0
        only when distributed; every rank returns the path)."""
        return self._save_checkpoint(path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, RNG states, epoch, history and the measures'
        warm-start state from ``path`` (a trainer built as the saved run was built; when
        distributed, rank 0 reads the file and sends it to the other ranks)."""
        self._load_checkpoint(path)

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
        self._resumed = True  # a later fit() continues this log
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
            self._log_offset = self.log.offset()
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
            self.log.write(
                "measure",
                {"step": self.step, "epoch": self.epoch, **values, "cost": costs},
                self.step,
            )
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
