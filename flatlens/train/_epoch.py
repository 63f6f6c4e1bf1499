"""One training epoch of a :class:`~flatlens.train.Trainer`: the steps, the measurements
taken between them (λ_c along the update, the measures every few steps) and their log."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor

from flatlens import distributed as fd
from flatlens.core._errors import NonFiniteLossError
from flatlens.train._steps import UpdateProbe

__all__ = ["EpochMixin"]


class EpochMixin:
    """The training-epoch methods of the Trainer."""

    def _train_epoch(self, total_epochs: int | None = None) -> float:
        """One pass over the shuffled (augmented) training data; returns the mean
        first-pass loss."""
        self.model.train()
        world = fd.world_size() if self.distributed else 1
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count, images, inner, started = 0, 0, 0.0, time.perf_counter()
        k, n_steps = self.critical_every_steps, self.measure_every_steps
        probe = UpdateProbe(self.optimizer, self._trainable()) if k else None
        per_step = getattr(self.scheduler, "per_step", False)
        for x, y, weight in self.feed.epoch():
            critical = probe is not None and (self.step + 1) % k == 0
            if critical:
                probe.before()
            loss = self.stepper.step(x, y, weight)
            self.step += 1
            if per_step:
                self.scheduler.step()
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
        self._epoch_timing = {
            "train_seconds": train_seconds,
            "step_measure_seconds": inner,
            "images": images,
        }
        sums = torch.stack(
            [total, torch.tensor(float(count), dtype=torch.float64, device=self.device)]
        )
        if self.distributed:
            sums = fd.all_reduce_mean([sums.cpu()])[0] * world
        total_loss, count = sums.tolist()
        self._check_finite(total_loss)
        if self.distributed:
            fd.broadcast_buffers(self.model)  # rank 0's BatchNorm statistics, as DDP does
        if self.scheduler is not None and not per_step:
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
