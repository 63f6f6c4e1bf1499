"""Saving and restoring a :class:`~flatlens.train.Trainer`'s whole state (see
``flatlens.train._checkpoint`` for the files): model, optimizer, scheduler, the data's and
the global random states, history, step count, the measures' warm-start state, the
GradScaler and the log's length, so that a resumed run repeats the uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flatlens import distributed as fd
from flatlens.core._io import CheckpointError
from flatlens.train._checkpoint import (
    load_on_main,
    load_training_checkpoint,
    save_training_checkpoint,
)

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """The checkpoint methods of the Trainer."""

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

    def _save_checkpoint(self, path: str | Path) -> Path:
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

    def _load_checkpoint(self, path: str | Path) -> None:
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
