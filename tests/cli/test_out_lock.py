"""The lock of an output folder (:mod:`flatlens.cli._lock`): one holder, stale locks of dead
processes taken over by exactly one process even when several race for them, another
host's lock never taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import flatlens.cli._lock as lock_module
from flatlens.cli._lock import LOCK_NAME, OutLock, OutLocked

# Loads _lock.py by its path (standard library only), so that racing processes start fast.
_RACER = textwrap.dedent(
    """
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("lock", {module!r})
    lock = sys.modules["lock"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    folder, go = sys.argv[1], sys.argv[2]
    while not os.path.exists(go):
        time.sleep(0.0005)
    try:
        held = lock.OutLock(folder, "race").acquire()
    except lock.OutLocked as err:
        print("busy", err, flush=True)
    else:
        print("got", flush=True)
        time.sleep(1.0)  # alive while the others look
        held.release()
    """
)


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(proc.stdout)


def _write_lock(folder: Path, **fields) -> dict:
    lock = {
        "pid": _dead_pid(),
        "host": socket.gethostname(),
        "started": "earlier",
        "command": "train",
        "token": "0123456789abcdef",
        **fields,
    }
    (folder / LOCK_NAME).write_text(json.dumps(lock))
    return lock


def test_the_lock_records_its_owner_and_is_removed_on_release(tmp_path):
    held = OutLock(tmp_path, "diagnose").acquire()
    data = json.loads((tmp_path / LOCK_NAME).read_text())
    assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
    assert data["command"] == "diagnose" and data["started"]
    with pytest.raises(OutLocked, match=f"process {os.getpid()}"):
        OutLock(tmp_path, "train").acquire()
    held.release()
    assert sorted(os.listdir(tmp_path)) == []
    held.release()  # twice is harmless


def test_release_leaves_a_lock_that_is_no_longer_its_own(tmp_path):
    held = OutLock(tmp_path, "train").acquire()
    (tmp_path / LOCK_NAME).unlink()
    other = _write_lock(tmp_path)
    held.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == other


def test_a_stale_lock_is_taken_over_and_a_reused_process_id_is_stale(tmp_path):
    stale = _write_lock(tmp_path)
    held = OutLock(tmp_path, "train").acquire()
    assert held.took_over is not None and held.took_over.pid == stale["pid"]
    held.release()
    # this very process's id, but another start time: a reused id, so the lock is stale
    _write_lock(tmp_path, pid=os.getpid(), proc_start="1")
    if lock_module._proc_start(os.getpid()) is None:
        pytest.skip("no /proc start times here")
    OutLock(tmp_path, "train").acquire().release()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("not json", ["cannot be read", "delete"]),
        (None, ["another host", "delete"]),
    ],
)
def test_unreadable_and_foreign_locks_are_never_taken_over(tmp_path, content, words):
    if content is None:
        _write_lock(tmp_path, host="elsewhere.invalid")
    else:
        (tmp_path / LOCK_NAME).write_text(content)
    before = (tmp_path / LOCK_NAME).read_text()
    with pytest.raises(OutLocked) as info:
        OutLock(tmp_path, "train").acquire()
    assert all(w in str(info.value) for w in words)
    assert str(tmp_path / LOCK_NAME) in str(info.value)
    assert (tmp_path / LOCK_NAME).read_text() == before


@pytest.mark.parametrize("round_", range(2))
def test_processes_racing_for_one_stale_lock_let_exactly_one_through(tmp_path, round_):
    """Four processes find the same stale lock at the same moment: one takes it over, the
    others are refused, naming the winner."""
    folder = tmp_path / "out"
    folder.mkdir()
    _write_lock(folder)
    script = _RACER.format(module=lock_module.__file__)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(folder), str(go)],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    time.sleep(0.5)  # all started and polling
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    lines = [out.strip() for out, _ in results]
    assert sum(line == "got" for line in lines) == 1, lines
    winner = procs[[line == "got" for line in lines].index(True)].pid
    for line in lines:
        assert line == "got" or f"process {winner} on" in line, lines
    assert not (folder / LOCK_NAME).exists()
    assert [n for n in os.listdir(folder) if n.endswith(".new")] == []


def test_a_takeover_that_lost_the_race_leaves_the_winners_lock_alone(tmp_path):
    """The interleaving the process race can produce, made deterministic: B saw the stale
    lock, A took it over meanwhile, then B goes on with its takeover. B must re-read the
    lock (under the folder's flock) and stop, not remove A's live lock."""
    _write_lock(tmp_path)
    _, seen_by_b = lock_module._read(tmp_path / LOCK_NAME)
    a = OutLock(tmp_path, "train").acquire()
    assert a.took_over == seen_by_b
    b = OutLock(tmp_path, "diagnose")
    b._take_over(seen_by_b)
    assert not b.held
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == a.owner.token
    with pytest.raises(OutLocked, match=f"process {os.getpid()}"):
        b.acquire()
    a.release()
