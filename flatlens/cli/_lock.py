"""One writer per output folder: the advisory lock a command holds on its ``--out``.

The lock is a small JSON file, ``--out/.flatlens.lock``, naming its owner: process id,
host, start time, the command and a random token. It is created atomically (written under a
temporary name, then hard-linked to the lock's name, which fails when the name exists), so
a reader never sees a half-written lock and two processes never both create it.

When the lock exists, its owner decides:

* a live process (on this host) holds it: the folder is busy, :class:`OutLocked` names it;
* a process of this host that has ended (or whose id now belongs to another process, told
  apart by its start time in ``/proc``) left it behind: it is stale and is taken over. Two
  processes that find the same stale lock take turns through an exclusive ``flock`` on the
  folder itself (released by the kernel when a process dies, so it never goes stale) and each
  re-reads the lock under it: the first removes the stale lock and creates its own, the
  second then finds the first one's live lock and stops;
* another host holds it: its processes cannot be checked from here, so it is never taken
  over; the message says how to remove it by hand.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "OutLock", "OutLocked", "acquire"]

LOCK_NAME = ".flatlens.lock"

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: no takeover serialization
    fcntl = None  # type: ignore[assignment]


class OutLocked(Exception):
    """Another flatlens process writes into the folder (or left a lock it cannot check)."""


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or
    None where it cannot be read; it tells a reused process id from the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name in field 2 may hold spaces, so split after ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` runs on this host and is the one that started at
    ``started`` (when known)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    except OSError:
        return False
    if started is not None:
        now = _proc_start(pid)
        if now is not None and now != started:
            return False  # the id was reused by a later process
    return True


@dataclass(frozen=True)
class Owner:
    """Who holds a lock, as its file records it."""

    pid: int
    host: str
    started: str
    command: str
    token: str
    proc_start: str | None = None

    def describe(self) -> str:
        return f"flatlens {self.command} (process {self.pid} on {self.host}, since {self.started})"

    @classmethod
    def me(cls, command: str) -> Owner:
        pid = os.getpid()
        return cls(
            pid=pid,
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%d %H:%M:%S %z"),
            command=command,
            token=secrets.token_hex(8),
            proc_start=_proc_start(pid),
        )

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        try:
            data: Any = json.loads(text)
            return cls(
                pid=int(data["pid"]),
                host=str(data["host"]),
                started=str(data["started"]),
                command=str(data.get("command", "?")),
                token=str(data["token"]),
                proc_start=None if data.get("proc_start") is None else str(data["proc_start"]),
            )
        except (ValueError, TypeError, KeyError):
            return None


def _read(path: Path) -> tuple[bool, Owner | None]:
    """``(exists, owner)`` of the lock file; owner None when it cannot be parsed."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return False, None
    except OSError:
        return True, None
    return True, Owner.parse(text)


def _create(path: Path, owner: Owner) -> bool:
    """Create the lock holding ``owner`` atomically; False when it already exists."""
    body = json.dumps(owner.__dict__, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f"{LOCK_NAME}.", suffix=".new", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as err:  # no hard links on this file system: exclusive create
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            try:
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(handle, "w", encoding="utf-8") as fh:
                fh.write(body)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def _serialized(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` for the block (a no-op where unsupported)."""
    if fcntl is None:
        yield
        return
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(handle)  # releases the flock


def _busy(folder: Path, owner: Owner | None, path: Path) -> OutLocked:
    if owner is None:
        return OutLocked(
            f"--out {folder} holds a lock file {LOCK_NAME} that cannot be read; if no flatlens "
            f"command writes there, delete {path} and run again"
        )
    if owner.host != socket.gethostname():
        return OutLocked(
            f"--out {folder} is locked by {owner.describe()}: another host, whose processes "
            f"cannot be checked from here; if that run has ended, delete {path} and run again"
        )
    return OutLocked(
        f"--out {folder} is being written by {owner.describe()}; wait for it to finish, "
        "stop it, or choose another --out"
    )


class OutLock:
    """The lock a command holds on its output folder (see the module docstring).

    Args:
        folder: The output folder; it must exist.
        command: The subcommand, recorded for the message another writer gets.
    """

    def __init__(self, folder: str | os.PathLike, command: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.owner = Owner.me(command)
        self.held = False
        self.took_over: Owner | None = None

    def acquire(self) -> OutLock:
        """Take the lock, over a stale one of this host when needed.

        Raises:
            OutLocked: A live process holds it, or a process of another host, or its file
                cannot be read.
        """
        for _ in range(50):
            if _create(self.path, self.owner):
                self.held = True
                return self
            exists, owner = _read(self.path)
            if not exists:
                continue  # removed meanwhile: try again
            if owner is not None and owner.host == socket.gethostname():
                if not _alive(owner.pid, owner.proc_start):
                    self._take_over(owner)
                    if self.held:
                        return self
                    continue
            raise _busy(self.folder, owner, self.path)
        raise OutLocked(f"--out {self.folder}: the lock {self.path} keeps changing; run again")

    def _take_over(self, stale: Owner) -> None:
        """Replace the stale lock of ``stale`` by ours, one process of this host at a time."""
        with _serialized(self.folder):
            exists, owner = _read(self.path)
            if exists and owner != stale:
                return  # another process took it over (or released it) meanwhile
            if exists:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            if _create(self.path, self.owner):
                self.held = True
                self.took_over = stale

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if not self.held:
            return
        self.held = False
        _, owner = _read(self.path)
        if owner is not None and owner.token == self.owner.token:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(folder: str | os.PathLike, command: str) -> OutLock:
    """Take the lock on ``folder`` (see :class:`OutLock`); ``release()`` it when done."""
    return OutLock(folder, command).acquire()
