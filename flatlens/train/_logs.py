"""What a training run tells people while it runs: JSON lines, TensorBoard, a progress bar.

* ``log.jsonl``: one JSON object per line, ``{"event": "step", ...}`` every ``log_every``
  optimizer steps (step, epoch, loss, learning rate, images per second),
  ``{"event": "epoch", ...}`` per epoch (the history row) and ``{"event": "measure",
  ...}`` per flatness measurement (values and costs). A resumed run first cuts the file
  back to where its checkpoint was written, so the log is the uninterrupted run's.
* TensorBoard event files (``tensorboard/``) with the same scalars, when asked for; a
  resumed run purges the events after its checkpoint's step.
* A progress bar over the whole run, in images: images per second and the time left.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flatlens.core._results import to_jsonable

__all__ = ["LOG_NAME", "Progress", "RunLog"]

LOG_NAME = "log.jsonl"


class RunLog:
    """JSON lines (and TensorBoard scalars) of one run; nothing when ``log_dir`` is None.

    Args:
        log_dir: The folder of ``log.jsonl`` and ``tensorboard/``.
        tensorboard: Also write TensorBoard event files.
        enabled: False on the ranks that do not write (all but rank 0).
    """

    def __init__(self, log_dir: str | Path | None, *, tensorboard: bool, enabled: bool = True):
        self.dir = None if log_dir is None or not enabled else Path(log_dir)
        self.tensorboard = tensorboard
        self._file = None
        self._writer = None
        if tensorboard and self.dir is not None:
            _tensorboard_writer_class()  # a missing package fails before training starts

    @property
    def path(self) -> Path | None:
        """The JSON-lines file."""
        return None if self.dir is None else self.dir / LOG_NAME

    def open(self, offset: int | None, step: int) -> None:
        """Start writing: at the end of a new file (``offset`` None) or, resuming, after
        cutting the file back to ``offset`` bytes; TensorBoard purges events from ``step``."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path
        if offset is None:
            path.write_bytes(b"")
        else:
            if not path.exists():
                path.write_bytes(b"")
            with path.open("r+b") as fh:
                fh.truncate(min(offset, os.path.getsize(path)))
        self._file = path.open("a", encoding="utf-8")
        if self.tensorboard:
            writer = _tensorboard_writer_class()
            purge = None if offset is None else step + 1  # events after the checkpoint
            self._writer = writer(str(self.dir / "tensorboard"), purge_step=purge)

    def offset(self) -> int | None:
        """Bytes written so far (saved with checkpoints)."""
        if self._file is None:
            return None
        self._file.flush()
        return self._file.tell()

    def write(self, event: str, record: dict[str, Any], step: int) -> None:
        """One line ``{"event": event, **record}``, and its numbers as TensorBoard scalars
        under ``event/name`` at ``step``."""
        if self._file is None:
            return
        line = {"event": event, **record}
        self._file.write(json.dumps(to_jsonable(line), allow_nan=False) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{event}/{key}", value, step)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "--tensorboard needs the tensorboard package: pip install 'flatlens[tensorboard]'"
        ) from err
    return SummaryWriter


class Progress:
    """One bar over the whole run, counting images: images/s and the time left.

    Args:
        total: Images of the whole run (None: unknown, no time left shown).
        done: Images already trained (a resumed run).
        enabled: Show it at all.
    """

    def __init__(self, total: int | None, done: int, *, enabled: bool) -> None:
        self.bar = tqdm(
            total=total,
            initial=done,
            unit="img",
            unit_scale=True,
            disable=not enabled,
            leave=False,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        self.started = time.perf_counter()

    def update(self, images: int, **postfix: Any) -> None:
        """``images`` more trained; ``postfix`` shown beside the rate."""
        self.bar.update(images)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)

    def describe(self, text: str) -> None:
        self.bar.set_description_str(text, refresh=False)

    def close(self) -> None:
        self.bar.close()
